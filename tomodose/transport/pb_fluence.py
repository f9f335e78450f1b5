"""Full-plan pencil-beam dose by fluence maps per beam orientation (``pencil_beam_dose(method="fluence")``).

The samples of one angle cluster (a helical plan: one gantry angle, every couch position) share
the beam's-eye-view frame up to the couch offset ``t_p`` along the jaw axis. For the Gaussians
narrower than ``fine_sigma_mm`` (the fast path's level 0), their summed leaf x jaw profiles are
tabulated once per cluster on a beam's-eye-view lattice (leaf coordinate ``u`` in the isocentre
plane, couch coordinate ``Y`` at the voxel) for a few distances from the source (planes) and a
ladder of kernel widths (the kernel's own log-spaced widths; a voxel of density ``rho`` reads the
Gaussian of width ``sigma_i / rho`` between two rungs), so that a voxel costs one interpolation per
Gaussian instead of one evaluation per sample and Gaussian
(:mod:`tomodose._kernels.pb_fluence`). The rest (wider Gaussians; narrow ones outside the window)
is evaluated exactly at every ``far_field_step``-th voxel and interpolated, as in the clustered
fast path. When the jaw axis is the patient z axis the maps' couch-axis rows are the slices
(:func:`_y_lattice`). The window follows the leaves that open: with ``leaf_model="beam"`` the
closed-leaf transmission (a uniform weight ``t`` on every leaf) is left out of the window's leaf
ranges but not out of the maps (:func:`_uniform_part`). See ``docs/pencil_beam.md`` ("Fluence maps")
for the approximations and their measured error.
"""

from __future__ import annotations

import contextlib
import logging
import math

import numpy as np

log = logging.getLogger(__name__)

#: lattice step of the maps along the leaf axis (isocentre-plane mm) and the couch axis (mm at the voxel).
FLUENCE_U_STEP_MM = 0.75
FLUENCE_Y_STEP_MM = 0.8
#: spacing of the map planes along the beam axis (mm); a voxel interpolates linearly between two.
FLUENCE_PLANE_MM = 40.0
#: jaw profile values below this fraction of their maximum are dropped from the maps.
FLUENCE_EPS = 1e-4
#: Gaussians narrower than this (mm of water) are read from the fine maps; the window around the
#: open leaves and the jaws is the reach of these Gaussians (``window_threshold``).
FLUENCE_FINE_SIGMA_MM = 20.0
#: lattice step (mm, both axes) and plane spacing (mm) of the coarse maps (the whole grid, all widths).
FLUENCE_COARSE_STEP_MM = 4.0
FLUENCE_COARSE_PLANE_MM = 100.0
#: row height (mm along the couch axis) of the window's per-row leaf ranges.
FLUENCE_ROW_MM = 2.0


#: chunk size of the kernels' parallel loops (``numba.set_parallel_chunksize``): threads take one
#: iteration (a slice, a map row, a plane and level) at a time, so an uneven loop (the window voxels
#: lie in the slices near the target) keeps both threads busy. Every iteration writes its own part
#: of the output: the result does not depend on the schedule.
FLUENCE_CHUNK = 1


@contextlib.contextmanager
def _parallel_chunks(n: int):
    import numba

    old = numba.set_parallel_chunksize(n)
    try:
        yield
    finally:
        numba.set_parallel_chunksize(old)


def _ladder(sigma_mm: np.ndarray) -> float:
    """Ratio ``r`` of the kernel's log-spaced widths (``sigma_i = sigma_0 r^i``); ValueError otherwise."""
    sig = np.asarray(sigma_mm, float)
    if sig.size < 2 or np.any(sig <= 0):
        raise ValueError("method 'fluence' needs a kernel with at least two positive Gaussian widths")
    r = float(sig[1] / sig[0])
    if r <= 1.0 or not np.allclose(np.log(sig), np.log(sig[0]) + np.arange(sig.size) * math.log(r), rtol=0,
                                   atol=1e-6):
        raise ValueError(f"method 'fluence' needs log-spaced kernel widths (sigma_i = sigma_0 r^i), got {sig!r}")
    return r


