"""Body templates in the project's conventions, and skinning of points and Gaussians."""

from __future__ import annotations

import math

import pytest
import torch

from deform.skinning import skin_gaussians, skin_points
from deform.templates import MEDIAPIPE_BODY, MEDIAPIPE_HAND
from render import Gaussians
from render.rotations import quat_to_rotmat

anny = pytest.importorskip("anny", reason="the Anny template needs `pip install anny`")


@pytest.fixture(scope="module")
def tpl():
    from deform.templates.anny import AnnyTemplate

    return AnnyTemplate()  # the first run in a fresh cache builds Anny (~50 s)


def _rest(tpl):
    return tpl(tpl.default_shape()[None])


def test_anny_is_in_canonical_axes(tpl):
    out = _rest(tpl)
    lm = dict(zip(tpl.body_landmarks, tpl.landmarks(out, tpl.body_landmarks)[0], strict=True))
    assert lm["nose"][1] > lm["left_shoulder"][1] > lm["left_hip"][1] > lm["left_ankle"][1]  # +Y up
    assert lm["nose"][2] > 0.1 and lm["left_foot_index"][2] > lm["left_heel"][2]  # faces +Z
    assert lm["left_wrist"][0] > 0.3 and lm["right_wrist"][0] < -0.3  # left hand at +X
    height = out.rest_vertices[0, :, 1].max() - out.rest_vertices[0, :, 1].min()
    assert 1.6 < height < 2.0
    assert tpl.num_bones == 104 and len(tpl.expression_names) == 52
    assert {"jawOpen", "mouthFunnel", "mouthPucker", "mouthClose", "eyeBlinkLeft"} <= set(
        tpl.expression_names
    )


def test_landmark_tables_follow_mediapipe(tpl):
    assert set(tpl.body_landmarks) <= set(MEDIAPIPE_BODY) and len(tpl.body_landmarks) >= 25
    for side in ("left", "right"):
        assert tuple(tpl.hand_landmarks[side]) == MEDIAPIPE_HAND
        pts = tpl.landmarks(_rest(tpl), tpl.hand_landmarks[side])[0]
        wrist, tips = pts[0], pts[[4, 8, 12, 16, 20]]
        assert ((tips - wrist).norm(dim=-1) > 0.06).all()  # finger tips lie beyond the palm


def test_part_masks(tpl):
    masks = tpl.part_masks()
    for name in ("face", "lips", "eyelids", "hand_left", "hand_right", "head", "hidden"):
        assert masks[name].dtype == torch.bool and masks[name].sum() > 50, name
    assert (
        not (masks["lips"] & ~masks["face"]).any() and not (masks["face"] & masks["hidden"]).any()
    )
    v = _rest(tpl).rest_vertices[0]
    assert v[masks["hand_left"], 0].min() > 0.3 and v[masks["hand_right"], 0].max() < -0.3


def test_own_lbs_reproduces_the_template_and_expressions_move_the_mouth(tpl):
    gen = torch.Generator().manual_seed(0)
    shape = torch.rand(2, len(tpl.shape_names), generator=gen)
    pose = 0.3 * torch.randn(2, tpl.num_bones, 3, generator=gen)
    expr = torch.zeros(2, len(tpl.expression_names))
    expr[:, tpl.expression_names.index("jawOpen")] = 1.0
    out = tpl(
        shape, pose=pose, translation=torch.tensor([[0.1, 0.2, 0.3], [0, 0, 0]]), expression=expr
    )
    for b in range(2):
        mine = skin_points(
            out.rest_vertices[b], tpl.skin_ids, tpl.skin_weights, out.transforms[b : b + 1]
        )
        assert (mine[0] - out.vertices[b]).abs().max() < 1e-5
    closed = tpl(shape, pose=pose)
    lips = tpl.part_masks()["lips"]
    assert (out.rest_vertices[:, lips] - closed.rest_vertices[:, lips]).norm(dim=-1).max() > 0.01


def test_skinned_gaussians_follow_a_rigid_turn(tpl):
    out = _rest(tpl)
    ids = torch.arange(0, tpl.num_vertices, 97)
    g = Gaussians.from_activated(out.rest_vertices[0, ids], torch.full((len(ids), 3), 0.01),
                                 torch.full((len(ids),), 0.5), rgb=torch.rand(len(ids), 3))  # fmt: skip
    pose = torch.zeros(1, tpl.num_bones, 3)
    pose[0, 0, 1] = math.pi / 2  # turn the whole body about +Y via the root
    posed = tpl(tpl.default_shape()[None], pose=pose)
    moved = skin_gaussians(g, tpl.skin_ids[ids], tpl.skin_weights[ids], posed.transforms[0])
    assert torch.allclose(moved.means, posed.vertices[0, ids], atol=1e-5)
    turn = posed.transforms[0, 0, :3, :3]
    assert torch.allclose(quat_to_rotmat(moved.quats), turn.expand(len(ids), 3, 3), atol=1e-5)
    assert torch.allclose(
        turn @ torch.tensor([0.0, 0.0, 1.0]), torch.tensor([1.0, 0.0, 0.0]), atol=1e-5
    )


