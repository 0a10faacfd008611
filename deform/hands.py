"""Hand shapes while talking: the fingers follow the arm's beat gestures.

The deformer drives the arms and wrists (`controls.DRIVEN_BONES`); nothing in it drives the 30
finger bones, so without this layer the hands stay in the photo's pose like a mannequin's. Speakers'
hands change shape on the beats of their gestures (McNeill's beats: a quick flick, an open palm
presented, a point) and fall back to a relaxed curl between them. `HandShaper` does that causally,
chunk by chunk like the deformer:

- gesture speed of each hand: the angular speed of its forearm and wrist rotations, rad/s;
- a beat: the speed rising through `BEAT_SPEED` at least `MIN_GAP_S` after the previous beat;
- on each beat a shape is drawn (`SHAPES`, weights `CHOICE`; seeded by the seed, the hand and
  the beat's number, so any chunking gives the same video) and held `HOLD_S`, then relaxed;
- the shape's weights approach their target with time constant `TAU_S`.

A shape is a flexion angle per finger joint (index to pinky, 3 joints each; the thumb's three)
and a spread per finger. Flexion turns each bone about the axis across its rest direction and
the palm's normal, towards the palm; spread turns it about the palm's normal, positive towards
the pinky's side on both hands (the hands are mirror images).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

FINGERS = (1, 2, 3, 4, 5)  # Anny: 1 thumb ... 5 pinky, joints -1 -2 -3
SIDES = ("L", "R")
# flexion in degrees per joint, thumb first, then index to pinky; spread per finger
SHAPES = {
    "relaxed": ([8, 10, 10], [[12, 22, 12], [16, 26, 14], [20, 30, 16], [24, 34, 18]],
                [0, 0, 0, 0, 0]),
    "open": ([-5, -5, 0], [[-6, 0, 0], [-6, 0, 0], [-6, 0, 0], [-6, 0, 0]], [0, -8, 0, 6, 12]),
    "beat": ([20, 25, 20], [[35, 55, 30], [40, 60, 32], [44, 64, 34], [48, 68, 36]],
             [0, 0, 0, 0, 0]),
    "point": ([25, 35, 25], [[-4, 0, 0], [70, 95, 50], [75, 95, 50], [80, 95, 50]],
              [0, 0, 0, 0, 0]),
}  # fmt: skip
CHOICE = {"open": 0.45, "beat": 0.35, "point": 0.2}
BEAT_SPEED = 0.6  # rad/s of forearm + wrist rotation that starts a beat
MIN_GAP_S = 0.5
HOLD_S = 0.7
TAU_S = 0.12


def finger_bones(side: str) -> list[str]:
    return [f"finger{f}-{j}.{side}" for f in FINGERS for j in (1, 2, 3)]


def shape_angles(name: str) -> Tensor:
    """[15, 2] (flexion, spread) in radians for one hand's finger bones, `finger_bones` order."""
    thumb, others, spread = SHAPES[name]
    flex = [thumb, *others]
    rows = [[flex[f][j], spread[f] if j == 0 else 0.0] for f in range(5) for j in range(3)]
    return torch.tensor(rows, dtype=torch.float32) * (math.pi / 180)


def finger_axes(template, shape: Tensor) -> tuple[Tensor, list[str]]:
    """Per finger bone of both hands, the (flexion, spread) axes [30, 2, 3] in canonical rest
    axes, and the bones' names."""
    t = template
    with torch.no_grad():
        joints = t(shape[None]).joints[0]
    head = {n: joints[i] for i, n in enumerate(t.bone_names)}
    axes, names = [], []
    for side in SIDES:
        wrist = head[f"wrist.{side}"]
        across = head[f"finger2-1.{side}"] - head[f"finger5-1.{side}"]
        along = (head[f"finger2-1.{side}"] + head[f"finger5-1.{side}"]) / 2 - wrist
        normal = torch.nn.functional.normalize(torch.linalg.cross(along, across), dim=0)
        palm = (head[f"finger2-1.{side}"] + head[f"finger5-1.{side}"] + wrist) / 3
        if (head[f"finger1-3.{side}"] - palm) @ normal < 0:  # the thumb sits on the palm's side
            normal = -normal
        for name in finger_bones(side):
            f, j = name[6], int(name[8])
            nxt = head.get(f"finger{f}-{j + 1}.{side}") if j < 3 else None
            prev = head[f"finger{f}-{j - 1}.{side}"] if j > 1 else None
            d = nxt - head[name] if nxt is not None else head[name] - prev
            d = torch.nn.functional.normalize(d, dim=0)
            flex = torch.nn.functional.normalize(torch.linalg.cross(d, normal), dim=0)
            # positive spread turns the finger towards the pinky's side on either hand
            towards_pinky = torch.linalg.cross(normal, d) @ -across
            axes.append(torch.stack([flex, normal * torch.sign(towards_pinky)]))
            names.append(name)
    return torch.stack(axes), names


