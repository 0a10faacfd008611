"""The body-template interface: a skinned human mesh in the project's conventions.

Every template speaks CONVENTIONS.md: metres, +Y up, the body faces +Z, its left hand at +X.
Pose is one axis-angle rotation per bone, expressed in canonical axes; the template says what the
rotation is relative to. Skin weights are sparse (K bones per vertex).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class TemplateOutput:
    vertices: Tensor  # [B, V, 3] posed
    rest_vertices: Tensor  # [B, V, 3] canonical (rest pose) with shape and expression applied
    transforms: Tensor  # [B, J, 4, 4] skinning transforms, canonical rest -> posed
    joints: Tensor  # [B, J, 3] posed bone heads (the joints)


# MediaPipe's 33 body landmarks, in its order (the person's own left / right)
MEDIAPIPE_BODY = (
    "nose", "left_eye_inner", "left_eye", "left_eye_outer", "right_eye_inner", "right_eye",
    "right_eye_outer", "left_ear", "right_ear", "mouth_left", "mouth_right", "left_shoulder",
    "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_pinky",
    "right_pinky", "left_index", "right_index", "left_thumb", "right_thumb", "left_hip",
    "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle", "left_heel",
    "right_heel", "left_foot_index", "right_foot_index",
)  # fmt: skip
# MediaPipe's 21 hand landmarks
MEDIAPIPE_HAND = (
    "wrist", "thumb_cmc", "thumb_mcp", "thumb_ip", "thumb_tip", "index_mcp", "index_pip",
    "index_dip", "index_tip", "middle_mcp", "middle_pip", "middle_dip", "middle_tip", "ring_mcp",
    "ring_pip", "ring_dip", "ring_tip", "pinky_mcp", "pinky_pip", "pinky_dip", "pinky_tip",
)  # fmt: skip

# MediaPipe face-mesh points the fit places the template's face by (refined mesh: 478 points;
# 473 / 468 are the iris centres; left / right are the person's own)
MEDIAPIPE_FACE = {
    "nose_tip": 1, "upper_lip_inner": 13, "lower_lip_inner": 14, "mouth_left": 291,
    "mouth_right": 61, "left_eye": 473, "right_eye": 468,
}  # fmt: skip


@dataclass(frozen=True)
class Landmark:
    """Where a 2D keypoint sits on the template: a bone head (joint) or a vertex."""

    kind: str  # "head" | "vertex"
    index: int


class BodyTemplate(nn.Module):
    """Base class: subclasses fill the buffers and implement `forward`."""

    name: str
    shape_range: tuple[float, float] = (0.0, 1.0)  # bounds of each shape parameter
    bone_names: list[str]
    shape_names: list[str]
    expression_names: list[str]
    faces: Tensor  # [F, 3] long
    skin_ids: Tensor  # [V, K] long
    skin_weights: Tensor  # [V, K]
    body_landmarks: dict[str, Landmark]  # MediaPipe body landmark name -> template location
    hand_landmarks: dict[str, dict[str, Landmark]]  # "left"/"right" -> hand landmark -> location
    face_landmarks: dict[str, Landmark]  # MEDIAPIPE_FACE name -> location; {} when unknown

    @property
    def num_bones(self) -> int:
        return len(self.bone_names)

    @property
    def num_vertices(self) -> int:
        return self.skin_ids.shape[0]

    def default_shape(self) -> Tensor:  # [S]
        raise NotImplementedError

    def forward(
        self,
        shape: Tensor,  # [B, S]
        pose: Tensor | None = None,  # [B, J, 3] axis-angle per bone, canonical axes
        translation: Tensor | None = None,  # [B, 3]
        expression: Tensor | None = None,  # [B, E]
    ) -> TemplateOutput:
        raise NotImplementedError

    def pose_transforms(self, shape: Tensor, pose: Tensor) -> Tensor:
        """Skinning transforms [B, J, 4, 4] of poses [B, J, 3] of one body `shape` [S]: what
        driving needs per frame (`forward(...).transforms`; subclasses may skip the mesh)."""
        return self(shape[None].expand(len(pose), -1), pose=pose).transforms

    @property
    def bone_parents(self) -> list[int]:
        """Per bone, its parent bone's index (-1 for a root); parents come before children."""
        raise NotImplementedError

    def bone_segments(self) -> list[str]:
        """Per bone, the body segment it moves: torso, neck, head, or upperarm, lowerarm, hand,
        upperleg, lowerleg, foot with ".L" / ".R" for the person's left / right."""
        raise NotImplementedError

    def part_masks(self) -> dict[str, Tensor]:
        """Vertex masks [V] bool: at least "face", "lips", "eyelids", "hand_left",
        "hand_right", "head" and "hidden" (inside the body, never seen)."""
        raise NotImplementedError

    def landmarks(self, out: TemplateOutput, table: dict[str, Landmark]) -> Tensor:  # [B, L, 3]
        """3D positions of a landmark table's entries, in its order."""
        cols = []
        for lm in table.values():
            if lm.kind == "head":
                cols.append(out.joints[:, lm.index])
            else:
                cols.append(out.vertices[:, lm.index])
        return torch.stack(cols, dim=1)
