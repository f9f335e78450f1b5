"""numba kernels of the collapsed-cone transport (private; no validation here).

Geometry of one transport direction ``u`` (see :mod:`tomodose.transport.collapsed_cone`): the
array axis ``m`` with the largest ``|u_m| / spacing_m`` is the stepping axis; a line advances one
slice along ``m`` per step (geometric step ``step_cm``) and moves ``da``, ``db`` voxels (|.| <= 1)
along the other two array axes ``a < b``. Line ``(ia, ib)`` visits, at step ``n``, the voxel
``(slice(n), ia + floor(n da + 0.5), ib + floor(n db + 0.5))``. For a fixed step the lateral
offsets are the same for all lines, so the lines of one direction visit every voxel exactly once:
their writes are disjoint and ``prange`` over lines is race-free.

Per line and exponential term ``k`` (rate ``a_k``, amplitude ``A_k`` of the source voxel), with
TERMA ``T`` and radiological step ``delta = rho * step_cm`` constant within a voxel, the exact
segment recursion is (``x = a_k delta``, ``g(x) = (1 - exp(-x)) / x``)::

    dose  += F_k a_k g(x) + T A_k (1 - g(x))
    F_k    = F_k exp(-x) + T A_k (1 - exp(-x)) / a_k

``F_k`` is the energy (per unit line cross-section, in TERMA x cm units) still travelling along
the line; what is left after the last voxel leaves the grid and is lost. In vacuum (``delta = 0``)
``g = 1`` and nothing is divided by zero.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from tomodose.config import NUMBA_OPTIONS, NUMBA_PARALLEL_OPTIONS

#: neighbouring lines handled together by one thread in the reference kernel (memory locality
#: only; results do not depend on it). The fast kernel hands a whole row of lines to a thread.
BUNDLE = 16

#: 2**-n for n = 0..1023, then 0 (scaling step of :func:`_exp_neg`).
_POW2_NEG = np.array([2.0 ** -n for n in range(1024)] + [0.0])
_LOG2E = 1.4426950408889634
_LN2_HI = 0.6931471803691238  # ln 2 split in two parts (Cody-Waite range reduction)
_LN2_LO = 1.9082149292705877e-10


@numba.njit(**NUMBA_OPTIONS)
def _offset(n, d, c=0.5):
    """Lateral voxel offset of a line at step ``n``: ``floor(n d + c)``; ``c`` is the line phase
    (0.5: nearest voxel; any ``c`` in (0, 1) gives offset 0 at ``n = 0``)."""
    return int(math.floor(n * d + c))


@numba.njit(**NUMBA_OPTIONS)
def _line_layout(shape, m, da, db, ca=0.5, cb=0.5):
    """Layout of the parallel transport lines of one direction on a C-ordered grid ``shape``.

    ``m`` is the main axis (one voxel step per line step), ``da``/``db`` the slopes along the two
    other axes ``a_ax``/``b_ax``, ``ca``/``cb`` the line phases (offsets ``floor(n d + c)``;
    0.5 = nearest voxel). Returns ``(a_ax, b_ax, n_m, n_a, n_b, s_m, s_a, s_b, off_a,
    off_b, max_a, max_b, lines_a, lines_b)``: axis sizes, flat strides, the line's integer offsets
    (n_m,) along a and b at each main-axis step, their maxima (clipped at 0), and the number of line starts
    along a and b that cover the grid.
    """
    a_ax = 1 if m == 0 else 0
    b_ax = 1 if m == 2 else 2
    n_m = shape[m]
    n_a = shape[a_ax]
    n_b = shape[b_ax]
    s_m = 1
    s_a = 1
    s_b = 1
    for ax in range(3):
        st = 1
        for j in range(ax + 1, 3):
            st *= shape[j]
        if ax == m:
            s_m = st
        elif ax == a_ax:
            s_a = st
        else:
            s_b = st
    off_a = np.empty(n_m, np.int64)
    off_b = np.empty(n_m, np.int64)
    for n in range(n_m):
        off_a[n] = _offset(n, da, ca)
        off_b[n] = _offset(n, db, cb)
    min_a = min(0, off_a[n_m - 1])
    max_a = max(0, off_a[n_m - 1])
    min_b = min(0, off_b[n_m - 1])
    max_b = max(0, off_b[n_m - 1])
    return (a_ax, b_ax, n_m, n_a, n_b, s_m, s_a, s_b, off_a, off_b, max_a, max_b,
            n_a + max_a - min_a, n_b + max_b - min_b)


@numba.njit(**NUMBA_OPTIONS)
def _exp_neg(x):
    """exp(-x) for x >= 0, relative error < 1e-14 (inlined polynomial, no libm call).

    ``x = n ln 2 - r`` with ``n = round(x / ln 2)``, ``|r| <= ln 2 / 2``; ``exp(r)`` by its
    Taylor polynomial of degree 12 (remainder < 3e-17), times ``2**-n`` from a table.
    """
    n = int(x * _LOG2E + 0.5)
    r = (n * _LN2_HI - x) + n * _LN2_LO
    p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (
        1.0 / 720.0 + r * (1.0 / 5040.0 + r * (1.0 / 40320.0 + r * (1.0 / 362880.0 + r * (
            1.0 / 3628800.0 + r * (1.0 / 39916800.0 + r * (1.0 / 479001600.0))))))))))))
    if n > 1023:
        n = 1024
    return p * _POW2_NEG[n]


@numba.njit(**NUMBA_OPTIONS)
def _segment_factors(rates, inv_rates, delta, ex, gg, li):
    """ex[li, k] = exp(-x), gg[li, k] = (1 - exp(-x)) / x for x = rates[k] * delta >= 0.

    Below x = 0.05 ``gg`` is its Taylor series (truncation < 1e-13, no cancellation); above, one
    division per voxel for all terms.
    """
    inv_d = 1.0 / delta if delta > 0.0 else 0.0
    for k in range(rates.size):
        x = rates[k] * delta
        e = _exp_neg(x)
        ex[li, k] = e
        if x > 0.05:
            gg[li, k] = (1.0 - e) * inv_d * inv_rates[k]
        else:
            gg[li, k] = 1.0 - x * (0.5 - x * (1.0 / 6.0 - x * (1.0 / 24.0 - x * (1.0 / 120.0 - x * (
                1.0 / 720.0 - x * (1.0 / 5040.0 - x * (1.0 / 40320.0)))))))


@numba.njit(inline="always", **NUMBA_OPTIONS)
def _weight_along(ph, normal, idx, ux, uy, uz):
    """Direction-weighted surface weight ``phi (1 - (u . n)**2)`` of voxel ``idx`` for a line along
    ``u``: ``normal[idx]`` holds ``sqrt(phi) n`` (``n`` the unit surface normal, 0 where undefined)."""
    c = ux * normal[idx, 0] + uy * normal[idx, 1] + uz * normal[idx, 2]
    w = ph - c * c
    return w if w > 0.0 else 0.0


#: below this ``x = mu delta`` the escape terms use the series :func:`_escape_h` (no ``exp``, no division)
ESCAPE_SERIES_X = 0.5
#: from this many escape terms (first in the term order) :func:`_deposit_escape_series` runs them in a loop that
#: LLVM vectorises (across terms); fewer run in a scalar loop (the vector loop's set-up costs more for 2)
ESCAPE_SIMD_TERMS = 4


@numba.njit(inline="always", **NUMBA_OPTIONS)
def _escape_h(x):
    """``h(x) = (1 - g(x)) / x = sum_n (-x)**n / (n + 2)!`` for ``0 <= x <= ESCAPE_SERIES_X``
    (``g(x) = (1 - exp(-x)) / x``; degree 12, truncation < x**13 / 15! < 1e-16, i.e. < 3e-16 of h)."""
    return 1.0 / 2.0 - x * (1.0 / 6.0 - x * (1.0 / 24.0 - x * (1.0 / 120.0 - x * (1.0 / 720.0 - x * (
        1.0 / 5040.0 - x * (1.0 / 40320.0 - x * (1.0 / 362880.0 - x * (1.0 / 3628800.0 - x * (
            1.0 / 39916800.0 - x * (1.0 / 479001600.0 - x * (1.0 / 6227020800.0 - x * (
                1.0 / 87178291200.0))))))))))))


@numba.njit(**NUMBA_OPTIONS)
def _escape_terms(surface, esc_rate, rates):
    """Escape terms of a kernel call: ``(esc_idx, plain_idx, e_lo, e_hi, a_max, e_max)``: indices of the
    terms with an escape rate and of the others (no escape term when ``surface`` is False;
    ``esc_rate`` is then not read); ``[e_lo, e_hi)`` the escape terms when they are contiguous
    (else ``e_lo = e_hi = 0``); ``a_max`` and ``e_max``, the largest deposition and escape rates of the
    escape terms: ``x = mu delta <= (a_max + e_max ph) delta`` bounds every escape term's ``x`` of a voxel."""
    n_k = rates.size
    n_e = 0
    if surface:
        for k in range(n_k):
            if esc_rate[k] != 0.0:
                n_e += 1
    esc_idx = np.empty(n_e, np.int64)
    plain_idx = np.empty(n_k - n_e, np.int64)
    i = 0
    j = 0
    a_max = 0.0
    e_max = 0.0
    for k in range(n_k):
        if surface and esc_rate[k] != 0.0:
            esc_idx[i] = k
            i += 1
            a_max = max(a_max, rates[k])
            e_max = max(e_max, esc_rate[k])
        else:
            plain_idx[j] = k
            j += 1
    e_lo = 0
    e_hi = 0
    if n_e > 0 and esc_idx[n_e - 1] - esc_idx[0] == n_e - 1:
        e_lo = esc_idx[0]
        e_hi = esc_idx[n_e - 1] + 1
    return esc_idx, plain_idx, e_lo, e_hi, a_max, e_max