class _Scratch:
    """Reusable work arrays (a fresh large array per cluster costs its page faults every time)."""

    def __init__(self):
        self.flat: dict = {}

    def get(self, name: str, shape, dtype=np.float64) -> np.ndarray:
        n = int(np.prod(shape))
        buf = self.flat.get(name)
        if buf is None or buf.size < n:
            buf = np.empty(max(n, int(1.25 * (buf.size if buf is not None else 0))), dtype)
            self.flat[name] = buf
        return buf[:n].reshape(shape)


def _window_rows(t_p, u_lo_p, u_hi_p, y_half: float, r_u: float, widen: float, step: float):
    """The fine window of one cluster: rows of ``step`` along the couch axis, each with the union of
    the open-leaf ranges of the samples whose couch range ``t_p +- y_half`` meets the row (a voxel
    is inside when its ``u`` lies in its row's range widened by ``r_u SAD / den``). Returns
    ``win = (y0, step, u_lo, u_hi, r_u)`` (``u_lo, u_hi`` widened by ``r_u widen``, the largest
    ``SAD / den``) and ``win_u`` (n_rows, 2) (:func:`tomodose._kernels.pb_fluence._in_window`)."""
    y0 = float(t_p.min()) - y_half
    n = int(math.ceil((float(t_p.max()) + y_half - y0) / step)) + 1
    lo_row = y0 + step * np.arange(n)
    win_u = np.empty((n, 2))
    win_u[:, 0], win_u[:, 1] = 1.0, 0.0  # empty
    for t, lo, hi in zip(t_p, u_lo_p, u_hi_p):
        rows = (lo_row + step >= t - y_half) & (lo_row <= t + y_half)
        empty = win_u[:, 0] > win_u[:, 1]
        win_u[rows, 0] = np.where(empty[rows], lo, np.minimum(win_u[rows, 0], lo))
        win_u[rows, 1] = np.where(empty[rows], hi, np.maximum(win_u[rows, 1], hi))
    ok = win_u[:, 0] <= win_u[:, 1]
    win = np.array([y0, step, float(win_u[ok, 0].min()) - r_u * widen, float(win_u[ok, 1].max()) + r_u * widen, r_u])
    return win, np.ascontiguousarray(win_u)


def _medium_ends(engine, s0, yg, t_p, sc_min: float) -> tuple[bool, float, float]:
    """How the medium's longitudinal ends (:func:`tomodose.transport.pencil_beam.medium_column_ends`)
    enter one cluster: ``(check, y_lo, y_hi)``. When every voxel column has the same ends (a phantom
    or patient filling the grid's length: the grid's faces) and the jaw axis is the patient z axis,
    the ends lie at the same couch coordinates ``y_lo <= y_hi`` for every voxel and the maps truncate
    the samples' apertures there (``check`` False). Otherwise ``check`` is True when the end of some
    column may lie within ``jaw_h + PHI_X s_jaw`` of a sample's field (conservative: the largest
    distance's scale, 1 mm margin): the kernels then evaluate the voxels concerned exactly."""
    from tomodose._kernels.pencil_beam import NO_LIMIT, PHI_X

    zc = engine.zcol
    if np.all(np.abs(zc) >= 1e29):
        return False, -NO_LIMIT, NO_LIMIT
    g = engine.grid
    xy = (g.x_mm[None, :] - s0[0]) * yg[0] + (g.y_mm[:, None] - s0[1]) * yg[1]
    y_a = xy + (zc[..., 0] - s0[2]) * yg[2]
    y_b = xy + (zc[..., 1] - s0[2]) * yg[2]
    lo, hi = np.minimum(y_a, y_b), np.maximum(y_a, y_b)
    uniform = np.ptp(lo) < 1e-9 and np.ptp(hi) < 1e-9
    if abs(yg[0]) < 1e-9 and abs(yg[1]) < 1e-9 and abs(yg[2]) > 1e-12 and uniform:
        return False, float(lo.flat[0]), float(hi.flat[0])
    reach = (engine.jaw_h + PHI_X * engine.s_jaw) / sc_min + 1.0
    check = bool(np.any(lo > float(t_p.min()) - reach) or np.any(hi < float(t_p.max()) + reach))
    return check, -NO_LIMIT, NO_LIMIT


