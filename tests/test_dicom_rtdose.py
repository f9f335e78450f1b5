"""RT Dose export/import: geometry, scaling, offsets, malformed files (fuzzed), CT frame chain."""

from __future__ import annotations

import os

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from tomodose.geometry.grid import Grid, ImageVolume  # noqa: E402
from tomodose.io.dicom import DicomError, DicomReference, read_ct_series, read_rtdose, read_rtdose_info, write_rtdose  # noqa: E402

from tests._dicom_synth import axial_positions, write_ct_series  # noqa: E402

pytestmark = pytest.mark.dicom


def _dose(shape=(5, 7, 9), spacing=(2.5, 3.0, 2.0), origin=(-100.123, 20.456, -33.3), seed=0):
    grid = Grid(shape, spacing, origin)
    arr = np.random.default_rng(seed).random(shape) * 60.0
    return ImageVolume(grid, arr, "Gy", "dose")


def test_round_trip_geometry_and_values(tmp_path):
    dose = _dose()
    path = write_rtdose(dose, tmp_path / "RD.dcm")
    back, info = read_rtdose_info(path)
    assert back.grid.shape == dose.grid.shape
    np.testing.assert_allclose(back.grid.origin_mm, dose.grid.origin_mm, atol=1e-6)
    np.testing.assert_allclose(back.grid.spacing_mm, dose.grid.spacing_mm, atol=1e-9)
    scaling = float(pydicom.dcmread(path).DoseGridScaling)
    assert np.max(np.abs(back.array - dose.array)) <= 0.5 * scaling + 1e-12
    assert back.unit == "Gy" and info.dose_type == "PHYSICAL" and not info.offsets_absolute


def test_header_attributes(tmp_path):
    dose = _dose()
    ref = DicomReference(frame_of_reference_uid="1.2.3.4.5", study_instance_uid="1.2.3.4.6",
                         patient_id="P1", patient_name="Doe^J")
    path = write_rtdose(dose, tmp_path / "RD.dcm", reference=ref, referenced_plan_uid="1.2.3.9")
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.481.2"
    assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.Modality == "RTDOSE"
    assert ds.FrameOfReferenceUID == "1.2.3.4.5" and ds.StudyInstanceUID == "1.2.3.4.6"
    assert ds.PatientID == "P1"
    dx, dy, dz = dose.grid.spacing_mm
    # PixelSpacing is row spacing (along y) \ column spacing (along x)
    assert [float(v) for v in ds.PixelSpacing] == [dy, dx]
    assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient], dose.grid.origin_mm, atol=1e-6)
    gfov = np.array([float(v) for v in ds.GridFrameOffsetVector])
    assert gfov[0] == 0.0
    np.testing.assert_allclose(np.diff(gfov), dz)
    assert (ds.Rows, ds.Columns, int(ds.NumberOfFrames)) == (7, 9, 5)
    assert ds.BitsAllocated == 32 and ds.PixelRepresentation == 0
    assert ds.DoseUnits == "GY" and ds.DoseType == "PHYSICAL" and ds.DoseSummationType == "PLAN"
    assert ds.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID == "1.2.3.9"
    assert "RescaleSlope" not in ds
    assert ds.FrameIncrementPointer == pydicom.tag.Tag(0x3004, 0x000C)
    # the dose as a viewer computes it: pixel x DoseGridScaling, frame k at z0 + offset k
    arr = ds.pixel_array.astype(float) * float(ds.DoseGridScaling)
    assert arr.shape == dose.grid.shape
    np.testing.assert_allclose(arr, dose.array, atol=float(ds.DoseGridScaling))
    assert arr.max() == pytest.approx(dose.array.max(), rel=1e-8)


def test_zero_dose_and_error_type(tmp_path):
    grid = Grid((2, 3, 4), (1.0, 1.0, 1.0))
    zero = ImageVolume(grid, np.zeros(grid.shape), "Gy")
    assert np.all(read_rtdose(write_rtdose(zero, tmp_path / "z.dcm")).array == 0)
    diff = ImageVolume(grid, np.linspace(-2, 3, grid.n_voxels).reshape(grid.shape), "Gy")
    back, info = read_rtdose_info(write_rtdose(diff, tmp_path / "e.dcm", dose_type="ERROR"))
    assert info.dose_type == "ERROR"
    np.testing.assert_allclose(back.array, diff.array, atol=1e-8)


