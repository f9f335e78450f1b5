import numpy as np
import pytest

from tomodose.geometry.grid import Grid, ImageVolume
from tomodose.geometry.structures import Structure, StructureSet, ellipsoid_mask, expand_margin


def test_grid_axes_and_index_round_trip():
    g = Grid(shape=(4, 5, 6), spacing_mm=(1.0, 2.0, 3.0), origin_mm=(-5.0, 10.0, 100.0))
    assert g.nx == 6 and g.ny == 5 and g.nz == 4
    np.testing.assert_allclose(g.x_mm, -5 + np.arange(6))
    np.testing.assert_allclose(g.y_mm, 10 + 2 * np.arange(5))
    np.testing.assert_allclose(g.z_mm, 100 + 3 * np.arange(4))
    kji = np.array([[1, 2, 3], [3.5, 0, 5]])
    p = g.index_to_lps(kji)
    np.testing.assert_allclose(p[0], [-5 + 3, 10 + 4, 100 + 3])
    np.testing.assert_allclose(g.lps_to_index(p), kji)
    assert g.voxel_volume_ml == pytest.approx(0.006)


def test_grid_from_extent_centres():
    g = Grid.from_extent((-10, -20, -30), (10, 20, 30), (2.5, 2.5, 5))
    assert g.shape == (13, 17, 9)
    np.testing.assert_allclose(g.centre_mm, (0, 0, 0), atol=1e-12)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(shape=(2, 2), spacing_mm=(1, 1, 1)), "shape must be 3 integers"),
        (dict(shape=(2, 0, 2), spacing_mm=(1, 1, 1)), "shape must have all entries >= 1"),
        (dict(shape=(2, 2, 2), spacing_mm=(1, 0, 1)), "spacing_mm must have all entries > 0"),
        (dict(shape=(2, 2, 2), spacing_mm=(1, np.nan, 1)), "spacing_mm must be finite"),
        (dict(shape=(2, 2, 2), spacing_mm=(1, 1, 1), origin_mm=(0, np.inf, 0)), "origin_mm must be finite"),
        (dict(shape=(2, 2, 2), spacing_mm=(1, 1, 1), frame="RAS"), "frame must be one of \\['LPS'\\], got 'RAS'"),
    ],
)
def test_grid_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Grid(**kwargs)


def test_image_volume_checks_shape_and_finite():
    g = Grid((2, 3, 4), (1, 1, 1))
    with pytest.raises(ValueError, match=r"array must have shape \(2, 3, 4\), got \(4, 3, 2\)"):
        ImageVolume(g, np.zeros((4, 3, 2)), "HU")
    bad = np.zeros((2, 3, 4))
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="array must be finite, got 1 NaN/inf"):
        ImageVolume(g, bad, "HU")
    marked = ImageVolume(g, bad, "1", "gamma", allow_nonfinite=True)
    assert np.isnan(marked.array[0, 0, 0])
    assert marked.with_array(bad).allow_nonfinite


def test_structure_volume_and_sphere():
    g = Grid.from_extent((-30, -30, -30), (30, 30, 30), (1, 1, 1))
    s = Structure("sphere", g, ellipsoid_mask(g, (0, 0, 0), (20, 20, 20)))
    assert s.volume_ml == pytest.approx(4 / 3 * np.pi * 20**3 / 1000, rel=0.01)
    np.testing.assert_allclose(s.centroid_mm(), (0, 0, 0), atol=1e-9)


def test_structure_bad_occupancy():
    g = Grid((2, 2, 2), (1, 1, 1))
    with pytest.raises(ValueError, match="occupancy of structure 'x' must be <= 1.0"):
        Structure("x", g, np.full(g.shape, 2.0))


def test_margin_is_an_ellipsoid_in_mm():
    g = Grid.from_extent((-30, -30, -30), (30, 30, 30), (1, 1.5, 2))
    point = np.zeros(g.shape, bool)
    point[g.nz // 2, g.ny // 2, g.nx // 2] = True
    grown = expand_margin(point, g, (12, 6, 10))
    expected = ellipsoid_mask(g, (0, 0, 0), (12 + 1e-6, 6 + 1e-6, 10 + 1e-6))
    np.testing.assert_array_equal(grown, expected)


def test_margin_of_sphere_lies_between_spheres():
    # voxel-centre semantics: the grown mask is inside the ball of radius R + m and contains
    # the ball of radius R + m - (half voxel diagonal), the discretisation of the GTV surface.
    g = Grid.from_extent((-40, -40, -40), (40, 40, 40), (2, 2, 2))
    gtv = ellipsoid_mask(g, (0, 0, 0), (15, 15, 15))
    ptv = expand_margin(gtv, g, 10.0)
    outer = ellipsoid_mask(g, (0, 0, 0), (25 + 1e-6,) * 3)
    inner = ellipsoid_mask(g, (0, 0, 0), (25 - np.sqrt(3),) * 3)
    assert np.all(outer[ptv])
    assert np.all(ptv[inner])
    assert np.all(ptv[gtv])


def test_margin_zero_axis_does_not_grow():
    g = Grid.from_extent((-10, -10, -10), (10, 10, 10), (1, 1, 1))
    m = np.zeros(g.shape, bool)
    m[10, 10, 10] = True
    grown = expand_margin(m, g, (3, 3, 0))
    assert grown[9].sum() == 0 and grown[11].sum() == 0 and grown[10].sum() > 1


def test_margin_bad_input():
    g = Grid((3, 3, 3), (1, 1, 1))
    with pytest.raises(ValueError, match="margin_mm must be >= 0, got -1.0"):
        expand_margin(np.zeros(g.shape, bool), g, -1)
    with pytest.raises(ValueError, match=r"margin_mm\[y\] must be >= 0"):
        expand_margin(np.zeros(g.shape, bool), g, (1, -2, 1))


def test_structure_set_rejects_other_grid_and_duplicates():
    g = Grid((3, 3, 3), (1, 1, 1))
    g2 = Grid((3, 3, 3), (2, 1, 1))
    ss = StructureSet(g, [Structure("a", g, np.ones(g.shape))])
    with pytest.raises(ValueError, match="already in the set"):
        ss.add(Structure("a", g, np.ones(g.shape)))
    with pytest.raises(ValueError, match="must be on the same grid"):
        ss.add(Structure("b", g2, np.ones(g.shape)))
    with pytest.raises(KeyError, match="no structure named 'c'"):
        ss["c"]
    assert ss.volumes_ml() == {"a": pytest.approx(0.027)}