@dataclass
class HandState:
    prev: Tensor | None = None  # [2, 2, 3] the last frame's forearm and wrist deltas per hand
    weights: Tensor = field(default_factory=lambda: torch.tensor([[1.0, 0, 0, 0]] * 2))
    target: list[str] = field(default_factory=lambda: ["relaxed", "relaxed"])
    since_beat: list[float] = field(default_factory=lambda: [1e9, 1e9])
    beats: list[int] = field(default_factory=lambda: [0, 0])
    fast: list[bool] = field(default_factory=lambda: [False, False])


class HandShaper:
    """Finger rotations [T, 30, 3] (axis-angle deltas in canonical rest axes, `names` order) from
    a chunk of the deformer's arm rotations; `step` carries `HandState` across chunks."""

    def __init__(self, template, shape: Tensor, arm_ids: Tensor, seed: int = 0):
        self.axes, self.names = finger_axes(template, shape)
        self.arm_ids = arm_ids  # [2, 2]: per hand, rows of (lowerarm, wrist) in the bone deltas
        self.seed = seed
        self.order = list(SHAPES)
        self.angles = torch.stack([shape_angles(n) for n in self.order])  # [S, 15, 2]

    def step(self, bones: Tensor, fps: float, state: HandState) -> tuple[Tensor, HandState]:
        if len(bones) == 0:
            return bones.new_zeros(0, len(self.names), 3), state
        arms = bones[:, self.arm_ids].float()  # [T, 2, 2, 3]
        prev = arms[:1] if state.prev is None else state.prev[None]
        speed = (torch.cat([prev, arms]).diff(dim=0).norm(dim=-1).sum(-1) * fps).numpy()  # [T,2]
        rate = 1.0 - math.exp(-1.0 / (fps * TAU_S))
        out = torch.empty(len(arms), 2, len(self.order))
        w = state.weights.clone()
        for t in range(len(arms)):
            for h in range(2):
                state.since_beat[h] += 1.0 / fps
                fast = speed[t, h] > BEAT_SPEED
                if fast and not state.fast[h] and state.since_beat[h] >= MIN_GAP_S:
                    state.target[h] = self._draw(h, state.beats[h])
                    state.beats[h] += 1
                    state.since_beat[h] = 0.0
                state.fast[h] = bool(fast)
                if state.since_beat[h] > HOLD_S:
                    state.target[h] = "relaxed"
                goal = torch.zeros(len(self.order))
                goal[self.order.index(state.target[h])] = 1.0
                w[h] = w[h] + rate * (goal - w[h])
            out[t] = w
        state.weights, state.prev = w, arms[-1]
        return self.rotations(out), state

    def rotations(self, weights: Tensor) -> Tensor:
        """Shape weights [T, 2, S] -> axis-angle [T, 30, 3]."""
        ang = torch.einsum("ths,sfk->thfk", weights, self.angles).flatten(1, 2)  # [T, 30, 2]
        return (ang[..., None] * self.axes[None]).sum(-2)

    def _draw(self, hand: int, beat: int) -> str:
        rng = np.random.default_rng([self.seed, hand, beat])
        names = list(CHOICE)
        return names[rng.choice(len(names), p=np.array([CHOICE[n] for n in names]))]
