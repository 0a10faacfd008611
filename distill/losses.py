"""Distillation losses (paper section 3.3), each a plain function; `Weight` schedules their λ.

    L = λ_vsd L_vsd + λ_kpt L_kpt + λ_img L_img + λ_reg L_arap + λ_lips L_lips

- `loss_keypoints` (eq. 10): Σ_t ρ(‖K_face − K̃_face‖) + λ_hand ρ(‖K_hand − K̃_hand‖), ρ the
  Charbonnier penalty sqrt(r² + δ²) − δ (quadratic below δ pixels, linear above: one wrong
  MediaPipe detection cannot dominate).
- `loss_image`: per-frame L1 + λ_perc LPIPS (`distill.lpips`, real AlexNet LPIPS weights).
- `loss_arap`: as-rigid-as-possible on a kNN graph built once in the rest pose; each node's own
  rotation maps its rest edges, ‖(x'_j − x'_i) − R_i (x_j − x_i)‖², so rigid motion costs nothing.
- `loss_lip_motion`: the lip shape the deformer's own visemes ask for, made by the particles and
  the Gaussian head's Δp (stage 1 of `distill.train_drive` learns it; distillation keeps it).
- Video score distillation lives in `distill.score` (one shared function).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Weight:
    """A λ over training steps: piecewise linear through (step, value) knots, constant outside.

    Written `0.5` (constant) or `0@0,1@200` (ramp from 0 at step 0 to 1 at step 200)."""

    knots: tuple[tuple[int, float], ...]

    @staticmethod
    def parse(text: str | float) -> Weight:
        if isinstance(text, int | float):
            return Weight(((0, float(text)),))
        try:
            knots = []
            for part in str(text).split(","):
                value, _, step = part.partition("@")
                knots.append((int(step or 0), float(value)))
        except ValueError:
            raise ValueError(f"loss weight {text!r}: use 0.5 or 0@0,1@200") from None
        knots.sort()
        return Weight(tuple(knots))

    def __call__(self, step: int) -> float:
        (s0, v0), *rest = self.knots
        if step <= s0:
            return v0
        for s1, v1 in rest:
            if step <= s1:
                return v0 + (v1 - v0) * (step - s0) / max(s1 - s0, 1)
            s0, v0 = s1, v1
        return v0

    def __str__(self) -> str:
        return ",".join(f"{v:g}@{s}" for s, v in self.knots)


def charbonnier(r: Tensor, delta: float) -> Tensor:
    return torch.sqrt(r * r + delta * delta) - delta


def loss_keypoints(
    ours: Tensor,  # [T, P, 2] pixels
    teacher: Tensor,  # [T, P, 2] pixels
    hand: Tensor,  # [P] bool, hand keypoints
    visible: Tensor | None = None,  # [T, P] bool, teacher keypoints that exist
    lambda_hand: float = 1.0,
    delta: float = 2.0,
    centred: bool = False,
) -> Tensor:
    """Eq. 10, averaged over frames: mean ρ over face keypoints + λ_hand mean ρ over hands.

    `centred`: each frame's face keypoints are compared about their own centroid (ours and the
    teacher's separately), so a head offset the audio cannot predict does not swamp the shape of
    the mouth; hands are always compared as they are."""
    vis = torch.ones(ours.shape[:2], dtype=torch.bool) if visible is None else visible
    if centred:
        m = (vis & ~hand[None]).to(ours.dtype)[..., None]  # [T, P, 1]
        count = m.sum(1, keepdim=True).clamp_min(1)
        shift = (
            (ours * m).sum(1, keepdim=True) / count,
            (teacher * m).sum(1, keepdim=True) / count,
        )
        face = (~hand)[None, :, None]
        ours = torch.where(face, ours - shift[0], ours)
        teacher = torch.where(face, teacher - shift[1], teacher)
    rho = charbonnier((ours - teacher).norm(dim=-1), delta)  # [T, P]
    out = rho.new_zeros(())
    for sel, w in ((~hand, 1.0), (hand, lambda_hand)):
        m = vis & sel[None]
        if m.any():
            out = out + w * rho[m].sum() / m.sum()
    return out


def loss_image(ours: Tensor, teacher: Tensor, lambda_perc: float = 0.1) -> Tensor:
    """Per-frame L1 + λ_perc LPIPS; images [T, H, W, 3] in [0, 1]."""
    out = (ours - teacher).abs().mean()
    if lambda_perc > 0:
        from .lpips import loss_lpips

        out = out + lambda_perc * loss_lpips(ours, teacher)
    return out


@dataclass
class ArapGraph:
    """Each node's k nearest neighbours in the rest pose, built once."""

    rest: Tensor  # [P, 3]
    nbrs: Tensor  # [P, k] long

    @staticmethod
    def build(rest: Tensor, k: int = 6) -> ArapGraph:
        d = torch.cdist(rest, rest)
        d.fill_diagonal_(float("inf"))
        return ArapGraph(rest, d.topk(k, largest=False).indices)

    def edges(self, points: Tensor) -> Tensor:  # [..., P, 3] -> [..., P, k, 3]
        return points[..., self.nbrs, :] - points[..., :, None, :]


def loss_arap(
    graph: ArapGraph,
    deformed: Tensor,  # [T, P, 3] positions
    rotations: Tensor,  # [T, P, 3, 3] each node's rotation (its particle or blended transform)
) -> Tensor:
    """Mean squared deviation of deformed edges from the rest edges turned by the node's rotation
    (metres², so scale λ_reg for millimetre-level motion)."""
    rest = graph.edges(graph.rest)  # [P, k, 3]
    want = torch.einsum("tpij,pkj->tpki", rotations, rest)
    return ((graph.edges(deformed) - want) ** 2).sum(-1).mean()


def loss_lip_motion(rig, means: Tensor, motion, ids: Tensor, offsets: Tensor, lip_ids: Tensor
                    ) -> Tensor:  # fmt: skip
    """How far the particles and Δp are from the lip shape the motion's own visemes ask for.

    `motion.lips` [T, L] (held fixed) times the template's expression basis of the lip actions
    `lip_ids` gives the displacement each of the Gaussians `ids` (sorted, all in `rig.moving`)
    should make in canonical space; the blended particle transforms applied to `means[ids]`, plus
    `offsets` [T, len(ids), 3], give the one they make. Mean squared error in units of the wanted
    motion's mean square (1 mm floor), so a pucker's few millimetres weigh as much as a jaw."""
    idx = torch.searchsorted(rig.moving, ids)
    want = torch.einsum("te,enc->tnc", motion.lips.detach(), rig.basis[lip_ids][:, idx])
    scale = want.pow(2).sum(-1).mean().clamp_min(0.001**2)
    mu = means[ids]
    moved, _ = rig.particles.move(mu, motion.particles, offsets, ids)
    return (((moved - mu) - want) ** 2).sum(-1).mean() / scale
