"""SMPL-X as a `BodyTemplate`, through the `smplx` package and the user's licensed model file.

`--body smplx:PATH` points at `SMPLX_NEUTRAL.npz` (or a folder holding it). SMPL-X is already in
the project's frame (+Y up, facing +Z, metres). Pose is parent-relative axis-angle for its 55
joints (root, 21 body, jaw, 2 eyes, 30 finger joints); shape is 10 betas; expression is 10 PCA
coefficients (not ARKit-named). Skinning here is plain LBS on the shaped, expressive rest mesh
(the pose-corrective blendshapes of SMPL-X are applied to the template's own vertices only).
Part masks come from the dominant skin weight, and landmarks from smplx's vertex ids.
"""

from __future__ import annotations

from pathlib import Path

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


class SMPLXTemplate(BodyTemplate):
    shape_range = (-3.0, 3.0)

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        import smplx
        from smplx.joint_names import JOINT_NAMES
        from smplx.vertex_ids import vertex_ids

        file = _model_file(path)
        self.name = f"smplx:{path}"
        try:
            model = smplx.SMPLX(str(file), num_betas=10, num_expression_coeffs=10, use_pca=False,
                                flat_hand_mean=True, ext="npz")  # fmt: skip
        except Exception as exc:  # smplx raises many kinds on a bad file
            raise ValueError(f"{file}: not a usable SMPL-X model file ({exc})") from None
        object.__setattr__(self, "_model", model)
        self.bone_names = list(JOINT_NAMES[:55])
        self.shape_names = [f"beta{i}" for i in range(10)]
        self.expression_names = [f"expression{i}" for i in range(model.expr_dirs.shape[-1])]
        self.register_buffer("faces", model.faces_tensor.long(), persistent=False)
        top_w, top_ids = model.lbs_weights.float().topk(8, dim=-1)
        self.register_buffer("skin_ids", top_ids, persistent=False)
        self.register_buffer("skin_weights", top_w / top_w.sum(-1, keepdim=True), persistent=False)
        ids = vertex_ids["smplx"]
        joint = self.bone_names.index
        self.body_landmarks = {k: Landmark("head", joint(v)) for k, v in BODY_JOINTS.items()}
        self.body_landmarks.update(
            {k: Landmark("vertex", ids[v]) for k, v in BODY_VERTICES.items()}
        )
        self.hand_landmarks = {}
        for side, s in (("left", "l"), ("right", "r")):
            table = {"wrist": Landmark("head", joint(f"{side}_wrist"))}
            for finger, (name, parts) in FINGERS.items():
                for i, part in enumerate(parts):
                    table[f"{finger}_{part}"] = Landmark("head", joint(f"{side}_{name}{i + 1}"))
                table[f"{finger}_tip"] = Landmark("vertex", ids[f"{s}{name}"])
            self.hand_landmarks[side] = {k: table[k] for k in MEDIAPIPE_HAND}

    def default_shape(self) -> Tensor:
        return torch.zeros(len(self.shape_names))

    def forward(self, shape, pose=None, translation=None, expression=None) -> TemplateOutput:
        from smplx.lbs import batch_rigid_transform, batch_rodrigues, blend_shapes, vertices2joints

        m = self._model
        batch = shape.shape[0]
        v = m.v_template[None] + blend_shapes(shape.float(), m.shapedirs)
        if expression is not None:
            v = v + blend_shapes(expression.float(), m.expr_dirs)
        joints = vertices2joints(m.J_regressor, v)  # [B, 55, 3]
        if pose is None and translation is None:
            eye = torch.eye(4).expand(batch, len(self.bone_names), 4, 4)
            return TemplateOutput(v, v, eye, joints)
        if pose is None:
            pose = shape.new_zeros(batch, len(self.bone_names), 3)
        rot = batch_rodrigues(pose.reshape(-1, 3).float()).reshape(batch, -1, 3, 3)
        posed_joints, transforms = batch_rigid_transform(rot, joints, m.parents)
        if translation is not None:
            transforms = transforms.clone()
            transforms[..., :3, 3] += translation[:, None].float()
            posed_joints = posed_joints + translation[:, None].float()
        blend = torch.einsum("vj,bjkl->bvkl", m.lbs_weights.float(), transforms)
        pose_offsets = ((rot[:, 1:] - torch.eye(3)).reshape(batch, -1) @ m.posedirs).reshape(
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
