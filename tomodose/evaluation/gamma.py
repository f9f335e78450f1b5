"""Gamma index (3-D, global or local), dose-difference and distance-to-agreement maps.

Definition
----------
For a reference voxel at position ``r`` with dose ``Dr`` (Gy) the gamma index is (Low et al.
1998, Med. Phys. 25:656)::

    gamma(r) = min over points p of  sqrt( |p - r|^2 / DTA^2 + (De(p) - Dr)^2 / DD^2 )

``De(p)`` is the evaluated dose, interpolated **trilinearly** at the arbitrary point ``p`` (the
evaluated grid may differ from the reference grid in spacing, origin and shape; no
extrapolation: points outside the box of evaluated voxel centres are skipped). ``DTA`` is the
distance criterion (mm); ``DD`` the dose criterion in Gy: ``dose_percent / 100 *
normalisation_gy`` (global, the normalisation defaults to the maximum reference dose) or
``dose_percent / 100 * Dr`` (local).

Search (sub-voxel, by interpolation of the evaluated dose)
----------------------------------------------------------
The candidate points ``p`` are the reference point plus offsets on concentric shells of radii
``0, h, 2h, ..., K h <= R`` where ``h = search_step_mm`` (default ``DTA / 10``, the
``interp_fraction = 10`` of Wendling et al. 2007, Med. Phys. 34:1647, also pymedphys' default)
and ``R = max_search_radius_mm`` (default ``3 * DTA``). Each 3-D shell is a latitude/longitude
set in which no two neighbouring points are more than ``h`` apart along the sphere (rows every
at most ``h`` of arc, points within a row at most ``h`` apart). In 2-D (an evaluated grid with
a single voxel along an axis) the shells are circles, in 1-D point pairs. Offsets are sorted by
distance, and for each reference voxel the scan stops as soon as ``distance / DTA`` reaches the
best gamma found: the result is the exact minimum over the whole offset set (the slow
brute-force twin in ``tests/naive/gamma.py`` checks this). Resolution: the minimiser is located
to within ``h``; since gamma is stationary at its minimum, the error in gamma is second order
(about ``(h / DTA)^2 / 8`` for a linear ramp; see ``docs/gamma.md``).

Gamma values above ``R / DTA`` cannot be resolved: such voxels report the smallest value found
within ``R`` (an upper bound; the true value is at least ``R / DTA``). ``R >= DTA`` is required,
so pass/fail (``gamma <= 1``) is always exact with respect to the offset set.

Evaluated voxels are reference voxels with ``Dr >= cutoff_percent / 100 * normalisation_gy``
(and ``Dr > 0`` for local gamma). The gamma map is NaN elsewhere, and also where no evaluated
dose exists within ``R`` of the voxel (counted in ``n_outside`` and excluded from the pass rate).

Kernels: :mod:`tomodose._kernels.gamma` (numba ``prange`` over reference voxels, each writing
its own output element, so results are identical run to run and for any thread count).
"""

from __future__ import annotations

import functools
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tomodose import config
from tomodose._kernels import gamma as _kg
from tomodose._validate import check_choice, check_in_range, check_positive
from tomodose._atomic import atomic_path
from tomodose.geometry.grid import ImageVolume

__all__ = [
    "GammaCriteria",
    "GammaResult",
    "gamma_index",
    "dose_difference_map",
    "distance_to_agreement_map",
    "search_offsets_mm",
]

logger = logging.getLogger(__name__)

