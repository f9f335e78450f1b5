import os

import h5py
import numpy as np
import pytest
from scipy import sparse

from tomodose.delivery.machine import TomoMachine
from tomodose.delivery.plan import HelicalPlan, ProjectionSequence
from tomodose.geometry.density import DensityTable
from tomodose.geometry.grid import Grid, ImageVolume
from tomodose.geometry.patient import PatientModel
from tomodose.geometry.structures import Structure, StructureSet
from tomodose.io import hdf5
from tomodose.io.hdf5 import (
    FORMAT_NAME,
    read_results,
    read_sparse,
    write_json_attr,
    read_json_attr,
    write_results,
    write_sparse,
)


@pytest.fixture
def patient():
    g = Grid((4, 5, 6), (2.0, 2.5, 3.0), (-10.0, 5.0, 100.0))
    rng = np.random.default_rng(0)
    ct = ImageVolume(g, rng.uniform(-1000, 1500, g.shape).astype(np.float32), "HU", "ct_number")
    frac = rng.random(g.shape).astype(np.float32)
    box = np.zeros(g.shape, bool)
    box[1:3, 2:4, 1:5] = True
    s = StructureSet(g, [Structure("Body", g, np.ones(g.shape), role="external", color=(0.1, 0.2, 0.3)),
                         Structure("PTV/boost .5", g, box, role="target"),
                         Structure(".partial", g, frac)])
    table = DensityTable.from_arrays([-1000, 0, 2000], [0.001, 1.0, 2.0], [0.001, 1.0, 1.9], name="scanner A")
    return PatientModel(ct, s, patient_position="FFP", name="test patient", density_table=table)


@pytest.fixture
def plan():
    sino = np.random.default_rng(1).random((60, 64))
    sino[:, :10] = 0.0
    return HelicalPlan(sino, field_width_mm=25.0, pitch=0.287, gantry_period_s=17.3, start_angle_deg=12.5,
                       couch_start_mm=-40.0, isocentre_lps_mm=(1.5, -2.0, 3.0), n_fractions=5,
                       prescriptions={"PGTV": 50.0, "PTV": 40.0}, patient_position="HFS",
                       machine=TomoMachine(sad_mm=851.0, jaw_fwhm_mm={10.0: 10.6, 25.0: 25.2, 50.0: 50.5}))


def _all_datasets(path):
    out = []
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.append((name, dict(obj.attrs))) if isinstance(obj, h5py.Dataset) else None)
    return out


def test_round_trip_everything(tmp_path, patient, plan):
    dose = ImageVolume(patient.grid, np.random.default_rng(2).random(patient.grid.shape).astype(np.float32) * 60,
                       "Gy", "dose")
    seq = plan.projections()
    m = sparse.random(30, 7, density=0.2, format="csr", random_state=3)
    path = write_results(tmp_path / "res.h5", patient=patient, plan=plan, doses={"total": dose, "beam/1": dose},
                         dvhs={"PTV": {"dose_gy": np.array([0.0, 10.0]), "volume_percent": [100.0, 0.0],
                                                   "note": "by hand"}},
                         extra={"dij": m, "label": "run 1", "n_iter": 7, "nested": {"w_mm": np.arange(4.0)},
                                "tags": ["a", "b"], "sequence_ok": True})
    r = read_results(path)
    # root attributes
    assert r.attrs["format"] == FORMAT_NAME and r.attrs["format_version"] == hdf5.FORMAT_VERSION
    assert r.attrs["tomodose_version"] and r.attrs["created_utc"].endswith("Z")
    # patient, bit-exact
    p = r.patient
    assert p.grid == patient.grid and p.patient_position == "FFP" and p.name == "test patient"
    assert p.ct.array.dtype == np.float32
    np.testing.assert_array_equal(p.ct.array, patient.ct.array)
    assert list(p.structures) == list(patient.structures)
    for name, s in patient.structures.items():
        np.testing.assert_array_equal(p.structures[name].occupancy, s.occupancy)
        assert p.structures[name].role == s.role
    assert p.structures["Body"].color == (0.1, 0.2, 0.3)
    assert p.density_table == patient.density_table
    # plan: every scalar and the sinogram, bit-exact
    q = r.plan
    assert isinstance(q, HelicalPlan)
    np.testing.assert_array_equal(q.sinogram, plan.sinogram)
    for f in ("field_width_mm", "pitch", "gantry_period_s", "start_angle_deg", "couch_start_mm", "isocentre_lps_mm",
              "n_fractions", "prescriptions", "patient_position"):
        assert getattr(q, f) == getattr(plan, f), f
    assert q.machine == plan.machine and q.machine.jaw_fwhm_mm == plan.machine.jaw_fwhm_mm
    np.testing.assert_array_equal(q.gantry_angle_deg, plan.gantry_angle_deg)
    # explicit projection arrays are stored too
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["plan/projections/couch_mm"][()], seq.couch_mm)
        assert f["plan/projections/gantry_angle_deg"].attrs["units"] == "deg"
        assert f["plan"].attrs["pitch"] == plan.pitch
        assert f["patient"].attrs["patient_position"] == "FFP"
        np.testing.assert_array_equal(f["dose/total"].attrs["origin_mm"], patient.grid.origin_mm)
    # doses
    assert set(r.doses) == {"total", "beam/1"}
    np.testing.assert_array_equal(r.doses["beam/1"].array, dose.array)
    assert r.doses["total"].unit == "Gy" and r.doses["total"].grid == dose.grid
    # dvhs
    assert r.dvhs["PTV"]["note"] == "by hand"
    np.testing.assert_array_equal(r.dvhs["PTV"]["volume_percent"], [100.0, 0.0])
    # extra
    assert (r.extra["dij"] != sparse.csc_matrix(m)).nnz == 0
    assert r.extra["label"] == "run 1" and r.extra["n_iter"] == 7 and r.extra["sequence_ok"]
    assert r.extra["tags"] == ("a", "b")
    np.testing.assert_array_equal(r.extra["nested"]["w_mm"], np.arange(4.0))
    # units on EVERY dataset
    for name, attrs in _all_datasets(path):
        assert "units" in attrs, name
    units = dict((n, a["units"]) for n, a in _all_datasets(path))
    assert units["patient/ct"] == "HU" and units["dose/total"] == "Gy" and units["plan/sinogram"] == "1"
    assert units["extra/nested/w_mm"] == "mm" and units["dvh/PTV/dose_gy"] == "Gy"
    assert units["dvh/PTV/volume_percent"] == "%"