def _build_maps(lat, n_u, n_y, n_k, w2, geo, engine, bu2, bv2, scratch, tag, y_ends, row_lev=None):
    """Maps (n_k, n_y, n_u, len(w2)) of one cluster on the lattice ``lat = (u0, hu, y0, hy, den0, dden)``;
    ``row_lev`` (n_y,): first level summed in each row (the levels below it and the rows with
    ``len(w2)`` are left 0, :func:`_coarse_rows`); default every level of every row."""
    from tomodose._kernels.pb_fluence import fluence_accumulate, fluence_profiles
    from tomodose.transport.pencil_beam import LEVELS_PER_OCTAVE, S_TAB_MM

    s0, xg, yg, zg, t_p, dt_p, a_c, tab_c, u_lo_p, u_hi_p = geo
    n_p, nl = t_p.size, w2.size
    lu = scratch.get("lu", (n_k, n_p, nl, n_u))
    jy = scratch.get("jy", (n_k, n_p, n_y, nl))
    jy_first = scratch.get("jy_first", (n_k, n_p, n_y), np.int64)
    fluence_profiles(lu, jy, jy_first, lat[0], lat[1], lat[2], lat[3], lat[4], lat[5], w2, t_p, dt_p, a_c, tab_c,
                     engine.s_leaf ** 2, engine.s_jaw ** 2, bu2, bv2, engine.jaw_h, engine.sad, engine.e0, engine.w,
                     engine.phi, engine.cphi, S_TAB_MM, engine.lev_off, 1.0 / engine.lev_h, engine.lev_n,
                     engine.log2_s0, float(LEVELS_PER_OCTAVE), engine.u_max, FLUENCE_EPS, engine.s_jaw, *y_ends)
    maps = scratch.get(tag, (n_k, n_y, n_u, nl))
    fluence_accumulate(maps, lu, jy, jy_first, np.zeros(n_y, np.int64) if row_lev is None else row_lev)
    return maps


def _rows_read(y, y0: float, hy: float, n_y: int) -> np.ndarray:
    """Rows of a couch-axis lattice (``y0 + b hy``, ``n_y`` rows) that voxels at the couch coordinates
    ``y`` read, as :func:`tomodose._kernels.pb_fluence._row_pos` finds them: a coordinate on a row
    (within 1e-9 steps: the kernel, whose own rounding of ``y`` is ~1e-12 steps, snaps it too) reads
    that row (the last row: with the one before it, at weight 0), any other the row below and the
    next one (clamped); one between 1e-9 and 1e-6 steps from a row also the rows on either side."""
    t = np.clip((np.asarray(y, float).ravel() - y0) / hy, 0.0, n_y - 1.0)
    r = np.rint(t)
    off = np.abs(t - r)
    rows = [np.minimum(np.floor(t), n_y - 2), np.minimum(np.floor(t), n_y - 2) + 1]
    snap = off < 1e-9
    rows = [np.where(snap, np.minimum(r, n_y - 2), rows[0]), np.where(snap & (r < n_y - 1), r, rows[1])]
    near = (off >= 1e-9) & (off < 1e-6)
    if np.any(near):
        rows += [r[near] - 1, r[near], r[near] + 1]
    out = np.concatenate([np.asarray(x, float).ravel() for x in rows]).astype(np.int64)
    return np.unique(np.clip(out, 0, n_y - 1))


