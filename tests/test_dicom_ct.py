"""CT series import: HU, LPS geometry, orientation handling, tilt/irregular/oblique, bad files."""

from __future__ import annotations

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from tomodose.io.dicom import DicomError, list_ct_series, read_ct_series  # noqa: E402

from tests._dicom_synth import axial_positions, write_ct_series  # noqa: E402

pytestmark = pytest.mark.dicom


def _lattice(ipps, iop, pixel_spacing, rows, cols):
    """LPS position (n, rows, cols, 3) of every pixel of a series."""
    row, col = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    ii = np.arange(cols)[None, None, :, None]
    jj = np.arange(rows)[None, :, None, None]
    p = np.asarray(ipps, float)[:, None, None, :]
    return p + ii * pixel_spacing[1] * row + jj * pixel_spacing[0] * col


def _linear(p):
    """A linear HU field of LPS position, reproduced exactly by trilinear interpolation."""
    return 3.0 * p[..., 0] - 2.0 * p[..., 1] + 5.0 * p[..., 2] + 40.0


def test_axial_series_hu_and_geometry(tmp_path):
    n, rows, cols = 5, 6, 7
    hu = np.random.default_rng(1).integers(-1000, 2500, (n, rows, cols)).astype(float)
    intercepts = [-1024, -1000, -1024, -500, -1024]
    write_ct_series(tmp_path, hu, ipps=axial_positions(n, (-10.5, 20.25, -30.0), 2.5),
                    pixel_spacing=(1.5, 0.75), intercepts=intercepts)
    series = read_ct_series(tmp_path)
    g = series.grid
    assert g.shape == (n, rows, cols)
    assert g.spacing_mm == (0.75, 1.5, 2.5)  # PixelSpacing = row spacing (y) \ column spacing (x)
    np.testing.assert_allclose(g.origin_mm, (-10.5, 20.25, -30.0))
    assert series.volume.unit == "HU"
    np.testing.assert_array_equal(series.volume.array, hu)
    assert not series.resampled
    assert series.patient_position == "HFS"
    assert series.reference.frame_of_reference_uid


def test_rescale_slope_applied(tmp_path):
    hu = np.array([[[-1000.0, 0.0], [40.0, 1500.0]]] * 2)
    write_ct_series(tmp_path, hu, ipps=axial_positions(2), slope=0.5, intercepts=[-1024, -1024])
    np.testing.assert_allclose(read_ct_series(tmp_path).volume.array, hu)


@pytest.mark.parametrize("iop", [
    (-1, 0, 0, 0, 1, 0),   # feet-first style: rows along -x, normal -z
    (1, 0, 0, 0, -1, 0),   # columns along -y
    (0, 1, 0, 1, 0, 0),    # transposed: rows along +y, columns along +x
    (-1, 0, 0, 0, -1, 0),  # rotated 180 deg in plane
])
def test_flipped_and_permuted_orientations_are_exact(tmp_path, iop):
    n, rows, cols = 4, 5, 6
    spacing = (1.25, 0.8)
    normal = np.cross(iop[:3], iop[3:])
    ipps = [np.array([3.0, -7.0, 11.0]) + k * 2.0 * normal for k in range(n)]
    pts = _lattice(ipps, iop, spacing, rows, cols)
    hu = np.rint(_linear(pts))
    write_ct_series(tmp_path, hu, ipps=ipps, iop=iop, pixel_spacing=spacing)
    series = read_ct_series(tmp_path)
    assert not series.resampled
    g = series.grid
    x, y, z = g.meshgrid_mm()
    expected = np.rint(_linear(np.stack(np.broadcast_arrays(x, y, z), axis=-1)))
    np.testing.assert_array_equal(series.volume.array, expected)
    # the set of voxel centres is the same as the file's pixel centres
    np.testing.assert_allclose(sorted(g.x_mm), sorted(set(np.round(pts[..., 0].ravel(), 6))), atol=1e-6)


def _tilted(tmp_path, tilt_deg=15.0):
    n, rows, cols = 6, 12, 10
    t = np.radians(tilt_deg)
    iop = (1, 0, 0, 0, np.cos(t), np.sin(t))
    # slices stacked along z (table motion) while the image plane is tilted
    ipps = [np.array([-5.0, -6.0, 20.0 + 3.0 * k]) for k in range(n)]
    spacing = (1.0, 1.0)
    pts = _lattice(ipps, iop, spacing, rows, cols)
    write_ct_series(tmp_path, np.rint(_linear(pts)), ipps=ipps, iop=[round(v, 8) for v in iop],
                    pixel_spacing=spacing, extra={"GantryDetectorTilt": str(tilt_deg)})
    return pts


def _check_linear_inside(series, pts, tol=0.6):
    g = series.grid
    x, y, z = g.meshgrid_mm()
    p = np.stack(np.broadcast_arrays(x, y, z), axis=-1)
    inside = series.volume.array != -1000.0
    assert inside.sum() > 0.2 * inside.size
    np.testing.assert_allclose(series.volume.array[inside], _linear(p)[inside], atol=tol)


def test_gantry_tilt_refused_then_resampled(tmp_path):
    pts = _tilted(tmp_path)
    with pytest.raises(DicomError, match="gantry-tilted.*resample=True"):
        read_ct_series(tmp_path)
    series = read_ct_series(tmp_path, resample=True, progress=False)
    assert series.resampled and "gantry-tilted" in series.notes[0]
    _check_linear_inside(series, pts)


