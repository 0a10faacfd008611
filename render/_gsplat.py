"""gsplat backend (CUDA). Imported lazily: `import render` never needs gsplat or CUDA.

Pinned to gsplat 1.5.3 (the `cuda` extra). Colours are evaluated by us (same SH code as the
other backends) and passed to gsplat as plain features plus a depth channel ("RGB+ED"-style),
so all backends share one colour path. gsplat clamps alpha at 0.999 in its kernel regardless of
`RasterConfig.alpha_max`.
"""

from __future__ import annotations

from torch import Tensor

from .cameras import Cameras
from .gaussians import Gaussians


def rasterize_gsplat(
    gaussians: Gaussians,
    cameras: Cameras,
    colors: Tensor,  # [C, N, D]
    background: Tensor,  # [C, D]
    cfg,
):
    from gsplat import rasterization  # deferred: gsplat JIT-loads CUDA code on import of kernels

    from .rasterize import RenderOutput

    dim = colors.shape[-1]
    render, alpha, meta = rasterization(
        means=gaussians.means,
        quats=gaussians.quats,
        scales=gaussians.scales,
        opacities=gaussians.opacities,
        colors=colors,
        viewmats=cameras.viewmats.to(gaussians.dtype),
        Ks=cameras.Ks.to(gaussians.dtype),
        width=cameras.width,
        height=cameras.height,
        near_plane=cfg.near,
        far_plane=cfg.far,
        eps2d=cfg.eps2d,
        tile_size=cfg.tile_size,
        render_mode="RGB+ED",
        backgrounds=background,  # gsplat appends the depth channel's zero itself in RGB+ED
        packed=False,
        rasterize_mode="classic",
    )
    radii = meta["radii"]
    if radii.ndim == 2:  # older gsplat: one isotropic radius
        radii = radii.unsqueeze(-1).expand(*radii.shape, 2)
    return RenderOutput(
        render[..., :dim], alpha, render[..., dim:], meta["means2d"], radii.int(), "gsplat"
    )
