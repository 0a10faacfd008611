"""Real spherical harmonics up to degree 3, in the 3DGS basis and sign convention."""

from __future__ import annotations

import torch
from torch import Tensor

SH_C0 = 0.28209479177387814
SH_C1 = 0.4886025119029199
SH_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792,
         0.5462742152960396)  # fmt: skip
SH_C3 = (-0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154,
         -0.4570457994644658, 1.445305721320277, -0.5900435899266435)  # fmt: skip


def rgb_to_sh0(rgb: Tensor) -> Tensor:  # [..., 3] -> [..., 3]
    return (rgb - 0.5) / SH_C0


def sh0_to_rgb(sh0: Tensor) -> Tensor:  # [..., 3] -> [..., 3]
    return sh0 * SH_C0 + 0.5


def sh_basis(dirs: Tensor, degree: int) -> Tensor:
    """SH basis values for unit directions. dirs [..., 3] -> [..., (degree+1)^2]."""
    x, y, z = dirs.unbind(-1)
    out = [torch.full_like(x, SH_C0)]
    if degree >= 1:
        out += [-SH_C1 * y, SH_C1 * z, -SH_C1 * x]
    if degree >= 2:
        xx, yy, zz, xy, yz, xz = x * x, y * y, z * z, x * y, y * z, x * z
        out += [
            SH_C2[0] * xy,
            SH_C2[1] * yz,
            SH_C2[2] * (2 * zz - xx - yy),
            SH_C2[3] * xz,
            SH_C2[4] * (xx - yy),
        ]
    if degree >= 3:
        out += [
            SH_C3[0] * y * (3 * xx - yy),
            SH_C3[1] * xy * z,
            SH_C3[2] * y * (4 * zz - xx - yy),
            SH_C3[3] * z * (2 * zz - 3 * xx - 3 * yy),
            SH_C3[4] * x * (4 * zz - xx - yy),
            SH_C3[5] * z * (xx - yy),
            SH_C3[6] * x * (xx - 3 * yy),
        ]
    return torch.stack(out, dim=-1)


def eval_sh_colors(
    sh: Tensor,  # [N, K, 3]
    means: Tensor,  # [N, 3]
    cam_centers: Tensor,  # [C, 3]
) -> Tensor:  # [C, N, 3]
    """View-dependent colour per camera: rgb = max(SH(dir) + 0.5, 0), dir = mean - camera centre."""
    degree = int(round(sh.shape[1] ** 0.5)) - 1
    if degree == 0:  # view-independent: skip the direction maths
        rgb = sh[:, 0] * SH_C0 + 0.5
        return rgb.clamp_min(0).unsqueeze(0).expand(cam_centers.shape[0], -1, -1)
    dirs = means.unsqueeze(0) - cam_centers.unsqueeze(1)  # [C, N, 3]
    dirs = dirs / dirs.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    basis = sh_basis(dirs, degree)  # [C, N, K]
    rgb = torch.einsum("cnk,nkd->cnd", basis, sh) + 0.5
    return rgb.clamp_min(0)
