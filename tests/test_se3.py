"""The SE(3) exponential map: exact against the matrix exponential, finite and correct
gradients at and near zero rotation."""

from __future__ import annotations

import pytest
import torch

from deform import se3


def _twist_matrix(xi: torch.Tensor) -> torch.Tensor:  # [..., 6] -> [..., 4, 4] Lie algebra element
    m = torch.zeros(*xi.shape[:-1], 4, 4, dtype=xi.dtype)
    m[..., :3, :3] = se3.hat(xi[..., :3])
    m[..., :3, 3] = xi[..., 3:]
    return m


@pytest.mark.parametrize("scale", [0.0, 1e-9, 1e-6, 1e-3, 0.1, 1.0, 3.0])
def test_exp_matches_the_matrix_exponential(scale):
    gen = torch.Generator().manual_seed(int(scale * 1e9) % 1000)
    xi = torch.randn(64, 6, generator=gen, dtype=torch.float64)
    xi[:, :3] *= scale
    got = se3.exp(xi)
    want = torch.linalg.matrix_exp(_twist_matrix(xi))
    assert torch.allclose(got, want, atol=1e-12, rtol=1e-10)
    rot = got[:, :3, :3]
    assert torch.allclose(
        rot @ rot.transpose(1, 2), torch.eye(3, dtype=xi.dtype).expand(64, 3, 3), atol=1e-12
    )


@pytest.mark.parametrize("scale", [0.0, 1e-8, 1e-4, 0.5])
def test_gradients_are_finite_and_correct_near_zero(scale):
    gen = torch.Generator().manual_seed(1)
    xi = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    xi[:, :3] *= scale
    xi.requires_grad_()
    assert torch.autograd.gradcheck(se3.exp, (xi,), eps=1e-7, atol=1e-6)
    # float32 at exactly zero rotation: the classic NaN trap of naive Rodrigues
    x32 = torch.zeros(3, 6, requires_grad=True)
    se3.exp(x32).sum().backward()
    assert torch.isfinite(x32.grad).all()
    # the gradient of the rotation at zero is the hat map's: d exp / d omega_x = hat(e_x)
    z = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    jac = torch.autograd.functional.jacobian(se3.exp, z)  # [4, 4, 6]
    assert torch.allclose(jac[:3, :3, 0], se3.hat(torch.tensor([1.0, 0, 0], dtype=torch.float64)))


def test_composition_and_points():
    xi = torch.tensor([[0, 0, torch.pi / 2, 1.0, 0, 0]], dtype=torch.float64)  # 90° about z, then x
    t = se3.exp(xi)[0]
    p = se3.transform_points(t, torch.tensor([[1.0, 0, 0]], dtype=torch.float64))
    # a pure screw: rotation about z and translation V v; the point (1,0,0) turns to (0,1,0)
    assert torch.allclose(
        p[0, :2] - t[:2, 3], torch.tensor([0.0, 1.0], dtype=torch.float64), atol=1e-12
    )
    back = se3.exp(-xi)[0] @ t  # composing with the inverse twist gives the identity
    assert torch.allclose(back, torch.eye(4, dtype=torch.float64), atol=1e-12)


def test_quaternion_product_composes_rotations_and_cofactor_determinants():
    from render.rotations import det3, quat_multiply, quat_to_rotmat

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, 4, generator=gen), torch.randn(50, 4, generator=gen)
    a, b = a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True)
    both = quat_to_rotmat(quat_multiply(a, b))
    assert torch.allclose(both, quat_to_rotmat(a) @ quat_to_rotmat(b), atol=1e-5)
    m = torch.randn(50, 3, 3, generator=gen)
    assert torch.allclose(det3(m), torch.linalg.det(m), atol=1e-4)
