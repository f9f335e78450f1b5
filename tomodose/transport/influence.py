"""Sparse beamlet influence matrix (voxel x beamlet) of the pencil-beam engine.

Column ``b`` is the dose of beamlet ``b`` = (projection ``p``, leaf ``l``) with the leaf open for
the whole projection (unit leaf weight x the projection's ``duration_s``), in the dose unit of
:mod:`tomodose.transport.pencil_beam` (``cm2/g*s`` before calibration). Only the beamlets whose
rays meet the target (:func:`tomodose.delivery.beams_eye.leaves_seeing_structure`) get a column,
so for a sinogram ``f`` that is zero elsewhere::

    dose.ravel() == matrix @ f[beamlet_projection, beamlet_leaf]

(C order of the (nz, ny, nx) grid) reproduces :func:`pencil_beam_dose` with ``leaf_model="linear"``
(leaf output = leaf-open fraction: no adjacent-leaf gain, no closed-leaf transmission).

Threshold
---------
Entries below ``threshold`` x the column's maximum are dropped, and each beamlet is only
evaluated inside a window around it (leaf +- ``R_u``, jaw half-width + ``R_v`` in the isocentre
plane) beyond which its dose in water is below the threshold everywhere (the reach is computed
from the kernel, widened for divergence). ``threshold = 0`` keeps everything (exact, but every
column then covers the whole slab). What is dropped is the low-level wide scatter tail of every
beamlet; summed over thousands of beamlets it is not negligible: see ``docs/pencil_beam.md`` for
the measured dose error per threshold.
"""

from __future__ import annotations

import logging
import time

import numpy as np
from scipy import sparse

from tomodose import config
from tomodose._validate import check_in_range, check_nonnegative
from tomodose.delivery.beams_eye import leaves_seeing_structure
from tomodose.delivery.plan import HelicalPlan, ProjectionSequence
from tomodose.geometry.structures import Structure
from tomodose.transport.pencil_beam import DOSE_UNIT, _Engine, _resolve

__all__ = [
    "influence_matrix",
    "influence_beamlets",
    "beamlet_weights",
    "beamlet_reach_mm",
    "write_influence",
    "read_influence",
    "FarField",
    "far_field_operator",
    "DEFAULT_THRESHOLD",
]

log = logging.getLogger(__name__)

#: default relative-dose threshold of the influence matrix.
DEFAULT_THRESHOLD = 1e-2
#: reach meaning "no limit" (mm; finite so the kernels never see infinities).
_NO_REACH = 1e12
#: evaluation cost per voxel and beamlet sample used for the time estimate (s, one thread).
_COST_PER_EVAL_S = 4.0e-7  # measured on the liver benchmark (39.6 CPU-s for 9.9e7 evaluations)
#: the same for ``method="clustered"`` (per candidate entry).
_COST_PER_EVAL_CLUSTERED_S = 1.5e-7


def _projections(projections_or_plan) -> ProjectionSequence:
    if isinstance(projections_or_plan, HelicalPlan):
        return projections_or_plan.projections()
    if isinstance(projections_or_plan, ProjectionSequence):
        return projections_or_plan
    raise TypeError(
        f"projections_or_plan must be a HelicalPlan or ProjectionSequence, got {type(projections_or_plan).__name__}")


def _target(patient, target) -> Structure:
    if isinstance(target, Structure):
        return target
    if isinstance(target, str):
        structures = getattr(patient, "structures", None)
        if structures is None:
            raise TypeError(f"target {target!r} given by name needs a PatientModel, got {type(patient).__name__}")
        if target not in structures:
            raise ValueError(f"target must be one of the patient's structures {sorted(structures)}, got {target!r}")
        return structures[target]
    raise TypeError(f"target must be a structure name or a Structure, got {type(target).__name__}")


def influence_beamlets(projections_or_plan, target: Structure, *, margin_mm: float = 0.0):
    """Beamlets (projection, leaf) whose rays meet ``target``, in column order.

    Returns
    -------
    projection : (n_beamlets,) int64
    leaf : (n_beamlets,) int64
        Sorted by projection, then leaf.
    """
    seq = _projections(projections_or_plan)
    seeing = leaves_seeing_structure(seq, target, margin_mm=check_nonnegative("margin_mm", margin_mm))
    p, l = np.nonzero(seeing)
    return p.astype(np.int64), l.astype(np.int64)


