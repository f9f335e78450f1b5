"""numba kernels of the pencil-beam engine (plain arrays and scalars in, arrays out; no validation).

Geometry of one projection sample: source ``src`` (3,), gantry axes ``xg, yg, zg`` (3,) in LPS mm.
A voxel centre ``P`` has ``d = P - src``, ``den = -(d . zg)`` (distance along the central axis),
isocentre-plane coordinates ``u = SAD (d . xg) / den`` (leaf axis) and ``v = SAD (d . yg) / den``
(jaw axis) and source distance ``r = |d|``.

Dose of one sample at a voxel (see ``docs/pencil_beam.md``)::

    dt * (SAD / r)^2 * O(theta) * h * sum_i A_i(h * d_rad) * J_i(v) * L_i(u)

with ``A_i`` the depth-dependent amplitudes of the Gaussian pencil kernel (cm2/g), ``d_rad`` the
radiological depth (mm water), ``h = 1 + softening |theta|``, ``J_i`` the jaw profile convolved
with Gaussian ``i`` and ``L_i`` the leaf-weighted aperture convolved with it; the Gaussian width in
isocentre-plane mm is ``sigma_i / rho_lat * SAD / den``.

``L_i`` is evaluated directly from the leaf edges (error functions through a lookup table) when its
total width is below ``s_tab``; wider ones are read from a table of leaf apertures convolved with a
ladder of Gaussian widths (``tab``: per level ``q`` the points ``u = -u_max + j * h_q``), linear in
``u`` and in ``log2(s)``. Both forms are linear in the leaf weights ``a``, so the full-plan dose and
the influence matrix use exactly the same arithmetic.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from tomodose._kernels.profiles import offaxis_polynomial
from tomodose._kernels.raytrace import trace_segments
from tomodose.config import NUMBA_OPTIONS, NUMBA_PARALLEL_OPTIONS

#: reaches at or beyond this (mm) mean "no limit" (finite: the kernels avoid infinities).
NO_LIMIT = 1e8
#: Phi lookup table: x in [-PHI_X, PHI_X] with PHI_PER_UNIT points per unit.
PHI_X = 8.0
PHI_PER_UNIT = 512


def phi_table() -> np.ndarray:
    """Standard normal CDF on ``x = -PHI_X + j / PHI_PER_UNIT`` (float64), ``j = 0 .. 2 PHI_X PHI_PER_UNIT + 1``.

    The first entry is exactly 0 and the last two exactly 1 (``Phi(-8) = 6e-16``): :func:`_phi`
    clamps instead of branching and then returns exactly 0 / 1 beyond the table, and the extra last
    entry lets it read ``phi[j + 1]`` at the clamp.
    """
    from scipy.special import ndtr

    x = np.arange(int(2 * PHI_X * PHI_PER_UNIT) + 2) / PHI_PER_UNIT - PHI_X
    out = ndtr(x)
    out[0] = 0.0
    out[-2:] = 1.0
    return out


def phi_integral_table(phi: np.ndarray) -> np.ndarray:
    """Running integral of the piecewise-linear :func:`phi_table` from ``-PHI_X`` to each table point
    (trapezoids: exact for the linear interpolant), same length as ``phi``."""
    out = np.zeros(phi.shape[0])
    out[1:] = np.cumsum(0.5 * (phi[1:] + phi[:-1])) / PHI_PER_UNIT
    return out


@numba.njit(**NUMBA_OPTIONS)
def _phi(x, phi):
    """Phi(x) by linear interpolation in :func:`phi_table` (error 1.2e-7); 0 / 1 beyond +-PHI_X.

    Branch-free (clamp, then interpolate): the argument's side of the table is unpredictable in
    the dose loops, and a mispredicted branch cost more than the lookup (20 % of the clustered
    kernel's time).
    """
    t = (x + PHI_X) * PHI_PER_UNIT
    t = min(max(t, 0.0), 2.0 * PHI_X * PHI_PER_UNIT)
    j = int(t)
    f = t - j
    return phi[j] + f * (phi[j + 1] - phi[j])


#: below this half-width (in units of the Gaussian width) :func:`_phi_mean` returns the centre value
#: (they differ by less than 1e-9 there; the difference of two integrals would lose digits instead).
MIN_MEAN_HALF = 1e-4


@numba.njit(inline="always", **NUMBA_OPTIONS)
def _phi_int(x, phi, cphi):
    """Integral from minus infinity to ``x`` of the interpolated Phi of :func:`_phi`: exact for the
    piecewise-linear table (quadratic inside a table interval), 0 below the table and ``x`` - const
    above it (Phi = 1 there). Branch-free like :func:`_phi`."""
    t = (x + PHI_X) * PHI_PER_UNIT
    t = min(max(t, 0.0), 2.0 * PHI_X * PHI_PER_UNIT)
    j = int(t)
    f = t - j
    p0 = phi[j]
    return cphi[j] + f * (p0 + 0.5 * f * (phi[j + 1] - p0)) * (1.0 / PHI_PER_UNIT) + max(x - PHI_X, 0.0)


@numba.njit(inline="always", **NUMBA_OPTIONS)
def _phi_mean(x, half, phi, cphi):
    """Mean of the interpolated Phi over ``[x - half, x + half]`` (``half`` >= 0, in Gaussian widths):
    the box (voxel) average of a Gaussian-blurred edge, closed form (difference of
    :func:`_phi_int`); the centre value :func:`_phi` for ``half < MIN_MEAN_HALF``."""
    if half < MIN_MEAN_HALF:
        return _phi(x, phi)
    return (_phi_int(x + half, phi, cphi) - _phi_int(x - half, phi, cphi)) / (2.0 * half)


@numba.njit(**NUMBA_OPTIONS)
def _half_width(ax, spacing, vavg):
    """Half-width (mm, at the voxel; times ``SAD / den`` for the isocentre plane) of the box of equal
    variance of a voxel projected on the unit axis ``ax``: ``0.5 sqrt(sum_c (ax_c d_c)^2)`` (the
    voxel's own half-size for an axis-aligned ``ax``, as the voxel-averaged TERMA), times ``vavg``
    (0: centre sampling)."""
    if vavg == 0.0:
        return 0.0
    return vavg * 0.5 * math.sqrt((ax[0] * spacing[0]) ** 2 + (ax[1] * spacing[1]) ** 2 + (ax[2] * spacing[2]) ** 2)


@numba.njit(**NUMBA_OPTIONS)
def _log2_total_width(su2, sl2, au, log2_su, x_small):
    """log2 of the table width ``sqrt(su2 + sl2 + au^2 / 3)``: the Gaussian ``su``, the leaf edge ``sl``
    and the box of half-width ``au`` (variance ``au^2 / 3``; the table's apertures are averaged over
    the voxel in this equal-variance form, see docs/pencil_beam.md). ``au = 0``: the two-term series
    in ``x_small = sl2 / su2`` of the centre-sampled model (unchanged arithmetic)."""
    if au > 0.0:
        return 0.5 * math.log2(su2 + sl2 + au * au * (1.0 / 3.0))
    return log2_su + 0.5 * _INV_LN2 * (x_small - 0.5 * x_small * x_small)


@numba.njit(**NUMBA_OPTIONS)
def _medium_offsets(zcol, j, i, pz, yg_z, sc):
    """Offsets ``(bl, br)`` (isocentre-plane mm, ``bl <= br``) from the voxel's ``v`` to the medium's
    longitudinal ends ``zcol[j, i] = (z_lo, z_hi)`` (LPS z, mm) of its column, seen at the voxel's
    distance (``sc = SAD / den``); ``(-NO_LIMIT, NO_LIMIT)`` when the jaw axis has no z component
    or the ends are open (``|z| >= NO_LIMIT``)."""
    z_lo = zcol[j, i, 0]
    z_hi = zcol[j, i, 1]
    if abs(yg_z) < 1e-12 or z_lo <= -NO_LIMIT or z_hi >= NO_LIMIT:
        return -NO_LIMIT, NO_LIMIT
    t1 = (z_lo - pz) * yg_z * sc
    t2 = (z_hi - pz) * yg_z * sc
    if t1 <= t2:
        return t1, t2
    return t2, t1


@numba.njit(**NUMBA_OPTIONS)
def _medium_cut(v, jaw_h, s_jaw, bl, br, phi):
    """Jaw aperture truncated at the medium's ends (pencils beyond them cross no matter and carry no
    dose): returns ``(cut, el, wl, er, wr)``. ``cut`` False: an end lies where the jaw fluence is
    exactly 0 (beyond ``jaw_h + PHI_X s_jaw``), the plain jaw profile applies. Otherwise the
    aperture is ``[el, er]`` with ``el = max(-jaw_h, v + bl)``, ``er = min(jaw_h, v + br)``, each edge
    blurred by the kernel Gaussian and ``w`` x the jaw penumbra variance, ``w = Phi(distance by
    which the jaw edge lies inside the medium end / s_jaw)``: 1 where the jaw edge limits, 0 where
    the medium's (sharp) end does (exact in both limits; a blend within a few ``s_jaw``)."""
    lim = jaw_h + PHI_X * s_jaw
    ml = v + bl
    mr = v + br
    if ml <= -lim and mr >= lim:
        return False, -jaw_h, 1.0, jaw_h, 1.0
    if s_jaw > 0.0:
        wl = _phi((-jaw_h - ml) / s_jaw, phi)
        wr = _phi((mr - jaw_h) / s_jaw, phi)
    else:
        wl = 1.0 if ml < -jaw_h else 0.0
        wr = 1.0 if mr > jaw_h else 0.0
    return True, max(-jaw_h, ml), wl, min(jaw_h, mr), wr


@numba.njit(**NUMBA_OPTIONS)
def _jaw_cut_value(v, su2, sj2, el, wl, er, wr, av, phi, cphi):
    """Jaw term of one Gaussian (variance ``su2``) for the truncated aperture of :func:`_medium_cut`,
    averaged over ``[v - av, v + av]``."""
    sl = math.sqrt(su2 + wl * sj2)
    sr = math.sqrt(su2 + wr * sj2)
    if sl < 1e-9:
        sl = 1e-9
    if sr < 1e-9:
        sr = 1e-9
    return _phi_mean((v - el) / sl, av / sl, phi, cphi) - _phi_mean((v - er) / sr, av / sr, phi, cphi)


@numba.njit(**NUMBA_OPTIONS)
def _leaf_direct(u, s, a, e0, w, phi, cphi, au):
    """sum_l a_l [Phi((u - e_l)/s) - Phi((u - e_{l+1})/s)] with edges e_m = e0 + m w, each edge
    averaged over ``[u - au, u + au]`` (:func:`_phi_mean`; ``au = 0``: at ``u``)."""
    n = a.shape[0]
    reach = 7.5 * s + au
    hs = au / s
    m_lo = int(math.ceil((u - reach - e0) / w))
    m_hi = int(math.floor((u + reach - e0) / w))
    if m_lo < 0:
        m_lo = 0
    if m_hi > n:
        m_hi = n
    # saturated edges below m_lo: sum of jumps = a[m_lo - 1]
    if m_lo >= 1:
        total = a[m_lo - 1] if m_lo - 1 < n else 0.0
    else:
        total = 0.0
    for m in range(m_lo, m_hi + 1):
        right = a[m] if m < n else 0.0
        left = a[m - 1] if m >= 1 else 0.0
        jump = right - left
        if jump != 0.0:
            total += jump * _phi_mean((u - (e0 + m * w)) / s, hs, phi, cphi)
    return total


@numba.njit(**NUMBA_OPTIONS)
def _level_coordinate(q, n_lev):
    """Lower table level ``q0`` and weight ``f`` of the upper one for level coordinate ``q`` (clamped)."""
    if q <= 0.0:
        return 0, 0.0
    if q >= n_lev - 1:
        return n_lev - 2, 1.0
    q0 = int(q)
    return q0, q - q0


@numba.njit(**NUMBA_OPTIONS)
def _level_position(u, u_max, lev_off, lev_h, lev_n, lq):
    """Table column ``base`` and weight ``fu`` of ``base + 1`` for position ``u`` (mm) in level ``lq``
    (clamped to the level's ends)."""
    xq = (u + u_max) * lev_h[lq]
    nq = lev_n[lq]
    if xq <= 0.0:
        return lev_off[lq], 0.0
    if xq >= nq - 1:
        return lev_off[lq] + nq - 2, 1.0
    jj = int(xq)
    return lev_off[lq] + jj, xq - jj


@numba.njit(**NUMBA_OPTIONS)
def _leaf_table(u, q, tab, lev_off, lev_h, lev_n, u_max):
    """Linear interpolation of the aperture table in u and in the level coordinate ``q``
    (``lev_h``: inverse u step of each level, 1/mm)."""
    q0, f = _level_coordinate(q, lev_off.shape[0])
    out = 0.0
    for dq in range(2):
        wq = (1.0 - f) if dq == 0 else f
        if wq == 0.0:
            continue
        lq = q0 + dq
        x = (u + u_max) * lev_h[lq]
        nq = lev_n[lq]
        if x <= 0.0:
            val = tab[lev_off[lq]]
        elif x >= nq - 1:
            val = tab[lev_off[lq] + nq - 1]
        else:
            j = int(x)
            fu = x - j
            base = lev_off[lq] + j
            val = tab[base] + fu * (tab[base + 1] - tab[base])
        out += wq * val
    return out


_INV_LN2 = 1.0 / math.log(2.0)

#: step (mm of water) of the exit-distance table ``xtab`` (``PencilKernel.exit_deficit``)
EXIT_DT_MM = 2.5


@numba.njit(**NUMBA_OPTIONS)
def _offaxis_and_depth(u, sad, soft, offc, d_rad, dz_tab, nzt):
    """Per-voxel terms that do not depend on the Gaussian.

    Returns the off-axis fluence factor ``O(theta)``, the softening factor ``1 + soft |theta|``
    and the position in the depth table of the softened radiological depth: row ``k0``, fraction
    ``f`` and the extrapolation ``ext`` (rows beyond the table, 0 inside it).
    """
    at = abs(math.atan(u / sad))
    hsoft = 1.0 + soft * at
    off = offaxis_polynomial(at, offc)
    t = hsoft * d_rad / dz_tab - 0.5
    ext = 0.0
    if t <= 0.0:
        k0 = 0
        f = 0.0
    elif t >= nzt - 1:
        k0 = nzt - 2
        f = 1.0
        ext = t - (nzt - 1)
    else:
        k0 = int(t)
        f = t - k0
    return off, hsoft, k0, f, ext


@numba.njit(**NUMBA_OPTIONS)
def _exit_pos(t_exit, nxt):
    """Row ``kx`` and fraction ``fx`` of the exit distance ``t_exit`` (mm of water) in an exit table of
    ``nxt`` rows (step :data:`EXIT_DT_MM`), clamped to the table (its last row applies beyond it)."""
    return _level_coordinate(t_exit * (1.0 / EXIT_DT_MM), nxt)


@numba.njit(**NUMBA_OPTIONS)
def _amplitude(amps, tail, i, k0, f, ext, xtab, kx, fx):
    """Amplitude of Gaussian ``i`` at depth-table position (k0, f), with the exponential tail beyond it,
    times ``1 - x_i`` of the exit table ``xtab`` (nt, nG) at position (kx, fx) (missing backscatter)."""
    amp = amps[k0, i] + f * (amps[k0 + 1, i] - amps[k0, i])
    if ext > 0.0:
        amp *= tail[i] ** ext
    return amp * (1.0 - (xtab[kx, i] + fx * (xtab[kx + 1, i] - xtab[kx, i])))


@numba.njit(inline="always", **NUMBA_OPTIONS)
def _lateral_scale(sad, rho, den):
    """``(lat, log2(lat))``: isocentre-plane mm per mm of water of a Gaussian scaled laterally by the
    water-equivalent density ``rho`` at the source distance ``den`` (mm; ``sad`` mm), and its log2 (the
    width-ladder level offset of the aperture tables)."""
    lat = sad / (rho * den)
    return lat, math.log2(lat)


@numba.njit(**NUMBA_OPTIONS)
def voxel_value(u, v, r, den, d_rad, t_exit, xtab, rho_g, leaf, sad, amps, dz_tab, tail, sig, a, tab, e0, w, s_leaf,
                s_tab, lev_off, lev_h, lev_n, log2_s0, lpo, u_max, jaw_h, s_jaw, offc, soft, phi, cphi, au, av,
                bl, br):
    """Dose per unit time of one sample at one voxel (cm2/g per unit energy-fluence rate).

    ``sig`` is (2, nG): Gaussian widths (mm of water) and their log2. ``rho_g`` (nG,) or (1,): the
    density that scales each Gaussian laterally (one value: all Gaussians). ``leaf >= 0``: a single leaf
    with unit weight (``a`` must then be its unit vector; same value as the general sum);
    ``leaf < 0``: the leaf weights ``a``. ``au, av``: half-widths (isocentre-plane mm) of the
    voxel along the leaf and jaw axes: the jaw profile and the leaf profiles are averaged over
    ``[u - au, u + au] x [v - av, v + av]`` (closed form, :func:`_phi_mean`; the aperture-table
    Gaussians in the equal-variance form, :func:`_log2_total_width`); 0: sampled at ``(u, v)``.
    ``bl, br``: offsets of the medium's longitudinal ends (:func:`_medium_offsets`); the pencils
    beyond them carry no dose (:func:`_medium_cut`).
    """
    off, hsoft, k0, f, ext = _offaxis_and_depth(u, sad, soft, offc, d_rad, dz_tab, amps.shape[0])
    kx, fx = _exit_pos(t_exit, xtab.shape[0])
    per_gaussian = rho_g.shape[0] > 1
    lat, log2_lat = _lateral_scale(sad, rho_g[0], den)
    sj2 = s_jaw * s_jaw
    sl2 = s_leaf * s_leaf
    st2 = s_tab * s_tab
    cut, el, wl, er, wr = _medium_cut(v, jaw_h, s_jaw, bl, br, phi)
    total = 0.0
    for i in range(sig.shape[1]):
        amp = _amplitude(amps, tail, i, k0, f, ext, xtab, kx, fx)
        if amp <= 0.0:
            continue
        if per_gaussian:
            lat, log2_lat = _lateral_scale(sad, rho_g[i], den)
        su = sig[0, i] * lat
        su2 = su * su
        if cut:
            jv = _jaw_cut_value(v, su2, sj2, el, wl, er, wr, av, phi, cphi)
        else:
            sv = math.sqrt(su2 + sj2)
            if sv < 1e-9:
                sv = 1e-9
            isv = 1.0 / sv
            hj = av * isv
            jv = _phi_mean((v + jaw_h) * isv, hj, phi, cphi) - _phi_mean((v - jaw_h) * isv, hj, phi, cphi)
        if jv <= 0.0:
            continue
        s2 = su2 + sl2
        if s2 < st2:
            sl = math.sqrt(s2)
            if sl < 1e-9:
                sl = 1e-9
            if leaf >= 0:
                isl = 1.0 / sl
                hl = au * isl
                e_leaf = e0 + leaf * w
                lu = (_phi_mean((u - e_leaf) * isl, hl, phi, cphi)
                      - _phi_mean((u - e_leaf - w) * isl, hl, phi, cphi))
            else:
                lu = _leaf_direct(u, sl, a, e0, w, phi, cphi, au)
        else:
            # log2(sqrt(su2 + sl2)) = log2(su) + 0.5 log2(1 + x), x = sl2 / su2 <= (s_leaf / s_tab)^2
            lg = _log2_total_width(su2, sl2, au, sig[1, i] + log2_lat, sl2 / su2)
            lu = _leaf_table(u, (lg - log2_s0) * lpo, tab, lev_off, lev_h, lev_n, u_max)
        total += amp * jv * lu
    return total * hsoft * off * (sad / r) ** 2


@numba.njit(**NUMBA_OPTIONS)
def _row_range(u_lo, u_hi, ax, bx, sad, nx):
    """Column range [i0, i1] of a row where u(i) = sad (A + i a)/(B + i b) may lie in [u_lo, u_hi].

    ``ax = (A, a)``, ``bx = (B, b)``. ``u`` is monotonic over the row when the row lies in front of
    the source (B + i b > 0 for i in [0, nx - 1]); otherwise the whole row is returned (the caller
    tests every voxel). An empty range is returned as (1, 0). A one-voxel margin is added.
    """
    a0, a1 = ax
    b0, b1 = bx
    if u_lo < -NO_LIMIT or u_hi > NO_LIMIT:
        return 0, nx - 1
    den0 = b0
    den1 = b0 + b1 * (nx - 1)
    if den0 <= 0.0 or den1 <= 0.0:
        return 0, nx - 1
    ua = sad * a0 / den0
    ub = sad * (a0 + a1 * (nx - 1)) / den1
    umin = min(ua, ub)
    umax = max(ua, ub)
    if u_hi < umin or u_lo > umax:
        return 1, 0
    lo_val = max(u_lo, umin)
    hi_val = min(u_hi, umax)
    lo = nx + 1.0
    hi = -2.0
    for uu in (lo_val, hi_val):
        den = sad * a1 - uu * b1
        if abs(den) < 1e-12:
            return 0, nx - 1
        x = (uu * b0 - sad * a0) / den
        if x < lo:
            lo = x
        if x > hi:
            hi = x
    i0 = int(math.floor(lo)) - 1
    i1 = int(math.ceil(hi)) + 1
    if i0 < 0:
        i0 = 0
    if i1 > nx - 1:
        i1 = nx - 1
    return i0, i1


@numba.njit(**NUMBA_PARALLEL_OPTIONS)
def inplane_trace(dens_t, ox, oy, dx, dy, sx, sy, depth_t, exit_t):
    """In-slice radiological paths (mm of water) of every voxel centre, for a source at (sx, sy)
    projected onto each slice (longitudinal divergence neglected), by the Siddon traversal of
    :func:`tomodose._kernels.raytrace.trace_segments` with all slices as channels:

    * ``depth_t``: the radiological depth, from the voxel centre to the source;
    * ``exit_t``: the exit distance, from the voxel centre on, away from the source, to the grid's
      faces (the exit correction's ``t``).

    The two differ only in the segment's end point. ``dens_t`` (ny, nx, nz) mass density (g/cm3);
    ``depth_t`` and ``exit_t`` (ny, nx, nz) are overwritten; an empty one ((0, 0, 0)) is not traced,
    so a call traces the depth, the exit distance or both (one pass over the grid). Parallel over
    the rows ``j``; each voxel's sum runs along its own ray in a fixed order (the segment list
    buffers are allocated once per row, not per voxel).
    """
    ny, nx, nz = dens_t.shape
    flat = dens_t.reshape((ny * nx, nz))
    do_depth = depth_t.shape[0] > 0
    do_exit = exit_t.shape[0] > 0
    reach = 2.0 * math.hypot(nx * dx, ny * dy)  # beyond the grid from any voxel (the trace is clipped)
    cap = nx + ny + 1 + 3
    for j in numba.prange(ny):
        idx = np.empty(cap, dtype=np.int64)
        seg = np.empty(cap)
        acc = np.empty(nz)
        y0 = oy + j * dy
        for i in range(nx):
            x0 = ox + i * dx
            for kind in range(2):
                if kind == 0:
                    if not do_depth:
                        continue
                    x1 = sx
                    y1 = sy
                else:
                    if not do_exit:
                        continue
                    ex = x0 - sx
                    ey = y0 - sy
                    nrm = math.sqrt(ex * ex + ey * ey)
                    x1 = x0 + reach * ex / nrm if nrm > 0.0 else x0
                    y1 = y0 + reach * ey / nrm if nrm > 0.0 else y0
                acc[:] = 0.0
                n = trace_segments(1, ny, nx, ox, oy, 0.0, dx, dy, 1.0, x0, y0, 0.0, x1, y1, 0.0, idx, seg)
                for q in range(n):
                    row = flat[idx[q]]
                    sq = seg[q]
                    for c in range(nz):
                        acc[c] += sq * row[c]
                out = depth_t if kind == 0 else exit_t
                for c in range(nz):
                    out[j, i, c] = acc[c]


@numba.njit(**NUMBA_PARALLEL_OPTIONS)
def full_dose_group(dose, depth_t, exit_t, xtab, rho_t, origin, spacing, src, xg, yg, zg, dt, proj_of_sample,
                    a_all, tab_all, u_lo, u_hi, v_reach, k_lo, k_hi, sad, amps, dz_tab, tail, sig,
                    e0, w, s_leaf, s_tab, lev_off, lev_h, lev_n, log2_s0, lpo, u_max, jaw_h, s_jaw,
                    offc, soft, phi, cphi, vavg, zcol):
    """Add the dose of the samples of one angle group to ``dose`` (nz, ny, nx), float64.

    Parallel over slices (each thread owns whole slices: race-free, order fixed).
    ``a_all`` (n_proj_in_group, n_leaves) leaf weights, ``tab_all`` (n_proj_in_group, n_pts)
    aperture tables, ``proj_of_sample`` index into them.
    """
    nz, ny, nx = dose.shape
    ox, oy, oz = origin[0], origin[1], origin[2]
    dx, dy, dz = spacing[0], spacing[1], spacing[2]
    n_s = src.shape[0]
    for k in numba.prange(nz):
        z = oz + k * dz
        for s in range(n_s):
            if k < k_lo[s] or k >= k_hi[s]:
                continue
            p = proj_of_sample[s]
            a = a_all[p]
            tab = tab_all[p]
            sxx, syy, szz = src[s, 0], src[s, 1], src[s, 2]
            hu = _half_width(xg[s], spacing, vavg)
            hv = _half_width(yg[s], spacing, vavg)
            for j in range(ny):
                y = oy + j * dy
                # row: P(i) = (ox + i dx, y, z); d = P - src
                d0x = ox - sxx
                d0y = y - syy
                d0z = z - szz
                A = d0x * xg[s, 0] + d0y * xg[s, 1] + d0z * xg[s, 2]
                a1 = dx * xg[s, 0]
                B = -(d0x * zg[s, 0] + d0y * zg[s, 1] + d0z * zg[s, 2])
                b1 = -dx * zg[s, 0]
                i0, i1 = _row_range(u_lo[s], u_hi[s], (A, a1), (B, b1), sad, nx)
                for i in range(i0, i1 + 1):
                    ddx = d0x + i * dx
                    den = B + i * b1
                    if den <= 0.0:
                        continue
                    u = sad * (A + i * a1) / den
                    if u < u_lo[s] or u > u_hi[s]:
                        continue
                    v = sad * (ddx * yg[s, 0] + d0y * yg[s, 1] + d0z * yg[s, 2]) / den
                    if abs(v) > v_reach:
                        continue
                    r = math.sqrt(ddx * ddx + d0y * d0y + d0z * d0z)
                    sc = sad / den
                    bl, br = _medium_offsets(zcol, j, i, z, yg[s, 2], sc)
                    val = voxel_value(u, v, r, den, depth_t[j, i, k], exit_t[j, i, k], xtab, rho_t[j, i, k], -1, sad,
                                      amps, dz_tab,
                                      tail, sig, a, tab, e0, w, s_leaf, s_tab, lev_off, lev_h, lev_n,
                                      log2_s0, lpo, u_max, jaw_h, s_jaw, offc, soft, phi, cphi, hu * sc, hv * sc,
                                      bl, br)
                    dose[k, j, i] += dt[s] * val


@numba.njit(**NUMBA_OPTIONS)
def _beamlet_window(out_idx, count_only, origin, spacing, shape, src, xg, yg, zg, u_c, half_u, r_u, half_v, r_v,
                    k_lo, k_hi, sad, den_min):
    """Voxels of a beamlet sample's window; returns their number (flat indices, increasing, written
    to ``out_idx`` unless ``count_only``).

    A voxel is in the window when ``|u - u_c| <= half_u + r_u * SAD / den`` and
    ``|v| <= half_v + r_v * SAD / den`` (reaches given at the voxel's own distance, isocentre-plane
    units; ``inf`` = no limit).
    """
    nz, ny, nx = shape
    ox, oy, oz = origin[0], origin[1], origin[2]
    dx, dy, dz = spacing[0], spacing[1], spacing[2]
    wide = half_u + r_u * sad / den_min
    u_lo = u_c - wide
    u_hi = u_c + wide
    n = 0
    for k in range(k_lo, k_hi):
        z = oz + k * dz
        for j in range(ny):
            y = oy + j * dy
            d0x = ox - src[0]
            d0y = y - src[1]
            d0z = z - src[2]
            A = d0x * xg[0] + d0y * xg[1] + d0z * xg[2]
            a1 = dx * xg[0]
            B = -(d0x * zg[0] + d0y * zg[1] + d0z * zg[2])
            b1 = -dx * zg[0]
            i0, i1 = _row_range(u_lo, u_hi, (A, a1), (B, b1), sad, nx)
            for i in range(i0, i1 + 1):
                den = B + i * b1
                if den <= 0.0:
                    continue
                sc = sad / den
                u = (A + i * a1) * sc
                if abs(u - u_c) > half_u + r_u * sc:
                    continue
                ddx = d0x + i * dx
                v = (ddx * yg[0] + d0y * yg[1] + d0z * yg[2]) * sc
                if abs(v) > half_v + r_v * sc:
                    continue
                if not count_only:
                    out_idx[n] = (k * ny + j) * nx + i
                n += 1
    return n


@numba.njit(**NUMBA_PARALLEL_OPTIONS)
def beamlet_window_counts(counts, beam_proj, beam_leaf, samp_start, samp_stop, origin, spacing, shape,
                          src, xg, yg, zg, leaf_uc, half_u, r_u, half_v, r_v, k_lo, k_hi, sad, den_min):
    """Upper bound of the entries of each beamlet: sum over its samples of the window sizes."""
    dummy = np.zeros(1, dtype=np.int64)
    for b in numba.prange(beam_proj.shape[0]):
        p = beam_proj[b]
        l = beam_leaf[b]
        n = 0
        for s in range(samp_start[p], samp_stop[p]):
            n += _beamlet_window(dummy, True, origin, spacing, shape, src[s], xg[s], yg[s], zg[s],
                                 leaf_uc[l], half_u, r_u, half_v, r_v, k_lo[s], k_hi[s], sad, den_min)
        counts[b] = n


@numba.njit(**NUMBA_PARALLEL_OPTIONS)
def beamlet_columns(out_idx, out_val, offsets, kept, beam_proj, beam_leaf, samp_start, samp_stop, group_of_proj,
                    depth_all, exit_all, xtab, rho_t, origin, spacing, shape, src, xg, yg, zg, dt, leaf_uc, half_u,
                    r_u, half_v,
                    r_v, den_min, k_lo, k_hi, threshold, n_workers, scratch, mark, wbuf, sad, amps, dz_tab, tail,
                    sig, unit_a, btab, e0, w, s_leaf, s_tab, lev_off, lev_h, lev_n, log2_s0, lpo, u_max,
                    jaw_h, s_jaw, offc, soft, phi, cphi, vavg, zcol):
    """Columns of the influence matrix for a chunk of beamlets.

    Worker ``q`` (0..n_workers-1) handles beamlets q, q + n_workers, ... with its own dense
    ``scratch[q]`` (n_voxels) accumulator, ``mark[q]`` touched flags and ``wbuf[q]`` index buffer,
    so writes are disjoint and every column is computed by the same arithmetic whatever the thread
    count. Each column's entries (increasing voxel indices, values >= threshold x the column
    maximum, > 0) go to ``out_idx/out_val[offsets[b]:offsets[b] + kept[b]]``.
    ``depth_all`` (n_groups_in_chunk, ny, nx, nz) radiological depth maps, ``group_of_proj`` the
    map of each projection.
    """
    nz, ny, nx = shape
    n_b = beam_proj.shape[0]
    for q in numba.prange(n_workers):
        acc = scratch[q]
        flag = mark[q]
        buf = wbuf[q]
        for b in range(q, n_b, n_workers):
            p = beam_proj[b]
            l = beam_leaf[b]
            g = group_of_proj[p]
            a = unit_a[l]
            tab = btab[l]
            n_t = 0
            n_samp = samp_stop[p] - samp_start[p]
            for s in range(samp_start[p], samp_stop[p]):
                n_w = _beamlet_window(buf[n_t:], False, origin, spacing, shape, src[s], xg[s], yg[s], zg[s],
                                      leaf_uc[l], half_u, r_u, half_v, r_v, k_lo[s], k_hi[s], sad, den_min)
                sxx, syy, szz = src[s, 0], src[s, 1], src[s, 2]
                hu = _half_width(xg[s], spacing, vavg)
                hv = _half_width(yg[s], spacing, vavg)
                for t in range(n_t, n_t + n_w):
                    flat = buf[t]
                    i = flat % nx
                    j = (flat // nx) % ny
                    k = flat // (nx * ny)
                    ddx = origin[0] + i * spacing[0] - sxx
                    ddy = origin[1] + j * spacing[1] - syy
                    ddz = origin[2] + k * spacing[2] - szz
                    den = -(ddx * zg[s, 0] + ddy * zg[s, 1] + ddz * zg[s, 2])
                    sc = sad / den
                    u = (ddx * xg[s, 0] + ddy * xg[s, 1] + ddz * xg[s, 2]) * sc
                    v = (ddx * yg[s, 0] + ddy * yg[s, 1] + ddz * yg[s, 2]) * sc
                    r = math.sqrt(ddx * ddx + ddy * ddy + ddz * ddz)
                    bl, br = _medium_offsets(zcol, j, i, origin[2] + k * spacing[2], yg[s, 2], sc)
                    val = voxel_value(u, v, r, den, depth_all[g, j, i, k], exit_all[g, j, i, k], xtab, rho_t[j, i, k],
                                      l, sad, amps, dz_tab,
                                      tail, sig, a, tab, e0, w, s_leaf, s_tab, lev_off, lev_h, lev_n,
                                      log2_s0, lpo, u_max, jaw_h, s_jaw, offc, soft, phi, cphi, hu * sc, hv * sc,
                                      bl, br)
                    acc[flat] += dt[s] * val
                if n_samp > 1:
                    # keep each voxel once in buf
                    m = n_t
                    for t in range(n_t, n_t + n_w):
                        flat = buf[t]
                        if flag[flat] == 0:
                            flag[flat] = 1
                            buf[m] = flat
                            m += 1
                    n_t = m
                else:
                    n_t = n_w
            vmax = 0.0
            for t in range(n_t):
                if acc[buf[t]] > vmax:
                    vmax = acc[buf[t]]
            cut = threshold * vmax
            o = offsets[b]
            n_k = 0
            for t in range(n_t):
                flat = buf[t]
                val = acc[flat]
                if val > 0.0 and val >= cut:
                    out_idx[o + n_k] = flat
                    n_k += 1
            if n_samp > 1:
                out_idx[o:o + n_k] = np.sort(out_idx[o:o + n_k])
            for t in range(n_k):
                out_val[o + t] = acc[out_idx[o + t]]
            for t in range(n_t):
                acc[buf[t]] = 0.0
                flag[buf[t]] = 0
            kept[b] = n_k


@numba.njit(**NUMBA_PARALLEL_OPTIONS)
def beamlet_node_values(out, beam_proj, beam_leaf, samp_start, samp_stop, node_flat, depth_t, exit_t, xtab, rho_t,
                        origin,
                        spacing, shape, src, xg, yg, zg, dt, sad, amps, dz_tab, tail, sig, unit_a, btab, e0, w,
                        s_leaf, s_tab, lev_off, lev_h, lev_n, log2_s0, lpo, u_max, jaw_h, s_jaw, offc, soft, phi,
                        cphi, vavg, zcol):
    """Full (unwindowed, unthresholded) dose of each beamlet at the voxels ``node_flat``.

    ``out`` (n_beamlets, n_nodes) float64 is overwritten; parallel over beamlets (disjoint rows).
    ``depth_t`` (ny, nx, nz): the depth map of the beamlets' angle group.
    """
    nz, ny, nx = shape
    for b in numba.prange(beam_proj.shape[0]):
        p = beam_proj[b]
        l = beam_leaf[b]
        a = unit_a[l]
        tab = btab[l]
        for n in range(node_flat.shape[0]):
            out[b, n] = 0.0
        for s in range(samp_start[p], samp_stop[p]):
            hu = _half_width(xg[s], spacing, vavg)
            hv = _half_width(yg[s], spacing, vavg)
            for n in range(node_flat.shape[0]):
                flat = node_flat[n]
                i = flat % nx
                j = (flat // nx) % ny
                k = flat // (nx * ny)
                ddx = origin[0] + i * spacing[0] - src[s, 0]
                ddy = origin[1] + j * spacing[1] - src[s, 1]
                ddz = origin[2] + k * spacing[2] - src[s, 2]
                den = -(ddx * zg[s, 0] + ddy * zg[s, 1] + ddz * zg[s, 2])
                if den <= 0.0:
                    continue
                sc = sad / den
                u = (ddx * xg[s, 0] + ddy * xg[s, 1] + ddz * xg[s, 2]) * sc
                v = (ddx * yg[s, 0] + ddy * yg[s, 1] + ddz * yg[s, 2]) * sc
                r = math.sqrt(ddx * ddx + ddy * ddy + ddz * ddz)
                bl, br = _medium_offsets(zcol, j, i, origin[2] + k * spacing[2], yg[s, 2], sc)
                val = voxel_value(u, v, r, den, depth_t[j, i, k], exit_t[j, i, k], xtab, rho_t[j, i, k], l, sad, amps,
                                  dz_tab, tail, sig,
                                  a, tab, e0, w, s_leaf, s_tab, lev_off, lev_h, lev_n, log2_s0, lpo, u_max, jaw_h,
                                  s_jaw, offc, soft, phi, cphi, hu * sc, hv * sc, bl, br)
                out[b, n] += dt[s] * val


@numba.njit(**NUMBA_PARALLEL_OPTIONS)
def node_dose_group(out, node_flat, depth_t, exit_t, xtab, rho_t, origin, spacing, shape, src, xg, yg, zg, dt,
                    proj_of_sample,
                    a_all, tab_all, u_lo, u_hi, v_reach, sad, amps, dz_tab, tail, sig, e0, w, s_leaf, s_tab,
                    lev_off, lev_h, lev_n, log2_s0, lpo, u_max, jaw_h, s_jaw, offc, soft, phi, cphi, vavg, zcol):
    """Add the dose of one angle group's samples at the voxels ``node_flat`` to ``out`` (n_nodes,).

    Same window rule as :func:`full_dose_group` (``u_lo <= u <= u_hi``, ``|v| <= v_reach``);
    parallel over nodes (disjoint writes).
    """
    nz, ny, nx = shape
    for n in numba.prange(node_flat.shape[0]):
        flat = node_flat[n]
        i = flat % nx
        j = (flat // nx) % ny
        k = flat // (nx * ny)
        acc = 0.0
        for s in range(src.shape[0]):
            ddx = origin[0] + i * spacing[0] - src[s, 0]
            ddy = origin[1] + j * spacing[1] - src[s, 1]
            ddz = origin[2] + k * spacing[2] - src[s, 2]
            den = -(ddx * zg[s, 0] + ddy * zg[s, 1] + ddz * zg[s, 2])
            if den <= 0.0:
                continue
            sc = sad / den
            u = (ddx * xg[s, 0] + ddy * xg[s, 1] + ddz * xg[s, 2]) * sc
            if u < u_lo[s] or u > u_hi[s]:
                continue
            v = (ddx * yg[s, 0] + ddy * yg[s, 1] + ddz * yg[s, 2]) * sc
            if abs(v) > v_reach:
                continue
            r = math.sqrt(ddx * ddx + ddy * ddy + ddz * ddz)
            p = proj_of_sample[s]
            hu = _half_width(xg[s], spacing, vavg)
            hv = _half_width(yg[s], spacing, vavg)
            bl, br = _medium_offsets(zcol, j, i, origin[2] + k * spacing[2], yg[s, 2], sc)
            acc += dt[s] * voxel_value(u, v, r, den, depth_t[j, i, k], exit_t[j, i, k], xtab, rho_t[j, i, k], -1, sad,
                                       amps, dz_tab, tail,
                                       sig, a_all[p], tab_all[p], e0, w, s_leaf, s_tab, lev_off, lev_h, lev_n,
                                       log2_s0, lpo, u_max, jaw_h, s_jaw, offc, soft, phi, cphi, hu * sc, hv * sc,
                                       bl, br)
        out[n] += acc


# ---------------------------------------------------------------------------------------------
# angle-clustered evaluation: one pass per voxel for all projections sharing a beam orientation
# ---------------------------------------------------------------------------------------------
#: most leaves an error-function ("direct") Gaussian can touch at one voxel
#: ((15 s_tab + 2 au) / w + 3, ``au`` the voxel-average half-width; checked by the caller).
MAX_DIRECT_LEAVES = 24


@numba.njit(**NUMBA_OPTIONS)
def cluster_row_scratch(n_g):
    """Per-thread work arrays of :func:`_cluster_row` for ``n_g`` Gaussians: (amp, isv, hj, su2, lu,
    lu_i, kind, lam, l0, nl, tb), allocated once per slice by the kernels that call it."""
    return (np.zeros(n_g), np.zeros(n_g), np.zeros(n_g), np.zeros(n_g), np.zeros(n_g),
            np.zeros(n_g, dtype=np.int64), np.zeros(n_g, dtype=np.int64), np.zeros((n_g, MAX_DIRECT_LEAVES)),
            np.zeros(n_g, dtype=np.int64), np.zeros(n_g, dtype=np.int64), np.zeros((n_g, 4), dtype=np.int64))


@numba.njit(**NUMBA_OPTIONS)
def _cluster_row(out, is_, m0, m1, j, k, origin, spacing, depth_t, exit_t, xtab, rho_t, s0, xg, yg, zg, t_p, dt_p,
                 a_c, tab_c, u_lo_p,
                 u_hi_p, r_u, v_half, r_v, r_u0, v_half0, r_v0, g_mid, g_hi, sad, amps, dz_tab, tail, sig, e0, w,
                 s_leaf, s_tab, lev_off,
                 lev_h, lev_n, log2_s0, lpo, u_max, jaw_h, s_jaw, offc, soft, phi, cphi, hu, hv, zcol, amp_v, isv_v,
                 hj_v, su2_v, lu_v, lu_i, kind_v, lam_v, l0_v, nl_v, tb_v):
    """Dose of all samples of one cluster (same beam axes; sources ``s0 + t_p yg``) at the voxels
    ``(k, j, is_[m])`` for ``m0 <= m <= m1``, added to ``out[m]``.

    Same arithmetic as :func:`voxel_value` per sample (Gaussians ``i < g_hi`` only), but
    everything that does not depend on the couch offset ``t_p`` (``u``, distance, off-axis terms,
    amplitudes, widths and the leaf profiles of each Gaussian at ``u``) is computed once per voxel;
    the loop over the cluster's samples only evaluates the jaw profile, the inverse square and the
    leaf-weighted sum.

    Windows: sample ``p`` is in window ``W`` when ``u_lo_p[p] - r_u c <= u <= u_hi_p[p] + r_u c``
    and ``|v_p| <= v_half + r_v c`` with ``c = SAD / den`` (reaches given at the voxel's distance,
    as the influence matrix's windows; ``r_u = v_half = NO_LIMIT``: no window), and in ``W0``
    likewise with ``r_u0, v_half0, r_v0``. The value is the difference of two windowed sums (one
    level of the fast path's telescoping sum, in one pass)::

        sum_p [p in W] (Gaussians i < g_hi)  -  sum_p [p in W0] (Gaussians i < g_mid)

    i.e. Gaussians ``g_mid <= i < g_hi`` with coefficient ``[p in W]`` and ``i < g_mid`` with
    ``[p in W] - [p in W0]``; ``g_mid = 0``: one windowed sum (``W0`` unused).
    ``hu, hv``: the voxel's half-widths along ``xg`` and ``yg`` (:func:`_half_width`; the profiles are
    averaged over ``hu SAD / den`` and ``hv SAD / den`` in the isocentre plane, as in
    :func:`voxel_value`). ``zcol``: the medium's ends of each column (:func:`_medium_offsets`).
    ``amp_v ... tb_v`` are per-thread scratch arrays.
    """
    py = origin[1] + j * spacing[1]
    pz = origin[2] + k * spacing[2]
    for m in range(m0, m1 + 1):
        ii = is_[m]
        px = origin[0] + ii * spacing[0]
        depth = depth_t[j, ii, k]
        t_exit = exit_t[j, ii, k]
        rho_g = rho_t[j, ii, k]
        dx0 = px - s0[0]
        dy0 = py - s0[1]
        dz0 = pz - s0[2]
        den = -(dx0 * zg[0] + dy0 * zg[1] + dz0 * zg[2])
        if den <= 0.0:
            continue
        xx = dx0 * xg[0] + dy0 * xg[1] + dz0 * xg[2]
        yy = dx0 * yg[0] + dy0 * yg[1] + dz0 * yg[2]
        sc = sad / den
        u = xx * sc
        au = hu * sc
        av = hv * sc
        bl, br = _medium_offsets(zcol, j, ii, pz, yg[2], sc)
        n_s = t_p.shape[0]
        ru = r_u * sc
        v_reach = v_half + r_v * sc
        ru0 = r_u0 * sc
        v_reach0 = v_half0 + r_v0 * sc
        # first Gaussian with a nonzero coefficient for some sample (g_hi: none)
        g_start = g_hi
        for p in range(n_s):
            av_p = abs((yy - t_p[p]) * sc)
            inw = u_lo_p[p] - ru <= u <= u_hi_p[p] + ru and av_p <= v_reach
            if g_mid > 0:
                in0 = u_lo_p[p] - ru0 <= u <= u_hi_p[p] + ru0 and av_p <= v_reach0
                if inw != in0:
                    g_start = 0
                    break
            if inw and g_start > g_mid:
                g_start = g_mid
                if g_mid == 0:
                    break
        if g_start >= g_hi:
            continue
        off, hsoft, k0, f, ext = _offaxis_and_depth(u, sad, soft, offc, depth, dz_tab, amps.shape[0])
        kx, fx = _exit_pos(t_exit, xtab.shape[0])
        per_gaussian = rho_g.shape[0] > 1
        lat, log2_lat = _lateral_scale(sad, rho_g[0], den)
        sj2 = s_jaw * s_jaw
        sl2 = s_leaf * s_leaf
        st2 = s_tab * s_tab
        n_lev = lev_off.shape[0]
        for i in range(g_start, g_hi):
            amp = _amplitude(amps, tail, i, k0, f, ext, xtab, kx, fx)
            kind_v[i] = 0
            if amp <= 0.0:
                continue
            amp_v[i] = amp
            if per_gaussian:
                lat, log2_lat = _lateral_scale(sad, rho_g[i], den)
            su = sig[0, i] * lat
            su2 = su * su
            su2_v[i] = su2
            sv = math.sqrt(su2 + sj2)
            if sv < 1e-9:
                sv = 1e-9
            isv_v[i] = 1.0 / sv
            hj_v[i] = av / sv
            s2 = su2 + sl2
            if s2 < st2:
                # leaf profiles Lambda_l(u) of the leaves this Gaussian reaches (cf. _leaf_direct)
                sl = math.sqrt(s2)
                if sl < 1e-9:
                    sl = 1e-9
                isl = 1.0 / sl
                hl = au * isl
                n = a_c.shape[1]
                reach = 7.5 * sl + au
                m_lo = int(math.ceil((u - reach - e0) / w))
                m_hi = int(math.floor((u + reach - e0) / w))
                if m_lo < 0:
                    m_lo = 0
                if m_hi > n:
                    m_hi = n
                l_first = m_lo - 1
                if l_first < 0:
                    l_first = 0
                l_last = m_hi
                if l_last > n - 1:
                    l_last = n - 1
                nl = l_last - l_first + 1
                if nl <= 0:
                    continue
                kind_v[i] = 1
                l0_v[i] = l_first
                nl_v[i] = nl
                # Phi at the leaf edges, saturated outside [m_lo, m_hi]; each edge evaluated once
                if l_first < m_lo:
                    c_lo = 1.0
                elif l_first > m_hi:
                    c_lo = 0.0
                else:
                    c_lo = _phi_mean((u - (e0 + l_first * w)) * isl, hl, phi, cphi)
                for q in range(nl):
                    me = l_first + q + 1
                    if me < m_lo:
                        c_hi = 1.0
                    elif me > m_hi:
                        c_hi = 0.0
                    else:
                        c_hi = _phi_mean((u - (e0 + me * w)) * isl, hl, phi, cphi)
                    lam_v[i, q] = c_lo - c_hi
                    c_lo = c_hi
            else:
                kind_v[i] = 2
                lg = _log2_total_width(su2, sl2, au, sig[1, i] + log2_lat, sl2 / su2)
                q0, fq = _level_coordinate((lg - log2_s0) * lpo, n_lev)
                for dq in range(2):
                    base, fu = _level_position(u, u_max, lev_off, lev_h, lev_n, q0 + dq)
                    tb_v[i, 2 * dq] = base
                    lam_v[i, 2 * dq] = fu
                    lam_v[i, 2 * dq + 1] = (1.0 - fq) if dq == 0 else fq
                l0_v[i] = 0
        r2_perp = den * den + xx * xx
        total = 0.0
        for p in range(n_s):
            yp = yy - t_p[p]
            v = yp * sc
            av_p = abs(v)
            inw = u_lo_p[p] - ru <= u <= u_hi_p[p] + ru and av_p <= v_reach
            c_lo = 0
            if g_start < g_mid:
                in0 = u_lo_p[p] - ru0 <= u <= u_hi_p[p] + ru0 and av_p <= v_reach0
                c_lo = int(inw) - int(in0)
            if not inw and c_lo == 0:
                continue
            # leaf-weighted profiles first (tight loop); closed leaves at u skip the jaw profile
            n_lu = 0
            for i in range(g_start, g_hi):
                kd = kind_v[i]
                if kd == 0:
                    continue
                c = c_lo if i < g_mid else int(inw)
                if c == 0:
                    continue
                if kd == 1:
                    lu = 0.0
                    l_first = l0_v[i]
                    for q in range(nl_v[i]):
                        lu += a_c[p, l_first + q] * lam_v[i, q]
                else:
                    lu = 0.0
                    for dq in range(2):
                        wq = lam_v[i, 2 * dq + 1]
                        if wq == 0.0:
                            continue
                        b = tb_v[i, 2 * dq]
                        fu = lam_v[i, 2 * dq]
                        t0 = tab_c[p, b]
                        lu += wq * (t0 + fu * (tab_c[p, b + 1] - t0))
                if lu == 0.0:
                    continue
                lu_i[n_lu] = i
                lu_v[n_lu] = lu if c > 0 else -lu
                n_lu += 1
            if n_lu == 0:
                continue
            # jaw profiles of those Gaussians (plain, or truncated at the medium's ends)
            cut, el, wl, er, wr = _medium_cut(v, jaw_h, s_jaw, bl, br, phi)
            acc = 0.0
            if cut:
                for q in range(n_lu):
                    i = lu_i[q]
                    jv = _jaw_cut_value(v, su2_v[i], sj2, el, wl, er, wr, av, phi, cphi)
                    if jv > 0.0:
                        acc += amp_v[i] * jv * lu_v[q]
            else:
                for q in range(n_lu):
                    i = lu_i[q]
                    isv = isv_v[i]
                    if (jaw_h - av_p - av) * isv >= PHI_X:
                        jv = 1.0  # both jaw edges beyond the lookup table (what _phi_mean returns there)
                    else:
                        hj = hj_v[i]
                        jv = _phi_mean((v + jaw_h) * isv, hj, phi, cphi) - _phi_mean((v - jaw_h) * isv, hj, phi, cphi)
                        if jv <= 0.0:
                            continue
                    acc += amp_v[i] * jv * lu_v[q]
            if acc != 0.0:
                total += dt_p[p] * acc * sad * sad / (r2_perp + yp * yp)
        out[m] += total * hsoft * off


@numba.njit(**NUMBA_PARALLEL_OPTIONS)
def cluster_dose_lattice(out, ks, js, is_, k_lo, k_hi, depth_t, exit_t, xtab, rho_t, origin, spacing, s0, xg, yg, zg,
                         t_p, dt_p, a_c,
                         tab_c, u_lo_p, u_hi_p, r_u, v_half, r_v, r_u0, v_half0, r_v0, widen, g_mid, g_hi, sad, amps,
                         dz_tab, tail, sig, e0,
                         w, s_leaf, s_tab, lev_off, lev_h, lev_n, log2_s0, lpo, u_max, jaw_h, s_jaw, offc, soft, phi,
                         cphi, vavg, zcol):
    """Add the dose of one cluster (see :func:`_cluster_row`) at the voxels ``ks x js x is_``
    (increasing index arrays) to ``out`` (ks.size, js.size, is_.size) float64; slices outside
    ``k_lo <= k < k_hi`` are skipped. ``widen``: largest SAD / den of the grid (row ranges).
    ``r_u0, v_half0, r_v0, g_mid``: the second window and Gaussian split of :func:`_cluster_row`.
    ``vavg`` 1: voxel-averaged profiles (:func:`_half_width`), 0: sampled at the voxel centre.
    Parallel over slices (disjoint writes, fixed order)."""
    nx = depth_t.shape[1]
    n_g = sig.shape[1]
    hu = _half_width(xg, spacing, vavg)
    hv = _half_width(yg, spacing, vavg)
    # union of the sample windows, for the row ranges
    u_lo = 1e30
    u_hi = -1e30
    r_any = max(r_u, r_u0) if g_mid > 0 else r_u
    for p in range(t_p.shape[0]):
        u_lo = min(u_lo, u_lo_p[p] - r_any * widen)
        u_hi = max(u_hi, u_hi_p[p] + r_any * widen)
    for a in numba.prange(ks.shape[0]):
        k = ks[a]
        if k < k_lo or k >= k_hi:
            continue
        (amp_v, isv_v, hj_v, su2_v, lu_v, lu_i, kind_v, lam_v, l0_v, nl_v,
         tb_v) = cluster_row_scratch(n_g)
        z = origin[2] + k * spacing[2]
        for b in range(js.shape[0]):
            j = js[b]
            y = origin[1] + j * spacing[1]
            d0x = origin[0] - s0[0]
            d0y = y - s0[1]
            d0z = z - s0[2]
            A = d0x * xg[0] + d0y * xg[1] + d0z * xg[2]
            a1 = spacing[0] * xg[0]
            B = -(d0x * zg[0] + d0y * zg[1] + d0z * zg[2])
            b1 = -spacing[0] * zg[0]
            i0, i1 = _row_range(u_lo, u_hi, (A, a1), (B, b1), sad, nx)
            if i1 < i0:
                continue
            m0 = np.searchsorted(is_, i0)
            m1 = np.searchsorted(is_, i1, side="right") - 1
            if m1 < m0:
                continue
            _cluster_row(out[a, b], is_, m0, m1, j, k, origin, spacing, depth_t, exit_t, xtab, rho_t, s0, xg, yg, zg,
                         t_p, dt_p,
                         a_c, tab_c, u_lo_p, u_hi_p, r_u, v_half, r_v, r_u0, v_half0, r_v0, g_mid, g_hi, sad, amps,
                         dz_tab, tail, sig, e0,
                         w, s_leaf, s_tab, lev_off, lev_h, lev_n, log2_s0, lpo, u_max, jaw_h, s_jaw, offc, soft, phi,
                         cphi, hu, hv, zcol, amp_v, isv_v, hj_v, su2_v, lu_v, lu_i, kind_v, lam_v, l0_v, nl_v, tb_v)


@numba.njit(**NUMBA_PARALLEL_OPTIONS)
def trilinear_add(dose, values, ks, js, is_):
    """``dose[k, j, i] += `` trilinear interpolation of ``values`` (nk, nj, ni), given at the voxel
    indices ``ks x js x is_`` (increasing, first 0 and last n-1 of each axis). Parallel over slices."""
    nz, ny, nx = dose.shape
    for k in numba.prange(nz):
        a = np.searchsorted(ks, k, side="right") - 1
        if a >= ks.shape[0] - 1:
            a = ks.shape[0] - 2
        if a < 0:
            a = 0
        fk = (k - ks[a]) / (ks[a + 1] - ks[a]) if ks.shape[0] > 1 else 0.0
        a1 = a + 1 if ks.shape[0] > 1 else a
        for j in range(ny):
            b = np.searchsorted(js, j, side="right") - 1
            if b >= js.shape[0] - 1:
                b = js.shape[0] - 2
            if b < 0:
                b = 0
            fj = (j - js[b]) / (js[b + 1] - js[b]) if js.shape[0] > 1 else 0.0
            b1 = b + 1 if js.shape[0] > 1 else b
            for i in range(nx):
                c = np.searchsorted(is_, i, side="right") - 1
                if c >= is_.shape[0] - 1:
                    c = is_.shape[0] - 2
                if c < 0:
                    c = 0
                fi = (i - is_[c]) / (is_[c + 1] - is_[c]) if is_.shape[0] > 1 else 0.0
                c1 = c + 1 if is_.shape[0] > 1 else c
                v0 = ((1 - fi) * values[a, b, c] + fi * values[a, b, c1])
                v1 = ((1 - fi) * values[a, b1, c] + fi * values[a, b1, c1])
                v2 = ((1 - fi) * values[a1, b, c] + fi * values[a1, b, c1])
                v3 = ((1 - fi) * values[a1, b1, c] + fi * values[a1, b1, c1])
                dose[k, j, i] += (1 - fk) * ((1 - fj) * v0 + fj * v1) + fk * ((1 - fj) * v2 + fj * v3)


# ---------------------------------------------------------------------------------------------
# influence matrix by angle clusters: one per-voxel setup for all beamlets of a beam orientation
# ---------------------------------------------------------------------------------------------
@numba.njit(**NUMBA_PARALLEL_OPTIONS)
def cluster_column_entries(count_only, counts, offsets, out_col, out_flat, out_val, k_lo, k_hi, depth_t, exit_t, xtab,
                           rho_t,
                           origin, spacing, s0, xg, yg, zg, t_p, dt_p, samp_b_off, b_leaf, b_col, leaf_uc, half_u,
                           r_u, half_v, r_v, widen, sad, amps, dz_tab, tail, sig, btab, e0, w, s_leaf, s_tab,
                           lev_off, lev_h, lev_n, log2_s0, lpo, u_max, jaw_h, s_jaw, offc, soft, phi, cphi, vavg, zcol):
    """Influence-matrix entries (before the threshold) of the beamlets of one cluster.

    A cluster's samples share the beam axes (sources ``s0 + t_p[p] yg``, see :func:`_cluster_row`);
    sample ``p`` has the beamlets ``samp_b_off[p] <= b < samp_b_off[p + 1]`` (leaf ``b_leaf[b]``,
    increasing; column ``b_col[b]``). Beamlet (p, l) gets an entry at a voxel inside its window
    ``|u - leaf_uc[l]| <= half_u + r_u c`` and ``|v_p| <= half_v + r_v c`` (``c = SAD / den``; the
    windows of :func:`_beamlet_window`), with value ``dt_p`` x the unit-leaf dose of
    :func:`voxel_value`. Per voxel, everything that does not depend on the couch offset or the leaf
    (depth terms, amplitudes, widths) is computed once, the leaf profiles once per leaf and the jaw
    profiles once per sample.

    Two passes, parallel over slices ``k_lo <= k < k_hi`` (each slice owns its output range, so
    the entries are in a fixed order whatever the thread count): ``count_only`` writes the number of
    entries of slice ``k`` to ``counts[k]``; otherwise slice ``k`` writes its entries (column, flat
    C-order voxel index, value) in (j, i, sample, leaf) order from ``offsets[k]``. ``vavg``: voxel
    averaging of the profiles as in :func:`voxel_value` (1) or centre sampling (0).
    """
    ny, nx = rho_t.shape[0], rho_t.shape[1]  # depth_t is not read when count_only
    hu = _half_width(xg, spacing, vavg)
    hv = _half_width(yg, spacing, vavg)
    n_g = sig.shape[1]
    n_leaves = btab.shape[0]
    n_s = t_p.shape[0]
    n_lev = lev_off.shape[0]
    # union of the leaf windows (row ranges)
    u_lo = 1e30
    u_hi = -1e30
    for b in range(b_leaf.shape[0]):
        u_lo = min(u_lo, leaf_uc[b_leaf[b]] - half_u - r_u * widen)
        u_hi = max(u_hi, leaf_uc[b_leaf[b]] + half_u + r_u * widen)
    sj2 = s_jaw * s_jaw
    sl2 = s_leaf * s_leaf
    st2 = s_tab * s_tab
    for k in numba.prange(k_lo, k_hi):
        amp_v = np.zeros(n_g)
        isv_v = np.zeros(n_g)
        su2_v = np.zeros(n_g)
        jw_v = np.zeros(n_g)
        lam = np.zeros((n_g, n_leaves))
        edge = np.zeros(n_leaves + 1)
        n = 0 if count_only else offsets[k]
        pz = origin[2] + k * spacing[2]
        for j in range(ny):
            py = origin[1] + j * spacing[1]
            d0x = origin[0] - s0[0]
            d0y = py - s0[1]
            d0z = pz - s0[2]
            A = d0x * xg[0] + d0y * xg[1] + d0z * xg[2]
            a1 = spacing[0] * xg[0]
            B = -(d0x * zg[0] + d0y * zg[1] + d0z * zg[2])
            b1 = -spacing[0] * zg[0]
            i0, i1 = _row_range(u_lo, u_hi, (A, a1), (B, b1), sad, nx)
            for i in range(i0, i1 + 1):
                dx0 = d0x + i * spacing[0]
                den = -(dx0 * zg[0] + d0y * zg[1] + d0z * zg[2])
                if den <= 0.0:
                    continue
                xx = dx0 * xg[0] + d0y * xg[1] + d0z * xg[2]
                yy = dx0 * yg[0] + d0y * yg[1] + d0z * yg[2]
                sc = sad / den
                u = xx * sc
                ru = half_u + r_u * sc
                vr = half_v + r_v * sc
                # leaves whose window holds u (one leaf of margin; each is tested exactly below)
                la = int(math.floor((u - ru - e0) / w - 0.5)) - 1
                lb = int(math.ceil((u + ru - e0) / w - 0.5)) + 1
                if la < 0:
                    la = 0
                if lb > n_leaves - 1:
                    lb = n_leaves - 1
                if lb < la:
                    continue
                # count the entries (and skip voxels with none)
                n_vox = 0
                for p in range(n_s):
                    if abs((yy - t_p[p]) * sc) > vr:
                        continue
                    for b in range(samp_b_off[p], samp_b_off[p + 1]):
                        l = b_leaf[b]
                        if l >= la and l <= lb and abs(u - leaf_uc[l]) <= ru:
                            n_vox += 1
                if n_vox == 0:
                    continue
                if count_only:
                    n += n_vox
                    continue
                flat = (k * ny + j) * nx + i
                off, hsoft, k0, f, ext = _offaxis_and_depth(u, sad, soft, offc, depth_t[j, i, k], dz_tab,
                                                            amps.shape[0])
                kx, fx = _exit_pos(exit_t[j, i, k], xtab.shape[0])
                au = hu * sc
                av = hv * sc
                bl, br = _medium_offsets(zcol, j, i, pz, yg[2], sc)
                rho_g = rho_t[j, i, k]
                per_gaussian = rho_g.shape[0] > 1
                lat, log2_lat = _lateral_scale(sad, rho_g[0], den)
                for g in range(n_g):
                    amp = _amplitude(amps, tail, g, k0, f, ext, xtab, kx, fx)
                    amp_v[g] = amp
                    if amp <= 0.0:
                        continue
                    if per_gaussian:
                        lat, log2_lat = _lateral_scale(sad, rho_g[g], den)
                    su = sig[0, g] * lat
                    su2 = su * su
                    su2_v[g] = su2
                    sv = math.sqrt(su2 + sj2)
                    if sv < 1e-9:
                        sv = 1e-9
                    isv_v[g] = 1.0 / sv
                    s2 = su2 + sl2
                    if s2 < st2:
                        sl = math.sqrt(s2)
                        if sl < 1e-9:
                            sl = 1e-9
                        isl = 1.0 / sl
                        hl = au * isl
                        for m in range(la, lb + 2):
                            edge[m] = _phi_mean((u - (e0 + m * w)) * isl, hl, phi, cphi)
                        for l in range(la, lb + 1):
                            lam[g, l] = edge[l] - edge[l + 1]
                    else:
                        lg = _log2_total_width(su2, sl2, au, sig[1, g] + log2_lat, sl2 / su2)
                        q0, fq = _level_coordinate((lg - log2_s0) * lpo, n_lev)
                        for l in range(la, lb + 1):
                            lam[g, l] = 0.0
                        for dq in range(2):
                            wq = (1.0 - fq) if dq == 0 else fq
                            if wq == 0.0:
                                continue
                            base, fu = _level_position(u, u_max, lev_off, lev_h, lev_n, q0 + dq)
                            for l in range(la, lb + 1):
                                t0 = btab[l, base]
                                lam[g, l] += wq * (t0 + fu * (btab[l, base + 1] - t0))
                r2_perp = den * den + xx * xx
                for p in range(n_s):
                    yp = yy - t_p[p]
                    v = yp * sc
                    if abs(v) > vr:
                        continue
                    b_lo = samp_b_off[p]
                    b_hi = samp_b_off[p + 1]
                    anyb = False
                    for b in range(b_lo, b_hi):
                        l = b_leaf[b]
                        if l >= la and l <= lb and abs(u - leaf_uc[l]) <= ru:
                            anyb = True
                            break
                    if not anyb:
                        continue
                    cut, el, wl, er, wr = _medium_cut(v, jaw_h, s_jaw, bl, br, phi)
                    for g in range(n_g):
                        jw_v[g] = 0.0
                        if amp_v[g] <= 0.0:
                            continue
                        if cut:
                            jv = _jaw_cut_value(v, su2_v[g], sj2, el, wl, er, wr, av, phi, cphi)
                        else:
                            isv = isv_v[g]
                            hj = av * isv
                            jv = (_phi_mean((v + jaw_h) * isv, hj, phi, cphi)
                                  - _phi_mean((v - jaw_h) * isv, hj, phi, cphi))
                        if jv > 0.0:
                            jw_v[g] = amp_v[g] * jv
                    scale = dt_p[p] * hsoft * off * sad * sad / (r2_perp + yp * yp)
                    for b in range(b_lo, b_hi):
                        l = b_leaf[b]
                        if l < la or l > lb or abs(u - leaf_uc[l]) > ru:
                            continue
                        total = 0.0
                        for g in range(n_g):
                            total += jw_v[g] * lam[g, l]
                        out_col[n] = b_col[b]
                        out_flat[n] = flat
                        out_val[n] = total * scale
                        n += 1
        if count_only:
            counts[k] = n


@numba.njit(**NUMBA_PARALLEL_OPTIONS)
def threshold_columns(col, flat, val, seg_start, n_cols, threshold, merge, start, kept, s_flat, s_val):
    """Sort the entries (col, flat, val) of one angle group into columns and apply the threshold.

    ``start`` (n_cols + 1) receives the column segments of ``s_flat, s_val``: a stable counting sort
    (entries keep their order inside a column), parallel over the input segments
    ``seg_start[q] <= e < seg_start[q + 1]`` (the slices of :func:`cluster_column_entries`: each
    segment's entries of a column go to their own range, in segment order). ``merge``: entries of
    one column may come from several clusters (sub-samples): each column is then sorted by voxel
    (stable) and duplicate voxels summed in that order. Then entries ``> 0`` and ``>= threshold`` x
    the column maximum are moved to the front of their segment, ``kept[c]`` of them (increasing
    voxel index). The result does not depend on the thread count.
    """
    n_seg = seg_start.shape[0] - 1
    cnt = np.zeros((n_seg, n_cols), dtype=np.int64)
    for q in numba.prange(n_seg):
        for e in range(seg_start[q], seg_start[q + 1]):
            cnt[q, col[e]] += 1
    running = 0
    for c in range(n_cols):
        start[c] = running
        for q in range(n_seg):
            m = cnt[q, c]
            cnt[q, c] = running
            running += m
    start[n_cols] = running
    for q in numba.prange(n_seg):
        for e in range(seg_start[q], seg_start[q + 1]):
            c = col[e]
            t = cnt[q, c]
            s_flat[t] = flat[e]
            s_val[t] = val[e]
            cnt[q, c] = t + 1
    for c in numba.prange(n_cols):
        a = start[c]
        z = start[c + 1]
        m = z - a
        if merge and m > 1:
            order = np.argsort(s_flat[a:z], kind="mergesort")
            fl = s_flat[a:z][order]
            vl = s_val[a:z][order]
            q = 0
            for t in range(m):
                if q > 0 and fl[t] == s_flat[a + q - 1]:
                    s_val[a + q - 1] += vl[t]
                else:
                    s_flat[a + q] = fl[t]
                    s_val[a + q] = vl[t]
                    q += 1
            m = q
        vmax = 0.0
        for t in range(a, a + m):
            if s_val[t] > vmax:
                vmax = s_val[t]
        cut = threshold * vmax
        q = 0
        for t in range(a, a + m):
            if s_val[t] > 0.0 and s_val[t] >= cut:
                s_flat[a + q] = s_flat[t]
                s_val[a + q] = s_val[t]
                q += 1
        kept[c] = q
