"""The speech rig: an avatar's canonical Gaussians posed by one frame of speech motion.

For a frame, in this order:
1. facial actions: each Gaussian follows the template's blendshapes at its triangle and
   barycentric coordinates, x_c = μ + Σ_e w_e B_e(n);
2. particles: the blended transform of the Gaussian's K particles, P_n = Σ_k w_nk T_m_k, moves
   and turns it (local, high-frequency motion, in canonical space);
3. the Gaussian head's residuals: Δp (canonical), Δs on log-scales (the covariance is rebuilt
   from scales and rotation, so it stays positive definite), Δα on the opacity logit, Δc on the
   colour;
4. linear blend skinning with the frame's template pose (the base pose with the driven bones
   turned by the speech controls);
5. blinks paint the lid over the eye the photo shows open (`deform.eyes`, when `rig.eyes` is set).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import fields

import torch
from torch import Tensor

from render import Gaussians, scene_points
from render.profiling import stage
from render.rotations import det3, quat_to_rotmat, rotmat_to_quat
from render.sh import SH_C0, sh0_to_rgb

from .controls import (
    BLINK_ACTIONS,
    DRIVEN_BONES,
    TEMPLATE_ACTIONS,
    action_index,
    check_template,
    compose_pose,
)
from .eyes import EyeCover
from .hands import HandShaper
from .particles import Particles
from .posing import pose_gaussians
from .skinning import blend_matrix, blend_transforms
from .surface import interpolate

FRAMINGS = {"full": 0.62, "upper": 0.75, "face": 0.8}  # how much of the frame each framing fills
FACE_RADIUS = 0.16  # metres around the head that the face framing frames
RELAXED_DEG = (25.0, 12.0)  # an upper arm further than 25° from the torso's side hangs at 12°
PITCH_DEG = (15.0, 8.0)  # a head tipped further than 15° down or up is brought to 8°


def arm_angles(template, joints: Tensor) -> Tensor:
    """[B, 2] each upper arm's angle from the torso's side, degrees (left, right): between
    shoulder → elbow and the torso's down axis (neck → root), from template joints [B, J, 3]."""
    seg = template.bone_segments()
    first = {
        s: seg.index(s) for s in ("neck", "upperarm.L", "upperarm.R", "lowerarm.L", "lowerarm.R")
    }
    down = torch.nn.functional.normalize(joints[:, 0] - joints[:, first["neck"]], dim=-1)
    out = []
    for side in "LR":
        arm = joints[:, first[f"lowerarm.{side}"]] - joints[:, first[f"upperarm.{side}"]]
        cos = (torch.nn.functional.normalize(arm, dim=-1) * down).sum(-1)
        out.append(torch.rad2deg(torch.acos(cos.clamp(-1, 1))))
    return torch.stack(out, -1)


def relax_arms(template, shape: Tensor, pose: Tensor, steps: int = 4) -> Tensor:
    """`pose` [J, 3] with any upper arm raised more than RELAXED_DEG[0] from the torso's side
    lowered to RELAXED_DEG[1] (a photo that does not show the arms leaves them in the template's
    A-pose; a talking person's arms hang). Each arm turns at its shoulder bone, the forearm and
    hand follow: Gauss-Newton on the shoulder's axis-angle, its Jacobian by finite differences
    in one batched template call per step."""
    most, to = RELAXED_DEG
    seg = template.bone_segments()
    bones = torch.tensor([seg.index(f"upperarm.{side}") for side in "LR"])
    shapes = shape[None].expand(4, -1).float()
    pose, todo, eps = pose.clone().float(), None, 1e-3
    for _ in range(steps):
        trial = pose[None].repeat(4, 1, 1)
        for k in range(3):  # batch k + 1 nudges component k of both shoulders
            trial[k + 1, bones, k] += eps
        with torch.no_grad():
            angles = arm_angles(template, template(shapes, pose=trial).joints)  # [4, 2]
        todo = angles[0] > most if todo is None else todo
        err = torch.where(todo, angles[0] - to, torch.zeros(()))  # [2] degrees
        if err.abs().max() < 0.5:
            break
        jac = (angles[1:] - angles[:1]).T / eps  # [2, 3] degrees per radian
        pose[bones] -= jac * (err / (jac * jac).sum(-1).clamp_min(1e-9))[:, None]
    return pose


def head_pitch(template, shape: Tensor, poses: Tensor) -> Tensor:
    """[B] degrees the head's forward direction (where the rest pose's face looks, +Z) points
    down (positive) or up from the horizontal, for poses [B, J, 3] of one `shape`."""
    head = template.bone_segments().index("head")  # the chain's top: jaw and eyes come after it
    forward = template.pose_transforms(shape, poses)[:, head, :3, 2]
    return torch.rad2deg(torch.asin((-forward[:, 1]).clamp(-1, 1)))


