"""The hair, for the colours of what the photo does not show (`reconstruct.complete`): where
hair usually is on the template's head (`hair_region`, split by `hair_regions` into the crown and
the hair below it), what the photo shows of it (`Hair`: the crown's colour, a hat's under a hat,
and hair hanging beside the face, its colour and length: `hair_from_photo`), and telling hair
from skin by colour (`skin_like`, `shaded_skin`): ears and a neck in shade beside the face are
not hair, and a collar is not skin.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from render import Gaussians
from render.rotations import quat_to_rotmat

from .canonical import PART_CODES, Binding, face_parts

HEAD_RADIUS = 0.16  # metres from the face's vertical axis, canonical: the head and its hair
SKIN_CHROMA = 0.03  # chromaticity distance to the face's skin below which a colour is skin
HAIR_NEAR = 0.15  # RGB distance to the hanging hair's colour below which a pixel is that hair


def near_head_axis(means: Tensor, face: Tensor) -> Tensor:
    """[N] bool: `means` [N, 3] within HEAD_RADIUS of the vertical axis through the face's
    Gaussians `face` [F, 3] (canonical): the head and its hair, at any height."""
    return (means[:, :2] - face[:, :2].mean(0)).norm(dim=-1) < HEAD_RADIUS


def hair_region(canonical: Gaussians, binding: Binding, facing_front: bool = False) -> Tensor:
    """[N] bool: Gaussians where hair usually is: on the head above the eyes (or anywhere on
    its back half above the mouth), facing away from the front; never the face itself. With
    `facing_front`: the front of the scalp instead, above the eyes (what a front photo shows
    of the hair)."""
    normal = quat_to_rotmat(canonical.quats)[:, :, 2]
    face = canonical.means[binding.parts == PART_CODES["face"]]
    if len(face) == 0:
        return torch.zeros(len(canonical), dtype=torch.bool)
    chin, top = face[:, 1].min(), face[:, 1].max()
    y = canonical.means[:, 1]
    near = near_head_axis(canonical.means, face)
    above_eyes = y > chin + 0.55 * (top - chin)
    scalp = near & (binding.parts == 0)
    if facing_front:
        return scalp & above_eyes & (normal[:, 2] > 0)
    on_head = y > chin + 0.35 * (top - chin)  # (down to the chin: worse on held-out subjects)
    back = normal[:, 2] < -0.2
    sides_or_top = (normal[:, 2] < 0.3) & above_eyes
    return scalp & on_head & (back | sides_or_top | (normal[:, 1] > 0.6))


@dataclass
class Hair:
    """What the photo shows of the hair: `crown` [3] the colour of the top of the head (a hat's
    under a hat, skin on a bald head); `hanging` [3] the colour of the hair beside the face below
    the eyes (None: the photo shows skin or nothing there), and `below_chin` how far below the
    chin that hair hangs, in face heights (0: no lower than the chin)."""

    crown: Tensor
    hanging: Tensor | None = None
    below_chin: float = 0.0


def skin_like(rgb: Tensor, skin: Tensor) -> Tensor:
    """[...] bool: colours `rgb` [..., 3] with the chromaticity of `skin` [3] (r, g, b over
    their sum within SKIN_CHROMA) and a brightness between 0.35 and 1.6 times its own: skin in
    light or shade, not a shirt as bright as it or dark hair."""
    total, skin_total = rgb.sum(-1, keepdim=True), skin.sum()
    off = (rgb / total.clamp_min(1e-6) - skin / skin_total.clamp_min(1e-6)).norm(dim=-1)
    ratio = total[..., 0] / skin_total.clamp_min(1e-6)
    return (off < SKIN_CHROMA) & (ratio > 0.35) & (ratio < 1.6)


def _hue_saturation(rgb: Tensor) -> tuple[Tensor, Tensor]:
    """HSV hue (degrees) and saturation of `rgb` [..., 3]."""
    hi, lo = rgb.max(-1).values, rgb.min(-1).values
    span = (hi - lo).clamp_min(1e-6)
    r, g, b = rgb.unbind(-1)
    hue = torch.where(
        hi == r, ((g - b) / span) % 6, torch.where(hi == g, (b - r) / span + 2, (r - g) / span + 4)
    )
    return hue * 60, (hi - lo) / hi.clamp_min(1e-6)


def shaded_skin(rgb: Tensor, skin: Tensor) -> Tensor:
    """[...] bool: `rgb` [..., 3] could be `skin` [3] in light or shade: its hue within 15°, a
    saturation of at least 0.8 of the skin's or 0.25 (shade saturates skin; grey or white hair is
    paler) and 0.35-1.3 of its brightness (dark hair is darker). Ears and neck beside the face,
    not the hair; in doubt, skin (the hair then takes the crown's colour, as it did before)."""
    hue, sat = _hue_saturation(rgb)
    skin_hue, skin_sat = _hue_saturation(skin)
    turn = (hue - skin_hue).abs()
    ratio = rgb.sum(-1) / skin.sum().clamp_min(1e-6)
    hued = (torch.minimum(turn, 360 - turn) < 15) & (sat >= torch.clamp(0.8 * skin_sat, max=0.25))
    return hued & (ratio > 0.35) & (ratio < 1.3)


def hair_from_photo(image: Tensor, mask: Tensor, face_uv: np.ndarray | None) -> Hair | None:
    """The photo's `Hair` from the face's landmarks `face_uv` [P, 2] (image pixels): the crown
    above the face, and the person's non-skin pixels in bands beside the face (0.4 of its width
    each side, found on both sides) from the eyes down, that colour beside the temples too;
    below the chin, the rows where those bands still hold it give the hair's length. None when
    the photo cuts the head off."""
    import cv2

    crown = hair_colour(image, mask, face_uv)
    if crown is None:
        return None
    h, w = mask.shape
    lo, hi = face_uv.min(0), face_uv.max(0)
    fw, fh = hi - lo
    hull = np.zeros((h, w), np.uint8)
    cv2.fillConvexPoly(hull, cv2.convexHull(face_uv.astype(np.int32)), 1)
    person = torch.from_numpy((mask.numpy() > 0.5) & (hull == 0))
    left, right = torch.zeros(w, dtype=torch.bool), torch.zeros(w, dtype=torch.bool)
    left[int(max(0, lo[0] - 0.4 * fw)) : int(max(0, lo[0] - 0.02 * fw))] = True
    right[int(min(w, hi[0] + 0.02 * fw)) : int(min(w, hi[0] + 0.4 * fw))] = True
    cols = left | right
    eyes, chin = int(lo[1] + 0.45 * fh), int(hi[1])
    rows = slice(int(lo[1] + 0.55 * fh), int(lo[1] + 0.75 * fh))  # below glasses, beside the nose
    cheeks = torch.cat([image[rows, int(lo[0] + a * fw) : int(lo[0] + b * fw)].reshape(-1, 3)
                        for a, b in ((0.15, 0.35), (0.65, 0.85))])  # fmt: skip
    if len(cheeks) == 0:
        return Hair(crown)
    skin = cheeks.median(0).values
    hue, sat = _hue_saturation(skin)
    if not (skin.mean() > 0.15 and 0.08 < sat < 0.75 and (hue < 50 or hue > 340)):
        return Hair(crown)  # the cheeks are not skin (a face mask, paint): nothing to tell hair by
    band = person & cols[None, :]
    beside = image[eyes:chin][band[eyes:chin]]
    if len(beside) < 10:
        return Hair(crown)
    # two colours beside the face: the skin of ears and neck (lit or shaded), and the hair,
    # which hangs on both sides (a raised hand or a scarf beside the face is on one), down
    # from the temples: it is there above the eyes too (a shirt's shoulders can reach up beside
    # the eyes of a head held low, not above them: a footballer's red jersey and a white
    # T-shirt read as hair hanging to the chin)
    centres, labels = _two_means(beside)
    k = int((centres - skin).norm(dim=-1).argmax())
    side = left[None, :].expand_as(band)[eyes:chin][band[eyes:chin]]
    both = all((labels[s] == k).sum() >= max(5, 0.15 * s.sum()) for s in (side, ~side))
    temple_rows = slice(int(lo[1] + 0.2 * fh), eyes)
    temples = band[temple_rows]
    near = (image[temple_rows] - centres[k]).norm(dim=-1) < HAIR_NEAR
    for s in (left, right):
        there = temples & s[None, :]
        both &= bool((near & there).sum() >= max(3, 0.15 * there.sum()))
    if shaded_skin(centres[k], skin) or not both:
        return Hair(crown)
    hanging = beside[labels == k].median(0).values
    last, gap = 0, 0
    for r in range(chin, min(h, chin + int(2 * fh))):  # hair down to 2 face heights below the chin
        inside = band[r]
        hairy = inside & ((image[r] - hanging).norm(dim=-1) < HAIR_NEAR)
        if inside.sum() >= 2 and hairy.sum() >= 0.3 * inside.sum():
            last, gap = r - chin + 1, 0
        else:
            gap += 1
            if gap > 0.2 * fh:
                break
    return Hair(crown, hanging, last / fh)


def _two_means(x: Tensor, steps: int = 10) -> tuple[Tensor, Tensor]:
    """k-means with k = 2 of colours `x` [M, 3], from the darkest and the brightest: the
    centres [2, 3] and each colour's label [M]."""
    total = x.sum(-1)
    centres = torch.stack([x[total.argmin()], x[total.argmax()]])
    for _ in range(steps):
        labels = torch.cdist(x, centres).argmin(1)
        centres = torch.stack(
            [x[labels == k].mean(0) if (labels == k).any() else centres[k] for k in range(2)]
        )
    return centres, labels


def hair_regions(canonical: Gaussians, binding: Binding, hair: Hair) -> tuple[Tensor, Tensor]:
    """[N] bool twice, splitting `hair_region`: the crown (above the eyes: a hat, or the top of
    the hair) and the hair below it at the back of the head; where the photo shows `hair`
    hanging beside the face, also the sides of the head below the eyes, the face's own sides
    (temples and ears; hanging below the chin, the jaw's back too: they were skin, a bald cheek
    seen from the side) and, for hair hanging below the chin, the back and sides of the neck and
    the torso behind the head (a band as wide as the head) down to its length: long hair hides
    the neck's sides from behind and from the side, where they were the neck's skin between hair
    and collar."""
    region = hair_region(canonical, binding)
    face = canonical.means[binding.parts == PART_CODES["face"]]
    if len(face) == 0:
        return region, region
    chin, top = face[:, 1].min(), face[:, 1].max()
    x, y, z = canonical.means.unbind(-1)
    crown = region & (y > chin + 0.55 * (top - chin))
    hanging = region & ~crown
    if hair.hanging is not None:
        normal = quat_to_rotmat(canonical.quats)[:, :, 2]
        body = binding.parts == 0
        near = near_head_axis(canonical.means, face)
        nape = chin + 0.35 * (top - chin)
        sideways = near & (normal[:, 2] < 0.3)
        hanging |= sideways & body & (y > nape) & ~crown  # beside the face
        # and over the face's sides (temples, ears, the jaw's back when it hangs below the chin)
        hanging |= sideways & face_parts(binding) & (y > (chin if hair.below_chin > 0 else nape))
        if hair.below_chin > 0:
            behind = (normal[:, 2] < 0.3) & (z < face[:, 2].mean()) & body  # back and sides
            wide = (x - face[:, 0].mean()).abs() < 0.6 * (top - chin)
            hanging |= behind & wide & (y > chin - hair.below_chin * (top - chin)) & (y < nape)
    return crown, hanging


def hair_colour(image: Tensor, mask: Tensor, face_uv: np.ndarray | None) -> Tensor | None:
    """The median colour of the crown: the person's pixels from the top of the head down a
    quarter of the face's height, above the face's middle (face landmarks `face_uv` [P, 2] in
    image pixels) and outside the face's own outline. A hat's colour under a hat, skin on a bald
    head; None when the photo cuts the head off."""
    import cv2

    if face_uv is None or len(face_uv) < 3:
        return None
    h, w = mask.shape
    lo, hi = face_uv.min(0), face_uv.max(0)
    fw, fh = hi - lo
    x0, x1 = int(max(0, lo[0] + 0.2 * fw)), int(min(w, hi[0] - 0.2 * fw + 1))
    person = cv2.erode((mask.numpy() > 0.5).astype(np.uint8), np.ones((3, 3), np.uint8))
    rows = np.nonzero(person[:, x0:x1].any(1))[0] if x1 > x0 else []
    if len(rows) == 0 or rows[0] >= lo[1]:
        return None
    y0 = int(rows[0])
    y1 = int(min(lo[1], y0 + max(3.0, 0.25 * fh)))
    face = np.zeros((h, w), np.uint8)
    cv2.fillConvexPoly(face, cv2.convexHull(face_uv.astype(np.int32)), 1)
    sel = torch.from_numpy((person * (1 - face))[y0:y1, x0:x1].astype(bool))
    pixels = image[y0:y1, x0:x1][sel]
    if len(pixels) < 5:
        return None
    return pixels.median(0).values


def scalp_colour(canonical: Gaussians, binding: Binding, photo_rgb: Tensor,
                 well: Tensor) -> Tensor | None:  # fmt: skip
    """The median photo colour of the head's hair region where the photo sees it well (`well`
    [N], the crown and temples seen from the front): hair, a hat or a bald scalp; None when too
    little of it is seen."""
    scalp = well & hair_region(canonical, binding, facing_front=True)
    if scalp.sum() < 20:
        return None
    return photo_rgb[scalp].median(0).values
