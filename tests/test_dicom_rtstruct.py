"""RT Structure Set import: polygons in LPS, holes, several contours per slice, clipping,
aliases and roles, frame-of-reference check, malformed and fuzzed files, PatientModel."""

from __future__ import annotations

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from tomodose.io.dicom import (  # noqa: E402
    DicomError,
    StructureAliases,
    rasterise_rois,
    read_ct_series,
    read_patient,
    read_rtstruct,
)
from tomodose.io.dicom.rtstruct import CANONICAL_NAMES, role_of  # noqa: E402

from tests._dicom_synth import axial_positions, circle, make_rtstruct, save, write_ct_series  # noqa: E402

pytestmark = pytest.mark.dicom

# CT: 1 mm pixels, 2 mm slices, x,y in [-40, 40], z in [-30, 30]
N, ROWS, COLS = 31, 81, 81
ZS = [-20.0 + 2.0 * k for k in range(21)]  # contour planes of the cylinder (z -20..20)


@pytest.fixture
def ct(tmp_path):
    uids = write_ct_series(tmp_path / "ct", np.zeros((N, ROWS, COLS)),
                           ipps=axial_positions(N, (-40.0, -40.0, -30.0), 2.0))
    return tmp_path / "ct", uids


def _annulus_rois():
    """'Ring': outer radius 20, hole radius 8 (drawn clockwise); 'Two': two discs per slice;
    'Edge': a disc centred at the CT's x edge (half outside)."""
    return {
        "Ring": [c for z in ZS for c in (circle((0, 0), 20.0, z, 128), circle((0, 0), 8.0, z, 96, clockwise=True))],
        "Two": [c for z in ZS for c in (circle((-25, 25), 6.0, z, 64), circle((25, 25), 6.0, z, 64))],
        "Edge": [circle((40.5, 0.0), 10.0, z, 64) for z in ZS],
    }


def test_read_polygons_in_lps(ct, tmp_path):
    folder, uids = ct
    rois = _annulus_rois()
    rs = make_rtstruct(rois, frame_uid=uids["frame_uid"], colors={"Ring": (0, 255, 0)},
                       types={"Ring": "PTV"})
    save(rs, tmp_path / "RS.dcm")
    out = read_rtstruct(tmp_path / "RS.dcm", frame_of_reference_uid=uids["frame_uid"])
    assert [r.name for r in out] == ["Ring", "Two", "Edge"]
    ring = out[0]
    assert ring.n_contours == 2 * len(ZS)
    assert ring.color == (0.0, 1.0, 0.0)
    assert ring.interpreted_type == "PTV"
    np.testing.assert_allclose(ring.contours[0], rois["Ring"][0], atol=1e-9)
    assert ring.z_range_mm == (-20.0, 20.0)
    assert all(np.ptp(c[:, 2]) == 0 for c in ring.contours)


def test_rasterise_holes_multiple_and_clipping(ct, tmp_path):
    folder, uids = ct
    save(make_rtstruct(_annulus_rois(), frame_uid=uids["frame_uid"]), tmp_path / "RS.dcm")
    series = read_ct_series(folder)
    structures, names = rasterise_rois(read_rtstruct(tmp_path / "RS.dcm"), series.grid, supersample=4)
    length_cm = (len(ZS)) * 0.2  # 21 planes x 2 mm slabs (end caps of half a spacing)
    ring = structures["Ring"]
    assert ring.volume_ml == pytest.approx(np.pi * (2.0**2 - 0.8**2) * length_cm, rel=0.01)
    # the hole is empty, the ring full
    k = series.grid.nz // 2
    j0 = i0 = 40  # voxel at (0, 0)
    assert ring.occupancy[k, j0, i0] == 0.0
    assert ring.occupancy[k, j0, i0 + 14] == 1.0
    two = structures["Two"]
    assert two.volume_ml == pytest.approx(2 * np.pi * 0.6**2 * length_cm, rel=0.02)
    # half of 'Edge' lies beyond the last voxel edge at x = 40.5 mm: clipped
    edge = structures["Edge"]
    assert edge.volume_ml == pytest.approx(0.5 * np.pi * 1.0**2 * length_cm, rel=0.02)


def test_sphere_volume_and_centre(ct, tmp_path):
    folder, uids = ct
    r, centre = 15.0, (3.0, -4.0, 0.0)
    zs = [z for z in np.arange(-30.0, 31.0, 2.0) if abs(z - centre[2]) < r]
    contours = [circle(centre[:2], np.sqrt(r**2 - (z - centre[2]) ** 2), z, 128) for z in zs]
    save(make_rtstruct({"Sphere": contours}, frame_uid=uids["frame_uid"]), tmp_path / "RS.dcm")
    model, series, names = read_patient(folder, tmp_path / "RS.dcm")
    s = model.structures["Sphere"]
    assert s.volume_ml == pytest.approx(4 / 3 * np.pi * 1.5**3, rel=0.03)
    np.testing.assert_allclose(s.centroid_mm(), centre, atol=0.05)
    # the between-plane model reaches the rasteriser through read_patient
    slab, _, _ = read_patient(folder, tmp_path / "RS.dcm", interpolation="slab")
    assert slab.structures["Sphere"].volume_ml != s.volume_ml
    with pytest.raises(ValueError, match="interpolation"):
        read_patient(folder, tmp_path / "RS.dcm", interpolation="spline")


