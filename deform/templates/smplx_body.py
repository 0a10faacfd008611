"""SMPL-X as a `BodyTemplate`, through the `smplx` package and the user's licensed model file.

`--body smplx:PATH` points at `SMPLX_NEUTRAL.npz` (or a folder holding it). The arrays are read
with `allow_pickle=False` (the smplx package's own loader unpickles the file, which can run
code); smplx supplies the joint names, landmark vertex ids and LBS maths. SMPL-X is already in
the project's frame (+Y up, facing +Z, metres). Pose is parent-relative axis-angle for its 55
joints (root, 21 body, jaw, 2 eyes, 30 finger joints); shape is 10 betas; expression is 10 PCA
coefficients (not ARKit-named). Skinning here is plain LBS on the shaped, expressive rest mesh
(the pose-corrective blendshapes of SMPL-X are applied to the template's own vertices only).
Part masks come from the dominant skin weight, and landmarks from smplx's vertex ids.
"""

from __future__ import annotations

import functools
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .base import MEDIAPIPE_HAND, BodyTemplate, Landmark, TemplateOutput

BODY_JOINTS = {
    "left_shoulder": "left_shoulder", "right_shoulder": "right_shoulder",
    "left_elbow": "left_elbow", "right_elbow": "right_elbow",
    "left_wrist": "left_wrist", "right_wrist": "right_wrist",
    "left_pinky": "left_pinky1", "right_pinky": "right_pinky1",
    "left_index": "left_index1", "right_index": "right_index1",
    "left_thumb": "left_thumb2", "right_thumb": "right_thumb2",
    "left_hip": "left_hip", "right_hip": "right_hip", "left_knee": "left_knee",
    "right_knee": "right_knee", "left_ankle": "left_ankle", "right_ankle": "right_ankle",
    "left_eye": "left_eye_smplhf", "right_eye": "right_eye_smplhf",
}  # fmt: skip
BODY_VERTICES = {"nose": "nose", "left_ear": "lear", "right_ear": "rear", "left_heel": "LHeel",
                 "right_heel": "RHeel", "left_foot_index": "LBigToe", "right_foot_index": "RBigToe"}  # fmt: skip
FINGERS = {"thumb": ("thumb", ("cmc", "mcp", "ip")), "index": ("index", ("mcp", "pip", "dip")),
           "middle": ("middle", ("mcp", "pip", "dip")), "ring": ("ring", ("mcp", "pip", "dip")),
           "pinky": ("pinky", ("mcp", "pip", "dip"))}  # fmt: skip
SMPLX_SEGMENTS = {  # joint name without side -> the body segment it moves (SMPL-X names a
    "hip": "upperleg", "knee": "lowerleg", "ankle": "foot", "foot": "foot",  # joint by its head)
    "shoulder": "upperarm", "elbow": "lowerarm", "wrist": "hand", "collar": "torso",
    "neck": "neck", "head": "head", "jaw": "head", "eye": "head",
}  # fmt: skip


