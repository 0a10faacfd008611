"""Linear blend skinning as pure functions: points, and Gaussians (positions and rotations).

Skin weights are sparse: each point has K bone indices and K weights summing to 1. Transforms
are the skinning matrices G_j [.., J, 4, 4] that map the canonical rest pose to the posed one.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from render import Gaussians
from render.rotations import det3, quat_to_rotmat, rotmat_to_quat


def blend_matrix(ids: Tensor, weights: Tensor, num: int) -> Tensor:
    """Sparse weights [N, K] over `num` transforms as one CSR matrix [N, num], for
    `blend_transforms(..., matrix=)`: a sparse product instead of gathering [N, K, 4, 4]
    (about 10x faster on a CPU, the same sums up to float rounding)."""
    if len(ids) and (ids.min() < 0 or ids.max() >= num):
        raise ValueError(f"weight ids outside [0, {num})")
    rows = torch.arange(len(ids), device=ids.device).repeat_interleave(ids.shape[1])
    coo = torch.sparse_coo_tensor(torch.stack([rows, ids.flatten()]), weights.flatten().float(),
                                  (len(ids), num), check_invariants=False)  # fmt: skip
    with warnings.catch_warnings():  # "CSR support is in beta": matrix products are stable
        warnings.simplefilter("ignore", UserWarning)
        return coo.coalesce().to_sparse_csr()


def blend_transforms(
    bone_ids: Tensor,  # [N, K] long
    bone_weights: Tensor,  # [N, K]
    transforms: Tensor,  # [B, J, 4, 4]
    matrix: Tensor | None = None,  # `blend_matrix(bone_ids, bone_weights, J)`
) -> Tensor:  # [B, N, 4, 4]
    """Per-point blended transform sum_k w_k G_{j_k}. With `matrix`, as a sparse product where
    no gradient is needed (driving: float32, on the matrix's device); the gather otherwise
    (training)."""
    needs_grad = torch.is_grad_enabled() and (
        transforms.requires_grad or bone_weights.requires_grad
    )
    if (matrix is not None and not needs_grad and transforms.dtype == torch.float32
            and transforms.device == matrix.device):  # fmt: skip
        B, J = transforms.shape[:2]
        top = transforms[..., :3, :].permute(1, 0, 2, 3).reshape(J, B * 12)
        rows = (matrix @ top).reshape(-1, B, 3, 4).transpose(0, 1)  # [B, N, 3, 4]
        last = rows.new_tensor([0.0, 0.0, 0.0, 1.0]).expand(B, rows.shape[1], 1, 4)
        return torch.cat([rows, last], 2)
    picked = transforms[:, bone_ids]  # [B, N, K, 4, 4]
    return (picked * bone_weights[None, :, :, None, None].to(picked.dtype)).sum(dim=2)


def apply_transforms(points: Tensor, blend: Tensor) -> Tensor:
    """Points [N, 3] (or one set per batch row, [B, N, 3]) by per-point transforms
    [B, N, 4, 4] -> [B, N, 3]."""
    return (blend[..., :3, :3] @ points[..., None]).squeeze(-1) + blend[..., :3, 3]


def skin_points(
    points: Tensor, bone_ids: Tensor, bone_weights: Tensor, transforms: Tensor
) -> Tensor:
    """LBS of rest points [N, 3] -> posed [B, N, 3]."""
    return apply_transforms(points, blend_transforms(bone_ids, bone_weights, transforms))


def skin_gaussians(
    gaussians: Gaussians,  # canonical, N Gaussians
    bone_ids: Tensor,  # [N, K]
    bone_weights: Tensor,  # [N, K]
    transforms: Tensor,  # [J, 4, 4] one pose
) -> Gaussians:
    """Pose Gaussians by LBS (see `apply_blend`)."""
    return apply_blend(gaussians, blend_transforms(bone_ids, bone_weights, transforms[None])[0])


def apply_blend(gaussians: Gaussians, blend: Tensor) -> Gaussians:  # blend [N, 4, 4]
    """Move Gaussians by per-Gaussian blended transforms: means by the full transform,
    orientations by its rotation. A blend of rotations is close to a scaled rotation s R:
    dividing by s = det^(1/3) makes it a rotation again before conversion (the Gaussian keeps
    its own scales). Precompute `blend` once when the pose is fixed."""
    means = apply_transforms(gaussians.means, blend[None])[0]
    lin = blend[:, :3, :3]
    lin = lin / det3(lin).clamp_min(1e-12).pow(1 / 3)[:, None, None]
    rot = lin @ quat_to_rotmat(gaussians.quats)
    return gaussians.replace(means=means, quats=rotmat_to_quat(rot))
