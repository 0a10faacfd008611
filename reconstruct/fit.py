"""Fitting the body template to one photo: camera, global pose, body and hand pose, phenotype.

The photo's camera is a pinhole at the origin looking down -Z (+Y up), with an assumed vertical
field of view; the person is placed in front of it, facing it. Everything is found by Adam on
  loss = keypoints (robust, visibility-weighted, body + hands)
       + face (MediaPipe face-mesh eyes, nose, lip corners and inner lip edges where the face
         detector found the face (not Holistic's guess at a masked one), robust at a
         quarter of the face's height: the body landmarks alone left the template's mouth a few
         millimetres off the photo's, so the jaw opened a hole in the painted upper lip)
       + silhouette (the template's vertices splatted through `render.rasterize` vs the mask)
       + turn and tilt (MediaPipe's 3D pose, robust: the torso's turn, and how far the spine,
         thighs and shins point toward the camera or away, which 2D keypoints leave free: a
         photo's standing legs swung back 15-25° from the torso, seen from the side)
       + priors (small bone rotations, phenotype near average),
coarse to fine: first root rotation and translation from the torso, then everything.
Work happens in a crop around the person, scaled to `FitConfig.size` pixels on its long side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from deform.templates import MEDIAPIPE_BODY, MEDIAPIPE_FACE, MEDIAPIPE_HAND, BodyTemplate
from render import Cameras, Gaussians, look_at, rasterize
from render.rotations import axis_angle_to_rotmat

from .parsing import PersonParse

HAND_REACH = 3.0  # in the hands' robust scales: a hand this far off on average was not fitted
# the limbs whose tilt toward the camera follows MediaPipe's 3D pose (with the spine's): the
# legs. The arms' pulled the shoulders and with them the head: the face points of the half-body
# photos then fitted twice as far off (0.019 → 0.053 and 0.027 → 0.048 of the face's height)
LIMBS = (("left_hip", "left_knee"), ("left_knee", "left_ankle"),
         ("right_hip", "right_knee"), ("right_knee", "right_ankle"))  # fmt: skip
HIPS, SHOULDERS = ("left_hip", "right_hip"), ("left_shoulder", "right_shoulder")


@dataclass(frozen=True)
class FitConfig:
    fov_deg: float = 40.0
    """Assumed vertical field of view of the photo (typical phone and portrait lenses: 35-50)."""
    size: int = 384
    """Long side of the working crop, pixels."""
    steps_global: int = 60
    """Adam steps on root rotation and translation alone."""
    steps: int = 220
    """Adam steps on everything."""
    lambda_keypoints: float = 1.0
    lambda_face: float = 3.0
    face_sigma: float = 0.25
    """Scale of the face term's robust loss, as a fraction of the face's brow-chin height."""
    lambda_silhouette: float = 2.0
    lambda_turn: float = 0.5
    turn_sigma_deg: float = 20.0
    """Robust scale of the torso-turn term: MediaPipe's 3D turn is a guess, a few tens of
    degrees off at most; the keypoints overrule it beyond."""
    lambda_limbs: float = 0.3
    limb_sigma_deg: float = 20.0
    """Robust scale of the spine's and legs' tilt toward the camera against MediaPipe's 3D pose:
    it errs by tens of degrees in depth at times; the keypoints and silhouette overrule it. (At
    λ 0.5 the spine's pull left a half-body photo's hand 0.26 of the crop off its landmarks.)"""
    lambda_pose: float = 2e-3
    lambda_shape: float = 2e-2
    hand_anneal: float = 16.0
    """When a hand ends far from its landmarks (`HAND_REACH`), the full stage runs again with
    the hands' robust scale starting this many times its own and shrinking to it over the first
    half (graduated non-convexity), and the fit with the lower objective is kept. At its own
    scale (a few pixels) the robust loss hardly pulls a hand that starts far from its
    landmarks, as every hand does from the rest pose, and it can settle anywhere (measured: one
    hand of a half-body photo 70-95 px off at two of five crop sizes, pulled in on all five)."""
    silhouette_size: int = 160
    """Long side of the silhouette render, pixels."""


@dataclass
class Crop:
    """The working window: crop pixel = (photo pixel - (x0, y0)) * scale."""

    x0: float
    y0: float
    scale: float
    width: int
    height: int

    def to_crop(self, pts: np.ndarray) -> np.ndarray:
        return (pts - np.array([self.x0, self.y0], np.float32)) * self.scale


@dataclass
class FitResult:
    shape: Tensor  # [S] phenotype
    pose: Tensor  # [J, 3] axis-angle per bone
    translation: Tensor  # [3]
    camera: Cameras  # the working crop's camera (1 view)
    crop: Crop
    keypoint_error: float  # mean error of visible body keypoints, fraction of person height
    silhouette_iou: float


def person_crop(
    parse: PersonParse, image_hw: tuple[int, int], size: int, margin: float = 0.08
) -> Crop:
    h, w = image_hw
    x0, y0, x1, y1 = parse.bbox
    pad = margin * max(x1 - x0, y1 - y0)
    x0, y0 = max(0.0, x0 - pad), max(0.0, y0 - pad)
    x1, y1 = min(float(w), x1 + pad), min(float(h), y1 + pad)
    scale = size / max(x1 - x0, y1 - y0)
    return Crop(x0, y0, scale, max(8, round((x1 - x0) * scale)), max(8, round((y1 - y0) * scale)))


def photo_camera(image_hw: tuple[int, int], crop: Crop, fov_deg: float) -> Cameras:
    """Camera at the origin looking down -Z, +Y up, intrinsics of the photo mapped into the crop."""
    h, w = image_hw
    f = 0.5 * h / math.tan(math.radians(fov_deg) / 2) * crop.scale
    K = torch.tensor([[f, 0, (w / 2 - crop.x0) * crop.scale], [0, f, (h / 2 - crop.y0) * crop.scale],
                      [0, 0, 1.0]])  # fmt: skip
    view = look_at(torch.zeros(1, 3), torch.tensor([[0.0, 0.0, -1.0]]))
    return Cameras(view, K[None], crop.width, crop.height)


def _geman_mcclure(sq: Tensor, sigma: float) -> Tensor:
    return sq / (sq + sigma * sigma)


class _Targets:
    """2D targets in crop pixels with weights, in the template's landmark order."""

    def __init__(
        self, template: BodyTemplate, parse: PersonParse, crop: Crop, face_sigma: float
    ) -> None:
        body = crop.to_crop(parse.body[:, :2])
        order = [MEDIAPIPE_BODY.index(n) for n in template.body_landmarks]
        self.body = torch.from_numpy(body[order])
        vis = np.clip((parse.body[order, 2] - 0.3) / 0.5, 0, 1)  # trust above ~0.8 visibility
        inside = (
            (body[order] >= 0).all(1)
            & (body[order, 0] < crop.width)
            & (body[order, 1] < crop.height)
        )
        self.body_w = torch.from_numpy((vis * inside).astype(np.float32))
        self.hands = {}
        for side in ("left", "right"):
            pts = parse.hands.get(side)
            if pts is not None:
                assert len(pts) == len(MEDIAPIPE_HAND)
                self.hands[side] = torch.from_numpy(crop.to_crop(pts).astype(np.float32))
        self.face = self.face_sigma = None
        if parse.face is not None and parse.face_detected and template.face_landmarks:
            pts = crop.to_crop(parse.face[list(MEDIAPIPE_FACE.values())]).astype(np.float32)
            self.face = torch.from_numpy(pts)
            height = np.linalg.norm(parse.face[10] - parse.face[152]) * crop.scale  # brow-chin
            self.face_sigma = max(face_sigma * float(height), 1.0)
        ys = body[order][vis > 0.5, 1]
        self.person_px = float(ys.max() - ys.min()) if len(ys) > 1 else float(crop.height)
        self.limbs = None if parse.world is None else _limb_targets(template, parse)


