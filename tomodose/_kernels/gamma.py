"""numba kernels of the gamma index, dose-difference and distance-to-agreement maps.

Plain arrays in, plain arrays out; no validation (see :mod:`tomodose.evaluation.gamma`).

Conventions shared by every kernel here
--------------------------------------
* ``ev`` is the evaluated dose, shape ``(nz, ny, nx)``, indexed ``[k, j, i]``.
* A point is given by its *fractional index in the evaluated grid* ``(fx, fy, fz)``
  (x, y, z order). The evaluated dose there is the trilinear interpolation of the 8
  surrounding voxel centres; it exists only inside the box of voxel centres
  ``0 <= f <= n - 1`` per axis (no extrapolation). An axis with a single voxel accepts only
  ``f == 0`` (within ``_EDGE_TOL``).
* Reference voxel ``flat`` (C order over the reference shape) sits at evaluated fractional
  index ``base0 + (i, j, k) * scale`` (x, y, z), where ``base0`` and ``scale`` map the
  reference grid into the evaluated grid's index space.
* Search offsets ``offs`` (n, 3) are in evaluated-index units (x, y, z) and sorted by
  physical distance; ``dist2`` (n,) holds ``(distance / DTA) ** 2`` for each of them and
  ``shell`` (n,) the index of the concentric shell the point belongs to.

* ``bmin``/``bmax`` are minima/maxima of ``ev`` over blocks of ``block``^3 voxels
  (:func:`block_extrema`); they bound the evaluated dose anywhere in a search ball and make the
  early stops exact (see :func:`gamma_search`).

Every parallel loop writes only its own output element (``out[m]`` for ``points[m]``, or one
block / one slice): race-free by construction, so results do not depend on the number of
threads or on scheduling.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from tomodose.config import NUMBA_OPTIONS, NUMBA_PARALLEL_OPTIONS

#: tolerance (in index units) for points that sit on the outer voxel centres.
_EDGE_TOL = 1e-9
#: number of bisection steps that locate the agreement point along a search ray (DTA map).
_BISECTION_STEPS = 40


@numba.njit(**NUMBA_OPTIONS)
def trilinear(ev, fx, fy, fz):
    """Trilinear interpolation of ``ev`` at fractional index (fx, fy, fz); NaN outside.

    Inside means ``-_EDGE_TOL <= f <= n - 1 + _EDGE_TOL`` on every axis. The lower corner is
    ``clip(trunc(f), 0, n - 2)`` (so the last voxel centre uses the last cell with weight 1),
    the upper ``min(lower + 1, n - 1)`` (an axis with one voxel uses it twice).
    """
    nz, ny, nx = ev.shape
    if (
        fx < -_EDGE_TOL or fx > nx - 1 + _EDGE_TOL
        or fy < -_EDGE_TOL or fy > ny - 1 + _EDGE_TOL
        or fz < -_EDGE_TOL or fz > nz - 1 + _EDGE_TOL
    ):
        return np.nan
    i0 = max(min(int(fx), nx - 2), 0)
    j0 = max(min(int(fy), ny - 2), 0)
    k0 = max(min(int(fz), nz - 2), 0)
    i1 = min(i0 + 1, nx - 1)
    j1 = min(j0 + 1, ny - 1)
    k1 = min(k0 + 1, nz - 1)
    tx = fx - i0
    ty = fy - j0
    tz = fz - k0
    c00 = ev[k0, j0, i0] + tx * (ev[k0, j0, i1] - ev[k0, j0, i0])
    c01 = ev[k0, j1, i0] + tx * (ev[k0, j1, i1] - ev[k0, j1, i0])
    c10 = ev[k1, j0, i0] + tx * (ev[k1, j0, i1] - ev[k1, j0, i0])
    c11 = ev[k1, j1, i0] + tx * (ev[k1, j1, i1] - ev[k1, j1, i0])
    c0 = c00 + ty * (c01 - c00)
    c1 = c10 + ty * (c11 - c10)
    return c0 + tz * (c1 - c0)


@numba.njit(**NUMBA_OPTIONS)
def _unravel(flat, ny, nx):
    k = flat // (ny * nx)
    rem = flat - k * ny * nx
    j = rem // nx
    i = rem - j * nx
    return k, j, i


@numba.njit(**NUMBA_PARALLEL_OPTIONS)
def block_extrema(ev, block, bmin, bmax):
    """Minimum and maximum of ``ev`` over blocks of ``block``^3 voxels (last blocks partial).

    ``bmin``/``bmax`` have shape ``ceil(ev.shape / block)`` and are written.
    """
    nz, ny, nx = ev.shape
    nbz, nby, nbx = bmin.shape
    for kb in numba.prange(nbz):
        for jb in range(nby):
            for ib in range(nbx):
                lo = np.inf
                hi = -np.inf
                for k in range(kb * block, min((kb + 1) * block, nz)):
                    for j in range(jb * block, min((jb + 1) * block, ny)):
                        for i in range(ib * block, min((ib + 1) * block, nx)):
                            v = ev[k, j, i]
                            if v < lo:
                                lo = v
                            if v > hi:
                                hi = v
                bmin[kb, jb, ib] = lo
                bmax[kb, jb, ib] = hi
    return bmin, bmax


@numba.njit(**NUMBA_OPTIONS)
def _index_box(f, reach, n):
    """Voxel index range [lo, hi] whose trilinear cells cover all points within ``f +- reach``."""
    lo = int(math.floor(f - reach))
    hi = int(math.ceil(f + reach))
    if n == 1:
        return 0, 0
    if lo < 0:
        lo = 0
    if lo > n - 2:
        lo = n - 2
    if hi > n - 1:
        hi = n - 1
    if hi < lo + 1:
        hi = lo + 1
    return lo, hi


@numba.njit(**NUMBA_OPTIONS)
def _dose_range(bmin, bmax, block, shape, fx, fy, fz, reach):
    """Lower and upper bounds of the evaluated dose anywhere within ``reach`` (index units,
    x, y, z) of the point (fx, fy, fz), from the block extrema."""
    ilo, ihi = _index_box(fx, reach[0], shape[2])
    jlo, jhi = _index_box(fy, reach[1], shape[1])
    klo, khi = _index_box(fz, reach[2], shape[0])
    lo = np.inf
    hi = -np.inf
    for kb in range(klo // block, khi // block + 1):
        for jb in range(jlo // block, jhi // block + 1):
            for ib in range(ilo // block, ihi // block + 1):
                if bmin[kb, jb, ib] < lo:
                    lo = bmin[kb, jb, ib]
                if bmax[kb, jb, ib] > hi:
                    hi = bmax[kb, jb, ib]
    return lo, hi


@numba.njit(**NUMBA_OPTIONS)
def _criterion_and_bound(dr, local, dd_fraction, inv_dd_global, lo, hi):
    """Inverse dose criterion of a reference dose ``dr`` and the squared lower bound of its
    gamma from the evaluated-dose range ``[lo, hi]`` within the search radius (a relative
    1e-9 margin keeps the bound below every value the interpolation can return)."""
    if local:
        inv_dd = 1.0 / (dd_fraction * dr)
    else:
        inv_dd = inv_dd_global
    gap = max(lo - dr, dr - hi, 0.0)
    gap = max(gap - 1e-9 * (abs(lo) + abs(hi) + abs(dr)), 0.0) * inv_dd
    return inv_dd, gap * gap


@numba.njit(**NUMBA_PARALLEL_OPTIONS)
def gamma_search(ref_flat, ref_shape_yx, points, ev, base0, scale, offs, dist2, inv_dd_global,
                 local, dd_fraction, bmin, bmax, block, reach, out):
    """Gamma index at the reference voxels ``points`` (flat indices).

    For each reference voxel with dose ``Dr`` the kernel scans the search offsets in order of
    increasing distance, interpolates the evaluated dose ``De`` there and keeps the minimum of
    ``dist2 + ((De - Dr) / DD) ** 2`` where ``DD = 1 / inv_dd_global`` (global) or
    ``dd_fraction * Dr`` (local). ``out[m]`` receives sqrt of the minimum, ``inf`` when no
    offset lands inside the evaluated grid.

    Early stop, exact with respect to the whole offset set: every evaluated dose within the
    search ball lies in ``[lo, hi]`` (block extrema of the voxels whose cells the ball touches;
    trilinear interpolation never leaves the range of its 8 corners), so ``|De - Dr| >= m =
    dist(Dr, [lo, hi])`` for every offset. Offsets are sorted by distance, so once
    ``dist2[p] + (m / DD)^2`` reaches the best value found no later offset can improve it.
    (``m`` is reduced by a relative 1e-9 to absorb rounding.)

    Parameters
    ----------
    ref_flat : (N,) float64, reference dose, C-order flattened.
    ref_shape_yx : (2,) int64, (ny, nx) of the reference grid.
    points : (M,) int64, flat indices of the reference voxels to evaluate.
    ev : (nz, ny, nx) float64, evaluated dose.
    base0, scale : (3,) float64, reference index -> evaluated fractional index (x, y, z).
    offs : (n, 3) float64, search offsets in evaluated-index units (x, y, z), sorted by distance.
    dist2 : (n,) float64, (distance / DTA) ** 2 of each offset, non-decreasing.
    inv_dd_global : float, 1 / (global dose criterion in Gy).
    local : bool; dd_fraction : float, local dose criterion as a fraction of ``Dr``.
    bmin, bmax : block extrema of ``ev`` (:func:`block_extrema`); block : int, their block size.
    reach : (3,) float64, largest ``|offs|`` per axis (x, y, z).
    out : (M,) float64, written.
    """
    ny = ref_shape_yx[0]
    nx = ref_shape_yx[1]
    n_off = offs.shape[0]
    shape = ev.shape
    for m in numba.prange(points.shape[0]):
        flat = points[m]
        k, j, i = _unravel(flat, ny, nx)
        dr = ref_flat[flat]
        bx = base0[0] + i * scale[0]
        by = base0[1] + j * scale[1]
        bz = base0[2] + k * scale[2]
        lo, hi = _dose_range(bmin, bmax, block, shape, bx, by, bz, reach)
        inv_dd, lb = _criterion_and_bound(dr, local, dd_fraction, inv_dd_global, lo, hi)
        best = np.inf
        for p in range(n_off):
            d2 = dist2[p]
            if d2 + lb >= best:
                break
            de = trilinear(ev, bx + offs[p, 0], by + offs[p, 1], bz + offs[p, 2])
            if de != de:  # outside the evaluated grid
                continue
            diff = (de - dr) * inv_dd
            g2 = d2 + diff * diff
            if g2 < best:
                best = g2
        out[m] = math.sqrt(best)
    return out


@numba.njit(**NUMBA_PARALLEL_OPTIONS)
def gamma_search_aligned(ref_flat, ref_shape_yx, points, ev, ishift, oi, ow, dist2, inv_dd_global,
                         local, dd_fraction, bmin, bmax, block, reach, out):
    """:func:`gamma_search` for a reference grid whose voxel centres are evaluated voxel centres.

    Reference voxel ``(k, j, i)`` is evaluated voxel ``(k, j, i) + ishift`` (x, y, z order in
    ``ishift``), so every search point has the same cell offset and weights for all reference
    voxels: ``oi`` (n, 3) int64 lower-corner offsets and ``ow`` (n, 3) float64 weights in
    [0, 1) (x, y, z), precomputed once. Same early stop and result as :func:`gamma_search`
    (to rounding of the weights).
    """
    ny = ref_shape_yx[0]
    nx = ref_shape_yx[1]
    enz, eny, enx = ev.shape
    n_off = oi.shape[0]
    shape = ev.shape
    for m in numba.prange(points.shape[0]):
        flat = points[m]
        k, j, i = _unravel(flat, ny, nx)
        dr = ref_flat[flat]
        ci = i + ishift[0]
        cj = j + ishift[1]
        ck = k + ishift[2]
        lo, hi = _dose_range(bmin, bmax, block, shape, float(ci), float(cj), float(ck), reach)
        inv_dd, lb = _criterion_and_bound(dr, local, dd_fraction, inv_dd_global, lo, hi)
        best = np.inf
        for p in range(n_off):
            d2 = dist2[p]
            if d2 + lb >= best:
                break
            tx = ow[p, 0]
            ty = ow[p, 1]
            tz = ow[p, 2]
            i0 = ci + oi[p, 0]
            j0 = cj + oi[p, 1]
            k0 = ck + oi[p, 2]
            # inside: the lower corner must exist, the upper one too unless its weight is 0
            if i0 < 0 or j0 < 0 or k0 < 0:
                continue
            if i0 > enx - 1 or (tx > 0.0 and i0 > enx - 2):
                continue
            if j0 > eny - 1 or (ty > 0.0 and j0 > eny - 2):
                continue
            if k0 > enz - 1 or (tz > 0.0 and k0 > enz - 2):
                continue
            i1 = min(i0 + 1, enx - 1)
            j1 = min(j0 + 1, eny - 1)
            k1 = min(k0 + 1, enz - 1)
            c00 = ev[k0, j0, i0] + tx * (ev[k0, j0, i1] - ev[k0, j0, i0])
            c01 = ev[k0, j1, i0] + tx * (ev[k0, j1, i1] - ev[k0, j1, i0])
            c10 = ev[k1, j0, i0] + tx * (ev[k1, j0, i1] - ev[k1, j0, i0])
            c11 = ev[k1, j1, i0] + tx * (ev[k1, j1, i1] - ev[k1, j1, i0])
            c0 = c00 + ty * (c01 - c00)
            c1 = c10 + ty * (c11 - c10)
            de = c0 + tz * (c1 - c0)
            diff = (de - dr) * inv_dd
            g2 = d2 + diff * diff
            if g2 < best:
                best = g2
        out[m] = math.sqrt(best)
    return out


@numba.njit(**NUMBA_PARALLEL_OPTIONS)
def sample_at_reference(ref_shape, ev, base0, scale, out):
    """Evaluated dose interpolated at every reference voxel centre (NaN outside)."""
    nz, ny, nx = ref_shape[0], ref_shape[1], ref_shape[2]
    for k in numba.prange(nz):
        for j in range(ny):
            for i in range(nx):
                out[k, j, i] = trilinear(
                    ev, base0[0] + i * scale[0], base0[1] + j * scale[1], base0[2] + k * scale[2]
                )
    return out


@numba.njit(**NUMBA_OPTIONS)
def _ray_crossing(ev, bx, by, bz, ox, oy, oz, dr, s0):
    """Fraction t in (0, 1] along the ray base -> base + offset where ``De - Dr`` changes sign.

    ``s0`` is the sign of ``De - Dr`` at the base point; the end point is known to have the
    opposite sign (or zero). Bisection on the trilinear interpolant.
    """
    lo = 0.0
    hi = 1.0
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        v = trilinear(ev, bx + mid * ox, by + mid * oy, bz + mid * oz) - dr
        if v * s0 > 0.0:
            lo = mid
        else:
            hi = mid
    return hi


@numba.njit(**NUMBA_PARALLEL_OPTIONS)
def dta_search(ref_flat, ref_shape_yx, points, ev, base0, scale, offs, dist_mm, shell, bmin, bmax,
               block, reach, out):
    """Distance to agreement (mm) at the reference voxels ``points``.

    The agreement surface is where the evaluated dose equals the reference dose ``Dr``. With
    ``s0`` the sign of ``De - Dr`` at the reference point itself: 0 there gives DTA 0. Otherwise
    the first shell (in distance order) holding an offset whose ``De - Dr`` is zero or of the
    opposite sign is located; for every such offset of that shell the crossing is refined by
    bisection along the straight ray from the reference point, and the smallest crossing
    distance is the DTA. ``out[m]``: NaN when the reference point is outside the evaluated
    grid, ``inf`` when no agreement lies within the search radius. When ``Dr`` lies outside the
    range of the evaluated voxels the search ball touches (block extrema ``bmin``/``bmax`` of
    size ``block``, ``reach`` = largest ``|offs|`` per axis) there is no agreement in reach and
    ``inf`` is returned without searching (exact: interpolation stays within that range).
    """
    ny = ref_shape_yx[0]
    nx = ref_shape_yx[1]
    n_off = offs.shape[0]
    for m in numba.prange(points.shape[0]):
        flat = points[m]
        k, j, i = _unravel(flat, ny, nx)
        dr = ref_flat[flat]
        bx = base0[0] + i * scale[0]
        by = base0[1] + j * scale[1]
        bz = base0[2] + k * scale[2]
        d0 = trilinear(ev, bx, by, bz)
        if d0 != d0:
            out[m] = np.nan
            continue
        v0 = d0 - dr
        if v0 == 0.0:
            out[m] = 0.0
            continue
        lo, hi = _dose_range(bmin, bmax, block, ev.shape, bx, by, bz, reach)
        if dr < lo or dr > hi:
            out[m] = np.inf
            continue
        s0 = 1.0 if v0 > 0.0 else -1.0
        best = np.inf
        found_shell = -1
        for p in range(n_off):
            if found_shell >= 0 and shell[p] != found_shell:
                break
            de = trilinear(ev, bx + offs[p, 0], by + offs[p, 1], bz + offs[p, 2])
            if de != de:
                continue
            if (de - dr) * s0 > 0.0:
                continue
            found_shell = shell[p]
            t = _ray_crossing(ev, bx, by, bz, offs[p, 0], offs[p, 1], offs[p, 2], dr, s0)
            d = t * dist_mm[p]
            if d < best:
                best = d
        out[m] = best
    return out
