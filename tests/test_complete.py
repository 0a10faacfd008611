"""What the photo does not show: completed colours, a closed surface, and the view measures."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from .helpers import SHARED_DATA, template_avatar

pytest.importorskip("anny", reason="needs the Anny template")

RED, BLUE, GREEN, SKIN, HAIR = (torch.tensor(c) for c in ([0.8, 0.1, 0.1], [0.1, 0.2, 0.8],
                                                          [0.1, 0.8, 0.1], [0.9, 0.7, 0.6],
                                                          [0.2, 0.1, 0.05]))  # fmt: skip


@pytest.fixture(scope="module")
def scene():
    """The template seen from the front: a red top with a green print on the chest, blue
    sleeves, skin on the face and hands; the left arm hidden (behind the back)."""
    from reconstruct.canonical import PART_CODES
    from reconstruct.complete import segments
    from render.rotations import quat_to_rotmat

    avatar = template_avatar(12000)
    g, b = avatar.gaussians, avatar.binding
    template = avatar.body_template()
    seg, names = segments(template, b)
    name = [names[i] for i in seg.tolist()]
    normal = quat_to_rotmat(g.quats)[:, :, 2]
    cos = -normal[:, 2]  # camera in front (+Z) looking down -Z
    seen = cos < 0
    photo = RED.expand(len(g), 3).clone()
    arm = torch.tensor([n.startswith(("upperarm", "lowerarm")) for n in name])
    photo[arm] = BLUE
    photo[(g.means[:, 0].abs() < 0.08) & ((g.means[:, 1] - 0.35).abs() < 0.08)] = GREEN  # the print
    skin = torch.tensor([n.startswith(("face", "hand", "head", "neck")) for n in name])
    photo[skin] = SKIN
    photo[b.parts == PART_CODES["face"]] = SKIN
    hidden_arm = torch.tensor([n.endswith(".L") and n.startswith(("upperarm", "lowerarm", "hand")) for n in name])  # fmt: skip
    seen = seen & ~hidden_arm
    return g, b, template, name, photo, cos, seen, hidden_arm


def test_unseen_colours_come_from_parts_like_them(scene):
    from reconstruct.complete import complete_colours
    from reconstruct.hair import Hair, hair_region

    g, b, template, name, photo, cos, seen, hidden_arm = scene
    rgb = complete_colours(g, b, template, photo, cos, seen, Hair(HAIR))
    x = g.means
    back = (
        (cos > 0.5)
        & torch.tensor([n == "torso" for n in name])
        & (x[:, 1] > 0.2)
        & (x[:, 1] < 0.45)
    )
    assert back.sum() > 50
    assert (rgb[back] - RED).norm(dim=-1).median() < 0.05  # the top's colour, not the print
    assert (rgb[back] - GREEN).norm(dim=-1).min() > 0.3
    hair = hair_region(g, b) & ~seen
    assert hair.sum() > 50 and torch.allclose(rgb[hair], HAIR.expand(int(hair.sum()), 3))
    sleeve = hidden_arm & torch.tensor([n.startswith("upperarm") for n in name])
    assert (rgb[sleeve] - BLUE).norm(dim=-1).median() < 0.05  # mirrored from the other arm
    well = seen & (cos <= -0.3)
    assert torch.equal(rgb[well], photo[well])  # what the photo sees well stays as it is


def test_hidden_legs_continue_the_clothes_above(scene):
    """A portrait shows no legs: they take the colour of what they hang from, not skin."""
    from reconstruct.complete import complete_colours
    from reconstruct.hair import Hair

    g, b, template, name, photo, cos, seen, _ = scene
    legs = torch.tensor([n.startswith(("upperleg", "lowerleg", "foot")) for n in name])
    rgb = complete_colours(g, b, template, photo, cos, seen & ~legs, Hair(HAIR))
    assert (rgb[legs] - RED).norm(dim=-1).median() < 0.1


def test_a_hidden_forearm_takes_its_hand_at_the_wrist_and_its_sleeve_at_the_elbow(scene):
    """A gesture toward the camera hides both forearms behind the hands: each forearm
    Gaussian takes the colour of the nearer of its hand (skin) and its upper arm (a sleeve)."""
    from reconstruct.complete import complete_colours
    from reconstruct.hair import Hair

    g, b, template, name, photo, cos, seen, _ = scene
    forearms = torch.tensor([n.startswith("lowerarm") for n in name])
    hands, sleeves = (torch.tensor([n.startswith(p) for n in name]) for p in ("hand", "upperarm"))
    rgb = complete_colours(g, b, template, photo, cos, seen & ~forearms, Hair(HAIR))
    to_hand, to_sleeve = (torch.cdist(g.means[forearms], g.means[p & seen]).amin(1)
                          for p in (hands, sleeves))  # fmt: skip
    wrist, elbow = to_hand < 0.5 * to_sleeve, to_sleeve < 0.5 * to_hand
    assert wrist.sum() > 30 and elbow.sum() > 30
    assert (rgb[forearms][wrist] - SKIN).norm(dim=-1).median() < 0.05
    assert (rgb[forearms][elbow] - BLUE).norm(dim=-1).median() < 0.05


def test_the_back_of_the_neck_is_its_skin_not_the_collar_beside_it(scene):
    """The photo shows a neck's sides mixed with the collar over them: its unseen back takes
    the sides' skin-coloured Gaussians, not the collar's."""
    from reconstruct.complete import complete_colours

    g, b, template, name, photo, cos, seen, _ = scene
    neck = torch.tensor([n == "neck" for n in name])
    seen = seen | (neck & (cos < 0.2))  # its front and sides
    photo = photo.clone()
    collar = neck & seen & (torch.arange(len(g)) % 3 > 0)  # two in three: the collar's
    photo[collar] = BLUE
    back = neck & (cos > 0.5)
    assert back.sum() > 10 and (neck & seen & ~collar).sum() >= 10
    rgb = complete_colours(g, b, template, photo, cos, seen, None)
    assert (rgb[back] - SKIN).norm(dim=-1).median() < 0.05
    assert (rgb[back] - BLUE).norm(dim=-1).min() > 0.3


def test_a_turned_away_cheek_takes_the_cheek_the_photo_shows(scene):
    """The face turned to one side: its hidden cheek copies its mirror image, not the
    nose and lips beside it."""
    from reconstruct.canonical import PART_CODES
    from reconstruct.complete import complete_colours
    from reconstruct.hair import Hair

    g, b, template, name, photo, cos, seen, _ = scene
    x = g.means[:, 0]
    face = b.parts == PART_CODES["face"]
    photo = photo.clone()
    photo[face & (x < -0.025)] = SKIN  # the cheek the photo shows
    photo[face & (x.abs() <= 0.025)] = GREEN  # the middle of the face, a different colour
    hidden = face & (x > 0.025)
    rgb = complete_colours(g, b, template, photo, cos, seen & ~hidden, Hair(HAIR))
    cheek = hidden & (x > 0.04) & (cos < -0.3)
    assert cheek.sum() > 30
    assert (rgb[cheek] - SKIN).norm(dim=-1).median() < 0.05


def test_a_cheek_copied_from_the_other_side_keeps_its_own_light(scene):
    """A face lit from one side: the photo shows its shaded cheek only near the middle, and the
    cheek's turned-away part copies its mirror image from the lit side. It takes the shade its
    own side shows there (the ratio between the two sides where the photo sees both, per
    channel: shade saturates skin), not the lit cheek's brightness or hue: a pale stripe, or a
    grey one, down the shaded cheek from the side."""
    from reconstruct.canonical import PART_CODES
    from reconstruct.complete import complete_colours
    from reconstruct.hair import Hair

    g, b, template, name, photo, cos, seen, _ = scene
    x = g.means[:, 0]
    face = b.parts == PART_CODES["face"]
    photo = photo.clone()
    photo[face & (x > 0)] = SKIN * 0.7  # the side away from the light
    hidden = face & (x > 0.035)
    rgb = complete_colours(g, b, template, photo, cos, seen & ~hidden, Hair(HAIR))
    cheek = hidden & (x > 0.045) & (cos < -0.3)
    assert cheek.sum() > 30
    assert (rgb[cheek] - SKIN * 0.7).norm(dim=-1).median() < 0.03
    hue = torch.nn.functional.cosine_similarity(rgb[cheek], SKIN[None], dim=-1)
    assert hue.min() > 0.999  # darker, the same skin
    even = complete_colours(g, b, template, photo.where(~face[:, None], SKIN), cos, seen & ~hidden,
                            Hair(HAIR))  # fmt: skip
    assert (even[cheek] - SKIN).norm(dim=-1).median() < 0.03  # evenly lit: the same skin
    shade = SKIN * torch.tensor([0.75, 0.6, 0.5])  # shade saturates skin: darker and redder
    photo[face & (x > 0)] = shade
    rgb = complete_colours(g, b, template, photo, cos, seen & ~hidden, Hair(HAIR))
    assert (rgb[cheek] - shade).norm(dim=-1).median() < 0.05  # not the lit hue, greyed (0.13)


def turned_head(g, b, cos):
    """The scene's head turned to one side: (face, far cheek, near cheek) [N] bool and the
    cosines `facing` gives, the far cheek seen at a graze (66° from the camera), the near one
    face-on (26°)."""
    from reconstruct.canonical import PART_CODES

    x = g.means[:, 0]
    face = b.parts == PART_CODES["face"]
    far, near = face & (x > 0.035), face & (x < -0.035)
    turned = cos.clone()
    turned[far], turned[near] = -0.4, -0.9
    return face, far, near, turned


def test_a_cheek_the_photo_sees_at_a_graze_takes_its_mirror_seen_face_on(scene):
    """A head turned to one side: the photo sees its far cheek at a graze (turned 66° from the
    camera), a few pixels smeared over it, and the near one face-on. The far cheek takes the near
    one's colour in its own light, not its smeared pixels; a face seen evenly from the front
    keeps every pixel it sees, grazed or not."""
    from reconstruct.canonical import face_parts
    from reconstruct.complete import complete_colours, grazed_face
    from reconstruct.hair import Hair

    g, b, template, name, photo, cos, seen, _ = scene
    x = g.means[:, 0]
    face, far, near, turned = turned_head(g, b, cos)
    grazed = grazed_face(g, b, turned, seen)
    assert grazed[far & seen].float().mean() > 0.8
    assert not grazed[~face_parts(b) | near].any()  # the near cheek and the rest keep theirs
    # seen from straight ahead, a cheek's mirror image is turned as far as it is
    front = grazed_face(g, b, cos, seen)
    assert front.sum() <= 0.05 * (face_parts(b) & seen & (cos > -0.5)).sum()

    photo = photo.clone()
    photo[face & (x > 0)] = SKIN * 0.8  # its own side, in shade
    photo[far] = GREEN  # what the graze smears over the far cheek
    rgb = complete_colours(g, b, template, photo, turned, seen & ~grazed, Hair(HAIR))
    cheek = far & grazed
    assert (rgb[cheek] - SKIN * 0.8).norm(dim=-1).median() < 0.08
    assert (rgb[cheek] - GREEN).norm(dim=-1).min() > 0.3


def test_every_cheek_left_to_the_mirror_has_one_where_it_is_coloured(scene):
    """`grazed_face` leaves a far cheek to its mirror image only where `complete_colours` finds
    one (a well-seen Gaussian of its part within MIRROR_NEAR in `mirror_space`), here with the
    near cheek seen in patches (a mirror image up to 2 cm from the nearest seen Gaussian): found
    apart (plain distances for one, heights weighted for the other), 77 of 293 had none and took
    their part's median."""
    from reconstruct.complete import MIRROR_NEAR, grazed_face, mirror_space, nearest, segments

    g, b, template, name, photo, cos, seen, _ = scene
    _, _, near, turned = turned_head(g, b, cos)
    patches = torch.rand(len(g), generator=torch.Generator().manual_seed(0)) < 0.9
    well = seen & ~(near & patches)
    grazed = grazed_face(g, b, turned, well)
    assert grazed.sum() >= 10
    well &= ~grazed
    seg, _ = segments(template, b)
    at, mirrored = mirror_space(g.means)
    for i in seg[grazed].unique():
        refs = well & (seg == i)
        dist, _ = nearest(mirrored[grazed & (seg == i)], at[refs], 1)
        assert (dist[:, 0] < MIRROR_NEAR).all()


