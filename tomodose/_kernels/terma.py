"""Polyenergetic TERMA of divergent fan-beam projections (numba kernel).

One call handles a batch of *samples* (sub-samples of projections). For each sample the voxels
of the z-slab that can lie in the field are visited in parallel by (k, j) row; each row writes
only its own voxels, so the accumulation is race-free and identical for any thread count
(every voxel sums its samples in the same serial order).

Per voxel centre P and sample s (source S, gantry axes ex, ey, ez, isocentre C, SAD)::

    D = SAD - (P - C) . ez            distance from the source along the central axis
    u = (P - C) . ex * SAD / D        across-fan position projected to the isocentre plane
    v = (P - C) . ey * SAD / D        longitudinal position projected to the isocentre plane
    Psi = J(v) * O(theta) * sum_i a_i L_i(u),  theta = atan(u / SAD)
    t_m = sum over voxels on P -> S of length * rho * w_m          (g/cm2, per anchor material m)
    T = weight * Psi * (SAD / |P - S|)^2 * sum_E ef_E * h * mu_m(P, E) * exp(-h * sum_m t_m mu_m(E))

with ``h = 1 + softening * |theta|`` and ``mu_m(P, E) = sum_m w_m(P) mu_m(E)`` (cm2/g).
"""

from __future__ import annotations

import math

import numba
import numpy as np

from tomodose._kernels.raytrace import trace_accumulate
from tomodose.config import NUMBA_OPTIONS, NUMBA_PARALLEL_OPTIONS

_SQRT2 = math.sqrt(2.0)


@numba.njit(**NUMBA_OPTIONS)
def edge(x, sigma, cutoff):
    """Phi(x / sigma) with exact step for sigma == 0 and 0/1 beyond ``cutoff`` sigmas."""
    if sigma == 0.0:
        if x > 0.0:
            return 1.0
        if x < 0.0:
            return 0.0
        return 0.5
    if x > cutoff * sigma:
        return 1.0
    if x < -cutoff * sigma:
        return 0.0
    return 0.5 * (1.0 + math.erf(x / (_SQRT2 * sigma)))


@numba.njit(**NUMBA_OPTIONS)
def leaf_fluence(u, a, e0, w, sigma, cutoff):
    """sum_i a_i [Phi((u - e_i)/s) - Phi((u - e_{i+1})/s)], leaf edges e_i = e0 + i w."""
    n = a.shape[0]
    c = (u - e0) / w
    reach = (cutoff * sigma) / w + 1.0
    i0 = int(math.floor(c - reach))
    i1 = int(math.floor(c + reach))
    if i0 < 0:
        i0 = 0
    if i1 > n - 1:
        i1 = n - 1
    total = 0.0
    for i in range(i0, i1 + 1):
        if a[i] == 0.0:
            continue
        lo = e0 + i * w
        total += a[i] * (edge(u - lo, sigma, cutoff) - edge(u - lo - w, sigma, cutoff))
    return total


