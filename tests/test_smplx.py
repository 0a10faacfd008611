"""SMPL-X through the `smplx` package, on a generated stand-in model file (never real SMPL-X)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from .helpers import SHARED_DATA

pytest.importorskip("smplx", reason="the SMPL-X template needs `pip install smplx`")


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    from .smplx_standin import make_standin

    path = tmp_path_factory.mktemp("smplx") / "SMPLX_NEUTRAL.npz"
    make_standin(path)
    return path


def test_adapter_matches_the_smplx_package(standin):
    from deform.skinning import skin_points
    from deform.templates import load_template

    tpl = load_template(f"smplx:{standin.parent}")  # a folder works too
    gen = torch.Generator().manual_seed(0)
    pose = 0.3 * torch.randn(1, 55, 3, generator=gen)
    betas = 0.5 * torch.randn(1, 10, generator=gen)
    expr = torch.zeros(1, 10)
    expr[0, 0] = 1.0
    trans = torch.tensor([[0.1, 0.2, 0.3]])
    out = tpl(betas, pose=pose, translation=trans, expression=expr)
    import smplx

    m = smplx.SMPLX(
        str(standin),
        num_betas=10,
        num_expression_coeffs=10,
        use_pca=False,
        flat_hand_mean=True,
        ext="npz",
    )  # the package's own loader, on our own file
    ref = m(betas=betas, global_orient=pose[:, 0], body_pose=pose[:, 1:22].reshape(1, -1),
            jaw_pose=pose[:, 22], leye_pose=pose[:, 23], reye_pose=pose[:, 24],
            left_hand_pose=pose[:, 25:40].reshape(1, -1), right_hand_pose=pose[:, 40:55].reshape(1, -1),
            transl=trans, expression=expr)  # fmt: skip
    assert (ref.vertices - out.vertices).abs().max() < 1e-5
    mine = skin_points(out.rest_vertices[0], tpl.skin_ids, tpl.skin_weights, out.transforms)
    assert (mine - out.vertices).abs().max() < 1e-5  # no pose correctives in the stand-in
    rest = tpl(tpl.default_shape()[None])
    lm = dict(zip(tpl.body_landmarks, tpl.landmarks(rest, tpl.body_landmarks)[0], strict=True))
    assert lm["nose"][1] > lm["left_hip"][1] and lm["nose"][2] > 0.05 and lm["left_wrist"][0] > 0.3
    masks = tpl.part_masks()
    assert masks["face"].sum() > 50 and masks["hand_left"].sum() > 50 and masks["lips"].sum() > 0


def test_bad_model_files(tmp_path):
    from deform.templates import load_template

    with pytest.raises(ValueError, match="no such SMPL-X model file"):
        load_template(f"smplx:{tmp_path / 'missing.npz'}")
    with pytest.raises(ValueError, match="no SMPLX_NEUTRAL.npz"):
        load_template(f"smplx:{tmp_path}")
    (tmp_path / "bad.npz").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a readable .npz file"):
        load_template(f"smplx:{tmp_path / 'bad.npz'}")


class _Payload:
    """Unpickling this runs code: it creates a file (what a crafted model file could do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickled_model_file_runs_nothing(standin, tmp_path):
    """An npz whose needed array is a pickled object is refused before anything unpickles it;
    the smplx package itself (allow_pickle=True) would have created the marker file."""
    import numpy as np

    from deform.templates import load_template

    marker = tmp_path / "pwned"
    arrays = dict(np.load(standin))
    arrays["v_template"] = np.array([_Payload(marker)], dtype=object)
    np.savez(tmp_path / "SMPLX_NEUTRAL.npz", **arrays)
    with pytest.raises(ValueError, match="pickled Python objects; refusing"):
        load_template(f"smplx:{tmp_path}")
    assert not marker.exists()
    # extra pickled keys (SMPL-X ships some) are never read: the model still loads
    arrays = dict(np.load(standin))
    arrays["joint2num"] = np.array([_Payload(marker)], dtype=object)
    np.savez(tmp_path / "SMPLX_NEUTRAL.npz", **arrays)
    assert load_template(f"smplx:{tmp_path}").num_bones == 55 and not marker.exists()
    arrays = dict(np.load(standin))
    arrays["f"] = arrays["f"] + 10**6  # faces outside the model
    np.savez(tmp_path / "SMPLX_NEUTRAL.npz", **arrays)
    with pytest.raises(ValueError, match="outside the model"):
        load_template(f"smplx:{tmp_path}")


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"test photos not found in {SHARED_DATA}")
def test_create_with_smplx(standin, tmp_path):
    pytest.importorskip("mediapipe", reason="create needs person parsing")
    out = tmp_path / "me.avatar"
    cmd = [sys.executable, "-m", "avatar", "create", str(SHARED_DATA / "person_sweater_fullbody.png"),
           "-o", str(out), "--body", f"smplx:{standin}", "--gaussians", "6000", "--size", "192",
           "--fit-steps", "60", "--refine-steps", "30"]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads((out / "avatar.json").read_text())
    assert doc["template"] == {"kind": "smplx", "shape": doc["template"]["shape"]}  # no path
    render = [sys.executable, "-m", "avatar", "render", str(out), "--view", "yaw=45",
              "-o", str(tmp_path / "side.png")]  # fmt: skip
    res = subprocess.run(render, capture_output=True, text=True)
    assert res.returncode == 2 and "--body smplx:PATH" in res.stderr  # files come from the user
    res = subprocess.run(render + ["--body", f"smplx:{standin}"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    bad = subprocess.run([sys.executable, "-m", "avatar", "create", str(SHARED_DATA / "person_sweater_fullbody.png"),
                          "-o", str(tmp_path / "x.avatar"), "--body", "smplx:/nowhere.npz"],
                         capture_output=True, text=True)  # fmt: skip
    assert (
        bad.returncode == 2
        and "no such SMPL-X model file" in bad.stderr
        and "Traceback" not in bad.stderr
    )
