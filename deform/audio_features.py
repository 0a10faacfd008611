"""Speech features for the deformer: frame-synchronous audio tokens A_t at the video rate.

Two encoders share one interface, `encode(samples, start, stop, fps) -> [stop - start, D]`, the
tokens of video frames `start .. stop-1` computed from the 16 kHz samples:

- `LogMelEncoder` (default, always available): 80-bin log-mel frames (25 ms window, 10 ms hop)
  through a stack of dilated 1D convolutions. It is causal with a fixed look-ahead: the token of
  frame t sees mel frames up to `LOOKAHEAD_MEL` (8 = 80 ms) past the centre of frame t, plus
  half a window (12.5 ms), so **92.5 ms of look-ahead** and 600 ms of history. Chunked
  computation is exact: tokens of a chunk equal those of the whole file.
- `Wav2Vec2Encoder` (`--audio-encoder PATH`): a wav2vec 2.0 model from a local directory
  (transformers' `Wav2Vec2Model.from_pretrained`), hidden states (50 Hz) picked at each frame's
  centre and projected by a learned adapter. wav2vec 2.0 attends over its whole input, so it
  sees a window of `CONTEXT_S` seconds of history and the same 92.5 ms of look-ahead.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .audio import SAMPLE_RATE

HOP = 160  # samples, 10 ms
WIN = 400  # samples, 25 ms
N_MELS = 80
LOOKAHEAD_MEL = 8  # mel frames past a video frame's centre
LOOKAHEAD_S = (LOOKAHEAD_MEL * HOP + WIN / 2) / SAMPLE_RATE  # 0.0925 s
CONTEXT_S = 2.0  # history the wav2vec 2.0 encoder sees per chunk


def mel_filterbank(n_mels: int = N_MELS, n_fft: int = 512, sr: int = SAMPLE_RATE) -> Tensor:
    """Triangular HTK-mel filters [n_fft//2+1, n_mels] from 20 Hz to 7.6 kHz."""

    def hz_to_mel(f):
        return 2595.0 * np.log10(1.0 + f / 700.0)

    def mel_to_hz(m):
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)

    edges = mel_to_hz(np.linspace(hz_to_mel(20.0), hz_to_mel(7600.0), n_mels + 2))
    freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    tri = np.maximum(0, np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)))
    return torch.from_numpy(tri.T.astype(np.float32))


def mel_centre_index(frames: Tensor, fps: float) -> Tensor:
    """Index of the last mel frame centred at or before each video frame's centre time."""
    centre = (frames.double() + 0.5) / fps * SAMPLE_RATE
    return torch.floor((centre - WIN / 2) / HOP).long()


