"""Planar polygon contours (DICOM RT Structure Set style) -> fractional voxel occupancy.

A structure delineated as closed planar polygons, each an ``(n_points, 3)`` array of LPS
positions in mm lying on one axial plane (constant z), is converted to the fraction of every
voxel of a :class:`~tomodose.geometry.grid.Grid` that lies inside the structure.

Model (the conventions of the Nelms et al. 2015 analytical DVH set and of most planning
systems)
---------------------------------------------------------------------------------------------
In-plane (x, y)
    Each voxel is sampled on a regular ``supersample x supersample`` sub-grid of points at the
    sub-voxel centres; a point is inside when it is enclosed by an **odd** number of the
    polygons drawn on that plane (even-odd rule): a polygon drawn inside another one is a hole,
    an island inside a hole counts again, several disjoint polygons on one plane are all kept.
    The in-plane fraction of a voxel is the fraction of its sub-points inside.

Along z, ``interpolation="slab"`` (default of :func:`rasterise_contours`)
    The polygons of one plane stand for the slab of the structure between the mid-planes to the
    neighbouring contour planes: the structure's cross-section is taken constant over that slab
    (no shape interpolation between planes). For a voxel spanning ``[z - dz/2, z + dz/2]`` the
    occupancy is the exact z-integral of the in-plane fractions of the slabs overlapping it,
    so contour spacing and grid spacing need not match (a 3 mm contour spacing on a 1 mm grid
    and a 1 mm contour spacing on a 3 mm grid both work, without supersampling along z).

Along z, ``interpolation="shape"`` (default of the grid-free DVH; ``"auto"`` picks it for
small structures)
    Shape-based interpolation (:func:`column_intervals`): each in-plane sample point is the
    foot of a vertical column. Between two consecutive planes the column is inside over the
    whole gap when it is inside both contours, outside when inside neither; when inside one
    only, the boundary z is where a smooth curve through the column's signed in-plane depths
    ``(D, z)`` on the four surrounding planes crosses ``D = 0`` (chordal Catmull-Rom: it
    follows both steep and flat parts of the surface, e.g. a sphere's equator and its poles).
    Depths are measured along one direction per column (outwards from the nearest boundary
    point of the plane the column is outside of), so that a boundary part that does not move
    between planes does not distort the crossing. The first and last gap of a structure end
    either rounded (the surface closes tangentially to the end plane: sphere poles, used when
    the end contour is below 10 % of its neighbour's area) or straight (cone apices, flat ends).
    Sphere of radius 12 mm with contours 3 mm apart: volume -1.6 % (slab), -0.2 % (shape).

End caps
    With ``end_cap=True`` (default; what the Nelms analytical values assume: their objects are
    the true shapes between the first and last contour plus the end contours extruded by half
    a spacing) the first and last contour planes of the structure are extended by half the
    nominal contour spacing outwards, with the end plane's cross-section; with
    ``end_cap=False`` the structure stops exactly at its first and last contour planes (as in
    Eclipse, according to the Nelms data set's notes; a single-plane structure then has zero
    volume). A rounded structure whose end contour is not at its pole is overestimated by the
    flat cap (sphere of radius 15 mm contoured every 6 mm from -12 to 12 mm: +5 % of volume
    in the caps, the true caps hold half of what the flat ones do).

Gaps
    Consecutive contour planes farther apart than ``gap_factor`` times the nominal spacing are
    treated as a gap between two separate pieces, each with its own end caps.

Clipping
    Parts of the structure outside the grid are clipped (they add no occupancy); use
    :func:`contours_bounds_mm` with :meth:`Grid.contains_mm` to check for that.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from tomodose._validate import check_array, check_positive
from tomodose.geometry.grid import Grid
from tomodose.geometry.structures import Structure

__all__ = [
    "rasterise_contours",
    "structure_from_contours",
    "contours_bounds_mm",
    "group_contours_by_plane",
    "slab_bounds_mm",
    "contour_sample_points",
    "column_intervals",
]

log = logging.getLogger(__name__)

#: Points of one contour must share z within this tolerance (mm).
PLANAR_TOLERANCE_MM = 1e-3


def _check_contours(contours) -> list[np.ndarray]:
    if isinstance(contours, np.ndarray) and contours.ndim == 2:
        contours = [contours]
    try:
        items = list(contours)
    except TypeError:
        raise TypeError(
            f"contours must be a sequence of (n_points, 3) arrays, got {type(contours).__name__}"
        ) from None
    out = []
    for k, c in enumerate(items):
        arr = check_array(f"contours[{k}]", c, ndim=2, shape=(None, 3))
        if arr.shape[0] < 3:
            raise ValueError(f"contours[{k}] must have at least 3 points, got {arr.shape[0]}")
        z = arr[:, 2]
        if z.max() - z.min() > PLANAR_TOLERANCE_MM:
            raise ValueError(
                f"contours[{k}] must lie on one axial plane (constant z within "
                f"{PLANAR_TOLERANCE_MM} mm), got z from {z.min()} to {z.max()} mm"
            )
        out.append(arr)
    return out


def contours_bounds_mm(contours) -> tuple[np.ndarray, np.ndarray]:
    """Bounding box ``(lower, upper)`` of all contour points, each (x, y, z) in LPS mm."""
    cs = _check_contours(contours)
    if not cs:
        raise ValueError("contours must not be empty")
    pts = np.concatenate(cs)
    return pts.min(axis=0), pts.max(axis=0)


def group_contours_by_plane(contours, tolerance_mm: float = PLANAR_TOLERANCE_MM):
    """Group contours by their plane.

    Returns
    -------
    list of (z_mm, list of (n, 2) xy arrays), sorted by increasing z.
    """
    cs = _check_contours(contours)
    planes: list[tuple[float, list[np.ndarray]]] = []
    for c in sorted(cs, key=lambda a: float(a[:, 2].mean())):
        z = float(c[:, 2].mean())
        if planes and abs(z - planes[-1][0]) <= max(tolerance_mm, 10 * PLANAR_TOLERANCE_MM):
            planes[-1][1].append(c[:, :2])
        else:
            planes.append((z, [c[:, :2]]))
    return planes


def slab_bounds_mm(
    plane_z_mm: Sequence[float],
    *,
    slice_spacing_mm: float | None = None,
    end_cap: bool = True,
    gap_factor: float = 1.5,
    default_spacing_mm: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Lower and upper z (mm) of the slab each contour plane stands for (see module doc).

    Parameters
    ----------
    plane_z_mm : sequence of float
        Contour plane positions, strictly increasing.
    slice_spacing_mm : float, optional
        Nominal contour spacing; default the median spacing of the planes (or
        ``default_spacing_mm`` for a single plane).
    end_cap : bool
        Extend the first and last plane of each piece by half the nominal spacing.
    gap_factor : float
        Plane spacings above ``gap_factor * spacing`` separate two pieces.

    Returns
    -------
    lower_mm, upper_mm : (n_planes,) float arrays
    spacing_mm : float
        The nominal spacing used.
    """
    z = np.asarray(plane_z_mm, dtype=np.float64)
    if z.ndim != 1 or z.size == 0:
        raise ValueError(f"plane_z_mm must be a non-empty 1-D sequence, got shape {z.shape}")
    if np.any(np.diff(z) <= 0):
        raise ValueError("plane_z_mm must be strictly increasing")
    if slice_spacing_mm is None:
        spacing = float(np.median(np.diff(z))) if z.size > 1 else float(default_spacing_mm)
    else:
        spacing = check_positive("slice_spacing_mm", slice_spacing_mm)
    gap_factor = check_positive("gap_factor", gap_factor)
    half_cap = 0.5 * spacing if end_cap else 0.0
    lower = np.empty_like(z)
    upper = np.empty_like(z)
    for k in range(z.size):
        if k > 0 and z[k] - z[k - 1] <= gap_factor * spacing:
            lower[k] = 0.5 * (z[k] + z[k - 1])
        else:
            lower[k] = z[k] - half_cap
        if k < z.size - 1 and z[k + 1] - z[k] <= gap_factor * spacing:
            upper[k] = 0.5 * (z[k] + z[k + 1])
        else:
            upper[k] = z[k] + half_cap
    return lower, upper, spacing


