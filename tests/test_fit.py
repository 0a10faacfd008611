"""Template fitting on a real photo: keypoints and silhouette must agree with the photo."""

from __future__ import annotations

import pytest
import torch

from avatar.photo import read_photo

from .helpers import SHARED_DATA

pytest.importorskip("anny", reason="fitting needs the Anny template")
pytest.importorskip("mediapipe", reason="fitting needs person parsing")


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"test photos not found in {SHARED_DATA}")
def test_fit_full_body_photo():
    from deform.templates.anny import AnnyTemplate
    from reconstruct.fit import FitConfig, fit_template
    from reconstruct.parsing import PersonParser

    rgb = read_photo(SHARED_DATA / "person_sweater_fullbody.png").rgb
    with PersonParser() as parser:
        parse = parser(rgb)
    tpl = AnnyTemplate()
    fit = fit_template(tpl, parse, rgb.shape[:2], FitConfig(size=256, steps=150), progress=False)
    assert fit.keypoint_error < 0.03  # mean visible-keypoint error, fraction of person height
    assert fit.silhouette_iou > 0.8
    out = tpl(fit.shape[None], pose=fit.pose[None], translation=fit.translation[None])
    nose = fit.camera.project(tpl.landmarks(out, {"n": tpl.body_landmarks["nose"]})[0])[0, 0]
    target = torch.from_numpy(fit.crop.to_crop(parse.body[0:1, :2]))[0]
    assert (nose - target).norm() < 0.04 * fit.crop.height
    assert (fit.shape >= 0).all() and (fit.shape <= 1).all()


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"test photos not found in {SHARED_DATA}")
def test_fit_puts_the_template_mouth_on_the_photo_lips():
    """The face-mesh term: without it the template's lip seam sat 7% of the face's height above
    the photo's on this portrait, and opening the jaw tore the painted upper lip. At create's
    steps: at 150 the seam was still moving, under 3.5% in CI and 4.5% on an AMD EPYC (float
    rounding, then Adam), and 3.0% at 170; at 220 it is 0.7% there."""
    import numpy as np

    from deform.templates import MEDIAPIPE_FACE
    from deform.templates.anny import AnnyTemplate
    from reconstruct.fit import FitConfig, fit_template
    from reconstruct.parsing import PersonParser

    rgb = read_photo(SHARED_DATA / "man_halfbody_generated.png").rgb
    with PersonParser() as parser:
        parse = parser(rgb)
    tpl = AnnyTemplate()
    lips = [list(MEDIAPIPE_FACE).index(n) for n in ("upper_lip_inner", "lower_lip_inner")]
    errors = {}
    for lam in (0.0, FitConfig.lambda_face):
        fit = fit_template(tpl, parse, rgb.shape[:2], FitConfig(size=256, lambda_face=lam),
                           progress=False)  # fmt: skip
        out = tpl(fit.shape[None], pose=fit.pose[None], translation=fit.translation[None])
        got = fit.camera.project(tpl.landmarks(out, tpl.face_landmarks)[0])[0].detach().numpy()
        want = fit.crop.to_crop(parse.face[list(MEDIAPIPE_FACE.values())])
        height = np.linalg.norm(parse.face[10] - parse.face[152]) * fit.crop.scale
        errors[lam] = np.linalg.norm(got - want, axis=1)[lips].max() / height
    assert errors[FitConfig.lambda_face] < 0.035, errors
    assert errors[0.0] > 1.5 * errors[FitConfig.lambda_face], errors


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"test photos not found in {SHARED_DATA}")
def test_a_hand_left_far_from_its_landmarks_is_fitted_again():
    """On this half-body photo the fit left her left hand 0.4 of the crop's height away from its
    landmarks (the robust loss hardly pulls a hand that starts far off); the network then moved
    the hand's Gaussians up to 9 cm onto the photo's hand, and every view but the photo's showed
    fingers floating beside the template's hand. The full stage now runs again with the hands'
    robust scale annealed."""
    import numpy as np

    from deform.templates.anny import AnnyTemplate
    from reconstruct.fit import FitConfig, fit_template
    from reconstruct.parsing import PersonParser

    rgb = read_photo(SHARED_DATA / "woman_halfbody_generated.png").rgb
    with PersonParser() as parser:
        parse = parser(rgb)
    tpl = AnnyTemplate()

    def hand_errors(cfg: FitConfig) -> list[float]:
        fit = fit_template(tpl, parse, rgb.shape[:2], cfg, progress=False)
        out = tpl(fit.shape[None], pose=fit.pose[None], translation=fit.translation[None])
        return [
            float(np.linalg.norm(fit.crop.to_crop(parse.hands[side]) - fit.camera.project(
                tpl.landmarks(out, tpl.hand_landmarks[side])[0])[0].detach().numpy(), axis=1
            ).mean() / fit.crop.height)
            for side in ("left", "right")
        ]  # fmt: skip

    # which crop sizes miss without the second run moves with float rounding (run alone: 256
    # and 512 missed by 0.4; after other tests in one process, none did); the property tested
    # is that none misses
    for size in (256, 384, 512):
        assert max(hand_errors(FitConfig(size=size, steps=150))) < 0.06, size


