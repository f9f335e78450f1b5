"""RT Dose export and import (pydicom).

Export
------
:func:`write_rtdose` writes a dose :class:`~tomodose.geometry.grid.ImageVolume` (Gy, LPS grid)
as one multi-frame RT Dose object:

* ``ImagePositionPatient`` = LPS centre of voxel ``[0, 0, 0]`` (the grid origin);
* ``ImageOrientationPatient`` = ``[1, 0, 0, 0, 1, 0]`` (rows along +x, columns along +y);
* ``PixelSpacing`` = ``[dy, dx]`` (row spacing first, then column spacing);
* ``GridFrameOffsetVector`` relative to the first frame: ``[0, dz, 2 dz, ...]``;
* 32-bit unsigned pixels, ``dose = pixel * DoseGridScaling`` (no RescaleSlope on dose);
* ``DoseUnits`` GY, ``DoseType`` PHYSICAL (or EFFECTIVE/ERROR), ``DoseSummationType`` PLAN;
* ``FrameOfReferenceUID`` and ``StudyInstanceUID`` taken from the CT (:class:`DicomReference`).

The file is written atomically (temporary file in the same folder, then ``os.replace``).

Import
------
:func:`read_rtdose` reads an RT Dose back to an ImageVolume in Gy. It accepts relative
(first value 0) and absolute (first value equal to the z of ImagePositionPatient)
``GridFrameOffsetVector``, descending frame order, and in-plane axis flips (exactly, without
interpolation). Oblique orientations, non-uniform frame spacing and relative dose are refused
with a message naming the attribute.
"""

from __future__ import annotations

import datetime as _dt
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tomodose.geometry.grid import Grid, ImageVolume
from tomodose.io.dicom._common import (
    DicomError,
    DicomReference,
    as_floats,
    check_pydicom,
    format_ds,
    optional,
    read_dataset,
    require,
    tag_label,
    write_dataset_atomic,
)

__all__ = ["write_rtdose", "read_rtdose", "read_rtdose_info", "RTDoseInfo", "RT_DOSE_STORAGE"]

log = logging.getLogger(__name__)

#: SOP Class UID of RT Dose Storage.
RT_DOSE_STORAGE = "1.2.840.10008.5.1.4.1.1.481.2"
RT_PLAN_STORAGE = "1.2.840.10008.5.1.4.1.1.481.5"
_UINT32_MAX = 2**32 - 1
_GEOMETRY_TOL_MM = 1e-3


def _scaling_for(max_gy: float) -> tuple[str, float]:
    """DoseGridScaling as written (DS text) and its exact float value."""
    if max_gy <= 0:
        return "1", 1.0
    text = format_ds(max_gy / _UINT32_MAX)
    scaling = float(text)
    # the 16-character rounding may have made the scaling a little smaller: keep max in range
    while max_gy / scaling > _UINT32_MAX:
        text = format_ds(scaling * (1 + 1e-9))
        scaling = float(text)
    return text, scaling


