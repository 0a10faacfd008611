"""Hand shapes while talking (`deform.hands`): beats change the fingers, chunking does not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from .helpers import template_avatar

pytest.importorskip("anny", reason="hands need the Anny template")


@pytest.fixture(scope="module")
def shaper():
    from deform.hands import HandShaper
    from deform.templates import load_template

    tpl = load_template("anny")
    arm_ids = torch.tensor([[0, 1], [2, 3]])  # bone deltas of 4 "arm" rows in these tests
    return tpl, HandShaper(tpl, tpl.default_shape(), arm_ids, seed=3)


def arm_motion(num: int, fps: float = 25.0) -> torch.Tensor:
    """[T, 4, 3]: still, a 0.4 s swing of the left forearm at 2 rad/s, still again."""
    bones = torch.zeros(num, 4, 3)
    t = torch.arange(num) / fps
    swing = (t > 1.0) & (t < 1.4)
    bones[:, 0, 0] = torch.cumsum(swing.float() * 2.0 / fps, 0)
    return bones


def test_a_beat_changes_the_shape_then_it_relaxes(shaper):
    from deform.hands import HOLD_S, HandState

    _, hs = shaper
    fingers, state = hs.step(arm_motion(100), 25.0, HandState())
    relaxed = fingers[:20]
    assert torch.allclose(relaxed, relaxed[:1].expand_as(relaxed))  # nothing moves at rest
    left, right = fingers[:, :15], fingers[:, 15:]
    moved = (left - left[0]).norm(dim=-1).amax(-1)
    assert moved[25 : 25 + int(25 * HOLD_S)].max() > 0.2  # the left hand's shape changed (rad)
    assert moved[-5:].max() < 0.02  # and relaxed again
    assert (right - right[0]).norm(dim=-1).max() < 1e-6  # the still hand did not
    assert state.beats == [1, 0]


def test_chunking_does_not_change_the_hands(shaper):
    from deform.hands import HandState

    _, hs = shaper
    bones = arm_motion(100) + 0.01 * torch.randn(100, 4, 3).cumsum(0)
    whole, _ = hs.step(bones, 25.0, HandState())
    parts, state = [], HandState()
    for s in range(0, 100, 25):
        out, state = hs.step(bones[s : s + 25], 25.0, state)
        parts.append(out)
    assert torch.allclose(torch.cat(parts), whole, atol=1e-6)


def posed_in(tpl, hs, name: str):
    """The template at rest with both hands in the shape `name`."""
    w = torch.zeros(1, 2, len(hs.order))
    w[0, :, hs.order.index(name)] = 1
    pose = torch.zeros(1, tpl.num_bones, 3)
    pose[0, [tpl.bone_names.index(n) for n in hs.names]] = hs.rotations(w)[0]
    return tpl(tpl.default_shape()[None], pose=pose)


def test_flexion_closes_the_hand_and_open_opens_it(shaper):
    """Fingertips nearer the palm's centre in a fist-like beat than in an open palm: the axes
    turn the fingers towards the palm, not away from it."""
    tpl, hs = shaper
    tips = [tpl.hand_landmarks["left"][f"{f}_tip"] for f in ("index", "middle", "ring", "pinky")]
    spread = {}
    for name in ("open", "beat"):
        out = posed_in(tpl, hs, name)
        tip = torch.stack([tpl.landmarks(out, {"t": lm})[0, 0] for lm in tips])
        j = out.joints[0]
        palm = (j[tpl.bone_names.index("finger2-1.L")] + j[tpl.bone_names.index("finger5-1.L")]
                + j[tpl.bone_names.index("wrist.L")]) / 3  # fmt: skip
        spread[name] = (tip - palm).norm(dim=-1).mean().item()
    assert spread["beat"] < 0.8 * spread["open"], spread


def test_drive_moves_the_fingers_while_talking():
    from avatar.pipelines.drive import DriveConfig, Driver
    from avatar.scenes import demo_speech
    from deform.audio import load_audio
    from deform.hands import HandState

    drv = Driver(template_avatar(3000), DriveConfig(size=64, framing="upper"))
    x = np.concatenate([np.zeros(32000, np.float32), load_audio(demo_speech()).samples[:80000]])
    with torch.no_grad():
        motion, _ = drv.model(torch.from_numpy(x), drv.tokens, drv.model.start(drv.tokens),
                              175, 25.0)  # fmt: skip
        fingers, state = drv.rig.hands.step(motion.bones, 25.0, HandState())
    assert sum(state.beats) >= 2
    change = fingers.diff(dim=0).norm(dim=-1).sum(-1)  # [T-1] finger motion per frame
    assert change[60:].sum() > 5 * change[5:45].sum() + 1e-3  # speech, not the first silence


def test_the_hands_are_mirror_images(shaper):
    """The open palm fans both hands' fingers out alike (spread turns towards the pinky on
    either hand), wider than the relaxed curl."""
    tpl, hs = shaper
    fan = {}
    for name in ("relaxed", "open"):
        out = posed_in(tpl, hs, name)
        for side in ("left", "right"):
            tips = tpl.landmarks(out, {k: tpl.hand_landmarks[side][k]
                                       for k in ("index_tip", "pinky_tip")})[0]  # fmt: skip
            fan[name, side] = (tips[0] - tips[1]).norm().item()
    assert abs(fan["open", "left"] - fan["open", "right"]) < 0.03 * fan["open", "left"], fan
    assert fan["open", "left"] > 1.1 * fan["relaxed", "left"], fan
