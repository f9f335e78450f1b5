"""numba kernels of the pencil beam's fluence-map evaluation (plain arrays in and out; no validation).

One angle cluster (samples sharing the beam axes ``xg, yg, zg``; sources ``s0 + t_p yg``, see
:func:`tomodose._kernels.pencil_beam._cluster_row`). A voxel has the isocentre-plane leaf coordinate
``u``, the couch coordinate ``Y = (P - s0) . yg`` (mm at the voxel), the distance ``den`` along the
beam axis and ``sc = SAD / den``; sample ``p`` sees it at ``v_p = (Y - t_p) sc``.

Gaussian ``i`` of the pencil kernel (width ``sig_i`` mm of water) at a voxel of density ``rho`` has the
water width ``sig_i / rho``. The widths of the shipped kernel are log-spaced (``sig_i = sig_0 r^i``), so
``sig_i / rho = sig_0 r^(i + s)`` with ``s = log(1 / rho) / log r``: a *level* ``q = i + s`` on the
ladder ``w_q = sig_0 r^q`` (level ``j`` of the maps holds ``w = sig_0 r^(j_lo + j)``).

A map (one cluster) is, for plane ``k`` (distance ``den_k``, ``c = SAD / den_k``) and level ``j``::

    M[k, b, a, j] = sum_p dt_p L_p(U_a; su) J((Y_b - t_p) c; sv) / (1 + (Y_b - t_p)^2 / den_k^2)

(stored as ``maps[k, b, a, j]``: plane, couch row, leaf column, level; the levels innermost, so
that a voxel's pass over its consecutive levels reads contiguous memory)

with ``su^2 = s_leaf^2 + c^2 (w_j^2 + bu2)``, ``sv^2 = s_jaw^2 + c^2 (w_j^2 + bv2)`` (``bu2, bv2`` the
variances of the voxel box along the leaf and jaw axes: the voxel average in equal-variance form),
``L_p`` the leaf-weighted aperture of sample ``p`` convolved with a Gaussian of width ``su`` and ``J`` the
jaw aperture convolved with ``sv``. A voxel reads it at ``(u, Y)`` (bilinear), between the two
planes that bracket its distance (linear in ``den``) and the two levels that bracket ``i + s`` for
each Gaussian (linear in ``q``), and multiplies by its amplitudes, off-axis terms and ``SAD^2 / r_perp^2``.
The couch coordinate ``Y`` (not ``v``) keeps the samples' offsets ``t_p`` independent of the distance:
only the jaw width ``2 jaw_h / c`` changes between planes.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from tomodose._kernels.pencil_beam import (
    NO_LIMIT, PHI_X, _amplitude, _cluster_row, _half_width, _level_coordinate, cluster_row_scratch,
    _exit_pos, _medium_offsets, _offaxis_and_depth, _phi, _row_range,
)
from tomodose.config import NUMBA_OPTIONS, NUMBA_PARALLEL_OPTIONS


@numba.njit(inline="always")
def _table_positions(u0, hu, n_u, lq, lev_off, lev_h, lev_n, u_max, b0, b1, fu):
    """Positions of the lattice ``u0 + a hu`` in level ``lq`` of the aperture table, as
    :func:`tomodose._kernels.pencil_beam._leaf_table` finds them (the same for every sample):
    ``tab[b0[a]] + fu[a] (tab[b1[a]] - tab[b0[a]])`` is its value (at the level's ends ``b1 = b0``,
    ``fu = 0``: the end value exactly)."""
    nq = lev_n[lq]
    for a in range(n_u):
        x = (u0 + a * hu + u_max) * lev_h[lq]
        if x <= 0.0:
            b0[a] = lev_off[lq]
            b1[a] = lev_off[lq]
            fu[a] = 0.0
        elif x >= nq - 1:
            b0[a] = lev_off[lq] + nq - 1
            b1[a] = lev_off[lq] + nq - 1
            fu[a] = 0.0
        else:
            jj = int(x)
            b0[a] = lev_off[lq] + jj
            b1[a] = lev_off[lq] + jj + 1
            fu[a] = x - jj


@numba.njit(**NUMBA_PARALLEL_OPTIONS)
def fluence_profiles(lu, jy, jy_first, u0, hu, y0, hy, den0, dden, w2_lev, t_p, dt_p, a_c, tab_c,
                     sl2, sj2, bu2, bv2, jaw_h, sad, e0, w, phi, cphi, s_tab, lev_off, lev_h, lev_n, log2_s0, lpo,
                     u_max, eps, s_jaw, y_end_lo, y_end_hi):
    """One-dimensional profiles of the maps (see the module docstring).

    ``lu`` (nk, n_p, nl, nU): ``L_p(U_a)`` (or (nk, m, nl, nU):
    the first ``m`` samples' only); ``jy`` (nk, n_p, nY, nl): ``dt_p J(...) / (1 + ...)``, values
    below ``eps`` times the largest of their (k, p, level) set to 0. ``jy_first`` (nk, n_p, nY): first
    level with a nonzero ``jy`` (``nl``: none; wider levels reach farther, so the nonzero levels of a
    row are a suffix). ``L_p`` of a total width below ``s_tab``: the leaf edges' error functions
    (:func:`tomodose._kernels.pencil_beam._phi`, each edge once for all samples); wider: the aperture
    table ``tab_c`` (:func:`tomodose._kernels.pencil_beam._leaf_table`, its positions found once for
    all samples, :func:`_table_positions`). ``y_end_lo, y_end_hi``: the
    medium's ends along the couch coordinate, the same for every voxel (``-+NO_LIMIT``: none); a sample
    whose field reaches them gets the truncated aperture of
    :func:`tomodose._kernels.pencil_beam._medium_cut` (its ends are ``(y_end - t_p) c`` in ``v``,
    independent of the voxel). Parallel over the planes (each writes its own ``lu[k], jy[k]``).
    """
    nk, n_pl, nl, n_u = lu.shape
    n_p = t_p.shape[0]
    n_y = jy.shape[2]
    n_leaves = a_c.shape[1]
    n_lev = lev_off.shape[0]
    for k in numba.prange(nk):
        den = den0 + k * dden
        c = sad / den
        edge = np.empty(n_leaves + 1)
        tb00 = np.empty(n_u, dtype=np.int64)
        tb01 = np.empty(n_u, dtype=np.int64)
        tf0 = np.empty(n_u)
        tb10 = np.empty(n_u, dtype=np.int64)
        tb11 = np.empty(n_u, dtype=np.int64)
        tf1 = np.empty(n_u)
        for j in range(nl):
            su = math.sqrt(sl2 + c * c * (w2_lev[j] + bu2))
            sv = math.sqrt(sj2 + c * c * (w2_lev[j] + bv2))
            if su < s_tab:
                isu = 1.0 / su
                reach = 7.5 * su
                for a in range(n_u):
                    u = u0 + a * hu
                    m_lo = int(math.ceil((u - reach - e0) / w))
                    m_hi = int(math.floor((u + reach - e0) / w))
                    if m_lo < 0:
                        m_lo = 0
                    if m_hi > n_leaves:
                        m_hi = n_leaves
                    for m in range(m_lo, m_hi + 1):
                        edge[m] = _phi((u - (e0 + m * w)) * isu, phi)
                    for p in range(n_pl):
                        ap = a_c[p]
                        # edges below m_lo are saturated (Phi = 1): their jumps sum to a[m_lo - 1]
                        total = ap[m_lo - 1] if 1 <= m_lo <= n_leaves else 0.0
                        for m in range(m_lo, m_hi + 1):
                            right = ap[m] if m < n_leaves else 0.0
                            left = ap[m - 1] if m >= 1 else 0.0
                            if right != left:
                                total += (right - left) * edge[m]
                        lu[k, p, j, a] = total
            else:
                # _leaf_table: levels q0 and q0 + 1 of the table with weights 1 - fq and fq (a zero weight
                # is skipped); the positions in each level are the same for every sample
                q = (math.log2(su) - log2_s0) * lpo
                q0, fq = _level_coordinate(q, n_lev)
                w0 = 1.0 - fq
                _table_positions(u0, hu, n_u, q0, lev_off, lev_h, lev_n, u_max, tb00, tb01, tf0)
                _table_positions(u0, hu, n_u, q0 + 1, lev_off, lev_h, lev_n, u_max, tb10, tb11, tf1)
                for p in range(n_pl):
                    tp = tab_c[p]
                    for a in range(n_u):
                        out = 0.0
                        if w0 != 0.0:
                            out += w0 * (tp[tb00[a]] + tf0[a] * (tp[tb01[a]] - tp[tb00[a]]))
                        if fq != 0.0:
                            out += fq * (tp[tb10[a]] + tf1[a] * (tp[tb11[a]] - tp[tb10[a]]))
                        lu[k, p, j, a] = out
            isv = 1.0 / sv
            lim = jaw_h + PHI_X * s_jaw
            for p in range(n_p):
                # jaw aperture [-jaw_h, jaw_h], or truncated at the medium's ends (as _medium_cut)
                ml = (y_end_lo - t_p[p]) * c if y_end_lo > -NO_LIMIT else -NO_LIMIT
                mr = (y_end_hi - t_p[p]) * c if y_end_hi < NO_LIMIT else NO_LIMIT
                el = -jaw_h
                er = jaw_h
                isl = isv
                isr = isv
                if not (ml <= -lim and mr >= lim):
                    if s_jaw > 0.0:
                        wl = _phi((-jaw_h - ml) / s_jaw, phi)
                        wr = _phi((mr - jaw_h) / s_jaw, phi)
                    else:
                        wl = 1.0 if ml < -jaw_h else 0.0
                        wr = 1.0 if mr > jaw_h else 0.0
                    el = max(-jaw_h, ml)
                    er = min(jaw_h, mr)
                    isl = 1.0 / max(math.sqrt(c * c * (w2_lev[j] + bv2) + wl * sj2), 1e-9)
                    isr = 1.0 / max(math.sqrt(c * c * (w2_lev[j] + bv2) + wr * sj2), 1e-9)
                vmax = 0.0
                for b in range(n_y):
                    yp = y0 + b * hy - t_p[p]
                    v = yp * c
                    jv = _phi((v - el) * isl, phi) - _phi((v - er) * isr, phi)
                    if jv < 0.0:
                        jv = 0.0
                    val = dt_p[p] * jv / (1.0 + yp * yp / (den * den))
                    jy[k, p, b, j] = val
                    if val > vmax:
                        vmax = val
                cut = eps * vmax
                for b in range(n_y):
                    if jy[k, p, b, j] < cut:
                        jy[k, p, b, j] = 0.0
        for p in range(n_p):
            for b in range(n_y):
                f = nl
                for j in range(nl - 1, -1, -1):
                    if jy[k, p, b, j] != 0.0:
                        f = j
                    else:
                        break
                jy_first[k, p, b] = f


@numba.njit(**NUMBA_PARALLEL_OPTIONS)
def fluence_accumulate(maps, lu, jy, jy_first, row_lev):
    """``maps[k, b, a, j] = sum_p lu[k, p, j, a] jy[k, p, b, j]`` (overwritten) for the levels
    ``j >= row_lev[b]`` of each row (0 below: the levels no voxel reads; ``row_lev[b] = nl``: the
    whole row 0), skipping the levels before ``jy_first[k, p, b]``. Layout (plane, Y row, U column,
    level): the voxels of one slice share ``Y`` (jaw axis = patient z), so a slice reads one band of
    each plane, and a voxel's consecutive levels are contiguous. The sum runs level by level over
    ``U`` (vectorised) in a work row, then transposed into the map. Parallel over (plane, Y row):
    disjoint writes, samples summed in a fixed order."""
    nk, n_y, n_u, nl = maps.shape
    n_p = lu.shape[1]
    for kb in numba.prange(nk * n_y):
        k = kb // n_y
        b = kb % n_y
        out = maps[k, b]
        j_min = row_lev[b]
        if j_min >= nl:
            out[:, :] = 0.0
            continue
        m = np.zeros((nl, n_u))
        for p in range(n_p):
            for j in range(max(jy_first[k, p, b], j_min), nl):
                c = jy[k, p, b, j]
                if c == 0.0:
                    continue
                lrow = lu[k, p, j]
                mrow = m[j]
                for a in range(n_u):
                    mrow[a] += c * lrow[a]
        for a in range(n_u):
            for j in range(nl):
                out[a, j] = m[j, a]


@numba.njit(inline="always")
def _node_weights(nodes, idx):
    """Lower / upper node and the upper node's weight of index ``idx`` (as :func:`trilinear_add`)."""
    n = nodes.shape[0]
    if n < 2:
        return 0, 0, 0.0
    a = np.searchsorted(nodes, idx, side="right") - 1
    if a >= n - 1:
        a = n - 2
    if a < 0:
        a = 0
    return a, a + 1, (idx - nodes[a]) / (nodes[a + 1] - nodes[a])


@numba.njit(inline="always")
def _trilinear_at(values, a, a1, fk, b, b1, fj, c, c1, fi):
    """The interpolated value of :func:`tomodose._kernels.pencil_beam.trilinear_add` (same arithmetic)."""
    v0 = ((1 - fi) * values[a, b, c] + fi * values[a, b, c1])
    v1 = ((1 - fi) * values[a, b1, c] + fi * values[a, b1, c1])
    v2 = ((1 - fi) * values[a1, b, c] + fi * values[a1, b, c1])
    v3 = ((1 - fi) * values[a1, b1, c] + fi * values[a1, b1, c1])
    return (1 - fk) * ((1 - fj) * v0 + fj * v1) + fk * ((1 - fj) * v2 + fj * v3)


@numba.njit(inline="always")
def _in_window(u, yy, sc, win, win_u):
    """Voxel inside the cluster's fine window: ``win = (y0, hy, u_lo, u_hi, r_u)``, ``win_u`` (nR, 2):
    the range of the open leaves in each row ``y0 + b hy <= yy < y0 + (b + 1) hy`` (empty rows:
    lo > hi), widened by ``r_u sc`` (``sc = SAD / den``); ``u_lo, u_hi`` bound all rows (widened)."""
    t = (yy - win[0]) / win[1]
    if t < 0.0 or t >= win_u.shape[0]:
        return False
    b = int(t)
    ru = win[4] * sc
    return win_u[b, 0] - ru <= u and u <= win_u[b, 1] + ru


@numba.njit(**NUMBA_OPTIONS)
def _inverse_steps(lat):
    """``(u0, 1 / hu, y0, 1 / hy, den0, 1 / dden)`` of a lattice ``(u0, hu, y0, hy, den0, dden)``."""
    return np.array([lat[0], 1.0 / lat[1], lat[2], 1.0 / lat[3], lat[4], 1.0 / lat[5]])


@numba.njit(inline="always")
def _axis_pos(x, x0, ih, n):
    """Lower lattice index (clamped to [0, n - 2]) and weight of the upper one for ``x`` on ``x0 + m h``
    (``ih = 1 / h``)."""
    t = (x - x0) * ih
    if t < 0.0:
        t = 0.0
    if t > n - 1:
        t = n - 1.0
    m = int(t)
    if m > n - 2:
        m = n - 2
    return m, t - m


#: a couch coordinate within this fraction of a lattice step of a lattice row is read from that row
#: alone (the maps' rows sit on the slices when the jaw axis is the patient z axis).
Y_SNAP = 1e-7


@numba.njit(inline="always")
def _row_pos(y, y0, ih, n):
    """:func:`_axis_pos` along the couch axis, with ``y`` within :data:`Y_SNAP` steps of a row snapped
    onto it (weight of the next row exactly 0: the voxel reads one row); ``ih = 1 / h``."""
    t = (y - y0) * ih
    r = math.floor(t + 0.5)
    if abs(t - r) < Y_SNAP:
        t = r
    if t < 0.0:
        t = 0.0
    if t > n - 1:
        t = n - 1.0
    m = int(t)
    if m > n - 2:
        m = n - 2
    return m, t - m


@numba.njit(inline="always")
def _map_sum(maps, lat, cq, q_min, q_max, u, yy, den):
    """``sum_q cq[q] M_q(u, yy, den)`` for ``q_min <= q <= q_max`` (bilinear in (u, yy), linear between
    the two bracketing planes; ``lat = (u0, 1 / hu, y0, 1 / hy, den0, 1 / dden)``, the inverse steps of
    :func:`_inverse_steps`; a voxel on a lattice row, :func:`_row_pos`, reads that row only), and
    resets those ``cq``."""
    nk, n_y, n_u, nl = maps.shape
    kk, fk = _axis_pos(den, lat[4], lat[5], nk)
    a0, fa = _axis_pos(u, lat[0], lat[1], n_u)
    b0, fb = _row_pos(yy, lat[2], lat[3], n_y)
    w0 = 1.0 - fk
    wa0 = 1.0 - fa
    wb0 = 1.0 - fb
    val = 0.0
    if fb == 0.0:
        m00 = maps[kk, b0]
        m10 = maps[kk + 1, b0]
        for q in range(q_min, q_max + 1):
            x0 = wa0 * m00[a0, q] + fa * m00[a0 + 1, q]
            x1 = wa0 * m10[a0, q] + fa * m10[a0 + 1, q]
            val += cq[q] * (w0 * x0 + fk * x1)
            cq[q] = 0.0
        return val
    m00 = maps[kk, b0]
    m01 = maps[kk, b0 + 1]
    m10 = maps[kk + 1, b0]
    m11 = maps[kk + 1, b0 + 1]
    for q in range(q_min, q_max + 1):
        x0 = wb0 * (wa0 * m00[a0, q] + fa * m00[a0 + 1, q]) + fb * (wa0 * m01[a0, q] + fa * m01[a0 + 1, q])
        x1 = wb0 * (wa0 * m10[a0, q] + fa * m10[a0 + 1, q]) + fb * (wa0 * m11[a0, q] + fa * m11[a0 + 1, q])
        val += cq[q] * (w0 * x0 + fk * x1)
        cq[q] = 0.0
    return val


@numba.njit(inline="always")
def _voxel_maps(maps_f, lat_f, maps_c, lat_c, cq_f, cq_c, i_lo, i_hi, s_g, u, yy, den, amps, tail, k0, f, ext, xtab,
                kx, fx):
    """Sum over the Gaussians ``i_lo <= i < i_hi`` of ``A_i`` times the map value at level ``q = i + s``
    (linear between the two bracketing levels): from the fine maps ``maps_f`` when both levels are
    in it (its levels are the first ``nl_f`` of the coarse maps'), else from the coarse ``maps_c``.
    ``s_g``: the level offset ``s``, (1,) for every Gaussian or (nG,) one per Gaussian (``q = i + s_g[i]``,
    the upstream lateral scaling)."""
    per_gaussian = s_g.shape[0] > 1
    nl_f = maps_f.shape[3]
    nl_c = maps_c.shape[3]
    f_min = nl_c
    f_max = -1
    c_min = nl_c
    c_max = -1
    for i in range(i_lo, i_hi):
        amp = _amplitude(amps, tail, i, k0, f, ext, xtab, kx, fx)
        if amp <= 0.0:
            continue
        q = i + s_g[i if per_gaussian else 0]
        if q < 0.0:
            q = 0.0
        if q > nl_c - 1:
            q = nl_c - 1.0
        q0 = int(q)
        if q0 > nl_c - 2:
            q0 = nl_c - 2
        fq = q - q0
        if q0 + 1 < nl_f:
            cq_f[q0] += amp * (1.0 - fq)
            cq_f[q0 + 1] += amp * fq
            f_min = min(f_min, q0)
            f_max = max(f_max, q0 + 1)
        else:
            cq_c[q0] += amp * (1.0 - fq)
            cq_c[q0 + 1] += amp * fq
            c_min = min(c_min, q0)
            c_max = max(c_max, q0 + 1)
    val = 0.0
    if f_max >= 0:
        val += _map_sum(maps_f, lat_f, cq_f, f_min, f_max, u, yy, den)
    if c_max >= 0:
        val += _map_sum(maps_c, lat_c, cq_c, c_min, c_max, u, yy, den)
    return val


#: the slice loops visit the slices in this many interleaved passes (``_spread``), so that each
#: thread's contiguous share of the loop holds slices from the whole grid (the window voxels are
#: concentrated in the slices near the target: a contiguous split leaves one thread idle).
SPREAD = 8


@numba.njit(inline="always")
def _spread(m, n):
    """Index visited at loop position ``m`` of ``n``: residues 0, 1, ... of :data:`SPREAD` in turn
    (0, 8, 16, ..., 1, 9, ...): a permutation of ``0 .. n - 1``."""
    q = n // SPREAD
    rem = n - q * SPREAD  # residues r < rem hold q + 1 indices, the others q
    big = rem * (q + 1)
    if m < big:
        return m % (q + 1) * SPREAD + m // (q + 1)
    return (m - big) % q * SPREAD + rem + (m - big) // q


@numba.njit(inline="always")
def _level_sum(maps, lat, amp, i_a, i_b, s0, fq, u, yy, den):
    """``sum_{i_a <= i < i_b} amp[i] ((1 - fq) M(i + s0) + fq M(i + s0 + 1))`` on ``maps`` (as
    :func:`_map_sum`): one pass over the levels ``i_a + s0 .. i_b + s0``, each read once with the
    weight ``(1 - fq) amp[i] + fq amp[i - 1]`` (the Gaussians share the level fraction ``fq``); the
    first and last level outside the loop, so that its body has no branch and the levels, contiguous
    in the maps, are read as vectors."""
    if i_b <= i_a:
        return 0.0
    nk, n_y, n_u, nl = maps.shape
    kk, fk = _axis_pos(den, lat[4], lat[5], nk)
    a0, fa = _axis_pos(u, lat[0], lat[1], n_u)
    b0, fb = _row_pos(yy, lat[2], lat[3], n_y)
    g = 1.0 - fq
    q_a = i_a + s0
    q_b = i_b + s0
    if fb == 0.0:
        r00 = maps[kk, b0, a0]
        r01 = maps[kk, b0, a0 + 1]
        r10 = maps[kk + 1, b0, a0]
        r11 = maps[kk + 1, b0, a0 + 1]
        w00 = (1.0 - fk) * (1.0 - fa)
        w01 = (1.0 - fk) * fa
        w10 = fk * (1.0 - fa)
        w11 = fk * fa
        val = g * amp[i_a] * (w00 * r00[q_a] + w01 * r01[q_a] + w10 * r10[q_a] + w11 * r11[q_a])
        for i in range(i_a + 1, i_b):
            q = i + s0
            val += (g * amp[i] + fq * amp[i - 1]) * (w00 * r00[q] + w01 * r01[q] + w10 * r10[q] + w11 * r11[q])
        val += fq * amp[i_b - 1] * (w00 * r00[q_b] + w01 * r01[q_b] + w10 * r10[q_b] + w11 * r11[q_b])
        return val
    r00 = maps[kk, b0, a0]
    r01 = maps[kk, b0, a0 + 1]
    r02 = maps[kk, b0 + 1, a0]
    r03 = maps[kk, b0 + 1, a0 + 1]
    r10 = maps[kk + 1, b0, a0]
    r11 = maps[kk + 1, b0, a0 + 1]
    r12 = maps[kk + 1, b0 + 1, a0]
    r13 = maps[kk + 1, b0 + 1, a0 + 1]
    w0 = 1.0 - fk
    wa0 = 1.0 - fa
    wb0 = 1.0 - fb
    val = 0.0
    for i in range(i_a, i_b + 1):
        cur = amp[i] if i < i_b else 0.0
        prev = amp[i - 1] if i > i_a else 0.0
        q = i + s0
        x0 = wb0 * (wa0 * r00[q] + fa * r01[q]) + fb * (wa0 * r02[q] + fa * r03[q])
        x1 = wb0 * (wa0 * r10[q] + fa * r11[q]) + fb * (wa0 * r12[q] + fa * r13[q])
        val += (g * cur + fq * prev) * (w0 * x0 + fk * x1)
    return val


@numba.njit(inline="always")
def _voxel_levels(maps_f, lat_f, maps_c, lat_c, cq_f, cq_c, amp, i_lo, i_hi, s_g, u, yy, den, amps, tail, k0, f, ext,
                  xtab,
                  kx, fx):
    """:func:`_voxel_maps` (same value, other rounding order) in one pass per map set: the
    amplitudes of all Gaussians first (``amp`` scratch, negative ones as 0), then the fine levels of
    the Gaussians ``i < nl_f - 1 - floor(s)`` and the coarse levels of the rest. Levels outside the
    maps (clamped in :func:`_voxel_maps`) fall back to it. ``s_g``: the voxel's level offset, (1,)
    (every Gaussian) or (nG,) per Gaussian (the upstream lateral scaling: no shared level fraction,
    always :func:`_voxel_maps`)."""
    nl_f = maps_f.shape[3]
    nl_c = maps_c.shape[3]
    s = s_g[0]
    s0 = int(math.floor(s))
    if s_g.shape[0] > 1 or s0 < 0 or s0 + i_hi > nl_c - 1 or i_hi <= i_lo:
        return _voxel_maps(maps_f, lat_f, maps_c, lat_c, cq_f, cq_c, i_lo, i_hi, s_g, u, yy, den, amps, tail, k0, f,
                           ext, xtab, kx, fx)
    fq = s - s0
    for i in range(i_lo, i_hi):
        a = amps[k0, i] + f * (amps[k0 + 1, i] - amps[k0, i])
        amp[i] = a if a > 0.0 else 0.0
    if ext > 0.0:
        for i in range(i_lo, i_hi):
            amp[i] *= tail[i] ** ext
    for i in range(i_lo, i_hi):
        amp[i] *= 1.0 - (xtab[kx, i] + fx * (xtab[kx + 1, i] - xtab[kx, i]))
    i_f = nl_f - 1 - s0
    if i_f < i_lo:
        i_f = i_lo
    if i_f > i_hi:
        i_f = i_hi
    return (_level_sum(maps_f, lat_f, amp, i_lo, i_f, s0, fq, u, yy, den)
            + _level_sum(maps_c, lat_c, amp, i_f, i_hi, s0, fq, u, yy, den))


@numba.njit(**NUMBA_PARALLEL_OPTIONS)
def fluence_lookup(out, ks, js, is_, depth_t, exit_t, xtab, lvl_t, rho_t, origin, spacing, s0, xg, yg, zg, t_p, dt_p,
                   a_c, tab_c,
                   win, win_u, maps_f, lat_f, maps_c, lat_c, sad, amps, dz_tab, tail, sig, e0, w, s_leaf, s_tab,
                   lev_off, lev_h, lev_n, log2_s0, lpo, u_max, jaw_h, s_jaw, offc, soft, phi, cphi, vavg, zcol,
                   check_ends, node_vals, nks, njs, nis):
    """Dose of all samples of one cluster, all Gaussians, read from the maps, at the voxels
    ``ks x js x is_`` inside the window ``win`` (:func:`_in_window`), added to ``out`` (ks.size, js.size,
    is_.size), minus the trilinear interpolation (:func:`tomodose._kernels.pencil_beam.trilinear_add`) of
    this cluster's coarse node values ``node_vals`` (given at ``nks x njs x nis``) at the voxel, which
    the caller adds to every voxel later: a voxel inside the window thus gets the map value only.

    ``lvl_t`` (ny, nx, nz, 1 or nG): level offset ``s`` of every voxel (``log(1 / rho) / log r`` minus the
    maps' first level). A voxel whose jaw aperture may be truncated by the medium's ends for some
    sample (an end of its column within ``jaw_h + PHI_X s_jaw`` of a sample's field,
    :func:`tomodose._kernels.pencil_beam._medium_cut`) is evaluated exactly instead
    (:func:`tomodose._kernels.pencil_beam._cluster_row`). Parallel over slices (disjoint writes,
    fixed order). ``check_ends`` False: no voxel's aperture can be truncated (the caller checked the
    medium's ends against the samples' fields), the test is skipped."""
    nx = lvl_t.shape[1]
    lat_f = _inverse_steps(lat_f)
    lat_c = _inverse_steps(lat_c)
    # node bracket of every column index (as _node_weights)
    ni_lo = np.empty(nx, dtype=np.int64)
    ni_w = np.empty(nx)
    for ii in range(nx):
        ia, ib, fi_n = _node_weights(nis, ii)
        ni_lo[ii] = ia
        ni_w[ii] = fi_n
    n_g = sig.shape[1]
    hu_v = _half_width(xg, spacing, vavg)
    hv_v = _half_width(yg, spacing, vavg)
    t_min = t_p.min()
    t_max = t_p.max()
    lim = jaw_h + PHI_X * s_jaw
    n_s = t_p.shape[0]
    free_lo = np.full(n_s, -NO_LIMIT)
    free_hi = np.full(n_s, NO_LIMIT)
    for mm in numba.prange(ks.shape[0]):
        aa = _spread(mm, ks.shape[0])
        k = ks[aa]
        ka, kb, fk_n = _node_weights(nks, k)
        cq_f = np.zeros(maps_f.shape[3])
        cq_c = np.zeros(maps_c.shape[3])
        amp_l = np.zeros(n_g)
        (amp_v, isv_v, hj_v, su2_v, lu_v, lu_i, kind_v, lam_v, l0_v, nl_v,
         tb_v) = cluster_row_scratch(n_g)
        pz = origin[2] + k * spacing[2]
        for bb in range(js.shape[0]):
            j = js[bb]
            ja, jb, fj_n = _node_weights(njs, j)
            py = origin[1] + j * spacing[1]
            d0x = origin[0] - s0[0]
            dy0 = py - s0[1]
            dz0 = pz - s0[2]
            i0, i1 = _row_range(win[2], win[3], (d0x * xg[0] + dy0 * xg[1] + dz0 * xg[2], spacing[0] * xg[0]),
                                (-(d0x * zg[0] + dy0 * zg[1] + dz0 * zg[2]), -spacing[0] * zg[0]), sad, nx)
            if i1 < i0:
                continue
            m0 = np.searchsorted(is_, i0)
            m1 = np.searchsorted(is_, i1, side="right") - 1
            for cc in range(m0, m1 + 1):
                ii = is_[cc]
                dx0 = origin[0] + ii * spacing[0] - s0[0]
                den = -(dx0 * zg[0] + dy0 * zg[1] + dz0 * zg[2])
                if den <= 0.0:
                    continue
                xx = dx0 * xg[0] + dy0 * xg[1] + dz0 * xg[2]
                yy = dx0 * yg[0] + dy0 * yg[1] + dz0 * yg[2]
                sc = sad / den
                u = xx * sc
                if not _in_window(u, yy, sc, win, win_u):
                    continue
                ia = ni_lo[ii]
                ib = ia + 1 if nis.shape[0] > 1 else ia
                out[aa, bb, cc] -= _trilinear_at(node_vals, ka, kb, fk_n, ja, jb, fj_n, ia, ib, ni_w[ii])
                exact = False
                if check_ends:
                    bl, br = _medium_offsets(zcol, j, ii, pz, yg[2], sc)
                    exact = (yy - t_min) * sc + bl > -lim or (yy - t_max) * sc + br < lim
                if exact:
                    _cluster_row(out[aa, bb], is_, cc, cc, j, k, origin, spacing, depth_t, exit_t, xtab, rho_t, s0,
                                 xg, yg,
                                 zg, t_p,
                                 dt_p, a_c, tab_c, free_lo, free_hi, NO_LIMIT, NO_LIMIT, 0.0, NO_LIMIT, NO_LIMIT, 0.0,
                                 0, n_g, sad, amps, dz_tab, tail, sig, e0, w, s_leaf, s_tab, lev_off, lev_h, lev_n,
                                 log2_s0, lpo, u_max, jaw_h, s_jaw, offc, soft, phi, cphi, hu_v, hv_v, zcol, amp_v,
                                 isv_v, hj_v, su2_v, lu_v, lu_i, kind_v, lam_v, l0_v, nl_v, tb_v)
                    continue
                off, hsoft, k0, f, ext = _offaxis_and_depth(u, sad, soft, offc, depth_t[j, ii, k], dz_tab,
                                                            amps.shape[0])
                kx, fx = _exit_pos(exit_t[j, ii, k], xtab.shape[0])
                val = _voxel_levels(maps_f, lat_f, maps_c, lat_c, cq_f, cq_c, amp_l, 0, n_g, lvl_t[j, ii, k], u, yy,
                                    den, amps, tail, k0, f, ext, xtab, kx, fx)
                out[aa, bb, cc] += val * hsoft * off * sad * sad / (den * den + xx * xx)


@numba.njit(**NUMBA_PARALLEL_OPTIONS)
def coarse_lookup(out, ks, js, is_, depth_t, exit_t, xtab, lvl_t, rho_t, origin, spacing, s0, xg, yg, zg, t_p, dt_p,
                  a_c, tab_c, win,
                  win_u, g_fine, maps_c, lat_c, sad, amps, dz_tab, tail, sig, e0, w, s_leaf, s_tab, lev_off, lev_h,
                  lev_n, log2_s0, lpo, u_max, jaw_h, s_jaw, offc, soft, phi, cphi, vavg, zcol, check_ends):
    """Coarse level of one cluster at the nodes ``ks x js x is_``, added to ``out`` (ks.size, js.size,
    is_.size): all Gaussians at a node outside the window ``win``, the Gaussians ``i >= g_fine`` at a
    node inside it (the window test of :func:`fluence_lookup`, same arithmetic), read from the coarse
    maps; nodes whose jaw aperture may be truncated by the medium's ends are evaluated exactly
    (:func:`tomodose._kernels.pencil_beam._cluster_row`, same Gaussians; ``check_ends`` as in
    :func:`fluence_lookup`). Parallel over slices."""
    n_g = sig.shape[1]
    hu_v = _half_width(xg, spacing, vavg)
    hv_v = _half_width(yg, spacing, vavg)
    t_min = t_p.min()
    t_max = t_p.max()
    lim = jaw_h + PHI_X * s_jaw
    n_s = t_p.shape[0]
    free_lo = np.full(n_s, -NO_LIMIT)
    free_hi = np.full(n_s, NO_LIMIT)
    empty = np.zeros((2, 2, 2, 0))
    lat_c = _inverse_steps(lat_c)
    for aa in numba.prange(ks.shape[0]):
        k = ks[aa]
        cq_f = np.zeros(0)
        cq_c = np.zeros(maps_c.shape[3])
        amp_l = np.zeros(n_g)
        (amp_v, isv_v, hj_v, su2_v, lu_v, lu_i, kind_v, lam_v, l0_v, nl_v,
         tb_v) = cluster_row_scratch(n_g)
        pz = origin[2] + k * spacing[2]
        for bb in range(js.shape[0]):
            j = js[bb]
            py = origin[1] + j * spacing[1]
            dy0 = py - s0[1]
            dz0 = pz - s0[2]
            for cc in range(is_.shape[0]):
                ii = is_[cc]
                dx0 = origin[0] + ii * spacing[0] - s0[0]
                den = -(dx0 * zg[0] + dy0 * zg[1] + dz0 * zg[2])
                if den <= 0.0:
                    continue
                xx = dx0 * xg[0] + dy0 * xg[1] + dz0 * xg[2]
                yy = dx0 * yg[0] + dy0 * yg[1] + dz0 * yg[2]
                sc = sad / den
                u = xx * sc
                g_lo = g_fine if _in_window(u, yy, sc, win, win_u) else 0
                exact = False
                if check_ends:
                    bl, br = _medium_offsets(zcol, j, ii, pz, yg[2], sc)
                    exact = (yy - t_min) * sc + bl > -lim or (yy - t_max) * sc + br < lim
                if exact:
                    _cluster_row(out[aa, bb], is_, cc, cc, j, k, origin, spacing, depth_t, exit_t, xtab, rho_t, s0,
                                 xg, yg,
                                 zg, t_p,
                                 dt_p, a_c, tab_c, free_lo, free_hi, NO_LIMIT, NO_LIMIT, 0.0, NO_LIMIT, NO_LIMIT, 0.0,
                                 g_lo, n_g, sad, amps, dz_tab, tail, sig, e0, w, s_leaf, s_tab, lev_off, lev_h, lev_n,
                                 log2_s0, lpo, u_max, jaw_h, s_jaw, offc, soft, phi, cphi, hu_v, hv_v, zcol, amp_v,
                                 isv_v, hj_v, su2_v, lu_v, lu_i, kind_v, lam_v, l0_v, nl_v, tb_v)
                    continue
                off, hsoft, k0, f, ext = _offaxis_and_depth(u, sad, soft, offc, depth_t[j, ii, k], dz_tab,
                                                            amps.shape[0])
                kx, fx = _exit_pos(exit_t[j, ii, k], xtab.shape[0])
                val = _voxel_levels(empty, lat_c, maps_c, lat_c, cq_f, cq_c, amp_l, g_lo, n_g, lvl_t[j, ii, k], u, yy, den,
                                  amps, tail, k0, f, ext, xtab, kx, fx)
                out[aa, bb, cc] += val * hsoft * off * sad * sad / (den * den + xx * xx)


@numba.njit(**NUMBA_OPTIONS)
def aperture_tables(out, a_c, used, btab):
    """``out[p] = sum_l a_c[p, used[l]] btab[used[l]]`` (the leaf-weighted aperture tables of a
    cluster's samples; ``out`` (n_p, n_pts) overwritten), in a fixed order."""
    n_p, n_pts = out.shape
    for p in range(n_p):
        row = out[p]
        row[:] = 0.0
        for m in range(used.shape[0]):
            c = a_c[p, used[m]]
            if c == 0.0:
                continue
            src = btab[used[m]]
            for t in range(n_pts):
                row[t] += c * src[t]
