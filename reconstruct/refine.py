"""Per-identity appearance: fit the canonical Gaussians' colours, opacities, scales and small
offsets to the photo, rendered through `render.rasterize` in the fitted pose and camera.

    loss = (1 - λ_ssim) L1 + λ_ssim D-SSIM        inside the person mask, against the photo
                                           with the room behind its outline made white
                                           (`dematte`: the render is on white)
         + λ_silhouette |alpha - mask|²          everywhere (no floaters outside the person)
         + λ_offset |Δμ|² + λ_scale relu(s - s_max)²
         + λ_slide (Δμ·d)² + λ_depth relu(σ_d - σ_d⁰)²     the photo cannot judge depth: no
                                           sliding along its rays d, no growing along them
                                           (σ_d: a Gaussian's extent along its ray)
         + λ_prior |c - c_prior|² on Gaussians the photo does not see well (what holds a
                                           personalised decoder's unseen colours; the
                                           per-Gaussian refinement leaves them fixed)
         + λ_prior_seen Σ_seen |c - c_prior|² / N   and on those it does, against its pixel: Adam
                                           scales each colour's step by its own gradient, so
                                           one the photo hardly judges (behind an ear's rim,
                                           a thousandth of a pixel drawn) moved as fast as
                                           one it judges and ran to red, green or white, seen
                                           from every other side
         + λ_cover L_cover                 the head's shell stays closed seen from around and
                                           above it (`reconstruct.cover`): no holes in the
                                           crown showing the inside of the face (`cover`:
                                           not in the decoder's personalisation)
         + λ_face_cover L_cover(face)      and so does the face's own layer: no holes in the
                                           cheek showing the head's inside
         + λ_needle relu(s₁/s₂ - r_max)    no needles: a Gaussian's longest axis at most
                                           r_max times its second (one stretched to 2 cm by
                                           1.5 mm drew a white stroke down a cheek from the
                                           side)
         + λ_range relu(c-1) + relu(-c)    colours stay in [0, 1]: past white or below
                                           black, layered Gaussians add up to the photo's
                                           colour from its camera alone

Gaussians hidden behind others in the photo (the back of the head behind the face) keep their
opacity, scale and position: the photo cannot judge them, and the light its front lets through
would only thin them out, holes through which the face shows from behind. So do Gaussians still
on the template's surface that the person mask leaves out by more than its outline: a body
always has its forearms, and the mask is what is wrong there (a forearm in shadow against a
dark room); thinned, they were holes from every other side.

Colours start from a prior (`reconstruct.complete.colour_prior`): the photo's own pixels where it
sees a Gaussian well, and colours completed from parts like it everywhere else (hair on the
back of the head, the same garment continued around a limb or the torso).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from deform.skinning import apply_blend, apply_transforms, blend_transforms
from render import Cameras, Gaussians, rasterize
from render.sh import rgb_to_sh0, sh0_to_rgb

from .canonical import Binding, face_parts
from .cover import HeadCover, head_gaussians
from .losses import loss_dssim, loss_l1, on_white, psnr


@dataclass(frozen=True)
class RefineConfig:
    steps: int = 200
    """Adam steps (200 at these rates fit the photo as 300 at 1/2.2 of them did: 1/3 less time)."""
    lambda_ssim: float = 0.2
    lambda_silhouette: float = 1.0
    lambda_offset: float = 30.0
    lambda_scale: float = 1e4
    lambda_prior: float = 0.05
    lambda_prior_seen: float = 0.05
    """The same pull on the colours the photo sees, summed over them over all N: under the
    photo's gradient where it judges a colour, the one pull left where it hardly does (a third
    to a half fewer Gaussians 0.3 off their neighbours' colour on six photos, 0.1-0.6 dB less
    masked PSNR from the photo's camera)."""
    lambda_slide: float = 300.0
    lambda_depth: float = 1e4
    lambda_cover: float = 1.0
    lambda_face_cover: float = 1.0
    """The same for the face's own Gaussians alone: behind a holed cheek the head's inside still
    covers the head's views, and shows through the holes as cracks between cheek and ear."""
    max_scale: float = 0.03
    """Largest standard deviation a Gaussian may grow to, metres."""
    lambda_needle: float = 1.0
    max_needle: float = 3.0
    """Longest axis over the second longest a Gaussian may reach without a penalty (the
    refinement made 168 of 50,000 over 5 and 20 over 10 on the sweater photo; 0 with it)."""
    lambda_range: float = 1.0
    """Penalty on colours outside [0, 1] (272 over 1.05 and 934 under -0.05 on the sweater
    photo without it)."""
    lr_color: float = 0.055
    lr_opacity: float = 0.11
    lr_scale: float = 0.022
    lr_offset: float = 1.1e-3
    lr_decoder: float = 2e-4
    """Learning rate of the reconstructor's Gaussian decoder when it is personalised."""


