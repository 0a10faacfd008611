"""Built-in inputs: a demo photo, and a stylised standing person (a Gaussian scene) used by the
renderer's benchmark.

The person is 1.8 m tall, stands on y = 0, faces +Z (CONVENTIONS.md) and is made of ellipsoidal
body parts covered by flat, surface-aligned Gaussians (discs), as a reconstructed avatar is.
Standard deviations are log-uniform in [4, 20] mm: with the person filling 60% of a 512-px frame
their 3-sigma footprints are 2-10 px, the scale the rasteriser benchmark asks for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from render import Gaussians
from render.rotations import rotmat_to_quat
from render.sh import rgb_to_sh0

SKIN, SHIRT, TROUSERS = (0.87, 0.66, 0.54), (0.16, 0.36, 0.62), (0.22, 0.22, 0.26)
HAIR, SHOES, EYE, LIPS = (
    (0.18, 0.11, 0.07),
    (0.10, 0.08, 0.07),
    (0.05, 0.05, 0.06),
    (0.70, 0.30, 0.30),
)


def demo_photo() -> str:
    """A real photo that an installed package ships: matplotlib's sample `grace_hopper.jpg`
    (a public-domain US Navy portrait, head and shoulders; matplotlib comes with mediapipe)."""
    import matplotlib.cbook

    return str(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


def demo_speech() -> Path:
    """The built-in speech clip (8.9 s, English): synthesised by the project with espeak-ng
    (`python -m distill.make_demo_speech`), shipped in the package; no third-party recording."""
    return Path(__file__).parent / "data" / "demo_speech.flac"


@dataclass(frozen=True)
class Part:
    center: tuple[float, float, float]
    radii: tuple[float, float, float]
    color: tuple[float, float, float]
    tilt_deg: float = 0.0  # rotation about +Z (arms out in an A-pose)
    stripes: bool = False


def _person_parts() -> list[Part]:
    parts = [
        Part((0, 1.62, 0), (0.085, 0.11, 0.10), SKIN),
        Part((0, 1.675, -0.012), (0.092, 0.075, 0.10), HAIR),
        Part((0.032, 1.635, 0.088), (0.013, 0.009, 0.008), EYE),
        Part((-0.032, 1.635, 0.088), (0.013, 0.009, 0.008), EYE),
        Part((0, 1.565, 0.086), (0.028, 0.009, 0.01), LIPS),
        Part((0, 1.47, 0), (0.05, 0.07, 0.05), SKIN),
        Part((0, 1.22, 0), (0.18, 0.26, 0.11), SHIRT, stripes=True),
        Part((0, 0.95, 0), (0.17, 0.12, 0.10), TROUSERS),
    ]
    for side in (1.0, -1.0):  # +1: the body's left (+X)
        parts += [
            Part((side * 0.235, 1.24, 0), (0.05, 0.16, 0.05), SHIRT, side * 12, stripes=True),
            Part((side * 0.285, 0.95, 0.02), (0.04, 0.14, 0.04), SKIN, side * 8),
            Part((side * 0.315, 0.75, 0.03), (0.035, 0.07, 0.02), SKIN, side * 5),
            Part((side * 0.09, 0.68, 0), (0.075, 0.23, 0.08), TROUSERS),
            Part((side * 0.09, 0.27, 0), (0.055, 0.2, 0.06), TROUSERS),
            Part((side * 0.09, 0.045, 0.05), (0.045, 0.045, 0.11), SHOES),
        ]
    return parts


def _ellipsoid_area(r: tuple[float, float, float]) -> float:
    p = 1.6075  # Knud Thomsen's approximation
    a, b, c = (x**p for x in r)
    return 4 * math.pi * ((a * b + a * c + b * c) / 3) ** (1 / p)


def person_scene(
    num_gaussians: int = 50_000,
    sh_degree: int = 1,
    seed: int = 0,
    scale_range_m: tuple[float, float] = (0.004, 0.02),
) -> Gaussians:
    """A stylised person of `num_gaussians` surface-aligned Gaussians (float32, CPU)."""
    gen = torch.Generator().manual_seed(seed)
    parts = _person_parts()
    areas = torch.tensor([_ellipsoid_area(p.radii) for p in parts])
    counts = torch.floor(areas / areas.sum() * num_gaussians).long()
    counts[torch.argmax(areas)] += num_gaussians - int(counts.sum())
    means, normals, colors, caps = [], [], [], []
    for part, count in zip(parts, counts.tolist(), strict=True):
        caps.append(torch.full((count, 1), 0.3 * min(part.radii)))  # small parts, small splats
        u = torch.nn.functional.normalize(torch.randn(count, 3, generator=gen), dim=-1)
        radii = torch.tensor(part.radii)
        local = u * radii
        normal = torch.nn.functional.normalize(u / radii, dim=-1)  # ellipsoid surface normal
        t = math.radians(part.tilt_deg)
        rot = torch.tensor(
            [[math.cos(t), -math.sin(t), 0], [math.sin(t), math.cos(t), 0], [0, 0, 1]]
        )
        pos = local @ rot.T + torch.tensor(part.center)
        col = torch.tensor(part.color).expand(count, 3).clone()
        if part.stripes:  # horizontal stripes every 14 cm (wider than the largest splats)
            col[torch.remainder(pos[:, 1], 0.14) < 0.05] *= 0.55
        col *= 1 + 0.06 * torch.randn(count, 1, generator=gen)  # fabric / skin mottling
        means.append(pos)
        normals.append(normal @ rot.T)
        colors.append(col.clamp(0, 1))
    means, normals, rgb = torch.cat(means), torch.cat(normals), torch.cat(colors)

    # surface-aligned discs: two tangent axes of size sigma, a thin axis along the normal
    helper = torch.where(
        normals[:, 1:2].abs() < 0.9, torch.tensor([0.0, 1.0, 0.0]), torch.tensor([1.0, 0.0, 0.0])
    )
    t1 = torch.nn.functional.normalize(torch.linalg.cross(helper, normals), dim=-1)
    t2 = torch.linalg.cross(normals, t1)
    quats = rotmat_to_quat(torch.stack([t1, t2, normals], dim=-1))
    lo, hi = scale_range_m
    sigma = lo * (hi / lo) ** torch.rand(num_gaussians, 1, generator=gen)
    sigma = torch.minimum(sigma, torch.cat(caps))
    log_scales = torch.log(sigma * torch.tensor([1.0, 1.0, 0.25]))
    opacity_logits = 2.0 + 1.0 * torch.randn(num_gaussians, generator=gen)
    sh = torch.zeros(num_gaussians, (sh_degree + 1) ** 2, 3)
    sh[:, 0] = rgb_to_sh0(rgb)
    if sh_degree > 0:  # a little view dependence, like a real capture
        sh[:, 1:] = 0.04 * torch.randn(num_gaussians, sh.shape[1] - 1, 3, generator=gen)
    return Gaussians(means, quats, log_scales, opacity_logits, sh=sh)