def test_writer_validation(tmp_path):
    grid = Grid((2, 3, 4), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="dose unit must be 'Gy'"):
        write_rtdose(ImageVolume(grid, np.ones(grid.shape), "cGy"), tmp_path / "a.dcm")
    with pytest.raises(ValueError, match="dose must be >= 0"):
        write_rtdose(ImageVolume(grid, -np.ones(grid.shape), "Gy"), tmp_path / "a.dcm")
    with pytest.raises(ValueError, match="dose_type must be one of"):
        write_rtdose(ImageVolume(grid, np.ones(grid.shape), "Gy"), tmp_path / "a.dcm", dose_type="FOO")
    with pytest.raises(TypeError, match="dose must be an ImageVolume"):
        write_rtdose(np.ones(grid.shape), tmp_path / "a.dcm")
    with pytest.raises(FileNotFoundError, match="output folder"):
        write_rtdose(ImageVolume(grid, np.ones(grid.shape), "Gy"), tmp_path / "missing" / "a.dcm")


def test_atomic_write_leaves_no_temporaries(tmp_path):
    dose = _dose()
    write_rtdose(dose, tmp_path / "RD.dcm")
    write_rtdose(dose, tmp_path / "RD.dcm")  # overwrite
    assert sorted(os.listdir(tmp_path)) == ["RD.dcm"]


def _rewrite(path, **changes):
    ds = pydicom.dcmread(path)
    for key, value in changes.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    ds.save_as(path)
    return path


def test_absolute_offsets_are_read(tmp_path):
    dose = _dose()
    path = write_rtdose(dose, tmp_path / "RD.dcm")
    z0 = dose.grid.origin_mm[2]
    _rewrite(path, GridFrameOffsetVector=[f"{z0 + k * 2.0:.4f}" for k in range(5)])
    back, info = read_rtdose_info(path)
    assert info.offsets_absolute
    assert back.grid.same_as(dose.grid, tol_mm=1e-3)


def test_descending_frames_and_flipped_rows(tmp_path):
    dose = _dose(shape=(4, 3, 5), spacing=(1.0, 2.0, 3.0), origin=(0.0, 0.0, 0.0))
    path = write_rtdose(dose, tmp_path / "RD.dcm")
    ds = pydicom.dcmread(path)
    # re-encode: frames from high z to low z, rows along -x (columns reversed)
    pixels = ds.pixel_array[::-1, :, ::-1].copy()
    ds.PixelData = pixels.astype("<u4").tobytes()
    ds.ImagePositionPatient = ["4", "0", "9"]
    ds.ImageOrientationPatient = ["-1", "0", "0", "0", "1", "0"]  # normal = -z
    ds.GridFrameOffsetVector = ["0", "3", "6", "9"]  # along the normal (-z)
    ds.save_as(path)
    back = read_rtdose(path)
    assert back.grid.same_as(dose.grid, tol_mm=1e-6)
    np.testing.assert_allclose(back.array, dose.array, atol=1e-6)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"DoseGridScaling": None}, r"DoseGridScaling \(3004,000E\)"),
        ({"DoseUnits": "RELATIVE"}, "only absolute dose"),
        ({"ImageOrientationPatient": ["0.8", "0.6", "0", "-0.6", "0.8", "0"]}, "oblique"),
        ({"GridFrameOffsetVector": ["0", "2", "4", "7", "9"]}, "uniformly spaced"),
        ({"GridFrameOffsetVector": ["5", "7", "9", "11", "13"]}, "neither 0"),
        ({"GridFrameOffsetVector": ["0", "2", "4"]}, "must hold 5 value"),
        ({"PixelSpacing": None}, r"PixelSpacing \(0028,0030\)"),
        ({"ImagePositionPatient": ["1", "2"]}, "must hold 3 value"),
        ({"Modality": "CT", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2"}, "not an RT Dose"),
        ({"Rows": 8}, "pixel data"),
    ],
)
def test_malformed_headers(tmp_path, changes, message):
    path = write_rtdose(_dose(), tmp_path / "RD.dcm")
    _rewrite(path, **changes)
    with pytest.raises(DicomError, match=message):
        read_rtdose(path)


def test_wrong_vr_content(tmp_path):
    path = write_rtdose(_dose(), tmp_path / "RD.dcm")
    raw = path.read_bytes()
    ds = pydicom.dcmread(path)
    text = str(ds.DoseGridScaling).encode()
    # replace the DS text by letters of the same length (a DS that is not a number)
    bad = raw.replace(text, b"X" * len(text), 1)
    path.write_bytes(bad)
    with pytest.raises(DicomError, match="DoseGridScaling"):
        read_rtdose(path)