def test_dvh_object_round_trip(tmp_path):
    dvh_mod = pytest.importorskip("tomodose.evaluation.dvh")
    rng = np.random.default_rng(5)
    dvh = dvh_mod.DVH.from_samples(rng.random(500) * 60.0, np.full(500, 0.015), name="Liver", bin_width_gy=0.5)
    path = write_results(tmp_path / "dvh.h5", dvhs={"Liver": dvh})
    back = read_results(path).dvhs["Liver"]
    assert isinstance(back, dvh_mod.DVH)
    assert (back.name, back.bin_width_gy, back.min_gy, back.max_gy, back.mean_gy) == (
        dvh.name, dvh.bin_width_gy, dvh.min_gy, dvh.max_gy, dvh.mean_gy)
    np.testing.assert_array_equal(back.differential_ml, dvh.differential_ml)
    with h5py.File(path, "r") as f:
        g = f["dvh/Liver"]
        assert g.attrs["kind"] == "DVH"
        np.testing.assert_array_equal(g["dose_gy"][()], dvh.edges_gy)
        np.testing.assert_array_equal(g["volume_ml"][()], dvh.cumulative_ml)
        assert g["volume_ml"].attrs["units"] == "mL" and g["dose_gy"].attrs["units"] == "Gy"


def test_projection_sequence_round_trip(tmp_path):
    seq = ProjectionSequence.static_beams([0.0, 90.0, 180.0], np.full((3, 64), 0.5), 2.0, 10.0,
                                          couch_mm=5.0, isocentre_lps_mm=(1.0, 2.0, 3.0), patient_position="HFP")
    r = read_results(write_results(tmp_path / "seq.h5", plan=seq))
    assert isinstance(r.plan, ProjectionSequence)
    for name in ("gantry_angle_deg", "couch_mm", "leaf_open_fraction", "duration_s", "arc_deg", "couch_travel_mm"):
        np.testing.assert_array_equal(getattr(r.plan, name), getattr(seq, name))
    assert r.plan.patient_position == "HFP" and r.plan.isocentre_lps_mm == (1.0, 2.0, 3.0)
    assert r.patient is None and r.doses == {}


