"""One call from a patient and a plan to absolute dose, with a named engine.

Engines
-------
``"collapsed_cone"`` (accurate, default)
    Polyenergetic TERMA (:func:`tomodose.terma.compute_terma`) accumulated per gantry-angle
    group and, with an energy-grouped kernel (the default :data:`CCC_KERNEL_NAME`, 5 groups, or for
    static deliveries :data:`STATIC_CCC_KERNEL_NAME`, 8 groups on 17 rings), per energy group, then
    one collapsed-cone transport (:func:`tomodose.transport.collapsed_cone.collapsed_cone_dose`)
    per angle group in which each energy group's TERMA releases energy
    with its own kernel (beam hardening in the kernel: with one polyenergetic kernel the depth
    dose fell 6 % too fast by 19 cm against Monte Carlo, ``docs/dose.md``). Projections that share a gantry angle (one per rotation of
    a helical plan) are summed at the TERMA level, so the transport cost does not grow with the
    number of rotations. Kernel tilt: when a group's projections share one source position (a
    fixed beam, or a single rotation without couch motion) the kernel is tilted per voxel toward
    that point source; otherwise (helical groups spread along the couch axis) the group's central
    beam direction is used for all voxels (parallel-beam tilt). ``grouping="projection"`` instead
    transports every projection separately, tilted toward its own point source (at the centre of
    the projection): the reference used to measure the grouping error (see ``docs/dose.md``).
    Default since 2026-11-29: helical (parallel-tilt) groups share one set of 512 transport
    directions for all their cones (``shared_from_deg=0``, ``shared_directions``; 512 transports
    instead of 51 x 88: 0.90 % of max from the per-group transport on the 3 mm liver plan, 1.86 %
    of max from the per-projection reference on the grouping test case, bound 2 %;
    ``shared_from_deg=None`` gives the per-group reference; ``docs/dose.md``).
    ``static_supersample=2``: static deliveries (fixed gantry and couch, at most 16 beams) are
    computed on a 2x finer grid, TERMA included, and mass-averaged back, so a voxel's source is
    resolved where a jaw or leaf edge crosses it (every Monte Carlo water profile passes; default
    :data:`STATIC_SUPERSAMPLE` = 2 since the machine was recommissioned with it on 2026-11-29;
    docs/collapsed_cone.md section 4f).
``"pencil_beam"`` (fast)
    :func:`tomodose.transport.pencil_beam.pencil_beam_dose`.

Both are calibrated to absolute dose by :func:`tomodose.dose.calibration.calibration_factor`.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from tomodose import config
from tomodose._validate import check_choice
from tomodose.delivery.plan import HelicalPlan, ProjectionSequence
from tomodose.geometry.frames import beam_axes_patient, source_position_patient
from tomodose.geometry.grid import ImageVolume
from tomodose.geometry.patient import PatientModel
from tomodose.dose.result import DoseResult

__all__ = ["compute_dose", "ENGINES"]

log = logging.getLogger(__name__)

#: Engine names accepted by :func:`compute_dose`.
ENGINES = ("collapsed_cone", "pencil_beam")

#: marks an engine option left at its documented default
DEFAULT = object()
#: default ``shared_from_deg`` of the collapsed-cone engine: kernel rings at least this far from
#: the beam are transported along one shared direction set for all parallel-tilt (helical) angle
#: groups; None = every ring per angle group (the reference). Since 2026-11-29 0: every ring of a
#: helical plan's groups (3 mm liver plan: 0.90 % of max from the per-group reference, 9x less CPU;
#: grouping test case 1.86 % of max from per-projection transport, bound 2 %). ``docs/dose.md``.
SHARED_FROM_DEG: float | None = 0.0
#: default ``shared_directions`` (size of the shared direction set).
SHARED_DIRECTIONS = 512
#: default ``shared_coarse_block_mm``: None transports every kernel term on the dose grid; a length
#: moves the long-range terms (rate < 1/cm) to blocks of ``f = floor(L / largest spacing)`` voxels
#: per axis (when f >= 2), with ``shared_coarse_directions`` directions (docs/collapsed_cone.md §2a).
SHARED_COARSE_BLOCK_MM: float | None = None
#: default ``shared_coarse_directions`` (directions of the coarse-grid transport; None = as fine).
SHARED_COARSE_DIRECTIONS: int | None = None
#: the fast collapsed-cone configuration of the benchmark goal (``compute_dose(..., **FAST_CCC_OPTIONS)``):
#: 96 shared directions, long-range terms on blocks of <= 7 mm with 128 directions. 3 mm liver plan:
#: transport 3.9 s on 2 idle threads, 1.64 % of max (1.01 % above half max) from the per-group
#: reference, Monte Carlo gamma 2 %/2 mm 99.98 %; the small grouping test case 2.7-3.6 % from
#: per-projection transport (docs/collapsed_cone.md §4d-4e). Without the surface correction (default on since
#: session 9): on this plan it changes the dose by at most 0.31 % of max (mean -0.15 % above half max), far
#: inside the fast configuration's own 1.64 %, and costs about +1.2-1.6 s wall (+15 %), which the goal has no
#: room for (10.46 s with it on 2 threads, 2026-11-29 17:47 UTC).
FAST_CCC_OPTIONS = {"shared_from_deg": 0.0, "shared_directions": 96, "shared_coarse_block_mm": 7.0,
                    "shared_coarse_directions": 128, "surface_correction": False}
#: collapsed-cone kernel of :func:`compute_dose` when none is given: one kernel per energy group
#: (TERMA split by the same groups), see ``docs/dose.md`` for the measured gain against Monte Carlo.
#: Since 2026-11-29 five groups (inner edges 0.5, 1.0, 2.0, 3.5 MeV): the kernel follows the
#: hardening of the spectrum with depth 3x better than the 3-group table (docs/collapsed_cone.md 4c).
CCC_KERNEL_NAME = "ccc_water_6mv_5groups"
#: collapsed-cone kernel of :func:`compute_dose` for **static** deliveries (:func:`is_static_delivery`: fixed
#: gantry and couch, at most :data:`STATIC_SUPERSAMPLE_MAX_BEAMS` beams) when none is given, their calibration
#: field included: eight energy groups (inner edges 0.25, 0.5, 1, 1.5, 2, 3, 4 MeV) on 17 polar rings
#: (the 11 of :data:`CCC_KERNEL_NAME` with the 7.5-30 deg rings halved and the 30-60 and 60-90 deg rings
#: split: 11.25, 18.75, 26.25, 37.5, 52.5, 75 deg added). Since 2026-11-30 (session 13): the narrow
#: (10 mm jaw) Monte Carlo field's depth dose in Gy goes from 1.20 % to 0.88 % (8 groups alone 1.04 %,
#: 17 rings alone 1.05 %, all 48 tabulated cones with 5 groups 1.01 %), jaws 25 / 50 from 0.92 / 0.80 %
#: to 0.66 / 0.55 %, for 1.9x the transport time of a static beam (272 instead of 176 cones with
#: :data:`STATIC_N_AZIMUTH`). Helical plans keep :data:`CCC_KERNEL_NAME`: there the 8 groups and 32 terms
#: cost 1.5x the wall time and 1.5x the memory of the whole plan (3 mm liver: 28.7 -> 43.7 s, 1.54 ->
#: 2.37 GiB) and the shared direction set does not resolve the finer rings. docs/collapsed_cone.md 4h.
STATIC_CCC_KERNEL_NAME = "ccc_water_6mv_8groups_17rings"
#: default ``line_phases`` of the per-group collapsed-cone transports (sub-voxel line phases per
#: lateral axis, :func:`tomodose.transport.collapsed_cone.collapsed_cone_dose`); 1 = nearest-voxel lines.
LINE_PHASES = 1
#: default ``static_supersample`` of the collapsed-cone engine: static beams (fixed gantry and couch in
#: every projection, at most :data:`STATIC_SUPERSAMPLE_MAX_BEAMS` distinct beams) get their TERMA and
#: transport on a grid this many times finer along every axis, mass-averaged back onto the dose grid
#: (1 = off). The source of a voxel crossed by a jaw or leaf edge is then resolved inside the voxel:
#: on 2.5 mm voxels the 10 mm jaw's penumbra was too wide (10 Monte Carlo profile points failing
#: 2 %/1 mm, none with 2x); 2x takes most of the change of 3x (Monte Carlo checks within 0.05 %) for
#: 8x the cost of a static beam (docs/collapsed_cone.md section 4f). Helical plans are not refined.
#: On by default since 2026-11-29 11:30 UTC: the shipped machine file (isolated-leaf output loss, jaw
#: factors, jaw and leaf edges) was refitted with it (kernels/commission_la4.py, docs/commissioning.md);
#: with the machine fitted on the unrefined engine, 2x had moved the 2-leaf output of the 25 mm jaw to
#: +1.01 % of LA4 (section 4f).
STATIC_SUPERSAMPLE = 2
#: default ``surface_correction`` of the collapsed-cone engine: the kernel's slow (scattered-photon)
#: terms lose energy along their lines near the body's exterior (line escape fitted to the project's own
#: Monte Carlo pencil, ``tomodose/data/kernels/ccc_surface_water_6mv.json``; docs/collapsed_cone.md,
#: section "Surface correction"). On by default since 2026-11-29 (session 9), together with
#: :data:`STATIC_N_AZIMUTH` = 16 and the machine refitted with both (docs/commissioning.md, *Refit with
#: the surface correction and 16 static azimuths*); Monte Carlo and LA4 numbers in docs/dose.md.
SURFACE_CORRECTION = True
#: the surface-correction table the engine uses with ``surface_correction=True``
#: (``tomodose/data/kernels/<name>.json``): the direction-weighted line escape (energy travelling along a
#: surface escapes; fitted to the own Monte Carlo pencil, chi2/dof 2.37 vs 2.46 for the isotropic escape
#: ``ccc_surface_water_6mv``). Measured on the Monte Carlo references (docs/collapsed_cone.md 4g), the
#: isotropic escape also removes energy at the exit face (water_j50 -1 % at 170-195 mm), the
#: direction-weighted one does not (the choice between the two fitted variants used those checks).
SURFACE_TABLE = "ccc_surface_water_6mv_directional"  # = ccc_surface.DEFAULT_SURFACE_NAME
#: default ``static_n_azimuth``: cones per kernel ring of the transports of static beams (kernel tilted to
#: one point source, the calibration field included); None = the kernel's own (8). 16 removes the long
#: fan's ray effect (LA4 TPR at 20 cm) but, without :data:`SURFACE_CORRECTION`, lowers the 8-leaf Monte
#: Carlo fields by 0.3-0.5 % relative to the 64-leaf calibration field (docs/finite_phantom.md); with
#: it they stay within the Monte Carlo checks. 16 by default since 2026-11-29 (session 9), with the surface
#: correction and the refitted machine; static beams cost about 3x the 8-azimuth uncorrected transport.
#: Helical plans keep their shared direction set.
STATIC_N_AZIMUTH: int | None = 16
#: static plans with more distinct beams than this keep the dose grid (cost f**3 per beam).
STATIC_SUPERSAMPLE_MAX_BEAMS = 16
#: the refinement stops before the finest voxel side drops below this (mm): 2.5 mm -> 1.25 mm,
#: 1.5 mm stays (at 1.25 mm the Monte Carlo checks are converged to 0.05 %, section 4f).
STATIC_SUPERSAMPLE_MIN_MM = 1.0
#: ... and before the refined grid exceeds this many voxels (memory: about 150 bytes per fine
#: voxel with the 5-group kernel, i.e. about 3.6 GB here).
STATIC_SUPERSAMPLE_MAX_VOXELS = 24_000_000


def engine_kernel(kernel=None, *, static: bool = False):
    """The collapsed-cone kernel :func:`compute_dose` uses: ``kernel`` when given, else
    :data:`STATIC_CCC_KERNEL_NAME` for a static delivery (``static=True``, see :func:`is_static_delivery`)
    and :data:`CCC_KERNEL_NAME` for any other (helical, rotational)."""
    from tomodose.transport.kernels import load_kernel

    if kernel is not None:
        return kernel
    return load_kernel(STATIC_CCC_KERNEL_NAME if static else CCC_KERNEL_NAME)


def terma_energy_edges_mev(kernel) -> np.ndarray:
    """Energy-group edges (MeV) to split TERMA by for an energy-grouped kernel.

    The kernel's edges with the outer groups opened (0 and 1000 MeV), so the lowest and highest
    groups take every spectral line below and above the inner edges, whatever the spectrum.
    """
    edges = np.array(kernel.group_edges_mev, dtype=np.float64)
    edges[0], edges[-1] = 0.0, max(float(edges[-1]), 1.0e3)
    return edges


def _ccc_engine(patient: PatientModel, seq: ProjectionSequence, *, beam_model=None, kernel=None,
                progress=None, n_subsamples: int | None = None, angle_groups: int | None = None,
                grouping: str = "angle", tilt: str = "auto", shared_from_deg=DEFAULT,
                shared_directions=DEFAULT, shared_coarse_block_mm=DEFAULT, shared_coarse_directions=DEFAULT,
                line_phases=DEFAULT, static_supersample=DEFAULT, surface_correction=DEFAULT,
                static_n_azimuth=DEFAULT, timings: dict | None = None) -> np.ndarray:
    from tomodose.terma.terma import compute_terma

    check_choice("grouping", grouping, ("angle", "projection"))
    check_choice("tilt", tilt, ("auto", "source", "parallel"))
    f = STATIC_SUPERSAMPLE if static_supersample is DEFAULT else static_supersample
    _check_static_supersample(f)
    f = supersample_factor(int(f), patient.grid)
    static = is_static_delivery(seq)
    kernel = engine_kernel(kernel, static=static)
    if f > 1 and static:
        fine = supersampled_patient(patient, f)
        dose = _ccc_engine(fine, seq, beam_model=beam_model, kernel=kernel, progress=progress,
                           n_subsamples=n_subsamples, angle_groups=angle_groups, grouping=grouping, tilt=tilt,
                           shared_from_deg=shared_from_deg, shared_directions=shared_directions,
                           shared_coarse_block_mm=shared_coarse_block_mm,
                           shared_coarse_directions=shared_coarse_directions, line_phases=line_phases,
                           static_supersample=1, surface_correction=surface_correction,
                           static_n_azimuth=static_n_azimuth, timings=timings)
        if timings is not None:
            timings["static_supersample"] = f
        return block_mean_dose(dose, fine.mass_density_g_cm3, f)
    sub_kw = {} if n_subsamples is None else {"n_subsamples": n_subsamples}
    if getattr(kernel, "n_groups", 0):
        sub_kw["energy_group_edges_mev"] = terma_energy_edges_mev(kernel)
    t0 = time.perf_counter()
    if grouping == "projection":
        units = []
        for k in range(seq.n_projections):
            sub = _sub_sequence(seq, [k])
            units.append((sub, compute_terma(patient, sub, beam_model, angle_groups=1, progress=False, **sub_kw)))
        t_terma = time.perf_counter() - t0
        groups = [(sub, tr.per_group[0], tr.group_angles_deg[0], sub.couch_mm, sub.couch_travel_mm)
                  for sub, tr in units]
    else:
        tr = compute_terma(patient, seq, beam_model, angle_groups=angle_groups, progress=progress, **sub_kw)
        t_terma = time.perf_counter() - t0
        groups = _terma_groups(seq, tr)
    if timings is not None:
        timings["terma_s"] = t_terma
    return _ccc_transport(patient, groups, kernel=kernel, progress=progress, single_sources=grouping == "projection",
                          tilt=tilt, shared_from_deg=shared_from_deg, shared_directions=shared_directions,
                          shared_coarse_block_mm=shared_coarse_block_mm,
                          shared_coarse_directions=shared_coarse_directions, line_phases=line_phases,
                          surface_correction=surface_correction, static_n_azimuth=static_n_azimuth,
                          timings=timings)


def _terma_groups(seq: ProjectionSequence, tr) -> list:
    """(sequence, TERMA, angle, couch positions, couch travels) of every angle group of ``tr``."""
    groups = []
    for g in range(tr.n_groups):
        members = np.flatnonzero(tr.projection_group == g)
        groups.append((seq, tr.per_group[g], tr.group_angles_deg[g], seq.couch_mm[members],
                       seq.couch_travel_mm[members]))
    return groups


def _check_shared_options(shared_from_deg, shared_directions, shared_coarse_block_mm=DEFAULT,
                          shared_coarse_directions=DEFAULT) -> None:
    shared_from_deg = SHARED_FROM_DEG if shared_from_deg is DEFAULT else shared_from_deg
    shared_directions = SHARED_DIRECTIONS if shared_directions is DEFAULT else shared_directions
    block = SHARED_COARSE_BLOCK_MM if shared_coarse_block_mm is DEFAULT else shared_coarse_block_mm
    coarse_dirs = SHARED_COARSE_DIRECTIONS if shared_coarse_directions is DEFAULT else shared_coarse_directions
    if shared_from_deg is not None and (
            isinstance(shared_from_deg, bool) or not isinstance(shared_from_deg, (int, float, np.number))
            or not 0.0 <= float(shared_from_deg) <= 180.0):
        raise ValueError(f"shared_from_deg must be an angle in [0, 180] deg or None, got {shared_from_deg!r}")
    if isinstance(shared_directions, bool) or not isinstance(shared_directions, (int, np.integer)) \
            or shared_directions < 1:
        raise ValueError(f"shared_directions must be an integer >= 1, got {shared_directions!r}")
    if block is not None and (isinstance(block, bool) or not isinstance(block, (int, float, np.number))
                              or not np.isfinite(block) or block <= 0):
        raise ValueError(f"shared_coarse_block_mm must be None or a length > 0 mm, got {block!r}")
    if coarse_dirs is not None and (isinstance(coarse_dirs, bool) or not isinstance(coarse_dirs, (int, np.integer))
                                    or coarse_dirs < 1):
        raise ValueError(f"shared_coarse_directions must be None or an integer >= 1, got {coarse_dirs!r}")


def is_static_delivery(seq: ProjectionSequence) -> bool:
    """True when every projection has a fixed gantry and couch (no arc, no couch travel) and the
    sequence has at most :data:`STATIC_SUPERSAMPLE_MAX_BEAMS` distinct (gantry angle, couch) beams."""
    if np.any(np.asarray(seq.arc_deg) != 0) or np.any(np.asarray(seq.couch_travel_mm) != 0):
        return False
    beams = {(round(float(a), 9), round(float(c), 9)) for a, c in zip(seq.gantry_angle_deg, seq.couch_mm)}
    return len(beams) <= STATIC_SUPERSAMPLE_MAX_BEAMS


def supersample_factor(f: int, grid) -> int:
    """The refinement factor actually used for ``grid``: the largest ``f' <= f`` that keeps the
    smallest fine voxel side >= :data:`STATIC_SUPERSAMPLE_MIN_MM` and the fine grid within
    :data:`STATIC_SUPERSAMPLE_MAX_VOXELS` voxels (1 = no refinement)."""
    n_vox = int(np.prod(grid.shape))
    smallest = float(min(grid.spacing_mm))
    while f > 1 and (smallest / f < STATIC_SUPERSAMPLE_MIN_MM - 1e-9 or n_vox * f**3 > STATIC_SUPERSAMPLE_MAX_VOXELS):
        f -= 1
    return f


def supersampled_patient(patient: PatientModel, f: int) -> PatientModel:
    """``patient`` on a grid ``f`` times finer along every axis (same extent: each voxel split into
    ``f x f x f``; CT numbers repeated, so every fine voxel has its coarse voxel's density).
    Structures are not carried (the engine does not use them)."""
    from tomodose.geometry.grid import Grid

    g = patient.grid
    sp = np.asarray(g.spacing_mm, dtype=np.float64)
    fine = Grid(tuple(int(n) * f for n in g.shape), tuple(float(v) for v in sp / f),
                tuple(float(v) for v in np.asarray(g.origin_mm, dtype=np.float64) - 0.5 * (f - 1) / f * sp))
    hu = np.asarray(patient.ct.array)
    for axis in range(3):
        hu = np.repeat(hu, f, axis=axis)
    return PatientModel(ImageVolume(fine, hu, "HU"), patient_position=patient.patient_position,
                        name=patient.name, density_table=patient.density_table)


def block_mean_dose(dose, density_g_cm3, f: int) -> np.ndarray:
    """(nz, ny, nx) float32 dose of ``f x f x f`` blocks of a fine dose (nz f, ny f, nx f): the
    mass-weighted mean (energy / mass of the block; the plain mean where the block has no mass)."""
    d = np.asarray(dose, dtype=np.float64)
    rho = np.asarray(density_g_cm3, dtype=np.float64)
    shape = (d.shape[0] // f, f, d.shape[1] // f, f, d.shape[2] // f, f)
    mass = rho.reshape(shape).sum(axis=(1, 3, 5))
    energy = (rho * d).reshape(shape).sum(axis=(1, 3, 5))
    plain = d.reshape(shape).mean(axis=(1, 3, 5))
    return np.where(mass > 0, energy / np.where(mass > 0, mass, 1.0), plain).astype(np.float32)


def _check_static_supersample(value) -> None:
    value = STATIC_SUPERSAMPLE if value is DEFAULT else value
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= 4:
        raise ValueError(f"static_supersample must be an integer in [1, 4] (grid refinement factor of static "
                         f"beams; 1 = off), got {value!r}")


def _check_surface_correction(value) -> None:
    value = SURFACE_CORRECTION if value is DEFAULT else value
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"surface_correction must be a bool (collapsed-cone surface escape on/off), got {value!r}")


def _check_static_n_azimuth(value) -> None:
    value = STATIC_N_AZIMUTH if value is DEFAULT else value
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))
                              or not 1 <= value <= 256):
        raise ValueError(f"static_n_azimuth must be None (the kernel's own) or an integer in [1, 256] (cones per "
                         f"kernel ring of static beams), got {value!r}")


def _check_line_phases(line_phases) -> None:
    value = LINE_PHASES if line_phases is DEFAULT else line_phases
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= 16:
        raise ValueError(f"line_phases must be an integer in [1, 16] (sub-voxel line phases per lateral axis), "
                         f"got {value!r}")


def _coarse_factor(block_mm, grid) -> int:
    """Coarse-grid factor of the shared transport: voxels per block side (1 = no coarse grid)."""
    return 1 if block_mm is None else max(1, int(float(block_mm) // max(grid.spacing_mm)))


def _stacked_view(arrays):
    """A read-only (G, ...) float32 view of ``arrays`` when they are consecutive, equally shaped,
    C-contiguous pieces of one buffer (the TERMA result's per-group array), else None (copy them)."""
    first = arrays[0]
    owner = first.base
    if owner is None or first.dtype != np.float32 or not first.flags.c_contiguous:
        return None
    for j, a in enumerate(arrays):
        if (a.base is not owner or a.dtype != first.dtype or a.shape != first.shape or not a.flags.c_contiguous
                or a.ctypes.data != first.ctypes.data + j * first.nbytes):
            return None
    return np.lib.stride_tricks.as_strided(first, shape=(len(arrays),) + first.shape,
                                           strides=(first.nbytes,) + first.strides, writeable=False)


def _ccc_transport(patient: PatientModel, groups: list, *, kernel=None, progress=None, single_sources: bool = False,
                   tilt: str = "auto", shared_from_deg=DEFAULT, shared_directions=DEFAULT,
                   shared_coarse_block_mm=DEFAULT, shared_coarse_directions=DEFAULT, line_phases=DEFAULT,
                   surface_correction=DEFAULT, static_n_azimuth=DEFAULT, timings: dict | None = None) -> np.ndarray:
    """Collapsed-cone dose of TERMA groups (see :func:`_ccc_engine`); float32, engine units.

    ``shared_from_deg``: kernel rings at least this far from the beam (ring direction, deg) of the
    groups with a parallel-beam tilt are transported along one shared direction set
    (:func:`tomodose.transport.collapsed_cone.shared_direction_dose`, ``shared_directions``
    directions) instead of per group, when that means fewer transports (more moved cones than
    shared directions); None transports every ring per group (the reference).
    ``shared_coarse_block_mm`` / ``shared_coarse_directions``: the long-range kernel terms of the
    shared transport on a coarser grid (:data:`SHARED_COARSE_BLOCK_MM`).
    ``surface_correction`` (:data:`SURFACE_CORRECTION`): surface escape in every transport (one
    surface map of the patient for all of them). ``static_n_azimuth`` (:data:`STATIC_N_AZIMUTH`):
    cones per ring of the transports tilted to one point source (static beams).
    """
    from tomodose.transport.collapsed_cone import collapsed_cone_dose, shared_direction_dose

    check_choice("tilt", tilt, ("auto", "source", "parallel"))
    if shared_from_deg is DEFAULT:
        shared_from_deg = SHARED_FROM_DEG
    if shared_directions is DEFAULT:
        shared_directions = SHARED_DIRECTIONS
    if shared_coarse_block_mm is DEFAULT:
        shared_coarse_block_mm = SHARED_COARSE_BLOCK_MM
    if shared_coarse_directions is DEFAULT:
        shared_coarse_directions = SHARED_COARSE_DIRECTIONS
    if line_phases is DEFAULT:
        line_phases = LINE_PHASES
    if surface_correction is DEFAULT:
        surface_correction = SURFACE_CORRECTION
    if static_n_azimuth is DEFAULT:
        static_n_azimuth = STATIC_N_AZIMUTH
    kernel = engine_kernel(kernel)
    _check_shared_options(shared_from_deg, shared_directions, shared_coarse_block_mm, shared_coarse_directions)
    _check_line_phases(line_phases)
    _check_surface_correction(surface_correction)
    _check_static_n_azimuth(static_n_azimuth)
    static_kernel = kernel if static_n_azimuth is None else kernel.with_azimuths(int(static_n_azimuth))
    shared_rings = own_rings = None
    if shared_from_deg is not None:
        shared_rings = np.flatnonzero(kernel.polar_deg >= float(shared_from_deg))
        own_rings = np.flatnonzero(kernel.polar_deg < float(shared_from_deg))
    density = patient.mass_density_g_cm3
    grid = patient.grid
    dose = np.zeros(grid.shape, dtype=np.float64)
    surface_kw = {}
    if surface_correction:
        from tomodose.transport.ccc_surface import load_surface_correction, surface_maps

        corr = load_surface_correction(SURFACE_TABLE)
        ts = time.perf_counter()
        phi, normal = surface_maps(density, grid.spacing_mm, corr)  # one distance transform for both
        surface_kw = {"surface_correction": corr, "surface_weight_map": phi}
        if normal is not None:
            surface_kw["surface_normal_map"] = normal
        if timings is not None:
            timings["surface_map_s"] = time.perf_counter() - ts
    # kernel tilt of every non-empty group: toward one point source, or the group's beam direction
    plan_units = []
    for s, terma_g, angle, couches, travel in groups:
        if not terma_g.max(initial=0.0) > 0:  # no boolean copy of the group
            continue
        # one source position: a fixed beam, or one projection transported on its own (its couch
        # travel, < 1 mm, is neglected for the tilt only)
        single_source = np.ptp(couches) == 0 and (single_sources or not np.any(travel > 0))
        use_source = tilt == "source" or (tilt == "auto" and single_source)
        plan_units.append((s, terma_g, angle, couches, use_source))
    n_parallel = sum(1 for u in plan_units if not u[4])
    use_shared = (shared_rings is not None and shared_rings.size > 0
                  and n_parallel * shared_rings.size * kernel.n_azimuth > int(shared_directions))
    show = config.progress_enabled(progress)
    iterator = plan_units
    if show:
        from tqdm.auto import tqdm

        iterator = tqdm(plan_units, desc="collapsed cone", unit="angle group")
    t1 = time.perf_counter()
    per_group_s = []
    parallel_index, parallel_dirs = [], []
    for i, (s, terma_g, angle, couches, use_source) in enumerate(iterator):
        tg = time.perf_counter()
        if use_source:
            src = source_position_patient(angle, float(np.mean(couches)), s.isocentre_lps_mm, s.machine.sad_mm,
                                          s.patient_position)
            dose += collapsed_cone_dose(terma_g, density, grid, source_position_mm=src, kernel=static_kernel,
                                        line_phases=int(line_phases), progress=False, **surface_kw)
        else:
            _, _, zg = beam_axes_patient(angle, s.patient_position)
            rings = None
            if use_shared:
                rings = own_rings
                parallel_index.append(i)
                parallel_dirs.append(-zg)
            if rings is None or rings.size:
                dose += collapsed_cone_dose(terma_g, density, grid, beam_direction=-zg, kernel=kernel, rings=rings,
                                            line_phases=int(line_phases), progress=False, **surface_kw)
        per_group_s.append(time.perf_counter() - tg)
    t_shared = 0.0
    if parallel_index:
        ts = time.perf_counter()
        # the TERMA result's own (G, E, nz, ny, nx) array when the groups are its consecutive items
        # (no 0.8 GB copy on the 3 mm liver plan), else a stacked copy
        stack = _stacked_view([plan_units[i][1] for i in parallel_index])
        if stack is None:
            stack = np.empty((len(parallel_index),) + plan_units[parallel_index[0]][1].shape, dtype=np.float32)
            for j, i in enumerate(parallel_index):
                stack[j] = plan_units[i][1]
        dose += shared_direction_dose(stack, np.asarray(parallel_dirs), density, grid, kernel=kernel,
                                      rings=shared_rings, n_directions=int(shared_directions), progress=show,
                                      coarse_factor=_coarse_factor(shared_coarse_block_mm, grid),
                                      coarse_directions=shared_coarse_directions, **surface_kw)
        t_shared = time.perf_counter() - ts
    if timings is not None:
        timings.update(transport_s=time.perf_counter() - t1, n_transports=len(plan_units),
                       per_group_s=[round(v, 4) for v in per_group_s], shared_s=t_shared,
                       shared_groups=len(parallel_index))
    return dose.astype(np.float32)


def _pencil_engine(patient, seq, *, beam_model=None, kernel=None, progress=None, timings=None, **options):
    from tomodose.transport.pencil_beam import pencil_beam_dose

    t0 = time.perf_counter()
    out = pencil_beam_dose(patient, seq, beam_model, progress=progress, **options)
    if timings is not None:
        timings.update(pencil_beam_s=time.perf_counter() - t0)
    return np.asarray(out.array if isinstance(out, ImageVolume) else out, dtype=np.float32)


def _sub_sequence(seq: ProjectionSequence, index) -> ProjectionSequence:
    idx = np.asarray(index)
    return ProjectionSequence(
        gantry_angle_deg=seq.gantry_angle_deg[idx], couch_mm=seq.couch_mm[idx],
        leaf_open_fraction=seq.leaf_open_fraction[idx], duration_s=seq.duration_s[idx],
        field_width_mm=seq.field_width_mm, arc_deg=seq.arc_deg[idx], couch_travel_mm=seq.couch_travel_mm[idx],
        isocentre_lps_mm=seq.isocentre_lps_mm, patient_position=seq.patient_position, machine=seq.machine)


def _engine_dose(engine: str, patient: PatientModel, seq: ProjectionSequence, **options) -> np.ndarray:
    """Dose in engine units (no calibration)."""
    if engine == "collapsed_cone":
        return _ccc_engine(patient, seq, **options)
    return _pencil_engine(patient, seq, **options)


def compute_dose(patient: PatientModel, plan, engine: str = "collapsed_cone", *, beam_model=None, kernel=None,
                 reference=None, progress: bool | None = None, **engine_options) -> DoseResult:
    """Absolute dose (Gy per fraction) of a plan on a patient.

    Parameters
    ----------
    patient : PatientModel
        CT (HU) and structures on a DICOM LPS grid; the dose is computed on its grid.
    plan : HelicalPlan or ProjectionSequence
        The delivery. A sequence is treated as one fraction.
    engine : str
        ``"collapsed_cone"`` (default) or ``"pencil_beam"``.
    beam_model : BeamModel, optional
        Default :meth:`tomodose.terma.beam_model.BeamModel.default`.
    kernel : CollapsedConeKernel, optional
        Collapsed-cone kernel, for the plan and its calibration field (default: energy-grouped,
        :data:`STATIC_CCC_KERNEL_NAME` for a static delivery, :data:`CCC_KERNEL_NAME` otherwise; with
        a grouped kernel the TERMA is split by its energy groups, with a single kernel it is not).
    reference : ReferenceCondition, optional
        Calibration condition (default: 5 x 40 cm, SSD 850 mm, depth 15 mm, machine dose rate).
    progress : bool, optional
        Progress bars (default: ``tomodose.config.settings.progress``).
    **engine_options
        Collapsed cone: ``n_subsamples`` (TERMA default), ``angle_groups`` (51), ``grouping``
        (``"angle"``/``"projection"``), ``tilt`` (``"auto"``/``"source"``/``"parallel"``),
        ``shared_from_deg`` (default :data:`SHARED_FROM_DEG` = 0: every ring of the parallel-tilt
        (helical) groups is transported along one shared direction set, about 9x less CPU than per
        group; None: every ring per angle group, the reference; an angle: only rings at least that
        far from the beam; see ``docs/dose.md``), ``shared_directions`` (:data:`SHARED_DIRECTIONS`
        = 512), ``shared_coarse_block_mm`` (:data:`SHARED_COARSE_BLOCK_MM` = None: all terms on
        the dose grid) and ``shared_coarse_directions``. :data:`FAST_CCC_OPTIONS` is the fast
        configuration of the benchmark goal (96 + 128 directions, long-range terms on <= 7 mm
        blocks). ``static_supersample`` (:data:`STATIC_SUPERSAMPLE` = 2; 1 = off): static
        deliveries computed on an ``f`` times finer grid (fine voxels >= 1 mm, at most 24 M),
        their calibration field too. ``line_phases`` (:data:`LINE_PHASES` = 1): sub-voxel line
        phases per lateral axis of the per-group transports (cost ``n**2``; for studies).
        ``surface_correction`` (:data:`SURFACE_CORRECTION` = True): surface escape of the kernel's
        slow terms near the body's exterior in every transport, the calibration field included
        (docs/collapsed_cone.md, "Surface correction"). ``static_n_azimuth``
        (:data:`STATIC_N_AZIMUTH` = 16; None: the kernel's 8): cones per kernel ring of static beams
        (transports tilted to one point source), the calibration field included.

    Returns
    -------
    DoseResult
        ``per_fraction`` (Gy) and ``total``, with calibration and timings in ``metadata``.
    """
    from tomodose.dose.calibration import calibration_factor
    from tomodose.terma.beam_model import BeamModel

    if not isinstance(patient, PatientModel):
        raise TypeError(f"patient must be a PatientModel, got {type(patient).__name__}")
    check_choice("engine", engine, ENGINES)
    if isinstance(plan, HelicalPlan):
        seq, n_fractions = plan.projections(), plan.n_fractions
    elif isinstance(plan, ProjectionSequence):
        seq, n_fractions = plan, 1
    else:
        raise TypeError(f"plan must be a HelicalPlan or ProjectionSequence, got {type(plan).__name__}")
    if seq.patient_position != patient.patient_position:
        raise ValueError(f"plan patient_position {seq.patient_position!r} differs from the patient's "
                         f"{patient.patient_position!r}")
    if engine == "collapsed_cone":
        _check_shared_options(engine_options.get("shared_from_deg", DEFAULT),
                              engine_options.get("shared_directions", DEFAULT),
                              engine_options.get("shared_coarse_block_mm", DEFAULT),
                              engine_options.get("shared_coarse_directions", DEFAULT))
        _check_line_phases(engine_options.get("line_phases", DEFAULT))
        _check_static_supersample(engine_options.get("static_supersample", DEFAULT))
        _check_surface_correction(engine_options.get("surface_correction", DEFAULT))
        _check_static_n_azimuth(engine_options.get("static_n_azimuth", DEFAULT))
    beam_model = beam_model or BeamModel.default()
    # the calibration field is a static beam: computed with the same line phases, and supersampled
    # when this plan's static beams are (a helical plan keeps the cheaper unrefined calibration field:
    # the 2x refinement changes its calibration point by 0.008 %, docs/collapsed_cone.md section 4f)
    # the surface correction and the static beams' azimuths too: the calibration field is a static
    # beam in water, computed with the physics of the plan (a calibration made without the surface
    # escape would carry its excess into every plan)
    calib_options = {k: v for k, v in engine_options.items() if k in ("n_subsamples", "line_phases")}
    if engine == "collapsed_cone":
        sc = engine_options.get("surface_correction", DEFAULT)
        calib_options["surface_correction"] = bool(SURFACE_CORRECTION if sc is DEFAULT else sc)
        na = engine_options.get("static_n_azimuth", DEFAULT)
        calib_options["static_n_azimuth"] = STATIC_N_AZIMUTH if na is DEFAULT else na
        f = engine_options.get("static_supersample", DEFAULT)
        f = supersample_factor(STATIC_SUPERSAMPLE if f is DEFAULT else int(f), patient.grid)
        static = is_static_delivery(seq)
        calib_options["static_supersample"] = f if static else 1
        # the kernel of the plan's delivery (static or helical default), the calibration field's too
        kernel = engine_kernel(kernel, static=static)
    t0 = time.perf_counter()
    k = calibration_factor(engine, beam_model=beam_model, machine=seq.machine, kernel=kernel,
                           reference=reference, engine_options=calib_options)
    t_cal = time.perf_counter() - t0
    timings: dict = {}
    t0 = time.perf_counter()
    raw = _engine_dose(engine, patient, seq, beam_model=beam_model, kernel=kernel, progress=progress,
                       timings=timings, **engine_options)
    timings["engine_s"] = time.perf_counter() - t0
    timings["calibration_s"] = t_cal
    dose = ImageVolume(patient.grid, (raw * np.float32(k)).astype(np.float32), "Gy", "dose")
    meta = {"engine": engine, "calibration_gy_per_unit": k, "beam_model": beam_model.name,
            "n_projections": seq.n_projections, "timings_s": timings,
            "engine_options": {key: repr(v) for key, v in engine_options.items()}}
    if engine == "collapsed_cone":
        meta["kernel"] = getattr(kernel, "name", repr(kernel))
    log.info("dose (%s): max %.3f Gy per fraction in %.1f s", engine, float(dose.array.max()), timings["engine_s"])
    return DoseResult(dose, n_fractions, engine, meta)