def _subpoint_box(grid: Grid, xy: np.ndarray, supersample: int):
    """Voxel box (one voxel of margin, clipped to the grid) around the in-plane points ``xy``
    (n, 2) in mm, and the x and y coordinates (mm) of its ``supersample`` sub-points per voxel
    and axis. Returns ``(i0, i1, j0, j1, xs, ys)`` (inclusive index ranges), or None when the
    box misses the grid."""
    dx, dy, _ = grid.spacing_mm
    x0, y0, _ = grid.origin_mm
    i0 = max(int(np.floor((xy[:, 0].min() - x0) / dx + 0.5)) - 1, 0)
    i1 = min(int(np.floor((xy[:, 0].max() - x0) / dx + 0.5)) + 1, grid.nx - 1)
    j0 = max(int(np.floor((xy[:, 1].min() - y0) / dy + 0.5)) - 1, 0)
    j1 = min(int(np.floor((xy[:, 1].max() - y0) / dy + 0.5)) + 1, grid.ny - 1)
    if i1 < i0 or j1 < j0:
        return None
    sub = (np.arange(supersample) + 0.5) / supersample - 0.5
    xs = (x0 + dx * np.arange(i0, i1 + 1)[:, None] + dx * sub[None, :]).ravel()
    ys = (y0 + dy * np.arange(j0, j1 + 1)[:, None] + dy * sub[None, :]).ravel()
    return i0, i1, j0, j1, xs, ys


def _inplane_fraction(grid: Grid, polygons: list[np.ndarray], supersample: int):
    """In-plane occupied fraction of the voxels in the polygons' bounding box.

    Returns ``(j0, i0, frac)`` with ``frac`` of shape (nj, ni), or None when the box misses
    the grid.
    """
    box = _subpoint_box(grid, np.concatenate(polygons), supersample)
    if box is None:
        return None
    i0, i1, j0, j1, xs, ys = box
    s = supersample
    # even-odd scanline over the sub-point rows (exact, O(edges x rows + points log))
    row = np.repeat(np.arange(ys.size), xs.size)
    parity = _inside_subrows(polygons, ys, row, np.tile(xs, ys.size))
    nj, ni = j1 - j0 + 1, i1 - i0 + 1
    frac = parity.reshape(nj, s, ni, s).mean(axis=(1, 3))
    return j0, i0, frac


