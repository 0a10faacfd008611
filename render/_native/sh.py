"""View-dependent colour from spherical harmonics (degree 0-3), forward and backward, in numba.

Same basis, signs and clamp as `render/sh.py` (the torch version every other backend uses):
rgb = max(sum_k basis_k(dir) sh_k + 0.5, 0), dir = normalise(mean - camera centre).
"""

from __future__ import annotations

import numba as nb
import numpy as np

from ..sh import SH_C0, SH_C1, SH_C2, SH_C3

CHUNK = 512  # Gaussians per parallel task (each task owns its small scratch arrays)
F = np.float32
C0, C1 = F(SH_C0), F(SH_C1)
C20, C21, C22, C23, C24 = (F(c) for c in SH_C2)
C30, C31, C32, C33, C34, C35, C36 = (F(c) for c in SH_C3)


@nb.njit(fastmath=True, cache=True)
def _basis(x, y, z, degree, out):
    out[0] = C0
    if degree >= 1:
        out[1], out[2], out[3] = -C1 * y, C1 * z, -C1 * x
    if degree >= 2:
        xx, yy, zz = x * x, y * y, z * z
        out[4], out[5] = C20 * x * y, C21 * y * z
        out[6] = C22 * (2 * zz - xx - yy)
        out[7], out[8] = C23 * x * z, C24 * (xx - yy)
    if degree >= 3:
        out[9] = C30 * y * (3 * xx - yy)
        out[10] = C31 * x * y * z
        out[11] = C32 * y * (4 * zz - xx - yy)
        out[12] = C33 * z * (2 * zz - 3 * xx - 3 * yy)
        out[13] = C34 * x * (4 * zz - xx - yy)
        out[14] = C35 * z * (xx - yy)
        out[15] = C36 * x * (xx - 3 * yy)


@nb.njit(fastmath=True, cache=True)
def _basis_grad(x, y, z, degree, gx, gy, gz):
    """d basis_k / d(x, y, z) for k >= 1 (basis_0 is constant)."""
    gx[1], gy[1], gz[1] = 0, -C1, 0
    gx[2], gy[2], gz[2] = 0, 0, C1
    gx[3], gy[3], gz[3] = -C1, 0, 0
    if degree >= 2:
        xx, yy, zz = x * x, y * y, z * z
        gx[4], gy[4], gz[4] = C20 * y, C20 * x, 0
        gx[5], gy[5], gz[5] = 0, C21 * z, C21 * y
        gx[6], gy[6], gz[6] = -2 * C22 * x, -2 * C22 * y, 4 * C22 * z
        gx[7], gy[7], gz[7] = C23 * z, 0, C23 * x
        gx[8], gy[8], gz[8] = 2 * C24 * x, -2 * C24 * y, 0
    if degree >= 3:
        gx[9], gy[9], gz[9] = C30 * 6 * x * y, C30 * (3 * xx - 3 * yy), 0
        gx[10], gy[10], gz[10] = C31 * y * z, C31 * x * z, C31 * x * y
        gx[11], gy[11], gz[11] = -2 * C32 * x * y, C32 * (4 * zz - xx - 3 * yy), 8 * C32 * y * z
        gx[12], gy[12], gz[12] = (
            -6 * C33 * x * z,
            -6 * C33 * y * z,
            C33 * (6 * zz - 3 * xx - 3 * yy),
        )
        gx[13], gy[13], gz[13] = C34 * (4 * zz - 3 * xx - yy), -2 * C34 * x * y, 8 * C34 * x * z
        gx[14], gy[14], gz[14] = 2 * C35 * x * z, -2 * C35 * y * z, C35 * (xx - yy)
        gx[15], gy[15], gz[15] = C36 * (3 * xx - 3 * yy), -6 * C36 * x * y, 0


@nb.njit(fastmath=True, cache=True)
def _direction(means, centers, gi, ci):
    dx = means[gi, 0] - centers[ci, 0]
    dy = means[gi, 1] - centers[ci, 1]
    dz = means[gi, 2] - centers[ci, 2]
    norm = max(np.sqrt(dx * dx + dy * dy + dz * dz), F(1e-12))
    return dx / norm, dy / norm, dz / norm, norm


@nb.njit(parallel=True, fastmath=True, cache=True)
def sh_fwd(sh, means, centers, degree, out):
    """out [C, N, 3] = max(SH(dir) + 0.5, 0)."""
    n, k_num = sh.shape[0], sh.shape[1]
    for chunk in nb.prange((n + CHUNK - 1) // CHUNK):
        basis = np.empty(16, np.float32)
        for gi in range(chunk * CHUNK, min(n, (chunk + 1) * CHUNK)):
            for ci in range(centers.shape[0]):
                x, y, z, _ = _direction(means, centers, gi, ci)
                _basis(x, y, z, degree, basis)
                for ch in range(3):
                    v = F(0.5)
                    for k in range(k_num):
                        v += basis[k] * sh[gi, k, ch]
                    out[ci, gi, ch] = max(v, F(0.0))


@nb.njit(parallel=True, fastmath=True, cache=True)
def sh_bwd(sh, means, centers, degree, v_out, v_sh, v_means):
    """Accumulate into v_sh [N, K, 3] and v_means [N, 3] (zero-initialised)."""
    n, k_num = sh.shape[0], sh.shape[1]
    for chunk in nb.prange((n + CHUNK - 1) // CHUNK):
        basis = np.empty(16, np.float32)
        v_basis = np.empty(16, np.float32)
        gx, gy, gz = np.zeros(16, np.float32), np.zeros(16, np.float32), np.zeros(16, np.float32)
        for gi in range(chunk * CHUNK, min(n, (chunk + 1) * CHUNK)):
            for ci in range(centers.shape[0]):
                x, y, z, norm = _direction(means, centers, gi, ci)
                _basis(x, y, z, degree, basis)
                v_basis[:k_num] = 0
                for ch in range(3):
                    v = F(0.5)
                    for k in range(k_num):
                        v += basis[k] * sh[gi, k, ch]
                    if v < 0:  # clamped: no gradient
                        continue
                    g = v_out[ci, gi, ch]
                    for k in range(k_num):
                        v_sh[gi, k, ch] += basis[k] * g
                        v_basis[k] += sh[gi, k, ch] * g
                if degree == 0:
                    continue
                _basis_grad(x, y, z, degree, gx, gy, gz)
                vx = vy = vz = F(0.0)
                for k in range(1, k_num):
                    vx += v_basis[k] * gx[k]
                    vy += v_basis[k] * gy[k]
                    vz += v_basis[k] * gz[k]
                # through dir = d / |d|: (I - dir dir^T) / |d|
                dot = vx * x + vy * y + vz * z
                v_means[gi, 0] += (vx - dot * x) / norm
                v_means[gi, 1] += (vy - dot * y) / norm
                v_means[gi, 2] += (vz - dot * z) / norm