OUTLINE_PX = 3  # pixels of the person's outline where the silhouette judges any Gaussian
ON_SURFACE = 0.01  # metres: a Gaussian this close to its template anchor is the body itself
FACE_MATTE_MARGIN = 0.05  # of the face's size: the band around its hull `matte_face_outline` judges
LIGHT_ROOM = 0.2  # how much lighter than the skin a room must be for that (brightness, 0-1)


def posed_blend(binding: Binding, transforms: Tensor) -> Tensor:  # [J,4,4] -> [N,4,4]
    return blend_transforms(binding.bone_ids, binding.bone_weights, transforms[None])[0]


def sample_image(img: Tensor, uv: Tensor) -> Tensor:  # img [H,W,C], uv [N,2] px -> [N,C]
    h, w = img.shape[:2]
    grid = torch.stack([uv[:, 0] / w * 2 - 1, uv[:, 1] / h * 2 - 1], -1)[None, None]
    out = F.grid_sample(
        img.permute(2, 0, 1)[None], grid, align_corners=False, padding_mode="border"
    )
    return out[0, :, 0].T


def visible_in(posed: Gaussians, cam: Cameras, depth: Tensor, tolerance: float = 0.03,
               grazing: float = 0.0) -> Tensor:  # fmt: skip
    """[N] bool: inside the camera's frame, facing it (or within `grazing` of edge-on: cosine
    between the normal and the viewing ray) and not hidden behind the rendered surface (depth
    [H, W]). Outside the frame the image has no pixel of a Gaussian (sampled at the frame's edge,
    a portrait's hands and legs took the edge's colours)."""
    from render.rotations import quat_to_rotmat

    view = cam.viewmats[0]
    p = posed.means @ view[:3, :3].T + view[:3, 3]
    normal = quat_to_rotmat(posed.quats)[:, :, 2] @ view[:3, :3].T
    facing = (normal * F.normalize(p, dim=-1)).sum(-1) < grazing  # normal back toward the camera
    uv = cam.project(posed.means)[0]
    return facing & unoccluded(posed, cam, depth, tolerance) & in_frame(uv, (cam.height, cam.width))


def in_frame(uv: Tensor, hw: tuple[int, int]) -> Tensor:  # [N, 2] px -> [N] bool
    return (uv[:, 0] >= 0) & (uv[:, 0] < hw[1]) & (uv[:, 1] >= 0) & (uv[:, 1] < hw[0])


def along_rays(posed: Gaussians, cam: Cameras) -> tuple[Tensor, Tensor]:
    """([N, 3] unit directions of the rays from the camera to each Gaussian, [N] each
    Gaussian's standard deviation along its ray, metres)."""
    from render.rotations import quat_to_rotmat

    view = cam.viewmats[0]
    centre = -view[:3, :3].T @ view[:3, 3]
    d = F.normalize(posed.means - centre, dim=-1)
    local = (quat_to_rotmat(posed.quats) * d[:, :, None]).sum(1)  # d in each Gaussian's axes
    return d, ((local * posed.log_scales.exp()) ** 2).sum(-1).sqrt()


