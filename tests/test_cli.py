"""The `avatar` command as a user runs it: real processes, real files, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import imageio.v2 as iio
import numpy as np
import pytest

from avatar.scenes import person_scene
from render import save_ply

from .helpers import avatar_in_process


def run_avatar(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "avatar", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)  # fmt: skip


@pytest.fixture(scope="module")
def person_ply(tmp_path_factory):
    path = tmp_path_factory.mktemp("scene") / "person.ply"
    save_ply(person_scene(4000, sh_degree=1), path)
    return path


def test_render_orbit_mp4(person_ply, tmp_path):
    out = tmp_path / "orbit.mp4"
    res = run_avatar("render", str(person_ply), "-o", str(out), "--orbit", "8", "--size", "96")
    assert res.returncode == 0, res.stderr
    assert "render" in res.stderr  # the progress bar
    frames = [f for f in iio.get_reader(out)]
    assert len(frames) == 8 and frames[0].shape == (96, 96, 3)
    for f in frames:  # a person in the middle of a white frame, not an empty image
        dark = (f.astype(int).sum(-1) < 600).mean()
        assert 0.02 < dark < 0.5
    front, back = frames[0].astype(float), frames[4].astype(float)
    assert np.abs(front - back).mean() > 1.0  # the turntable turns
    assert not list(tmp_path.glob(".*partial*"))


def test_render_png_and_frame_folder(person_ply, tmp_path):
    res = run_avatar("render", str(person_ply), "-o", str(tmp_path / "one.png"), "--size", "64",
                     "--background", "black")  # fmt: skip
    assert res.returncode == 0, res.stderr
    img = iio.imread(tmp_path / "one.png")
    assert img.shape == (64, 64, 3) and img[0, 0].sum() == 0 and img.max() > 100
    res = run_avatar("render", str(person_ply), "-o", str(tmp_path / "frames"), "--orbit", "3",
                     "--size", "32", "--elevation", "30")  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (tmp_path / "frames").iterdir()) == [
        "frame_00000.png", "frame_00001.png", "frame_00002.png"]  # fmt: skip


def test_render_splat_input(person_ply, tmp_path):
    from render import load_splats, save_splat

    save_splat(load_splats(person_ply), tmp_path / "p.splat")
    res = run_avatar(
        "render", str(tmp_path / "p.splat"), "-o", str(tmp_path / "p.png"), "--size", "48"
    )
    assert res.returncode == 0, res.stderr


def test_render_bad_inputs_exit_2_without_traceback(person_ply, tmp_path):
    (tmp_path / "broken.ply").write_bytes(b"ply\nformat binary_little_endian 1.0\n")
    (tmp_path / "empty.ply").write_bytes(b"")
    cases = [
        (["render", str(tmp_path / "nope.ply"), "-o", str(tmp_path / "x.mp4")], "no such file"),
        (["render", str(tmp_path / "broken.ply"), "-o", str(tmp_path / "x.mp4")], "end_header"),
        (["render", str(tmp_path / "empty.ply"), "-o", str(tmp_path / "x.mp4")], "empty"),
        (["render", str(person_ply), "-o", str(tmp_path / "x.gif")], "unknown output type"),
        (["render", str(person_ply), "-o", str(tmp_path / "no/dir/x.mp4")], "does not exist"),
        (["render", str(person_ply), "-o", str(tmp_path / "x.mp4"), "--size", "0"], "at least 1"),
    ]
    for args, message in cases:
        res = avatar_in_process(*args)
        assert res.returncode == 2, (args, res.stderr)
        assert message in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert not list(tmp_path.glob("x.*")) and not list(tmp_path.glob(".*partial*"))


def test_render_refuses_to_overwrite_without_force(person_ply, tmp_path):
    out = tmp_path / "keep.png"
    out.write_bytes(b"precious")
    res = avatar_in_process("render", str(person_ply), "-o", str(out), "--size", "32")
    assert res.returncode == 2 and "--force" in res.stderr
    assert out.read_bytes() == b"precious"
    res = run_avatar("render", str(person_ply), "-o", str(out), "--size", "32", "--force")
    assert res.returncode == 0 and out.read_bytes()[:4] == b"\x89PNG"


def test_bench_render_prints_json():
    res = run_avatar("bench", "render", "--gaussians", "3000", "--size", "64", "--frames", "3",
                     "--backward-size", "32", "--backward-steps", "2", "--json")  # fmt: skip
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout)
    for key in ("forward_fps", "forward_backward_s", "peak_rss_mb", "speedup_vs_reference"):
        assert result[key] > 0, key
    assert result["backend"] == "native" and result["max_abs_diff_vs_reference"] < 0.05
    assert result["reference_timing"] == "both backends warm, median of 3"  # like for like
    ratio = result["reference_forward_s"] / result["forward_s_same_view"]
    assert ratio == pytest.approx(result["speedup_vs_reference"], rel=0.1)


def test_bench_render_against_a_previous_release(tmp_path):
    """--previous times another release's kernel in a child process the same way (here the
    release is this source tree itself; timings of a 64-px scene on a shared machine are too
    noisy to bound the ratio)."""
    root = Path(__file__).resolve().parents[1]
    small = ["--gaussians", "3000", "--size", "64", "--frames", "3", "--backward-size", "32",
             "--backward-steps", "2", "--no-reference", "--json"]  # fmt: skip
    res = run_avatar("bench", "render", *small, "--previous", str(root))
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout)
    assert result["previous"] == str(root)
    assert result["speedup_vs_previous"] == pytest.approx(
        result["previous_forward_ms"] / result["forward_ms"], rel=0.01)  # fmt: skip
    assert result["previous_forward_backward_s"] > 0
    res = run_avatar("bench", "render", *small, "--previous", str(tmp_path))
    assert res.returncode == 2 and "not a gsavatar source folder" in res.stderr


def test_bench_create_over_seeds():
    """`bench create --seeds` creates once per seed and gives each figure over them: the runs
    differ (the seed is used), and the summary is their own mean and spread (in process: a
    tiny create of the demo photo twice)."""
    pytest.importorskip("anny", reason="create needs the Anny template")
    tiny = ["--gaussians", "3000", "--size", "128", "--fit-steps", "5", "--refine-steps", "2",
            "--personalise-steps", "0"]  # fmt: skip
    res = avatar_in_process("bench", "create", *tiny, "--seeds", "0,1", "--json")
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout)
    assert result["seeds"] == [0, 1] and len(result["runs"]) == 2
    identity = [run["views"]["identity"]["yaw_30"] for run in result["runs"]]
    assert identity[0] != identity[1]  # two samplings, two avatars
    over = result["over_seeds"]["views.identity.yaw_30"]
    assert over["mean"] == pytest.approx(np.mean(identity), abs=1e-4)
    assert over["sd"] == pytest.approx(np.std(identity), abs=1e-4)
    assert (over["min"], over["max"]) == (min(identity), max(identity))
    passed = [run["views"]["pass"]["identity"] for run in result["runs"]]
    assert result["over_seeds"]["views.pass.identity"] == {"share": sum(passed) / 2}
    for bad in ("0,x", "1,1"):
        res = avatar_in_process("bench", "create", "--seeds", bad)
        assert res.returncode == 2 and "--seeds" in res.stderr


def test_demo_creates_an_avatar_and_a_video(tmp_path):
    pytest.importorskip("anny", reason="the demo needs the Anny template")
    res = run_avatar("demo", "-o", str(tmp_path / "demo"), "--frames", "4", "--size", "128",
                     "--gaussians", "6000", "--fit-steps", "40", "--refine-steps", "30")  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "grace_hopper.jpg" in res.stdout
    assert len([f for f in iio.get_reader(tmp_path / "demo" / "orbit.mp4")]) == 4
    assert (tmp_path / "demo" / "demo.avatar" / "gaussians.ply").stat().st_size > 1000
