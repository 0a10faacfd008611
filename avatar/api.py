"""The Python API: every job of the `avatar` command, as functions (the CLI is built on them).

    from avatar import api

    me = api.create("photo.jpg", "me.avatar")          # an Avatar, saved
    api.render(me, "orbit.mp4")                         # a turntable
    api.drive(me, "speech.wav", "talk.mp4", framing="upper")
    for frame in api.drive_frames(me, "speech.wav"):    # HxWx3 uint8, streamed
        ...
    api.export(me, "me.splat")

Avatars may be given as an `Avatar` or a path (loaded). Options are the fields of each job's
config dataclass (`CreateConfig`, `DriveConfig`, `OrbitConfig`, `ListenConfig`, `ExportConfig`,
`FinetuneOptions`), with the CLI's defaults: pass a config, keyword options, or both (keywords
win). Bad input raises `AvatarError` (or a subclass) with the same message the CLI prints.
Outputs are written atomically and never overwrite an existing file unless `force=True`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np

from render import Gaussians

from .asset import Avatar, is_avatar_path
from .errors import AvatarError
from .media import check_output
from .pipelines.converse import ListenConfig
from .pipelines.create import CreateConfig
from .pipelines.drive import DriveConfig
from .pipelines.export import ExportConfig
from .pipelines.finetune import FinetuneOptions
from .pipelines.render import OrbitConfig

__all__ = [
    "Avatar", "AvatarError", "CreateConfig", "DriveConfig", "ExportConfig", "FinetuneOptions",
    "ListenConfig", "OrbitConfig", "converse", "create", "drive", "drive_frames",
    "drive_gaussians", "export", "finetune", "load", "render", "render_frames",
]  # fmt: skip

PathLike = str | os.PathLike
AvatarLike = Avatar | PathLike
C = TypeVar("C")


def _config(cls: type[C], config: C | None, options: dict) -> C:
    """`config` (or the defaults) with keyword options replacing its fields."""
    base = config if config is not None else cls()
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise TypeError(f"{cls.__name__} has no option {', '.join(unknown)}; "
                        f"its options: {', '.join(sorted(names))}")  # fmt: skip
    return dataclasses.replace(base, **options)


def load(path: PathLike, body: str = "") -> Avatar:
    """Read and check an avatar (folder or .zip); `body`: an SMPL-X avatar's model file."""
    return Avatar.load(path, body)


def _avatar(avatar: AvatarLike, body: str = "") -> Avatar:
    return avatar if isinstance(avatar, Avatar) else Avatar.load(avatar, body)


def _output(path: PathLike, force: bool, suffixes: tuple[str, ...] = ()) -> Path:
    out = Path(path)
    if suffixes and out.suffix.lower() not in suffixes:
        raise AvatarError(f"{out}: write a {' or '.join(suffixes)} file")
    check_output(out, force)
    return out


# ---- create ---------------------------------------------------------------------------------------


def create(photo: PathLike, out: PathLike | None = None, config: CreateConfig | None = None, *,
           force: bool = False, progress: bool = True, **options) -> Avatar:  # fmt: skip
    """An avatar from one photo; saved to `out` (folder, or .zip) when given. Its
    `meta["quality"]` holds the input-view figures, `meta["timings"]` each stage's seconds."""
    from .pipelines.create import create_avatar

    path = None if out is None else _output(out, force)  # before minutes of work, not after
    avatar, times = create_avatar(photo, _config(CreateConfig, config, options), progress)
    avatar.meta["timings"] = {**dataclasses.asdict(times), "total_s": times.total_s}
    if path is not None:
        avatar.save(path, force=force)
        avatar.source = str(path)
    return avatar


# ---- render ---------------------------------------------------------------------------------------