def beamlet_weights(sinogram, projection, leaf) -> np.ndarray:
    """Vector ``x`` (n_beamlets,) with ``x[b] = sinogram[projection[b], leaf[b]]`` (leaf-open fractions).

    The dose is ``matrix @ x``; open leaves outside the beamlet set are ignored (a warning is logged).
    """
    s = np.asarray(sinogram, dtype=np.float64)
    x = s[projection, leaf]
    outside = s.sum() - x.sum()
    if outside > 1e-9 * max(1.0, s.sum()):
        log.warning("sinogram opens leaves outside the influence matrix's beamlets (total fraction %.3g)", outside)
    return x


def beamlet_reach_mm(engine: _Engine, threshold: float, n_gaussians: int | None = None) -> tuple[float, float]:
    """(R_u, R_v): distances (mm, at the isocentre distance; scaled by SAD / den at other distances)
    beyond a beamlet's leaf / jaw edges past which its dose in water is below ``threshold`` x its
    maximum at every depth (inf for threshold 0). ``n_gaussians``: only the first (narrowest)
    Gaussians of the kernel (default all). With voxel averaging the profiles reach one voxel
    half-width further (:meth:`_Engine.half_widths_mm`, added)."""
    if threshold <= 0.0:
        return _NO_REACH, _NO_REACH
    from scipy.special import ndtr

    k = engine.kernel
    n_g = k.sigma_mm.size if n_gaussians is None else int(n_gaussians)
    depths = np.array([2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 100.0, 150.0, 200.0, 300.0])
    amps = np.array([[np.interp(d, k.depth_mm, k.amplitude_cm2_g[:, i]) for i in range(n_g)]
                     for d in depths])  # (nd, nG)
    w = engine.w
    h = engine.jaw_h
    x = np.arange(0.0, 600.0, 0.5)
    s = k.sigma_mm[None, :n_g]
    su = np.sqrt(s**2 + engine.s_leaf**2)
    sv = np.sqrt(s**2 + engine.s_jaw**2)
    # profiles along u (v = 0) and along v (u = leaf centre), per depth
    lu = ndtr((x[:, None] + w / 2) / su) - ndtr((x[:, None] - w / 2) / su)  # (nx, nG)
    jv = ndtr((x[:, None] + h) / sv) - ndtr((x[:, None] - h) / sv)
    l0 = ndtr((w / 2) / su) - ndtr(-(w / 2) / su)
    j0 = ndtr(h / sv) - ndtr(-h / sv)
    prof_u = (amps[:, None, :] * lu[None] * j0[None]).sum(-1)  # (nd, nx)
    prof_v = (amps[:, None, :] * jv[None] * l0[None]).sum(-1)
    vmax = prof_u.max()
    cut = threshold * vmax
    above_u = np.flatnonzero((prof_u >= cut).any(axis=0))
    above_v = np.flatnonzero((prof_v >= cut).any(axis=0))
    r_u = max(0.0, x[above_u[-1]] + 0.5 - w / 2) if above_u.size else 0.0
    r_v = max(0.0, x[above_v[-1]] + 0.5 - h) if above_v.size else 0.0
    # at the voxel's own distance (the window test scales by SAD / den); small safety margin
    hu, hv = engine.half_widths_mm()
    return r_u * 1.1 + 1.0 + hu, r_v * 1.1 + 1.0 + hv