def rasterise_contours(
    grid: Grid,
    contours,
    *,
    supersample: int = 4,
    slice_spacing_mm: float | None = None,
    end_cap: bool = True,
    gap_factor: float = 1.5,
    interpolation: str = "slab",
    end_shape: str = "auto",
) -> np.ndarray:
    """Fractional occupancy of each voxel of ``grid`` inside planar contours.

    Parameters
    ----------
    grid : Grid
        Target grid (LPS, axis-aligned).
    contours : sequence of (n_points, 3) float arrays
        Closed planar polygons in LPS mm, each at constant z (the closing edge is implied).
        Several polygons may share a plane; the even-odd rule makes nested ones holes.
    supersample : int
        In-plane sub-points per voxel edge (``supersample**2`` per voxel), >= 1. The in-plane
        fraction is exact to about ``1 / supersample**2`` per boundary voxel.
    slice_spacing_mm : float, optional
        Nominal contour spacing used for end caps and gap detection; default the median
        spacing of the contour planes (the grid's z spacing for a single plane).
    end_cap : bool
        Extend the structure by half a contour spacing beyond its first and last planes.
    gap_factor : float
        Planes further apart than ``gap_factor`` x spacing separate two pieces.
    interpolation : {"slab", "shape", "auto"}
        Between contour planes: ``"slab"`` (default) keeps each plane's cross-section over its
        slab; ``"shape"`` interpolates the shape (see :func:`column_intervals`): every in-plane
        sub-point column gets its exact inside z-intervals, integrated over each voxel's z
        extent. More accurate for curved structures at coarse contour spacing (a sphere of
        radius 12 mm with 3 mm contours: volume -1.6 % with slabs, -0.2 % with shapes) but
        10-50 times slower. ``"auto"``: ``"shape"`` when the contours' bounding box is at most
        ``AUTO_SHAPE_MAX_BOX_ML`` (1000 mL), else ``"slab"``.
    end_shape : {"auto", "round", "straight", "conic"}
        End segments of shape-based interpolation (see :func:`column_intervals`).

    Returns
    -------
    (nz, ny, nx) float32 array in [0, 1].
    """
    if not isinstance(grid, Grid):
        raise TypeError(f"grid must be a tomodose Grid, got {type(grid).__name__}")
    if isinstance(supersample, bool) or not isinstance(supersample, (int, np.integer)) or supersample < 1:
        raise ValueError(f"supersample must be an integer >= 1, got {supersample!r}")
    planes = group_contours_by_plane(contours)
    occ = np.zeros(grid.shape, dtype=np.float64)
    if not planes:
        return occ.astype(np.float32)
    _check_choice("interpolation", interpolation, INTERPOLATIONS + ("auto",))
    if interpolation == "auto":
        lo, hi = contours_bounds_mm(contours)
        lo[2] -= 0.5 * (slice_spacing_mm or grid.spacing_mm[2])
        hi[2] += 0.5 * (slice_spacing_mm or grid.spacing_mm[2])
        box_ml = float(np.prod(np.maximum(hi - lo, 0.0))) / 1000.0
        interpolation = "shape" if box_ml <= AUTO_SHAPE_MAX_BOX_ML else "slab"
    if interpolation == "shape":
        _check_choice("end_shape", end_shape, END_SHAPES)
        _rasterise_shape(grid, planes, occ, int(supersample), slice_spacing_mm=slice_spacing_mm,
                         end_cap=end_cap, gap_factor=gap_factor, end_shape=end_shape)
        np.clip(occ, 0.0, 1.0, out=occ)
        return occ.astype(np.float32)
    z_planes = [p[0] for p in planes]
    lower, upper, _ = slab_bounds_mm(
        z_planes, slice_spacing_mm=slice_spacing_mm, end_cap=end_cap, gap_factor=gap_factor,
        default_spacing_mm=grid.spacing_mm[2],
    )
    dz = grid.spacing_mm[2]
    zc = grid.z_mm
    z_lo = zc - 0.5 * dz
    z_hi = zc + 0.5 * dz
    for (z, polys), lo, hi in zip(planes, lower, upper):
        if hi <= lo:
            continue
        overlap = (np.minimum(hi, z_hi) - np.maximum(lo, z_lo)) / dz
        ks = np.nonzero(overlap > 0)[0]
        if ks.size == 0:
            continue
        res = _inplane_fraction(grid, polys, int(supersample))
        if res is None:
            continue
        j0, i0, frac = res
        nj, ni = frac.shape
        for k in ks:
            occ[k, j0:j0 + nj, i0:i0 + ni] += overlap[k] * frac
    np.clip(occ, 0.0, 1.0, out=occ)
    return occ.astype(np.float32)


def structure_from_contours(
    name: str,
    grid: Grid,
    contours,
    *,
    role: str = "",
    color=None,
    **options,
) -> Structure:
    """:class:`Structure` from planar contours; ``options`` go to :func:`rasterise_contours`."""
    occ = rasterise_contours(grid, contours, **options)
    if not np.any(occ > 0):
        lo, hi = contours_bounds_mm(contours)
        log.warning(
            "structure %r: its contours (bounding box %s..%s mm) give no occupancy on the grid",
            name, lo.round(2).tolist(), hi.round(2).tolist(),
        )
    return Structure(name, grid, occ, role=role, color=color)