@numba.njit(inline="always", **NUMBA_OPTIONS)
def _deposit_escape_series(flux, ex, gg, li, src, rates, inv_rates, delta, ph, esc_rate, esc_idx, plain_idx, e_lo, e_hi,
                    a_max, e_max):
    """Dose of one voxel of line ``li`` and flux update of every term with the surface escape
    (in place on ``flux[li]``); returns the dose. ``src`` (K,): the voxel's term sources; the
    other arguments from :func:`_escape_terms`.

    Term ``k`` loses, besides its deposition rate ``a_k``, an escape rate ``e = esc_rate[k] * ph``
    per cm of radiological path (``ph`` the voxel's surface weight): with ``mu = a_k + e``,
    ``x = mu delta``, ``g(x) = (1 - exp(-x)) / x`` and ``h(x) = (1 - g(x)) / x``::

        dose = F a_k g(x) + S (a_k / mu) (1 - g(x)) = F a_k g + S a_k delta h
        F'   = F exp(-x) + S (1 - exp(-x)) / mu      = F (1 - x g) + S delta g

    (the escaped part ``e / mu`` is not deposited). Up to ``x = ESCAPE_SERIES_X`` (every escape
    term on common grids) ``h`` is a series and ``g = 1 - x h``, ``exp(-x) = 1 - x g``: no ``exp``
    and no division (equal to the closed form to float64 rounding, < 1e-15 relative); above, the
    closed form with one ``exp`` and one division. When the escape terms are contiguous and the
    voxel's bound ``(a_max + e_max ph) delta`` is within the series range, they run in one loop
    without branches; from :data:`ESCAPE_SIMD_TERMS` terms placed first (``e_lo = 0``: the transports
    order the terms so when the correction is on) a loop over a row view that LLVM vectorises. The terms of ``plain_idx`` (no escape rate) use
    the uncorrected arithmetic with the line's cached ``ex``/``gg``.
    """
    d = 0.0
    for j in range(plain_idx.size):
        k = plain_idx[j]
        f = flux[li, k]
        gk = gg[li, k]
        ek = ex[li, k]
        sk = src[k]
        d += f * rates[k] * gk + sk * (1.0 - gk)
        flux[li, k] = f * ek + sk * (1.0 - ek) * inv_rates[k]
    if e_hi > e_lo and (a_max + e_max * ph) * delta <= ESCAPE_SERIES_X:
        if e_lo > 0 or e_hi < ESCAPE_SIMD_TERMS:  # a few terms (2 in the 1-group kernel): scalar loop
            for k in range(e_lo, e_hi):
                a = rates[k]
                x = (a + esc_rate[k] * ph) * delta
                h = _escape_h(x)
                gk = 1.0 - x * h
                f = flux[li, k]
                sk = src[k]
                d += f * a * gk + sk * (a * delta) * h
                flux[li, k] = f * (1.0 - x * gk) + sk * delta * gk
            return d
        # many escape terms first (the transports order them so): one loop from 0 over a row view,
        # which LLVM vectorises (SIMD across terms: the 11 slow terms of the 5-group kernel)
        fl = flux[li]
        for k in range(e_hi):
            a = rates[k]
            x = (a + esc_rate[k] * ph) * delta
            h = _escape_h(x)
            gk = 1.0 - x * h
            f = fl[k]
            sk = src[k]
            d += f * a * gk + sk * (a * delta) * h
            fl[k] = f * (1.0 - x * gk) + sk * delta * gk
        return d
    for j in range(esc_idx.size):
        k = esc_idx[j]
        f = flux[li, k]
        sk = src[k]
        a = rates[k]
        x = (a + esc_rate[k] * ph) * delta
        if x <= ESCAPE_SERIES_X:
            h = _escape_h(x)
            gk = 1.0 - x * h
            d += f * a * gk + sk * (a * delta) * h
            flux[li, k] = f * (1.0 - x * gk) + sk * delta * gk
        else:
            mu = a + esc_rate[k] * ph
            ek = _exp_neg(x)
            inv_mu = 1.0 / mu
            gk = (1.0 - ek) / x
            d += f * a * gk + sk * (a * inv_mu) * (1.0 - gk)
            flux[li, k] = f * ek + sk * (1.0 - ek) * inv_mu
    return d


