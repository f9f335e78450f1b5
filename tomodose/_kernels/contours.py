"""numba kernels of planar-contour geometry (private; no validation here).

Polygon edges are given as start points ``(ax, ay)`` and end points ``(bx, by)`` (all the
polygons of one plane concatenated). Every kernel loops over points in ``prange``; each point
writes only its own output element, so the result is race-free and independent of the thread
count.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from tomodose.config import NUMBA_PARALLEL_OPTIONS


@numba.njit(**NUMBA_PARALLEL_OPTIONS)
def nearest_points(ax, ay, bx, by, px, py):
    """Nearest point ``(qx, qy)`` on the edges to each point ``(px, py)``."""
    n = px.size
    qx = np.empty(n)
    qy = np.empty(n)
    for i in numba.prange(n):
        best = math.inf
        bqx = px[i]
        bqy = py[i]
        for e in range(ax.size):
            ex = bx[e] - ax[e]
            ey = by[e] - ay[e]
            l2 = ex * ex + ey * ey
            dx = px[i] - ax[e]
            dy = py[i] - ay[e]
            t = 0.0
            if l2 > 1e-300:
                t = (dx * ex + dy * ey) / l2
                t = min(max(t, 0.0), 1.0)
            rx = dx - t * ex
            ry = dy - t * ey
            d2 = rx * rx + ry * ry
            if d2 < best:
                best = d2
                bqx = ax[e] + t * ex
                bqy = ay[e] + t * ey
        qx[i] = bqx
        qy[i] = bqy
    return qx, qy


@numba.njit(**NUMBA_PARALLEL_OPTIONS)
def ray_depth(ax, ay, bx, by, px, py, nx, ny, inside):
    """Distance from each point to the edges along ``+n`` (points inside) or ``-n`` (outside).

    ``inf`` where the line misses every edge on that side.
    """
    n = px.size
    out = np.empty(n)
    for i in numba.prange(n):
        best = math.inf
        for e in range(ax.size):
            ex = bx[e] - ax[e]
            ey = by[e] - ay[e]
            den = nx[i] * ey - ny[i] * ex
            if abs(den) <= 1e-12:
                continue
            wx = ax[e] - px[i]
            wy = ay[e] - py[i]
            dist = (wx * ey - wy * ex) / den
            t = (wx * ny[i] - wy * nx[i]) / den
            if t < -1e-9 or t > 1.0 + 1e-9:
                continue
            if inside[i]:
                if dist >= 0.0 and dist < best:
                    best = dist
            elif dist <= 0.0 and -dist < best:
                best = -dist
        out[i] = best
    return out
