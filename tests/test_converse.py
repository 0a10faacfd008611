"""Conversation: speech masks, the conversational model, the listening teacher, the shipped
weights on held-out conversations, and `avatar converse` end to end with its bad inputs."""

from __future__ import annotations

import importlib.util
import json
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from deform.audio import SAMPLE_RATE, AudioError, load_audio
from deform.controls import blinks
from deform.conversation import (
    FEATURES,
    NUM_COARSE,
    ConverseConfig,
    ConverseModel,
    load_converse,
    save_converse,
    temporal_bias,
)
from deform.voice import conversation_tracks, phrases, speech_probability
from distill import converse_measures as cm
from distill.phones import espeak_available

from .helpers import avatar_in_process
from .test_drive import run_avatar, video_info

DEMO_SPEECH = Path(__file__).resolve().parent.parent / "avatar" / "data" / "demo_speech.flac"
needs_espeak = pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed "
                                  "(apt-get install espeak-ng; .ci/run does)")  # fmt: skip


def write_stereo(path: Path, left: np.ndarray, right: np.ndarray, rate: int = SAMPLE_RATE):
    pcm = (np.stack([left, right], 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return load_audio(DEMO_SPEECH).samples


@pytest.fixture(scope="module")
def held_out():
    """A held-out conversation (sentences and voices the model never trained on), both sides."""
    if not espeak_available():
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng; .ci/run does)")
    from distill.train_converse import HELD_OUT_SEED, HELD_OUT_SENTENCES, examples

    return examples([HELD_OUT_SEED + 17], HELD_OUT_SENTENCES, 25.0)


# ---- speech masks and tracks -------------------------------------------------------------------
def test_speech_probability_finds_the_speech(speech):
    num = int(len(speech) / SAMPLE_RATE * 25)
    prob = speech_probability(speech, num, 25.0)
    assert prob.shape == (num,) and prob.dtype == np.float32
    assert prob[:8].max() < 0.3  # the clip starts with 0.5 s of silence
    assert np.median(prob[20:-20]) > 0.8
    silence = speech_probability(np.zeros(SAMPLE_RATE * 2, np.float32), 50, 25.0)
    assert silence.max() < 0.2


def test_phrases_bridge_short_gaps_and_drop_blips():
    prob = np.zeros(200)
    prob[10:40] = 1  # 1.2 s
    prob[43:60] = 1  # a 3-frame gap: the same phrase
    prob[100:105] = 1  # 0.2 s: too short
    prob[150:190] = 1
    assert phrases(prob, 25.0) == [(10, 60), (150, 190)]


def test_tracks_two_files_stereo_and_bad_input(tmp_path, speech, caplog):
    from .test_drive import write_wav

    own = write_wav(tmp_path / "own.wav", speech)
    partner = write_wav(tmp_path / "partner.wav", speech[: len(speech) // 2], rate=16000)
    with caplog.at_level("WARNING"):
        t = conversation_tracks(own, partner)
    assert len(t.own) == len(t.partner) == len(speech)
    assert "padded with silence" in caplog.text
    assert np.abs(t.partner[len(speech) // 2 + 10 :]).max() == 0

    stereo = write_stereo(tmp_path / "s.wav", speech, -0.5 * speech, rate=22050)
    right = conversation_tracks(stereo, channel="right")
    assert np.abs(right.own).max() < np.abs(right.partner).max()  # the right channel was quieter
    # the samples were declared as 22.05 kHz: a shorter clip, resampled to 16 kHz
    assert abs(len(right.own) - len(speech) * SAMPLE_RATE / 22050) < 400
    with pytest.raises(AudioError, match="needs a stereo file"):
        conversation_tracks(own, channel="left")
    with pytest.raises(AudioError, match="give the partner"):
        conversation_tracks(own)
    silent = write_stereo(tmp_path / "half.wav", np.zeros_like(speech), speech)
    with pytest.raises(AudioError, match="left channel is silent"):
        conversation_tracks(silent, channel="left")
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(AudioError, match="empty"):
        conversation_tracks(empty, channel="left")


def test_blinks_come_faster_where_the_rate_is_higher():
    num = 25 * 60
    base = blinks(num, 25.0, seed=3)
    fast = blinks(num, 25.0, seed=3, rate=np.full(num, 2.0))
    count = lambda w: int(((w > 0.5) & ~np.r_[False, w[:-1] > 0.5]).sum())  # noqa: E731
    assert count(fast) > 1.6 * count(base)
    rate = np.linspace(1, 2, num)  # chunk-exact with a varying rate too
    parts = [blinks(25, 25.0, 3, s, rate) for s in range(0, num, 25)]
    assert np.array_equal(np.concatenate(parts), blinks(num, 25.0, 3, 0, rate))


# ---- the model --------------------------------------------------------------------------------------
def small_model(**kw) -> ConverseModel:
    torch.manual_seed(0)
    return ConverseModel(ConverseConfig(dim=16, audio_dim=8, window=16, **kw)).eval()


def stream(model, own, partner, pp, chunk, seed=3):
    state, out = model.start(seed), []
    for i in range(0, len(own), chunk):
        o, state = model.step(state, own[i : i + chunk], partner, pp[i : i + chunk])
        out.append(o)
    return torch.cat(out)


def test_temporal_bias_peaks_at_the_delay():
    cfg = ConverseConfig()
    bias = temporal_bias(cfg)  # [heads, W], oldest partner frame first
    delay = cfg.window - 1 - bias.argmax(1)  # frames back from now
    assert torch.all((delay - cfg.delay_s * cfg.fps).abs() <= 0.5)
    wide, narrow = bias[-1], bias[0]  # the widest kernel falls off slowest
    assert (wide.max() - wide[0]) < (narrow.max() - narrow[0])


def test_streaming_is_chunk_exact_causal_and_seeded():
    model = small_model()
    rng = np.random.default_rng(0)
    partner = (rng.standard_normal(SAMPLE_RATE * 3) * 0.1).astype(np.float32)
    own, pp = torch.rand(60), torch.rand(60)
    a = stream(model, own, partner, pp, 25)
    assert a.shape == (60, len(FEATURES))
    assert torch.equal(a, stream(model, own, partner, pp, 7))
    assert not torch.allclose(a, stream(model, own, partner, pp, 25, seed=4))
    cut = partner.copy()
    cut[SAMPLE_RATE * 3 // 2 :] = 0  # change the partner from 1.5 s on
    b = stream(model, own, cut, pp, 25)
    first = int(torch.nonzero((a - b).abs().amax(1) > 1e-6)[0])
    assert 1.5 - 0.0925 - 0.04 <= first / 25 < 1.5  # only the encoder's look-ahead reaches back


def test_a_nod_moves_head_and_neck_along_the_nod_curve():
    from deform.conversation import nod_curve

    model = small_model()
    with torch.no_grad():
        model.nod_head[-1].weight.zero_()
        model.nod_head[-1].bias.copy_(torch.tensor([-30.0, 0.1, -20.0]))  # no nod starts
    silence = np.zeros(SAMPLE_RATE, np.float32)
    still = model.start(3)
    nodding = model.start(3)
    nodding.nods = [(0, 0.1)]  # a nod of 0.1 rad starting at frame 0
    a, _ = model.step(still, torch.zeros(5), silence, torch.zeros(5))
    b, state = model.step(nodding, torch.zeros(5), silence, torch.zeros(5))
    # frames 0-4 ease toward the same coarse key: the difference is the nod alone
    want = 0.1 * nod_curve(torch.arange(5) / 25.0)
    assert torch.allclose(b[:, FEATURES.index("head.x")] - a[:, FEATURES.index("head.x")], want,
                          atol=1e-5)  # fmt: skip
    assert torch.allclose(b[:, FEATURES.index("neck02.x")] - a[:, FEATURES.index("neck02.x")],
                          want / 2, atol=1e-5)  # fmt: skip
    assert state.nods == [(0, 0.1)]  # still moving at 0.2 s; gone after 0.48 s
    _, later = model.step(state, torch.zeros(8), silence, torch.zeros(8))
    assert later.nods == []


def test_two_streams_see_each_other_up_to_the_frame_before():
    """step_pair: each avatar attends to what the other shows; a change in what B shows at
    frame 10 reaches A from frame 11 on, never earlier, and chunking does not matter."""
    model = small_model(partner_motion=True)
    rng = np.random.default_rng(2)
    voices = [(rng.standard_normal(SAMPLE_RATE * 2) * 0.1).astype(np.float32) for _ in range(2)]
    owns = [torch.rand(30), torch.rand(30)]
    w = torch.zeros(30, len(FEATURES))
    w[10] = 1.0  # frame 10: B shows `y` instead of its own features

    def run(y_b, chunk=30):
        states, rows = [model.start(3), model.start(4)], [[], []]
        for s in range(0, 30, chunk):
            shown = [(torch.zeros(chunk, len(FEATURES)), torch.zeros(chunk, len(FEATURES))),
                     (w[s : s + chunk], y_b[s : s + chunk])]  # fmt: skip
            outs, states = model.step_pair(states, [o[s : s + chunk] for o in owns], voices,
                                           shown=shown)  # fmt: skip
            for k in range(2):
                rows[k].append(outs[k])
        return [torch.cat(r) for r in rows]

    a, b = run(torch.zeros(30, len(FEATURES)))
    a2, b2 = run(torch.full((30, len(FEATURES)), 0.3))
    changed = torch.nonzero((a - a2).abs().amax(1) > 1e-6)[:, 0]
    assert len(changed) and int(changed[0]) == 11
    assert torch.equal(b[:11], b2[:11])  # B's own features are its own until A answers
    assert torch.equal(run(torch.zeros(30, len(FEATURES)), chunk=10)[0], a)
    # the same model apart (one avatar: the partner's motion unknown) is another motion
    apart = stream(model, owns[0], voices[1], owns[1], 30, seed=3)
    assert not torch.allclose(apart, a)


def test_stage_one_ignores_the_partner_audio():
    model = small_model(partner_audio=False)
    rng = np.random.default_rng(1)
    own, pp = torch.rand(30), torch.rand(30)
    a = stream(model, own, rng.standard_normal(SAMPLE_RATE * 2).astype(np.float32), pp, 30)
    b = stream(model, own, np.zeros(SAMPLE_RATE * 2, np.float32), torch.zeros(30), 30)
    assert torch.equal(a, b)


def test_training_loss_falls_and_checkpoints_round_trip(tmp_path):
    model = small_model().train()
    x = torch.randn(2, 40, len(FEATURES)).cumsum(1) * 0.1
    own = torch.rand(2, 40)
    tokens = torch.randn(2, model.cfg.window - 1 + 40, model.token_width)
    onsets = torch.zeros(2, 40)
    onsets[:, [7, 30]] = 1
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(40):
        loss = sum(model.loss(x, own, tokens, x[..., :NUM_COARSE], onsets, 0.1 * onsets).values())
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < first - 0.5
    save_converse(model, tmp_path / "c.safetensors")
    back = load_converse(tmp_path / "c.safetensors")
    assert back.cfg == model.cfg
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k])
    other = ConverseModel(ConverseConfig(dim=16, audio_dim=8, window=16, heads=4))
    save_converse(other, tmp_path / "ok.safetensors")
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "ok.safetensors"))
    state.pop("gate.bias")
    save_file(state, str(tmp_path / "bad.safetensors"), metadata={"config": other.cfg.to_json()})
    with pytest.raises(ValueError, match="gate.bias"):
        load_converse(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="no conversation-model checkpoint"):
        load_converse(tmp_path / "missing.safetensors")


# ---- the teacher and the measures ----------------------------------------------------------------
def test_measures_find_nods_and_compare_distributions():
    fps, num = 25.0, 250
    x = np.zeros((num, len(FEATURES)))
    from deform.conversation import nod_curve

    t = np.arange(num) / fps
    x[:, 0] = 0.1 * nod_curve(t - 4.4)  # a nod 0.4 s after the partner stops at 4.0 s
    partner = np.zeros(num)
    partner[25:100] = 1
    own = np.zeros(num)
    assert cm.reaction_delays(x, own, partner, fps) == [pytest.approx(0.4, abs=0.08)]
    own[100:115] = 1  # the avatar takes the turn at once: no nod expected
    assert cm.reaction_delays(x, own, partner, fps) == []
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2000, 3)), rng.standard_normal((2000, 3))
    assert cm.frechet(a, b) < 0.05 < cm.frechet(a, b + 1.0)
    centres = cm.kmeans(a, 8)
    assert cm.sid(a, centres) > 2.5 > cm.sid(np.zeros((50, 3)), centres)


