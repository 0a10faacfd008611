"""Pure-torch reference rasteriser: the test oracle for every fast backend.

Same maths as gsplat's 3DGS path and our native kernel (see CONVENTIONS.md, "Rasterisation"),
written for clarity, differentiable by autograd. It loops over 16-px tiles in Python and is
~100x slower than the native backend: use it for tests and for the benchmark's reference only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .rotations import quat_to_rotmat

ALPHA_MIN = 1.0 / 255.0
MAX_EXTEND = 3.33


def project(
    means: Tensor,  # [N, 3]
    quats: Tensor,  # [N, 4]
    scales: Tensor,  # [N, 3] activated
    opacities: Tensor,  # [N] activated
    viewmats: Tensor,  # [C, 4, 4]
    Ks: Tensor,  # [C, 3, 3]
    width: int,
    height: int,
    eps2d: float = 0.3,
    near: float = 0.01,
    far: float = 1e10,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """EWA projection. Returns means2d [C,N,2], conics [C,N,3] (a, b, c of the inverse 2D
    covariance [[a, b], [b, c]]), depths [C,N] (camera z) and radii [C,N,2] int32 (0: culled)."""
    rot = quat_to_rotmat(quats)
    m = rot * scales.unsqueeze(-2)  # R @ diag(s)
    cov = m @ m.transpose(-1, -2)  # [N, 3, 3]
    r_cw, t_cw = viewmats[:, :3, :3], viewmats[:, :3, 3]
    p = torch.einsum("cij,nj->cni", r_cw, means) + t_cw[:, None]  # [C, N, 3]
    cov_c = torch.einsum("cij,njk,clk->cnil", r_cw, cov, r_cw)  # [C, N, 3, 3]
    x, y, z = p.unbind(-1)
    fx, fy = Ks[:, 0, 0, None], Ks[:, 1, 1, None]
    cx, cy = Ks[:, 0, 2, None], Ks[:, 1, 2, None]
    lim_xp = (width - cx) / fx + 0.3 * (0.5 * width / fx)
    lim_xn = cx / fx + 0.3 * (0.5 * width / fx)
    lim_yp = (height - cy) / fy + 0.3 * (0.5 * height / fy)
    lim_yn = cy / fy + 0.3 * (0.5 * height / fy)
    zs = torch.where(z.abs() < 1e-6, torch.full_like(z, 1e-6), z)  # culled below; keep finite
    tx = zs * torch.minimum(lim_xp, torch.maximum(-lim_xn, x / zs))
    ty = zs * torch.minimum(lim_yp, torch.maximum(-lim_yn, y / zs))
    zero = torch.zeros_like(zs)
    jac = torch.stack(
        [fx / zs, zero, -fx * tx / zs**2, zero, fy / zs, -fy * ty / zs**2], dim=-1
    ).reshape(*zs.shape, 2, 3)
    cov2d = jac @ cov_c @ jac.transpose(-1, -2)
    a = cov2d[..., 0, 0] + eps2d
    b = cov2d[..., 0, 1]
    c = cov2d[..., 1, 1] + eps2d
    det = a * c - b * b
    det_safe = torch.where(det > 0, det, torch.ones_like(det))
    conics = torch.stack([c / det_safe, -b / det_safe, a / det_safe], dim=-1)
    means2d = torch.stack([fx * x / zs + cx, fy * y / zs + cy], dim=-1)

    with torch.no_grad():
        op = opacities.expand_as(z)
        extend = torch.sqrt(2 * torch.log(op.clamp_min(ALPHA_MIN) / ALPHA_MIN)).clamp(
            max=MAX_EXTEND
        )
        rx = torch.ceil(extend * a.clamp_min(0).sqrt())
        ry = torch.ceil(extend * c.clamp_min(0).sqrt())
        mx, my = means2d[..., 0], means2d[..., 1]
        valid = (
            (z > near) & (z < far) & (det > 0) & (op >= ALPHA_MIN)
            & ((rx > 0) | (ry > 0))
            & (mx + rx > 0) & (mx - rx < width) & (my + ry > 0) & (my - ry < height)
        )  # fmt: skip
        radii = torch.stack([rx, ry], dim=-1).where(valid[..., None], torch.zeros_like(means2d))
    keep = valid[..., None]  # culled Gaussians report zeros, like the kernels
    means2d, conics = means2d.where(keep, 0.0), conics.where(keep, 0.0)
    return means2d, conics, z, radii.to(torch.int32)


def tile_ranges(
    means2d: Tensor, radii: Tensor, width: int, height: int, tile: int = 16
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # each [C, N] int
    """Inclusive-exclusive tile bounds [x0, x1) x [y0, y1) touched by each Gaussian's box."""
    tw, th = math.ceil(width / tile), math.ceil(height / tile)
    mx, my = means2d[..., 0].detach(), means2d[..., 1].detach()
    rx, ry = radii[..., 0].float(), radii[..., 1].float()
    x0 = torch.floor((mx - rx) / tile).clamp(0, tw).long()
    x1 = torch.ceil((mx + rx) / tile).clamp(0, tw).long()
    y0 = torch.floor((my - ry) / tile).clamp(0, th).long()
    y1 = torch.ceil((my + ry) / tile).clamp(0, th).long()
    visible = (radii[..., 0] > 0) | (radii[..., 1] > 0)
    x1 = torch.where(visible, x1, x0)
    return x0, x1, y0, y1


