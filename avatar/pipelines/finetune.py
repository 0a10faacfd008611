"""The finetune pipeline: an avatar + speech files -> the same avatar with its own motion weights.

    avatar finetune me.avatar --audio a.wav b.wav --steps 200 -o me-tuned.avatar

A transcript next to an audio file (`a.txt` beside `a.wav`) is used for forced alignment by the
procedural teacher. Checkpoints go to a work directory (`--work`, default `OUT.train/`), so
`--resume` continues a killed run; the avatar is written atomically at the end.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from deform.audio import AudioError, load_audio
from distill.finetune import FinetuneConfig, FinetuneObjective
from distill.scene import DistillScene, SpeechClip, training_cameras
from distill.teachers import make_teacher
from distill.trainer import TrainConfig, distributed, train

from ..asset import Avatar
from ..errors import AvatarError
from .drive import (
    DriveConfig,
    avatar_eyes,
    find_eyes,
    frame_count,
    load_motion_model,
    speech_rig,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneOptions:
    teacher: str = "procedural"
    """procedural, or diffusers:PATH (a local LTX-2 folder, which hears the speech, or Stable
    Video Diffusion; LTX-2 takes --frames in multiples of 8)."""
    steps: int = 200
    """Training steps."""
    size: int = 256
    """Training render size in pixels."""
    seed: int = 0
    """Seed of windows, cameras and noise."""
    checkpoint_every: int = 50
    """Steps between checkpoints in the work directory."""
    work: str = ""
    """Work directory for checkpoints and metrics.csv (default: OUTPUT.train)."""
    resume: bool = False
    """Continue from the last checkpoint in the work directory."""


def load_clips(paths: list[str | Path], fps: float) -> list[SpeechClip]:
    clips = []
    for path in paths:
        try:
            audio = load_audio(path)
        except AudioError as exc:
            raise AvatarError(str(exc)) from None
        side = Path(path).with_suffix(".txt")
        text = side.read_text(errors="replace").strip() if side.is_file() else ""
        clips.append(SpeechClip(audio.samples, text, frame_count(audio.duration_s, fps),
                                Path(path).name))  # fmt: skip
    if not clips:
        raise AvatarError("finetune needs at least one --audio file")
    return clips


def build_objective(avatar: Avatar, audio: list[str | Path], opts: FinetuneOptions,
                    cfg: FinetuneConfig) -> FinetuneObjective:  # fmt: skip
    """The avatar's rig and motion model, its speech clips, training cameras and the prepared
    teacher, as one objective for `distill.trainer.train`."""
    from distill.losses import Weight

    if avatar.gaussians.sh is None:
        raise AvatarError("finetune needs an avatar with colours (SH), not free feature vectors")
    if cfg.arap_gaussians < 7 or cfg.frames < 1:
        raise AvatarError("--arap-gaussians must be at least 7 and --frames at least 1")
    for name in ("vsd", "kpt", "img", "reg", "lips"):
        try:
            Weight.parse(getattr(cfg, f"lambda_{name}"))
        except ValueError as exc:
            raise AvatarError(f"--lambda-{name}: {exc}") from None
    drive_cfg = DriveConfig(size=opts.size, framing="face")
    clips = load_clips(audio, drive_cfg.fps)  # bad speech fails before the rig is built
    rig = speech_rig(avatar)
    rig.eyes = avatar_eyes(avatar, rig)
    model = load_motion_model(avatar, drive_cfg)
    fps = drive_cfg.fps
    scene = DistillScene(rig, clips, training_cameras(rig, opts.size), fps)
    try:
        teacher = make_teacher(opts.teacher, opts.seed)
        teacher.prepare(scene)
    except (ValueError, OSError) as exc:
        raise AvatarError(f"teacher: {exc}") from None
    step = teacher.frames_multiple
    if step > 1 and (cfg.frames % step or min(c.num_frames for c in clips) < cfg.frames):
        raise AvatarError(f"--frames {cfg.frames}: the {teacher.name} teacher takes windows of a "
                          f"multiple of {step} frames, no longer than the shortest speech clip")  # fmt: skip
    return FinetuneObjective(model, scene, teacher, cfg)


def finetune_avatar(avatar: Avatar, audio: list[str | Path], out: str | Path,
                    opts: FinetuneOptions = FinetuneOptions(),
                    cfg: FinetuneConfig | None = None, progress: bool = True) -> dict:  # fmt: skip
    """Distil the teacher into this avatar's motion weights and Gaussians; returns a summary."""
    cfg = cfg or FinetuneConfig()
    if opts.steps < 1:
        raise AvatarError(f"--steps {opts.steps}: must be at least 1")
    distributed(cuda=False)  # under torchrun: join the group first, so each rank's teacher
    objective = build_objective(avatar, audio, opts, cfg)  # loads onto its own GPU
    work = Path(opts.work) if opts.work else Path(f"{out}.train")
    tcfg = TrainConfig(opts.steps, opts.checkpoint_every, opts.seed)
    run = {"teacher": opts.teacher, "audio": [c.name for c in objective.scene.clips],
           "gaussians": len(avatar.gaussians), "size": opts.size, "seed": opts.seed,
           "config": asdict(cfg)}  # fmt: skip
    try:
        result = train(objective, objective.param_groups(), tcfg, work, opts.resume, progress, run)
    except ValueError as exc:
        raise AvatarError(str(exc)) from None
    with torch.no_grad():
        avatar.gaussians = objective.gaussians().detach()
        avatar.deformer = {
            k: v.detach().clone() for k, v in objective.deformer.state_dict().items()
        }
    avatar.eyes = find_eyes(speech_rig(avatar))  # on the new Gaussians
    summary = {
        "teacher": objective.teacher.name,
        "steps": result.step,
        "clips": [c.name for c in objective.scene.clips],
        "seconds": round(result.seconds, 1),
        "seconds_per_step": round(result.seconds / max(len(result.history), 1), 3),
        "loss_first": result.history[0] if result.history else {},
        "loss_last": result.history[-1] if result.history else {},
        "config": asdict(cfg),
    }
    avatar.meta.setdefault("provenance", {})["finetune"] = summary
    return summary