def _coarse_rows(engine, s0, yg, nodes, lat_c, n_yc: int, nl_c: int, win, n_win_rows: int, nl_f: int) -> np.ndarray:
    """First level of each row of the coarse maps that some voxel reads (``nl_c``: none), so that
    :func:`tomodose._kernels.pb_fluence.fluence_accumulate` sums only those. The coarse maps are read
    by the far-field nodes (:func:`tomodose._kernels.pb_fluence.coarse_lookup`: every level; their
    rows are those of the nodes' couch coordinates) and by the voxels inside the fine window
    (:func:`tomodose._kernels.pb_fluence.fluence_lookup`: the levels from ``nl_f - 1`` on, the fine
    maps holding the lower ones; their couch coordinates lie in the ``n_win_rows`` rows of the
    window ``win``, :func:`_window_rows`; None: no window). With the maps' rows on the slices this
    skips the slices that hold neither a node nor the window, and the narrow levels of the
    window's other slices: the same values wherever a voxel reads them."""
    ks, js, is_ = nodes
    o, sp = engine.origin, engine.spacing
    y_k = (o[2] + ks * sp[2] - s0[2]) * yg[2]
    if yg[0] == 0.0 and yg[1] == 0.0:  # the jaw axis is the patient z axis: Y depends on the slice only
        y_node = y_k
    else:
        y_node = ((o[0] + is_ * sp[0] - s0[0]) * yg[0])[None, None, :] + \
            ((o[1] + js * sp[1] - s0[1]) * yg[1])[None, :, None] + y_k[:, None, None]
    lev = np.full(n_yc, nl_c, np.int64)
    y0, hy = float(lat_c[2]), float(lat_c[3])
    lev[_rows_read(np.unique(y_node), y0, hy, n_yc)] = 0
    if win is not None:
        # the window's couch range, one row of margin on each side
        ends = _rows_read([win[0], win[0] + win[1] * n_win_rows], y0, hy, n_yc)
        span = slice(max(int(ends.min()) - 1, 0), int(ends.max()) + 2)
        lev[span] = np.minimum(lev[span], max(nl_f - 1, 0))
    return lev


def _lattice(lo: float, hi: float, step: float) -> tuple[float, int]:
    """Origin and size of a lattice of ``step`` covering [lo, hi] with half a step of margin."""
    return lo - 0.5 * step, int(math.ceil((hi - lo) / step)) + 2


def _y_lattice(engine, s0, yg, lo: float, hi: float, step: float) -> tuple[float, float, int]:
    """Origin, step and size of the couch-axis lattice covering [lo, hi]. When the jaw axis is the
    patient z axis (a voxel's couch coordinate ``Y`` depends on its slice only), the rows are the
    slices' ``Y`` (step = slice spacing): every voxel then reads one row (no interpolation along
    the couch axis, exact there). Otherwise :func:`_lattice` with ``step``."""
    dz = float(engine.spacing[2])
    nz = engine.grid.shape[0]
    if abs(yg[0]) < 1e-12 and abs(yg[1]) < 1e-12 and abs(abs(yg[2]) - 1.0) < 1e-12 and nz >= 2:
        ys = np.sort((engine.origin[2] + dz * np.arange(nz) - s0[2]) * yg[2])
        sel = np.flatnonzero((ys >= lo - dz) & (ys <= hi + dz))
        if sel.size >= 2:
            return float(ys[sel[0]]), dz, int(sel.size)
        if sel.size == 1:
            m = min(int(sel[0]), nz - 2)
            return float(ys[m]), dz, 2
    y0, n = _lattice(lo, hi, step)
    return y0, step, n


#: an empty fine window (:func:`tomodose._kernels.pb_fluence._in_window` is False everywhere)
_NO_WIN = np.array([0.0, 1.0, 1.0, 0.0, 0.0])
_NO_WIN_U = np.array([[1.0, 0.0]])


def _planes(den_lo: float, den_hi: float, spacing: float) -> tuple[int, float]:
    n = max(2, int(math.ceil((den_hi - den_lo) / spacing)) + 1)
    return n, ((den_hi - den_lo) / (n - 1) if den_hi > den_lo else 1.0)