def test_the_back_is_hair_and_garment_not_the_fronts_skin(scene):
    """Hair that hangs below the chin covers the back and sides of the neck and the top of the
    back; the rest of the back is the top's colour, though the front's rim at the neckline shows
    skin, lit or in shade (a skin-coloured back under a hairline reads as a face from behind)."""
    from reconstruct.canonical import PART_CODES
    from reconstruct.complete import complete_colours
    from reconstruct.hair import Hair, hair_regions
    from render.rotations import quat_to_rotmat

    g, b, template, name, photo, cos, seen, _ = scene
    x = g.means
    torso = torch.tensor([n == "torso" for n in name])
    photo = photo.clone()
    top = x[torso, 1].max()
    photo[torso & (x[:, 1] > top - 0.25)] = SKIN  # a deep neckline, seen at the rim too
    crown, dark = torch.tensor([0.8, 0.7, 0.5]), torch.tensor([0.15, 0.1, 0.08])  # a hat, hair
    rgb = complete_colours(g, b, template, photo, cos, seen, Hair(crown, dark, 1.0))
    hat, hanging = hair_regions(g, b, Hair(crown, dark, 1.0))
    assert not (hat & hanging).any()
    assert torch.allclose(rgb[hat & ~seen], crown.expand(int((hat & ~seen).sum()), 3))
    short, tied = hair_regions(g, b, Hair(crown, dark))[1], hair_regions(g, b, Hair(crown))[1]
    assert hanging.sum() > short.sum() + 50 and short.sum() > tied.sum()  # down the back
    normal = quat_to_rotmat(g.quats)[:, :, 2]  # and the sides of the neck, under the jaw
    face = x[b.parts == PART_CODES["face"]]
    jaw = face[:, 1].min() + 0.35 * (face[:, 1].max() - face[:, 1].min())  # hair_regions' nape
    beside = (normal[:, 2].abs() < 0.2) & (normal[:, 0].abs() > 0.6) & (x[:, 1] < jaw)
    beside &= (b.parts == 0) & ((x[:, 0] - face[:, 0].mean()).abs() < 0.08)
    assert (hanging & beside).sum() > 10 and not (short & beside).any()
    nape = hanging & ~seen & torso
    assert nape.sum() > 20 and torch.allclose(rgb[nape], dark.expand(int(nape.sum()), 3))
    back = (cos > 0.5) & torso & ~hanging & (x[:, 1] > top - 0.15)
    assert back.sum() > 50
    assert (rgb[back] - RED).norm(dim=-1).median() < 0.05  # the top, not the neckline's skin
    photo[torso & (x[:, 1] > top - 0.25)] = torch.tensor([0.6, 0.4, 0.28])  # in shade
    rgb = complete_colours(g, b, template, photo, cos, seen, Hair(crown, dark, 1.0))
    assert (rgb[back] - RED).norm(dim=-1).median() < 0.05


