"""A stand-in SMPL-X model file for tests (never real SMPL-X data): a humanoid made of ellipsoids
in SMPL-X's npz layout, with smplx's landmark vertex ids (nose, ears, toes, heels, finger tips)
placed where they belong, so the adapter and fitting run end to end without licensed files."""

from __future__ import annotations

import numpy as np
from smplx.joint_names import JOINT_NAMES
from smplx.vertex_ids import vertex_ids

NUM_VERTICES = 10475  # smplx indexes fixed vertex ids up to 9929
PARENTS = [-1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19, 15, 15, 15]
PARENTS += [20, 25, 26, 20, 28, 29, 20, 31, 32, 20, 34, 35, 20, 37, 38]  # left hand
PARENTS += [21, 40, 41, 21, 43, 44, 21, 46, 47, 21, 49, 50, 21, 52, 53]  # right hand

# (joint that skins it, centre, radii) in metres, +Y up, facing +Z
PARTS = [("pelvis", (0, 0.0, 0), (0.17, 0.11, 0.11)), ("spine1", (0, 0.14, 0), (0.16, 0.08, 0.1)),
         ("spine2", (0, 0.27, 0), (0.17, 0.09, 0.11)), ("spine3", (0, 0.41, 0), (0.19, 0.1, 0.12)),
         ("neck", (0, 0.56, 0), (0.05, 0.06, 0.05)), ("head", (0, 0.7, 0.01), (0.085, 0.11, 0.1))]  # fmt: skip
for s, x in (("left", 1.0), ("right", -1.0)):
    PARTS += [(f"{s}_hip", (0.09 * x, -0.22, 0), (0.075, 0.2, 0.08)),
              (f"{s}_knee", (0.09 * x, -0.62, 0), (0.055, 0.2, 0.06)),
              (f"{s}_ankle", (0.09 * x, -0.86, 0.05), (0.045, 0.04, 0.11)),
              (f"{s}_shoulder", (0.27 * x, 0.38, 0), (0.12, 0.045, 0.045)),
              (f"{s}_elbow", (0.5 * x, 0.38, 0), (0.12, 0.04, 0.04)),
              (f"{s}_wrist", (0.68 * x, 0.38, 0), (0.07, 0.02, 0.04))]  # fmt: skip
JOINT_POS = {"pelvis": (0, 0, 0), "left_hip": (0.09, -0.05, 0), "right_hip": (-0.09, -0.05, 0),
             "spine1": (0, 0.1, 0), "left_knee": (0.09, -0.42, 0), "right_knee": (-0.09, -0.42, 0),
             "spine2": (0, 0.22, 0), "left_ankle": (0.09, -0.82, 0), "right_ankle": (-0.09, -0.82, 0),
             "spine3": (0, 0.34, 0), "left_foot": (0.09, -0.88, 0.1), "right_foot": (-0.09, -0.88, 0.1),
             "neck": (0, 0.52, 0), "left_collar": (0.08, 0.46, 0), "right_collar": (-0.08, 0.46, 0),
             "head": (0, 0.62, 0), "left_shoulder": (0.17, 0.4, 0), "right_shoulder": (-0.17, 0.4, 0),
             "left_elbow": (0.39, 0.38, 0), "right_elbow": (-0.39, 0.38, 0),
             "left_wrist": (0.61, 0.38, 0), "right_wrist": (-0.61, 0.38, 0), "jaw": (0, 0.64, 0.04),
             "left_eye_smplhf": (0.032, 0.72, 0.09), "right_eye_smplhf": (-0.032, 0.72, 0.09)}  # fmt: skip


def _ellipsoid(centre, radii, nu=24, nv=16):
    u = np.linspace(0, 2 * np.pi, nu, endpoint=False)
    v = np.linspace(0.15, np.pi - 0.15, nv)
    uu, vv = np.meshgrid(u, v)
    pts = np.stack([np.sin(vv) * np.sin(uu), np.cos(vv), np.sin(vv) * np.cos(uu)], -1).reshape(
        -1, 3
    )
    faces = []
    for i in range(nv - 1):
        for j in range(nu):
            a, b = i * nu + j, i * nu + (j + 1) % nu
            c, d = a + nu, b + nu
            faces += [(a, c, b), (b, c, d)]
    return pts * np.asarray(radii) + np.asarray(centre), np.asarray(faces)


