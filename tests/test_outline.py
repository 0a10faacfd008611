"""The face's outline (`reconstruct.outline`): the template's cheeks and jaw moved to the
photo's face oval, measured on the template against an oval made from its own outline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("anny", reason="the outline is measured on the Anny template")


@pytest.fixture(scope="module")
def face_scene():
    """The Anny template at rest, a camera in front of its face, and its rest output."""
    from deform.templates.anny import AnnyTemplate
    from render.cameras import orbit

    tpl = AnnyTemplate()
    shape = tpl.default_shape()
    rest = tpl(shape[None].float())
    head = rest.joints[0, tpl.bone_names.index("head")]
    cam = orbit(head + torch.tensor([0.0, 0.0, 0.06]), 0.7, 1, 512, 512, fov_y_deg=30.0)
    return tpl, shape, rest, cam


def oval_of(tpl, rest, cam, ratios: tuple[float, float]) -> np.ndarray:
    """A face mesh [478, 2] whose oval is the template's own outline seen by `cam`, its distance
    from the midline times `ratios` (the person's left, +x, on the image's right; right)."""
    from reconstruct.outline import BEFORE_EARS, OVAL_SIDES

    v = rest.rest_vertices[0]
    joint = rest.joints[0, tpl.bone_names.index("head")]
    front = tpl.part_masks()["head"] & (v[:, 2] > joint[2] + BEFORE_EARS)
    tri = v[tpl.faces[front[tpl.faces].all(-1)]]  # [T, 3, 3]
    a, b = torch.meshgrid(torch.linspace(0, 1, 12), torch.linspace(0, 1, 12), indexing="ij")
    keep = (a + b) <= 1
    bary = torch.stack([a[keep], b[keep], 1 - a[keep] - b[keep]], -1)  # [S, 3]
    dense = torch.einsum("sk,tkd->tsd", bary, tri).reshape(-1, 3)  # the surface, densely
    uv = cam.project(dense)[0].numpy()
    c = cam.Ks[0, 0, 2].item()  # x = 0 projects here: the midline
    face = np.zeros((478, 2))
    for ids, sign, r in zip(OVAL_SIDES, (1, -1), ratios, strict=True):
        for i, y in zip(ids, np.linspace(uv[:, 1].min(), uv[:, 1].max(), len(ids)), strict=True):
            row = uv[np.abs(uv[:, 1] - y) < 0.5, 0]
            edge = row.max() if sign > 0 else row.min()
            face[i] = (c + r * (edge - c), y)
    return face


def vertex_gaussians(v: torch.Tensor):
    from render import Gaussians

    n = len(v)
    return Gaussians(means=v.clone(), quats=torch.tensor([[1.0, 0, 0, 0]]).repeat(n, 1),
                     log_scales=torch.full((n, 3), -6.0), opacity_logits=torch.zeros(n),
                     sh=torch.zeros(n, 1, 3))  # fmt: skip


def test_a_wider_and_a_narrower_cheek_are_measured_and_moved_onto_the_photo(face_scene):
    from reconstruct.outline import fit_outline, measure_outline

    tpl, shape, rest, cam = face_scene
    v = rest.rest_vertices[0]
    face = oval_of(tpl, rest, cam, (1.25, 0.85))
    outline = measure_outline(tpl, shape, v, cam, face)
    assert outline is not None
    left, right = outline.sides
    assert len(left) >= 4 and len(right) >= 4  # oval points between the jaw and the eyes
    assert torch.allclose(left[:, 1], torch.tensor(1.25), atol=0.03), left
    assert torch.allclose(right[:, 1], torch.tensor(0.85), atol=0.03), right

    moved = fit_outline(vertex_gaussians(v), outline).means
    again = measure_outline(tpl, shape, moved, cam, face)  # the moved template against it
    assert again is not None
    for side in again.sides:
        assert torch.allclose(side[:, 1], torch.tensor(1.0), atol=0.03), side
    # the eyes, nose and mouth stay where the fit put them, and so does the body below the jaw
    for name in ("nose_tip", "mouth_left", "mouth_right", "upper_lip_inner"):
        i = tpl.face_landmarks[name].index
        assert torch.allclose(moved[i], v[i]), name
    body = v[:, 1] < min(float(side[0, 0]) for side in outline.sides) - 0.05
    assert torch.equal(moved[body], v[body])
    assert torch.equal(moved[:, 1:], v[:, 1:])  # sideways only


def test_each_gaussian_is_stretched_with_the_space_around_it(face_scene):
    """Where the map x -> x' stretches the cheek by dx'/dx, a Gaussian's extent across it grows
    by the same factor and the other two stay: a widened cheek keeps its Gaussians touching."""
    from reconstruct.outline import fit_outline, measure_outline
    from render.rotations import quat_to_rotmat

    tpl, shape, rest, cam = face_scene
    outline = measure_outline(tpl, shape, rest.rest_vertices[0], cam,
                              oval_of(tpl, rest, cam, (1.3, 1.3)))  # fmt: skip
    y = float(outline.sides[0][len(outline.sides[0]) // 2, 0])
    points = torch.tensor([[0.06, y, 0.12], [0.06 + 1e-4, y, 0.12], [0.06 - 1e-4, y, 0.12]])
    moved = fit_outline(vertex_gaussians(points), outline)
    slope = float((moved.means[1, 0] - moved.means[2, 0]) / 2e-4)
    assert slope > 1.3  # the outer half of the cheek takes the whole widening
    rot = quat_to_rotmat(moved.quats[:1])[0]
    cov = rot @ torch.diag(moved.log_scales[0].exp() ** 2) @ rot.T
    s = np.exp(-6.0)
    assert cov[0, 0].sqrt().item() == pytest.approx(slope * s, rel=1e-3)
    assert cov[1, 1].sqrt().item() == pytest.approx(s, rel=1e-3)
    assert cov[2, 2].sqrt().item() == pytest.approx(s, rel=1e-3)
    assert rot[:, 2].abs().argmax().item() in (1, 2)  # the thinnest axis is not the stretched one


def test_a_face_turned_away_is_left_as_the_fit_placed_it(face_scene):
    from reconstruct.outline import measure_outline

    tpl, shape, rest, cam = face_scene
    face = oval_of(tpl, rest, cam, (1.0, 1.0))
    face[:, 0] = cam.width - face[:, 0]  # both sides of the oval on the wrong side of the nose
    face[:, 0] += 400
    assert measure_outline(tpl, shape, rest.rest_vertices[0], cam, face) is None
