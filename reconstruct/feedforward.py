"""What the reconstructor sees of one photo: the person crop, the head crop and the hand RoIs, and
for every template Gaussian where the fitted template puts it in the photo.

Head and hand boxes come from the fitted template's projection; a hand box from MediaPipe's hand
landmarks (what `avatar create` has) replaces the template's when given. Left hands are mirrored
so one hand encoder sees right hands only (as HaMeR does).

Before the network sees it, the template is brought to the photo's silhouette in closed form
(`fit_silhouette`): clothes and hair are looser than a body template, and a fit to keypoints
misses feet, hair and sleeves by centimetres.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from deform.skinning import apply_blend
from render import Cameras, Gaussians, rasterize
from render.rotations import quat_to_rotmat

from .canonical import Binding
from .losses import on_white
from .network import (
    GROUPS,
    PROFILE_PX,
    ReconInputs,
    Reconstructor,
    ReconstructorConfig,
    part_groups,
)
from .refine import (
    AppearanceLoss,
    RefineConfig,
    in_frame,
    posed_blend,
    sample_image,
    unoccluded,
    visible_in,
)

Box = tuple[float, float, float]  # centre x, centre y, side (pixels)


def box_around(points: Tensor, grow: float, min_side: float = 8.0) -> Box:  # points [P, 2] px
    lo, hi = points.min(0).values, points.max(0).values
    centre = (lo + hi) / 2
    return float(centre[0]), float(centre[1]), max(min_side, grow * float((hi - lo).max()))


def cut_box(image: Tensor, box: Box, size: int, mirror: bool = False) -> Tensor:
    """[H, W, 3] on white -> [3, size, size]: the square `box`, resampled (white outside)."""
    h, w = image.shape[:2]
    cx, cy, side = box
    t = (torch.arange(size, dtype=image.dtype) + 0.5) / size - 0.5
    xs = (cx + side * (-t if mirror else t)) / w * 2 - 1
    ys = (cy + side * t) / h * 2 - 1
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij")[::-1], -1)[None]
    # area-average first when shrinking a lot, so small crops do not alias
    src = (image - 1).permute(2, 0, 1)[None]
    factor = int(side / size)
    if factor >= 2:
        src = F.avg_pool2d(src, factor, ceil_mode=True)
    return F.grid_sample(src, grid, align_corners=False)[0] + 1


def knn_blend(points: Tensor, groups: Tensor, qpoints: Tensor, qgroups: Tensor, k: int,
              chunk: int = 8192) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Each point's k nearest query points of its own part group (inverse-distance weights)."""
    ids, weights = [], []
    for s in range(0, len(points), chunk):
        d = torch.cdist(points[s : s + chunk], qpoints)
        d = d + 10.0 * (groups[s : s + chunk, None] != qgroups[None])
        dist, idx = d.topk(min(k, len(qpoints)), dim=1, largest=False)
        w = 1.0 / (dist + 1e-3)
        ids.append(idx)
        weights.append(w / w.sum(1, keepdim=True))
    return torch.cat(ids), torch.cat(weights)


def choose_queries(
    groups: Tensor, num: int, gen: torch.Generator, min_per_group: int = 16
) -> Tensor:
    """A random subset of the Gaussians (the template sampler's own points), every part group
    represented by at least `min_per_group`."""
    order = torch.randperm(len(groups), generator=gen)
    picked = order[:num]
    extra = []
    for g in range(len(GROUPS)):
        have = int((groups[picked] == g).sum())
        if have < min_per_group:
            pool = order[num:][groups[order[num:]] == g]
            extra.append(pool[: min_per_group - have])
    return torch.cat([picked, *extra]).sort().values


def _outward(posed: Gaussians, camera: Cameras, uv_px: Tensor) -> Tensor:
    """Per Gaussian, the image direction its normal points to ([N, 2], unit)."""
    normal = quat_to_rotmat(posed.quats)[:, :, 2]
    return F.normalize(camera.project(posed.means + 0.01 * normal)[0] - uv_px, dim=-1, eps=1e-8)


