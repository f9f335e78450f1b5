"""Dose-volume histograms of a dose grid over a structure.

How the DVH samples the structure (each documented option, default first)
-------------------------------------------------------------------------
Structure on the dose grid, ``supersample=1`` (default)
    Every voxel with occupancy ``w > 0`` contributes its dose with volume ``w x voxel volume``
    (fractional occupancy, e.g. from :func:`tomodose.geometry.contours.rasterise_contours`).
Structure on the dose grid, ``supersample=s > 1``
    Every voxel is split into ``s**3`` sub-voxels; each carries ``1/s**3`` of the voxel's
    occupancy and the dose **trilinearly interpolated** at its centre. Smooths the DVH of small
    structures in steep gradients.
Structure on its own (finer) grid
    The dose is trilinearly interpolated at the centre of every structure voxel: rasterise the
    contours on a fine grid (see :func:`dvh_from_contours`, which does that on a sub-grid of the
    dose grid) for small or curved structures. Structure voxels beyond the dose grid's outer
    voxel edges raise an error unless ``allow_outside=True`` (they are then dropped, with a
    warning); between the outermost voxel centres and edges the edge dose is used.

Histogram
    Doses are binned in ``bin_width_gy`` bins starting at 0 Gy (default 0.01 Gy). Mean, minimum
    and maximum are exact (computed from the samples). Dose-at-volume and volume-at-dose
    metrics interpolate linearly inside the bins (dose uniform within a bin), with the lowest
    and highest bins narrowed to the exact minimum and maximum, so ``D100% == Dmin`` and
    ``D0cc == Dmax``; their error is below one bin width.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from tomodose._validate import check_array, check_nonnegative, check_positive
from tomodose.geometry.grid import Grid, ImageVolume
from tomodose.geometry.structures import Structure

__all__ = ["DVH", "compute_dvh", "dvh_from_contours", "refined_grid", "dose_samples"]

log = logging.getLogger(__name__)

#: default bin width of DVHs (Gy)
DEFAULT_BIN_WIDTH_GY = 0.01
#: samples processed per chunk (bounds memory when supersampling large structures)
_CHUNK = 2_000_000


@dataclass(frozen=True)
class DVH:
    """Binned dose-volume histogram of one structure.

    Parameters
    ----------
    name : str
        Structure name.
    bin_width_gy : float
        Bin width (Gy); bin ``j`` holds doses in ``[j w, (j + 1) w)``.
    differential_ml : (n_bins,) float64 array
        Volume (mL) per bin.
    min_gy, max_gy, mean_gy : float
        Exact minimum, maximum and volume-weighted mean dose (Gy).
    """

    name: str
    bin_width_gy: float
    differential_ml: np.ndarray = field(repr=False)
    min_gy: float
    max_gy: float
    mean_gy: float

    def __post_init__(self):
        diff = check_array("differential_ml", self.differential_ml, ndim=1, low=0.0)
        if diff.size == 0 or diff.sum() <= 0:
            raise ValueError(f"DVH of structure {self.name!r} is empty: it has no volume")
        object.__setattr__(self, "differential_ml", diff)
        check_positive("bin_width_gy", self.bin_width_gy)

    # --- construction ---------------------------------------------------------------------
    @classmethod
    def from_samples(cls, dose_gy, volume_ml, *, name: str = "", bin_width_gy: float = DEFAULT_BIN_WIDTH_GY):
        """DVH of point samples: dose (Gy) and volume (mL) of each, both 1-D, same length."""
        d = check_array("dose_gy", dose_gy, ndim=1, low=0.0)
        w = check_array("volume_ml", volume_ml, shape=d.shape, low=0.0)
        bw = check_positive("bin_width_gy", bin_width_gy)
        keep = w > 0
        d, w = d[keep], w[keep]
        if d.size == 0:
            raise ValueError(f"structure {name!r} is empty: no sample has volume > 0")
        acc = _Accumulator(float(d.max()), bw)
        acc.add(d, w)
        return acc.result(name)

    # --- derived curves -------------------------------------------------------------------
    @property
    def n_bins(self) -> int:
        return int(self.differential_ml.size)

    @property
    def total_volume_ml(self) -> float:
        return float(self.differential_ml.sum())

    @property
    def edges_gy(self) -> np.ndarray:
        """Bin edges (n_bins + 1,) in Gy."""
        return np.arange(self.n_bins + 1, dtype=np.float64) * self.bin_width_gy

    @property
    def centres_gy(self) -> np.ndarray:
        """Bin centres (n_bins,) in Gy."""
        return (np.arange(self.n_bins, dtype=np.float64) + 0.5) * self.bin_width_gy

    @property
    def cumulative_ml(self) -> np.ndarray:
        """Volume (mL) receiving at least each bin edge dose, shape (n_bins + 1,)."""
        c = np.zeros(self.n_bins + 1)
        c[:-1] = np.cumsum(self.differential_ml[::-1])[::-1]
        return c

    @property
    def cumulative_percent(self) -> np.ndarray:
        return 100.0 * self.cumulative_ml / self.total_volume_ml

    @property
    def differential_percent(self) -> np.ndarray:
        return 100.0 * self.differential_ml / self.total_volume_ml

    def _curve(self) -> tuple[np.ndarray, np.ndarray]:
        """Piecewise-linear cumulative curve (dose increasing, volume non-increasing)."""
        cum = self.cumulative_ml
        bw = self.bin_width_gy
        j0 = min(int(math.floor(self.min_gy / bw)), self.n_bins - 1)
        j1 = min(int(math.floor(self.max_gy / bw)), self.n_bins - 1)
        inner = np.arange(j0 + 1, j1 + 1)
        xp = np.concatenate([[self.min_gy], inner * bw, [self.max_gy]])
        fp = np.concatenate([[self.total_volume_ml], cum[inner], [0.0]])
        return xp, fp

    # --- point metrics --------------------------------------------------------------------
    def volume_at_dose_ml(self, dose_gy: float) -> float:
        """Volume (mL) receiving at least ``dose_gy``."""
        d = float(dose_gy)
        if d <= self.min_gy:
            return self.total_volume_ml
        if d > self.max_gy:
            return 0.0
        xp, fp = self._curve()
        return float(np.interp(d, xp, fp))

    def volumes_at_doses_ml(self, doses_gy) -> np.ndarray:
        """Vectorised :meth:`volume_at_dose_ml` for a 1-D array of doses (Gy)."""
        d = np.asarray(doses_gy, dtype=np.float64)
        xp, fp = self._curve()
        out = np.interp(d, xp, fp)
        out[d <= self.min_gy] = self.total_volume_ml
        out[d > self.max_gy] = 0.0
        return out

    def volume_at_dose_percent(self, dose_gy: float) -> float:
        """Percentage of the structure volume receiving at least ``dose_gy``."""
        return 100.0 * self.volume_at_dose_ml(dose_gy) / self.total_volume_ml

    def dose_at_volume_ml(self, volume_ml: float) -> float:
        """Minimum dose (Gy) received by the hottest ``volume_ml`` of the structure."""
        v = check_nonnegative("volume_ml", volume_ml)
        if v >= self.total_volume_ml:
            if v > self.total_volume_ml * (1 + 1e-9):
                log.debug("structure %r: asked D%.3gcc > its volume %.3g mL -> Dmin",
                          self.name, v, self.total_volume_ml)
            return self.min_gy
        if v <= 0:
            return self.max_gy
        xp, fp = self._curve()
        k = int(np.searchsorted(-fp, -v, side="right")) - 1
        k = min(max(k, 0), xp.size - 2)
        f0, f1 = fp[k], fp[k + 1]
        if f0 == f1:
            return float(xp[k])
        return float(xp[k] + (f0 - v) / (f0 - f1) * (xp[k + 1] - xp[k]))

    def dose_at_volume_percent(self, percent: float) -> float:
        """Minimum dose (Gy) received by the hottest ``percent`` % of the structure."""
        p = float(percent)
        if not 0.0 <= p <= 100.0:
            raise ValueError(f"percent must be in [0, 100], got {p}")
        return self.dose_at_volume_ml(p / 100.0 * self.total_volume_ml)

    # --- export ---------------------------------------------------------------------------
    def table(self, step_gy: float | None = None) -> dict:
        """Cumulative DVH sampled every ``step_gy`` (default: every bin edge) as plain lists."""
        if step_gy is None:
            doses = self.edges_gy
        else:
            step = check_positive("step_gy", step_gy)
            doses = np.arange(0.0, self.max_gy + step, step)
        vols = self.volumes_at_doses_ml(doses)
        return {
            "dose_gy": doses.tolist(),
            "volume_ml": vols.tolist(),
            "volume_percent": (100.0 * vols / self.total_volume_ml).tolist(),
        }

    def to_dict(self, step_gy: float = 0.1) -> dict:
        return {
            "name": self.name,
            "volume_ml": self.total_volume_ml,
            "min_gy": self.min_gy,
            "max_gy": self.max_gy,
            "mean_gy": self.mean_gy,
            "bin_width_gy": self.bin_width_gy,
            "cumulative": self.table(step_gy),
        }


class _Accumulator:
    """Chunked histogram/mean/min/max accumulation over dose samples."""

    def __init__(self, dose_upper_gy: float, bin_width_gy: float):
        self.bw = bin_width_gy
        n = int(math.floor(dose_upper_gy / bin_width_gy)) + 2
        if n > 50_000_000:
            raise ValueError(
                f"bin_width_gy={bin_width_gy} gives {n} bins up to {dose_upper_gy:.4g} Gy; "
                "expected at most 5e7 (use a wider bin)"
            )
        self.hist = np.zeros(n, dtype=np.float64)
        self.sum_wd = 0.0
        self.sum_w = 0.0
        self.dmin = math.inf
        self.dmax = -math.inf

    def add(self, d: np.ndarray, w: np.ndarray) -> None:
        if d.size == 0:
            return
        idx = np.minimum((d / self.bw).astype(np.int64), self.hist.size - 1)
        self.hist += np.bincount(idx, weights=w, minlength=self.hist.size)
        self.sum_wd += float(np.dot(d, w))
        self.sum_w += float(w.sum())
        self.dmin = min(self.dmin, float(d.min()))
        self.dmax = max(self.dmax, float(d.max()))

    def result(self, name: str) -> DVH:
        if self.sum_w <= 0:
            raise ValueError(f"structure {name!r} is empty: it has no volume")
        last = int(np.nonzero(self.hist)[0].max()) + 1
        return DVH(name=name, bin_width_gy=self.bw, differential_ml=self.hist[:last].copy(),
                   min_gy=self.dmin, max_gy=self.dmax, mean_gy=self.sum_wd / self.sum_w)


def _trilinear(dose: ImageVolume, kji: np.ndarray) -> np.ndarray:
    """Trilinear dose at fractional indices (n, 3) (clamped to the outer voxel centres)."""
    shape = np.asarray(dose.grid.shape)
    kji = np.clip(kji, 0.0, shape - 1.0)
    return ndimage.map_coordinates(np.asarray(dose.array, dtype=np.float64), kji.T,
                                   order=1, mode="nearest", prefilter=False)


def dose_samples(
    dose: ImageVolume,
    structure: Structure,
    *,
    supersample: int = 1,
    allow_outside: bool = False,
):
    """Yield ``(dose_gy, volume_ml)`` chunks of 1-D arrays sampling ``structure`` (module doc)."""
    if not isinstance(dose, ImageVolume):
        raise TypeError(f"dose must be an ImageVolume, got {type(dose).__name__}")
    if not isinstance(structure, Structure):
        raise TypeError(f"structure must be a Structure, got {type(structure).__name__}")
    if isinstance(supersample, bool) or not isinstance(supersample, (int, np.integer)) or supersample < 1:
        raise ValueError(f"supersample must be an integer >= 1, got {supersample!r}")
    if dose.unit != "Gy":
        raise ValueError(f"dose must be in Gy, got unit {dose.unit!r}")
    if np.any(dose.array < 0):
        raise ValueError(f"dose must be >= 0 Gy everywhere, got minimum {float(dose.array.min())}")
    if structure.is_empty:
        raise ValueError(f"structure {structure.name!r} is empty: it has no voxel with occupancy > 0")
    sgrid = structure.grid
    occ = structure.occupancy
    idx = np.nonzero(occ.ravel() > 0)[0]
    vv = sgrid.voxel_volume_ml
    same = sgrid.same_as(dose.grid)
    if same and supersample == 1:
        yield dose.array.ravel()[idx].astype(np.float64), occ.ravel()[idx].astype(np.float64) * vv
        return
    s = int(supersample)
    sub = (np.arange(s) + 0.5) / s - 0.5
    offs = np.stack(np.meshgrid(sub, sub, sub, indexing="ij"), axis=-1).reshape(-1, 3)  # (s^3, kji)
    step = max(1, _CHUNK // offs.shape[0])
    # fractional dose-grid index of the structure's voxel (0,0,0) and index scale
    scale = np.asarray(sgrid.spacing_mm[::-1]) / np.asarray(dose.grid.spacing_mm[::-1])
    origin = dose.grid.lps_to_index(np.asarray(sgrid.origin_mm))
    shape_d = np.asarray(dose.grid.shape)
    n_outside = 0
    vol_outside = 0.0
    for start in range(0, idx.size, step):
        chunk = idx[start:start + step]
        kji = np.stack(np.unravel_index(chunk, sgrid.shape), axis=-1).astype(np.float64)
        w = occ.ravel()[chunk].astype(np.float64) * vv
        pts = (kji[:, None, :] + offs[None, :, :]).reshape(-1, 3)
        wts = np.repeat(w / offs.shape[0], offs.shape[0])
        didx = origin + pts * scale
        inside = np.all((didx >= -0.5 - 1e-9) & (didx <= shape_d - 0.5 + 1e-9), axis=1)
        if not np.all(inside):
            n_outside += int((~inside).sum())
            vol_outside += float(wts[~inside].sum())
            didx, wts = didx[inside], wts[inside]
        if didx.size:
            yield _trilinear(dose, didx), wts
    if n_outside:
        _report_outside(structure.name, vol_outside, dose, allow_outside)


def _report_outside(name: str, volume_ml: float, dose, allow_outside: bool) -> None:
    """Raise (or, with ``allow_outside``, log) that ``volume_ml`` of structure ``name`` lies
    outside the dose grid."""
    msg = (f"structure {name!r}: {volume_ml:.4g} mL of its volume lies outside the dose grid "
           f"(shape {dose.grid.shape}, origin_mm {dose.grid.origin_mm}, spacing_mm {dose.grid.spacing_mm})")
    if not allow_outside:
        raise ValueError(msg + "; expected it inside (pass allow_outside=True to drop that part)")
    log.warning("%s; that part is left out of the DVH", msg)


def compute_dvh(
    dose: ImageVolume,
    structure: Structure,
    *,
    bin_width_gy: float = DEFAULT_BIN_WIDTH_GY,
    supersample: int = 1,
    allow_outside: bool = False,
    name: str | None = None,
) -> DVH:
    """DVH of ``dose`` over ``structure``.

    Parameters
    ----------
    dose : ImageVolume
        Dose in Gy (unit ``"Gy"``), >= 0.
    structure : Structure
        On the dose grid (occupancy weights) or on any other axis-aligned grid (the dose is
        then trilinearly interpolated at its voxel centres); see the module doc.
    bin_width_gy : float
        Histogram bin width (Gy), default 0.01.
    supersample : int
        Sub-voxels per axis with trilinear dose interpolation (1 = none).
    allow_outside : bool
        Drop (with a warning) instead of refusing structure volume outside the dose grid.
    name : str, optional
        Name of the DVH (default the structure's).

    Returns
    -------
    DVH
    """
    bw = check_positive("bin_width_gy", bin_width_gy)
    if not isinstance(dose, ImageVolume):
        raise TypeError(f"dose must be an ImageVolume, got {type(dose).__name__}")
    acc = _Accumulator(max(float(dose.array.max()), 0.0), bw)
    for d, w in dose_samples(dose, structure, supersample=supersample, allow_outside=allow_outside):
        acc.add(d, w)
    label = structure.name if name is None else name
    if acc.sum_w <= 0:
        raise ValueError(f"structure {label!r} lies entirely outside the dose grid")
    return acc.result(label)


def refined_grid(dose_grid: Grid, lower_mm, upper_mm, factor) -> Grid:
    """Sub-grid of ``dose_grid`` refined ``factor`` times per axis, covering a box.

    Sub-voxels tile the dose voxels exactly (``factor`` per axis, int or (fx, fy, fz)); the
    result covers the dose voxels that overlap ``[lower_mm, upper_mm]`` (x, y, z), clipped to
    the dose grid.
    """
    f = np.broadcast_to(np.asarray(factor), (3,)).astype(int)
    if np.any(f < 1):
        raise ValueError(f"factor must be >= 1 per axis, got {factor!r}")
    lo_idx = np.asarray(dose_grid.lps_to_index(np.asarray(lower_mm, float)))[::-1]  # (i, j, k)
    hi_idx = np.asarray(dose_grid.lps_to_index(np.asarray(upper_mm, float)))[::-1]
    n_xyz = np.asarray(dose_grid.shape[::-1])
    i0 = np.clip(np.floor(lo_idx + 0.5).astype(int), 0, n_xyz - 1)
    i1 = np.clip(np.floor(hi_idx + 0.5).astype(int), 0, n_xyz - 1)
    if np.any(hi_idx < -0.5) or np.any(lo_idx > n_xyz - 0.5):
        raise ValueError(
            f"box {np.round(lower_mm, 3).tolist()}..{np.round(upper_mm, 3).tolist()} mm lies outside "
            f"the dose grid (origin_mm {dose_grid.origin_mm}, shape {dose_grid.shape})"
        )
    sp = np.asarray(dose_grid.spacing_mm)
    fine_sp = sp / f
    n_fine = (i1 - i0 + 1) * f
    # centre of the first sub-voxel: lower edge of voxel i0 + half a sub-voxel
    origin = np.asarray(dose_grid.origin_mm) + (i0 - 0.5) * sp + 0.5 * fine_sp
    return Grid(shape=(int(n_fine[2]), int(n_fine[1]), int(n_fine[0])),
                spacing_mm=tuple(fine_sp), origin_mm=tuple(origin))


def dvh_from_contours(
    dose: ImageVolume,
    contours,
    *,
    name: str = "",
    resolution_mm: float = 0.2,
    resolution_z_mm: float | None = None,
    end_cap: bool = True,
    slice_spacing_mm: float | None = None,
    bin_width_gy: float = DEFAULT_BIN_WIDTH_GY,
    allow_outside: bool = False,
    interpolation: str = "shape",
    end_shape: str = "auto",
    seed: int = 0,
) -> DVH:
    """Grid-free DVH of planar contours: point samples with trilinear dose interpolation.

    The structure is filled with points (see
    :func:`tomodose.geometry.contours.contour_sample_points`: jittered in-plane lattice of
    pitch ``resolution_mm``, z divided exactly into layers of at most ``resolution_z_mm``) and
    the dose is interpolated trilinearly at every point. This is the accurate path for small
    and curved structures (validated against Nelms et al. 2015: all 90 cases within
    tolerance): no partial-volume voxel is ever given the dose of its centre, and with
    ``interpolation="shape"`` (default) the structure between contour planes follows the
    shape-based interpolation of :func:`tomodose.geometry.contours.column_intervals` instead
    of constant slabs.

    Parameters
    ----------
    dose : ImageVolume
        Dose (Gy).
    contours : sequence of (n, 3) arrays
        Planar polygons, LPS mm (even-odd rule per plane).
    resolution_mm : float
        In-plane point pitch (mm), default 0.2.
    resolution_z_mm : float, optional
        Largest layer thickness along z (mm); default ``resolution_mm``.
    end_cap : bool
        Half-slice end caps (default True, as in the Nelms analytical values).
    slice_spacing_mm : float, optional
        Nominal contour spacing (default: median of the planes' spacing).
    bin_width_gy : float
        DVH bin width (Gy), default 0.01 Gy (0.2 % of 5 Gy: D99 / D1 of small structures
        are interpolated inside bins, error below one bin).
    allow_outside : bool
        Drop (with a warning) instead of refusing points outside the dose grid.
    interpolation : {"shape", "slab"}
        Structure between contour planes (default ``"shape"``; ``"slab"``: each plane's
        cross-section constant over its slab, the older model).
    end_shape : {"auto", "round", "straight"}
        End segments of shape-based interpolation (default ``"auto"``: rounded where the end
        contour is below 10 % of its neighbour's area, i.e. the structure closes there).
    seed : int
        Seed of the sampling jitter (results are reproducible for a given seed).
    """
    from tomodose.geometry.contours import contour_sample_points

    if not isinstance(dose, ImageVolume):
        raise TypeError(f"dose must be an ImageVolume, got {type(dose).__name__}")
    if dose.unit != "Gy":
        raise ValueError(f"dose must be in Gy, got unit {dose.unit!r}")
    label = name or "structure"
    acc = _Accumulator(max(float(dose.array.max()), 0.0), check_positive("bin_width_gy", bin_width_gy))
    shape = np.asarray(dose.grid.shape)
    vol_out = 0.0
    for pts, w in contour_sample_points(
        contours, resolution_mm=resolution_mm, resolution_z_mm=resolution_z_mm,
        slice_spacing_mm=slice_spacing_mm, end_cap=end_cap,
        default_spacing_mm=dose.grid.spacing_mm[2], interpolation=interpolation,
        end_shape=end_shape, seed=seed,
    ):
        kji = dose.grid.lps_to_index(pts)
        inside = np.all((kji >= -0.5 - 1e-9) & (kji <= shape - 0.5 + 1e-9), axis=1)
        if not np.all(inside):
            vol_out += float(w[~inside].sum())
            kji, w = kji[inside], w[inside]
        if w.size:
            acc.add(_trilinear(dose, kji), w)
    if vol_out > 0:
        _report_outside(label, vol_out, dose, allow_outside)
    if acc.sum_w <= 0:
        raise ValueError(f"structure {label!r} is empty: its contours enclose no volume inside the dose grid")
    return acc.result(label)
