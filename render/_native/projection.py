"""EWA projection of 3D Gaussians, forward and analytic backward, as numba kernels.

One parallel loop over (camera, Gaussian) pairs forward and one over Gaussians backward (cameras
inside, so the per-Gaussian gradient sums need no atomics). Small matrices are 9-tuples in
row-major order, which numba keeps in registers. The maths follows gsplat's
`fully_fused_projection` (3DGS, pinhole); `render/_reference.py` is the readable version.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from .common import ALPHA_MIN, MAX_EXTEND

_jit = nb.njit(fastmath=True, cache=True)  # LLVM inlines these; numba-level inlining
# confuses parfor array analysis on tuple returns


@_jit
def _mm(a, b):  # 3x3 @ 3x3
    return (
        a[0] * b[0] + a[1] * b[3] + a[2] * b[6],
        a[0] * b[1] + a[1] * b[4] + a[2] * b[7],
        a[0] * b[2] + a[1] * b[5] + a[2] * b[8],
        a[3] * b[0] + a[4] * b[3] + a[5] * b[6],
        a[3] * b[1] + a[4] * b[4] + a[5] * b[7],
        a[3] * b[2] + a[4] * b[5] + a[5] * b[8],
        a[6] * b[0] + a[7] * b[3] + a[8] * b[6],
        a[6] * b[1] + a[7] * b[4] + a[8] * b[7],
        a[6] * b[2] + a[7] * b[5] + a[8] * b[8],
    )


@_jit
def _t(a):  # transpose
    return (a[0], a[3], a[6], a[1], a[4], a[7], a[2], a[5], a[8])


@_jit
def _quat_rot(qw, qx, qy, qz):
    """Normalised quaternion and its rotation matrix (9-tuple)."""
    inv = 1.0 / np.sqrt(qw * qw + qx * qx + qy * qy + qz * qz)
    w, x, y, z = qw * inv, qx * inv, qy * inv, qz * inv
    rot = (
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    )  # fmt: skip
    return w, x, y, z, inv, rot


@_jit
def _world_cov(rot, sx, sy, sz):
    """M = R diag(s) and Sigma = M M^T."""
    m = (rot[0] * sx, rot[1] * sy, rot[2] * sz,
         rot[3] * sx, rot[4] * sy, rot[5] * sz,
         rot[6] * sx, rot[7] * sy, rot[8] * sz)  # fmt: skip
    return m, _mm(m, _t(m))


@_jit
def _clamped_tan(x, z, fx, cx, size):
    """tx = z * clamp(x/z, -lim_neg, lim_pos) (gsplat's 1.3x FOV guard band); also whether the
    clamp was active (then tx depends on z only)."""
    tan_half = 0.5 * size / fx
    lim_pos = (size - cx) / fx + 0.3 * tan_half
    lim_neg = cx / fx + 0.3 * tan_half
    u = x / z
    if u > lim_pos:
        return z * lim_pos, True
    if u < -lim_neg:
        return z * -lim_neg, True
    return x, False


# no fastmath here: with it this kernel loaded from numba's cache computed some conics a last bit
# apart from the same kernel compiled in the process, so a first create differed from the next
# (tests/test_rasterize_parity.py); the other kernels gave the same bits compiled and loaded on
# every scene tried. About 5% slower without it (1.5 ms for 50,000 Gaussians).
@nb.njit(parallel=True, cache=True)
def project_fwd(means, quats, scales, opacities, viewmats, Ks, width, height, eps2d, near, far,
                means2d, conics, depths, radii):  # fmt: skip
    """Fill means2d [C,N,2], conics [C,N,3], depths [C,N], radii [C,N,2] (int32, 0 = culled)."""
    num_cams = viewmats.shape[0]
    n = means.shape[0]
    for idx in nb.prange(num_cams * n):
        ci = idx // n
        gi = idx - ci * n
        radii[ci, gi, 0] = 0
        radii[ci, gi, 1] = 0
        vm = viewmats[ci]
        mx, my, mz = means[gi, 0], means[gi, 1], means[gi, 2]
        x = vm[0, 0] * mx + vm[0, 1] * my + vm[0, 2] * mz + vm[0, 3]
        y = vm[1, 0] * mx + vm[1, 1] * my + vm[1, 2] * mz + vm[1, 3]
        z = vm[2, 0] * mx + vm[2, 1] * my + vm[2, 2] * mz + vm[2, 3]
        depths[ci, gi] = z
        if z <= near or z >= far:
            continue
        op = opacities[gi]
        if op < ALPHA_MIN:
            continue
        _, _, _, _, _, rot = _quat_rot(quats[gi, 0], quats[gi, 1], quats[gi, 2], quats[gi, 3])
        _, cov = _world_cov(rot, scales[gi, 0], scales[gi, 1], scales[gi, 2])
        w = (vm[0, 0], vm[0, 1], vm[0, 2], vm[1, 0], vm[1, 1], vm[1, 2],
             vm[2, 0], vm[2, 1], vm[2, 2])  # fmt: skip
        cc = _mm(_mm(w, cov), _t(w))  # camera-space covariance
        fx, fy, cx, cy = Ks[ci, 0, 0], Ks[ci, 1, 1], Ks[ci, 0, 2], Ks[ci, 1, 2]
        tx, _ = _clamped_tan(x, z, fx, cx, width)
        ty, _ = _clamped_tan(y, z, fy, cy, height)
        rz = 1.0 / z
        j00, j02 = fx * rz, -fx * tx * rz * rz
        j11, j12 = fy * rz, -fy * ty * rz * rz
        # cov2d = J cc J^T with J = [[j00, 0, j02], [0, j11, j12]]
        r0 = (j00 * cc[0] + j02 * cc[6], j00 * cc[1] + j02 * cc[7], j00 * cc[2] + j02 * cc[8])
        r1 = (j11 * cc[3] + j12 * cc[6], j11 * cc[4] + j12 * cc[7], j11 * cc[5] + j12 * cc[8])
        a = r0[0] * j00 + r0[2] * j02 + eps2d
        b = r0[1] * j11 + r0[2] * j12
        c = r1[1] * j11 + r1[2] * j12 + eps2d
        det = a * c - b * b
        if not det > 0:
            continue
        u = fx * x * rz + cx
        v = fy * y * rz + cy
        extend = min(MAX_EXTEND, np.sqrt(2.0 * np.log(op / ALPHA_MIN)))
        rx = np.ceil(extend * np.sqrt(a))
        ry = np.ceil(extend * np.sqrt(c))
        if rx <= 0 and ry <= 0:
            continue
        if u + rx <= 0 or u - rx >= width or v + ry <= 0 or v - ry >= height:
            continue
        inv_det = 1.0 / det
        conics[ci, gi, 0] = c * inv_det
        conics[ci, gi, 1] = -b * inv_det
        conics[ci, gi, 2] = a * inv_det
        means2d[ci, gi, 0] = u
        means2d[ci, gi, 1] = v
        radii[ci, gi, 0] = np.int32(rx)
        radii[ci, gi, 1] = np.int32(ry)


@nb.njit(parallel=True, fastmath=True, cache=True)
def project_bwd(means, quats, scales, viewmats, Ks, width, height, eps2d, radii,
                v_means2d, v_conics, v_depths, v_means, v_quats, v_scales):  # fmt: skip
    """Accumulate gradients of means2d/conics/depths into v_means, v_quats, v_scales [N, .]."""
    num_cams = viewmats.shape[0]
    n = means.shape[0]
    for gi in nb.prange(n):
        qw, qx, qy, qz = quats[gi, 0], quats[gi, 1], quats[gi, 2], quats[gi, 3]
        w_, x_, y_, z_, qinv, rot = _quat_rot(qw, qx, qy, qz)
        sx, sy, sz = scales[gi, 0], scales[gi, 1], scales[gi, 2]
        m, cov = _world_cov(rot, sx, sy, sz)
        # gradient of Sigma (world), accumulated over cameras
        g_cov = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
        gmx = gmy = gmz = 0.0
        for ci in range(num_cams):
            if radii[ci, gi, 0] <= 0 and radii[ci, gi, 1] <= 0:
                continue
            vm = viewmats[ci]
            w = (vm[0, 0], vm[0, 1], vm[0, 2], vm[1, 0], vm[1, 1], vm[1, 2],
                 vm[2, 0], vm[2, 1], vm[2, 2])  # fmt: skip
            mx, my, mz = means[gi, 0], means[gi, 1], means[gi, 2]
            x = w[0] * mx + w[1] * my + w[2] * mz + vm[0, 3]
            y = w[3] * mx + w[4] * my + w[5] * mz + vm[1, 3]
            z = w[6] * mx + w[7] * my + w[8] * mz + vm[2, 3]
            cc = _mm(_mm(w, cov), _t(w))
            fx, fy, cx, cy = Ks[ci, 0, 0], Ks[ci, 1, 1], Ks[ci, 0, 2], Ks[ci, 1, 2]
            tx, clip_x = _clamped_tan(x, z, fx, cx, width)
            ty, clip_y = _clamped_tan(y, z, fy, cy, height)
            rz = 1.0 / z
            rz2 = rz * rz
            j00, j02 = fx * rz, -fx * tx * rz2
            j11, j12 = fy * rz, -fy * ty * rz2
            r0 = (j00 * cc[0] + j02 * cc[6], j00 * cc[1] + j02 * cc[7], j00 * cc[2] + j02 * cc[8])
            r1 = (j11 * cc[3] + j12 * cc[6], j11 * cc[4] + j12 * cc[7], j11 * cc[5] + j12 * cc[8])
            a = r0[0] * j00 + r0[2] * j02 + eps2d
            b = r0[1] * j11 + r0[2] * j12
            c = r1[1] * j11 + r1[2] * j12 + eps2d
            inv_det = 1.0 / (a * c - b * b)
            qa, qb, qc = c * inv_det, -b * inv_det, a * inv_det  # conic Q = cov2d^-1
            # dL/dQ as a symmetric matrix, then dL/dcov2d = -Q G Q
            ga, gb, gc = v_conics[ci, gi, 0], 0.5 * v_conics[ci, gi, 1], v_conics[ci, gi, 2]
            t00, t01 = qa * ga + qb * gb, qa * gb + qb * gc  # Q G
            t10, t11 = qb * ga + qc * gb, qb * gb + qc * gc
            s00 = -(t00 * qa + t01 * qb)
            s01 = -(t00 * qb + t01 * qc)
            s11 = -(t10 * qb + t11 * qc)
            # cov2d = J cc J^T: dcc = J^T S J ; dJ = 2 S J cc
            jt = (j00, 0.0, j02, 0.0, j11, j12)  # J rows
            sj = (s00 * jt[0] + s01 * jt[3], s00 * jt[1] + s01 * jt[4], s00 * jt[2] + s01 * jt[5],
                  s01 * jt[0] + s11 * jt[3], s01 * jt[1] + s11 * jt[4], s01 * jt[2] + s11 * jt[5])  # fmt: skip
            g_cc = (
                jt[0] * sj[0] + jt[3] * sj[3], jt[0] * sj[1] + jt[3] * sj[4], jt[0] * sj[2] + jt[3] * sj[5],
                jt[1] * sj[0] + jt[4] * sj[3], jt[1] * sj[1] + jt[4] * sj[4], jt[1] * sj[2] + jt[4] * sj[5],
                jt[2] * sj[0] + jt[5] * sj[3], jt[2] * sj[1] + jt[5] * sj[4], jt[2] * sj[2] + jt[5] * sj[5],
            )  # fmt: skip
            # dJ = 2 (S J) cc ; only the four non-constant entries matter
            g_j00 = 2.0 * (sj[0] * cc[0] + sj[1] * cc[3] + sj[2] * cc[6])
            g_j02 = 2.0 * (sj[0] * cc[2] + sj[1] * cc[5] + sj[2] * cc[8])
            g_j11 = 2.0 * (sj[3] * cc[1] + sj[4] * cc[4] + sj[5] * cc[7])
            g_j12 = 2.0 * (sj[3] * cc[2] + sj[4] * cc[5] + sj[5] * cc[8])
            # camera-space point gradient from the Jacobian, mean2d and depth
            gu, gv = v_means2d[ci, gi, 0], v_means2d[ci, gi, 1]
            gx = fx * rz * gu
            gy = fy * rz * gv
            gz = -(fx * x * gu + fy * y * gv) * rz2 + v_depths[ci, gi]
            gz += -fx * rz2 * g_j00 - fy * rz2 * g_j11
            if clip_x:
                gz += fx * tx * rz2 * rz * g_j02
            else:
                gx += -fx * rz2 * g_j02
                gz += 2.0 * fx * tx * rz2 * rz * g_j02
            if clip_y:
                gz += fy * ty * rz2 * rz * g_j12
            else:
                gy += -fy * rz2 * g_j12
                gz += 2.0 * fy * ty * rz2 * rz * g_j12
            # back to world: p = W mu + t ; cc = W cov W^T
            gmx += w[0] * gx + w[3] * gy + w[6] * gz
            gmy += w[1] * gx + w[4] * gy + w[7] * gz
            gmz += w[2] * gx + w[5] * gy + w[8] * gz
            gw = _mm(_mm(_t(w), g_cc), w)
            g_cov = (g_cov[0] + gw[0], g_cov[1] + gw[1], g_cov[2] + gw[2],
                     g_cov[3] + gw[3], g_cov[4] + gw[4], g_cov[5] + gw[5],
                     g_cov[6] + gw[6], g_cov[7] + gw[7], g_cov[8] + gw[8])  # fmt: skip
        v_means[gi, 0] = gmx
        v_means[gi, 1] = gmy
        v_means[gi, 2] = gmz
        # Sigma = M M^T: dM = (G + G^T) M ; M = R diag(s)
        gs = (g_cov[0] + g_cov[0], g_cov[1] + g_cov[3], g_cov[2] + g_cov[6],
              g_cov[3] + g_cov[1], g_cov[4] + g_cov[4], g_cov[5] + g_cov[7],
              g_cov[6] + g_cov[2], g_cov[7] + g_cov[5], g_cov[8] + g_cov[8])  # fmt: skip
        gm = _mm(gs, m)
        v_scales[gi, 0] = gm[0] * rot[0] + gm[3] * rot[3] + gm[6] * rot[6]
        v_scales[gi, 1] = gm[1] * rot[1] + gm[4] * rot[4] + gm[7] * rot[7]
        v_scales[gi, 2] = gm[2] * rot[2] + gm[5] * rot[5] + gm[8] * rot[8]
        g = (gm[0] * sx, gm[1] * sy, gm[2] * sz, gm[3] * sx, gm[4] * sy, gm[5] * sz,
             gm[6] * sx, gm[7] * sy, gm[8] * sz)  # dL/dR  # fmt: skip
        vw = 2.0 * (-z_ * g[1] + y_ * g[2] + z_ * g[3] - x_ * g[5] - y_ * g[6] + x_ * g[7])
        vx = 2.0 * (y_ * g[1] + z_ * g[2] + y_ * g[3] - 2.0 * x_ * g[4] - w_ * g[5]
                    + z_ * g[6] + w_ * g[7] - 2.0 * x_ * g[8])  # fmt: skip
        vy = 2.0 * (-2.0 * y_ * g[0] + x_ * g[1] + w_ * g[2] + x_ * g[3] + z_ * g[5]
                    - w_ * g[6] + z_ * g[7] - 2.0 * y_ * g[8])  # fmt: skip
        vz = 2.0 * (-2.0 * z_ * g[0] - w_ * g[1] + x_ * g[2] + w_ * g[3] - 2.0 * z_ * g[4]
                    + y_ * g[5] + x_ * g[6] + y_ * g[7])  # fmt: skip
        # through the normalisation q/|q|
        dot = vw * w_ + vx * x_ + vy * y_ + vz * z_
        v_quats[gi, 0] = (vw - dot * w_) * qinv
        v_quats[gi, 1] = (vx - dot * x_) * qinv
        v_quats[gi, 2] = (vy - dot * y_) * qinv
        v_quats[gi, 3] = (vz - dot * z_) * qinv