def test_teacher_mirrors_the_speaker_and_the_measure_finds_it():
    """The two-stream teacher: a listener takes up the speaker's posture (roll mirrored) and
    follows its glances (yaw mirrored), each at its lag; the measure finds both, and nothing
    in a listener that does not see the speaker."""
    from distill.listen_teacher import TAKEN, mirrored

    fps, num = 25.0, 500
    t = np.arange(num) / fps
    rng = np.random.default_rng(0)
    speaker = np.zeros((num, len(FEATURES)), np.float32)
    for name in (*cm.MIRRORED, *cm.FOLLOWED):
        speaker[:, FEATURES.index(name)] = 0.05 * np.sin(2 * np.pi * t / rng.uniform(2, 4))
    listener = (0.01 * rng.standard_normal((num, len(FEATURES)))).astype(np.float32)
    own, partner = np.zeros(num), np.ones(num)  # it listens, the partner speaks throughout
    x = mirrored(listener, speaker, own, partner, fps)
    for (features, gain, lag_s, _), name in zip(TAKEN, ("head.z", "gazeYaw"), strict=True):
        i, lag = FEATURES.index(name), int(lag_s * fps)
        moved = x[lag + 10 :, i] - listener[lag + 10 :, i]
        assert np.allclose(moved, -gain * speaker[10:-lag, i], atol=3e-3), name  # mirrored
        found = cm.mirroring(x, speaker, own, partner, fps, features)
        assert found["peak"] > 0.8 and abs(found["lag_s"] - lag_s) <= 0.2, name
        assert cm.mirroring(listener, speaker, own, partner, fps, features)["peak"] < 0.3


