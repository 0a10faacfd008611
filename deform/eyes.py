"""Blinks that close over the eye the photo shows open.

The template's blink moves its eyelid down, but the Gaussians in the eye opening keep the
colours the photo gave them (iris, pupil, lashes), and the photo never shows the closed lid:
blinking, they smear dark across the eye. `EyeCover` lists the Gaussians the viewer sees as
the open eye, found by projecting the avatar onto a front render where MediaPipe's face mesh
outlines each eye, with each one's height in the opening (0 at the upper lid, 1 at the lower)
and the colour of the lid skin just above that eye. As the blink weight w rises, the upper lid
sweeps down over them: a Gaussian at height h takes the lid colour with weight
clip((1.2 w - h) / 0.2, 0, 1), so at w = 1 the whole opening is lid skin.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor

from render import Cameras, Gaussians
from render.sh import rgb_to_sh0, sh0_to_rgb

# MediaPipe face-mesh eye outlines, corner to corner along the upper lid, then the lower lid
EYE_OUTLINES = (
    ((33, 246, 161, 160, 159, 158, 157, 173, 133), (33, 7, 163, 144, 145, 153, 154, 155, 133)),
    ((263, 466, 388, 387, 386, 385, 384, 398, 362), (263, 249, 390, 373, 374, 380, 381, 382, 362)),
)
SWEEP = 0.2  # the width of the lid's edge, in opening heights


@dataclass
class EyeCover:
    ids: Tensor  # [n] long, Gaussians in the open eye
    height: Tensor  # [n] 0 at the upper lid .. 1 at the lower
    lid_rgb: Tensor  # [n, 3] the lid colour each takes when covered

    def tensors(self, prefix: str = "eyes.") -> dict[str, Tensor]:
        return {prefix + f.name: getattr(self, f.name).contiguous() for f in fields(self)}

    @staticmethod
    def from_tensors(t: dict[str, Tensor], prefix: str = "eyes.") -> EyeCover:
        return EyeCover(**{f.name: t[prefix + f.name] for f in fields(EyeCover)})

    def paint(self, gaussians: Gaussians, blink: float) -> Gaussians:
        """The Gaussians with the lid drawn over the eye at blink weight `blink`."""
        if blink <= 0 or gaussians.sh is None or not len(self.ids):
            return gaussians
        cover = ((1.2 * blink - self.height) / SWEEP).clamp(0, 1)[:, None]
        sh = gaussians.sh.clone()
        rgb = sh0_to_rgb(sh[self.ids, 0])
        sh[self.ids, 0] = rgb_to_sh0(rgb * (1 - cover) + self.lid_rgb * cover)
        sh[self.ids, 1:] = sh[self.ids, 1:] * (1 - cover[:, None])  # skin has no eye glint
        return gaussians.replace(sh=sh)


def _inside(points: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """[P] bool: points [P, 2] inside a closed polygon [V, 2] (even-odd ray casting)."""
    x, y = points[:, 0:1], points[:, 1:2]
    a, b = polygon, np.roll(polygon, -1, axis=0)
    crosses = (a[:, 1] > y) != (b[:, 1] > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        at = a[:, 0] + (y - a[:, 1]) * (b[:, 0] - a[:, 0]) / (b[:, 1] - a[:, 1])
    return (crosses & (x < at)).sum(1) % 2 == 1


def eye_cover(posed: Gaussians, eye_centres: Tensor, camera: Cameras, image: np.ndarray,
              landmarks: np.ndarray, lids: Tensor | None = None) -> EyeCover:  # fmt: skip
    """The open-eye Gaussians of `posed` (the avatar as rendered into `image` by `camera`),
    from the face mesh `landmarks` [478, 2] of that image; `eye_centres` [2, 3] are the
    template's eyeballs, so only Gaussians on the front of an eye count, not the head behind.
    `lids` [N] bool marks the Gaussians the blink moves (the template's lids): those in front of
    an eye, in its outline or around it, take its lid colour from the blink's start (height 0),
    so where the photo's eye was painted onto the template's lid a few millimetres off, the lid
    does not drag the iris and lashes down the eye as it closes."""
    uv = camera.project(posed.means)[0].numpy()
    near = torch.cdist(posed.means, eye_centres).min(1).values.numpy() < 0.025
    front = (posed.means[:, 2] > eye_centres[:, 2].min()).numpy()  # the body faces +Z
    ids, heights, colours = [], [], []
    if lids is not None:  # each lid Gaussian belongs to the outline nearest it in the image
        centres = [landmarks[list(a + b)].mean(0) for a, b in EYE_OUTLINES]
        nearest = np.stack([np.linalg.norm(uv - c, axis=1) for c in centres]).argmin(0)
        lid_here = lids.numpy() & near & front
    for upper, lower in EYE_OUTLINES:
        top, bottom = landmarks[list(upper)], landmarks[list(lower)]
        outline = np.concatenate([top, bottom[::-1][1:-1]])
        mine = np.nonzero(_inside(uv, outline) & near & front)[0]
        order_t, order_b = np.argsort(top[:, 0]), np.argsort(bottom[:, 0])
        u = uv[mine]
        y_top = np.interp(u[:, 0], top[order_t, 0], top[order_t, 1])
        y_bottom = np.interp(u[:, 0], bottom[order_b, 0], bottom[order_b, 1])
        heights.append(np.clip((u[:, 1] - y_top) / np.maximum(y_bottom - y_top, 1e-3), 0, 1))
        # the lid skin: the image half an opening above the upper lid
        opening = float(np.max(bottom[:, 1]) - np.min(top[:, 1]))
        probe = np.round(top[1:-1] - [0.0, 0.5 * opening]).astype(int)
        probe = np.clip(probe, 0, [image.shape[1] - 1, image.shape[0] - 1])
        lid = np.median(image[probe[:, 1], probe[:, 0]].astype(np.float64) / 255.0, axis=0)
        h = heights[-1]
        if lids is not None:  # this eye's lid Gaussians, in the opening or around it
            on_lid = np.nonzero(lid_here & (nearest == len(ids)))[0]
            h = np.where(np.isin(mine, on_lid), 0.0, h)  # the lid moves as one: covered at once
            extra = np.setdiff1d(on_lid, mine)
            mine, h = np.concatenate([mine, extra]), np.concatenate([h, np.zeros(len(extra))])
            heights[-1] = h
        colours.append(np.repeat(lid[None], len(mine), axis=0))
        ids.append(mine)
    return EyeCover(
        torch.from_numpy(np.concatenate(ids)).long(),
        torch.from_numpy(np.concatenate(heights)).float(),
        torch.from_numpy(np.concatenate(colours)).float(),
    )
