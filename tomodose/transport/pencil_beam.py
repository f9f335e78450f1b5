"""Pencil-beam dose engine: fast full-plan dose and per-beamlet dose.

A beamlet is one projection x one leaf. Its dose at a voxel is (see ``docs/pencil_beam.md``)::

    f * dt * (SAD / r)^2 * O(theta) * h * sum_i A_i(h * d_rad) * (1 - x_i(t)) * J_i(v) * L_i(u)

* ``A_i(z)`` depth-dependent amplitudes (cm2/g) of the pencil kernel written as a sum of
  normalised 2-D Gaussians of widths ``sigma_i`` (mm of water); derived from the same EDKnrc point
  kernels as the collapsed-cone engine by ``kernels/derive_pencil_kernels.py`` (integration of the
  polyenergetic point kernel along a pencil in water with the primary attenuation, corrected near
  the entrance surface by a Monte Carlo pencil entering water from vacuum);
* ``x_i(t)`` the kernel's exit table: relative deficit of amplitude ``i`` at a voxel whose ray
  leaves the grid ``t`` mm of water further on (missing backscatter near an exit face; Monte
  Carlo), ``t`` traced in the voxel's slice like the depth (:meth:`_Engine.exit_map`);
* ``f`` the voxel's medium factor (:func:`tomodose.terma.attenuation.mu_rho_ratio_to_water`: its
  material's spectrum-averaged mu/rho relative to water; 1 in water, 0.94 in cortical bone): the
  voxel attenuates and scatters like water of density ``rho_w = f * rho`` and, under
  charged-particle equilibrium, receives ``f`` times that water's dose, so the dose above is
  multiplied by ``f``;
* ``d_rad`` radiological depth (mm of water; water-equivalent density ``rho_w`` x path) along the
  ray from the voxel to the source, traced in the voxel's slice (longitudinal divergence neglected
  in the depth only);
* lateral spread in isocentre-plane mm ``sigma_i * SAD / (rho_i * den)`` with ``den`` the distance
  along the central axis and ``rho_i`` (clamped at ``rho_floor``) the density that scales Gaussian
  ``i``: with ``lateral_scaling="upstream"`` (default) the harmonic mean of ``rho_w`` upstream along
  the ray, weighted by ``exp(-s / sigma_i)`` in radiological distance (:meth:`_Engine.lateral_map`:
  build-down and build-up at interfaces); with ``"local"`` the voxel's own ``rho_w`` (O'Connor
  scaling, the classic pencil beam). Either is wrong across *lateral* heterogeneities (a lung beside
  the voxel): see ``docs/pencil_beam.md`` and the tests;
* ``J_i`` jaw profile, ``L_i`` leaf aperture(s) of :class:`tomodose.terma.BeamModel` convolved
  analytically with Gaussian ``i``; ``O(theta)`` off-axis fluence; ``h = 1 + s |theta|`` the
  off-axis softening of the beam model (``TERMA_soft(d) = h TERMA(h d)``);
* ``dt`` the leaf-open time (leaf weight x sample duration); continuous gantry and couch motion by
  ``n_subsamples`` equal time slices per projection (like TERMA).

Full-plan modes (``pencil_beam_dose(method=...)``): ``"exact"`` evaluates every voxel for every
projection sample; ``"clustered"`` evaluates the samples that share a beam orientation (for a helical
plan: one gantry angle, every couch position) together, once per voxel - the same model, with
everything that does not depend on the couch offset computed once - and, with a far-field step,
is the fast path (narrow Gaussians on the fine grid inside windows, the rest on coarser lattices,
interpolated); ``"fluence"`` (the fast path) tabulates the lateral profiles of each beam orientation's
samples on beam's-eye-view maps and reads every voxel near the open field from them
(:mod:`tomodose.transport.pb_fluence`); ``"windowed"`` is the older per-sample fast mode. See
``docs/pencil_beam.md``.

Units are those of TERMA convolved with the collapsed-cone kernel (``cm2/g*s``: energy per mass per
unit primary energy-fluence rate at the isocentre in air, times beam-on time), so the absolute-dose
calibration of the dose module applies in the same way (one factor per engine).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from tomodose import config
from tomodose._validate import check_in_range
from tomodose.delivery.plan import ProjectionSequence
from tomodose.geometry.frames import source_position_patient
from tomodose.geometry.grid import Grid
from tomodose.terma.attenuation import mu_rho_ratio_to_water
from tomodose.terma.beam_model import BeamModel
from tomodose.terma.terma import (
    TERMA_UNIT, assign_angle_groups, density_input, projection_samples, resolve_delivery,
)

__all__ = [
    "PencilKernel",
    "load_pencil_kernel",
    "pencil_beam_dose",
    "beamlet_dose",
    "DEFAULT_PENCIL_KERNEL",
    "DOSE_UNIT",
    "DEPTH_CACHE_MIB",
    "clear_depth_cache",
]

log = logging.getLogger(__name__)

#: shipped default kernel (``tomodose/data/kernels/<name>.npz``).
DEFAULT_PENCIL_KERNEL = "pencil_water_6mv_default"
#: unit of the returned dose arrays (same as TERMA and the collapsed-cone dose before calibration).
DOSE_UNIT = TERMA_UNIT
#: widest total Gaussian (mm, isocentre plane) evaluated directly from the leaf edges.
S_TAB_MM = 4.0
#: window of Gaussian i's upstream lateral density (``lateral_scaling="upstream"``): this factor times
#: its width ``sigma_i`` (mm of water, radiological distance; 1: the natural scale, not fitted)
LATERAL_WINDOW_SCALE = 1.0
#: the lateral scalings of the kernel (``lateral_scaling=``): by the density upstream along the ray
#: (default) or by the voxel's own (O'Connor, the classic pencil beam)
LATERAL_SCALINGS = ("upstream", "local")
#: lowest mass density (g/cm3) counted as medium for the longitudinal ends of each voxel column
#: (:func:`medium_column_ends`).
MEDIUM_MIN_DENSITY = 0.05
#: levels per octave of the aperture table.
LEVELS_PER_OCTAVE = 6
#: finest u spacing of the aperture table (mm); level q uses max(this, s_q / 8).
TABLE_STEP_MM = 0.5
#: ``method="clustered"`` with a far-field step: resolution levels (voxel step, Gaussians narrower
#: than this many mm of water); the far-field step adds the last level (all Gaussians).
DEFAULT_LEVELS = ((1, 20.0),)
#: far-field step of ``method="fluence"`` when ``far_field_step`` is not given.
FLUENCE_FAR_FIELD_STEP = 4
#: memory budget (MiB) of the radiological-depth cache shared by all calls (0 disables it). The maps
#: depend only on the density, the grid and the source position of each angle group, so repeated
#: calls on one patient and one plan geometry (an optimiser's dose evaluations with new sinograms)
#: reuse them. A liver plan on a 3 mm grid (51 angle groups x 818 444 voxels) needs 160 MiB.
DEPTH_CACHE_MIB = 512.0

_depth_cache: OrderedDict = OrderedDict()
_depth_cache_lock = threading.Lock()


def clear_depth_cache() -> None:
    """Empty the radiological-depth cache (see :data:`DEPTH_CACHE_MIB`)."""
    with _depth_cache_lock:
        _depth_cache.clear()


def _depth_cache_get(key):
    with _depth_cache_lock:
        out = _depth_cache.get(key)
        if out is not None:
            _depth_cache.move_to_end(key)
        return out


def _depth_cache_put(key, value: np.ndarray) -> None:
    """Store ``value`` if it fits in the budget, evicting (oldest first) only maps of *other*
    densities: while one patient's maps are filled in they never evict each other, so a budget
    smaller than one plan's maps caches the first groups instead of thrashing."""
    budget = float(DEPTH_CACHE_MIB) * 2**20
    with _depth_cache_lock:
        used = sum(v.nbytes for v in _depth_cache.values())
        for k in [k for k in _depth_cache if k[0] != key[0]]:
            if used + value.nbytes <= budget:
                break
            used -= _depth_cache.pop(k).nbytes
        if used + value.nbytes <= budget:
            _depth_cache[key] = value