@needs_espeak
def test_teacher_listens_with_a_closed_mouth_and_nods_on_time(held_out):
    for ex in held_out:
        s = cm.summary(ex.x, ex.own_prob, ex.partner_prob, 25.0)
        assert s["jaw_listening_over_speaking"] < 0.1
        assert 0.25 <= s["reaction_delay_median_s"] <= 0.7
        assert s["head_speed_ratio"] > 0.2


@needs_espeak
def test_shipped_model_listens_on_a_held_out_conversation(held_out):
    """The shipped weights, run as converse runs them, on a conversation they never saw."""
    from distill.train_converse import generate

    model = load_converse()
    for ex in held_out:
        x = generate(model, ex, seed=1)
        s = cm.summary(x, ex.own_prob, ex.partner_prob, 25.0)
        assert s["head_speed_ratio"] >= 0.3
        assert s["longest_still_listening_s"] <= 2.0
        assert 0.2 <= s["reaction_delay_median_s"] <= 0.8
        listen = cm.roles(ex.own_prob, ex.partner_prob)[1]
        other = generate(model, ex, seed=2)
        assert np.abs(x - other)[listen, :NUM_COARSE].mean() > 0.005  # seeds differ


@needs_espeak
def test_shipped_model_follows_the_other_avatars_glances(held_out):
    """Both sides of a held-out conversation stepped together: each listener's eyes follow
    where the speaker glances (the teacher's joint attention, learnt through the streams'
    cross-attention); stepped apart, with the same seeds, they do not."""
    from distill.train_converse import generate, generate_pair

    model = load_converse()
    together = generate_pair(model, held_out[0], held_out[1], seed=1)
    apart = [generate(model, held_out[0], seed=1), generate(model, held_out[1], seed=2)]
    for k, ex in enumerate(held_out):
        seen = cm.mirroring(together[k], together[1 - k], ex.own_prob, ex.partner_prob, 25.0,
                            cm.FOLLOWED)  # fmt: skip
        unseen = cm.mirroring(apart[k], apart[1 - k], ex.own_prob, ex.partner_prob, 25.0,
                              cm.FOLLOWED)  # fmt: skip
        assert seen["peak"] >= 0.4 and seen["peak"] > unseen["peak"] + 0.2, (seen, unseen)


