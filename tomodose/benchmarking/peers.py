"""Peer implementations run on the same inputs as ours, only where installed.

Every peer comparison is a pair of harness cases (``setup(size, **params) -> (callable, info)``,
``size`` = grid spacing in mm of the liver phantom) that build identical inputs:

* **pymedphys gamma** (``pymedphys.gamma``) against :func:`tomodose.evaluation.gamma.gamma_index`:
  the synthetic dose of :mod:`tomodose.benchmarking.cases` against a copy shifted by 1 mm and
  scaled by 1.01, global 2 %/2 mm, 10 % cut-off, search to 3 x DTA, step DTA/10 (pymedphys'
  ``interp_fraction=10``, ``max_gamma=3``);
* **dicompyler-core DVH** (``dicompylercore.dvhcalc.get_dvh``) against
  :func:`tomodose.geometry.contours.rasterise_contours` + :func:`tomodose.evaluation.dvh.compute_dvh`:
  one spherical structure (radius 40 mm, 64-point polygons on every dose slice) from an RT
  Structure Set written here with pydicom and the dose written as RT Dose
  (:func:`tomodose.io.dicom.rtdose.write_rtdose`); both sides start from the contours and the
  dose grid; dicompyler reads the two files on each call (its normal use).

pyRadPlan (photon pencil beam) and OpenTPS (collapsed cone) are not run: see
:func:`peer_status` and docs/performance.md (their installs pin numpy < 2.4 / numpy 1.26 and
pull large dependency trees, incompatible with this environment).
"""

from __future__ import annotations

import importlib.util
import logging
import tempfile
from pathlib import Path

import numpy as np

from tomodose.benchmarking.cases import _patient, _synthetic_dose

log = logging.getLogger(__name__)

__all__ = ["PEERS", "available_peers", "peer_status"]

_GAMMA = dict(dose_percent=2.0, distance_mm=2.0, cutoff_percent=10.0)

#: peer -> comparison name, module probed, (our case, their case)
PEERS = {
    "pymedphys": {"name": "gamma_vs_pymedphys", "module": "pymedphys", "probe": "pymedphys",
                  "cases": ("tomodose.benchmarking.peers:ours_gamma", "tomodose.benchmarking.peers:pymedphys_gamma")},
    "dicompyler-core": {"name": "dvh_vs_dicompyler", "module": "dicompylercore",
                        "probe": "dicompylercore.dicomparser",
                        "cases": ("tomodose.benchmarking.peers:ours_dvh", "tomodose.benchmarking.peers:dicompyler_dvh")},
}

#: Peers the issue names that this suite cannot run, with the reason.
NOT_RUN = {
    "pyRadPlan": "not run: pyRadPlan 0.5.0 requires numpy < 2.4 (this environment has 2.4) and installs ~100 "
                 "packages (LLM SDKs via pydantic-ai); static-beam comparison not implemented",
    "opentps-core": "not run: opentps-core 2.0.0 pins numpy 1.26 and pymedphys 0.40 (would downgrade both); "
                    "static-beam comparison not implemented",
}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _importable(module: str) -> str | None:
    """None if ``module`` imports, else the error (e.g. dicompyler-core 0.5.6 with pydicom 3)."""
    import importlib

    try:
        importlib.import_module(module)
    except Exception as exc:  # any failure means the peer cannot run here
        return f"{type(exc).__name__}: {exc}"
    return None


def available_peers() -> list[str]:
    """Peers of :data:`PEERS` installed and importable here."""
    return [p for p, d in PEERS.items() if _installed(d["module"]) and _importable(d["probe"]) is None]


def peer_status() -> dict:
    """For every peer named in issue 9: version when run, or why not."""
    from importlib import metadata

    out = {}
    for peer, d in PEERS.items():
        if not _installed(d["module"]):
            out[peer] = "not installed: skipped"
            continue
        err = _importable(d["probe"])
        try:
            version = metadata.version(peer)
        except metadata.PackageNotFoundError:
            version = "?"
        out[peer] = f"run (version {version})" if err is None else \
            f"installed (version {version}) but not importable, skipped: {err}"
    out.update(NOT_RUN)
    return out


# --------------------------------------------------------------------------------------------
# gamma


def _gamma_inputs(size):
    patient = _patient(float(size))
    ref = _synthetic_dose(patient)
    ev = _synthetic_dose(patient, shift_mm=1.0, scale=1.01)
    return patient, ref, ev


def ours_gamma(size):
    """Our gamma on the peer comparison's inputs."""
    from tomodose.evaluation.gamma import gamma_index

    patient, ref, ev = _gamma_inputs(size)
    info = {"n_voxels": int(patient.grid.n_voxels)}

    def work():
        res = gamma_index(ref, ev, progress=False, **_GAMMA)
        info["pass_rate_percent"] = round(float(res.pass_rate_percent), 3)
        info["n_evaluated"] = int(np.count_nonzero(np.isfinite(res.values)))

    return work, info