# ---------------------------------------------------------------------------------------------
# kernel table
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class PencilKernel:
    """Depth-dependent pencil kernel in water as a sum of normalised 2-D Gaussians.

    ``p(R, z) = sum_i amplitude_cm2_g[z, i] * exp(-R^2 / (2 sigma_i^2)) / (2 pi sigma_i^2)``
    (MeV/g per MeV of pencil energy, R and sigma in cm in that formula).

    Attributes
    ----------
    name : str
    depth_mm : (nz,) float64
        Depth bin centres (mm of water), uniform spacing.
    sigma_mm : (nG,) float64
        Gaussian widths (mm of water).
    amplitude_cm2_g : (nz, nG) float64
        ``A_i(z)``: broad-beam dose contribution of Gaussian ``i`` per unit energy fluence (cm2/g).
    radius_edges_mm : (nR + 1,) float64
        Radial bins of the tabulated kernel.
    pencil_per_g : (nz, nR) float64
        Tabulated kernel (1/g) before the Gaussian fit, for validation.
    terma_cm2_g : (nz,) float64
        Primary TERMA per unit energy fluence along the pencil.
    exit_distance_mm : (nt,) float64, optional
        Exit distances (mm of water, uniform step :data:`EXIT_DT_MM` from 0) of ``exit_deficit``.
    exit_deficit : (nt, nG) float64, optional
        ``x_i(t)``: relative deficit of amplitude ``i`` at a voxel whose ray leaves the medium
        ``t`` mm of water further on (missing backscatter; the last row applies beyond the table).
        Absent: zeros (no exit correction).
    provenance : dict
    """

    name: str
    depth_mm: np.ndarray = field(repr=False)
    sigma_mm: np.ndarray = field(repr=False)
    amplitude_cm2_g: np.ndarray = field(repr=False)
    radius_edges_mm: np.ndarray = field(repr=False)
    pencil_per_g: np.ndarray = field(repr=False)
    terma_cm2_g: np.ndarray = field(repr=False)
    provenance: dict = field(default_factory=dict, repr=False)
    exit_distance_mm: np.ndarray | None = field(default=None, repr=False)
    exit_deficit: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self):
        from tomodose._kernels.pencil_beam import EXIT_DT_MM

        n_g = self.sigma_mm.size
        if self.exit_deficit is None:
            t, x = np.array([0.0, EXIT_DT_MM]), np.zeros((2, n_g))
        else:
            t = np.asarray(self.exit_distance_mm, dtype=np.float64)
            x = np.asarray(self.exit_deficit, dtype=np.float64)
            if x.ndim != 2 or x.shape[1] != n_g or t.shape != (x.shape[0],) or x.shape[0] < 2:
                raise ValueError(f"exit_deficit must be (nt >= 2, {n_g}) with exit_distance_mm (nt,), got "
                                 f"{x.shape} and {t.shape}")
            if not np.allclose(t, np.arange(t.size) * EXIT_DT_MM):
                raise ValueError(f"exit_distance_mm must be 0, {EXIT_DT_MM}, 2 x {EXIT_DT_MM}, ... mm")
            if np.any(x < 0) or np.any(x > 1):
                raise ValueError("exit_deficit must lie in [0, 1]")
        for name, a in (("exit_distance_mm", t), ("exit_deficit", np.ascontiguousarray(x))):
            a = np.array(a, dtype=np.float64)
            a.setflags(write=False)
            object.__setattr__(self, name, a)

    @property
    def dz_mm(self) -> float:
        return float(self.depth_mm[1] - self.depth_mm[0])

    @property
    def tail_ratio(self) -> np.ndarray:
        """(nG,) per-bin decay of each amplitude beyond the table (extrapolation)."""
        a = self.amplitude_cm2_g
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.where(a[-2] > 0, a[-1] / a[-2], 0.0)
        return np.clip(r, 0.0, 1.0)

    def broad_beam_cm2_g(self, depth_mm) -> np.ndarray:
        """Infinite-field depth dose per unit energy fluence (cm2/g) at ``depth_mm``."""
        return np.interp(np.asarray(depth_mm, float), self.depth_mm, self.amplitude_cm2_g.sum(axis=1))

    def radial_per_g(self, radius_mm, depth_mm: float, exit_mm: float | None = None) -> np.ndarray:
        """Gaussian-sum kernel ``p(R, z)`` (1/g) at radii ``radius_mm`` and one depth; with ``exit_mm``
        the kernel of a voxel whose ray leaves the medium that far on (exit correction)."""
        amps = np.array([np.interp(depth_mm, self.depth_mm, self.amplitude_cm2_g[:, i])
                         for i in range(self.sigma_mm.size)])
        if exit_mm is not None:
            amps = amps * (1.0 - np.array([np.interp(exit_mm, self.exit_distance_mm, self.exit_deficit[:, i])
                                           for i in range(self.sigma_mm.size)]))
        r_cm = np.asarray(radius_mm, float)[..., None] / 10.0
        s_cm = self.sigma_mm / 10.0
        return np.sum(amps * np.exp(-(r_cm**2) / (2 * s_cm**2)) / (2 * np.pi * s_cm**2), axis=-1)


