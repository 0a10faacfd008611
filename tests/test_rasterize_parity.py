"""The native CPU rasteriser against the pure-torch reference: images and gradients."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from render import Gaussians, RasterConfig, rasterize

from .helpers import random_scene, ring_cameras

ROOT = Path(__file__).resolve().parent.parent
GRAD_FIELDS = ("means", "quats", "log_scales", "opacity_logits", "sh", "features")


def _render_and_grads(scene: Gaussians, cams, backend: str, bg, config=None, seed: int = 7):
    params = scene.clone().requires_grad_()
    out = rasterize(params, cams, background=bg, config=config, backend=backend)
    gen = torch.Generator().manual_seed(seed)
    loss = (
        (out.rgb * torch.randn(out.rgb.shape, generator=gen)).sum()
        + (out.alpha * torch.randn(out.alpha.shape, generator=gen)).sum()
        + 0.1 * (out.depth * torch.randn(out.depth.shape, generator=gen)).sum()
    )
    loss.backward()
    grads = {k: getattr(params, k).grad for k in GRAD_FIELDS if getattr(params, k) is not None}
    return out, grads


def _assert_parity(scene, cams, bg=None, config=None, img_tol=1e-4, grad_rtol=1e-3):
    out_n, g_n = _render_and_grads(scene, cams, "native", bg, config)
    out_r, g_r = _render_and_grads(scene, cams, "reference", bg, config)
    assert out_n.alpha.amax() > 0.2, "test scene should be visible"
    assert torch.equal(out_n.radii, out_r.radii)
    for name in ("rgb", "alpha", "depth", "means2d"):
        a, b = getattr(out_n, name), getattr(out_r, name)
        assert a.shape == b.shape
        scale = max(1.0, b.abs().max().item())
        assert (a - b).abs().max().item() <= img_tol * scale, name
    for name, ref in g_r.items():
        got = g_n[name]
        assert torch.isfinite(got).all(), name
        assert ref.abs().max() > 0, f"{name}: reference gradient is zero; the test would be vacuous"
        rel = ((got - ref).norm() / ref.norm()).item()
        assert rel < grad_rtol, f"{name}: relative gradient error {rel:.2e}"


@pytest.mark.parametrize("sh_degree", [0, 1, 2, 3])
def test_parity_sh_degrees(sh_degree):
    _assert_parity(random_scene(250, sh_degree, seed=sh_degree), ring_cameras(2, 48, 40),
                   bg=torch.tensor([0.2, 0.5, 0.9]))  # fmt: skip


def test_parity_feature_vectors_and_odd_sizes():
    # 5 feature channels; 37 x 29 is not a multiple of the tile size
    _assert_parity(random_scene(200, feature_dim=5, seed=3), ring_cameras(3, 37, 29))


def test_parity_float64_inputs_come_back_float64():
    scene = random_scene(150, 1, seed=4, dtype=torch.float64)
    cams = ring_cameras(1, 32, 32).to(torch.float64)
    out = rasterize(scene, cams)
    assert out.rgb.dtype == torch.float64
    _assert_parity(scene, cams)


def test_parity_with_culling_near_plane_and_offscreen():
    scene = random_scene(300, 1, seed=5)
    means = scene.means.clone()
    means[:30] += torch.tensor([0.0, 0.0, 2.6])  # around and behind the first camera's eye
    means[30:60] *= 6.0  # far outside the image
    scene = scene.replace(means=means)
    cams = ring_cameras(1, 40, 40, radius=2.5)
    cams.viewmats[0] = torch.linalg.inv(torch.linalg.inv(cams.viewmats[0]))
    out = rasterize(scene, cams)
    assert (out.radii[0] == 0).all(-1).sum() > 10, "some Gaussians must be culled"
    _assert_parity(scene, cams)


def test_parity_other_config_values():
    cfg = RasterConfig(eps2d=0.1, alpha_max=0.999, t_min=1e-3, tile_size=8)
    _assert_parity(random_scene(200, 0, seed=6), ring_cameras(2, 40, 24), config=cfg)


def test_dense_opaque_scene_saturates_and_still_matches():
    """Many opaque Gaussians: pixels hit the transmittance stop, and the backward must honour it."""
    scene = random_scene(600, 0, seed=8)
    scene = scene.replace(opacity_logits=torch.full_like(scene.opacity_logits, 6.0),
                          log_scales=scene.log_scales + 0.7)  # fmt: skip
    out = rasterize(scene, ring_cameras(1, 32, 32))
    assert (out.alpha > 0.99).float().mean() > 0.3  # transmittance stop reached widely
    _assert_parity(scene, ring_cameras(1, 32, 32))


@pytest.mark.parametrize("degree", [1, 2, 3])
def test_native_sh_colors_match_torch(degree):
    from render import _native
    from render.sh import eval_sh_colors

    gen = torch.Generator().manual_seed(degree)
    sh = 0.5 * torch.randn(300, (degree + 1) ** 2, 3, generator=gen)
    means, centers = torch.randn(300, 3, generator=gen), 3 * torch.randn(4, 3, generator=gen)
    fast = [t.clone().requires_grad_() for t in (sh, means)]
    slow = [t.clone().requires_grad_() for t in (sh, means)]
    out_f, out_s = _native.sh_colors(*fast, centers), eval_sh_colors(*slow, centers)
    assert (out_s == 0).any(), "some colours should hit the clamp at 0"
    assert torch.allclose(out_f, out_s, atol=1e-5)
    w = torch.randn(out_f.shape, generator=gen)
    (out_f * w).sum().backward()
    (out_s * w).sum().backward()
    for a, b in zip(fast, slow, strict=True):
        assert ((a.grad - b.grad).norm() / b.grad.norm()) < 1e-4


def python(code: str, **env: str) -> subprocess.CompletedProcess:
    """`python -c CODE` in the repository's root with `env` added to this process's."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def same_on_one_and_two_threads() -> None:
    """Render and backpropagate one scene on 1 and on 2 numba threads; assert equal bits."""
    import numba

    scene, cams = random_scene(400, sh_degree=1, seed=5), ring_cameras(2, 45, 37)
    before = numba.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            numba.set_num_threads(threads)
            results.append(_render_and_grads(scene, cams, "native", torch.ones(3)))
    finally:
        numba.set_num_threads(before)
    (out_a, g_a), (out_b, g_b) = results
    assert torch.equal(out_a.rgb, out_b.rgb) and torch.equal(out_a.alpha, out_b.alpha)
    for name, grad in g_a.items():
        assert torch.equal(grad, g_b[name]), name