def write_rtdose(
    dose: ImageVolume,
    path,
    *,
    reference: DicomReference | None = None,
    dose_type: str = "PHYSICAL",
    summation_type: str = "PLAN",
    referenced_plan_uid: str | None = None,
    series_description: str = "tomodose dose",
    comment: str = "",
) -> Path:
    """Write a dose volume as a DICOM RT Dose file.

    Parameters
    ----------
    dose : ImageVolume
        Dose in Gy (``unit == "Gy"``), (nz, ny, nx) on an LPS grid; all values >= 0 (>= any
        value for ``dose_type="ERROR"``).
    path : str or Path
        Output file; its folder must exist. Written atomically.
    reference : DicomReference, optional
        Frame of reference, study and patient of the CT the dose belongs to (from
        :func:`tomodose.io.dicom.ct.read_ct_series`). Without it new UIDs are generated and
        the dose cannot be overlaid on the original CT by a viewer (a warning is logged).
    dose_type : str
        ``"PHYSICAL"`` (default), ``"EFFECTIVE"`` or ``"ERROR"``.
    summation_type : str
        DoseSummationType, default ``"PLAN"``.
    referenced_plan_uid : str, optional
        SOPInstanceUID of the RT Plan; written in ReferencedRTPlanSequence when given.
    series_description, comment : str
        Free text.

    Returns
    -------
    Path
        The written file.
    """
    pydicom = check_pydicom()
    from pydicom.dataset import FileMetaDataset, Dataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    if not isinstance(dose, ImageVolume):
        raise TypeError(f"dose must be an ImageVolume, got {type(dose).__name__}")
    if dose.unit != "Gy":
        raise ValueError(f"dose unit must be 'Gy', got {dose.unit!r}")
    if dose_type not in ("PHYSICAL", "EFFECTIVE", "ERROR"):
        raise ValueError(f"dose_type must be one of ['PHYSICAL', 'EFFECTIVE', 'ERROR'], got {dose_type!r}")
    allowed_sum = ("PLAN", "MULTI_PLAN", "FRACTION", "BEAM", "BRACHY", "FRACTION_SESSION",
                   "BEAM_SESSION", "BRACHY_SESSION", "CONTROL_POINT", "RECORD")
    if summation_type not in allowed_sum:
        raise ValueError(f"summation_type must be one of {list(allowed_sum)}, got {summation_type!r}")
    if reference is not None and not isinstance(reference, DicomReference):
        raise TypeError(f"reference must be a DicomReference, got {type(reference).__name__}")
    arr = np.asarray(dose.array, dtype=np.float64)
    signed = dose_type == "ERROR"
    if not signed and arr.size and arr.min() < 0:
        raise ValueError(f"dose must be >= 0 Gy for dose_type {dose_type!r}, got minimum {arr.min()}")

    grid = dose.grid
    nz, ny, nx = grid.shape
    dx, dy, dz = grid.spacing_mm
    if signed:
        amax = float(np.abs(arr).max()) if arr.size else 0.0
        text, scaling = _scaling_for(amax * _UINT32_MAX / (2**31 - 1))
        pixels = np.clip(np.rint(arr / scaling), -(2**31 - 1), 2**31 - 1).astype("<i4")
    else:
        text, scaling = _scaling_for(float(arr.max()) if arr.size else 0.0)
        pixels = np.clip(np.rint(arr / scaling), 0, _UINT32_MAX).astype("<u4")

    if reference is None:
        log.warning("write_rtdose: no CT reference given; new FrameOfReferenceUID and "
                    "StudyInstanceUID are generated (viewers will not overlay the dose on the CT)")
        reference = DicomReference(frame_of_reference_uid=generate_uid(), study_instance_uid=generate_uid())
    if not reference.frame_of_reference_uid:
        raise ValueError("reference.frame_of_reference_uid must be a non-empty UID")

    now = _dt.datetime.now()
    sop_uid = generate_uid()
    ds = Dataset()
    # SOP common
    ds.SOPClassUID = RT_DOSE_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    # patient
    ds.PatientName = reference.patient_name
    ds.PatientID = reference.patient_id
    ds.PatientBirthDate = reference.patient_birth_date
    ds.PatientSex = reference.patient_sex
    # general study
    ds.StudyInstanceUID = reference.study_instance_uid or generate_uid()
    ds.StudyDate = ""
    ds.StudyTime = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = ""
    ds.AccessionNumber = ""
    # RT series
    ds.Modality = "RTDOSE"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 1
    ds.SeriesDescription = series_description
    # frame of reference
    ds.FrameOfReferenceUID = reference.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    # general equipment
    ds.Manufacturer = "tomodose"
    try:
        from tomodose import __version__ as version
    except Exception:  # pragma: no cover
        version = "unknown"
    ds.SoftwareVersions = str(version)
    # general image / image plane
    ds.InstanceNumber = 1
    ds.ContentDate = now.strftime("%Y%m%d")
    ds.ContentTime = now.strftime("%H%M%S")
    ds.ImagePositionPatient = [format_ds(v) for v in grid.origin_mm]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.PixelSpacing = [format_ds(dy), format_ds(dx)]  # row spacing (along y), column spacing (x)
    ds.SliceThickness = format_ds(dz)
    # image pixel + multi-frame
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ny
    ds.Columns = nx
    ds.NumberOfFrames = nz
    ds.FrameIncrementPointer = pydicom.tag.Tag(0x3004, 0x000C)
    ds.BitsAllocated = 32
    ds.BitsStored = 32
    ds.HighBit = 31
    ds.PixelRepresentation = 1 if signed else 0
    # RT dose
    ds.DoseUnits = "GY"
    ds.DoseType = dose_type
    ds.DoseSummationType = summation_type
    ds.GridFrameOffsetVector = [format_ds(k * dz) for k in range(nz)]
    ds.DoseGridScaling = text
    if comment:
        ds.DoseComment = comment[:10240]
    if referenced_plan_uid:
        ref = Dataset()
        ref.ReferencedSOPClassUID = RT_PLAN_STORAGE
        ref.ReferencedSOPInstanceUID = referenced_plan_uid
        ds.ReferencedRTPlanSequence = [ref]
    elif summation_type in ("PLAN", "MULTI_PLAN", "FRACTION", "BEAM"):
        log.info("write_rtdose: no referenced_plan_uid given; ReferencedRTPlanSequence omitted")
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RT_DOSE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    out = write_dataset_atomic(ds, path)
    log.info("wrote RT Dose %s: grid %s, max %.4g Gy, DoseGridScaling %s", out, grid.shape,
             float(arr.max()) if arr.size else 0.0, text)
    return out