def test_aliases_and_roles(ct, tmp_path):
    folder, uids = ct
    disc = [circle((0, 0), 10.0, z) for z in ZS[:3]]
    rois = {"LIVER": disc, "spinal_cord": disc, "Leber-PTV": disc, "PTV": disc, "External": disc,
            "Kidney left": disc, "Mystery": disc}
    save(make_rtstruct(rois, frame_uid=uids["frame_uid"], types={"Mystery": "AVOIDANCE"}), tmp_path / "RS.dcm")
    model, _, names = read_patient(folder, tmp_path / "RS.dcm")
    assert names == {"LIVER": "Liver", "spinal_cord": "SpinalCord", "Leber-PTV": "ProtectedLiver",
                     "PTV": "PTV", "External": "Body", "Kidney left": "Kidney_L", "Mystery": "Mystery"}
    roles = {n: s.role for n, s in model.structures.items()}
    assert roles["Body"] == "external" and roles["PTV"] == "target" and roles["Liver"] == "oar"
    assert roles["Mystery"] == "oar"  # from RTROIInterpretedType AVOIDANCE
    # drop the unmapped ones
    model2, _, names2 = read_patient(folder, tmp_path / "RS.dcm", keep_unmapped=False)
    assert "Mystery" not in model2.structures and "Mystery" not in names2


def test_custom_aliases_dict_and_toml(tmp_path):
    a = StructureAliases.from_dict({"Liver": ["Fegato"], "Duodenum": ["duodeno"]})
    assert a.canonical("fegato") == "Liver" and a.canonical("Leber") == "Liver"  # defaults kept
    assert a.canonical("DUODENO") == "Duodenum"
    b = StructureAliases.from_dict({"Liver": ["Fegato"]}, extend=False)
    assert b.canonical("Leber") is None
    toml = tmp_path / "aliases.toml"
    toml.write_text('[aliases]\nSpinalCord = ["Medulla"]\n', encoding="utf-8")
    c = StructureAliases.from_toml(toml)
    assert c.canonical("medulla") == "SpinalCord" and c.canonical("cord") == "SpinalCord"
    with pytest.raises(ValueError, match="maps to both"):
        StructureAliases({"Liver": ["x"], "Heart": ["X"]})
    with pytest.raises(ValueError, match="both map to 'PTV'"):
        StructureAliases().map_names(["PTV", "ptv_1"])
    with pytest.raises(ValueError, match="must be a list of names"):
        StructureAliases({"Liver": "liver"})
    with pytest.raises(FileNotFoundError):
        StructureAliases.from_toml(tmp_path / "absent.toml")
    (tmp_path / "bad.toml").write_text("[aliases\n", encoding="utf-8")
    with pytest.raises(ValueError, match="not valid TOML"):
        StructureAliases.from_toml(tmp_path / "bad.toml")


def test_canonical_names_and_roles_table():
    default = StructureAliases()
    for name in CANONICAL_NAMES:
        assert default.canonical(name) == name
        assert role_of(name) in ("external", "target", "oar")
    assert role_of("Unknown", "CTV") == "target" and role_of("Unknown") == ""


def test_frame_of_reference_checked(ct, tmp_path):
    folder, uids = ct
    save(make_rtstruct({"A": [circle((0, 0), 5.0, 0.0)]}, frame_uid="1.2.3.4"), tmp_path / "RS.dcm")
    with pytest.raises(DicomError, match="frame of reference"):
        read_patient(folder, tmp_path / "RS.dcm")
    model, _, _ = read_patient(folder, tmp_path / "RS.dcm", check_frame_of_reference=False)
    assert "A" in model.structures


def _set_points(rs, values):
    item = rs.ROIContourSequence[0].ContourSequence[0]
    item.ContourData = [str(v) for v in values]
    item.NumberOfContourPoints = len(values) // 3


def _modified(tmp_path, uids, fn, name="RS.dcm"):
    rs = make_rtstruct({"A": [circle((0, 0), 5.0, 0.0), circle((0, 0), 5.0, 2.0)]}, frame_uid=uids["frame_uid"])
    fn(rs)
    return save(rs, tmp_path / name)


