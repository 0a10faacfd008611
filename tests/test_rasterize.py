"""Behaviour of `rasterize` beyond parity: analytic values, edge cases, backend choice."""

from __future__ import annotations

import math

import pytest
import torch

from render import (
    Cameras,
    Gaussians,
    RasterConfig,
    choose_backend,
    has_gsplat,
    intrinsics,
    rasterize,
)

from .helpers import random_scene, requires_cuda, ring_cameras


def _one_gaussian(sigma: float, opacity: float, z: float = 2.0) -> Gaussians:
    return Gaussians.from_activated(
        torch.tensor([[0.0, 0.0, z]]), torch.full((1, 3), sigma), torch.tensor([opacity]),
        rgb=torch.tensor([[1.0, 0.5, 0.25]]),
    )  # fmt: skip


def _identity_camera(size: int = 33, fov: float = 60.0) -> Cameras:
    return Cameras(torch.eye(4)[None], intrinsics(fov, size, size)[None], size, size)


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_single_gaussian_matches_the_ewa_formula(backend):
    cam = _identity_camera(33)
    sigma, op, z = 0.05, 0.8, 2.0
    out = rasterize(_one_gaussian(sigma, op, z), cam, background=0.0, backend=backend)
    f = cam.Ks[0, 0, 0].item()
    var2d = (f * sigma / z) ** 2 + 0.3  # projected variance plus the 0.3 px^2 dilation
    for px, py in [(16, 16), (18, 16), (16, 13), (19, 18), (20, 19)]:
        dx, dy = 16.5 - (px + 0.5), 16.5 - (py + 0.5)
        alpha = min(0.99, op * math.exp(-0.5 * (dx * dx + dy * dy) / var2d))
        alpha = alpha if alpha >= 1 / 255 else 0.0  # fainter contributions are skipped
        assert out.alpha[0, py, px, 0].item() == pytest.approx(alpha, rel=1e-4)
        assert out.rgb[0, py, px, 1].item() == pytest.approx(0.5 * alpha, rel=1e-4)
        assert out.depth[0, py, px, 0].item() == pytest.approx(z if alpha else 0.0, rel=1e-4)
    extend = math.sqrt(2 * math.log(255 * op))
    assert out.radii[0, 0].tolist() == [math.ceil(extend * math.sqrt(var2d))] * 2


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_alpha_is_clamped_and_faint_gaussians_skipped(backend):
    cam = _identity_camera(17)
    out = rasterize(_one_gaussian(0.2, 0.999), cam, backend=backend)
    assert out.alpha.max().item() == pytest.approx(0.99, abs=1e-6)
    cfg = RasterConfig(alpha_max=0.5)
    assert rasterize(_one_gaussian(0.2, 0.999), cam, config=cfg, backend=backend).alpha.max() <= 0.5
    faint = rasterize(_one_gaussian(0.05, 1.0 / 300), cam, backend=backend)
    assert faint.alpha.max() == 0 and (faint.radii == 0).all()


def test_empty_and_fully_culled_scenes_give_the_background():
    cams = ring_cameras(1, 24, 16)
    scene = random_scene(50, 0)
    behind = scene.replace(means=scene.means * 0.1 + cams.centers[0] * 3)  # behind the camera
    bg = torch.tensor([0.1, 0.2, 0.3])
    for s in (scene[:0], behind):
        out = rasterize(s, cams, background=bg)
        assert (out.radii == 0).all()
        assert torch.allclose(out.rgb, bg.expand_as(out.rgb)) and out.alpha.max() == 0


def test_background_broadcasts_and_adds_where_transparent():
    scene, cams = random_scene(80, 0), ring_cameras(1, 32, 32)
    black = rasterize(scene, cams, background=0.0)
    white = rasterize(scene, cams, background=torch.ones(3))
    assert torch.allclose(white.rgb - black.rgb, (1 - black.alpha).expand_as(black.rgb), atol=1e-5)
    with pytest.raises(ValueError, match="channels"):
        rasterize(scene, cams, background=torch.ones(4))


def test_gradients_reach_means2d_for_densification():
    scene = random_scene(100, 0).requires_grad_()
    out = rasterize(scene, ring_cameras(1, 32, 32))
    out.means2d.retain_grad()
    out.rgb.sum().backward()
    assert out.means2d.grad is not None and out.means2d.grad.abs().sum() > 0


def test_backend_choice():
    assert choose_backend(torch.device("cpu")) == "native"
    assert choose_backend(torch.device("cpu"), "reference") == "reference"
    with pytest.raises(ValueError, match="unknown backend"):
        choose_backend(torch.device("cpu"), "opengl")
    with pytest.raises(ValueError, match="gsplat"):
        choose_backend(torch.device("cpu"), "gsplat")
    if not has_gsplat():
        with pytest.raises(ValueError, match="gsplat"):
            choose_backend(torch.device("cuda"))


@requires_cuda
@pytest.mark.skipif(
    not has_gsplat(), reason="gsplat is not installed (pip install 'gsavatar[cuda]')"
)
def test_gsplat_matches_reference_on_cuda():
    scene = random_scene(300, 1, seed=2)
    cams = ring_cameras(2, 48, 40)
    cfg = RasterConfig(alpha_max=0.999)  # gsplat's kernel clamps at 0.999
    ref = scene.clone().requires_grad_()
    out_r = rasterize(ref, cams, background=0.3, config=cfg, backend="reference")
    gpu = scene.to("cuda").clone().requires_grad_()
    out_g = rasterize(gpu, cams.to("cuda"), background=0.3, config=cfg)
    assert out_g.backend == "gsplat"
    assert (out_g.rgb.cpu() - out_r.rgb).abs().max() < 1e-3
    assert (out_g.alpha.cpu() - out_r.alpha).abs().max() < 1e-3
    w = torch.randn(out_r.rgb.shape)
    (out_r.rgb * w).sum().backward()
    (out_g.rgb * w.cuda()).sum().backward()
    for name in ("means", "quats", "log_scales", "opacity_logits", "sh"):
        a, b = getattr(gpu, name).grad.cpu(), getattr(ref, name).grad
        assert ((a - b).norm() / b.norm()) < 1e-2, name


def test_raster_config_is_validated():
    for bad in (dict(tile_size=64), dict(alpha_max=1.0), dict(near=0.0), dict(eps2d=-1.0)):
        with pytest.raises(ValueError):
            RasterConfig(**bad)
