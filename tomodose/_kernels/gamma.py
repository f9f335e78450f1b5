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

Every parallel loop writes only its own output element (``out[flat]``): race-free by
construction, so results do not depend on the number of threads or on scheduling.
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
def _axis_cell(f, n):
    """Lower cell index and weight along one axis; ``i0 < 0`` when outside."""
    if n == 1:
        if -_EDGE_TOL <= f <= _EDGE_TOL:
            return 0, 0, 0.0
        return -1, 0, 0.0
    if f < -_EDGE_TOL or f > n - 1 + _EDGE_TOL:
        return -1, 0, 0.0
    i0 = int(math.floor(f))
    if i0 < 0:
        i0 = 0
    if i0 > n - 2:
        i0 = n - 2
    t = f - i0
    if t < 0.0:
        t = 0.0
    elif t > 1.0:
        t = 1.0
    return i0, i0 + 1, t


@numba.njit(**NUMBA_OPTIONS)
def trilinear(ev, fx, fy, fz):
    """Trilinear interpolation of ``ev`` at fractional index (fx, fy, fz); NaN outside."""
    nz, ny, nx = ev.shape
    i0, i1, tx = _axis_cell(fx, nx)
    if i0 < 0:
        return np.nan
    j0, j1, ty = _axis_cell(fy, ny)
    if j0 < 0:
        return np.nan
    k0, k1, tz = _axis_cell(fz, nz)
    if k0 < 0:
        return np.nan
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
def gamma_search(ref_flat, ref_shape_yx, points, ev, base0, scale, offs, dist2, inv_dd_global,
                 local, dd_fraction, out):
    """Gamma index at the reference voxels ``points`` (flat indices).

    For each reference voxel with dose ``Dr`` the kernel scans the search offsets in order of
    increasing distance, interpolates the evaluated dose ``De`` there and keeps the minimum of
    ``dist2 + ((De - Dr) / DD) ** 2`` where ``DD = 1 / inv_dd_global`` (global) or
    ``dd_fraction * Dr`` (local). The scan stops at the first offset whose ``dist2`` alone
    reaches the best value found (all later offsets are farther, so the result is the exact
    minimum over the whole offset set). ``out[m]`` receives sqrt of the minimum, ``inf`` when
    no offset lands inside the evaluated grid.

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
    out : (M,) float64, written.
    """
    ny = ref_shape_yx[0]
    nx = ref_shape_yx[1]
    n_off = offs.shape[0]
    for m in numba.prange(points.shape[0]):
        flat = points[m]
        k, j, i = _unravel(flat, ny, nx)
        dr = ref_flat[flat]
        if local:
            inv_dd = 1.0 / (dd_fraction * dr)
        else:
            inv_dd = inv_dd_global
        bx = base0[0] + i * scale[0]
        by = base0[1] + j * scale[1]
        bz = base0[2] + k * scale[2]
        best = np.inf
        for p in range(n_off):
            d2 = dist2[p]
            if d2 >= best:
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
def dta_search(ref_flat, ref_shape_yx, points, ev, base0, scale, offs, dist_mm, shell, out):
    """Distance to agreement (mm) at the reference voxels ``points``.

    The agreement surface is where the evaluated dose equals the reference dose ``Dr``. With
    ``s0`` the sign of ``De - Dr`` at the reference point itself: 0 there gives DTA 0. Otherwise
    the first shell (in distance order) holding an offset whose ``De - Dr`` is zero or of the
    opposite sign is located; for every such offset of that shell the crossing is refined by
    bisection along the straight ray from the reference point, and the smallest crossing
    distance is the DTA. ``out[m]``: NaN when the reference point is outside the evaluated
    grid, ``inf`` when no agreement lies within the search radius.
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