def influence_matrix(patient, projections_or_plan, *, target="PTV", threshold: float = DEFAULT_THRESHOLD,
                     margin_mm: float = 0.0, chunk_beamlets: int = 512, beam_model=None, n_subsamples: int = 1,
                     kernel=None, rho_floor: float = 0.05, angle_groups: int | None = None,
                     progress: bool | None = None, return_beamlets: bool = False, method: str = "clustered",
                     voxel_average: bool = True, medium_ends: bool = True, lateral_scaling: str = "upstream"):
    """Sparse influence matrix of the beamlets that meet the target.

    Parameters
    ----------
    patient : PatientModel or ImageVolume
        Patient (density and structures) or a mass-density volume (then ``target`` must be a
        :class:`Structure`).
    projections_or_plan : HelicalPlan or ProjectionSequence
        Delivery geometry; its leaf-open fractions are not used (only angles, couch, durations).
    target : str or Structure
        Target whose beamlets get a column (default ``"PTV"``).
    threshold : float
        Relative-dose threshold in [0, 1): entries below ``threshold`` x the column maximum are
        dropped (default :data:`DEFAULT_THRESHOLD`; 0 keeps everything). The cut applies to the
        water-equivalent dose, before each voxel's medium factor (``docs/pencil_beam.md``), which
        the kept entries then carry.
    margin_mm : float
        Margin around the target for the beamlet selection (mm).
    chunk_beamlets : int
        Beamlets computed together (bounds the work memory).
    beam_model, n_subsamples, kernel, rho_floor, angle_groups, voxel_average, medium_ends, lateral_scaling
        As in :func:`tomodose.transport.pencil_beam.pencil_beam_dose` (``voxel_average``: profiles
        averaged over each voxel; ``medium_ends``: no dose from pencils beyond the medium's
        longitudinal ends; both default; give the full-plan dose the same values).
    progress : bool, optional
    return_beamlets : bool
        Also return the beamlet (projection, leaf) arrays.
    method : {"clustered", "beamlet"}
        ``"clustered"`` (default): per angle group, the beamlets of the projections that share a
        beam orientation are evaluated together (one per-voxel setup, leaf profiles once per leaf,
        jaw profiles once per projection); memory: the angle group's entries before the threshold.
        ``"beamlet"``: one beamlet at a time with a dense accumulator per worker, ``chunk_beamlets``
        at a time (the earlier implementation). Same model and windows; the columns agree to rounding.

    Returns
    -------
    matrix : scipy.sparse.csc_matrix, float32, shape (n_voxels, n_beamlets)
        Rows: voxels in C order of the (nz, ny, nx) grid; columns: beamlets sorted by projection,
        then leaf; values in :data:`~tomodose.transport.pencil_beam.DOSE_UNIT` per unit leaf-open
        fraction.
    (projection, leaf) : (n_beamlets,) int64 arrays, when ``return_beamlets``.
    """
    from tomodose._kernels.pencil_beam import beamlet_window_counts

    t0 = time.perf_counter()
    threshold = check_in_range("threshold", threshold, 0.0, 1.0)
    if threshold >= 1.0:
        raise ValueError(f"threshold must be < 1, got {threshold}")
    if isinstance(chunk_beamlets, bool) or not isinstance(chunk_beamlets, (int, np.integer)) or chunk_beamlets < 1:
        raise ValueError(f"chunk_beamlets must be a positive integer, got {chunk_beamlets!r}")
    if method not in ("clustered", "beamlet"):
        raise ValueError(f"method must be 'clustered' or 'beamlet', got {method!r}")
    seq = _projections(projections_or_plan)
    tgt = _target(patient, target)
    engine = _resolve(patient, seq, beam_model, kernel, n_subsamples, rho_floor, angle_groups, voxel_average,
                      medium_ends, lateral_scaling)
    engine.grid.require_same(tgt.grid, "target structure grid and density grid")
    proj_b, leaf_b = influence_beamlets(seq, tgt, margin_mm=margin_mm)
    n_b = proj_b.size
    n_vox = engine.grid.n_voxels
    shape = np.asarray(engine.grid.shape, dtype=np.int64)

    r_u, r_v = beamlet_reach_mm(engine, threshold)
    leaf_uc = np.ascontiguousarray(seq.machine.leaf_centres_mm())
    half_u = 0.5 * engine.w
    half_v = engine.jaw_h
    k_lo, k_hi = engine.slab(half_v + r_v * engine.sad / engine.den_min)
    window = (leaf_uc, half_u, r_u, half_v, r_v)

    n_threads = max(1, int(getattr(__import__("numba"), "get_num_threads")()))
    group_depth_mib = n_vox * 4 / 2**20
    groups = np.unique(engine.proj_group[proj_b]) if n_b else np.array([], dtype=np.int64)
    if method == "clustered":
        # the counting pass gives the exact number of entries before the threshold
        plan = _cluster_plan(engine, proj_b, leaf_b, groups, window, k_lo, k_hi)
        per_group = [sum(int(c.sum()) for _, c in clusters) for _, _, clusters in plan]
        n_eval = int(sum(per_group))
        est_s = n_eval * _COST_PER_EVAL_CLUSTERED_S / n_threads
        # kept entries, the largest group's entries before the threshold (column, voxel, value and the
        # sorted copy), assembly
        est_mib = (n_eval * 8 * (1.0 if threshold == 0 else 0.35) + max(per_group, default=0) * 32
                   + n_vox * 24) / 2**20 + group_depth_mib
    else:
        counts = np.zeros(n_b, dtype=np.int64)
        if n_b:
            beamlet_window_counts(counts, proj_b, leaf_b, engine.samp_start, engine.samp_stop, engine.origin,
                                  engine.spacing, shape, engine.src, engine.xg, engine.yg, engine.zg, *window,
                                  k_lo, k_hi, engine.sad, engine.den_min)
        n_eval = int(counts.sum())
        est_s = n_eval * _COST_PER_EVAL_S / n_threads
        chunk_entries = int(max((counts[i:i + chunk_beamlets].sum() for i in range(0, n_b, chunk_beamlets)),
                                default=0))
        est_mib = (n_eval * 8 * (1.0 if threshold == 0 else 0.35) + chunk_entries * 8 + n_threads * n_vox * 9
                   + n_vox * 24) / 2**20 + group_depth_mib
    log.info("influence matrix: %d beamlets (target %r, %d projections), %d voxels, reach u %.1f mm v %.1f mm, "
             "threshold %g: %d voxel evaluations, estimated %.1f s on %d threads and about %.0f MiB",
             n_b, tgt.name, seq.n_projections, n_vox, r_u, r_v, threshold, n_eval, est_s, n_threads, est_mib)

    if n_vox >= np.iinfo(np.int32).max:
        raise ValueError(f"grid of {n_vox} voxels too large for int32 voxel indices")
    kept = np.zeros(n_b, dtype=np.int64)
    chunks = []  # (beamlet indices, start offsets in the chunk arrays, idx array, val array)
    bar = None
    if config.progress_enabled(progress) and n_b:
        from tqdm.auto import tqdm
        bar = tqdm(total=n_b, desc="influence matrix", unit="beamlet")
    if method == "clustered":
        _clustered_columns(engine, plan, threshold, kept, chunks, bar)
    else:
        _per_beamlet_columns(engine, proj_b, leaf_b, groups, window, k_lo, k_hi, threshold, counts, chunk_beamlets,
                             n_threads, shape, kept, chunks, bar)
    if bar is not None:
        bar.close()

    indptr = np.zeros(n_b + 1, dtype=np.int64)
    np.cumsum(kept, out=indptr[1:])
    nnz = int(indptr[-1])
    data = np.empty(nnz, dtype=np.float32)
    indices = np.empty(nnz, dtype=np.int32)
    for sel, starts, idx, val in chunks:
        for b, s0 in zip(sel, starts):
            n = kept[b]
            data[indptr[b]:indptr[b] + n] = val[s0:s0 + n]
            indices[indptr[b]:indptr[b] + n] = idx[s0:s0 + n]
    chunks.clear()
    # medium composition: each voxel's dose is its material's factor times the water-equivalent one
    data *= engine.medium_factor.ravel()[indices].astype(np.float32)
    if nnz > np.iinfo(np.int32).max:
        indptr_t = indptr
    else:
        indptr_t = indptr.astype(np.int32)
    matrix = sparse.csc_matrix((data, indices, indptr_t), shape=(n_vox, n_b))
    matrix.has_sorted_indices = True
    log.info("influence matrix: %d x %d, %d entries (%.1f MiB) in %.2f s",
             n_vox, n_b, nnz, (data.nbytes + indices.nbytes + indptr_t.nbytes) / 2**20, time.perf_counter() - t0)
    if return_beamlets:
        return matrix, (proj_b, leaf_b)
    return matrix