#: default search step as a fraction of the distance criterion (pymedphys ``interp_fraction``).
DEFAULT_INTERP_FRACTION = 10
#: default maximum search radius in units of the distance criterion.
DEFAULT_MAX_GAMMA = 3.0
#: refuse search sets larger than this (memory: 56 bytes per point).
MAX_SEARCH_POINTS = 5_000_000


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GammaCriteria:
    """Gamma criteria and search settings.

    Parameters
    ----------
    dose_percent : float
        Dose-difference criterion in percent (of the normalisation dose for global gamma, of the
        local reference dose for local gamma). > 0.
    distance_mm : float
        Distance-to-agreement criterion in mm. > 0.
    local : bool
        Local (True) or global (False) dose difference.
    normalisation_gy : float or None
        Global normalisation dose in Gy; None: the maximum reference dose.
    cutoff_percent : float
        Low-dose cut-off: reference voxels below ``cutoff_percent`` % of the normalisation dose
        are not evaluated. In [0, 100].
    max_search_radius_mm : float or None
        Largest search distance in mm (>= ``distance_mm``); None: ``3 * distance_mm``.
    search_step_mm : float or None
        Radial step between search shells and largest gap between points on a shell, in mm;
        None: ``distance_mm / 10``.
    """

    dose_percent: float = 2.0
    distance_mm: float = 2.0
    local: bool = False
    normalisation_gy: float | None = None
    cutoff_percent: float = 10.0
    max_search_radius_mm: float | None = None
    search_step_mm: float | None = None

    def __post_init__(self):
        set_ = lambda n, v: object.__setattr__(self, n, v)  # noqa: E731
        set_("dose_percent", check_positive("dose_percent", self.dose_percent))
        set_("distance_mm", check_positive("distance_mm", self.distance_mm))
        if not isinstance(self.local, (bool, np.bool_)):
            raise TypeError(f"local must be a bool, got {self.local!r}")
        set_("local", bool(self.local))
        if self.normalisation_gy is not None:
            set_("normalisation_gy", check_positive("normalisation_gy", self.normalisation_gy))
        set_("cutoff_percent", check_in_range("cutoff_percent", self.cutoff_percent, 0.0, 100.0))
        radius = (
            DEFAULT_MAX_GAMMA * self.distance_mm
            if self.max_search_radius_mm is None
            else check_positive("max_search_radius_mm", self.max_search_radius_mm)
        )
        if radius < self.distance_mm * (1 - 1e-12):
            raise ValueError(
                f"max_search_radius_mm must be >= distance_mm ({self.distance_mm}), got {radius}"
            )
        set_("max_search_radius_mm", float(radius))
        step = (
            self.distance_mm / DEFAULT_INTERP_FRACTION
            if self.search_step_mm is None
            else check_positive("search_step_mm", self.search_step_mm)
        )
        if step > self.distance_mm:
            raise ValueError(
                f"search_step_mm must be <= distance_mm ({self.distance_mm}), got {step}"
            )
        set_("search_step_mm", float(step))

    @property
    def label(self) -> str:
        """Short description, e.g. ``"2%/2mm global, cut-off 10%"``."""
        kind = "local" if self.local else "global"
        return (
            f"{self.dose_percent:g}%/{self.distance_mm:g}mm {kind}, "
            f"cut-off {self.cutoff_percent:g}%"
        )


# --------------------------------------------------------------------------------------------
# search offsets
# --------------------------------------------------------------------------------------------
def _shell_points(radius: float, step: float, n_active: int) -> np.ndarray:
    """Points on a shell of ``radius`` (n, n_active) with gaps <= ``step``."""
    if radius == 0.0:
        return np.zeros((1, n_active))
    if n_active == 1:
        return np.array([[radius], [-radius]])
    if n_active == 2:
        n = int(math.ceil(2 * math.pi * radius / step))
        n = max(n, 4)
        theta = 2 * math.pi * np.arange(n) / n
        return np.column_stack([radius * np.cos(theta), radius * np.sin(theta)])
    n_rows = max(int(math.ceil(math.pi * radius / step)) + 1, 3)
    elevation = np.linspace(0.0, math.pi, n_rows)
    pts = []
    for row, phi in enumerate(elevation):
        if row == 0 or row == n_rows - 1:
            pts.append([[0.0, 0.0, radius * math.cos(phi)]])
            continue
        ring = radius * math.sin(phi)
        n = max(int(math.ceil(2 * math.pi * ring / step)), 3)
        # stagger alternate rows by half a gap: more uniform coverage for the same count
        az = 2 * math.pi * (np.arange(n) + 0.5 * (row % 2)) / n
        pts.append(
            np.column_stack(
                [ring * np.cos(az), ring * np.sin(az), np.full(n, radius * math.cos(phi))]
            )
        )
    return np.vstack(pts)


