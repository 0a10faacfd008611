"""Colours for what the photo does not show, completed from parts that are like it.

A Gaussian the photo sees well (facing its camera, not hidden, not edge-on) takes the pixel it
projects to. Every other one must not: seen from the photo's camera, the back of the head
projects onto the face and the back of a shirt onto its printed front, and a Gaussian seen
edge-on at the outline reads a pixel smeared along it (streaks from the side). Instead:

- **hair** (`reconstruct.hair`): the back, sides and top of the head take the hair colour, the
  median of the crown's pixels in the photo (under a hat, the hat's colour; on a bald head,
  skin); hair the photo shows hanging beside the face takes its own colour there, over the
  face's sides too;
- **same part**: any other Gaussian takes the median colour of the nearest well-seen Gaussians
  of its own body segment (upper arm, lower leg, torso, ...) on that segment's rim (its sides
  as the photo shows them, turned 41-72° from the camera), neighbours at the same height
  first: clothing continues around from the nearest visible region of the same part, and the
  print on a shirt's front does not; the back of the torso is its garment as the torso's sides
  show it: the middle of the front (a neckline, the shirt and tie in a jacket's opening) and
  skin are not continued around the back (a skin-coloured back under a hairline reads as a
  face from behind); the back of the neck is its skin as its sides show it, not the collar or
  background they mix with;
- **its mirror image**: a point of the face, head, neck or torso whose mirror image (x → -x)
  the photo sees well takes its colour: a cheek turned away from the camera looks like the one
  it shows, in its own side's light (the ratio between the two sides where the photo sees
  both, per channel for the face's skin, which shade saturates: a face lit from one side does
  not copy its lit cheek onto the shaded one); so does a point of the face the photo sees at a
  graze (turned more than 60° from it) whose mirror image it sees nearly face-on (`grazed_face`):
  the far cheek of a turned head is a few smeared pixels in the photo, the near one the same
  skin, sharp;
- **mirrored**: a segment the photo hardly sees (an arm behind the back) copies its mirror image
  (x → -x, left ↔ right) where that one is seen;
- **up the body**: failing both, the segment it hangs from (a hidden shin from the thigh, then
  the torso: a portrait's legs continue its clothes), and hidden hands take the face's skin; a
  hidden forearm takes its upper arm's and its hand's colours, whichever are nearer (a gesture
  toward the camera hides the forearm behind its hand: skin from the wrist, sleeve from above).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from deform.templates import BodyTemplate
from render import Cameras, Gaussians
from render.rotations import quat_to_rotmat

from .canonical import PART_CODES, Binding, face_parts
from .hair import Hair, hair_from_photo, hair_regions, scalp_colour, shaded_skin, skin_like

WELL_SEEN = -0.3  # cosine between a Gaussian's normal and the viewing ray, at most
RIM = -0.75  # well seen, but turned at least 41° from the camera: the sides the photo shows
GRAZED = -0.5  # a face Gaussian turned more than 60° from the camera is seen at a graze ...
FACE_ON = -0.7  # ... and its mirror image, turned less than 45°, nearly face-on
MIN_SEEN = 0.05  # fraction of a segment that must be well seen for it to colour itself
HEIGHT_WEIGHT = 2.0  # neighbours at the same height count first: a collar stays at the neck
NEAR = 0.03  # metres
FACE_HIDDEN = 0.01  # metres behind the photo's surface past which the face's skin is hidden
MOUTH_LINING = 0.01  # metres from the lips within which the face's skin lines the mouth
MIRROR_NEAR = 0.015  # metres: how far a mirror image may be from a well-seen Gaussian
LIGHT_RATIO = 2.0  # the most a mirrored colour is brightened or darkened to its side's light
K_PAIRS = 32  # mirror pairs whose median ratio is the light's difference between two sides
DARK = 0.05  # added to brightness before a ratio of it: dark colours' ratios are noise
K_NEAREST = 96  # many, and their median: the dominant colour nearby, not a collar or a print
HAND_REACH = 0.2  # a hand's outline: the hull of its landmarks grown by this much of its size
HAND_NEAR = 0.15  # RGB distance to a hand's own colour below which a pixel may be that hand
HAND_MIN_PX = 40  # landmark extent below which a hand's pixels mix with what is around it


def facing(posed: Gaussians, cam: Cameras) -> Tensor:
    """[N] cosine between each Gaussian's normal and its viewing ray (-1: faces the camera)."""
    view = cam.viewmats[0]
    p = posed.means @ view[:3, :3].T + view[:3, 3]
    normal = quat_to_rotmat(posed.quats)[:, :, 2] @ view[:3, :3].T
    return (normal * F.normalize(p, dim=-1)).sum(-1)