def _limb_targets(template: BodyTemplate, parse: PersonParse) -> tuple[list, Tensor, Tensor]:
    """The spine and `LIMBS` as MediaPipe's 3D pose has them: ([(start, end)] index tuples into
    `template.body_landmarks`, unit directions [K, 3] in the fit's world (x right, y up, z toward
    the camera), weights [K] from both ends' visibility)."""
    names = list(template.body_landmarks)
    world = torch.from_numpy(parse.world * np.array([1.0, -1.0, -1.0])).float()
    vis = torch.from_numpy(parse.body[:, 2]).float()

    def at(group: tuple[str, ...]) -> tuple[Tensor, Tensor, tuple[int, ...]]:
        ids = [MEDIAPIPE_BODY.index(n) for n in group]
        return world[ids].mean(0), vis[ids].min(), tuple(names.index(n) for n in group)

    pairs, dirs, weights = [], [], []
    for a, b in [(HIPS, SHOULDERS)] + [((a,), (b,)) for a, b in LIMBS]:
        (pa, va, ia), (pb, vb, ib) = at(a), at(b)
        pairs.append((ia, ib))
        dirs.append(torch.nn.functional.normalize(pb - pa, dim=0))
        weights.append(((torch.minimum(va, vb) - 0.3) / 0.5).clamp(0, 1))
    return pairs, torch.stack(dirs), torch.stack(weights)


