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