def test_hair_hanging_beside_the_face_covers_its_sides(scene):
    """Hair seen hanging beside the face also covers the face's own Gaussians turned sideways
    (temples, ears and, hanging below the chin, the jaw's back): they were skin, a bald cheek
    from the side; the face's front and tied-back hair's face stay skin."""
    from reconstruct.canonical import PART_CODES, face_parts
    from reconstruct.complete import complete_colours
    from reconstruct.hair import Hair, hair_regions
    from render.rotations import quat_to_rotmat

    g, b, template, name, photo, cos, seen, _ = scene
    crown, dark = torch.tensor([0.8, 0.7, 0.5]), torch.tensor([0.15, 0.1, 0.08])
    normal = quat_to_rotmat(g.quats)[:, :, 2]
    face = g.means[b.parts == PART_CODES["face"]]
    chin, top = face[:, 1].min(), face[:, 1].max()
    y = g.means[:, 1]
    sides = face_parts(b) & (normal[:, 0].abs() > 0.7) & (normal[:, 2] < 0.2) & ~seen  # turned
    jaw = sides & (y < chin + 0.35 * (top - chin))  # below hair_regions' nape
    assert (sides & ~jaw).sum() > 10 and jaw.sum() > 5
    long, short, tied = (hair_regions(g, b, h)[1] for h in
                         (Hair(crown, dark, 1.0), Hair(crown, dark), Hair(crown)))  # fmt: skip
    assert long[sides].all() and short[sides & ~jaw].all() and not short[jaw].any()
    assert not tied[face_parts(b)].any()
    front = face_parts(b) & (normal[:, 2] > 0.5)
    assert not long[front].any()
    rgb = complete_colours(g, b, template, photo, cos, seen, Hair(crown, dark, 1.0))
    assert torch.allclose(rgb[sides], dark.expand(int(sides.sum()), 3))
    rgb = complete_colours(g, b, template, photo, cos, seen, Hair(crown))
    assert (rgb[sides] - SKIN).norm(dim=-1).max() < 0.05


def test_hair_from_the_photo_finds_the_hat_the_hair_and_its_length():
    """A hat on top, dark hair beside the face down to 1.5 face heights below the chin; or hair
    tied back, with ears and neck beside the face: no hanging hair; nor where a shirt reaches
    up beside the face to the eyes but not the temples (Messi's jersey read as red hair)."""
    from reconstruct.hair import hair_from_photo

    hat, dark = torch.tensor([0.8, 0.7, 0.5]), torch.tensor([0.15, 0.1, 0.08])
    image, mask = torch.ones(400, 300, 3), torch.zeros(400, 300)
    mask[40:400, 60:240] = 1
    image[40:400, 60:240] = RED  # a red top below
    image[40:80, 80:220] = hat
    image[80 : 140 + 90, 90:210] = dark  # hair from the hat down, 1.5 x 60 px below the chin
    image[80:140, 120:180] = SKIN  # the face: 60 px wide and tall
    face = np.array([[120, 80], [180, 80], [180, 140], [120, 140]], np.float32)
    got = hair_from_photo(image, mask, face)
    assert torch.allclose(got.crown, hat) and torch.allclose(got.hanging, dark)
    assert got.below_chin == pytest.approx(1.5, abs=0.1)
    image[80:230, 90:210] = RED
    image[80:140, 90:210] = SKIN * 0.8  # shaded ears and neck beside the face
    image[80:140, 120:180] = SKIN
    got = hair_from_photo(image, mask, face)
    assert got.hanging is None and got.below_chin == 0
    image[80:230, 90:120] = dark  # on one side only: a raised hand, a scarf, not hair
    assert hair_from_photo(image, mask, face).hanging is None
    image[80:230, 180:210] = dark
    assert torch.allclose(hair_from_photo(image, mask, face).hanging, dark)
    low = image.clone()  # a head held low: a jersey's shoulders up beside its eyes, hair above
    low[107:230, 90:120] = low[107:230, 180:210] = torch.tensor([0.1, 0.2, 0.7])
    assert hair_from_photo(low, mask, face).hanging is None
    image[110:140, 120:180] = 0.08  # a black face mask over the cheeks: no skin to tell hair by
    assert hair_from_photo(image, mask, face).hanging is None
    assert hair_from_photo(image, mask, None) is None


def test_face_gaussians_outside_the_face_outline_are_not_judged():
    """A face Gaussian that projects outside the face's outline in the photo sees hair or the
    background beside a turned cheek: its colour is not taken from there."""
    from reconstruct.canonical import face_parts
    from reconstruct.complete import well_seen
    from render import fit_to_points, scene_points

    avatar = template_avatar(12000)
    g, b = avatar.gaussians, avatar.binding
    face = face_parts(b)
    cam = fit_to_points(scene_points(g[face]), 256, 256, torch.zeros(1, dtype=torch.float64),
                        0.0, 30.0, 0.6)[0]  # fmt: skip
    uv = cam.project(g.means)[0]
    everywhere = well_seen(g, cam, b)
    centre = uv[face].mean(0)
    half = (uv[face] - centre).abs().amax(0)
    outline = (centre + 0.5 * half * torch.tensor([[-1, -1], [1, -1], [1, 1], [-1, 1]])).numpy()
    judged = well_seen(g, cam, b, {"face": outline})
    outside = face & everywhere & ((uv - centre).abs() > 0.55 * half).any(-1)
    inside = face & everywhere & ((uv - centre).abs() < 0.4 * half).all(-1)
    assert outside.sum() > 20 and inside.sum() > 20
    assert not judged[outside].any() and judged[inside].all()
    assert torch.equal(judged[~face], everywhere[~face])  # the rest of the body as before


