"""NumPy twins of tomodose._kernels.terma_fluence: the maps by their defining sums (no edge
windows, no running sums), the lookup by a plain bilinear formula, the trace by the naive Siddon."""

from __future__ import annotations

import numpy as np

from tests.naive.profiles import edge_mean
from tests.naive.raytrace import radiological_path


def edge_means_dense(u0, h_u, n_u, den0, dden, n_m, sad, hu0, e0, lw, n_e, sigma, cutoff):
    """(n_m, n_e, n_u) mean of the step of edge ``e`` over ``[u - hu, u + hu]`` at every node."""
    out = np.empty((n_m, n_e, n_u))
    for m in range(n_m):
        hu = hu0 * sad / (den0 + m * dden)
        for e in range(n_e):
            for a in range(n_u):
                out[m, e, a] = edge_mean(u0 + a * h_u - (e0 + e * lw), sigma, cutoff, hu)
    return out


def slice_maps_naive(slice_y, s_t, s_w, s_p, leaf_a, u0, h_u, n_u, den0, dden, n_m, sad, hu0, hv0, e0, lw,
                     leaf_sigma, jaw_half, jaw_sigma, cutoff, offaxis_c):
    """(n_k, n_m, n_u) ``O(u)/(1 + u^2/SAD^2) sum_s w_s J((y_k - t_s) c; hv) L_s(u; hu) / (1 + (y_k - t_s)^2/D^2)``
    with ``L_s(u) = sum_i a_{s,i} [E_i(u) - E_{i+1}(u)]`` (every leaf, quadrature edge means)."""
    n_l = leaf_a.shape[1]
    e_mean = edge_means_dense(u0, h_u, n_u, den0, dden, n_m, sad, hu0, e0, lw, n_l + 1, leaf_sigma, cutoff)
    ua = u0 + h_u * np.arange(n_u)
    theta = np.abs(np.arctan(ua / sad))
    off = 1.0 + sum(c * theta ** (n + 1) for n, c in enumerate(offaxis_c))
    fac = off / (1.0 + (ua / sad) ** 2)
    out = np.zeros((len(slice_y), n_m, n_u))
    for k, yk in enumerate(slice_y):
        for m in range(n_m):
            den = den0 + m * dden
            c = sad / den
            for s in range(len(s_t)):
                y = yk - s_t[s]
                v = y * c
                hv = hv0 * c
                jaw = edge_mean(v + jaw_half, jaw_sigma, cutoff, hv) - edge_mean(v - jaw_half, jaw_sigma, cutoff, hv)
                if jaw <= 0.0:
                    continue
                leaf = leaf_a[s_p[s]] @ (e_mean[m, :-1] - e_mean[m, 1:])
                out[k, m] += s_w[s] * jaw * leaf / (1.0 + y * y / (den * den))
        out[k] *= fac[None, :]
    return out


def accumulate_fluence_naive(shape, maps, k_first, origin, spacing, c0, ex, ez, sad, u0, h_u, den0, dden):
    """(nz, ny, nx) ``c^2`` times the bilinear interpolation of ``maps`` at each voxel's ``(D, u)``."""
    nz, ny, nx = shape
    n_k, n_m, n_u = maps.shape
    out = np.zeros(shape)
    for kk in range(n_k):
        k = k_first + kk
        for j in range(ny):
            for i in range(nx):
                p = np.asarray(origin, float) + np.array([i, j, k]) * np.asarray(spacing, float)
                r = p - np.asarray(c0)
                den = sad - r @ np.asarray(ez)
                c = sad / den
                u = (r @ np.asarray(ex)) * c
                ta = (u - u0) / h_u
                if ta < 0 or ta > n_u - 1:
                    continue
                tm = min(max((den - den0) / dden, 0.0), n_m - 1.0)
                a = min(int(ta), n_u - 2)
                m = min(int(tm), n_m - 2)
                fa, fm = ta - a, tm - m
                val = ((1 - fm) * ((1 - fa) * maps[kk, m, a] + fa * maps[kk, m, a + 1])
                       + fm * ((1 - fa) * maps[kk, m + 1, a] + fa * maps[kk, m + 1, a + 1]))
                out[k, j, i] = c * c * val
    return out


def trace_plane_naive(vec_vol, origin, spacing, i, j, k, x1, y1):
    """(6,) radiological path per anchor (mm g/cm3) from voxel (k, j, i)'s centre to (x1, y1, z_k)."""
    p0 = np.asarray(origin, float) + np.array([i, j, k]) * np.asarray(spacing, float)
    p1 = np.array([x1, y1, p0[2]])
    return radiological_path(vec_vol, origin, spacing, p0, p1)
