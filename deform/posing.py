"""One frame's posing of every Gaussian in one parallel numba pass (CPU, no gradients).

`SpeechRig.pose` writes the steps as torch operations over [N, 4, 4] and [N, 3, 3] tensors: a
dozen passes over memory per frame, with tiny batched matrix products that a CPU runs poorly.
Driving needs no gradients, so on a CPU this kernel does the same per Gaussian n, in registers:

    P_n = Σ_k v_nk T_particle[p_nk]        (particle blend; identity without particles)
    L_n = Σ_k w_nk T_bone[b_nk]            (linear blend skinning)
    μ'  = L_n (P_n μ + Δp_n)
    R'  = normalise(L_n P_n) R_n           (scaled by det^(-1/3), so only the turn remains)
    q'  = quaternion of R' (Shepperd, w >= 0)

The same maths and the same formula choices as `deform.rig.SpeechRig.pose` and
`render.rotations.rotmat_to_quat`, so the two agree to float rounding (tested).
"""

from __future__ import annotations

import numba as nb
import numpy as np
import torch
from torch import Tensor


@nb.njit(fastmath=True, cache=True)
def _blend(ids, weights, transforms, i):
    """Σ_k w_ik T[ids_ik], the top 3x4 of it, as 12 scalars (row-major); numba keeps tuples in
    registers where arrays would be allocated per Gaussian."""
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = a8 = a9 = a10 = a11 = np.float32(0.0)
    for k in range(ids.shape[1]):
        w, t = weights[i, k], transforms[ids[i, k]]
        a0 += w * t[0, 0]
        a1 += w * t[0, 1]
        a2 += w * t[0, 2]
        a3 += w * t[0, 3]
        a4 += w * t[1, 0]
        a5 += w * t[1, 1]
        a6 += w * t[1, 2]
        a7 += w * t[1, 3]
        a8 += w * t[2, 0]
        a9 += w * t[2, 1]
        a10 += w * t[2, 2]
        a11 += w * t[2, 3]
    return (a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11)


@nb.njit(parallel=True, fastmath=True, cache=True)
def _pose(means, offsets, bone_ids, bone_w, bones, part_ids, part_w, parts, rest, out_means,
          out_quats):  # fmt: skip
    for i in nb.prange(means.shape[0]):
        if parts.shape[0] == 0:  # no particle motion: P is the identity
            p = (np.float32(1.0), np.float32(0.0), np.float32(0.0), np.float32(0.0),
                 np.float32(0.0), np.float32(1.0), np.float32(0.0), np.float32(0.0),
                 np.float32(0.0), np.float32(0.0), np.float32(1.0), np.float32(0.0))  # fmt: skip
        else:
            p = _blend(part_ids, part_w, parts, i)
        b = _blend(bone_ids, bone_w, bones, i)
        x, y, z = means[i, 0], means[i, 1], means[i, 2]
        px = p[0] * x + p[1] * y + p[2] * z + p[3] + offsets[i, 0]
        py = p[4] * x + p[5] * y + p[6] * z + p[7] + offsets[i, 1]
        pz = p[8] * x + p[9] * y + p[10] * z + p[11] + offsets[i, 2]
        out_means[i, 0] = b[0] * px + b[1] * py + b[2] * pz + b[3]
        out_means[i, 1] = b[4] * px + b[5] * py + b[6] * pz + b[7]
        out_means[i, 2] = b[8] * px + b[9] * py + b[10] * pz + b[11]
        # M = L P (3x3), normalised by the cube root of its determinant, then R' = M R_rest
        m0 = b[0] * p[0] + b[1] * p[4] + b[2] * p[8]
        m1 = b[0] * p[1] + b[1] * p[5] + b[2] * p[9]
        m2 = b[0] * p[2] + b[1] * p[6] + b[2] * p[10]
        m3 = b[4] * p[0] + b[5] * p[4] + b[6] * p[8]
        m4 = b[4] * p[1] + b[5] * p[5] + b[6] * p[9]
        m5 = b[4] * p[2] + b[5] * p[6] + b[6] * p[10]
        m6 = b[8] * p[0] + b[9] * p[4] + b[10] * p[8]
        m7 = b[8] * p[1] + b[9] * p[5] + b[10] * p[9]
        m8 = b[8] * p[2] + b[9] * p[6] + b[10] * p[10]
        det = m0 * (m4 * m8 - m5 * m7) - m1 * (m3 * m8 - m5 * m6) + m2 * (m3 * m7 - m4 * m6)
        s = np.float32(1.0) / max(det, np.float32(1e-12)) ** np.float32(1.0 / 3.0)
        r = rest[i]
        _quat((s * (m0 * r[0, 0] + m1 * r[1, 0] + m2 * r[2, 0]),
               s * (m0 * r[0, 1] + m1 * r[1, 1] + m2 * r[2, 1]),
               s * (m0 * r[0, 2] + m1 * r[1, 2] + m2 * r[2, 2]),
               s * (m3 * r[0, 0] + m4 * r[1, 0] + m5 * r[2, 0]),
               s * (m3 * r[0, 1] + m4 * r[1, 1] + m5 * r[2, 1]),
               s * (m3 * r[0, 2] + m4 * r[1, 2] + m5 * r[2, 2]),
               s * (m6 * r[0, 0] + m7 * r[1, 0] + m8 * r[2, 0]),
               s * (m6 * r[0, 1] + m7 * r[1, 1] + m8 * r[2, 1]),
               s * (m6 * r[0, 2] + m7 * r[1, 2] + m8 * r[2, 2])), out_quats, i)  # fmt: skip