def well_seen(posed: Gaussians, cam: Cameras, binding: Binding,
              landmarks: dict[str, np.ndarray] | None = None, depth: Tensor | None = None,
              canonical: Gaussians | None = None) -> Tensor:  # fmt: skip
    """[N] bool: the Gaussians whose colour the photo judges: inside its frame, unhidden, facing
    its camera (cosine ≤ WELL_SEEN), and, for the face's own Gaussians, inside the face's outline
    (the hull of its landmarks in image pixels, `landmarks["face"]` [P, 2]), and for the face's
    skin not `hidden_skin`. One that projects outside the outline sees the hair or the background
    beside a turned cheek, which must not end up on the cheek; one outside the frame (the hands
    and legs below a portrait's edge) would read the edge's pixels, smeared down the limbs.
    `depth` [H, W]: the camera's render of `posed` (rendered here when None); what the photo
    shows there may rule out more (`hand_strays`). `canonical`: the same Gaussians at rest; with
    them, the face's Gaussians it sees at a graze where their mirror image is seen face-on are
    not (`grazed_face`)."""
    from render import rasterize

    from .refine import visible_in

    if depth is None:
        depth = rasterize(posed, cam).depth[0, ..., 0]
    seen = visible_in(posed, cam, depth)
    seen &= ~hidden_skin(posed, cam, binding, depth)
    cos = facing(posed, cam)
    seen &= cos <= WELL_SEEN
    face_uv = (landmarks or {}).get("face")
    if face_uv is not None and len(face_uv) >= 3:
        seen &= ~face_parts(binding) | inside_outline(cam, cam.project(posed.means)[0], face_uv)
    if canonical is not None:
        seen &= ~grazed_face(canonical, binding, cos, seen)
    return seen


def hidden_skin(posed: Gaussians, cam: Cameras, binding: Binding, depth: Tensor) -> Tensor:
    """[N] bool: the face's skin more than FACE_HIDDEN behind the surface the camera renders
    (`depth` [H, W]), where the rest of the body is hidden only past 3 cm (clothes over skin).
    Behind the nose of a turned head the far cheek read the nose's pixels: a second nose from the
    other side. Not the mouth's lining (within MOUTH_LINING of the lips): hidden by the closed
    lips, it read their pixels, which is what an open mouth shows; completed as skin, an open
    mouth was pale inside and read as nearly shut."""
    from .refine import unoccluded

    out = (binding.parts == PART_CODES["face"]) & ~unoccluded(posed, cam, depth, FACE_HIDDEN)
    lips = binding.parts == PART_CODES["lips"]
    if out.any() and lips.any():
        dist, _ = nearest(posed.means[out], posed.means[lips], 1)
        out[torch.nonzero(out)[:, 0][dist[:, 0] < MOUTH_LINING]] = False
    return out


