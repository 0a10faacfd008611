"""The create pipeline: one photo -> an `Avatar` (parse, fit, sample, refine), and posing
avatars for rendering."""

from __future__ import annotations

import datetime
import hashlib
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from deform.particles import template_particles
from deform.skinning import apply_blend
from deform.templates import BodyTemplate, load_template, template_kind
from reconstruct.appearance import PERSONALISE_STEPS, Observation, reconstruct_appearance
from reconstruct.canonical import PART_CODES, sample_canonical
from reconstruct.feedforward import hand_boxes_from_landmarks
from reconstruct.fit import Crop, FitConfig, fit_template, photo_camera
from reconstruct.losses import masked_quality
from reconstruct.outline import fit_outline, measure_outline
from reconstruct.parsing import NoPersonError, PersonParser
from reconstruct.refine import (
    RefineConfig,
    View,
    crop_image,
    dematte,
    matte_face_outline,
    posed_blend,
)
from render import Gaussians, rasterize

from .. import __version__
from ..asset import Avatar
from ..errors import AvatarError
from ..photo import read_photo
from .drive import find_eyes, speech_rig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CreateConfig:
    gaussians: int = 50_000
    """Canonical Gaussians on the template (at least a quarter on face and hands)."""
    size: int = 512
    """Long side of the working crop around the person, pixels."""
    fit_steps: int = 220
    """Template-fitting steps after the global alignment."""
    refine_steps: int = RefineConfig.steps
    """Appearance-refinement steps (0: the feed-forward result alone, no per-identity fitting)."""
    reconstructor: str = "default"
    """Feed-forward reconstructor: default (the shipped one), none (start from the template),
    or PATH to a checkpoint (X.safetensors with X.json, or a folder holding them)."""
    personalise_steps: int = PERSONALISE_STEPS
    """Steps fine-tuning the reconstructor's Gaussian decoder on the photo, before the
    refinement (needs a reconstructor and refine-steps > 0)."""
    fov: float = 40.0
    """Assumed vertical field of view of the photo, degrees."""
    seed: int = 0
    """Random seed (sampling)."""
    body: str = "anny"
    """Body template: anny, or smplx:PATH to your licensed SMPLX_NEUTRAL.npz (or its folder)."""


@dataclass
class CreateTimings:
    parse_s: float = 0.0
    fit_s: float = 0.0
    sample_s: float = 0.0
    reconstruct_s: float = 0.0
    refine_s: float = 0.0

    @property
    def total_s(self) -> float:
        return self.parse_s + self.fit_s + self.sample_s + self.reconstruct_s + self.refine_s