@dataclass(frozen=True)
class RTDoseInfo:
    """Descriptive attributes of an RT Dose file (besides the volume).

    Attributes
    ----------
    reference : DicomReference
        Frame of reference, study and patient identifiers.
    dose_type : str
        DoseType (PHYSICAL, EFFECTIVE, ERROR).
    summation_type : str
        DoseSummationType.
    referenced_plan_uid : str
        First ReferencedSOPInstanceUID of ReferencedRTPlanSequence ("" when absent).
    offsets_absolute : bool
        True when the file's GridFrameOffsetVector held absolute z positions.
    sop_instance_uid : str
    """

    reference: DicomReference
    dose_type: str
    summation_type: str
    referenced_plan_uid: str
    offsets_absolute: bool
    sop_instance_uid: str


def _axis_sign(vec: np.ndarray, axis: int, what: str, where: str) -> int:
    target = np.zeros(3)
    target[axis] = 1.0
    if np.allclose(vec, target, atol=1e-5):
        return 1
    if np.allclose(vec, -target, atol=1e-5):
        return -1
    raise DicomError(
        f"{where}: {tag_label('ImageOrientationPatient')} {what} direction {vec.tolist()} is "
        f"oblique or permuted; only axis-aligned dose grids are supported (resample it first)"
    )