def _uniform_part(engine, a_proj: np.ndarray) -> np.ndarray:
    """Per projection, the leaf weight ``b_p`` that every leaf has at least, up to the beam model's
    closed-leaf transmission ``t``: ``min(min_i a_pi, t)`` (0 without transmission).

    With ``leaf_model="beam"`` a leaf's output is ``open_i + t (1 - f_i)``, so every closed leaf is a
    source of ``t`` and the "open" leaves would span the whole fan. Written as ``[open_i - t f_i] +
    t``, the remainder ``a_pi - b_p`` (>= 0) is nonzero on the open leaves only: the fine window is
    placed around those, while the maps carry the full weights (the window decides which voxels
    read the fine maps, not which leaves contribute): inside the window the transmission is exact,
    outside it the coarse level carries it with the rest."""
    t = float(getattr(engine.beam, "leaf_transmission", 0.0) or 0.0)
    if t <= 0.0 or a_proj.size == 0:
        return np.zeros(a_proj.shape[0])
    return np.maximum(np.minimum(a_proj.min(axis=1), t), 0.0)


def _fluence_geometry(engine, a_proj: np.ndarray, a_open: np.ndarray, base: np.ndarray, s: np.ndarray,
                      centres: np.ndarray, full_tab: np.ndarray) -> tuple:
    """:func:`tomodose.transport.pencil_beam._cluster_geometry` of the samples ``s`` of one cluster with
    the leaf weights ``a_proj`` (maps, aperture tables ``tab(a_open) + b_p tab(all leaves)``), but the
    open-leaf range ``u_lo, u_hi`` of ``a_open`` (:func:`_uniform_part`; a sample without an open
    leaf gets an empty range, ``u_lo > u_hi``)."""
    from tomodose._kernels.pb_fluence import aperture_tables

    s0 = np.ascontiguousarray(engine.src[s[0]])
    xg = np.ascontiguousarray(engine.xg[s[0]])
    yg = np.ascontiguousarray(engine.yg[s[0]])
    zg = np.ascontiguousarray(engine.zg[s[0]])
    t_p = np.ascontiguousarray((engine.src[s] - s0) @ yg)
    dt_p = np.ascontiguousarray(engine.dt[s], dtype=np.float64)
    proj = engine.proj[s]
    a_c = np.ascontiguousarray(a_proj[proj], dtype=np.float64)
    o_c = np.ascontiguousarray(a_open[proj], dtype=np.float64)
    used = np.flatnonzero(o_c.any(axis=0)).astype(np.int64)
    tab_c = np.empty((a_c.shape[0], engine.btab.shape[1]))
    aperture_tables(tab_c, o_c, used, engine.btab)
    b = base[proj]
    if np.any(b > 0.0):
        tab_c += b[:, None] * full_tab[None, :]
    open_ = o_c > 0
    has = open_.any(axis=1)
    first = np.argmax(open_, axis=1)
    last = open_.shape[1] - 1 - np.argmax(open_[:, ::-1], axis=1)
    u_lo = np.where(has, centres[first] - 0.5 * engine.w, 1e30)
    u_hi = np.where(has, centres[last] + 0.5 * engine.w, -1e30)
    return (s0, xg, yg, zg, t_p, dt_p, a_c, tab_c, np.ascontiguousarray(u_lo), np.ascontiguousarray(u_hi))


def fluence_dose(engine, a_proj: np.ndarray, progress, far_field_step: int, threshold: float) -> np.ndarray:
    """Dose (nz, ny, nx) float64 of leaf weights ``a_proj`` (see :func:`pencil_beam_dose`, ``method="fluence"``)."""
    with _parallel_chunks(FLUENCE_CHUNK):
        return _fluence_dose(engine, a_proj, progress, far_field_step, threshold)


