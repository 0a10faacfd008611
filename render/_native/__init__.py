"""Native CPU backend: numba kernels wrapped as two autograd functions, `project` and `composite`.

Everything here runs in float32 on CPU tensors. The kernels compile on first use and are cached
on disk by numba (`NUMBA_CACHE_DIR` moves the cache), so only the first run of a fresh install
pays the compile time.
"""

from __future__ import annotations

import math
import os

import numba
import numpy as np
import torch
from torch import Tensor

from . import compositing as _c
from . import projection as _p
from . import sh as _sh


def kernels_cached() -> bool:
    """Whether numba's on-disk cache holds the compositing kernel; if not, the first render
    compiles the CPU kernels (about 10 s). Reads a numba internal, so it answers True when unsure."""
    try:
        return os.path.exists(_c.composite_fwd._cache._cache_file._index_path)
    except AttributeError:
        return True


def _np(t: Tensor):
    """A float32/int contiguous numpy view sharing memory with a detached CPU tensor."""
    return t.detach().contiguous().numpy()


def _f32(t: Tensor) -> Tensor:
    return t.detach().to(torch.float32).contiguous()


class _Project(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, means, quats, scales, opacities, viewmats, Ks, width, height, eps2d, near, far
    ):
        num_cams, n = viewmats.shape[0], means.shape[0]
        args = [_f32(t) for t in (means, quats, scales, opacities, viewmats, Ks)]
        means2d = torch.zeros(num_cams, n, 2)
        conics = torch.zeros(num_cams, n, 3)
        depths = torch.zeros(num_cams, n)
        radii = torch.zeros(num_cams, n, 2, dtype=torch.int32)
        _p.project_fwd(*map(_np, args), width, height, eps2d, near, far,
                       means2d.numpy(), conics.numpy(), depths.numpy(), radii.numpy())  # fmt: skip
        ctx.save_for_backward(*args, radii)
        ctx.cfg = (width, height, eps2d, means.dtype)
        ctx.mark_non_differentiable(radii)
        return means2d, conics, depths, radii

    @staticmethod
    def backward(ctx, v_means2d, v_conics, v_depths, _v_radii):
        means, quats, scales, _opacities, viewmats, Ks, radii = ctx.saved_tensors
        width, height, eps2d, dtype = ctx.cfg
        v_means, v_quats, v_scales = (torch.zeros_like(t) for t in (means, quats, scales))
        num_cams, n = radii.shape[:2]
        shapes = ((num_cams, n, 2), (num_cams, n, 3), (num_cams, n))
        grads = [torch.zeros(s) if g is None else _f32(g)
                 for g, s in zip((v_means2d, v_conics, v_depths), shapes, strict=True)]  # fmt: skip
        _p.project_bwd(_np(means), _np(quats), _np(scales), _np(viewmats), _np(Ks), width, height,
                       eps2d, _np(radii), *map(_np, grads),
                       v_means.numpy(), v_quats.numpy(), v_scales.numpy())  # fmt: skip
        out = (v_means.to(dtype), v_quats.to(dtype), v_scales.to(dtype))
        return (*out, None, None, None, None, None, None, None, None)