def test_face_skin_behind_the_nose_is_not_judged_and_the_mouths_lining_is():
    """A head turned from the camera hides the far cheek behind the nose by 1-3 cm, within the
    3 cm the rest of the body allows for layers (clothes over skin): skin there read the nose's
    pixels, and seen from the other side it drew a second nose on the cheek. Skin more than
    FACE_HIDDEN behind the photo's surface is not judged (its mirror image colours it), except
    the mouth's lining, hidden by the closed lips, whose pixels are what an open mouth shows;
    the face the camera sees is judged as before."""
    from reconstruct.canonical import PART_CODES, face_parts
    from reconstruct.complete import (
        FACE_HIDDEN,
        MOUTH_LINING,
        WELL_SEEN,
        facing,
        nearest,
        well_seen,
    )
    from reconstruct.refine import sample_image, visible_in
    from render import fit_to_points, rasterize, scene_points

    avatar = template_avatar(30000)
    g, b = avatar.gaussians, avatar.binding
    skin, lips = (b.parts == PART_CODES[p] for p in ("face", "lips"))
    to_lips = torch.full((len(g),), math.inf)
    to_lips[skin] = nearest(g.means[skin], g.means[lips], 1)[0][:, 0]
    for yaw, far_behind, lining in ((40.0, 30, 3), (0.0, 10, 5)):
        cam = fit_to_points(scene_points(g[face_parts(b)]), 256, 256,
                            torch.tensor([yaw], dtype=torch.float64), 0.0, 30.0, 0.6)[0]  # fmt: skip
        depth = rasterize(g, cam).depth[0, ..., 0]
        view = cam.viewmats[0]
        gap = g.means @ view[2, :3] + view[2, 3]
        gap = gap - sample_image(depth[..., None], cam.project(g.means)[0])[:, 0]
        old = visible_in(g, cam, depth) & (facing(g, cam) <= WELL_SEEN)  # within 3 cm, facing it
        judged = well_seen(g, cam, b, depth=depth)
        behind = skin & old & (gap > FACE_HIDDEN)
        away, lines = behind & (to_lips > MOUTH_LINING), behind & (to_lips < MOUTH_LINING)
        assert away.sum() >= far_behind and lines.sum() >= lining
        assert not judged[away].any() and judged[lines].all()
        assert torch.equal(judged[~behind], old[~behind])  # the rest as before


def test_a_hands_gaussians_take_only_what_the_photo_shows_of_that_hand():
    """The template's hand, posed from 21 landmarks, misses the photo's by a few pixels, and
    the misses read the shirt behind it (shards of shirt around the hand from the side): a hand
    Gaussian is judged inside the hull of the hand's landmarks, and a little beyond it only on
    the hand's own colour; create makes the rest nearly transparent."""
    from reconstruct.appearance import STRAY_OPACITY, Observation, fade_strays
    from reconstruct.canonical import PART_CODES
    from reconstruct.complete import HAND_MIN_PX, HAND_REACH, hand_strays, well_seen
    from reconstruct.refine import RefineConfig, appearance_loss, photo_pixels
    from render import fit_to_points, scene_points

    avatar = template_avatar(12000)
    g, b = avatar.gaussians, avatar.binding
    hand = b.parts == PART_CODES["hand_left"]
    cam = fit_to_points(scene_points(g[hand]), 256, 256, torch.zeros(1, dtype=torch.float64),
                        0.0, 30.0, 0.6)[0]  # fmt: skip
    uv = cam.project(g.means)[0]
    everywhere = well_seen(g, cam, b)
    centre = uv[hand & everywhere].median(0).values
    half = (uv[hand & everywhere] - centre).abs().amax(0)
    corners = centre + 0.4 * half * torch.tensor([[-1, -1], [1, -1], [1, 1], [-1, 1]])
    landmarks = {"hand_left": corners.numpy()}
    offset = (uv - centre).abs() - 0.4 * half  # > 0: outside the landmarks' hull
    inside, outside = (offset < -1).all(-1), (offset > 1).any(-1)
    reach = HAND_REACH * 0.8 * half.max()  # pixels the hull grows by
    band, far = outside & (offset < reach - 1).all(-1), (offset > reach + 1).any(-1)
    pixels = SKIN.expand(len(g), 3).clone()

    def judged_by(landmarks: dict, pixels: torch.Tensor) -> torch.Tensor:
        seen = well_seen(g, cam, b, landmarks)
        return seen & ~hand_strays(g, cam, b, landmarks, pixels, seen)

    judged = judged_by(landmarks, pixels)  # the hand's colour all over
    seen_hand = hand & everywhere
    assert (seen_hand & inside).sum() > 20 and (seen_hand & band).sum() > 20
    assert (seen_hand & far).sum() > 20
    assert judged[seen_hand & (inside | band)].all() and not judged[seen_hand & far].any()
    assert torch.equal(judged[~hand], everywhere[~hand])  # the rest of the body as before
    pixels[outside] = BLUE  # the shirt around the hand
    pattern = inside & (uv[:, 0] < centre[0])
    pixels[pattern] = GREEN  # a glove's pattern inside the hull: trusted
    judged = judged_by(landmarks, pixels)
    assert judged[seen_hand & inside].all() and not judged[seen_hand & outside].any()
    assert (seen_hand & pattern).sum() > 10
    image = torch.ones(256, 256, 3) * BLUE
    lo, hi = (centre - 0.4 * half).round().long(), (centre + 0.4 * half).round().long()
    image[lo[1] : hi[1] + 1, lo[0] : hi[0] + 1] = SKIN
    transforms = torch.eye(4).expand(avatar.body_template().num_bones, 4, 4)
    obs = Observation(avatar.body_template(), b, transforms, cam, image, torch.ones(256, 256),
                      landmarks)  # fmt: skip
    faded = fade_strays(obs, g).opacities
    stray = hand & ~judged_by(landmarks, photo_pixels(g, cam, image, obs.mask))
    stray &= everywhere  # what the photo shows there, sampled from the image
    assert stray[seen_hand & outside & (offset > 2).any(-1)].all() and not stray[inside].any()
    assert torch.allclose(faded[stray], torch.tensor(STRAY_OPACITY))
    assert torch.equal(faded[~stray], g.opacities[~stray])
    assert fade_strays(Observation(obs.template, b, transforms, cam, image, obs.mask), g) is g
    small = {"hand_left": (centre + 0.5 * (corners - centre)).numpy()}  # 50 px wide -> 25
    assert (corners.max(0).values - corners.min(0).values).max() >= HAND_MIN_PX
    assert torch.equal(judged_by(small, pixels), everywhere)
    # the refinement does not colour them from the photo
    loss = appearance_loss(
        g, b, transforms, cam, image, obs.mask, RefineConfig(), landmarks=landmarks
    )
    assert not loss.seen[stray].any() and loss.seen[seen_hand & inside].all()


def test_refinement_does_not_slide_or_grow_gaussians_along_the_photos_rays():
    """Depth is what the photo cannot judge: moving along its rays, or growing along them,
    is penalised on top of the plain offset term."""
    from dataclasses import replace

    from reconstruct.refine import RefineConfig, along_rays, appearance_loss

    g, b, cam, transforms = front_view()
    image, mask = torch.ones(64, 64, 3), torch.zeros(64, 64)
    rays, extent = along_rays(g, cam)
    assert torch.all(extent > 0) and torch.allclose(rays.norm(dim=-1), torch.ones(len(g)))
    cfg = RefineConfig(lambda_offset=0.0)
    free = appearance_loss(g, b, transforms, cam, image, mask, replace(cfg, lambda_slide=0.0,
                                                                        lambda_depth=0.0))  # fmt: skip
    held = appearance_loss(g, b, transforms, cam, image, mask, cfg)
    offsets = 0.01 * rays
    moved = g.replace(means=g.means + offsets)
    slide = float(held(moved, offsets)[0] - free(moved, offsets)[0])
    assert slide == pytest.approx(cfg.lambda_slide * 1e-4, rel=1e-3)
    grown = g.replace(log_scales=g.log_scales + 0.5)
    grow = float(
        held(grown, torch.zeros_like(g.means))[0] - free(grown, torch.zeros_like(g.means))[0]
    )
    want = cfg.lambda_depth * ((extent * (math.exp(0.5) - 1)) ** 2).mean()
    assert grow == pytest.approx(float(want), rel=1e-3)