class LogMel(nn.Module):
    """log(mel power + 1e-6), frame i covering samples [i*HOP, i*HOP + WIN) (zeros outside)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("window", torch.hann_window(WIN), persistent=False)
        self.register_buffer("fbank", mel_filterbank(), persistent=False)

    def forward(self, samples: np.ndarray | Tensor, first: int, last: int) -> Tensor:
        """Mel frames first..last-1 (may reach before 0 or past the end) -> [last-first, 80]."""
        x = torch.as_tensor(samples, dtype=torch.float32)  # the whole clip stays where it is
        lo, hi = first * HOP, (last - 1) * HOP + WIN
        seg = x[max(lo, 0) : max(min(hi, len(x)), 0)].to(self.window.device)
        seg = nn.functional.pad(seg, (max(0, -lo), hi - lo - max(0, -lo) - len(seg)))
        frames = seg.unfold(0, WIN, HOP) * self.window  # [F, WIN]
        power = torch.fft.rfft(frames, n=512).abs().pow(2)
        return torch.log(power @ self.fbank + 1e-6)


class LogMelEncoder(nn.Module):
    """Dilated causal convolutions (with LOOKAHEAD_MEL frames of look-ahead) over log-mel."""

    kind = "logmel"

    def __init__(self, dim: int = 128, hidden: int = 128, dilations=(1, 2, 4, 8), kernel: int = 5):
        super().__init__()
        self.mel = LogMel()
        self.dim = dim
        layers: list[nn.Module] = [nn.Conv1d(N_MELS, hidden, 1)]
        for d in dilations:
            layers += [nn.GELU(), nn.Conv1d(hidden, hidden, kernel, dilation=d)]
        layers += [nn.GELU(), nn.Conv1d(hidden, dim, 1)]
        self.net = nn.Sequential(*layers)
        self.receptive = 1 + (kernel - 1) * sum(dilations)  # mel frames
        # fixed normalisation of log-mel (speech at conversational level sits near 0 mean)
        self.register_buffer("mel_mean", torch.full((N_MELS,), -4.0))
        self.register_buffer("mel_std", torch.full((N_MELS,), 4.0))

    def encode(self, samples: np.ndarray | Tensor, start: int, stop: int, fps: float) -> Tensor:
        centres = mel_centre_index(torch.arange(start, stop), fps)  # [T]
        last = int(centres[-1]) + LOOKAHEAD_MEL + 1
        first = int(centres[0]) + LOOKAHEAD_MEL - self.receptive + 1
        mel = (self.mel(samples, first, last) - self.mel_mean) / self.mel_std
        feats = self.net(mel.T[None])[0].T  # [last - first - receptive + 1, D]
        # output j ends at mel frame first + receptive - 1 + j; frame t needs centre + LOOKAHEAD
        return feats[centres - centres[0]]


class Wav2Vec2Encoder(nn.Module):
    """wav2vec 2.0 from a local directory; hidden states at frame centres, then an adapter."""

    kind = "wav2vec2"

    def __init__(self, path: str | os.PathLike, dim: int = 128):
        super().__init__()
        path = Path(path)
        if not (path / "config.json").is_file():
            raise ValueError(f"{path}: not a wav2vec 2.0 model directory (no config.json)")
        try:
            from transformers import Wav2Vec2Model
        except ImportError:
            raise ValueError(
                "wav2vec 2.0 needs transformers: pip install 'gsavatar[wav2vec]'"
            ) from None

        self.model = Wav2Vec2Model.from_pretrained(str(path), local_files_only=True).eval()
        self.model.requires_grad_(False)
        self.dim = dim
        self.adapter = nn.Linear(self.model.config.hidden_size, dim)
        self.path = str(path)

    def encode(self, samples: np.ndarray | Tensor, start: int, stop: int, fps: float) -> Tensor:
        x = torch.as_tensor(samples, dtype=torch.float32)
        lo = max(0, int(math.floor((start / fps - CONTEXT_S) * SAMPLE_RATE)))
        hi = int(math.ceil(stop / fps * SAMPLE_RATE + LOOKAHEAD_S * SAMPLE_RATE))
        seg = x[lo:hi].to(self.adapter.weight.device)
        seg = nn.functional.pad(seg, (0, max(0, hi - lo - len(seg))))
        seg = (seg - seg.mean()) / (seg.std() + 1e-5)
        with torch.no_grad():
            hidden = self.model(seg[None]).last_hidden_state[0]  # [F, H] at 20 ms steps
        centre = ((torch.arange(start, stop).double() + 0.5) / fps * SAMPLE_RATE - lo) / 320.0
        idx = centre.round().long().clamp(0, len(hidden) - 1)
        return self.adapter(hidden[idx])


BAND_HZ = (300.0, 3000.0)  # the speech band: loudness here is what the jaw follows
MIN_WINDOW_S = 0.04  # shorter frames are measured over this much audio around their centre


def band_loudness(samples: np.ndarray | Tensor, fps: float, start: int = 0,
                  stop: int | None = None, sample_rate: int = SAMPLE_RATE) -> np.ndarray:  # fmt: skip
    """[stop - start] RMS of the speech band (`BAND_HZ`) of each video frame: Parseval over the
    band of the spectrum of the frame's own window [t/fps, (t+1)/fps), widened about its centre
    to `MIN_WINDOW_S` when the frame is shorter (at 100 Hz a 10 ms window has 100 Hz bins and
    lets a low voice's pitch into the band); NaN for frames past the audio's end. `stop`
    defaults to the last frame the audio reaches. Every frame's window has the same length and
    depends on nothing else, so chunks give exactly the values of the whole file, and at 25 fps
    no frame reads past its own end. The toolkit's one speech-band loudness: the deformer's
    speech activity, the teacher's jaw and the sync measure all use it."""
    x = np.asarray(samples, dtype=np.float32)
    if stop is None:
        stop = math.ceil(len(x) / sample_rate * fps)
    num = max(stop - start, 0)
    size = max(math.ceil(sample_rate / fps), math.ceil(MIN_WINDOW_S * sample_rate))
    frames = np.arange(start, start + num)
    own_lo = np.round(frames / fps * sample_rate).astype(np.int64)
    own_hi = np.round((frames + 1) / fps * sample_rate).astype(np.int64)
    lo = (own_lo + own_hi) // 2 - size // 2  # the window, centred on the frame
    freqs = np.fft.rfftfreq(size, 1 / sample_rate)
    keep = (freqs >= BAND_HZ[0]) & (freqs <= BAND_HZ[1])
    out = np.full(num, np.nan)
    for b in range(0, num, 1024):  # blocks of frames: memory stays flat with length
        idx = lo[b : b + 1024, None] + np.arange(size)[None]
        inside = (idx >= 0) & (idx < len(x))
        seg = np.where(inside, x[np.clip(idx, 0, max(len(x) - 1, 0))] if len(x) else 0.0, 0.0)
        power = np.abs(np.fft.rfft(seg, axis=1)[:, keep]) ** 2
        loud = np.sqrt(2 * power.sum(1) / (size * np.maximum(inside.sum(1), 1)))
        out[b : b + 1024] = np.where(own_lo[b : b + 1024] < len(x), loud, np.nan)
    return out


def make_audio_encoder(path: str | None, dim: int = 128) -> nn.Module:
    """The default log-mel encoder, or wav2vec 2.0 from `path`."""
    return LogMelEncoder(dim) if not path else Wav2Vec2Encoder(path, dim)