def face_forward(template, shape: Tensor, pose: Tensor, steps: int = 10) -> Tensor:
    """`pose` [J, 3] with a head tipped further than PITCH_DEG[0] down or up brought to
    PITCH_DEG[1]: the pitch (canonical x) components of the neck's and head's rotations are
    scaled down together, the scale found by bisection. A photo's head pose is one moment of
    the person, often looking down past the camera; a talking avatar looks at whoever it talks
    to, and a face seen from above hides its mouth (the lips' gap read 0.3-1.3% of the face's
    height while speaking on such an avatar). The head's turn to a side stays: undoing it
    shows the side of the face the photo did not see."""
    most, to = PITCH_DEG
    seg = template.bone_segments()
    chain = [i for i, s in enumerate(seg) if s == "neck"] + [seg.index("head")]
    pose = pose.float()
    with torch.no_grad():
        if head_pitch(template, shape, pose[None])[0].abs() <= most:
            return pose

        def scaled(k: float) -> Tensor:
            out = pose.clone()
            out[chain, 0] *= k
            return out

        lo, hi = 0.0, 1.0  # scales: lo tips the head by at most `to` (or is 0), hi more
        for _ in range(steps):
            mid = (lo + hi) / 2
            if head_pitch(template, shape, scaled(mid)[None])[0].abs() <= to:
                lo = mid
            else:
                hi = mid
    return scaled(lo)


def expression_basis(template, shape: Tensor) -> Tensor:
    """Per-vertex displacement of each facial action at weight 1 [E, V, 3], for this shape."""
    e = len(template.expression_names)
    with torch.no_grad():
        base = template(shape[None].float()).rest_vertices
        moved = template(shape[None].float().expand(e, -1), expression=torch.eye(e)).rest_vertices
    return moved - base


def _moved(tensors, device: torch.device):
    """A dataclass of tensors with each one on `device`."""
    return type(tensors)(*(getattr(tensors, f.name).to(device) for f in fields(tensors)))