def _outline_gaps(posed: Gaussians, camera: Cameras, mask: Tensor, reach: float,
                  inward: bool) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """The template's outline against the photo's silhouette, in image space (so it does not
    depend on how the template's Gaussians are oriented or how many there are).

    Outline Gaussians: not hidden, in frame, centred within a pixel of the template render's
    boundary. Outward is down the gradient of the render's (blurred) alpha. Returns their ids,
    each one's signed gap in metres at its depth (at most `reach`) and the outward direction in
    world space (unit, in the image plane). Positive gap: walking outward, the person mask
    continues beyond the template's render (and before another part of the template is met).
    Negative (only with `inward`): the Gaussian lies outside the mask, which begins that far
    inward; outline Gaussians with the mask out of reach are left out."""
    out = rasterize(posed, camera)
    alpha, depth = out.alpha[0, ..., 0], out.depth[0, ..., 0]
    solid = (alpha > 0.5).float()[None, None]
    boundary = solid * F.max_pool2d(1 - solid, 3, 1, 1)  # template pixels next to background
    band = F.max_pool2d(boundary, 3, 1, 1)[0, 0]
    soft = F.avg_pool2d(F.avg_pool2d(alpha[None, None], 3, 1, 1, count_include_pad=False), 3, 1,
                        1, count_include_pad=False)[0, 0]  # fmt: skip
    grad = torch.zeros(*alpha.shape, 2)
    grad[:, 1:-1, 0] = (soft[:, 2:] - soft[:, :-2]) / 2
    grad[1:-1, :, 1] = (soft[2:] - soft[:-2]) / 2
    uv = camera.project(posed.means)[0]
    view = camera.viewmats[0]
    z = (posed.means @ view[2, :3] + view[2, 3]).clamp_min(1e-3)
    near = sample_image(band[..., None], uv)[:, 0] > 0.5
    down = -sample_image(grad, uv)
    edge = unoccluded(posed, camera, depth) & near & in_frame(uv, mask.shape)
    edge = torch.nonzero(edge & (down.norm(dim=-1) > 1e-3)).flatten()
    direction = F.normalize(down[edge], dim=-1)
    px_per_m = camera.Ks[0, 0, 0] / z[edge]
    flat = torch.cat([direction, torch.zeros(len(edge), 1)], -1)  # camera space, z = 0
    world = F.normalize(flat @ view[:3, :3], dim=-1)
    if len(edge) == 0:
        return edge, torch.zeros(0), world
    inside = sample_image(mask[..., None], uv[edge])[:, 0] > 0.5
    steps = torch.arange(1, int(reach * px_per_m.max()) + 2, dtype=uv.dtype)
    steps = steps[steps <= 4 * max(mask.shape)]

    def walk(sign: float) -> tuple[Tensor, Tensor]:  # [E, S] mask and template along `direction`
        pts = (uv[edge, None] + sign * direction[:, None] * steps[None, :, None]).reshape(-1, 2)
        return tuple(sample_image(img[..., None], pts)[:, 0].view(len(edge), -1) > 0.5
                     for img in (mask, alpha))  # fmt: skip

    in_mask, in_tpl = walk(1.0)
    left = torch.cumsum((~in_tpl).int(), 1) > 0
    run = torch.cumprod((in_mask & ~(left & in_tpl)).int(), 1).bool()
    gap = (run & ~in_tpl).sum(1).float()
    keep = inside
    if inward:
        in_mask, _ = walk(-1.0)
        met = in_mask.any(1)
        first = torch.where(met, in_mask.float().argmax(1) + 1.0, 0.0)
        gap = torch.where(inside, gap, -first)
        keep = inside | met
    gap = (gap / px_per_m).clamp(-reach, reach)
    return edge[keep], gap[keep], world[keep]


def _lift(x: Tensor, blend: Tensor) -> Tensor:  # canonical [N, 3] -> [N, 6] canonical ∥ posed
    return torch.cat([x, (blend[:, :3, :3] @ x[..., None])[..., 0] + blend[:, :3, 3]], -1)