def test_truncated_and_not_dicom(tmp_path):
    path = write_rtdose(_dose(), tmp_path / "RD.dcm")
    raw = path.read_bytes()
    (tmp_path / "trunc.dcm").write_bytes(raw[: len(raw) - 100])
    with pytest.raises(DicomError, match="trunc.dcm"):
        read_rtdose(tmp_path / "trunc.dcm")
    (tmp_path / "text.dcm").write_text("not dicom at all")
    with pytest.raises(DicomError, match="not a DICOM file"):
        read_rtdose(tmp_path / "text.dcm")
    with pytest.raises(FileNotFoundError):
        read_rtdose(tmp_path / "absent.dcm")


_VALID = {}


def _valid_bytes(tmp_path_factory) -> bytes:
    if "raw" not in _VALID:
        folder = tmp_path_factory.mktemp("fuzz")
        _VALID["raw"] = write_rtdose(_dose(shape=(3, 4, 5)), folder / "RD.dcm").read_bytes()
    return _VALID["raw"]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(min_value=0, max_value=10_000), flips=st.lists(
    st.tuples(st.integers(min_value=0, max_value=10_000), st.integers(min_value=0, max_value=255)),
    max_size=4))
def test_fuzzed_files_give_clear_errors(tmp_path_factory, tmp_path, cut, flips):
    """Truncated or byte-corrupted files either read to a valid volume or raise DicomError."""
    raw = bytearray(_valid_bytes(tmp_path_factory))
    for pos, byte in flips:
        raw[pos % len(raw)] = byte
    raw = raw[: max(0, len(raw) - cut)] if cut % 3 else raw
    path = tmp_path / "fuzz.dcm"
    path.write_bytes(bytes(raw))
    try:
        vol = read_rtdose(path)
    except DicomError as exc:
        assert "fuzz.dcm" in str(exc)
    else:
        assert vol.unit == "Gy" and np.all(np.isfinite(vol.array))


def test_ct_to_rtdose_chain_keeps_geometry(tmp_path):
    """CT series -> our grid -> RT Dose -> pydicom: same frame and positions within 0.01 mm."""
    n, rows, cols = 6, 10, 12
    hu = np.zeros((n, rows, cols))
    origin = (-123.4567, 87.6543, -401.25)
    ipps = axial_positions(n, origin, 2.5)
    uids = write_ct_series(tmp_path / "ct", hu, ipps=ipps, pixel_spacing=(1.25, 0.976562))
    series = read_ct_series(tmp_path / "ct")
    grid = series.grid
    x, y, z = grid.meshgrid_mm()
    dose = ImageVolume(grid, np.broadcast_to(1.0 + 0.01 * (x - x.min()) + 0 * y + 0 * z, grid.shape).copy(), "Gy")
    path = write_rtdose(dose, tmp_path / "RD.dcm", reference=series.reference)
    ds = pydicom.dcmread(path)
    assert ds.FrameOfReferenceUID == uids["frame_uid"]
    assert ds.StudyInstanceUID == uids["study_uid"]
    ct0 = pydicom.dcmread(series.files[0])
    np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient],
                               [float(v) for v in ct0.ImagePositionPatient], atol=0.01)
    assert [float(v) for v in ds.PixelSpacing] == pytest.approx([float(v) for v in ct0.PixelSpacing], abs=1e-6)
    z_frames = float(ds.ImagePositionPatient[2]) + np.array([float(v) for v in ds.GridFrameOffsetVector])
    z_ct = [float(pydicom.dcmread(f).ImagePositionPatient[2]) for f in series.files]
    np.testing.assert_allclose(z_frames, z_ct, atol=0.01)
    back = read_rtdose(path)
    assert back.grid.same_as(grid, tol_mm=0.01)