def test_refinement_grows_no_needles_and_keeps_colours_in_range():
    """Fitting one photo, a Gaussian could stretch into a needle (2 cm by 1.5 mm, seen across
    its length from the side) and its colour run past white or below black (layered Gaussians
    adding up to the photo's colour): both are penalised, needles past `max_needle` times their
    second axis, colours by how far they leave [0, 1]."""
    from dataclasses import replace

    from reconstruct.refine import RefineConfig, appearance_loss
    from render.sh import rgb_to_sh0

    g, b, cam, transforms = front_view()
    image, mask = torch.ones(64, 64, 3), torch.zeros(64, 64)
    cfg = RefineConfig()
    free = appearance_loss(g, b, transforms, cam, image, mask,
                           replace(cfg, lambda_needle=0.0, lambda_range=0.0))  # fmt: skip
    held = appearance_loss(g, b, transforms, cam, image, mask, cfg)
    zero = torch.zeros_like(g.means)

    def extra(x) -> float:
        return float(held(x, zero)[0] - free(x, zero)[0])

    flat = g.replace(log_scales=torch.full_like(g.log_scales, math.log(0.002)),
                     sh=rgb_to_sh0(torch.full((len(g), 3), 0.5))[:, None])  # fmt: skip
    assert extra(flat) == pytest.approx(0.0, abs=1e-7)
    needle = flat.log_scales.clone()
    needle[0, 1] += math.log(5.0)  # 5x its second axis: 2 over the limit
    assert extra(flat.replace(log_scales=needle)) == pytest.approx(
        cfg.lambda_needle * (5.0 - cfg.max_needle) / len(g), rel=1e-2
    )
    bright = flat.sh.clone()
    bright[0, 0] = rgb_to_sh0(torch.tensor([1.2, 0.5, -0.1]))
    assert extra(flat.replace(sh=bright)) == pytest.approx(
        cfg.lambda_range * 0.3 / len(g), rel=1e-2
    )


def test_colours_the_photo_hardly_judges_stay_near_its_pixel():
    """Adam scales each colour's step by its own gradient's size: a Gaussian the photo sees but
    that draws a few thousandths of a pixel (behind others at an ear, at a glancing angle) moves as
    fast as one that draws a tenth, and its colour ran to red, green or white, shown from every
    other side. Every seen colour is also held to its start (the photo's pixel there) by
    `lambda_prior_seen`: the photo still moves the ones it judges, not the rest."""
    from dataclasses import replace

    from reconstruct.refine import RefineConfig, appearance_loss, refine_appearance
    from render import rasterize
    from render.sh import SH_C0, rgb_to_sh0, sh0_to_rgb

    # 5,000: at 3,000, 49 of its 70 faint seen Gaussians were face skin now hidden (21 left)
    g, b, cam, transforms = front_view(5000)
    grey = torch.full((len(g), 3), 0.5)
    g = g.replace(sh=rgb_to_sh0(grey)[:, None])
    sh = g.sh.clone().requires_grad_()
    out = rasterize(g.replace(sh=sh), cam, background=1.0)
    out.rgb.sum().backward()
    drawn = sh.grad[:, 0].abs().sum(-1) * SH_C0 / 3  # pixels' worth each Gaussian draws
    mask = (out.alpha[0, ..., 0] > 0.5).float().detach()
    pattern = torch.rand(64, 64, 1, generator=torch.Generator().manual_seed(0))
    image = (0.5 + 0.4 * (pattern - 0.5)).expand(64, 64, 3).contiguous()
    cfg = RefineConfig(steps=60)
    seen = appearance_loss(g, b, transforms, cam, image, mask, cfg, prior=grey).seen
    faint = seen & (drawn > 0) & (drawn < 0.005)
    strong = seen & (drawn > 0.06)
    assert faint.sum() > 20 and strong.sum() > 20

    def moved(c: RefineConfig) -> tuple[float, float]:
        rgb = sh0_to_rgb(refine_appearance(g, b, transforms, cam, image, mask, c, progress=False,
                                           prior=grey).sh[:, 0])  # fmt: skip
        d = (rgb - grey).abs().amax(-1)
        return float(d[faint].median()), float(d[strong].median())

    held, free = moved(cfg), moved(replace(cfg, lambda_prior_seen=0.0))
    assert free[0] > 2 * held[0], (held, free)  # faint ones wander without it
    assert held[1] > 0.5 * free[1], (held, free)  # the photo still moves the ones it judges


def front_view(n: int = 3000):
    """The template's Gaussians and binding (`n` Gaussians), a 64-px camera in front of it and
    its rest pose's transforms."""
    from render import fit_to_points, scene_points

    avatar = template_avatar(n)
    g = avatar.gaussians
    cam = fit_to_points(scene_points(g), 64, 64, torch.zeros(1, dtype=torch.float64), 0.0, 30.0,
                        0.8)[0]  # fmt: skip
    return g, avatar.binding, cam, torch.eye(4).expand(avatar.body_template().num_bones, 4, 4)


def test_refinement_leaves_the_shape_of_what_the_photo_cannot_see():
    """The back of the head sits behind the face in a front photo: the light the face lets
    through would thin it out (holes showing the face from behind), so the refinement keeps
    the opacity, scale and position of every hidden Gaussian and fits the rest."""
    from reconstruct.refine import RefineConfig, appearance_loss, refine_appearance
    from render.rotations import quat_to_rotmat

    g, b, cam, transforms = front_view()
    image, mask = torch.full((64, 64, 3), 0.3), torch.ones(64, 64)  # grey: a lot must move
    cfg = RefineConfig(steps=4)
    hidden = appearance_loss(g, b, transforms, cam, image, mask, cfg).hidden
    back = quat_to_rotmat(g.quats)[:, 2, 2] < -0.5  # normals away from the camera
    front = quat_to_rotmat(g.quats)[:, 2, 2] > 0.5
    assert hidden[back].float().mean() > 0.8 and hidden[front].float().mean() < 0.4  # 64 px
    narrow = torch.zeros(64, 64)
    narrow[:, 16:48] = 1  # at the outline, the silhouette judges even a hidden Gaussian
    free = ~appearance_loss(g, b, transforms, cam, image, narrow, cfg).hidden
    u = cam.project(g.means)[0][:, 0]
    assert free[(u < 18) | (u > 46)].all() and not free[back & (u > 22) & (u < 42)].all()
    out = refine_appearance(g, b, transforms, cam, image, mask, cfg, progress=False)
    for name in ("opacity_logits", "log_scales", "means"):
        before, after = getattr(g, name), getattr(out, name)
        assert torch.equal(before[hidden], after[hidden]), name
        assert (before[~hidden] != after[~hidden]).any(), name