class SpeechRig:
    def __init__(
        self,
        template,
        shape: Tensor,  # [S]
        base_pose: Tensor,  # [J, 3] the pose speech motion is added to
        gaussians: Gaussians,  # canonical
        face_ids: Tensor,  # [N]
        bary: Tensor,  # [N, 3]
        bone_ids: Tensor,  # [N, K]
        bone_weights: Tensor,  # [N, K]
        particles: Particles,
        parts: Tensor | None = None,  # [N] part codes (reconstruct.canonical.PART_CODES)
    ):
        check_template(template)
        self.template = template
        self.shape = shape.float()
        self.base_pose = base_pose.float()
        self.gaussians = gaussians
        self.bone_ids, self.bone_weights = bone_ids, bone_weights
        self.particles = particles
        # sparse weight matrices: posing without gradients multiplies instead of gathering
        self.bone_matrix = blend_matrix(bone_ids, bone_weights, template.num_bones)
        self.particle_matrix = particles.matrix()
        self.use_kernel = True  # CPU without gradients: pose in one numba pass (deform.posing)
        self._rest_rotation: tuple[Tensor, int, Tensor] | None = None
        self.parts = torch.zeros(len(gaussians), dtype=torch.uint8) if parts is None else parts
        self.driven = torch.tensor([template.bone_names.index(b) for b in DRIVEN_BONES])
        self.template_ids = action_index(template, TEMPLATE_ACTIONS)
        self.blink_ids = action_index(template, BLINK_ACTIONS)
        vert_basis = expression_basis(template, self.shape)  # [E, V, 3]
        per_gauss = interpolate(
            vert_basis.permute(1, 0, 2).flatten(1), template.faces, face_ids, bary
        )
        per_gauss = per_gauss.unflatten(1, (-1, 3))  # [N, E, 3]
        self.moving = torch.nonzero(per_gauss.abs().amax((1, 2)) > 1e-6).flatten()  # [n]
        with torch.no_grad():  # where each Gaussian sits on the template (its lip basis reads it)
            rest = template(self.shape[None]).rest_vertices[0]
        self.anchors = interpolate(rest, template.faces, face_ids, bary)  # [N, 3]
        self.basis = per_gauss[self.moving].permute(1, 0, 2).contiguous()  # [E, n, 3]
        self.eyes: EyeCover | None = None  # what blinks paint over the open eye (deform.eyes)
        arm_ids = [[DRIVEN_BONES.index(f"{b}.{s}") for b in ("lowerarm01", "wrist")] for s in "LR"]
        self.hands = HandShaper(template, self.shape, torch.tensor(arm_ids))
        self.finger_ids = torch.tensor([template.bone_names.index(n) for n in self.hands.names])

    @classmethod
    def from_avatar(cls, template, shape: Tensor, photo_pose: Tensor, gaussians: Gaussians,
                    binding, particles: Particles) -> SpeechRig:  # fmt: skip
        """The one way to rig an avatar's files (drive, finetune, eval, bench): its photo pose
        without the root (upright, facing +Z), raised arms relaxed (`relax_arms`), a head
        looking far down or up brought toward level (`face_forward`), its canonical Gaussians
        bound as `binding` (reconstruct.canonical.Binding) says."""
        base = photo_pose.clone()
        base[0] = 0
        base = face_forward(template, shape, relax_arms(template, shape, base))
        b = binding
        return cls(template, shape, base, gaussians, b.face_ids, b.bary, b.bone_ids,
                   b.bone_weights, particles, b.parts)  # fmt: skip

    def to(self, device: torch.device | str) -> SpeechRig:
        """Pose and paint on `device` (in place; returns self). The body template stays on
        the CPU: `transforms` evaluates it there and moves its [T, J, 4, 4] result (a few KB
        per frame); everything per Gaussian (the canonical Gaussians, skinning and particle
        weights, expression basis, eye cover) moves."""
        device = torch.device(device)
        self.gaussians = self.gaussians.to(device)
        self.bone_ids, self.bone_weights = self.bone_ids.to(device), self.bone_weights.to(device)
        self.bone_matrix, self.particle_matrix = (self.bone_matrix.to(device),
                                                  self.particle_matrix.to(device))  # fmt: skip
        self.particles = _moved(self.particles, device)
        self.parts, self.moving, self.basis, self.anchors = (
            t.to(device) for t in (self.parts, self.moving, self.basis, self.anchors)
        )
        if self.eyes is not None:
            self.eyes = _moved(self.eyes, device)
        self._rest_rotation = None
        return self

    @property
    def device(self) -> torch.device:
        return self.gaussians.means.device

    def expression_offsets(self, actions: Tensor) -> Tensor:  # [T, E] -> [T, N, 3]
        out = actions.new_zeros(actions.shape[0], len(self.gaussians), 3)
        out[:, self.moving] = torch.einsum("te,enc->tnc", actions, self.basis)
        return out

    def transforms(self, bones: Tensor, fingers: Tensor | None = None,
                   eyes: Tensor | None = None) -> Tensor:  # fmt: skip
        """[T, B, 3] deltas of DRIVEN_BONES (and [T, 30, 3] finger rotations from
        `deform.hands`, replacing the photo's finger pose; [T, 2, 3] deltas of the eye bones,
        left then right: gaze) -> [T, J, 4, 4]."""
        ids, deltas = self.driven, bones.float().cpu()  # the template runs on the CPU
        if eyes is not None:
            eye_ids = torch.tensor([self.template.bone_names.index(f"eye.{s}") for s in "LR"])
            ids, deltas = torch.cat([ids, eye_ids]), torch.cat([deltas, eyes.to(deltas)], 1)
        pose = compose_pose(self.base_pose, ids, deltas)
        if fingers is not None:
            pose[:, self.finger_ids] = fingers.to(pose)
        return self.template.pose_transforms(self.shape, pose).to(self.device)

    def tokens(self, model):
        """The deformer's per-avatar tokens (`SpeechDeformer.avatar_tokens`) for these Gaussians
        and particles; differentiable in the Gaussians."""
        g, p = self.gaussians, self.particles
        rgb = (
            sh0_to_rgb(g.sh[:, 0]).clamp(0, 1)
            if g.sh is not None
            else g.means.new_full((len(g), 3), 0.5)
        )
        return model.avatar_tokens(g.means, self.parts, rgb, p.rest, p.parts, p.ids, p.weights,
                                   self.anchors)  # fmt: skip

    def posed_frames(self, motion, blink: Tensor, fingers: Tensor | None = None,
                     eyes: Tensor | None = None,
                     root: Tensor | None = None) -> Iterator[Gaussians]:  # fmt: skip
        """The avatar posed by each frame of a deformer's `Motion` (bones, template actions,
        particle transforms, residuals), with blink weights [T] (`controls.blinks`), finger
        rotations [T, 30, 3] (`deform.hands`; None keeps the photo's hands) and eye-bone
        deltas [T, 2, 3] (gaze; None: the photo's). `root` [4, 4]: a rigid transform from the
        body frame to a scene's, folded into the skinning (free, where moving every posed
        Gaussian afterwards is not)."""
        with stage("rig"):
            transforms = self.transforms(motion.bones, fingers, eyes)
            if root is not None:
                transforms = root.to(transforms) @ transforms
            actions = motion.actions.new_zeros(len(blink), len(self.template.expression_names))
            actions[:, self.template_ids] = motion.actions
            actions[:, self.blink_ids] = blink[:, None].to(actions)
            actions, motion = actions.to(self.device), _moved(motion, self.device)
        for i in range(len(blink)):
            with stage("rig"):
                posed = self.pose(actions[i], transforms[i], motion.particles[i], motion.offsets[i],
                                  motion.log_scales[i], motion.opacity[i], motion.color[i])  # fmt: skip
            yield posed

    def rest_rotations(self) -> Tensor:  # [N, 3, 3]
        """The canonical Gaussians' rotation matrices, computed once while they do not change
        (and every time where gradients flow to them)."""
        q = self.gaussians.quats
        if torch.is_grad_enabled() and q.requires_grad:
            return quat_to_rotmat(q)
        cached = self._rest_rotation
        if cached is None or cached[0] is not q or cached[1] != q._version:
            cached = self._rest_rotation = (q, q._version, quat_to_rotmat(q))
        return cached[2]

    def still(self) -> Gaussians:
        """The base pose with no speech motion (no facial action, no particle motion)."""
        transforms = self.transforms(torch.zeros(1, self.driven.numel(), 3))[0]
        return self.pose(torch.zeros(len(self.template.expression_names)), transforms)

    def framing_points(self, framing: str) -> Tensor:  # [2, 3]
        """What a camera with this framing (`FRAMINGS`: full, upper or face) frames: the robust
        bounding box of the Gaussians in the base pose, all, above the hips or near the head."""
        if framing not in FRAMINGS:
            raise ValueError(f"framing {framing!r}: use {', '.join(FRAMINGS)}")
        posed = self.still()
        if framing == "full":
            return scene_points(posed)
        joints = self.template(self.shape[None], pose=self.base_pose[None]).joints[0]
        if framing == "upper":
            hip = joints[self.template.bone_names.index("upperleg01.L"), 1]
            keep = posed.means[:, 1] > hip
        else:  # face
            head = joints[self.template.bone_names.index("head")]
            keep = (posed.means - head.to(posed.means)).norm(dim=-1) < FACE_RADIUS
        return scene_points(posed[keep]) if keep.sum() > 16 else scene_points(posed)

    def pose(
        self,
        actions: Tensor,  # [E] facial action weights
        transforms: Tensor,  # [J, 4, 4] skinning transforms of the frame
        particle_transforms: Tensor | None = None,  # [M, 4, 4]
        offsets: Tensor | None = None,  # [N, 3] Δp
        log_scales: Tensor | None = None,  # [N, 3] Δs
        opacity: Tensor | None = None,  # [N] Δα
        color: Tensor | None = None,  # [N, 3] Δc
    ) -> Gaussians:
        g = self.gaussians
        means = g.means + self.expression_offsets(actions[None].to(g.means))[0]
        inputs = (means, g.quats, transforms, particle_transforms, offsets)
        if self.use_kernel and g.means.device.type == "cpu" and g.means.dtype == torch.float32 \
                and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                         for t in inputs)):  # fmt: skip
            p = self.particles
            means, quats = pose_gaussians(means, self.rest_rotations(), self.bone_ids,
                                          self.bone_weights, transforms, p.ids, p.weights,
                                          particle_transforms, offsets)  # fmt: skip
        else:
            lbs = blend_transforms(self.bone_ids, self.bone_weights, transforms[None],
                                   self.bone_matrix)[0]  # [N,4,4]  # fmt: skip
            lin = lbs[:, :3, :3]
            if particle_transforms is not None:
                moved, p = self.particles.move(means, particle_transforms[None],
                                               matrix=self.particle_matrix)  # fmt: skip
                means, lin = moved[0], lin @ p[0, :, :3, :3]
            if offsets is not None:
                means = means + offsets
            means = (lbs[:, :3, :3] @ means[..., None])[..., 0] + lbs[:, :3, 3]
            lin = lin / det3(lin).clamp_min(1e-12).pow(1 / 3)[:, None, None]
            quats = rotmat_to_quat(lin @ self.rest_rotations())
        out = g.replace(means=means, quats=quats)
        if log_scales is not None:
            out = out.replace(log_scales=g.log_scales + log_scales)
        if opacity is not None:
            out = out.replace(opacity_logits=g.opacity_logits + opacity)
        if color is not None and g.sh is not None:
            sh = g.sh.clone()
            sh[:, 0] = sh[:, 0] + color / SH_C0
            out = out.replace(sh=sh)
        if self.eyes is not None:
            out = self.eyes.paint(out, float(actions[self.blink_ids].detach().mean()))
        return out
