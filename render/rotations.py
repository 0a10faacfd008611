"""Quaternion <-> rotation-matrix conversions (wxyz, see CONVENTIONS.md)."""

from __future__ import annotations

import torch
from torch import Tensor


def quat_to_rotmat(quats: Tensor) -> Tensor:  # [..., 4] wxyz (any norm) -> [..., 3, 3]
    w, x, y, z = torch.nn.functional.normalize(quats, dim=-1).unbind(-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).reshape(*quats.shape[:-1], 3, 3)  # fmt: skip


def quat_multiply(a: Tensor, b: Tensor) -> Tensor:  # [..., 4] wxyz, broadcast -> [..., 4]
    """The Hamilton product a ⊗ b: the rotation b, then a (a's matrix times b's)."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack([aw * bw - ax * bx - ay * by - az * bz,
                        aw * bx + ax * bw + ay * bz - az * by,
                        aw * by - ax * bz + ay * bw + az * bx,
                        aw * bz + ax * by - ay * bx + az * bw], -1)  # fmt: skip


def det3(m: Tensor) -> Tensor:  # [..., 3, 3] -> [...]
    """Determinants of 3x3 matrices by the cofactor formula (several times faster than
    `torch.linalg.det`'s LU for many small matrices on a CPU; differentiable)."""
    return (m[..., 0, 0] * (m[..., 1, 1] * m[..., 2, 2] - m[..., 1, 2] * m[..., 2, 1])
            - m[..., 0, 1] * (m[..., 1, 0] * m[..., 2, 2] - m[..., 1, 2] * m[..., 2, 0])
            + m[..., 0, 2] * (m[..., 1, 0] * m[..., 2, 1] - m[..., 1, 1] * m[..., 2, 0]))  # fmt: skip


def rotmat_to_quat(rot: Tensor) -> Tensor:  # [..., 3, 3] -> [..., 4] wxyz, w >= 0
    """Shepperd's method: pick the best-conditioned of the four candidate formulas per matrix."""
    m = rot
    tr = m[..., 0, 0] + m[..., 1, 1] + m[..., 2, 2]
    cands = torch.stack(
        [
            torch.stack(
                [
                    1 + tr,
                    m[..., 2, 1] - m[..., 1, 2],
                    m[..., 0, 2] - m[..., 2, 0],
                    m[..., 1, 0] - m[..., 0, 1],
                ],
                -1,
            ),
            torch.stack(
                [
                    m[..., 2, 1] - m[..., 1, 2],
                    1 + 2 * m[..., 0, 0] - tr,
                    m[..., 0, 1] + m[..., 1, 0],
                    m[..., 0, 2] + m[..., 2, 0],
                ],
                -1,
            ),
            torch.stack(
                [
                    m[..., 0, 2] - m[..., 2, 0],
                    m[..., 0, 1] + m[..., 1, 0],
                    1 + 2 * m[..., 1, 1] - tr,
                    m[..., 1, 2] + m[..., 2, 1],
                ],
                -1,
            ),
            torch.stack(
                [
                    m[..., 1, 0] - m[..., 0, 1],
                    m[..., 0, 2] + m[..., 2, 0],
                    m[..., 1, 2] + m[..., 2, 1],
                    1 + 2 * m[..., 2, 2] - tr,
                ],
                -1,
            ),
        ],
        dim=-2,
    )  # [..., 4 candidates, 4]; candidate i has component i = 4 q_i^2 (largest is stable)
    diag = torch.stack([1 + tr, 1 + 2 * m[..., 0, 0] - tr, 1 + 2 * m[..., 1, 1] - tr,
                        1 + 2 * m[..., 2, 2] - tr], -1)  # fmt: skip
    best = diag.argmax(-1, keepdim=True)
    q = torch.gather(cands, -2, best.unsqueeze(-1).expand(*best.shape[:-1], 1, 4)).squeeze(-2)
    q = torch.nn.functional.normalize(q, dim=-1)
    return torch.where(q[..., :1] < 0, -q, q)


def axis_angle_to_rotmat(aa: Tensor) -> Tensor:  # [..., 3] -> [..., 3, 3]
    """Via a quaternion with a Taylor-safe half-angle sine (finite gradients at zero)."""
    theta2 = (aa * aa).sum(-1, keepdim=True)
    theta = torch.sqrt(theta2.clamp_min(1e-24))
    small = theta2 < 1e-8
    half_sinc = torch.where(small, 0.5 - theta2 / 48, torch.sin(theta / 2) / theta)
    w = torch.where(small, 1 - theta2 / 8, torch.cos(theta / 2))
    return quat_to_rotmat(torch.cat([w, aa * half_sinc], dim=-1))


def rotmat_to_axis_angle(rot: Tensor) -> Tensor:  # [..., 3, 3] -> [..., 3], angle in [0, pi]
    q = rotmat_to_quat(rot)
    q = q * torch.where(q[..., :1] < 0, -1.0, 1.0)
    s = q[..., 1:].norm(dim=-1, keepdim=True)
    angle = 2 * torch.atan2(s, q[..., :1])
    scale = torch.where(s > 1e-8, angle / s.clamp_min(1e-8), 2.0 / q[..., :1].clamp_min(1e-8))
    return q[..., 1:] * scale
