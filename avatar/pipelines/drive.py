"""The drive pipeline: an avatar + speech -> a talking video, streamed frame by frame.

Audio is decoded once (16 kHz mono, 64 KB per second of speech); everything after that works in
chunks of `CHUNK` frames: the deformer continues from its state (particle transforms, the
template head's recurrent state, the last driving tokens), the template is posed for the chunk,
and each frame is rasterised and handed to the encoder. Memory does not grow with the length.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from deform.audio import Audio, AudioError, load_audio
from deform.controls import blinks
from deform.deformer import SpeechDeformer, load_deformer, load_exact
from deform.eyes import EyeCover, eye_cover
from deform.hands import HandState
from deform.particles import Particles, template_particles
from deform.rig import FRAMINGS, SpeechRig
from reconstruct.canonical import PART_CODES
from render import Cameras, Gaussians, fit_to_points, pick_device, rasterize, to_uint8
from render.profiling import stage

from ..asset import Avatar, AvatarFileError
from ..errors import AvatarError
from ..media import write_video

log = logging.getLogger(__name__)
CHUNK = 25  # frames per deformer step


@dataclass(frozen=True)
class DriveConfig:
    size: int = 512
    """Video width in pixels (and height, unless --height)."""
    height: int = 0
    """Video height in pixels (0: square); e.g. --size 768 --height 432 for a wide two-shot."""
    fps: float = 25.0
    """Frames per second."""
    view: str = "front"
    """Camera: front, yaw=DEG (e.g. yaw=30), or orbit (one turn over the video)."""
    framing: str = "full"
    """full (whole body), upper (hips up) or face (close-up)."""
    transcript: str = ""
    """What is said (optional); the driving token mixes in its embedding."""
    audio_encoder: str = ""
    """A local wav2vec 2.0 directory, for a --deformer trained on it (distill.train_drive)."""
    deformer: str = ""
    """A deformer checkpoint (.safetensors) instead of the avatar's own or the shipped one."""
    seed: int = 0
    """Seed of the blinks."""
    particles: bool = True
    """False: no particle twists or Gaussian residuals, only the template's bones and actions
    (the paper's ablation: what driving the Gaussians directly adds)."""
    device: str = "auto"
    """Where the deformer runs and the avatar is posed and rendered: auto (a CUDA GPU when
    there is one and gsplat is installed, else the CPU), cpu or cuda[:N]. The body template,
    hands and listener (a few numbers per frame) run on the CPU either way."""


def _yaws(view: str, num_frames: int) -> torch.Tensor:
    if view == "front":
        return torch.zeros(1, dtype=torch.float64)
    if view == "orbit":
        return torch.arange(num_frames, dtype=torch.float64) * 360.0 / max(num_frames, 1)
    if view.startswith("yaw="):
        try:
            return torch.tensor([float(view[4:])], dtype=torch.float64)
        except ValueError:
            pass
    raise AvatarError(f"--view {view!r}: use front, yaw=DEG or orbit")


def avatar_particles(avatar: Avatar, template) -> Particles:
    if avatar.particles is not None:
        return avatar.particles
    b = avatar.binding
    return template_particles(template, avatar.shape, PART_CODES, b.face_ids, b.bary)


def avatar_eyes(avatar: Avatar, rig: SpeechRig) -> EyeCover | None:
    """The blink's eye cover create saved in the avatar, else found on `rig`'s front render."""
    return avatar.eyes if avatar.eyes is not None else find_eyes(rig)


def load_motion_model(avatar: Avatar, cfg: DriveConfig) -> SpeechDeformer:
    """--deformer, else the shipped deformer with the avatar's own fine-tuned weights (which
    must fit it exactly: same keys, shapes and dtypes)."""
    try:
        if cfg.deformer:
            return load_deformer(cfg.deformer, cfg.audio_encoder or None)
        model = load_deformer(None, cfg.audio_encoder or None)
    except (ValueError, OSError) as exc:
        raise AvatarError(f"deformer: {exc}") from None
    if avatar.deformer:
        where = f"{avatar.source or 'the avatar'}/deformer.safetensors"
        try:
            load_exact(model, avatar.deformer, where)
        except ValueError as exc:
            raise AvatarFileError(
                f"{exc}: these motion weights are not for this version's deformer; fine-tune "
                f"the avatar again (avatar finetune {avatar.source or 'AVATAR'} --audio ...)"
            ) from None
    return model


def speech_rig(avatar: Avatar) -> SpeechRig:
    """The avatar on its template (`SpeechRig.from_avatar`), its particles computed if the file
    has none."""
    template = avatar.body_template()
    try:
        return SpeechRig.from_avatar(template, avatar.shape, avatar.photo_pose, avatar.gaussians,
                                     avatar.binding, avatar_particles(avatar, template))  # fmt: skip
    except ValueError as exc:
        raise AvatarError(str(exc)) from None


