"""Who speaks when: the speaker-probability masks of a conversation's tracks.

A conversation reaches the toolkit as two 16 kHz tracks, the avatar's own voice and its
partner's: two files, or the two channels of a stereo file (`conversation_tracks`). Each track's
speech probability per video frame (`speech_probability`) comes from Silero VAD (MIT, its ONNX
model inside the `silero-vad` wheel, run by onnxruntime): a streaming model over 32 ms windows,
so the mask of frame t sees audio up to the end of the window that holds t's end (at most 32 ms
past the frame). The masks are what the conversational model's role embedding reads
(`e_role = m · e_speak + (1 − m) · e_listen`) and what drive and listening blend by.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass

import numpy as np

from .audio import SAMPLE_RATE, AudioError, load_audio, load_channels

log = logging.getLogger(__name__)
VAD_WINDOW = 512  # samples (32 ms), Silero's window at 16 kHz


@functools.cache
def _vad():
    import warnings

    from silero_vad import load_silero_vad

    with warnings.catch_warnings():  # its importlib.resources call is deprecated, not ours
        warnings.simplefilter("ignore", DeprecationWarning)
        return load_silero_vad(onnx=True)


def window_probability(samples: np.ndarray) -> np.ndarray:
    """Silero's speech probability of each 32 ms window of 16 kHz `samples` (the last window
    padded with silence)."""
    import torch

    model = _vad()
    model.reset_states()
    x = np.pad(np.asarray(samples, np.float32), (0, VAD_WINDOW))
    with torch.no_grad():
        prob = model.audio_forward(torch.from_numpy(x), SAMPLE_RATE)[0].numpy()
    model.reset_states()
    return prob.astype(np.float64)


def speech_probability(samples: np.ndarray, num_frames: int, fps: float) -> np.ndarray:
    """[T] probability that the track speaks in each video frame `[t/fps, (t+1)/fps)`: the mean
    of Silero's window probabilities overlapping the frame."""
    x = np.asarray(samples, np.float32)
    need = int(np.ceil(num_frames / fps * SAMPLE_RATE))
    prob = window_probability(np.pad(x[:need], (0, max(0, need - len(x)))))
    edges = np.arange(num_frames + 1) / fps * SAMPLE_RATE / VAD_WINDOW  # in windows
    csum = np.r_[0.0, np.cumsum(prob)]
    lo, hi = edges[:-1], np.maximum(edges[1:], edges[:-1] + 1e-9)

    def area(e: np.ndarray) -> np.ndarray:  # ∫ of the window-constant probability up to e
        i = np.clip(np.floor(e).astype(int), 0, len(prob) - 1)
        return csum[i] + (e - i) * prob[i]

    return ((area(hi) - area(lo)) / (hi - lo)).clip(0, 1).astype(np.float32)


@dataclass
class Tracks:
    """A conversation's two voices at 16 kHz, the same length (the shorter padded with
    silence)."""

    own: np.ndarray  # [S] float32
    partner: np.ndarray  # [S] float32
    source: str  # for messages

    @property
    def duration_s(self) -> float:
        return len(self.own) / SAMPLE_RATE

    def mix(self) -> np.ndarray:
        """Both voices in one mono track (for the video's sound), without clipping."""
        both = self.own + self.partner
        peak = float(np.abs(both).max(initial=0.0))
        return both / peak if peak > 1.0 else both


def stereo_channels(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """The left and right channels of a stereo file at 16 kHz; AudioError if it is not stereo."""
    both = load_channels(path)
    if len(both) != 2:
        what = "mono" if len(both) == 1 else f"{len(both)}-channel"
        raise AudioError(f"{path}: --channel needs a stereo file (one speaker a channel); this "
                         f"one is {what}. Give the partner as its own file (--partner)")  # fmt: skip
    return both[0], both[1]


def conversation_tracks(audio: str | os.PathLike, partner: str | os.PathLike | None = None,
                        channel: str | None = None, speaker: int | None = None) -> Tracks:  # fmt: skip
    """The avatar's own voice and its partner's: `audio` and `partner` as two files; or the
    `channel` ("left"/"right") of the stereo file `audio` as the avatar's voice and the other
    channel as the partner's; or `speaker` 1 or 2 (1: who speaks first) of the mixed recording
    `audio`, split offline (`deform.speakers`). Tracks of different lengths are padded with
    silence (a warning); any sample rate is resampled. AudioError for anything unusable."""
    if sum(x is not None for x in (partner, channel, speaker)) != 1:
        raise AudioError("give the partner's voice one way: --partner FILE, --channel left|right "
                         "of a stereo --audio file, or --speaker 1|2 of a mixed recording")  # fmt: skip
    if speaker is not None:
        from .speakers import DiarizationError, diarize, speaker_tracks

        if speaker not in (1, 2):
            raise AudioError(f"--speaker {speaker}: use 1 (who speaks first) or 2")
        mixed = load_audio(audio).samples
        try:
            first, second = speaker_tracks(mixed, diarize(mixed))
        except DiarizationError as exc:
            raise AudioError(f"{audio}: {exc}") from None
        own, other = (first, second) if speaker == 1 else (second, first)
        return Tracks(own, other, f"{audio} (speaker {speaker} of 2: the avatar)")
    if channel is not None:
        if channel not in ("left", "right"):
            raise AudioError(f"--channel {channel!r}: use left or right")
        left, right = stereo_channels(audio)
        own, other = (left, right) if channel == "left" else (right, left)
        source = f"{audio} ({channel} channel: the avatar)"
        if np.abs(own).max() < 1e-4:
            raise AudioError(f"{audio}: the {channel} channel is silent; the avatar's voice is not "
                             "there")  # fmt: skip
    else:
        own, other = load_audio(audio).samples, load_audio(partner).samples
        source = f"{audio} + {partner}"
    if len(own) != len(other):
        longer = max(len(own), len(other))
        log.warning("the two tracks differ in length (%.2f s and %.2f s): the shorter one is "
                    "padded with silence", len(own) / SAMPLE_RATE, len(other) / SAMPLE_RATE)  # fmt: skip
        own = np.pad(own, (0, longer - len(own)))
        other = np.pad(other, (0, longer - len(other)))
    return Tracks(own, other, source)


def phrases(prob: np.ndarray, fps: float, min_phrase_s: float = 0.5,
            min_gap_s: float = 0.25) -> list[tuple[int, int]]:  # fmt: skip
    """(first, end) frames of a track's phrases: speech (probability ≥ 0.5) at least
    `min_phrase_s` long, with gaps shorter than `min_gap_s` bridged. `end` is the first silent
    frame: a phrase end, what a listener nods to."""
    on = np.asarray(prob) >= 0.5
    edges = np.flatnonzero(np.diff(np.r_[0, on.astype(np.int8), 0]))
    runs = [[a, b] for a, b in zip(edges[::2], edges[1::2], strict=True)]
    merged: list[list[int]] = []
    for a, b in runs:
        if merged and a - merged[-1][1] < min_gap_s * fps:
            merged[-1][1] = b
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged if b - a >= min_phrase_s * fps]
