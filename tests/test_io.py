"""PLY and .splat files: round trips, foreign layouts and clear errors for bad files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from render import load_splats, save_ply, save_splat
from render.io import SplatFileError

from .helpers import random_scene

STANDARD_ORDER = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]


@pytest.mark.parametrize("degree", [0, 1, 3])
def test_ply_round_trip_is_exact(tmp_path, degree):
    g = random_scene(64, degree)
    save_ply(g, tmp_path / "s.ply")
    back = load_splats(tmp_path / "s.ply")
    for name, value in g.parameters().items():
        assert torch.equal(getattr(back, name), value), name


def test_ply_header_is_the_standard_3dgs_layout(tmp_path):
    save_ply(random_scene(4, 1), tmp_path / "s.ply")
    header = (tmp_path / "s.ply").read_bytes().split(b"end_header")[0].decode()
    props = [line.split()[-1] for line in header.splitlines() if line.startswith("property")]
    assert "format binary_little_endian 1.0" in header and "element vertex 4" in header
    assert props[:9] == STANDARD_ORDER
    assert props[9:18] == [f"f_rest_{i}" for i in range(9)]
    assert props[18:] == ["opacity", "scale_0", "scale_1", "scale_2",
                          "rot_0", "rot_1", "rot_2", "rot_3"]  # fmt: skip


def test_ply_f_rest_is_channel_major(tmp_path):
    g = random_scene(2, 1)
    save_ply(g, tmp_path / "s.ply")
    raw = (tmp_path / "s.ply").read_bytes()
    data = np.frombuffer(raw[raw.index(b"end_header\n") + 11 :], "<f4").reshape(2, -1)
    # f_rest_0..2 are the three degree-1 coefficients of the red channel
    assert np.allclose(data[0, 9:12], g.sh[0, 1:4, 0].numpy())


def test_feature_gaussians_round_trip_through_ply(tmp_path):
    g = random_scene(10, feature_dim=6)
    save_ply(g, tmp_path / "f.ply")
    assert torch.equal(load_splats(tmp_path / "f.ply").features, g.features)


def test_ascii_and_big_endian_double_ply_are_read(tmp_path):
    names = STANDARD_ORDER + ["opacity", "scale_0", "scale_1", "scale_2",
                              "rot_0", "rot_1", "rot_2", "rot_3"]  # fmt: skip
    rows = np.array([[0.1, 0.2, 0.3, 0, 0, 0, 0.5, -0.5, 1.0, 2.0, -3, -3, -3, 1, 0, 0, 0],
                     [1.0, 1.0, 1.0, 0, 0, 0, 0.0, 0.0, 0.0, -1.0, -4, -4, -4, 0, 1, 0, 0]])  # fmt: skip
    head = "ply\nformat {}\ncomment made by hand\nelement vertex 2\n"
    ascii_text = head.format("ascii 1.0") + "".join(f"property float {n}\n" for n in names)
    ascii_text += "end_header\n" + "\n".join(" ".join(map(str, r)) for r in rows) + "\n"
    (tmp_path / "a.ply").write_text(ascii_text)
    big = head.format("binary_big_endian 1.0") + "".join(f"property double {n}\n" for n in names)
    (tmp_path / "b.ply").write_bytes((big + "end_header\n").encode() + rows.astype(">f8").tobytes())
    for f in ("a.ply", "b.ply"):
        g = load_splats(tmp_path / f)
        assert torch.allclose(g.means[0], torch.tensor([0.1, 0.2, 0.3]))
        assert torch.allclose(g.opacity_logits, torch.tensor([2.0, -1.0]))
        assert g.sh_degree == 0


def test_splat_round_trip_is_close(tmp_path):
    g = random_scene(100, 0)
    g = g.replace(quats=torch.nn.functional.normalize(g.quats, dim=-1))
    save_splat(g, tmp_path / "s.splat")
    assert (tmp_path / "s.splat").stat().st_size == 32 * 100
    back = load_splats(tmp_path / "s.splat")
    order = torch.argsort(-(g.scales.prod(-1) * g.opacities))  # .splat is sorted by size x opacity
    g = g[order]
    assert torch.allclose(back.means, g.means) and torch.allclose(back.scales, g.scales, rtol=1e-5)
    assert (back.opacities - g.opacities).abs().max() < 3 / 255
    signs = torch.sign((back.quats * g.quats).sum(-1, keepdim=True))
    assert (back.quats * signs - g.quats).abs().max() < 2 / 128


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"", "empty"),
        (b"hello world, not a splat", "not a PLY"),
        (b"ply\nformat binary_little_endian 1.0\nelement vertex 10\nproperty float x\n", "end_header"),
        (b"ply\nformat binary_little_endian 1.0\nelement vertex 10\nproperty float x\n"
         b"end_header\n" + b"\0" * 12, "truncated"),
        (b"ply\nformat binary_little_endian 1.0\nelement vertex 1\nproperty float x\n"
         b"end_header\n" + b"\0" * 4, "missing properties"),
        (b"ply\nformat fancy 1.0\nelement vertex 1\nend_header\n", "unsupported PLY format"),
    ],
)  # fmt: skip
def test_bad_ply_files_name_the_file_and_the_problem(tmp_path, content, problem):
    path = tmp_path / "bad.ply"
    path.write_bytes(content)
    with pytest.raises(SplatFileError, match=problem) as info:
        load_splats(path)
    assert str(path) in str(info.value)


def test_truncated_real_ply_and_splat(tmp_path):
    save_ply(random_scene(50, 1), tmp_path / "s.ply")
    raw = (tmp_path / "s.ply").read_bytes()
    (tmp_path / "cut.ply").write_bytes(raw[: len(raw) - 100])
    with pytest.raises(SplatFileError, match="truncated"):
        load_splats(tmp_path / "cut.ply")
    (tmp_path / "cut.splat").write_bytes(b"\0" * 70)
    with pytest.raises(SplatFileError, match="multiple of 32"):
        load_splats(tmp_path / "cut.splat")


def test_nan_values_missing_files_and_unknown_extensions(tmp_path):
    g = random_scene(5, 0)
    means = g.means.clone()
    means[2, 1] = float("nan")
    save_ply(g.replace(means=means), tmp_path / "nan.ply")
    with pytest.raises(SplatFileError, match="NaN"):
        load_splats(tmp_path / "nan.ply")
    with pytest.raises(SplatFileError, match="no such file"):
        load_splats(tmp_path / "missing.ply")
    (tmp_path / "scene.obj").write_text("v 0 0 0\n")
    with pytest.raises(SplatFileError, match="unknown splat format"):
        load_splats(tmp_path / "scene.obj")