@functools.lru_cache(maxsize=8)
def load_pencil_kernel(name: str = DEFAULT_PENCIL_KERNEL) -> PencilKernel:
    """Load a shipped pencil kernel (``tomodose/data/kernels/<name>.npz``) or an ``.npz`` path."""
    path = Path(str(name))
    if path.suffix == ".npz" and path.is_file():
        data = np.load(path, allow_pickle=False)
    else:
        ref = resources.files("tomodose").joinpath("data", "kernels", f"{name}.npz")
        if not ref.is_file():
            raise ValueError(f"name must be a shipped pencil kernel or an .npz path, got {name!r}")
        with resources.as_file(ref) as p:
            data = dict(np.load(p, allow_pickle=False))
    if str(data["format"]) != "tomodose-pencil-kernel":
        raise ValueError(f"kernel file {name!r} has format {str(data['format'])!r}; expected 'tomodose-pencil-kernel'")
    arrays = {}
    for key in ("depth_mm", "sigma_mm", "amplitude_cm2_g", "radius_edges_mm", "pencil_per_g", "terma_cm2_g"):
        a = np.array(data[key], dtype=np.float64)
        a.setflags(write=False)
        arrays[key] = a
    for key in ("exit_distance_mm", "exit_deficit"):
        if key in data:
            arrays[key] = np.array(data[key], dtype=np.float64)
    return PencilKernel(name=str(data["name"]), provenance=json.loads(str(data["provenance"])), **arrays)


# ---------------------------------------------------------------------------------------------
# prepared engine
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _aperture_table(e0: float, w: float, n_leaves: int, u_max: float, s_max: float):
    """Leaf apertures convolved with a ladder of Gaussian widths (see the kernel module).

    Returns ``(btab (n_leaves, n_pts), lev_off, lev_h, lev_n, log2_s0)``.
    """
    from scipy.special import ndtr

    n_lev = max(2, int(math.ceil(math.log2(max(s_max, 2 * S_TAB_MM) / S_TAB_MM) * LEVELS_PER_OCTAVE)) + 2)
    s_lev = S_TAB_MM * 2.0 ** (np.arange(n_lev) / LEVELS_PER_OCTAVE)
    h = np.maximum(TABLE_STEP_MM, s_lev / 8.0)
    n = (np.ceil(2.0 * u_max / h) + 1).astype(np.int64)
    off = np.concatenate([[0], np.cumsum(n)[:-1]]).astype(np.int64)
    edges = e0 + w * np.arange(n_leaves + 1)
    tab = np.empty((n_leaves, int(n.sum())))
    for q in range(n_lev):
        u = -u_max + h[q] * np.arange(n[q])
        cdf = ndtr((u[:, None] - edges[None, :]) / s_lev[q])  # (n_q, n_leaves + 1)
        tab[:, off[q]:off[q] + n[q]] = (cdf[:, :-1] - cdf[:, 1:]).T
    tab.setflags(write=False)
    return tab, off, h, n, math.log2(S_TAB_MM)