def test_the_heads_shell_stays_closed_seen_from_around_it():
    """A crown thinned to 0.1 opacity (as fitting thins the crown a photo sees edge-on): the
    cover term, from around and above the head, is larger than on the whole head, and the
    refinement with it makes the crown it may change more opaque and the shell more closed
    than the same refinement without it."""
    from dataclasses import replace

    from deform.skinning import apply_blend
    from reconstruct.cover import head_gaussians
    from reconstruct.refine import RefineConfig, appearance_loss, posed_blend, refine_appearance
    from render.rotations import quat_to_rotmat

    g, b, cam, transforms = front_view()
    image, mask = torch.full((64, 64, 3), 0.3), torch.ones(64, 64)
    head = head_gaussians(g, b)
    assert g.means[head, 1].min() > g.means[:, 1].max() - 0.35  # the head, not the shoulders
    crown = head & (quat_to_rotmat(g.quats)[:, 1, 2] > 0.6)  # normals up
    thin = g.replace(opacity_logits=torch.where(crown, torch.tensor(-2.2), g.opacity_logits))
    cfg = RefineConfig(steps=30, lambda_face_cover=0.0)  # the head's term alone
    objective = appearance_loss(thin, b, transforms, cam, image, mask, cfg)
    blend, every = posed_blend(b, transforms), range(len(objective.cover))
    centre = g.means[head].mean(0)  # the cover's cameras look from all around, the photo's too
    ways = torch.stack([c.centers[0] for c in objective.cover.cameras]) - centre
    photo_way = torch.nn.functional.normalize(cam.centers[0] - centre, dim=0)
    angle = torch.rad2deg(torch.acos(torch.nn.functional.normalize(ways, dim=-1) @ photo_way))
    assert len(ways) == 16 and angle.min() < 25 and angle.max() > 170
    assert (ways[:, 1] > 0.5 * ways.norm(dim=-1)).sum() == 8  # 8 from 45° above

    def cover(x):
        with torch.no_grad():
            return objective.cover(apply_blend(x, blend), every).item()

    assert cover(thin) > cover(g) + 0.05
    assert appearance_loss(thin, b, transforms, cam, image, mask, cfg, cover=False).cover is None
    out = refine_appearance(thin, b, transforms, cam, image, mask, cfg, progress=False)
    free = refine_appearance(thin, b, transforms, cam, image, mask,
                             replace(cfg, lambda_cover=0.0), progress=False)  # fmt: skip
    judged = crown & ~objective.hidden
    assert judged.sum() >= 5
    opacity = [torch.sigmoid(x.opacity_logits[judged]).mean() for x in (out, free)]
    assert opacity[0] > opacity[1] + 0.1
    assert cover(out) < cover(free) - 0.02


def test_the_faces_own_layer_stays_closed():
    """A face thinned to 0.1 opacity (as fitting thins the cheek a photo sees edge-on) over the
    head's inside, an opaque layer 1 cm behind it: the head's cover term sees the inside cover
    every view and does not mind; the face's own does, and the refinement with it leaves the face
    more opaque than the same refinement without it (holes through which the inside showed as
    dark cracks)."""
    from dataclasses import replace

    from deform.skinning import apply_blend
    from reconstruct.canonical import Binding, face_parts
    from reconstruct.refine import RefineConfig, appearance_loss, posed_blend, refine_appearance
    from render import Gaussians
    from render.rotations import quat_to_rotmat

    g, b, cam, transforms = front_view()
    face = face_parts(b)
    inside = g[face].replace(means=g.means[face] - 0.01 * quat_to_rotmat(g.quats[face])[:, :, 2],
                             opacity_logits=torch.full((int(face.sum()),), 4.0))  # fmt: skip
    tensors = {k: torch.cat([v, v[face]]) for k, v in b.tensors().items()}
    tensors["parts"][len(g) :] = 0  # the head's body, not its face
    b2 = Binding(**tensors)
    face2 = face_parts(b2)
    thin_face = torch.where(face, torch.tensor(-2.2), g.opacity_logits)
    thin = Gaussians.cat([g.replace(opacity_logits=thin_face), inside])
    whole = Gaussians.cat([g, inside])
    image, mask = torch.full((64, 64, 3), 0.3), torch.ones(64, 64)
    cfg = RefineConfig(steps=30)
    objective = appearance_loss(thin, b2, transforms, cam, image, mask, cfg)
    blend, every = posed_blend(b2, transforms), range(len(objective.cover))

    def covers(x):
        with torch.no_grad():
            posed = apply_blend(x, blend)
            return objective.cover(posed, every).item(), objective.face_cover(posed, every).item()

    (head_thin, face_thin), (head_whole, face_whole) = covers(thin), covers(whole)
    assert head_thin < head_whole + 0.01 and face_thin > face_whole + 0.05
    off = replace(cfg, lambda_face_cover=0.0)
    assert appearance_loss(thin, b2, transforms, cam, image, mask, off).face_cover is None
    out = refine_appearance(thin, b2, transforms, cam, image, mask, cfg, progress=False)
    free = refine_appearance(thin, b2, transforms, cam, image, mask, off, progress=False)
    judged = face2 & ~objective.hidden
    assert judged.sum() >= 5
    opacity = [torch.sigmoid(x.opacity_logits[judged]).mean() for x in (out, free)]
    assert opacity[0] > opacity[1] + 0.05
    assert covers(out)[1] < covers(free)[1] - 0.02


def test_the_body_outside_the_mask_keeps_its_shape_and_floaters_do_not():
    """A person mask misses a forearm in shadow against a dark room: the silhouette term would
    thin the forearm away (a hole from every other side). Gaussians still on the template's
    surface (`anchors`) that project outside the mask beyond its outline keep their shape;
    Gaussians that left the surface (floaters) are thinned as before."""
    from reconstruct.refine import OUTLINE_PX, RefineConfig, appearance_loss, refine_appearance

    g, b, cam, transforms = front_view()
    image, mask = torch.full((64, 64, 3), 0.3), torch.zeros(64, 64)
    mask[:, 24:] = 1  # the mask leaves out the body's left of column 24
    cfg = RefineConfig(steps=6)
    u = cam.project(g.means)[0][:, 0]
    outside, near = u < 24 - OUTLINE_PX - 1, (u > 24 - OUTLINE_PX + 1) & (u < 24)
    assert outside.sum() > 100 and near.sum() > 10
    held = appearance_loss(g, b, transforms, cam, image, mask, cfg, anchors=g.means).hidden
    assert held[outside].all() and not held[near].any()  # at the outline the mask judges
    floaters = appearance_loss(g, b, transforms, cam, image, mask, cfg, anchors=g.means + 0.02)
    assert not floaters.hidden[outside].any()
    opacity = {}
    for name, anchors in (("on the surface", g.means), ("floating", g.means + 0.02)):
        out = refine_appearance(g, b, transforms, cam, image, mask, cfg, progress=False,
                                anchors=anchors)  # fmt: skip
        opacity[name] = out.opacity_logits[outside]
    assert torch.equal(opacity["on the surface"], g.opacity_logits[outside])
    assert (opacity["floating"] < g.opacity_logits[outside] - 0.1).float().mean() > 0.5


