"""Anny baked at one body shape: everything an avatar's template answers, from one safetensors
file, without importing Anny.

An avatar's body shape is fixed once `create` has fitted it, and driving only poses that one
body. Importing Anny costs about a second on every run (it pulls in roma, which imports
`torch._dynamo`), more than a tenth of a 10 s drive. So the first time an avatar's template is
asked for (`Avatar.body_template()`, which `create` already calls), Anny is evaluated at that
shape and its rest mesh, expression blendshapes, rest skeleton, skinning weights, part masks and
landmark tables are written to the Anny cache folder; later runs read that file (4 MB) and
pose it here: Anny's "local-ref" forward kinematics (`forward_kinematics`) and plain LBS. The
result equals `AnnyTemplate`'s to float rounding (tested).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import os
from pathlib import Path

import torch
from torch import Tensor

from ..skinning import apply_transforms, blend_transforms
from .anny import TO_CANONICAL, AnnyBase, anny_cache_dir
from .base import Landmark, TemplateOutput

log = logging.getLogger(__name__)

BAKE_VERSION = 2  # bump when what a bake holds or how it is computed changes
EXPRESSION_FLOOR = 1e-6  # metres: Anny's float noise moves 12k vertices, its actions 3.5k
SHAPE_TOLERANCE = 1e-5  # a baked template answers only for its own shape
OWN_TENSORS = ("shape", "rest_vertices", "rest_joints", "rest_poses", "reference",
               "expression_ids", "expression_deltas")  # fmt: skip  # the rest: `_shared`


def forward_kinematics(
    parents: list[int], rest: Tensor, reference: Tensor, delta: Tensor
) -> tuple[Tensor, Tensor]:
    """Anny's "local-ref" forward kinematics (anny.utils.kinematics.forward_kinematic), in Anny's
    axes. `rest` [J, 4, 4] are the rest bone poses P_c = [R_c | h_c], `reference` [J, 3, 3] the
    reference orientations U_c, `delta` [B, J, 4, 4] the per-bone rotations D_c in world-aligned
    axes (and the root's translation d_0). With p the parent of c:

        W_0 = [U_0^T D_0 U_0 | U_0^T d_0],   W_c = W_p [U_p^T D_c U_c | U_p^T q_c],
        q_c = A_p (h_c - h_p),  A_p = U_p R_p^T (A_0 = I),   T_c = W_c P_c^-1.

    Returns the skinning transforms T [B, J, 4, 4] and the posed bone poses W [B, J, 4, 4]."""
    R, h = rest[:, :3, :3], rest[:, :3, 3]
    D, d = delta[..., :3, :3], delta[..., :3, 3]
    par = torch.tensor([max(p, 0) for p in parents], device=rest.device)
    A = reference @ R.transpose(-1, -2)
    A[0] = torch.eye(3, dtype=A.dtype, device=A.device)
    q = (A[par] @ (h - h[par])[..., None])[..., 0]  # [J, 3]; the root's is unused
    M = D @ reference  # [B, J, 3, 3]
    Upt = reference[par].transpose(-1, -2)
    K = torch.zeros_like(delta)
    K[..., :3, :3] = Upt @ M
    K[..., :3, 3] = (Upt @ (d + q)[..., None])[..., 0]
    K[..., 3, 3] = 1.0
    U0t = reference[0].T
    K[:, 0, :3, :3] = U0t @ M[:, 0]
    K[:, 0, :3, 3] = d[:, 0] @ U0t.T
    W = K.clone()
    for ids in _levels(tuple(parents))[1:]:  # parents before children: a product per depth
        ids = ids.to(rest.device)
        W[:, ids] = W[:, par[ids]] @ K[:, ids]
    rot = W[..., :3, :3] @ R.transpose(-1, -2)
    T = torch.zeros_like(W)
    T[..., :3, :3] = rot
    T[..., :3, 3] = W[..., :3, 3] - (rot @ h[..., None])[..., 0]
    T[..., 3, 3] = 1.0
    return T, W


@functools.lru_cache(maxsize=4)
def _levels(parents: tuple[int, ...]) -> list[Tensor]:
    """Bone indices by depth in the chain (the root first)."""
    depth: list[int] = []
    for p in parents:
        depth.append(0 if p < 0 else depth[p] + 1)
    return [
        torch.tensor([j for j, dj in enumerate(depth) if dj == k]) for k in range(max(depth) + 1)
    ]


class BakedAnny(AnnyBase):
    """Anny at one shape (`shape`): from a bake's tensors and metadata (`load`) or a live
    `AnnyTemplate` (`from_template`)."""

    def __init__(self, tensors: dict[str, Tensor], meta: dict) -> None:
        super().__init__()
        self.bone_names = list(meta["bone_names"])
        self.shape_names = list(meta["shape_names"])
        self.expression_names = list(meta["expression_names"])
        self._parents = [int(p) for p in meta["parents"]]
        self.body_landmarks = _landmarks(meta["body_landmarks"])
        self.hand_landmarks = {side: _landmarks(t) for side, t in meta["hand_landmarks"].items()}
        self.face_landmarks = _landmarks(meta["face_landmarks"])
        self._masks = {
            k[len("mask.") :]: v.bool() for k, v in tensors.items() if k.startswith("mask.")
        }
        self.shape = tensors["shape"].float()
        self.rest_vertices = tensors["rest_vertices"].float()  # canonical, [V, 3]
        self.rest_joints = tensors["rest_joints"].float()  # canonical, [J, 3]
        self.rest_poses = tensors["rest_poses"].float()  # Anny's axes, [J, 4, 4]
        self.reference = tensors["reference"].float()  # [J, 3, 3]
        self.expression_ids = tensors["expression_ids"].long()  # vertices any expression moves
        self.expression_deltas = tensors["expression_deltas"].float()  # canonical, [E, K, 3]
        self.register_buffer("faces", tensors["faces"].long(), persistent=False)
        self.register_buffer("skin_ids", tensors["skin_ids"].long(), persistent=False)
        self.register_buffer("skin_weights", tensors["skin_weights"].float(), persistent=False)
        n, j = len(self.rest_vertices), len(self.bone_names)
        if (self.skin_ids.shape[0] != n or self.rest_poses.shape != (j, 4, 4)
                or self.expression_deltas.shape[0] != len(self.expression_names)):  # fmt: skip
            raise ValueError("inconsistent tensor shapes")

    # ---- baking ------------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def from_template(cls, live, shape: Tensor) -> BakedAnny:
        """Evaluate a live `AnnyTemplate` at `shape` [S]."""
        shape = shape.detach().float()
        rest = live(shape[None])
        e = len(live.expression_names)
        moved = live(shape[None].expand(e, -1), expression=torch.eye(e)).rest_vertices
        deltas = moved - rest.rest_vertices
        ids = torch.nonzero(deltas.abs().amax(dim=(0, 2)) > EXPRESSION_FLOOR).flatten()
        tensors, meta = _shared(live)
        tensors.update({
            "shape": shape, "rest_vertices": rest.rest_vertices[0], "rest_joints": rest.joints[0],
            "rest_poses": live._rest_skeleton(shape)[0],
            "reference": live._anny.reference_bone_orientations.float(),
            "expression_ids": ids, "expression_deltas": deltas[:, ids],
        })  # fmt: skip
        return cls({k: v.detach().contiguous() for k, v in tensors.items()}, meta)

    def save(self, path: Path) -> None:
        """Write atomically (a temporary name, then a rename)."""
        from safetensors.torch import save_file

        tensors, meta = _shared(self)
        tensors.update({k: getattr(self, k) for k in OWN_TENSORS})
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"bake": json.dumps(meta)})  # fmt: skip
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> BakedAnny:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["bake"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
        return cls(tensors, meta)

    # ---- posing ------------------------------------------------------------------------------
    def _check(self, shape: Tensor) -> None:
        if (shape.detach().float().cpu() - self.shape).abs().max() > SHAPE_TOLERANCE:
            raise ValueError("a baked Anny template poses only the body shape it was baked at")

    def forward(self, shape, pose=None, translation=None, expression=None) -> TemplateOutput:
        self._check(shape)
        batch, dev = shape.shape[0], shape.device
        rest = self.rest_vertices.to(dev).expand(batch, -1, -1)
        if expression is not None:
            moved = torch.einsum("be,ekc->bkc", expression.float(), self.expression_deltas.to(dev))
            rest = rest.index_add(1, self.expression_ids.to(dev), moved)
        if pose is None and translation is None:
            eye = torch.eye(4, dtype=rest.dtype, device=dev)
            transforms = eye.expand(batch, self.num_bones, 4, 4)
            return TemplateOutput(
                rest, rest, transforms, self.rest_joints.to(dev).expand(batch, -1, -1)
            )
        if pose is None:
            pose = rest.new_zeros(batch, self.num_bones, 3)
        transforms, poses = self._posed(
            pose.float(), None if translation is None else translation.float()
        )
        vertices = apply_transforms(
            rest, blend_transforms(self.skin_ids, self.skin_weights, transforms)
        )
        heads = poses[..., :3, 3] @ TO_CANONICAL.to(poses).T
        return TemplateOutput(vertices, rest, transforms, heads)

    def pose_transforms(self, shape: Tensor, pose: Tensor) -> Tensor:
        self._check(shape)
        return self._posed(pose.float(), None)[0]

    def _posed(self, pose: Tensor, translation: Tensor | None) -> tuple[Tensor, Tensor]:
        """Canonical skinning transforms and Anny-axes bone poses, [B, J, 4, 4] each."""
        dev = pose.device
        transforms, poses = forward_kinematics(
            self._parents, self.rest_poses.to(dev), self.reference.to(dev),
            self._to_anny_pose(pose, translation),
        )  # fmt: skip
        return self._canonical(transforms), poses


def _shared(t: AnnyBase) -> tuple[dict[str, Tensor], dict]:
    """What a live and a baked template hold alike: topology, skinning weights and part masks
    (tensors), names, parents and landmark tables (JSON)."""
    tensors = {"faces": t.faces, "skin_ids": t.skin_ids, "skin_weights": t.skin_weights,
               **{f"mask.{k}": v.to(torch.uint8) for k, v in t.part_masks().items()}}  # fmt: skip
    meta = {
        "bone_names": t.bone_names, "shape_names": t.shape_names,
        "expression_names": t.expression_names, "parents": t.bone_parents,
        "body_landmarks": _table(t.body_landmarks),
        "hand_landmarks": {side: _table(h) for side, h in t.hand_landmarks.items()},
        "face_landmarks": _table(t.face_landmarks),
    }  # fmt: skip
    return tensors, meta


def _table(table: dict[str, Landmark]) -> dict[str, list]:
    return {name: [lm.kind, lm.index] for name, lm in table.items()}


def _landmarks(table: dict[str, list]) -> dict[str, Landmark]:
    return {name: Landmark(kind, int(index)) for name, (kind, index) in table.items()}


def bake_path(shape: Tensor) -> Path:
    """Where Anny baked at `shape` is cached: keyed by the shape's float32 bytes, Anny's
    version and `BAKE_VERSION`."""
    key = hashlib.sha256(shape.detach().float().cpu().numpy().tobytes())
    key.update(f"anny {importlib.metadata.version('anny')} bake {BAKE_VERSION}".encode())
    return anny_cache_dir() / "baked" / f"{key.hexdigest()[:20]}.safetensors"


def baked_anny(shape: Tensor) -> BakedAnny:
    """Anny at `shape` [S]: read from the cache, or evaluated (importing Anny) and cached. A
    cache file that does not read is baked again; a cache folder that cannot be written only
    costs the next run the bake again."""
    from safetensors import SafetensorError

    path = bake_path(shape)
    if path.exists():
        try:
            baked = BakedAnny.load(path)
            baked._check(shape)  # the file is the shape it is named after
            return baked
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
            log.warning("%s does not read (%s): baking the template again", path, exc)
    from .anny import AnnyTemplate

    baked = BakedAnny.from_template(AnnyTemplate(), shape)
    try:
        baked.save(path)
    except OSError as exc:
        log.warning("could not cache the baked template in %s: %s", path, exc)
    return baked