def make_standin(path) -> None:
    verts, faces, owner = [], [], []
    for joint, centre, radii in PARTS:
        v, f = _ellipsoid(centre, radii)
        faces.append(f + sum(len(x) for x in verts))
        verts.append(v)
        owner += [JOINT_NAMES.index(joint)] * len(v)
    v = np.concatenate(verts)
    f = np.concatenate(faces)
    owner = np.array(owner)
    real = len(v)
    assert real < NUM_VERTICES
    # landmark vertices: pick the right real vertex for each smplx id, then permute
    ids = vertex_ids["smplx"]
    head = np.nonzero(owner == JOINT_NAMES.index("head"))[0]
    want = {"nose": head[np.argmax(v[head, 2])]}
    for side, x, s in (("left", 1.0, "l"), ("right", -1.0, "r")):
        side_head = head[(v[head, 0] * x) > 0]
        want[f"{s}ear"] = side_head[np.argmax(np.abs(v[side_head, 0]))]
        want[f"{s}eye"] = side_head[
            np.argmin(np.linalg.norm(v[side_head] - JOINT_POS[f"{side}_eye_smplhf"], axis=1))
        ]
        hand = np.nonzero(owner == JOINT_NAMES.index(f"{side}_wrist"))[0]
        tips = hand[np.argsort(-np.abs(v[hand, 0]))[:40:8]]
        for name, vid in zip(("thumb", "index", "middle", "ring", "pinky"), tips, strict=True):
            want[f"{s}{name}"] = vid
        foot = np.nonzero(owner == JOINT_NAMES.index(f"{side}_ankle"))[0]
        S = "L" if side == "left" else "R"
        want[f"{S}BigToe"] = foot[np.argmax(v[foot, 2])]
        want[f"{S}SmallToe"] = foot[np.argsort(-v[foot, 2])[5]]
        want[f"{S}Heel"] = foot[np.argmin(v[foot, 2])]
    order = np.full(NUM_VERTICES, -1)
    for name, vid in want.items():
        order[ids[name]] = vid
    rest = [i for i in range(real) if i not in set(want.values())]
    free = np.nonzero(order < 0)[0]
    order[free[: len(rest)]] = rest
    order[free[len(rest) :]] = real  # padding: copies of a spare vertex, in no face
    v = np.concatenate([v, v[:1]])
    owner = np.concatenate([owner, owner[:1]])
    inverse = np.zeros(real + 1, int)
    inverse[order[order < real]] = np.nonzero(order < real)[0]
    v_template, owner = v[order], owner[order]
    faces = inverse[f]
    weights = np.zeros((NUM_VERTICES, 55))
    weights[np.arange(NUM_VERTICES), owner] = 1.0
    joints = np.array([JOINT_POS.get(n, None) or _finger_pos(n) for n in JOINT_NAMES[:55]])
    regressor = np.zeros((55, NUM_VERTICES))
    for j, p in enumerate(joints):
        near = np.argsort(np.linalg.norm(v_template - p, axis=1))[:8]
        regressor[j, near] = 1 / 8
    shapedirs = np.zeros((NUM_VERTICES, 3, 20))
    shapedirs[:, :, 0] = 0.05 * v_template  # overall size
    shapedirs[:, 0, 1] = 0.05 * v_template[:, 0]  # width
    jaw = (
        (owner == JOINT_NAMES.index("head")) & (v_template[:, 1] < 0.68) & (v_template[:, 2] > 0.04)
    )
    shapedirs[jaw, 1, 10] = -0.01  # expression 0 opens the mouth
    np.savez(path, v_template=v_template, f=faces.astype(np.int64), J_regressor=regressor,
             kintree_table=np.array([[p if p >= 0 else 4294967295 for p in PARENTS], range(55)]),
             weights=weights, shapedirs=shapedirs, posedirs=np.zeros((NUM_VERTICES, 3, 486)),
             hands_componentsl=np.eye(45), hands_componentsr=np.eye(45), hands_meanl=np.zeros(45),
             hands_meanr=np.zeros(45), lmk_faces_idx=np.zeros(51, np.int64),
             lmk_bary_coords=np.full((51, 3), 1 / 3))  # fmt: skip


def _finger_pos(name: str):
    side = 1.0 if name.startswith("left") else -1.0
    finger = name.split("_")[1].rstrip("123")
    k = int(name[-1])
    lateral = {"thumb": 0.03, "index": 0.015, "middle": 0.0, "ring": -0.015, "pinky": -0.03}[finger]
    return (side * (0.64 + 0.025 * k), 0.38, lateral)
