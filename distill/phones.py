"""Phone timings for speech: forced alignment of a known transcript (pocketsphinx 5, CMUdict
ARPAbet) and espeak-ng synthesis of training sentences.

`align_phones` runs pocketsphinx twice over the whole utterance, as its API requires: a word
alignment against the transcript (an FSG that allows optional silences and alternative
pronunciations), then a phone/state alignment constrained to those word boundaries. The result
covers the audio from 0 to its end; silences, fillers and gaps are `SIL`. Any failure raises
`AlignmentError`, so a caller can fall back to loudness cues.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deform.audio import SAMPLE_RATE
from render.io import atomic_path

FRAME_RATE = 100  # pocketsphinx frames per second (10 ms hop)
SIL = "SIL"
_MAX_SQUEEZED = 0.5  # more phones than this at the 3-frame minimum: the text does not fit
# First the usual beams, widened for synthetic and clean speech (the defaults lose espeak-ng
# utterances), then much wider ones as a retry. Cheap: the alignment graph is tiny.
_BEAMS = ({"beam": 1e-80, "pbeam": 1e-80, "wbeam": 1e-60},
          {"beam": 1e-200, "pbeam": 1e-200, "wbeam": 1e-160})  # fmt: skip
_ARPABET = frozenset(
    "AA AE AH AO AW AY B CH D DH EH ER EY F G HH IH IY JH K L M N NG OW OY P R S SH T TH UH UW "
    "V W Y Z ZH".split()
)
_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
         "fifteen sixteen seventeen eighteen nineteen").split()  # fmt: skip
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4")  # espeak-ng's own


class AlignmentError(ValueError):
    """The transcript could not be aligned to the audio; the message says why."""


class EspeakError(RuntimeError):
    """espeak-ng is missing or failed to synthesise."""


@dataclass
class Phone:
    label: str  # ARPAbet without stress digits ("AA", "P"), or "SIL"
    start: float  # seconds
    end: float  # seconds

    @property
    def duration(self) -> float:
        return self.end - self.start


def _number_words(n: int) -> list[str]:
    if n < 20:
        return [_ONES[n]]
    if n < 100:
        return [_TENS[n // 10]] + ([_ONES[n % 10]] if n % 10 else [])
    if n < 1000:
        return [_ONES[n // 100], "hundred"] + (_number_words(n % 100) if n % 100 else [])
    if n < 1_000_000:
        rest = _number_words(n % 1000) if n % 1000 else []
        return _number_words(n // 1000) + ["thousand"] + rest
    return [_ONES[int(d)] for d in str(n)]  # long numbers: digit by digit


def normalise_transcript(text: str) -> list[str]:
    """Lower-case words without punctuation or accents; numbers spelt out ("42" -> forty two)."""
    text = unicodedata.normalize("NFKD", text.replace("\u2019", "'")).lower()
    text = "".join(c for c in text if not unicodedata.combining(c))
    words = []
    for token in re.findall(r"[a-z]+(?:'[a-z]+)*|\d+", text):
        words += _number_words(int(token)) if token.isdigit() else [token]
    return words


def _decoder(**beams: float):
    try:
        import pocketsphinx
    except ImportError:
        raise AlignmentError(
            "phone alignment needs pocketsphinx (pip install pocketsphinx)"
        ) from None
    # lm=None: alignment only; bestpath=False: bestpath can append a 1-frame `</s>` that makes
    # the phone pass fail (pocketsphinx #339); FATAL: keep the C library quiet.
    return pocketsphinx.Decoder(lm=None, bestpath=False, loglevel="FATAL", **beams)


def _run(decoder, pcm: bytes) -> None:
    decoder.start_utt()
    decoder.process_raw(pcm, full_utt=True)  # the whole utterance: batch cepstral normalisation
    decoder.end_utt()


def _label(name: str) -> str:
    label = name.rstrip("0123456789").upper()
    return label if label in _ARPABET else SIL  # SIL, +NSN+, +SPN+ ... are all silence to us


def _cover(entries: list[tuple[str, float, float]], duration: float) -> list[Phone]:
    """Phones in order, clipped to [0, duration], gaps filled and neighbouring silences merged."""
    phones: list[Phone] = []

    def push(label: str, start: float, end: float) -> None:
        if end - start <= 1e-9:
            return
        if phones and phones[-1].label == SIL and label == SIL:
            phones[-1].end = end
        else:
            phones.append(Phone(label, start, end))

    cursor = 0.0
    for label, start, end in entries:
        start, end = max(start, cursor), min(end, duration)
        push(SIL, cursor, start)
        push(label, start, end)
        cursor = max(cursor, end)
    push(SIL, cursor, duration)
    return phones


def align_phones(samples: np.ndarray, transcript: str) -> list[Phone]:
    """Force-align `transcript` to speech and return its phones, covering the whole audio.

    samples: [S] float32 in [-1, 1], mono at 16 kHz (`deform.audio.load_audio` gives this).
    Words missing from CMUdict are dropped with a warning. Deterministic: a fresh decoder each
    call, no dither. Raises `AlignmentError` when there is nothing to align, the decoder fails,
    or most phones come out at the 3-frame minimum (the transcript does not fit the audio).
    Forced alignment cannot tell every wrong transcript apart: check what feeds it.
    """
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim != 1:
        raise ValueError(f"align_phones wants mono samples [S], got shape {samples.shape}")
    duration = len(samples) / SAMPLE_RATE
    if duration < 0.1:
        raise AlignmentError(f"the audio is too short to align ({duration:.3f} s)")
    clean = np.clip(np.nan_to_num(samples, nan=0.0, posinf=1.0, neginf=-1.0), -1.0, 1.0)
    if np.abs(clean).max() < 1e-3:
        raise AlignmentError("the audio is silent, there is no speech to align")
    words = normalise_transcript(transcript)
    if not words:
        raise AlignmentError(f"the transcript {transcript!r} holds no words to align")
    pcm = np.round(clean * 32767).astype("<i2").tobytes()  # what pocketsphinx reads: int16 LE

    for attempt, beams in enumerate(_BEAMS):
        decoder = _decoder(**beams)
        if attempt == 0:
            missing = sorted({w for w in words if decoder.lookup_word(w) is None})
            if missing:
                left_out = ", ".join(missing)
                warnings.warn(
                    f"not in the pronunciation dictionary, left out: {left_out}", stacklevel=2
                )
            words = [w for w in words if w not in missing]
            if not words:
                raise AlignmentError(f"no word of {transcript!r} is in the dictionary")
        try:
            decoder.set_align_text(" ".join(words))
            _run(decoder, pcm)  # pass 1: words (with optional silences) against the audio
            if decoder.hyp() is None:
                continue  # the search lost every path: retry with wider beams
            decoder.set_alignment()
            _run(decoder, pcm)  # pass 2: phones and states inside those word boundaries
            alignment = decoder.get_alignment()
        except RuntimeError:
            continue
        if alignment is None:
            continue
        entries = [
            (_label(p.name), p.start / FRAME_RATE, (p.start + p.duration) / FRAME_RATE)
            for p in alignment.phones()
        ]
        speech = [end - start for label, start, end in entries if label != SIL]
        # a transcript that does not fit the audio gets squeezed into minimal 3-frame phones
        if speech and np.mean(np.array(speech) < 3.5 / FRAME_RATE) <= _MAX_SQUEEZED:
            return _cover(entries, duration)
    raise AlignmentError(
        f"pocketsphinx could not align {' '.join(words)!r} to {duration:.2f} s of audio"
        " (does the transcript match the speech?)"
    )


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def synthesize_speech(text: str, path: str | os.PathLike, voice: str = "en-us", speed: int = 160,
                      pitch: int = 50, seed: int | None = None) -> Path:  # fmt: skip
    """Speak `text` with espeak-ng into the WAV file `path` (22.05 kHz mono) and return its path.

    speed: words per minute; pitch: 0-99. With a `seed`, a voice variant (m1-m7, f1-f4, unless
    `voice` names one with "+") is picked and speed and pitch are jittered by about 10 %, the
    same for the same seed. espeak-ng itself is deterministic.
    """
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise EspeakError("espeak-ng is not installed (apt-get install espeak-ng)")
    if not text.strip():
        raise ValueError("synthesize_speech: the text is empty")
    if seed is not None:
        rng = np.random.default_rng(seed)
        if "+" not in voice:
            voice = f"{voice}+{_VARIANTS[rng.integers(len(_VARIANTS))]}"
        speed = int(round(speed * rng.uniform(0.9, 1.1)))
        pitch = int(np.clip(round(pitch + rng.uniform(-10, 10)), 0, 99))
    path = Path(path)
    with atomic_path(path) as tmp:
        cmd = [exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(tmp), "--stdin"]
        res = subprocess.run(cmd, input=text, capture_output=True, text=True, check=False)
        if res.returncode != 0 or not tmp.is_file():
            raise EspeakError(f"espeak-ng failed for {path} (voice {voice!r}): "
                              f"{(res.stderr or res.stdout).strip()}")  # fmt: skip
    return path


# Phonetically varied sentences for training data: bilabials (p, b, m), rounded vowels and
# glides (oo, o, w), spread vowels (ee, i), and pauses at commas.
# fmt: off
SENTENCES = [
    "Bob put the map back in the blue bag.", "Please pass me the maple syrup, Maggie.",
    "We knew the room would be cool by noon.", "Peter picked a bunch of purple beans.",
    "She sees the green trees, and the sea beyond them.", "Mom made a warm bowl of soup for me.",
    "Who would move the boat before the storm?", "Maybe, just maybe, the bus will be on time.",
    "The baby boy bumped his knee on the bench.", "Eat your peas, then we can leave.",
    "The old owl flew over the moon.", "My brother bought a bright yellow umbrella.",
    "Wait, where are you going with my boots?", "Feel the breeze, it is sweet and easy.",
    "A tiny mouse slipped past the sleeping cat.", "Bring me the big book from the top shelf.",
    "Ruth wore a wool coat to the winter market.", "Keep the window open, please.",
    "Paul tripped, but he kept on walking.", "The boat moved slowly, through the foggy bay.",
    "Mix the milk and the butter in a bowl.", "We will meet at the museum at three.",
    "The puppy jumped up, barking at the bees.", "Oh no, the soup is cold again.",
    "Billy sees a small pink pig in the mud.", "Move your blue box over by the wall.",
    "Bake the bread, then let it cool.", "Mary, may I borrow your map?",
    "The wind blew, and the waves rolled in.", "Pam picked up the pen and wrote a poem.",
    "Please, be quiet, the baby is asleep.", "The moon is full tonight, and the road is bright.",
    "Bobby mopped the muddy floor by himself.", "We eat cheese and peaches in the summer.",
    "Who put the spoon in the boot?", "Beep, beep, the bus is here.",
    "Ben keeps a bee in a jam jar.", "My mother makes the best apple pie.",
    "Look, the goose is swimming in the pool.", "Open the map, and point to the mountain.",
    "Two blue balloons floated above the park.", "The team needs more time to prepare.",
    "Bubbles popped in the warm bath water.", "Wow, you moved the whole room by yourself.",
    "Each evening, we walk by the river.", "Put the plums and the pears in the basket.",
    "The people in the boat waved at me.", "Mike made a move, then paused for a moment.",
    "Bring a pillow, a blanket, and a lamp.", "The music box played a simple tune.",
    "Sweep the steps, then wipe the windows.", "The bear ate berries by the big oak tree.",
    "Hmm, I think the movie begins at nine.", "Pull the rope, and the boat will move.",
    "Bob and Mabel went out for a boat ride.", "The wolf howled, and the moon rose slowly.",
    "Pick up your shoes, they belong by the door.", "We made pumpkin soup with plenty of pepper.",
    "Bees buzz, birds sing, and the sun beams.", "Time moves quickly when you sleep.",
]
# fmt: on