def _smooth_field(x: Tensor, blend: Tensor, groups: Tensor, ends: Tensor, end_groups: Tensor,
                  values: Tensor, radius: float, jacobian: bool = False) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """Values [E, D] at anchors (`ends`, lifted [E, 6]) spread to points x [M, 3] (canonical,
    posed by `blend` [M, 4, 4]) of the same part group: f = Σ w v / (Σ w + 0.05) with
    w = (1 - d²/r²)² (smooth, zero beyond `radius`), damped where anchors are few. d measures
    canonical and posed positions together, so an arm and the torso it rests against, or a
    raised arm and the shoulder it starts from in the rest pose, do not drag each other.
    With `jacobian`, also df/dx [M, D, 3], in closed form:
    df/dy = -4/r² Σ u (v - f)(y - e)ᵀ / (Σ w + 0.05), u = 1 - d²/r² where positive, and
    dy/dx = [I; L] with L the blend's linear part."""
    y = _lift(x, blend)
    u = (1 - torch.cdist(y, ends).square() / radius**2).clamp(min=0)
    u = u * (groups[:, None] == end_groups[None])
    w = u.square()
    total = w.sum(1, keepdim=True) + 0.05
    f = (w @ values) / total
    if not jacobian:
        return f, None
    outer = (values[:, :, None] * ends[:, None, :]).flatten(1)  # [E, D*6]: v eᵀ
    us = u.sum(1, keepdim=True)
    jy = ((u @ values)[:, :, None] * y[:, None, :] - (u @ outer).view(len(x), -1, 6)
          - (f * us)[:, :, None] * y[:, None, :] + f[:, :, None] * (u @ ends)[:, None, :])  # fmt: skip
    jy = jy * (-4 / radius**2) / total[:, :, None]
    return f, jy[:, :, :3] + jy[:, :, 3:] @ blend[:, :3, :3]


def _face_held(gap: Tensor, edge_groups: Tensor) -> Tensor:
    """No gap at the face's outline (the head group: face, lips, lids, mouth): the fit placed
    the face by its landmarks, and the silhouette beyond a face's outline is another part's (a
    collar wider than the template's neck drew the demo's jaw 3-7 cm down onto her jacket, a
    skin-coloured patch there). The field is spread within a group, so the face stays."""
    return torch.where(edge_groups == GROUPS.index("head"), torch.zeros_like(gap), gap)


