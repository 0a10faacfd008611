"""Atomic writers and the built-in scene."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from avatar.errors import AvatarError
from avatar.media import write_frames, write_video
from avatar.scenes import person_scene


def _frames(count: int, fail_at: int | None = None):
    for i in range(count):
        if i == fail_at:
            raise RuntimeError("renderer crashed")
        yield np.full((32, 48, 3), i * 20, np.uint8)


def test_interrupted_video_leaves_nothing(tmp_path):
    out = tmp_path / "v.mp4"
    with pytest.raises(RuntimeError):
        write_video(out, _frames(10, fail_at=5))
    assert list(tmp_path.iterdir()) == []


def test_interrupted_video_keeps_the_previous_file(tmp_path):
    out = tmp_path / "v.mp4"
    write_video(out, _frames(3))
    before = out.read_bytes()
    with pytest.raises(RuntimeError):
        write_video(out, _frames(10, fail_at=2))
    assert out.read_bytes() == before and len(list(tmp_path.iterdir())) == 1


@pytest.mark.parametrize("channels", [1, 2, 6])
def test_video_sound_keeps_its_level_interleaves_and_streams(tmp_path, channels):
    """The sound track: mono or stereo as the file has it, more channels averaged (FFmpeg's own
    downmix would add six channels up), packets interleaved with the video, index first."""
    import wave

    import av

    rate, gen = 22050, np.random.default_rng(0)
    signal = 0.5 * np.sin(2 * np.pi * 330 * np.arange(3 * rate) / rate) * np.hanning(3 * rate)
    pcm = (np.repeat(signal[:, None], channels, 1) * 32767).astype("<i2")
    with wave.open(str(tmp_path / "in.wav"), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    frames = (gen.integers(0, 255, (32, 48, 3), dtype=np.uint8) for _ in range(75))
    write_video(tmp_path / "v.mp4", frames, fps=25.0, audio_path=tmp_path / "in.wav")
    with av.open(str(tmp_path / "v.mp4")) as c:
        sound = np.concatenate([f.to_ndarray() for f in c.decode(audio=0)], 1)
    with av.open(str(tmp_path / "v.mp4")) as c:
        kinds = [p.stream.type for p in c.demux() if p.size][:30]
    assert sound.shape[0] == (2 if channels == 2 else 1)
    rms = np.sqrt((sound**2).mean(1))
    assert np.allclose(rms, np.sqrt((signal**2).mean()), rtol=0.1), rms
    assert "audio" in kinds and "video" in kinds  # interleaved, not all video then all audio
    head = (tmp_path / "v.mp4").read_bytes()
    assert head.index(b"moov") < head.index(b"mdat")  # plays while it downloads


def test_a_video_with_unreadable_sound_is_a_clear_error(tmp_path):
    (tmp_path / "junk.wav").write_bytes(b"RIFF" + bytes(range(256)) * 4)
    with pytest.raises(AvatarError, match="could not write the video"):
        write_video(tmp_path / "v.mp4", _frames(3), audio_path=tmp_path / "junk.wav")
    assert not (tmp_path / "v.mp4").exists()


def test_interrupted_frame_folder_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        write_frames(tmp_path / "frames", _frames(4, fail_at=3))
    assert list(tmp_path.iterdir()) == []


def test_odd_sized_frames_are_padded_and_empty_videos_refused(tmp_path):
    assert (
        write_video(tmp_path / "odd.mp4", (np.zeros((31, 33, 3), np.uint8) for _ in range(2))) == 2
    )
    with pytest.raises(AvatarError, match="no frames"):
        write_video(tmp_path / "none.mp4", iter([]))
    assert not (tmp_path / "none.mp4").exists()


def test_person_scene_is_deterministic_and_person_sized():
    a, b = person_scene(3000, seed=1), person_scene(3000, seed=1)
    assert len(a) == 3000 and torch.equal(a.means, b.means) and torch.equal(a.sh, b.sh)
    lo, hi = a.means.min(0).values, a.means.max(0).values
    assert 1.7 < hi[1] - lo[1] < 1.9 and lo[1] > -0.01  # 1.8 m tall, standing on y = 0
    assert hi[0] - lo[0] < 0.8  # arms down, not a T-pose
