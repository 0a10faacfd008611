"""The `Gaussians` container: raw (pre-activation) parameters of a 3D Gaussian scene.

Parameters are stored the way optimisers want them (log-scales, opacity logits, unnormalised
quaternions); the activated values are properties. The container follows its tensors' device and
dtype, indexes like a tensor along N and concatenates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor


def sh_coeffs(degree: int) -> int:
    """Number of SH coefficients per channel for a degree: (degree + 1)^2."""
    return (degree + 1) ** 2


def sh_degree_of(num_coeffs: int) -> int:
    degree = math.isqrt(num_coeffs) - 1
    if degree < 0 or degree > 3 or sh_coeffs(degree) != num_coeffs:
        raise ValueError(f"{num_coeffs} SH coefficients per channel is not (d+1)^2 for d in 0..3")
    return degree


@dataclass
class Gaussians:
    """A set of N 3D Gaussians. Exactly one of `sh` and `features` is set."""

    means: Tensor  # [N, 3] world positions, metres
    quats: Tensor  # [N, 4] rotations, wxyz, unnormalised
    log_scales: Tensor  # [N, 3] natural-log standard deviations along the local axes
    opacity_logits: Tensor  # [N] pre-sigmoid opacities
    sh: Tensor | None = None  # [N, K, 3] spherical-harmonic colour, K = (degree+1)^2
    features: Tensor | None = None  # [N, D] free colour / feature channels, rendered as-is

    def __post_init__(self) -> None:
        n = self.means.shape[0]
        if (self.sh is None) == (self.features is None):
            raise ValueError("Gaussians need exactly one of `sh` [N,K,3] or `features` [N,D]")
        expect = {
            "means": (n, 3),
            "quats": (n, 4),
            "log_scales": (n, 3),
            "opacity_logits": (n,),
        }
        for name, shape in expect.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(f"Gaussians.{name} has shape {got}, expected {shape}")
        if self.sh is not None:
            if self.sh.ndim != 3 or self.sh.shape[0] != n or self.sh.shape[2] != 3:
                raise ValueError(f"Gaussians.sh has shape {tuple(self.sh.shape)}, expected [N,K,3]")
            sh_degree_of(self.sh.shape[1])
        if self.features is not None and (self.features.ndim != 2 or self.features.shape[0] != n):
            raise ValueError(
                f"Gaussians.features has shape {tuple(self.features.shape)}, expected [N,D]"
            )

    # ---- activated views -------------------------------------------------------------------
    @property
    def scales(self) -> Tensor:  # [N, 3]
        return self.log_scales.exp()

    @property
    def opacities(self) -> Tensor:  # [N]
        return torch.sigmoid(self.opacity_logits)

    @property
    def sh_degree(self) -> int | None:
        return None if self.sh is None else sh_degree_of(self.sh.shape[1])

    @property
    def num_channels(self) -> int:
        return 3 if self.sh is not None else self.features.shape[1]

    # ---- tensor-like behaviour ---------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.means.device

    @property
    def dtype(self) -> torch.dtype:
        return self.means.dtype

    def __len__(self) -> int:
        return self.means.shape[0]

    def _tensors(self) -> dict[str, Tensor | None]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def _map(self, fn) -> Gaussians:
        return Gaussians(**{k: None if v is None else fn(v) for k, v in self._tensors().items()})

    def __getitem__(self, index) -> Gaussians:
        """Select Gaussians along N with an int slice, index tensor or boolean mask."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return self._map(lambda t: t[index])

    def to(self, *args, **kwargs) -> Gaussians:
        return self._map(lambda t: t.to(*args, **kwargs))

    def detach(self) -> Gaussians:
        return self._map(Tensor.detach)

    def clone(self) -> Gaussians:
        return self._map(Tensor.clone)

    def requires_grad_(self, flag: bool = True) -> Gaussians:
        for t in self._tensors().values():
            if t is not None:
                t.requires_grad_(flag)
        return self

    def parameters(self) -> dict[str, Tensor]:
        """The set tensors by name (for optimisers and file writers)."""
        return {k: v for k, v in self._tensors().items() if v is not None}

    def replace(self, **changes: Tensor) -> Gaussians:
        return replace(self, **changes)

    @staticmethod
    def cat(items: Sequence[Gaussians]) -> Gaussians:
        """Concatenate along N. All items must share the colour kind and its size."""
        if not items:
            raise ValueError("Gaussians.cat needs at least one item")
        first = items[0]
        out = {}
        for name, value in first._tensors().items():
            parts = [getattr(g, name) for g in items]
            if any(p is None for p in parts):
                if any(p is not None for p in parts):
                    raise ValueError(f"cannot concatenate Gaussians with and without `{name}`")
                out[name] = None
            elif any(p.shape[1:] != value.shape[1:] for p in parts):
                raise ValueError(f"cannot concatenate Gaussians whose `{name}` shapes differ")
            else:
                out[name] = torch.cat(parts, dim=0)
        return Gaussians(**out)

    @staticmethod
    def from_activated(
        means: Tensor,  # [N, 3]
        scales: Tensor,  # [N, 3] standard deviations, metres
        opacities: Tensor,  # [N] in (0, 1)
        quats: Tensor | None = None,  # [N, 4] wxyz; identity when omitted
        rgb: Tensor | None = None,  # [N, 3] in [0, 1]; stored as SH degree `sh_degree`
        sh_degree: int = 0,
        features: Tensor | None = None,  # [N, D]
    ) -> Gaussians:
        """Build from activated values (the readable way to make a scene by hand)."""
        n = means.shape[0]
        if quats is None:
            quats = torch.zeros(n, 4, dtype=means.dtype, device=means.device)
            quats[:, 0] = 1
        eps = torch.finfo(means.dtype).eps
        logits = torch.logit(opacities.clamp(eps, 1 - eps))
        sh = None
        if features is None:
            if rgb is None:
                raise ValueError("from_activated needs `rgb` or `features`")
            from .sh import rgb_to_sh0

            sh = torch.zeros(n, sh_coeffs(sh_degree), 3, dtype=means.dtype, device=means.device)
            sh[:, 0] = rgb_to_sh0(rgb)
        return Gaussians(means, quats, scales.log(), logits, sh=sh, features=features)