@numba.njit(**NUMBA_OPTIONS)
def _photon_direction(x, y, z, source_xyz, fallback_axis):
    """Unit vector source -> (x, y, z) (LPS mm); ``fallback_axis`` at the source itself."""
    bx = x - source_xyz[0]
    by = y - source_xyz[1]
    bz = z - source_xyz[2]
    bn = math.sqrt(bx * bx + by * by + bz * bz)
    if bn > 0.0:
        return bx / bn, by / bn, bz / bn
    return fallback_axis[0], fallback_axis[1], fallback_axis[2]


@numba.njit(**NUMBA_OPTIONS)
def _interp_row(table, ds, cos_t, out, scale):
    """out[k] = scale * table(s)[k], linear in s = sqrt(1 - cos_t) (table step ``ds``)."""
    u = 1.0 - cos_t
    if u < 0.0:
        u = 0.0
    t = math.sqrt(u) / ds
    i0 = int(t)
    n = table.shape[0]
    if i0 >= n - 1:
        for k in range(table.shape[1]):
            out[k] = scale * table[n - 1, k]
        return
    f = t - i0
    for k in range(table.shape[1]):
        out[k] = scale * ((1.0 - f) * table[i0, k] + f * table[i0 + 1, k])


@numba.njit(**NUMBA_OPTIONS)
def _interp_position(n, ds, cos_t):
    """(i0, f) of the table row interpolation of :func:`_interp_row` (``i0 = n - 1``, ``f = -1``
    when clamped to the last row); shared by all energy groups of a voxel."""
    u = 1.0 - cos_t
    if u < 0.0:
        u = 0.0
    t = math.sqrt(u) / ds
    i0 = int(t)
    if i0 >= n - 1:
        return n - 1, -1.0
    return i0, t - i0


@numba.njit(**NUMBA_OPTIONS)
def _interp_at(table, i0, f, out, scale):
    """out[k] = scale * table row at (i0, f) from :func:`_interp_position` (the arithmetic of
    :func:`_interp_row`)."""
    if f < 0.0:
        for k in range(table.shape[1]):
            out[k] = scale * table[i0, k]
        return
    for k in range(table.shape[1]):
        out[k] = scale * ((1.0 - f) * table[i0, k] + f * table[i0 + 1, k])


@numba.njit(**NUMBA_PARALLEL_OPTIONS)
def tilt_normalisation_groups(terma, directions, solid_angle, density_totals, ds, source_xyz,
                              origin_xyz, spacing_xyz, total_fractions, fallback_axis):
    """(G, nz, ny, nx) :func:`tilt_normalisation` of every energy group in one pass (the angle
    and table position of each voxel-direction pair are computed once for all groups).

    terma (G, nz, ny, nx); density_totals (G, M); total_fractions (G,). Equal (to rounding,
    1e-15) to calling :func:`tilt_normalisation` per group.
    """
    n_g, nz, ny, nx = terma.shape
    nd = directions.shape[0]
    m_rows = density_totals.shape[1]
    out = np.zeros((n_g, nz, ny, nx))
    for kz in numba.prange(nz):
        s = np.empty(n_g)
        z = origin_xyz[2] + kz * spacing_xyz[2]
        for jy in range(ny):
            y = origin_xyz[1] + jy * spacing_xyz[1]
            for ix in range(nx):
                any_t = False
                for g in range(n_g):
                    s[g] = 0.0
                    if terma[g, kz, jy, ix] != 0.0:
                        any_t = True
                if not any_t:
                    continue
                x = origin_xyz[0] + ix * spacing_xyz[0]
                bx, by, bz = _photon_direction(x, y, z, source_xyz, fallback_axis)
                for d in range(nd):
                    c = directions[d, 0] * bx + directions[d, 1] * by + directions[d, 2] * bz
                    i0, f = _interp_position(m_rows, ds, c)
                    for g in range(n_g):
                        if f < 0.0:
                            s[g] += solid_angle[d] * density_totals[g, i0]
                        else:
                            s[g] += solid_angle[d] * ((1.0 - f) * density_totals[g, i0]
                                                      + f * density_totals[g, i0 + 1])
                for g in range(n_g):
                    if terma[g, kz, jy, ix] != 0.0 and s[g] > 0.0:
                        out[g, kz, jy, ix] = total_fractions[g] / s[g]
    return out