@numba.njit(**NUMBA_PARALLEL_OPTIONS)
def terma_samples(mat, rho, origin, spacing, src, ex, ey, ez, iso, weight, proj, group, k_lo, k_hi,
                  leaf_a, leaf_e0, leaf_w, leaf_sigma, jaw_half, jaw_sigma, cutoff, offaxis_c,
                  softening, sad, mu_anchor, ef, air_index, total, per_group):
    """Accumulate the TERMA of a batch of samples into ``total`` and ``per_group`` (in place).

    Parameters
    ----------
    mat : (nz, ny, nx, m) float64
        ``rho * w_m`` per anchor material (g/cm3).
    rho : (nz, ny, nx) float64
        Mass density (g/cm3).
    origin, spacing : (3,) float64
        Grid origin (centre of voxel 0) and voxel size (mm), x, y, z order.
    src, ex, ey, ez, iso : (S, 3) float64
        Source position, gantry unit vectors and isocentre (LPS mm) per sample.
    weight : (S,) float64
        Beam-on time of the sample (s).
    proj, group : (S,) int64
        Projection (row of ``leaf_a``) and output group of each sample.
    k_lo, k_hi : (S,) int64
        Slab of z indices [k_lo, k_hi) that may lie in the field.
    leaf_a : (P, L) float64
        Leaf output weights per projection.
    leaf_e0, leaf_w, leaf_sigma : float
        First leaf edge, leaf width and edge sigma at the isocentre plane (mm).
    jaw_half, jaw_sigma : float
        Jaw rect half-width and edge sigma at the isocentre plane (mm).
    cutoff : float
        Edge truncation in sigmas.
    offaxis_c : (K,) float64
        Off-axis polynomial coefficients c_1..c_K of |theta|.
    softening : float
        mu multiplier slope per radian.
    sad : float
        Source-axis distance (mm).
    mu_anchor : (m, E) float64
        mu/rho of the anchor materials (cm2/g).
    ef : (E,) float64
        Energy-fluence weights of the spectrum (sum 1).
    air_index : int
        Anchor used for voxels with rho == 0.
    total : (nz, ny, nx) float64, per_group : (G, nz, ny, nx) float32
        Outputs, accumulated in place.
    """
    nz, ny, nx, m = mat.shape
    n_e = ef.shape[0]
    n_c = offaxis_c.shape[0]
    ox, oy, oz = origin[0], origin[1], origin[2]
    dx, dy, dz = spacing[0], spacing[1], spacing[2]
    v_ext = jaw_half + cutoff * jaw_sigma
    for s in range(src.shape[0]):
        k0 = k_lo[s]
        nrows = (k_hi[s] - k0) * ny
        if nrows <= 0:
            continue
        sx, sy, sz = src[s, 0], src[s, 1], src[s, 2]
        cx, cy, cz = iso[s, 0], iso[s, 1], iso[s, 2]
        p = proj[s]
        g = group[s]
        wgt = weight[s]
        a = leaf_a[p]
        for r in numba.prange(nrows):
            k = k0 + r // ny
            j = r % ny
            acc = np.empty(m)
            py = oy + j * dy
            pz = oz + k * dz
            for i in range(nx):
                px = ox + i * dx
                rx, ry, rz = px - cx, py - cy, pz - cz
                depth = rx * ez[s, 0] + ry * ez[s, 1] + rz * ez[s, 2]
                dist_axis = sad - depth
                if dist_axis <= 0.0:
                    continue
                scale = sad / dist_axis
                v = (rx * ey[s, 0] + ry * ey[s, 1] + rz * ey[s, 2]) * scale
                if v > v_ext or v < -v_ext:
                    continue
                jaw = edge(v + jaw_half, jaw_sigma, cutoff) - edge(v - jaw_half, jaw_sigma, cutoff)
                if jaw <= 0.0:
                    continue
                u = (rx * ex[s, 0] + ry * ex[s, 1] + rz * ex[s, 2]) * scale
                lf = leaf_fluence(u, a, leaf_e0, leaf_w, leaf_sigma, cutoff)
                if lf <= 0.0:
                    continue
                theta = abs(math.atan(u / sad))
                off = 1.0
                tp = 1.0
                for c in range(n_c):
                    tp *= theta
                    off += offaxis_c[c] * tp
                psi = jaw * lf * off
                if psi <= 0.0:
                    continue
                qx, qy, qz = sx - px, sy - py, sz - pz
                r2 = qx * qx + qy * qy + qz * qz
                invsq = sad * sad / r2
                for c in range(m):
                    acc[c] = 0.0
                trace_accumulate(mat, ox, oy, oz, dx, dy, dz, px, py, pz, sx, sy, sz, acc)
                h = 1.0 + softening * theta
                rv = rho[k, j, i]
                tsum = 0.0
                for e in range(n_e):
                    expo = 0.0
                    mu_loc = 0.0
                    for c in range(m):
                        expo += acc[c] * mu_anchor[c, e]
                        if rv > 0.0:
                            mu_loc += mat[k, j, i, c] * mu_anchor[c, e]
                    if rv > 0.0:
                        mu_loc /= rv
                    else:
                        mu_loc = mu_anchor[air_index, e]
                    # acc is in mm * g/cm3 -> 0.1 g/cm2
                    tsum += ef[e] * h * mu_loc * math.exp(-0.1 * h * expo)
                val = wgt * psi * invsq * tsum
                total[k, j, i] += val
                per_group[g, k, j, i] += val
