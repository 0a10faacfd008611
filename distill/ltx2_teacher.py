"""The audio-conditioned video-diffusion teacher: a local LTX-2 diffusers folder.

LTX-2 (`LTX2ImageToVideoPipeline` / `LTX2Pipeline`, diffusers >= 0.42) is a joint audio-video
flow-matching transformer: video and audio tokens attend to each other in every block and each
stream has its own timestep. The teacher holds the speech *clean* (audio timestep 0, as
diffusers' LTX-2 refine pipelines do to follow a fixed waveform) and noises only the video, so
its velocity for our frames is conditioned on what is being said: the lip sync the SVD teacher
cannot give. As in LTX-2's image-to-video pipeline, the first latent frame is the reference
render held clean (its tokens at timestep 0), re-compressed through H.264 as that pipeline does
its conditioning image (CRF 33 for Gemma 3 generations, needs PyAV); our frames follow it.

Clip layout, `r` = the video VAE's temporal compression (8 for LTX-2): the teacher sees pixel
frames [reference, f_1 .. f_T] with T a multiple of r, which its causal VAE turns into 1 + T/r
latent frames, the first the reference's alone. `encode` returns the T/r latent frames of our
frames (encoded behind the reference, differentiably); `predict` puts the reference's latent
frame back in front and returns the velocity of ours. Audio: 16 kHz samples covering the 1 + T
frame slots (the reference's slot first), turned into LTX-2's log-mel (16 kHz, 1024-point STFT,
hop 160, Slaney mel bins up to 8 kHz, log of the magnitude clamped at 1e-5), encoded by its
audio VAE.

Noise: rectified flow, x = (1 − τ)·z + τ·ε, velocity prediction ("flow"); the scheduler's
resolution-dependent shift is fixed per clip size (`schedule_for`). The prompt is encoded once at
load time and the text encoder is then dropped. Everything loads with `local_files_only=True`.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from deform.audio import SAMPLE_RATE

from .diffusion_teacher import TeacherLoadError
from .score import NoiseSchedule

SUPPORTED = ("LTX2ImageToVideoPipeline", "LTX2Pipeline")
log = logging.getLogger(__name__)
N_FFT = 1024  # LTX-2's mel front end (its audio VAE's training features)


@dataclass(frozen=True)
class LTX2Settings:
    prompt: str = "A person talks to the camera; lips, face and hands move with the speech."
    negative_prompt: str = ""  # the unconditional branch of classifier-free guidance
    max_sequence_length: int = 128  # prompt tokens
    guidance_scale: float = 3.0  # `sample` only (LTX-2's default)
    use_cross_timestep: bool = True  # LTX-2.3 cross-modal modulation (diffusers' default)


@dataclass(frozen=True)
class LTX2Condition:
    """The reference render, the speech and the prompt, as the transformer takes them."""

    reference: Tensor  # [1, 3, 1, H, W] in [-1, 1]: prepended to the frames by `encode`
    image_latents: Tensor  # [1, C, 1, h, w] normalised latent of the reference
    audio_latents: Tensor | None  # [1, L, D] packed, normalised, held clean (`with_audio`)
    prompt_embeds: Tensor  # [1, S, E] video stream's text tokens
    audio_prompt_embeds: Tensor  # [1, S, E'] audio stream's text tokens
    prompt_mask: Tensor  # [1, S]
    fps: float


def slaney_mel_filterbank(n_mels: int, n_fft: int = N_FFT, sr: int = SAMPLE_RATE) -> Tensor:
    """Slaney-scale, Slaney-normalised triangular filters [n_fft//2 + 1, n_mels], 0 to sr/2
    (librosa's `filters.mel(htk=False, norm="slaney")`, torchaudio's slaney/slaney)."""
    step, knee = 200.0 / 3.0, 1000.0  # linear below 1 kHz, logarithmic above
    log_step = math.log(6.4) / 27.0

    def to_mel(f: np.ndarray) -> np.ndarray:
        return np.where(
            f < knee, f / step, knee / step + np.log(np.maximum(f, knee) / knee) / log_step
        )

    def to_hz(m: np.ndarray) -> np.ndarray:
        return np.where(m < knee / step, m * step, knee * np.exp(log_step * (m - knee / step)))

    edges = to_hz(np.linspace(0.0, to_mel(np.array(sr / 2.0)), n_mels + 2))
    freqs = np.linspace(0.0, sr / 2.0, n_fft // 2 + 1)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    tri = np.maximum(0.0, np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)))
    tri *= 2.0 / (hi - lo)  # equal area per filter
    return torch.from_numpy(tri.T.astype(np.float32))


def log_mel(samples: np.ndarray, n_mels: int, channels: int) -> Tensor:
    """LTX-2's audio features of 16 kHz mono samples -> [1, channels, frames, n_mels]."""
    x = torch.as_tensor(np.asarray(samples, dtype=np.float32))
    spec = torch.stft(x, N_FFT, 160, N_FFT, torch.hann_window(N_FFT), center=True,
                      pad_mode="reflect", return_complex=True).abs()  # fmt: skip
    mel = torch.log((slaney_mel_filterbank(n_mels).T @ spec).clamp(min=1e-5))  # [M, frames]
    return mel.T[None, None].expand(1, channels, -1, -1).contiguous()


def conditioning_crf(text_encoder: Any) -> int:
    """The H.264 CRF LTX-2's image-to-video pipeline re-compresses its conditioning image with
    (33 for Gemma 3 generations, 18 for LTX-2.5), or 0 (none) without PyAV or that helper."""
    try:
        import av  # noqa: F401
        from diffusers.pipelines.ltx2.utils import resolve_default_image_crf
    except ImportError:
        log.warning("LTX-2 teacher: no PyAV, the reference render is not H.264 re-compressed "
                    "as LTX-2's conditioning images were in training")  # fmt: skip
        return 0
    return int(resolve_default_image_crf(text_encoder))


class LTX2Teacher:
    """A frozen LTX-2 teacher: `encode` frames, `predict` for score distillation, `sample` clips."""

    prediction_type = "flow"
    uses_audio = True

    def __init__(self, pipe: Any, settings: LTX2Settings | None = None) -> None:
        self.pipe, self.settings = pipe, settings or LTX2Settings()
        self.transformer, self.vae, self.audio_vae = pipe.transformer, pipe.vae, pipe.audio_vae
        for module in (self.transformer, self.vae, self.audio_vae, pipe.connectors):
            module.requires_grad_(False).eval()
        self.scheduler = pipe.scheduler
        audio = self.audio_vae.config
        # LTX-2 packs every mel bin of a latent frame into one audio token
        features = audio.latent_channels * (audio.mel_bins // self.audio_vae.mel_compression_ratio)
        takes = (self.transformer.config.audio_in_channels, len(self.audio_vae.latents_mean))
        if takes != (features, features):
            raise ValueError(f"the audio VAE gives {features} features per token; the "
                             f"transformer and the latent statistics take {takes}")  # fmt: skip
        self.prompt, self.negative = self._encode_prompts()
        self.crf = conditioning_crf(pipe.text_encoder)
        pipe.text_encoder = None  # the prompt is fixed: free the (large) text encoder

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        settings: LTX2Settings | None = None,
    ) -> LTX2Teacher:
        """Load a local LTX-2 folder, offline, in `dtype` (bf16 on CUDA, fp32 on CPU)."""
        try:
            from diffusers import LTX2ImageToVideoPipeline
        except ImportError as err:
            raise TeacherLoadError(f"{path}: LTX-2 needs diffusers >= 0.42 ({err})") from err
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        try:  # the vocoder (audio out) and prompt enhancer are not needed
            with warnings.catch_warnings():  # `torch_dtype`, renamed in diffusers 0.42
                warnings.simplefilter("ignore", FutureWarning)
                pipe = LTX2ImageToVideoPipeline.from_pretrained(
                    path, local_files_only=True, torch_dtype=dtype, vocoder=None,
                    prompt_enhancer=None,
                )  # fmt: skip
        except (OSError, ValueError, TypeError) as err:
            raise TeacherLoadError(f"{path}: cannot load the LTX-2 pipeline: {err}") from err
        missing = [n for n in ("transformer", "vae", "audio_vae", "connectors", "text_encoder",
                               "tokenizer", "scheduler") if getattr(pipe, n, None) is None]  # fmt: skip
        if missing:
            raise TeacherLoadError(f"{path}: the LTX-2 folder lacks {', '.join(missing)}")
        try:
            return cls(pipe.to(device), settings)
        except ValueError as err:
            raise TeacherLoadError(f"{path}: {err}") from err

    @torch.no_grad()
    def _encode_prompts(
        self,
    ) -> tuple[tuple[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]:
        """(video tokens, audio tokens, mask) of the prompt and of the negative prompt."""
        s, pipe = self.settings, self.pipe
        pos, pos_mask, neg, neg_mask = pipe.encode_prompt(
            s.prompt, s.negative_prompt, do_classifier_free_guidance=True,
            max_sequence_length=s.max_sequence_length, device=self.device,
        )  # fmt: skip
        side = getattr(pipe.tokenizer, "padding_side", "left")
        return (pipe.connectors(pos, pos_mask, padding_side=side),
                pipe.connectors(neg, neg_mask, padding_side=side))  # fmt: skip

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def downsample(self) -> int:
        """Pixels per latent cell."""
        return self.vae.spatial_compression_ratio * self.transformer.config.patch_size

    @property
    def frames_multiple(self) -> int:
        """Clips hold a multiple of this many frames (after the reference)."""
        return self.vae.temporal_compression_ratio * self.transformer.config.patch_size_t

    def _check(self, num_frames: int, h: int, w: int) -> None:
        if h % self.downsample or w % self.downsample:
            raise ValueError(f"frame size {h}x{w} is not a multiple of {self.downsample}")
        if num_frames % self.frames_multiple:
            raise ValueError(f"{num_frames} frames: the LTX-2 teacher takes a multiple of "
                             f"{self.frames_multiple} frames")  # fmt: skip

    def _latents(self, video: Tensor) -> Tensor:
        """Pixels [1, 3, F, H, W] in [-1, 1] -> normalised latents [1, C, f, h, w] (float32)."""
        z = self.vae.encode(video.to(self.vae.dtype)).latent_dist.mean
        p, v = self.pipe, self.vae
        return p._normalize_latents(
            z, v.latents_mean, v.latents_std, v.config.scaling_factor
        ).float()

    @torch.no_grad()
    def condition(
        self,
        reference: Tensor,  # [H, W, 3] in [0, 1], the avatar's reference render
        audio: np.ndarray | None = None,
        size: tuple[int, int] | None = None,
        seed: int = 0,
        num_frames: int = 8,
        fps: float = 25.0,
    ) -> LTX2Condition:
        """Condition for clips of `num_frames` frames of `size` (H, W; default the reference's)
        after the reference, with the speech `audio` (see `with_audio`). `seed` is unused (the
        reference is not noised)."""
        del seed
        h, w = size or reference.shape[:2]
        self._check(num_frames, h, w)
        image = reference.permute(2, 0, 1)[None].to(self.device, torch.float32)  # [1, 3, H, W]
        if image.shape[-2:] != (h, w):
            image = F.interpolate(image, (h, w), mode="bilinear", antialias=True)
        if self.crf:  # as LTX-2 saw its conditioning images in training: through H.264
            from diffusers.pipelines.ltx2.utils import apply_image_conditioning_crf

            rgb = (image[0].permute(1, 2, 0).clamp(0, 1) * 255).round().byte().cpu().numpy()
            rgb = apply_image_conditioning_crf(rgb, self.crf)
            image = torch.from_numpy(rgb).permute(2, 0, 1)[None].to(self.device) / 255.0
        image = (image * 2 - 1)[:, :, None]  # [1, 3, 1, H, W]
        video, audio_text, mask = self.prompt
        cond = LTX2Condition(
            reference=image, image_latents=self._latents(image), audio_latents=None,
            prompt_embeds=video, audio_prompt_embeds=audio_text, prompt_mask=mask, fps=fps,
        )  # fmt: skip
        return self.with_audio(cond, audio, num_frames, fps)

    @torch.no_grad()
    def with_audio(
        self, cond: LTX2Condition, audio: np.ndarray | None, num_frames: int, fps: float
    ) -> LTX2Condition:
        """`cond` with another speech: `audio`, 16 kHz samples of the 1 + num_frames frame slots
        (None: silence), as LTX-2's audio latents. The reference's part is kept, so a teacher
        encodes each view's reference once."""
        self._check(num_frames, *cond.reference.shape[-2:])
        span = round((1 + num_frames) / fps * SAMPLE_RATE)
        samples = np.zeros(span, np.float32)
        if audio is not None:
            a = np.asarray(audio, np.float32)[:span]
            samples[: len(a)] = a
        cfg = self.audio_vae.config
        mel = log_mel(samples, cfg.mel_bins, cfg.in_channels).to(self.device, self.audio_vae.dtype)
        z = self.audio_vae.encode(mel).latent_dist.mode()  # [1, C, L', M']
        per_second = (
            cfg.sample_rate / cfg.mel_hop_length / self.audio_vae.temporal_compression_ratio
        )
        length = round((1 + num_frames) / fps * per_second)  # the pipeline's audio length
        z = F.pad(z, (0, 0, 0, max(0, length - z.shape[2])))[:, :, :length]
        p, a = self.pipe, self.audio_vae
        tokens = p._normalize_audio_latents(p._pack_audio_latents(z), a.latents_mean, a.latents_std)
        return replace(cond, audio_latents=tokens.float(), fps=fps)

    def uncondition(self, cond: LTX2Condition) -> LTX2Condition:
        """The unconditional branch of classifier-free guidance: the negative prompt (the speech
        and the reference stay, as in LTX-2's pipelines)."""
        video, audio_text, mask = self.negative
        return replace(cond, prompt_embeds=video, audio_prompt_embeds=audio_text, prompt_mask=mask)

    def encode(self, frames: Tensor, cond: LTX2Condition) -> Tensor:
        """Frames [T, H, W, 3] in [0, 1] -> latents [1, C, T/r, h, w] (float32), differentiable:
        the frames are encoded behind the condition's reference, whose latent frame is dropped."""
        self._check(*frames.shape[:3])
        x = frames.permute(3, 0, 1, 2)[None].to(self.device, torch.float32) * 2 - 1
        return self._latents(torch.cat([cond.reference, x], dim=2))[:, :, 1:]

    @torch.no_grad()
    def decode(self, latents: Tensor, cond: LTX2Condition) -> Tensor:
        """Latents [1, C, f, h, w] of our frames -> frames [T, H, W, 3] in [0, 1]."""
        v = self.vae
        z = torch.cat([cond.image_latents, latents], dim=2)
        z = self.pipe._denormalize_latents(
            z, v.latents_mean, v.latents_std, v.config.scaling_factor
        )
        t = (
            torch.zeros(1, device=self.device, dtype=v.dtype)
            if v.config.timestep_conditioning
            else None
        )
        frames = v.decode(z.to(v.dtype), t, return_dict=False)[0][0, :, 1:]  # [3, T, H, W]
        return (frames.float().permute(1, 2, 3, 0) / 2 + 0.5).clamp(0, 1)

    def schedule_for(self, latents: Tensor) -> NoiseSchedule:
        """The flow schedule at this clip size: diffusers' resolution-dependent shift, fixed."""
        c = self.scheduler.config
        if not c.get("use_dynamic_shifting", False):
            return NoiseSchedule("flow", shift=float(c.get("shift", 1.0)))
        _, _, f, h, w = latents.shape
        pt, ps = self.transformer.config.patch_size_t, self.transformer.config.patch_size
        tokens = (f + 1) // pt * (h // ps) * (w // ps)  # with the reference's latent frame
        lo, hi = c.get("base_image_seq_len", 1024), c.get("max_image_seq_len", 4096)
        base, top = c.get("base_shift", 0.95), c.get("max_shift", 2.05)
        mu = base + (top - base) * (tokens - lo) / (hi - lo)  # diffusers' calculate_shift
        shift = math.exp(mu) if c.get("time_shift_type", "exponential") == "exponential" else mu
        return NoiseSchedule("flow", shift=shift)

    def predict(self, x: Tensor, tau: Tensor, cond: LTX2Condition) -> Tensor:
        """The velocity for our latents x [B, C, f, h, w] at τ [B] (the reference in front, clean)."""
        b, _, f, h, w = x.shape
        if cond.image_latents.shape[-2:] != (h, w):
            raise ValueError(f"latents {(h, w)} do not match the condition's "
                             f"{tuple(cond.image_latents.shape[-2:])}")  # fmt: skip
        cfg, p = self.transformer.config, self.pipe
        full = torch.cat([cond.image_latents.expand(b, -1, -1, -1, -1), x], dim=2)
        tokens = p._pack_latents(full, cfg.patch_size, cfg.patch_size_t)  # [B, S, D]
        held = torch.zeros_like(full[:, :1])
        held[:, :, 0] = 1.0
        held = p._pack_latents(held, cfg.patch_size, cfg.patch_size_t).squeeze(-1)  # [B, S]
        t = tau.to(self.device, torch.float32) * self.scheduler.config.num_train_timesteps
        still = torch.zeros_like(t)
        dtype = self.transformer.dtype
        out = self.transformer(
            hidden_states=tokens.to(dtype),
            audio_hidden_states=cond.audio_latents.expand(b, -1, -1).to(dtype),
            encoder_hidden_states=cond.prompt_embeds.expand(b, -1, -1),
            audio_encoder_hidden_states=cond.audio_prompt_embeds.expand(b, -1, -1),
            timestep=t[:, None] * (1 - held),  # the reference's tokens are clean
            audio_timestep=still, sigma=t, audio_sigma=still,  # the speech is clean
            encoder_attention_mask=cond.prompt_mask.expand(b, -1),
            audio_encoder_attention_mask=cond.prompt_mask.expand(b, -1),
            num_frames=(f + 1) // cfg.patch_size_t, height=h // cfg.patch_size,
            width=w // cfg.patch_size, fps=cond.fps, audio_num_frames=cond.audio_latents.shape[1],
            use_cross_timestep=self.settings.use_cross_timestep, return_dict=False,
        )[0]  # fmt: skip
        v = p._unpack_latents(out.float(), (f + 1) // cfg.patch_size_t, h // cfg.patch_size,
                              w // cfg.patch_size, cfg.patch_size, cfg.patch_size_t)  # fmt: skip
        return v[:, :, 1:].to(x.dtype)

    @torch.no_grad()
    def sample(
        self,
        reference: Tensor,  # [H, W, 3] in [0, 1]
        num_frames: int,
        steps: int = 25,
        seed: int = 0,
        audio: np.ndarray | None = None,
        fps: float = 25.0,
    ) -> Tensor:
        """The `num_frames` frames [T, H, W, 3] in [0, 1] that follow the reference while the
        speech `audio` (covering the reference's slot and theirs) plays: Euler steps on the
        shifted flow schedule, classifier-free guidance on the prompt. Deterministic for a seed."""
        cond = self.condition(reference, audio, num_frames=num_frames, fps=fps)
        uncond = self.uncondition(cond)
        h, w = cond.image_latents.shape[-2:]
        shape = (1, cond.image_latents.shape[1], num_frames // self.vae.temporal_compression_ratio,
                 h, w)  # fmt: skip
        x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(self.device)
        shift = self.schedule_for(x).shift
        u = torch.linspace(1.0, 0.0, steps + 1)
        taus = shift * u / (1 + (shift - 1) * u)  # the same shifted schedule as the SDS draws
        g = self.settings.guidance_scale
        for i in tqdm(range(steps), desc="teacher clip", leave=False):
            tau = taus[i].view(1).to(self.device)
            v = self.predict(x, tau, cond)
            if g != 1.0:
                v_u = self.predict(x, tau, uncond)
                v = v_u + g * (v - v_u)
            x = x + (taus[i + 1] - taus[i]).to(self.device) * v  # dx/dτ = v = ε − z
        return self.decode(x, cond)