# ---- the CLI ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small(tmp_path_factory):
    from .helpers import template_avatar

    path = tmp_path_factory.mktemp("converse") / "t.avatar"
    template_avatar(3000).save(path)
    return path


def test_a_listener_closes_the_lips(small, speech):
    """While it listens, the deformer's lip actions are mixed LISTEN_LIPS of the way toward
    LIPS_MEET (through the particles and the lip bases): the lip Gaussians come together."""
    pytest.importorskip("anny", reason="converse needs the Anny template")
    from avatar.asset import Avatar
    from avatar.pipelines.drive import DriveConfig, Driver
    from deform.controls import LIPS_MEET, lip_actions
    from deform.listener import LISTEN_LIPS, Listener
    from reconstruct.canonical import PART_CODES

    avatar = Avatar.load(small)
    driver = Driver(avatar, DriveConfig(size=64, framing="face"))
    n = 25
    silent = np.zeros(SAMPLE_RATE, np.float32)  # its own track says nothing: it listens
    listener = Listener(load_converse(), np.zeros(n), speech[:SAMPLE_RATE], np.ones(n), 25.0)
    assert torch.allclose(listener.closed_lips(0, n), torch.full((n,), LISTEN_LIPS))
    seen = []
    model = driver.model
    real = model.forward

    def spy(*args, **kwargs):
        motion, state = real(*args, **kwargs)
        seen.append(motion.lips)
        return motion, state

    model.forward = spy
    try:
        listening = list(driver.posed(silent, n, listener))
        quiet = list(driver.posed(silent, n))
    finally:
        del model.forward
    meet = lip_actions(LIPS_MEET)
    rest = seen[1]  # the lip actions heard in silence, without the listener
    assert torch.allclose(seen[0], (1 - LISTEN_LIPS) * rest + LISTEN_LIPS * meet, atol=1e-5)
    lips = torch.nonzero(driver.rig.parts.long() == PART_CODES["lips"]).flatten()
    mid = driver.rig.gaussians.means[lips, 1].median()
    upper, lower = (
        lips[driver.rig.gaussians.means[lips, 1] > mid],
        lips[driver.rig.gaussians.means[lips, 1] <= mid],
    )

    def gap(frames):  # upper lip's centre over the lower lip's, mean over the last half
        return np.mean([float(g.means[upper, 1].mean() - g.means[lower, 1].mean())
                        for g in frames[n // 2 :]])  # fmt: skip

    assert gap(listening) < gap(quiet) - 5e-4, (gap(listening), gap(quiet))


def test_converse_end_to_end_with_a_report(small, tmp_path, speech):
    pytest.importorskip("anny", reason="converse needs the Anny template")
    n = SAMPLE_RATE * 2
    own = np.concatenate([speech[: n // 2 + 8000], np.zeros(n // 2 - 8000, np.float32)])
    partner = np.concatenate([np.zeros(n // 2, np.float32), speech[8000 : 8000 + n // 2]])
    stereo = write_stereo(tmp_path / "call.wav", own, partner)
    out, report = tmp_path / "call.mp4", tmp_path / "call.json"
    res = run_avatar("converse", str(small), "--audio", str(stereo), "--channel", "left",
                     "-o", str(out), "--report", str(report), "--size", "64", "--framing", "face")  # fmt: skip
    assert res.returncode == 0, res.stderr
    frames, audio_s, codecs = video_info(out)
    assert frames == 50 and abs(audio_s - 2.0) < 0.1 and codecs == ("h264", "aac")
    data = json.loads(report.read_text())
    assert len(data["motion"]) == 50 and data["features"] == list(FEATURES)
    assert np.mean(data["own_speech_probability"][:20]) > np.mean(
        data["own_speech_probability"][30:]
    )
    # the grey template has no face MediaPipe finds: the measure says so, and how to get one
    res = run_avatar("eval", "converse", str(out), "--report", str(report), "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    doc = json.loads(res.stdout)
    assert doc["face_found_fraction"] < 0.9 and doc["pass"]["face_found"] is False
    assert "--framing face" in res.stderr


def test_converse_bad_input_writes_nothing(small, tmp_path, speech):
    from .test_drive import write_wav

    own = write_wav(tmp_path / "own.wav", speech[:16000])
    out = tmp_path / "x.mp4"
    cases = [
        (("--audio", str(own), "--channel", "left"), "needs a stereo file"),
        (("--audio", str(own)), "give the partner"),
        (("--audio", str(own), "--partner", str(write_wav(tmp_path / "z.wav",
                                                             np.zeros(16000, np.float32)))),
         "partner's track is silent"),
        (("--audio", str(own), "--partner", str(tmp_path / "none.wav")), "no such file"),
    ]  # fmt: skip
    for args, message in cases:
        res = avatar_in_process("converse", str(small), *args, "-o", str(out), "--size", "32")
        assert res.returncode != 0 and message in res.stderr, res.stderr
        assert "Traceback" not in res.stderr
        assert not out.exists() and not list(tmp_path.glob(".x*"))


# ---- a mixed recording split into its speakers -------------------------------------------------------
ALSA = Path("/usr/share/sounds/alsa")


@pytest.fixture(scope="module")
def real_voices():
    """Two real voices taking turns (alsa-utils' English phrases, the shared Mandarin clip):
    (first speaker's track, second's), each silent while the other speaks."""
    from .helpers import SHARED_DATA

    mandarin = SHARED_DATA / "speech_mandarin_good.wav"
    if not (ALSA / "Front_Left.wav").is_file():
        pytest.skip("alsa-utils' voice recordings are not installed (.ci/run installs them)")
    if not mandarin.is_file():
        pytest.skip(f"{mandarin} is absent (the project's shared test data)")
    if importlib.util.find_spec("resemblyzer") is None:
        pytest.skip("the diarize extra (resemblyzer's weights) is not installed")
    phrases_ = [load_audio(ALSA / f"{n}.wav").samples for n in
                ("Front_Left", "Front_Right", "Rear_Center", "Rear_Left")]  # fmt: skip
    other = load_audio(mandarin).samples
    gap = np.zeros(SAMPLE_RATE * 2 // 5, np.float32)
    turns = [(0, phrases_[0]), (1, other[: len(other) // 2]), (0, phrases_[1]),
             (0, phrases_[2]), (1, other[len(other) // 2 :]), (0, phrases_[3])]  # fmt: skip
    tracks = [[], []]
    for who, x in turns:
        tracks[who] += [x, gap]
        tracks[1 - who] += [np.zeros_like(x), gap]
    return np.concatenate(tracks[0]), np.concatenate(tracks[1])


def test_a_mixed_recording_splits_into_its_two_real_voices(real_voices):
    from deform.speakers import diarization_error, diarize, reference_turns, speaker_tracks

    first, second = real_voices
    d = diarize(first + second)
    assert diarization_error(d.labels, reference_turns(first, second)) <= 0.2
    a, b = speaker_tracks(first + second, d)
    # speaker 1 is who speaks first: its track holds the first voice, little of the second
    assert np.abs(a * (first != 0)).sum() > 20 * np.abs(a * (second != 0)).sum()
    assert np.abs(b * (second != 0)).sum() > 20 * np.abs(b * (first != 0)).sum()


def test_one_voice_is_not_split_in_two(real_voices):
    from deform.speakers import DiarizationError, diarize

    first, _ = real_voices
    with pytest.raises(DiarizationError, match="found one speaker"):
        diarize(first)


def test_converse_takes_a_speaker_of_a_mixed_recording(small, tmp_path, real_voices):
    from .test_drive import write_wav

    first, second = real_voices
    mixed = write_wav(tmp_path / "mixed.wav", first + second)
    res = run_avatar("converse", str(small), "--audio", str(mixed), "--speaker", "2", "-o",
                     str(tmp_path / "x.mp4"), "--size", "32", "--report", str(tmp_path / "x.json"))  # fmt: skip
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "x.json").read_text())
    own = np.array(report["own_speech_probability"])  # the avatar is the second voice
    assert own[: int(0.9 * 25)].max() < 0.5 and own.max() > 0.9
    alone = write_wav(tmp_path / "alone.wav", first)
    res = avatar_in_process("converse", str(small), "--audio", str(alone), "--speaker", "1",
                            "-o", str(tmp_path / "y.mp4"), "--size", "32")  # fmt: skip
    assert res.returncode != 0 and "found one speaker" in res.stderr
    assert not (tmp_path / "y.mp4").exists()


# ---- two avatars in one scene ---------------------------------------------------------------------
def test_layouts_follow_the_text():
    from avatar.layout import layout_from_text, toward

    side, facing, table = (layout_from_text(t) for t in ("side by side", "facing each other",
                                                          "across a table"))  # fmt: skip
    assert (side.layout.name, facing.layout.name, table.layout.name) == (
        "side-by-side", "facing", "across-a-table")  # fmt: skip
    # side by side: close and both turned little from the camera; facing: turned to each other
    assert side.distance < facing.distance < table.distance
    assert side.placements[0].yaw_deg < 30 < 80 < facing.placements[0].yaw_deg
    assert layout_from_text("facing each other across a table, 2 m apart").layout.name == (
        "across-a-table"
    )
    assert layout_from_text("three feet apart, face to face").distance == pytest.approx(0.914, 1e-3)
    assert layout_from_text("at social distance").distance == 1.6
    assert layout_from_text(None).layout.name == "at-an-angle"
    a, b = facing.placements
    yaw, pitch = toward(a, (b.x, 1.6, b.z), (a.x, 1.6, a.z))
    assert abs(yaw) < 1e-6 and pitch == 0  # facing each other: the partner is straight ahead
    from avatar.errors import AvatarError

    with pytest.raises(AvatarError, match="outside"):
        layout_from_text("side by side, 20 m apart")


def test_two_avatars_in_one_scene(small, tmp_path, speech):
    n = SAMPLE_RATE * 2
    first = np.concatenate([speech[8000 : 8000 + n // 2], np.zeros(n // 2, np.float32)])
    second = np.concatenate([np.zeros(n // 2, np.float32), speech[40000 : 40000 + n // 2]])
    stereo = write_stereo(tmp_path / "call.wav", first, second)
    out, report = tmp_path / "scene.mp4", tmp_path / "scene.json"
    res = run_avatar("converse", str(small), str(small), "--audio", str(stereo), "--channel",
                     "left", "--layout", "facing each other", "-o", str(out), "--report",
                     str(report), "--size", "64")  # fmt: skip
    assert res.returncode == 0, res.stderr
    frames, audio_s, _ = video_info(out)
    assert frames == 50 and abs(audio_s - 2.0) < 0.1
    data = json.loads(report.read_text())
    assert data["layout"] == "facing" and len(data["frames_detail"]) == 50
    # while one listens, its head faces the other's head (the report's skeleton measure)
    assert data["listening_head_to_speaker_deg_2"] < 20
    from avatar.evaluate import read_frames

    frame = next(iter(read_frames(out)))
    dark = (frame.mean(-1) < 200).nonzero()[1]  # both bodies: one left, one right of the middle
    assert (dark < 28).any() and (dark > 36).any()
    res = avatar_in_process("converse", str(small), "--audio", str(stereo), "--channel",
                            "left", "--layout", "side by side",
                            "-o", str(tmp_path / "x.mp4"))  # fmt: skip
    assert res.returncode != 0 and "give two" in res.stderr


def test_two_faces_in_one_video_are_told_apart(tmp_path):
    """The two-avatar mouth measure on a video of two still faces side by side: both found,
    the left one is the first avatar's, and still mouths give no own-over-other contrast; with
    the right half empty, both faces are not found."""
    from avatar.evaluate import converse_metrics
    from avatar.media import write_video
    from avatar.photo import read_photo

    from .helpers import SHARED_DATA

    photo = SHARED_DATA / "man_halfbody_generated.png"
    if not photo.is_file():
        pytest.skip(f"{photo} is absent (the project's shared test data)")
    face = read_photo(photo).rgb[:512, 256:768][::2, ::2]  # 256 x 256
    frame = np.concatenate([face, face[:, ::-1]], 1).copy()
    write_video(tmp_path / "two.mp4", [frame] * 20, fps=25.0)
    half = [1.0] * 10 + [0.0] * 10
    report = tmp_path / "two.json"
    report.write_text(json.dumps({"speech_probability_1": half,
                                  "speech_probability_2": half[::-1]}))  # fmt: skip
    m = converse_metrics(tmp_path / "two.mp4", report)
    assert m["both_faces_found_fraction"] == 1.0 and m["pass"]["both_faces_found"]
    assert m["both_meshes_found_fraction"] == 1.0
    for k in (1, 2):
        assert m[f"own_over_other_{k}"] == pytest.approx(1.0, abs=0.15)
    assert not m["pass"]["right_mouth_moves"]
    frame[:, 256:] = 255  # one face: the left
    write_video(tmp_path / "one.mp4", [frame] * 20, fps=25.0)
    m = converse_metrics(tmp_path / "one.mp4", report)
    assert m["both_faces_found_fraction"] == 0.0 and not m["pass"]["both_faces_found"]


def test_a_wide_two_shot_frames_both_larger_than_a_square(small):
    """The two-shot fits the pair (chest up) to the frame's width or height, whichever binds:
    in a 16:9 frame they fill its width, larger than in a square of the same height."""
    from avatar.asset import Avatar
    from avatar.layout import layout_from_text
    from avatar.pipelines.drive import DriveConfig, Driver
    from avatar.pipelines.pair import build_scene, scene_cameras

    driver = Driver(Avatar.load(small), DriveConfig(size=64))
    members = build_scene([driver, driver], layout_from_text("side by side"))
    heads = torch.stack([m.head()[0] for m in members])
    spans = {}
    for w, h in ((96, 54), (54, 54)):
        cam = scene_cameras(members, "two-shot", w, h, 10)
        assert len(cam) == 1 and (cam.width, cam.height) == (w, h)
        uv = cam.project(heads)[0]
        assert ((uv >= 0) & (uv <= torch.tensor([w, h]))).all()  # both heads in the frame
        assert uv[0, 0] < w / 2 < uv[1, 0]  # the first avatar on the left
        spans[w] = float(uv[1, 0] - uv[0, 0])
    assert spans[96] > 1.3 * spans[54]


def test_scene_cameras_frame_both_and_look_over_a_shoulder(small):
    from avatar.asset import Avatar
    from avatar.layout import layout_from_text
    from avatar.pipelines.drive import DriveConfig, Driver
    from avatar.pipelines.pair import Member, build_scene, scene_cameras

    driver = Driver(Avatar.load(small), DriveConfig(size=64))
    members = build_scene([driver, driver], layout_from_text("facing each other"))
    for m in members:  # feet on the ground
        with torch.no_grad():
            feet = m.place(driver.rig.still()).means[:, 1].quantile(0.002)
        assert abs(float(feet)) < 0.01
    assert len(scene_cameras(members, "orbit", 64, 64, 10)) == 10
    # a member's placement folded into its skinning puts every posed Gaussian where `place`
    # moves it (the two-avatar loop poses them in the scene directly)
    from render.rotations import quat_to_rotmat

    with torch.no_grad():
        x = torch.randn(16000, generator=torch.Generator().manual_seed(1)) * 0.1
        motion, _ = driver.model(x, driver.tokens, driver.model.start(driver.tokens), 5, 25.0)
        blink = torch.linspace(0, 1, 5)
        body = list(driver.rig.posed_frames(motion, blink))
        scene = list(driver.rig.posed_frames(motion, blink, root=members[1].matrix()))
    for g, want in zip(scene, (members[1].place(g) for g in body), strict=True):
        assert torch.allclose(g.means, want.means, atol=1e-5)
        # a blended (not orthonormal) skinning matrix's quaternion is not exactly equivariant
        # under the turn: the same rotation to within a degree where the blend skews most
        turn = (quat_to_rotmat(g.quats) - quat_to_rotmat(want.quats)).abs().amax(dim=(1, 2))
        assert turn.median() < 1e-5 and turn.max() < 0.02, turn.max()
        assert torch.equal(g.sh, want.sh) and torch.equal(g.opacity_logits, want.opacity_logits)
    # the head by forward kinematics alone equals the template's full forward (mesh skinned)
    from deform.controls import DRIVEN_BONES, compose_pose

    deltas = 0.3 * torch.randn(5, 9, generator=torch.Generator().manual_seed(0))
    position, facing = members[1].head(deltas)
    rig, turn = driver.rig, members[1].rotation()
    bones = torch.zeros(5, len(DRIVEN_BONES), 3)
    bones[:, :3] = deltas.reshape(5, 3, 3)
    with torch.no_grad():
        full = rig.template(rig.shape[None].expand(5, -1),
                            pose=compose_pose(rig.base_pose, rig.driven, bones))  # fmt: skip
    i = rig.template.bone_names.index("head")
    assert torch.allclose(position, full.joints[:, i] @ turn.T + members[1].offset(), atol=1e-5)
    assert torch.allclose(facing, full.transforms[:, i, :3, 2] @ turn.T, atol=1e-5)
    a_head, b_head = members[0].head()[0], members[1].head()[0]
    # the turn toward the other is from where the photo's head faces: a head already turned
    # 0.3 rad to its left needs 0.3 rad less to the left
    straight = members[1].turn_toward(a_head)
    turned = Member(Driver(Avatar.load(small), DriveConfig(size=64)), members[1].placement,
                    members[1].lift)  # fmt: skip
    head_bone = turned.driver.rig.template.bone_names.index("head")
    turned.driver.rig.base_pose[head_bone, 1] += 0.3  # +y: toward the avatar's left
    yaw, pitch = turned.turn_toward(a_head)
    assert yaw == pytest.approx(straight[0] - 0.3, abs=0.02)
    assert pitch == pytest.approx(straight[1], abs=0.02)
    for kind, near, far in (
        ("over-shoulder-a", a_head, b_head),
        ("over-shoulder-b", b_head, a_head),
    ):
        cam = scene_cameras(members, kind, 64, 64, 10)
        view = cam.viewmats[0]
        eye = -view[:3, :3].T @ view[:3, 3]  # the camera centre in the scene
        assert (eye - near).norm() < 1.0 < (eye - far).norm()
        far_cam = view[:3, :3] @ far + view[:3, 3]
        assert far_cam[2] > 0 and abs(float(far_cam[0] / far_cam[2])) < 0.05  # looks at the other
    from avatar.errors import AvatarError

    with pytest.raises(AvatarError, match="--camera"):
        scene_cameras(members, "drone", 64, 64, 10)