@dataclass
class _Engine:
    """Everything the kernels need for one (grid, projections, beam model, kernel) combination."""

    grid: Grid
    dens: np.ndarray
    projections: ProjectionSequence
    beam: BeamModel
    kernel: PencilKernel
    n_subsamples: int
    rho_floor: float
    angle_groups: int
    voxel_average: bool = True
    medium_ends: bool = True
    lateral_scaling: str = "upstream"

    def __post_init__(self):
        from tomodose._kernels.pencil_beam import phi_integral_table, phi_table

        p = self.projections
        m = p.machine
        self.sad = float(m.sad_mm)
        (self.src, self.xg, self.yg, self.zg, self.iso, self.dt, self.proj) = projection_samples(p, self.n_subsamples)
        # head-scatter output factor of the jaw setting scales every leaf-open time (1 when not commissioned)
        self.dt = self.dt * self.beam.jaw_output_factor(p.field_width_mm, m)
        self.proj_group, self.group_angles, _ = assign_angle_groups(p.gantry_angle_deg, self.angle_groups)
        n_p = p.n_projections
        self.samp_start = np.searchsorted(self.proj, np.arange(n_p)).astype(np.int64)
        self.samp_stop = np.searchsorted(self.proj, np.arange(n_p), side="right").astype(np.int64)
        g = self.grid
        self.origin = np.asarray(g.origin_mm, float)
        self.spacing = np.asarray(g.spacing_mm, float)
        # transverse extent relative to the isocentre axis
        iso_xy = np.asarray(p.isocentre_lps_mm[:2])
        xs = np.array([g.x_mm[0] - 0.5 * g.spacing_mm[0], g.x_mm[-1] + 0.5 * g.spacing_mm[0]]) - iso_xy[0]
        ys = np.array([g.y_mm[0] - 0.5 * g.spacing_mm[1], g.y_mm[-1] + 0.5 * g.spacing_mm[1]]) - iso_xy[1]
        half_diag = float(np.sqrt(np.max(xs**2) + np.max(ys**2)))
        if half_diag >= 0.9 * self.sad:
            raise ValueError(
                f"grid extends {half_diag:.0f} mm from the isocentre axis; must stay within 0.9 x SAD "
                f"({0.9 * self.sad:.0f} mm)")
        self.den_min = self.sad - half_diag
        self.u_max = self.sad * half_diag / self.den_min + 10.0
        k = self.kernel
        self.sig = np.ascontiguousarray(np.stack([k.sigma_mm, np.log2(k.sigma_mm)]))
        self.amps = np.ascontiguousarray(k.amplitude_cm2_g)
        self.tail = np.ascontiguousarray(k.tail_ratio)
        self.xtab = np.ascontiguousarray(k.exit_deficit)
        self.dz_tab = k.dz_mm
        s_max = float(k.sigma_mm.max()) * self.sad / (self.rho_floor * self.den_min)
        s_max = math.hypot(s_max, self.beam.leaf_edge_sigma_mm)
        edges = m.leaf_edges_mm()
        self.e0 = float(edges[0])
        self.w = float(m.leaf_width_mm)
        self.n_leaves = int(m.n_leaves)
        (self.btab, self.lev_off, self.lev_h, self.lev_n, self.log2_s0) = _aperture_table(
            self.e0, self.w, self.n_leaves, round(self.u_max, 3), round(s_max, 3))
        self.phi = phi_table()
        self.cphi = phi_integral_table(self.phi)
        self.jaw_h = float(self.beam.jaw_half_width_mm(p.field_width_mm, m))
        self.s_jaw = float(self.beam.jaw_penumbra_sigma_mm)
        self.s_leaf = float(self.beam.leaf_edge_sigma_mm)
        self.offc = np.asarray(self.beam.offaxis_fluence_coeffs, dtype=np.float64)
        self.soft = float(self.beam.offaxis_softening_per_rad)
        # medium composition: a voxel attenuates (and scales the kernel) like water of density rho * f,
        # and deposits f times that water's dose (mu_rho_ratio_to_water; 1 exactly in water)
        spec = self.beam.spectrum
        self.medium_factor = mu_rho_ratio_to_water(self.dens, spec.energies_mev, spec.energy_fluence)
        dens_w = self.dens * self.medium_factor
        # water-equivalent density (transposed so slices are contiguous for the depth trace)
        self.rho_t = np.ascontiguousarray(np.maximum(dens_w, self.rho_floor).transpose(1, 2, 0))
        self._dens_t = np.ascontiguousarray(dens_w.transpose(1, 2, 0))
        # the local density as a lateral map (one value for every Gaussian): lateral_scaling="local"
        self.rho_local4 = self.rho_t[..., None]
        self._lateral_last = None
        # slab of slices each sample can reach (|v| <= v_reach)
        self.v_reach_full = 1e30
        self.unit_a = np.ascontiguousarray(np.eye(self.n_leaves))
        self.zcol = medium_column_ends(self.dens, self.grid) if self.medium_ends else np.full(
            (self.grid.ny, self.grid.nx, 2), [-1e30, 1e30])

    # --- helpers ---------------------------------------------------------------------------
    def params(self):
        """Trailing kernel arguments shared by all calls."""
        return (self.sad, self.amps, self.dz_tab, self.tail, self.sig)

    def tail_params(self):
        return (self.e0, self.w, self.s_leaf, S_TAB_MM, self.lev_off, 1.0 / self.lev_h, self.lev_n, self.log2_s0,
                float(LEVELS_PER_OCTAVE), self.u_max, self.jaw_h, self.s_jaw, self.offc, self.soft, self.phi,
                self.cphi, 1.0 if self.voxel_average else 0.0, self.zcol)

    def max_half_width_mm(self) -> float:
        """Largest voxel-average half-width in the isocentre plane (0 without voxel averaging)."""
        if not self.voxel_average:
            return 0.0
        return 0.5 * float(np.linalg.norm(self.spacing)) * self.sad / self.den_min

    def half_widths_mm(self) -> tuple[float, float]:
        """Largest voxel-average half-widths (mm, at the voxel) along the leaf and jaw axes over all
        samples (:func:`tomodose._kernels.pencil_beam._half_width`); (0, 0) without voxel averaging."""
        if not self.voxel_average:
            return 0.0, 0.0
        hu = 0.5 * np.sqrt(((self.xg * self.spacing) ** 2).sum(axis=1))
        hv = 0.5 * np.sqrt(((self.yg * self.spacing) ** 2).sum(axis=1))
        return float(hu.max(initial=0.0)), float(hv.max(initial=0.0))

    def slab(self, v_reach: float):
        """(k_lo, k_hi) per sample: slices where some voxel may have |v| <= v_reach."""
        nz = self.grid.nz
        if v_reach >= 1e8:
            return np.zeros(self.src.shape[0], np.int64), np.full(self.src.shape[0], nz, np.int64)
        den_max = self.sad + (self.sad - self.den_min)
        reach = v_reach * den_max / self.sad + 0.5 * self.spacing[2] + 1e-6
        # the jaw axis is +-z for the supported positions; iso z of each sample
        zc = self.iso[:, 2]
        k_lo = np.floor((zc - reach - self.origin[2]) / self.spacing[2]).astype(np.int64)
        k_hi = np.ceil((zc + reach - self.origin[2]) / self.spacing[2]).astype(np.int64) + 1
        return np.clip(k_lo, 0, nz), np.clip(k_hi, 0, nz)

    def lateral_map(self, group: int) -> np.ndarray:
        """(ny, nx, nz, nG) float64 density (g/cm3, water-equivalent, >= ``rho_floor``) that scales each
        Gaussian laterally at each voxel for angle group ``group``: with ``lateral_scaling="upstream"``
        the harmonic mean of the density upstream along the ray, weighted by ``exp(-s / L_i)`` in
        radiological distance, ``L_i = LATERAL_WINDOW_SCALE x sigma_i``
        (:func:`tomodose._kernels.pb_lateral.upstream_density`; the last group's map is kept); with
        ``"local"`` the voxel's own density, (ny, nx, nz, 1) for every group."""
        if self.lateral_scaling == "local":
            return self.rho_local4
        if self._lateral_last is not None and self._lateral_last[0] == group:
            return self._lateral_last[1]
        from tomodose._kernels.pb_lateral import upstream_density

        p = self.projections
        src = source_position_patient(self.group_angles[group], 0.0, p.isocentre_lps_mm, self.sad, p.patient_position)
        sx, sy = float(src[0]), float(src[1])
        ox, oy = float(self.origin[0]), float(self.origin[1])
        dx, dy = float(self.spacing[0]), float(self.spacing[1])
        ny, nx, _ = self._dens_t.shape
        outside = {True: not oy <= sy <= oy + (ny - 1) * dy, False: not ox <= sx <= ox + (nx - 1) * dx}
        # sweep along the axis closer to the beam's central axis, or the other one if the source lies
        # within the first one's range
        iso = np.asarray(p.isocentre_lps_mm, float)
        prefer_y = abs(iso[1] - sy) >= abs(iso[0] - sx)
        usable = [a for a in (prefer_y, not prefer_y) if outside[a]]
        if not usable:
            raise ValueError(f"the source of angle group {group} at ({sx:.0f}, {sy:.0f}) mm lies within the grid's "
                             "x and y ranges: the upstream lateral density needs it outside one of them")
        along_y = usable[0]
        window = LATERAL_WINDOW_SCALE * np.asarray(self.kernel.sigma_mm, dtype=np.float64)
        if along_y:
            out = np.empty(self._dens_t.shape + (window.size,))
            upstream_density(self._dens_t, ox, oy, dx, dy, sx, sy, window, MEDIUM_MIN_DENSITY, out)
        else:  # sweep along x: the same kernel on the transposed slices
            dens_x = np.ascontiguousarray(self._dens_t.transpose(1, 0, 2))
            out_x = np.empty(dens_x.shape + (window.size,))
            upstream_density(dens_x, oy, ox, dy, dx, sy, sx, window, MEDIUM_MIN_DENSITY, out_x)
            out = np.ascontiguousarray(out_x.transpose(1, 0, 2, 3))
        np.maximum(out, self.rho_floor, out=out)
        self._lateral_last = (group, out)
        return out

    def depth_map(self, group: int) -> np.ndarray:
        """(ny, nx, nz) float32 radiological depth (mm water) for one angle group (read-only; from
        the cache of :data:`DEPTH_CACHE_MIB` when the same density and source were traced before)."""
        return self._traced_map(group, "depth")

    def exit_map(self, group: int) -> np.ndarray:
        """(ny, nx, nz) float32 exit distance (mm water) for one angle group: the radiological path from
        each voxel centre on, away from the group's source, to the end of the grid (in-slice trace,
        :func:`tomodose._kernels.pencil_beam.inplane_trace`; read-only, cached like the depth maps)."""
        return self._traced_map(group, "exit")

    def _traced_map(self, group: int, kind: str) -> np.ndarray:
        """In-slice trace (:func:`tomodose._kernels.pencil_beam.inplane_trace`) of ``kind`` ("depth" or
        "exit") from the source of angle group ``group``, as a read-only float32 (ny, nx, nz) map,
        through the depth cache. Every mode asks for a group's depth and then its exit map, so a
        miss traces both in one pass (unless the other is known): the other map goes to the cache,
        or, when the cache does not keep it, waits in ``_companion`` for the next request."""
        from tomodose._kernels.pencil_beam import inplane_trace

        p = self.projections
        s = source_position_patient(self.group_angles[group], 0.0, p.isocentre_lps_mm, self.sad,
                                    p.patient_position)
        sx, sy = float(s[0]), float(s[1])
        use_cache = DEPTH_CACHE_MIB > 0

        def key(k):
            return (self.density_key, sx, sy) if k == "depth" else (self.density_key, sx, sy, k)

        if use_cache:
            hit = _depth_cache_get(key(kind))
            if hit is not None:
                return hit
        companion = getattr(self, "_companion", None)
        if companion is not None and companion[0] == (group, kind):
            self._companion = None
            return companion[1]
        other = "exit" if kind == "depth" else "depth"
        want_other = not (use_cache and _depth_cache_get(key(other)) is not None)
        empty = np.empty((0, 0, 0))
        outs = {kind: np.empty(self._dens_t.shape), other: np.empty(self._dens_t.shape) if want_other else empty}
        inplane_trace(self._dens_t32, self.origin[0], self.origin[1], self.spacing[0], self.spacing[1], sx, sy,
                      outs["depth"], outs["exit"])
        result = None
        for k in ((kind, other) if want_other else (kind,)):
            m = outs[k].astype(np.float32)
            m.setflags(write=False)
            kept = False
            if use_cache:
                _depth_cache_put(key(k), m)
                kept = _depth_cache_get(key(k)) is not None
            if k == kind:
                result = m
            elif not kept:
                self._companion = ((group, k), m)
        return result

    @functools.cached_property
    def _dens_t32(self) -> np.ndarray:
        """float32 copy of the transposed density for the in-slice traces: half the memory traffic of
        the trace (sums accumulated in float64; the maps are stored in float32, so they differ from a
        float64 trace by the float32 rounding at most)."""
        return self._dens_t.astype(np.float32)

    @functools.cached_property
    def density_key(self) -> tuple:
        """Fingerprint of the density and its grid (the depth cache's key; SHA-1 of the values)."""
        digest = hashlib.sha1(memoryview(self._dens_t).cast("B")).hexdigest()
        return (digest, self._dens_t.shape, tuple(self.origin), tuple(self.spacing))