def grazed_face(canonical: Gaussians, binding: Binding, cos: Tensor, well: Tensor) -> Tensor:
    """[N] bool: the face's Gaussians the photo sees well (`well` [N]) but at a graze (`cos` [N],
    `facing`, above GRAZED) whose mirror image (the nearest well-seen face Gaussian to it in
    `mirror_space`, within MIRROR_NEAR) it sees nearly face-on (at most FACE_ON): the far cheek
    of a turned head, a few smeared pixels in the photo, where the near cheek shows the same
    skin sharp. They are left to the mirror (`complete_colours`)."""
    face = face_parts(binding) & well
    grazed = face & (cos > GRAZED)
    out = torch.zeros_like(well)
    if grazed.any():
        x, mirrored = mirror_space(canonical.means)
        dist, idx = nearest(mirrored[grazed], x[face], 1)
        out[grazed] = (dist[:, 0] < MIRROR_NEAR) & (cos[face][idx[:, 0]] <= FACE_ON)
    return out


def mirror_space(means: Tensor) -> tuple[Tensor, Tensor]:
    """(x, mirrored) [N, 3]: canonical `means` with heights weighted by HEIGHT_WEIGHT (neighbours
    at the same height count first), and their mirror images (x -> -x): the one space where
    `grazed_face` decides that a cheek has a mirror image and `complete_colours` then colours
    it from that mirror image (apart, a grazed cheek found its mirror within MIRROR_NEAR in one
    and not in the other, and fell to its part's median colour)."""
    x = means * torch.tensor([1.0, HEIGHT_WEIGHT, 1.0], dtype=means.dtype)
    return x, x * torch.tensor([-1.0, 1.0, 1.0], dtype=means.dtype)


