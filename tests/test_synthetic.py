"""Procedural training subjects: deterministic, in frame, facing the camera, saved exactly."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("anny", reason="synthetic subjects need the Anny template")

from deform.skinning import apply_blend  # noqa: E402
from deform.templates import load_template  # noqa: E402
from reconstruct.canonical import PART_CODES, sample_canonical  # noqa: E402
from reconstruct.refine import posed_blend  # noqa: E402
from reconstruct.synthetic import load_subject, make_dataset, make_subject, save_subject  # noqa: E402
from render.rotations import quat_to_rotmat  # noqa: E402

N, SIZE, SEED = 3000, 128, 7


@pytest.fixture(scope="module")
def template():
    return load_template("anny")


@pytest.fixture(scope="module")
def subject(template):
    return make_subject(template, SEED, num_gaussians=N, size=SIZE)


def _tensors(s) -> dict[str, torch.Tensor]:
    out = {
        k: getattr(s, k) for k in ("shape", "pose", "translation", "image", "mask", "transforms")
    }
    out |= {"viewmats": s.camera.viewmats, "Ks": s.camera.Ks}
    for name in ("template", "target"):
        g = getattr(s, name)
        out |= {
            f"{name}.{k}": getattr(g, k)
            for k in ("means", "quats", "log_scales", "opacity_logits", "sh")
        }
    out |= {f"binding.{k}": v for k, v in s.binding.tensors().items()}
    return out


def test_deterministic_per_seed(template, subject):
    again = make_subject(template, SEED, num_gaussians=N, size=SIZE)
    for k, v in _tensors(subject).items():
        assert torch.equal(v, _tensors(again)[k]), k
    other = make_subject(template, SEED + 1, num_gaussians=N, size=SIZE)
    assert not torch.equal(other.shape, subject.shape)
    assert not torch.equal(other.target.sh, subject.target.sh)
    assert other.image.shape != subject.image.shape or not torch.equal(other.image, subject.image)


def test_shapes_and_ranges(template, subject):
    s, j = subject, template.num_bones
    h, w = s.image.shape[:2]
    assert s.image.shape == (h, w, 3) and s.mask.shape == (h, w)
    assert max(h, w) == SIZE and (s.camera.width, s.camera.height) == (w, h) and len(s.camera) == 1
    assert 0 <= s.image.min() and s.image.max() <= 1 and 0 <= s.mask.min() and s.mask.max() <= 1
    assert (
        s.pose.shape == (j, 3) and s.transforms.shape == (j, 4, 4) and s.translation.shape == (3,)
    )
    assert ((s.shape >= 0.05) & (s.shape <= 1.0)).all()
    assert s.shape[template.shape_names.index("age")] >= 0.45  # adults
    assert s.pose[0, 0] == 0 and s.pose[0, 2] == 0 and abs(s.pose[0, 1]) <= math.radians(25) + 1e-6
    assert -4.0 <= s.translation[2] <= -2.6
    # the template is exactly sample_canonical's; the target is offset along the normals (loose
    # clothes, hair), with tangent scales grown to match, and coloured
    g, b = sample_canonical(template, s.shape, N, seed=SEED)
    for k in ("means", "quats", "log_scales", "opacity_logits", "sh"):
        assert torch.equal(getattr(s.template, k), getattr(g, k)), k
    for k, v in b.tensors().items():
        assert torch.equal(getattr(s.binding, k), v), k
    for k in ("quats", "opacity_logits"):
        assert torch.equal(getattr(s.target, k), getattr(g, k)), k
    assert s.target.sh.shape == (N, 1, 3)
    lift = (s.target.means - g.means).norm(dim=-1)
    assert lift.max() <= 0.051  # hair 5 cm at most
    grow = s.target.log_scales - g.log_scales
    assert torch.allclose(grow[:, :2], torch.log1p(lift / 0.06)[:, None], atol=1e-5)
    assert torch.equal(grow[:, 2], torch.zeros(N))
    rgb = s.target.sh[:, 0] * 0.28209479177387814 + 0.5
    assert rgb.min() >= -1e-5 and rgb.max() <= 1 + 1e-5 and rgb.std(0).min() > 0.05
    with torch.no_grad():
        out = template(s.shape[None], pose=s.pose[None], translation=s.translation[None])
    assert torch.allclose(s.transforms, out.transforms[0])


def test_person_fully_in_frame(subject):
    m = subject.mask
    assert m.mean() > 0.1
    for border in (m[0], m[-1], m[:, 0], m[:, -1]):
        assert border.mean() < 0.02
    # the background is one colour: corners agree, and differ from the person somewhere
    corners = subject.image[[0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners - corners[0]).abs().max() < 1e-4


def test_face_faces_the_camera(subject):
    s = subject
    posed = apply_blend(s.target, posed_blend(s.binding, s.transforms))
    view = s.camera.viewmats[0]
    p = posed.means @ view[:3, :3].T + view[:3, 3]
    normal = quat_to_rotmat(posed.quats)[:, :, 2] @ view[:3, :3].T
    face = s.binding.parts == PART_CODES["face"]
    facing = ((normal * p).sum(-1) < 0)[face].float().mean()
    assert facing > 0.6, facing  # a back view would give ~0.1
    uv = s.camera.project(posed.means[face])[0]
    assert (
        (uv >= 0).all()
        and (uv[:, 0] < s.camera.width).all()
        and (uv[:, 1] < s.camera.height / 2).all()
    )
    # the face is in front of the rest of the head: nearer the camera than the back of it
    head = (s.binding.parts == 0) & (s.template.means[:, 1] > s.template.means[face, 1].min())
    assert p[face, 2].mean() < p[head, 2].mean()


def test_save_load_round_trip(subject, tmp_path):
    path = tmp_path / "s.safetensors"
    save_subject(path, subject)
    assert [f.name for f in tmp_path.iterdir()] == ["s.safetensors"]  # nothing half-written left
    back = load_subject(path)
    assert (back.camera.width, back.camera.height) == (subject.camera.width, subject.camera.height)
    a, b = _tensors(subject), _tensors(back)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_broken_files_name_the_file(tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="broken.safetensors"):
        load_subject(bad)
    with pytest.raises(ValueError, match="missing.safetensors"):
        load_subject(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match="other.safetensors"):
        load_subject(other)


def test_make_dataset(tmp_path):
    make_dataset(tmp_path / "data", count=2, seed=3, num_gaussians=800, size=48, progress=False)
    index = json.loads((tmp_path / "data" / "index.json").read_text())
    assert index == {"format": "gsavatar-recon-data", "version": 1, "count": 2, "num_gaussians": 800,
                     "size": 48, "seed": 3, "files": ["00000.safetensors", "00001.safetensors"]}  # fmt: skip
    subjects = [load_subject(tmp_path / "data" / f) for f in index["files"]]
    assert all(len(s.target.means) == 800 for s in subjects)
    assert not torch.equal(subjects[0].shape, subjects[1].shape)
