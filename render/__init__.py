"""render: Gaussians, cameras, the differentiable rasteriser and splat file I/O (torch only)."""

from .cameras import Cameras, fit_to_points, intrinsics, look_at, orbit, scene_points
from .gaussians import Gaussians
from .io import load_splats, save_ply, save_splat
from .rasterize import (
    RasterConfig,
    RenderOutput,
    choose_backend,
    has_gsplat,
    pick_device,
    rasterize,
    to_uint8,
)

__all__ = [
    "Cameras",
    "Gaussians",
    "RasterConfig",
    "RenderOutput",
    "choose_backend",
    "fit_to_points",
    "has_gsplat",
    "intrinsics",
    "load_splats",
    "look_at",
    "orbit",
    "pick_device",
    "rasterize",
    "save_ply",
    "save_splat",
    "scene_points",
    "to_uint8",
]
