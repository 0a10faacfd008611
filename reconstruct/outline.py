"""The face's outline: the template's cheeks and jaw moved out or in to where the photo has them.

The fit places the template's eyes, nose and mouth on the photo's, and its phenotype sets the
face's width with the body's: nothing fits the face's outline. The template's cheeks measured
0.74-0.77 of the demo's, 0.83-0.90 of the woman's, and 1.33 of the sweater's on one side. The
Gaussians bound to it read the photo where the template reaches, so a wider face's cheeks were
drawn on a flat fin at the template's outline (the far cheek seen from 30°: a flat plate), and a
narrower face painted its hair or the room onto the template's cheeks.

Here, at the row of each point of MediaPipe's face oval from the mouth's corners to the eyes,
the template's outline there in the photo (the outermost crossing of its mesh's edges with that
row in front of the ears, on that point's side) is compared with the point, as distances from
the template's midline. Their ratio, a function of the canonical height on each side, moves the
head's canonical Gaussians outward or inward beyond the eyes and the mouth corners (`INNER`:
the fit has placed those), the ears and the back of the head with them, fading out below the
mouth and toward the crown; each Gaussian's shape is stretched with the space around it. This
happens before the reconstructor reads the photo at the Gaussians.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from deform.templates import BodyTemplate
from render import Cameras, Gaussians
from render.rotations import quat_to_rotmat, rotmat_to_quat

# MediaPipe face mesh's oval, forehead to chin, down each side of the image
OVAL_SIDES = ((10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378,
               400, 377, 152),
              (10, 109, 67, 103, 54, 21, 162, 127, 234, 93, 132, 58, 172, 136, 150, 149, 176,
               148, 152))  # fmt: skip
BEFORE_EARS = 0.03  # metres in front of the head's joint: the cheek's outline, not the ear's
INNER = 0.5  # of the outline's half-width, from the midline, stays where the fit put it: the
# eyes and the mouth's corners
FADE = 0.04  # metres below the lowest point (the neck) and up to the crown over which it fades
REACH = 0.14  # metres from the midline at which it has faded out (a head is narrower)
RATIO_RANGE = (0.75, 1.4)


@dataclass(frozen=True)
class Outline:
    """Per side (0: +x, the person's left; 1: -x), points of the outline [P, 3] ascending in
    canonical height: (height, the photo's distance from the midline over the template's, the
    template's half-width there in metres)."""

    sides: tuple[Tensor, Tensor]
    crown: float  # the top of the head, canonical height


def measure_outline(template: BodyTemplate, shape: Tensor, posed_vertices: Tensor, cam: Cameras,
                    face_px: np.ndarray) -> Outline | None:  # fmt: skip
    """The template (rest shape `shape`, posed `posed_vertices` [V, 3] seen by `cam`) against the
    photo's face mesh (`face_px` [478, 2] in the camera's pixels): at each row of an oval point
    from the mouth's corners to the eyes, the template's outermost point on that side. None when
    a side has no such point (a face turned too far for its oval to be its outline)."""
    with torch.no_grad():
        rest = template(shape[None].float())
    v, joints = rest.rest_vertices[0], rest.joints[0]
    lm = template.face_landmarks
    if "mouth_left" not in lm or "left_eye" not in lm:
        return None
    head = template.part_masks()["head"]
    front = head & (v[:, 2] > joints[template.bone_names.index("head"), 2] + BEFORE_EARS)
    eye_y = float(template.landmarks(rest, {"eye": lm["left_eye"]})[0, 0, 1])
    # the cheeks, from the mouth's corners up: the fit does not place the chin, and where the
    # template's is longer (the man's by a seventh of his face) its jaw at the photo's chin rows
    # read as a jaw a quarter too wide
    low = float(v[lm["mouth_left"].index, 1])
    tri = template.faces[front[template.faces].all(-1)]
    edges = torch.cat([tri[:, [0, 1]], tri[:, [1, 2]], tri[:, [2, 0]]]).numpy()  # [E, 2]
    uv = cam.project(posed_vertices)[0].numpy()
    vn = v.numpy()
    middle = torch.nonzero(front & (v[:, 0].abs() < 0.005)).flatten().numpy()
    if len(middle) < 2:
        return None
    order = np.argsort(uv[middle, 1])
    mid_rows, mid_x = uv[middle[order], 1], uv[middle[order], 0]
    ya, yb = uv[edges[:, 0], 1], uv[edges[:, 1], 1]
    sides: list[list[tuple[float, float, float]]] = [[], []]
    for point in face_px[[i for side in OVAL_SIDES for i in side[1:-1]]]:
        crossing = (ya - point[1]) * (yb - point[1]) <= 0  # the mesh's edges across this row
        e = edges[crossing]
        t = ((point[1] - ya[crossing]) / np.where(yb == ya, 1, yb - ya)[crossing])[:, None]
        at_u = uv[e[:, 0], 0] + t[:, 0] * (uv[e[:, 1], 0] - uv[e[:, 0], 0])
        at_v = vn[e[:, 0]] + t * (vn[e[:, 1]] - vn[e[:, 0]])  # canonical, where they cross
        c = float(np.interp(point[1], mid_rows, mid_x))  # the template's midline at this row
        out = (at_u - c) * (point[0] - c) > 0  # on the point's side
        if not out.any():
            continue
        j = np.flatnonzero(out)[np.argmax(np.abs(at_u[out] - c))]
        if abs(at_u[j] - c) < 1.0 or not low < at_v[j, 1] < eye_y:
            continue
        side = int(at_v[j, 0] < 0)
        sides[side].append((float(at_v[j, 1]), (point[0] - c) / (at_u[j] - c), abs(at_v[j, 0])))
    if not all(sides):
        return None
    points = []
    for found in sides:
        p = torch.tensor(sorted(found), dtype=torch.float32)
        r = torch.cat([p[:1, 1], p[:, 1], p[-1:, 1]])
        p[:, 1] = r.unfold(0, 3, 1).median(-1).values.clamp(*RATIO_RANGE)  # with its neighbours
        points.append(p)
    return Outline((points[0], points[1]), float(v[head, 1].max()))


def fit_outline(g: Gaussians, outline: Outline) -> Gaussians:
    """Canonical Gaussians `g` moved sideways (x) by the outline's ratios: beyond `INNER` the
    distance from the midline is stretched so that the template's outline at each measured
    height lands on the photo's; the stretch fades to none over `FADE` below the lowest point
    and from the highest to the crown. Shapes go with it (the covariance under the same map's
    Jacobian)."""
    x, y = g.means[:, 0], g.means[:, 1]
    left = x >= 0
    ratio, width = torch.empty_like(x), torch.empty_like(x)
    for mask, p in zip((left, ~left), outline.sides, strict=True):  # held beyond the ends
        at, p = y[mask].cpu().numpy(), p.numpy()
        ratio[mask] = torch.from_numpy(np.interp(at, p[:, 0], p[:, 1])).to(x)
        width[mask] = torch.from_numpy(np.interp(at, p[:, 0], p[:, 2])).to(x)
    low = min(float(p[0, 0]) for p in outline.sides)
    high = max(float(p[-1, 0]) for p in outline.sides)
    fade = torch.minimum(((y - (low - FADE)) / FADE).clamp(0, 1),
                         ((outline.crown - y) / (outline.crown - high)).clamp(0, 1))  # fmt: skip
    fade = fade * ((REACH - x.abs()) / FADE).clamp(0, 1)  # not the shoulders beside the neck
    # the outline at `width` goes to `ratio` x width, `inner` stays: slope k beyond it
    inner = INNER * width
    k = 1 + fade * ((ratio * width - inner) / (width - inner) - 1)
    beyond = (x.abs() > inner) & (fade > 0)
    moved = torch.where(beyond, x.sign() * (inner + (x.abs() - inner) * k), x)
    means = g.means.clone()
    means[:, 0] = moved
    stretch = beyond & ((k - 1).abs() > 1e-4)
    if not stretch.any():
        return g.replace(means=means)
    rot = quat_to_rotmat(g.quats[stretch])
    s = g.log_scales[stretch].exp()
    cov = rot @ torch.diag_embed(s**2) @ rot.transpose(1, 2)
    jac = torch.eye(3).repeat(int(stretch.sum()), 1, 1)
    jac[:, 0, 0] = k[stretch]
    vals, vecs = torch.linalg.eigh(jac @ cov @ jac.transpose(1, 2))  # ascending
    vals, vecs = vals.flip(-1), vecs.flip(-1)  # the smallest last: the disc's normal
    vecs = vecs * torch.linalg.det(vecs).sign()[:, None, None]  # a rotation
    # the normal keeps its side: toward the same half-space as before
    flip = ((vecs[..., 2] * rot[..., 2]).sum(-1) < 0)[:, None, None]
    vecs = torch.where(flip, vecs * vecs.new_tensor([-1.0, 1.0, -1.0]), vecs)
    quats, log_scales = g.quats.clone(), g.log_scales.clone()
    quats[stretch] = rotmat_to_quat(vecs)
    log_scales[stretch] = 0.5 * vals.clamp_min(1e-12).log()
    return g.replace(means=means, quats=quats, log_scales=log_scales)