def pymedphys_gamma(size):
    """pymedphys.gamma on the same inputs (axes in mm, (z, y, x) order)."""
    import pymedphys

    patient, ref, ev = _gamma_inputs(size)
    g = patient.grid
    axes = (np.asarray(g.z_mm), np.asarray(g.y_mm), np.asarray(g.x_mm))
    r = np.asarray(ref.array, dtype=np.float64)
    e = np.asarray(ev.array, dtype=np.float64)
    info = {"n_voxels": int(g.n_voxels), "version": getattr(pymedphys, "__version__", "?")}

    def work():
        gam = pymedphys.gamma(axes, r, axes, e, _GAMMA["dose_percent"], _GAMMA["distance_mm"],
                              lower_percent_dose_cutoff=_GAMMA["cutoff_percent"], interp_fraction=10,
                              max_gamma=3.0, local_gamma=False, quiet=True)
        valid = np.isfinite(gam)
        info["pass_rate_percent"] = round(100.0 * float(np.mean(gam[valid] <= 1.0)), 3) if valid.any() else None
        info["n_evaluated"] = int(valid.sum())

    return work, info


# --------------------------------------------------------------------------------------------
# DVH

_RADIUS_MM = 40.0


def _sphere_contours(patient, radius_mm: float = _RADIUS_MM, n_points: int = 64):
    g = patient.grid
    cx, cy, cz = patient.structures["PTV"].centroid_mm()
    t = np.linspace(0.0, 2.0 * np.pi, n_points, endpoint=False)
    contours = []
    for z in np.asarray(g.z_mm):
        dz = z - cz
        if abs(dz) >= radius_mm:
            continue
        r = np.sqrt(radius_mm**2 - dz**2)
        contours.append(np.stack([cx + r * np.cos(t), cy + r * np.sin(t), np.full_like(t, z)], axis=1))
    return contours


def _write_rtstruct(path: Path, contours, dose_path: Path, name: str = "Sphere") -> None:
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    rtdose = pydicom.dcmread(str(dose_path), stop_before_pixels=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "RTSTRUCT"
    ds.PatientName = "bench"
    ds.PatientID = "bench"
    ds.StudyInstanceUID = getattr(rtdose, "StudyInstanceUID", generate_uid())
    ds.SeriesInstanceUID = generate_uid()
    ds.FrameOfReferenceUID = getattr(rtdose, "FrameOfReferenceUID", generate_uid())
    ds.StructureSetLabel = "bench"
    roi = Dataset()
    roi.ROINumber = 1
    roi.ROIName = name
    roi.ReferencedFrameOfReferenceUID = ds.FrameOfReferenceUID
    roi.ROIGenerationAlgorithm = "MANUAL"
    ds.StructureSetROISequence = Sequence([roi])
    rc = Dataset()
    rc.ReferencedROINumber = 1
    rc.ROIDisplayColor = [255, 0, 0]
    items = []
    for c in contours:
        item = Dataset()
        item.ContourGeometricType = "CLOSED_PLANAR"
        item.NumberOfContourPoints = int(c.shape[0])
        item.ContourData = [f"{v:.4f}" for v in c.ravel()]
        items.append(item)
    rc.ContourSequence = Sequence(items)
    ds.ROIContourSequence = Sequence([rc])
    obs = Dataset()
    obs.ObservationNumber = 1
    obs.ReferencedROINumber = 1
    obs.RTROIInterpretedType = "PTV"
    obs.ROIInterpreter = ""
    ds.RTROIObservationsSequence = Sequence([obs])
    ds.save_as(str(path), enforce_file_format=True)


def _dvh_inputs(size):
    patient = _patient(float(size))
    dose = _synthetic_dose(patient)
    return patient, dose, _sphere_contours(patient)


def ours_dvh(size):
    """Our voxel DVH (rasterised contours, fractional occupancy) of the sphere."""
    from tomodose.evaluation.dvh import compute_dvh
    from tomodose.geometry.contours import rasterise_contours
    from tomodose.geometry.structures import Structure

    patient, dose, contours = _dvh_inputs(size)
    info = {"n_voxels": int(patient.grid.n_voxels), "n_contours": len(contours),
            "sphere_volume_ml": round(4.0 / 3.0 * np.pi * (_RADIUS_MM / 10.0) ** 3, 2)}

    def work():
        occ = rasterise_contours(patient.grid, contours)
        s = Structure("Sphere", patient.grid, occ, role="target")
        d = compute_dvh(dose, s)
        info["volume_ml"] = round(float(d.differential_ml.sum()), 2)
        info["mean_gy"] = round(float(d.mean_gy), 3)

    return work, info


def dicompyler_dvh(size):
    """dicompyler-core's DVH of the same sphere (RT Structure Set + RT Dose files)."""
    from dicompylercore import dvhcalc

    from tomodose.io.dicom.rtdose import write_rtdose

    patient, dose, contours = _dvh_inputs(size)
    folder = Path(tempfile.mkdtemp(prefix="tomodose-bench-dvh-"))
    dose_path = folder / "rtdose.dcm"
    write_rtdose(dose, dose_path)
    struct_path = folder / "rtstruct.dcm"
    _write_rtstruct(struct_path, contours, dose_path)
    info = {"n_voxels": int(patient.grid.n_voxels), "n_contours": len(contours)}

    def work():
        d = dvhcalc.get_dvh(str(struct_path), str(dose_path), 1)
        info["volume_ml"] = round(float(d.volume), 2)
        info["mean_gy"] = round(float(d.mean), 3)

    return work, info
