"""Comparison of the dose engines with stored Monte Carlo reference doses.

A reference file (HDF5, written by ``validation/generate_mc_references.py`` with ompMC) holds
one synthetic case in the engine's ideal preset: the Monte Carlo dose (Gy, per fraction of the
delivery) and its relative statistical uncertainty on axis-aligned *tally bins* (edges in DICOM
LPS mm, arrays indexed [z, y, x]), the phantom (builder name and arguments from
:mod:`tomodose.phantoms`), the full delivery (:class:`ProjectionSequence`), the spectrum and the
generation settings.

This module reads such a file (:func:`load_reference`), computes the engine dose of the same
case (:func:`engine_dose`: ``compute_dose`` with :meth:`BeamModel.ideal` and the stored
spectrum) averaged over the same bins (:func:`bin_average`: exact overlap of each engine voxel
with each bin), and compares them:

* :func:`depth_dose` / :func:`compare_depth_dose` - central-axis depth dose (mean over the central
  bins across and along the field), absolute (Gy) and normalised at 90-110 mm depth, % difference
  ``100 (engine - MC) / MC`` per depth bin; "beyond d_max" = depths >= the MC maximum;
* :func:`profile` / :func:`compare_profile` - transverse (x) and longitudinal (z) profiles at a
  depth, each normalised to its central bin; a point passes when the dose difference is
  <= ``dose_percent`` % of the central dose OR the distance to agreement (the nearest position
  where the linearly interpolated engine profile takes the MC value) is <= ``distance_mm``;
* :func:`compare_gamma` - 3-D gamma (:func:`tomodose.evaluation.gamma.gamma_index`), MC as the
  reference, 2 %/2 mm global, 10 % cut-off by default (for rotational cases whose tally bins are
  the phantom's voxels).

The Monte Carlo uncertainty of a mean over several bins is propagated assuming independent bins
(slightly optimistic: neighbouring bins share histories).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tomodose._validate import check_choice, check_positive
from tomodose.delivery.plan import ProjectionSequence
from tomodose.geometry.grid import Grid, ImageVolume

__all__ = [
    "McReference",
    "load_reference",
    "build_phantom_from_spec",
    "write_sequence",
    "read_sequence",
    "overlap_matrix",
    "bins_within",
    "bin_average",
    "engine_dose",
    "depth_dose",
    "compare_depth_dose",
    "profile",
    "compare_profile",
    "compare_gamma",
    "compare_case",
    "merge_bins",
    "HELICAL_MERGE",
    "REFERENCE_DIR",
]

log = logging.getLogger(__name__)

#: Bins merged per axis for the gamma of rotational cases (5 mm voxels -> 10 mm, mass-weighted):
#: the per-voxel Monte Carlo noise of the stored helical reference (~2 % at 5 mm) would otherwise
#: dominate a 2 %/2 mm gamma.
HELICAL_MERGE = 2

#: Folder of the stored references in a source checkout (``validation/references``).
REFERENCE_DIR = Path(__file__).resolve().parents[2] / "validation" / "references"

_SEQ_ARRAYS = ("gantry_angle_deg", "couch_mm", "leaf_open_fraction", "duration_s", "arc_deg", "couch_travel_mm")


# --------------------------------------------------------------------------------------------
# file I/O
# --------------------------------------------------------------------------------------------
def write_sequence(group, seq: ProjectionSequence) -> None:
    """Store a :class:`ProjectionSequence` in an h5py group (arrays + attributes)."""
    for name in _SEQ_ARRAYS:
        group.create_dataset(name, data=np.asarray(getattr(seq, name), dtype=np.float64), compression="gzip")
    group.attrs["field_width_mm"] = float(seq.field_width_mm)
    group.attrs["isocentre_lps_mm"] = np.asarray(seq.isocentre_lps_mm, dtype=np.float64)
    group.attrs["patient_position"] = seq.patient_position
    m = seq.machine
    group.attrs["machine"] = json.dumps({"sad_mm": m.sad_mm, "n_leaves": m.n_leaves})


def read_sequence(group) -> ProjectionSequence:
    """Inverse of :func:`write_sequence` (default :class:`TomoMachine`, whose SAD and leaf count
    must match the stored ones)."""
    from tomodose.delivery.machine import TomoMachine

    machine = TomoMachine()
    stored = json.loads(group.attrs["machine"])
    if abs(stored["sad_mm"] - machine.sad_mm) > 1e-9 or stored["n_leaves"] != machine.n_leaves:
        raise ValueError(f"reference machine {stored} differs from the default machine "
                         f"(sad_mm {machine.sad_mm}, n_leaves {machine.n_leaves})")
    kw = {name: group[name][:] for name in _SEQ_ARRAYS}
    return ProjectionSequence(field_width_mm=float(group.attrs["field_width_mm"]),
                              isocentre_lps_mm=tuple(group.attrs["isocentre_lps_mm"]),
                              patient_position=str(group.attrs["patient_position"]), machine=machine, **kw)


def build_phantom_from_spec(spec: dict):
    """Build a phantom from ``{"builder": name, "kwargs": {...}}`` (a :mod:`tomodose.phantoms` builder)."""
    from tomodose import phantoms

    builders = {"water_box": phantoms.water_box, "slab_phantom": phantoms.slab_phantom,
                "cylinder_phantom": phantoms.cylinder_phantom, "liver_phantom": phantoms.liver_phantom}
    if not isinstance(spec, dict) or "builder" not in spec:
        raise ValueError(f"phantom spec must be a dict with a 'builder' key, got {spec!r}")
    name = spec["builder"]
    check_choice("phantom builder", name, tuple(builders))
    kwargs = dict(spec.get("kwargs", {}))
    for key in ("layers", "inserts"):
        if key in kwargs:
            kwargs[key] = tuple(tuple(item) for item in kwargs[key])
    for key in ("size_mm", "lateral_size_mm", "spacing_mm"):
        if isinstance(kwargs.get(key), list):
            kwargs[key] = tuple(kwargs[key])
    return builders[name](**kwargs)


@dataclass(frozen=True, eq=False)
class McReference:
    """One stored Monte Carlo reference case (read-only arrays).

    Attributes
    ----------
    name, description : str
    x_edges_mm, y_edges_mm, z_edges_mm : ndarray
        Tally bin edges (LPS mm), strictly increasing.
    dose_gy : (nz, ny, nx) ndarray
        Monte Carlo dose in Gy per fraction of ``sequence`` (absolute calibration).
    rel_uncertainty : (nz, ny, nx) ndarray
        Relative 1-sigma statistical uncertainty per bin (0.9999999 where nothing was scored).
    density_g_cm3 : (nz, ny, nx) ndarray
        Mean mass density of the phantom in each bin, as used by the Monte Carlo.
    phantom : dict
        ``{"builder": ..., "kwargs": {...}}``.
    sequence : ProjectionSequence
    spectrum : Spectrum
    analysis : dict
        Case type (``"static"``, ``"slab"``, ``"helical"``, ``"calibration"``) and analysis points.
    settings, calibration : dict
        Generation settings (ompMC version, histories, seeds, PEGS, ECUT/PCUT, ...) and the
        absolute calibration (Gy per weight unit and its uncertainty).
    path : Path
    """

    name: str
    description: str
    x_edges_mm: np.ndarray
    y_edges_mm: np.ndarray
    z_edges_mm: np.ndarray
    dose_gy: np.ndarray
    rel_uncertainty: np.ndarray
    density_g_cm3: np.ndarray
    phantom: dict
    sequence: ProjectionSequence
    spectrum: object
    analysis: dict
    settings: dict
    calibration: dict
    path: Path

    @property
    def edges_mm(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.x_edges_mm, self.y_edges_mm, self.z_edges_mm

    @property
    def centres_mm(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return tuple(0.5 * (e[1:] + e[:-1]) for e in self.edges_mm)

    def is_uniform(self) -> bool:
        """True when every axis has equal bin widths (the bins are then a :class:`Grid`)."""
        return all(np.allclose(np.diff(e), np.diff(e)[0], rtol=0, atol=1e-6) for e in self.edges_mm)

    def grid(self) -> Grid:
        """The bins as a :class:`Grid` (uniform bins only)."""
        if not self.is_uniform():
            raise ValueError(f"reference {self.name!r} has non-uniform bins; it has no Grid")
        c = self.centres_mm
        return Grid(shape=(c[2].size, c[1].size, c[0].size),
                    spacing_mm=tuple(float(np.diff(e)[0]) for e in self.edges_mm),
                    origin_mm=(float(c[0][0]), float(c[1][0]), float(c[2][0])))

    def patient(self):
        """The phantom rebuilt from its spec; checked against the stored bin densities."""
        p = build_phantom_from_spec(self.phantom)
        rho = _bin_average_array(p.mass_density_g_cm3.astype(np.float64), p.grid, self.edges_mm)
        inside = self.density_g_cm3 > 0.05
        err = np.abs(rho - self.density_g_cm3)[inside]
        if err.size and err.max() > 0.02:
            raise ValueError(f"phantom of reference {self.name!r} rebuilt from {self.phantom} differs from the "
                             f"stored Monte Carlo densities by up to {err.max():.3f} g/cm3 (expected <= 0.02): "
                             f"the phantom builder changed since the reference was generated")
        return p


def load_reference(path) -> McReference:
    """Read a Monte Carlo reference file.

    Parameters
    ----------
    path : str or Path
        HDF5 file written by ``validation/generate_mc_references.py`` (or a case name, looked up
        in :data:`REFERENCE_DIR`).

    Returns
    -------
    McReference
    """
    import h5py

    from tomodose.terma.spectrum import Spectrum

    p = Path(path)
    if not p.suffix and not p.exists():
        p = REFERENCE_DIR / f"{p.name}.h5"
    if not p.is_file():
        raise FileNotFoundError(f"reference file {str(path)!r} does not exist")
    with h5py.File(p, "r") as h:
        if h.attrs.get("format") != "tomodose-mc-reference-1":
            raise ValueError(f"{p} is not a tomodose Monte Carlo reference (format {h.attrs.get('format')!r})")
        if "dose_gy" not in h:
            raise ValueError(f"{p} has no absolute dose (dose_gy): run the generator's calibration")
        arrays = {k: h[k][:] for k in ("x_edges_mm", "y_edges_mm", "z_edges_mm")}
        for k in ("dose_gy", "rel_uncertainty", "density_g_cm3"):
            arrays[k] = h[k][:].astype(np.float64)
        sp = h["spectrum"]
        spectrum = Spectrum(sp["energies_mev"][:], sp["fluence"][:], sp["bin_edges_mev"][:], str(sp.attrs["name"]))
        seq = read_sequence(h["delivery"])
        meta = {k: json.loads(h.attrs[k]) for k in ("phantom", "analysis", "settings", "calibration")}
        name, desc = str(h.attrs["name"]), str(h.attrs["description"])
    for a in arrays.values():
        a.setflags(write=False)
    return McReference(name=name, description=desc, spectrum=spectrum, sequence=seq, path=p, **arrays, **meta)


# --------------------------------------------------------------------------------------------
# binning
# --------------------------------------------------------------------------------------------
def overlap_matrix(edges_mm, centres_mm, spacing_mm: float) -> np.ndarray:
    """(n_bins, n_voxels) fraction of each bin covered by each voxel (voxel = centre +- spacing/2).

    A row sums to the covered fraction of the bin (1 inside the grid). Used to average a voxel
    dose (piecewise constant) over arbitrary axis-aligned bins.
    """
    e = np.asarray(edges_mm, dtype=np.float64)
    c = np.asarray(centres_mm, dtype=np.float64)
    lo, hi = c - 0.5 * spacing_mm, c + 0.5 * spacing_mm
    ov = np.clip(np.minimum(e[1:, None], hi[None, :]) - np.maximum(e[:-1, None], lo[None, :]), 0.0, None)
    return ov / np.diff(e)[:, None]


def _bin_average_array(array, grid: Grid, edges_mm) -> np.ndarray:
    mats = [overlap_matrix(edges_mm[a], grid.axis_mm("xyz"[a]), grid.spacing_mm[a]) for a in range(3)]
    out = np.einsum("kc,cba->kba", mats[2], array)
    out = np.einsum("jb,kba->kja", mats[1], out)
    return np.einsum("ia,kja->kji", mats[0], out)


def bin_average(volume: ImageVolume, edges_mm) -> np.ndarray:
    """Mean of a voxel quantity over axis-aligned bins.

    Parameters
    ----------
    volume : ImageVolume
        Any scalar field on a uniform LPS grid (voxel values = voxel means).
    edges_mm : (x_edges, y_edges, z_edges)
        Bin edges (mm, LPS), each strictly increasing.

    Returns
    -------
    (nbz, nby, nbx) ndarray
        Volume-weighted mean of the voxels overlapping each bin (parts of a bin outside the grid
        count as 0).
    """
    if not isinstance(volume, ImageVolume):
        raise TypeError(f"volume must be an ImageVolume, got {type(volume).__name__}")
    if len(edges_mm) != 3:
        raise ValueError(f"edges_mm must hold three edge arrays (x, y, z), got {len(edges_mm)}")
    for a, e in zip("xyz", edges_mm):
        e = np.asarray(e, dtype=np.float64)
        if e.ndim != 1 or e.size < 2 or np.any(np.diff(e) <= 0):
            raise ValueError(f"{a} edges must be a strictly increasing 1-D array of >= 2 values, got {e!r}")
    return _bin_average_array(np.asarray(volume.array, dtype=np.float64), volume.grid, edges_mm)


def bins_within(edges_mm, lo_mm: float, hi_mm: float) -> np.ndarray:
    """Indices of the bins lying entirely within [lo_mm, hi_mm] (1 um tolerance)."""
    e = np.asarray(edges_mm, dtype=np.float64)
    return np.flatnonzero((e[:-1] >= lo_mm - 1e-3) & (e[1:] <= hi_mm + 1e-3))


def _central_bin(edges_mm) -> np.ndarray:
    e = np.asarray(edges_mm, dtype=np.float64)
    i = int(np.searchsorted(e, 0.0, side="right") - 1)
    return np.array([i])


def _wmean(values, sigmas, weights, axes):
    w = weights / weights.sum(axis=axes, keepdims=True)
    mean = (values * w).sum(axis=axes)
    sig = np.sqrt(((sigmas * values * w) ** 2).sum(axis=axes))
    return mean, sig


# --------------------------------------------------------------------------------------------
# engine side
# --------------------------------------------------------------------------------------------
def engine_dose(ref: McReference, engine: str = "collapsed_cone", *, kernel=None, progress: bool | None = None,
                **engine_options) -> np.ndarray:
    """Engine dose (Gy per fraction) of the reference's case, averaged over its tally bins.

    Parameters
    ----------
    ref : McReference
    engine : str
        ``"collapsed_cone"`` or ``"pencil_beam"`` (see :func:`tomodose.dose.compute_dose`).
    kernel : optional
        Collapsed-cone kernel (default: the shipped one).
    **engine_options
        Passed to :func:`compute_dose` (e.g. ``n_subsamples``).

    Returns
    -------
    (nbz, nby, nbx) ndarray
        Engine dose on the reference bins (Gy), with the beam model :meth:`BeamModel.ideal` and
        the reference's spectrum, calibrated at the nominal condition (as the Monte Carlo).
    """
    from tomodose.dose import ReferenceCondition, compute_dose
    from tomodose.dose.engine import ENGINES
    from tomodose.terma.beam_model import BeamModel

    if not isinstance(ref, McReference):
        raise TypeError(f"ref must be an McReference, got {type(ref).__name__}")
    check_choice("engine", engine, ENGINES)
    patient = ref.patient()
    # the Monte Carlo is calibrated at the nominal condition (5 x 40 cm, SSD 850 mm, 15 mm depth,
    # validation/generate_mc_references.py), so the engine is too: the comparison is of the
    # ideal-preset physics, not of the machine's calibration transfer
    res = compute_dose(patient, ref.sequence, engine, beam_model=BeamModel.ideal(ref.spectrum), kernel=kernel,
                       reference=ReferenceCondition.nominal(), progress=progress, **engine_options)
    return bin_average(res.per_fraction, ref.edges_mm)


# --------------------------------------------------------------------------------------------
# comparisons
# --------------------------------------------------------------------------------------------
def _surface(ref: McReference) -> float:
    s = ref.analysis.get("surface_mm")
    if s is None:
        raise ValueError(f"reference {ref.name!r} ({ref.analysis.get('type')}) has no depth axis (surface_mm)")
    return float(s)


def depth_dose(ref: McReference, dose=None) -> dict:
    """Central-axis depth dose (mean over the central x and z bins) of a static case.

    Parameters
    ----------
    ref : McReference
    dose : (nbz, nby, nbx) array, optional
        A dose on the reference bins (e.g. from :func:`engine_dose`); default the Monte Carlo.

    Returns
    -------
    dict
        ``depth_mm`` (bin centres below the surface), ``dose_gy``, ``sigma_gy`` (MC only, else
        zeros), ``width_mm`` (bin widths along the depth).
    """
    d = ref.dose_gy if dose is None else np.asarray(dose, dtype=np.float64)
    if d.shape != ref.dose_gy.shape:
        raise ValueError(f"dose must have the reference's bin shape {ref.dose_gy.shape}, got {d.shape}")
    xe, ye, ze = ref.edges_mm
    ix, iz = _central_bin(xe), _central_bin(ze)
    sub = d[np.ix_(iz, np.arange(ye.size - 1), ix)]
    u = ref.rel_uncertainty[np.ix_(iz, np.arange(ye.size - 1), ix)] if dose is None else np.zeros_like(sub)
    w = np.einsum("k,j,i->kji", np.diff(ze)[iz], np.ones(ye.size - 1), np.diff(xe)[ix])
    mean, sig = _wmean(sub, u, w, (0, 2))
    yc = 0.5 * (ye[1:] + ye[:-1])
    return {"depth_mm": yc - _surface(ref), "dose_gy": mean, "sigma_gy": sig, "width_mm": np.diff(ye)}


def compare_depth_dose(ref: McReference, evaluated, *, normalise_mm=(90.0, 110.0), max_depth_mm: float | None = None
                       ) -> dict:
    """Depth-dose comparison, absolute and normalised.

    Parameters
    ----------
    ref : McReference
    evaluated : (nbz, nby, nbx) array
        Engine dose on the reference bins (Gy).
    normalise_mm : (2,) float
        Depth range (mm) whose mean normalises each curve for the relative comparison.
    max_depth_mm : float, optional
        Ignore bins deeper than this (default: all).

    Returns
    -------
    dict
        ``depth_mm``, ``mc_gy``, ``mc_sigma_gy``, ``engine_gy``, ``diff_abs_pct`` (engine vs MC in
        Gy, % of the local MC dose), ``diff_rel_pct`` (both normalised over ``normalise_mm``),
        ``dmax_mm`` (MC), ``beyond`` (bool mask: depth >= d_max), and summaries
        ``max_abs_beyond_pct``, ``max_rel_beyond_pct``, ``mean_abs_beyond_pct``,
        ``mean_rel_beyond_pct``, ``mc_sigma_beyond_pct`` (largest MC 1-sigma beyond d_max).
    """
    mc = depth_dose(ref)
    ev = depth_dose(ref, evaluated)
    z = mc["depth_mm"]
    keep = np.ones(z.size, bool) if max_depth_mm is None else z <= max_depth_mm
    sel = (z >= normalise_mm[0]) & (z <= normalise_mm[1])
    if not sel.any():
        raise ValueError(f"normalise_mm {normalise_mm} holds no depth bin")
    n_mc = np.average(mc["dose_gy"][sel], weights=mc["width_mm"][sel])
    n_ev = np.average(ev["dose_gy"][sel], weights=mc["width_mm"][sel])
    diff_abs = 100.0 * (ev["dose_gy"] - mc["dose_gy"]) / mc["dose_gy"]
    diff_rel = 100.0 * ((ev["dose_gy"] / n_ev) / (mc["dose_gy"] / n_mc) - 1.0)
    dmax = float(z[np.argmax(np.where(keep, mc["dose_gy"], -np.inf))])
    beyond = keep & (z >= dmax)
    sig_pct = 100.0 * mc["sigma_gy"] / mc["dose_gy"]
    return {"depth_mm": z, "mc_gy": mc["dose_gy"], "mc_sigma_gy": mc["sigma_gy"], "engine_gy": ev["dose_gy"],
            "diff_abs_pct": diff_abs, "diff_rel_pct": diff_rel, "dmax_mm": dmax, "beyond": beyond,
            "max_abs_beyond_pct": float(np.max(np.abs(diff_abs[beyond]))),
            "max_rel_beyond_pct": float(np.max(np.abs(diff_rel[beyond]))),
            "mean_abs_beyond_pct": float(np.mean(diff_abs[beyond])),
            "mean_rel_beyond_pct": float(np.mean(diff_rel[beyond])),
            "mc_sigma_beyond_pct": float(np.max(sig_pct[beyond]))}


def profile(ref: McReference, axis: str, depth_mm: float, dose=None, *, half_width_mm: float | None = None) -> dict:
    """Profile along ``axis`` ("x" across the fan, "z" along the couch) at a depth.

    Mean over the depth bins within ``depth_mm +- half_width_mm`` (default 5 mm above 30 mm
    depth, where the bins are 2.5 mm, and 10 mm deeper, to halve the Monte Carlo noise; the
    divergence moves a field edge by < 0.6 mm over such a window, identically for both doses)
    and the central bin of the other lateral axis; normalised to the central bin of the profile.

    Returns
    -------
    dict
        ``pos_mm`` (bin centres), ``width_mm``, ``dose`` (relative), ``sigma`` (MC only),
        ``centre_gy`` (dose of the central bin, Gy).
    """
    check_choice("axis", axis, ("x", "z"))
    d = ref.dose_gy if dose is None else np.asarray(dose, dtype=np.float64)
    if d.shape != ref.dose_gy.shape:
        raise ValueError(f"dose must have the reference's bin shape {ref.dose_gy.shape}, got {d.shape}")
    xe, ye, ze = ref.edges_mm
    s = _surface(ref)
    if half_width_mm is None:
        half_width_mm = 5.0 if depth_mm < 30.0 else 10.0
    iy = bins_within(ye, s + depth_mm - half_width_mm, s + depth_mm + half_width_mm)
    if iy.size == 0:
        raise ValueError(f"no depth bin lies within {depth_mm} +- {half_width_mm} mm")
    u = ref.rel_uncertainty if dose is None else np.zeros_like(d)
    if axis == "x":
        iz = _central_bin(ze)
        sub, su = d[np.ix_(iz, iy, np.arange(xe.size - 1))], u[np.ix_(iz, iy, np.arange(xe.size - 1))]
        w = np.einsum("k,j,i->kji", np.diff(ze)[iz], np.diff(ye)[iy], np.ones(xe.size - 1))
        e = xe
    else:
        ix = _central_bin(xe)
        sub, su = d[np.ix_(np.arange(ze.size - 1), iy, ix)], u[np.ix_(np.arange(ze.size - 1), iy, ix)]
        sub, su = sub.transpose(2, 1, 0), su.transpose(2, 1, 0)
        w = np.einsum("k,j,i->kji", np.diff(xe)[ix], np.diff(ye)[iy], np.ones(ze.size - 1))
        e = ze
    mean, sig = _wmean(sub, su, w, (0, 1))
    c = int(_central_bin(e)[0])
    return {"pos_mm": 0.5 * (e[1:] + e[:-1]), "width_mm": np.diff(e), "dose": mean / mean[c],
            "sigma": sig / mean[c], "centre_gy": float(mean[c])}


def _dta_mm(pos, ev, target, x0, max_mm=10.0, step=0.05):
    """Distance from x0 to the nearest point where the linear interpolant of ev equals target."""
    xs = np.arange(max(pos[0], x0 - max_mm), min(pos[-1], x0 + max_mm) + step / 2, step)
    f = np.interp(xs, pos, ev) - target
    cross = np.flatnonzero(np.sign(f[:-1]) != np.sign(f[1:]))
    exact = np.flatnonzero(f == 0)
    cand = []
    for i in cross:
        t = f[i] / (f[i] - f[i + 1])
        cand.append(xs[i] + t * step)
    cand += list(xs[exact])
    return float(np.min(np.abs(np.asarray(cand) - x0))) if cand else np.inf


def compare_profile(ref: McReference, evaluated, axis: str, depth_mm: float, *, dose_percent: float = 2.0,
                    distance_mm: float = 1.0, max_bin_mm: float = 5.0, min_dose: float = 0.0) -> dict:
    """Profile comparison: dose difference (% of the central dose) OR distance to agreement.

    Parameters
    ----------
    ref : McReference
    evaluated : (nbz, nby, nbx) array
        Engine dose on the reference bins.
    axis : {"x", "z"}
    depth_mm : float
    dose_percent, distance_mm : float
        Criteria (> 0).
    max_bin_mm : float
        Only bins no wider than this are evaluated (the coarse outer bins are skipped).
    min_dose : float
        Only points where the MC relative dose is >= this are evaluated.

    Returns
    -------
    dict
        ``pos_mm``, ``mc``, ``mc_sigma``, ``engine`` (relative profiles), ``dd_pct``,
        ``dta_mm``, ``passed`` (bool per point, NaN-free), ``evaluated`` (mask),
        ``pass_rate_pct``, ``n_fail``, ``max_dd_in_field_pct`` (largest |dose difference| where
        MC >= 80 %), ``worst`` (position of the largest failing min(dd/crit, dta/crit)).
    """
    check_positive("dose_percent", dose_percent)
    check_positive("distance_mm", distance_mm)
    mc = profile(ref, axis, depth_mm)
    ev = profile(ref, axis, depth_mm, evaluated)
    pos = mc["pos_mm"]
    fine = (mc["width_mm"] <= max_bin_mm + 1e-6) & (mc["dose"] >= min_dose)
    dd = 100.0 * (ev["dose"] - mc["dose"])
    dta = np.array([_dta_mm(pos, ev["dose"], mc["dose"][i], pos[i]) if fine[i] else np.nan
                    for i in range(pos.size)])
    ok = (np.abs(dd) <= dose_percent) | (dta <= distance_mm)
    passed = np.where(fine, ok, True)
    infield = fine & (mc["dose"] >= 0.8)
    score = np.where(fine, np.minimum(np.abs(dd) / dose_percent, dta / distance_mm), 0.0)
    return {"pos_mm": pos, "mc": mc["dose"], "mc_sigma": mc["sigma"], "engine": ev["dose"], "dd_pct": dd,
            "dta_mm": dta, "passed": passed, "evaluated": fine,
            "pass_rate_pct": float(100.0 * passed[fine].mean()), "n_fail": int((~passed[fine]).sum()),
            "max_dd_in_field_pct": float(np.max(np.abs(dd[infield]))) if infield.any() else 0.0,
            "worst": {"pos_mm": float(pos[int(np.argmax(score))]), "score": float(score.max())},
            "centre_ratio": ev["centre_gy"] / mc["centre_gy"]}


def merge_bins(ref: McReference, dose, factor: int):
    """Merge ``factor**3`` neighbouring bins of a uniform reference into one (mass-weighted).

    The merged dose is energy over mass, ``sum(rho_i D_i) / sum(rho_i)``, with the Monte Carlo
    densities (so air sub-bins, whose Monte Carlo dose to air is mostly noise, carry almost no
    weight); the relative uncertainty is propagated assuming independent bins. Trailing bins
    that do not fill a whole block are dropped.

    Returns
    -------
    grid : Grid
    dose : (nz', ny', nx') ndarray
    rel_uncertainty : ndarray (of the Monte Carlo; zeros when ``dose`` is not the MC's)
    density : ndarray (mean density of the merged bins)
    """
    if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) or factor < 1:
        raise ValueError(f"factor must be a positive integer, got {factor!r}")
    grid = ref.grid()
    d = np.asarray(dose, dtype=np.float64)
    if d.shape != grid.shape:
        raise ValueError(f"dose must have the reference's shape {grid.shape}, got {d.shape}")
    f = int(factor)
    nz, ny, nx = (n // f for n in grid.shape)
    if min(nz, ny, nx) < 1:
        raise ValueError(f"factor {f} is larger than the reference grid {grid.shape}")

    def blocks(a):
        return a[:nz * f, :ny * f, :nx * f].reshape(nz, f, ny, f, nx, f)

    rho = blocks(ref.density_g_cm3)
    mass = rho.sum(axis=(1, 3, 5))
    merged = (blocks(d) * rho).sum(axis=(1, 3, 5)) / np.maximum(mass, 1e-30)
    same = d is ref.dose_gy or np.shares_memory(d, ref.dose_gy) or np.array_equal(d, ref.dose_gy)
    if same:
        var = ((blocks(d) * blocks(ref.rel_uncertainty) * rho) ** 2).sum(axis=(1, 3, 5))
        unc = np.sqrt(var) / np.maximum(merged * mass, 1e-30)
    else:
        unc = np.zeros_like(merged)
    sp = tuple(s_ * f for s_ in grid.spacing_mm)
    origin = tuple(o + 0.5 * (f - 1) * s_ for o, s_ in zip(grid.origin_mm, grid.spacing_mm))
    return Grid(shape=(nz, ny, nx), spacing_mm=sp, origin_mm=origin), merged, unc, mass / f ** 3


def compare_gamma(ref: McReference, evaluated, *, dose_percent: float = 2.0, distance_mm: float = 2.0,
                  cutoff_percent: float = 10.0, mask=None, min_density_g_cm3: float = 0.05, merge: int = 1):
    """3-D gamma of the engine dose against the Monte Carlo (reference), global.

    Needs uniform bins (the reference's :meth:`McReference.grid`). ``merge > 1`` first merges
    ``merge**3`` bins of both doses (:func:`merge_bins`, mass-weighted) to reduce the Monte Carlo
    noise. Reference voxels whose density is below ``min_density_g_cm3`` (air around the phantom
    and air cavities, where the Monte Carlo dose to air is dominated by noise) are not evaluated;
    ``mask`` (on the merged grid) restricts further. The global normalisation is the Monte Carlo
    maximum over the evaluated region. Returns the
    :class:`~tomodose.evaluation.gamma.GammaResult`.
    """
    from tomodose.evaluation.gamma import gamma_index

    grid, mc_arr, _, rho = merge_bins(ref, ref.dose_gy, merge)
    _, ev_arr, _, _ = merge_bins(ref, evaluated, merge)
    sel = rho >= min_density_g_cm3
    if mask is not None:
        sel &= np.asarray(mask, dtype=bool)
    mc = ImageVolume(grid, mc_arr, "Gy", "dose")
    ev = ImageVolume(grid, ev_arr, "Gy", "dose")
    norm = float(mc_arr[sel].max())  # global normalisation: the MC maximum in the evaluated region
    return gamma_index(mc, ev, dose_percent=dose_percent, distance_mm=distance_mm, cutoff_percent=cutoff_percent,
                       normalisation_gy=norm, mask=sel, progress=False)


def depth_normalisation_mm(ref: McReference) -> tuple[float, float]:
    """Depth range (mm) over which a case's depth doses are normalised for the relative comparison.

    Slabs: 15-25 mm, in the first water layer above the heterogeneity (a normalisation inside or
    beyond the insert would hide the insert's error). Water fans: 90-110 mm.
    """
    return (15.0, 25.0) if ref.analysis.get("type") == "slab" else (90.0, 110.0)


def compare_case(ref: McReference, evaluated) -> dict:
    """Every comparison that applies to the case type, as a plain dict of numbers (for reports).

    Depth doses are normalised over :func:`depth_normalisation_mm` (as the tests do).
    """
    kind = ref.analysis.get("type")
    out: dict = {"name": ref.name, "type": kind}
    if kind in ("static", "slab"):
        dd = compare_depth_dose(ref, evaluated, normalise_mm=depth_normalisation_mm(ref))
        out["depth_dose"] = {k: dd[k] for k in ("dmax_mm", "max_abs_beyond_pct", "max_rel_beyond_pct",
                                                 "mean_abs_beyond_pct", "mean_rel_beyond_pct", "mc_sigma_beyond_pct")}
        out["profiles"] = {}
        for axis in ("x", "z"):
            for depth in ref.analysis.get("profile_depths_mm", []):
                p = compare_profile(ref, evaluated, axis, depth)
                out["profiles"][f"{axis}@{depth:g}"] = {k: p[k] for k in ("pass_rate_pct", "n_fail",
                                                                          "max_dd_in_field_pct", "centre_ratio")}
    if kind == "helical":
        g = compare_gamma(ref, evaluated, merge=HELICAL_MERGE)
        out["gamma_2_2_pass_pct"] = g.pass_rate_percent
        out["gamma_2_2_unmerged_pass_pct"] = compare_gamma(ref, evaluated).pass_rate_percent
        _, mcm, unc, rho = merge_bins(ref, ref.dose_gy, HELICAL_MERGE)
        hi_m = (rho >= 0.05) & (mcm >= 0.5 * mcm[rho >= 0.05].max())
        out["mc_sigma_high_dose_pct"] = {"unmerged_median": float(100 * np.median(
            ref.rel_uncertainty[(ref.density_g_cm3 >= 0.05) & (ref.dose_gy >= 0.5 * ref.dose_gy[
                ref.density_g_cm3 >= 0.05].max())])), "merged_median": float(100 * np.median(unc[hi_m]))}
        body = ref.density_g_cm3 >= 0.05
        hi = ref.dose_gy >= 0.5 * ref.dose_gy[body].max()
        out["mean_diff_high_dose_pct"] = float(100 * np.mean((np.asarray(evaluated)[hi & body] / ref.dose_gy[hi & body]) - 1))
    return out
