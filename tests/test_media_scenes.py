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