def scene_and_cameras(scene: AvatarLike | Gaussians, view: float | str = "front",
                      pose: str = "photo", config: OrbitConfig | None = None, body: str = "",
                      device: str = "cpu", **options):  # fmt: skip
    """The Gaussians to draw and the cameras: an avatar (or its path) in the photo's pose
    (`pose="rest"`: canonical), a .ply/.splat path, or `Gaussians`. `view`: "input" (an avatar's
    photo camera), "front", or a yaw in degrees; `config`: the turntable (`OrbitConfig`; its
    `size`, when not given, keeps the photo's own size for view "input")."""
    from render.io import SplatFileError, load_splats

    from .pipelines.create import posed_gaussians
    from .pipelines.render import orbit_cameras

    photo_size = config.size if config is not None else options.get("size")
    cfg = _config(OrbitConfig, config, options)
    if view == "front":
        view = 0.0
    elif isinstance(view, str) and view != "input":
        raise AvatarError(f"view {view!r}: use input, front or a yaw in degrees")
    if not isinstance(view, str):
        cfg = dataclasses.replace(cfg, yaw=float(view))
    if pose not in ("photo", "rest"):
        raise AvatarError(f"--pose {pose}: use photo or rest")
    if isinstance(scene, Avatar) or (not isinstance(scene, Gaussians) and is_avatar_path(scene)):
        avatar = _avatar(scene, body)
        template = avatar.body_template()
        if view == "input":
            if pose == "rest":
                raise AvatarError("--view input shows the photo's pose; drop --pose rest")
            gaussians = posed_gaussians(avatar, template, "photo").to(device)
            cams = avatar.camera  # the photo's whole frame at its size, unless a size is given
            return gaussians, (cams.resized(photo_size) if photo_size else cams).to(device)
        gaussians = posed_gaussians(avatar, template, "body" if pose == "photo" else "rest")
    else:
        if view == "input":
            raise AvatarError(f"{scene}: --view input needs an avatar (a plain scene has no photo)")
        if isinstance(scene, Gaussians):
            gaussians = scene
        else:
            try:
                gaussians = load_splats(scene)
            except SplatFileError as exc:
                raise AvatarError(str(exc)) from None
    gaussians = gaussians.to(device)
    if cfg.size is None:
        cfg = dataclasses.replace(cfg, size=OrbitConfig.size)
    return gaussians, orbit_cameras(gaussians, cfg)


def render_frames(scene: AvatarLike | Gaussians, view: float | str = "front", pose: str = "photo",
                  config: OrbitConfig | None = None, *, background=(1.0, 1.0, 1.0),
                  body: str = "", device: str = "cpu", progress: bool = False,
                  **options) -> Iterator[np.ndarray]:  # fmt: skip
    """Frames [H, W, 3] uint8 of a scene (see `scene_and_cameras`), one per turntable view."""
    from .pipelines.render import render_frames as frames

    gaussians, cams = scene_and_cameras(scene, view, pose, config, body, device, **options)
    return frames(gaussians, cams, background, progress=progress)


def render(scene: AvatarLike | Gaussians, out: PathLike, view: float | str = "front",
           pose: str = "photo", config: OrbitConfig | None = None, *, fps: float = 25.0,
           background=(1.0, 1.0, 1.0), body: str = "", device: str = "cpu",
           force: bool = False, progress: bool = True, **options) -> int:  # fmt: skip
    """Write `out` by its kind: .mp4 (a turntable of `config.orbit` views), .png/.jpg (one
    image), else a folder of PNGs; returns the frame count."""
    from .pipelines.render import render_frames as frames
    from .pipelines.render import save_frames

    out = _output(out, force)
    if out.suffix.lower() in (".png", ".jpg", ".jpeg"):
        options["orbit"] = 1
    gaussians, cams = scene_and_cameras(scene, view, pose, config, body, device, **options)
    return save_frames(out, frames(gaussians, cams, background, progress=progress), fps)


# ---- drive ----------------------------------------------------------------------------------------


def drive(avatar: AvatarLike, audio: PathLike, out: PathLike, config: DriveConfig | None = None,
          *, force: bool = False, progress: bool = True, body: str = "",
          **options) -> dict:  # fmt: skip
    """A talking video (.mp4, H.264 with the speech as AAC); returns a summary (frames, fps,
    audio and video seconds)."""
    from .pipelines.drive import drive_avatar

    out = _output(out, force, (".mp4",))
    cfg = _config(DriveConfig, config, options)
    return drive_avatar(_avatar(avatar, body), audio, out, cfg, progress)


def _driver_and_audio(avatar: AvatarLike, audio: PathLike, config, options, body: str):
    from .pipelines.drive import Driver, speech_frames

    cfg = _config(DriveConfig, config, options)
    speech, num = speech_frames(audio, cfg.fps)
    return Driver(_avatar(avatar, body), cfg), speech, num


def drive_frames(avatar: AvatarLike, audio: PathLike, config: DriveConfig | None = None, *,
                 body: str = "", progress: bool = False, **options) -> Iterator[np.ndarray]:  # fmt: skip
    """The talking video's frames [height, size, 3] uint8, one by one as they are made (the
    same frames `drive` encodes), at `config.fps`."""
    driver, speech, num = _driver_and_audio(avatar, audio, config, options, body)
    return driver.frames(speech.samples, num, progress)


def drive_gaussians(avatar: AvatarLike, audio: PathLike, config: DriveConfig | None = None, *,
                    body: str = "", **options) -> Iterator[Gaussians]:  # fmt: skip
    """The avatar's Gaussians posed for each frame, in its body frame (+Y up, facing +Z,
    metres): for streaming to another renderer."""
    driver, speech, num = _driver_and_audio(avatar, audio, config, options, body)
    return driver.posed(speech.samples, num)


# ---- converse -------------------------------------------------------------------------------------


