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
    the photo's on this portrait, and opening the jaw tore the painted upper lip."""
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
        fit = fit_template(tpl, parse, rgb.shape[:2], FitConfig(size=256, steps=150,
                                                                lambda_face=lam), progress=False)  # fmt: skip
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