def unoccluded(posed: Gaussians, cam: Cameras, depth: Tensor, tolerance: float = 0.03) -> Tensor:
    """[N] bool: not hidden behind the rendered surface (depth [H, W]) by more than `tolerance`."""
    view = cam.viewmats[0]
    z = posed.means @ view[2, :3] + view[2, 3]
    return z < sample_image(depth[..., None], cam.project(posed.means)[0])[:, 0] + tolerance


def shrink(region: np.ndarray, px: int) -> np.ndarray:
    """A uint8 region [H, W] eroded by `px` pixels (a square window), or dilated by -px."""
    import cv2

    if px == 0:
        return region
    kernel = np.ones((2 * abs(px) + 1,) * 2, np.uint8)
    return cv2.erode(region, kernel) if px > 0 else cv2.dilate(region, kernel)


def hull_region(points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A uint8 region [H, W] (`shape`), 1 inside the convex hull of image points [P, 2]."""
    import cv2

    region = np.zeros(shape, np.uint8)
    cv2.fillConvexPoly(region, cv2.convexHull(np.round(points).astype(np.int32)), 1)
    return region


def inside_mask(posed: Gaussians, cam: Cameras, mask: Tensor, margin: int = OUTLINE_PX) -> Tensor:
    """[N] bool: Gaussians projecting inside the person `mask` [H, W], at least `margin` pixels
    from its outline (a negative `margin`: or at most -margin pixels outside it)."""

    inner = shrink((mask.numpy() > 0.5).astype(np.uint8), margin)
    return sample_image(torch.from_numpy(inner.astype(np.float32))[..., None],
                        cam.project(posed.means)[0])[:, 0] > 0.5  # fmt: skip


def _normalised_blur(image: Tensor, mask: Tensor, frac: float) -> tuple[Tensor, Tensor]:
    """(the blur of `image` [H, W, 3] times `mask` [H, W], the blur of `mask` [H, W, 1]): a
    normalised convolution's two halves, sigma = frac x H; their ratio is `image` averaged over
    the mask nearby."""
    import cv2

    sigma = max(1.0, frac * image.shape[0])
    m = mask.numpy().astype(np.float32)
    num = cv2.GaussianBlur(image.numpy() * m[..., None], (0, 0), sigma)
    den = cv2.GaussianBlur(m, (0, 0), sigma)[..., None]
    return torch.from_numpy(num), torch.from_numpy(den)


def _masked_blur(image: Tensor, mask: Tensor, frac: float = 0.04) -> Tensor:
    """Image [H,W,3] blurred inside the mask only (normalised convolution), sigma = frac x H."""
    num, den = _normalised_blur(image, mask, frac)
    return num / den.clamp_min(1e-3)


def dematte(image: Tensor, mask: Tensor) -> Tensor:
    """The photo [H, W, 3] with what is behind the person replaced by white as far as the person
    mask [H, W] lets it show at its outline: P + (1 - a)(1 - B), its soft values `a` an alpha
    matte there and the background B estimated from the pixels outside the person (normalised
    convolution, sigma 1% of the height). Further from the background than a few sigma the
    photo stays as it is: a soft mask there is the segmenter's doubt (hair), not the room. The
    refinement draws the person on white; fitted to a dark room's share of the outline's pixels,
    Gaussians there went black (strokes along a jaw and a neck, seen from the side)."""
    room = room_behind(image, mask)
    if room is None:
        return image
    back, near = room
    return torch.where(near[..., None], (image + (1 - mask[..., None]) * (1 - back)).clamp(0, 1),
                       image)  # fmt: skip


def room_behind(image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor] | None:
    """What is behind the person in photo `image` [H, W, 3] (person mask [H, W]): the room's
    colour B [H, W, 3] estimated from the pixels outside the person (normalised convolution,
    sigma 1% of the height), and [H, W] bool where that estimate holds, within a few sigma of
    them; None when the person fills the photo."""
    behind = torch.from_numpy(shrink((mask.numpy() < 0.5).astype(np.uint8), 1))
    if not behind.any():
        return None
    num, den = _normalised_blur(image, behind, 0.01)
    return num / den.clamp_min(1e-6), den[..., 0] > 0.05


def matte_face_outline(image: np.ndarray, mask: np.ndarray, face: np.ndarray) -> np.ndarray:
    """The person `mask` [H, W] (photo `image` [H, W, 3] uint8, face mesh `face` [P, 2] in its
    pixels) lowered where, at the face's outline, the photo shows a room lighter than the skin:
    there the segmenter's soft edge spills a pixel or two past a turned cheek, over pixels that
    are the room's. `dematte` leaves a light room light, and the refinement, fitting the spill's
    alpha and its near-white colour, turned the cheek's outline Gaussians white: a white streak
    down the far cheek from the side. Within FACE_MATTE_MARGIN of the face mesh's hull, on the
    mask's soft edge near the room (`room_behind`'s estimate B), the alpha the colours say, (P - B)
    · (F - B) / |F - B|², F the face's skin (the median inside the hull), caps the mask. Only
    against a room lighter than the skin by LIGHT_ROOM: in a darker room, shaded skin (an ear,
    the jaw's underside) is as dark as the room, and the colours cannot tell them apart."""
    img = image.astype(np.float32) / 255.0
    hull = hull_region(face, mask.shape)
    inside = hull.astype(bool) & (mask > 0.98)
    found = room_behind(torch.from_numpy(img), torch.from_numpy(mask))
    if inside.sum() < 20 or found is None:
        return mask
    room, near = found[0].numpy(), found[1].numpy()
    skin = np.median(img[inside], 0)
    towards = skin - room
    spread = (towards * towards).sum(-1)
    alpha = ((img - room) * towards).sum(-1) / np.maximum(spread, 1e-6)
    grown = shrink(hull, -round(FACE_MATTE_MARGIN * float(np.ptp(face, 0).max()))).astype(bool)
    judged = (grown & near & (mask > 0.02) & (mask < 0.98)
              & (room.mean(-1) > skin.mean() + LIGHT_ROOM) & (spread > 0.2**2))  # fmt: skip
    out = mask.copy()
    out[judged] = np.minimum(mask[judged], np.clip(alpha[judged], 0, 1))
    return out


def photo_pixels(posed: Gaussians, cam: Cameras, image: Tensor, mask: Tensor) -> Tensor:
    """[N, 3] the photo's colour where each Gaussian projects; just outside the person (an
    outline Gaussian a pixel off) the nearby person colour, never the background."""
    person = torch.where(mask[..., None] > 0.5, image, _masked_blur(image, mask))
    return sample_image(person, cam.project(posed.means)[0]).clamp(0, 1)


@dataclass
class View:
    """A camera and what it shows: the photo (or a part of it) and the person mask there."""

    camera: Cameras  # 1 view
    image: Tensor  # [H, W, 3] in [0, 1]
    mask: Tensor  # [H, W] in [0, 1]


class AppearanceLoss:
    """The refinement objective of the module docstring, for canonical Gaussians posed by
    `transforms` and seen by `cam`; `prior` [N, 3] holds the colours that Gaussians the photo
    does not see (`seen` [N]) should keep; `hidden` [N] marks those whose shape the photo cannot
    judge (behind others, or the body's surface outside the mask), which the refinement leaves
    as it is. `close_up`: the same photo around the face at its
    own resolution (the working crop shrinks a full-body photo's face to a few dozen pixels),
    whose image terms are added."""

    def __init__(self, transforms: Tensor, binding: Binding, cam: Cameras, image: Tensor,
                 mask: Tensor, seen: Tensor, prior: Tensor, cfg: RefineConfig,
                 close_up: View | None = None, start: Gaussians | None = None,
                 hidden: Tensor | None = None, cover: bool = True) -> None:  # fmt: skip
        self.blend = posed_blend(binding, transforms).detach()
        self.start = None  # the posed start: its means, rays and extents along them
        self.cover = None  # the head's shell seen from around it, against the start's
        self.face_cover = None  # and the face's own layer of it
        if start is not None:
            with torch.no_grad():
                posed = apply_blend(start, self.blend)
                self.start = (posed.means, *along_rays(posed, cam))
                head = head_gaussians(start, binding) if cover and cfg.lambda_cover > 0 else None
                if head is not None and head.any():
                    self.cover = HeadCover(posed, head)
                face = face_parts(binding) if cover and cfg.lambda_face_cover > 0 else None
                if face is not None and face.any():
                    self.face_cover = HeadCover(posed, face)
        self.cam, self.seen, self.prior, self.cfg = cam, seen, prior, cfg
        self.hidden = torch.zeros_like(seen) if hidden is None else hidden
        self._posed_quats: tuple | None = None  # (canonical, its version, posed) while fixed
        views = [View(cam, image, mask)] + ([close_up] if close_up is not None else [])
        self.views = [View(v.camera, dematte(v.image, v.mask), v.mask) for v in views]
        self.target = self.views[0].image[None]
        self.m = (mask[None, ..., None] > 0.5).to(mask.dtype)

    def _image_terms(self, posed: Gaussians, view: View) -> tuple[Tensor, Tensor, Tensor]:
        """(image loss, silhouette loss, the render [1, H, W, 3]) in one view: the render on
        white against the photo inside the person, and against the photo on white for SSIM (its
        windows at the outline must see the same surroundings)."""
        cfg = self.cfg
        target, soft = view.image[None], view.mask[None, ..., None]
        m = (soft > 0.5).to(soft.dtype)  # photometric terms: outline pixels mix
        out = rasterize(posed, view.camera, background=1.0)
        loss_img = (1 - cfg.lambda_ssim) * loss_l1(
            out.rgb, target, m
        ) + cfg.lambda_ssim * loss_dssim(out.rgb, on_white(target, m), m)
        return loss_img, ((out.alpha - soft) ** 2).mean(), out.rgb

    def __call__(self, g: Gaussians, offsets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(total loss, image loss, the main view's render [1, H, W, 3]) for canonical Gaussians
        `g` that sit `offsets` [N, 3] off the template."""
        cfg = self.cfg
        posed = self._pose(g)
        terms = [self._image_terms(posed, view) for view in self.views]
        loss_img = sum(t[0] for t in terms)
        loss = (
            loss_img
            + cfg.lambda_silhouette * sum(t[1] for t in terms)
            + cfg.lambda_offset * (offsets**2).sum(-1).mean()
            + cfg.lambda_scale * F.relu(g.log_scales.exp() - cfg.max_scale).pow(2).mean()
        )
        if cfg.lambda_needle > 0:
            top = g.log_scales.topk(2, dim=-1).values
            needle = (top[:, 0] - top[:, 1]).exp()  # longest axis over the second
            loss = loss + cfg.lambda_needle * F.relu(needle - cfg.max_needle).mean()
        if cfg.lambda_range > 0:
            rgb = sh0_to_rgb(g.sh[:, 0])
            loss = loss + cfg.lambda_range * (F.relu(rgb - 1) + F.relu(-rgb)).sum(-1).mean()
        if self.start is not None:
            means0, rays, extent0 = self.start
            slide = ((posed.means - means0) * rays).sum(-1)
            grow = F.relu(along_rays(posed, self.cam)[1] - extent0)
            loss = (
                loss
                + cfg.lambda_slide * slide.pow(2).mean()
                + cfg.lambda_depth * grow.pow(2).mean()
            )
        if self.cover is not None:
            loss = loss + cfg.lambda_cover * self.cover(posed)
        if self.face_cover is not None:
            loss = loss + cfg.lambda_face_cover * self.face_cover(posed)
        drift = ((g.sh[:, 0] - rgb_to_sh0(self.prior)) ** 2).sum(-1)
        if not self.seen.all():  # colours of Gaussians the photo does not see stay near prior
            loss = loss + cfg.lambda_prior * drift[~self.seen].mean()
        if cfg.lambda_prior_seen > 0:  # and those it sees, where the photo hardly judges them
            loss = loss + cfg.lambda_prior_seen * drift[self.seen].sum() / len(drift)
        return loss, loss_img, terms[0][2]

    def _pose(self, g: Gaussians) -> Gaussians:
        """`apply_blend(g, self.blend)`; the posed orientations are computed once while the
        canonical ones stay the same tensor without gradients (the refinement's case)."""
        if g.quats.requires_grad:
            return apply_blend(g, self.blend)
        cached = self._posed_quats
        if cached is None or cached[0] is not g.quats or cached[1] != g.quats._version:
            with torch.no_grad():
                cached = self._posed_quats = (g.quats, g.quats._version,
                                              apply_blend(g, self.blend).quats)  # fmt: skip
        means = apply_transforms(g.means, self.blend[None])[0]
        return g.replace(means=means, quats=cached[2])

    def psnr(self, rgb: Tensor) -> float:
        """Masked PSNR of a render against the photo (what `masked_quality` reports)."""
        return psnr(rgb, self.target, self.m)


def appearance_loss(canonical: Gaussians, binding: Binding, transforms: Tensor, cam: Cameras,
                    image: Tensor, mask: Tensor, cfg: RefineConfig, prior: Tensor | None = None,
                    close_up: View | None = None, landmarks: dict[str, np.ndarray] | None = None,
                    anchors: Tensor | None = None,
                    cover: bool = True) -> AppearanceLoss:  # fmt: skip
    """The objective for these Gaussians: Gaussians the photo does not see well
    (`reconstruct.complete.well_seen`; `landmarks` the photo's, by part, in the image) keep
    near `prior` [N, 3] (default: their current colours; see `reconstruct.complete`).
    `anchors` [N, 3]: each Gaussian's place on the template's surface (canonical), which tells
    the body's own Gaussians outside the mask from floaters there. `cover`: with the cover
    terms of the head and of the face's own layer (`reconstruct.cover`; create's decoder
    personalisation goes without)."""
    from .complete import hand_strays, well_seen

    blend = posed_blend(binding, transforms).detach()
    with torch.no_grad():
        posed = apply_blend(canonical, blend)
        depth = rasterize(posed, cam).depth[0, ..., 0]
        seen = well_seen(posed, cam, binding, landmarks, depth, canonical)
        strays = hand_strays(posed, cam, binding, landmarks, photo_pixels(posed, cam, image, mask),
                             seen)  # fmt: skip
        seen &= ~strays
        if prior is None:
            prior = sh0_to_rgb(canonical.sh[:, 0]).clamp(0, 1)
        hidden = ~unoccluded(posed, cam, depth)
        hidden &= inside_mask(posed, cam, mask)  # at the outline the silhouette judges them
        if anchors is not None:  # the body's surface where the mask says background
            on_surface = (canonical.means - anchors).norm(dim=-1) < ON_SURFACE
            hidden |= on_surface & ~inside_mask(posed, cam, mask, -OUTLINE_PX)
    return AppearanceLoss(transforms, binding, cam, image, mask, seen, prior, cfg, close_up,
                          canonical, hidden, cover)  # fmt: skip


def refine_appearance(
    canonical: Gaussians,
    binding: Binding,
    transforms: Tensor,  # [J, 4, 4] the photo's pose
    cam: Cameras,  # 1 view
    image: Tensor,  # [H, W, 3] in [0, 1], the crop the camera sees
    mask: Tensor,  # [H, W] in [0, 1]
    config: RefineConfig | None = None,
    progress: bool = True,
    prior: Tensor | None = None,  # [N, 3] start colours; unseen ones stay near (default: given)
    trace: list[float] | None = None,  # if given, each step's input-view masked PSNR
    close_up: View | None = None,  # the face at the photo's own resolution
    landmarks: dict[str, np.ndarray] | None = None,  # the photo's, by part ("face" [P, 2], ...)
    anchors: Tensor | None = None,  # [N, 3] their places on the template's surface
) -> Gaussians:
    """Returns the refined canonical Gaussians (same count and binding)."""
    cfg = config or RefineConfig()
    objective = appearance_loss(canonical, binding, transforms, cam, image, mask, cfg, prior,
                                close_up, landmarks, anchors)  # fmt: skip
    sh = canonical.sh.clone()
    sh[:, 0] = rgb_to_sh0(objective.prior)
    offsets = torch.zeros_like(canonical.means, requires_grad=True)
    sh.requires_grad_()
    # the photo only judges the colours it sees well: the rest keep their prior (an outline
    # Gaussian would otherwise take whatever its few edge pixels hold, streaks from the side)
    sh.register_hook(lambda grad: grad * objective.seen[:, None, None])
    params = {
        "sh": sh,
        "opacity_logits": canonical.opacity_logits.clone().requires_grad_(),
        "log_scales": canonical.log_scales.clone().requires_grad_(),
    }
    # nor the shape of what it cannot see at all: a Gaussian behind others (the back of the
    # head behind the face) would only thin out or shrink where the front lets light through,
    # leaving holes that show the face from behind; nor a forearm the mask misses
    judged = (~objective.hidden).to(sh.dtype)
    for tensor in (params["opacity_logits"], params["log_scales"], offsets):
        tensor.register_hook(lambda grad: grad * judged.reshape(-1, *[1] * (grad.ndim - 1)))
    opt = torch.optim.Adam([
        {"params": [params["sh"]], "lr": cfg.lr_color},
        {"params": [params["opacity_logits"]], "lr": cfg.lr_opacity},
        {"params": [params["log_scales"]], "lr": cfg.lr_scale},
        {"params": [offsets], "lr": cfg.lr_offset},
    ])  # fmt: skip
    bar = tqdm(range(cfg.steps), desc="appearance", unit="step", disable=not progress)
    for step in bar:
        loss, loss_img, rgb = objective(canonical.replace(means=canonical.means + offsets, **params),
                                        offsets)  # fmt: skip
        if trace is not None:
            trace.append(objective.psnr(rgb.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss_img.item():.4f}")
    with torch.no_grad():
        return canonical.replace(
            means=canonical.means + offsets, **{k: v.detach() for k, v in params.items()}
        )


def crop_image(rgb: np.ndarray, crop) -> Tensor:
    """The photo (uint8 or float, [H, W] or [H, W, C]) resampled into the working crop as a
    float tensor: area-averaged downscale, then the sub-pixel shift."""
    import cv2

    arr = rgb.astype(np.float32) / (255.0 if rgb.dtype == np.uint8 else 1.0)
    h, w = arr.shape[:2]
    small = cv2.resize(arr, (max(1, round(w * crop.scale)), max(1, round(h * crop.scale))),
                       interpolation=cv2.INTER_AREA if crop.scale < 1 else cv2.INTER_LINEAR)  # fmt: skip
    sx, sy = small.shape[1] / w, small.shape[0] / h  # the exact scale after rounding
    m = np.array([[crop.scale / sx, 0, -crop.x0 * crop.scale], [0, crop.scale / sy, -crop.y0 * crop.scale]],
                 np.float32)  # fmt: skip
    out = cv2.warpAffine(small, m, (crop.width, crop.height), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_REPLICATE)  # fmt: skip
    return torch.from_numpy(out)