def _per_beamlet_columns(engine, proj_b, leaf_b, groups, window, k_lo, k_hi, threshold, counts, chunk_beamlets,
                         n_threads, shape, kept, chunks, bar):
    """Columns beamlet by beamlet (``method="beamlet"``): each worker accumulates whole columns in a
    dense scratch of the grid size, ``chunk_beamlets`` at a time."""
    from tomodose._kernels.pencil_beam import beamlet_columns

    seq = engine.projections
    n_vox = engine.grid.n_voxels
    group_of_proj = engine.proj_group
    scratch = np.zeros((n_threads, n_vox))
    mark = np.zeros((n_threads, n_vox), dtype=np.uint8)
    zero_group = np.zeros(seq.n_projections, dtype=np.int64)
    for g in groups:
        members = np.flatnonzero(group_of_proj[proj_b] == g)
        depth = engine.depth_map(int(g))[None]
        exit_m = engine.exit_map(int(g))[None]
        lat_m = engine.lateral_map(int(g))
        for c0 in range(0, members.size, chunk_beamlets):
            sel = members[c0:c0 + chunk_beamlets]
            cnt = counts[sel]
            offsets = np.concatenate([[0], np.cumsum(cnt)[:-1]]).astype(np.int64)
            total = int(cnt.sum())
            out_idx = np.empty(max(total, 1), dtype=np.int32)
            out_val = np.empty(max(total, 1), dtype=np.float32)
            kept_c = np.zeros(sel.size, dtype=np.int64)
            wbuf = np.empty((n_threads, max(int(cnt.max()) if sel.size else 1, 1)), dtype=np.int64)
            beamlet_columns(out_idx, out_val, offsets, kept_c, np.ascontiguousarray(proj_b[sel]),
                            np.ascontiguousarray(leaf_b[sel]), engine.samp_start, engine.samp_stop, zero_group,
                            depth, exit_m, engine.xtab, lat_m, engine.origin, engine.spacing, shape, engine.src,
                            engine.xg,
                            engine.yg, engine.zg, engine.dt, *window, engine.den_min, k_lo, k_hi, threshold,
                            n_threads, scratch, mark, wbuf, *engine.params(), engine.unit_a, engine.btab,
                            *engine.tail_params())
            kept[sel] = kept_c
            # compact this chunk
            keep_mask = np.zeros(max(total, 1), dtype=bool)
            for o, n in zip(offsets, kept_c):
                keep_mask[o:o + n] = True
            starts = np.concatenate([[0], np.cumsum(kept_c)[:-1]]).astype(np.int64)
            chunks.append((sel, starts, out_idx[keep_mask].copy(), out_val[keep_mask].copy()))
            del out_idx, out_val, keep_mask
            if bar is not None:
                bar.update(sel.size)


