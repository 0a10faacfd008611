"""The Gaussians container, SH helpers, rotations and camera builders."""

from __future__ import annotations

import math

import pytest
import torch

from render import Cameras, Gaussians, fit_to_points, intrinsics, look_at, orbit
from render.rotations import quat_to_rotmat, rotmat_to_quat
from render.sh import eval_sh_colors, rgb_to_sh0, sh0_to_rgb

from .helpers import random_scene


def test_gaussians_validate_shapes_and_colour_kind():
    g = random_scene(10, 2)
    assert len(g) == 10 and g.sh_degree == 2 and g.num_channels == 3
    with pytest.raises(ValueError, match="exactly one"):
        Gaussians(g.means, g.quats, g.log_scales, g.opacity_logits)
    with pytest.raises(ValueError, match="quats"):
        Gaussians(g.means, g.quats[:, :3], g.log_scales, g.opacity_logits, sh=g.sh)
    with pytest.raises(ValueError, match="SH coefficients"):
        Gaussians(g.means, g.quats, g.log_scales, g.opacity_logits, sh=torch.zeros(10, 5, 3))


def test_gaussians_index_cat_and_follow_dtype():
    g = random_scene(10, 1)
    assert len(g[2:5]) == 3 and len(g[torch.tensor([0, 9])]) == 2 and len(g[3]) == 1
    assert len(g[g.opacities > 0.5]) == int((g.opacities > 0.5).sum())
    both = Gaussians.cat([g, g[:4]])
    assert len(both) == 14 and torch.equal(both.means[10:], g.means[:4])
    g64 = g.to(torch.float64)
    assert g64.dtype == torch.float64 and g64.sh.dtype == torch.float64
    with pytest.raises(ValueError, match="with and without"):
        Gaussians.cat([g, random_scene(3, feature_dim=4)])


def test_from_activated_round_trips_values():
    means = torch.randn(5, 3)
    scales = torch.rand(5, 3) + 0.01
    op = torch.rand(5) * 0.9 + 0.05
    rgb = torch.rand(5, 3)
    g = Gaussians.from_activated(means, scales, op, rgb=rgb, sh_degree=1)
    assert torch.allclose(g.scales, scales) and torch.allclose(g.opacities, op, atol=1e-6)
    assert torch.allclose(sh0_to_rgb(g.sh[:, 0]), rgb, atol=1e-6)
    assert torch.equal(g.quats[:, 0], torch.ones(5))


def test_sh_degree0_colour_is_view_independent_and_matches_rgb():
    rgb = torch.rand(7, 3)
    sh = torch.zeros(7, 4, 3)
    sh[:, 0] = rgb_to_sh0(rgb)
    out = eval_sh_colors(sh, torch.randn(7, 3), torch.randn(3, 3))
    assert out.shape == (3, 7, 3) and torch.allclose(out, rgb.expand(3, 7, 3), atol=1e-6)


def test_sh_degree1_flips_with_view_direction():
    sh = torch.zeros(1, 4, 3)
    sh[0, 2] = 1.0  # the z-linear band (basis +C1*z)
    out = eval_sh_colors(sh, torch.zeros(1, 3), torch.tensor([[0, 0, -2.0], [0, 0, 2.0]]))
    assert out[0, 0, 0] > 0.5 > out[1, 0, 0]  # seen along +z vs along -z


def test_rotmat_quat_round_trip():
    q = torch.nn.functional.normalize(torch.randn(500, 4, dtype=torch.float64), dim=-1)
    q = torch.where(q[:, :1] < 0, -q, q)
    rot = quat_to_rotmat(q)
    assert torch.allclose(rot @ rot.transpose(1, 2), torch.eye(3, dtype=q.dtype).expand(500, 3, 3))
    assert torch.allclose(rotmat_to_quat(rot), q, atol=1e-10)


def _project(cams: Cameras, pts: torch.Tensor) -> torch.Tensor:  # [C, P, 2] pixels
    cam = torch.einsum("cij,pj->cpi", cams.viewmats[:, :3, :3], pts) + cams.viewmats[:, None, :3, 3]
    uv = torch.einsum("cij,cpj->cpi", cams.Ks, cam)
    return uv[..., :2] / uv[..., 2:]


def test_look_at_is_opencv():
    eye = torch.tensor([[0.0, 1.0, 3.0]])
    view = look_at(eye, torch.tensor([[0.0, 1.0, 0.0]]))
    cams = Cameras(view, intrinsics(40, 64, 48)[None], 64, 48)
    assert torch.allclose(cams.centers, eye, atol=1e-6)
    uv = _project(cams, torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.5, 0.0], [0.5, 1.0, 0.0]]))[0]
    assert torch.allclose(uv[0], torch.tensor([32.0, 24.0]))  # target at the principal point
    assert uv[1, 1] < 24  # +Y (up) is up in the image (smaller row)
    assert uv[2, 0] > 32  # camera in front (+Z) looking back: world +X is image right


def test_orbit_views_are_evenly_spaced_at_the_radius():
    cams = orbit(torch.tensor([0.0, 1.0, 0.0]), 3.0, 8, 32, 32, elevation_deg=20)
    d = (cams.centers - torch.tensor([0.0, 1.0, 0.0])).norm(dim=-1)
    assert len(cams) == 8 and torch.allclose(d, torch.full((8,), 3.0), atol=1e-5)
    assert torch.allclose(cams.centers[0], torch.tensor([0.0, 1 + 3 * math.sin(math.radians(20)),
                                                         3 * math.cos(math.radians(20))]), atol=1e-5)  # fmt: skip


def test_fit_to_points_frames_the_subject_from_every_yaw():
    pts = torch.rand(500, 3) * torch.tensor([0.5, 1.8, 0.3])
    cams = fit_to_points(pts, 128, 96, yaws_deg=torch.arange(0, 360, 45.0), fill=0.6)
    uv = _project(cams, pts)
    assert (uv[..., 0] > 0).all() and (uv[..., 0] < 128).all()
    assert (uv[..., 1] > 0).all() and (uv[..., 1] < 96).all()
    height_px = uv[0, :, 1].max() - uv[0, :, 1].min()
    assert 0.4 * 96 < height_px < 0.65 * 96
