"""Planar contours -> fractional occupancy (tomodose.geometry.contours)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tomodose.geometry.contours import (
    _inside_subrows, contour_sample_points, rasterise_contours, slab_bounds_mm, structure_from_contours,
)
from tomodose.geometry.grid import Grid


def square(x0, y0, x1, y1, z):
    return np.array([[x0, y0, z], [x1, y0, z], [x1, y1, z], [x0, y1, z]], dtype=float)


def circle(cx, cy, r, z, n=720):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.column_stack([cx + r * np.cos(t), cy + r * np.sin(t), np.full(n, z)])


GRID = Grid((10, 20, 20), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))  # voxel edges at k - 0.5


def test_square_on_voxel_edges_is_exact():
    occ = rasterise_contours(GRID, [square(2.5, 3.5, 7.5, 9.5, 4.0)], supersample=4, end_cap=True,
                             slice_spacing_mm=1.0)
    assert occ.dtype == np.float32
    assert occ[4, 4:10, 3:8].min() == 1.0
    assert occ.sum() == pytest.approx(5 * 6)
    assert occ[3].sum() == 0 and occ[5].sum() == 0


def test_half_voxel_offset_gives_half_occupancy():
    occ = rasterise_contours(GRID, [square(3.0, 3.5, 7.0, 4.5, 4.0)], supersample=4, slice_spacing_mm=1.0)
    # x from 3.0 to 7.0 -> voxels 3 and 7 half inside, 4..6 full
    np.testing.assert_allclose(occ[4, 4, 3:8], [0.5, 1, 1, 1, 0.5])


def test_hole_even_odd_and_several_polygons_per_plane():
    outer = square(0.5, 0.5, 10.5, 10.5, 2.0)
    hole = square(3.5, 3.5, 6.5, 6.5, 2.0)
    island = square(4.5, 4.5, 5.5, 5.5, 2.0)
    other = square(13.5, 13.5, 15.5, 15.5, 2.0)
    occ = rasterise_contours(GRID, [outer, hole, island, other], slice_spacing_mm=1.0)
    assert occ.sum() == pytest.approx(100 - 9 + 1 + 4)
    assert occ[2, 4, 4] == 0.0 and occ[2, 5, 5] == 1.0 and occ[2, 14, 14] == 1.0


def test_circle_area_with_supersampling():
    g = Grid((1, 40, 40), (1.0, 1.0, 1.0), (-19.5, -19.5, 0.0))
    occ = rasterise_contours(g, [circle(0.3, -0.2, 12.0, 0.0)], supersample=8, slice_spacing_mm=1.0)
    assert occ.sum() == pytest.approx(math.pi * 144, rel=2e-3)


def test_contour_spacing_coarser_than_grid_with_and_without_end_caps():
    # 3 mm contour spacing, 5 planes z=0..12, on a 1 mm grid: slab model
    planes = [square(2.5, 2.5, 6.5, 6.5, z) for z in (0.0, 3.0, 6.0, 9.0, 12.0)]
    g = Grid((30, 10, 10), (1.0, 1.0, 1.0), (0.0, 0.0, -5.0))
    capped = rasterise_contours(g, planes)
    uncapped = rasterise_contours(g, planes, end_cap=False)
    area = 16.0
    assert capped.sum() == pytest.approx(area * 5 * 3.0)  # -1.5 .. 13.5
    assert uncapped.sum() == pytest.approx(area * 12.0)  # 0 .. 12
    # partial voxels at the cap: voxel z=-1 spans [-1.5, -0.5] fully, z=-2 none
    assert capped[4, 4, 4] == pytest.approx(1.0) and capped[3, 4, 4] == 0.0
    assert uncapped[5, 4, 4] == pytest.approx(0.5)  # voxel at z=0 half inside


def test_contour_spacing_finer_than_grid():
    planes = [square(2.5, 2.5, 6.5, 6.5, z) for z in np.arange(0.0, 12.01, 0.5)]
    g = Grid((6, 10, 10), (1.0, 1.0, 3.0), (0.0, 0.0, 0.0))  # voxels [-1.5,1.5], ...
    occ = rasterise_contours(g, planes)  # structure -0.25 .. 12.25
    assert occ.sum() * 3.0 == pytest.approx(16.0 * 12.5)
    assert occ[0, 4, 4] == pytest.approx(1.75 / 3.0)


def test_gap_between_pieces_gets_own_end_caps():
    lo, hi, sp = slab_bounds_mm([0.0, 1.0, 2.0, 10.0, 11.0])
    assert sp == 1.0
    np.testing.assert_allclose(lo, [-0.5, 0.5, 1.5, 9.5, 10.5])
    np.testing.assert_allclose(hi, [0.5, 1.5, 2.5, 10.5, 11.5])


def test_structure_partly_outside_grid_is_clipped():
    occ = rasterise_contours(GRID, [square(-5.5, -5.5, 2.5, 2.5, 0.0)], slice_spacing_mm=1.0)
    assert occ.sum() == pytest.approx(3 * 3)  # 3x3 voxels inside the grid, slab [-0.5, 0.5]
    assert occ[0, 0, 0] == pytest.approx(1.0)  # slab [-0.5, 0.5] covers voxel 0 fully


def test_structure_outside_grid_warns_and_is_empty(caplog):
    s = structure_from_contours("far", GRID, [square(100, 100, 110, 110, 0.0)])
    assert s.is_empty
    assert "no occupancy" in caplog.text


@pytest.mark.parametrize("bad,match", [
    ([np.array([[0, 0, 0], [1, 0, 1], [1, 1, 0]], float)], "one axial plane"),
    ([np.array([[0, 0, 0], [1, 0, 0]], float)], "at least 3 points"),
    ([np.zeros((4, 2))], "shape"),
    ([np.array([[0, 0, np.nan], [1, 0, 0], [1, 1, 0]])], "finite"),
])
def test_bad_contours(bad, match):
    with pytest.raises(ValueError, match=match):
        rasterise_contours(GRID, bad)


def test_bad_supersample_and_grid():
    with pytest.raises(ValueError, match="supersample"):
        rasterise_contours(GRID, [square(1, 1, 2, 2, 0)], supersample=0)
    with pytest.raises(TypeError, match="grid"):
        rasterise_contours("grid", [square(1, 1, 2, 2, 0)])


def test_sample_points_volume_and_reproducibility():
    planes = [circle(0, 0, 10.0, z) for z in np.arange(0.0, 20.01, 2.0)]
    parts = list(contour_sample_points(planes, resolution_mm=0.25))
    vol = sum(w.sum() for _, w in parts)
    assert vol == pytest.approx(math.pi * 100 * 22 / 1000.0, rel=2e-3)  # mL, end caps 1 mm each
    pts = np.concatenate([p for p, _ in parts])
    assert pts[:, 2].min() >= -1.0 and pts[:, 2].max() <= 21.0
    again = np.concatenate([p for p, _ in contour_sample_points(planes, resolution_mm=0.25)])
    np.testing.assert_array_equal(pts, again)


def test_scanline_inside_matches_matplotlib_even_odd():
    from matplotlib.path import Path

    rng = np.random.default_rng(0)
    t = np.linspace(0, 2 * np.pi, 50, endpoint=False)
    r = 10 + 3 * rng.uniform(size=50)
    star = np.column_stack([r * np.cos(t), r * np.sin(t)])
    hole = np.array([[-2, -2], [2, -2], [2, 2], [-2, 2.0]])
    far = np.array([[20, 20], [24, 20], [22, 23.0]])
    ys = np.linspace(-14, 25, 300) + 0.0137
    row = rng.integers(0, ys.size, 60000)
    x = rng.uniform(-14, 25, 60000)
    got = _inside_subrows([star, hole, far], ys, row, x)
    pts = np.column_stack([x, ys[row]])
    ref = Path(star).contains_points(pts) ^ Path(hole).contains_points(pts) ^ Path(far).contains_points(pts)
    np.testing.assert_array_equal(got, ref)
    assert got.sum() > 1000


# --- shape-based interpolation between planes ---------------------------------------------------

from tomodose.geometry.contours import _catmull_rom_zero, column_intervals, group_contours_by_plane  # noqa: E402


def sphere_planes(r, spacing, cx=0.3, cy=-0.2, n=360):
    """Circles of a sphere of radius r centred at z=0, one every `spacing` mm pole to pole
    (the poles as tiny circles, as in the Nelms 2015 set)."""
    zs = np.arange(-r, r + 1e-9, spacing)
    return [circle(cx, cy, max(math.sqrt(max(r * r - z * z, 0.0)), 0.16), z, n) for z in zs]


def test_catmull_rom_zero_on_collinear_points_is_linear():
    # points (D, z) on D = 2 z - 1: the chordal spline is the line, crossing at z = 0.5
    P = np.array([[-3.0, -1.0], [-1.0, 0.0], [1.0, 1.0], [3.0, 2.0]])[:, None, :]
    assert _catmull_rom_zero(P)[0] == pytest.approx(0.5, abs=1e-9)


def test_shape_interpolation_of_identical_planes_equals_slab():
    planes = [square(2.5, 2.5, 6.5, 6.5, z) for z in (0.0, 3.0, 6.0, 9.0, 12.0)]
    g = Grid((30, 10, 10), (1.0, 1.0, 1.0), (0.0, 0.0, -5.0))
    np.testing.assert_allclose(rasterise_contours(g, planes, interpolation="shape"),
                               rasterise_contours(g, planes), atol=1e-6)


def test_shape_interpolation_sphere_volume_beats_slab_at_3mm_spacing():
    # sphere R 12 mm, contours 3 mm apart, 1 mm grid: slab model -1.5 % (hand check: midpoint
    # rule of the areas), shape-based interpolation -0.2 %
    g = Grid((40, 40, 40), (1.0, 1.0, 1.0), (-19.5, -19.5, -19.5))
    true = 4.0 / 3.0 * math.pi * 12.0 ** 3
    planes = sphere_planes(12.0, 3.0)
    slab = rasterise_contours(g, planes).sum() / true - 1
    shape = rasterise_contours(g, planes, interpolation="shape").sum() / true - 1
    assert slab < -0.012
    assert abs(shape) < 0.003


def test_shape_interpolation_volume_converges_with_supersampling():
    # sphere R 12 mm, 2 mm contours, 3 mm grid: the in-plane error falls as supersample grows
    g = Grid((14, 14, 14), (3.0, 3.0, 3.0), (-19.5, -19.5, -19.5))
    true = 4.0 / 3.0 * math.pi * 12.0 ** 3
    planes = sphere_planes(12.0, 2.0)
    err = [abs(rasterise_contours(g, planes, interpolation="shape", supersample=s).sum() * 27 / true - 1)
           for s in (2, 4, 8)]
    assert err[0] > err[1] > err[2]
    assert err[2] < 1e-3


def test_shape_interpolation_cone_is_exact_with_straight_ends():
    # cone apex at z=0, base radius 10 at z=12 (flat end: cap of half a spacing), contours every
    # 3 mm: linear radius -> the spline through collinear profile points is the cone itself
    zs = np.arange(0.0, 12.01, 3.0)
    planes = [circle(0.0, 0.0, max(10.0 * z / 12.0, 0.01), z, 360) for z in zs]
    pts = list(contour_sample_points(planes, resolution_mm=0.2, interpolation="shape"))
    vol = sum(w.sum() for _, w in pts) * 1000.0
    true = math.pi * 100 * 12 / 3 + math.pi * 100 * 1.5  # cone + base cap
    assert vol == pytest.approx(true, rel=3e-3)


def test_rotated_cylinder_rectangles_follow_the_circle():
    # cylinder R 12 along y: z-planes hold rectangles of half-width sqrt(R^2 - z^2), 3 mm apart;
    # the slab model loses 4.6 % (hand check: trapezoid of the chords), shape-based < 0.5 %
    zs = np.arange(-12.0, 12.01, 3.0)
    planes = [square(-max(math.sqrt(max(144 - z * z, 0)), 0.005), -12, max(math.sqrt(max(144 - z * z, 0)), 0.005),
                     12, z) for z in zs]
    true = math.pi * 144 * 24
    slab = sum(w.sum() for _, w in contour_sample_points(planes, resolution_mm=0.2)) * 1000
    shape = sum(w.sum() for _, w in contour_sample_points(planes, resolution_mm=0.2, interpolation="shape")) * 1000
    assert slab / true - 1 == pytest.approx(-0.046, abs=0.003)
    assert abs(shape / true - 1) < 0.005


def test_column_intervals_are_disjoint_and_end_shapes_differ():
    planes = group_contours_by_plane(sphere_planes(6.0, 3.0, n=180))
    ys = np.arange(-7.0, 7.0, 0.25) + 0.01
    xs = np.arange(-7.0, 7.0, 0.25) + 0.02
    row = np.repeat(np.arange(ys.size), xs.size)
    px = np.tile(xs, ys.size)
    vols = {}
    for end in ("round", "straight"):
        col, z0, z1 = column_intervals(planes, px, ys, row, end_shape=end)
        assert np.all(z1 >= z0)
        order = np.lexsort((z0, col))
        c, a, b = col[order], z0[order], z1[order]
        same = c[1:] == c[:-1]
        assert np.all(a[1:][same] >= b[:-1][same] - 1e-9)
        vols[end] = float((z1 - z0).sum() * 0.0625)
    assert vols["round"] > vols["straight"]  # rounded poles hold more volume
    auto = column_intervals(planes, px, ys, row)  # tiny pole contours: round
    assert float((auto[2] - auto[1]).sum() * 0.0625) == pytest.approx(vols["round"])


def test_bad_interpolation_options():
    with pytest.raises(ValueError, match="interpolation"):
        rasterise_contours(GRID, [square(1, 1, 2, 2, 0)], interpolation="cubic")
    with pytest.raises(ValueError, match="end_shape"):
        rasterise_contours(GRID, [square(1, 1, 2, 2, 0)], interpolation="shape", end_shape="flat")
    with pytest.raises(ValueError, match="interpolation"):
        list(contour_sample_points([square(1, 1, 2, 2, 0)], interpolation="spline"))


def test_contour_kernels_match_naive_twins():
    from tests.naive import contours as naive
    from tomodose._kernels import contours as kern

    rng = np.random.default_rng(3)
    t = np.sort(rng.uniform(0, 2 * np.pi, 40))
    r = 5 + 2 * rng.uniform(size=40)
    a = np.column_stack([r * np.cos(t), r * np.sin(t)])
    b = np.roll(a, -1, axis=0)
    edges = (a[:, 0].copy(), a[:, 1].copy(), b[:, 0].copy(), b[:, 1].copy())
    px, py = rng.uniform(-8, 8, 500), rng.uniform(-8, 8, 500)
    ang = rng.uniform(0, 2 * np.pi, 500)
    nx, ny = np.cos(ang), np.sin(ang)
    from matplotlib.path import Path

    inside = Path(a).contains_points(np.column_stack([px, py]))
    assert 50 < inside.sum() < 450
    for got, ref in zip(kern.nearest_points(*edges, px, py), naive.nearest_points(*edges, px, py)):
        np.testing.assert_allclose(got, ref, atol=1e-9)
    got = kern.ray_depth(*edges, px, py, nx, ny, inside)
    ref = naive.ray_depth(*edges, px, py, nx, ny, inside)
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(ref))
    np.testing.assert_allclose(got[np.isfinite(got)], ref[np.isfinite(ref)], atol=1e-9)
    assert np.all(np.isfinite(got[inside]))  # a line from inside always leaves the polygon


def test_auto_interpolation_is_shape_for_small_and_slab_for_large_structures():
    g = Grid((40, 40, 40), (1.0, 1.0, 1.0), (-19.5, -19.5, -19.5))
    small = sphere_planes(12.0, 3.0)
    np.testing.assert_array_equal(rasterise_contours(g, small, interpolation="auto"),
                                  rasterise_contours(g, small, interpolation="shape"))
    big = [circle(0.0, 0.0, 100.0, z, 90) for z in np.arange(-60.0, 61.0, 3.0)]  # ~3.8 L box
    gb = Grid((10, 10, 10), (25.0, 25.0, 15.0), (-112.5, -112.5, -67.5))
    np.testing.assert_array_equal(rasterise_contours(gb, big, interpolation="auto"),
                                  rasterise_contours(gb, big, interpolation="slab"))


def test_conic_end_model_hand_computed():
    from tomodose.geometry.contours import _conic_end_zero

    # depth D(t) = -1 + 2 sqrt(t) (a sphere-like pole: (D + 1)^2 = 4 t): crossing at t = 0.25
    d = lambda t: -1.0 + 2.0 * np.sqrt(t)  # noqa: E731
    args = (np.array([d(0.0)]), np.array([d(1.0)]), np.array([d(2.0)]))
    assert _conic_end_zero(*args, 10.0, 1.0)[0] == pytest.approx(10.25)
    assert _conic_end_zero(*args, 10.0, -1.0)[0] == pytest.approx(9.75)
    # straight wall D(t) = -1 + 2 t: crossing at t = 0.5
    lin = (np.array([-1.0]), np.array([1.0]), np.array([3.0]))
    assert _conic_end_zero(*lin, 0.0, 1.0)[0] == pytest.approx(0.5)


def test_conic_end_shape_sphere_volume():
    planes = sphere_planes(12.0, 3.0)
    true = 4.0 / 3.0 * math.pi * 12.0 ** 3
    vols = {e: sum(w.sum() for _, w in contour_sample_points(planes, resolution_mm=0.2, interpolation="shape",
                                                             end_shape=e)) * 1000 / true - 1
            for e in ("conic", "straight")}
    assert abs(vols["conic"]) < 0.002
    assert vols["straight"] < -0.01  # the poles are lost