def medium_column_ends(density: np.ndarray, grid: Grid) -> np.ndarray:
    """(ny, nx, 2) LPS z (mm) of the lower and upper ends of the medium in each (y, x) column of the
    grid: the outer faces of its first and last voxel of density >= :data:`MEDIUM_MIN_DENSITY`; the
    grid's own z faces for a column without one (nothing lies beyond the grid, as for the
    collapsed cone and the Monte Carlo)."""
    nz = grid.nz
    dz = float(grid.spacing_mm[2])
    z0 = float(grid.origin_mm[2])
    med = np.asarray(density) >= MEDIUM_MIN_DENSITY
    anyv = med.any(axis=0)
    first = np.where(anyv, np.argmax(med, axis=0), 0)
    last = np.where(anyv, nz - 1 - np.argmax(med[::-1], axis=0), nz - 1)
    out = np.empty((grid.ny, grid.nx, 2))
    out[..., 0] = z0 + (first - 0.5) * dz
    out[..., 1] = z0 + (last + 0.5) * dz
    return out


def _resolve(patient_or_density, projections, beam_model, kernel, n_subsamples, rho_floor, angle_groups,
             voxel_average=True, medium_ends=True, lateral_scaling="upstream"):
    projections, beam = resolve_delivery(projections, beam_model)
    if lateral_scaling not in LATERAL_SCALINGS:
        raise ValueError(f"lateral_scaling must be one of {LATERAL_SCALINGS}, got {lateral_scaling!r}")
    if not isinstance(voxel_average, (bool, np.bool_)):
        raise TypeError(f"voxel_average must be True or False, got {voxel_average!r}")
    if not isinstance(medium_ends, (bool, np.bool_)):
        raise TypeError(f"medium_ends must be True or False, got {medium_ends!r}")
    if kernel is None:
        kernel = load_pencil_kernel()
    elif isinstance(kernel, str):
        kernel = load_pencil_kernel(kernel)
    elif not isinstance(kernel, PencilKernel):
        raise TypeError(f"kernel must be a PencilKernel or a kernel name, got {type(kernel).__name__}")
    if isinstance(n_subsamples, bool) or not isinstance(n_subsamples, (int, np.integer)) or n_subsamples < 1:
        raise ValueError(f"n_subsamples must be a positive integer, got {n_subsamples!r}")
    rho_floor = check_in_range("rho_floor", rho_floor, 1e-4, 1.0)
    machine = projections.machine
    n_groups = machine.projections_per_rotation if angle_groups is None else angle_groups
    grid, dens, _ = density_input(patient_or_density, projections)
    return _Engine(grid, dens, projections, beam, kernel, int(n_subsamples), rho_floor, n_groups, bool(voxel_average),
                   bool(medium_ends), lateral_scaling)


def _leaf_weights(engine: _Engine, leaf_model: str) -> np.ndarray:
    f = engine.projections.leaf_open_fraction
    if leaf_model == "linear":
        return np.ascontiguousarray(f, dtype=np.float64)
    if leaf_model == "beam":
        return np.ascontiguousarray(engine.beam.leaf_weights(f))
    raise ValueError(f"leaf_model must be 'beam' or 'linear', got {leaf_model!r}")


def _active_groups(engine: _Engine, a_proj: np.ndarray, progress):
    """Yield ``(group, active projections, depth map, their samples)`` for every angle group with
    an open leaf (progress bar over the groups)."""
    groups = np.unique(engine.proj_group)
    it = groups
    if config.progress_enabled(progress):
        from tqdm.auto import tqdm
        it = tqdm(groups, desc="pencil beam", unit="angle")
    for g in it:
        projs = np.flatnonzero(engine.proj_group == g)
        active = projs[np.any(a_proj[projs] > 0, axis=1)]
        if active.size == 0:
            continue
        samples = np.concatenate([np.arange(engine.samp_start[p], engine.samp_stop[p]) for p in active])
        yield g, active, engine.depth_map(int(g)), samples


