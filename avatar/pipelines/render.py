"""The render pipeline: a Gaussian scene and a camera path -> an image, a frame folder or an MP4."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from render import (
    Cameras,
    Gaussians,
    RasterConfig,
    fit_to_points,
    rasterize,
    scene_points,
    to_uint8,
)

from ..errors import AvatarError
from ..media import IMAGE_SUFFIXES, VIDEO_SUFFIXES, write_frames, write_image, write_video


@dataclass(frozen=True)
class OrbitConfig:
    """A turntable around the scene."""

    orbit: int = 60
    """Number of views around the full circle (the video's frame count)."""
    size: int = 512
    """Square image size in pixels (--view input: the long side; there the default is the
    photo's own size)."""
    elevation: float = 5.0
    """Camera height as an angle above the scene centre, degrees (positive looks down)."""
    fov: float = 30.0
    """Vertical field of view, degrees."""
    fill: float = 0.6
    """Fraction of the frame that the scene's bounding sphere spans."""
    yaw: float = 0.0
    """Yaw of the first view, degrees; 0 looks at the front (+Z)."""


def orbit_cameras(gaussians: Gaussians, cfg: OrbitConfig, height: int = 0) -> Cameras:
    """The turntable's cameras, `cfg.size` square (or `cfg.size` wide and `height` high)."""
    yaws = cfg.yaw + torch.arange(cfg.orbit, dtype=torch.float64) * 360.0 / cfg.orbit
    return fit_to_points(scene_points(gaussians), cfg.size, height or cfg.size, yaws,
                         cfg.elevation, cfg.fov, cfg.fill).to(gaussians.device)  # fmt: skip


def render_frames(
    gaussians: Gaussians,
    cameras: Cameras,
    background: tuple[float, float, float] = (1.0, 1.0, 1.0),
    config: RasterConfig | None = None,
    progress: bool = True,
) -> Iterator[np.ndarray]:
    """Render one camera at a time (bounded memory) and yield uint8 frames [H, W, 3]."""
    bg = torch.tensor(background, dtype=gaussians.dtype, device=gaussians.device)
    bar = tqdm(total=len(cameras), unit="frame", desc="render", disable=not progress)
    if progress and gaussians.device.type == "cpu":
        from render import _native

        if not _native.kernels_cached():
            bar.write("compiling the CPU rendering kernels (first run only, about 10 s)")
    with torch.no_grad(), bar:
        for i in range(len(cameras)):
            out = rasterize(gaussians, cameras[i], background=bg, config=config)
            bar.update(1)
            yield to_uint8(out.rgb[0, ..., :3])


def save_frames(path: Path, frames: Iterator[np.ndarray], fps: float) -> int:
    """Write to `path` by its kind: .mp4 video, .png/.jpg image (one frame), else a PNG folder."""
    suffix = path.suffix.lower()
    if suffix in VIDEO_SUFFIXES:
        return write_video(path, frames, fps=fps)
    if suffix in IMAGE_SUFFIXES:
        frame = next(frames, None)
        if frame is None:
            raise AvatarError(f"{path}: nothing to render")
        write_image(path, frame)
        return 1
    if suffix:
        raise AvatarError(
            f"{path}: unknown output type {suffix!r}; use .mp4, .png/.jpg, or a folder name"
        )
    return write_frames(path, frames)