def search_offsets_mm(
    max_radius_mm: float, step_mm: float, active_axes=(True, True, True)
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Search offsets on concentric shells, sorted by distance.

    Parameters
    ----------
    max_radius_mm : float
        Largest shell radius (mm); shells have radii ``k * step_mm <= max_radius_mm``.
    step_mm : float
        Radial step and largest gap between neighbouring points of a shell (mm).
    active_axes : 3 bools
        Axes (x, y, z) along which the search moves; 3 active: spheres, 2: circles, 1: pairs.

    Returns
    -------
    offsets_mm : (n, 3) float64
        Offsets (x, y, z) in mm, zero along inactive axes; the first is (0, 0, 0).
    distance_mm : (n,) float64
        Length of each offset, non-decreasing.
    shell : (n,) int64
        Shell index ``k`` of each offset.
    """
    max_radius_mm = check_positive("max_radius_mm", max_radius_mm)
    step_mm = check_positive("step_mm", step_mm)
    active = np.asarray(active_axes, dtype=bool)
    if active.shape != (3,):
        raise ValueError(f"active_axes must be 3 booleans (x, y, z), got {active_axes!r}")
    ratio = max_radius_mm / step_mm
    estimate = {0: 1, 1: 2 * ratio, 2: math.pi * ratio**2, 3: 4.2 * ratio**3}[int(active.sum())]
    if estimate > MAX_SEARCH_POINTS:
        raise ValueError(
            f"search_step_mm={step_mm} with max_search_radius_mm={max_radius_mm} needs about "
            f"{estimate:.3g} search points (limit {MAX_SEARCH_POINTS:.0e}); use a larger step or "
            f"a smaller radius"
        )
    offsets, distance, shell = _search_offsets_cached(max_radius_mm, step_mm, tuple(active.tolist()))
    return offsets.copy(), distance.copy(), shell.copy()


@functools.lru_cache(maxsize=16)
def _search_offsets_cached(max_radius_mm: float, step_mm: float, active_axes: tuple):
    active = np.array(active_axes, dtype=bool)
    n_active = int(active.sum())
    n_shells = int(math.floor(max_radius_mm / step_mm + 1e-9)) + 1
    if n_active == 0:
        n_shells = 1
    blocks, shells = [], []
    for k in range(n_shells):
        pts = _shell_points(k * step_mm, step_mm, n_active)
        full = np.zeros((pts.shape[0], 3))
        full[:, active] = pts
        blocks.append(full)
        shells.append(np.full(pts.shape[0], k, dtype=np.int64))
    offsets = np.ascontiguousarray(np.vstack(blocks))
    shell = np.concatenate(shells)
    # exact radii (k * step): the scan relies on a non-decreasing distance per shell
    distance = shell * step_mm
    return offsets, distance.astype(np.float64), shell


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------
def _atomic_write_bytes(path: Path, writer) -> Path:
    """Call ``writer(tmp)`` on a temporary beside ``path`` and move it into place (folder created)."""
    with atomic_path(path, mkdir=True) as tmp:
        writer(str(tmp))
    return Path(path)


@dataclass(frozen=True)
class GammaResult:
    """Result of :func:`gamma_index`.

    Attributes
    ----------
    gamma : ImageVolume
        Gamma map on the reference grid, dimensionless, NaN where not evaluated.
    criteria : GammaCriteria
        Criteria and search settings used (defaults resolved).
    normalisation_gy : float
        Global normalisation dose (Gy).
    dose_criterion_gy : float
        Global dose criterion ``dose_percent / 100 * normalisation_gy`` (Gy).
    cutoff_gy : float
        Low-dose cut-off applied to the reference dose (Gy).
    n_evaluated : int
        Voxels with a gamma value (above the cut-off, evaluated dose in reach).
    n_passed : int
        Evaluated voxels with ``gamma <= 1``.
    n_outside : int
        Voxels above the cut-off with no evaluated dose within the search radius.
    """

    gamma: ImageVolume = field(repr=False)
    criteria: GammaCriteria
    normalisation_gy: float
    dose_criterion_gy: float
    cutoff_gy: float
    n_evaluated: int
    n_passed: int
    n_outside: int

    @property
    def pass_rate_percent(self) -> float:
        """Percentage of evaluated voxels with ``gamma <= 1`` (NaN when none is evaluated)."""
        return 100.0 * self.n_passed / self.n_evaluated if self.n_evaluated else float("nan")

    @property
    def values(self) -> np.ndarray:
        """Gamma values of the evaluated voxels, 1-D (C order)."""
        g = self.gamma.array
        return g[~np.isnan(g)]

    def statistics(self) -> dict:
        """Mean, median, 95th percentile and maximum gamma of evaluated voxels."""
        v = self.values
        if v.size == 0:
            return {"mean": float("nan"), "median": float("nan"), "p95": float("nan"), "max": float("nan")}
        return {
            "mean": float(v.mean()),
            "median": float(np.median(v)),
            "p95": float(np.percentile(v, 95)),
            "max": float(v.max()),
        }

    def histogram(self, bin_width: float = 0.05, max_gamma: float | None = None):
        """Histogram of gamma values.

        Parameters
        ----------
        bin_width : float
            Bin width (dimensionless), > 0.
        max_gamma : float or None
            Upper edge of the last bin; None: ``max_search_radius_mm / distance_mm``. Values above
            it are counted in the last bin.

        Returns
        -------
        counts : (n_bins,) int64
        edges : (n_bins + 1,) float64
        """
        bin_width = check_positive("bin_width", bin_width)
        top = (
            self.criteria.max_search_radius_mm / self.criteria.distance_mm
            if max_gamma is None
            else check_positive("max_gamma", max_gamma)
        )
        n_bins = max(1, int(math.ceil(top / bin_width - 1e-9)))
        edges = np.arange(n_bins + 1) * bin_width
        v = np.minimum(self.values, edges[-1])
        counts, _ = np.histogram(v, bins=edges)
        return counts.astype(np.int64), edges

    def to_dict(self) -> dict:
        """JSON-ready summary (criteria, counts, pass rate, statistics, histogram); NaN -> None."""
        counts, edges = self.histogram()

        def clean(v):
            if isinstance(v, float) and not math.isfinite(v):
                return None
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            return v

        return clean({
            "criteria": asdict(self.criteria),
            "label": self.criteria.label,
            "normalisation_gy": self.normalisation_gy,
            "dose_criterion_gy": self.dose_criterion_gy,
            "cutoff_gy": self.cutoff_gy,
            "n_evaluated": self.n_evaluated,
            "n_passed": self.n_passed,
            "n_outside": self.n_outside,
            "pass_rate_percent": self.pass_rate_percent,
            "statistics": self.statistics(),
            "histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
            "grid": self.gamma.grid.to_dict(),
        })

    def write_json(self, path) -> Path:
        """Write :meth:`to_dict` as JSON (atomically)."""
        text = json.dumps(self.to_dict(), indent=2)

        def _w(tmp):
            Path(tmp).write_text(text, encoding="utf-8")

        return _atomic_write_bytes(Path(path), _w)

    def summary(self) -> str:
        """One line: criteria, pass rate and counts."""
        s = self.statistics()
        return (
            f"gamma {self.criteria.label}: pass rate {self.pass_rate_percent:.2f}% "
            f"({self.n_passed}/{self.n_evaluated} voxels), mean {s['mean']:.3f}, "
            f"max {s['max']:.3f}, normalisation {self.normalisation_gy:.4g} Gy"
        )

    def default_slice(self) -> int:
        """Axial slice index (z) holding the most failing voxels (gamma > 1); without failures
        the one with the most evaluated voxels; ties: the middle of the tied slices."""
        g = self.gamma.array
        with np.errstate(invalid="ignore"):
            n_fail = np.sum(g > 1.0, axis=(1, 2))
        n_eval = np.sum(~np.isnan(g), axis=(1, 2))
        score = n_fail if n_fail.max() > 0 else n_eval
        tied = np.flatnonzero(score == score.max())
        return int(tied[len(tied) // 2])

    def plot(self, path, slice_index: int | None = None, max_gamma: float = 2.0) -> Path:
        """Save a figure: axial gamma map at ``slice_index`` and the gamma histogram.

        Parameters
        ----------
        path : str or Path
            Output image (format from the suffix, e.g. ``.png``), written atomically.
        slice_index : int or None
            Axial (z) slice of the reference grid; None: :meth:`default_slice`.
        max_gamma : float
            Upper end of the colour scale and of the histogram.
        """
        import matplotlib
        from matplotlib.figure import Figure  # Agg canvas, no pyplot state touched

        nz = self.gamma.grid.nz
        k = self.default_slice() if slice_index is None else int(slice_index)
        if not 0 <= k < nz:
            raise ValueError(f"slice_index must be in [0, {nz - 1}], got {slice_index}")
        max_gamma = check_positive("max_gamma", max_gamma)
        grid = self.gamma.grid
        x, y = grid.x_mm, grid.y_mm
        dx, dy = grid.spacing_mm[0], grid.spacing_mm[1]
        extent = (x[0] - dx / 2, x[-1] + dx / 2, y[-1] + dy / 2, y[0] - dy / 2)

        fig = Figure(figsize=(11, 4.6), layout="constrained")
        ax_map, ax_hist = fig.subplots(1, 2, width_ratios=(1.2, 1))
        img = np.ma.masked_invalid(self.gamma.array[k])
        cmap = matplotlib.colormaps["RdYlGn_r"].with_extremes(bad="0.85")
        im = ax_map.imshow(img, cmap=cmap, vmin=0.0, vmax=max_gamma, extent=extent,
                           interpolation="nearest")
        ax_map.set_xlabel("x (mm, LPS)")
        ax_map.set_ylabel("y (mm, LPS)")
        ax_map.set_title(f"gamma, axial z = {grid.z_mm[k]:.1f} mm (slice {k})")
        fig.colorbar(im, ax=ax_map, label="gamma")

        counts, edges = self.histogram(bin_width=max_gamma / 40, max_gamma=max_gamma)
        total = max(self.n_evaluated, 1)
        colors = ["tab:green" if e < 1.0 - 1e-12 else "tab:red" for e in edges[:-1]]
        ax_hist.bar(edges[:-1], 100.0 * counts / total, width=np.diff(edges), align="edge",
                    color=colors, edgecolor="none")
        ax_hist.axvline(1.0, color="k", lw=1, ls="--")
        ax_hist.set_xlabel(f"gamma (values > {max_gamma:g} in last bin)")
        ax_hist.set_ylabel("evaluated voxels (%)")
        ax_hist.set_title(f"{self.criteria.label}: pass {self.pass_rate_percent:.2f}%")

        return _atomic_write_bytes(
            Path(path), lambda tmp: fig.savefig(tmp, dpi=110, format=Path(path).suffix.lstrip(".") or "png")
        )


# --------------------------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------------------------
def _check_dose(name: str, value) -> ImageVolume:
    if not isinstance(value, ImageVolume):
        raise TypeError(f"{name} must be a tomodose ImageVolume (Gy), got {type(value).__name__}")
    if value.unit != "Gy":
        raise ValueError(f"{name} must be a dose in Gy, got unit {value.unit!r}")
    if value.array.size and float(np.min(value.array)) < 0:
        raise ValueError(f"{name} must be >= 0 Gy, got minimum {float(np.min(value.array))}")
    return value


def _check_mask(mask, reference: ImageVolume) -> np.ndarray:
    from tomodose.geometry.structures import Structure

    if isinstance(mask, Structure):
        reference.grid.require_same(mask.grid, f"mask structure {mask.name!r}")
        return np.asarray(mask.occupancy) >= 0.5
    arr = np.asarray(mask)
    if arr.dtype != np.bool_:
        raise TypeError(f"mask must be a bool array or a Structure, got dtype {arr.dtype}")
    if arr.shape != reference.grid.shape:
        raise ValueError(
            f"mask must have the reference shape {reference.grid.shape}, got {arr.shape}"
        )
    return arr


def _grid_mapping(reference: ImageVolume, evaluated: ImageVolume):
    """base0, scale (x, y, z): reference index -> evaluated fractional index."""
    o_r = np.asarray(reference.grid.origin_mm)
    s_r = np.asarray(reference.grid.spacing_mm)
    o_e = np.asarray(evaluated.grid.origin_mm)
    s_e = np.asarray(evaluated.grid.spacing_mm)
    return np.ascontiguousarray((o_r - o_e) / s_e), np.ascontiguousarray(s_r / s_e)


#: block size of the evaluated-dose extrema used to bound the gamma search.
_BLOCK = 4


def _block_extrema(ev: np.ndarray):
    nb = tuple(-(-n // _BLOCK) for n in ev.shape)
    return _kg.block_extrema(ev, _BLOCK, np.empty(nb), np.empty(nb))


def _aligned_shift(base0: np.ndarray, scale: np.ndarray, tol: float = 1e-9):
    """Integer index shift (x, y, z) when reference voxel centres are evaluated voxel centres
    (same spacing, origins a whole number of voxels apart), else None."""
    if np.all(np.abs(scale - 1.0) <= tol) and np.all(np.abs(base0 - np.round(base0)) <= tol):
        return np.round(base0).astype(np.int64)
    return None


def _split_offsets(offs_idx: np.ndarray, tol: float = 1e-9):
    """Offsets in index units -> integer lower corners and weights in [0, 1); weights within
    ``tol`` of 0 or 1 snap to the voxel (as the general kernel's edge tolerance does)."""
    low = np.floor(offs_idx)
    w = offs_idx - low
    up = w > 1.0 - tol
    low[up] += 1.0
    w[up] = 0.0
    w[w < tol] = 0.0
    return np.ascontiguousarray(low.astype(np.int64)), np.ascontiguousarray(w)


def _active_axes(evaluated: ImageVolume) -> tuple[bool, bool, bool]:
    nz, ny, nx = evaluated.grid.shape
    return (nx > 1, ny > 1, nz > 1)


def _balanced_order(n: int, block: int = 64, stride: int = 61) -> np.ndarray:
    """A fixed permutation of ``range(n)`` that spreads neighbouring blocks over the range.

    numba's ``prange`` gives each thread one contiguous share of the iterations; search costs
    are spatially clustered (failing regions search far), so blocks of ``block`` consecutive
    voxels are dealt out in the order ``0, stride, 2 stride, ..., 1, 1 + stride, ...``. The
    permutation is deterministic and results do not depend on it.
    """
    n_blocks = -(-n // block)
    if n_blocks <= 1:
        return np.arange(n, dtype=np.int64)
    order = np.concatenate([np.arange(r, n_blocks, stride) for r in range(min(stride, n_blocks))])
    idx = (order[:, None] * block + np.arange(block)[None, :]).ravel()
    return idx[idx < n].astype(np.int64)


def _run_blocks(kernel, points: np.ndarray, args_before, args_after, progress, desc) -> np.ndarray:
    """Run ``kernel(*args_before, block, *args_after, out)`` over ``points`` (load-balanced);
    returns the values in the order of ``points``."""
    if points.size == 0:
        return np.empty(0, dtype=np.float64)
    perm = _balanced_order(points.size)
    out = np.empty(points.size, dtype=np.float64)
    out[perm] = _run_blocks_ordered(kernel, points[perm], args_before, args_after, progress, desc)
    return out


def _run_blocks_ordered(kernel, points, args_before, args_after, progress, desc) -> np.ndarray:
    out = np.empty(points.shape[0], dtype=np.float64)
    show = config.progress_enabled(progress) and points.size > 200_000
    if not show:
        kernel(*args_before, points, *args_after, out)
        return out
    from tqdm.auto import tqdm

    n_blocks = 20
    bounds = np.linspace(0, points.size, n_blocks + 1).astype(np.int64)
    with tqdm(total=int(points.size), desc=desc, unit="vox") as bar:
        for a, b in zip(bounds[:-1], bounds[1:]):
            if b > a:
                sub = np.empty(b - a, dtype=np.float64)
                kernel(*args_before, points[a:b], *args_after, sub)
                out[a:b] = sub
                bar.update(int(b - a))
    return out


def gamma_index(
    reference: ImageVolume,
    evaluated: ImageVolume,
    criteria: GammaCriteria | None = None,
    *,
    mask=None,
    progress: bool | None = None,
    **criteria_kwargs,
) -> GammaResult:
    """Gamma index of ``evaluated`` against ``reference`` (3-D, global or local).

    Parameters
    ----------
    reference : ImageVolume
        Reference dose (Gy) on its grid (nz, ny, nx); each voxel centre above the cut-off is a
        gamma point.
    evaluated : ImageVolume
        Evaluated dose (Gy), on any axis-aligned grid; interpolated trilinearly.
    criteria : GammaCriteria, optional
        Criteria; alternatively give its fields as keyword arguments (``dose_percent=3,
        distance_mm=3, local=True, ...``), not both.
    mask : (nz, ny, nx) bool array, Structure or None
        Restrict the evaluation to these reference voxels (in addition to the cut-off), e.g. the
        body; a :class:`~tomodose.geometry.structures.Structure` on the reference grid counts
        voxels with occupancy >= 0.5.
    progress : bool or None
        tqdm progress bar for large grids (None: global setting).

    Returns
    -------
    GammaResult
        Gamma map on the reference grid (NaN where not evaluated), pass rate, histogram, plot.

    Examples
    --------
    >>> res = gamma_index(ref, ev, dose_percent=2, distance_mm=2, cutoff_percent=10)
    >>> res.pass_rate_percent
    """
    if criteria is None:
        criteria = GammaCriteria(**criteria_kwargs)
    elif criteria_kwargs:
        raise TypeError(
            f"give either criteria or criteria keyword arguments, not both; got criteria and "
            f"{sorted(criteria_kwargs)}"
        )
    elif not isinstance(criteria, GammaCriteria):
        raise TypeError(f"criteria must be a GammaCriteria, got {type(criteria).__name__}")
    _check_dose("reference", reference)
    _check_dose("evaluated", evaluated)

    ref = np.ascontiguousarray(reference.array, dtype=np.float64)
    ev = np.ascontiguousarray(evaluated.array, dtype=np.float64)
    norm = criteria.normalisation_gy if criteria.normalisation_gy is not None else float(ref.max())
    if not norm > 0:
        raise ValueError(
            f"reference must have a positive maximum dose when normalisation_gy is None, got {norm}"
        )
    dd_gy = criteria.dose_percent / 100.0 * norm
    cutoff_gy = criteria.cutoff_percent / 100.0 * norm
    selected = ref >= cutoff_gy
    if criteria.local:
        selected &= ref > 0
    if mask is not None:
        selected &= _check_mask(mask, reference)
    points = np.flatnonzero(selected).astype(np.int64)

    offsets_mm, dist_mm, _ = search_offsets_mm(
        criteria.max_search_radius_mm, criteria.search_step_mm, _active_axes(evaluated)
    )
    dist2 = np.ascontiguousarray((dist_mm / criteria.distance_mm) ** 2)
    base0, scale = _grid_mapping(reference, evaluated)
    offs_idx = np.ascontiguousarray(offsets_mm / np.asarray(evaluated.grid.spacing_mm))

    logger.info(
        "gamma %s: %d of %d reference voxels, %d search points (step %.3g mm, radius %.3g mm)",
        criteria.label, points.size, ref.size, offs_idx.shape[0], criteria.search_step_mm,
        criteria.max_search_radius_mm,
    )
    shape_yx = np.array(ref.shape[1:], dtype=np.int64)
    bmin, bmax = _block_extrema(ev)
    reach = np.ascontiguousarray(np.abs(offs_idx).max(axis=0))
    common = (dist2, 1.0 / dd_gy, criteria.local, criteria.dose_percent / 100.0, bmin, bmax,
              _BLOCK, reach)
    ishift = _aligned_shift(base0, scale)
    if ishift is not None:
        oi, ow = _split_offsets(offs_idx)
        kernel, args = _kg.gamma_search_aligned, (ev, ishift, oi, ow, *common)
    else:
        kernel, args = _kg.gamma_search, (ev, base0, scale, offs_idx, *common)
    vals = _run_blocks(kernel, points, (ref.ravel(), shape_yx), args, progress, "gamma")
    outside = np.isinf(vals)
    vals[outside] = np.nan
    gamma = np.full(ref.shape, np.nan)
    gamma.ravel()[points] = vals
    n_outside = int(outside.sum())
    if n_outside:
        logger.warning(
            "%d reference voxels above the cut-off have no evaluated dose within %.3g mm; "
            "they are left out of the pass rate", n_outside, criteria.max_search_radius_mm,
        )
    n_eval = int(points.size - n_outside)
    n_pass = int(np.count_nonzero(vals[~outside] <= 1.0))
    return GammaResult(
        gamma=_volume_allow_nan(reference, gamma, "1", "gamma"),
        criteria=criteria,
        normalisation_gy=float(norm),
        dose_criterion_gy=float(dd_gy),
        cutoff_gy=float(cutoff_gy),
        n_evaluated=n_eval,
        n_passed=n_pass,
        n_outside=n_outside,
    )


def dose_difference_map(
    reference: ImageVolume,
    evaluated: ImageVolume,
    *,
    relative: str | None = None,
    normalisation_gy: float | None = None,
) -> ImageVolume:
    """Evaluated minus reference dose at the reference voxel centres.

    Parameters
    ----------
    reference, evaluated : ImageVolume
        Doses in Gy; the evaluated dose is interpolated trilinearly at the reference voxel
        centres (NaN outside the box of evaluated voxel centres).
    relative : {None, "global", "local"}
        None: difference in Gy. ``"global"``: percent of ``normalisation_gy`` (default the
        maximum reference dose). ``"local"``: percent of the local reference dose (NaN where
        it is 0).
    normalisation_gy : float or None
        Normalisation for ``relative="global"`` (Gy).

    Returns
    -------
    ImageVolume
        On the reference grid; unit ``"Gy"`` or ``"%"``.
    """
    _check_dose("reference", reference)
    _check_dose("evaluated", evaluated)
    check_choice("relative", relative, (None, "global", "local"))
    ref = np.ascontiguousarray(reference.array, dtype=np.float64)
    ev = np.ascontiguousarray(evaluated.array, dtype=np.float64)
    base0, scale = _grid_mapping(reference, evaluated)
    sampled = _kg.sample_at_reference(np.array(ref.shape, dtype=np.int64), ev, base0, scale,
                                      np.empty_like(ref))
    diff = sampled - ref
    if relative is None:
        return _volume_allow_nan(reference, diff, "Gy", "dose_difference")
    if relative == "global":
        norm = float(ref.max()) if normalisation_gy is None else check_positive(
            "normalisation_gy", normalisation_gy)
        if not norm > 0:
            raise ValueError(f"reference must have a positive maximum dose, got {norm}")
        return _volume_allow_nan(reference, 100.0 * diff / norm, "%", "dose_difference")
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(ref > 0, 100.0 * diff / np.where(ref > 0, ref, 1.0), np.nan)
    return _volume_allow_nan(reference, rel, "%", "dose_difference")


def distance_to_agreement_map(
    reference: ImageVolume,
    evaluated: ImageVolume,
    *,
    max_search_radius_mm: float = 5.0,
    search_step_mm: float = 0.2,
    cutoff_percent: float = 0.0,
    normalisation_gy: float | None = None,
    progress: bool | None = None,
) -> ImageVolume:
    """Distance (mm) from each reference voxel centre to the nearest evaluated-dose agreement.

    The agreement surface is where the (trilinearly interpolated) evaluated dose equals the
    reference voxel's dose. The search uses the gamma shells (:func:`search_offsets_mm`): the
    first shell holding a point on the other side of the agreement surface is found, and for
    every such point of that shell the crossing is located by bisection along the ray from the
    reference point; the DTA is the smallest crossing distance (resolution: one step).

    Parameters
    ----------
    reference, evaluated : ImageVolume
        Doses in Gy.
    max_search_radius_mm : float
        Search radius (mm); beyond it the DTA is reported as ``inf``.
    search_step_mm : float
        Shell step and largest gap between shell points (mm).
    cutoff_percent : float
        Reference voxels below this percentage of the normalisation dose are NaN.
    normalisation_gy : float or None
        Normalisation for the cut-off; None: the maximum reference dose.

    Returns
    -------
    ImageVolume
        DTA in mm on the reference grid (unit ``"mm"``); NaN below the cut-off or where the
        evaluated dose does not cover the voxel centre, ``inf`` where no agreement lies within
        the search radius.
    """
    _check_dose("reference", reference)
    _check_dose("evaluated", evaluated)
    radius = check_positive("max_search_radius_mm", max_search_radius_mm)
    step = check_positive("search_step_mm", search_step_mm)
    if step > radius:
        raise ValueError(f"search_step_mm must be <= max_search_radius_mm ({radius}), got {step}")
    cutoff = check_in_range("cutoff_percent", cutoff_percent, 0.0, 100.0)
    ref = np.ascontiguousarray(reference.array, dtype=np.float64)
    ev = np.ascontiguousarray(evaluated.array, dtype=np.float64)
    norm = float(ref.max()) if normalisation_gy is None else check_positive(
        "normalisation_gy", normalisation_gy)
    points = np.flatnonzero(ref >= cutoff / 100.0 * norm).astype(np.int64)
    offsets_mm, dist_mm, shell = search_offsets_mm(radius, step, _active_axes(evaluated))
    base0, scale = _grid_mapping(reference, evaluated)
    offs_idx = np.ascontiguousarray(offsets_mm / np.asarray(evaluated.grid.spacing_mm))
    true_dist = np.ascontiguousarray(np.sqrt(np.sum(offsets_mm**2, axis=1)))
    vals = _run_blocks(
        _kg.dta_search,
        points,
        (ref.ravel(), np.array(ref.shape[1:], dtype=np.int64)),
        (ev, base0, scale, offs_idx, true_dist, shell, *_block_extrema(ev), _BLOCK,
         np.ascontiguousarray(np.abs(offs_idx).max(axis=0))),
        progress,
        "DTA",
    )
    out = np.full(ref.shape, np.nan)
    out.ravel()[points] = vals
    return _volume_allow_nan(reference, out, "mm", "distance_to_agreement")


def _volume_allow_nan(like: ImageVolume, array: np.ndarray, unit: str, quantity: str) -> ImageVolume:
    """ImageVolume on ``like.grid`` that may hold NaN ("not evaluated") and inf ("not found")."""
    return ImageVolume(like.grid, np.ascontiguousarray(array, dtype=np.float64), unit, quantity,
                       allow_nonfinite=True)

