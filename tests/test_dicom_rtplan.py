"""Helical TomoTherapy RT Plan import: TOMO_HA_01 private tags, Supplement 176 durations,
and clear errors for everything not understood (missing tags, wrong VR, truncated, fuzzed)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from tomodose.io.dicom import DicomError, read_tomo_plan, read_tomo_plan_info  # noqa: E402

from tests._dicom_synth import make_tomo_plan, save  # noqa: E402

pytestmark = pytest.mark.dicom


def _sino(n=60, seed=2):
    s = np.round(np.random.default_rng(seed).random((n, 64)), 6)
    s[:, :10] = 0.0  # closed leaves
    return s


def _write(tmp_path, ds, name="RP.dcm", implicit=False):
    return save(ds, tmp_path / name, implicit=implicit)


@pytest.mark.parametrize("encoding, implicit", [("text", False), ("text", True), ("ds", False),
                                                ("ds", True), ("fd", False)])
@pytest.mark.parametrize("block", [0x10, 0x21])
def test_private_tags_round_trip(tmp_path, encoding, implicit, block):
    sino = _sino()
    ds = make_tomo_plan(sino, encoding=encoding, block=block, pitch=0.287, period_s=20.0,
                        start_angle=12.0, isocentre=(1.5, -40.0, 12.25))
    plan, info = read_tomo_plan_info(_write(tmp_path, ds, implicit=implicit))
    np.testing.assert_allclose(plan.sinogram, sino, atol=1e-9)
    assert plan.pitch == pytest.approx(0.287, abs=1e-12)
    assert plan.gantry_period_s == pytest.approx(20.0, abs=1e-12)
    assert plan.field_width_mm == 25.0
    assert plan.start_angle_deg == pytest.approx(12.0)
    assert plan.isocentre_lps_mm == (1.5, -40.0, 12.25)
    assert plan.couch_start_mm == 0.0
    assert plan.n_fractions == 5 and dict(plan.prescriptions) == {"PTV": 50.0}
    assert plan.patient_position == "HFS"
    assert info.source == "TOMO_HA_01" and info.jaw_positions_mm == (-12.55, 12.55)
    # the timeline: projection k centred at start + (k + 1/2) 360/51
    assert plan.gantry_angle_deg[0] == pytest.approx(12.0 + 0.5 * 360 / 51)


@pytest.mark.parametrize("jaws, width", [((-5.25, 5.25), 10.0), ((-12.5, 12.5), 25.0), ((-25.2, 25.2), 50.0)])
def test_field_widths(tmp_path, jaws, width):
    ds = make_tomo_plan(_sino(5), jaws=jaws, field_width_mm=width, pitch=0.2)
    assert read_tomo_plan(_write(tmp_path, ds)).field_width_mm == width


@pytest.mark.parametrize("where", ["beam", "inline"])
def test_supplement_176_durations(tmp_path, where):
    sino = _sino()
    both = make_tomo_plan(sino, sup176=where)
    plan, info = read_tomo_plan_info(_write(tmp_path, both))
    assert info.source == "TOMO_HA_01 + Supplement 176"
    np.testing.assert_allclose(plan.sinogram, sino, atol=1e-9)
    only = make_tomo_plan(sino, sup176=where, private=False)
    path = _write(tmp_path, only, "RP176.dcm")
    with pytest.raises(DicomError, match=r"gantry period not found .*gantry_period_s="):
        read_tomo_plan(path)
    plan, info = read_tomo_plan_info(path, gantry_period_s=20.0, pitch=0.287)
    assert info.source == "Supplement 176"
    np.testing.assert_allclose(plan.sinogram, sino, atol=1e-9)


def test_supplement_176_disagreement_and_overlong(tmp_path):
    sino = _sino()
    ds = make_tomo_plan(sino, sup176="beam")
    item = ds.BeamSequence[0].TomotherapeuticControlPointSequence[3]
    d = np.array(item.TomotherapeuticLeafOpenDurations)
    d[20] += 0.05
    item.TomotherapeuticLeafOpenDurations = d.tolist()
    with pytest.raises(DicomError, match=r"TomotherapeuticLeafOpenDurations \(3010,0099\) and .*disagree at "
                                         r"projection 3, leaf 20"):
        read_tomo_plan(_write(tmp_path, ds))
    d[20] = 1.0  # longer than a projection (20 s / 51)
    item.TomotherapeuticLeafOpenDurations = d.tolist()
    with pytest.raises(DicomError, match="exceeds the projection duration"):
        read_tomo_plan(_write(tmp_path, ds))


def test_initial_closed_durations_noted(tmp_path):
    sino = _sino()
    ds = make_tomo_plan(sino, sup176="beam")
    proj = 20.0 / 51
    for k, item in enumerate(ds.BeamSequence[0].TomotherapeuticControlPointSequence[:-1]):
        item.TomotherapeuticLeafInitialClosedDurations = ((1 - sino[k]) * proj * 0.5).tolist()
    plan, info = read_tomo_plan_info(_write(tmp_path, ds))
    assert any("centred" in n for n in info.notes)
    np.testing.assert_allclose(plan.sinogram, sino, atol=1e-9)
    item = ds.BeamSequence[0].TomotherapeuticControlPointSequence[0]
    item.TomotherapeuticLeafInitialClosedDurations = np.full(64, proj).tolist()
    with pytest.raises(DicomError, match="exceeds the projection duration"):
        read_tomo_plan(_write(tmp_path, ds))


def test_missing_scalars_and_overrides(tmp_path):
    ds = make_tomo_plan(_sino(5), pitch=0.3)
    del ds.BeamSequence[0][0x300D1060]
    path = _write(tmp_path, ds)
    with pytest.raises(DicomError, match=r"pitch not found \(\(300D,1060\) \[TOMO_HA_01 pitch\]\); pass pitch="):
        read_tomo_plan(path)
    assert read_tomo_plan(path, pitch=0.3).pitch == 0.3
    full = _write(tmp_path, make_tomo_plan(_sino(5), pitch=0.3), "full.dcm")
    with pytest.raises(DicomError, match="contradicts pitch=0.4"):
        read_tomo_plan(full, pitch=0.4)
    with pytest.raises(DicomError, match="contradicts field_width_mm=50"):
        read_tomo_plan(full, field_width_mm=50.0)


def test_scalars_at_plan_level(tmp_path):
    ds = make_tomo_plan(_sino(5), pitch=0.3, period_s=25.0)
    beam = ds.BeamSequence[0]
    for tag in (0x300D1060, 0x300D1040):
        ds.add(beam[tag])
        del beam[tag]
    ds.add_new(0x300D0010, "LO", "TOMO_HA_01")
    plan = read_tomo_plan(_write(tmp_path, ds))
    assert (plan.pitch, plan.gantry_period_s) == (0.3, 25.0)


def _cp(ds, k):
    return ds.BeamSequence[0].ControlPointSequence[k]


@pytest.mark.parametrize("mutate, message", [
    (lambda ds: _cp(ds, 2).__delitem__(0x300D10A7), r"control point 2: \(300D,10A7\) .* is missing"),
    (lambda ds: _cp(ds, 1).__setitem__(0x300D10A7, pydicom.DataElement(0x300D10A7, "UN", b"0.5\\0.5 ")),
     "holds 2 values, expected 64"),
    (lambda ds: _cp(ds, 1).__setitem__(0x300D10A7, pydicom.DataElement(0x300D10A7, "UN", ("1.5\\" * 64)[:-1].encode() + b" ")),
     r"must be fractions in \[0, 1\]"),
    (lambda ds: _cp(ds, 1).__setitem__(0x300D10A7, pydicom.DataElement(0x300D10A7, "UN", b"\xff\xfe\x00\x01" * 64)),
     "holds binary data"),
    (lambda ds: _cp(ds, 1).__setitem__(0x300D10A7, pydicom.DataElement(0x300D10A7, "UN", b"abc\\def ")),
     "decimal numbers"),
    (lambda ds: setattr(_cp(ds, 3), "GantryAngle", "100"), r"GantryAngle \(300A,011E\) is 100.0 deg"),
    (lambda ds: setattr(_cp(ds, 0), "GantryRotationDirection", "CC"), "rotates CW"),
    (lambda ds: setattr(_cp(ds, 2).BeamLimitingDevicePositionSequence[0], "LeafJawPositions", ["-20", "20"]),
     "dynamic jaws are not supported"),
    (lambda ds: [setattr(_cp(ds, k).BeamLimitingDevicePositionSequence[0], "LeafJawPositions", ["-5", "20"])
                 for k in range(6)], "off-centre"),
    (lambda ds: [setattr(_cp(ds, k).BeamLimitingDevicePositionSequence[0], "LeafJawPositions", ["-15", "15"])
                 for k in range(6)], "matches none of the machine's nominal field widths"),
    (lambda ds: [delattr(_cp(ds, k), "BeamLimitingDevicePositionSequence") for k in range(6)],
     "no ASYMY jaw positions.*field_width_mm="),
    (lambda ds: delattr(_cp(ds, 0), "IsocenterPosition"), r"IsocenterPosition \(300A,012C\)"),
    (lambda ds: setattr(_cp(ds, 3), "IsocenterPosition", ["0", "0", "50"]), "follows neither a fixed"),
    (lambda ds: delattr(ds, "BeamSequence"), r"BeamSequence \(300A,00B0\)"),
    (lambda ds: setattr(ds.BeamSequence[0], "NumberOfControlPoints", 9), "NumberOfControlPoints"),
    (lambda ds: setattr(ds.BeamSequence[0], "ControlPointSequence", [_cp(ds, 0)]), "at least 2 control points"),
    (lambda ds: setattr(ds.PatientSetupSequence[0], "PatientPosition", "HFDL"), "is not supported"),
    (lambda ds: setattr(ds, "Modality", "RTDOSE") or setattr(ds, "SOPClassUID", "1.2.840.10008.5.1.4.1.1.481.2"),
     "not an RT Plan"),
    (lambda ds: [_cp(ds, k).__delitem__(0x300D10A7) for k in range(6)], "no leaf-open data"),
    (lambda ds: ds.BeamSequence.append(make_tomo_plan(np.zeros((5, 64))).BeamSequence[0]),
     "expected one helical treatment beam"),
])
def test_not_understood_gives_clear_error(tmp_path, mutate, message):
    ds = make_tomo_plan(_sino(5), moving_isocentre=False)
    mutate(ds)
    with pytest.raises(DicomError, match=message):
        read_tomo_plan(_write(tmp_path, ds))


def test_moving_isocentre_and_beam_selection(tmp_path):
    sino = _sino(20)
    ds = make_tomo_plan(sino, moving_isocentre=True, patient_position="FFS")
    plan = read_tomo_plan(_write(tmp_path, ds))
    assert plan.patient_position == "FFS"
    second = make_tomo_plan(np.zeros((5, 64))).BeamSequence[0]
    second.BeamNumber = 2
    ds.BeamSequence.append(second)
    path = _write(tmp_path, ds, "two.dcm")
    with pytest.raises(DicomError, match="beam_number="):
        read_tomo_plan(path)
    np.testing.assert_allclose(read_tomo_plan(path, beam_number=1).sinogram, sino)
    with pytest.raises(DicomError, match="no beam with BeamNumber 7"):
        read_tomo_plan(path, beam_number=7)


def test_final_control_point_values_ignored_with_warning(tmp_path, caplog):
    sino = _sino(5)
    ds = make_tomo_plan(sino)
    _cp(ds, 5)[0x300D10A7] = pydicom.DataElement(0x300D10A7, "UN", ("0.5\\" * 64)[:-1].encode() + b" ")
    with caplog.at_level(logging.WARNING):
        plan, info = read_tomo_plan_info(_write(tmp_path, ds))
    assert plan.n_projections == 5
    assert "final control point" in caplog.text and info.notes


def test_truncated_and_missing(tmp_path):
    raw = _write(tmp_path, make_tomo_plan(_sino(5))).read_bytes()
    (tmp_path / "t.dcm").write_bytes(raw[: len(raw) // 3])
    with pytest.raises(DicomError, match="t.dcm"):
        read_tomo_plan(tmp_path / "t.dcm")
    with pytest.raises(FileNotFoundError):
        read_tomo_plan(tmp_path / "absent.dcm")


_RAW = {}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(encoding=st.sampled_from(["text", "fd", "ds"]), cut=st.integers(min_value=0, max_value=20_000),
       flips=st.lists(st.tuples(st.integers(min_value=0, max_value=20_000), st.integers(min_value=0, max_value=255)),
                      max_size=4))
def test_fuzzed_plans_give_clear_errors(tmp_path_factory, encoding, cut, flips):
    if encoding not in _RAW:
        folder = tmp_path_factory.mktemp("rpfuzz")
        _RAW[encoding] = save(make_tomo_plan(_sino(4), encoding=encoding, sup176="beam"),
                              folder / "src.dcm").read_bytes()
    raw = bytearray(_RAW[encoding])
    for pos, byte in flips:
        raw[pos % len(raw)] = byte
    path = tmp_path_factory.mktemp("rp") / "RP.dcm"
    path.write_bytes(bytes(raw[: max(0, len(raw) - cut)]) if cut % 2 else bytes(raw))
    try:
        plan = read_tomo_plan(path)
    except DicomError as exc:
        assert "RP.dcm" in str(exc)
    else:
        assert plan.sinogram.shape[1] == 64