def test_native_kernel_is_the_same_on_any_number_of_threads():
    """The compositing kernels deal the tiles into one share per thread: every tile is drawn
    exactly once whatever the count, so images and gradients are bit for bit equal. Where this
    process's numba pool has one thread (a pytest-xdist worker, `tests/conftest.py`, or one
    core), the comparison runs in a process of its own with two."""
    import numba

    if numba.config.NUMBA_NUM_THREADS >= 2:
        same_on_one_and_two_threads()
        return
    check = "from tests.test_rasterize_parity import same_on_one_and_two_threads as c; c()"
    res = python(check, NUMBA_NUM_THREADS="2")
    assert res.returncode == 0, res.stderr[-3000:]


# One Gaussian of a create's render (the man's photo, seed 0, the personalisation's last step)
# whose conic came out one last bit apart with `project_fwd` compiled in the process and loaded
# from numba's cache, under `fastmath`; a first create then differed from every later one.
ONE_GAUSSIAN = """
import numpy as np
from render._native.projection import project_fwd
f = np.float32
args = [np.array([[0.12749706208705902, -0.44221627712249756, -1.2053922414779663]], f),
        np.array([[0.9372730255126953, 0.08200549334287643, 0.3189350366592407,
                   -0.11434460431337357]], f),
        np.array([[0.006577382329851389, 0.004844440147280693, 0.0023597253020852804]], f),
        np.array([0.8202064633369446], f),
        np.diag([1.0, -1.0, -1.0, 1.0]).astype(f)[None],
        np.array([[[703.354248046875, 0, 240.05999755859375], [0, 703.354248046875, 256.0],
                   [0, 0, 1]]], f),
        452, 512, 0.3, 0.01, 1e10]
out = [np.zeros((1, 1, 2), f), np.zeros((1, 1, 3), f), np.zeros((1, 1), f),
       np.zeros((1, 1, 2), np.int32)]
project_fwd(*args, *out)
print("loaded" if project_fwd.stats.cache_hits else "compiled",
      b"".join(a.tobytes() for a in out).hex())
"""


def test_the_projection_kernel_is_the_same_compiled_and_loaded_from_the_cache(tmp_path):
    """A kernel loaded from numba's on-disk cache must compute what it computed when compiled,
    or a fresh install's first create differs from its later ones. `project_fwd` under
    `fastmath` did not (the Gaussian above, on this project's x86-64 machine)."""
    runs = [python(ONE_GAUSSIAN, NUMBA_CACHE_DIR=str(tmp_path)) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[-1].stderr[-3000:]
    (first, bits_first), (second, bits_second) = (r.stdout.split() for r in runs)
    assert (first, second) == ("compiled", "loaded")
    assert bits_first == bits_second
