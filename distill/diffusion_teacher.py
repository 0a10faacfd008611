"""The video-diffusion teachers: a local diffusers model directory (`--teacher diffusers:PATH`).

`load_teacher` reads the folder's `model_index.json`: an LTX-2 folder gives the audio-conditioned
`distill.ltx2_teacher.LTX2Teacher`, a Stable Video Diffusion folder the `DiffusionTeacher` here.
Both have one interface: `condition`, `uncondition`, `encode`, `decode`, `predict`,
`schedule_for`, `sample`, `prediction_type`, `uses_audio`, `downsample`, `frames_multiple`.

Supported SVD layout: Stable Video Diffusion (`StableVideoDiffusionPipeline.save_pretrained`: `unet`
UNetSpatioTemporalConditionModel, `vae` AutoencoderKLTemporalDecoder, `image_encoder`
CLIPVisionModelWithProjection, `feature_extractor` (only its mean/std JSON is read), `scheduler`
EulerDiscreteScheduler). It is an image-to-video model conditioned on the avatar's reference
render; it takes no audio, so `audio` arguments are accepted and ignored (`uses_audio` is False).

SVD's scheduler is σ-parametrised: x_ve = z + s·ε, the unet sees x_ve / sqrt(1 + s²) at timestep
0.25·ln s and returns F with ẑ = x_ve / (1 + s²) − s / sqrt(1 + s²)·F. In the scaled input
x = α·z + σ·ε (α = 1 / sqrt(1 + s²), σ = s / sqrt(1 + s²)) that is ẑ = α·x − σ·F, a plain
v-prediction: so `schedule` is NoiseSchedule("edm"), τ = s, and `prediction_type` "v_prediction".
Everything is loaded with `local_files_only=True`; nothing is downloaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from distill.score import NoiseSchedule

SUPPORTED = ("StableVideoDiffusionPipeline",)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP, when the folder gives none
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class TeacherLoadError(ValueError):
    """A teacher directory that is missing, incomplete or of an unsupported kind."""


@dataclass(frozen=True)
class SVDSettings:
    """Stable Video Diffusion's micro-conditioning and sampling guidance (diffusers' defaults)."""

    fps: int = 7  # the clip rate it is told about (conditioned on fps − 1, as SVD was trained)
    motion_bucket_id: int = 127  # more motion when higher
    noise_aug_strength: float = 0.02  # noise added to the reference before encoding it
    min_guidance_scale: float = 1.0  # `sample`: guidance rises linearly over the frames ...
    max_guidance_scale: float = 3.0  # ... from min (first frame) to max (last frame)


@dataclass(frozen=True)
class SVDCondition:
    """What SVD is conditioned on: the reference render, seen by CLIP and by the VAE."""

    image_embeds: Tensor  # [1, 1, E] CLIP image embedding
    image_latents: Tensor  # [1, C, h, w] VAE posterior mode, unscaled (as SVD's pipeline)
    added_time_ids: Tensor  # [1, 3] (fps − 1, motion bucket, noise augmentation)


def pipeline_class(root: Path) -> str | None:
    """The pipeline class a diffusers folder's `model_index.json` names; clear errors for a
    missing folder or index."""
    if not root.is_dir():
        raise TeacherLoadError(f"{root}: no such teacher model directory")
    index = root / "model_index.json"
    if not index.is_file():
        raise TeacherLoadError(f"{root}: no model_index.json (not a diffusers pipeline folder)")
    return json.loads(index.read_text()).get("_class_name")


def _weights_variant(folder: Path) -> str | None:
    """'fp16' when a component ships only fp16-variant weights (as SVD's releases can)."""
    names = [p.name for p in folder.glob("*.safetensors")]
    return "fp16" if names and all(".fp16" in n for n in names) else None


class DiffusionTeacher:
    """A frozen SVD teacher: `encode` frames, `predict` for score distillation, `sample` clips."""

    prediction_type = "v_prediction"
    uses_audio = False
    frames_multiple = 1  # any clip length

    def __init__(
        self,
        unet: Any,
        vae: Any,
        image_encoder: Any,
        scheduler: Any,
        clip_mean: tuple[float, ...] = CLIP_MEAN,
        clip_std: tuple[float, ...] = CLIP_STD,
        settings: SVDSettings | None = None,
    ) -> None:
        self.unet, self.vae, self.image_encoder = unet, vae, image_encoder
        self.scheduler = scheduler
        for module in (unet, vae, image_encoder):
            module.requires_grad_(False).eval()
        self.schedule = NoiseSchedule.from_scheduler(scheduler)
        if self.schedule.kind != "edm" or scheduler.config.prediction_type != "v_prediction":
            raise TeacherLoadError(
                f"{type(scheduler).__name__}: SVD needs a continuous-time v-prediction "
                "EulerDiscreteScheduler (timestep_type 'continuous')"
            )
        self.clip_mean = torch.tensor(clip_mean).view(1, 3, 1, 1)
        self.clip_std = torch.tensor(clip_std).view(1, 3, 1, 1)
        self.settings = settings or SVDSettings()

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        settings: SVDSettings | None = None,
    ) -> DiffusionTeacher:
        """Load a local model directory, offline.

        The unet and CLIP run in `dtype` (default fp16 on CUDA, fp32 on CPU), the VAE in fp32.
        """
        root = Path(path)
        name = pipeline_class(root)
        if name not in SUPPORTED:
            supported = ", ".join(SUPPORTED)
            raise TeacherLoadError(f"{root}: {name} is not a supported teacher ({supported})")
        try:
            from diffusers import (
                AutoencoderKLTemporalDecoder,
                EulerDiscreteScheduler,
                UNetSpatioTemporalConditionModel,
            )
            from transformers import CLIPVisionModelWithProjection
        except ImportError as err:
            raise TeacherLoadError(f"{root}: needs diffusers and transformers ({err})") from err
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)

        def load_part(kind: Any, sub: str, **kw: Any) -> Any:
            folder = root / sub
            if sub != "scheduler":
                kw["variant"] = _weights_variant(folder)
            try:
                return kind.from_pretrained(folder, local_files_only=True, **kw)
            except (OSError, ValueError) as err:
                raise TeacherLoadError(f"{folder}: cannot load {kind.__name__}: {err}") from err

        unet = load_part(UNetSpatioTemporalConditionModel, "unet", torch_dtype=dtype)
        vae = load_part(AutoencoderKLTemporalDecoder, "vae")  # fp32: SVD's VAE overflows in fp16
        image_encoder = load_part(CLIPVisionModelWithProjection, "image_encoder")
        scheduler = load_part(EulerDiscreteScheduler, "scheduler")
        preprocessor = root / "feature_extractor" / "preprocessor_config.json"
        clip = json.loads(preprocessor.read_text()) if preprocessor.is_file() else {}
        return cls(
            unet=unet.to(device),
            vae=vae.to(device),
            image_encoder=image_encoder.to(device, dtype),
            scheduler=scheduler,
            clip_mean=tuple(clip.get("image_mean", CLIP_MEAN)),
            clip_std=tuple(clip.get("image_std", CLIP_STD)),
            settings=settings,
        )

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def downsample(self) -> int:
        """Pixels per latent cell."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def _check_size(self, h: int, w: int) -> None:
        if h % self.downsample or w % self.downsample:
            raise ValueError(f"frame size {h}x{w} is not a multiple of {self.downsample}")

    @torch.no_grad()
    def condition(
        self,
        reference: Tensor,  # [H, W, 3] in [0, 1], the avatar's reference render
        audio: np.ndarray | None = None,
        size: tuple[int, int] | None = None,
        seed: int = 0,
        num_frames: int | None = None,
        fps: float | None = None,
    ) -> SVDCondition:
        """Condition for clips of `size` (H, W; default the reference's); `audio`, `num_frames`
        and `fps` (the scene's; SVD is told its own `settings.fps`) are ignored.

        The CLIP view resizes the whole image (no crop, as SVD's pipeline) with an antialiased
        bicubic filter; the VAE view is resized to `size` and noised by `noise_aug_strength`.
        """
        del audio, num_frames, fps  # SVD takes no audio and any clip length
        h, w = size or reference.shape[:2]
        self._check_size(h, w)
        image = reference.permute(2, 0, 1)[None].to(self.device, torch.float32)  # [1, 3, H, W]
        side = self.image_encoder.config.image_size
        clip = F.interpolate(image, (side, side), mode="bicubic", antialias=True).clamp(0, 1)
        clip = (clip - self.clip_mean.to(clip.device)) / self.clip_std.to(clip.device)
        embeds = self.image_encoder(clip.to(self.image_encoder.dtype)).image_embeds[:, None]
        if image.shape[-2:] != (h, w):
            image = F.interpolate(image, (h, w), mode="bilinear", antialias=True)
        aug = self.settings.noise_aug_strength
        noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(seed))
        image = image * 2 - 1 + aug * noise.to(image.device)
        latents = self.vae.encode(image.to(self.vae.dtype)).latent_dist.mode()  # [1, C, h, w]
        ids = [self.settings.fps - 1, self.settings.motion_bucket_id, aug]
        return SVDCondition(
            image_embeds=embeds,
            image_latents=latents,
            added_time_ids=torch.tensor([ids], device=self.device, dtype=self.unet.dtype),
        )

    def uncondition(self, cond: SVDCondition) -> SVDCondition:
        """SVD's unconditional branch for classifier-free guidance: zero embedding and latents."""
        return replace(
            cond,
            image_embeds=torch.zeros_like(cond.image_embeds),
            image_latents=torch.zeros_like(cond.image_latents),
        )

    def schedule_for(self, latents: Tensor) -> NoiseSchedule:
        """The noise schedule (the same at every clip size)."""
        return self.schedule

    def encode(self, frames: Tensor, cond: SVDCondition | None = None) -> Tensor:
        """Frames [T, H, W, 3] in [0, 1] -> latents [1, T, C, h, w] (float32), differentiable.

        The VAE posterior mean times its scaling factor; gradients flow back to `frames`.
        """
        self._check_size(*frames.shape[1:3])
        x = frames.permute(0, 3, 1, 2).to(self.device, self.vae.dtype) * 2 - 1  # [T, 3, H, W]
        z = self.vae.encode(x).latent_dist.mean * self.vae.config.scaling_factor
        return z.float()[None]

    @torch.no_grad()
    def decode(self, latents: Tensor, cond: SVDCondition | None = None) -> Tensor:
        """Latents [1, T, C, h, w] -> frames [T, H, W, 3] in [0, 1]."""
        z = latents[0].to(self.vae.dtype) / self.vae.config.scaling_factor  # [T, C, h, w]
        frames = self.vae.decode(z, num_frames=z.shape[0]).sample  # [T, 3, H, W]
        return (frames.float().permute(0, 2, 3, 1) / 2 + 0.5).clamp(0, 1)

    def predict(self, x: Tensor, tau: Tensor, cond: SVDCondition) -> Tensor:
        """The unet's v-prediction for x [B, T, C, h, w] (the scaled input) at s = tau [B]."""
        b, t = x.shape[:2]
        image = cond.image_latents[:, None].expand(b, t, -1, -1, -1)  # [B, T, C, h, w]
        if image.shape[-2:] != x.shape[-2:]:
            raise ValueError(
                f"latents {tuple(x.shape[-2:])} do not match the condition's "
                f"{tuple(image.shape[-2:])}: pass condition(..., size=(H, W)) of the frames"
            )
        out = self.unet(
            torch.cat([x, image.to(x.dtype)], dim=2).to(self.unet.dtype),
            0.25 * tau.to(self.device, torch.float32).log(),  # SVD's continuous timestep
            encoder_hidden_states=cond.image_embeds.expand(b, -1, -1),
            added_time_ids=cond.added_time_ids.expand(b, -1),
            return_dict=False,
        )[0]
        return out.to(x.dtype)

    @torch.no_grad()
    def sample(
        self,
        reference: Tensor,  # [H, W, 3] in [0, 1]
        num_frames: int,
        steps: int = 25,
        seed: int = 0,
        audio: np.ndarray | None = None,
        fps: float | None = None,
    ) -> Tensor:
        """A clip [T, H, W, 3] in [0, 1] from the reference (Euler sampling, SVD's guidance).

        Deterministic for a seed; `audio` and `fps` are ignored.
        """
        cond = self.condition(reference, audio, seed=seed)
        uncond = self.uncondition(cond)
        scheduler = type(self.scheduler).from_config(self.scheduler.config)  # fresh step state
        scheduler.set_timesteps(steps, device=self.device)
        c = self.unet.config.out_channels
        shape = (1, num_frames, c, *cond.image_latents.shape[-2:])
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        latents = noise.to(self.device) * scheduler.init_noise_sigma  # [1, T, C, h, w], x_ve
        s = self.settings
        guidance = torch.linspace(s.min_guidance_scale, s.max_guidance_scale, num_frames)
        guidance = guidance.to(self.device).view(1, num_frames, 1, 1, 1)
        for t in tqdm(scheduler.timesteps, desc="teacher clip", leave=False):
            x = scheduler.scale_model_input(latents, t)
            tau = scheduler.sigmas[scheduler.step_index].view(1)
            out = self.predict(x, tau, cond)
            if s.max_guidance_scale > 1:
                out_u = self.predict(x, tau, uncond)
                out = out_u + guidance * (out - out_u)
            latents = scheduler.step(out, t, latents).prev_sample
        return self.decode(latents)


def load_teacher(path: str | Path, device: str | torch.device | None = None) -> Any:
    """The teacher a local diffusers folder holds: LTX-2 (audio-conditioned) or SVD."""
    from .ltx2_teacher import SUPPORTED as LTX2
    from .ltx2_teacher import LTX2Teacher

    root = Path(path)
    name = pipeline_class(root)
    if name in LTX2:
        return LTX2Teacher.load(root, device)
    if name in SUPPORTED:
        return DiffusionTeacher.load(root, device)
    kinds = ", ".join(SUPPORTED + LTX2)
    raise TeacherLoadError(f"{root}: {name} is not a supported teacher ({kinds})")