def _thin(edge: Tensor, *rest: Tensor, most: int = 1024) -> tuple[Tensor, ...]:
    keep = torch.arange(0, len(edge), max(1, -(-len(edge) // most)))  # a smooth field needs
    return tuple(t[keep] for t in (edge, *rest))  # no more than ~1024 outline samples


def fit_silhouette(
    template: Gaussians,  # [N] canonical
    groups: Tensor,  # [N] part groups
    blend: Tensor,  # [N, 4, 4] the photo's pose, from `posed_blend`
    camera: Cameras,
    mask: Tensor,  # [H, W] the photo's person mask
    max_inflate: float = 0.06,
    radius: float = 0.05,
    max_shift: float = 0.15,
    shift_radius: float = 0.08,
    rounds: int = 12,
    nodes: int = 2048,
) -> Gaussians:
    """The template brought to the photo's silhouette in closed form (clothes and hair are looser
    than a body template, and a fit from keypoints misses feet, hair and sleeves by centimetres):
    a step of the feed-forward path, not an optimisation.

    Both steps move `nodes` Gaussians (a deformation graph) and carry every Gaussian along with
    its 4 nearest nodes of the same part.
    1. Inflation: each outline Gaussian's outward gap (`_outline_gaps`), at most `max_inflate`,
       spread over its part within `radius` (so limbs swell round, not into fins); every
       Gaussian moves along its own normal and its tangent scales grow with it.
    2. Shift, up to `rounds` times: the remaining signed gaps, at most `max_shift`, as vectors
       along the image's outward direction (taken to canonical space through each Gaussian's
       blend), spread within `shift_radius`: parts move, stretch or shrink toward the
       silhouette (a Jacobi iteration: anchors that already fit hold their part in place).
       Each Gaussian's axes are scaled by how much the displacement field stretches them,
       |(I + J) a| with J the field's Jacobian, so the surface stays closed.
    The face's group takes neither (`_face_held`): the fit's landmarks placed it, and
    `reconstruct.outline` its cheeks."""
    with torch.no_grad():
        node = choose_queries(groups, nodes, torch.Generator().manual_seed(0))
        knn_ids, knn_w = knn_blend(_lift(template.means, blend), groups,
                                   _lift(template.means[node], blend[node]), groups[node], 4)  # fmt: skip

        def spread(v: Tensor) -> Tensor:  # node values [M, ...] -> every Gaussian's [N, ...]
            return (v[knn_ids] * knn_w.view(*knn_w.shape, *[1] * (v.dim() - 1))).sum(1)

        def field(edge: Tensor, values: Tensor, r: float, jacobian: bool = False):
            ends = _lift(template.means[edge], blend[edge])
            f, jac = _smooth_field(template.means[node], blend[node], groups[node], ends,
                                   groups[edge], values, r, jacobian)  # fmt: skip
            return spread(f), None if jac is None else spread(jac)

        edge, gap, _ = _thin(*_outline_gaps(apply_blend(template, blend), camera, mask,
                                            max_inflate, inward=False))  # fmt: skip
        gap = _face_held(gap, groups[edge])
        if len(edge) == 0:
            return template
        inflate = field(edge, gap[:, None], radius)[0][:, 0]
        n = quat_to_rotmat(template.quats)[:, :, 2]
        log_scales = template.log_scales.clone()
        log_scales[:, :2] += torch.log1p(inflate / max_inflate)[:, None]
        template = template.replace(means=template.means + inflate[:, None] * n,
                                    log_scales=log_scales)  # fmt: skip

        lin = blend[:, :3, :3]
        base, grown = template.log_scales, torch.zeros_like(template.log_scales)
        for _ in range(rounds):
            posed = apply_blend(template, blend)
            edge, gap, outward = _thin(*_outline_gaps(posed, camera, mask, max_shift, inward=True))
            gap = _face_held(gap, groups[edge])
            if len(edge) == 0 or gap.abs().max() < 0.002:
                break
            values = torch.linalg.solve(lin[edge], outward * gap[:, None])  # to canonical space
            shift, jac = field(edge, values, shift_radius, jacobian=True)
            axes = quat_to_rotmat(template.quats)  # columns: the Gaussian's axes
            stretch = (axes + jac @ axes).norm(dim=1)  # [N, 3] new length of each unit axis
            grown = (grown + stretch.clamp_min(1e-3).log()).clamp(-0.7, 1.0)
            template = template.replace(means=template.means + shift, log_scales=base + grown)
        return template


def prepare_inputs(
    template: Gaussians,  # [N] canonical, from `sample_canonical`
    binding: Binding,
    transforms: Tensor,  # [J, 4, 4] the photo's pose
    camera: Cameras,  # the working crop's camera (1 view)
    image: Tensor,  # [H, W, 3] in [0, 1], the working crop
    mask: Tensor,  # [H, W] person mask in [0, 1]
    cfg: ReconstructorConfig,
    hand_boxes: dict[str, Box] | None = None,  # "hand_left"/"hand_right" -> box in crop pixels
    seed: int = 0,
    jitter: float = 0.0,  # random box jitter (training), fraction of the box side
) -> ReconInputs:
    gen = torch.Generator().manual_seed(seed)
    h, w = image.shape[:2]
    groups = part_groups(binding.parts)
    blend = posed_blend(binding, transforms)
    template = fit_silhouette(template, groups, blend, camera, mask)
    with torch.no_grad():
        posed = apply_blend(template, blend)
        depth = rasterize(posed, camera).depth[0, ..., 0]
        uv_px = camera.project(posed.means)[0]
        # the photo's colour counts where the photo shows the person and the Gaussian is on
        # the surface the camera sees, facing it or seen edge-on at an outline
        visible = visible_in(posed, camera, depth, grazing=0.3) & (
            sample_image(mask[..., None], uv_px)[:, 0] > 0.5
        )
        rays = F.normalize(posed.means - camera.centers[0], dim=-1)  # to canonical space:
        rays = F.normalize(torch.linalg.solve(blend[:, :3, :3], rays), dim=-1)
        direction = _outward(posed, camera, uv_px)
        px = torch.tensor(PROFILE_PX) * max(h, w) / 512
        along = uv_px[:, None] + direction[:, None] * px[None, :, None]  # [N, P, 2]
        profile = sample_image(mask[..., None], along.reshape(-1, 2))[:, 0].reshape(-1, len(px))
    white = on_white(image, mask[..., None])

    # the person crop, letterboxed into a square
    side = float(max(h, w))
    body = cut_box(white, (w / 2, h / 2, side), cfg.body_size)
    uv = torch.stack([(uv_px[:, 0] - w / 2) / side, (uv_px[:, 1] - h / 2) / side], -1) * 2

    def jittered(box: Box) -> Box:
        if jitter <= 0:
            return box
        r = (torch.rand(3, generator=gen) * 2 - 1) * jitter
        return (
            box[0] + float(r[0]) * box[2],
            box[1] + float(r[1]) * box[2],
            box[2] * (1 + float(r[2])),
        )

    def in_view(sel: Tensor) -> bool:  # a part is usable when some of it is seen in the crop
        return bool(sel.any()) and float(visible[sel].float().mean()) > 0.05

    head_sel = groups == 1
    head = None
    if in_view(head_sel):
        head = cut_box(white, jittered(box_around(uv_px[head_sel], 1.25)), cfg.part_size)
    hands = {}
    for g, name in ((2, "hand_left"), (3, "hand_right")):
        sel = groups == g
        if hand_boxes and name in hand_boxes:
            box = hand_boxes[name]
        elif in_view(sel):
            box = box_around(uv_px[sel], 1.3)
        else:
            continue
        hands[name] = cut_box(white, jittered(box), cfg.part_size, mirror=name == "hand_left")

    query_ids = choose_queries(groups, cfg.queries, gen)
    knn_ids, knn_w = knn_blend(template.means, groups, template.means[query_ids],
                               groups[query_ids], cfg.knn)  # fmt: skip
    return ReconInputs(
        body=body, head=head, hands=hands, template=template, groups=groups, uv=uv,
        visible=visible.float(), photo_rgb=sample_image(white, uv_px).clamp(0, 1), profile=profile,
        rays=rays,
        query_ids=query_ids, knn_ids=knn_ids, knn_weights=knn_w,
    )  # fmt: skip


def hand_boxes_from_landmarks(hands: dict, to_crop) -> dict[str, Box]:
    """MediaPipe hands ("left"/"right" -> [21, 2] photo px or None) as boxes in crop pixels."""
    boxes = {}
    for side, pts in hands.items():
        if pts is not None:
            boxes[f"hand_{side}"] = box_around(torch.as_tensor(to_crop(pts)).float(), 1.3)
    return boxes


def personalise_decoder(
    model: Reconstructor,
    inp: ReconInputs,
    features: Tensor,  # [N, dim] model.features(inp), fixed
    objective: AppearanceLoss,  # create's refinement objective, built on the network's output
    steps: int,
    lr: float = RefineConfig.lr_decoder,
    progress: bool = True,
) -> Gaussians:
    """Fine-tune a copy of D_G on this photo with create's refinement objective and return its
    Gaussians. Build `objective` with `appearance_loss(..., colours="given")` on the network's
    own output, so Gaussians the photo does not see stay near its prediction. The shared model
    is left unchanged."""
    decoder = copy.deepcopy(model.decoder).train()
    x = decoder.inputs(features.detach(), inp)  # fixed: only the MLP's weights change
    opt = torch.optim.Adam(decoder.parameters(), lr=lr)
    for _ in tqdm(range(steps), desc="personalise", unit="step", disable=not progress):
        g = decoder.gaussians(decoder.net(x), inp)
        loss, _, _ = objective(g, g.means - inp.template.means)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return decoder.gaussians(decoder.net(x), inp)
