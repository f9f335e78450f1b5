"""Fluence maps of TERMA's fast path ``compute_terma(..., fluence_method="maps")`` (numba; plain
arrays in and out, no validation).

A *cluster* is a set of fluence samples that share the gantry axes ``ex, ey, ez`` and whose
isocentres differ only along ``ey`` (the couch axis): the same sub-sample of every rotation at
one gantry angle of a helical plan. In the frame of the cluster's first isocentre ``C0`` a voxel
centre ``P`` has ``r = P - C0``, distance ``D = SAD - r.ez`` to the source along the beam axis,
``c = SAD / D``, across-fan position ``u = (r.ex) c`` (isocentre plane) and couch coordinate
``Y = r.ey`` (mm at the voxel); sample ``s`` (couch offset ``t_s``, beam-on time ``w_s``, leaf
outputs ``a_s``) sees it at ``v_s = (Y - t_s) c``. The exact per-sample fluence of
:func:`tomodose._kernels.terma.terma_units` summed over the cluster is::

    F(P) = sum_s w_s SAD^2 J(v_s; hv) O(u) L_s(u; hu) / |P - S_s|^2
    |P - S_s|^2 = D^2 (1 + u^2 / SAD^2) + (Y - t_s)^2,   hu = hu0 c,  hv = hv0 c

with ``J`` the jaw window and ``L_s`` the leaf profile (box means over the voxel's half-widths
``hu, hv``), ``O`` the off-axis factor. Writing ``1 / |P - S_s|^2 = c^2 / (1 + u^2/SAD^2) /
(1 + (Y - t_s)^2 / D^2) * (1 + eps)`` with ``|eps| <= (Y - t_s)^2 / D^2 * u^2 / SAD^2`` (< 2e-4 in
the jaw band of a 50 mm jaw) gives ``F(P) = c^2 M(Y, D, u)`` with::

    M(Y, D, u) = O(u) / (1 + u^2/SAD^2) * sum_e E_e(u; hu) sum_s d_{s,e} w_s J((Y - t_s) c; hv c) / (1 + (Y - t_s)^2 / D^2)

summed over the leaf edges ``e`` (``d_{s,e} = a_{s,e} - a_{s,e-1}``, ``E_e`` the box mean of edge
``e``'s step). The voxels of one grid slice share ``Y`` (the couch axis is the patient z axis),
so per slice the map is a function of ``(D, u)`` only: it is tabulated on ``n_m`` planes of
constant ``D`` (linear interpolation in ``D``) times a lattice of ``u`` (step ``h_u``, linear
interpolation), and a voxel costs one bilinear lookup per cluster instead of one profile
evaluation per sample. The edge means ``E_e`` of every plane and node are computed once per
call (:func:`edge_mean_rows`), the per-slice maps by :func:`slice_maps` (edge-major: only the
edges where some sample's output changes, a running sum for the saturated part), the voxel sums
by :func:`accumulate_fluence`, the attenuation by :func:`terma_from_fluence` (the ray trace and
spectral sums of :func:`tomodose._kernels.terma.terma_units`). Parallel loops write disjoint
slices / rows in a fixed order: results do not depend on the thread count.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from tomodose._kernels.collapsed_cone import _exp_neg
from tomodose._kernels.profiles import edge_mean_table
from tomodose._kernels.raytrace import trace_pairs_from_voxel
from tomodose._kernels.terma import jaw_window_value
from tomodose.config import NUMBA_OPTIONS, NUMBA_PARALLEL_OPTIONS

_SQRT2 = math.sqrt(2.0)


@numba.njit(**NUMBA_PARALLEL_OPTIONS)
def edge_mean_rows(e2, a_lo, n_win, u0, h_u, den0, dden, sad, hu0, e0, lw, sigma, cutoff, th, tv, ts):
    """Box means of every leaf edge's step on the map lattice (in place).

    ``e2`` (n_m, n_e, W): ``e2[m, e, n]`` = mean of the step of edge ``e`` (position ``e0 + e lw``,
    isocentre plane) over ``[u - hu, u + hu]`` at node ``u = u0 + (a_lo[m, e] + n) h_u`` with
    ``hu = hu0 SAD / (den0 + m dden)``; ``n < n_win[m, e]``. Nodes below ``a_lo[m, e]`` have mean 0,
    nodes from ``a_lo[m, e] + n_win[m, e]`` on have mean 1 (beyond ``cutoff`` sigmas + ``hu``).
    ``th, tv, ts``: :func:`tomodose._kernels.profiles.step_integral_table` of ``sigma``.
    """
    n_m, n_e, w_max = e2.shape
    for m in numba.prange(n_m):
        hu = hu0 * sad / (den0 + m * dden)
        reach = cutoff * sigma + hu
        for e in range(n_e):
            xe = e0 + e * lw
            lo = int(math.ceil((xe - reach - u0) / h_u))
            hi = int(math.floor((xe + reach - u0) / h_u))
            cnt = hi - lo + 1
            if cnt < 0:
                cnt = 0
            if cnt > w_max:
                cnt = w_max
            a_lo[m, e] = lo
            n_win[m, e] = cnt
            for n in range(cnt):
                e2[m, e, n] = edge_mean_table(u0 + (lo + n) * h_u - xe, sigma, cutoff, hu, th, tv, ts)


@numba.njit(**NUMBA_PARALLEL_OPTIONS)
def slice_maps(maps, active, slice_y, s_t, s_w, s_p, leaf_d, e2, a_lo, n_win, fac, den0, dden, sad, hv0,
               jaw_half, jaw_sigma, cutoff, jt_h, jt_v, jt_s):
    """Fluence maps of one cluster, slice by slice (overwritten; see the module docstring).

    ``maps`` (n_k, n_m, n_u): ``M`` of slice ``k`` (couch coordinate ``slice_y[k]``, mm) on plane
    ``m`` (``D = den0 + m dden``) at node ``a`` (``u = u0 + a h_u``, the lattice of ``e2``);
    ``active[k]``: False where the whole slice is outside every sample's jaw band (map 0).
    ``s_t, s_w, s_p`` (n_s,): couch offset (mm), beam-on time x leaf-independent output factor
    (s) and projection (row of ``leaf_d``) of each sample; ``leaf_d`` (P, L + 1) edge steps of the
    leaf outputs (:func:`tomodose._kernels.terma.edge_weights`); ``fac`` (n_u,) ``O(u) / (1 +
    u^2 / SAD^2)``; ``hv0`` the voxel's half-extent along the couch axis; jaw window half-width,
    sigma, cutoff and the step-integral table of the jaw sigma. Parallel over slices.
    """
    n_k, n_m, n_u = maps.shape
    n_s = s_t.shape[0]
    n_e = leaf_d.shape[1]
    v_ext = jaw_half + cutoff * jaw_sigma
    jaw_lim = cutoff * jaw_sigma
    jaw_inv = 1.0 / (_SQRT2 * jaw_sigma) if jaw_sigma > 0.0 else 0.0
    for k in numba.prange(n_k):
        dd = np.zeros((n_m, n_e))
        hit = False
        for s in range(n_s):
            y = slice_y[k] - s_t[s]
            p = s_p[s]
            for m in range(n_m):
                den = den0 + m * dden
                c = sad / den
                v = y * c
                hv = hv0 * c
                jaw = jaw_window_value(v, hv, v_ext, jaw_half, jaw_sigma, cutoff, jt_h, jt_v, jt_s, jaw_lim, jaw_inv)
                if jaw <= 0.0:
                    continue
                g = s_w[s] * jaw / (1.0 + y * y / (den * den))
                hit = True
                for e in range(n_e):
                    de = leaf_d[p, e]
                    if de != 0.0:
                        dd[m, e] += g * de
        active[k] = hit
        mk = maps[k]
        if not hit:
            mk[:, :] = 0.0
            continue
        step = np.empty(n_u + 1)
        for m in range(n_m):
            row = mk[m]
            row[:] = 0.0
            step[:] = 0.0
            for e in range(n_e):
                wt = dd[m, e]
                if wt == 0.0:
                    continue
                lo = a_lo[m, e]
                cnt = n_win[m, e]
                n_a = 0 if lo >= 0 else -lo
                n_b = cnt if lo + cnt <= n_u else n_u - lo
                for n in range(n_a, n_b):
                    row[lo + n] += wt * e2[m, e, n]
                first_one = lo + cnt  # nodes from here on: the step is saturated (mean 1)
                if first_one < 0:
                    first_one = 0
                if first_one < n_u:
                    step[first_one] += wt
            run = 0.0
            for a in range(n_u):
                run += step[a]
                row[a] = (row[a] + run) * fac[a]


@numba.njit(**NUMBA_PARALLEL_OPTIONS)
def accumulate_fluence(fl, maps, active, k_first, ny, nx, ox, oy, oz, dx, dy, dz, c0, ex, ez, sad, u0, h_u,
                       den0, dden):
    """``fl[k, j, i] += c^2 M_k(D, u)`` for the voxels of the map's slices (in place; bilinear in
    ``(D, u)``, 0 outside the ``u`` lattice; ``D`` is clamped to the planes' range; every voxel must
    lie in front of the source, ``D > 0``). ``maps`` (n_k,
    n_m, n_u) of :func:`slice_maps` for grid slices ``k_first .. k_first + n_k - 1``; ``c0, ex, ez``
    the cluster's first isocentre and gantry axes (LPS mm). Parallel over (slice, row)."""
    n_k, n_m, n_u = maps.shape
    inv_du = 1.0 / h_u
    inv_dd = 1.0 / dden
    for r in numba.prange(n_k * ny):
        kk = r // ny
        if not active[kk]:
            continue
        j = r % ny
        k = k_first + kk
        mk = maps[kk]
        rx = ox - c0[0]
        ry = oy + j * dy - c0[1]
        rz = oz + k * dz - c0[2]
        d0 = sad - (rx * ez[0] + ry * ez[1] + rz * ez[2])
        d1 = -dx * ez[0]
        n0 = rx * ex[0] + ry * ex[1] + rz * ex[2]
        n1 = dx * ex[0]
        top_a = n_u - 1.0
        top_m = n_m - 1.0
        flrow = fl[k, j]
        # branch-free: outside the u lattice the weight is 0 (same speed as with branches on the liver plan)
        for i in range(nx):
            den = d0 + i * d1
            c = sad / den
            ta = ((n0 + i * n1) * c - u0) * inv_du
            w_in = 1.0 if (ta >= 0.0 and ta <= top_a) else 0.0
            ta = min(max(ta, 0.0), top_a)
            a = min(int(ta), n_u - 2)
            fa = ta - a
            tm = min(max((den - den0) * inv_dd, 0.0), top_m)
            m = min(int(tm), n_m - 2)
            fm = tm - m
            lo = (1.0 - fa) * mk[m, a] + fa * mk[m, a + 1]
            hi = (1.0 - fa) * mk[m + 1, a] + fa * mk[m + 1, a + 1]
            flrow[i] += w_in * c * c * ((1.0 - fm) * lo + fm * hi)


