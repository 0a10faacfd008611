"""Image losses and metrics shared by refinement, distillation and evaluation.

Images are channels-last [..., H, W, C] floats in [0, 1]; masks are [..., H, W, 1] in [0, 1].
SSIM uses the standard 11-px Gaussian window (sigma 1.5) with C1 = 0.01², C2 = 0.03².
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _window(size: int, sigma: float, dtype, device) -> Tensor:
    x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


def _blur(x: Tensor, g: Tensor) -> Tensor:  # x [B, C, H, W], separable Gaussian, same size
    c = x.shape[1]
    pad = g.numel() // 2
    x = F.conv2d(
        F.pad(x, (pad, pad, 0, 0), mode="replicate"),
        g.view(1, 1, 1, -1).expand(c, 1, 1, -1),
        groups=c,
    )
    return F.conv2d(
        F.pad(x, (0, 0, pad, pad), mode="replicate"),
        g.view(1, 1, -1, 1).expand(c, 1, -1, 1),
        groups=c,
    )


def ssim_map(a: Tensor, b: Tensor, window: int = 11, sigma: float = 1.5) -> Tensor:
    """Per-pixel SSIM [..., H, W, 1] (averaged over channels) of two [..., H, W, C] images."""
    lead, (h, w, c) = a.shape[:-3], a.shape[-3:]
    x = a.reshape(-1, h, w, c).permute(0, 3, 1, 2)
    y = b.reshape(-1, h, w, c).permute(0, 3, 1, 2)
    g = _window(window, sigma, a.dtype, a.device)
    mx, my = _blur(x, g), _blur(y, g)
    vx = _blur(x * x, g) - mx * mx
    vy = _blur(y * y, g) - my * my
    cov = _blur(x * y, g) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.mean(1, keepdim=True).permute(0, 2, 3, 1).reshape(*lead, h, w, 1)


def _masked_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return x.mean()
    weight = mask.expand_as(x)
    return (x * weight).sum() / weight.sum().clamp_min(1e-8)


def mask_box(mask: Tensor, margin: int) -> tuple[slice, slice]:
    """Rows and columns [..., H, W, 1] of the mask's non-zero pixels, `margin` pixels wider
    (clipped to the image); the whole image when the mask is empty."""
    on = mask.reshape(-1, *mask.shape[-3:-1]).amax(0) > 0  # [H, W]
    rows, cols = on.any(1).nonzero().flatten(), on.any(0).nonzero().flatten()
    if len(rows) == 0:
        return slice(None), slice(None)
    h, w = on.shape
    return (slice(max(0, int(rows[0]) - margin), min(h, int(rows[-1]) + margin + 1)),
            slice(max(0, int(cols[0]) - margin), min(w, int(cols[-1]) + margin + 1)))  # fmt: skip


def ssim(a: Tensor, b: Tensor, mask: Tensor | None = None, window: int = 11) -> Tensor:
    """Mean SSIM, inside `mask` when given. Computed on the mask's box widened by the window's
    half-width: every masked pixel's window lies inside it or meets the image border where the
    full image's would, so the result is the full image's."""
    if mask is None:
        return ssim_map(a, b, window).mean()
    rows, cols = mask_box(mask, window // 2)
    crop = (..., rows, cols, slice(None))
    return _masked_mean(ssim_map(a[crop], b[crop], window), mask[crop])


def loss_l1(a: Tensor, b: Tensor, mask: Tensor | None = None) -> Tensor:
    return _masked_mean((a - b).abs(), mask)


def loss_dssim(a: Tensor, b: Tensor, mask: Tensor | None = None) -> Tensor:
    """Structural dissimilarity (1 - SSIM) / 2."""
    return (1 - ssim(a, b, mask)) / 2


def psnr(a: Tensor, b: Tensor, mask: Tensor | None = None) -> float:
    """PSNR in dB over [0, 1] images, inside `mask` when given."""
    mse = _masked_mean((a - b) ** 2, mask).item()
    return float("inf") if mse == 0 else -10 * math.log10(mse)


def on_white(image: Tensor, mask: Tensor) -> Tensor:
    """The photo composited on white by the (soft) mask: what a perfect render would show."""
    return image * mask + (1 - mask)


def masked_quality(render: Tensor, image: Tensor, mask: Tensor) -> tuple[float, float]:
    """(PSNR dB, SSIM) of a render on a white background against the photo, over the person:
    PSNR compares the pixels where mask > 0.5 directly; SSIM compares the render with the photo
    composited on the same white background (so windows at the outline see the same
    surroundings) and is averaged where mask > 0.5."""
    inside = (mask > 0.5).to(render.dtype)
    return psnr(render, image, inside), ssim(render, on_white(image, inside), inside).item()
