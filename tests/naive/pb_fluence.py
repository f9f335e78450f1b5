"""Slow, obviously-correct NumPy twins of :mod:`tomodose._kernels.pb_fluence`.

* :func:`profiles` - the one-dimensional leaf and jaw profiles of the maps with exact error
  functions (``scipy.special.ndtr``; the kernel uses the lookup and aperture tables);
* :func:`accumulate` - the maps as an ``einsum`` over the samples;
* :func:`lookup` - voxel by voxel: window test, amplitudes, level / plane / bilinear interpolation
  of the maps, the fine or coarse maps per Gaussian, the off-axis and inverse-square factors, and
  (fine level) minus the trilinear interpolation of the cluster's node values: the twin of both
  ``fluence_lookup`` (``coarse=False``) and ``coarse_lookup`` (``coarse=True``), without the exact
  fallback at the medium's ends (tested separately against the clustered kernel).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import ndtr

from tests.naive.pencil_beam import trilinear


def profiles(u, y, den_planes, w2, t_p, dt_p, a_c, *, e0, w, sl2, sj2, bu2, bv2, jaw_h, sad):
    """``lu`` (nk, n_p, nl, nU) and ``jy`` (nk, n_p, nY, nl) of the module docstring of the kernels."""
    nk, n_p, nl = len(den_planes), len(t_p), len(w2)
    edges = e0 + w * np.arange(a_c.shape[1] + 1)
    lu = np.zeros((nk, n_p, nl, len(u)))
    jy = np.zeros((nk, n_p, len(y), nl))
    for k, den in enumerate(den_planes):
        c = sad / den
        for j in range(nl):
            su = math.sqrt(sl2 + c * c * (w2[j] + bu2))
            sv = math.sqrt(sj2 + c * c * (w2[j] + bv2))
            cdf = ndtr((np.asarray(u)[:, None] - edges[None, :]) / su)  # (nU, n_leaves + 1)
            lam = cdf[:, :-1] - cdf[:, 1:]
            for p in range(n_p):
                lu[k, p, j] = lam @ a_c[p]
                yp = np.asarray(y) - t_p[p]
                v = yp * c
                jy[k, p, :, j] = dt_p[p] * (ndtr((v + jaw_h) / sv) - ndtr((v - jaw_h) / sv)) / (1 + yp**2 / den**2)
    return lu, jy


def accumulate(lu, jy, row_lev=None):
    """``maps[k, b, a, j] = sum_p lu[k, p, j, a] jy[k, p, b, j]`` (levels innermost, as the kernel), 0 for
    the levels ``j < row_lev[b]``."""
    maps = np.einsum("kpja,kpbj->kbaj", lu, jy)
    if row_lev is not None:
        below = np.arange(maps.shape[3])[None, :] < np.asarray(row_lev)[:, None]  # (nY, nl)
        maps = np.where(below[None, :, None, :], 0.0, maps)
    return maps


def _pos(x, x0, h, n):
    t = min(max((x - x0) / h, 0.0), n - 1.0)
    m = min(int(t), n - 2)
    return m, t - m


def _row(y, y0, h, n):
    """``_pos`` with a coordinate within 1e-7 steps of a row snapped onto it (as the kernel)."""
    t = (y - y0) / h
    if abs(t - round(t)) < 1e-7:
        y = y0 + round(t) * h
    return _pos(y, y0, h, n)


def _map_value(maps, lat, q, x, y, den):
    nk, n_y, n_u, nl = maps.shape
    k, fk = _pos(den, lat[4], lat[5], nk)
    a, fa = _pos(x, lat[0], lat[1], n_u)
    b, fb = _row(y, lat[2], lat[3], n_y)
    total = 0.0
    for dk, wk in ((0, 1 - fk), (1, fk)):
        for db, wb in ((0, 1 - fb), (1, fb)):
            for da, wa in ((0, 1 - fa), (1, fa)):
                total += wk * wb * wa * maps[k + dk, b + db, a + da, q]
    return total


def lookup(shape, origin, spacing, depth, lvl, s0, xg, yg, zg, win, win_u, maps_f, lat_f, maps_c, lat_c, *, sad, amps,
           dz_tab, tail, soft, offc, coarse, g_fine=0, node_vals=None, nodes=None, exit_mm=None, exit_deficit=None):
    """(nz, ny, nx) values of one cluster at every voxel (window ``win = (y0, hy, u_lo, u_hi, r_u)``, ``win_u``
    (n_rows, 2): voxel inside when ``y0 + b hy <= Y < y0 + (b + 1) hy`` for a row ``b`` and
    ``win_u[b, 0] - r_u c <= u <= win_u[b, 1] + r_u c``, ``c = sad / den``)
    (``coarse``: the coarse level at every voxel,
    all Gaussians outside the window and those ``>= g_fine`` inside; else the fine level inside the
    window only, minus the interpolated ``node_vals`` given at ``nodes = (ks, js, is_)``).
    ``depth``, ``lvl``: (nz, ny, nx) radiological depth and level offset; ``exit_mm`` (nz, ny, nx) exit
    distances with ``exit_deficit`` (nt, nG) on 0, 2.5, 5, ... mm: amplitude ``g`` times ``1 - x_g(t)``
    (linear, clamped to the table; None: no exit correction)."""
    nz, ny, nx = shape
    n_g = amps.shape[1]
    nzt = amps.shape[0]
    nl_f, nl_c = maps_f.shape[3], maps_c.shape[3]
    out = np.zeros(shape)
    interp = trilinear(node_vals, *nodes, shape) if node_vals is not None else np.zeros(shape)
    for k in range(nz):
        for j in range(ny):
            for i in range(nx):
                d = np.array([origin[0] + i * spacing[0], origin[1] + j * spacing[1], origin[2] + k * spacing[2]]) - s0
                den = -float(d @ zg)
                if den <= 0:
                    continue
                xx, yy = float(d @ xg), float(d @ yg)
                u = xx * sad / den
                row = int(math.floor((yy - win[0]) / win[1]))
                c = sad / den
                inside = (0 <= row < len(win_u)) and win_u[row][0] - win[4] * c <= u <= win_u[row][1] + win[4] * c
                if not coarse and not inside:
                    continue
                g_lo = g_fine if (coarse and inside) else 0
                theta = abs(math.atan(u / sad))
                h = 1.0 + soft * theta
                off = 1.0 + sum(c * theta ** (n + 1) for n, c in enumerate(offc))
                t = h * depth[k, j, i] / dz_tab - 0.5
                ext = max(t - (nzt - 1), 0.0)
                t = min(max(t, 0.0), nzt - 1.0)
                k0 = min(int(t), nzt - 2)
                f = t - k0
                total = 0.0
                for g in range(g_lo, n_g):
                    amp = (amps[k0, g] + f * (amps[k0 + 1, g] - amps[k0, g])) * tail[g] ** ext
                    if exit_mm is not None:
                        t_tab = 2.5 * np.arange(exit_deficit.shape[0])
                        amp *= 1.0 - np.interp(exit_mm[k, j, i], t_tab, exit_deficit[:, g])
                    if amp <= 0:
                        continue
                    q = min(max(g + lvl[k, j, i], 0.0), nl_c - 1.0)
                    q0 = min(int(q), nl_c - 2)
                    fq = q - q0
                    mp, lt = (maps_f, lat_f) if q0 + 1 < nl_f else (maps_c, lat_c)
                    total += amp * ((1 - fq) * _map_value(mp, lt, q0, u, yy, den)
                                    + fq * _map_value(mp, lt, q0 + 1, u, yy, den))
                out[k, j, i] = total * h * off * sad * sad / (den * den + xx * xx)
                if not coarse:
                    out[k, j, i] -= interp[k, j, i]
    return out