def _cluster_plan(engine, proj_b, leaf_b, groups, window, k_lo, k_hi):
    """Per angle group: its columns and, per cluster, the arguments of :func:`cluster_column_entries`
    (depth map left out) with the entry count of each slice (the counting pass, which reads no
    depth). Returns ``[(group, members, [(args, counts), ...]), ...]``."""
    from tomodose._kernels.pencil_beam import cluster_column_entries
    from tomodose.transport.pencil_beam import _clusters

    leaf_uc, half_u, r_u, half_v, r_v = window
    widen = engine.sad / engine.den_min
    nz = engine.grid.nz
    group_of_b = engine.proj_group[proj_b]
    par = (*engine.params(), engine.btab, *engine.tail_params())
    dummy_i = np.zeros(1, dtype=np.int32)
    dummy_f = np.zeros(1)
    no_depth = np.zeros((1, 1, 1), dtype=np.float32)
    no_depth.setflags(write=False)  # the type of the cached depth maps (one compiled specialisation)
    plan = []
    for g in groups:
        members = np.flatnonzero(group_of_b == g)  # global columns of this group (sorted)
        projs = np.unique(proj_b[members])
        samples = np.concatenate([np.arange(engine.samp_start[p], engine.samp_stop[p]) for p in projs])
        clusters = []
        for cl in _clusters(engine, samples):
            s = samples[cl]
            s0 = np.ascontiguousarray(engine.src[s[0]])
            yg = np.ascontiguousarray(engine.yg[s[0]])
            t_p = np.ascontiguousarray((engine.src[s] - s0) @ yg)
            # beamlets of each sample: those of its projection (members are sorted by projection, leaf)
            lo = np.searchsorted(proj_b[members], engine.proj[s], side="left")
            hi = np.searchsorted(proj_b[members], engine.proj[s], side="right")
            samp_b_off = np.concatenate([[0], np.cumsum(hi - lo)]).astype(np.int64)
            local = np.concatenate([np.arange(a, b) for a, b in zip(lo, hi)]).astype(np.int64)
            kl, kh = int(k_lo[s].min()), int(k_hi[s].max())
            if kh <= kl or local.size == 0:
                continue
            args = (kl, kh, engine.origin, engine.spacing, s0, np.ascontiguousarray(engine.xg[s[0]]), yg,
                    np.ascontiguousarray(engine.zg[s[0]]), t_p, np.ascontiguousarray(engine.dt[s], dtype=np.float64),
                    samp_b_off, np.ascontiguousarray(leaf_b[members][local]), local.astype(np.int32), leaf_uc,
                    half_u, r_u, half_v, r_v, widen, *par)
            counts = np.zeros(nz, dtype=np.int64)
            cluster_column_entries(True, counts, counts, dummy_i, dummy_i, dummy_f, *args[:2], no_depth, no_depth,
                                   engine.xtab, engine.rho_local4, *args[2:])  # counts: shape only
            if counts.sum():
                clusters.append((args, counts))
        plan.append((g, members, clusters))
    return plan


