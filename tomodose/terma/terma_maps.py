"""TERMA fast path: fluence maps per cluster of samples (``compute_terma(..., fluence_method="maps")``).

Within one trace unit (a gantry angle of a helical plan: every rotation's projection at that
angle) the samples of one sub-sample index share the gantry axes and differ only by a couch
shift along the jaw axis: a *cluster*. Their summed fluence x inverse square at a voxel is
``c^2 M_k(D, u)`` (:mod:`tomodose._kernels.terma_fluence`), a function of the voxel's distance
from the source ``D`` and across-fan position ``u`` per grid slice ``k``, tabulated per slice on
planes of ``D`` and a lattice of ``u`` and interpolated bilinearly. The attenuation (ray trace,
softening, spectral sums) is unchanged: once per voxel and trace unit, as the exact path.
See docs/terma.md ("Fluence maps") for the approximations and their measured size.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from tomodose import config
from tomodose.terma.beam_model import EDGE_CUTOFF_SIGMAS

log = logging.getLogger(__name__)

#: lattice step of the maps across the fan (isocentre-plane mm; linear interpolation error of a
#: leaf edge of total sigma s: h^2/8 * 0.242/s^2, 0.27 % of the edge's step for s = 1.66 mm, the
#: commissioned model on a 3 mm grid; measured on the 3 mm liver plan with 20 mm planes: 0.08 % of
#: the maximum, against 0.04 % with 0.25 mm, which costs 1.4x the map time: docs/terma.md)
MAP_U_STEP_MM = 0.5
#: spacing of the map planes along the beam axis (mm; linear interpolation in the distance: the jaw
#: edges move with the distance, 40 mm planes give 0.26 % of a group's maximum on the liver plan)
MAP_PLANE_MM = 20.0
#: voxels whose summed fluence is at most this fraction of the unit's largest are not traced (their
#: TERMA, below ~1e-9 of the unit's maximum, is 0): the beam model's profiles end at 6 sigma
#: (Phi(-6) = 1e-9) and such values are products of tails or rounding noise of the maps (6 % of the
#: traces on the 3 mm liver plan)
FLUENCE_FLOOR = 1e-9
#: tolerance (mm, and for unit vectors) for samples to share a cluster's frame
_FRAME_TOL = 1e-6


def _clusters(unit_start, n_sub, ex, ey, ez, iso):
    """Per unit, the clusters of its samples: list (per unit) of lists of member index arrays.

    Sub-sample ``q % n_sub`` of the unit's samples (ordered projection by projection) forms a
    cluster when every member has the first member's axes and its isocentre differs from the
    first's only along ``ey``; otherwise each sample is its own cluster (exact, slower)."""
    out = []
    for t in range(unit_start.size - 1):
        s0, s1 = int(unit_start[t]), int(unit_start[t + 1])
        clusters = []
        for sl in range(min(n_sub, s1 - s0)):
            mem = np.arange(s0 + sl, s1, n_sub, dtype=np.int64)
            f = mem[0]
            d = iso[mem] - iso[f]
            same = (np.abs(ex[mem] - ex[f]).max() <= _FRAME_TOL and np.abs(ez[mem] - ez[f]).max() <= _FRAME_TOL
                    and np.abs(ey[mem] - ey[f]).max() <= _FRAME_TOL
                    and np.abs(d @ ex[f]).max() <= _FRAME_TOL and np.abs(d @ ez[f]).max() <= _FRAME_TOL)
            if same:
                clusters.append(mem)
            else:
                clusters.extend(np.array([s], dtype=np.int64) for s in mem)
        out.append(clusters)
    return out


def _corners(grid):
    """(8, 3) voxel-centre corners of the grid (LPS mm)."""
    lo = np.asarray(grid.origin_mm, dtype=float)
    hi = lo + (np.array([grid.nx, grid.ny, grid.nz]) - 1) * np.asarray(grid.spacing_mm, dtype=float)
    return np.array([[hi[c] if b else lo[c] for c, b in enumerate(bits)] for bits in np.ndindex(2, 2, 2)])


