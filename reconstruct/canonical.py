"""Canonical Gaussians bound to the body template.

Gaussians are sampled on the template's rest surface (the fitted phenotype, rest pose), denser
where motion is fine: lips and eyelids, the face, the hands. Each one remembers where it sits on
the template (triangle and barycentric coordinates, so expression blendshapes carry over) and its
skin weights (the template's, interpolated, top K bones), so posing the template poses it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from deform.surface import face_areas_normals, interpolate, sample_surface, tangent_frames
from deform.templates import BodyTemplate
from render import Gaussians
from render.rotations import rotmat_to_quat
from render.sh import rgb_to_sh0

# sampling density per part, relative to the body (the hidden interior is never sampled)
PART_DENSITY = {"lips": 14.0, "eyelids": 14.0, "face": 6.0, "hand_left": 5.0, "hand_right": 5.0,
                "mouth": 2.0, "hidden": 0.0}  # fmt: skip
# each Gaussian's footprint, in units of the local sample spacing: at 1.0 one layer of the
# randomly sampled surface is opaque (fewer than 1% of a face close-up's pixels under 0.95
# alpha; at 0.6, 36%: what lies behind, the mouth cavity or the back of the head, shows through)
SPACING_SIGMA = 1.0
PART_CODES = {
    "body": 0,
    "face": 1,
    "lips": 2,
    "eyelids": 3,
    "hand_left": 4,
    "hand_right": 5,
    "mouth": 6,
}


@dataclass
class Binding:
    """How each canonical Gaussian is attached to the template (all first dimensions are N)."""

    face_ids: Tensor  # [N] long, template triangle
    bary: Tensor  # [N, 3] barycentric coordinates in that triangle
    bone_ids: Tensor  # [N, K] long
    bone_weights: Tensor  # [N, K], rows sum to 1
    parts: Tensor  # [N] uint8, PART_CODES

    def tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def face_parts(binding: Binding) -> Tensor:
    """[N] bool: the face's skin, lips and lids."""
    codes = torch.tensor(
        [PART_CODES[p] for p in ("face", "lips", "eyelids")], dtype=binding.parts.dtype
    )
    return torch.isin(binding.parts, codes)


def triangle_parts(template: BodyTemplate) -> dict[str, Tensor]:
    """Per-triangle part masks: a triangle belongs to a part when all its vertices do."""
    return {name: mask[template.faces].all(-1) for name, mask in template.part_masks().items()}


def sample_canonical(
    template: BodyTemplate,
    shape: Tensor,  # [S] fitted phenotype
    num: int = 50_000,
    top_k: int = 8,
    seed: int = 0,
) -> tuple[Gaussians, Binding]:
    """Gaussians on the rest surface (grey, opacity 0.9), with their binding."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        rest = template(shape[None].float()).rest_vertices[0]
    faces = template.faces
    tri = triangle_parts(template)
    weights = torch.ones(len(faces))
    parts = torch.zeros(len(faces), dtype=torch.uint8)
    for name in ("mouth", "hand_left", "hand_right", "face", "eyelids", "lips", "hidden"):
        weights[tri[name]] = PART_DENSITY[name]  # later, finer parts win
        if name in PART_CODES:
            parts[tri[name]] = PART_CODES[name]
    samples = sample_surface(rest, faces, num, weights, gen)

    # scale from the local sample spacing: each sample covers area / expected count
    areas, _ = face_areas_normals(rest, faces)
    prob = areas * weights / (areas * weights).sum()
    spacing = (areas[samples.face_ids] / (num * prob[samples.face_ids]).clamp_min(1e-12)).sqrt()
    sigma = (SPACING_SIGMA * spacing).clamp(2e-4, 0.03)
    log_scales = torch.stack([sigma, sigma, 0.25 * sigma], -1).log()

    # skin weights: the template's, interpolated, strongest K bones renormalised
    dense = torch.zeros(template.num_vertices, template.num_bones)
    dense.scatter_add_(1, template.skin_ids, template.skin_weights.float())
    w = interpolate(dense, faces, samples.face_ids, samples.bary)
    top_w, top_ids = w.topk(top_k, dim=-1)
    top_w = top_w / top_w.sum(-1, keepdim=True)

    n = len(samples)
    gaussians = Gaussians(
        means=samples.points,
        quats=rotmat_to_quat(tangent_frames(samples.normals)),
        log_scales=log_scales,
        opacity_logits=torch.full((n,), 2.2),
        sh=rgb_to_sh0(torch.full((n, 1, 3), 0.6)),
    )
    binding = Binding(samples.face_ids, samples.bary, top_ids, top_w, parts[samples.face_ids])
    return gaussians, binding