def test_the_refinement_poses_like_apply_blend_with_its_orientations_cached():
    from deform.skinning import apply_blend
    from reconstruct.refine import RefineConfig, appearance_loss
    from render import fit_to_points, scene_points
    from render.rotations import axis_angle_to_rotmat

    avatar = template_avatar(2000)
    g, b = avatar.gaussians, avatar.binding
    cam = fit_to_points(scene_points(g), 48, 48, torch.zeros(1, dtype=torch.float64), 0.0, 30.0,
                        0.8)[0]  # fmt: skip
    j = avatar.body_template().num_bones
    transforms = torch.eye(4).repeat(j, 1, 1)
    transforms[:, :3, :3] = axis_angle_to_rotmat(torch.randn(j, 3) * 0.2)
    objective = appearance_loss(g, b, transforms, cam, torch.ones(48, 48, 3), torch.ones(48, 48),
                                RefineConfig())  # fmt: skip
    for step in range(2):  # the second call reads the cache
        moved = g.replace(means=g.means + 0.01 * step)
        posed, want = objective._pose(moved), apply_blend(moved, objective.blend)
        assert torch.equal(posed.quats, want.quats) and torch.equal(posed.means, want.means)
    turned = g.replace(quats=torch.roll(g.quats, 1, -1))  # other orientations: computed anew
    assert torch.equal(objective._pose(turned).quats, apply_blend(turned, objective.blend).quats)


def test_hair_colour_is_the_hair_around_the_face():
    from reconstruct.hair import hair_colour

    image = torch.ones(200, 160, 3)  # white background
    mask = torch.zeros(200, 160)
    mask[20:200, 30:130] = 1
    image[20:200, 30:130] = HAIR
    image[70:140, 50:110] = SKIN  # the face
    face = np.array([[50, 70], [110, 70], [110, 140], [50, 140], [80, 150]], np.float32)
    got = hair_colour(image, mask, face)
    assert got is not None and torch.allclose(got, HAIR)
    assert hair_colour(image, mask, None) is None


def test_one_layer_of_the_surface_is_opaque():
    """Behind the face lie the mouth cavity and the back of the head: one layer of sampled
    Gaussians must hide them (at 0.6 x spacing 36% of the face's pixels let them through)."""
    import torch.nn.functional as F

    from reconstruct.canonical import PART_CODES
    from render import fit_to_points, rasterize, scene_points

    avatar = template_avatar(50000)
    g, parts = avatar.gaussians, avatar.binding.parts
    face = torch.isin(parts, torch.tensor([PART_CODES[p] for p in ("face", "lips", "eyelids")],
                                          dtype=parts.dtype))  # fmt: skip
    sub = g.replace(means=g.means[face], quats=g.quats[face], log_scales=g.log_scales[face],
                    opacity_logits=g.opacity_logits[face], sh=g.sh[face])  # fmt: skip
    cam = fit_to_points(scene_points(sub), 384, 384, torch.tensor([0.0, 30.0], dtype=torch.float64),
                        0.0, 30.0, 0.8)  # fmt: skip
    for i in range(2):
        alpha = rasterize(sub, cam[i], background=torch.zeros(3)).alpha[0, ..., 0]
        inside = -F.max_pool2d(-(alpha > 0.5).float()[None, None], 9, 1, 4)[0, 0] > 0
        assert (alpha[inside] < 0.95).float().mean() < 0.05


def test_synthetic_views_bench_runs():
    """`avatar bench unseen`, tiny: one held-out subject, per-yaw PSNR, SSIM and LPIPS."""
    from avatar.views import TRUTH_YAWS, synthetic_views

    out = synthetic_views(1, gaussians=3000, size=128, render_size=96, refine_steps=4,
                          personalise_steps=2, progress=False)  # fmt: skip
    assert sorted(out["per_yaw"]) == sorted(f"yaw_{y:g}" for y in TRUTH_YAWS)
    for row in out["per_yaw"].values():
        assert 8 < row["psnr"] < 60 and 0 < row["ssim"] <= 1 and 0 <= row["lpips"] < 1
        assert math.isfinite(row["lpips"])
    back = out["back_face_score"]  # the measure from behind, of the truth and of ours
    assert len(back["truth"]) == len(back["ours"]) == 1
    assert all(0 <= v <= 1 for v in back["truth"] + back["ours"])
    assert back["truth_at_or_over_0.5"] == sum(v >= 0.5 for v in back["truth"])


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"test photos not found in {SHARED_DATA}")
def test_eval_views_measures_identity_and_the_back(tmp_path):
    """The photo's face against itself is the same person; the grey template is not; every
    back-of-head score is a detector score in [0, 1]; the renders are written to look at."""
    from avatar.evaluate import FaceIdentity
    from avatar.views import photo_face, view_metrics

    photo = SHARED_DATA / "woman_halfbody_generated.png"
    ident = FaceIdentity()
    face = photo_face(photo, 256)
    vec = ident.embed(face)
    assert vec is not None and float(vec @ vec) > 0.99
    out = view_metrics(template_avatar(6000), photo, 256, tmp_path)
    assert all(v is None or v < 0.363 for k, v in out["identity"].items() if k.startswith("yaw"))
    assert all(0 <= v <= 1 for v in out["back_face_score"].values())
    sizes = out["back_face_size"]  # the best face's size from behind, against the head's
    assert set(sizes) == set(out["back_face_score"]) - {"max"}
    assert all(v is not None and v >= 0 for v in sizes.values())
    assert (tmp_path / "face_0.png").is_file() and (tmp_path / "photo_face.png").is_file()
    assert (tmp_path / "face_photo_view.png").is_file()
    assert set(out["photo_view_deg"]) == {"yaw", "elevation"}
    assert set(out["self_identity"]) == {"yaw_0", "yaw_30", "yaw_-30"}


def test_eyes_over_head_compares_a_face_with_the_head_it_is_on():
    """A face whose eyes are 40 px apart on a head 100 px wide measures 0.4, as a face seen from
    the front does; the same head's outliers (a strand, a speck) do not widen it."""
    from avatar.views import eyes_over_head

    eyes = np.array([[30, 50], [70, 50], [50, 70], [35, 85], [65, 85]], np.float64)
    head = torch.stack([torch.linspace(0, 100, 500), torch.full((500,), 60.0)], -1)
    assert eyes_over_head(eyes, head) == pytest.approx(0.4, abs=0.02)
    specks = torch.tensor([[-400.0, 60.0], [600.0, 60.0]])
    assert eyes_over_head(eyes, torch.cat([head, specks])) == pytest.approx(0.4, abs=0.02)
    assert eyes_over_head(eyes, head[:1]) is None


def test_off_photo_says_how_far_each_close_up_is_from_what_the_photo_saw():
    """The rig stands the avatar upright facing yaw 0: a photo of a body turned 20° saw the head
    from 20° off that, so the close-up from one side is 50° from the photo's view and from the
    other 10° (each plus the photo camera's few degrees above the head)."""
    from avatar.pipelines.drive import speech_rig
    from avatar.views import off_photo

    avatar = template_avatar(3000)
    level = off_photo(avatar, speech_rig(avatar), (0.0, 30.0, -30.0))
    assert level[0] < 10 and all(abs(a - 30) < 3 for a in level[1:])
    avatar.photo_pose = avatar.photo_pose.clone()
    avatar.photo_pose[0] = torch.tensor([0.0, math.radians(20.0), 0.0])  # toward its left
    turned = off_photo(avatar, speech_rig(avatar), (0.0, 30.0, -30.0))
    assert abs(turned[0] - 21.5) < 3 and abs(turned[1] - 50) < 3 and abs(turned[2] - 10) < 3


