"""Tile binning and per-tile alpha compositing, forward and backward, as numba kernels.

Binning: each visible Gaussian is listed in every 16-px tile its box touches; the list is ordered
by (tile, depth) with a two-pass radix sort: a stable depth sort, then a stable counting sort by
tile, which gives exactly the order of one sort of (tile, depth) keys.

Compositing: one task per tile. Inside a tile the loop runs over the tile's Gaussians
front to back and, for each, over the pixels of its box only (exact: outside the box alpha is
below 1/255 by construction of the radius), with per-pixel transmittance and an early exit once
every pixel of the tile is saturated. The backward walks the same lists back to front (gsplat's
scheme) and writes one gradient row per intersection, so threads never share an accumulator;
`reduce_isect_grads` then sums the rows per Gaussian.

Threads: numba splits a prange into contiguous blocks, one per thread, whatever
`parallel_chunksize` says (measured: numba 0.68, omp and workqueue layers), so a prange over
tiles gave one core the top half of the image and the other the bottom, and a subject in one
half ran on one core. The compositing kernels instead deal the tiles into one share per thread
(`workers`, numba's thread count) of about equal cost (`_deal`: a tile's list length), and a
prange over the shares runs one per thread.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from .common import ALPHA_MIN

HALF = np.float32(0.5)
ONE = np.float32(1.0)
SIGMA_MARGIN = np.float32(1e-3)  # keeps the exact alpha test in charge near the 1/255 boundary
EXP_SHIFT = np.float32(0.3466)  # centre of the polynomial's interval, in units of sigma / 8
EXP_SHIFT_SCALE = np.float32(np.exp(-0.3466))


@nb.njit(fastmath=True, cache=True)
def _exp_neg(sigma):
    """exp(-sigma) for 0 <= sigma <= ln(255) + SIGMA_MARGIN (relative error < 3e-6), inlined:
    a libm call forces register spills in the hot loop. exp(-sigma) = (exp(-sigma/8))^8 with
    exp(-sigma/8) = exp(-c) exp(c - sigma/8), the second factor a degree-6 Taylor polynomial on
    [-0.35, 0.35]."""
    y = EXP_SHIFT - sigma * np.float32(0.125)
    p = ONE + y * (ONE + y * (np.float32(1 / 2) + y * (np.float32(1 / 6) + y * (
        np.float32(1 / 24) + y * (np.float32(1 / 120) + y * np.float32(1 / 720))))))  # fmt: skip
    e = p * EXP_SHIFT_SCALE
    e = e * e
    e = e * e
    return e * e


@nb.njit(cache=True)
def _radix_argsort_u32(keys):
    """Stable argsort of non-negative int64 keys < 2^32: LSD radix sort, 3 passes of 11 bits."""
    n = keys.shape[0]
    order = np.arange(n)
    tmp = np.empty(n, np.int64)
    for shift in (0, 11, 22):
        counts = np.zeros(2049, np.int64)
        for i in range(n):
            counts[((keys[order[i]] >> shift) & 2047) + 1] += 1
        for b in range(2048):
            counts[b + 1] += counts[b]
        for i in range(n):
            b = (keys[order[i]] >> shift) & 2047
            tmp[counts[b]] = order[i]
            counts[b] += 1
        order, tmp = tmp, order
    return order


@nb.njit(parallel=True, cache=True)
def _tile_boxes(means2d, radii, width, height, tile, box):
    """Tile box [x0, x1) x [y0, y1) of each visible Gaussian, in tile units (empty if culled)."""
    num_cams, n = radii.shape[0], radii.shape[1]
    tw = (width + tile - 1) // tile
    th = (height + tile - 1) // tile
    for idx in nb.prange(num_cams * n):
        ci = idx // n
        gi = idx - ci * n
        rx, ry = radii[ci, gi, 0], radii[ci, gi, 1]
        if rx <= 0 and ry <= 0:
            box[ci, gi, 0] = box[ci, gi, 1] = box[ci, gi, 2] = box[ci, gi, 3] = 0
            continue
        mx, my = means2d[ci, gi, 0], means2d[ci, gi, 1]
        box[ci, gi, 0] = min(max(int(np.floor((mx - rx) / tile)), 0), tw)
        box[ci, gi, 1] = min(max(int(np.ceil((mx + rx) / tile)), 0), tw)
        box[ci, gi, 2] = min(max(int(np.floor((my - ry) / tile)), 0), th)
        box[ci, gi, 3] = min(max(int(np.ceil((my + ry) / tile)), 0), th)


@nb.njit(cache=True)
def bin_tiles(means2d, radii, depths, width, height, tile):
    """Returns tile_offsets [C*TH*TW + 1] (int64) and flatten_ids [I] (int64, camera*N + index),
    ordered by (camera, tile, depth); equal depths keep index order."""
    num_cams, n = radii.shape[0], radii.shape[1]
    tw = (width + tile - 1) // tile
    th = (height + tile - 1) // tile
    ntiles = tw * th
    box = np.empty((num_cams, n, 4), np.int32)
    _tile_boxes(means2d, radii, width, height, tile, box)
    counts = np.zeros(num_cams * ntiles + 1, np.int64)
    for ci in range(num_cams):
        for gi in range(n):
            for ty in range(box[ci, gi, 2], box[ci, gi, 3]):
                for tx in range(box[ci, gi, 0], box[ci, gi, 1]):
                    counts[ci * ntiles + ty * tw + tx + 1] += 1
    offsets = np.cumsum(counts)
    cursor = offsets[:-1].copy()
    flatten_ids = np.empty(offsets[-1], np.int64)
    keys = np.empty(n, np.int64)
    for ci in range(num_cams):
        # visible depths are > near > 0, and positive float32 bit patterns sort like the floats
        bits = depths[ci].view(np.int32)
        for gi in range(n):
            keys[gi] = max(bits[gi], 0)
        for gi in _radix_argsort_u32(keys):
            for ty in range(box[ci, gi, 2], box[ci, gi, 3]):
                for tx in range(box[ci, gi, 0], box[ci, gi, 1]):
                    t = ci * ntiles + ty * tw + tx
                    flatten_ids[cursor[t]] = ci * n + gi
                    cursor[t] += 1
    return offsets, flatten_ids


@nb.njit(fastmath=True, cache=True)
def _gaussian_in_tile(means2d, conics, opacities, radii, ci, gi, x0, y0, pw, ph):
    """One Gaussian's 2D parameters, its sigma cut-off (beyond it alpha < 1/255 for sure, so the
    exp is skipped) and the pixels of the tile whose centres lie in its box (inclusive ranges)."""
    mx, my = means2d[ci, gi, 0], means2d[ci, gi, 1]
    ca, cb, cc = conics[ci, gi, 0], conics[ci, gi, 1], conics[ci, gi, 2]
    op = opacities[gi]
    rx, ry = radii[ci, gi, 0], radii[ci, gi, 1]
    sigma_cut = np.log(op / ALPHA_MIN) + SIGMA_MARGIN
    px_lo = max(x0, int(np.ceil(mx - rx - HALF)))
    px_hi = min(x0 + pw - 1, int(np.floor(mx + rx - HALF)))
    py_lo = max(y0, int(np.ceil(my - ry - HALF)))
    py_hi = min(y0 + ph - 1, int(np.floor(my + ry - HALF)))
    return mx, my, ca, cb, cc, op, sigma_cut, px_lo, px_hi, py_lo, py_hi


@nb.njit(cache=True)
def _deal(tile_offsets, workers):
    """Tiles dealt to `workers` shares of about equal cost: [workers + 1] offsets into [T] tile
    ids. Longest list first to the share with the least so far; a tile costs its list's length
    plus a little for writing out its pixels."""
    total = tile_offsets.shape[0] - 1
    cost = tile_offsets[1:] - tile_offsets[:-1] + 16
    load = np.zeros(workers, np.int64)
    share = np.empty(total, np.int64)
    for tid in np.argsort(-cost, kind="mergesort"):
        w = np.argmin(load)
        share[tid] = w
        load[w] += cost[tid]
    order = np.argsort(share, kind="mergesort")  # by share, tile order within one
    starts = np.zeros(workers + 1, np.int64)
    for tid in range(total):
        starts[share[tid] + 1] += 1
    return np.cumsum(starts), order


@nb.njit(fastmath=True, cache=True)
def _composite_tile_fwd(tid, means2d, conics, colors, opacities, background, radii, tile_offsets,
                  flatten_ids, width, height, tile, alpha_max, t_min,
                  out_color, out_alpha, last_ids):  # fmt: skip
    """`composite_fwd` for tile `tid` (camera-major)."""
    num_cams, n, dim = colors.shape
    tw = (width + tile - 1) // tile
    th = (height + tile - 1) // tile
    ntiles = tw * th
    ci = tid // ntiles
    ty = (tid - ci * ntiles) // tw
    tx = tid - ci * ntiles - ty * tw
    x0, y0 = tx * tile, ty * tile
    pw, ph = min(tile, width - x0), min(tile, height - y0)
    trans = np.ones(ph * pw, np.float32)
    acc = np.zeros((ph * pw, dim), np.float32)
    last = np.full(ph * pw, -1, np.int64)
    done_rows = np.zeros(ph, np.int64)  # bit x of row y: that pixel is saturated
    ndone = 0
    for k in range(tile_offsets[tid], tile_offsets[tid + 1]):
        gi = flatten_ids[k] - ci * n
        mx, my, ca, cb, cc, op, sigma_cut, px_lo, px_hi, py_lo, py_hi = _gaussian_in_tile(
            means2d, conics, opacities, radii, ci, gi, x0, y0, pw, ph
        )
        c0, c1 = colors[ci, gi, 0], colors[ci, gi, 1 % dim]
        c2, c3 = colors[ci, gi, 2 % dim], colors[ci, gi, 3 % dim]
        if px_hi < px_lo:
            continue
        span = ((1 << (px_hi - px_lo + 1)) - 1) << (px_lo - x0)
        for py in range(py_lo, py_hi + 1):
            if done_rows[py - y0] & span == span:
                continue  # every pixel of this row segment is already saturated
            dy = my - (np.float32(py) + HALF)
            row = (py - y0) * pw - x0
            for px in range(px_lo, px_hi + 1):
                if (done_rows[py - y0] >> (px - x0)) & 1:
                    continue
                p = row + px
                dx = mx - (np.float32(px) + HALF)
                sigma = HALF * (ca * dx * dx + cc * dy * dy) + cb * dx * dy
                if sigma < 0 or sigma > sigma_cut:
                    continue
                alpha = min(alpha_max, op * _exp_neg(sigma))
                if alpha < ALPHA_MIN:
                    continue
                next_t = trans[p] * (ONE - alpha)
                if next_t <= t_min:
                    done_rows[py - y0] |= 1 << (px - x0)
                    ndone += 1
                    continue
                wgt = alpha * trans[p]
                if dim == 4:  # RGB + depth, the common case: colours held in registers
                    acc[p, 0] += wgt * c0
                    acc[p, 1] += wgt * c1
                    acc[p, 2] += wgt * c2
                    acc[p, 3] += wgt * c3
                else:
                    for d in range(dim):
                        acc[p, d] += wgt * colors[ci, gi, d]
                trans[p] = next_t
                last[p] = k
        if ndone == ph * pw:
            break
    for py in range(ph):
        for px in range(pw):
            p = py * pw + px
            for d in range(dim):
                out_color[ci, y0 + py, x0 + px, d] = acc[p, d] + trans[p] * background[ci, d]
            out_alpha[ci, y0 + py, x0 + px] = ONE - trans[p]
            last_ids[ci, y0 + py, x0 + px] = last[p]


@nb.njit(parallel=True, fastmath=True, cache=True)
def composite_fwd(means2d, conics, colors, opacities, background, radii, tile_offsets,
                  flatten_ids, width, height, tile, alpha_max, t_min,
                  out_color, out_alpha, last_ids, workers):  # fmt: skip
    """Fill out_color [C,H,W,D], out_alpha [C,H,W] and last_ids [C,H,W] (index into flatten_ids
    of the last Gaussian composited at each pixel, -1 if none)."""
    starts, order = _deal(tile_offsets, workers)
    for w in nb.prange(workers):  # one share of tiles per thread (see the module's docstring)
        for tid in order[starts[w] : starts[w + 1]]:
            _composite_tile_fwd(tid, means2d, conics, colors, opacities, background, radii,
                tile_offsets, flatten_ids, width, height, tile, alpha_max, t_min, out_color,
                out_alpha, last_ids)  # fmt: skip


@nb.njit(fastmath=True, cache=True)
def _composite_tile_bwd(tid, means2d, conics, colors, opacities, background, radii, tile_offsets,
                  flatten_ids, width, height, tile, alpha_max, out_alpha, last_ids,
                  v_color, v_alpha, isect_grads):  # fmt: skip
    """`composite_bwd` for tile `tid` (camera-major)."""
    num_cams, n, dim = colors.shape
    tw = (width + tile - 1) // tile
    th = (height + tile - 1) // tile
    ntiles = tw * th
    start, end = tile_offsets[tid], tile_offsets[tid + 1]
    if start == end:
        return
    ci = tid // ntiles
    ty = (tid - ci * ntiles) // tw
    tx = tid - ci * ntiles - ty * tw
    x0, y0 = tx * tile, ty * tile
    pw, ph = min(tile, width - x0), min(tile, height - y0)
    npx = ph * pw
    t_final = np.empty(npx, np.float32)
    trans = np.empty(npx, np.float32)
    last = np.empty(npx, np.int64)
    v_pix = np.empty((npx, dim), np.float32)
    v_bg = np.empty(npx, np.float32)  # d/dalpha_i of the alpha output and background terms
    buf = np.zeros((npx, dim), np.float32)
    kmax = -1
    row_last = np.full(ph, -1, np.int64)  # latest last-contributor index in each row
    for py in range(ph):
        for px in range(pw):
            p = py * pw + px
            t_final[p] = ONE - out_alpha[ci, y0 + py, x0 + px]
            trans[p] = t_final[p]
            last[p] = last_ids[ci, y0 + py, x0 + px]
            row_last[py] = max(row_last[py], last[p])
            kmax = max(kmax, last[p])
            bg_dot = np.float32(0.0)
            for d in range(dim):
                v_pix[p, d] = v_color[ci, y0 + py, x0 + px, d]
                bg_dot += background[ci, d] * v_pix[p, d]
            v_bg[p] = t_final[p] * (v_alpha[ci, y0 + py, x0 + px] - bg_dot)
    g_col = np.empty(dim, np.float32)
    for k in range(kmax, start - 1, -1):
        gi = flatten_ids[k] - ci * n
        mx, my, ca, cb, cc, op, sigma_cut, px_lo, px_hi, py_lo, py_hi = _gaussian_in_tile(
            means2d, conics, opacities, radii, ci, gi, x0, y0, pw, ph
        )
        g_mx = g_my = g_a = g_b = g_c = g_op = np.float32(0.0)
        g_col[:] = 0
        for py in range(py_lo, py_hi + 1):
            if k > row_last[py - y0]:
                continue  # this Gaussian is behind every pixel's last contributor here
            dy = my - (np.float32(py) + HALF)
            row = (py - y0) * pw - x0
            for px in range(px_lo, px_hi + 1):
                p = row + px
                if k > last[p]:
                    continue
                dx = mx - (np.float32(px) + HALF)
                sigma = HALF * (ca * dx * dx + cc * dy * dy) + cb * dx * dy
                if sigma < 0 or sigma > sigma_cut:
                    continue
                vis = _exp_neg(sigma)
                alpha = min(alpha_max, op * vis)
                if alpha < ALPHA_MIN:
                    continue
                ra = ONE / (ONE - alpha)
                trans[p] *= ra  # transmittance in front of this Gaussian
                fac = alpha * trans[p]
                v_a = v_bg[p] * ra
                for d in range(dim):
                    c = colors[ci, gi, d]
                    g_col[d] += fac * v_pix[p, d]
                    v_a += (c * trans[p] - buf[p, d] * ra) * v_pix[p, d]
                    buf[p, d] += c * fac
                if op * vis <= alpha_max:  # alpha not clamped: gradients reach sigma, opacity
                    v_sigma = -op * vis * v_a
                    g_a += HALF * v_sigma * dx * dx
                    g_b += v_sigma * dx * dy
                    g_c += HALF * v_sigma * dy * dy
                    g_mx += v_sigma * (ca * dx + cb * dy)
                    g_my += v_sigma * (cb * dx + cc * dy)
                    g_op += vis * v_a
        isect_grads[k, 0] = g_mx
        isect_grads[k, 1] = g_my
        isect_grads[k, 2] = g_a
        isect_grads[k, 3] = g_b
        isect_grads[k, 4] = g_c
        isect_grads[k, 5] = g_op
        for d in range(dim):
            isect_grads[k, 6 + d] = g_col[d]


@nb.njit(parallel=True, fastmath=True, cache=True)
def composite_bwd(means2d, conics, colors, opacities, background, radii, tile_offsets,
                  flatten_ids, width, height, tile, alpha_max, out_alpha, last_ids,
                  v_color, v_alpha, isect_grads, workers):  # fmt: skip
    """Write per-intersection gradients isect_grads [I, 6 + D]: (mean2d x, y, conic a, b, c,
    opacity, colour 0..D-1). Background gradients are sums of v_color * T_final (done outside)."""
    starts, order = _deal(tile_offsets, workers)
    for w in nb.prange(workers):  # one share of tiles per thread (see the module's docstring)
        for tid in order[starts[w] : starts[w + 1]]:
            _composite_tile_bwd(tid, means2d, conics, colors, opacities, background, radii,
                tile_offsets, flatten_ids, width, height, tile, alpha_max, out_alpha, last_ids,
                v_color, v_alpha, isect_grads)  # fmt: skip


@nb.njit(cache=True)
def reduce_isect_grads(flatten_ids, isect_grads, n, v_means2d, v_conics, v_opacities, v_colors):
    """Sum per-intersection gradient rows into per-(camera, Gaussian) arrays (zero-initialised)."""
    dim = v_colors.shape[2]
    for k in range(flatten_ids.shape[0]):
        g = flatten_ids[k]
        ci = g // n
        gi = g - ci * n
        v_means2d[ci, gi, 0] += isect_grads[k, 0]
        v_means2d[ci, gi, 1] += isect_grads[k, 1]
        v_conics[ci, gi, 0] += isect_grads[k, 2]
        v_conics[ci, gi, 1] += isect_grads[k, 3]
        v_conics[ci, gi, 2] += isect_grads[k, 4]
        v_opacities[gi] += isect_grads[k, 5]
        for d in range(dim):
            v_colors[ci, gi, d] += isect_grads[k, 6 + d]
