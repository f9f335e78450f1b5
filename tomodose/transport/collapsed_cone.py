"""Collapsed-cone convolution/superposition (Ahnesjö 1989) of TERMA with a point kernel.

Dose is the superposition of point kernels weighted by TERMA. In the collapsed-cone
approximation the energy a voxel releases into each cone of the kernel is carried along one
straight *transport line* in the cone's direction and deposited along that line with the radial
kernel of the cone, in **radiological distance** (path length x density relative to water). This
handles heterogeneities (lung, bone, air) the way density scaling (O'Connor's theorem) does.

Implementation (see ``docs/collapsed_cone.md``):

* the kernel's ``P`` rings x ``n_azimuth`` cones give ``N`` fixed transport directions in the
  patient frame, set about a reference axis (the given beam direction, or the direction from the
  source to the grid centre);
* for each direction, parallel lines one voxel apart step slice by slice along the dominant axis;
  together they visit every voxel exactly once (nearest-voxel sampling), so every voxel sends and
  receives energy in every direction;
* along a line the radial kernel is a sum of ``K`` exponentials with shared rates, for which the
  recursion over constant-density voxels is exact (no step-size error along the line);
* **kernel tilting** (``source_position_mm``): the amplitude a voxel puts on a direction ``u`` is
  the kernel's per-steradian value at the angle between ``u`` and the local photon direction
  (source -> voxel), times the cone's solid angle, renormalised per voxel so each voxel releases
  exactly the kernel total (energy conserved). With ``beam_direction`` all voxels share one
  photon direction (parallel-beam approximation) and the amplitudes are the ring amplitudes;
* energy reaching the grid boundary leaves (it is not wrapped); zero density (vacuum) gives no
  division by zero (the dose there is the kerma-like limit for a small water mass).

The result is deterministic and independent of the number of threads: the lines of one direction
write disjoint voxels, and directions are accumulated in a fixed order.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np

from tomodose import config
from tomodose._validate import check_array, check_vector
from tomodose.geometry.grid import Grid
from tomodose.transport.ccc_surface import resolve_surface_correction, surface_maps, surface_normal_weight
from tomodose.transport.kernels import CollapsedConeKernel, load_kernel

__all__ = ["collapsed_cone_dose", "shared_direction_dose", "fibonacci_directions", "direction_geometry",
           "refine_coarse_dose",
           "direction_steppings", "line_phase_set"]

logger = logging.getLogger(__name__)


def direction_geometry(u_xyz, spacing_mm) -> tuple[int, int, float, float, float]:
    """Stepping geometry of a transport direction on a grid.

    Parameters
    ----------
    u_xyz : (3,) unit vector (LPS x, y, z)
    spacing_mm : (3,) voxel size (dx, dy, dz) in mm

    Returns
    -------
    m : int
        Stepping array axis (0 = z, 1 = y, 2 = x): the largest ``|u| / spacing``.
    sgn : int
        +1 or -1, direction of travel along ``m``.
    da, db : float
        Lateral index shift per step along the other two array axes (ascending axis order),
        rounded to a multiple of 2**-36 (:func:`_snap`) so that directions equal to rounding
        give the same lines (a ratio like 0.375 must not become 0.37499999999999994, which would
        move the line's offset at n = 4 by one voxel).
    step_cm : float
        Geometric path length of one step (cm).
    """
    u = np.asarray(u_xyz, dtype=np.float64)
    sp = np.asarray(spacing_mm, dtype=np.float64)
    # array axis order (z, y, x)
    u_arr = np.array([u[2], u[1], u[0]])
    s_arr = np.array([sp[2], sp[1], sp[0]])
    v = u_arr / s_arr  # index units per mm of travel
    av = np.abs(v)
    # first axis within rounding of the maximum: mirrored directions pick the same axis
    m = int(np.nonzero(av >= av.max() * (1.0 - 1e-12))[0][0])
    others = [ax for ax in range(3) if ax != m]
    sgn = 1 if v[m] > 0 else -1
    da = _snap(v[others[0]] / abs(v[m]))
    db = _snap(v[others[1]] / abs(v[m]))
    step_cm = float(s_arr[m] / abs(u_arr[m]) / 10.0)
    return m, sgn, da, db, step_cm


def _snap(x) -> float:
    """``x`` rounded to a multiple of 2**-36 (|x| <= 1: exact in float64; changes x by < 8e-12)."""
    return float(np.round(float(x) * 2.0**36) / 2.0**36)


def direction_steppings(u_xyz, spacing_mm) -> list[tuple[float, int, int, float, float, float]]:
    """Line sets transporting a direction: ``[(weight, m, sgn, da, db, step_cm), ...]``.

    One set (weight 1, :func:`direction_geometry`) unless two or three array axes tie for the
    largest ``|u| / spacing`` (within 1e-9 relative; e.g. a cone on a grid diagonal): then the
    direction is transported once stepping along each tied axis with weight ``1 / n_tied``. The
    rounding of a line's lateral offsets is phased on the stepping axis, so a single choice
    would break the symmetry that exchanges the tied axes (a staggered cone ring around a beam
    along a grid axis has such cones); energy is unchanged (weights sum to 1).
    """
    u = np.asarray(u_xyz, dtype=np.float64)
    sp = np.asarray(spacing_mm, dtype=np.float64)
    u_arr = np.array([u[2], u[1], u[0]])
    s_arr = np.array([sp[2], sp[1], sp[0]])
    av = np.abs(u_arr / s_arr)
    tied = np.flatnonzero(av >= av.max() * (1.0 - 1e-9))
    if tied.size == 1:
        return [(1.0,) + direction_geometry(u, sp)]
    out = []
    for m in tied:
        m = int(m)
        others = [ax for ax in range(3) if ax != m]
        sgn = 1 if u_arr[m] > 0 else -1
        da = _snap(u_arr[others[0]] / s_arr[others[0]] / av[m])
        db = _snap(u_arr[others[1]] / s_arr[others[1]] / av[m])
        out.append((1.0 / tied.size, m, sgn, da, db, float(s_arr[m] / abs(u_arr[m]) / 10.0)))
    return out


def collapsed_cone_dose(
    terma,
    density_g_cm3,
    grid: Grid,
    *,
    source_position_mm=None,
    beam_direction=None,
    kernel: CollapsedConeKernel | None = None,
    rings=None,
    line_phases: int = 1,
    progress: bool | None = None,
    surface_correction=None,
    surface_weight_map=None,
    surface_normal_map=None,
) -> np.ndarray:
    """Dose (energy per mass) from TERMA by collapsed-cone convolution/superposition.

    Parameters
    ----------
    terma : (nz, ny, nx) or (G, nz, ny, nx) array_like, float
        TERMA (total energy released per unit mass, e.g. Gy or Gy per unit fluence) on ``grid``,
        >= 0. With a leading axis: TERMA per energy group of ``kernel`` (``kernel.n_groups``
        groups, ranges ``kernel.group_edges_mev``); each group is transported with its own
        kernel amplitudes (beam hardening in the kernel) in a single transport.
    density_g_cm3 : (nz, ny, nx) array_like, float
        Density relative to water (g/cm3, >= 0) on ``grid``; scales every path to radiological
        distance. Air and vacuum are allowed.
    grid : tomodose.geometry.Grid
        The voxel grid (DICOM LPS, mm).
    source_position_mm : (3,) array_like, optional
        LPS position (x, y, z) of the photon source. The kernel is tilted per voxel to the
        direction source -> voxel (recommended). Exactly one of ``source_position_mm`` and
        ``beam_direction`` must be given.
    beam_direction : (3,) array_like, optional
        Direction of photon travel (LPS, any length > 0), shared by all voxels (parallel-beam
        approximation).
    kernel : CollapsedConeKernel, optional
        Collapsed kernel; default the shipped :data:`~tomodose.transport.kernels.DEFAULT_KERNEL_NAME`.
    rings : sequence of int, optional
        Transport only the cones of these kernel rings (indices into ``kernel.polar_deg``);
        default all. The dose of all rings is the sum of the doses of any partition of the rings
        (used by :func:`shared_direction_dose`: forward rings per beam, the others shared).
        With tilting, the per-voxel normalisation is still that of the whole kernel.
    line_phases : int
        Sub-voxel line phases per lateral axis (>= 1; default 1 = nearest-voxel lines). A line
        of a direction moves ``floor(n d + c)`` voxels laterally at step ``n``; with ``n > 1``
        every direction is transported with the ``n x n`` phases ``c = (j + 1/2) / n`` along its
        two lateral axes and the doses are averaged (:func:`line_phase_set`): the line from each
        source voxel then reaches, on average, its exact lateral position (linear sharing
        between the two nearest voxels, error <= 1 / (2 n) voxel) instead of one rounded to the
        nearest voxel with an error phased along the stepping axis. Cost ``n**2`` transports per
        direction (docs/collapsed_cone.md section 4f).
    progress : bool, optional
        Progress bar over cone directions (default: ``tomodose.config.settings.progress``).
    surface_correction : None, bool or SurfaceCorrection
        Surface escape of the kernel's slow (scattered-photon) terms near the body's exterior
        (:mod:`tomodose.transport.ccc_surface`; True: the shipped table; None/False: off, the
        uncorrected transport bit for bit). The surface map is made from ``density_g_cm3`` on
        ``grid``.
    surface_weight_map : (nz, ny, nx) array_like, optional
        The map :func:`tomodose.transport.ccc_surface.surface_weight` of this density, grid and
        correction, when the caller has it already (several transports of one patient); values in
        [0, 1]. Used only with ``surface_correction``.
    surface_normal_map : (nz * ny * nx, 3) array_like, optional
        :func:`tomodose.transport.ccc_surface.surface_normal_weight` of this density, grid and
        correction (a direction-weighted correction only), when the caller has it already.

    Returns
    -------
    dose : (nz, ny, nx) float32
        Deposited energy per mass in the units of ``terma`` on ``grid``. In an infinite
        homogeneous medium with uniform TERMA the dose equals TERMA x kernel total fraction.
    """
    if not isinstance(grid, Grid):
        raise TypeError(f"grid must be a tomodose Grid, got {type(grid).__name__}")
    t_in = np.asarray(terma) if not isinstance(terma, np.ndarray) else terma
    grouped = getattr(t_in, "ndim", 0) == 4
    t_arr = check_array("terma", t_in, shape=((None,) + grid.shape) if grouped else grid.shape, low=0.0)
    rho = check_array("density_g_cm3", density_g_cm3, shape=grid.shape, low=0.0)
    if (source_position_mm is None) == (beam_direction is None):
        raise ValueError(
            "exactly one of source_position_mm and beam_direction must be given, got "
            f"source_position_mm={source_position_mm!r}, beam_direction={beam_direction!r}"
        )
    if kernel is None:
        kernel = load_kernel()
    elif not isinstance(kernel, CollapsedConeKernel):
        raise TypeError(f"kernel must be a CollapsedConeKernel, got {type(kernel).__name__}")
    phases = line_phase_set(line_phases)
    surface = resolve_surface_correction(surface_correction)
    t_arr = np.ascontiguousarray(t_arr, dtype=np.float64)
    rho = np.ascontiguousarray(rho, dtype=np.float64)
    if grouped:
        if kernel.n_groups != t_arr.shape[0]:
            raise ValueError(
                f"terma has {t_arr.shape[0]} energy groups but the kernel {kernel.name!r} has "
                f"{kernel.n_groups}; terma must have shape (nz, ny, nx) or (kernel.n_groups, nz, ny, nx)"
            )
        group_amps = np.asarray(kernel.group_amplitudes, dtype=np.float64)
    else:
        t_arr = t_arr[None]
        group_amps = np.asarray(kernel.amplitudes, dtype=np.float64)[None]

    centre = np.asarray(grid.centre_mm)
    if source_position_mm is not None:
        src = np.asarray(check_vector("source_position_mm", source_position_mm))
        axis = centre - src
        if float(np.linalg.norm(axis)) == 0.0:
            raise ValueError(
                f"source_position_mm must differ from the grid centre {centre.tolist()}, got {src.tolist()}"
            )
        tilt = True
    else:
        axis = np.asarray(check_vector("beam_direction", beam_direction))
        if float(np.linalg.norm(axis)) == 0.0:
            raise ValueError(f"beam_direction must be a non-zero vector, got {axis.tolist()}")
        src = np.zeros(3)
        tilt = False
    axis = axis / np.linalg.norm(axis)

    from tomodose._kernels import collapsed_cone as _k

    dirs, omega, ring = kernel.directions(axis)
    selected = _ring_selection(rings, kernel)
    rates = np.ascontiguousarray(kernel.rates_per_cm, dtype=np.float64)
    amps_ring = group_amps / kernel.n_azimuth  # (G, P, K)
    tables = [kernel._density_table(a) for a in group_amps]
    ds = tables[0][1]
    table = np.ascontiguousarray(np.stack([t for t, _ in tables]))  # (G, M, K)
    origin = np.asarray(grid.origin_mm, dtype=np.float64)
    spacing = np.asarray(grid.spacing_mm, dtype=np.float64)
    dose = np.zeros(grid.shape, dtype=np.float64)
    if not np.any(t_arr > 0):
        return dose.astype(np.float32)
    phi, esc, directional, normal = _surface_arrays(surface, rho, spacing, rates, surface_weight_map,
                                                    surface_normal_map)

    t0 = time.perf_counter()
    if tilt:
        # per-voxel normalisation of every energy group in one pass (angles computed once per voxel)
        norm = _k.tilt_normalisation_groups(
            t_arr, dirs, omega, np.ascontiguousarray(np.stack([t.sum(axis=1) for t in table])), ds, src, origin,
            spacing, np.array([float(a.sum()) for a in group_amps]), axis,
        )
    else:
        norm = np.zeros((1, 1, 1, 1))
    order = _escape_order(surface is not None, esc, phi)
    escape = order is not None
    if escape:
        rates, esc = np.ascontiguousarray(rates[order]), np.ascontiguousarray(esc[order])
        amps_ring = np.ascontiguousarray(amps_ring[..., order])
        table = np.ascontiguousarray(table[..., order])
    iterator = [d for d in range(dirs.shape[0]) if selected[ring[d]]]
    if config.progress_enabled(progress):
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="collapsed cone", unit="dir", leave=False)
    # energy groups without tilting: the source of every cone of a ring is the same contraction
    # sum_g T_g A_g[ring] (K volumes), made once per ring and transported as direct sources: per
    # voxel and cone K loads instead of G loads and G x K products
    contract = t_arr.shape[0] > 1 and not tilt
    n_k = rates.size
    eye = np.eye(n_k)
    ring_src = np.empty((1, n_k, dose.size), dtype=np.float32) if contract else None
    src_ring = -1
    for d in iterator:
        if contract and ring[d] != src_ring:
            _k.contract_sources(t_arr.reshape(t_arr.shape[0], -1),
                                np.ascontiguousarray(amps_ring[:, ring[d]][None]), ring_src)
            src_ring = ring[d]
        for w, m, sgn, da, db, step_cm in direction_steppings(dirs[d], spacing):
            for ca, cb in phases:  # every phase is a partition of the voxels; the doses are averaged below
                if contract:
                    # direct sources; a split (tied) cone scales them through identity amplitudes instead
                    _k.transport_direction(
                        ring_src[0].reshape((n_k,) + grid.shape), rho, dose, m, sgn, da, db, step_cm, rates,
                        w * eye, False, np.ascontiguousarray(dirs[d]), 0.0, table, ds, norm, src, origin, spacing,
                        axis, w == 1.0, ca, cb, escape, phi, esc, directional, normal,
                    )
                    continue
                _k.transport_direction(
                    t_arr, rho, dose, m, sgn, da, db, step_cm, rates,
                    np.ascontiguousarray(w * amps_ring[:, ring[d]]), tilt, np.ascontiguousarray(dirs[d]),
                    float(w * omega[d]), table, ds, norm, src, origin, spacing, axis, False, ca, cb,
                    escape, phi, esc, directional, normal,
                )
    if len(phases) > 1:
        dose /= len(phases)
    logger.debug("collapsed cone: %d directions x %d line phases on %s in %.2f s", len(iterator), len(phases),
                 grid.shape, time.perf_counter() - t0)
    return dose.astype(np.float32)


def _escape_order(on: bool, esc, phi) -> np.ndarray | None:
    """Term order for the transports' escape path, or None where no escape can happen (the
    surface correction off, no term with an escape rate, or ``phi`` all 0): the kernels then run
    their uncorrected recursion in every voxel. The order puts the terms that have an escape rate first (stable): the
    kernels run them in one vectorised loop. The dose is a sum over terms: unchanged to rounding
    (1e-16), bit for bit where the order is already so (the 1-group kernel: slow terms first)."""
    if not (on and np.any(esc != 0.0) and np.any(phi != 0.0)):
        return None
    return np.argsort(np.asarray(esc) == 0.0, kind="stable")


def _surface_arrays(surface, rho, spacing_mm, rates, weight_map=None, normal_map=None):
    """(phi map (nz, ny, nx), escape rates (K,), directional, normal (n_vox, 3)) of a surface
    correction, or dummies when off."""
    if surface is None:
        return np.zeros((1, 1, 1)), np.zeros(np.asarray(rates).size), False, np.zeros((1, 3))
    phi = normal = None
    if weight_map is not None:
        phi = np.ascontiguousarray(check_array("surface_weight_map", weight_map, shape=rho.shape, low=0.0,
                                               high=1.0), dtype=np.float64)
    if surface.directional and normal_map is not None:
        normal = np.ascontiguousarray(check_array("surface_normal_map", normal_map, shape=(rho.size, 3),
                                                  low=-1.0, high=1.0), dtype=np.float64)
    if phi is None:  # both maps from one distance transform where both are needed
        phi, computed = surface_maps(rho, spacing_mm, surface, normals=surface.directional and normal is None)
        normal = computed if normal is None else normal
    if surface.directional and normal is None:
        normal = surface_normal_weight(rho, spacing_mm, surface, phi)
    if normal is None:
        normal = np.zeros((1, 3))
    return phi, np.ascontiguousarray(surface.escape_rates(rates), dtype=np.float64), surface.directional, normal


def line_phase_set(line_phases: int, layout: str = "product") -> np.ndarray:
    """(N, 2) line phases ``(c_a, c_b)`` of the two lateral axes of a direction.

    Parameters
    ----------
    line_phases : int
        Phases per lateral axis ``n`` (>= 1): ``c = (j + 1/2) / n``, ``j = 0 .. n - 1``
        (``n = 1``: ``c = 1/2``, nearest-voxel lines).
    layout : {"product", "diagonal"}
        ``"product"``: all ``n x n`` pairs (independent sub-voxel positions along both lateral
        axes: bilinear sharing on average). ``"diagonal"``: the pairs ``(c_j, c_j)`` and
        ``(c_j, 1 - c_j)`` (``2 n``; the per-axis average is the same, the joint one is not). Both sets are unchanged by ``c -> 1 - c`` on either axis and by exchanging
        the axes, so a dose that is symmetric under the grid's reflections and axis exchanges
        stays exactly symmetric.

    Returns
    -------
    (N, 2) float64
    """
    if isinstance(line_phases, bool) or not isinstance(line_phases, (int, np.integer)) or not 1 <= line_phases <= 16:
        raise ValueError(f"line_phases must be an integer in [1, 16], got {line_phases!r}")
    if layout not in ("product", "diagonal"):
        raise ValueError(f"layout must be 'product' or 'diagonal', got {layout!r}")
    n = int(line_phases)
    c = (np.arange(n) + 0.5) / n
    if layout == "product":
        return np.array([(x, y) for x in c for y in c], dtype=np.float64)
    # 2 n pairs (for odd n the centre pair twice): every axis sees each phase equally often
    return np.array([(x, x) for x in c] + [(x, 1.0 - x) for x in c], dtype=np.float64)


def _ring_selection(rings, kernel: CollapsedConeKernel) -> np.ndarray:
    """(P,) bool mask of the kernel rings named by ``rings`` (None: all)."""
    sel = np.zeros(kernel.n_polar, dtype=bool)
    if rings is None:
        sel[:] = True
        return sel
    idx = np.atleast_1d(np.asarray(rings))
    if idx.ndim != 1 or (idx.size and (not np.issubdtype(idx.dtype, np.integer) or idx.min() < 0
                                        or idx.max() >= kernel.n_polar)):
        raise ValueError(f"rings must be ring indices in [0, {kernel.n_polar - 1}], got {np.asarray(rings).tolist()}")
    sel[idx] = True
    return sel


def fibonacci_directions(n: int) -> np.ndarray:
    """(n, 3) unit vectors spread almost uniformly over the sphere (Fibonacci lattice).

    Point ``j`` has ``z = 1 - (2 j + 1) / n`` and azimuth ``j`` times the golden angle; every point
    stands for a solid angle of about ``4 pi / n`` (spacing about ``sqrt(4 pi / n)`` rad).
    """
    j = np.arange(int(n), dtype=np.float64)
    z = 1.0 - (2.0 * j + 1.0) / n
    r = np.sqrt(np.clip(1.0 - z * z, 0.0, 1.0))
    phi = j * math.pi * (3.0 - math.sqrt(5.0))
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


def shared_direction_dose(
    terma_groups,
    beam_directions,
    density_g_cm3,
    grid: Grid,
    *,
    kernel: CollapsedConeKernel | None = None,
    rings=None,
    n_directions: int = 256,
    neighbours: int = 1,
    batch: int = 8,
    coarse_factor: int = 1,
    coarse_rate_per_cm: float = 1.0,
    coarse_directions: int | None = None,
    progress: bool | None = None,
    surface_correction=None,
    surface_weight_map=None,
    surface_normal_map=None,
) -> np.ndarray:
    """Dose of selected kernel rings of many beams, transported along one shared direction set.

    For rotational delivery the broad (lateral and backward) rings of the kernel of all beam
    directions are transported together: every cone of ring ``p`` of beam ``g`` (direction
    ``u``, amplitudes ``amplitudes[p] / n_azimuth``) is moved to the nearest of ``n_directions``
    fixed directions ``v_j`` (:func:`fibonacci_directions`), and each ``v_j`` is transported once
    with the source ``S_jk = sum_g T_g w_jgk`` (``w_jgk``: the amplitudes of the cones moved to
    ``v_j``). The energy released by every beam is exactly that of the per-beam transport of the
    same rings; only directions change (by at most about half the spacing of the set,
    ``sqrt(4 pi / n_directions) / 2`` rad, 6.4 deg for 256). The cost is ``n_directions``
    transports instead of ``n_beams x n_cones(rings)``.

    With an energy-grouped kernel (``kernel.n_groups = E``) the TERMA of each beam may be split
    by energy group, ``terma_groups`` of shape ``(G, E, nz, ny, nx)``: cone ``p`` of beam ``g``
    then carries ``sum_e T_ge group_amplitudes[e, p] / n_azimuth`` (kernel hardening, as in
    :func:`collapsed_cone_dose`), i.e. the contraction runs over beams x energy groups at the same
    number of transports.

    Parameters
    ----------
    terma_groups : (G, nz, ny, nx) or (G, E, nz, ny, nx) array_like, float
        TERMA of each beam (angle group) on ``grid``, >= 0; with a second axis, TERMA per energy
        group of ``kernel`` (``E = kernel.n_groups``, lines split by ``kernel.group_edges_mev``).
    beam_directions : (G, 3) array_like
        Photon direction of each beam (LPS, any length > 0); parallel-beam tilt per beam.
    density_g_cm3 : (nz, ny, nx) array_like
        Density relative to water (>= 0).
    grid : Grid
    kernel : CollapsedConeKernel, optional
        Default: the shipped default kernel. Energy-grouped TERMA needs a kernel with
        ``n_groups`` equal to its second axis.
    rings : sequence of int, optional
        Kernel rings to transport this way (default all).
    n_directions : int
        Size of the shared direction set (>= 1).
    neighbours : int
        Each cone is shared among this many nearest fixed directions, with weights proportional
        to the inverse angle (normalised to 1, so energy is unchanged); 1 = nearest only.
    batch : int
        Shared directions whose sources are built together (memory: ``batch x K`` float32
        volumes).
    coarse_factor : int
        1 (default): every exponential term on ``grid``. ``f`` in [2, 8]: the long-range terms
        (rate below ``coarse_rate_per_cm``) are transported on a grid ``f`` times coarser along
        every axis (``f**3`` fewer voxels; blocks of ``f x f x f`` voxels, the last ones at the
        far faces hold what is left) and interpolated back (trilinear, at the voxel centres):
        the block's density is the mean density (radiological paths kept on average), its
        TERMA the mass-weighted mean (the energy released is kept exactly). The short-range
        terms stay on ``grid``. Heterogeneities stay density-scaled along the lines of both
        grids; what the coarse grid loses is sub-block detail of the long-range terms, whose
        decay lengths (> 1 cm for the default threshold) exceed the block size.
    coarse_rate_per_cm : float
        Terms with a rate (1/cm) below this go to the coarse grid (> 0; default 1.0: decay
        lengths above 1 cm; used only with ``coarse_factor > 1``).
    coarse_directions : int, optional
        Size of the shared direction set of the coarse grid (default ``n_directions``); the
        short-range terms use ``n_directions``.
    progress : bool, optional
        Progress bar over shared directions.
    surface_correction : None, bool or SurfaceCorrection
        Surface escape of the slow kernel terms (as :func:`collapsed_cone_dose`); on the coarse
        grid the map is the block mean of the fine one.
    surface_weight_map : (nz, ny, nx) array_like, optional
        Precomputed :func:`tomodose.transport.ccc_surface.surface_weight` (as :func:`collapsed_cone_dose`).
    surface_normal_map : (nz * ny * nx, 3) array_like, optional
        Precomputed :func:`tomodose.transport.ccc_surface.surface_normal_weight` (as :func:`collapsed_cone_dose`).

    Returns
    -------
    dose : (nz, ny, nx) float64
        Dose of the selected rings of all beams (units of ``terma_groups``).
    """
    from tomodose._kernels import collapsed_cone as _k

    if not isinstance(grid, Grid):
        raise TypeError(f"grid must be a tomodose Grid, got {type(grid).__name__}")
    t_in = terma_groups if isinstance(terma_groups, np.ndarray) else np.asarray(terma_groups)
    energy_grouped = getattr(t_in, "ndim", 0) == 5
    t_all = check_array("terma_groups", t_in, shape=((None, None) if energy_grouped else (None,)) + grid.shape,
                        dtype=np.float32, finite=False)
    # values: one parallel pass over the (often GB-sized) stack, check_array's messages
    t_min, n_bad, any_terma = _k.range_check(t_all.reshape(-1))
    if n_bad:
        raise ValueError(f"terma_groups must be finite, got {n_bad} NaN/inf value(s)")
    if t_all.size and t_min < 0.0:
        raise ValueError(f"terma_groups must be >= 0.0, got minimum {t_min}")
    n_g = t_all.shape[0]
    beams = check_array("beam_directions", beam_directions, shape=(n_g, 3), dtype=np.float64)
    norms = np.linalg.norm(beams, axis=1)
    if np.any(norms == 0):
        raise ValueError(f"beam_directions must be non-zero vectors, got {beams[norms == 0].tolist()}")
    rho = np.ascontiguousarray(check_array("density_g_cm3", density_g_cm3, shape=grid.shape, low=0.0),
                               dtype=np.float64)
    if isinstance(n_directions, bool) or int(n_directions) != n_directions or n_directions < 1:
        raise ValueError(f"n_directions must be an integer >= 1, got {n_directions!r}")
    if isinstance(neighbours, bool) or int(neighbours) != neighbours or not 1 <= neighbours <= n_directions:
        raise ValueError(f"neighbours must be an integer in [1, n_directions], got {neighbours!r}")
    if isinstance(batch, bool) or int(batch) != batch or batch < 1:
        raise ValueError(f"batch must be an integer >= 1, got {batch!r}")
    if kernel is None:
        kernel = load_kernel()
    elif not isinstance(kernel, CollapsedConeKernel):
        raise TypeError(f"kernel must be a CollapsedConeKernel, got {type(kernel).__name__}")
    if energy_grouped:
        if kernel.n_groups != t_all.shape[1]:
            raise ValueError(
                f"terma_groups has {t_all.shape[1]} energy groups but the kernel {kernel.name!r} has "
                f"{kernel.n_groups}; terma_groups must have shape (G, nz, ny, nx) or "
                f"(G, kernel.n_groups, nz, ny, nx)"
            )
        amps_e = np.asarray(kernel.group_amplitudes, dtype=np.float64) / kernel.n_azimuth  # (E, P, K)
    else:
        amps_e = (np.asarray(kernel.amplitudes, dtype=np.float64) / kernel.n_azimuth)[None]
    n_e = amps_e.shape[0]
    selected = _ring_selection(rings, kernel)
    coarse_factor, coarse_rate_per_cm, coarse_directions = _check_coarse(
        coarse_factor, coarse_rate_per_cm, coarse_directions, n_directions)
    rates = np.ascontiguousarray(kernel.rates_per_cm, dtype=np.float64)
    if coarse_factor > 1:
        slow = np.flatnonzero(rates < coarse_rate_per_cm)
        fast = np.flatnonzero(rates >= coarse_rate_per_cm)
    else:
        slow, fast = np.zeros(0, dtype=np.int64), np.arange(rates.size)
    surface = resolve_surface_correction(surface_correction)
    dose = np.zeros(grid.shape, dtype=np.float64)
    if not any_terma:
        return dose
    phi, esc, directional, normal = _surface_arrays(surface, rho, np.asarray(grid.spacing_mm, dtype=np.float64),
                                                    rates, surface_weight_map, surface_normal_map)
    flat = np.ascontiguousarray(t_all.reshape(n_g * n_e, -1))
    t0 = time.perf_counter()
    if fast.size:
        fixed = fibonacci_directions(int(n_directions))
        weights = _shared_weights(fixed, beams / norms[:, None], kernel, selected, amps_e, int(neighbours))
        _transport_shared(flat, weights[:, :, fast], fixed, rho, grid, rates[fast], int(batch), progress, dose,
                          surface is not None, phi, esc[fast], directional, normal)
    t_fine = time.perf_counter() - t0
    if slow.size:
        f = int(coarse_factor)
        rho_c, mass_c = _k.coarse_density(rho, f)
        flat_c = _k.coarse_sources(flat.reshape((flat.shape[0],) + grid.shape), rho, mass_c, f)
        grid_c = Grid(rho_c.shape, tuple(float(v) * f for v in grid.spacing_mm),
                      tuple(float(o) + 0.5 * (f - 1) * float(v) for o, v in zip(grid.origin_mm, grid.spacing_mm)))
        fixed_c = fibonacci_directions(int(coarse_directions))
        weights_c = _shared_weights(fixed_c, beams / norms[:, None], kernel, selected, amps_e, int(neighbours))
        dose_c = np.zeros(grid_c.shape, dtype=np.float64)
        phi_c, normal_c = phi, normal
        if surface is not None:
            phi_c = _k.coarse_density(phi, f)[0]
            if directional:  # block mean of sqrt(phi) n, per component
                nv = normal.reshape(grid.shape + (3,))
                normal_c = np.ascontiguousarray(np.stack(
                    [_k.coarse_density(np.ascontiguousarray(nv[..., i]), f)[0] for i in range(3)], axis=-1
                ).reshape(-1, 3))
        _transport_shared(flat_c.reshape(flat.shape[0], -1), weights_c[:, :, slow], fixed_c, rho_c, grid_c,
                          rates[slow], int(batch), progress, dose_c, surface is not None, phi_c, esc[slow],
                          directional, normal_c)
        dose += refine_coarse_dose(dose_c, f, grid.shape)
    logger.debug("shared directions on %s for %d beams x %d energy groups: %d terms x %d directions in %.2f s, "
                 "%d terms x %d directions on a %dx coarser grid in %.2f s", grid.shape, n_g, n_e, fast.size,
                 n_directions, t_fine, slow.size, coarse_directions, coarse_factor, time.perf_counter() - t0 - t_fine)
    return dose


def refine_coarse_dose(coarse, f: int, shape) -> np.ndarray:
    """Fine-voxel dose (``shape``) from the dose of ``f x f x f`` blocks (``coarse``, (nzc, nyc, nxc)).

    Separable along each axis: the block values are cell averages of a dose that the coarse
    transport has also averaged over the source block, i.e. smoothed twice by the block width
    ``H``; (1) one box is undone to second order, ``a' = a - (a[i-1] - 2 a[i] + a[i+1]) / 24``,
    (2) ``a'`` are taken as cell averages and the piecewise-quadratic reconstruction through each
    block and its two neighbours (exact for quadratics, conservative) is averaged over each of the
    ``f`` fine voxels of the block: ``a' + s c1 + q c2`` with ``s = (a'[i+1] - a'[i-1]) / 2``,
    ``q = (a'[i+1] - 2 a'[i] + a'[i-1]) / 2`` and ``c1``, ``c2`` the fine voxel's mean of ``x``
    and of ``x**2 - 1/12`` (block coordinates, width 1). The outermost blocks (and axes with fewer
    than 3 blocks) are constant. Linear interpolation of the block values instead lowers a
    concave dose by about ``0.4 H**2 |f''|`` (measured: -0.5 % of the PTV mean on the 5 mm liver
    case with 10 mm blocks, docs/collapsed_cone.md section 2a).
    """
    out = np.asarray(coarse, dtype=np.float64)
    for axis in range(3):
        out = _refine_axis(out, int(f), int(shape[axis]), axis)
    return out


def _refine_axis(a, f: int, n: int, axis: int) -> np.ndarray:
    """:func:`refine_coarse_dose` along one axis: (.., nc, ..) -> (.., n, ..), n <= nc f."""
    a = np.moveaxis(a, axis, -1)
    nc = a.shape[-1]
    ap = np.array(a, dtype=np.float64)
    s = np.zeros_like(ap)
    q = np.zeros_like(ap)
    if nc >= 3:
        ap[..., 1:-1] -= (a[..., 2:] - 2.0 * a[..., 1:-1] + a[..., :-2]) / 24.0
        s[..., 1:-1] = 0.5 * (ap[..., 2:] - ap[..., :-2])
        q[..., 1:-1] = 0.5 * (ap[..., 2:] - 2.0 * ap[..., 1:-1] + ap[..., :-2])
    out = np.empty(ap.shape[:-1] + (nc * f,))
    for m in range(f):
        lo = -0.5 + m / f
        hi = lo + 1.0 / f
        c1 = 0.5 * (lo + hi)
        c2 = (hi**3 - lo**3) * f / 3.0 - 1.0 / 12.0
        out[..., m::f] = ap + s * c1 + q * c2
    return np.moveaxis(out[..., :n], -1, axis)


def _check_coarse(coarse_factor, coarse_rate_per_cm, coarse_directions, n_directions):
    """Validated (coarse_factor, coarse_rate_per_cm, coarse_directions) of the shared transport."""
    if isinstance(coarse_factor, bool) or int(coarse_factor) != coarse_factor or not 1 <= coarse_factor <= 8:
        raise ValueError(f"coarse_factor must be an integer in [1, 8], got {coarse_factor!r}")
    if isinstance(coarse_rate_per_cm, bool) or not isinstance(coarse_rate_per_cm, (int, float, np.number)) \
            or not math.isfinite(coarse_rate_per_cm) or coarse_rate_per_cm <= 0:
        raise ValueError(f"coarse_rate_per_cm must be a finite rate > 0 (1/cm), got {coarse_rate_per_cm!r}")
    if coarse_directions is None:
        coarse_directions = n_directions
    if isinstance(coarse_directions, bool) or int(coarse_directions) != coarse_directions or coarse_directions < 1:
        raise ValueError(f"coarse_directions must be an integer >= 1 or None, got {coarse_directions!r}")
    return int(coarse_factor), float(coarse_rate_per_cm), int(coarse_directions)


def _shared_weights(fixed, beams, kernel, selected, amps_e, neighbours) -> np.ndarray:
    """(J, G * E, K) amplitudes the cones of the selected rings of every beam (unit vectors
    ``beams``, (G, 3)) and energy group give each direction of ``fixed`` (J, 3): each cone to its
    ``neighbours`` nearest fixed directions with inverse-angle shares (sum 1). Rows beam-major."""
    n_g, n_e, n_k = beams.shape[0], amps_e.shape[0], amps_e.shape[2]
    weights = np.zeros((fixed.shape[0], n_g * n_e, n_k))
    for g in range(n_g):
        dirs, _, ring = kernel.directions(beams[g])
        keep = selected[ring]
        dots = dirs[keep] @ fixed.T
        if neighbours == 1:
            near = np.argmax(dots, axis=1)[:, None]
            share = np.ones(near.shape)
        else:
            near = np.argsort(-dots, axis=1, kind="stable")[:, :neighbours]
            ang = np.arccos(np.clip(np.take_along_axis(dots, near, axis=1), -1.0, 1.0))
            inv = 1.0 / (ang + 1e-6)
            share = inv / inv.sum(axis=1, keepdims=True)
        for e in range(n_e):
            for c in range(near.shape[1]):
                np.add.at(weights[:, g * n_e + e, :], near[:, c], share[:, c:c + 1] * amps_e[e][ring[keep]])
    return weights


def _transport_shared(flat, weights, fixed, rho, grid: Grid, rates, batch: int, progress, dose,
                      surface: bool = False, phi=None, esc=None, directional: bool = False, normal=None) -> None:
    """dose += transport along every direction of ``fixed`` with the sources
    ``S_jk = sum_r weights[j, r, k] flat[r]`` (contracted in batches of ``batch`` directions from
    the non-zero weights only); ``surface``, ``phi``, ``esc``: the surface escape (escape rate of
    each term of ``rates``)."""
    from tomodose._kernels import collapsed_cone as _k

    # terms with the same rate within 1e-6 (e.g. the 100 /cm fit bound of two energy groups of the
    # 5-group kernel, equal to 2e-10) are one term: their sources add (the recursion is linear in
    # the source) and one transport carries both, at the rate of the first (dose change < 1e-8)
    rates = np.asarray(rates, dtype=np.float64)
    target = np.arange(rates.size)
    for k in range(rates.size):
        for q in range(k):
            if target[q] == q and abs(rates[k] - rates[q]) <= 1e-6 * rates[q]:
                target[k] = q
                break
    keep = np.flatnonzero(target == np.arange(rates.size))
    if keep.size < rates.size:
        merged = np.zeros(weights.shape[:2] + (keep.size,))
        slot = {int(q): i for i, q in enumerate(keep)}
        for k in range(rates.size):
            merged[:, :, slot[int(target[k])]] += weights[:, :, k]
        weights, rates = merged, rates[keep]
        if esc is not None:
            esc = np.asarray(esc)[keep]  # equal rates have equal escape rates
    n_k = rates.size
    if phi is None or not surface:
        surface, phi, esc, directional = False, np.zeros((1, 1, 1)), np.zeros(n_k), False
    if normal is None or not directional:
        directional, normal = False, np.zeros((1, 3))
    normal = np.ascontiguousarray(normal, dtype=np.float64)
    phi = np.ascontiguousarray(phi, dtype=np.float64)
    esc = np.ascontiguousarray(esc, dtype=np.float64)
    order = _escape_order(bool(surface), esc, phi)
    surface = order is not None
    if surface:
        weights, rates, esc = weights[:, :, order], rates[order], np.ascontiguousarray(esc[order])
    active = np.flatnonzero(np.abs(weights).sum(axis=(1, 2)) > 0)
    if active.size == 0:
        return
    spacing = np.asarray(grid.spacing_mm, dtype=np.float64)
    rates = np.ascontiguousarray(rates, dtype=np.float64)
    rho = np.ascontiguousarray(rho, dtype=np.float64)
    batches = [active[i:i + batch] for i in range(0, active.size, batch)]
    iterator = batches
    if config.progress_enabled(progress):
        from tqdm.auto import tqdm

        iterator = tqdm(batches, desc="shared cones", unit="batch", leave=False)
    src = np.empty((batch, flat.shape[1], n_k), dtype=np.float32)  # voxel-major term sources
    t_contract = t_transport = 0.0  # process CPU time (all threads)
    for js in iterator:
        t0 = time.process_time()
        w = weights[js].transpose(0, 2, 1)  # (J, K, R)
        nz_j, nz_k, nz_r = np.nonzero(w)  # C order: per (j, k) the rows ascending
        ptr = np.zeros(js.size * n_k + 1, dtype=np.int64)
        np.cumsum(np.bincount(nz_j * n_k + nz_k, minlength=js.size * n_k), out=ptr[1:])
        out = src[:js.size]
        _k.contract_sources_sparse(flat, ptr, nz_r.astype(np.int64), np.ascontiguousarray(w[nz_j, nz_k, nz_r]), out)
        t1 = time.process_time()
        t_contract += t1 - t0
        for i, j in enumerate(js):
            steps = direction_steppings(fixed[j], spacing)
            if len(steps) > 1:  # a tie (never for the Fibonacci set on common grids): split the source
                out[i] *= np.float32(1.0 / len(steps))
            for _, m, sgn, da, db, step_cm in steps:
                _k.transport_direct_sources(out[i].reshape(grid.shape + (n_k,)), rho, dose, m, sgn, da, db, step_cm,
                                            rates, surface, phi, esc, directional, normal,
                                            np.ascontiguousarray(fixed[j], dtype=np.float64))
        t_transport += time.process_time() - t1
    logger.debug("shared transport on %s: %d directions x %d terms, %d source entries per direction; CPU: sources "
                 "%.2f s, transport %.2f s", grid.shape, active.size, n_k,
                 int(np.count_nonzero(weights)) // active.size, t_contract, t_transport)