def composite(
    means2d: Tensor,  # [C, N, 2]
    conics: Tensor,  # [C, N, 3]
    colors: Tensor,  # [C, N, D]
    opacities: Tensor,  # [N]
    depths: Tensor,  # [C, N] (sort keys only)
    radii: Tensor,  # [C, N, 2]
    width: int,
    height: int,
    background: Tensor | None = None,  # [C, D]
    tile: int = 16,
    alpha_max: float = 0.99,
    t_min: float = 1e-4,
) -> tuple[Tensor, Tensor]:  # render [C, H, W, D], alpha [C, H, W, 1]
    """Front-to-back compositing, tile by tile, with the stop and skip rules of the kernels."""
    num_cams, _, dim = colors.shape
    x0, x1, y0, y1 = tile_ranges(means2d, radii, width, height, tile)
    out_rows = []
    out_alpha_rows = []
    for ci in range(num_cams):
        order = torch.argsort(depths[ci].detach(), stable=True)
        rows, alpha_rows = [], []
        for ty in range(math.ceil(height / tile)):
            row, alpha_row = [], []
            for tx in range(math.ceil(width / tile)):
                hit = (x0[ci] <= tx) & (tx < x1[ci]) & (y0[ci] <= ty) & (ty < y1[ci])
                ids = order[hit[order]]  # depth-sorted Gaussians of this tile
                ys = torch.arange(ty * tile, min((ty + 1) * tile, height), device=colors.device)
                xs = torch.arange(tx * tile, min((tx + 1) * tile, width), device=colors.device)
                py, px = torch.meshgrid(ys + 0.5, xs + 0.5, indexing="ij")
                pix = torch.stack([px.reshape(-1), py.reshape(-1)], -1).to(colors.dtype)  # [P, 2]
                d = means2d[ci, ids][None] - pix[:, None]  # [P, G, 2]
                a, b, c = conics[ci, ids].unbind(-1)
                sigma = 0.5 * (a * d[..., 0] ** 2 + c * d[..., 1] ** 2) + b * d[..., 0] * d[..., 1]
                alpha = (opacities[ids] * torch.exp(-sigma)).clamp(max=alpha_max)
                alpha = torch.where((sigma >= 0) & (alpha >= ALPHA_MIN), alpha, 0.0)
                trans = torch.cumprod(
                    torch.cat([torch.ones_like(alpha[:, :1]), 1 - alpha], 1), dim=1
                )  # [P, G+1] transmittance before each Gaussian
                keep = trans[:, 1:] > t_min  # stop before the Gaussian that saturates the pixel
                w = torch.where(keep, alpha * trans[:, :-1], 0.0)  # [P, G]
                t_final = torch.prod(torch.where(keep, 1 - alpha, 1.0), dim=1)  # [P]
                img = w @ colors[ci, ids]  # [P, D]
                if background is not None:
                    img = img + t_final[:, None] * background[ci]
                hh, ww = len(ys), len(xs)
                row.append(img.reshape(hh, ww, dim))
                alpha_row.append((1 - t_final).reshape(hh, ww, 1))
            rows.append(torch.cat(row, dim=1))
            alpha_rows.append(torch.cat(alpha_row, dim=1))
        out_rows.append(torch.cat(rows, dim=0))
        out_alpha_rows.append(torch.cat(alpha_rows, dim=0))
    return torch.stack(out_rows), torch.stack(out_alpha_rows)