def _full_dose(engine: _Engine, a_proj: np.ndarray, progress, far_field_step=None, threshold=0.0) -> np.ndarray:
    """Dose of leaf weights ``a_proj`` (n_projections, n_leaves).

    ``far_field_step=None``: every voxel x every sample (exact). Otherwise the fine grid only gets
    the contributions inside the windows of :func:`tomodose.transport.influence.beamlet_reach_mm`
    for ``threshold`` (around the open leaves and the jaws) and the rest - full minus windowed,
    evaluated at every ``far_field_step``-th voxel - is interpolated trilinearly.
    """
    from tomodose._kernels.pencil_beam import full_dose_group, node_dose_group

    grid = engine.grid
    dose = np.zeros(grid.shape)
    fast = far_field_step is not None
    if fast:
        from tomodose.transport.influence import _axis_nodes, _trilinear, beamlet_reach_mm

        r_u, r_v = beamlet_reach_mm(engine, threshold)
        widen = engine.sad / engine.den_min
        v_reach = engine.jaw_h + r_v * widen
        nz, ny, nx = grid.shape
        ks, js, is_ = (_axis_nodes(n, int(far_field_step)) for n in (nz, ny, nx))
        kk, jj, ii = np.meshgrid(ks, js, is_, indexing="ij")
        node_flat = ((kk * ny + jj) * nx + ii).ravel().astype(np.int64)
        far_full = np.zeros(node_flat.size)
        far_near = np.zeros(node_flat.size)
    else:
        v_reach = engine.v_reach_full
    k_lo, k_hi = engine.slab(v_reach)
    shape = np.asarray(grid.shape, dtype=np.int64)
    centres = engine.projections.machine.leaf_centres_mm()
    for g, active, depth, samples in _active_groups(engine, a_proj, progress):
        exit_m = engine.exit_map(int(g))
        local = np.searchsorted(active, engine.proj[samples]).astype(np.int64)
        a_g = np.ascontiguousarray(a_proj[active])
        tab_g = np.ascontiguousarray(a_g @ engine.btab)
        geo = (np.ascontiguousarray(engine.src[samples]), np.ascontiguousarray(engine.xg[samples]),
               np.ascontiguousarray(engine.yg[samples]), np.ascontiguousarray(engine.zg[samples]),
               np.ascontiguousarray(engine.dt[samples]), local, a_g, tab_g)
        free_lo = np.full(samples.size, -1e30)
        free_hi = np.full(samples.size, 1e30)
        if fast:
            open_ = a_g > 0
            first = np.argmax(open_, axis=1)
            last = open_.shape[1] - 1 - np.argmax(open_[:, ::-1], axis=1)
            reach = 0.5 * engine.w + r_u * widen
            u_lo = np.ascontiguousarray((centres[first] - reach)[local])
            u_hi = np.ascontiguousarray((centres[last] + reach)[local])
        else:
            u_lo, u_hi = free_lo, free_hi
        lat_m = engine.lateral_map(int(g))
        full_dose_group(dose, depth, exit_m, engine.xtab, lat_m, engine.origin, engine.spacing, *geo[:5],
                        geo[5], geo[6], geo[7], u_lo, u_hi, v_reach, k_lo[samples], k_hi[samples], *engine.params(),
                        *engine.tail_params())
        if fast:
            node_dose_group(far_full, node_flat, depth, exit_m, engine.xtab, lat_m, engine.origin,
                            engine.spacing, shape, *geo, free_lo, free_hi, 1e30, *engine.params(),
                            *engine.tail_params())
            node_dose_group(far_near, node_flat, depth, exit_m, engine.xtab, lat_m, engine.origin,
                            engine.spacing, shape, *geo, u_lo, u_hi, v_reach, *engine.params(), *engine.tail_params())
    if fast:
        interp = _trilinear(grid.shape, int(far_field_step))
        dose += (interp @ (far_full - far_near)).reshape(grid.shape)
    return dose


def _clusters(engine: _Engine, samples: np.ndarray):
    """Split ``samples`` into clusters sharing the beam axes and the source's (x, z) beam coordinates
    (for a helical plan: all samples of one angle group with the same gantry angle; they differ by
    the couch offset along the jaw axis only). Returns a list of index arrays into ``samples``."""
    src, xg, zg = engine.src[samples], engine.xg[samples], engine.zg[samples]
    key = np.concatenate([np.round(xg, 9), np.round(zg, 9), np.round((src * xg).sum(1), 6)[:, None],
                          np.round((src * zg).sum(1), 6)[:, None]], axis=1)
    _, inverse = np.unique(key, axis=0, return_inverse=True)
    inverse = np.asarray(inverse).ravel()
    return [np.flatnonzero(inverse == c) for c in range(int(inverse.max()) + 1)] if samples.size else []


def _cluster_geometry(engine: _Engine, a_proj: np.ndarray, s: np.ndarray, centres: np.ndarray) -> tuple:
    """Arguments ``s0 ... u_hi_p`` of :func:`tomodose._kernels.pencil_beam.cluster_dose_lattice` for
    the samples ``s`` of one cluster (see :func:`_clusters`) and leaf weights ``a_proj``."""
    s0 = np.ascontiguousarray(engine.src[s[0]])
    xg = np.ascontiguousarray(engine.xg[s[0]])
    yg = np.ascontiguousarray(engine.yg[s[0]])
    zg = np.ascontiguousarray(engine.zg[s[0]])
    t_p = np.ascontiguousarray((engine.src[s] - s0) @ yg)
    dt_p = np.ascontiguousarray(engine.dt[s], dtype=np.float64)
    a_c = np.ascontiguousarray(a_proj[engine.proj[s]], dtype=np.float64)
    from tomodose._kernels.pb_fluence import aperture_tables

    used = np.flatnonzero(a_c.any(axis=0)).astype(np.int64)  # the aperture tables of the leaves that open
    tab_c = np.empty((a_c.shape[0], engine.btab.shape[1]))
    aperture_tables(tab_c, a_c, used, engine.btab)
    open_ = a_c > 0
    first = np.argmax(open_, axis=1)
    last = open_.shape[1] - 1 - np.argmax(open_[:, ::-1], axis=1)
    u_lo = np.ascontiguousarray(centres[first] - 0.5 * engine.w)
    u_hi = np.ascontiguousarray(centres[last] + 0.5 * engine.w)
    return (s0, xg, yg, zg, t_p, dt_p, a_c, tab_c, u_lo, u_hi)


