"""Phone alignment (pocketsphinx) on espeak-ng speech and a recorded clip; synthesis; errors."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("av", reason="audio loading needs PyAV")
pytest.importorskip("pocketsphinx", reason="phone alignment needs pocketsphinx")

from deform.audio import SAMPLE_RATE, load_audio  # noqa: E402
from distill.phones import (  # noqa: E402
    SENTENCES,
    AlignmentError,
    EspeakError,
    Phone,
    align_phones,
    espeak_available,
    normalise_transcript,
    synthesize_speech,
)

requires_espeak = pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")
ALSA_CLIP = Path("/usr/share/sounds/alsa/Front_Center.wav")
SENTENCE = "Bob put the map back in the blue bag."
VOWELS = {"AA", "AE", "AH", "AO", "AW", "AY", "EH", "ER", "EY", "IH", "IY", "OW", "OY", "UH", "UW"}


def _check_cover(phones: list[Phone], duration: float) -> None:
    assert phones[0].start == 0.0
    assert phones[-1].end == pytest.approx(duration, abs=1e-9)
    for a, b in zip(phones, phones[1:], strict=False):
        assert a.end == pytest.approx(b.start, abs=1e-9)  # ordered, no gap, no overlap
        assert not (a.label == "SIL" and b.label == "SIL")  # silences are merged
    assert all(p.end > p.start for p in phones)
    assert all(p.label.isalpha() and p.label.isupper() for p in phones)  # no stress digits


@pytest.fixture(scope="module")
def spoken(tmp_path_factory):
    if not espeak_available():
        pytest.skip("espeak-ng is not installed")
    path = synthesize_speech(SENTENCE, tmp_path_factory.mktemp("speech") / "bob.wav")
    return load_audio(path)


@requires_espeak
def test_align_espeak_sentence(spoken):
    t0 = time.perf_counter()
    phones = align_phones(spoken.samples, SENTENCE)
    elapsed = time.perf_counter() - t0
    print(f"\nalign_phones: {elapsed / spoken.duration_s:.3f} s per s of audio")
    _check_cover(phones, spoken.duration_s)
    labels = [p.label for p in phones if p.label != "SIL"]
    assert labels == "B AA B P UH T DH AH M AE P B AE K IH N DH AH B L UW B AE G".split()
    assert " M AE P " in " " + " ".join(labels) + " "  # "map"
    assert phones[-1].label == "SIL"  # espeak-ng's trailing silence
    assert phones == align_phones(spoken.samples, SENTENCE)  # deterministic


@requires_espeak
def test_bilabials_are_quieter_than_vowels(spoken):
    phones = align_phones(spoken.samples, SENTENCE)

    def rms(p: Phone) -> float:
        seg = spoken.samples[int(p.start * SAMPLE_RATE) : int(p.end * SAMPLE_RATE)]
        return float(np.sqrt(np.mean(seg**2)))

    lips = np.median([rms(p) for p in phones if p.label in ("P", "B", "M")])
    vowels = np.median([rms(p) for p in phones if p.label in VOWELS])
    assert lips < 0.7 * vowels  # closure: the aligned bilabials sit on the quiet parts


@pytest.mark.skipif(not ALSA_CLIP.is_file(), reason="alsa-utils sounds are not installed")
def test_align_recorded_clip():
    audio = load_audio(ALSA_CLIP)
    phones = align_phones(audio.samples, "Front, center!")
    _check_cover(phones, audio.duration_s)
    labels = [p.label for p in phones]
    assert [x for x in labels if x != "SIL"] == "F R AH N T S EH N T ER".split()
    assert "SIL" in labels[labels.index("T") : labels.index("S")]  # the pause between the words


@pytest.mark.skipif(not ALSA_CLIP.is_file(), reason="alsa-utils sounds are not installed")
def test_unknown_words_are_dropped_with_a_warning():
    audio = load_audio(ALSA_CLIP)
    with pytest.warns(UserWarning, match="zqxjv"):
        phones = align_phones(audio.samples, "front zqxjv center")
    assert [p.label for p in phones if p.label != "SIL"] == "F R AH N T S EH N T ER".split()


@pytest.mark.parametrize("text", ["", "   ", "?!, ...", "--"])
def test_empty_transcript_raises(text):
    speech = 0.1 * np.sin(np.linspace(0, 2000, SAMPLE_RATE)).astype(np.float32)
    with pytest.raises(AlignmentError, match="no words"):
        align_phones(speech, text)


def test_unusable_audio_raises():
    with pytest.raises(AlignmentError, match="silent"):
        align_phones(np.zeros(SAMPLE_RATE, np.float32), "hello world")
    with pytest.raises(AlignmentError, match="too short"):
        align_phones(np.full(100, 0.1, np.float32), "hello")
    with pytest.warns(UserWarning), pytest.raises(AlignmentError, match="dictionary"):
        align_phones(np.full(SAMPLE_RATE, 0.1, np.float32), "qqzx zzqv")
    noise = 0.1 * np.random.default_rng(0).standard_normal(SAMPLE_RATE).astype(np.float32)
    with pytest.raises(AlignmentError, match="could not align"):
        align_phones(noise, "hello world")
    with pytest.raises(ValueError, match="mono"):
        align_phones(np.zeros((2, SAMPLE_RATE), np.float32), "hello")


def test_normalise_transcript():
    text = "Café: it\u2019s 42, Don't-stop 1905!"
    assert normalise_transcript(text) == (
        ["cafe", "it's", "forty", "two", "don't", "stop", "one", "thousand", "nine", "hundred", "five"]
    )  # fmt: skip


def test_sentences_are_in_the_dictionary():
    import pocketsphinx

    decoder = pocketsphinx.Decoder(lm=None, loglevel="FATAL")
    assert 50 <= len(SENTENCES) <= 70 and len(set(SENTENCES)) == len(SENTENCES)
    missing = {w for s in SENTENCES for w in normalise_transcript(s) if not decoder.lookup_word(w)}
    assert not missing


@requires_espeak
def test_synthesize_speech(tmp_path):
    a = synthesize_speech("Hello there.", tmp_path / "a.wav", seed=3)
    b = synthesize_speech("Hello there.", tmp_path / "b.wav", seed=3)
    c = synthesize_speech("Hello there.", tmp_path / "c.wav", speed=220, pitch=20)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.wav", "b.wav", "c.wav"]
    assert 0.3 < load_audio(c).duration_s < 3.0
    with pytest.raises(EspeakError, match="nosuchvoice"):
        synthesize_speech("Hello.", tmp_path / "d.wav", voice="nosuchvoice")
    assert not (tmp_path / "d.wav").exists()
    with pytest.raises(ValueError, match="empty"):
        synthesize_speech("  ", tmp_path / "e.wav")


def test_missing_espeak_raises(tmp_path, monkeypatch):
    monkeypatch.setattr("distill.phones.shutil.which", lambda name: None)
    assert not espeak_available()
    with pytest.raises(EspeakError, match="not installed"):
        synthesize_speech("Hello.", tmp_path / "a.wav")
