"""Shared helpers of the DICOM readers and writers (private).

Every problem with a file is raised as :class:`DicomError` (a :class:`ValueError`) whose
message names the file, the attribute (keyword and tag) and what was expected, e.g.
``"RT Dose 'RD.dcm': missing required attribute DoseGridScaling (3004,000E)"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tomodose._atomic import atomic_path

__all__ = ["DicomError", "DicomReference", "read_dataset", "require", "optional", "tag_label",
           "as_floats", "write_dataset_atomic", "check_pydicom"]


class DicomError(ValueError):
    """A DICOM file is missing, unreadable, malformed or not supported."""


def check_pydicom():
    """Import pydicom or raise an ImportError that says how to install it."""
    try:
        import pydicom  # noqa: F401
    except ImportError as exc:  # pragma: no cover - pydicom is a test dependency
        raise ImportError(
            "tomodose DICOM support needs pydicom: pip install 'tomodose[dicom]'"
        ) from exc
    return pydicom


@dataclass(frozen=True)
class DicomReference:
    """Identifiers that tie exported objects to the patient's images.

    Attributes
    ----------
    frame_of_reference_uid : str
        FrameOfReferenceUID (0020,0052) of the CT the geometry refers to.
    study_instance_uid : str
        StudyInstanceUID (0020,000D); exported objects join this study.
    patient_id, patient_name, patient_birth_date, patient_sex : str
        Patient module values copied into exported objects (may be empty).
    series_instance_uid : str
        SeriesInstanceUID of the CT (informative).
    patient_position : str
        PatientPosition (0018,5100) of the CT, e.g. ``"HFS"`` (may be empty).
    """

    frame_of_reference_uid: str
    study_instance_uid: str = ""
    patient_id: str = ""
    patient_name: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    series_instance_uid: str = ""
    patient_position: str = ""

    @classmethod
    def from_dataset(cls, ds) -> "DicomReference":
        """Identifiers of any image or RT object (missing values become empty strings)."""
        def get(keyword):
            try:
                value = ds.get(keyword, "")
            except Exception:  # malformed optional value: treat as absent
                return ""
            return "" if value is None else str(value)

        return cls(
            frame_of_reference_uid=get("FrameOfReferenceUID"),
            study_instance_uid=get("StudyInstanceUID"),
            patient_id=get("PatientID"),
            patient_name=get("PatientName"),
            patient_birth_date=get("PatientBirthDate"),
            patient_sex=get("PatientSex"),
            series_instance_uid=get("SeriesInstanceUID"),
            patient_position=get("PatientPosition"),
        )

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def tag_label(keyword: str) -> str:
    """``"DoseGridScaling (3004,000E)"`` for a keyword of the DICOM dictionary."""
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(keyword)
    if tag is None:
        return keyword
    return f"{keyword} ({tag >> 16:04X},{tag & 0xFFFF:04X})"


def read_dataset(path, what: str, *, stop_before_pixels: bool = False):
    """Read one DICOM file, turning every failure into a :class:`DicomError` naming the file."""
    check_pydicom()
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} file {str(path)!r} does not exist")
    if path.is_dir():
        raise DicomError(f"{what} {str(path)!r} is a folder, expected a DICOM file")
    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=stop_before_pixels)
    except InvalidDicomError as exc:
        raise DicomError(f"{what} {str(path)!r} is not a DICOM file ({exc})") from None
    except Exception as exc:  # truncated or corrupt files raise many kinds of errors
        raise DicomError(
            f"{what} {str(path)!r} could not be read (truncated or corrupt?): "
            f"{type(exc).__name__}: {exc}"
        ) from None
    return ds


def _value(ds, keyword: str, where: str):
    """Value of ``keyword`` in ``ds`` or a DicomError when decoding fails."""
    try:
        return ds[keyword].value if keyword in ds else None
    except Exception as exc:
        raise DicomError(
            f"{where}: attribute {tag_label(keyword)} could not be decoded "
            f"(wrong VR or corrupt value): {type(exc).__name__}: {exc}"
        ) from None


def require(ds, keyword: str, where: str):
    """Value of a required attribute; DicomError when absent or empty."""
    try:
        present = keyword in ds
    except Exception as exc:
        raise DicomError(f"{where}: dataset could not be parsed ({type(exc).__name__}: {exc})") from None
    if not present:
        raise DicomError(f"{where}: missing required attribute {tag_label(keyword)}")
    value = _value(ds, keyword, where)
    if value is None or (isinstance(value, (str, bytes, list, tuple)) and len(value) == 0):
        raise DicomError(f"{where}: required attribute {tag_label(keyword)} is empty")
    return value


def optional(ds, keyword: str, where: str, default=None):
    """Value of an optional attribute, ``default`` when absent or empty."""
    try:
        present = keyword in ds
    except Exception:
        return default
    if not present:
        return default
    value = _value(ds, keyword, where)
    if value is None or (isinstance(value, (str, bytes, list, tuple)) and len(value) == 0):
        return default
    return value


def as_floats(value, label: str, where: str, *, n: int | None = None, min_n: int = 1) -> np.ndarray:
    """Convert a DICOM numeric value (DS/IS/FL/FD, single or multi) to a finite float array."""
    if isinstance(value, (bytes, bytearray)):
        raise DicomError(f"{where}: {label} holds raw bytes, expected numbers (wrong VR?)")
    items = [value] if isinstance(value, (str, int, float)) or not hasattr(value, "__iter__") else list(value)
    try:
        arr = np.array([float(v) for v in items], dtype=np.float64)
    except (TypeError, ValueError):
        raise DicomError(f"{where}: {label} must hold numbers, got {str(value)[:60]!r}") from None
    if n is not None and arr.size != n:
        raise DicomError(f"{where}: {label} must hold {n} value(s), got {arr.size}")
    if arr.size < min_n:
        raise DicomError(f"{where}: {label} must hold at least {min_n} value(s), got {arr.size}")
    if not np.all(np.isfinite(arr)):
        raise DicomError(f"{where}: {label} must be finite, got {arr.tolist()[:6]}")
    return arr


def format_ds(value: float) -> str:
    """A decimal string (VR DS, at most 16 characters) that round-trips as closely as possible."""
    from pydicom.valuerep import format_number_as_ds

    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"cannot write a non-finite number as DICOM DS, got {value}")
    if value == 0.0:
        return "0"
    return format_number_as_ds(value)


def write_dataset_atomic(ds, path) -> Path:
    """Write ``ds`` (with file meta) to ``path`` atomically: temporary file + ``os.replace``."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            ds.save_as(fh, enforce_file_format=True)
    return Path(path)
