"""Procedural training data for a feed-forward "photo -> canonical Gaussians" reconstructor.

A subject is the Anny template with a random adult phenotype and pose, its canonical Gaussians
(`sample_canonical`) textured procedurally from where they sit on the rest body: skin, a top
with sleeves, a bottom, shoes, hair (pushed out along the normals), a face with lips, eyes and
brows, bare or gloved hands, and a baked light. Posed into photo space (the body faces the camera,
which sits at the origin looking down -Z; the root only gets a small yaw) and rendered through the
working-crop camera of a virtual 768x1024 photo, those Gaussians are the subject's "photo".
The virtual photo is unbounded: the crop is the person's box plus its margin, never clamped.
"""

from __future__ import annotations

import colorsys
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from deform.skinning import apply_blend
from deform.templates import BodyTemplate
from render import Cameras, Gaussians, rasterize
from render.io import atomic_path
from render.rotations import quat_to_rotmat
from render.sh import rgb_to_sh0

from .canonical import PART_CODES, Binding, sample_canonical
from .fit import Crop, photo_camera
from .refine import posed_blend

FORMAT = "gsavatar-recon-data"
VERSION = 1
TEMPLATE = "anny"  # the phenotype ranges and bone names below are Anny's
PHOTO_HW = (1024, 768)  # the virtual photo, height x width
FOV_DEG = 40.0
SKIN = np.array([[0.97, 0.86, 0.77], [0.93, 0.77, 0.65], [0.86, 0.67, 0.53], [0.76, 0.57, 0.42],
                 [0.63, 0.44, 0.31], [0.49, 0.33, 0.23], [0.36, 0.24, 0.16], [0.25, 0.16, 0.11]])  # fmt: skip
HAIR = np.array([[0.04, 0.035, 0.03], [0.15, 0.09, 0.06], [0.3, 0.18, 0.1], [0.48, 0.33, 0.19],
                 [0.78, 0.63, 0.38], [0.55, 0.22, 0.1], [0.6, 0.58, 0.56]])  # fmt: skip
NEUTRAL = np.array([[0.06, 0.06, 0.07], [0.92, 0.92, 0.9], [0.45, 0.45, 0.46], [0.12, 0.15, 0.3],
                    [0.25, 0.35, 0.55], [0.75, 0.68, 0.55], [0.3, 0.33, 0.2], [0.4, 0.1, 0.14]])  # fmt: skip
ARM_BONES = ("upperarm", "lowerarm", "wrist", "finger", "metacarpal")
TENSORS = ("shape", "pose", "translation", "image", "mask", "transforms")
GAUSS = ("means", "quats", "log_scales", "opacity_logits", "sh")


@dataclass
class Subject:
    shape: Tensor  # [S] phenotype
    pose: Tensor  # [J, 3] axis-angle per bone, canonical axes, root (bone 0) included
    translation: Tensor  # [3] photo space
    camera: Cameras  # 1 view: the working-crop camera
    image: Tensor  # [H, W, 3] the rendered photo crop, person over a background
    mask: Tensor  # [H, W] the render's alpha
    template: Gaussians  # sample_canonical(template, shape, N, seed=seed)[0]
    binding: Binding  # its binding
    target: Gaussians | None  # ground truth: template + offsets, coloured (sh [N, 1, 3])
    transforms: Tensor  # [J, 4, 4] skinning transforms of the photo pose
    views: Views | None = None  # other photos of the posed person (real multi-view data)


@dataclass
class Views:
    """Photos of the person in the photo's pose from other cameras (photo space)."""

    cameras: Cameras  # V views, one image size
    rgb: Tensor  # [V, H, W, 3] on white
    alpha: Tensor  # [V, H, W] person mask