def _clustered_columns(engine, plan, threshold, kept, chunks, bar):
    """Columns by angle clusters (``method="clustered"``, default): per angle group, the entries of
    every cluster of samples sharing a beam orientation (:func:`cluster_column_entries`: per-voxel
    setup once for all the cluster's beamlets), then sorted into columns and thresholded
    (:func:`threshold_columns`). Memory: the group's entries before the threshold."""
    from tomodose._kernels.pencil_beam import cluster_column_entries, threshold_columns

    for g, members, clusters in plan:
        if clusters:
            depth = engine.depth_map(int(g))
            exit_m = engine.exit_map(int(g))
            lat_m = engine.lateral_map(int(g))
            total = int(sum(int(c.sum()) for _, c in clusters))
            col = np.empty(total, dtype=np.int32)
            flat = np.empty(total, dtype=np.int32)
            val = np.empty(total)
            base = 0
            for args, counts in clusters:
                offsets = base + np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
                cluster_column_entries(False, counts, offsets, col, flat, val, *args[:2], depth, exit_m, engine.xtab,
                                       lat_m, *args[2:])
                base += int(counts.sum())
            start = np.zeros(members.size + 1, dtype=np.int64)
            kept_g = np.zeros(members.size, dtype=np.int64)
            s_flat = np.empty_like(flat)
            s_val = np.empty_like(val)
            seg_start = np.concatenate([[0], np.cumsum(np.concatenate([c for _, c in clusters]))]).astype(np.int64)
            threshold_columns(col, flat, val, seg_start, members.size, threshold, engine.n_subsamples > 1, start,
                              kept_g, s_flat, s_val)
            del col, flat, val
            keep = np.zeros(s_flat.size, dtype=bool)
            for a, n in zip(start[:-1], kept_g):
                keep[a:a + n] = True
            kept[members] = kept_g
            starts = np.concatenate([[0], np.cumsum(kept_g)[:-1]]).astype(np.int64)
            chunks.append((members, starts, s_flat[keep], s_val[keep].astype(np.float32)))
        if bar is not None:
            bar.update(members.size)


# ---------------------------------------------------------------------------------------------
# far field: what the threshold dropped, on a coarse grid
# ---------------------------------------------------------------------------------------------
def _axis_nodes(n: int, step: int) -> np.ndarray:
    nodes = np.arange(0, n, step)
    if nodes[-1] != n - 1:
        nodes = np.append(nodes, n - 1)
    return nodes


def _axis_weights(n: int, nodes: np.ndarray):
    """For each index 0..n-1: lower node position, upper node position, weight of the upper one."""
    idx = np.arange(n)
    hi = np.clip(np.searchsorted(nodes, idx, side="left"), 0, nodes.size - 1)
    lo = np.where(nodes[hi] == idx, hi, np.maximum(hi - 1, 0))
    span = nodes[hi] - nodes[lo]
    wt = np.where(span > 0, (idx - nodes[lo]) / np.where(span > 0, span, 1), 0.0)
    return lo, hi, wt