def test_other_geometric_types_skipped(ct, tmp_path):
    folder, uids = ct

    def add_point(rs):
        p = pydicom.Dataset()
        p.ContourGeometricType = "POINT"
        p.NumberOfContourPoints = 1
        p.ContourData = ["1", "2", "3"]
        rs.ROIContourSequence[0].ContourSequence.append(p)

    rois = read_rtstruct(_modified(tmp_path, uids, add_point))
    assert rois[0].n_contours == 2


@pytest.mark.parametrize("mutate, message", [
    (lambda rs: setattr(rs.ROIContourSequence[0].ContourSequence[0], "NumberOfContourPoints", 7),
     r"NumberOfContourPoints \(3006,0046\) is 7"),
    (lambda rs: setattr(rs.ROIContourSequence[0].ContourSequence[0], "ContourData",
                        ["0", "0", "0", "1", "0", "0", "1", "1"]), "not a multiple of 3"),
    (lambda rs: _set_points(rs, [0, 0, 0, 1, 0, 1, 1, 1, 2]), "not axial"),
    (lambda rs: setattr(rs.ROIContourSequence[0], "ReferencedROINumber", 9), "not in StructureSetROISequence"),
    (lambda rs: delattr(rs, "StructureSetROISequence"), r"StructureSetROISequence \(3006,0020\)"),
    (lambda rs: delattr(rs.ROIContourSequence[0].ContourSequence[0], "ContourGeometricType"),
     "ContourGeometricType"),
    (lambda rs: delattr(rs.StructureSetROISequence[0], "ROIName"), r"ROIName \(3006,0026\)"),
    (lambda rs: setattr(rs, "Modality", "CT") or setattr(rs, "SOPClassUID", "1.2.840.10008.5.1.4.1.1.2"),
     "not an RT Structure Set"),
])
def test_malformed_structure_sets(ct, tmp_path, mutate, message):
    folder, uids = ct
    path = _modified(tmp_path, uids, mutate)
    with pytest.raises(DicomError, match=message):
        read_rtstruct(path)


def test_wrong_vr_and_truncated(ct, tmp_path):
    folder, uids = ct
    path = _modified(tmp_path, uids, lambda rs: _set_points(rs, [123.25, 0, 0, 1, 0, 0, 1, 1, 0]))
    raw = path.read_bytes()
    assert raw.count(b"123.25") == 1
    path.write_bytes(raw.replace(b"123.25", b"abc.de", 1))  # a DS that is not a number
    with pytest.raises(DicomError, match="ContourData"):
        read_rtstruct(path)
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DicomError, match="RS.dcm"):
        read_rtstruct(path)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(min_value=0, max_value=3000), flips=st.lists(
    st.tuples(st.integers(min_value=0, max_value=5000), st.integers(min_value=0, max_value=255)), max_size=4))
def test_fuzzed_structure_sets_give_clear_errors(tmp_path_factory, cut, flips):
    folder = tmp_path_factory.mktemp("rsfuzz")
    rs = make_rtstruct({"A": [circle((0, 0), 5.0, 0.0, 16)], "B": [circle((1, 1), 3.0, 2.0, 16)]},
                       frame_uid="1.2.3")
    raw = bytearray(save(rs, folder / "RS.dcm").read_bytes())
    for pos, byte in flips:
        raw[pos % len(raw)] = byte
    (folder / "RS.dcm").write_bytes(bytes(raw[: max(0, len(raw) - cut)]))
    try:
        rois = read_rtstruct(folder / "RS.dcm")
    except DicomError as exc:
        assert "RS.dcm" in str(exc)
    else:
        for roi in rois:
            for c in roi.contours:
                assert c.ndim == 2 and c.shape[1] == 3 and np.all(np.isfinite(c))


def test_rasterise_rois_interpolation_option(ct, tmp_path):
    # sphere r 15 mm with 5 mm contour spacing, pole to pole (poles as tiny circles, so the
    # end caps hold no volume): shape-based interpolation (the default for small ROIs) is
    # closer to the true volume than the slab model
    folder, uids = ct
    r = 15.0
    zs = np.arange(-15.0, 15.1, 5.0)
    contours = [circle((0.0, 0.0), max(np.sqrt(max(r**2 - z**2, 0.0)), 0.1), z, 128) for z in zs]
    save(make_rtstruct({"Sphere": contours}, frame_uid=uids["frame_uid"]), tmp_path / "RS.dcm")
    grid = read_ct_series(folder).grid
    rois = read_rtstruct(tmp_path / "RS.dcm")
    true = 4 / 3 * np.pi * 1.5**3
    vol = {m: rasterise_rois(rois, grid, interpolation=m)[0]["Sphere"].volume_ml for m in ("slab", "shape")}
    assert rasterise_rois(rois, grid)[0]["Sphere"].volume_ml == pytest.approx(vol["shape"])
    assert abs(vol["shape"] / true - 1) < abs(vol["slab"] / true - 1)
    with pytest.raises(ValueError, match="interpolation"):
        rasterise_rois(rois, grid, interpolation="spline")