def _clustered_dose(engine: _Engine, a_proj: np.ndarray, progress, far_field_step=None, threshold=0.0,
                    levels=None) -> np.ndarray:
    """Dose of leaf weights ``a_proj`` by angle clusters (see :func:`pencil_beam_dose`, ``method="clustered"``).

    ``far_field_step=None``: every Gaussian at every voxel (the exact model, evaluated once per
    voxel and cluster). Otherwise a telescoping sum over resolution levels ``levels`` =
    ``((1, sigma_1), (step_2, sigma_2), ...)`` plus ``(far_field_step, inf)``: level ``m`` holds
    the Gaussians narrower than ``sigma_m`` inside the windows of ``threshold`` computed for them
    (the last level: all Gaussians, no window); level 0 is evaluated at every voxel, level ``m > 0``
    as (level m minus level m - 1) at every ``step_m``-th voxel, interpolated trilinearly.
    """
    from tomodose._kernels.pencil_beam import cluster_dose_lattice, trilinear_add
    from tomodose.transport.influence import _axis_nodes

    grid = engine.grid
    dose = np.zeros(grid.shape)
    n_g = int(engine.kernel.sigma_mm.size)
    no_u = 1e30
    widen = engine.sad / engine.den_min
    nz, ny, nx = grid.shape
    from tomodose._kernels.pencil_beam import MAX_DIRECT_LEAVES

    # leaves an error-function Gaussian (total width < S_TAB_MM, reach 7.5 widths + the voxel average) can touch
    if (15.0 * S_TAB_MM + 2.0 * engine.max_half_width_mm()) / engine.w + 3 > MAX_DIRECT_LEAVES:
        raise ValueError(
            f"voxels of {tuple(engine.spacing)} mm are too large for voxel_average=True in the clustered kernel "
            f"(leaf width {engine.w} mm; the profiles would span more than {MAX_DIRECT_LEAVES} leaves): use a finer "
            "grid or voxel_average=False")
    if far_field_step is None:
        spec = [(1, n_g, None)]
    else:
        from tomodose.transport.influence import beamlet_reach_mm

        spec = []
        for step, sigma in tuple(levels) + ((int(far_field_step), math.inf),):
            n_m = int(np.count_nonzero(engine.kernel.sigma_mm < sigma))
            reach = beamlet_reach_mm(engine, threshold, n_gaussians=max(n_m, 1)) if math.isfinite(sigma) else None
            spec.append((int(step), n_m, reach))
    # lattices: level 0 every voxel, level m every step-th voxel (plus the last of each axis)
    lattices = [tuple(_axis_nodes(n, step).astype(np.int64) for n in (nz, ny, nx)) for step, _, _ in spec]
    values = [np.zeros((lt[0].size, lt[1].size, lt[2].size)) for lt in lattices[1:]]
    r0 = spec[0][2]
    k_lo_all, k_hi_all = engine.slab(1e30 if r0 is None or r0[1] >= 1e8 else engine.jaw_h + r0[1] * widen)
    centres = engine.projections.machine.leaf_centres_mm()

    def window(reach):
        """(r_u, v_half, r_v) of a level's window (``NO_LIMIT``: none)."""
        if reach is None or reach[0] >= 1e8:
            return (no_u, no_u, 0.0)
        return (reach[0], engine.jaw_h, reach[1])

    for g, active, depth, samples in _active_groups(engine, a_proj, progress):
        exit_m = engine.exit_map(int(g))
        lat_m = engine.lateral_map(int(g))
        for members in _clusters(engine, samples):
            s = samples[members]
            geo = _cluster_geometry(engine, a_proj, s, centres)
            par = (*engine.params(), *engine.tail_params())
            k_lo, k_hi = int(k_lo_all[s].min()), int(k_hi_all[s].max())
            if spec[0][1] > 0 and k_hi > k_lo:
                w0 = window(spec[0][2])
                cluster_dose_lattice(dose, *lattices[0], k_lo, k_hi, depth, exit_m, engine.xtab, lat_m,
                                     engine.origin, engine.spacing, *geo, *w0, *w0, widen, 0, spec[0][1], *par)
            for m in range(1, len(spec)):
                # level m minus level m - 1 in one pass (see _cluster_row)
                cluster_dose_lattice(values[m - 1], *lattices[m], 0, nz, depth, exit_m, engine.xtab, lat_m,
                                     engine.origin, engine.spacing, *geo, *window(spec[m][2]),
                                     *window(spec[m - 1][2]), widen,
                                     spec[m - 1][1], spec[m][1], *par)
    for (ks, js, is_), vals in zip(lattices[1:], values):
        trilinear_add(dose, vals, ks, js, is_)
    return dose


def _check_levels(levels, far_field_step):
    try:
        lv = tuple((int(st), float(sg)) for st, sg in levels)
        ok = all(float(st) == float(o[0]) for st, o in zip((x[0] for x in lv), levels))
    except (TypeError, ValueError):
        ok = False
    if ok and lv:
        steps = [st for st, _ in lv] + ([int(far_field_step)] if far_field_step is not None else [])
        sig = [sg for _, sg in lv]
        ok = (steps[0] == 1 and all(b > a for a, b in zip(steps, steps[1:]))
              and all(x > 0 for x in sig) and all(b > a for a, b in zip(sig, sig[1:])))
    if not ok:
        raise ValueError(
            "levels must be ((1, sigma_1_mm), (step_2, sigma_2_mm), ...) with increasing integer steps below "
            f"far_field_step ({far_field_step}) and increasing positive widths, got {levels!r}")
    return lv


