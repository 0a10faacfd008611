"""SE(3) maths as pure functions: twists, the exponential map, moving points.

A twist is xi = (omega, v) in R^6: rotation vector first, then translation (CONVENTIONS.md).
exp(xi^) = [[R, V v], [0, 1]] with
    R = I + A W + B W²,   V = I + B W + C W²,   W = omega^,  theta = |omega|,
    A = sin(theta)/theta,  B = (1 - cos(theta))/theta²,  C = (theta - sin(theta))/theta³.
Near theta = 0 the coefficients switch to their Taylor series and the square root is never
taken of zero ("double where"), so values and gradients stay finite and exact at and around
zero rotation, in float32 and float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

SMALL = 1e-4  # theta² below this uses the Taylor series (error ~ theta^6 / 5040 < 1e-15)


def hat(omega: Tensor) -> Tensor:  # [..., 3] -> [..., 3, 3] skew-symmetric cross-product matrix
    x, y, z = omega.unbind(-1)
    zero = torch.zeros_like(x)
    return torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=-1).reshape(*omega.shape, 3)


def _coefficients(theta2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    small = theta2 < SMALL
    safe2 = torch.where(small, torch.ones_like(theta2), theta2)  # never sqrt(0) on either branch
    theta = torch.sqrt(safe2)
    sin, cos = torch.sin(theta), torch.cos(theta)
    a = torch.where(small, 1 - theta2 / 6 + theta2**2 / 120, sin / theta)
    b = torch.where(small, 0.5 - theta2 / 24 + theta2**2 / 720, (1 - cos) / safe2)
    c = torch.where(small, 1 / 6 - theta2 / 120 + theta2**2 / 5040, (theta - sin) / (safe2 * theta))
    return a, b, c


def exp(xi: Tensor) -> Tensor:  # [..., 6] twist (omega, v) -> [..., 4, 4] rigid transform
    omega, v = xi[..., :3], xi[..., 3:]
    w = hat(omega)
    w2 = w @ w
    a, b, c = (k[..., None, None] for k in _coefficients((omega * omega).sum(-1)))
    eye = torch.eye(3, dtype=xi.dtype, device=xi.device).expand_as(w)
    rot = eye + a * w + b * w2
    vmat = eye + b * w + c * w2
    top = torch.cat([rot, (vmat @ v[..., None])], dim=-1)  # [..., 3, 4]
    bottom = torch.zeros(*xi.shape[:-1], 1, 4, dtype=xi.dtype, device=xi.device)
    bottom[..., 0, 3] = 1
    return torch.cat([top, bottom], dim=-2)


def transform_points(
    t: Tensor, points: Tensor
) -> Tensor:  # [..., 4, 4], [..., P, 3] -> [..., P, 3]
    return points @ t[..., :3, :3].transpose(-1, -2) + t[..., None, :3, 3]
