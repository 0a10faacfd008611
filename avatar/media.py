"""Writing images, frame folders and MP4 videos, always atomically.

Every writer works on a temporary sibling of the destination and renames it into place only when
everything was written, so an interrupted run (Ctrl-C, a crash, a full disk) never leaves a
half-written file or folder behind.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from render.io import atomic_path
from render.profiling import stage

from .errors import AvatarError, OutputExistsError

VIDEO_SUFFIXES = (".mp4",)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def check_output(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise OutputExistsError(f"{path} already exists; pass --force to overwrite it")
    if not path.parent.exists():
        raise AvatarError(f"{path}: the folder {path.parent} does not exist")


def write_image(path: str | os.PathLike, image: np.ndarray) -> None:
    import imageio.v3 as iio

    with atomic_path(path) as tmp:
        iio.imwrite(tmp, image, extension=Path(path).suffix)


def write_frames(path: str | os.PathLike, frames: Iterable[np.ndarray]) -> int:
    """Write frames as `frame_00000.png`, ... into a new folder `path`. Returns the count."""
    import imageio.v3 as iio

    count = 0
    with atomic_path(path) as tmp:
        tmp.mkdir()
        for count, frame in enumerate(frames, start=1):
            iio.imwrite(tmp / f"frame_{count - 1:05d}.png", frame)
    return count


def write_video(
    path: str | os.PathLike,
    frames: Iterable[np.ndarray],  # each [H, W, 3] uint8, all the same size
    fps: float = 25.0,
    audio_path: str | os.PathLike | None = None,
) -> int:
    """Encode frames to H.264 MP4 (yuv420p, plays everywhere), optionally muxing an audio track
    as AAC (whole; give as many frames as the audio lasts). Returns the frame count."""
    import imageio_ffmpeg

    count = 0
    with atomic_path(path) as tmp:
        writer = None
        try:
            for frame in frames:
                h, w = frame.shape[:2]
                if h % 2 or w % 2:  # yuv420p needs even sizes: repeat the last row / column
                    frame = np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
                if writer is None:
                    extra: dict = {}
                    if audio_path is not None:
                        # no -shortest: with piped frames FFmpeg cuts the video early; the
                        # caller makes the frame count match the audio instead
                        extra = dict(audio_path=str(audio_path), audio_codec="aac")
                    writer = imageio_ffmpeg.write_frames(
                        str(tmp), (frame.shape[1], frame.shape[0]), fps=fps, codec="libx264",
                        pix_fmt_out="yuv420p", macro_block_size=1, quality=7,
                        ffmpeg_log_level="error", **extra,
                    )  # fmt: skip
                    writer.send(None)
                with stage("encode"):
                    writer.send(np.ascontiguousarray(frame))
                count += 1
        finally:
            if writer is not None:
                with stage("encode"):
                    writer.close()
        if count == 0:
            raise AvatarError(f"{path}: no frames to write")
    return count


def write_wav(path: str | os.PathLike, samples: np.ndarray, sample_rate: int) -> None:
    """16-bit PCM mono WAV, atomically."""
    import wave

    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
    with atomic_path(path) as tmp, wave.open(str(tmp), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())