def create_avatar(photo_path: str | Path, cfg: CreateConfig | None = None,
                  progress: bool = True) -> tuple[Avatar, CreateTimings]:  # fmt: skip
    cfg = cfg or CreateConfig()
    times = CreateTimings()
    photo = read_photo(photo_path)
    t0 = time.perf_counter()  # a bad --reconstructor fails before minutes of work
    model = None if cfg.reconstructor == "none" else _load_reconstructor(cfg.reconstructor)
    if model is not None and cfg.body != "anny":  # it learned Anny's canonical space
        if cfg.reconstructor != "default":
            raise AvatarError(f"--reconstructor {cfg.reconstructor}: trained on the Anny template, "
                              f"not {cfg.body}; use --reconstructor none with this --body")  # fmt: skip
        log.warning("the reconstructor is trained on Anny; starting %s from the template", cfg.body)
        model = None
    times.reconstruct_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with PersonParser() as parser:
        try:
            parse = parser(photo.rgb)
        except NoPersonError:
            raise AvatarError(f"{photo_path}: no person found in the photo") from None
    if parse.num_people > 1:
        log.warning("%s: %d people in the photo; using the largest", photo_path, parse.num_people)
    times.parse_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    try:
        tpl = load_template(cfg.body)
    except ValueError as exc:
        raise AvatarError(f"--body {cfg.body}: {exc}") from None
    fit_cfg = FitConfig(fov_deg=cfg.fov, size=cfg.size, steps=cfg.fit_steps)
    fit = fit_template(tpl, parse, photo.rgb.shape[:2], fit_cfg, progress=progress)
    times.fit_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    canonical, binding = sample_canonical(tpl, fit.shape, cfg.gaussians, seed=cfg.seed)
    with torch.no_grad():
        posed = tpl(fit.shape[None], pose=fit.pose[None], translation=fit.translation[None])
    if parse.face is not None and parse.face_detected:  # the face's outline, where it shows
        outline = measure_outline(tpl, fit.shape, posed.vertices[0], fit.camera,
                                  fit.crop.to_crop(parse.face))  # fmt: skip
        if outline is not None:
            canonical = fit_outline(canonical, outline)
    if parse.face is not None and parse.face_detected:  # a light room spilled past the cheek
        parse = replace(parse, mask=matte_face_outline(photo.rgb, parse.mask, parse.face))
    image = crop_image(photo.rgb, fit.crop)
    mask = crop_image(parse.mask, fit.crop)
    times.sample_s = time.perf_counter() - t0

    transforms = posed.transforms[0]
    found = {"face": parse.face} | {f"hand_{side}": p for side, p in parse.hands.items()}
    landmarks = {part: fit.crop.to_crop(p) for part, p in found.items() if p is not None}
    obs = Observation(tpl, binding, transforms, fit.camera, image, mask, landmarks,
                      hand_boxes_from_landmarks(parse.hands, fit.crop.to_crop),
                      face_close_up(photo.rgb, parse, cfg.fov, fit.crop.scale))  # fmt: skip
    canonical, stage = reconstruct_appearance(obs, canonical, model, cfg.refine_steps,
                                              cfg.personalise_steps, cfg.seed, progress)  # fmt: skip
    times.reconstruct_s += stage["reconstruct_s"]
    times.refine_s += stage["refine_s"]
    canonical = _dark_mouth(canonical, binding, tpl, fit.shape)

    with torch.no_grad():
        out = rasterize(apply_blend(canonical, posed_blend(binding, transforms)), fit.camera, 1.0)
    # against the photo as the refinement fits it: the room behind its outline made white
    # (`dematte`), as the avatar is drawn on white
    input_psnr, input_ssim = masked_quality(
        out.rgb, dematte(image, mask)[None], mask[None, ..., None]
    )
    quality = {
        "input_masked_psnr_db": round(input_psnr, 2),
        "input_masked_ssim": round(input_ssim, 4),
        "fit_keypoint_error": round(fit.keypoint_error, 4),
        "fit_silhouette_iou": round(fit.silhouette_iou, 4),
    }
    provenance = {
        "photo": Path(photo_path).name,
        "photo_sha256": hashlib.sha256(Path(photo_path).read_bytes()).hexdigest(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gsavatar": __version__,
        "settings": asdict(cfg),
        "people_in_photo": parse.num_people,
        "hands_found": {k: v is not None for k, v in parse.hands.items()},
    }
    particles = None
    if tpl.name == "anny":  # speech driving needs ARKit facial actions
        particles = template_particles(tpl, fit.shape, PART_CODES, binding.face_ids, binding.bary,
                                       seed=cfg.seed)  # fmt: skip
    h, w = photo.rgb.shape[:2]  # the photo's whole frame, at its own size: --view input
    frame = photo_camera((h, w), Crop(0.0, 0.0, 1.0, w, h), cfg.fov).resized(
        max(photo.original_size)
    )
    avatar = Avatar(canonical, binding, template_kind(cfg.body), fit.shape, fit.pose,
                    fit.translation, frame, {"provenance": provenance, "quality": quality},
                    particles=particles, body=cfg.body)  # fmt: skip
    if particles is not None:  # a template speech can drive: its eye cover, saved for drive
        avatar.eyes = find_eyes(speech_rig(avatar))
    return avatar, times


MOUTH_RGB = (0.32, 0.1, 0.1)  # inside of the mouth: never seen in a closed-mouth photo
CLOSE_UP_PX = 256  # the face close-up the refinement also fits, at most this many pixels wide


def face_close_up(rgb, parse, fov: float, crop_scale: float) -> View | None:
    """The photo around the face (twice the face mesh's extent) at the photo's own resolution,
    up to CLOSE_UP_PX, with its camera: the refinement fits the face there too. None without a
    face, or where the working crop already holds the face at that resolution."""
    if parse.face is None:
        return None
    lo, hi = parse.face.min(0), parse.face.max(0)
    side = 2.0 * float((hi - lo).max())
    scale = min(1.0, CLOSE_UP_PX / side)
    if scale <= 1.2 * crop_scale:  # no sharper than the working crop: nothing to add
        return None
    centre = (lo + hi) / 2
    px = max(8, round(side * scale))
    crop = Crop(float(centre[0] - side / 2), float(centre[1] - side / 2), scale, px, px)
    camera = photo_camera(rgb.shape[:2], crop, fov)
    return View(camera, crop_image(rgb, crop), crop_image(parse.mask, crop))


def _load_reconstructor(name: str):
    from reconstruct.network import load_reconstructor

    try:
        return load_reconstructor(None if name == "default" else name)
    except ValueError as exc:
        raise AvatarError(f"--reconstructor {name}: {exc}") from None


def _dark_mouth(gaussians: Gaussians, binding, template: BodyTemplate, shape) -> Gaussians:
    """Colour the mouth cavity and tongue a dark red, so an open mouth reads as open. The
    cavity reaches beyond what an open mouth shows: up behind the upper lip to the nose and down
    behind the chin, and there, dark, it showed through the skin as dark specks (between the nose
    and the upper lip; over the woman's chin), and sideways behind the cheeks, where from the
    side it read as a second mouth on the cheek. Its Gaussians higher than the lips take the
    colour of the skin just above them; those beside the lips' corners the cheek's there; those
    more than `CAVITY_SHOWN` below the slit between the lips the chin's. The lips' inner faces
    (`inner_lips`) are painted between the lips' red and the cavity's dark: a photo with parted
    lips painted its teeth there, which then stayed in every pause as a gap in closed lips, and
    a photo with closed lips painted them like the outer lips, so an open mouth read as red lips
    with no opening."""
    from render.sh import rgb_to_sh0, sh0_to_rgb

    parts = binding.parts
    inside = parts == PART_CODES["mouth"]
    if gaussians.sh is None or not inside.any():
        return gaussians
    sh = gaussians.sh.detach().clone()
    sh[inside] = 0
    sh[inside, 0] = rgb_to_sh0(torch.tensor(MOUTH_RGB))
    lips, face = parts == PART_CODES["lips"], parts == PART_CODES["face"]
    x, y = gaussians.means[:, 0], gaussians.means[:, 1]
    inner, slit = inner_lips(template, shape, binding)

    def skin_over(cavity, skin) -> None:  # the cavity's Gaussians `cavity` take `skin`'s colour
        if skin.any():
            sh[inside & cavity, 0] = gaussians.sh[skin, 0].median(0).values

    if lips.any() and face.any():
        top = torch.quantile(y[lips], 0.98)
        skin_over(y > top, face & (y > top) & (y < top + 0.03))  # below the nose
        left, right = torch.quantile(x[lips], torch.tensor([0.02, 0.98]))
        band = face & ((y - y[lips].median()).abs() < 0.015)
        skin_over(x < left, band & (x < left) & (x > left - CHEEK_BESIDE))  # inside the cheeks
        skin_over(x > right, band & (x > right) & (x < right + CHEEK_BESIDE))
    if inner.any():
        low = slit - CAVITY_SHOWN
        chin = (face | lips) & (y < slit - 0.02) & (y > slit - 0.045) & (x.abs() < 0.025)
        skin_over(y < low, chin & ~inner)
    outer = lips & ~inner & ((y - slit).abs() < LIP_BAND)
    if inner.any() and outer.any():
        red = sh0_to_rgb(gaussians.sh[outer, 0]).median(0).values  # the lips near the slit
        sh[inner] = 0
        sh[inner, 0] = rgb_to_sh0((1 - INNER_LIP_DARK) * red
                                  + INNER_LIP_DARK * torch.tensor(MOUTH_RGB))  # fmt: skip
    return gaussians.replace(sh=sh)


CHEEK_BESIDE = 0.02  # metres of cheek beside the lips' corners: the cavity behind takes its skin
CAVITY_SHOWN = 0.01  # metres below the lips' slit: the cavity an open mouth shows (the jaw
# takes the tongue and the mouth's floor down with the lower lip)
LIP_BAND = 0.006  # metres either side of the slit where the outer lips' red is read
INNER_LIP_DARK = 0.6  # how far the inner lips' colour goes from the lips' red to the cavity's


def inner_lips(template: BodyTemplate, shape, binding) -> tuple[torch.Tensor, float]:
    """Which Gaussians sit on the lips' inner faces, and the height of the slit between the
    lips (rest pose, metres): lip triangles facing the other lip more than forward (an upper
    lip's faces turned down, a lower lip's turned up) or facing back. None without the
    template's inner lip landmarks (all False, slit 0)."""
    from deform.surface import face_areas_normals, interpolate

    lm = template.face_landmarks
    none = torch.zeros(len(binding.parts), dtype=torch.bool)
    if "upper_lip_inner" not in lm or "lower_lip_inner" not in lm:
        return none, 0.0
    with torch.no_grad():
        rest = template(shape[None].float())
    pts = template.landmarks(rest, {k: lm[k] for k in ("upper_lip_inner", "lower_lip_inner")})
    slit = float(pts[0, :, 1].mean())
    _, normals = face_areas_normals(rest.rest_vertices[0], template.faces)
    n = normals[binding.face_ids]
    y = interpolate(rest.rest_vertices[0], template.faces, binding.face_ids, binding.bary)[:, 1]
    toward = torch.where(y > slit, -n[:, 1], n[:, 1])  # along the way to the slit
    inner = (binding.parts == PART_CODES["lips"]) & ((toward > n[:, 2]) | (n[:, 2] < 0))
    return inner, slit


def posed_gaussians(avatar: Avatar, template: BodyTemplate, frame: str = "photo") -> Gaussians:
    """The avatar's Gaussians in the photo's pose.
    frame "photo": where the photo saw them (use with `avatar.camera`);
    frame "body": the same pose in the body's own upright frame (root rotation and translation
    removed), for views around the person; frame "rest": the canonical Gaussians."""
    if frame == "rest":
        return avatar.gaussians
    pose = avatar.photo_pose.clone()
    translation = avatar.photo_translation
    if frame == "body":
        pose[0] = 0
        translation = None
    with torch.no_grad():
        out = template(avatar.shape[None], pose=pose[None],
                       translation=None if translation is None else translation[None])  # fmt: skip
        return apply_blend(avatar.gaussians, posed_blend(avatar.binding, out.transforms[0]))
