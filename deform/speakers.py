"""Who is who in a mixed recording: split a mono conversation into its two speakers, offline.

1. Voice activity: Silero VAD (`deform.voice`) over 32 ms windows.
2. Speaker embeddings: the GE2E speaker encoder of Resemblyzer (Apache-2.0; a 3-layer LSTM over
   40-band mel power, trained on thousands of real speakers; its weights `pretrained.pt` ship in
   the `resemblyzer` wheel and load with `torch.load(weights_only=True)`). The network is
   rebuilt here (`SpeakerEncoder`); the package is only where the weights live (its own module
   imports `webrtcvad`, which needs `pkg_resources`, gone from current setuptools). One
   embedding per piece of speech: the stretches between pauses, cut into pieces of at most 2 s
   (a turn change without a pause still falls between pieces).
3. Two clusters: spherical k-means (k = 2, pieces weighed by length) from the two least similar
   pieces. Fewer than two speakers (the centres' cosine above `SAME_SPEAKER`, or the smaller
   cluster under 1 s of speech) is an error, not a guess.
4. Each speech window takes its piece's speaker (pieces under 0.3 s their nearest neighbour's);
   speaker 1 is whoever speaks first. A mono recording cannot be unmixed where both talk at
   once: an overlap goes to one speaker.

Each speaker's track keeps the mixed samples where that speaker talks (20 ms fades) and is
silent elsewhere.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .audio import SAMPLE_RATE
from .voice import VAD_WINDOW, window_probability

SAME_SPEAKER = 0.72  # centres more alike are one voice: one speaker cut in two scored 0.78-0.88 on
# real recordings, two real speakers 0.63 (GE2E cosines; README, "Conversation")
PIECE_S, MIN_PIECE_S = 2.0, 0.3  # speech is embedded in pieces this long at most / at least
MIN_SPEAKER_S = 1.0


class DiarizationError(ValueError):
    """A mixed recording that cannot be split into two speakers; the message says why."""


class SpeakerEncoder(nn.Module):
    """GE2E: mel frames [B, 160, 40] -> unit speaker embeddings [B, 256]."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(40, 256, 3, batch_first=True)
        self.linear = nn.Linear(256, 256)

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        _, (hidden, _) = self.lstm(mels)
        raw = torch.relu(self.linear(hidden[-1]))
        return raw / raw.norm(dim=1, keepdim=True).clamp_min(1e-6)


@functools.cache
def speaker_encoder() -> SpeakerEncoder:
    spec = importlib.util.find_spec("resemblyzer")
    where = Path(spec.submodule_search_locations[0]) / "pretrained.pt" if spec else None
    if where is None or not where.is_file():
        raise DiarizationError("splitting a mixed recording needs the speaker encoder's weights: "
                               "pip install 'gsavatar[diarize]' (Resemblyzer, offline after "
                               "that); or give each voice its own file or channel")  # fmt: skip
    state = torch.load(where, map_location="cpu", weights_only=True)["model_state"]
    model = SpeakerEncoder()
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith("similarity")})
    return model.eval()


def mel_frames(samples: np.ndarray) -> np.ndarray:
    """[F, 40] mel power frames (25 ms window, 10 ms hop), as the encoder was trained on, after
    raising quiet audio to -30 dBFS."""
    import librosa

    rms = float(np.sqrt(np.mean(samples.astype(np.float64) ** 2)) + 1e-9)
    gain = max(1.0, 10 ** (-30 / 20) / rms)
    mel = librosa.feature.melspectrogram(y=samples * gain, sr=SAMPLE_RATE, n_fft=400,
                                         hop_length=160, n_mels=40)  # fmt: skip
    return mel.astype(np.float32).T


@dataclass
class Diarization:
    labels: np.ndarray  # [VAD windows] 0: silence, 1 or 2: the speaker
    similarity: float  # cosine of the two speakers' centres

    def speech_s(self, who: int) -> float:
        return float((self.labels == who).sum() * VAD_WINDOW / SAMPLE_RATE)


def speech_pieces(speech: np.ndarray) -> list[tuple[int, int]]:
    """(first, end) VAD windows of each stretch of speech (pauses under 0.1 s bridged), cut
    into pieces of at most `PIECE_S`, each at least `MIN_PIECE_S` long (shorter ones dropped:
    they take their neighbours' speaker)."""
    per_s = SAMPLE_RATE / VAD_WINDOW
    edges = np.flatnonzero(np.diff(np.r_[0, speech.astype(np.int8), 0]))
    runs: list[list[int]] = []
    for a, b in zip(edges[::2], edges[1::2], strict=True):
        if runs and a - runs[-1][1] < 0.1 * per_s:
            runs[-1][1] = b
        else:
            runs.append([a, b])
    pieces = []
    for a, b in runs:
        count = int(np.ceil((b - a) / (PIECE_S * per_s)))
        cuts = np.linspace(a, b, count + 1).round().astype(int)
        pieces += [(int(x), int(y)) for x, y in zip(cuts[:-1], cuts[1:], strict=True)
                   if y - x >= MIN_PIECE_S * per_s]  # fmt: skip
    return pieces


