"""What the reconstructor sees of one photo: the person crop, the head crop and the hand RoIs, and
for every template Gaussian where the fitted template puts it in the photo.

Head and hand boxes come from the fitted template's projection; a hand box from MediaPipe's hand
landmarks (what `avatar create` has) replaces the template's when given. Left hands are mirrored
so one hand encoder sees right hands only (as HaMeR does).
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
from .refine import AppearanceLoss, RefineConfig, posed_blend, sample_image, visible_in

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


def in_frame(uv: Tensor, hw: tuple[int, int]) -> Tensor:  # [N, 2] px -> [N] bool
    return (uv[:, 0] >= 0) & (uv[:, 0] < hw[1]) & (uv[:, 1] >= 0) & (uv[:, 1] < hw[0])


def _outward(posed: Gaussians, camera: Cameras, uv_px: Tensor) -> tuple[Tensor, Tensor]:
    """Per Gaussian, the image direction its normal points to ([N, 2], unit) and how many
    pixels one metre along the normal moves it ([N])."""
    normal = quat_to_rotmat(posed.quats)[:, :, 2]
    step = (camera.project(posed.means + 0.01 * normal)[0] - uv_px) / 0.01
    length = step.norm(dim=-1)
    return step / length[:, None].clamp_min(1e-6), length


def fit_silhouette(
    template: Gaussians,  # [N] canonical
    groups: Tensor,  # [N] part groups
    posed: Gaussians,  # the same Gaussians in the photo's pose
    camera: Cameras,
    mask: Tensor,  # [H, W] the photo's person mask
    max_inflate: float = 0.06,
    radius: float = 0.05,
) -> Gaussians:
    """The template inflated along its normals to the photo's silhouette (clothes and hair are
    looser than a body template): a closed-form step of the feed-forward path, not a fit.

    On the template's outline (normals across the viewing ray, not hidden), walk outward in the
    photo while the person mask continues beyond the template's own render and before another
    part of the template is met; that gap, in metres along the normal, is the outline's
    inflation. Every Gaussian then takes the mean inflation, weighted by (1 - d²/r²)², of the outline
    Gaussians of its part within `radius` (so limbs swell round, not into fins); tangent scales
    grow with it so the larger surface stays closed."""
    with torch.no_grad():
        out = rasterize(posed, camera)
        alpha, depth = out.alpha[0, ..., 0], out.depth[0, ..., 0]
        uv = camera.project(posed.means)[0]
        direction, px_per_m = _outward(posed, camera, uv)
        view = camera.viewmats[0]
        p = posed.means @ view[:3, :3].T + view[:3, 3]
        normal = quat_to_rotmat(posed.quats)[:, :, 2] @ view[:3, :3].T
        across = (normal * F.normalize(p, dim=-1)).sum(-1).abs() < 0.3
        front = p[:, 2] < sample_image(depth[..., None], uv)[:, 0] + 0.03
        inside = (sample_image(mask[..., None], uv)[:, 0] > 0.5) & in_frame(uv, mask.shape)
        edge = torch.nonzero(across & front & inside).flatten()
        if len(edge) == 0:
            return template
        steps = torch.arange(1, int(max_inflate * px_per_m[edge].max()) + 2, dtype=uv.dtype)
        steps = steps[steps <= 4 * max(mask.shape)]
        pts = (uv[edge, None] + direction[edge, None] * steps[None, :, None]).reshape(-1, 2)
        in_mask = sample_image(mask[..., None], pts)[:, 0].reshape(len(edge), -1) > 0.5
        in_tpl = sample_image(alpha[..., None], pts)[:, 0].reshape(len(edge), -1) > 0.5
        left = torch.cumsum((~in_tpl).int(), 1) > 0
        run = torch.cumprod((in_mask & ~(left & in_tpl)).int(), 1).bool()
        gap = (run & ~in_tpl).sum(1).float()
        delta = (gap / px_per_m[edge].clamp_min(1e-6)).clamp(max=max_inflate)
        keep = torch.arange(0, len(edge), max(1, -(-len(edge) // 1024)))  # a smooth field:
        edge, delta = edge[keep], delta[keep]  # 1024 outline samples are plenty

        inflate = torch.zeros(len(template))
        for s in range(0, len(template), 8192):
            d2 = torch.cdist(template.means[s : s + 8192], template.means[edge]).square_()
            wgt = (1 - d2 / radius**2).clamp_(min=0).square_()  # smooth, zero beyond radius
            wgt *= groups[s : s + 8192, None] == groups[edge][None]
            inflate[s : s + 8192] = (wgt @ delta) / (wgt.sum(1) + 0.05)
        n = quat_to_rotmat(template.quats)[:, :, 2]
        log_scales = template.log_scales.clone()
        log_scales[:, :2] += torch.log1p(inflate / max_inflate)[:, None]
        return template.replace(means=template.means + inflate[:, None] * n, log_scales=log_scales)


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
    template = fit_silhouette(template, groups, apply_blend(template, blend), camera, mask)
    with torch.no_grad():
        posed = apply_blend(template, blend)
        depth = rasterize(posed, camera).depth[0, ..., 0]
        uv_px = camera.project(posed.means)[0]
        # the photo's colour counts where the photo shows the person and the Gaussian is on
        # the surface the camera sees, facing it or seen edge-on at an outline
        visible = (visible_in(posed, camera, depth, grazing=0.3) & in_frame(uv_px, (h, w))
                   & (sample_image(mask[..., None], uv_px)[:, 0] > 0.5))  # fmt: skip
        direction, _ = _outward(posed, camera, uv_px)
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
    features = features.detach()
    opt = torch.optim.Adam(decoder.parameters(), lr=lr)
    for _ in tqdm(range(steps), desc="personalise", unit="step", disable=not progress):
        g = decoder(features, inp)
        loss, _, _ = objective(g, g.means - inp.template.means)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return decoder(features, inp)
