import numpy as np
import pytest
import SimpleITK as sitk

from tomodose.geometry.grid import Grid, ImageVolume
from tomodose.geometry.structures import Structure
from tomodose.io.export import export_structure, export_volume, import_volume


@pytest.fixture
def asym():
    # asymmetric shape, spacing and origin; distinct values so any flip is caught
    g = Grid((5, 7, 9), (1.25, 2.5, 3.0), (-101.3, 47.9, -250.25))
    arr = np.arange(g.n_voxels, dtype=np.float32).reshape(g.shape) * 0.01
    return ImageVolume(g, arr, "Gy", "dose")


@pytest.mark.parametrize("suffix", [".mha", ".nrrd", ".nii", ".nii.gz"])
def test_round_trip_keeps_geometry(tmp_path, asym, suffix):
    path = export_volume(asym, tmp_path / f"dose{suffix}")
    assert path.is_file()
    back = import_volume(path, unit="Gy" if suffix.startswith(".nii") else None)
    assert back.grid.shape == asym.grid.shape
    np.testing.assert_allclose(back.grid.origin_mm, asym.grid.origin_mm, atol=0.01)
    np.testing.assert_allclose(back.grid.spacing_mm, asym.grid.spacing_mm, atol=0.01)
    np.testing.assert_array_equal(back.array, asym.array)
    assert back.unit == "Gy"
    # the physical position of a given voxel is preserved
    img = sitk.ReadImage(str(path))
    i, j, k = 8, 1, 3
    value = sitk.GetArrayViewFromImage(img)
    idx = img.TransformPhysicalPointToIndex(tuple(float(v) for v in asym.grid.index_to_lps((k, j, i))))
    assert value[idx[2], idx[1], idx[0]] == pytest.approx(asym.array[k, j, i])


def test_nifti_is_ras_on_disk_but_lps_in_memory(tmp_path, asym):
    path = export_volume(asym, tmp_path / "d.nii")
    raw = path.read_bytes()
    # NIfTI-1 header: qoffset_x at byte 268 (float32). ITK writes RAS, so x is negated.
    qx = np.frombuffer(raw[268:272], dtype="<f4")[0]
    assert qx == pytest.approx(-asym.grid.origin_mm[0], abs=0.01)
    back = import_volume(path, unit="Gy")
    np.testing.assert_allclose(back.grid.origin_mm, asym.grid.origin_mm, atol=0.01)


def test_metadata_and_masks(tmp_path, asym):
    back = import_volume(export_volume(asym, tmp_path / "d.mha"))
    assert back.unit == "Gy" and back.quantity == "dose"
    m = np.zeros(asym.grid.shape, bool)
    m[1:3, 2:6, 3:8] = True
    s = Structure("PTV", asym.grid, m)
    mask = import_volume(export_structure(s, tmp_path / "ptv.nrrd"))
    assert mask.unit == "mask"
    np.testing.assert_array_equal(mask.array.astype(bool), m)
    occ = import_volume(export_structure(s, tmp_path / "ptv_occ.mha", threshold=None))
    np.testing.assert_array_equal(occ.array, m.astype(np.float32))


def test_bad_inputs(tmp_path, asym):
    with pytest.raises(ValueError, match=r"path must end with one of \['.mha', '.nrrd', '.nii', '.nii.gz'\]"):
        export_volume(asym, tmp_path / "d.png")
    with pytest.raises(TypeError, match="volume must be an ImageVolume"):
        export_volume(asym.array, tmp_path / "d.mha")
    with pytest.raises(FileNotFoundError, match="output folder"):
        export_volume(asym, tmp_path / "nope" / "d.mha")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        import_volume(tmp_path / "missing.mha")
    nii = export_volume(asym, tmp_path / "d.nii.gz")
    with pytest.raises(ValueError, match="does not record its unit"):
        import_volume(nii)
    junk = tmp_path / "junk.mha"
    junk.write_text("garbage")
    with pytest.raises(ValueError, match="cannot be read as an image"):
        import_volume(junk)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.nii.gz", "junk.mha"]