def test_pose_transforms_skip_the_mesh_and_equal_the_full_forward(tpl):
    """Driving asks the template for transforms only (`pose_transforms`: Anny's rest skeleton
    once per shape, then forward kinematics); they must equal a full forward's, and gradients
    still reach the pose and the shape."""
    gen = torch.Generator().manual_seed(0)
    shape = tpl.default_shape() + 0.1 * torch.rand(len(tpl.shape_names), generator=gen)
    pose = torch.randn(6, tpl.num_bones, 3, generator=gen) * 0.3
    full = tpl(shape[None].expand(6, -1), pose=pose).transforms
    fast = tpl.pose_transforms(shape, pose)
    assert fast.shape == (6, tpl.num_bones, 4, 4)
    assert (fast - full).abs().max() < 1e-5
    other = tpl.pose_transforms(tpl.default_shape(), pose[:1])  # a new shape is not the cached one
    assert (other - tpl(tpl.default_shape()[None], pose=pose[:1]).transforms).abs().max() < 1e-5
    shape.requires_grad_()
    pose.requires_grad_()
    tpl.pose_transforms(shape, pose)[:, :, :3, 3].sum().backward()
    assert pose.grad.abs().sum() > 0 and shape.grad.abs().sum() > 0


def test_baked_anny_is_anny_at_one_shape(tpl, tmp_path):
    """An avatar's template (Anny evaluated once at its shape, `deform.templates.baked`) poses,
    skins and blends expressions as Anny does, through a save and a load, gradients included."""
    from deform.templates.baked import BakedAnny

    gen = torch.Generator().manual_seed(1)
    shape = torch.tensor([0.3, 0.7, 0.4, 0.6, 0.55, 0.45])
    BakedAnny.from_template(tpl, shape).save(tmp_path / "bake.safetensors")
    baked = BakedAnny.load(tmp_path / "bake.safetensors")
    shapes = shape[None].expand(2, -1)
    pose = (0.3 * torch.randn(2, tpl.num_bones, 3, generator=gen)).requires_grad_()
    move = torch.randn(2, 3, generator=gen)
    expr = torch.rand(2, len(tpl.expression_names), generator=gen)
    for kw in ({}, {"expression": expr}, {"translation": move},
               {"pose": pose, "translation": move, "expression": expr}):  # fmt: skip
        want, got = tpl(shapes, **kw), baked(shapes, **kw)
        for field in ("vertices", "rest_vertices", "transforms", "joints"):
            err = (getattr(want, field) - getattr(got, field)).abs().max()
            assert err < 3e-5, (sorted(kw), field, float(err))
    want, got = tpl.pose_transforms(shape, pose), baked.pose_transforms(shape, pose)
    assert (want - got).abs().max() < 1e-5
    (g_want,) = torch.autograd.grad(want.square().sum(), pose)
    (g_got,) = torch.autograd.grad(got.square().sum(), pose)
    assert (g_want - g_got).abs().max() < 1e-3 * g_want.abs().max()
    assert baked.bone_parents == tpl.bone_parents and baked.bone_segments() == tpl.bone_segments()
    assert (baked.body_landmarks, baked.hand_landmarks, baked.face_landmarks) == (
        tpl.body_landmarks, tpl.hand_landmarks, tpl.face_landmarks)  # fmt: skip
    masks = tpl.part_masks()
    assert baked.part_masks().keys() == masks.keys()
    assert all(torch.equal(baked.part_masks()[k], m) for k, m in masks.items())
    with pytest.raises(ValueError, match="only the body shape it was baked at"):
        baked(tpl.default_shape()[None])


def test_an_avatars_template_needs_no_anny_import_once_baked(tpl):
    """Importing Anny costs a second per run (roma imports torch._dynamo): once baked, an
    avatar's template is read back without it. A bake that does not read is baked again."""
    import subprocess
    import sys

    from deform.templates.baked import bake_path, baked_anny

    shape = torch.tensor([0.25, 0.5, 0.5, 0.5, 0.5, 0.75])
    path = bake_path(shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not a safetensors file")  # a broken cache entry
    first = baked_anny(shape)
    assert (first(shape[None]).rest_vertices - tpl(shape[None]).rest_vertices).abs().max() < 1e-5
    code = ("import sys, torch\n"
            "from deform.templates.baked import baked_anny\n"
            f"t = baked_anny(torch.tensor({shape.tolist()}))\n"
            "t.pose_transforms(t.shape, torch.zeros(1, t.num_bones, 3))\n"
            "print(sorted(m for m in ('anny', 'roma', 'torch._dynamo') if m in sys.modules))\n")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_an_anny_cache_file_cut_short_is_built_again_whole(tpl, tmp_path):
    """Anny writes its cache in place: a first run killed while writing left a file that no
    later run could read. `_build_anny` builds what does not read in a staging folder and
    renames it into place; what reads is linked, not built again."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from deform.templates.anny import _reads, anny_cache_dir, link_or_copy

    (compact,) = anny_cache_dir().glob("v*/build_compact_model_data*.safetensors")  # tpl built it
    (tmp_path / compact.parent.name).mkdir()
    for done in compact.parent.glob("*.safetensors"):
        here = tmp_path / done.parent.name / done.name
        if done == compact:  # the half that was written before the kill
            here.write_bytes(done.read_bytes()[: done.stat().st_size // 2])
        else:
            link_or_copy(done, here)
    cut = tmp_path / compact.parent.name / compact.name
    assert not _reads(cut)
    res = subprocess.run(
        [sys.executable, "-c", "from deform.templates.anny import _build_anny; _build_anny()"],
        cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=600,
        env={**os.environ, "ANNY_CACHE_DIR": str(tmp_path)},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "does not read" in res.stderr and "building it again" in res.stderr
    assert _reads(cut) and cut.stat().st_size == compact.stat().st_size
    assert not list(tmp_path.glob(".building-*"))  # the staging folder is gone
