"""Surface sampling on a mesh, and the image losses / metrics."""

from __future__ import annotations

import math

import pytest
import torch

from deform.surface import interpolate, sample_surface, tangent_frames
from reconstruct.losses import loss_dssim, loss_l1, psnr, ssim, ssim_map


def _cube():
    v = torch.tensor([[x, y, z] for x in (-0.5, 0.5) for y in (-0.5, 0.5) for z in (-0.5, 0.5)])
    quads = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
    f = torch.tensor([t for a, b, c, d in quads for t in ((a, b, c), (a, c, d))])
    return v, f


def test_samples_lie_on_the_surface_with_outward_normals():
    v, f = _cube()
    s = sample_surface(v, f, 4000, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(s.points.abs().amax(-1), torch.full((4000,), 0.5), atol=1e-6)
    assert ((s.points * s.normals).sum(-1) > 0.49).all()  # outward and unit
    assert torch.allclose(interpolate(v, f, s.face_ids, s.bary), s.points)


def test_face_weights_set_the_density():
    v, f = _cube()
    w = torch.ones(len(f))
    w[:2] = 9.0  # the x = -0.5 face
    s = sample_surface(v, f, 12000, w, generator=torch.Generator().manual_seed(1))
    share = (s.points[:, 0] < -0.4999).float().mean().item()
    assert share == pytest.approx(9 / 14, abs=0.02)


def test_tangent_frames_are_rotations_with_the_normal_last():
    n = torch.nn.functional.normalize(torch.randn(500, 3), dim=-1)
    n[0] = torch.tensor([0.0, 1.0, 0.0])
    r = tangent_frames(n)
    eye = torch.eye(3).expand(500, 3, 3)
    assert torch.allclose(r.transpose(1, 2) @ r, eye, atol=1e-5)
    assert torch.allclose(torch.linalg.det(r), torch.ones(500), atol=1e-5)
    assert torch.allclose(r[..., 2], n)


def test_ssim_identity_shift_and_noise():
    gen = torch.Generator().manual_seed(0)
    img = torch.rand(2, 40, 48, 3, generator=gen) * 0.5 + 0.25
    assert ssim(img, img).item() == pytest.approx(1.0, abs=1e-6)
    # a constant shift d keeps variance and covariance: SSIM = luminance term only
    d = 0.1
    shifted = img + d
    got = ssim(img, shifted).item()
    # luminance term (2 m (m + d) + C1) / (m² + (m + d)² + C1) averaged; m ≈ local means ∈ [.25,.75]
    assert 0.9 < got < 1.0
    noisy = (img + 0.2 * torch.randn(img.shape, generator=gen)).clamp(0, 1)
    assert ssim(img, noisy).item() < 0.6
    assert loss_dssim(img, img).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("where", ["inside", "at the border", "empty"])
def test_masked_ssim_on_the_masks_box_equals_the_whole_images(where):
    """The masked mean is computed on the mask's widened box: same value and gradient as on
    the whole image, whether the mask sits inside or touches the image's border."""
    gen = torch.Generator().manual_seed(1)
    a = torch.rand(1, 60, 50, 3, generator=gen, requires_grad=True)
    b = torch.rand(1, 60, 50, 3, generator=gen)
    mask = torch.zeros(1, 60, 50, 1)
    if where == "inside":
        mask[:, 20:35, 12:30] = 1.0
        mask[:, 36, 31] = 0.5  # soft pixels weigh too
    elif where == "at the border":
        mask[:, 45:, :9] = 1.0
    full = (ssim_map(a, b) * mask).sum() / mask.sum().clamp_min(1e-8)
    (want,) = torch.autograd.grad(full, a)
    got = ssim(a, b, mask)
    (grad,) = torch.autograd.grad(got, a)
    assert got.item() == pytest.approx(full.item(), abs=1e-6)
    assert torch.allclose(grad, want, atol=1e-7)


def test_ssim_luminance_term_matches_the_formula_on_flat_images():
    a = torch.full((1, 32, 32, 3), 0.3)
    b = torch.full((1, 32, 32, 3), 0.5)
    c1 = 0.01**2
    expected = (2 * 0.3 * 0.5 + c1) / (0.3**2 + 0.5**2 + c1)
    assert ssim(a, b).item() == pytest.approx(expected, rel=1e-5)


def test_masked_l1_and_psnr():
    a = torch.zeros(1, 10, 10, 3)
    b = torch.zeros(1, 10, 10, 3)
    b[:, :5] = 1.0  # wrong only in the top half
    mask = torch.zeros(1, 10, 10, 1)
    mask[:, 5:] = 1.0
    assert loss_l1(a, b, mask).item() == 0 and psnr(a, b, mask) == float("inf")
    assert loss_l1(a, b).item() == pytest.approx(0.5)
    assert psnr(a, b) == pytest.approx(-10 * math.log10(0.5))