def test_irregular_spacing_refused_then_resampled(tmp_path):
    n, rows, cols = 7, 5, 6
    zs = [0.0, 2.0, 4.0, 8.0, 10.0, 12.0, 14.0]  # slice at z=6 missing
    ipps = [np.array([0.0, 0.0, z]) for z in zs]
    spacing = (1.0, 1.0)
    pts = _lattice(ipps, (1, 0, 0, 0, 1, 0), spacing, rows, cols)
    write_ct_series(tmp_path, np.rint(_linear(pts)), ipps=ipps, pixel_spacing=spacing)
    with pytest.raises(DicomError, match="irregular slice spacing"):
        read_ct_series(tmp_path)
    series = read_ct_series(tmp_path, resample=True, progress=False)
    assert series.grid.spacing_mm[2] == pytest.approx(2.0)
    assert series.grid.nz == 8
    _check_linear_inside(series, pts)


def test_oblique_refused_then_resampled(tmp_path):
    a = np.radians(30.0)
    iop = (np.cos(a), np.sin(a), 0, -np.sin(a), np.cos(a), 0)
    n, rows, cols = 4, 10, 10
    ipps = [np.array([0.0, 0.0, 2.0 * k]) for k in range(n)]
    pts = _lattice(ipps, iop, (1.0, 1.0), rows, cols)
    write_ct_series(tmp_path, np.rint(_linear(pts)), ipps=ipps, iop=[round(v, 10) for v in iop])
    with pytest.raises(DicomError, match="oblique orientation"):
        read_ct_series(tmp_path)
    series = read_ct_series(tmp_path, resample=True, spacing_mm=(1.0, 1.0, 2.0), progress=False)
    _check_linear_inside(series, pts)


def test_several_series_and_selection(tmp_path):
    hu = np.zeros((3, 4, 4))
    write_ct_series(tmp_path, hu, ipps=axial_positions(3), prefix="A")
    b = write_ct_series(tmp_path, hu + 100, ipps=axial_positions(3), prefix="B")
    assert sorted(s["n_slices"] for s in list_ct_series(tmp_path)) == [3, 3]
    with pytest.raises(DicomError, match="holds 2 CT series"):
        read_ct_series(tmp_path)
    s = read_ct_series(tmp_path, series_uid=b["series_uid"])
    assert np.all(s.volume.array == 100)
    with pytest.raises(DicomError, match="is not among"):
        read_ct_series(tmp_path, series_uid="1.2.3")


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_ct_series(tmp_path / "absent")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DicomError, match="holds no CT images"):
        read_ct_series(tmp_path)


def test_non_dicom_files_are_ignored(tmp_path):
    write_ct_series(tmp_path, np.zeros((2, 3, 3)), ipps=axial_positions(2))
    (tmp_path / "README.txt").write_text("not a slice")
    assert read_ct_series(tmp_path).grid.shape == (2, 3, 3)


def test_duplicate_positions(tmp_path):
    write_ct_series(tmp_path, np.zeros((3, 3, 3)), ipps=[(0, 0, 0), (0, 0, 2), (0, 0, 2)])
    with pytest.raises(DicomError, match="share the position"):
        read_ct_series(tmp_path)


def test_missing_position_and_wrong_vr(tmp_path):
    write_ct_series(tmp_path, np.zeros((3, 3, 3)), ipps=axial_positions(3))
    f = sorted(tmp_path.iterdir())[1]
    ds = pydicom.dcmread(f)
    del ds.ImagePositionPatient
    ds.save_as(f)
    with pytest.raises(DicomError, match=r"ImagePositionPatient \(0020,0032\)"):
        read_ct_series(tmp_path)
    ds.ImagePositionPatient = ["1", "2", "3"]
    ds.save_as(f)
    f.write_bytes(f.read_bytes().replace(b"1\\2\\3", b"a\\b\\c", 1))  # DS that are not numbers
    with pytest.raises(DicomError, match="ImagePositionPatient"):
        read_ct_series(tmp_path)


def test_truncated_slice(tmp_path):
    write_ct_series(tmp_path, np.zeros((3, 8, 8)), ipps=axial_positions(3))
    f = sorted(tmp_path.iterdir())[1]
    raw = f.read_bytes()
    f.write_bytes(raw[:-40])
    with pytest.raises(DicomError):
        read_ct_series(tmp_path)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(min_value=0, max_value=600), pos=st.integers(min_value=0, max_value=5000),
       byte=st.integers(min_value=0, max_value=255))
def test_fuzzed_slice_gives_clear_error(tmp_path_factory, cut, pos, byte):
    folder = tmp_path_factory.mktemp("ctfuzz")
    write_ct_series(folder, np.zeros((3, 8, 8)), ipps=axial_positions(3))
    f = sorted(folder.iterdir())[1]
    raw = bytearray(f.read_bytes())
    raw[pos % len(raw)] = byte
    f.write_bytes(bytes(raw[: len(raw) - cut]))
    try:
        series = read_ct_series(folder)
    except DicomError:
        pass
    else:
        assert series.volume.array.shape[1:] == (8, 8) or series.volume.array.ndim == 3


def test_slice_position_tolerance(tmp_path):
    """Positions written with one decimal (1.25 mm slices) are irregular at 0.01 mm, fine at 0.1 mm."""
    zs = [round(1.25 * k, 1) for k in range(5)]  # 0.0, 1.2 (banker's), 2.5, 3.8, 5.0
    write_ct_series(tmp_path, np.zeros((5, 3, 3)), ipps=[(0.0, 0.0, z) for z in zs])
    with pytest.raises(DicomError, match=r"irregular slice spacing.*tolerance_mm=0.01"):
        read_ct_series(tmp_path)
    series = read_ct_series(tmp_path, tolerance_mm=0.1)
    assert series.grid.spacing_mm[2] == pytest.approx(1.25, abs=0.06)
    assert not series.resampled