def _f(x) -> Tensor:
    return torch.as_tensor(np.asarray(x, dtype=np.float32))


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _hsv(rng: np.random.Generator, s: tuple[float, float], v: tuple[float, float]) -> Tensor:
    return _f(colorsys.hsv_to_rgb(rng.random(), rng.uniform(*s), rng.uniform(*v)))


def _pick(rng: np.random.Generator, palette: np.ndarray, jitter: float) -> Tensor:
    colour = palette[rng.integers(len(palette))] * rng.uniform(1 - jitter, 1 + jitter, 3)
    return _f(np.clip(colour, 0, 1))


def _cloth(rng: np.random.Generator) -> Tensor:
    return _pick(rng, NEUTRAL, 0.12) if rng.random() < 0.4 else _hsv(rng, (0.2, 0.9), (0.25, 0.95))


def _pattern(rng: np.random.Generator, p: Tensor, kinds: tuple[str, ...]) -> Tensor:
    """[N, 3] a garment's colour at canonical points p [N, 3]: solid, stripes, checks, blotches."""
    a, b, kind = _cloth(rng), _cloth(rng), kinds[rng.integers(len(kinds))]
    period, phase = rng.uniform(0.02, 0.08), rng.uniform(0, 2 * math.pi)
    if kind == "stripes":  # horizontal
        m = (torch.sin(2 * math.pi * p[:, 1] / period + phase) > 0).float()
    elif kind == "checks":
        m = (torch.floor(p / period).sum(-1) % 2).float()
    elif kind == "blotches":  # low-frequency noise: a few random plane waves, softly thresholded
        f = _f([_unit(rng.normal(size=3)) * rng.uniform(8, 20) for _ in range(4)])
        m = torch.sigmoid(3 * torch.sin(p @ f.T + _f(rng.uniform(0, 2 * math.pi, 4))).sum(-1))
    else:
        m = torch.zeros(len(p))
    return a * (1 - m[:, None]) + b * m[:, None]


def random_pose(template: BodyTemplate, joints: Tensor, rng: np.random.Generator) -> Tensor:
    """[J, 3] a random pose around Anny's A-pose (rest joints [J, 3]): limbs about anatomical
    axes (arms raised or lowered, swung, twisted; elbows and fingers flexed), a root yaw."""
    jn, at = joints.double().numpy(), {n: i for i, n in enumerate(template.bone_names)}
    pose = np.zeros((len(at), 3))
    for prefix, sigma in (("spine0", 0.06), ("neck01", 0.12), ("head", 0.12), ("upperleg01", 0.08),
                          ("wrist", 0.3), ("finger1-", 0.1)):  # fmt: skip
        for i in (i for n, i in at.items() if n.startswith(prefix)):
            pose[i] = rng.normal(0, sigma, 3)
    for s in ("L", "R"):
        shoulder, elbow, wrist = (jn[at[f"{b}.{s}"]] for b in ("upperarm01", "lowerarm01", "wrist"))
        d = _unit(
            elbow - shoulder
        )  # about d x Y: + raises the arm; about d x Z: + swings it forward
        up, fwd = _unit(np.cross(d, [0, 1, 0])), _unit(np.cross(d, [0, 0, 1]))
        raise_, swing, twist = np.clip(rng.normal(0.05, 0.3), -0.3, 0.9), *rng.normal(0, 0.3, 2)
        pose[at[f"upperarm01.{s}"]] = up * raise_ + fwd * swing + d * twist
        d = _unit(wrist - elbow)  # the elbow only flexes (the forearm comes forward)
        flex, twist = abs(rng.normal(0, 0.35)), rng.normal(0, 0.2)
        pose[at[f"lowerarm01.{s}"]] = _unit(np.cross(d, [0, 0, 1])) * flex + d * twist
        # fingers curl about index -> pinky on the left hand, its mirror image on the right
        curl = _unit(jn[at[f"finger5-1.{s}"]] - jn[at[f"finger2-1.{s}"]]) * (1 if s == "L" else -1)
        for f in range(2, 6):
            c = 0.1 + abs(rng.normal(0, 0.15))
            for k in range(1, 4):
                pose[at[f"finger{f}-{k}.{s}"]] = curl * c * rng.uniform(0.7, 1.3)
    pose[0] = [0.0, math.radians(rng.uniform(-25, 25)), 0.0]  # the body faces the camera already
    return torch.tensor(pose, dtype=torch.float32)


