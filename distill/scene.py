"""What distillation trains on: one avatar's speech rig, its speech clips, cameras and keypoints.

`DistillScene` is plain data plus the two things every teacher and loss needs from it: the
avatar posed by a window of template controls (`pose_controls`, the procedural teacher) and its
keypoints, which are Gaussians bound to the body and projected into the camera (`keypoints`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from deform.controls import (
    BLINK_ACTIONS,
    PARTICLE_ACTIONS,
    Controls,
    action_index,
)
from deform.rig import FRAMINGS, SpeechRig
from reconstruct.canonical import PART_CODES
from render import Cameras, Gaussians, fit_to_points, rasterize

FACE_PARTS = ("lips", "face", "eyelids")


@dataclass
class SpeechClip:
    samples: np.ndarray  # [S] 16 kHz mono
    transcript: str  # "" when unknown
    num_frames: int
    name: str = ""


@dataclass
class Window:
    """A training window: frames start..start+num-1 of one clip, seen by one camera."""

    clip: int
    start: int
    num: int
    camera: Cameras  # 1 camera
    view: int = 0  # its index in the scene's cameras


def farthest_points(points: Tensor, num: int, first: int = 0) -> Tensor:  # [P, 3] -> [num]
    """Farthest-point sampling, deterministic from `first`."""
    num = min(num, len(points))
    picked = [first]
    dist = (points - points[first]).norm(dim=-1)
    for _ in range(num - 1):
        i = int(dist.argmax())
        picked.append(i)
        dist = torch.minimum(dist, (points - points[i]).norm(dim=-1))
    return torch.tensor(picked)


def keypoint_gaussians(rig: SpeechRig, parts: Tensor, face: int = 48, hand: int = 16):
    """Dense keypoints as Gaussian ids [P] and a hand mask [P]: face keypoints spread over the
    skin that the mouth, eye and brow actions move (mostly lips and jaw), hand keypoints spread
    over each hand."""
    t = rig.template
    mouth = action_index(t, ("jawOpen",) + PARTICLE_ACTIONS)
    upper = action_index(t, BLINK_ACTIONS + ("browInnerUp",))
    codes = torch.tensor([PART_CODES[p] for p in FACE_PARTS])
    on_face = torch.isin(parts[rig.moving].long(), codes)
    ids, is_hand = [], []
    for acts, n in ((mouth, 2 * face // 3), (upper, face - 2 * face // 3)):
        disp = rig.basis[acts].norm(dim=-1).amax(0) * on_face  # [n_moving]
        cand = torch.nonzero(disp > 0.25 * disp.max()).flatten()
        pick = cand[
            farthest_points(rig.gaussians.means[rig.moving[cand]], n, int(disp[cand].argmax()))
        ]
        ids.append(rig.moving[pick])
        is_hand.append(torch.zeros(len(pick), dtype=torch.bool))
    for side in ("hand_left", "hand_right"):
        cand = torch.nonzero(parts.long() == PART_CODES[side]).flatten()
        if len(cand):
            ids.append(cand[farthest_points(rig.gaussians.means[cand], hand)])
            is_hand.append(torch.ones(len(ids[-1]), dtype=torch.bool))
    return torch.cat(ids), torch.cat(is_hand)


def training_cameras(rig: SpeechRig, size: int) -> list[Cameras]:
    """Face close-ups from the front and ±20°, and the upper body from the front."""
    with torch.no_grad():
        face, upper = rig.framing_points("face"), rig.framing_points("upper")
    views = [(face, y, "face") for y in (0.0, -20.0, 20.0)] + [(upper, 0.0, "upper")]
    return [fit_to_points(pts, size, size, torch.tensor([y], dtype=torch.float64), 0.0, 30.0,
                          FRAMINGS[framing]) for pts, y, framing in views]  # fmt: skip


@dataclass
class DistillScene:
    rig: SpeechRig  # the avatar, posed from its photo pose without the root; `rig.parts`
    clips: list[SpeechClip]
    cameras: list[Cameras]  # candidate training cameras (1 camera each, same size)
    fps: float = 25.0

    def __post_init__(self):
        self.keypoint_ids, self.keypoint_hand = keypoint_gaussians(self.rig, self.rig.parts)

    @property
    def size(self) -> tuple[int, int]:
        return self.cameras[0].width, self.cameras[0].height

    def sample_window(self, rng: np.random.Generator, num: int, aligned: bool = False) -> Window:
        """A random clip, camera and first frame (`aligned`: a multiple of the window length)."""
        c = int(rng.integers(len(self.clips)))
        n = min(num, self.clips[c].num_frames)
        start = int(rng.integers(0, self.clips[c].num_frames - n + 1))
        if aligned:
            start = start // n * n
        v = int(rng.integers(len(self.cameras)))
        return Window(c, start, n, self.cameras[v], v)

    def pose_controls(self, controls: Controls) -> list[Gaussians]:
        """The avatar posed by template controls alone (no particles, no residuals)."""
        transforms = self.rig.transforms(controls.bones)
        return [self.rig.pose(controls.actions[i], transforms[i]) for i in range(len(controls))]

    def render(self, posed: list[Gaussians], camera: Cameras) -> Tensor:  # -> [T, H, W, 3]
        bg = torch.ones(3)
        return torch.stack([rasterize(g, camera, background=bg).rgb[0, ..., :3] for g in posed])

    def keypoints(self, posed: list[Gaussians], camera: Cameras, ids: Tensor | None = None):
        """[T, P, 2] pixels: the keypoint Gaussians (or `ids`) projected into the camera."""
        ids = self.keypoint_ids if ids is None else ids
        return torch.stack([camera.project(g.means[ids])[0] for g in posed])
