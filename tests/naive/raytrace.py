"""Naive twin of tomodose._kernels.raytrace: Siddon's method with all plane crossings sorted."""

from __future__ import annotations

import numpy as np


def radiological_path(values, origin, spacing, p0, p1):
    """Line integral (mm * value) of ``values`` (nz, ny, nx, m) along ``p0 -> p1`` (mm). Returns (m,)."""
    values = np.asarray(values, dtype=np.float64)
    nz, ny, nx, m = values.shape
    p0 = np.asarray(p0, dtype=np.float64)
    p1 = np.asarray(p1, dtype=np.float64)
    d = p1 - p0
    length = np.linalg.norm(d)
    shape_xyz = (nx, ny, nz)
    alphas = [0.0, 1.0]
    for a in range(3):
        if d[a] == 0:
            continue
        planes = origin[a] - 0.5 * spacing[a] + spacing[a] * np.arange(shape_xyz[a] + 1)
        al = (planes - p0[a]) / d[a]
        alphas.extend(al[(al > 0) & (al < 1)].tolist())
    alphas = np.unique(np.asarray(alphas))
    total = np.zeros(m)
    for a0, a1 in zip(alphas[:-1], alphas[1:]):
        if a1 <= a0:
            continue
        mid = p0 + 0.5 * (a0 + a1) * d
        idx = np.floor((mid - (np.asarray(origin) - 0.5 * np.asarray(spacing))) / np.asarray(spacing)).astype(int)
        i, j, k = idx
        if 0 <= i < nx and 0 <= j < ny and 0 <= k < nz:
            total += (a1 - a0) * length * values[k, j, i]
    return total


def brute_force_line_integral(values, origin, spacing, p0, p1, n_samples=200_000):
    """Midpoint-rule integral with ``n_samples`` nearest-voxel samples (for tolerance checks)."""
    values = np.asarray(values, dtype=np.float64)
    nz, ny, nx, m = values.shape
    p0 = np.asarray(p0, dtype=np.float64)
    p1 = np.asarray(p1, dtype=np.float64)
    t = (np.arange(n_samples) + 0.5) / n_samples
    pts = p0 + t[:, None] * (p1 - p0)
    idx = np.floor((pts - (np.asarray(origin) - 0.5 * np.asarray(spacing))) / np.asarray(spacing)).astype(int)
    ok = (idx[:, 0] >= 0) & (idx[:, 0] < nx) & (idx[:, 1] >= 0) & (idx[:, 1] < ny) & (idx[:, 2] >= 0) & (idx[:, 2] < nz)
    step = np.linalg.norm(p1 - p0) / n_samples
    v = values[idx[ok, 2], idx[ok, 1], idx[ok, 0]]
    return v.sum(axis=0) * step