def _trilinear(shape, step: int) -> sparse.csr_matrix:
    """(n_voxels, n_nodes) trilinear interpolation from the nodes of :func:`_axis_nodes` (C order)."""
    nz, ny, nx = shape
    ks, js, is_ = (_axis_nodes(n, step) for n in (nz, ny, nx))
    lo_k, hi_k, w_k = _axis_weights(nz, ks)
    lo_j, hi_j, w_j = _axis_weights(ny, js)
    lo_i, hi_i, w_i = _axis_weights(nx, is_)
    n_vox = nz * ny * nx
    rows, cols, vals = [], [], []
    vox = np.arange(n_vox)
    K, J, I = np.unravel_index(vox, (nz, ny, nx))
    for ck, wk in ((lo_k[K], 1 - w_k[K]), (hi_k[K], w_k[K])):
        for cj, wj in ((lo_j[J], 1 - w_j[J]), (hi_j[J], w_j[J])):
            for ci, wi in ((lo_i[I], 1 - w_i[I]), (hi_i[I], w_i[I])):
                wgt = wk * wj * wi
                keep = wgt > 0
                rows.append(vox[keep])
                cols.append(((ck[keep] * js.size) + cj[keep]) * is_.size + ci[keep])
                vals.append(wgt[keep])
    return sparse.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                             shape=(n_vox, ks.size * js.size * is_.size))


class FarField:
    """Low-resolution complement of a thresholded influence matrix.

    ``dose ~= matrix @ x + far.dose(x)``: ``far.values`` (n_nodes, n_beamlets) float32 holds, at a
    coarse sub-grid of voxels (every ``step``-th voxel along each axis plus the last), each
    beamlet's full pencil-beam dose minus the entry kept in the thresholded matrix (water-equivalent:
    without the medium factor); ``far.interp`` (n_voxels, n_nodes) CSR interpolates trilinearly back
    to every voxel and applies each voxel's medium factor.

    Attributes
    ----------
    step : int
    node_flat : (n_nodes,) int64
        Flat (C-order) voxel index of each node.
    values : (n_nodes, n_beamlets) float32
    interp : scipy.sparse.csr_matrix (n_voxels, n_nodes)
    """

    def __init__(self, step, node_flat, values, interp):
        self.step = int(step)
        self.node_flat = node_flat
        self.values = values
        self.interp = interp

    def dose(self, x) -> np.ndarray:
        """(n_voxels,) far-field dose of beamlet weights ``x`` (n_beamlets,)."""
        return self.interp @ (self.values @ np.asarray(x, dtype=np.float64))


def far_field_operator(patient, projections_or_plan, matrix, projection, leaf, *, step: int = 6, beam_model=None,
                       n_subsamples: int = 1, kernel=None, rho_floor: float = 0.05, angle_groups: int | None = None,
                       progress: bool | None = None, voxel_average: bool = True,
                       medium_ends: bool = True, lateral_scaling: str = "upstream") -> FarField:
    """What the threshold of ``matrix`` dropped, on a coarse grid (see :class:`FarField`).

    The beamlets' full doses are evaluated at every ``step``-th voxel (no window, no threshold; the
    same model and options as the matrix must be given), the matrix entries kept at those voxels are
    subtracted, and trilinear interpolation spreads the (smooth) remainder to all voxels. Cost:
    n_nodes x n_beamlets evaluations; memory n_nodes x n_beamlets x 4 bytes.
    """
    from tomodose._kernels.pencil_beam import beamlet_node_values

    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 1:
        raise ValueError(f"step must be a positive integer, got {step!r}")
    if not sparse.issparse(matrix):
        raise TypeError(f"matrix must be a scipy.sparse matrix, got {type(matrix).__name__}")
    seq = _projections(projections_or_plan)
    engine = _resolve(patient, seq, beam_model, kernel, n_subsamples, rho_floor, angle_groups, voxel_average,
                      medium_ends, lateral_scaling)
    proj_b = np.ascontiguousarray(projection, dtype=np.int64)
    leaf_b = np.ascontiguousarray(leaf, dtype=np.int64)
    n_vox = engine.grid.n_voxels
    if matrix.shape != (n_vox, proj_b.size) or leaf_b.shape != proj_b.shape:
        raise ValueError(f"matrix must have shape ({n_vox}, n_beamlets) matching projection/leaf, got "
                         f"{matrix.shape} with {proj_b.size} beamlets")
    nz, ny, nx = engine.grid.shape
    ks, js, is_ = (_axis_nodes(n, int(step)) for n in (nz, ny, nx))
    kk, jj, ii = np.meshgrid(ks, js, is_, indexing="ij")
    node_flat = ((kk * ny + jj) * nx + ii).ravel().astype(np.int64)
    n_nodes = node_flat.size
    t0 = time.perf_counter()
    log.info("far field: %d nodes (step %d) x %d beamlets = %d evaluations, %.0f MiB",
             n_nodes, step, proj_b.size, n_nodes * proj_b.size * engine.n_subsamples,
             n_nodes * proj_b.size * 4 / 2**20)
    values = np.zeros((n_nodes, proj_b.size), dtype=np.float32)
    shape = np.asarray(engine.grid.shape, dtype=np.int64)
    near = sparse.csc_matrix(matrix)[node_flat, :].toarray() if proj_b.size else np.zeros((n_nodes, 0))
    groups = engine.proj_group[proj_b]
    f_node = engine.medium_factor.ravel()[node_flat]
    for g in np.unique(groups):
        members = np.flatnonzero(groups == g)
        depth = engine.depth_map(int(g))
        exit_m = engine.exit_map(int(g))
        lat_m = engine.lateral_map(int(g))
        for c0 in range(0, members.size, 256):
            sel = members[c0:c0 + 256]
            out = np.empty((sel.size, n_nodes))
            beamlet_node_values(out, np.ascontiguousarray(proj_b[sel]), np.ascontiguousarray(leaf_b[sel]),
                                engine.samp_start, engine.samp_stop, node_flat, depth, exit_m, engine.xtab,
                                lat_m,
                                engine.origin, engine.spacing, shape, engine.src, engine.xg, engine.yg, engine.zg,
                                engine.dt,
                                *engine.params(), engine.unit_a, engine.btab, *engine.tail_params())
            # near holds the medium factor (matrix rows), the node values are water-equivalent
            values[:, sel] = (out.T - near[:, sel] / f_node[:, None]).astype(np.float32)
    # the remainder is interpolated water-equivalent and takes each voxel's own medium factor
    interp = (sparse.diags(engine.medium_factor.ravel()) @ _trilinear(engine.grid.shape, int(step))).tocsr()
    log.info("far field: done in %.2f s", time.perf_counter() - t0)
    return FarField(step, node_flat, values, interp)


