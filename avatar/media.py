"""Writing images, frame folders and MP4 videos, always atomically.

Every writer works on a temporary sibling of the destination and renames it into place only when
everything was written, so an interrupted run (Ctrl-C, a crash, a full disk) never leaves a
half-written file or folder behind.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from fractions import Fraction
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
    """Encode frames to H.264 MP4 (yuv420p, plays everywhere) in this process with PyAV,
    optionally with the sound of `audio_path` as AAC (whole; give as many frames as the audio
    lasts). The file streams (its index first, audio and video interleaved). Returns the frame
    count."""
    import av

    count = 0
    try:
        with atomic_path(path) as tmp, av.open(str(tmp), "w", format="mp4",
                                               options=MP4_OPTIONS) as out:  # fmt: skip
            video = None
            for frame in frames:
                h, w = frame.shape[:2]
                if h % 2 or w % 2:  # yuv420p needs even sizes: repeat the last row / column
                    frame = np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
                if video is None:  # every stream is added before the first packet is written
                    video = out.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
                    video.width, video.height = frame.shape[1], frame.shape[0]
                    video.pix_fmt = "yuv420p"
                    video.options = {"crf": str(VIDEO_CRF), "preset": "veryfast"}
                    if audio_path is not None:  # all of it now: the muxer interleaves it
                        with stage("encode"):
                            _add_audio(out, Path(audio_path))
                with stage("encode"):
                    picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), "rgb24")
                    out.mux(video.encode(picture))
                count += 1
            if video is None:
                raise AvatarError(f"{path}: no frames to write")
            with stage("encode"):
                out.mux(video.encode(None))  # the encoder's delayed frames
    except av.error.FFmpegError as exc:
        raise AvatarError(f"{path}: could not write the video ({exc})") from None
    return count


VIDEO_CRF = 15  # libx264 constant rate factor: visually lossless for rendered frames (with
# preset veryfast: a third less encoding time than medium, files within 10%)
# the index at the front (plays while it downloads); packets held until every stream has one,
# so the audio written first is interleaved with the video as it comes
MP4_OPTIONS = {"movflags": "+faststart", "max_interleave_delta": "0"}
AAC_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000)


def _add_audio(out, source: Path) -> None:
    """The first audio track of `source` as an AAC stream of the MP4 being written: mono or
    stereo as the file has it, more channels averaged to mono (as `deform.audio.load_audio`
    does: FFmpeg's own downmix adds them up and clips loud recordings), at the file's rate where
    AAC has it, else 48 kHz."""
    import av

    with av.open(str(source)) as src:
        stream = src.streams.audio[0]
        channels = stream.codec_context.channels
        rate = stream.codec_context.sample_rate
        rate = rate if rate in AAC_RATES else 48000
        layout = "stereo" if channels == 2 else "mono"
        aac = out.add_stream("aac", rate=rate, layout=layout)
        decoded = av.AudioResampler(format="fltp", layout=stream.layout.name, rate=rate)
        framed = av.AudioResampler(format=aac.format.name, layout=layout, rate=rate,
                                   frame_size=aac.frame_size)  # fmt: skip

        def encode(chunks) -> None:
            for chunk in chunks:
                if channels > 2:
                    mono = chunk.to_ndarray().mean(0, keepdims=True)
                    pts, chunk = chunk.pts, av.AudioFrame.from_ndarray(mono, "fltp", "mono")
                    chunk.sample_rate, chunk.pts = rate, pts
                for piece in framed.resample(chunk):
                    out.mux(aac.encode(piece))

        for frame in src.decode(stream):
            encode(decoded.resample(frame))
        encode(decoded.resample(None))
        for piece in framed.resample(None):
            out.mux(aac.encode(piece))
        out.mux(aac.encode(None))


def write_wav(path: str | os.PathLike, samples: np.ndarray, sample_rate: int) -> None:
    """16-bit PCM mono WAV, atomically."""
    import wave

    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
    with atomic_path(path) as tmp, wave.open(str(tmp), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())
