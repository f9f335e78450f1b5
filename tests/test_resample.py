import numpy as np
import pytest
import SimpleITK as sitk

from tomodose.geometry.grid import Grid, ImageVolume
from tomodose.geometry.resample import (
    from_sitk,
    grid_from_sitk,
    resample_array,
    resample_mask,
    resample_occupancy,
    resample_volume,
    to_sitk,
)


@pytest.fixture
def vol():
    g = Grid((5, 6, 7), (1.0, 2.0, 3.0), (10.0, -20.0, 30.0))
    a = np.random.default_rng(1).random(g.shape)
    return ImageVolume(g, a, "Gy", "dose")


def test_identity_is_exact(vol):
    out = resample_volume(vol, vol.grid)
    np.testing.assert_array_equal(out.array, vol.array)
    # same geometry through SimpleITK (tiny origin change below tolerance of same_as(1e-9) is not taken)
    g = Grid(vol.grid.shape, vol.grid.spacing_mm, tuple(o + 1e-7 for o in vol.grid.origin_mm))
    out2 = resample_volume(vol, g)
    np.testing.assert_allclose(out2.array, vol.array, atol=1e-6)


def test_known_shift(vol):
    g = vol.grid
    # shift by one voxel in x and two in z: values move accordingly, outside gets default
    g2 = Grid(g.shape, g.spacing_mm, (g.origin_mm[0] + 1.0, g.origin_mm[1], g.origin_mm[2] + 6.0))
    out = resample_volume(vol, g2, default_value=-5.0)
    np.testing.assert_allclose(out.array[:-2, :, :-1], vol.array[2:, :, 1:], atol=1e-12)
    assert np.all(out.array[-2:] == -5.0)
    # half-voxel shift in y: linear interpolation = mean of neighbours
    g3 = Grid(g.shape, g.spacing_mm, (g.origin_mm[0], g.origin_mm[1] + 1.0, g.origin_mm[2]))
    out3 = resample_array(vol.array, g, g3)
    np.testing.assert_allclose(out3[:, :-1, :], 0.5 * (vol.array[:, :-1, :] + vol.array[:, 1:, :]), atol=1e-12)


def test_masks_and_occupancy(vol):
    g = vol.grid
    m = np.zeros(g.shape, bool)
    m[1:4, 2:5, 2:6] = True
    fine = Grid((9, 11, 13), (0.5, 1.0, 1.5), g.origin_mm)
    mn = resample_mask(m, g, fine)
    assert mn.dtype == bool
    back = resample_mask(mn, fine, g)
    np.testing.assert_array_equal(back, m)
    ml = resample_mask(m, g, fine, method="linear")
    assert ml.dtype == bool and ml.sum() > 0
    occ = resample_occupancy(m.astype(np.float32), g, fine)
    assert occ.dtype == np.float32 and occ.min() >= 0 and occ.max() <= 1
    # volume approximately kept
    assert occ.sum() * fine.voxel_volume_ml == pytest.approx(m.sum() * g.voxel_volume_ml, rel=0.25)


def test_sitk_round_trip_and_reorientation(vol):
    img = to_sitk(vol)
    assert img.GetOrigin() == vol.grid.origin_mm and img.GetSpacing() == vol.grid.spacing_mm
    back = from_sitk(img, "Gy", "dose")
    assert back.grid == vol.grid
    np.testing.assert_array_equal(back.array, vol.array)
    flipped = sitk.Flip(img, [True, False, True])
    assert flipped.GetDirection() != img.GetDirection()
    back2 = from_sitk(flipped, "Gy")
    assert back2.grid.same_as(vol.grid)
    np.testing.assert_array_equal(back2.array, vol.array)
    permuted = sitk.PermuteAxes(img, [2, 0, 1])
    back3 = from_sitk(permuted, "Gy")
    assert back3.grid.same_as(vol.grid)
    np.testing.assert_array_equal(back3.array, vol.array)


def test_oblique_refused_or_resampled(vol):
    img = to_sitk(vol)
    c, s = np.cos(0.3), np.sin(0.3)
    img.SetDirection((c, -s, 0, s, c, 0, 0, 0, 1))
    with pytest.raises(ValueError, match="oblique"):
        from_sitk(img, "Gy")
    with pytest.raises(ValueError, match="direction must be the identity"):
        grid_from_sitk(img)
    out = from_sitk(img, "Gy", oblique="resample")
    assert out.grid.frame == "LPS" and out.array.max() > 0


def test_bad_inputs(vol):
    with pytest.raises(ValueError, match=r"interpolation must be one of \['linear', 'nearest', 'bspline'\], got 'cubic'"):
        resample_volume(vol, vol.grid, interpolation="cubic")
    with pytest.raises(ValueError, match="array must have the source grid shape"):
        resample_array(np.zeros((2, 2, 2)), vol.grid, vol.grid)
    with pytest.raises(ValueError, match="threshold must be in"):
        resample_mask(np.zeros(vol.grid.shape, bool), vol.grid, vol.grid, method="linear", threshold=1.5)
    with pytest.raises(TypeError, match="image must be a SimpleITK.Image"):
        from_sitk(np.zeros((2, 2, 2)), "Gy")