def test_torso_yaw_reads_which_way_the_shoulders_and_hips_turn():
    import numpy as np

    from reconstruct.parsing import torso_yaw

    def world(turn_deg: float) -> np.ndarray:  # a torso turned to its left by turn_deg
        pts = np.zeros((33, 3))
        t = np.radians(turn_deg)
        for left, right, y in ((11, 12, -0.5), (23, 24, 0.0)):
            half = np.array([0.2 * np.cos(t), 0.0, 0.2 * np.sin(t)])  # its left further away
            pts[left], pts[right] = half + [0, y, 0], -half + [0, y, 0]
        return pts

    seen = np.ones(33)
    for turn in (-40.0, 0.0, 25.0, 170.0):
        assert abs(torso_yaw(world(turn), seen) - turn) < 1e-6
    hidden = seen.copy()
    hidden[[12, 24]] = 0.1
    assert torso_yaw(world(25.0), hidden) is None


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"test photos not found in {SHARED_DATA}")
def test_the_torso_turns_as_mediapipe_sees_it_and_the_head_stays_on_it():
    """From 2D keypoints alone the fit turned this nearly frontal woman's torso 30° to her left,
    her head (turned to the camera) then 31° from her shoulders in every video the rig made,
    and the face close-up from 30° saw her profile. The torso-turn term follows MediaPipe's 3D
    pose; her head stays within 15° of her shoulders."""
    import math

    from deform.templates.anny import AnnyTemplate
    from reconstruct.fit import FitConfig, fit_template
    from reconstruct.parsing import PersonParser
    from render.rotations import axis_angle_to_rotmat

    rgb = read_photo(SHARED_DATA / "person_hat_fullbody.png").rgb
    with PersonParser() as parser:
        parse = parser(rgb)
    assert parse.torso_yaw is not None and abs(parse.torso_yaw) < 15  # she faces the camera
    tpl = AnnyTemplate()
    head = tpl.bone_segments().index("head")

    def turns(cfg: FitConfig) -> tuple[float, float]:  # (torso, head from the torso), degrees
        fit = fit_template(tpl, parse, rgb.shape[:2], cfg, progress=False)
        root = axis_angle_to_rotmat(fit.pose[0])[:, 2]
        rest = fit.pose.clone()
        rest[0] = 0
        face = tpl.pose_transforms(fit.shape, rest[None])[0][head, :3, 2]
        return (math.degrees(math.atan2(root[0], root[2])),
                math.degrees(math.atan2(face[0], face[2])))  # fmt: skip

    torso, head_turn = turns(FitConfig(size=256, steps=150))
    assert abs(torso - parse.torso_yaw) < 10 and abs(head_turn) < 15, (torso, head_turn)
    torso, head_turn = turns(FitConfig(size=256, steps=150, lambda_turn=0.0))
    assert abs(head_turn) > 20, (torso, head_turn)  # what the keypoints alone made of her


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"test photos not found in {SHARED_DATA}")
def test_standing_legs_stay_under_the_torso_seen_from_the_side():
    """2D keypoints cannot tell a thigh pointing at the camera from one pointing away: the fit
    swung this standing man's legs 22° back from his torso, and the rig, standing him upright,
    showed him leaning into a slide from every side view. With the spine's and legs' tilt held to
    MediaPipe's 3D pose it is 13-14° (MediaPipe's own: 11°)."""
    import math

    from deform.templates.anny import AnnyTemplate
    from reconstruct.fit import FitConfig, fit_template
    from reconstruct.parsing import PersonParser

    rgb = read_photo(SHARED_DATA / "person_sweater_fullbody.png").rgb
    with PersonParser() as parser:
        parse = parser(rgb)
    assert parse.world is not None and parse.world.shape == (33, 3)
    tpl = AnnyTemplate()
    names = list(tpl.body_landmarks)

    def swing(cfg: FitConfig) -> float:  # degrees between the spine and hips-to-ankles, side view
        fit = fit_template(tpl, parse, rgb.shape[:2], cfg, progress=False)
        upright = fit.pose.clone()
        upright[0] = 0  # as the rig stands it
        lm = tpl.landmarks(tpl(fit.shape[None], pose=upright[None]), tpl.body_landmarks)[0]

        def mid(side: str) -> torch.Tensor:
            return (lm[names.index(f"left_{side}")] + lm[names.index(f"right_{side}")]) / 2

        spine, legs = mid("shoulder") - mid("hip"), mid("hip") - mid("ankle")
        return math.degrees(math.atan2(legs[2], legs[1]) - math.atan2(spine[2], spine[1]))

    assert abs(swing(FitConfig(size=256, steps=150))) < 16
    assert abs(swing(FitConfig(size=256, steps=150, lambda_limbs=0.0))) > 18