def _fluence_dose(engine, a_proj: np.ndarray, progress, far_field_step: int, threshold: float) -> np.ndarray:
    from tomodose._kernels.pb_fluence import coarse_lookup, fluence_lookup
    from tomodose._kernels.pencil_beam import trilinear_add
    from tomodose.transport.influence import _axis_nodes, beamlet_reach_mm
    from tomodose.transport.pencil_beam import LEVELS_PER_OCTAVE, S_TAB_MM, _active_groups, _clusters

    grid = engine.grid
    nz, ny, nx = grid.shape
    sig = engine.kernel.sigma_mm
    r = _ladder(sig)
    n_g = int(sig.size)
    n0 = int(np.count_nonzero(sig < FLUENCE_FINE_SIGMA_MM))
    dose = np.zeros(grid.shape)
    # level offset s = log(1 / rho) / log r of every voxel (rho clamped at rho_floor, as the kernels);
    # the upstream densities lie within the local ones' range, so their levels within [j_lo, j_hi]
    lvl = -np.log(engine.rho_t) / math.log(r)
    j_lo = int(math.floor(float(lvl.min())))
    j_hi = int(math.ceil(n_g - 1 + float(lvl.max()))) + 1

    def level_offsets(lat):
        """(ny, nx, nz, 1 or nG) level offsets of a lateral map, minus the ladder's first level."""
        return np.ascontiguousarray(-np.log(lat) / math.log(r) - j_lo)

    upstream = engine.lateral_scaling == "upstream"
    lvl_t = None
    w2 = (float(sig[0]) * r ** np.arange(j_lo, j_hi + 1, dtype=float)) ** 2
    w2_f = w2[:max(2, n0 - j_lo + 1)]  # levels of the fine maps: below the first wide Gaussian
    r_u, r_v = beamlet_reach_mm(engine, threshold, n_gaussians=max(n0, 1))
    widen = engine.sad / engine.den_min
    vavg = 1.0 if engine.voxel_average else 0.0
    fine = tuple(np.arange(n, dtype=np.int64) for n in (nz, ny, nx))
    nodes = tuple(_axis_nodes(n, int(far_field_step)).astype(np.int64) for n in (nz, ny, nx))
    values = np.zeros(tuple(a.size for a in nodes))
    centres = engine.projections.machine.leaf_centres_mm()
    # voxel-centre corners of the grid (extent of the coarse maps, distance range of the planes)
    lo_c = np.asarray(engine.origin, float)
    hi_c = lo_c + (np.array([nx, ny, nz]) - 1) * engine.spacing
    corners = np.array([[hi_c[c] if bit else lo_c[c] for c, bit in enumerate(bits)] for bits in np.ndindex(2, 2, 2)])
    par = (engine.sad, engine.amps, engine.dz_tab, engine.tail, engine.sig, engine.e0, engine.w, engine.s_leaf,
           S_TAB_MM, engine.lev_off, 1.0 / engine.lev_h, engine.lev_n, engine.log2_s0, float(LEVELS_PER_OCTAVE),
           engine.u_max,
           engine.jaw_h, engine.s_jaw, engine.offc, engine.soft, engine.phi, engine.cphi, vavg, engine.zcol)
    hu, hy, hc = FLUENCE_U_STEP_MM, FLUENCE_Y_STEP_MM, FLUENCE_COARSE_STEP_MM
    scratch = _Scratch()
    n_clusters = 0
    base = _uniform_part(engine, a_proj)
    a_open = np.ascontiguousarray(a_proj - base[:, None])

    def coarse_setup(geo):
        """Distance range, medium ends, voxel box and coarse lattice of one cluster, and the builder of
        its coarse maps (given the window, :func:`_coarse_rows`)."""
        s0, xg, yg, zg, t_p = geo[:5]
        d = corners - s0
        dens = -(d @ zg)
        den_lo, den_hi = float(dens.min()), float(dens.max())
        sc_min = engine.sad / den_hi
        ends, y_end_lo, y_end_hi = _medium_ends(engine, s0, yg, t_p, sc_min)
        bu2 = (0.5 * vavg * float(np.linalg.norm(xg * engine.spacing))) ** 2 / 3.0
        bv2 = (0.5 * vavg * float(np.linalg.norm(yg * engine.spacing))) ** 2 / 3.0
        # coarse maps: the whole grid (u is extreme at the corners: linear-fractional in the position)
        u_c = engine.sad * (d @ xg) / dens
        y_c = d @ yg
        u0c, n_uc = _lattice(float(u_c.min()), float(u_c.max()), hc)
        y0c, hyc, n_yc = _y_lattice(engine, s0, yg, float(y_c.min()), float(y_c.max()), hc)
        n_kc, ddc = _planes(den_lo, den_hi, FLUENCE_COARSE_PLANE_MM)
        lat_c = np.array([u0c, hc, y0c, hyc, den_lo, ddc])

        def coarse_maps(win, n_win_rows):
            row_lev = _coarse_rows(engine, s0, yg, nodes, lat_c, n_yc, w2.size, win, n_win_rows, w2_f.size)
            return _build_maps(lat_c, n_uc, n_yc, n_kc, w2, geo, engine, bu2, bv2, scratch, "maps_c",
                               (y_end_lo, y_end_hi), row_lev)

        return den_lo, den_hi, sc_min, ends, (y_end_lo, y_end_hi), bu2, bv2, coarse_maps, lat_c

    full_tab = np.ascontiguousarray(engine.btab.sum(axis=0)) if np.any(base > 0.0) else None
    for grp, _active, depth, samples in _active_groups(engine, a_proj, progress):
        exit_m = engine.exit_map(int(grp))
        lat_m = engine.lateral_map(int(grp))
        if lvl_t is None or upstream:  # local: one offset per voxel for every group; upstream: per group
            lvl_t = level_offsets(lat_m)
        for members in _clusters(engine, samples):
            s = samples[members]
            geo = _fluence_geometry(engine, a_proj, a_open, base, s, centres, full_tab)
            n_clusters += 1
            s0, xg, yg, zg, t_p, dt_p, a_c, tab_c, u_lo_p, u_hi_p = geo
            den_lo, den_hi, sc_min, ends, y_ends, bu2, bv2, coarse_maps, lat_c = coarse_setup(geo)
            has = u_lo_p <= u_hi_p
            if not np.any(has):  # transmission only: the coarse level, every Gaussian at every node
                maps_c = coarse_maps(None, 0)
                coarse_lookup(values, *nodes, depth, exit_m, engine.xtab, lvl_t, lat_m, engine.origin,
                              engine.spacing, s0, xg, yg, zg, t_p, dt_p, a_c, tab_c, _NO_WIN, _NO_WIN_U, 0, maps_c,
                              lat_c, *par, ends)
                continue
            win, win_u = _window_rows(t_p[has], u_lo_p[has], u_hi_p[has], engine.jaw_h / sc_min + r_v, r_u, widen,
                                      FLUENCE_ROW_MM)
            maps_c = coarse_maps(win, win_u.shape[0])
            vals_c = np.zeros_like(values)
            coarse_lookup(vals_c, *nodes, depth, exit_m, engine.xtab, lvl_t, lat_m, engine.origin,
                          engine.spacing, s0, xg, yg, zg, t_p, dt_p, a_c, tab_c, win, win_u, n0, maps_c, lat_c, *par,
                          ends)
            u0, n_u = _lattice(win[2], win[3], hu)
            y0, hy_f, n_y = _y_lattice(engine, s0, yg, win[0], win[0] + win[1] * win_u.shape[0], hy)
            n_k, dden = _planes(den_lo, den_hi, FLUENCE_PLANE_MM)
            lat_f = np.array([u0, hu, y0, hy_f, den_lo, dden])
            maps_f = _build_maps(lat_f, n_u, n_y, n_k, w2_f, geo, engine, bu2, bv2, scratch, "maps_f", y_ends)
            fluence_lookup(dose, *fine, depth, exit_m, engine.xtab, lvl_t, lat_m, engine.origin,
                           engine.spacing, s0, xg, yg, zg, t_p, dt_p, a_c, tab_c, win, win_u, maps_f, lat_f, maps_c,
                           lat_c, *par, ends, vals_c, *nodes)
            values += vals_c
    trilinear_add(dose, values, *nodes)
    log.debug("fluence maps: %d clusters, %d levels (%d fine), work arrays %.1f MiB", n_clusters, w2.size, w2_f.size,
              sum(b.nbytes for b in scratch.flat.values()) / 2**20)
    return dose
