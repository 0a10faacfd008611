"""`rasterize()`: the one entry point for rendering Gaussians, with automatic backend choice.

Backends (same maths, see CONVENTIONS.md "Rasterisation"):
- ``"gsplat"``: gsplat's CUDA kernels, chosen for CUDA tensors when gsplat is installed;
- ``"native"``: numba CPU kernels, forward and backward, chosen for CPU tensors;
- ``"reference"``: the pure-torch oracle, for tests and benchmarks only.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from . import _reference
from .cameras import Cameras
from .gaussians import Gaussians
from .sh import eval_sh_colors

BACKENDS = ("auto", "native", "reference", "gsplat")


@dataclass(frozen=True)
class RasterConfig:
    """Rasterisation settings shared by every backend."""

    eps2d: float = 0.3
    """Dilation added to the 2D covariance's diagonal, px² (anti-aliasing floor)."""
    near: float = 0.01
    """Gaussians closer to the camera than this (metres) are culled."""
    far: float = 1e10
    """Gaussians farther than this are culled."""
    tile_size: int = 16
    """Tile edge in pixels for binning and compositing."""
    alpha_max: float = 0.99
    """Per-Gaussian alpha clamp (gsplat's CUDA kernel hard-codes 0.999)."""
    t_min: float = 1e-4
    """A pixel stops before the Gaussian that would bring its transmittance to this or below."""

    def __post_init__(self) -> None:
        if not 1 <= self.tile_size <= 32:
            raise ValueError(f"tile_size must be in 1..32, got {self.tile_size}")
        if not 1 / 255 < self.alpha_max < 1:
            raise ValueError(f"alpha_max must be in (1/255, 1), got {self.alpha_max}")
        if not (0 < self.near < self.far and self.eps2d >= 0 and 0 <= self.t_min < 1):
            raise ValueError(f"invalid raster settings: {self}")


@dataclass
class RenderOutput:
    """What `rasterize` returns; every image is channels-last."""

    rgb: Tensor  # [C, H, W, D] colour (D = 3 for SH Gaussians, else the feature size)
    alpha: Tensor  # [C, H, W, 1] accumulated opacity
    depth: Tensor  # [C, H, W, 1] expected camera z (0 where alpha is 0)
    means2d: Tensor  # [C, N, 2] projected centres, px (call .retain_grad() for densification)
    radii: Tensor  # [C, N, 2] int32 box half-sizes in px, 0 where culled
    backend: str  # which backend produced it


def to_uint8(image: Tensor) -> np.ndarray:
    """Rendered colours [..., 3] in [0, 1] (one image or a batch) -> uint8 numpy, rounded."""
    return (image.detach().clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy()


def has_gsplat() -> bool:
    """Whether gsplat is importable (it still needs a CUDA device to rasterise)."""
    return importlib.util.find_spec("gsplat") is not None


def pick_device(requested: str = "auto") -> torch.device:
    """`auto`: the current CUDA device when there is one and gsplat is installed, else the CPU;
    "cpu" or "cuda[:N]" as asked, with a ValueError that says what is missing."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() and has_gsplat() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"{requested!r}: use auto, cpu or cuda[:N]")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{requested}: this machine's torch sees no CUDA device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{requested}: there are {torch.cuda.device_count()} CUDA devices")
        if not has_gsplat():
            raise ValueError(f"{requested}: CUDA rendering needs gsplat: "
                             "pip install 'gsavatar[cuda]'")  # fmt: skip
    return device


def choose_backend(device: torch.device, requested: str = "auto") -> str:
    """Resolve "auto": gsplat for CUDA tensors when installed, the native kernel on CPU."""
    if requested not in BACKENDS:
        raise ValueError(f"unknown backend {requested!r}; choose one of {BACKENDS}")
    if requested != "auto":
        if requested == "gsplat" and (device.type != "cuda" or not has_gsplat()):
            raise ValueError("the gsplat backend needs CUDA tensors and `pip install gsplat`")
        if requested == "native" and device.type != "cpu":
            raise ValueError("the native backend runs on CPU tensors; move them with .cpu()")
        return requested
    if device.type == "cuda":
        if not has_gsplat():
            raise ValueError(
                "CUDA tensors need the gsplat backend: pip install 'gsavatar[cuda]' "
                "(or move the scene to CPU)"
            )
        return "gsplat"
    return "native"


def _colors(gaussians: Gaussians, cameras: Cameras, backend: str) -> Tensor:  # [C, N, D]
    if gaussians.sh is None:
        return gaussians.features.unsqueeze(0).expand(len(cameras), -1, -1)
    centers = cameras.centers.to(gaussians.dtype)
    if backend == "native" and gaussians.sh_degree > 0:
        from . import _native

        return _native.sh_colors(gaussians.sh, gaussians.means, centers)
    return eval_sh_colors(gaussians.sh, gaussians.means, centers)


def _background(background: Tensor | float | None, num_cams: int, dim: int, like: Tensor) -> Tensor:
    if background is None:
        background = 0.0
    bg = torch.as_tensor(background, dtype=like.dtype, device=like.device)
    if bg.ndim == 0:
        bg = bg.expand(dim)
    if bg.shape[-1] != dim:
        raise ValueError(f"background has {bg.shape[-1]} channels, the colours have {dim}")
    return bg.expand(num_cams, dim)


def rasterize(
    gaussians: Gaussians,
    cameras: Cameras,
    background: Tensor | float | None = None,  # [D], [C, D] or a scalar; 0 when omitted
    config: RasterConfig | None = None,
    backend: str = "auto",
) -> RenderOutput:
    """Render N Gaussians into C cameras. Differentiable with respect to every Gaussian tensor."""
    cfg = config or RasterConfig()
    name = choose_backend(gaussians.device, backend)
    num_cams, width, height = len(cameras), cameras.width, cameras.height
    colors = _colors(gaussians, cameras, name)
    dim = colors.shape[-1]
    bg = _background(background, num_cams, dim, colors)
    if name == "gsplat":
        from ._gsplat import rasterize_gsplat

        return rasterize_gsplat(gaussians, cameras, colors, bg, cfg)

    opacities = gaussians.opacities
    proj_args = (gaussians.means, gaussians.quats, gaussians.scales, opacities,
                 cameras.viewmats, cameras.Ks, width, height, cfg.eps2d, cfg.near, cfg.far)  # fmt: skip
    if name == "native":
        from . import _native

        means2d, conics, depths, radii = _native.project(*proj_args)
    else:
        means2d, conics, depths, radii = _reference.project(*proj_args)
    # depth rides along as one more colour channel; its background is 0
    feats = torch.cat([colors, depths.unsqueeze(-1).to(colors.dtype)], dim=-1)
    bg_ext = torch.cat([bg, torch.zeros_like(bg[:, :1])], dim=-1)
    if name == "native":
        offsets, ids = _native.bin_tiles(means2d, radii, depths, width, height, cfg.tile_size)
        image, alpha = _native.composite(means2d, conics, feats, opacities, bg_ext, radii,
                                         offsets, ids, width, height, cfg.tile_size,
                                         cfg.alpha_max, cfg.t_min)  # fmt: skip
    else:
        image, alpha = _reference.composite(means2d, conics, feats, opacities, depths, radii,
                                            width, height, bg_ext, cfg.tile_size, cfg.alpha_max,
                                            cfg.t_min)  # fmt: skip
    depth = image[..., dim:] / alpha.clamp_min(1e-10)  # alpha 0 means no z was accumulated: 0
    return RenderOutput(image[..., :dim], alpha, depth, means2d, radii, name)