def test_dvh_matches_dicompyler_core(tmp_path, monkeypatch):
    """Our RT Dose + RTSTRUCT read by dicompyler-core give the same DVH as ours within 1 %."""
    pytest.importorskip("dicompylercore", reason="dicompyler-core not installed (optional)")
    from tomodose.evaluation.dvh import compute_dvh
    from tomodose.io.dicom import read_patient

    from tests._dicom_synth import circle, make_rtstruct, save

    import pydicom.dicomio

    if not hasattr(pydicom.dicomio, "read_file"):  # dicompyler-core 0.5.6 imports the pydicom < 3 name
        monkeypatch.setattr(pydicom.dicomio, "read_file", pydicom.dcmread, raising=False)
    from dicompylercore import dvhcalc

    n = 31
    uids = write_ct_series(tmp_path / "ct", np.zeros((n, 81, 81)), ipps=axial_positions(n, (-40.0, -40.0, -30.0), 2.0))
    zs = [-20.0 + 2.0 * k for k in range(21)]
    save(make_rtstruct({"PTV": [circle((0, 0), 25.0, z, 128) for z in zs]}, frame_uid=uids["frame_uid"]),
         tmp_path / "RS.dcm")
    model, series, _ = read_patient(tmp_path / "ct", tmp_path / "RS.dcm")
    g = model.grid
    x, y, z = g.meshgrid_mm()
    dose = ImageVolume(g, np.broadcast_to(50.0 + 0.2 * x + 0.05 * y + 0 * z, g.shape).copy(), "Gy")
    write_rtdose(dose, tmp_path / "RD.dcm", reference=series.reference)
    ours = compute_dvh(dose, model.structures["PTV"])
    theirs = dvhcalc.get_dvh(str(tmp_path / "RS.dcm"), str(tmp_path / "RD.dcm"), 1)
    assert theirs.mean == pytest.approx(ours.mean_gy, rel=0.01)
    assert theirs.max == pytest.approx(ours.max_gy, rel=0.01)
    for p in (2, 5, 25, 50, 75, 95, 98):
        assert theirs.statistic(f"D{p}").value == pytest.approx(ours.dose_at_volume_percent(p), rel=0.01), p


def test_cli_import_and_export(tmp_path, capsys):
    """tomodose dicom import CTDIR --rtstruct --rtplan --out; export-dose; info."""
    pytest.importorskip("tomodose.io.hdf5")
    from tomodose.cli.main import main
    from tomodose.io.hdf5 import read_results, write_results

    from tests._dicom_synth import circle, make_rtstruct, make_tomo_plan, save

    n = 8
    uids = write_ct_series(tmp_path / "ct", np.zeros((n, 20, 24)), ipps=axial_positions(n, (-11.5, -9.5, -7.0), 2.0))
    save(make_rtstruct({"LIVER": [circle((0, 0), 5.0, z) for z in (-3.0, -1.0, 1.0)]}, frame_uid=uids["frame_uid"]),
         tmp_path / "RS.dcm")
    sino = np.random.default_rng(0).random((10, 64)).round(6)
    save(make_tomo_plan(sino, frame_uid=uids["frame_uid"]), tmp_path / "RP.dcm")
    rc = main(["dicom", "import", str(tmp_path / "ct"), "--rtstruct", str(tmp_path / "RS.dcm"),
               "--rtplan", str(tmp_path / "RP.dcm"), "--out", str(tmp_path / "patient.h5")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "Liver <- 'LIVER'" in out and "10 projections" in out
    res = read_results(tmp_path / "patient.h5")
    assert "Liver" in res.patient.structures
    np.testing.assert_allclose(res.plan.sinogram, sino, atol=1e-9)
    assert res.extra["dicom_reference"]["frame_of_reference_uid"] == uids["frame_uid"]
    # a dose on the CT grid, stored with the DICOM reference, exported as RT Dose
    grid = res.patient.grid
    dose = ImageVolume(grid, np.full(grid.shape, 2.0), "Gy")
    write_results(tmp_path / "results.h5", patient=res.patient, doses={"total": dose}, extra=res.extra)
    rc = main(["dicom", "export-dose", str(tmp_path / "results.h5"), "--out", str(tmp_path / "RD.dcm")])
    assert rc == 0
    ds = pydicom.dcmread(tmp_path / "RD.dcm")
    assert ds.FrameOfReferenceUID == uids["frame_uid"]
    back = read_rtdose(tmp_path / "RD.dcm")
    assert back.grid.same_as(grid, tol_mm=0.01)
    np.testing.assert_allclose(back.array, 2.0, rtol=1e-8)
    capsys.readouterr()
    rc = main(["dicom", "info", str(tmp_path / "RD.dcm"), str(tmp_path / "RP.dcm"), str(tmp_path / "RS.dcm")])
    out = capsys.readouterr().out
    assert rc == 0 and "RT Dose PHYSICAL/PLAN" in out and "TOMO_HA_01" in out and "-> Liver" in out
    # errors: clear message, status 2
    rc = main(["dicom", "export-dose", str(tmp_path / "patient.h5"), "--out", str(tmp_path / "x.dcm")])
    assert rc == 2 and "holds no dose" in capsys.readouterr().err
    rc = main(["dicom", "import", str(tmp_path / "absent"), "--out", str(tmp_path / "p.h5")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
