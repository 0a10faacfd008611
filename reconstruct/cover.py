"""The head's shell, seen from around it.

One photo judges the surface it faces. The crown it sees edge-on at its outline, and the
refinement thinned it there to fit the mask; the head being a shell, the inside of the face then
showed through the holes from above: skin and dark flecks in the man's hair (crown alone from
above, share letting more than 10% through: 1% after the network's pass, 9% after
personalisation, 20% after refinement). Nor does the photo judge the layers of what it faces: a
translucent face over the head's inside fits it as well as an opaque one, and turned 30° the
inside shows through the cheek (identity at yaw 30, three seeds, six photos: 15 of 18 creates
scored higher with the views near the photo's asked to cover too; in the mean 0.60 → 0.64).
`HeadCover` renders the head's Gaussians that face each of the cameras around and above it
(every 45° of yaw, level and from 45° above) and asks that they cover what the start's, made
solid, covered there:

    L_cover = mean over views v of  Σ_px relu(S_v - α_v)² / Σ_px S_v

S_v: the start's Gaussians facing camera v at full opacity and 1.5 × their size, eroded by
COVER_ERODE_PX (the outline stays free). It only ever asks for more cover: what the photo sees
still fits the photo. Each call renders COVER_PER_STEP of the views, the next ones in turn.
The refinement takes it, the decoder's personalisation does not: one network for every
Gaussian, it answered by growing them all (held-out synthetic subjects, `avatar bench unseen`,
LPIPS at 90° 0.0373 → 0.0425).

The refinement asks it twice: of the head's Gaussians, and of the face's own (skin, lips, lids)
alone. The photo sees the cheek's side edge-on, where its pixels mix cheek, ear and hair, and
thinning or shrinking the face's Gaussians there fits them: holes in the face's layer, which
the first term does not see, the head's inside behind them covering its views. From the side
the holes were dark cracks between cheek and ear (the face's layer alone at 45°: slits all
over its side).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from render import Gaussians, fit_to_points, rasterize
from render.rotations import quat_to_rotmat

from .canonical import PART_CODES, Binding
from .hair import near_head_axis

COVER_YAWS = tuple(range(0, 360, 45))  # degrees, about the world's up
COVER_ELEVATIONS = (0.0, 45.0)  # level, and from above (the crown)
COVER_RES = 96  # pixels: a head of ~25 cm, a hole of a few millimetres shows
COVER_PER_STEP = 4  # views rendered per call, in turn (4 renders of ~10k Gaussians: ~25 ms)
COVER_ERODE_PX = 2
FACING = 0.2  # cosine between a Gaussian's normal and the way to the camera, at least
SOLID_GROW = 0.4  # log-scale added to the start's Gaussians for its silhouettes (x 1.5)


def head_gaussians(canonical: Gaussians, binding: Binding) -> Tensor:
    """[N] bool: the head's Gaussians, face and scalp: above the chin (2 cm of slack) and
    `near_head_axis`, in canonical space (none without a face part)."""
    face = canonical.means[binding.parts == PART_CODES["face"]]
    if len(face) == 0:
        return torch.zeros(len(canonical), dtype=torch.bool)
    m = canonical.means
    return near_head_axis(m, face) & (m[:, 1] > face[:, 1].min() - 0.02)


class HeadCover:
    """L_cover of the module docstring for posed Gaussians whose head (or a layer of it: the
    face's) is `head` [N], the start being `start` (posed, all N): the cameras, which Gaussians
    face each, and the silhouettes S_v are fixed here."""

    def __init__(self, start: Gaussians, head: Tensor) -> None:
        from .refine import shrink  # (refine builds its objective with this)

        self.head = head
        with torch.no_grad():
            posed = start[head]
            normal = quat_to_rotmat(posed.quats)[:, :, 2]
            solid = posed.replace(opacity_logits=torch.full_like(posed.opacity_logits, 8.0),
                                  log_scales=posed.log_scales + SOLID_GROW)  # fmt: skip
            yaws = torch.tensor(COVER_YAWS, dtype=torch.float64)
            self.cameras, self.facing, self.targets = [], [], []
            for elevation in COVER_ELEVATIONS:
                cams = fit_to_points(posed.means, COVER_RES, COVER_RES, yaws, elevation, 30.0, 0.8)
                for i in range(len(cams)):
                    towards = F.normalize(cams.centers[i].to(posed.means) - posed.means, dim=-1)
                    facing = (normal * towards).sum(-1) > FACING
                    inside = rasterize(solid[facing], cams[i]).alpha[0, ..., 0] > 0.5
                    inner = shrink(inside.numpy().astype(np.uint8), COVER_ERODE_PX)
                    self.cameras.append(cams[i])
                    self.facing.append(facing)
                    self.targets.append(torch.from_numpy(inner).float())
        self._next = 0

    def __len__(self) -> int:
        return len(self.cameras)

    def __call__(self, posed: Gaussians, views=None) -> Tensor:
        """L_cover over `views` (indices; default: the next COVER_PER_STEP in turn) for posed
        Gaussians `posed` (all N)."""
        if views is None:
            views = [(self._next + k) % len(self) for k in range(COVER_PER_STEP)]
            self._next = (self._next + COVER_PER_STEP) % len(self)
        head = posed[self.head]
        terms = []
        for v in views:
            alpha = rasterize(head[self.facing[v]], self.cameras[v]).alpha[0, ..., 0]
            target = self.targets[v]
            terms.append((F.relu(target - alpha) ** 2).sum() / target.sum().clamp(min=1))
        return torch.stack(terms).mean()
