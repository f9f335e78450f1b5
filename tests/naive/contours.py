"""Slow, obviously-correct NumPy twins of :mod:`tomodose._kernels.contours`."""

from __future__ import annotations

import numpy as np


def nearest_points(ax, ay, bx, by, px, py):
    a = np.column_stack([ax, ay])
    ab = np.column_stack([bx, by]) - a
    l2 = np.maximum(np.einsum("ij,ij->i", ab, ab), 1e-300)
    dx = px[:, None] - a[None, :, 0]
    dy = py[:, None] - a[None, :, 1]
    t = np.clip((dx * ab[None, :, 0] + dy * ab[None, :, 1]) / l2[None, :], 0.0, 1.0)
    ex = dx - t * ab[None, :, 0]
    ey = dy - t * ab[None, :, 1]
    j = np.argmin(ex * ex + ey * ey, axis=1)
    tj = t[np.arange(j.size), j]
    return a[j, 0] + tj * ab[j, 0], a[j, 1] + tj * ab[j, 1]


def ray_depth(ax, ay, bx, by, px, py, nx, ny, inside):
    ex, ey = bx - ax, by - ay
    wx = ax[None, :] - px[:, None]
    wy = ay[None, :] - py[:, None]
    den = nx[:, None] * ey[None, :] - ny[:, None] * ex[None, :]
    ok = np.abs(den) > 1e-12
    den = np.where(ok, den, 1.0)
    dist = (wx * ey[None, :] - wy * ex[None, :]) / den
    t = (wx * ny[:, None] - wy * nx[:, None]) / den
    ok &= (t >= -1e-9) & (t <= 1.0 + 1e-9)
    side = np.where(inside[:, None], dist >= 0, dist <= 0)
    return np.where(ok & side, np.abs(dist), np.inf).min(axis=1)
