"""Implicit particles: M control points on the template that carry local rigid motion.

Particles are sampled on the template's rest surface, denser where speech moves the skin (lips,
face) and on the hands. Every Gaussian is bound to its K nearest particles with normalised
Gaussian-kernel weights; a particle's SE(3) transform moves the Gaussians bound to it by linear
blending, exactly as LBS blends bones (`deform.skinning.apply_blend`).

Nearest particles are found on the template with its mouth open (`jawOpen` = 1), so a Gaussian
on the lower lip never binds to a particle on the upper lip that touches it at rest.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from .skinning import blend_matrix, blend_transforms
from .surface import sample_surface

# sampling density per part relative to the body (the template's part masks)
PARTICLE_DENSITY = {"lips": 40.0, "face": 12.0, "eyelids": 12.0, "hand_left": 6.0,
                    "hand_right": 6.0, "mouth": 4.0, "hidden": 0.0}  # fmt: skip


@dataclass
class Particles:
    rest: Tensor  # [M, 3] canonical positions
    parts: Tensor  # [M] uint8 part codes (reconstruct.canonical.PART_CODES)
    ids: Tensor  # [N, K] long, each Gaussian's particles
    weights: Tensor  # [N, K] rows sum to 1

    def tensors(self, prefix: str = "particle_") -> dict[str, Tensor]:
        return {prefix + f.name: getattr(self, f.name) for f in fields(self)}

    @staticmethod
    def from_tensors(t: dict[str, Tensor], prefix: str = "particle_") -> Particles:
        return Particles(**{f.name: t[prefix + f.name] for f in fields(Particles)})

    def blend(self, transforms: Tensor, index: Tensor | None = None,
              matrix: Tensor | None = None) -> Tensor:  # fmt: skip
        """Per-Gaussian blended transforms [B, N, 4, 4] (or of the Gaussians in `index`)
        from particle transforms [B, M, 4, 4]; `matrix`: `self.matrix()`, for all Gaussians."""
        if index is None:
            return blend_transforms(self.ids, self.weights, transforms, matrix)
        return blend_transforms(self.ids[index], self.weights[index], transforms)

    def matrix(self) -> Tensor:
        """The weights as a sparse matrix [N, M] (`deform.skinning.blend_matrix`)."""
        return blend_matrix(self.ids, self.weights, len(self.rest))

    def move(self, means: Tensor, transforms: Tensor, offsets: Tensor | None = None,
             index: Tensor | None = None, matrix: Tensor | None = None) -> tuple[Tensor, Tensor]:  # fmt: skip
        """Canonical Gaussian centres [N, 3] (or those in `index`) moved by particle transforms
        [B, M, 4, 4], then by the Gaussian head's Δp [B, N, 3]: `B_n μ + Δp` with B_n the
        blended transform. Returns the positions [B, n, 3] and B_n [B, n, 4, 4]."""
        b = self.blend(transforms, index, matrix)
        pos = (b[..., :3, :3] @ means[..., None])[..., 0] + b[..., :3, 3]
        return (pos if offsets is None else pos + offsets), b


def triangle_codes(faces: Tensor, masks: dict[str, Tensor], codes: dict[str, int]) -> Tensor:
    """Per-triangle part codes; finer parts (later in `codes`) win."""
    out = torch.zeros(len(faces), dtype=torch.uint8)
    for name, code in codes.items():
        if name in masks:
            out[masks[name][faces].all(-1)] = code
    return out


def init_particles(
    rest: Tensor,  # [V, 3] template rest vertices (the avatar's shape)
    open_rest: Tensor,  # [V, 3] the same with the mouth open, for binding
    faces: Tensor,  # [F, 3]
    masks: dict[str, Tensor],  # template part masks [V] bool
    codes: dict[str, int],  # part name -> code
    gaussian_face_ids: Tensor,  # [N] each Gaussian's template triangle
    gaussian_bary: Tensor,  # [N, 3]
    num: int = 512,
    k: int = 4,
    seed: int = 0,
) -> Particles:
    from .surface import interpolate

    tri = {name: m[faces].all(-1) for name, m in masks.items()}
    density = torch.ones(len(faces))
    for name in ("mouth", "hand_left", "hand_right", "face", "eyelids", "lips", "hidden"):
        if name in tri:
            density[tri[name]] = PARTICLE_DENSITY[name]
    gen = torch.Generator().manual_seed(seed)
    samples = sample_surface(rest, faces, num, density, gen)
    parts = triangle_codes(faces, masks, codes)[samples.face_ids]
    # bind on the open-mouth surface
    p_open = interpolate(open_rest, faces, samples.face_ids, samples.bary)
    g_open = interpolate(open_rest, faces, gaussian_face_ids, gaussian_bary)
    ids, weights = knn_weights(g_open, p_open, k)
    return Particles(samples.points, parts, ids, weights)


def knn_weights(points: Tensor, anchors: Tensor, k: int, chunk: int = 8192):
    """K nearest anchors of each point and weights exp(-d²/2h²), h = the point's K-th distance."""
    ids, dists = [], []
    for i in range(0, len(points), chunk):
        d = torch.cdist(points[i : i + chunk], anchors)
        dk, ik = d.topk(k, largest=False)
        ids.append(ik)
        dists.append(dk)
    ids_t, d_t = torch.cat(ids), torch.cat(dists)
    h = d_t[:, -1:].clamp_min(1e-4)
    w = torch.exp(-0.5 * (d_t / h) ** 2)
    return ids_t, w / w.sum(-1, keepdim=True)


def template_particles(
    template,
    shape: Tensor,  # [S]
    codes: dict[str, int],
    gaussian_face_ids: Tensor,  # [N]
    gaussian_bary: Tensor,  # [N, 3]
    num: int = 512,
    k: int = 4,
    seed: int = 0,
) -> Particles:
    """Particles on this template and shape, Gaussians bound with the mouth open."""
    expr = torch.zeros(1, len(template.expression_names))
    if "jawOpen" in template.expression_names:
        expr[0, template.expression_names.index("jawOpen")] = 1.0
    with torch.no_grad():
        rest = template(shape[None].float()).rest_vertices[0]
        open_rest = template(shape[None].float(), expression=expr).rest_vertices[0]
    return init_particles(rest, open_rest, template.faces, template.part_masks(), codes,
                          gaussian_face_ids, gaussian_bary, num, k, seed)  # fmt: skip
