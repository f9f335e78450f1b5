"""TERMA (total energy released per unit mass) of a tomotherapy delivery.

Normalisation
-------------
The result is the TERMA per unit **primary energy-fluence rate at the isocentre in air** on the
central axis of a fully open fan (all leaves open, jaws open, ``Psi = 1``), integrated over the
beam-on time of each projection. Units: ``cm2/g * s`` — multiply by an energy-fluence rate in
``J cm-2 s-1`` to get J/g, or by one in ``J m-2 s-1`` and by 0.1 to get Gy. The dose module
calibrates it (reference dose rate).

Physics
-------
For each projection, sub-sampled into ``n_subsamples`` equal time slices at the interpolated
gantry angle and couch position (continuous motion), every voxel centre ``P`` in the field
receives::

    T(P) += dt * Psi(u, v) * (SAD / |P - S|)^2 * sum_E ef_E h mu/rho(E, P) exp(-h sum_voxels l rho mu/rho(E, voxel))

``S`` is the source at its full 3-D position (gantry angle and couch, longitudinal divergence
included), ``Psi`` the beam model fluence of :mod:`tomodose.terma.beam_model` evaluated at the
isocentre-plane projection ``(u, v)`` of ``P``, ``ef_E`` the spectrum's energy-fluence weights,
``h`` the off-axis softening factor. The attenuation is the exact line integral from ``P`` to the
source through the voxel grid (Siddon/Jacobs traversal; outside the grid is vacuum) of the
mass density times the per-energy mu/rho of each voxel's material mixture
(:mod:`tomodose.terma.attenuation`): beam hardening falls out. **Mass density** is used (not
electron density) together with per-material mass attenuation coefficients.

Only voxels inside the jaw field (FWHM plus a 6-sigma penumbra margin, with divergence) and under
a leaf or its blurred edge with non-zero output are traced, so closed leaves cost nothing and
give exactly zero when the beam model has no transmission.

Angle groups
------------
Projections are grouped by gantry angle: ``n`` equal bins of ``360/n`` degrees whose centres
start at the first projection's angle (by default ``n`` = the machine's projections per rotation,
51, so a helical plan's projections sharing an angle mod 360 form one group). Empty groups are
dropped. ``per_group[g]`` is the TERMA of group ``g``; ``group_angles_deg[g]`` the circular mean
of its projections' angles and ``group_couch_mm[g]`` their mean couch position. The collapsed
cone engine transports each group along its representative angle.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from tomodose import config
from tomodose._validate import check_array, check_choice
from tomodose.delivery.plan import HelicalPlan, ProjectionSequence
from tomodose.geometry.frames import beam_axes_patient, couch_shift_patient, source_position_patient
from tomodose.geometry.grid import Grid, ImageVolume
from tomodose.terma.attenuation import DENSITY_ANCHORS, attenuation_table, material_weights
from tomodose.terma.beam_model import EDGE_CUTOFF_SIGMAS, BeamModel

__all__ = ["TermaResult", "compute_terma", "assign_angle_groups", "resolve_delivery", "density_input",
           "projection_samples", "TERMA_UNIT"]

log = logging.getLogger(__name__)

#: Unit of the TERMA arrays (see module docstring).
TERMA_UNIT = "cm2/g*s"
_DENSITY_UNITS = ("g/cm3", "g/cm^3", "g cm-3", "g/cc")


@dataclass(frozen=True)
class TermaResult:
    """TERMA of a delivery on a patient grid.

    Attributes
    ----------
    grid : Grid
        The density grid (DICOM LPS).
    total : (nz, ny, nx) float32
        TERMA summed over all projections (``TERMA_UNIT``).
    per_group : (n_groups, nz, ny, nx) or (n_groups, n_energy_groups, nz, ny, nx) float32
        TERMA of each gantry-angle group; sums to ``total`` (to float32 rounding). With energy
        groups (``energy_group_edges_mev`` set) the second axis splits it by energy group.
    group_angles_deg : (n_groups,) float64
        Representative IEC 61217 gantry angle of each group (deg, [0, 360)).
    group_couch_mm : (n_groups,) float64
        Mean couch position of each group's projections (mm).
    projection_group : (n_projections,) int64
        Group index of each projection.
    metadata : dict
        Unit, normalisation, spectrum, beam model, sub-sampling, timings.
    energy_group_edges_mev : (n_energy_groups + 1,) float64 or None
        Energy-group edges (MeV) of ``per_group``'s second axis: a spectral line of energy ``E``
        belongs to group ``g`` when ``edges[g] <= E < edges[g + 1]``; None without energy groups.
    """

    grid: Grid
    total: np.ndarray = field(repr=False)
    per_group: np.ndarray = field(repr=False)
    group_angles_deg: np.ndarray
    group_couch_mm: np.ndarray
    projection_group: np.ndarray = field(repr=False)
    metadata: dict = field(default_factory=dict)
    energy_group_edges_mev: np.ndarray | None = None

    @property
    def n_groups(self) -> int:
        return int(self.group_angles_deg.shape[0])

    @property
    def n_energy_groups(self) -> int:
        """Number of energy groups of ``per_group`` (0: ``per_group`` has no energy axis)."""
        return 0 if self.energy_group_edges_mev is None else int(self.energy_group_edges_mev.size - 1)

    def total_volume(self) -> ImageVolume:
        """The total TERMA as an :class:`ImageVolume`."""
        return ImageVolume(self.grid, self.total, TERMA_UNIT, "terma")


def assign_angle_groups(gantry_angle_deg, n_groups: int, couch_mm=None):
    """Group projections by gantry angle.

    Parameters
    ----------
    gantry_angle_deg : (n,) float
        Projection angles (deg).
    n_groups : int
        Number of equal angle bins over 360 deg; bin centres at ``a0 + g * 360 / n_groups`` with
        ``a0`` the first angle.
    couch_mm : (n,) float, optional

    Returns
    -------
    projection_group : (n,) int64
        Index of each projection's (non-empty) group.
    group_angles_deg : (G,) float64
        Circular mean angle of each group, in [0, 360).
    group_couch_mm : (G,) float64
        Mean couch position per group (0 when ``couch_mm`` is None).
    """
    ang = check_array("gantry_angle_deg", gantry_angle_deg, ndim=1)
    if isinstance(n_groups, bool) or not isinstance(n_groups, (int, np.integer)) or n_groups < 1:
        raise ValueError(f"angle_groups must be a positive integer, got {n_groups!r}")
    couch = np.zeros_like(ang) if couch_mm is None else check_array("couch_mm", couch_mm, shape=ang.shape)
    step = 360.0 / n_groups
    a0 = ang[0]
    raw = np.mod(np.rint(np.mod(ang - a0, 360.0) / step).astype(np.int64), n_groups)
    used, proj_group = np.unique(raw, return_inverse=True)
    rad = np.deg2rad(ang)
    g_ang = np.empty(used.size)
    g_couch = np.empty(used.size)
    for g in range(used.size):
        sel = proj_group == g
        g_ang[g] = np.mod(np.rad2deg(np.arctan2(np.sin(rad[sel]).mean(), np.cos(rad[sel]).mean())), 360.0)
        g_couch[g] = couch[sel].mean()
    return proj_group.astype(np.int64), g_ang, g_couch


def resolve_delivery(projections, beam_model):
    """Validate the delivery inputs shared by the engines.

    Returns ``(ProjectionSequence, BeamModel)``: a plan is converted with ``.projections()``,
    ``None`` gives :meth:`BeamModel.default`; anything else raises ``TypeError``.
    """
    if isinstance(projections, HelicalPlan):
        projections = projections.projections()
    if not isinstance(projections, ProjectionSequence):
        raise TypeError(f"projections must be a ProjectionSequence or HelicalPlan, got {type(projections).__name__}")
    beam = BeamModel.default() if beam_model is None else beam_model
    if not isinstance(beam, BeamModel):
        raise TypeError(f"beam_model must be a BeamModel, got {type(beam).__name__}")
    return projections, beam


def density_input(patient_or_density, projections: ProjectionSequence | None = None):
    """(grid, mass density float64 array, patient_position or None).

    With ``projections``, a patient whose ``patient_position`` differs from theirs is an error.
    """
    if isinstance(patient_or_density, ImageVolume):
        unit = patient_or_density.unit.replace(" ", "")
        if unit not in _DENSITY_UNITS:
            raise ValueError(
                f"patient_or_density must be an ImageVolume of mass density in g/cm3, got unit "
                f"{patient_or_density.unit!r} (convert CT numbers with a PatientModel first)")
        dens = patient_or_density.array
        grid = patient_or_density.grid
        position = None
    elif hasattr(patient_or_density, "mass_density_g_cm3") and hasattr(patient_or_density, "grid"):
        dens = patient_or_density.mass_density_g_cm3
        grid = patient_or_density.grid
        position = getattr(patient_or_density, "patient_position", None)
    else:
        raise TypeError(
            "patient_or_density must be a PatientModel or an ImageVolume of mass density (g/cm3), "
            f"got {type(patient_or_density).__name__}")
    dens = check_array("mass density", dens, shape=grid.shape, low=0.0)
    if projections is not None and position is not None and position != projections.patient_position:
        raise ValueError(
            f"patient_position of the patient ({position!r}) differs from that of the projections "
            f"({projections.patient_position!r})")
    return grid, dens, position


def projection_samples(projections: ProjectionSequence, n_sub: int):
    """Per-sample geometry arrays (sample order: projection-major)."""
    n = projections.n_projections
    frac = (np.arange(n_sub) + 0.5) / n_sub - 0.5
    ang = (projections.gantry_angle_deg[:, None] + projections.arc_deg[:, None] * frac[None, :]).ravel()
    couch = (projections.couch_mm[:, None] + projections.couch_travel_mm[:, None] * frac[None, :]).ravel()
    weight = np.repeat(projections.duration_s / n_sub, n_sub)
    proj = np.repeat(np.arange(n, dtype=np.int64), n_sub)
    m = projections.machine
    pp = projections.patient_position
    iso0 = projections.isocentre_lps_mm
    src = source_position_patient(ang, couch, iso0, m.sad_mm, pp)
    ex, ey, ez = beam_axes_patient(ang, pp)
    iso = np.asarray(iso0)[None, :] + couch_shift_patient(couch, pp)
    return (np.ascontiguousarray(src), np.ascontiguousarray(ex), np.ascontiguousarray(ey),
            np.ascontiguousarray(ez), np.ascontiguousarray(iso), weight, proj)


def _slabs(grid: Grid, iso, ey, v_ext_mm: float, sad_mm: float):
    """[k_lo, k_hi) of z slices that may lie inside |v| <= v_ext for each sample."""
    if not np.allclose(np.abs(ey[:, 2]), 1.0):
        raise RuntimeError("the jaw axis must be the patient z axis (head/feet-first positions only)")
    x = grid.x_mm
    y = grid.y_mm
    dx, dy, dz = grid.spacing_mm
    xs = np.array([x[0] - 0.5 * dx, x[-1] + 0.5 * dx])
    ys = np.array([y[0] - 0.5 * dy, y[-1] + 0.5 * dy])
    corner = np.sqrt(np.max((xs[None, :, None] - iso[:, 0, None, None]) ** 2
                            + (ys[None, None, :] - iso[:, 1, None, None]) ** 2, axis=(1, 2)))
    reach = v_ext_mm * (sad_mm + corner) / sad_mm + 0.5 * dz + 1e-6
    oz = grid.origin_mm[2]
    k_lo = np.floor((iso[:, 2] - reach - oz) / dz).astype(np.int64)
    k_hi = np.ceil((iso[:, 2] + reach - oz) / dz).astype(np.int64) + 1
    return np.clip(k_lo, 0, grid.nz), np.clip(k_hi, 0, grid.nz)


#: Ray-trace sharing modes of :func:`compute_terma` (finest first).
TRACE_SHARING = ("sample", "projection", "angle")
#: Fluence summation of :func:`compute_terma` (``fluence_method``).
FLUENCE_METHODS = ("exact", "maps")


def compute_terma(patient_or_density, projections, beam_model: BeamModel | None = None, *,
                  n_subsamples: int = 8, exact_subsamples: bool = False, angle_groups: int | None = None,
                  energy_group_edges_mev=None, voxel_average: bool = True, trace_sharing: str | None = None,
                  fluence_method: str | None = None, progress: bool | None = None) -> TermaResult:
    """TERMA of every projection, accumulated in total and per gantry-angle group.

    Parameters
    ----------
    patient_or_density : PatientModel or ImageVolume
        The patient (its ``mass_density_g_cm3`` on its ``grid``) or a mass-density volume
        (unit ``"g/cm3"``), DICOM LPS.
    projections : ProjectionSequence or HelicalPlan
        The delivery (a plan is converted with ``.projections()``).
    beam_model : BeamModel, optional
        Default :meth:`BeamModel.default`.
    n_subsamples : int
        Time slices per projection modelling continuous gantry rotation and couch motion
        (default 8; 1 = all at the projection centre).
    exact_subsamples : bool
        If True, every sub-sample traces its own rays (attenuation and off-axis softening at the
        sub-sample's geometry; cost x ``n_subsamples``): ``trace_sharing="sample"``. If False
        (default), the fluence, jaw and leaf profiles and inverse square are evaluated at every
        sub-sample but the attenuation along the ray is shared as ``trace_sharing`` says (see
        docs/terma.md for the size of this approximation).
    angle_groups : int, optional
        Number of equal gantry-angle bins (default: the machine's projections per rotation, 51).
    energy_group_edges_mev : (GE + 1,) array_like, optional
        Split ``per_group`` by photon energy as well: a spectral line of energy ``E`` (MeV) goes to
        group ``g`` when ``edges[g] <= E < edges[g + 1]`` (strictly increasing edges, every line
        of the spectrum inside ``[edges[0], edges[-1])``). Use the edges of an energy-grouped
        collapsed-cone kernel (``kernel.group_edges_mev``). The ray trace is shared, so the cost
        is about that of one group; the memory of ``per_group`` grows ``GE`` times.
    voxel_average : bool
        If True (default), the jaw profile is averaged over each voxel's extent along the couch
        axis and the leaf fluence over its extent across the fan (projected to the isocentre
        plane), so a voxel gets the mean fluence over its volume as a finite-volume dose engine
        needs; False samples both at the voxel centre (a sharp field edge then moves in whole
        voxel steps with depth: docs/terma.md).
    trace_sharing : {"sample", "projection", "angle"}, optional
        Which fluence samples share one ray trace (attenuation and off-axis softening; fluence and
        inverse square are always per sample). ``"sample"``: none (same as
        ``exact_subsamples=True``); ``"projection"``: the sub-samples of a projection,
        traced from the source at the projection centre; ``"angle"`` (default): every projection
        at the same gantry angle (all rotations of a helical plan, which differ by a couch shift),
        traced in the voxel's own transverse plane, i.e. at the centre of the longitudinal spread
        of the rays that reach it (about +-1 deg for the 50 mm jaw); an angle used by one
        projection only keeps the trace to that projection's centre source. Against tracing every
        sub-sample both sharings differ by the same amount (liver plan, 4.5 mm: 0.27 % of the
        maximum); ``"angle"`` traces each voxel once per angle group instead of once per
        projection (docs/terma.md, accuracy and speed).
    fluence_method : {"exact", "maps"}, optional
        How the fluence samples of a trace unit are summed at a voxel. ``"exact"``: every sample's
        jaw and leaf profiles, off-axis factor and inverse square at the voxel. ``"maps"``: the
        samples that share the gantry axes (one sub-sample of every rotation at a gantry angle)
        are summed once per grid slice on a lattice of (distance from the source, across-fan
        position) and each voxel interpolates it (bilinear): the fast path, see docs/terma.md
        ("Fluence maps") for the approximations and their measured size (3 mm liver plan: 0.02 %
        of the maximum TERMA, 0.08 % of an angle group's). Needs smooth edges
        (``leaf_edge_sigma_mm`` and ``jaw_penumbra_sigma_mm`` > 0) and ``trace_sharing``
        ``"angle"`` or ``"projection"``. Default (None): ``"maps"`` for a plan that repeats gantry
        angles (helical) with ``trace_sharing="angle"`` and a smooth beam model, ``"exact"``
        otherwise (static fields, the sharp :meth:`BeamModel.ideal` of the Monte Carlo
        comparisons). ``metadata["fluence_method"]`` records the choice.
    progress : bool, optional
        Progress bar (default: ``tomodose.config.settings.progress``).

    Returns
    -------
    TermaResult
        ``total`` (nz, ny, nx) and ``per_group`` (G, nz, ny, nx), or (G, GE, nz, ny, nx) with
        energy groups, float32 in ``TERMA_UNIT``.
    """
    from tomodose._kernels.terma import terma_units

    t_start = time.perf_counter()
    projections, beam = resolve_delivery(projections, beam_model)
    if isinstance(n_subsamples, bool) or not isinstance(n_subsamples, (int, np.integer)) or n_subsamples < 1:
        raise ValueError(f"n_subsamples must be a positive integer, got {n_subsamples!r}")
    if not isinstance(exact_subsamples, (bool, np.bool_)):
        raise TypeError(f"exact_subsamples must be a bool, got {exact_subsamples!r}")
    if not isinstance(voxel_average, (bool, np.bool_)):
        raise TypeError(f"voxel_average must be a bool, got {voxel_average!r}")
    if trace_sharing is None:
        trace_sharing = "sample" if exact_subsamples else "angle"
    check_choice("trace_sharing", trace_sharing, TRACE_SHARING)
    if exact_subsamples and trace_sharing != "sample":
        raise ValueError(f"exact_subsamples=True traces every sub-sample; it contradicts "
                         f"trace_sharing={trace_sharing!r} (give one of them)")
    if fluence_method is not None:
        check_choice("fluence_method", fluence_method, FLUENCE_METHODS)
    smooth = beam.leaf_edge_sigma_mm > 0.0 and beam.jaw_penumbra_sigma_mm > 0.0
    if fluence_method is None:
        # the maps pay off when gantry angles repeat (helical plans: one map serves every rotation)
        repeats = np.unique(np.round(np.mod(projections.gantry_angle_deg, 360.0), 6)).size < projections.n_projections
        fluence_method = "maps" if (smooth and trace_sharing == "angle" and repeats) else "exact"
    elif fluence_method == "maps":
        if trace_sharing == "sample":
            raise ValueError("fluence_method='maps' sums the samples that share a trace unit's gantry axes; "
                             "it needs trace_sharing 'angle' or 'projection', got trace_sharing='sample'")
        for name in ("leaf_edge_sigma_mm", "jaw_penumbra_sigma_mm"):
            if not getattr(beam, name) > 0.0:
                raise ValueError(f"fluence_method='maps' interpolates the fluence and needs smooth edges: "
                                 f"beam_model.{name} must be > 0, got {getattr(beam, name)!r} "
                                 f"(use fluence_method='exact')")
    machine = projections.machine
    n_groups = machine.projections_per_rotation if angle_groups is None else angle_groups
    grid, dens, _ = density_input(patient_or_density, projections)

    proj_group, g_ang, g_couch = assign_angle_groups(projections.gantry_angle_deg, n_groups, projections.couch_mm)
    spectrum = beam.spectrum.trimmed()
    table = attenuation_table()
    mu_anchor = np.ascontiguousarray(table.anchor_mu_rho(spectrum.energies_mev))
    ef = np.ascontiguousarray(spectrum.energy_fluence)
    e_edges, e_group = _energy_groups(energy_group_edges_mev, spectrum.energies_mev)
    n_ge = 1 if e_edges is None else e_edges.size - 1
    weights = material_weights(dens).reshape(-1, len(DENSITY_ANCHORS))
    rho_flat = np.ascontiguousarray(dens.ravel())
    mat_lo = np.clip(np.argmax(weights > 0, axis=1), 0, len(DENSITY_ANCHORS) - 2).astype(np.int64)
    rows = np.arange(weights.shape[0])
    mat_pair = np.ascontiguousarray(np.stack([weights[rows, mat_lo], weights[rows, mat_lo + 1]], axis=1)
                                    * rho_flat[:, None])
    del weights, rows
    air_index = [n for n, _ in DENSITY_ANCHORS].index("air")

    n_sub = int(n_subsamples)
    src, ex, ey, ez, iso, weight, proj = projection_samples(projections, n_sub)
    fw = projections.field_width_mm
    jaw_half = beam.jaw_half_width_mm(fw, machine)
    v_ext = beam.jaw_extent_mm(fw, machine)
    k_lo_s, k_hi_s = _slabs(grid, iso, ey, v_ext, machine.sad_mm)
    n_samples = src.shape[0]
    transverse = trace_sharing == "angle"
    if trace_sharing == "sample" or (n_sub == 1 and not transverse):
        # one trace unit per sample
        unit_start = np.arange(n_samples + 1, dtype=np.int64)
        t_src, t_ex, t_ez, t_iso = src, ex, ez, iso
        unit_proj = proj
        k_lo, k_hi = k_lo_s, k_hi_s
    else:
        c_src, c_ex, _, c_ez, c_iso, _, _ = projection_samples(projections, 1)
        if transverse:
            # one trace unit per gantry angle: its projections' samples made contiguous
            unit_proj, members, sizes = same_angle_units(projections.gantry_angle_deg)
            order = (members[:, None] * n_sub + np.arange(n_sub)).ravel()
            src, ex, ey, ez, iso, weight, proj = (a[order] for a in (src, ex, ey, ez, iso, weight, proj))
            k_lo_s, k_hi_s = k_lo_s[order], k_hi_s[order]
            unit_start = np.concatenate([[0], np.cumsum(sizes * n_sub)]).astype(np.int64)
        else:
            # one trace unit per projection, at the projection centre
            unit_start = np.arange(0, n_samples + 1, n_sub, dtype=np.int64)
            unit_proj = np.arange(projections.n_projections, dtype=np.int64)
        t_src, t_ex, t_ez, t_iso = c_src[unit_proj], c_ex[unit_proj], c_ez[unit_proj], c_iso[unit_proj]
        k_lo = np.minimum.reduceat(k_lo_s, unit_start[:-1])
        k_hi = np.maximum.reduceat(k_hi_s, unit_start[:-1])
    unit_group = proj_group[unit_proj]
    # a same-angle unit of one projection keeps the exact trace to its centre source
    unit_transverse = (np.diff(unit_start) > n_sub) if transverse else np.zeros(unit_start.size - 1, dtype=bool)
    # head-scatter output factor of the jaw setting (commissioned; 1 for the ideal/nominal models)
    leaf_a = np.ascontiguousarray(beam.leaf_weights(projections.leaf_open_fraction)
                                  * beam.jaw_output_factor(projections.field_width_mm, machine))
    edges = machine.leaf_edges_mm()

    total = np.zeros(grid.shape, dtype=np.float64)
    per_group = np.zeros((g_ang.size, n_ge) + grid.shape, dtype=np.float32)
    origin = np.asarray(grid.origin_mm, dtype=np.float64)
    spacing = np.asarray(grid.spacing_mm, dtype=np.float64)
    offc = np.asarray(beam.offaxis_fluence_coeffs, dtype=np.float64)
    shape = np.asarray(grid.shape, dtype=np.int64)

    n_units = unit_start.size - 1
    # kernel calls (and progress steps): one angle unit, or one rotation's units
    if transverse:
        batch, bar_unit = 1, "angle"
    else:
        batch, bar_unit = machine.projections_per_rotation * (n_sub if trace_sharing == "sample" else 1), "rotation"
    starts = range(0, n_units, batch)
    if config.progress_enabled(progress) and fluence_method == "exact":
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc="TERMA", unit=bar_unit, total=(n_units + batch - 1) // batch)
    t_kernel = time.perf_counter()
    if fluence_method == "maps":
        from tomodose.terma.terma_maps import maps_terma

        starts = range(0)  # the maps path below replaces the per-sample kernel
        maps_terma(grid, mat_lo, mat_pair, rho_flat, shape, origin, spacing, unit_start, t_src, t_ex, t_ez, t_iso,
                   unit_transverse, unit_group, k_lo, k_hi, proj, ex, ey, ez, iso, weight, leaf_a, edges,
                   float(machine.leaf_width_mm), beam, jaw_half, float(machine.sad_mm), mu_anchor, ef, e_group,
                   air_index, total, per_group, bool(voxel_average), n_sub, progress)
    for b0 in starts:
        b1 = min(b0 + batch, n_units)
        s0, s1 = int(unit_start[b0]), int(unit_start[b1])
        terma_units(mat_lo, mat_pair, rho_flat, shape, origin, spacing,
                    t_src[b0:b1], t_ex[b0:b1], t_ez[b0:b1], t_iso[b0:b1],
                    np.ascontiguousarray(unit_start[b0:b1 + 1] - s0), proj[s0:s1], unit_group[b0:b1],
                    k_lo[b0:b1], k_hi[b0:b1], src[s0:s1], ex[s0:s1], ey[s0:s1], ez[s0:s1], iso[s0:s1],
                    weight[s0:s1], leaf_a, float(edges[0]), float(machine.leaf_width_mm),
                    beam.leaf_edge_sigma_mm, jaw_half, beam.jaw_penumbra_sigma_mm, EDGE_CUTOFF_SIGMAS, offc,
                    beam.offaxis_softening_per_rad, float(machine.sad_mm), mu_anchor, ef, e_group, air_index,
                    total, per_group, bool(voxel_average), unit_transverse[b0:b1],
                    1 if trace_sharing == "sample" else n_sub)
    t_end = time.perf_counter()
    log.info("TERMA: %d projections x %d sub-samples on %s voxels in %.2f s",
             projections.n_projections, n_subsamples, grid.shape, t_end - t_start)
    meta = {
        "unit": TERMA_UNIT,
        "normalisation": "per unit primary energy-fluence rate at the isocentre in air (open fan, "
                         "central axis), integrated over beam-on time",
        "density": "mass density with NIST mu/rho of a two-anchor material mixture",
        "spectrum": spectrum.name,
        "spectrum_mean_energy_mev": spectrum.mean_energy_mev,
        "beam_model": beam.name,
        "n_subsamples": int(n_subsamples),
        "exact_subsamples": trace_sharing == "sample",
        "trace_sharing": trace_sharing,
        "n_projections": projections.n_projections,
        "angle_groups": int(n_groups),
        "field_width_mm": fw,
        "wall_time_s": t_end - t_start,
        "kernel_time_s": t_end - t_kernel,
        "energy_group_edges_mev": None if e_edges is None else e_edges.tolist(),
        "voxel_average": bool(voxel_average),
        "fluence_method": fluence_method,
    }
    if e_edges is None:
        per_group = per_group[:, 0]
    else:
        e_edges.setflags(write=False)
    for arr in (proj_group, g_ang, g_couch):
        arr.setflags(write=False)
    return TermaResult(grid=grid, total=total.astype(np.float32), per_group=per_group,
                       group_angles_deg=g_ang, group_couch_mm=g_couch, projection_group=proj_group,
                       metadata=meta, energy_group_edges_mev=e_edges)


def same_angle_units(gantry_angle_deg, tol_deg: float = 1e-6):
    """Projections grouped by gantry angle (mod 360, within ``tol_deg``), in order of first use.

    Returns
    -------
    first : (U,) int64
        The first projection of each unit.
    members : (n,) int64
        All projections, unit by unit (time order inside a unit).
    sizes : (U,) int64
        Projections per unit.
    """
    ang = np.mod(np.asarray(gantry_angle_deg, dtype=np.float64), 360.0)
    key = np.round(ang / tol_deg).astype(np.int64)
    key[key == int(round(360.0 / tol_deg))] = 0
    _, first, inverse, sizes = np.unique(key, return_index=True, return_inverse=True, return_counts=True)
    rank = np.argsort(np.argsort(first))  # unit number in order of first use
    unit_of = rank[inverse]
    members = np.argsort(unit_of, kind="stable").astype(np.int64)
    return first[np.argsort(rank)].astype(np.int64), members, sizes[np.argsort(rank)].astype(np.int64)


def _energy_groups(edges_mev, energies_mev):
    """Checked edges (or None) and the (E,) int64 energy group of each spectral line."""
    energies = np.asarray(energies_mev, dtype=np.float64)
    if edges_mev is None:
        return None, np.zeros(energies.size, dtype=np.int64)
    edges = check_array("energy_group_edges_mev", edges_mev, ndim=1, low=0.0, dtype=np.float64).copy()
    if edges.size < 2 or np.any(np.diff(edges) <= 0):
        raise ValueError(f"energy_group_edges_mev must hold >= 2 strictly increasing energies (MeV), "
                         f"got {edges.tolist()}")
    outside = (energies < edges[0]) | (energies >= edges[-1])
    if np.any(outside):
        raise ValueError(f"energy_group_edges_mev {edges.tolist()} must contain every spectral line in "
                         f"[edges[0], edges[-1]); lines outside: {energies[outside].tolist()} MeV")
    group = (np.searchsorted(edges, energies, side="right") - 1).astype(np.int64)
    return edges, group
