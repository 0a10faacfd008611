"""Sampling points on a triangle mesh (the body template's surface) and carrying attributes.

One sampler serves every consumer of "points on the template": the canonical Gaussians of
`avatar create`, the particles of the deformer and the reconstructor's query tokens. Density is
proportional to triangle area times a per-triangle weight, so lips, eyelids and fingers can be
sampled more finely than the back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class SurfaceSamples:
    face_ids: Tensor  # [P] triangle of each sample
    bary: Tensor  # [P, 3] barycentric coordinates
    points: Tensor  # [P, 3]
    normals: Tensor  # [P, 3] unit, interpolated from the triangle's face normal

    def __len__(self) -> int:
        return self.face_ids.shape[0]


def face_areas_normals(vertices: Tensor, faces: Tensor) -> tuple[Tensor, Tensor]:
    """Areas [F] and unit normals [F, 3] of triangles (counter-clockwise = outward)."""
    a, b, c = (vertices[faces[:, i]] for i in range(3))
    cross = torch.linalg.cross(b - a, c - a)
    norm = cross.norm(dim=-1)
    return 0.5 * norm, cross / norm.clamp_min(1e-20).unsqueeze(-1)


def sample_surface(
    vertices: Tensor,  # [V, 3]
    faces: Tensor,  # [F, 3] int
    num: int,
    face_weights: Tensor | None = None,  # [F] >= 0, density multiplier per triangle
    generator: torch.Generator | None = None,
) -> SurfaceSamples:
    """`num` points, triangle chosen with probability ∝ area x weight, uniform inside it."""
    areas, normals = face_areas_normals(vertices, faces)
    density = areas if face_weights is None else areas * face_weights.to(areas)
    if not (density.sum() > 0):
        raise ValueError("the mesh has no area to sample (all weights or areas are zero)")
    face_ids = torch.multinomial(density, num, replacement=True, generator=generator)
    u, v = torch.rand(2, num, generator=generator, dtype=vertices.dtype)
    flip = u + v > 1  # fold the unit square onto the triangle
    u, v = torch.where(flip, 1 - u, u), torch.where(flip, 1 - v, v)
    bary = torch.stack([1 - u - v, u, v], dim=-1)
    points = interpolate(vertices, faces, face_ids, bary)
    return SurfaceSamples(face_ids, bary, points, normals[face_ids])


def interpolate(
    values: Tensor,  # [V, ...] per-vertex attribute
    faces: Tensor,  # [F, 3]
    face_ids: Tensor,  # [P]
    bary: Tensor,  # [P, 3]
) -> Tensor:  # [P, ...]
    tri = values[faces[face_ids]]  # [P, 3, ...]
    weights = bary.reshape(*bary.shape, *([1] * (tri.ndim - 2)))  # [P, 3, 1...]
    return (tri * weights.to(tri.dtype)).sum(dim=1)


def tangent_frames(normals: Tensor) -> Tensor:  # [P, 3] -> [P, 3, 3], columns (t1, t2, n)
    """Right-handed orthonormal frames whose third axis is the normal."""
    helper = torch.zeros_like(normals)
    use_y = normals[:, 1].abs() < 0.9
    helper[use_y, 1] = 1.0
    helper[~use_y, 0] = 1.0
    t1 = torch.nn.functional.normalize(torch.linalg.cross(helper, normals), dim=-1)
    t2 = torch.linalg.cross(normals, t1)
    return torch.stack([t1, t2, normals], dim=-1)