def test_photo_view_is_the_close_up_that_sees_the_head_as_the_photo_did():
    """The close-up from `photo_view` is 0° off the photo's view; for a body the photo caught
    turned 20° toward its left, that camera stands at yaw -20 (the close-up from -30 was 10°
    off), and from a photo taken from above, above the head."""
    from avatar.pipelines.drive import speech_rig
    from avatar.views import off_photo, photo_view

    avatar = template_avatar(3000)
    rig = speech_rig(avatar)
    yaw, elevation = photo_view(avatar, rig)
    assert abs(yaw) < 3 and off_photo(avatar, rig, (yaw,), elevation)[0] < 0.1
    avatar.photo_pose = avatar.photo_pose.clone()
    avatar.photo_pose[0] = torch.tensor([0.0, math.radians(20.0), 0.0])
    turned, turned_up = photo_view(avatar, speech_rig(avatar))
    assert abs(turned + 20) < 2 and abs(turned_up - elevation) < 2
    assert off_photo(avatar, speech_rig(avatar), (turned,), turned_up)[0] < 0.1
    avatar.photo_pose[0] = torch.tensor([math.radians(25.0), 0.0, 0.0])  # leaning toward it
    _, above = photo_view(avatar, speech_rig(avatar))
    assert above > elevation + 15


def test_gaussians_outside_the_photos_frame_are_not_seen():
    """A portrait's edge cuts the body: the hands and legs below it face the camera and nothing
    hides them, but the photo has no pixel of them; read at its edge they took the edge's colour
    (the demo's dark hand and the streaks down its legs)."""
    from reconstruct.complete import well_seen
    from render import Cameras, fit_to_points, scene_points

    avatar = template_avatar(12000)
    g, b = avatar.gaussians, avatar.binding
    full = fit_to_points(scene_points(g), 128, 256, torch.zeros(1, dtype=torch.float64), 0.0,
                         30.0, 0.8)[0]  # fmt: skip
    everywhere = well_seen(g, full, b)
    top = Cameras(full.viewmats, full.Ks, full.width, full.height // 2)  # the upper half only
    portrait = well_seen(g, top, b)
    below = full.project(g.means)[0][:, 1] >= full.height // 2
    assert (everywhere & below).sum() > 100 and (everywhere & ~below).sum() > 100
    assert not portrait[below].any()
    assert torch.equal(portrait[~below], everywhere[~below])


def test_a_light_room_the_mask_spills_over_at_the_face_is_not_the_face():
    """Against a light room the segmenter's soft edge spills a pixel or two past a turned
    cheek, over the room; the refinement turned the cheek's outline Gaussians white to fit it (a
    white streak down the far cheek from the side). `matte_face_outline` caps the mask there with
    the alpha the colours say: over the room it drops to nothing; the face and a pixel truly half
    face and half room keep theirs; a room darker than the skin, where shade and room look alike,
    and a mask that does not spill are left as they are."""
    from reconstruct.refine import matte_face_outline

    skin, light, dark = (
        np.array([200, 150, 130.0]),
        np.array([245, 245, 245.0]),
        np.array([30, 30, 35.0]),
    )
    yy, xx = np.mgrid[:200, :200]
    r = np.hypot(xx - 100, yy - 100)
    t = np.linspace(0, 2 * np.pi, 36)
    face = np.stack([100 + 60 * np.cos(t), 100 + 60 * np.sin(t)], -1)
    mask = np.where(r < 60, 1.0, np.where(r < 61, 0.5, np.where(r < 63, 0.6, 0.0))).astype(
        np.float32
    )
    for room in (light, dark):
        share = np.where(r < 60, 1.0, np.where(r < 61, 0.5, 0.0))[..., None]
        photo = (share * skin + (1 - share) * room).round().astype(np.uint8)
        out = matte_face_outline(photo, mask, face)
        assert np.array_equal(out[r < 60], mask[r < 60])
        spill = (r >= 61.3) & (r < 62.7)
        if room is light:
            assert out[spill].max() < 0.05 and spill.sum() > 100
            mixed = (r >= 60.2) & (r < 60.8)  # truly half face, half room
            assert np.abs(out[mixed] - 0.5).max() < 0.1
        else:
            assert np.array_equal(out, mask)
        tight = np.where(r < 61, mask, 0.0).astype(np.float32)  # no spill: nothing to lower
        assert np.abs(matte_face_outline(photo, tight, face) - tight).max() < 0.1


def test_the_room_behind_the_outline_does_not_paint_the_body_dark():
    """A photo mixes the person with the room behind in the outline's pixels, as far as the
    person mask's soft edge says; the refinement draws the person on white, and fitted to a dark
    room's share there, outline Gaussians went black (strokes along a jaw and a neck, seen from
    the side). It fits the photo with the room replaced by white (`dematte`): the same person in
    a dark room and in a white one refines to the same colours at the outline."""
    from reconstruct.refine import RefineConfig, dematte, refine_appearance
    from render import rasterize
    from render.sh import sh0_to_rgb

    g, b, cam, transforms = front_view()
    with torch.no_grad():
        alpha = rasterize(g, cam).alpha[0, ..., 0]
    edge = (alpha > 0.05) & (alpha < 0.95)
    assert edge.sum() > 30
    room = torch.tensor([0.1, 0.1, 0.15])
    white = alpha[..., None] * SKIN + (1 - alpha[..., None])
    dark = alpha[..., None] * SKIN + (1 - alpha[..., None]) * room
    off = (dematte(dark, alpha) - white).abs().amax(-1)[edge]  # thin gaps: no room to measure
    assert (off < 0.005).float().mean() > 0.7 and (dark - white).abs().amax(-1)[edge].min() > 0.04
    assert torch.allclose(dematte(white, alpha), white, atol=0.005)
    square = torch.zeros(64, 64)  # a person whose mask is soft at its edge and deep inside
    square[8:56, 8:56], square[7, 8:56], square[28:36, 28:36] = 1.0, 0.5, 0.7
    photo = square[..., None] * SKIN + (1 - square[..., None]) * room
    fixed = dematte(photo, square)
    assert torch.allclose(fixed[7, 8:56], 0.5 * SKIN + 0.5, atol=0.005)  # the room at the edge
    assert torch.equal(fixed[28:36, 28:36], photo[28:36, 28:36])  # inside: the segmenter's doubt
    uv = (cam.project(g.means)[0] / 32 - 1)[None, None]  # 64 px
    beside = torch.nn.functional.max_pool2d(edge.float()[None, None], 3, 1, 1)  # within a pixel
    outline = torch.nn.functional.grid_sample(beside, uv, align_corners=False)[0, 0, 0] > 0.5
    assert outline.sum() > 20
    cfg = RefineConfig(steps=25)
    colours = [sh0_to_rgb(refine_appearance(g, b, transforms, cam, image, alpha, cfg,
                                            progress=False).sh[outline, 0]).mean(0)
               for image in (white, dark)]  # fmt: skip
    assert torch.allclose(colours[0], colours[1], atol=0.008), colours  # 0.015 apart without