def pencil_beam_dose(patient_or_density, projections, beam_model: BeamModel | None = None, *,
                     leaf_model: str = "beam", n_subsamples: int = 1, kernel: PencilKernel | str | None = None,
                     rho_floor: float = 0.05, angle_groups: int | None = None,
                     far_field_step: int | None = None, window_threshold: float = 1e-2,
                     progress: bool | None = None, method: str | None = None,
                     levels=DEFAULT_LEVELS, voxel_average: bool = True, medium_ends: bool = True,
                     lateral_scaling: str = "upstream") -> np.ndarray:
    """Pencil-beam dose of a whole delivery, without building a matrix.

    Parameters
    ----------
    patient_or_density : PatientModel or ImageVolume
        Patient (its ``mass_density_g_cm3``) or a mass-density volume (g/cm3), DICOM LPS.
    projections : ProjectionSequence or HelicalPlan
    beam_model : BeamModel, optional
        Default :meth:`BeamModel.default`.
    leaf_model : {"beam", "linear"}
        ``"beam"``: leaf outputs of the beam model (adjacent-leaf gain, closed-leaf transmission);
        ``"linear"``: output = leaf-open fraction (the model of :func:`influence_matrix`, so that
        ``matrix @ sinogram`` reproduces this dose).
    n_subsamples : int
        Time slices per projection for continuous gantry rotation and couch motion (default 1:
        projection centre). Radiological depths use each projection's angle group.
    kernel : PencilKernel or str, optional
        Default the shipped :data:`DEFAULT_PENCIL_KERNEL`.
    rho_floor : float
        Lower clamp of the water-equivalent density used for the lateral kernel scaling (g/cm3;
        default 0.05).
    angle_groups : int, optional
        Gantry-angle bins sharing one radiological-depth map (default: projections per rotation).
    far_field_step : int, optional
        ``None`` (default): exact, every voxel x every projection. An integer ``s`` turns on the
        fast mode: the fine grid gets only the contributions inside the windows around the open
        leaves and the jaws that the influence matrix uses for ``window_threshold``, and the far
        scatter is evaluated at every ``s``-th voxel and interpolated (error in docs/pencil_beam.md).
    window_threshold : float
        Relative dose defining the fast modes' windows (default 1e-2).
    progress : bool, optional
    method : {"exact", "windowed", "clustered", "fluence"}, optional
        ``"exact"``: every voxel x every projection sample, one sample at a time (the reference).
        ``"windowed"``: the fast mode described under ``far_field_step`` (per sample).
        ``"clustered"``: the samples sharing a beam orientation (for a helical plan: one gantry
        angle, all couch positions) are evaluated together, once per voxel: the couch offset only
        moves ``v`` and the inverse square, so the depth, amplitudes, widths, off-axis terms and
        leaf profiles are computed once and the projections' leaf weights accumulated in the inner
        loop. With ``far_field_step=None`` this is the exact model (agrees with ``"exact"`` to
        rounding). With a step it is the fast path: a telescoping sum over resolution levels
        (``levels``, then ``far_field_step`` with all Gaussians and no window); errors in
        docs/pencil_beam.md. ``"fluence"``: per beam orientation, the leaf x jaw profiles of all its
        samples are tabulated once on a beam's-eye-view lattice (a few distance planes, a ladder of
        kernel widths; :mod:`tomodose.transport.pb_fluence`), and every voxel inside the window of
        the narrow Gaussians (``window_threshold``) reads its dose from them (all Gaussians); the rest
        is evaluated on every ``far_field_step``-th voxel (default 4) and interpolated, as in the fast
        path: the fastest mode (errors in docs/pencil_beam.md). Default: ``"exact"`` without
        ``far_field_step``, ``"windowed"`` with it.
    levels : tuple of (int, float)
        ``"clustered"`` with a step: ``((1, sigma_1), (step_2, sigma_2), ...)``: level ``m`` holds the
        kernel's Gaussians narrower than ``sigma_m`` (mm of water) inside the windows of
        ``window_threshold`` computed for them, evaluated at every ``step_m``-th voxel (level 0 at
        every voxel; level ``m`` as the difference to level ``m - 1``, interpolated trilinearly).
        Default :data:`DEFAULT_LEVELS`.
    voxel_average : bool
        ``True`` (default): the jaw profile and the leaf profiles (each convolved with the kernel's
        Gaussians) are averaged over the voxel's extent projected to the isocentre plane (along the
        jaw axis and across the fan, closed form), as the voxel-averaged TERMA; ``False``: sampled
        at the voxel centre (the earlier model; a helical delivery's fluence ripple then aliases on
        coarse grids, docs/pencil_beam.md).
    medium_ends : bool
        ``True`` (default): the pencils beyond the longitudinal ends of the medium
        (:func:`medium_column_ends`: the first and last voxel of density >= 0.05 g/cm3 of each
        voxel column, at most the grid's ends) cross no matter and carry no dose, so the dose near
        a phantom's end faces or the grid's ends lacks their scatter (as in the collapsed cone and
        the Monte Carlo); ``False``: the laterally infinite medium of the plain pencil beam.
    lateral_scaling : {"upstream", "local"}
        Density that scales Gaussian ``i`` of the kernel laterally: ``"upstream"`` (default) the
        harmonic mean of the water-equivalent density upstream along the ray, weighted by
        ``exp(-s / L_i)`` in radiological distance with ``L_i = sigma_i``
        (:data:`LATERAL_WINDOW_SCALE`; build-down and build-up at lung and bone interfaces); ``"local"``
        the voxel's own (the classic O'Connor scaling: the spread changes at once at an interface).
        Every method supports both (``method="fluence"`` reads each Gaussian's own width-ladder level
        with the upstream scaling instead of one shared level per voxel; one sweep per angle group
        adds about 50-90 ms per group on a 3 mm grid).

    Returns
    -------
    dose : (nz, ny, nx) float32
        Energy per mass in :data:`DOSE_UNIT` (``cm2/g*s``, the unit of TERMA), on the density grid.
    """
    t0 = time.perf_counter()
    engine = _resolve(patient_or_density, projections, beam_model, kernel, n_subsamples, rho_floor, angle_groups,
                      voxel_average, medium_ends, lateral_scaling)
    a = _leaf_weights(engine, leaf_model)
    if far_field_step is not None and (isinstance(far_field_step, bool) or not isinstance(far_field_step, (int, np.integer))
                                       or far_field_step < 1):
        raise ValueError(f"far_field_step must be None or a positive integer, got {far_field_step!r}")
    window_threshold = check_in_range("window_threshold", window_threshold, 0.0, 0.5)
    if method is None:
        method = "exact" if far_field_step is None else "windowed"
    if method not in ("exact", "windowed", "clustered", "fluence"):
        raise ValueError(f"method must be 'exact', 'windowed', 'clustered' or 'fluence', got {method!r}")
    if method == "exact" and far_field_step is not None:
        raise ValueError(f"method 'exact' takes no far_field_step, got {far_field_step!r}")
    if method == "fluence":
        from tomodose.transport.pb_fluence import fluence_dose

        if window_threshold <= 0.0:
            raise ValueError(f"method 'fluence' needs a positive window_threshold, got {window_threshold!r}")
        dose = fluence_dose(engine, a, progress, FLUENCE_FAR_FIELD_STEP if far_field_step is None else far_field_step,
                            window_threshold)
    elif method == "clustered":
        levels = _check_levels(levels, far_field_step)
        dose = _clustered_dose(engine, a, progress, far_field_step, window_threshold, levels)
    else:
        step = 6 if (method == "windowed" and far_field_step is None) else far_field_step
        dose = _full_dose(engine, a, progress, step, window_threshold)
    dose *= engine.medium_factor
    log.info("pencil beam (%s): %d projections x %d sub-samples on %s voxels in %.2f s", method,
             engine.projections.n_projections, engine.n_subsamples, engine.grid.shape, time.perf_counter() - t0)
    return dose.astype(np.float32)


def beamlet_dose(patient_or_density, projections, projection: int, leaf: int,
                 beam_model: BeamModel | None = None, *, n_subsamples: int = 1,
                 kernel: PencilKernel | str | None = None, rho_floor: float = 0.05,
                 angle_groups: int | None = None, voxel_average: bool = True,
                 medium_ends: bool = True, lateral_scaling: str = "upstream") -> np.ndarray:
    """Dose of one beamlet (projection ``projection``, leaf ``leaf``) fully open for its projection.

    Same model as :func:`pencil_beam_dose` with ``leaf_model="linear"`` and a unit leaf weight:
    the column of :func:`tomodose.transport.influence.influence_matrix` at threshold 0
    (``voxel_average``, ``medium_ends``, ``lateral_scaling`` as there).

    Returns
    -------
    (nz, ny, nx) float32 in :data:`DOSE_UNIT`.
    """
    engine = _resolve(patient_or_density, projections, beam_model, kernel, n_subsamples, rho_floor, angle_groups,
                      voxel_average, medium_ends, lateral_scaling)
    n_p = engine.projections.n_projections
    if isinstance(projection, bool) or not isinstance(projection, (int, np.integer)) or not 0 <= projection < n_p:
        raise ValueError(f"projection must be an integer in [0, {n_p - 1}], got {projection!r}")
    if isinstance(leaf, bool) or not isinstance(leaf, (int, np.integer)) or not 0 <= leaf < engine.n_leaves:
        raise ValueError(f"leaf must be an integer in [0, {engine.n_leaves - 1}], got {leaf!r}")
    a = np.zeros((n_p, engine.n_leaves))
    a[projection, leaf] = 1.0
    return (_full_dose(engine, a, False) * engine.medium_factor).astype(np.float32)