def reference_turns(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Reference labels per 32 ms window from two separately recorded voices (the same
    length): 0 where neither track's VAD finds speech, else the more probable speaker."""
    a, b = window_probability(first), window_probability(second)
    return np.where(np.maximum(a, b) >= 0.5, np.where(a >= b, 1, 2), 0).astype(np.int8)


def diarize(samples: np.ndarray) -> Diarization:
    """Speaker labels per 32 ms window of a mono 16 kHz recording with two speakers."""
    speech = window_probability(samples) >= 0.5
    pieces = speech_pieces(speech)
    if len(pieces) < 2:
        raise DiarizationError(f"too little speech to tell speakers apart ({len(pieces)} "
                               "stretch of speech)")  # fmt: skip
    mel = mel_frames(np.asarray(samples, np.float32))
    per_mel = VAD_WINDOW / 160  # mel frames per VAD window
    encoder = speaker_encoder()
    with torch.no_grad():  # one piece at a time: they differ in length
        emb = np.stack([encoder(torch.from_numpy(mel[int(a * per_mel) : int(b * per_mel)])[None])[0]
                        .numpy() for a, b in pieces])  # fmt: skip
    weight = np.array([b - a for a, b in pieces], np.float64)
    sim = emb @ emb.T
    i, j = np.unravel_index(np.argmin(sim), sim.shape)
    centres = emb[[i, j]]
    for _ in range(50):  # spherical k-means, each piece weighed by its length
        label = np.argmax(emb @ centres.T, 1)
        new = np.stack([(emb[label == k] * weight[label == k, None]).sum(0)
                        if (label == k).any() else centres[k] for k in range(2)])  # fmt: skip
        new /= np.linalg.norm(new, axis=1, keepdims=True)
        if np.allclose(new, centres):
            break
        centres = new
    similarity = float(centres[0] @ centres[1])
    who = np.full(len(speech), -1)
    for (a, b), k in zip(pieces, label, strict=True):
        who[a:b] = k
    labels = np.where(speech, _fill(who) + 1, 0)
    if labels[labels > 0][0] == 2:  # speaker 1 speaks first
        labels = np.where(labels > 0, 3 - labels, 0)
    result = Diarization(labels.astype(np.int8), similarity)
    shortest = min(result.speech_s(1), result.speech_s(2))
    if similarity > SAME_SPEAKER or shortest < MIN_SPEAKER_S:
        raise DiarizationError(f"found one speaker, not two (the two voices' similarity "
                               f"{similarity:.2f}, the quieter one speaks {shortest:.1f} s): give "
                               "a recording of two people, or each voice as its own file")  # fmt: skip
    return result


def _fill(who: np.ndarray) -> np.ndarray:
    """Windows no embedding covers take the nearest covered window's speaker."""
    known = np.flatnonzero(who >= 0)
    if not len(known):
        return np.zeros_like(who)
    idx = np.clip(np.searchsorted(known, np.arange(len(who))), 0, len(known) - 1)
    left = known[np.clip(idx - 1, 0, len(known) - 1)]
    right = known[idx]
    near = np.where(np.abs(np.arange(len(who)) - left) <= np.abs(right - np.arange(len(who))),
                    left, right)  # fmt: skip
    return who[near]


def speaker_tracks(samples: np.ndarray, d: Diarization) -> tuple[np.ndarray, np.ndarray]:
    """Speaker 1's and speaker 2's tracks: the mix where each speaks (20 ms fades), else 0."""
    out = []
    fade = int(0.02 * SAMPLE_RATE)
    ramp = np.ones(2 * fade + 1) / (2 * fade + 1)
    for who in (1, 2):
        mask = np.repeat((d.labels == who).astype(np.float32), VAD_WINDOW)[: len(samples)]
        mask = np.pad(mask, (0, len(samples) - len(mask)))
        out.append(samples * np.convolve(mask, ramp, "same").astype(np.float32))
    return out[0], out[1]


def diarization_error(labels: np.ndarray, reference: np.ndarray) -> float:
    """Frame-level diarization error rate: (missed + false alarm + confusion) over the
    reference's speech frames, under the better of the two label mappings. Both [T] with 0
    silence, 1 and 2 speakers, at the same rate (overlapped frames: label the reference by
    whoever is louder, or leave them out)."""
    ref_speech = reference > 0
    best = np.inf
    for swap in (False, True):
        hyp = np.where(labels > 0, 3 - labels, 0) if swap else labels
        missed = (ref_speech & (hyp == 0)).sum()
        false = (~ref_speech & (hyp > 0)).sum()
        confusion = (ref_speech & (hyp > 0) & (hyp != reference)).sum()
        best = min(best, (missed + false + confusion) / max(ref_speech.sum(), 1))
    return float(best)