#: anchor materials of :func:`trace_plane_anchors` (``tomodose.terma.attenuation.DENSITY_ANCHORS``)
N_ANCHORS = 6


@numba.njit(**NUMBA_OPTIONS)
def trace_plane_anchors(ny, nx, ox, oy, dx, dy, i, j, base, x1, y1, vec, acc):
    """Radiological path per anchor material from the centre of voxel ``(j, i)`` of one slice to the
    point ``(x1, y1)`` in the same slice (mm; outside the grid is vacuum), added to ``acc`` (6,).

    :func:`tomodose._kernels.raytrace.trace_pairs_from_voxel` for a ray perpendicular to z (the
    transverse trace of a gantry-angle unit), with ``vec`` (nvox, 6) the density of each anchor
    material in each voxel (``rho * w``: at most two non-zero) instead of the index/pair form:
    the six sums stay in registers (no read-modify-write of ``acc[mat_lo[vox]]`` per step, which
    made the loop wait on memory: 1.9x faster on the 3 mm liver grid). Same plane crossings,
    same lengths; sums of the same terms (zeros added for the other anchors). ``base``: flat index
    of the slice's first voxel.
    """
    x0 = ox + i * dx
    y0 = oy + j * dy
    ddx = x1 - x0
    ddy = y1 - y0
    length = math.sqrt(ddx * ddx + ddy * ddy)
    if length == 0.0:
        return
    big = 1e300
    if ddx > 0.0:
        nax = 0.5 * dx / ddx
        dax = dx / ddx
        si = 1
        ni = nx - 1 - i
    elif ddx < 0.0:
        nax = -0.5 * dx / ddx
        dax = -dx / ddx
        si = -1
        ni = i
    else:
        nax = big
        dax = big
        si = 0
        ni = 0
    if ddy > 0.0:
        nay = 0.5 * dy / ddy
        day = dy / ddy
        sj = nx
        nj = ny - 1 - j
    elif ddy < 0.0:
        nay = -0.5 * dy / ddy
        day = -dy / ddy
        sj = -nx
        nj = j
    else:
        nay = big
        day = big
        sj = 0
        nj = 0
    a0 = 0.0
    a1 = 0.0
    a2 = 0.0
    a3 = 0.0
    a4 = 0.0
    a5 = 0.0
    v = base + j * nx + i
    a_cur = 0.0
    # ends at the point (alpha = 1) or where the ray leaves the grid: a crossing with no voxel
    # left along its axis (counters, as trace_pairs_from_voxel: never an index outside the grid)
    while True:
        along_x = nax <= nay
        a_next = nax if along_x else nay
        if a_next > 1.0:
            a_next = 1.0
        seg = (a_next - a_cur) * length
        a0 += seg * vec[v, 0]
        a1 += seg * vec[v, 1]
        a2 += seg * vec[v, 2]
        a3 += seg * vec[v, 3]
        a4 += seg * vec[v, 4]
        a5 += seg * vec[v, 5]
        if a_next >= 1.0:
            break
        a_cur = a_next
        if along_x:
            if ni == 0:
                break
            ni -= 1
            v += si
            nax += dax
        else:
            if nj == 0:
                break
            nj -= 1
            v += sj
            nay += day
    acc[0] += a0
    acc[1] += a1
    acc[2] += a2
    acc[3] += a3
    acc[4] += a4
    acc[5] += a5