def maps_terma(grid, mat_lo, mat_pair, rho_flat, shape, origin, spacing, unit_start, t_src, t_ex, t_ez, t_iso,
               unit_transverse, unit_group, k_lo, k_hi, proj, ex, ey, ez, iso, weight, leaf_a, edges, leaf_w,
               beam, jaw_half, sad, mu_anchor, ef, e_group, air_index, total, per_group, voxel_average, n_sub,
               progress):
    """Accumulate the TERMA of every trace unit into ``total`` and ``per_group`` (in place) by
    fluence maps. Arguments as prepared by :func:`tomodose.terma.terma.compute_terma` (samples
    ordered unit by unit, projection-major inside a unit)."""
    from tomodose._kernels.profiles import step_integral_table
    from tomodose._kernels.terma import edge_weights
    from tomodose._kernels.terma_fluence import (N_ANCHORS, accumulate_fluence, edge_mean_rows, slice_maps,
                                                 terma_from_fluence)

    cutoff = EDGE_CUTOFF_SIGMAS
    s_leaf = float(beam.leaf_edge_sigma_mm)
    s_jaw = float(beam.jaw_penumbra_sigma_mm)
    vavg = 1.0 if voxel_average else 0.0
    sp = np.asarray(spacing, dtype=float)
    clusters = _clusters(unit_start, n_sub, ex, ey, ez, iso)
    heads = np.array([c[0] for cl in clusters for c in cl], dtype=np.int64)
    if np.any(np.abs(ey[heads, :2]) > 1e-9):
        raise RuntimeError("the jaw axis must be the patient z axis (head/feet-first positions only)")
    # one lattice for every cluster: u and D ranges over the grid's voxel-centre corners
    cor = _corners(grid)
    r = cor[None, :, :] - iso[heads][:, None, :]
    den = sad - np.einsum("ncd,nd->nc", r, ez[heads])
    u = np.einsum("ncd,nd->nc", r, ex[heads]) * sad / den
    den_lo, den_hi = float(den.min()), float(den.max())
    if den_lo <= 0.0:
        raise ValueError(f"fluence_method='maps' needs every voxel in front of the source: the grid reaches "
                         f"{-den_lo:.1f} mm behind the source plane (source-axis distance {sad} mm)")
    hu0_all = 0.5 * vavg * np.linalg.norm(ex[heads] * sp[None, :], axis=1)
    reach_u = cutoff * s_leaf + float(hu0_all.max()) * sad / den_lo
    u_min = max(float(u.min()), float(edges[0]) - reach_u - leaf_w)
    u_max = min(float(u.max()), float(edges[-1]) + reach_u + leaf_w)
    h_u = MAP_U_STEP_MM
    u0 = u_min - h_u
    n_u = int(math.ceil((u_max - u_min) / h_u)) + 3
    n_m = max(2, int(math.ceil((den_hi - den_lo) / MAP_PLANE_MM)) + 1)
    dden = (den_hi - den_lo) / (n_m - 1) if den_hi > den_lo else 1.0
    ua = u0 + h_u * np.arange(n_u)
    theta = np.abs(np.arctan(ua / sad))
    off = np.ones_like(ua)
    pw = np.ones_like(ua)
    for c in np.asarray(beam.offaxis_fluence_coeffs, dtype=float):
        pw = pw * theta
        off = off + c * pw
    fac = np.ascontiguousarray(off / (1.0 + (ua / sad) ** 2))
    w_max = int(math.floor(2.0 * reach_u / h_u)) + 2
    lt = step_integral_table(s_leaf, cutoff)
    jt = step_integral_table(s_jaw, cutoff)
    leaf_d = np.ascontiguousarray(edge_weights(leaf_a))
    if np.any(np.diff(e_group) < 0):  # the kernel sums each energy group over a contiguous range of lines
        order = np.argsort(e_group, kind="stable")
        mu_anchor, ef, e_group = (np.ascontiguousarray(a) for a in (mu_anchor[:, order], ef[order], e_group[order]))
    if mu_anchor.shape[0] != N_ANCHORS:
        raise RuntimeError(f"the fluence-map path traces {N_ANCHORS} anchor materials, got {mu_anchor.shape[0]}")
    # anchor densities per voxel (rho * w of the voxel's two anchors, zeros elsewhere) for the transverse trace
    vec = np.zeros((rho_flat.size, N_ANCHORS))
    rows = np.arange(rho_flat.size)
    vec[rows, mat_lo] = mat_pair[:, 0]
    vec[rows, mat_lo + 1] += mat_pair[:, 1]
    del rows
    n_e = leaf_d.shape[1]
    e_cache: dict = {}

    def edge_rows(hu0):
        key = round(float(hu0), 9)
        if key not in e_cache:
            e2 = np.zeros((n_m, n_e, w_max))
            a_lo = np.zeros((n_m, n_e), dtype=np.int64)
            n_win = np.zeros((n_m, n_e), dtype=np.int64)
            edge_mean_rows(e2, a_lo, n_win, u0, h_u, den_lo, dden, sad, float(hu0), float(edges[0]), leaf_w,
                           s_leaf, cutoff, *lt)
            e_cache[key] = (e2, a_lo, n_win)
        return e_cache[key]

    nz, ny, nx = grid.shape
    ox, oy, oz = (float(v) for v in origin)
    dx, dy, dz = (float(v) for v in sp)
    z_mm = oz + dz * np.arange(nz)
    fl = np.zeros(grid.shape)
    buf = np.empty(0)
    units = range(unit_start.size - 1)
    if config.progress_enabled(progress):
        from tqdm.auto import tqdm
        units = tqdm(units, desc="TERMA (maps)", unit="unit")
    n_maps = 0
    for t in units:
        k0, k1 = int(k_lo[t]), int(k_hi[t])
        if k1 <= k0:
            continue
        n_k = k1 - k0
        for mem in clusters[t]:
            f = int(mem[0])
            hu0 = 0.5 * vavg * float(np.linalg.norm(ex[f] * sp))
            hv0 = 0.5 * vavg * float(np.linalg.norm(ey[f] * sp))
            e2, a_lo, n_win = edge_rows(hu0)
            if buf.size < n_k * n_m * n_u:
                buf = np.empty(n_k * n_m * n_u)
            maps = buf[:n_k * n_m * n_u].reshape(n_k, n_m, n_u)
            active = np.zeros(n_k, dtype=np.bool_)
            slice_y = np.ascontiguousarray((z_mm[k0:k1] - iso[f, 2]) * ey[f, 2])
            s_t = np.ascontiguousarray((iso[mem] - iso[f]) @ ey[f])
            slice_maps(maps, active, slice_y, s_t, np.ascontiguousarray(weight[mem]),
                       np.ascontiguousarray(proj[mem]), leaf_d, e2, a_lo, n_win, fac, den_lo, dden, sad, hv0,
                       float(jaw_half), s_jaw, cutoff, *jt)
            accumulate_fluence(fl, maps, active, k0, ny, nx, ox, oy, oz, dx, dy, dz,
                               np.ascontiguousarray(iso[f]), np.ascontiguousarray(ex[f]),
                               np.ascontiguousarray(ez[f]), sad, u0, h_u, den_lo, dden)
            n_maps += 1
        f_min = FLUENCE_FLOOR * float(fl[k0:k1].max())
        terma_from_fluence(fl, f_min, k0, k1, mat_lo, mat_pair, vec, rho_flat, shape, origin, spacing,
                           np.ascontiguousarray(t_src[t]), np.ascontiguousarray(t_ex[t]),
                           np.ascontiguousarray(t_ez[t]), np.ascontiguousarray(t_iso[t]), bool(unit_transverse[t]),
                           int(unit_group[t]), float(beam.offaxis_softening_per_rad), sad, mu_anchor, ef, e_group,
                           air_index, total, per_group)
        fl[k0:k1] = 0.0
    log.debug("TERMA maps: %d cluster maps of %d planes x %d nodes", n_maps, n_m, n_u)
