"""Exact voxel traversal of a straight segment through a regular grid (Siddon / Jacobs).

Grid convention: array ``[k, j, i]`` = ``[z, y, x]``; voxel ``(k, j, i)`` is the box centred on
``origin + (i dx, j dy, k dz)`` (mm). The traversal is incremental (Jacobs et al. 1998): the
next plane crossing along each axis is tracked as a parameter ``alpha`` in [0, 1] of the segment
``p0 -> p1``; each step adds ``segment_length_mm * values[k, j, i, :]`` to an accumulator.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from tomodose.config import NUMBA_OPTIONS, NUMBA_PARALLEL_OPTIONS

_BIG = 1e300


@numba.njit(**NUMBA_OPTIONS)
def _first_index(p, d, lo, step, n):
    """Index of the voxel entered at coordinate ``p`` moving with direction component ``d``."""
    f = (p - lo) / step
    if d > 0.0:
        i = int(math.floor(f))
    elif d < 0.0:
        i = int(math.ceil(f)) - 1
    else:
        i = int(math.floor(f))
    if i < 0:
        i = 0
    if i > n - 1:
        i = n - 1
    return i


@numba.njit(**NUMBA_OPTIONS)
def _axis_alpha(p0, d, lo, step, n):
    """alpha range (a_in, a_out) in which the line is between the outer planes of one axis."""
    hi = lo + n * step
    if d != 0.0:
        a1 = (lo - p0) / d
        a2 = (hi - p0) / d
        if a1 < a2:
            return a1, a2
        return a2, a1
    if lo <= p0 <= hi:
        return -_BIG, _BIG
    return _BIG, -_BIG


@numba.njit(**NUMBA_OPTIONS)
def _axis_step(p0, d, lo, step, idx):
    """First plane crossing ``alpha`` after voxel ``idx``, ``alpha`` per voxel, and direction (-1, 0, 1)
    of a line ``p0 + alpha d`` along one axis (planes at ``lo + n * step``)."""
    if d > 0.0:
        return (lo + (idx + 1) * step - p0) / d, step / d, 1
    if d < 0.0:
        return (lo + idx * step - p0) / d, -step / d, -1
    return _BIG, _BIG, 0


@numba.njit(**NUMBA_OPTIONS)
def trace_segments(nz, ny, nx, ox, oy, oz, dx, dy, dz, x0, y0, z0, x1, y1, z1, out_index, out_length):
    """List the voxels crossed by the segment ``p0 -> p1`` and the path length in each.

    Parameters
    ----------
    nz, ny, nx : int
        Grid shape.
    ox, oy, oz : float
        Centre of voxel [0, 0, 0] (mm).
    dx, dy, dz : float
        Voxel size (mm).
    x0, y0, z0, x1, y1, z1 : float
        Segment end points (mm). Parts outside the grid contribute nothing.
    out_index : (>= nx + ny + nz + 3,) int64
        Receives the flat C-order indices ``(k * ny + j) * nx + i`` of the voxels crossed, in order
        from ``p0``.
    out_length : same shape, float64
        Receives the path length (mm) in each of them.

    Returns
    -------
    int
        Number of segments written (zero-length steps at plane ties are skipped).
    """
    lx, ly, lz = ox - 0.5 * dx, oy - 0.5 * dy, oz - 0.5 * dz
    ddx, ddy, ddz = x1 - x0, y1 - y0, z1 - z0
    length = math.sqrt(ddx * ddx + ddy * ddy + ddz * ddz)
    if length == 0.0:
        return 0
    ax0, ax1 = _axis_alpha(x0, ddx, lx, dx, nx)
    ay0, ay1 = _axis_alpha(y0, ddy, ly, dy, ny)
    az0, az1 = _axis_alpha(z0, ddz, lz, dz, nz)
    a_min = max(0.0, ax0, ay0, az0)
    a_max = min(1.0, ax1, ay1, az1)
    if a_min >= a_max:
        return 0
    # entry point and first voxel
    i = _first_index(x0 + a_min * ddx, ddx, lx, dx, nx)
    j = _first_index(y0 + a_min * ddy, ddy, ly, dy, ny)
    k = _first_index(z0 + a_min * ddz, ddz, lz, dz, nz)
    # next crossings and increments
    nax, dax, si = _axis_step(x0, ddx, lx, dx, i)
    nay, day, sj = _axis_step(y0, ddy, ly, dy, j)
    naz, daz, sk = _axis_step(z0, ddz, lz, dz, k)
    a_cur = a_min
    count = 0
    while a_cur < a_max:
        a_next = min(nax, nay, naz, a_max)
        seg = (a_next - a_cur) * length
        if seg > 0.0:
            out_index[count] = (k * ny + j) * nx + i
            out_length[count] = seg
            count += 1
        a_cur = a_next
        if a_cur >= a_max:
            break
        if nax <= nay and nax <= naz:
            i += si
            nax += dax
            if i < 0 or i >= nx:
                break
        elif nay <= naz:
            j += sj
            nay += day
            if j < 0 or j >= ny:
                break
        else:
            k += sk
            naz += daz
            if k < 0 or k >= nz:
                break
    return count


@numba.njit(**NUMBA_OPTIONS)
def trace_accumulate(values, ox, oy, oz, dx, dy, dz, x0, y0, z0, x1, y1, z1, acc):
    """Add ``sum over voxels of (path length in mm) * values[k, j, i, :]`` to ``acc`` (m,).

    ``values`` is (nz, ny, nx, m); returns the length (mm) of the segment inside the grid.
    """
    nz, ny, nx, m = values.shape
    cap = nx + ny + nz + 3
    idx = np.empty(cap, dtype=np.int64)
    seg = np.empty(cap)
    n = trace_segments(nz, ny, nx, ox, oy, oz, dx, dy, dz, x0, y0, z0, x1, y1, z1, idx, seg)
    flat = values.reshape(nz * ny * nx, m)
    inside = 0.0
    for q in range(n):
        v = idx[q]
        inside += seg[q]
        for c in range(m):
            acc[c] += seg[q] * flat[v, c]
    return inside


@numba.njit(**NUMBA_PARALLEL_OPTIONS)
def radiological_paths(values, origin, spacing, starts, ends):
    """Line integrals of ``values`` (nz, ny, nx, m) along segments ``starts[n] -> ends[n]`` (mm).

    Returns (n, m) float64: sum of path length (mm) times value over the voxels crossed.
    """
    n = starts.shape[0]
    m = values.shape[3]
    out = np.zeros((n, m))
    for r in numba.prange(n):
        acc = np.zeros(m)
        trace_accumulate(values, origin[0], origin[1], origin[2], spacing[0], spacing[1], spacing[2],
                         starts[r, 0], starts[r, 1], starts[r, 2], ends[r, 0], ends[r, 1], ends[r, 2], acc)
        for c in range(m):
            out[r, c] = acc[c]
    return out


@numba.njit(**NUMBA_OPTIONS)
def trace_pairs_from_voxel(nz, ny, nx, ox, oy, oz, dx, dy, dz, i, j, k, x1, y1, z1, mat_lo, mat_pair, acc):
    """Radiological path per anchor material from the centre of voxel ``(k, j, i)`` to ``p1`` (mm).

    The traversal of :func:`trace_segments` started inside the grid (``alpha = 0`` in voxel
    ``(k, j, i)``), fused with the accumulation: each voxel ``vox`` crossed (flat C-order index)
    adds ``length * mat_pair[vox, 0]`` to ``acc[mat_lo[vox]]`` and ``length * mat_pair[vox, 1]`` to
    ``acc[mat_lo[vox] + 1]`` (no index/length lists). ``acc`` is added to, not reset.
    """
    lx, ly, lz = ox - 0.5 * dx, oy - 0.5 * dy, oz - 0.5 * dz
    x0 = ox + i * dx
    y0 = oy + j * dy
    z0 = oz + k * dz
    ddx, ddy, ddz = x1 - x0, y1 - y0, z1 - z0
    length = math.sqrt(ddx * ddx + ddy * ddy + ddz * ddz)
    if length == 0.0:
        return
    _, ax1 = _axis_alpha(x0, ddx, lx, dx, nx)
    _, ay1 = _axis_alpha(y0, ddy, ly, dy, ny)
    _, az1 = _axis_alpha(z0, ddz, lz, dz, nz)
    a_max = min(1.0, ax1, ay1, az1)
    # flat-index strides: +-1 along x, +-nx along y, +-nx*ny along z
    nax, dax, si = _axis_step(x0, ddx, lx, dx, i)
    nay, day, sj = _axis_step(y0, ddy, ly, dy, j)
    naz, daz, sk = _axis_step(z0, ddz, lz, dz, k)
    sj *= nx
    sk *= nx * ny
    # remaining voxels along each axis before the ray leaves the grid
    ni = nx - 1 - i if si > 0 else (i if si < 0 else nx)
    nj = ny - 1 - j if sj > 0 else (j if sj < 0 else ny)
    nk = nz - 1 - k if sk > 0 else (k if sk < 0 else nz)
    vox = (k * ny + j) * nx + i
    a_cur = 0.0
    while a_cur < a_max:
        a_next = min(nax, nay, naz, a_max)
        seg = (a_next - a_cur) * length
        if seg > 0.0:
            lo = mat_lo[vox]
            acc[lo] += seg * mat_pair[vox, 0]
            acc[lo + 1] += seg * mat_pair[vox, 1]
        a_cur = a_next
        if a_cur >= a_max:
            break
        if nax <= nay and nax <= naz:
            if ni == 0:
                break
            ni -= 1
            vox += si
            nax += dax
        elif nay <= naz:
            if nj == 0:
                break
            nj -= 1
            vox += sj
            nay += day
        else:
            if nk == 0:
                break
            nk -= 1
            vox += sk
            naz += daz
