"""Shared test helpers: small random scenes, cameras, and skip markers."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from render import Cameras, Gaussians, intrinsics, look_at

SHARED_DATA = Path(
    os.environ.get("AVATAR_SHARED_DATA", Path(__file__).parents[2] / "shared" / "data")
)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def random_scene(n: int = 200, sh_degree: int | None = 1, feature_dim: int = 0, seed: int = 0,
                 dtype=torch.float32) -> Gaussians:  # fmt: skip
    """Gaussians in a ~1 m cube around the origin, mixed sizes, orientations and opacities."""
    gen = torch.Generator().manual_seed(seed)
    means = (torch.rand(n, 3, generator=gen) - 0.5) * 1.2
    quats = torch.randn(n, 4, generator=gen)
    log_scales = torch.log(0.01 + 0.08 * torch.rand(n, 3, generator=gen))
    logits = 2.0 * torch.randn(n, generator=gen)
    if feature_dim:
        return Gaussians(means, quats, log_scales, logits,
                         features=torch.rand(n, feature_dim, generator=gen)).to(dtype)  # fmt: skip
    sh = 0.5 * torch.randn(n, (sh_degree + 1) ** 2, 3, generator=gen)
    return Gaussians(means, quats, log_scales, logits, sh=sh).to(dtype)


def ring_cameras(num: int, width: int, height: int, radius: float = 2.5, fov: float = 45.0,
                 elevation: float = 15.0) -> Cameras:  # fmt: skip
    """Cameras on a ring around the origin, looking at it."""
    eyes = []
    for i in range(num):
        yaw = 2 * math.pi * i / num + 0.3
        el = math.radians(elevation)
        eyes.append([radius * math.cos(el) * math.sin(yaw), radius * math.sin(el),
                     radius * math.cos(el) * math.cos(yaw)])  # fmt: skip
    eyes = torch.tensor(eyes)
    views = look_at(eyes, torch.zeros_like(eyes))
    ks = intrinsics(fov, width, height).expand(num, 3, 3).clone()
    return Cameras(views, ks, width, height)
