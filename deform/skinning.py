"""Linear blend skinning as pure functions: points, and Gaussians (positions and rotations).

Skin weights are sparse: each point has K bone indices and K weights summing to 1. Transforms
are the skinning matrices G_j [.., J, 4, 4] that map the canonical rest pose to the posed one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from render import Gaussians
from render.rotations import quat_to_rotmat, rotmat_to_quat


def blend_transforms(
    bone_ids: Tensor,  # [N, K] long
    bone_weights: Tensor,  # [N, K]
    transforms: Tensor,  # [B, J, 4, 4]
) -> Tensor:  # [B, N, 4, 4]
    """Per-point blended transform sum_k w_k G_{j_k}."""
    picked = transforms[:, bone_ids]  # [B, N, K, 4, 4]
    return (picked * bone_weights[None, :, :, None, None].to(picked.dtype)).sum(dim=2)


def apply_transforms(points: Tensor, blend: Tensor) -> Tensor:  # [N, 3], [B, N, 4, 4] -> [B, N, 3]
    return (blend[..., :3, :3] @ points[None, :, :, None]).squeeze(-1) + blend[..., :3, 3]


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
    lin = lin / torch.linalg.det(lin).clamp_min(1e-12).pow(1 / 3)[:, None, None]
    rot = lin @ quat_to_rotmat(gaussians.quats)
    return gaussians.replace(means=means, quats=rotmat_to_quat(rot))