def _silhouette(template: BodyTemplate, vertices: Tensor, cam: Cameras, keep: Tensor) -> Tensor:
    """Alpha [H, W] of the posed template, splatted as small Gaussians."""
    pts = vertices[keep]
    n = len(pts)
    g = Gaussians(pts, torch.cat([torch.ones(n, 1), torch.zeros(n, 3)], 1),
                  torch.full((n, 3), math.log(0.012)), torch.full((n,), 3.0),
                  features=torch.ones(n, 1))  # fmt: skip
    return rasterize(g, cam).alpha[0, ..., 0]


ARM_BONES = ("upperarm", "lowerarm", "wrist", "finger", "metacarpal")
LEG_BONES = ("upperleg", "lowerleg", "foot", "toe")


def _pose_prior_weights(
    template: BodyTemplate, parse: PersonParse, unseen: float = 100.0
) -> Tensor:
    """Per-bone prior weights (root excluded): limbs whose end the photo does not show (a wrist
    or ankle outside the frame or hidden) stay near rest instead of reaching for the silhouette."""
    vis = parse.body[:, 2]
    weights = torch.ones(template.num_bones - 1)
    for j, name in enumerate(template.bone_names[1:]):
        side = name.rsplit(".", 1)[-1] if "." in name else None
        if side not in ("L", "R"):
            continue
        wrist, ankle = (15, 27) if side == "L" else (16, 28)  # MediaPipe: the person's left first
        if name.startswith(ARM_BONES) and vis[wrist] < 0.5:
            weights[j] = unseen
        if name.startswith(LEG_BONES) and vis[ankle] < 0.5:
            weights[j] = unseen
    return weights


