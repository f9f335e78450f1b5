"""Slow, obviously-correct NumPy twins of :mod:`tomodose._kernels.gamma`.

Same arguments and outputs as the kernels, but no early stop and no cleverness: every search
offset of every reference voxel is interpolated and the minimum is taken.
"""

from __future__ import annotations

import numpy as np

EDGE_TOL = 1e-9


def trilinear(ev: np.ndarray, f: np.ndarray) -> np.ndarray:
    """Trilinear interpolation of ``ev`` (nz, ny, nx) at fractional indices ``f`` (n, 3) = (x, y, z).

    NaN outside the box of voxel centres; an axis with one voxel accepts only f == 0.
    """
    f = np.atleast_2d(np.asarray(f, dtype=np.float64))
    n_xyz = np.array(ev.shape[::-1])
    out = np.full(f.shape[0], np.nan)
    for m in range(f.shape[0]):
        lo, w = [], []
        inside = True
        for a in range(3):
            n = n_xyz[a]
            v = f[m, a]
            if n == 1:
                if abs(v) > EDGE_TOL:
                    inside = False
                lo.append(0)
                w.append(0.0)
                continue
            if v < -EDGE_TOL or v > n - 1 + EDGE_TOL:
                inside = False
                break
            i0 = min(max(int(np.floor(v)), 0), n - 2)
            lo.append(i0)
            w.append(min(max(v - i0, 0.0), 1.0))
        if not inside:
            continue
        total = 0.0
        for dz in (0, 1):
            for dy in (0, 1):
                for dx in (0, 1):
                    i = min(lo[0] + dx, n_xyz[0] - 1)
                    j = min(lo[1] + dy, n_xyz[1] - 1)
                    k = min(lo[2] + dz, n_xyz[2] - 1)
                    weight = (
                        (w[0] if dx else 1 - w[0])
                        * (w[1] if dy else 1 - w[1])
                        * (w[2] if dz else 1 - w[2])
                    )
                    total += weight * ev[k, j, i]
        out[m] = total
    return out


def _base(flat, ref_shape_yx, base0, scale):
    ny, nx = int(ref_shape_yx[0]), int(ref_shape_yx[1])
    k, rem = divmod(int(flat), ny * nx)
    j, i = divmod(rem, nx)
    return np.asarray(base0) + np.array([i, j, k], dtype=np.float64) * np.asarray(scale)


def gamma_search(ref_flat, ref_shape_yx, points, ev, base0, scale, offs, dist2, inv_dd_global,
                 local, dd_fraction, bmin, bmax, block, reach, out):
    """Brute-force gamma: minimum over *all* offsets of dist2 + ((De - Dr) / DD)^2.

    (``bmin``, ``bmax``, ``block``, ``reach`` only serve the kernel's early stop: unused.)"""
    for m, flat in enumerate(points):
        dr = ref_flat[flat]
        inv_dd = 1.0 / (dd_fraction * dr) if local else inv_dd_global
        de = trilinear(ev, _base(flat, ref_shape_yx, base0, scale)[None, :] + offs)
        g2 = dist2 + ((de - dr) * inv_dd) ** 2
        g2 = g2[~np.isnan(g2)]
        out[m] = np.sqrt(g2.min()) if g2.size else np.inf
    return out


def sample_at_reference(ref_shape, ev, base0, scale, out):
    nz, ny, nx = (int(v) for v in ref_shape)
    for k in range(nz):
        for j in range(ny):
            for i in range(nx):
                f = np.asarray(base0) + np.array([i, j, k], float) * np.asarray(scale)
                out[k, j, i] = trilinear(ev, f[None, :])[0]
    return out


def dta_search(ref_flat, ref_shape_yx, points, ev, base0, scale, offs, dist_mm, shell, bmin, bmax,
               block, reach, out, bisection_steps=40):
    """Brute-force DTA: all offsets whose dose is on the other side of Dr; keep those of the
    innermost such shell; bisect along each ray; smallest crossing distance.

    (``bmin``, ``bmax``, ``block``, ``reach`` only serve the kernel's shortcut: unused.)"""
    for m, flat in enumerate(points):
        dr = ref_flat[flat]
        b = _base(flat, ref_shape_yx, base0, scale)
        d0 = trilinear(ev, b[None, :])[0]
        if np.isnan(d0):
            out[m] = np.nan
            continue
        if d0 == dr:
            out[m] = 0.0
            continue
        s0 = 1.0 if d0 > dr else -1.0
        de = trilinear(ev, b[None, :] + offs)
        crossing = ~np.isnan(de) & ((de - dr) * s0 <= 0.0)
        if not crossing.any():
            out[m] = np.inf
            continue
        first = shell[crossing].min()
        best = np.inf
        for p in np.flatnonzero(crossing & (shell == first)):
            lo, hi = 0.0, 1.0
            for _ in range(bisection_steps):
                mid = 0.5 * (lo + hi)
                v = trilinear(ev, (b + mid * offs[p])[None, :])[0] - dr
                if v * s0 > 0.0:
                    lo = mid
                else:
                    hi = mid
            best = min(best, hi * dist_mm[p])
        out[m] = best
    return out