@numba.njit(**NUMBA_PARALLEL_OPTIONS)
def tilt_normalisation(terma, directions, solid_angle, density_total, ds, source_xyz,
                       origin_xyz, spacing_xyz, total_fraction, fallback_axis):
    """(nz, ny, nx) factor making each voxel's tilted cone amplitudes sum to ``total_fraction``
    (the sum of the kernel's exponential amplitudes, i.e. what the untilted cones emit).

    ``density_total`` (M,) is the summed per-steradian kernel vs ``s = sqrt(1 - cos theta)``
    (step ``ds``); voxels with zero
    TERMA get 0 (they emit nothing).
    """
    nz, ny, nx = terma.shape
    nd = directions.shape[0]
    out = np.zeros((nz, ny, nx))
    buf_tab = density_total.reshape((density_total.size, 1))
    for kz in numba.prange(nz):
        row = np.empty(1)
        z = origin_xyz[2] + kz * spacing_xyz[2]
        for jy in range(ny):
            y = origin_xyz[1] + jy * spacing_xyz[1]
            for ix in range(nx):
                if terma[kz, jy, ix] == 0.0:
                    continue
                x = origin_xyz[0] + ix * spacing_xyz[0]
                bx, by, bz = _photon_direction(x, y, z, source_xyz, fallback_axis)
                s = 0.0
                for d in range(nd):
                    c = directions[d, 0] * bx + directions[d, 1] * by + directions[d, 2] * bz
                    _interp_row(buf_tab, ds, c, row, solid_angle[d])
                    s += row[0]
                out[kz, jy, ix] = total_fraction / s if s > 0.0 else 0.0
    return out


@numba.njit(**NUMBA_PARALLEL_OPTIONS)
def transport_direction_reference(terma, rho, dose, m, sgn, da, db, step_cm, rates, amp_const,
                        tilt, u_xyz, solid_angle, density_table, ds, norm,
                        source_xyz, origin_xyz, spacing_xyz, fallback_axis):
    # terma (G, nz, ny, nx): TERMA per energy group (G = 1 without groups); amp_const (G, K);
    # density_table (G, M, K); norm (G, nz, ny, nx) (tilt only). The source strength of a voxel
    # is sum_g T_g A_g: one transport for all groups (the rates are shared).
    """Reference (pre-2026-11-28 speed-up) version of :func:`transport_direction`.

    Kept to check the fast kernel against (``tests/test_collapsed_cone.py``); same arguments and
    results to float64 rounding. Bundles of :data:`BUNDLE` lines, ``exp`` and ``expm1`` per voxel.

    Parameters (plain arrays/scalars)
    ---------------------------------
    terma : (G, nz, ny, nx) float64
        TERMA (energy/mass) per energy group (G = 1 without groups).
    rho : (nz, ny, nx) float64
        Density relative to water.
    dose : (nz, ny, nx) float64, accumulated in place.
    m : int            stepping array axis (0 = z, 1 = y, 2 = x).
    sgn : int          +1 when the direction increases the index along ``m``, else -1.
    da, db : float     lateral index shift per step along the other two axes (ascending order).
    step_cm : float    geometric path length per step (cm).
    rates : (K,)       decay rates (1/cm).
    amp_const : (G, K) cone amplitudes per group when ``tilt`` is False.
    tilt : bool        per-voxel amplitudes from the source direction instead.
    u_xyz : (3,)       transport direction (LPS x, y, z), unit.
    solid_angle : float  cone solid angle (sr).
    density_table : (G, M, K)  per-steradian amplitudes vs s = sqrt(1 - cos theta), step ``ds``.
    norm : (G, nz, ny, nx)  per-voxel normalisation per group (tilt only).
    source_xyz, origin_xyz, spacing_xyz, fallback_axis : (3,) LPS mm / unit vector.
    """
    shape = rho.shape
    n_g = terma.shape[0]
    a_ax = 1 if m == 0 else 0
    b_ax = 1 if m == 2 else 2
    n_m = shape[m]
    n_a = shape[a_ax]
    n_b = shape[b_ax]
    end_a = _offset(n_m - 1, da)
    end_b = _offset(n_m - 1, db)
    min_a = min(0, end_a)
    max_a = max(0, end_a)
    min_b = min(0, end_b)
    max_b = max(0, end_b)
    lines_a = n_a + max_a - min_a
    lines_b = n_b + max_b - min_b
    n_k = rates.size
    # lines are processed in bundles of BUNDLE neighbours along axis b (the contiguous x axis
    # unless x is the stepping axis) so that one thread touches neighbouring memory
    n_bundles = (lines_b + BUNDLE - 1) // BUNDLE
    for task in numba.prange(lines_a * n_bundles):
        ia = task // n_bundles - max_a
        first = (task % n_bundles) * BUNDLE
        nb = min(BUNDLE, lines_b - first)
        ib0 = first - max_b
        flux = np.zeros((nb, n_k))
        ex = np.ones((nb, n_k))
        gg = np.ones((nb, n_k))
        last_delta = np.full(nb, -1.0)
        has_flux = np.zeros(nb, dtype=np.bool_)
        amp = np.empty(n_k)
        src = np.empty(n_k)
        inv_rates = 1.0 / rates
        started = False
        for n in range(n_m):
            ja = ia + _offset(n, da)
            if ja < 0 or ja >= n_a:
                if started:
                    break
                continue
            started = True
            off_b = _offset(n, db)
            km = n if sgn > 0 else n_m - 1 - n
            for li in range(nb):
                jb = ib0 + li + off_b
                if jb < 0 or jb >= n_b:
                    continue  # outside for now (a line enters and leaves the box once)
                if m == 0:
                    kz = km
                    jy = ja
                    ix = jb
                elif m == 1:
                    kz = ja
                    jy = km
                    ix = jb
                else:
                    kz = ja
                    jy = jb
                    ix = km
                t = 0.0
                for g in range(n_g):
                    t += terma[g, kz, jy, ix]
                if t == 0.0 and not has_flux[li]:
                    continue
                delta = rho[kz, jy, ix] * step_cm
                if delta != last_delta[li]:
                    last_delta[li] = delta
                    for k in range(n_k):
                        x = rates[k] * delta
                        if x > 1e-10:
                            ex[li, k] = math.exp(-x)
                            gg[li, k] = -math.expm1(-x) / x
                        else:
                            ex[li, k] = 1.0 - x
                            gg[li, k] = 1.0 - 0.5 * x
                for k in range(n_k):
                    src[k] = 0.0
                if t != 0.0:
                    c = 0.0
                    if tilt:
                        px = origin_xyz[0] + ix * spacing_xyz[0] - source_xyz[0]
                        py = origin_xyz[1] + jy * spacing_xyz[1] - source_xyz[1]
                        pz = origin_xyz[2] + kz * spacing_xyz[2] - source_xyz[2]
                        pn = math.sqrt(px * px + py * py + pz * pz)
                        if pn > 0.0:
                            c = (u_xyz[0] * px + u_xyz[1] * py + u_xyz[2] * pz) / pn
                        else:
                            c = (u_xyz[0] * fallback_axis[0] + u_xyz[1] * fallback_axis[1]
                                 + u_xyz[2] * fallback_axis[2])
                    for g in range(n_g):
                        tg = terma[g, kz, jy, ix]
                        if tg == 0.0:
                            continue
                        if tilt:
                            _interp_row(density_table[g], ds, c, amp,
                                        solid_angle * norm[g, kz, jy, ix])
                            for k in range(n_k):
                                src[k] += tg * amp[k]
                        else:
                            for k in range(n_k):
                                src[k] += tg * amp_const[g, k]
                d = 0.0
                for k in range(n_k):
                    a = rates[k]
                    sk = src[k]
                    f = flux[li, k]
                    d += f * a * gg[li, k] + sk * (1.0 - gg[li, k])
                    flux[li, k] = f * ex[li, k] + sk * (1.0 - ex[li, k]) * inv_rates[k]
                has_flux[li] = True
                dose[kz, jy, ix] += d