def read_rtdose_info(path) -> tuple[ImageVolume, RTDoseInfo]:
    """Read an RT Dose file: the dose volume (Gy, LPS grid) and its descriptive attributes.

    Raises
    ------
    DicomError
        Unreadable file, missing or malformed attributes, relative dose, oblique grid,
        non-uniform frame spacing.
    """
    where = f"RT Dose {str(path)!r}"
    ds = read_dataset(path, "RT Dose")
    modality = optional(ds, "Modality", where, "")
    sop_class = str(optional(ds, "SOPClassUID", where, ""))
    if modality != "RTDOSE" and sop_class != RT_DOSE_STORAGE:
        raise DicomError(f"{where}: not an RT Dose object (Modality {modality!r}, SOPClassUID {sop_class!r})")
    units = str(require(ds, "DoseUnits", where)).upper()
    if units != "GY":
        raise DicomError(f"{where}: {tag_label('DoseUnits')} is {units!r}; only absolute dose (GY) is supported")
    rows = int(as_floats(require(ds, "Rows", where), tag_label("Rows"), where, n=1)[0])
    cols = int(as_floats(require(ds, "Columns", where), tag_label("Columns"), where, n=1)[0])
    nframes_raw = optional(ds, "NumberOfFrames", where, 1)
    nframes = int(as_floats(nframes_raw, tag_label("NumberOfFrames"), where, n=1)[0])
    if rows < 1 or cols < 1 or nframes < 1:
        raise DicomError(f"{where}: Rows, Columns and NumberOfFrames must be >= 1, got {rows}, {cols}, {nframes}")
    ipp = as_floats(require(ds, "ImagePositionPatient", where), tag_label("ImagePositionPatient"), where, n=3)
    iop = as_floats(require(ds, "ImageOrientationPatient", where), tag_label("ImageOrientationPatient"), where, n=6)
    spacing = as_floats(require(ds, "PixelSpacing", where), tag_label("PixelSpacing"), where, n=2)
    if np.any(spacing <= 0):
        raise DicomError(f"{where}: {tag_label('PixelSpacing')} must be > 0, got {spacing.tolist()}")
    row_dir, col_dir = iop[:3], iop[3:]
    sx = _axis_sign(row_dir, 0, "row", where)
    sy = _axis_sign(col_dir, 1, "column", where)
    dy, dx = float(spacing[0]), float(spacing[1])
    scaling = as_floats(require(ds, "DoseGridScaling", where), tag_label("DoseGridScaling"), where, n=1)[0]
    if scaling <= 0:
        raise DicomError(f"{where}: {tag_label('DoseGridScaling')} must be > 0, got {scaling}")

    # frame positions along the slice normal (= sx*sy*z for the accepted orientations)
    normal_sign = sx * sy
    absolute = False
    if nframes > 1:
        gfov = as_floats(require(ds, "GridFrameOffsetVector", where), tag_label("GridFrameOffsetVector"),
                         where, n=nframes)
        if abs(gfov[0]) <= _GEOMETRY_TOL_MM:
            z = ipp[2] + normal_sign * gfov
        elif abs(gfov[0] - ipp[2]) <= _GEOMETRY_TOL_MM and normal_sign == 1:
            absolute = True
            z = gfov.copy()
        else:
            raise DicomError(
                f"{where}: {tag_label('GridFrameOffsetVector')} starts at {gfov[0]}, which is neither 0 "
                f"(relative offsets) nor the z of ImagePositionPatient {ipp[2]} (absolute positions)"
            )
        steps = np.diff(z)
        dz_signed = float(np.mean(steps))
        if abs(dz_signed) <= _GEOMETRY_TOL_MM or np.max(np.abs(steps - dz_signed)) > 1e-2:
            raise DicomError(
                f"{where}: {tag_label('GridFrameOffsetVector')} must be uniformly spaced and non-zero "
                f"(tolerance 0.01 mm), got steps from {steps.min():.4f} to {steps.max():.4f} mm"
            )
        dz = abs(dz_signed)
    else:
        z = np.array([ipp[2]])
        dz_signed = 1.0
        thick = optional(ds, "SliceThickness", where, None)
        if thick is None:
            raise DicomError(f"{where}: single-frame dose needs {tag_label('SliceThickness')} for its z size")
        dz = float(as_floats(thick, tag_label("SliceThickness"), where, n=1)[0])
        if dz <= 0:
            raise DicomError(f"{where}: {tag_label('SliceThickness')} must be > 0, got {dz}")

    bits = int(as_floats(require(ds, "BitsAllocated", where), tag_label("BitsAllocated"), where, n=1)[0])
    if bits not in (16, 32):
        raise DicomError(f"{where}: {tag_label('BitsAllocated')} must be 16 or 32, got {bits}")
    if "PixelData" not in ds:
        raise DicomError(f"{where}: missing required attribute {tag_label('PixelData')}")
    try:
        pixels = ds.pixel_array
    except Exception as exc:
        raise DicomError(f"{where}: pixel data could not be decoded (truncated?): {type(exc).__name__}: {exc}") from None
    pixels = np.asarray(pixels)
    expected = rows * cols * nframes
    if pixels.size != expected:
        raise DicomError(f"{where}: pixel data holds {pixels.size} values, expected "
                         f"Rows x Columns x NumberOfFrames = {expected}")
    vol = pixels.reshape(nframes, rows, cols).astype(np.float64) * scaling
    # reorder to ascending x, y, z
    if sx < 0:
        vol = vol[:, :, ::-1]
    if sy < 0:
        vol = vol[:, ::-1, :]
    if dz_signed < 0:
        vol = vol[::-1]
    x0 = ipp[0] if sx > 0 else ipp[0] - (cols - 1) * dx
    y0 = ipp[1] if sy > 0 else ipp[1] - (rows - 1) * dy
    z0 = float(z.min())
    grid = Grid(shape=(nframes, rows, cols), spacing_mm=(dx, dy, dz), origin_mm=(x0, y0, z0))
    dose_type = str(optional(ds, "DoseType", where, "PHYSICAL"))
    if dose_type == "ERROR":
        quantity = "dose_difference"
    elif dose_type == "EFFECTIVE":
        quantity = "effective_dose"
    else:
        quantity = "dose"
    volume = ImageVolume(grid, np.ascontiguousarray(vol), "Gy", quantity)
    plan_uid = ""
    seq = optional(ds, "ReferencedRTPlanSequence", where, None)
    if seq:
        plan_uid = str(optional(seq[0], "ReferencedSOPInstanceUID", where, ""))
    info = RTDoseInfo(
        reference=DicomReference.from_dataset(ds),
        dose_type=dose_type,
        summation_type=str(optional(ds, "DoseSummationType", where, "")),
        referenced_plan_uid=plan_uid,
        offsets_absolute=absolute,
        sop_instance_uid=str(optional(ds, "SOPInstanceUID", where, "")),
    )
    return volume, info


def read_rtdose(path) -> ImageVolume:
    """Read an RT Dose file to an ImageVolume (Gy, axis-aligned LPS grid). See :func:`read_rtdose_info`."""
    return read_rtdose_info(path)[0]
