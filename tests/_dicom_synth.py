"""Synthetic DICOM objects for the DICOM tests, built with pydicom (no downloaded data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

pydicom = __import__("pytest").importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid  # noqa: E402

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
RTSTRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
RTPLAN_STORAGE = "1.2.840.10008.5.1.4.1.1.481.5"


def _ds(x: float) -> str:
    return pydicom.valuerep.format_number_as_ds(float(x)) if x != 0 else "0"


def save(ds: Dataset, path, *, implicit: bool = False) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.save_as(str(path), enforce_file_format=True)
    return Path(path)


def write_ct_series(folder, hu, *, ipps, iop=(1, 0, 0, 0, 1, 0), pixel_spacing=(1.0, 1.0),
                    slope=1.0, intercepts=None, frame_uid=None, study_uid=None, series_uid=None,
                    patient_position="HFS", extra=None, shuffle=True, prefix="CT") -> dict:
    """Write ``hu`` (n, rows, cols) as single-frame CT slices at positions ``ipps`` (n, 3).

    ``pixel_spacing`` is (row spacing, column spacing) as in DICOM. Returns the UIDs.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hu = np.asarray(hu, dtype=np.float64)
    n, rows, cols = hu.shape
    frame_uid = frame_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    order = np.random.default_rng(0).permutation(n) if shuffle else np.arange(n)
    for k in order:
        intercept = -1024.0 if intercepts is None else float(intercepts[k])
        stored = np.rint((hu[k] - intercept) / slope).astype(np.int16)
        ds = Dataset()
        ds.SOPClassUID = CT_STORAGE
        ds.SOPInstanceUID = generate_uid()
        ds.Modality = "CT"
        ds.PatientName = "Synthetic^Phantom"
        ds.PatientID = "SYN001"
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.PatientPosition = patient_position
        ds.InstanceNumber = int(k) + 1
        ds.ImagePositionPatient = [_ds(v) for v in ipps[k]]
        ds.ImageOrientationPatient = [_ds(v) for v in iop]
        ds.PixelSpacing = [_ds(v) for v in pixel_spacing]
        ds.SliceThickness = "2"
        ds.Rows = rows
        ds.Columns = cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = _ds(intercept)
        ds.RescaleSlope = _ds(slope)
        ds.RescaleType = "HU"
        for key, value in (extra or {}).items():
            setattr(ds, key, value)
        ds.PixelData = stored.tobytes()
        save(ds, folder / f"{prefix}{k:04d}.dcm")
    return {"frame_uid": frame_uid, "study_uid": study_uid, "series_uid": series_uid}


def axial_positions(n, origin=(0.0, 0.0, 0.0), dz=2.0):
    return [(origin[0], origin[1], origin[2] + k * dz) for k in range(n)]


def circle(centre_xy, radius, z, n_points=64, clockwise=False):
    t = np.linspace(0, 2 * np.pi, n_points, endpoint=False)
    if clockwise:
        t = t[::-1]
    return np.column_stack([centre_xy[0] + radius * np.cos(t), centre_xy[1] + radius * np.sin(t),
                            np.full(n_points, z)])


def make_rtstruct(rois, *, frame_uid, study_uid=None, colors=None, types=None) -> Dataset:
    """``rois``: dict name -> list of (n, 3) contour arrays (or (geometric_type, array) tuples)."""
    ds = Dataset()
    ds.SOPClassUID = RTSTRUCT_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "RTSTRUCT"
    ds.PatientName = "Synthetic^Phantom"
    ds.PatientID = "SYN001"
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StructureSetLabel = "synthetic"
    ref_for = Dataset()
    ref_for.FrameOfReferenceUID = frame_uid
    ds.ReferencedFrameOfReferenceSequence = [ref_for]
    roi_seq, contour_seq, obs_seq = [], [], []
    for number, (name, contours) in enumerate(rois.items(), start=1):
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = frame_uid
        roi.ROIName = name
        roi.ROIGenerationAlgorithm = "MANUAL"
        roi_seq.append(roi)
        rc = Dataset()
        rc.ReferencedROINumber = number
        rc.ROIDisplayColor = list((colors or {}).get(name, (255, 0, 0)))
        items = []
        for c in contours:
            gtype, pts = c if isinstance(c, tuple) else ("CLOSED_PLANAR", c)
            item = Dataset()
            item.ContourGeometricType = gtype
            item.NumberOfContourPoints = len(pts)
            item.ContourData = [_ds(v) for v in np.asarray(pts).ravel()]
            items.append(item)
        rc.ContourSequence = items
        contour_seq.append(rc)
        obs = Dataset()
        obs.ObservationNumber = number
        obs.ReferencedROINumber = number
        obs.RTROIInterpretedType = (types or {}).get(name, "ORGAN")
        obs.ROIInterpreter = ""
        obs_seq.append(obs)
    ds.StructureSetROISequence = roi_seq
    ds.ROIContourSequence = contour_seq
    ds.RTROIObservationsSequence = obs_seq
    return ds