def converse(avatars: AvatarLike | Sequence[AvatarLike], audio: PathLike, out: PathLike, *,
             partner: PathLike | None = None, channel: str | None = None,
             speaker: int | None = None, swap: bool = False, layout: str | None = None,
             camera: str = "two-shot", report: PathLike | None = None,
             config: DriveConfig | None = None, listen: ListenConfig | None = None,
             body: str = "", force: bool = False, progress: bool = True,
             **options) -> dict:  # fmt: skip
    """A conversation video: one avatar talks (its own voice, `audio`) and listens (`partner`:
    a second file; `channel`: "left"/"right" of a stereo `audio`; `speaker`: 1 or 2 of a mixed
    recording); with two avatars both are in the scene (`layout` in words, `camera`). Options
    are `DriveConfig`'s and `ListenConfig`'s fields. Returns the summary (also in `report`)."""
    from deform.voice import Tracks

    from .pipelines.converse import converse_avatar, load_tracks

    if isinstance(avatars, (Avatar, str, os.PathLike)):
        avatars = [avatars]
    if not 1 <= len(avatars) <= 2:
        raise AvatarError("converse takes one avatar, or two for a two-person scene")
    pair = len(avatars) == 2
    if not pair and (layout or camera != "two-shot" or swap):
        raise AvatarError("--layout, --camera and --swap place two avatars: give two")
    out = _output(out, force, (".mp4",))
    if report:
        check_output(Path(report), force)
    listen_names = {f.name for f in dataclasses.fields(ListenConfig)}
    cfg = _config(DriveConfig, config, {k: v for k, v in options.items() if k not in listen_names})
    listen = _config(ListenConfig, listen, {k: v for k, v in options.items() if k in listen_names})
    if pair and speaker is None and partner is None and channel is None:
        speaker = 1  # one mixed recording: the first avatar takes who speaks first
    tracks = load_tracks(audio, partner, channel, speaker)
    if swap:
        tracks = Tracks(tracks.partner, tracks.own, tracks.source + " (swapped)")
    loaded = [_avatar(a, body) for a in avatars]
    if not pair:
        return converse_avatar(loaded[0], tracks, out, cfg, listen, report, progress)
    from .pipelines.drive import Driver
    from .pipelines.pair import converse_pair

    return converse_pair([Driver(a, cfg) for a in loaded], tracks, out, cfg, listen, layout,
                         camera, report, progress)  # fmt: skip


# ---- finetune -------------------------------------------------------------------------------------


def finetune(avatar: AvatarLike, audio: PathLike | Sequence[PathLike], out: PathLike | None = None,
             options: FinetuneOptions | None = None, config=None, *, body: str = "",
             force: bool = False, progress: bool = True, **kwargs) -> dict:  # fmt: skip
    """Distil a teacher into the avatar's motion weights and Gaussians and save it to `out`
    (default: the avatar's own path, in place). `options`: `FinetuneOptions` (teacher, steps,
    size ...), `config`: `distill.finetune.FinetuneConfig` (loss weights, learning rates);
    keywords go to whichever has the field. Returns the training summary. Under torchrun only
    rank 0 saves."""
    import torch.distributed as dist

    from distill.finetune import FinetuneConfig

    from .pipelines.finetune import finetune_avatar

    if out is None:
        if not isinstance(avatar, (str, os.PathLike)):
            raise AvatarError("finetune: give `out` (an Avatar object has no path to update)")
        out = avatar
    out = Path(out)
    in_place = isinstance(avatar, (str, os.PathLike)) and Path(avatar) == out
    check_output(out, force=force or in_place)
    opt_names = {f.name for f in dataclasses.fields(FinetuneOptions)}
    opts = _config(FinetuneOptions, options, {k: v for k, v in kwargs.items() if k in opt_names})
    cfg = _config(FinetuneConfig, config, {k: v for k, v in kwargs.items() if k not in opt_names})
    avatar = _avatar(avatar, body)
    clips = [audio] if isinstance(audio, (str, os.PathLike)) else list(audio)
    summary = finetune_avatar(avatar, clips, out, opts, cfg, progress)
    if not (dist.is_initialized() and dist.get_rank() != 0):
        avatar.save(out, force=True)
    return summary


# ---- export ---------------------------------------------------------------------------------------


def export(avatar: AvatarLike, out: PathLike, config: ExportConfig | None = None, *,
           audio: PathLike | None = None, body: str = "", force: bool = False,
           progress: bool = True, **options) -> dict:  # fmt: skip
    """Write the avatar for other tools (`ExportConfig.format`: splat, ply, glb, or ply-seq
    with `audio`); the format defaults to the output's suffix. Returns a summary."""
    from .pipelines.export import export_avatar

    out = Path(out)
    check_output(out, force)
    return export_avatar(_avatar(avatar, body), out, _config(ExportConfig, config, options),
                         audio, progress)  # fmt: skip