@numba.njit(**NUMBA_PARALLEL_OPTIONS)
def transport_direction(terma, rho, dose, m, sgn, da, db, step_cm, rates, amp_const,
                        tilt, u_xyz, solid_angle, density_table, ds, norm,
                        source_xyz, origin_xyz, spacing_xyz, fallback_axis, direct_sources, ca=0.5, cb=0.5,
                        surface=False, phi=np.zeros((1, 1, 1)), esc_rate=np.zeros(1), directional=False,
                        normal=np.zeros((1, 3))):
    """Add the dose carried along one cone direction to ``dose`` (in place).

    Parameters (plain arrays/scalars)
    ---------------------------------
    terma : (G, nz, ny, nx) float64, C-contiguous
        Source per group (TERMA per energy group; G = 1 without groups). The source strength of
        term ``k`` in a voxel is ``sum_g terma[g] * amp_const[g, k]`` (or the tilted amplitudes).
    rho : (nz, ny, nx) float64, C-contiguous
        Density relative to water.
    dose : (nz, ny, nx) float64, C-contiguous, accumulated in place.
    m : int            stepping array axis (0 = z, 1 = y, 2 = x).
    sgn : int          +1 when the direction increases the index along ``m``, else -1.
    da, db : float     lateral index shift per step along the other two axes (ascending order).
    step_cm : float    geometric path length per step (cm).
    rates : (K,)       decay rates (1/cm).
    amp_const : (G, K) cone amplitudes per group when ``tilt`` is False.
    tilt : bool        per-voxel amplitudes from the source direction instead.
    u_xyz : (3,)       transport direction (LPS x, y, z), unit.
    solid_angle : float  cone solid angle (sr).
    density_table : (G, M, K)  per-steradian amplitudes vs s = sqrt(1 - cos theta), step ``ds``.
    norm : (G, nz, ny, nx)  per-voxel normalisation per group (tilt only).
    source_xyz, origin_xyz, spacing_xyz, fallback_axis : (3,) LPS mm / unit vector.
    ca, cb : float     line phases along axes a and b (offsets ``floor(n d + c)``, c in (0, 1);
                       0.5 = nearest-voxel lines). Every phase gives a partition of the voxels;
                       the caller averages the doses of several phases (sub-voxel line positions).
    direct_sources : bool
        ``terma`` (K, nz, ny, nx) already holds the source of each term (``amp_const`` and
        ``tilt`` unused): the shared-direction transport of rotational delivery. Term sources
        may be negative (build-up kernels: signed amplitudes whose sum over terms deposits a
        non-negative energy); a voxel is skipped only when all its term sources are zero.
    surface : bool
        Surface escape (``docs/collapsed_cone.md``, surface correction): term ``k`` loses an extra
        ``esc_rate[k] * phi[voxel]`` per cm of radiological path, not deposited (see
        :func:`_deposit_escape_series`; the transports put the escape terms first). False (default),
        or no term with an escape rate (the short-range terms of the coarse option), or
        ``phi = 0`` in a voxel: the uncorrected recursion there.
    phi : (nz, ny, nx) float64   surface weight of each voxel (0 deep inside), used when ``surface``.
    esc_rate : (K,) float64      escape rate of each term at ``phi = 1`` (1/cm), used when ``surface``.
    directional : bool           the escape weighted by ``1 - (u . n)**2`` (energy travelling along a
                                 surface escapes, across it not): :func:`_weight_along`.
    normal : (nz * ny * nx, 3) float64  ``sqrt(phi) n`` per voxel (LPS x, y, z), used when ``directional``.

    One ``prange`` task per row of lines (all lines sharing the index ``ia`` along axis ``a``):
    the lines of a row visit neighbouring voxels along ``b`` at every step (contiguous memory
    when ``b`` is x), and different rows never write the same voxel. Same recursion as
    :func:`transport_direction_reference`; ``exp`` by :func:`_exp_neg`, one division per voxel.
    """
    shape = rho.shape
    n_g = terma.shape[0]
    (a_ax, b_ax, n_m, n_a, n_b, s_m, s_a, s_b, off_a, off_b, max_a, max_b, lines_a,
     lines_b) = _line_layout(shape, m, da, db, ca, cb)
    n_k = rates.size
    n_vox = shape[0] * shape[1] * shape[2]
    tf = terma.reshape((n_g, n_vox))
    rf = rho.reshape(n_vox)
    df = dose.reshape(n_vox)
    nf = norm.reshape((norm.shape[0], norm.size // norm.shape[0]))
    pf = phi.reshape(phi.size)
    inv_rates = 1.0 / rates
    esc_idx, plain_idx, e_lo, e_hi, a_max, e_max = _escape_terms(surface, esc_rate, rates)
    escape = esc_idx.size > 0  # no term with an escape rate: the uncorrected transport, bit for bit
    for task in numba.prange(lines_a):
        ia = task - max_a
        flux = np.zeros((lines_b, n_k))
        ex = np.ones((lines_b, n_k))
        gg = np.ones((lines_b, n_k))
        last_delta = np.full(lines_b, -1.0)
        has_flux = np.zeros(lines_b, dtype=np.bool_)
        amp = np.empty(n_k)
        src = np.empty(n_k)
        started = False
        for n in range(n_m):
            ja = ia + off_a[n]
            if ja < 0 or ja >= n_a:
                if started:
                    break
                continue
            started = True
            km = n if sgn > 0 else n_m - 1 - n
            base = km * s_m + ja * s_a
            ob = off_b[n]
            # line li (li = jb - ob + max_b) is at voxel jb of this slice row
            jb_lo = max(0, ob - max_b)
            jb_hi = min(n_b, lines_b - max_b + ob)
            for jb in range(jb_lo, jb_hi):
                li = jb - ob + max_b
                idx = base + jb * s_b
                t = 0.0
                for g in range(n_g):
                    t += abs(tf[g, idx])  # direct sources of build-up terms may be negative
                if t == 0.0 and not has_flux[li]:
                    continue
                delta = rf[idx] * step_cm
                if delta != last_delta[li]:
                    last_delta[li] = delta
                    _segment_factors(rates, inv_rates, delta, ex, gg, li)
                for k in range(n_k):
                    src[k] = 0.0
                if direct_sources:
                    for k in range(n_k):
                        src[k] = tf[k, idx]
                elif t != 0.0:
                    c = 0.0
                    i0 = 0
                    fi = 0.0
                    if tilt:
                        if m == 0:
                            kz, jy, ix = km, ja, jb
                        elif m == 1:
                            kz, jy, ix = ja, km, jb
                        else:
                            kz, jy, ix = ja, jb, km
                        px = origin_xyz[0] + ix * spacing_xyz[0] - source_xyz[0]
                        py = origin_xyz[1] + jy * spacing_xyz[1] - source_xyz[1]
                        pz = origin_xyz[2] + kz * spacing_xyz[2] - source_xyz[2]
                        pn = math.sqrt(px * px + py * py + pz * pz)
                        if pn > 0.0:
                            c = (u_xyz[0] * px + u_xyz[1] * py + u_xyz[2] * pz) / pn
                        else:
                            c = (u_xyz[0] * fallback_axis[0] + u_xyz[1] * fallback_axis[1]
                                 + u_xyz[2] * fallback_axis[2])
                        # table position once for all energy groups
                        i0, fi = _interp_position(density_table.shape[1], ds, c)
                    for g in range(n_g):
                        tg = tf[g, idx]
                        if tg == 0.0:
                            continue
                        if tilt:
                            _interp_at(density_table[g], i0, fi, amp, solid_angle * nf[g, idx])
                            for k in range(n_k):
                                src[k] += tg * amp[k]
                        else:
                            for k in range(n_k):
                                src[k] += tg * amp_const[g, k]
                ph = pf[idx] if escape else 0.0
                if ph != 0.0 and directional:
                    ph = _weight_along(ph, normal, idx, u_xyz[0], u_xyz[1], u_xyz[2])
                if ph != 0.0:
                    d = _deposit_escape_series(flux, ex, gg, li, src, rates, inv_rates, delta, ph, esc_rate, esc_idx,
                                        plain_idx, e_lo, e_hi, a_max, e_max)
                else:
                    d = 0.0
                    for k in range(n_k):
                        f = flux[li, k]
                        gk = gg[li, k]
                        ek = ex[li, k]
                        sk = src[k]
                        d += f * rates[k] * gk + sk * (1.0 - gk)
                        flux[li, k] = f * ek + sk * (1.0 - ek) * inv_rates[k]
                has_flux[li] = True
                df[idx] += d


#: voxels per task of :func:`contract_sources` (a block of every group's TERMA stays in cache).
CONTRACT_BLOCK = 2048


@numba.njit(**NUMBA_PARALLEL_OPTIONS)
def contract_sources(terma, weights, out):
    """out[j, k, v] = sum_g weights[j, g, k] * terma[g, v] (sources of shared directions).

    terma : (G, n) float32 or float64, >= 0; weights : (J, G, K) float64 (signed for build-up
    kernels; zero rows are skipped); out : (J, K, n) float32 or float64, overwritten. One ``prange`` task per block of
    :data:`CONTRACT_BLOCK` voxels, groups summed in index order: results do not depend on the
    number of threads.
    """
    n_g, n = terma.shape
    n_j = weights.shape[0]
    n_k = weights.shape[2]
    n_blocks = (n + CONTRACT_BLOCK - 1) // CONTRACT_BLOCK
    for blk in numba.prange(n_blocks):
        lo = blk * CONTRACT_BLOCK
        hi = min(n, lo + CONTRACT_BLOCK)
        acc = np.zeros((n_k, hi - lo))
        for j in range(n_j):
            acc[:, :] = 0.0
            for g in range(n_g):
                used = False
                for k in range(n_k):
                    if weights[j, g, k] != 0.0:
                        used = True
                if not used:
                    continue
                for k in range(n_k):
                    w = weights[j, g, k]
                    if w == 0.0:
                        continue
                    for v in range(lo, hi):
                        acc[k, v - lo] += w * terma[g, v]
            for k in range(n_k):
                for v in range(lo, hi):
                    out[j, k, v] = acc[k, v - lo]


#: voxels per task of :func:`contract_sources_sparse` (the block of every TERMA row stays in cache).
CONTRACT_SPARSE_BLOCK = 1024


@numba.njit(**NUMBA_PARALLEL_OPTIONS)
def contract_sources_sparse(terma, ptr, rows, vals, out):
    """out[j, v, k] = sum_e vals[e] * terma[rows[e], v] over e in ptr[j K + k] : ptr[j K + k + 1].

    The sparse, voxel-major form of :func:`contract_sources` (only the non-zero weights, in row
    order; the K term sources of a voxel are neighbours in memory, as
    :func:`transport_direct_sources` reads them): terma (R, n) float32, >= 0; ptr (J K + 1,)
    int64; rows (E,) int64; vals (E,) float64 (signed for build-up kernels); out (J, n, K)
    float32, overwritten. One ``prange`` task per block of
    :data:`CONTRACT_SPARSE_BLOCK` voxels (the block of every TERMA row stays in cache for all
    directions of the call), entries summed in order in float32 (the precision of the output;
    8 voxels per SIMD instruction instead of 4: -30 % CPU on the liver plan, doses within 1e-6
    of the float64 sum): results do not depend on the number of threads.
    """
    n = terma.shape[1]
    n_j = out.shape[0]
    n_k = out.shape[2]
    n_blocks = (n + CONTRACT_SPARSE_BLOCK - 1) // CONTRACT_SPARSE_BLOCK
    for blk in numba.prange(n_blocks):
        lo = blk * CONTRACT_SPARSE_BLOCK
        hi = min(n, lo + CONTRACT_SPARSE_BLOCK)
        nb = hi - lo
        acc = np.empty(nb, dtype=np.float32)
        for j in range(n_j):
            for k in range(n_k):
                acc[:] = 0.0
                for e in range(ptr[j * n_k + k], ptr[j * n_k + k + 1]):
                    w = np.float32(vals[e])
                    row = terma[rows[e], lo:hi]
                    for v in range(nb):
                        acc[v] += w * row[v]
                o = out[j, lo:hi, k]
                for v in range(nb):
                    o[v] = acc[v]




@numba.njit(**NUMBA_PARALLEL_OPTIONS)
def transport_direct_sources(src, rho, dose, m, sgn, da, db, step_cm, rates, surface=False,
                             phi=np.zeros((1, 1, 1)), esc_rate=np.zeros(1), directional=False,
                             normal=np.zeros((1, 3)), u_xyz=np.zeros(3)):
    """dose += the transport of direct term sources along one direction (shared directions).

    ``src`` (nz, ny, nx, K) float32 or float64, voxel-major: ``src[..., k]`` is the source of
    term ``k`` (TERMA x amplitude, signed for build-up terms); ``rho`` (nz, ny, nx) float64;
    ``dose`` (nz, ny, nx) float64, accumulated in place; geometry and recursion as
    :func:`transport_direction` with ``direct_sources=True`` (same results to rounding), but the
    K sources of a voxel are read from one cache line instead of K volumes. ``surface``,
    ``phi``, ``esc_rate``, ``directional``, ``normal``: the surface escape of
    :func:`transport_direction`; ``u_xyz`` (3,) the direction (LPS, unit; used when ``directional``).
    """
    shape = rho.shape
    (a_ax, b_ax, n_m, n_a, n_b, s_m, s_a, s_b, off_a, off_b, max_a, max_b, lines_a,
     lines_b) = _line_layout(shape, m, da, db)
    n_k = rates.size
    n_vox = shape[0] * shape[1] * shape[2]
    sf = src.reshape((n_vox, n_k))
    rf = rho.reshape(n_vox)
    df = dose.reshape(n_vox)
    pf = phi.reshape(phi.size)
    inv_rates = 1.0 / rates
    esc_idx, plain_idx, e_lo, e_hi, a_max, e_max = _escape_terms(surface, esc_rate, rates)
    escape = esc_idx.size > 0  # no term with an escape rate: the uncorrected transport, bit for bit
    for task in numba.prange(lines_a):
        ia = task - max_a
        flux = np.zeros((lines_b, n_k))
        ex = np.ones((lines_b, n_k))
        gg = np.ones((lines_b, n_k))
        last_delta = np.full(lines_b, -1.0)
        has_flux = np.zeros(lines_b, dtype=np.bool_)
        started = False
        for n in range(n_m):
            ja = ia + off_a[n]
            if ja < 0 or ja >= n_a:
                if started:
                    break
                continue
            started = True
            km = n if sgn > 0 else n_m - 1 - n
            base = km * s_m + ja * s_a
            ob = off_b[n]
            jb_lo = max(0, ob - max_b)
            jb_hi = min(n_b, lines_b - max_b + ob)
            for jb in range(jb_lo, jb_hi):
                li = jb - ob + max_b
                idx = base + jb * s_b
                sv = sf[idx]
                if not has_flux[li]:
                    t = 0.0
                    for k in range(n_k):
                        t += abs(sv[k])
                    if t == 0.0:
                        continue
                    has_flux[li] = True
                delta = rf[idx] * step_cm
                if delta != last_delta[li]:
                    last_delta[li] = delta
                    _segment_factors(rates, inv_rates, delta, ex, gg, li)
                fl = flux[li]
                el = ex[li]
                gl = gg[li]
                ph = pf[idx] if escape else 0.0
                if ph != 0.0 and directional:
                    ph = _weight_along(ph, normal, idx, u_xyz[0], u_xyz[1], u_xyz[2])
                if ph != 0.0:
                    df[idx] += _deposit_escape_series(flux, ex, gg, li, sv, rates, inv_rates, delta, ph, esc_rate, esc_idx,
                                               plain_idx, e_lo, e_hi, a_max, e_max)
                    continue
                d = 0.0
                for k in range(n_k):
                    f = fl[k]
                    gk = gl[k]
                    ek = el[k]
                    sk = sv[k]
                    d += f * rates[k] * gk + sk * (1.0 - gk)
                    fl[k] = f * ek + sk * (1.0 - ek) * inv_rates[k]
                df[idx] += d


@numba.njit(**NUMBA_PARALLEL_OPTIONS)
def coarse_density(rho, f):
    """(nzc, nyc, nxc) mean density of each ``f x f x f`` block of ``rho`` (nz, ny, nx), over the
    voxels the block holds (blocks at the far faces may hold fewer); ``nzc = ceil(nz / f)`` etc.
    Also returns the block masses (sum of the densities, voxel volume 1) used by
    :func:`coarse_sources`."""
    nz, ny, nx = rho.shape
    nzc = (nz + f - 1) // f
    nyc = (ny + f - 1) // f
    nxc = (nx + f - 1) // f
    out = np.zeros((nzc, nyc, nxc))
    mass = np.zeros((nzc, nyc, nxc))
    for kc in numba.prange(nzc):
        for jc in range(nyc):
            for ic in range(nxc):
                s = 0.0
                c = 0
                for kz in range(kc * f, min(nz, kc * f + f)):
                    for jy in range(jc * f, min(ny, jc * f + f)):
                        for ix in range(ic * f, min(nx, ic * f + f)):
                            s += rho[kz, jy, ix]
                            c += 1
                mass[kc, jc, ic] = s
                out[kc, jc, ic] = s / c
    return out, mass


@numba.njit(**NUMBA_PARALLEL_OPTIONS)
def coarse_sources(terma, rho, mass, f):
    """(R, nzc, nyc, nxc) float32 mass-weighted mean of each row of ``terma`` (R, nz, ny, nx) over
    the ``f x f x f`` blocks (``mass`` from :func:`coarse_density`): the energy a block releases,
    ``sum_i rho_i T_i``, is kept (0 where the block's mass is 0). One ``prange`` task per row; the
    voxels are read in memory order (the sums of a block in that order)."""
    n_r, nz, ny, nx = terma.shape
    nzc, nyc, nxc = mass.shape
    out = np.zeros((n_r, nzc, nyc, nxc), dtype=np.float32)
    ic_of = np.empty(nx, np.int64)
    for ix in range(nx):
        ic_of[ix] = ix // f
    for r in numba.prange(n_r):
        acc = np.zeros((nzc, nyc, nxc))
        for kz in range(nz):
            kc = kz // f
            for jy in range(ny):
                row = acc[kc, jy // f]
                for ix in range(nx):
                    row[ic_of[ix]] += rho[kz, jy, ix] * terma[r, kz, jy, ix]
        for kc in range(nzc):
            for jc in range(nyc):
                for ic in range(nxc):
                    m = mass[kc, jc, ic]
                    if m > 0.0:
                        out[r, kc, jc, ic] = acc[kc, jc, ic] / m
    return out


#: values per task of :func:`range_check` (results per block, reduced in block order).
RANGE_CHECK_BLOCK = 1 << 16


@numba.njit(**NUMBA_PARALLEL_OPTIONS)
def range_check(values):
    """(minimum of the finite values, number of NaN/inf values, any value > 0) of a flat array.

    The input check of the large TERMA stack of :func:`~tomodose.transport.collapsed_cone
    .shared_direction_dose` in one parallel pass (``check_array``'s ``isfinite`` and ``min`` are
    two serial passes: 0.5 s for the 835 MB of the 3 mm liver plan). One ``prange`` task per
    block, per-block results reduced in block order (independent of the number of threads).
    """
    n = values.size
    n_blocks = (n + RANGE_CHECK_BLOCK - 1) // RANGE_CHECK_BLOCK
    mins = np.full(n_blocks, np.inf)
    bad = np.zeros(n_blocks, np.int64)
    pos = np.zeros(n_blocks, np.bool_)
    for blk in numba.prange(n_blocks):
        lo = blk * RANGE_CHECK_BLOCK
        hi = min(n, lo + RANGE_CHECK_BLOCK)
        m = np.inf
        nb = 0
        p = False
        for i in range(lo, hi):
            v = values[i]
            if math.isfinite(v):
                if v < m:
                    m = v
                if v > 0.0:
                    p = True
            else:
                nb += 1
        mins[blk] = m
        bad[blk] = nb
        pos[blk] = p
    m = np.inf
    nb = 0
    p = False
    for blk in range(n_blocks):
        if mins[blk] < m:
            m = mins[blk]
        nb += bad[blk]
        p = p or pos[blk]
    return m, nb, p