def make_tomo_plan(sinogram, *, pitch=0.287, period_s=20.0, jaws=(-12.55, 12.55), start_angle=0.0,
                   isocentre=(0.0, -50.0, 10.0), block=0x10, encoding="text", private=True,
                   sup176=None, moving_isocentre=False, patient_position="HFS", n_fractions=5,
                   frame_uid=None, field_width_mm=25.0, gantry_direction="CW", n_leaves=64) -> Dataset:
    """A helical TomoTherapy RT Plan with the TOMO_HA_01 private tags (and optionally Sup 176).

    ``encoding``: "text" (ASCII in UN, as TomoTherapy writes), "ds" (DS values) or "fd" (FD).
    ``sup176``: None, "beam" (Tomotherapeutic Control Point Sequence in the beam) or "inline"
    (leaf-open durations in each control point).
    """
    from tomodose.geometry.frames import couch_shift_patient

    sino = np.asarray(sinogram, dtype=float)
    n_proj = sino.shape[0]
    ds = Dataset()
    ds.SOPClassUID = RTPLAN_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "RTPLAN"
    ds.PatientName = "Synthetic^Phantom"
    ds.PatientID = "SYN001"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.FrameOfReferenceUID = frame_uid or generate_uid()
    ds.Manufacturer = "TomoTherapy Incorporated"
    ds.RTPlanLabel = "helical"
    setup = Dataset()
    setup.PatientSetupNumber = 1
    setup.PatientPosition = patient_position
    ds.PatientSetupSequence = [setup]
    fg = Dataset()
    fg.FractionGroupNumber = 1
    fg.NumberOfFractionsPlanned = n_fractions
    fg.NumberOfBeams = 1
    ds.FractionGroupSequence = [fg]
    ref = Dataset()
    ref.DoseReferenceNumber = 1
    ref.DoseReferenceStructureType = "VOLUME"
    ref.DoseReferenceType = "TARGET"
    ref.DoseReferenceDescription = "PTV"
    ref.TargetPrescriptionDose = "50"
    ds.DoseReferenceSequence = [ref]

    def put(item, offset, values):
        item.add_new((0x300D << 16) | block, "LO", "TOMO_HA_01")
        tag = (0x300D << 16) | (block << 8) | offset
        values = np.atleast_1d(np.asarray(values, dtype=float))
        if encoding == "text":
            text = "\\".join(f"{v:.6f}" for v in values)
            if len(text) % 2:
                text += " "
            item.add_new(tag, "UN", text.encode("ascii"))
        elif encoding == "ds":
            item.add_new(tag, "DS", [_ds(v) for v in values] if values.size > 1 else _ds(values[0]))
        elif encoding == "fd":
            item.add_new(tag, "FD", values.tolist() if values.size > 1 else float(values[0]))
        else:
            raise ValueError(encoding)

    beam = Dataset()
    beam.BeamNumber = 1
    beam.BeamName = "TomoHelical"
    beam.BeamType = "DYNAMIC"
    beam.RadiationType = "PHOTON"
    beam.TreatmentDeliveryType = "TREATMENT"
    beam.SourceAxisDistance = "850"
    beam.NumberOfControlPoints = n_proj + 1
    if private:
        put(beam, 0x60, pitch)
        put(beam, 0x40, period_s)
    step = 360.0 / 51
    travel = pitch * field_width_mm / 51
    proj_s = period_s / 51
    cps = []
    for k in range(n_proj + 1):
        cp = Dataset()
        cp.ControlPointIndex = k
        cp.CumulativeMetersetWeight = _ds(k / n_proj)
        cp.GantryAngle = _ds((start_angle + k * step) % 360.0)
        if k == 0:
            cp.GantryRotationDirection = gantry_direction
        if k == 0 or moving_isocentre:
            iso = np.asarray(isocentre) + (couch_shift_patient(k * travel, patient_position) if moving_isocentre else 0)
            cp.IsocenterPosition = [_ds(v) for v in iso]
        if jaws is not None:
            dev = Dataset()
            dev.RTBeamLimitingDeviceType = "ASYMY"
            dev.LeafJawPositions = [_ds(v) for v in jaws]
            cp.BeamLimitingDevicePositionSequence = [dev]
        row = sino[k] if k < n_proj else np.zeros(n_leaves)
        if private:
            put(cp, 0xA7, row)
        if sup176 == "inline":
            cp.TomotherapeuticLeafOpenDurations = (row * proj_s).tolist()
        cps.append(cp)
    beam.ControlPointSequence = cps
    if sup176 == "beam":
        items = []
        for k in range(n_proj + 1):
            it = Dataset()
            it.RTControlPointIndex = k + 1
            row = sino[k] if k < n_proj else np.zeros(n_leaves)
            it.TomotherapeuticLeafOpenDurations = (row * proj_s).tolist()
            items.append(it)
        beam.TomotherapeuticControlPointSequence = items
    ds.BeamSequence = [beam]
    return ds
