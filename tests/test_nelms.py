"""DVH validation against the Nelms et al. 2015 analytical DVH set (Med Phys 42:4435).

Reads ../shared/data/dvh_validation/nelms2015 at test time (skips when absent). Tolerances
(never loosened): volume, mean, D95, D5 within 1 %; D99, D1, D0.03cc within 3 %.

DVHs are computed grid-free from the RTSTRUCT contours (:func:`dvh_from_contours`: stratified
point sampling, 0.2 mm pitch, fixed seed, shape-based interpolation between contour planes with
half-slice end caps, trilinear dose). All 90 cases with available dose grids pass. Cases that
ever fail a tolerance go into KNOWN_FAILURES with the measured error (xfail(strict=True), so
they stay visible and an improvement shows up as XPASS). With the older slab model
(``interpolation="slab"``: cross-section constant between planes) 19 cases failed: spheres and
rotated cylinders / cones at 2-3 mm contour spacing (volume down to -4.7 %, D99 +21 %).
"""

from __future__ import annotations

import csv
import functools

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from tomodose.evaluation.dvh import dvh_from_contours  # noqa: E402
from tomodose.geometry.grid import Grid, ImageVolume  # noqa: E402

TOL = {"total_volume_cc": 1.0, "Dmean_cGy": 1.0, "D95_cGy": 1.0, "D5_cGy": 1.0,
       "D99_cGy": 3.0, "D1_cGy": 3.0, "D0.03cc_cGy": 3.0}

#: (structure, gradient, dose voxel mm) -> metrics measured out of tolerance (none at present)
KNOWN_FAILURES: dict[tuple[str, str, str], str] = {}

#: fast subset run by default (1 mm contours on the 1 mm grid, and the sphere and rotated
#: cylinder with 3 mm contours, both gradients); the rest is slow
FAST = {("Sphere_10_0", "1"), ("Cylinder_10_0", "1"), ("Cone_10_0", "1"), ("Sphere_30_0", "3"),
        ("RtCylinder_30_0", "3")}


def _root(shared_data):
    root = shared_data / "dvh_validation" / "nelms2015"
    if not root.is_dir():
        pytest.skip(f"{root} is absent")
    return root


def _cases():
    """(structure, gradient, voxel) from the analytical table (rows with available dose grids)."""
    from tests.conftest import SHARED_DATA

    path = SHARED_DATA / "dvh_validation" / "nelms2015" / "ANALYTICAL_RESULTS" / "extracted_analytical_points.csv"
    if not path.is_file():
        return [pytest.param(None, None, marks=pytest.mark.skip(reason=f"{path} is absent"))]
    out = []
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            if row["dose_voxel_mm"] not in ("1", "2", "3"):
                continue  # the 0.4x0.2x0.4 mm grids are not in the snapshot (README.md)
            struct = row["structure"].replace("__", "_")
            grad = "AntPost" if "AP" in row["gradient_direction"] else "SupInf"
            key = (struct, grad, row["dose_voxel_mm"])
            marks = []
            if key in KNOWN_FAILURES:
                marks.append(pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[key]))
            if (struct, row["dose_voxel_mm"]) not in FAST:
                marks.append(pytest.mark.slow)
            out.append(pytest.param(key, row, marks=marks, id="-".join(key)))
    return out


@functools.lru_cache(maxsize=8)
def read_rtdose(path) -> ImageVolume:
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array.astype(np.float64) * float(ds.DoseGridScaling)
    off = np.array([float(v) for v in ds.GridFrameOffsetVector])
    ipp = [float(v) for v in ds.ImagePositionPatient]
    ps = [float(v) for v in ds.PixelSpacing]  # (row spacing = dy, column spacing = dx)
    assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    grid = Grid(arr.shape, (ps[1], ps[0], float(off[1] - off[0])), (ipp[0], ipp[1], ipp[2] + off[0]))
    return ImageVolume(grid, arr, "Gy", "dose")


@functools.lru_cache(maxsize=64)
def read_contours(path) -> tuple:
    ds = pydicom.dcmread(path)
    out = []
    for rc in ds.ROIContourSequence:
        for c in getattr(rc, "ContourSequence", []):
            if c.ContourGeometricType == "CLOSED_PLANAR":
                out.append(np.array(c.ContourData, dtype=float).reshape(-1, 3))
    return tuple(out)


def measure(root, key) -> dict:
    struct, grad, vox = key
    dose = read_rtdose(root / "DOSE_GRIDS" / f"Linear_{grad}_{vox}mm_Aligned.dcm")
    dvh = dvh_from_contours(dose, read_contours(root / "STRUCTURES" / f"{struct}.dcm"), name=struct,
                            resolution_mm=0.2, interpolation="shape", end_shape="auto")
    return {
        "total_volume_cc": dvh.total_volume_ml,
        "Dmean_cGy": 100 * dvh.mean_gy,
        "D99_cGy": 100 * dvh.dose_at_volume_percent(99),
        "D95_cGy": 100 * dvh.dose_at_volume_percent(95),
        "D5_cGy": 100 * dvh.dose_at_volume_percent(5),
        "D1_cGy": 100 * dvh.dose_at_volume_percent(1),
        "D0.03cc_cGy": 100 * dvh.dose_at_volume_ml(0.03),
    }


@pytest.mark.parametrize("key,row", _cases())
def test_nelms_analytical(shared_data, key, row):
    root = _root(shared_data)
    got = measure(root, key)
    errors = {k: 100.0 * (v - float(row[k])) / float(row[k]) for k, v in got.items()}
    bad = {k: round(e, 2) for k, e in errors.items() if abs(e) > TOL[k]}
    assert not bad, f"{key}: errors (%) beyond tolerance {bad}; all errors {({k: round(e, 2) for k, e in errors.items()})}"