def front_face(rig: SpeechRig, size: int = 512) -> tuple[Gaussians, Cameras, np.ndarray]:
    """The avatar still (no speech motion), the front face close-up camera, and its render."""
    with torch.no_grad():
        posed = rig.still()
        cam = fit_to_points(rig.framing_points("face"), size, size, 0.0, 0.0, 30.0,
                            FRAMINGS["face"])[0]  # fmt: skip
        return posed, cam, to_uint8(rasterize(posed, cam, background=torch.ones(3)).rgb[0, ..., :3])


def find_eyes(rig: SpeechRig) -> EyeCover | None:
    """The open eye of the avatar's front face close-up, outlined by MediaPipe's face mesh
    (`deform.eyes`); None where it finds no face (blinks then only move the lids)."""
    from reconstruct.parsing import FaceMesh

    t = rig.template
    if not {"eye.L", "eye.R"} <= set(t.bone_names):
        return None
    posed, cam, image = front_face(rig)
    with FaceMesh(still=True) as mesh:
        landmarks = mesh(image)
    if landmarks is None:
        log.info("no face found on the avatar's front render: blinks move the lids only")
        return None
    with torch.no_grad():
        joints = t(rig.shape[None], pose=rig.base_pose[None]).joints[0]
    centres = joints[[t.bone_names.index("eye.L"), t.bone_names.index("eye.R")]]
    lids = torch.zeros(len(posed), dtype=torch.bool)  # what a blink moves down over a mm: the
    lids[rig.moving] = rig.basis[rig.blink_ids][..., 1].amin(0) < -1e-3  # upper lid, not the lower
    return eye_cover(posed, centres, cam, image, landmarks, lids)


LIP_MIDDLE = 0.015  # metres either side of the mouth's middle where the two lips are compared


def lip_middles(avatar: Avatar, rig: SpeechRig) -> tuple[torch.Tensor, torch.Tensor]:
    """[N] bool twice: the lips' Gaussians within LIP_MIDDLE of the mouth's middle, above and
    below the slit between them (by their places on the template, `SpeechRig.anchors`)."""
    from .create import inner_lips

    lips = avatar.binding.parts == PART_CODES["lips"]
    if not lips.any():
        return lips, lips
    _, slit = inner_lips(rig.template, avatar.shape, avatar.binding)
    at = rig.anchors.cpu()
    middle = lips & ((at[:, 0] - at[lips, 0].median()).abs() < LIP_MIDDLE)
    return middle & (at[:, 1] > slit), middle & (at[:, 1] <= slit)


def lips_at_rest(avatar: Avatar, rig: SpeechRig) -> tuple[float, float]:
    """(how far apart the avatar's lips look at rest, how far a unit of mouthClose brings the
    lips' middles together), metres. A photo's parted lips are painted on the template's closed
    ones, and its closed shape must travel that gap too: MediaPipe's inner-lip gap (landmarks
    13, 14) on the front face close-up, at the lips' depth; 0 where it finds no face."""
    from reconstruct.parsing import FaceMesh

    upper, lower = lip_middles(avatar, rig)
    if not (upper.any() and lower.any()):
        return 0.0, 0.0
    with torch.no_grad():
        close = torch.zeros(len(rig.gaussians))
        close[rig.moving] = rig.basis[rig.template.expression_names.index("mouthClose")][:, 1].cpu()
        travel = float(close[lower].mean() - close[upper].mean())
    posed, cam, image = front_face(rig)
    with FaceMesh(still=True) as mesh:
        points = mesh(image)
    if points is None:
        return 0.0, travel
    with torch.no_grad():
        mouth = posed.means[upper | lower].mean(0)
        depth = float((cam.viewmats[0, :3, :3] @ mouth + cam.viewmats[0, :3, 3])[2])
    gap = max(float(points[14][1] - points[13][1]), 0.0) * depth / float(cam.Ks[0, 0, 0])
    return gap, travel


