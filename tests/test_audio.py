"""Loading speech: formats, rates, channels -> 16 kHz mono, and clear errors for bad files."""

from __future__ import annotations

import wave

import numpy as np
import pytest

from .helpers import SHARED_DATA

av = pytest.importorskip("av", reason="audio loading needs PyAV")

from deform.audio import AudioError, load_audio  # noqa: E402


def _tone(rate: int, seconds: float, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return 0.5 * np.sin(2 * np.pi * freq * t)


def _write_wav(path, samples: np.ndarray, rate: int) -> None:  # samples [S] or [S, C] in [-1, 1]
    data = samples if samples.ndim == 2 else samples[:, None]
    with wave.open(str(path), "wb") as w:
        w.setnchannels(data.shape[1])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((data * 32767).astype("<i2").tobytes())


def _encode(path, samples: np.ndarray, rate: int, codec: str) -> None:
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(
            samples.astype(np.float32)[None], format="flt", layout="mono"
        )
        frame.sample_rate = rate
        frame.pts = 0
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


def _peak_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[spectrum.argmax()])


def test_wav_stereo_44k_becomes_16k_mono(tmp_path):
    left = _tone(44100, 2.0)
    _write_wav(tmp_path / "s.wav", np.stack([left, 0.5 * left], -1), 44100)
    audio = load_audio(tmp_path / "s.wav")
    assert audio.sample_rate == 16000 and audio.source_rate == 44100 and audio.source_channels == 2
    assert audio.samples.dtype == np.float32 and audio.samples.ndim == 1
    assert abs(audio.duration_s - 2.0) < 0.02
    assert abs(_peak_hz(audio.samples, 16000) - 440) < 2
    assert 0.3 < np.abs(audio.samples[4000:-4000]).max() < 0.45  # mono = mean of the channels


@pytest.mark.parametrize(
    "ext, codec, rate",
    [(".flac", "flac", 22050), (".ogg", "libopus", 48000), (".mp3", "libmp3lame", 22050),
     (".m4a", "aac", 44100)],
)  # fmt: skip
def test_compressed_formats(tmp_path, ext, codec, rate):
    try:
        av.codec.Codec(codec, "w")
    except Exception:
        pytest.skip(f"this FFmpeg build has no {codec} encoder to make the test file")
    path = tmp_path / f"s{ext}"
    _encode(path, _tone(rate, 1.5, 300.0), rate, codec)
    audio = load_audio(path)
    assert abs(audio.duration_s - 1.5) < 0.1
    assert abs(_peak_hz(audio.samples, 16000) - 300) < 3


def test_8k_silence_is_fine(tmp_path):
    _write_wav(tmp_path / "quiet.wav", np.zeros(8000), 8000)
    audio = load_audio(tmp_path / "quiet.wav")
    assert abs(audio.duration_s - 1.0) < 0.01 and np.abs(audio.samples).max() == 0


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"test audio not found in {SHARED_DATA}")
def test_real_speech():
    audio = load_audio(SHARED_DATA / "speech_mandarin_good.wav")
    assert audio.source_rate == 44100 and audio.source_channels == 2
    assert 4.2 < audio.duration_s < 4.4 and np.abs(audio.samples).max() > 0.1


def test_bad_files(tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "notes.mp3").write_text("this is not audio, just words")
    _write_wav(tmp_path / "full.wav", _tone(16000, 1.0), 16000)
    raw = (tmp_path / "full.wav").read_bytes()
    (tmp_path / "header_only.wav").write_bytes(raw[:44])
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "photo.png")
    cases = {
        "missing.wav": "no such file",
        "empty.wav": "empty",
        "notes.mp3": "not an audio file",
        "header_only.wav": "no samples",
        "photo.png": "no audio track",
    }
    for name, problem in cases.items():
        with pytest.raises(AudioError, match=problem) as info:
            load_audio(tmp_path / name)
        assert name in str(info.value)
