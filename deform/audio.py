"""Audio loading for the speech front-end: anything FFmpeg decodes (WAV, FLAC, MP3, OGG, M4A,
the audio track of a video ...), at any sample rate, mono or stereo -> float32 mono at 16 kHz.

Decoding and resampling go through PyAV (FFmpeg's own resampler), chunk by chunk, so long files
never hold more than their 16 kHz samples in memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16_000  # Hz, every audio model in the project works at this rate
MAX_SECONDS = 3 * 3600.0  # longer files are refused (their 16 kHz samples alone: 0.7 GB)


class AudioError(ValueError):
    """An audio file that cannot be used; the message names the file and the problem."""


@dataclass
class Audio:
    samples: np.ndarray  # [S] float32 in [-1, 1], mono
    sample_rate: int  # of `samples`
    source_rate: int  # of the file
    source_channels: int
    path: str

    @property
    def duration_s(self) -> float:
        return len(self.samples) / self.sample_rate


def open_media(path: Path, kind: str, error: type[Exception]):
    """A PyAV container for `path`; `error` naming the file when it is missing, empty or not
    something FFmpeg reads (`kind`: "an audio file", "a video")."""
    import av

    if path.is_dir():
        raise error(f"{path}: a folder, not a file")
    if not path.is_file():
        raise error(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise error(f"{path}: the file is empty")
    try:
        return av.open(str(path))
    except av.error.FFmpegError as exc:
        raise error(f"{path}: not {kind} FFmpeg can read ({exc.strerror or exc})") from None


def load_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> Audio:
    samples, source_rate, channels = _decode(Path(path), sample_rate, mix=True)
    return Audio(samples, sample_rate, source_rate, channels, str(path))


def load_channels(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """[C, S] float32 in [-1, 1]: each channel of the file's first audio track, resampled."""
    return _decode(Path(path), sample_rate, mix=False)[0]


def _decode(path: Path, sample_rate: int, mix: bool) -> tuple[np.ndarray, int, int]:
    """The samples ([S] averaged over channels, or [C, S]), the file's rate and channels."""
    import av

    with open_media(path, "an audio file", AudioError) as container:
        if not container.streams.audio:
            raise AudioError(f"{path}: the file has no audio track")
        stream = container.streams.audio[0]
        source_rate = stream.codec_context.sample_rate or 0
        channels = stream.codec_context.channels or 0
        # keep the channels through the resampler and average them here: FFmpeg's own
        # downmix sums stereo at 1/sqrt(2) each, which clips loud recordings
        resampler = av.AudioResampler(format="fltp", layout=stream.layout.name, rate=sample_rate)
        chunks, total, cap = [], 0, int(MAX_SECONDS * sample_rate)

        def take(frames) -> list[np.ndarray]:
            return [f.to_ndarray().mean(axis=0) if mix else f.to_ndarray() for f in frames]

        try:
            for frame in container.decode(stream):
                new = take(resampler.resample(frame))
                chunks += new
                total += sum(x.shape[-1] for x in new)
                if total > cap:
                    raise AudioError(f"{path}: longer than the {MAX_SECONDS / 3600:g}-hour limit")
            chunks += take(resampler.resample(None))
        except av.error.FFmpegError as exc:
            raise AudioError(f"{path}: the audio data is corrupt ({exc.strerror or exc})") from None
    if sum(x.shape[-1] for x in chunks) == 0:
        raise AudioError(f"{path}: the audio track holds no samples")
    samples = np.concatenate(chunks, axis=-1).astype(np.float32)
    if not np.isfinite(samples).all():
        raise AudioError(f"{path}: the audio holds NaN or infinite samples")
    return np.clip(samples, -1.0, 1.0), source_rate, channels