def fit_template(
    template: BodyTemplate,
    parse: PersonParse,
    image_hw: tuple[int, int],
    config: FitConfig | None = None,
    progress: bool = True,
) -> FitResult:
    cfg = config or FitConfig()
    crop = person_crop(parse, image_hw, cfg.size)
    cam = photo_camera(image_hw, crop, cfg.fov_deg)
    tgt = _Targets(template, parse, crop, cfg.face_sigma)
    names = list(template.body_landmarks)

    # silhouette target at low resolution, and the camera for it
    s = cfg.silhouette_size / max(crop.width, crop.height)
    sil_cam = Cameras(cam.viewmats, cam.Ks * torch.tensor([s, s, 1.0])[:, None],
                      max(4, round(crop.width * s)), max(4, round(crop.height * s)))  # fmt: skip
    import cv2

    big = cv2.warpAffine(parse.mask, np.array([[crop.scale * s, 0, -crop.x0 * crop.scale * s],
                                              [0, crop.scale * s, -crop.y0 * crop.scale * s]], np.float32),
                         (sil_cam.width, sil_cam.height), flags=cv2.INTER_AREA)  # fmt: skip
    mask = torch.from_numpy(big)
    keep = ~template.part_masks()["hidden"]

    # initial placement from the torso: depth from its pixel length, position from its centre
    shape0 = template.default_shape()
    rest = template(shape0[None])
    lm = template.landmarks(rest, template.body_landmarks)[0]
    torso_ids = [
        names.index(n) for n in ("left_shoulder", "right_shoulder", "left_hip", "right_hip")
    ]
    torso3d = lm[torso_ids]
    torso2d = tgt.body[torso_ids]
    if (tgt.body_w[torso_ids[2:]] > 0.5).all():  # hips seen: the torso's length sets the depth
        len3d = ((torso3d[0] + torso3d[1]) / 2 - (torso3d[2] + torso3d[3]) / 2).norm()
        len2d = (
            ((torso2d[0] + torso2d[1]) / 2 - (torso2d[2] + torso2d[3]) / 2).norm().clamp_min(4.0)
        )
    else:  # a portrait: the shoulders' width does
        len3d = (torso3d[0] - torso3d[1]).norm()
        len2d = (torso2d[0] - torso2d[1]).norm().clamp_min(4.0)
    f = cam.Ks[0, 0, 0]
    depth = (f * len3d / len2d).item()
    seen = tgt.body_w[torso_ids] > 0.5
    centre2d = torso2d[seen].mean(0) if seen.any() else torso2d.mean(0)
    torso3d = torso3d[seen] if seen.any() else torso3d
    centre3d = torch.stack([(centre2d[0] - cam.Ks[0, 0, 2]) * depth / f,
                            -(centre2d[1] - cam.Ks[0, 1, 2]) * depth / f, torch.tensor(-depth)])  # fmt: skip
    prior_w = _pose_prior_weights(template, parse)  # [J-1]
    translation = (centre3d - torso3d.mean(0)).clone().requires_grad_()
    turn = None if parse.torso_yaw is None else math.radians(parse.torso_yaw)
    root = torch.tensor([0.0, turn or 0.0, 0.0], requires_grad=True)  # about +Y: toward its left
    body_pose = torch.zeros(template.num_bones - 1, 3, requires_grad=True)
    lo, hi = template.shape_range
    shape_logit = (
        torch.logit(((shape0 - lo) / (hi - lo)).clamp(0.02, 0.98)).clone().requires_grad_()
    )

    sigma = 0.05 * tgt.person_px  # the body keypoints' robust scale, pixels
    hand_sigma = 0.5 * sigma  # the hands'
    params = (root, translation, body_pose, shape_logit)

    def snapshot() -> list[Tensor]:
        return [p.detach().clone() for p in params]

    def restore(values: list[Tensor]) -> None:
        with torch.no_grad():
            for p, v in zip(params, values, strict=True):
                p.copy_(v)

    def evaluate(use_all: bool, anneal: float = 1.0):
        shape = lo + (hi - lo) * torch.sigmoid(shape_logit)  # bounded to the template's range
        pose = torch.cat([root[None], body_pose if use_all else body_pose.detach() * 0], 0)
        out = template(shape[None], pose=pose[None], translation=translation[None])
        body3d = template.landmarks(out, template.body_landmarks)[0]
        pts = cam.project(body3d)[0]
        w = tgt.body_w if use_all else tgt.body_w * torch.tensor([n in ("left_shoulder", "right_shoulder",
                                                                      "left_hip", "right_hip") for n in names])  # fmt: skip
        loss_kp = (
            w * _geman_mcclure(((pts - tgt.body) ** 2).sum(-1), sigma)
        ).sum() / w.sum().clamp_min(1)
        if use_all:
            for side, target in tgt.hands.items():
                hp = cam.project(template.landmarks(out, template.hand_landmarks[side])[0])[0]
                loss_kp = (
                    loss_kp
                    + 0.5 * _geman_mcclure(((hp - target) ** 2).sum(-1), hand_sigma * anneal).mean()
                )
            if tgt.face is not None:
                fp = cam.project(template.landmarks(out, template.face_landmarks)[0])[0]
                loss_kp = (
                    loss_kp
                    + cfg.lambda_face
                    * _geman_mcclure(((fp - tgt.face) ** 2).sum(-1), tgt.face_sigma).mean()
                )
            if tgt.limbs is not None:
                pairs, want, weight = tgt.limbs
                have = torch.stack([body3d[list(b)].mean(0) - body3d[list(a)].mean(0)
                                    for a, b in pairs])  # fmt: skip
                # only how far each points toward the camera or away: the keypoints have the rest
                tilt = torch.asin(
                    torch.nn.functional.normalize(have, dim=-1)[:, 2].clamp(-0.9999, 0.9999)
                )
                miss = (tilt - torch.asin(want[:, 2].clamp(-1, 1))) ** 2
                sigma_limb = math.radians(cfg.limb_sigma_deg)
                loss_kp = loss_kp + cfg.lambda_limbs * (
                    weight * _geman_mcclure(miss, sigma_limb)
                ).sum() / weight.sum().clamp_min(1)
        if turn is not None:  # the root's forward (+Z at rest) turned toward +X: its left
            forward = axis_angle_to_rotmat(root)[:, 2]
            miss = torch.atan2(forward[0], forward[2]) - turn
            miss = torch.atan2(torch.sin(miss), torch.cos(miss))  # wrapped to (-pi, pi]
            sigma_turn = math.radians(cfg.turn_sigma_deg)
            loss_kp = loss_kp + cfg.lambda_turn * _geman_mcclure(miss**2, sigma_turn)
        return out, pts, loss_kp, shape

    opt = torch.optim.Adam([root, translation], lr=0.03)
    bar = tqdm(total=cfg.steps_global + cfg.steps, desc="fit", unit="step", disable=not progress)
    for _ in range(cfg.steps_global):
        _, _, loss_kp, _ = evaluate(False)
        opt.zero_grad()
        loss_kp.backward()
        opt.step()
        bar.update(1)

    start = snapshot()

    def full_stage(anneal: float) -> float:
        """Everything from the global stage's result; the final objective."""
        restore(start)
        opt = torch.optim.Adam([{"params": [root, translation], "lr": 0.01},
                                {"params": [body_pose], "lr": 0.02},
                                {"params": [shape_logit], "lr": 0.03}])  # fmt: skip
        for step in range(cfg.steps):
            t = min(step / max(cfg.steps // 2, 1), 1.0)  # graduated non-convexity: see FitConfig
            out, _, loss_kp, shape = evaluate(True, anneal ** (1.0 - t))
            loss = cfg.lambda_keypoints * loss_kp
            if step >= cfg.steps // 3:  # silhouette once the pose is roughly right
                alpha = _silhouette(template, out.vertices[0], sil_cam, keep)
                loss = loss + cfg.lambda_silhouette * ((alpha - mask) ** 2).mean()
            loss = (
                loss
                + cfg.lambda_pose * (prior_w[:, None] * body_pose**2).sum()
                + cfg.lambda_shape * ((shape - shape0) ** 2).sum()
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            bar.update(1)
            bar.set_postfix(kp=f"{loss_kp.item():.3f}")
        return loss.item()

    def hand_missed() -> bool:
        """A hand whose landmarks ended HAND_REACH robust scales away on average."""
        with torch.no_grad():
            out = evaluate(True)[0]
            reach = HAND_REACH * hand_sigma
            return any(
                (cam.project(template.landmarks(out, template.hand_landmarks[side])[0])[0]
                 - target).norm(dim=-1).mean() > reach
                for side, target in tgt.hands.items()
            )  # fmt: skip

    loss = full_stage(1.0)
    if cfg.hand_anneal > 1.0 and hand_missed():
        first = snapshot()
        bar.total += cfg.steps
        if full_stage(cfg.hand_anneal) > loss:  # keep the better of the two
            restore(first)
    bar.close()

    with torch.no_grad():
        out, pts, _, shape = evaluate(True)
        alpha = _silhouette(template, out.vertices[0], sil_cam, keep)
        vis = tgt.body_w > 0.5
        err = ((pts - tgt.body).norm(dim=-1)[vis].mean() / tgt.person_px).item()
        inter = ((alpha > 0.5) & (mask > 0.5)).sum().item()
        union = ((alpha > 0.5) | (mask > 0.5)).sum().item()
    pose = torch.cat([root[None], body_pose], 0).detach()
    return FitResult(
        shape.detach(), pose, translation.detach(), cam, crop, err, inter / max(union, 1)
    )