class _Composite(torch.autograd.Function):
    @staticmethod
    def forward(ctx, means2d, conics, colors, opacities, background, radii, tile_offsets,
                flatten_ids, width, height, tile, alpha_max, t_min):  # fmt: skip
        num_cams, _, dim = colors.shape
        args = [_f32(t) for t in (means2d, conics, colors, opacities, background)]
        out_color = torch.empty(num_cams, height, width, dim)
        out_alpha = torch.empty(num_cams, height, width)
        last_ids = torch.empty(num_cams, height, width, dtype=torch.int64)
        _c.composite_fwd(*map(_np, args), _np(radii), _np(tile_offsets), _np(flatten_ids),
                         width, height, tile, np.float32(alpha_max), np.float32(t_min),
                         out_color.numpy(), out_alpha.numpy(), last_ids.numpy(),
                         numba.get_num_threads())  # fmt: skip
        ctx.save_for_backward(*args, radii, tile_offsets, flatten_ids, out_alpha, last_ids)
        ctx.cfg = (
            width,
            height,
            tile,
            alpha_max,
            [t.dtype for t in (means2d, conics, colors, opacities, background)],
        )
        return out_color.to(colors.dtype), out_alpha.unsqueeze(-1).to(colors.dtype)

    @staticmethod
    def backward(ctx, v_color, v_alpha):
        means2d, conics, colors, opacities, background, radii, offsets, ids, out_alpha, last = (
            ctx.saved_tensors
        )
        width, height, tile, alpha_max, dtypes = ctx.cfg
        num_cams, n, dim = colors.shape
        v_color = torch.zeros(num_cams, height, width, dim) if v_color is None else _f32(v_color)
        v_alpha = (torch.zeros(num_cams, height, width) if v_alpha is None
                   else _f32(v_alpha).reshape(num_cams, height, width))  # fmt: skip
        isect_grads = torch.zeros(ids.shape[0], 6 + dim)
        _c.composite_bwd(_np(means2d), _np(conics), _np(colors), _np(opacities),
                         _np(background), _np(radii), _np(offsets), _np(ids), width, height,
                         tile, np.float32(alpha_max), _np(out_alpha), _np(last),
                         v_color.numpy(), v_alpha.numpy(), isect_grads.numpy(),
                         numba.get_num_threads())  # fmt: skip
        v_means2d, v_conics = torch.zeros_like(means2d), torch.zeros_like(conics)
        v_opacities, v_colors = torch.zeros_like(opacities), torch.zeros_like(colors)
        _c.reduce_isect_grads(ids.numpy(), isect_grads.numpy(), n, v_means2d.numpy(),
                              v_conics.numpy(), v_opacities.numpy(), v_colors.numpy())  # fmt: skip
        t_final = (1 - out_alpha).unsqueeze(-1)  # [C, H, W, 1]
        v_background = (v_color * t_final).sum(dim=(1, 2))  # [C, D]
        grads = (v_means2d, v_conics, v_colors, v_opacities, v_background)
        return (
            *(g.to(dt) for g, dt in zip(grads, dtypes, strict=True)),
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


class _SHColors(torch.autograd.Function):
    @staticmethod
    def forward(ctx, sh, means, centers):
        args = [_f32(t) for t in (sh, means, centers)]
        degree = math.isqrt(sh.shape[1]) - 1
        out = torch.empty(centers.shape[0], sh.shape[0], 3)
        _sh.sh_fwd(*map(_np, args), degree, out.numpy())
        ctx.save_for_backward(*args)
        ctx.cfg = (degree, sh.dtype, means.dtype)
        return out.to(sh.dtype)

    @staticmethod
    def backward(ctx, v_out):
        sh, means, centers = ctx.saved_tensors
        degree, sh_dtype, means_dtype = ctx.cfg
        v_sh, v_means = torch.zeros_like(sh), torch.zeros_like(means)
        _sh.sh_bwd(_np(sh), _np(means), _np(centers), degree, _np(_f32(v_out)), v_sh.numpy(),
                   v_means.numpy())  # fmt: skip
        return v_sh.to(sh_dtype), v_means.to(means_dtype), None


def sh_colors(sh: Tensor, means: Tensor, centers: Tensor) -> Tensor:
    """Native `render.sh.eval_sh_colors`: sh [N,K,3], means [N,3], centers [C,3] -> [C,N,3]."""
    return _SHColors.apply(sh, means, centers)


def project(means, quats, scales, opacities, viewmats, Ks, width, height, eps2d, near, far):
    """Native EWA projection; same outputs as `render._reference.project`."""
    return _Project.apply(means, quats, scales, opacities, viewmats, Ks, width, height,
                          float(eps2d), float(near), float(far))  # fmt: skip


def bin_tiles(means2d: Tensor, radii: Tensor, depths: Tensor, width: int, height: int, tile: int):
    """(tile_offsets [C*TH*TW+1], flatten_ids [I]) ordered by (camera, tile, depth)."""
    offsets, ids = _c.bin_tiles(_np(_f32(means2d)), _np(radii), _np(_f32(depths)),
                                width, height, tile)  # fmt: skip
    return torch.from_numpy(offsets), torch.from_numpy(ids)


def composite(means2d, conics, colors, opacities, background, radii, tile_offsets, flatten_ids,
              width, height, tile, alpha_max, t_min):  # fmt: skip
    """Native tile compositing; returns render [C,H,W,D] and alpha [C,H,W,1]."""
    return _Composite.apply(means2d, conics, colors, opacities, background, radii, tile_offsets,
                            flatten_ids, width, height, tile, alpha_max, t_min)  # fmt: skip