class Driver:
    """Everything drive needs for one avatar, built once; `frames` streams a clip."""

    def __init__(self, avatar: Avatar, cfg: DriveConfig = DriveConfig()):
        self.cfg = cfg
        self.avatar = avatar
        try:
            self.device = pick_device(cfg.device)
        except ValueError as exc:
            raise AvatarError(f"--device {exc}") from None
        self.rig = speech_rig(avatar)
        self.rig.eyes = avatar_eyes(avatar, self.rig)
        self.rig.hands.seed = cfg.seed
        self.lips_gap, travel = lips_at_rest(avatar, self.rig)  # on the CPU, as the eyes
        apart = min(self.lips_gap / travel, 1.0) if travel > 1e-4 else 0.0
        self.model = load_motion_model(avatar, cfg).to(self.device)
        self.rig.to(self.device)
        with torch.no_grad():
            self.tokens = replace(self.rig.tokens(self.model), lips_apart=apart)

    def cameras(self, num_frames: int) -> Cameras:
        cfg = self.cfg
        try:
            with torch.no_grad():
                pts = self.rig.framing_points(cfg.framing)
        except ValueError as exc:
            raise AvatarError(f"--{exc}") from None
        return fit_to_points(pts, cfg.size, cfg.height or cfg.size, _yaws(cfg.view, num_frames),
                             0.0, 30.0, FRAMINGS[cfg.framing]).to(self.device)  # fmt: skip

    @torch.no_grad()  # as a decorator it holds only while the generator runs, not its caller
    def posed(self, samples: np.ndarray, num_frames: int, listener=None) -> Iterator[Gaussians]:
        """The avatar posed for each frame (body frame, no grad); with a
        `deform.listener.Listener` it also listens (head, face, gaze and blinks blended with the
        conversation model's)."""
        hands = HandState()
        for start, motion in self.motions(samples, num_frames, listener):
            eyes = None
            if listener is not None:
                motion, eyes = listener.chunk(motion, start)
            chunk, hands = self.pose_chunk(motion, start, hands, listener, eyes)
            yield from chunk

    @torch.no_grad()
    def motions(self, samples: np.ndarray, num_frames: int, listener=None) -> Iterator[tuple]:
        """(start frame, the speech deformer's `Motion` of the next frames) chunk by chunk; a
        listener's lips meet (`Listener.closed_lips`), its listening is blended in later."""
        cfg, rig, model = self.cfg, self.rig, self.model
        audio = torch.from_numpy(samples)
        text = model.transcript_embedding(cfg.transcript)
        state = model.start(self.tokens)
        for start in range(0, num_frames, CHUNK):
            n = min(CHUNK, num_frames - start)
            closed = None if listener is None else listener.closed_lips(start, n)
            with stage("deformer"):
                motion, state = model(audio, self.tokens, state, n, cfg.fps, text, rig.moving,
                                      closed)  # fmt: skip
                motion = motion.spread(rig.moving, len(rig.gaussians))
                # the per-frame controls (bones, actions: a few numbers) go on to the CPU code
                # (template, hands, listener); the per-Gaussian motion stays on the device
                motion = replace(motion, controls=motion.controls.cpu())
            if not cfg.particles:
                motion = motion.without_particles()
            yield start, motion

    def pose_chunk(self, motion, start: int, hands: HandState, listener=None,
                   eyes: torch.Tensor | None = None,
                   root: torch.Tensor | None = None) -> tuple[Iterator[Gaussians], HandState]:  # fmt: skip
        """The frames of one chunk's (blended) motion posed one by one, with blinks (a
        listener's: faster) and the hands' state carried to the next chunk; `root` [4, 4]
        places the body in a scene (`SpeechRig.posed_frames`)."""
        cfg, n = self.cfg, len(motion.controls)
        if listener is None:
            blink = torch.from_numpy(blinks(n, cfg.fps, cfg.seed, start))
        else:
            blink = listener.blinks(start, n)
        with stage("rig"):
            fingers, hands = self.rig.hands.step(motion.bones, cfg.fps, hands)
        return self.rig.posed_frames(motion, blink, fingers, eyes, root), hands

    @torch.no_grad()
    def frames(
        self,
        samples: np.ndarray,
        num_frames: int,
        progress: bool = True,
        listener=None,
        seen: Callable[[Gaussians], object] | None = None,
    ) -> Iterator[np.ndarray]:
        """The video's frames (`posed`, rendered by the configured camera); `seen` is called
        with each posed frame before it is rendered (a measure of the geometry)."""
        cams = self.cameras(num_frames)
        bg = torch.ones(3, device=self.device)
        with tqdm(total=num_frames, unit="frame", desc="drive", disable=not progress) as bar:
            for i, g in enumerate(self.posed(samples, num_frames, listener)):
                if seen is not None:
                    seen(g)
                cam = cams[min(i, len(cams) - 1)]
                with stage("render"):
                    frame = to_uint8(rasterize(g, cam, background=bg).rgb[0, ..., :3])
                yield frame
                bar.update(1)


def neutral_face(avatar: Avatar, size: int = 512) -> np.ndarray:
    """The avatar's face close-up from the front, no motion: the identity reference."""
    return front_face(speech_rig(avatar), size)[2]


def frame_count(duration_s: float, fps: float) -> int:
    return max(1, int(round(duration_s * fps)))


def speech_frames(audio_path: str | Path, fps: float) -> tuple[Audio, int]:
    """The speech (16 kHz mono) and its frame count at `fps`; bad audio or a bad frame rate is
    an `AvatarError` that says so."""
    if fps <= 0 or not math.isfinite(fps):
        raise AvatarError(f"--fps {fps}: must be a positive number")
    try:
        with stage("audio"):
            audio = load_audio(audio_path)
    except AudioError as exc:
        raise AvatarError(str(exc)) from None
    return audio, frame_count(audio.duration_s, fps)


def drive_avatar(avatar: Avatar, audio_path: str | Path, out_path: str | Path,
                 cfg: DriveConfig = DriveConfig(), progress: bool = True) -> dict:  # fmt: skip
    """Write the talking video (H.264 + the input audio as AAC) atomically; returns a summary."""
    audio, num = speech_frames(audio_path, cfg.fps)
    with stage("setup"):
        driver = Driver(avatar, cfg)
    frames = driver.frames(audio.samples, num, progress)
    count = write_video(out_path, frames, fps=cfg.fps, audio_path=audio_path)
    return {"frames": count, "fps": cfg.fps, "audio_s": round(audio.duration_s, 3),
            "video_s": round(count / cfg.fps, 3)}  # fmt: skip