def _model_file(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        for candidate in (path / "SMPLX_NEUTRAL.npz", path / "smplx" / "SMPLX_NEUTRAL.npz"):
            if candidate.is_file():
                return candidate
        raise ValueError(f"{path}: no SMPLX_NEUTRAL.npz in this folder")
    if not path.is_file():
        raise ValueError(f"{path}: no such SMPL-X model file")
    return path


# the arrays the template needs, by their key in SMPL-X's npz: (dimensions, integer?)
ARRAYS = {"v_template": ("V 3", False), "f": ("F 3", True), "J_regressor": ("55 V", False),
          "kintree_table": ("2 55", True), "weights": ("V 55", False),
          "shapedirs": ("V 3 B", False), "posedirs": ("V 3 486", False)}  # fmt: skip


def read_model_arrays(file: Path) -> dict[str, np.ndarray]:
    """The arrays of an SMPL-X npz that the template needs, read without pickle: an npz that
    stores any of them as pickled Python objects is refused (smplx itself would unpickle it,
    which can run code). Other keys (SMPL-X ships a few pickled dicts) are never read."""
    sizes: dict[str, int] = {}
    out = {}
    if not zipfile.is_zipfile(file):  # np.load would take anything else for a pickle
        raise ValueError(f"{file}: not a readable .npz file (not a zip archive of arrays)")
    try:
        with np.load(file, allow_pickle=False) as npz:
            for key, (dims, integer) in ARRAYS.items():
                if key not in npz.files:
                    raise ValueError(f"{file}: not an SMPL-X model file (no '{key}' array)")
                try:
                    a = npz[key]
                except (
                    ValueError
                ) as exc:  # "Object arrays cannot be loaded when allow_pickle=False"
                    raise ValueError(
                        f"{file}: '{key}' holds pickled Python objects; refusing to "
                        "load it (SMPL-X's arrays are plain numbers)"
                    ) from exc
                if a.dtype.kind not in ("iu" if integer else "fiu"):
                    raise ValueError(f"{file}: '{key}' has dtype {a.dtype}, expected numbers")
                want = dims.split()
                if a.ndim != len(want) or any(
                    int(d) != n if d.isdigit() else sizes.setdefault(d, n) != n
                    for d, n in zip(want, a.shape, strict=True)
                ):
                    raise ValueError(
                        f"{file}: '{key}' has shape {list(a.shape)}, expected [{', '.join(want)}]"
                    )
                if not integer and not np.isfinite(a).all():
                    raise ValueError(f"{file}: '{key}' holds NaN or infinite values")
                out[key] = a
    except (OSError, EOFError, zipfile.BadZipFile, MemoryError) as exc:
        raise ValueError(f"{file}: not a readable .npz file ({exc})") from None
    if sizes["B"] < 20:
        raise ValueError(
            f"{file}: 'shapedirs' needs at least 20 components (10 shape, 10 expression)"
        )
    f, parents = out["f"], out["kintree_table"][0]
    kids = parents[1:].astype(np.int64)
    if f.min() < 0 or f.max() >= sizes["V"] or not ((kids >= 0) & (kids < np.arange(1, 55))).all():
        raise ValueError(f"{file}: faces or the kinematic tree point outside the model")
    return out


class SMPLXTemplate(BodyTemplate):
    shape_range = (-3.0, 3.0)
    SHAPE_SPACE = 300  # SMPL-X's shapedirs: 300 shape, then 100 expression components

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        from smplx.joint_names import JOINT_NAMES
        from smplx.vertex_ids import vertex_ids

        file = _model_file(path)
        self.name = f"smplx:{path}"
        a = read_model_arrays(file)
        if a["v_template"].shape[0] <= max(vertex_ids["smplx"].values()):
            raise ValueError(f"{file}: {a['v_template'].shape[0]} vertices is too few for SMPL-X")
        dirs = a["shapedirs"]
        # as smplx builds them: 10 betas; 10 expressions after the shape space (or after the
        # 10 betas in a model with fewer components)
        start = self.SHAPE_SPACE if dirs.shape[-1] >= self.SHAPE_SPACE + 100 else 10
        as_float = functools.partial(torch.as_tensor, dtype=torch.float32)
        self.register_buffer("v_template", as_float(a["v_template"]), persistent=False)
        self.register_buffer("shapedirs", as_float(dirs[:, :, :10]), persistent=False)
        self.register_buffer(
            "expr_dirs", as_float(dirs[:, :, start : start + 10]), persistent=False
        )
        self.register_buffer("J_regressor", as_float(a["J_regressor"]), persistent=False)
        posedirs = a["posedirs"].reshape(-1, a["posedirs"].shape[-1]).T  # [486, V*3]
        self.register_buffer("posedirs", as_float(posedirs), persistent=False)
        self.register_buffer("lbs_weights", as_float(a["weights"]), persistent=False)
        parents = torch.as_tensor(a["kintree_table"][0].astype(np.int64))
        parents[0] = -1
        self.register_buffer("parents", parents, persistent=False)
        self.bone_names = list(JOINT_NAMES[:55])
        self.shape_names = [f"beta{i}" for i in range(10)]
        self.expression_names = [f"expression{i}" for i in range(self.expr_dirs.shape[-1])]
        self.register_buffer("faces", torch.as_tensor(a["f"].astype(np.int64)), persistent=False)
        top_w, top_ids = self.lbs_weights.topk(8, dim=-1)
        self.register_buffer("skin_ids", top_ids, persistent=False)
        self.register_buffer("skin_weights", top_w / top_w.sum(-1, keepdim=True).clamp_min(1e-12),
                             persistent=False)  # fmt: skip
        ids = vertex_ids["smplx"]
        joint = self.bone_names.index
        self.body_landmarks = {k: Landmark("head", joint(v)) for k, v in BODY_JOINTS.items()}
        self.body_landmarks.update(
            {k: Landmark("vertex", ids[v]) for k, v in BODY_VERTICES.items()}
        )
        self.hand_landmarks = {}
        self.face_landmarks = {}  # the fit places the head by the body landmarks alone
        for side, s in (("left", "l"), ("right", "r")):
            table = {"wrist": Landmark("head", joint(f"{side}_wrist"))}
            for finger, (name, parts) in FINGERS.items():
                for i, part in enumerate(parts):
                    table[f"{finger}_{part}"] = Landmark("head", joint(f"{side}_{name}{i + 1}"))
                table[f"{finger}_tip"] = Landmark("vertex", ids[f"{s}{name}"])
            self.hand_landmarks[side] = {k: table[k] for k in MEDIAPIPE_HAND}

    @property
    def bone_parents(self) -> list[int]:
        return self.parents.tolist()

    def bone_segments(self) -> list[str]:
        out = []
        for bone in self.bone_names:
            side, _, stem = (
                bone.partition("_") if bone.startswith(("left_", "right_")) else ("", "", bone)
            )
            stem = stem.removesuffix("_smplhf").rstrip("0123456789")
            segment = SMPLX_SEGMENTS.get(stem, "hand" if stem in FINGERS else "torso")
            out.append(
                f"{segment}.{side[0].upper()}"
                if side and segment not in ("torso", "neck", "head")
                else segment
            )
        return out

    def default_shape(self) -> Tensor:
        return torch.zeros(len(self.shape_names))

    def forward(self, shape, pose=None, translation=None, expression=None) -> TemplateOutput:
        from smplx.lbs import batch_rigid_transform, batch_rodrigues, blend_shapes, vertices2joints

        batch = shape.shape[0]
        v = self.v_template[None] + blend_shapes(shape.float(), self.shapedirs)
        if expression is not None:
            v = v + blend_shapes(expression.float(), self.expr_dirs)
        joints = vertices2joints(self.J_regressor, v)  # [B, 55, 3]
        if pose is None and translation is None:
            eye = torch.eye(4).expand(batch, len(self.bone_names), 4, 4)
            return TemplateOutput(v, v, eye, joints)
        if pose is None:
            pose = shape.new_zeros(batch, len(self.bone_names), 3)
        rot = batch_rodrigues(pose.reshape(-1, 3).float()).reshape(batch, -1, 3, 3)
        posed_joints, transforms = batch_rigid_transform(rot, joints, self.parents)
        if translation is not None:
            transforms = transforms.clone()
            transforms[..., :3, 3] += translation[:, None].float()
            posed_joints = posed_joints + translation[:, None].float()
        blend = torch.einsum("vj,bjkl->bvkl", self.lbs_weights.float(), transforms)
        pose_offsets = ((rot[:, 1:] - torch.eye(3)).reshape(batch, -1) @ self.posedirs).reshape(
            batch, -1, 3
        )
        vp = v + pose_offsets
        verts = (blend[..., :3, :3] @ vp[..., None])[..., 0] + blend[..., :3, 3]
        return TemplateOutput(verts, v, transforms, posed_joints)

    def part_masks(self) -> dict[str, Tensor]:
        with torch.no_grad():
            rest = self(self.default_shape()[None])
        v, j = rest.rest_vertices[0], rest.joints[0]
        joint = self.bone_names.index
        dominant = self.skin_ids[:, 0]
        head_joints = torch.tensor(
            [joint(n) for n in ("head", "jaw", "left_eye_smplhf", "right_eye_smplhf")]
        )
        head = torch.isin(dominant, head_joints)
        face = head & (v[:, 2] > j[joint("head"), 2])
        nose = v[self.body_landmarks["nose"].index]
        mouth = nose - torch.tensor([0.0, 0.04, 0.01])
        eyes = j[[joint("left_eye_smplhf"), joint("right_eye_smplhf")]]
        hands = {}
        for side in ("left", "right"):
            ids = [joint(f"{side}_wrist")] + [joint(n) for n in self.bone_names if n.startswith(side + "_")
                                              and n[len(side) + 1 :].rstrip("123") in
                                              ("index", "middle", "pinky", "ring", "thumb")]  # fmt: skip
            hands[side] = torch.isin(dominant, torch.tensor(ids))
        near_eye = (v[:, None] - eyes[None]).norm(dim=-1).min(1).values < 0.025
        return {
            "head": head,
            "face": face,
            "lips": face & ((v - mouth).norm(dim=-1) < 0.025),
            "eyelids": face & near_eye,
            "hand_left": hands["left"],
            "hand_right": hands["right"],
            "mouth": torch.zeros_like(head),
            "hidden": torch.zeros_like(head),
        }