def test_sparse_and_json_helpers(tmp_path):
    m = sparse.random(20, 9, density=0.3, format="coo", random_state=0)
    with h5py.File(tmp_path / "s.h5", "w") as f:
        write_sparse(f, "m", m, units="Gy")
        write_json_attr(f, "cfg", {"a": [1, 2], "b": "x"})
        assert f["m"].attrs["format"] == "csc" and f["m/data"].attrs["units"] == "Gy"
        assert f["m/indptr"].attrs["units"] == "1"
        back = read_sparse(f["m"])
        assert isinstance(back, sparse.csc_matrix)
        np.testing.assert_array_equal(back.toarray(), m.toarray())
        assert read_json_attr(f, "cfg") == {"a": [1, 2], "b": "x"}
        with pytest.raises(TypeError, match="matrix must be a scipy.sparse matrix"):
            write_sparse(f, "d", np.eye(3))
        with pytest.raises(ValueError, match="is not a CSC sparse matrix"):
            read_sparse(f)


def test_rejects_bad_files(tmp_path, patient):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_results(tmp_path / "nope.h5")
    txt = tmp_path / "text.h5"
    txt.write_text("not hdf5 at all")
    with pytest.raises(ValueError, match="is not an HDF5 file"):
        read_results(txt)
    good = write_results(tmp_path / "good.h5", patient=patient)
    data = good.read_bytes()
    trunc = tmp_path / "trunc.h5"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated|damaged|corrupt|not an HDF5"):
        read_results(trunc)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.attrs["format"] = "someone-else"
    with pytest.raises(ValueError, match="has format 'someone-else'; expected 'tomodose-results'"):
        read_results(other)
    newer = tmp_path / "newer.h5"
    with h5py.File(newer, "w") as f:
        f.attrs["format"] = FORMAT_NAME
        f.attrs["format_version"] = "2.0"
    with pytest.raises(ValueError, match="format_version 2.0, newer than"):
        read_results(newer)
    # a newer minor version is readable
    minor = tmp_path / "minor.h5"
    with h5py.File(minor, "w") as f:
        f.attrs["format"] = FORMAT_NAME
        f.attrs["format_version"] = "1.9"
    assert read_results(minor).patient is None


def test_atomic_write_failure_leaves_nothing(tmp_path, patient, monkeypatch):
    target = tmp_path / "out.h5"

    def boom(*a, **k):
        raise KeyboardInterrupt("simulated interrupt mid-write")

    monkeypatch.setattr(hdf5, "_write_plan", boom)
    with pytest.raises(KeyboardInterrupt):
        write_results(target, patient=patient, plan=object.__new__(HelicalPlan))
    assert os.listdir(tmp_path) == []
    # an existing file is left untouched by a failed write
    monkeypatch.undo()
    write_results(target, patient=patient)
    before = target.read_bytes()
    with pytest.raises(TypeError, match=r"doses\['x'\] must be an ImageVolume"):
        write_results(target, patient=patient, doses={"x": np.zeros(3)})
    assert target.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["out.h5"]


def test_bad_arguments(tmp_path, patient):
    with pytest.raises(TypeError, match="patient must be a PatientModel"):
        write_results(tmp_path / "a.h5", patient="me")
    with pytest.raises(TypeError, match="plan must be a HelicalPlan or ProjectionSequence"):
        write_results(tmp_path / "a.h5", plan={"pitch": 1})
    with pytest.raises(TypeError, match="doses must be a dict"):
        write_results(tmp_path / "a.h5", doses=[1])
    with pytest.raises(FileNotFoundError, match="output folder"):
        write_results(tmp_path / "missing" / "a.h5", patient=patient)
    assert not (tmp_path / "a.h5").exists()


def test_nonfinite_map_round_trip(tmp_path):
    """A gamma/DTA map with NaN ("not evaluated") and inf ("not found") survives the file."""
    g = Grid((2, 2, 2), (1, 1, 1))
    arr = np.zeros((2, 2, 2))
    arr[0, 0, 0] = np.nan
    arr[1, 1, 1] = np.inf
    vol = ImageVolume(g, arr, "1", "gamma", allow_nonfinite=True)
    path = hdf5.write_results(tmp_path / "g.h5", doses={"gamma": vol})
    back = hdf5.read_results(path).doses["gamma"]
    assert back.allow_nonfinite
    assert np.isnan(back.array[0, 0, 0]) and np.isinf(back.array[1, 1, 1])


def test_atomic_path_interrupt_leaves_target(tmp_path):
    """Any exception inside the block (KeyboardInterrupt too) keeps the old file and no temporary."""
    from tomodose._atomic import atomic_path, atomic_write_text

    target = tmp_path / "out.txt"
    atomic_write_text(target, "old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
    assert oct(target.stat().st_mode & 0o777) != oct(0o600)
    with pytest.raises(FileNotFoundError, match="output folder"):
        atomic_write_text(tmp_path / "missing" / "x.txt", "x")