def _inside_subrows(polys, ys: np.ndarray, row: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Even-odd inside test of points ``(x[i], ys[row[i]])``; ``ys`` regular and increasing.

    Scanline: the crossings of every polygon edge with the rows it spans (half-open in y, so a
    vertex on a row counts once) are listed sparsely and sorted by (row, x); a point is inside
    when an odd number of its row's crossings lie to its left.
    """
    a = np.concatenate(polys)
    b = np.concatenate([np.roll(p, -1, axis=0) for p in polys])
    lo = np.minimum(a[:, 1], b[:, 1])
    hi = np.maximum(a[:, 1], b[:, 1])
    y0 = float(ys[0])
    dy = float(ys[1] - ys[0]) if ys.size > 1 else 1.0
    # rows r with lo <= ys[r] < hi
    r0 = np.clip(np.ceil((lo - y0) / dy - 1e-9).astype(np.int64), 0, ys.size)
    r1 = np.clip(np.ceil((hi - y0) / dy - 1e-9).astype(np.int64), 0, ys.size)
    # exact half-open check at the ends (guards rounding)
    r0 = np.where((r0 > 0) & (ys[np.maximum(r0 - 1, 0)] >= lo), r0 - 1, r0)
    r1 = np.where((r1 < ys.size) & (ys[np.minimum(r1, ys.size - 1)] < hi), r1 + 1, r1)
    n = np.maximum(r1 - r0, 0)
    if n.sum() == 0:
        return np.zeros(x.size, dtype=bool)
    e = np.repeat(np.arange(a.shape[0]), n)
    rows = r0[e] + (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n))
    yr = ys[rows]
    keep = (lo[e] <= yr) & (yr < hi[e])
    e, rows, yr = e[keep], rows[keep], yr[keep]
    xc = a[e, 0] + (yr - a[e, 1]) * (b[e, 0] - a[e, 0]) / (b[e, 1] - a[e, 1])
    shift = 1.0 + max(float(np.abs(xc).max(initial=0.0)), float(np.abs(x).max(initial=0.0)))
    width = 4.0 * shift
    keys = np.sort(rows * width + (xc + shift))
    starts = np.searchsorted(keys, np.arange(ys.size) * width)
    left = np.searchsorted(keys, row * width + (x + shift)) - starts[row]
    return (left % 2) == 1


def contour_sample_points(
    contours,
    *,
    resolution_mm: float = 0.2,
    resolution_z_mm: float | None = None,
    slice_spacing_mm: float | None = None,
    end_cap: bool = True,
    gap_factor: float = 1.5,
    default_spacing_mm: float = 1.0,
    jitter: bool = True,
    seed: int = 0,
    min_samples_per_plane: int = 10_000,
    interpolation: str = "slab",
    end_shape: str = "auto",
    chunk: int = 1_000_000,
):
    """Point samples filling the structure, for grid-free DVHs (even-odd rule per plane).

    ``interpolation="slab"`` (default here) samples the slab model described below;
    ``interpolation="shape"`` samples the shape-based interpolation of
    :func:`column_intervals` (``end_shape`` as there): one common jittered in-plane lattice of
    columns (pitch ``resolution_mm``, finer when the structure's bounding box holds fewer than
    ``min_samples_per_plane`` cells), each inside interval of a column divided into equal
    layers of at most ``resolution_z_mm`` with one jittered point per layer, carrying the
    layer's exact volume (``chunk`` points per yielded chunk).

    In-plane, points lie in the cells of a square lattice of pitch ``resolution_mm`` and are
    kept when inside an odd number of the plane's polygons; along z, each contour plane's slab
    (see :func:`slab_bounds_mm`) is divided into ``ceil(thickness / resolution_z_mm)`` equal
    layers, so the slab extents (and end caps) are exact.

    With ``jitter=True`` (default) the sampling is *stratified*: each point sits at a
    pseudo-random position inside its cell (x per point and y per lattice row, per plane; z per
    point), drawn from a generator seeded with ``seed`` (reproducible). Regular points would make the DVH of a dose gradient
    aligned with the lattice a staircase of steps ``gradient x pitch``; jittered points make it
    smooth and unbiased. With ``jitter=False`` points sit at the cell centres.

    Planes whose bounding box would hold fewer than ``min_samples_per_plane`` lattice cells get
    a finer pitch (so that they hold about that many): small cross-sections (apices, poles,
    small structures) are sampled as precisely as large ones.

    Yields
    ------
    points_mm : (n, 3) float64 array
        LPS positions (x, y, z) in mm.
    volume_ml : (n,) float64 array
        Volume each point stands for (mL).
    """
    h = check_positive("resolution_mm", resolution_mm)
    hz = h if resolution_z_mm is None else check_positive("resolution_z_mm", resolution_z_mm)
    planes = group_contours_by_plane(contours)
    if not planes:
        return
    lower, upper, _ = slab_bounds_mm(
        [p[0] for p in planes], slice_spacing_mm=slice_spacing_mm, end_cap=end_cap,
        gap_factor=gap_factor, default_spacing_mm=default_spacing_mm,
    )
    rng = np.random.default_rng(seed)
    if _check_choice("interpolation", interpolation, INTERPOLATIONS) == "shape":
        yield from _shape_sample_points(
            planes, h, hz, rng, jitter=jitter, min_samples=min_samples_per_plane, chunk=chunk,
            end_shape=end_shape, slice_spacing_mm=slice_spacing_mm, end_cap=end_cap,
            gap_factor=gap_factor, default_spacing_mm=default_spacing_mm,
        )
        return
    for (z, polys), lo, hi in zip(planes, lower, upper):
        if hi <= lo:
            continue
        hp, xs, ys, y0 = _sample_lattice(np.concatenate(polys), h, min_samples_per_plane)
        if jitter:
            # y is jittered on n_sub sub-rows per lattice row (so the inside test stays a scanline)
            n_sub = 64
            sub_y = (y0 + (hp / n_sub) * (np.arange(ys.size * n_sub) + 0.5))
            row = (np.arange(ys.size) * n_sub)[:, None] + rng.integers(0, n_sub, size=(ys.size, xs.size))
            px = xs[None, :] + rng.uniform(-0.5 * hp, 0.5 * hp, size=(ys.size, xs.size))
            row, px = row.ravel(), px.ravel()
        else:
            sub_y = ys
            row = np.repeat(np.arange(ys.size), xs.size)
            px = np.tile(xs, ys.size)
        inside = _inside_subrows(polys, sub_y, row, px)
        pts = np.column_stack([px[inside], sub_y[row[inside]]])
        if pts.shape[0] == 0:
            continue
        n_z = max(1, int(np.ceil((hi - lo) / hz - 1e-9)))
        t = (hi - lo) / n_z
        zs = lo + t * (np.arange(n_z) + 0.5)
        out = np.empty((pts.shape[0] * n_z, 3))
        out[:, :2] = np.tile(pts, (n_z, 1))
        out[:, 2] = np.repeat(zs, pts.shape[0])
        if jitter:
            out[:, 2] += rng.uniform(-0.5 * t, 0.5 * t, size=out.shape[0])
        yield out, np.full(out.shape[0], hp * hp * t / 1000.0)


# --------------------------------------------------------------------------------------------
# Shape-based interpolation between contour planes
# --------------------------------------------------------------------------------------------

#: interpolation models between contour planes
INTERPOLATIONS = ("slab", "shape")
#: ``interpolation="auto"`` of :func:`rasterise_contours`: shape-based interpolation for
#: structures whose contours' bounding box holds at most this volume (mL), the slab model for
#: larger ones (whose slab error is small relative to their volume and where shape-based
#: interpolation costs most: a 20 L body outline on a 512 x 512 CT takes ~35 s instead of ~4 s)
AUTO_SHAPE_MAX_BOX_ML = 1000.0
#: end-segment models for shape-based interpolation
END_SHAPES = ("auto", "round", "straight", "conic")
#: ``end_shape="auto"``: an end plane whose cross-section is below this fraction of its
#: neighbour's closes the structure (pole / apex, rounded end segment)
CLOSING_AREA_FRACTION = 0.1


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def _segment_distances(polys, px: np.ndarray, py: np.ndarray, chunk: int = 4_000_000) -> np.ndarray:
    """Exact Euclidean distance of points ``(px, py)`` to the edges of ``polys`` (mm)."""
    a = np.concatenate(polys)
    b = np.concatenate([np.roll(p, -1, axis=0) for p in polys])
    ab = b - a
    l2 = np.maximum(np.einsum("ij,ij->i", ab, ab), 1e-300)
    out = np.empty(px.size)
    step = max(1, chunk // max(a.shape[0], 1))
    for s in range(0, px.size, step):
        qx = px[s:s + step, None] - a[None, :, 0]
        qy = py[s:s + step, None] - a[None, :, 1]
        t = np.clip((qx * ab[None, :, 0] + qy * ab[None, :, 1]) / l2[None, :], 0.0, 1.0)
        ex = qx - t * ab[None, :, 0]
        ey = qy - t * ab[None, :, 1]
        out[s:s + step] = np.sqrt((ex * ex + ey * ey).min(axis=1))
    return out


def _edges(polys):
    a = np.concatenate(polys)
    b = np.concatenate([np.roll(p, -1, axis=0) for p in polys])
    return (np.ascontiguousarray(a[:, 0]), np.ascontiguousarray(a[:, 1]),
            np.ascontiguousarray(b[:, 0]), np.ascontiguousarray(b[:, 1]))


def _nearest_points(polys, px: np.ndarray, py: np.ndarray):
    """Nearest point ``(qx, qy)`` on the edges of ``polys`` to each point ``(px, py)``."""
    from tomodose._kernels.contours import nearest_points

    return nearest_points(*_edges(polys), np.ascontiguousarray(px, dtype=np.float64),
                          np.ascontiguousarray(py, dtype=np.float64))


def _ray_depth(polys, px, py, nx, ny, inside) -> np.ndarray:
    """Signed depth of points along a direction: distance to the plane's contour boundary
    along ``+n`` for points inside (positive), minus the distance along ``-n`` for points
    outside; the Euclidean distance (signed) where the line misses the boundary that way."""
    from tomodose._kernels.contours import ray_depth

    f = [np.ascontiguousarray(v, dtype=np.float64) for v in (px, py, nx, ny)]
    out = ray_depth(*_edges(polys), *f, np.ascontiguousarray(inside, dtype=np.bool_))
    miss = ~np.isfinite(out)
    if np.any(miss):
        out[miss] = _segment_distances(polys, px[miss], py[miss])
    return np.where(inside, out, -out)


def _catmull_rom_zero(P: np.ndarray, n_iter: int = 40) -> np.ndarray:
    """z where a chordal Catmull-Rom curve through 4 points crosses ``D = 0``.

    ``P`` has shape (4, m, 2): points ``(D, z)`` (signed in-plane depth, plane z) of m
    columns; the curve segment runs from ``P[1]`` to ``P[2]``, whose ``D`` have opposite signs
    (Barry-Goldman pyramid, chordal parametrisation, bisection on the curve parameter).
    """
    eps = 1e-9
    t0 = np.zeros(P.shape[1])
    t1 = t0 + np.maximum(np.linalg.norm(P[1] - P[0], axis=-1), eps)
    t2 = t1 + np.maximum(np.linalg.norm(P[2] - P[1], axis=-1), eps)
    t3 = t2 + np.maximum(np.linalg.norm(P[3] - P[2], axis=-1), eps)

    def point(f):
        u = (t1 + (t2 - t1) * f)[:, None]
        a1 = ((t1[:, None] - u) * P[0] + (u - t0[:, None]) * P[1]) / (t1 - t0)[:, None]
        a2 = ((t2[:, None] - u) * P[1] + (u - t1[:, None]) * P[2]) / (t2 - t1)[:, None]
        a3 = ((t3[:, None] - u) * P[2] + (u - t2[:, None]) * P[3]) / (t3 - t2)[:, None]
        b1 = ((t2[:, None] - u) * a1 + (u - t0[:, None]) * a2) / (t2 - t0)[:, None]
        b2 = ((t3[:, None] - u) * a2 + (u - t1[:, None]) * a3) / (t3 - t1)[:, None]
        return ((t2[:, None] - u) * b1 + (u - t1[:, None]) * b2) / (t2 - t1)[:, None]

    lo = np.zeros(P.shape[1])
    hi = np.ones(P.shape[1])
    s_lo = np.sign(P[1, :, 0])
    for _ in range(n_iter):
        mid = 0.5 * (lo + hi)
        d = point(mid)[:, 0]
        same = np.sign(d) == s_lo
        lo = np.where(same, mid, lo)
        hi = np.where(same, hi, mid)
    z = point(0.5 * (lo + hi))[:, 1]
    return np.clip(z, np.minimum(P[1, :, 1], P[2, :, 1]), np.maximum(P[1, :, 1], P[2, :, 1]))


def _conic_end_zero(d_end, d_1, d_2, z_end: float, step: float) -> np.ndarray:
    """Boundary z in the end gap of a structure, from a conic profile through the end plane.

    Along each column, with ``t`` the distance from the end plane, the depth in the end gap is
    modelled as ``(D(t) - d_end)**2 = a t + b t**2``: a conic section through the end plane's
    point, fitted to the next two planes (``d_1`` at ``t = step``, ``d_2`` at ``2 step``). It
    holds exactly for a sphere or ellipsoid pole on the end plane (``D - d_end`` ~ square root
    of ``t``), a cone apex and a straight wall (``a = 0``: linear), and follows the cap of any
    smooth convex end (locally a quadric). Where the fit gives no crossing in the gap the
    crossing is linear between the end plane and its neighbour.
    """
    h = abs(step)
    q1 = (d_1 - d_end) ** 2
    q2 = (d_2 - d_end) ** 2
    b = (q2 - 2.0 * q1) / (2.0 * h * h)
    a = (4.0 * q1 - q2) / (2.0 * h)
    c = d_end * d_end
    # b t^2 + a t - c = 0, root in (0, h]
    disc = a * a + 4.0 * b * c
    with np.errstate(invalid="ignore", divide="ignore"):
        sq = np.sqrt(np.maximum(disc, 0.0))
        # numerically stable root of the increasing branch: t = 2c / (a + sqrt(disc))
        t = np.where(a + sq > 0, 2.0 * c / (a + sq), np.nan)
    lin = h * np.clip(-d_end / np.where(np.abs(d_1 - d_end) > 1e-300, d_1 - d_end, 1e-300), 0.0, 1.0)
    ok = (disc >= 0) & np.isfinite(t) & (t >= 0) & (t <= h) & ((d_2 - d_end) * (d_1 - d_end) > 0)
    t = np.where(ok, t, lin)
    return z_end + np.sign(step) * t


def _pieces(z: np.ndarray, spacing: float, gap_factor: float) -> list[tuple[int, int]]:
    """Index ranges ``[a, b)`` of the planes of each piece (split at gaps)."""
    starts = [0] + [k for k in range(1, z.size) if z[k] - z[k - 1] > gap_factor * spacing]
    ends = starts[1:] + [z.size]
    return list(zip(starts, ends))


def column_intervals(
    planes,
    px: np.ndarray,
    py_row: np.ndarray,
    row: np.ndarray,
    *,
    interpolation: str = "shape",
    end_shape: str = "auto",
    slice_spacing_mm: float | None = None,
    end_cap: bool = True,
    gap_factor: float = 1.5,
    default_spacing_mm: float = 1.0,
):
    """z-intervals inside the structure along vertical columns through in-plane points.

    Parameters
    ----------
    planes : list of (z_mm, list of (n, 2) arrays)
        From :func:`group_contours_by_plane`.
    px : (m,) float array
        x (mm) of each column.
    py_row, row : float array, (m,) int array
        y (mm) of each column is ``py_row[row]``; ``py_row`` regular and increasing (scanline).
    interpolation : {"shape", "slab"}
        ``"slab"``: each plane's cross-section fills its slab (see :func:`slab_bounds_mm`).
        ``"shape"``: shape-based interpolation. Between two planes a column is inside over the
        whole gap when it is inside both, outside when inside neither; when inside one only,
        the boundary z is where a chordal Catmull-Rom curve through the column's ``(D, z)``
        points of the 4 surrounding planes crosses ``D = 0`` (``D`` = signed in-plane distance
        to the plane's contours, positive inside, measured along one direction per column:
        outwards from the nearest boundary point of the plane the column is outside of).
        Smooth shapes are followed between planes (a sphere or a rotated cylinder sampled
        every 3 mm to about 0.2 %).
    end_shape : {"auto", "round", "straight", "conic"}
        Shape of the first and last gap of each piece. ``"round"`` puts the spline's phantom
        point at the reflection of the neighbour plane's point about the end plane's (the
        surface closes tangentially to the end plane: sphere poles); ``"straight"``
        extrapolates linearly (cone apices, flat ends); ``"auto"`` (default): ``"round"`` when
        the end plane's cross-section is below ``CLOSING_AREA_FRACTION`` (0.1) of its
        neighbour's (the structure closes there), else ``"straight"``. ``"conic"``: per column,
        a conic ``(D - D_end)**2 = a t + b t**2`` through the end plane's depth, fitted to the
        next two planes (exact for sphere / ellipsoid poles on the end plane, cone apices and
        straight walls; see :func:`_conic_end_zero`); pieces of two planes as ``"auto"``.
    end_cap, slice_spacing_mm, gap_factor, default_spacing_mm
        As in :func:`slab_bounds_mm`; caps extend the first/last plane's cross-section.

    Returns
    -------
    col, z0, z1 : 1-D arrays
        Column index and lower/upper z (mm) of each inside interval (disjoint per column).
    """
    _check_choice("interpolation", interpolation, INTERPOLATIONS)
    _check_choice("end_shape", end_shape, END_SHAPES)
    zp = np.array([p[0] for p in planes], dtype=np.float64)
    lower, upper, spacing = slab_bounds_mm(
        zp, slice_spacing_mm=slice_spacing_mm, end_cap=end_cap, gap_factor=gap_factor,
        default_spacing_mm=default_spacing_mm,
    )
    m = px.size
    ins = np.zeros((zp.size, m), dtype=bool)
    for k, (_, polys) in enumerate(planes):
        ins[k] = _inside_subrows(polys, py_row, row, px)
    cols, z0s, z1s = [], [], []

    def add(mask, a, b):
        idx = np.nonzero(mask)[0]
        if idx.size:
            cols.append(idx)
            z0s.append(np.broadcast_to(np.asarray(a, float), idx.shape) if np.ndim(a) == 0 else a)
            z1s.append(np.broadcast_to(np.asarray(b, float), idx.shape) if np.ndim(b) == 0 else b)

    if interpolation == "slab":
        for k in range(zp.size):
            if upper[k] > lower[k]:
                add(ins[k], lower[k], upper[k])
    else:
        py = py_row[row]
        area = ins.sum(axis=1)

        for a, b in _pieces(zp, spacing, gap_factor):
            # caps (and single-plane pieces): the end plane's cross-section
            if b - a == 1:
                if upper[a] > lower[a]:
                    add(ins[a], lower[a], upper[a])
                continue
            if zp[a] > lower[a]:
                add(ins[a], lower[a], zp[a])
            if upper[b - 1] > zp[b - 1]:
                add(ins[b - 1], zp[b - 1], upper[b - 1])
            round_lo = end_shape == "round" or (
                end_shape in ("auto", "conic") and area[a] < CLOSING_AREA_FRACTION * area[a + 1])
            round_hi = end_shape == "round" or (
                end_shape in ("auto", "conic") and area[b - 1] < CLOSING_AREA_FRACTION * area[b - 2])
            for k in range(a, b - 1):
                both = ins[k] & ins[k + 1]
                add(both, zp[k], zp[k + 1])
                idx = np.nonzero(ins[k] != ins[k + 1])[0]
                if idx.size == 0:
                    continue
                # direction: from the nearest boundary point of the plane the column is
                # outside of, through the column (outwards); depths are measured along it
                cx, cy = px[idx], py[idx]
                qx, qy = np.empty(idx.size), np.empty(idx.size)
                for j in (k, k + 1):
                    sel = ~ins[j, idx]
                    if np.any(sel):
                        qx[sel], qy[sel] = _nearest_points(planes[j][1], cx[sel], cy[sel])
                nx, ny = cx - qx, cy - qy
                norm = np.hypot(nx, ny)
                tiny = norm < 1e-12
                nx = np.where(tiny, 1.0, nx / np.where(tiny, 1.0, norm))
                ny = np.where(tiny, 0.0, ny / np.where(tiny, 1.0, norm))

                def depth(j):
                    return _ray_depth(planes[j][1], cx, cy, nx, ny, ins[j, idx])

                d1, d2 = depth(k), depth(k + 1)
                p1 = np.stack([d1, np.full(idx.size, zp[k])], axis=-1)
                p2 = np.stack([d2, np.full(idx.size, zp[k + 1])], axis=-1)
                if k - 1 >= a:
                    p0 = np.stack([depth(k - 1), np.full(idx.size, zp[k - 1])], axis=-1)
                elif round_lo:
                    p0 = np.stack([2 * d1 - d2, np.full(idx.size, zp[k + 1])], axis=-1)
                else:
                    p0 = 2 * p1 - p2
                if k + 2 < b:
                    p3 = np.stack([depth(k + 2), np.full(idx.size, zp[k + 2])], axis=-1)
                elif round_hi:
                    p3 = np.stack([2 * d2 - d1, np.full(idx.size, zp[k])], axis=-1)
                else:
                    p3 = 2 * p2 - p1
                zc = _catmull_rom_zero(np.stack([p0, p1, p2, p3]))
                if end_shape == "conic" and b - a >= 3 and (k == a or k + 2 == b):
                    # end segment: power law through the end plane and its two neighbours
                    if k == a:
                        zc = _conic_end_zero(d1, d2, depth(k + 2), zp[k], zp[k + 1] - zp[k])
                    else:
                        zc = _conic_end_zero(d2, d1, depth(k - 1), zp[k + 1], zp[k] - zp[k + 1])
                lower_in = ins[k, idx]
                cols.append(idx)
                z0s.append(np.where(lower_in, zp[k], zc))
                z1s.append(np.where(lower_in, zc, zp[k + 1]))
    if not cols:
        e = np.zeros(0)
        return np.zeros(0, dtype=np.int64), e, e
    return (np.concatenate(cols).astype(np.int64), np.concatenate(z0s).astype(float),
            np.concatenate(z1s).astype(float))


def _sample_lattice(xy, h, min_samples):
    """In-plane sample lattice over the bounding box of the points ``xy`` (mm).

    Spacing ``h``, refined so that at least ``min_samples`` points cover a small box; returns the
    spacing, the cell-centre coordinates along x and y and the lattice's lower y edge.
    """
    span = np.maximum(xy.max(axis=0) - xy.min(axis=0), 1e-6)
    hp = h
    if span[0] * span[1] / (h * h) < min_samples:
        hp = max(float(np.sqrt(span[0] * span[1] / min_samples)), 1e-4)
    x0, y0 = np.floor(xy.min(axis=0) / hp) * hp
    x1, y1 = np.ceil(xy.max(axis=0) / hp) * hp
    xs = x0 + hp * (np.arange(max(1, int(round((x1 - x0) / hp)))) + 0.5)
    ys = y0 + hp * (np.arange(max(1, int(round((y1 - y0) / hp)))) + 0.5)
    return hp, xs, ys, y0


def _shape_sample_points(planes, h, hz, rng, *, jitter, min_samples, chunk, **options):
    """Samples of the shape-interpolated structure (see :func:`contour_sample_points`)."""
    hp, xs, ys, y0 = _sample_lattice(np.concatenate([np.concatenate(p[1]) for p in planes]), h, min_samples)
    if jitter:
        n_sub = 64
        sub_y = y0 + (hp / n_sub) * (np.arange(ys.size * n_sub) + 0.5)
        row = (np.arange(ys.size) * n_sub)[:, None] + rng.integers(0, n_sub, size=(ys.size, xs.size))
        px = xs[None, :] + rng.uniform(-0.5 * hp, 0.5 * hp, size=(ys.size, xs.size))
        row, px = row.ravel(), px.ravel()
    else:
        sub_y = ys
        row = np.repeat(np.arange(ys.size), xs.size)
        px = np.tile(xs, ys.size)
    col, z0, z1 = column_intervals(planes, px, sub_y, row, **options)
    keep = z1 > z0
    col, z0, z1 = col[keep], z0[keep], z1[keep]
    if col.size == 0:
        return
    n = np.maximum(1, np.ceil((z1 - z0) / hz - 1e-9).astype(np.int64))
    t = (z1 - z0) / n
    cum = np.concatenate([[0], np.cumsum(n)])
    # split the intervals into groups of about `chunk` points
    bounds = np.searchsorted(cum, np.arange(0, cum[-1], max(int(chunk), 1)), side="right") - 1
    bounds = np.unique(np.concatenate([bounds, [col.size]]))
    for s, e in zip(bounds[:-1], bounds[1:]):
        ni = n[s:e]
        rep = np.repeat(np.arange(s, e), ni)
        layer = np.arange(rep.size) - np.repeat(cum[s:e] - cum[s], ni)
        u = rng.uniform(0.0, 1.0, size=rep.size) if jitter else np.full(rep.size, 0.5)
        z = z0[rep] + t[rep] * (layer + u)
        c = col[rep]
        out = np.column_stack([px[c], sub_y[row[c]], z])
        yield out, hp * hp * t[rep] / 1000.0


def _rasterise_shape(grid: Grid, planes, occ: np.ndarray, s: int, **options) -> None:
    """Add the shape-interpolated occupancy of ``planes`` to ``occ`` (in place)."""
    box = _subpoint_box(grid, np.concatenate([np.concatenate(p[1]) for p in planes]), s)
    if box is None:
        return
    i0, i1, j0, j1, xs, ys = box
    dz = grid.spacing_mm[2]
    z0g = grid.origin_mm[2]
    row = np.repeat(np.arange(ys.size), xs.size)
    px = np.tile(xs, ys.size)
    col, za, zb = column_intervals(planes, px, ys, row, default_spacing_mm=dz, **options)
    keep = zb > za
    col, za, zb = col[keep], za[keep], zb[keep]
    if col.size == 0:
        return
    # voxel (j, i) of each column, flattened over the full grid plane
    vj = j0 + (col // xs.size) // s
    vi = i0 + (col % xs.size) // s
    v2 = vj * grid.nx + vi
    lo_edge = z0g - 0.5 * dz
    k_first = np.floor((za - lo_edge) / dz).astype(np.int64)
    k_last = np.floor((zb - lo_edge) / dz - 1e-12).astype(np.int64)
    n2 = grid.ny * grid.nx
    flat = occ.reshape(grid.nz, n2)
    w = 1.0 / (s * s)
    for o in range(int((k_last - k_first).max()) + 1):
        k = k_first + o
        ok = (k <= k_last) & (k >= 0) & (k < grid.nz)
        if not np.any(ok):
            continue
        kk = k[ok]
        zlo = lo_edge + kk * dz
        ov = (np.minimum(zb[ok], zlo + dz) - np.maximum(za[ok], zlo)) / dz
        pos = ov > 0
        idx = kk[pos] * n2 + v2[ok][pos]
        flat.ravel()[:] += np.bincount(idx, weights=ov[pos] * w, minlength=grid.nz * n2)