# ---------------------------------------------------------------------------------------------
# HDF5
# ---------------------------------------------------------------------------------------------
def write_influence(group, name: str, matrix, projection, leaf, *, threshold: float | None = None,
                    metadata: dict | None = None):
    """Store an influence matrix and its beamlet list in an open HDF5 group.

    Creates ``group/name`` (CSC sub-group ``matrix`` via :func:`tomodose.io.hdf5.write_sparse`,
    datasets ``beamlet_projection`` and ``beamlet_leaf``; attributes ``threshold``, ``units``
    and any ``metadata`` scalars).
    """
    from tomodose.io.hdf5 import write_json_attr, write_sparse

    if not sparse.issparse(matrix):
        raise TypeError(f"matrix must be a scipy.sparse matrix, got {type(matrix).__name__}")
    p = np.asarray(projection, dtype=np.int64)
    l = np.asarray(leaf, dtype=np.int64)
    if p.shape != (matrix.shape[1],) or l.shape != (matrix.shape[1],):
        raise ValueError(f"projection and leaf must have shape ({matrix.shape[1]},), got {p.shape} and {l.shape}")
    g = group.create_group(name)
    g.attrs["kind"] = "influence_matrix"
    g.attrs["units"] = DOSE_UNIT + " per unit leaf-open fraction"
    if threshold is not None:
        g.attrs["threshold"] = float(threshold)
    if metadata:
        write_json_attr(g, "metadata", metadata)
    write_sparse(g, "matrix", matrix, units=DOSE_UNIT)
    ds = g.create_dataset("beamlet_projection", data=p)
    ds.attrs["units"] = "1"
    ds = g.create_dataset("beamlet_leaf", data=l)
    ds.attrs["units"] = "1"
    return g


def read_influence(group):
    """Inverse of :func:`write_influence`: ``(matrix csc float32, projection, leaf, attrs dict)``."""
    from tomodose.io.hdf5 import read_json_attr, read_sparse

    if group.attrs.get("kind") not in ("influence_matrix", b"influence_matrix"):
        raise ValueError(f"HDF5 group {group.name!r} is not an influence matrix (kind attribute "
                         f"{group.attrs.get('kind')!r})")
    m = read_sparse(group["matrix"])
    attrs = {"threshold": float(group.attrs["threshold"]) if "threshold" in group.attrs else None,
             "metadata": read_json_attr(group, "metadata", {})}
    return m.astype(np.float32), group["beamlet_projection"][()], group["beamlet_leaf"][()], attrs