@numba.njit(**NUMBA_PARALLEL_OPTIONS)
def terma_from_fluence(fl, f_min, k_lo, k_hi, mat_lo, mat_pair, vec, rho, shape, origin, spacing, t_src, t_ex, t_ez,
                       t_iso, transverse, g, softening, sad, mu_anchor, ef, e_group, air_index, total, per_group):
    """TERMA of one trace unit from its summed fluence ``fl`` (nz, ny, nx) (fluence x inverse square
    x beam-on time, as ``fl`` of :func:`tomodose._kernels.terma.terma_units`), accumulated into
    ``total`` and ``per_group[g]`` (in place) for the voxels of slices ``[k_lo, k_hi)`` with
    ``fl > f_min`` (``f_min >= 0``: voxels at or below it are not traced and get no TERMA). Attenuation, softening and spectral sums exactly as ``terma_units``: trace from the
    voxel centre to ``t_src`` (``transverse``: moved along z to the voxel's plane), softening from
    the unit geometry ``t_ex, t_ez, t_iso`` (``e_group`` non-decreasing: the lines in energy order,
    each energy group a contiguous range); a transverse trace walks ``vec`` (nvox, 6) anchor densities
    (:func:`trace_plane_anchors`, needs 6 anchors), the other the index/pair form. Parallel over
    rows (k, j)."""
    nz, ny, nx = shape[0], shape[1], shape[2]
    m = mu_anchor.shape[0]
    n_e = ef.shape[0]
    n_ge = per_group.shape[1]
    ox, oy, oz = origin[0], origin[1], origin[2]
    dx, dy, dz = spacing[0], spacing[1], spacing[2]
    ef_mu = np.empty((m, n_e))
    for c in range(m):
        for e in range(n_e):
            ef_mu[c, e] = ef[e] * mu_anchor[c, e]
    mu01 = 0.1 * mu_anchor
    g_first = np.zeros(n_ge + 1, dtype=np.int64)
    for e in range(n_e):
        g_first[e_group[e] + 1] = e + 1
    for q in range(1, n_ge + 1):
        if g_first[q] < g_first[q - 1]:
            g_first[q] = g_first[q - 1]
    nrows = (k_hi - k_lo) * ny
    for r in numba.prange(nrows):
        k = k_lo + r // ny
        j = r % ny
        acc = np.empty(m)
        gsum = np.empty(n_ge)
        expo = np.empty(n_e)
        lines = np.empty(n_e)
        py = oy + j * dy
        pz = oz + k * dz
        tz = pz if transverse else t_src[2]
        for i in range(nx):
            f = fl[k, j, i]
            if f <= f_min:
                continue
            px = ox + i * dx
            rx, ry, rz = px - t_iso[0], py - t_iso[1], pz - t_iso[2]
            dist_axis = sad - (rx * t_ez[0] + ry * t_ez[1] + rz * t_ez[2])
            u_t = (rx * t_ex[0] + ry * t_ex[1] + rz * t_ex[2]) * sad / dist_axis
            h = 1.0 + softening * abs(math.atan(u_t / sad))
            for c in range(m):
                acc[c] = 0.0
            if transverse:
                trace_plane_anchors(ny, nx, ox, oy, dx, dy, i, j, k * ny * nx, t_src[0], t_src[1], vec, acc)
            else:
                trace_pairs_from_voxel(nz, ny, nx, ox, oy, oz, dx, dy, dz, i, j, k, t_src[0], t_src[1], tz, mat_lo,
                                       mat_pair, acc)
            flat = (k * ny + j) * nx + i
            rv = rho[flat]
            lo_here = mat_lo[flat]
            w_lo = 1.0
            w_hi = 0.0
            if rv > 0.0:
                inv = 1.0 / rv
                w_lo = mat_pair[flat, 0] * inv
                w_hi = mat_pair[flat, 1] * inv
            else:
                lo_here = air_index
            for e in range(n_e):
                expo[e] = 0.0
            for c in range(m):
                fq = h * acc[c]
                if fq != 0.0:
                    for e in range(n_e):
                        expo[e] += fq * mu01[c, e]
            ef_lo = ef_mu[lo_here]
            ef_hi = ef_mu[lo_here + 1]
            for e in range(n_e):
                lines[e] = (w_lo * ef_lo[e] + w_hi * ef_hi[e]) * _exp_neg(expo[e])
            tsum = 0.0
            for q in range(n_ge):
                sq = 0.0
                for e in range(g_first[q], g_first[q + 1]):
                    sq += lines[e]
                gsum[q] = h * sq
                tsum += gsum[q]
            total[k, j, i] += f * tsum
            for q in range(n_ge):
                per_group[g, q, k, j, i] += f * gsum[q]