def _texture(template: BodyTemplate, joints: Tensor, g: Gaussians, binding: Binding,
             rng: np.random.Generator) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Albedo with baked light [N, 3] and offsets along the normal [N] of canonical Gaussians,
    from their rest positions, normals, parts and dominant bones; landmarks from rest joints."""
    jt = {n: joints[i] for i, n in enumerate(template.bone_names)}
    p, n, parts = g.means, quat_to_rotmat(g.quats)[:, :, 2], binding.parts.long()
    x, y, z = p.unbind(-1)

    def bones(*prefixes: str) -> Tensor:  # [N] bool: the dominant bone's name starts so
        flags = torch.tensor([b.startswith(prefixes) for b in template.bone_names])
        return flags[binding.bone_ids[:, 0]]

    arm, head, eyes, neck = bones(*ARM_BONES) & (parts == 0), bones("head"), bones("eye"), bones("neck")  # fmt: skip
    body = (parts == 0) & ~head & ~eyes & ~arm
    eye, neck_y, waist_y = jt["eye.L"], jt["neck01"][1], jt["spine04"][1]
    hip_y, knee_y, ankle_y = jt["upperleg01.L"][1], jt["lowerleg01.L"][1], jt["foot.L"][1]
    skin, hair_col = _pick(rng, SKIN, 0.07), _pick(rng, HAIR, 0.15)
    rgb, offset = skin.expand(len(p), 3).clone(), torch.zeros(len(p))

    # bottom: trousers, three-quarter, shorts or a skirt, from the waist down to a hem
    kind = rng.choice(4, p=[0.5, 0.15, 0.2, 0.15])
    hem = [ankle_y + rng.uniform(0.0, 0.06), knee_y - rng.uniform(0.0, 0.2),
           hip_y - rng.uniform(0.12, 0.3), knee_y + rng.uniform(0.0, 0.15)][kind]  # fmt: skip
    bottom = body & (y < waist_y + rng.uniform(-0.04, 0.04)) & (y > hem)
    rgb[bottom] = _pattern(rng, p, ("solid", "solid", "stripes", "checks", "blotches"))[bottom]
    offset[bottom] = rng.uniform(0, 0.04)

    # top: the torso between its hem and the neckline (dipping at the front), sleeves down the arms
    top_hem = hip_y - rng.uniform(0.0, 0.1) if rng.random() < 0.85 else knee_y + rng.uniform(0, 0.15)  # fmt: skip
    front = ((z - jt["neck01"][2]) / 0.05).clamp(0, 1) * (1 - x.abs() / 0.12).clamp(0, 1)
    neckline = neck_y + 0.01 - rng.uniform(0.0, 0.09) * front
    kind = rng.choice(4, p=[0.15, 0.35, 0.15, 0.35])  # none, short, to the elbow, long
    sleeve = [0.02, rng.uniform(0.2, 0.35), rng.uniform(0.45, 0.6), rng.uniform(0.92, 1.02)][kind]
    s0 = torch.where((x > 0)[:, None], jt["upperarm01.L"], jt["upperarm01.R"])  # shoulder -> wrist
    s1 = torch.where((x > 0)[:, None], jt["wrist.L"], jt["wrist.R"]) - s0
    along = ((p - s0) * s1).sum(-1) / (s1 * s1).sum(-1)
    top = (body | neck | (arm & (along < sleeve))) & (y < neckline) & ((y > top_hem) | arm)
    top_rgb = _pattern(rng, p, ("solid", "solid", "stripes", "stripes", "checks", "blotches"))
    if rng.random() < 0.3:  # a print on the chest, front only
        cy, w, h = rng.uniform(0.42, 0.55), rng.uniform(0.04, 0.1), rng.uniform(0.03, 0.08)
        top_rgb[(x.abs() < w) & ((y - cy).abs() < h) & (n[:, 2] > 0.5)] = _cloth(rng)
    rgb[top], offset[top] = top_rgb[top], rng.uniform(0, 0.04)

    shoes = body & (y < ankle_y + rng.uniform(0.0, 0.04))
    white = rng.random() < 0.15  # trainers; else dark-ish
    rgb[shoes] = _f([0.9, 0.9, 0.88]) if white else _cloth(rng) * rng.uniform(0.2, 0.6)
    offset[shoes] = 0.0

    # face: lips, mouth, eyelids, brows, eyes (white, an iris and a pupil at the front)
    rgb[parts == PART_CODES["lips"]] = skin * _f([0.85, 0.6, 0.6])
    rgb[parts == PART_CODES["mouth"]] = _f([0.32, 0.1, 0.1])
    rgb[parts == PART_CODES["eyelids"]] = skin * 0.9
    brow = (parts == 1) & ((y - eye[1] - 0.024).abs() < 0.006) & ((x.abs() - eye[0]).abs() < 0.022)
    brow &= n[:, 2] > 0.3
    rgb[brow] = hair_col * 0.8 + skin * 0.2
    r_eye = (p[:, :2] - torch.stack([x.sign() * eye[0], eye[1].expand(len(p))], -1)).norm(dim=-1)
    rgb[eyes] = _f([0.9, 0.9, 0.87])
    rgb[eyes & (z > eye[2]) & (r_eye < 0.0055)] = _hsv(rng, (0.3, 0.8), (0.15, 0.5))
    rgb[eyes & (z > eye[2]) & (r_eye < 0.0025)] = 0.02

    # hair: the scalp above the hairline, the sides above the ears, the back down to the nape
    if rng.random() > 0.12:  # else bald
        hairline = eye[1] + rng.uniform(0.045, 0.085)
        short = rng.random() < 0.6
        nape = eye[1] - rng.uniform(0.03, 0.1) if short else neck_y - rng.uniform(0.0, 0.15)
        hz = jt["head"][2]
        sides = ((z < hz + 0.01) & (y > eye[1] + 0.035)) | ((z < hz - 0.02) & (y > nape))
        hair = (head | (parts == 1)) & ((y > hairline) | ((parts == 0) & sides))
        back = (n[:, 2] < -0.2) & (x.abs() < 0.1) & (z < jt["neck01"][2])  # down the neck
        hair |= (neck | body) & back & (y > nape)
        if rng.random() < 0.5:  # short at the sides: the ears stay out
            hair &= ~(head & (x.abs() > 0.8 * x[head].abs().max()) & (y < eye[1] + 0.065))
        rgb[hair] = (hair_col * _f(rng.uniform(0.85, 1.15, (len(p), 1)))).clamp(0, 1)[hair]
        taper = torch.where(n[:, 2] > 0, ((y - hairline) / 0.04).clamp(0, 1), 1.0)  # the front
        offset[hair] = (rng.uniform(0.01, 0.05) * (0.4 + 0.6 * taper))[hair]

    # hands: bare, or a glove with stripes (each hand on its own)
    for hand in (parts == PART_CODES["hand_left"], parts == PART_CODES["hand_right"]):
        if rng.random() < 0.4:
            a, b, period = _cloth(rng), _cloth(rng), rng.uniform(0.008, 0.03)
            stripe = torch.sin(2 * math.pi * (p[hand] @ _f(_unit(rng.normal(size=3)))) / period)
            rgb[hand] = torch.where((stripe > 0)[:, None], a, b)

    light = _f(_unit(rng.uniform([-0.6, 0.3, 0.6], [0.6, 1.0, 1.2])))  # from the front, above
    rgb = rgb * (0.7 + 0.3 * (n @ light).clamp_min(0))[:, None]
    rgb = rgb + _f(rng.uniform(-0.03, 0.03, (len(p), 3)))
    return rgb.clamp(0, 1), offset


def _background(rng: np.random.Generator) -> Tensor:
    r = rng.random()  # white, grey or a colour
    if r < 0.2:
        return torch.ones(3)
    return torch.full((3,), rng.uniform(0.15, 0.9)) if r < 0.6 else _hsv(rng, (0.1, 0.6), (0.3, 0.95))  # fmt: skip


def make_subject(template: BodyTemplate, seed: int, num_gaussians: int = 8192,
                 size: int = 256) -> Subject:  # fmt: skip
    """One random subject; the same seed gives the same subject (no global random state)."""
    if template.name != TEMPLATE:
        raise ValueError(f"synthetic subjects need the {TEMPLATE} template, not {template.name}")
    rng = np.random.default_rng(seed)
    shape = _f(rng.uniform(0.05, 0.95, len(template.shape_names)))
    shape[template.shape_names.index("age")] = rng.uniform(0.45, 1.0)  # adults
    gaussians, binding = sample_canonical(template, shape, num_gaussians, seed=seed)
    with torch.no_grad():
        joints = template(shape[None]).joints[0]
        pose = random_pose(template, joints, rng)
        translation = _f([rng.uniform(-0.2, 0.2), rng.uniform(-0.2, 0.2), -rng.uniform(2.6, 4.0)])
        out = template(shape[None], pose=pose[None], translation=translation[None])
    transforms = out.transforms[0]

    # the crop: the posed body's box in the virtual photo plus 8%, long side `size` (as person_crop)
    full = photo_camera(PHOTO_HW, Crop(0.0, 0.0, 1.0, PHOTO_HW[1], PHOTO_HW[0]), FOV_DEG)
    uv = full.project(out.vertices[0][~template.part_masks()["hidden"]])[0]
    (x0, y0), (x1, y1) = uv.min(0).values.tolist(), uv.max(0).values.tolist()
    pad = 0.08 * max(x1 - x0, y1 - y0)
    x0, y0, x1, y1 = x0 - pad, y0 - pad, x1 + pad, y1 + pad
    scale = size / max(x1 - x0, y1 - y0)
    crop = Crop(x0, y0, scale, max(8, round((x1 - x0) * scale)), max(8, round((y1 - y0) * scale)))
    camera = photo_camera(PHOTO_HW, crop, FOV_DEG)

    rgb, offset = _texture(template, joints, gaussians, binding, rng)
    normals = quat_to_rotmat(gaussians.quats)[:, :, 2]
    means = gaussians.means + offset[:, None] * normals
    log_scales = gaussians.log_scales.clone()  # an offset surface is larger: no holes on it
    log_scales[:, :2] += torch.log1p(offset / 0.06)[:, None]
    target = gaussians.clone().replace(
        means=means, log_scales=log_scales, sh=rgb_to_sh0(rgb)[:, None]
    )  # no shared memory
    with torch.no_grad():
        posed = apply_blend(target, posed_blend(binding, transforms))
        render = rasterize(posed, camera, background=_background(rng))
    return Subject(shape, pose, translation, camera, render.rgb[0].clamp(0, 1), render.alpha[0, ..., 0],
                   gaussians, binding, target, transforms)  # fmt: skip


def save_subject(path: str | os.PathLike, subject: Subject) -> None:
    """One .safetensors file (written atomically): the tensors, and JSON metadata under the key
    "gsavatar" (format, version, template, camera width and height)."""
    from safetensors.torch import save_file

    tensors = {k: getattr(subject, k) for k in TENSORS}
    tensors |= {"camera.viewmats": subject.camera.viewmats, "camera.Ks": subject.camera.Ks}
    for name in ("template", "target"):
        if getattr(subject, name) is not None:
            tensors |= {f"{name}.{k}": getattr(getattr(subject, name), k) for k in GAUSS}
    tensors |= {f"binding.{k}": v for k, v in subject.binding.tensors().items()}
    meta = {"format": FORMAT, "version": VERSION, "template": TEMPLATE,
            "width": subject.camera.width, "height": subject.camera.height}  # fmt: skip
    if (v := subject.views) is not None:
        tensors |= {"views.viewmats": v.cameras.viewmats, "views.Ks": v.cameras.Ks,
                    "views.rgb": v.rgb, "views.alpha": v.alpha}  # fmt: skip
        meta |= {"views_width": v.cameras.width, "views_height": v.cameras.height}

    def own(v: Tensor) -> Tensor:  # contiguous, and never sharing memory with another tensor
        return v.detach().cpu().clone(memory_format=torch.contiguous_format)

    with atomic_path(path) as tmp:
        save_file({k: own(v) for k, v in tensors.items()}, str(tmp), {"gsavatar": json.dumps(meta)})


def load_subject(path: str | os.PathLike) -> Subject:
    """The inverse of `save_subject`; a missing or broken file raises ValueError naming it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("gsavatar", "null"))
            t = {k: f.get_tensor(k) for k in f.keys()}
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"no {FORMAT} metadata")
        if meta.get("version") != VERSION or meta.get("template") != TEMPLATE:
            raise ValueError(f"version {meta.get('version')} / template {meta.get('template')!r}, "
                             f"this reader knows {VERSION} / {TEMPLATE!r}")  # fmt: skip
        camera = Cameras(t["camera.viewmats"], t["camera.Ks"], meta["width"], meta["height"])
        gaussians = [Gaussians(**{k: t[f"{g}.{k}"] for k in GAUSS}) if f"{g}.means" in t else None
                     for g in ("template", "target")]  # fmt: skip
        binding = Binding(**{k[8:]: v for k, v in t.items() if k.startswith("binding.")})
        views = None
        if "views.rgb" in t:
            cams = Cameras(
                t["views.viewmats"], t["views.Ks"], meta["views_width"], meta["views_height"]
            )
            views = Views(cams, t["views.rgb"], t["views.alpha"])
        if gaussians[0] is None or (gaussians[1] is None and views is None):
            raise ValueError("needs template.* and either target.* or views.* tensors")
        return Subject(t["shape"], t["pose"], t["translation"], camera, t["image"], t["mask"],
                       gaussians[0], binding, gaussians[1], t["transforms"], views)  # fmt: skip
    except Exception as exc:  # safetensors' own errors, OSError, missing tensors, bad metadata
        raise ValueError(f"{path}: not a readable synthetic subject ({exc})") from None


def make_dataset(out_dir: str | os.PathLike, count: int, seed: int = 0, num_gaussians: int = 8192,
                 size: int = 256, progress: bool = True) -> None:  # fmt: skip
    """out_dir/00000.safetensors ... and out_dir/index.json (written last). Subject i's seed comes
    from (seed, i), so a dataset is reproducible and datasets of different seeds differ."""
    from tqdm import tqdm

    from deform.templates import load_template

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    template = load_template(TEMPLATE)
    files = []
    for i in tqdm(range(count), desc="synthetic", unit="subject", disable=not progress):
        sub_seed = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
        files.append(f"{i:05d}.safetensors")
        save_subject(out / files[-1], make_subject(template, sub_seed, num_gaussians, size))
    index = {"format": FORMAT, "version": VERSION, "count": count, "num_gaussians": num_gaussians,
             "size": size, "seed": seed, "files": files}  # fmt: skip
    with atomic_path(out / "index.json") as tmp:
        tmp.write_text(json.dumps(index, indent=1))