def judged_hands(landmarks: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """The hands `hand_strays` judges, "hand_left"/"hand_right" -> landmarks [21, 2]: found,
    and spanning HAND_MIN_PX or more (a full-body photo's hands span fewer: their pixels mix)."""
    hands = {part: (landmarks or {}).get(part) for part in ("hand_left", "hand_right")}
    return {k: v for k, v in hands.items() if v is not None and np.ptp(v, 0).max() >= HAND_MIN_PX}


def hand_strays(posed: Gaussians, cam: Cameras, binding: Binding,
                landmarks: dict[str, np.ndarray] | None, pixels: Tensor,
                seen: Tensor) -> Tensor:  # fmt: skip
    """[N] bool: a hand's Gaussians that the photo sees (`seen` [N], `well_seen`; `pixels`
    [N, 3], `reconstruct.refine.photo_pixels`; `landmarks["hand_left"]` and `["hand_right"]`
    [21, 2] in image pixels) and where it shows something other than that hand: outside
    the hull of its landmarks (its joints) and either beyond that hull grown by HAND_REACH of its
    size or unlike the hand's own colour, the median under the hull (skin or a glove): neither
    `skin_like` it (skin in light or shade) nor within HAND_NEAR of it (a dark glove's
    chromaticity is noise). Inside the hull the photo is trusted (a glove's pattern), and so is
    a hand whose landmarks span under HAND_MIN_PX (a full-body photo's: its pixels mix). The
    template's hand, posed from 21 landmarks, misses the photo's by a few pixels, and the misses
    read the shirt behind it: shards of shirt around the hand from every other side."""
    strays = torch.zeros_like(seen)
    uv = cam.project(posed.means)[0]
    for part, points in judged_hands(landmarks).items():
        of_hand = seen & (binding.parts == PART_CODES[part])
        hull = inside_outline(cam, uv, points, 0.0)
        if (of_hand & hull).sum() < 10:
            continue  # the photo hardly shows it
        own = pixels[of_hand & hull].median(0).values
        like = skin_like(pixels, own) | ((pixels - own).norm(dim=-1) < HAND_NEAR)
        strays |= of_hand & ~hull & ~(inside_outline(cam, uv, points, -HAND_REACH) & like)
    return strays


def inside_outline(cam: Cameras, uv: Tensor, points: np.ndarray, margin: float = 0.03) -> Tensor:
    """[N] bool: image points `uv` [N, 2] inside the convex hull of landmarks `points` [P, 2],
    shrunk by `margin` of its size (a face's outline pixels mix face and surroundings), or grown
    by -margin (a hand's landmarks are its joints, inside its outline)."""
    from .refine import hull_region, shrink

    h, w = cam.height, cam.width
    hull = shrink(hull_region(points, (h, w)), int(round(margin * float(np.ptp(points, 0).max()))))
    px = uv.round().long()
    ok = (px[:, 0] >= 0) & (px[:, 0] < w) & (px[:, 1] >= 0) & (px[:, 1] < h)
    out = torch.zeros(len(uv), dtype=torch.bool)
    out[ok] = torch.from_numpy(hull.astype(bool))[px[ok, 1], px[ok, 0]]
    return out


def segments(template: BodyTemplate, binding: Binding) -> tuple[Tensor, list[str]]:
    """[N] segment index of each Gaussian, and the segments' names: its dominant bone's
    segment (`BodyTemplate.bone_segments`), but "face" for the face's skin, lips and lids, so
    an unseen cheek takes skin, not the hair beside it."""
    names = sorted(set(template.bone_segments()) | {"face"})
    of_bone = torch.tensor([names.index(s) for s in template.bone_segments()])
    dominant = binding.bone_ids.gather(1, binding.bone_weights.argmax(1, keepdim=True))[:, 0]
    return torch.where(face_parts(binding), names.index("face"), of_bone[dominant]), names


def nearest(points: Tensor, refs: Tensor, k: int, chunk: int = 2048) -> tuple[Tensor, Tensor]:
    """Each of `points` [P, 3]'s k nearest of `refs` [R, 3] (fewer when R < k), nearest first:
    distances and indices [P, k], in chunks of points (a P x R distance matrix at once is
    gigabytes for a whole body)."""
    found = [torch.cdist(points[s : s + chunk], refs).topk(min(k, len(refs)), dim=1, largest=False)
             for s in range(0, max(len(points), 1), chunk)]  # fmt: skip
    return torch.cat([d for d, _ in found]), torch.cat([i for _, i in found])


def _nearest_median(points: Tensor, refs: Tensor, colours: Tensor, k: int = K_NEAREST,
                    blend: bool = True) -> Tensor:  # fmt: skip
    """Per channel, the median colour of each point's k nearest references; within NEAR of
    the nearest one, blended toward its closest few (a pattern continues across the rim), unless
    not `blend`."""
    dist, idx = nearest(points, refs, k)
    far = colours[idx].median(1).values
    near = colours[idx[:, :4]].mean(1)
    w = (1 - dist[:, :1] / NEAR).clamp(0, 1) if blend else torch.zeros_like(dist[:, :1])
    return w * near + (1 - w) * far


def _in_own_light(colour: Tensor, here: Tensor, refs: Tensor, ref_rgb: Tensor,
                  mirrored: Tensor, per_channel: bool = False) -> Tensor:  # fmt: skip
    """Mirrored colours [M, 3] in the light of where they go, `here` [M, 3]: times the median
    ratio of brightness between the well-seen Gaussians nearest `here` whose mirror image the
    photo sees well too and that mirror image (`refs` [R, 3] their positions, `ref_rgb` [R, 3]
    their colours, `mirrored` [R, 3] the positions mirrored), within LIGHT_RATIO. Both sides
    of the same point show the same skin: what differs is the light. A face lit from one side
    copied its lit cheek onto the shaded one: a pale stripe down the cheek the photo turns away,
    seen from the side. One ratio for all three channels, DARK added to both sides: per
    channel, the ratios of dark hair's few levels reddened strands of it. `per_channel` for
    skin, which shade saturates: one ratio left the sweater's far cheek a band of grey skin
    (saturation 0.29) between the photo's shaded skin around it (0.43)."""
    dist, partner = nearest(mirrored, refs, 1)
    paired = dist[:, 0] < MIRROR_NEAR
    if not paired.any():
        return colour
    light = (ref_rgb if per_channel else ref_rgb.mean(-1, keepdim=True)) + DARK
    ratio = (light[paired] / light[partner[paired, 0]]).clamp(1 / LIGHT_RATIO, LIGHT_RATIO)
    gain = _nearest_median(here, refs[paired], ratio.expand(-1, 3), k=K_PAIRS, blend=False)
    return (colour * gain).clamp(0, 1)


PARENT = {
    "foot": "lowerleg",
    "lowerleg": "upperleg",
    "upperleg": "torso",
    "hand": "lowerarm",
    "lowerarm": "upperarm",
    "upperarm": "torso",
    "neck": "torso",
    "head": "neck",
    "face": "neck",
}


# a hidden forearm lies between its sleeve and its hand: each of its Gaussians takes the nearer
# (a short sleeve's forearm is skin, a long one's sleeve reaches the wrist)
BETWEEN = {"lowerarm": "hand"}


def _sources(name: str) -> list[tuple[str, bool]]:
    """Where an unseen segment takes its colours from, in order: itself, its mirror image,
    then up the body (a hidden shin from the thigh, then the torso), each with its mirror."""
    out, seg = [], name
    while seg:
        stem, dot, side = seg.partition(".")
        out.append((seg, False))
        if side in ("L", "R"):
            out.append((f"{stem}.{'R' if side == 'L' else 'L'}", True))
        parent = PARENT.get(stem)
        seg = parent + dot + side if parent and parent != "torso" else parent
    return out


def complete_colours(canonical: Gaussians, binding: Binding, template: BodyTemplate,
                     photo_rgb: Tensor, cos: Tensor, well: Tensor,
                     hair: Hair | None) -> Tensor:  # fmt: skip
    """[N, 3] colours: `photo_rgb` [N, 3] where the photo sees a Gaussian well (`well` [N],
    `well_seen`), completed elsewhere as the module docstring says; `cos` [N] (`facing`) finds
    the rim."""
    rgb = photo_rgb.clone()
    todo = ~well
    if hair is not None:
        crown, hanging = hair_regions(canonical, binding, hair)
        for region, colour in ((crown, hair.crown), (hanging, hair.hanging)):
            region &= todo
            rgb[region] = (hair.crown if colour is None else colour).to(rgb)
            todo &= ~region
    if not well.any():
        return rgb
    seg, names = segments(template, binding)
    x, mirrored = mirror_space(canonical.means)  # garments run around the body
    for i, name in enumerate(names):  # a cheek turned away looks like the one the photo shows
        if "." not in name:
            need, refs = todo & (seg == i), well & (seg == i)
            if need.any() and refs.any():
                dist, idx = nearest(mirrored[need], x[refs], 4)
                hit = dist[:, 0] < MIRROR_NEAR
                rows = torch.nonzero(need)[:, 0][hit]
                if len(rows):
                    rgb[rows] = _in_own_light(photo_rgb[refs][idx[hit]].mean(1), x[rows],
                                              x[refs], photo_rgb[refs], mirrored[refs],
                                              per_channel=name == "face")  # fmt: skip
                todo[rows] = False
    skin = binding.parts == PART_CODES["face"]
    skin_rgb = photo_rgb[well & skin].median(0).values if (well & skin).any() else None
    for i, name in enumerate(names):
        need = todo & (seg == i)
        if not need.any():
            continue
        if name.startswith("hand") and not (well & (seg == i)).any() and skin_rgb is not None:
            rgb[need] = skin_rgb  # unseen hands: the face's skin
            continue
        refs, mirror = _references(name, names, seg, well, well & (cos > RIM))
        if name == "torso":
            refs = _garment(refs, canonical.means, photo_rgb, skin_rgb)
        elif name == "neck" and skin_rgb is not None:
            refs = _skin(refs, photo_rgb, skin_rgb)
        rgb[need] = _nearest_median((mirrored if mirror else x)[need], x[refs], photo_rgb[refs])
    return rgb


def _garment(refs: Tensor, x: Tensor, photo_rgb: Tensor, skin_rgb: Tensor | None) -> Tensor:
    """`refs` [N] bool, of the torso, without the middle of its front (within 40% of its half
    width of its centre line, `x` [N, 3] the Gaussians' positions: a neckline, a shirt and tie
    in a jacket's opening, a print) and without skin-coloured ones (`skin_like` or `shaded_skin`
    `skin_rgb` [3]), when at least a tenth of them and 10 Gaussians are left: a torso's unseen
    back is its garment, as its sides show it. A V-neck's shaded skin at a portrait's edge was a
    white T-shirt's only sides left: its back went tan."""
    keep = refs.clone()
    if refs.any():
        centre = x[refs, 0].median()
        keep &= (x[:, 0] - centre).abs() > 0.4 * (x[refs, 0] - centre).abs().max()
    if skin_rgb is not None:
        keep &= ~(skin_like(photo_rgb, skin_rgb) | shaded_skin(photo_rgb, skin_rgb))
    return _if_enough(keep, refs)


def _skin(refs: Tensor, photo_rgb: Tensor, skin_rgb: Tensor) -> Tensor:
    """`refs` [N] bool, of the neck, without those unlike the face's skin (`skin_like`
    `skin_rgb` [3]) when at least a tenth of them and 10 are left: a neck's sides in the photo
    mix with the collar over them and the background beside them (a grey back of the neck from
    the side), and a neck is skin unless a collar or scarf hides all of it."""
    return _if_enough(refs & skin_like(photo_rgb, skin_rgb), refs)


def _if_enough(keep: Tensor, refs: Tensor) -> Tensor:
    """`keep` (a subset of `refs` [N] bool) when it holds a tenth of them and at least 10."""
    return keep if keep.sum() >= max(10, 0.1 * refs.sum()) else refs


def _references(name: str, names: list[str], seg: Tensor, well: Tensor,
                rim: Tensor) -> tuple[Tensor, bool]:  # fmt: skip
    """The well-seen Gaussians an unseen part of segment `name` takes its colours from, and
    whether they are its mirror image; failing all `_sources`, every well-seen Gaussian. Of a
    segment, its rim where there is one: the sides the photo shows continue around the back,
    the print at the front of a shirt does not."""
    for source, mirror in _sources(name):
        if source in names:
            of_source = seg == names.index(source)
            refs = well & of_source
            if refs.sum() >= max(3, MIN_SEEN * of_source.sum()):
                sides = refs & rim
                refs = sides if sides.sum() >= 10 else refs
                stem, side = name.partition(".")[0], source.partition(".")[2]
                child = f"{BETWEEN.get(stem)}.{side}"
                if source.partition(".")[0] != stem and child in names:  # up the body
                    refs = refs | (well & (seg == names.index(child)))
                return refs, mirror
    return well, False


def colour_prior(canonical: Gaussians, binding: Binding, template: BodyTemplate, transforms: Tensor,
                 cam: Cameras, image: Tensor, mask: Tensor,
                 landmarks: dict[str, np.ndarray] | None = None,
                 given: Tensor | None = None) -> Tensor:  # fmt: skip
    """[N, 3] the colours create's refinement starts from and keeps unseen Gaussians near: the
    photo's pixels (or `given` [N, 3], e.g. the reconstructor's colours) where the photo sees a
    Gaussian well, completed elsewhere (`complete_colours`). `landmarks`: the photo's, in the
    image (`well_seen`; the face's also find the hair colour)."""
    from deform.skinning import apply_blend

    from .refine import photo_pixels, posed_blend

    landmarks = landmarks or {}
    with torch.no_grad():
        posed = apply_blend(canonical, posed_blend(binding, transforms))
        pixels = photo_pixels(posed, cam, image, mask)
        well = well_seen(posed, cam, binding, landmarks, canonical=canonical)
        well &= ~hand_strays(posed, cam, binding, landmarks, pixels, well)
        hair = hair_from_photo(image, mask, landmarks.get("face"))  # else the scalp it sees
        if hair is None and (scalp := scalp_colour(canonical, binding, pixels, well)) is not None:
            hair = Hair(scalp)
        rgb = complete_colours(canonical, binding, template, pixels, facing(posed, cam), well, hair)
        if given is not None:
            rgb[well] = given[well].to(rgb)
    return rgb