@nb.njit(fastmath=True, cache=True)
def _quat(m, out, i):
    """Shepperd's method as `render.rotations.rotmat_to_quat`: the candidate with the largest
    diagonal term (first on ties), normalised, w >= 0."""
    tr = m[0] + m[4] + m[8]
    d0, d1, d2, d3 = 1 + tr, 1 + 2 * m[0] - tr, 1 + 2 * m[4] - tr, 1 + 2 * m[8] - tr
    best = 0
    top = d0
    if d1 > top:
        best, top = 1, d1
    if d2 > top:
        best, top = 2, d2
    if d3 > top:
        best = 3
    if best == 0:
        w, x, y, z = d0, m[7] - m[5], m[2] - m[6], m[3] - m[1]
    elif best == 1:
        w, x, y, z = m[7] - m[5], d1, m[1] + m[3], m[2] + m[6]
    elif best == 2:
        w, x, y, z = m[2] - m[6], m[1] + m[3], d2, m[5] + m[7]
    else:
        w, x, y, z = m[3] - m[1], m[2] + m[6], m[5] + m[7], d3
    norm = max(np.sqrt(w * w + x * x + y * y + z * z), 1e-12)
    if w < 0:
        norm = -norm
    out[i, 0], out[i, 1], out[i, 2], out[i, 3] = w / norm, x / norm, y / norm, z / norm


def pose_gaussians(
    means: Tensor,  # [N, 3] canonical centres (facial actions applied)
    rest_rotations: Tensor,  # [N, 3, 3]
    bone_ids: Tensor,  # [N, Kb] long
    bone_weights: Tensor,  # [N, Kb]
    bone_transforms: Tensor,  # [J, 4, 4]
    particle_ids: Tensor,  # [N, Kp] long
    particle_weights: Tensor,  # [N, Kp]
    particle_transforms: Tensor | None = None,  # [M, 4, 4]; None: no particle motion
    offsets: Tensor | None = None,  # [N, 3] Δp
) -> tuple[Tensor, Tensor]:
    """Posed centres [N, 3] and rotations as quaternions [N, 4] (wxyz), float32, CPU."""
    n = len(means)

    def arr(t: Tensor) -> np.ndarray:
        return np.ascontiguousarray(t.detach().numpy())

    parts = (np.zeros((0, 4, 4), np.float32) if particle_transforms is None
             else arr(particle_transforms.float()))  # fmt: skip
    offs = np.zeros((n, 3), np.float32) if offsets is None else arr(offsets.float())
    out_means = np.empty((n, 3), np.float32)
    out_quats = np.empty((n, 4), np.float32)
    _pose(arr(means.float()), offs, arr(bone_ids), arr(bone_weights.float()),
          arr(bone_transforms.float()), arr(particle_ids), arr(particle_weights.float()), parts,
          arr(rest_rotations.float()), out_means, out_quats)  # fmt: skip
    return torch.from_numpy(out_means), torch.from_numpy(out_quats)
