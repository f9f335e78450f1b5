"""IEC 61217 machine coordinates <-> DICOM patient LPS.

Frames
------
IEC 61217 fixed system ``f`` (mm, origin at the isocentre)
    +X to the right as seen from the foot of the couch looking at the gantry, +Y towards the
    gantry, +Z up (towards the ceiling).
IEC 61217 gantry system ``g``
    The fixed system rotated about +Y by the gantry angle. The source sits on +Zg at the
    source-axis distance; ``Xg`` is the direction across the fan (the MLC leaf axis of a
    TomoTherapy unit), ``Yg = Yf`` is the couch (jaw) direction.
    Rotations are right-handed about +Y: seen from the foot of the couch the gantry angle
    grows **clockwise**; at 0 deg the source is above the isocentre, at 90 deg it is at +X.
DICOM patient LPS ``p``
    +x patient left, +y posterior, +z superior (head).

For a head-first supine (HFS) patient: +Xf = patient left (+x), +Yf = superior (+z),
+Zf = anterior (-y), i.e. ``p = (Xf, -Zf, Yf)``. HFP, FFS and FFP are supported too; decubitus
orientations are refused.

Couch
-----
The couch translation ``couch_mm`` is the longitudinal position along +Yf (into the bore is
positive). Moving the couch by +d moves the patient by +d along +Yf, so the machine isocentre
moves by -d along Yf *relative to the patient*: for HFS it moves inferiorly (-z). This is what
happens during a helical delivery: the beam plane sweeps the patient from superior to
inferior for a head-first patient.
"""

from __future__ import annotations

import numpy as np

from tomodose._validate import check_choice, check_finite_scalar, check_vector

__all__ = [
    "PATIENT_POSITIONS",
    "fixed_to_patient_matrix",
    "fixed_to_patient",
    "patient_to_fixed",
    "gantry_to_fixed_matrix",
    "source_position_fixed",
    "beam_axes_fixed",
    "source_position_patient",
    "beam_axes_patient",
    "couch_shift_patient",
]

#: Patient positions accepted (DICOM Patient Position attribute values).
PATIENT_POSITIONS = ("HFS", "HFP", "FFS", "FFP")

# Rows give the patient axes (x, y, z) in terms of the fixed axes (X, Y, Z): p = M @ f.
_FIXED_TO_PATIENT = {
    "HFS": np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]], dtype=np.float64),
    "HFP": np.array([[-1, 0, 0], [0, 0, 1], [0, 1, 0]], dtype=np.float64),
    "FFS": np.array([[-1, 0, 0], [0, 0, -1], [0, -1, 0]], dtype=np.float64),
    "FFP": np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], dtype=np.float64),
}


def _position(patient_position: str) -> str:
    if isinstance(patient_position, str) and patient_position.upper() in (
        "HFDL", "HFDR", "FFDL", "FFDR"
    ):
        raise ValueError(
            f"patient_position {patient_position!r} (decubitus) is not supported; "
            f"expected one of {list(PATIENT_POSITIONS)}"
        )
    return check_choice("patient_position", patient_position, PATIENT_POSITIONS)


def fixed_to_patient_matrix(patient_position: str = "HFS") -> np.ndarray:
    """(3, 3) rotation ``M`` with ``p_lps = M @ f_iec`` for directions (and offsets from isocentre)."""
    return _FIXED_TO_PATIENT[_position(patient_position)].copy()


def fixed_to_patient(points_fixed_mm, isocentre_lps_mm, patient_position: str = "HFS") -> np.ndarray:
    """Convert (..., 3) points from IEC fixed (mm, origin isocentre) to patient LPS (mm).

    ``isocentre_lps_mm`` is the LPS position of the machine isocentre (for a given couch
    position; see :func:`couch_shift_patient`).
    """
    m = fixed_to_patient_matrix(patient_position)
    f = np.asarray(points_fixed_mm, dtype=np.float64)
    return f @ m.T + np.asarray(check_vector("isocentre_lps_mm", isocentre_lps_mm))


def patient_to_fixed(points_lps_mm, isocentre_lps_mm, patient_position: str = "HFS") -> np.ndarray:
    """Inverse of :func:`fixed_to_patient`."""
    m = fixed_to_patient_matrix(patient_position)
    p = np.asarray(points_lps_mm, dtype=np.float64) - np.asarray(
        check_vector("isocentre_lps_mm", isocentre_lps_mm)
    )
    return p @ m  # m is orthogonal: inverse = transpose


def gantry_to_fixed_matrix(gantry_angle_deg: float) -> np.ndarray:
    """(3, 3) rotation ``R`` with ``f = R @ g`` (columns: Xg, Yg, Zg expressed in fixed axes)."""
    theta = np.deg2rad(check_finite_scalar("gantry_angle_deg", gantry_angle_deg))
    c, s = np.cos(theta), np.sin(theta)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def source_position_fixed(gantry_angle_deg, sad_mm: float = 850.0) -> np.ndarray:
    """Source position(s) in IEC fixed mm: ``SAD * (sin t, 0, cos t)``; shape (..., 3)."""
    theta = np.deg2rad(np.asarray(gantry_angle_deg, dtype=np.float64))
    return np.stack([sad_mm * np.sin(theta), np.zeros_like(theta), sad_mm * np.cos(theta)], axis=-1)


def beam_axes_fixed(gantry_angle_deg) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit vectors ``(xg, yg, zg)`` of the gantry frame in IEC fixed, each shape (..., 3).

    ``zg`` points from the isocentre to the source; the beam travels along ``-zg``; ``xg`` is
    the across-fan (leaf) direction and ``yg`` the couch/jaw direction.
    """
    theta = np.deg2rad(np.asarray(gantry_angle_deg, dtype=np.float64))
    c, s = np.cos(theta), np.sin(theta)
    zero, one = np.zeros_like(theta), np.ones_like(theta)
    xg = np.stack([c, zero, -s], axis=-1)
    yg = np.stack([zero, one, zero], axis=-1)
    zg = np.stack([s, zero, c], axis=-1)
    return xg, yg, zg


def couch_shift_patient(couch_mm, patient_position: str = "HFS") -> np.ndarray:
    """Displacement (LPS mm, shape (..., 3)) of the machine isocentre *relative to the patient*
    when the couch moves by ``couch_mm`` along +Yf: ``M @ (0, -couch, 0)``."""
    m = fixed_to_patient_matrix(patient_position)
    c = np.asarray(couch_mm, dtype=np.float64)
    return np.multiply.outer(-c, m[:, 1])


def source_position_patient(
    gantry_angle_deg, couch_mm, isocentre_lps_mm, sad_mm: float = 850.0, patient_position: str = "HFS"
) -> np.ndarray:
    """Source position(s) in patient LPS mm for gantry angle(s) and couch position(s).

    ``isocentre_lps_mm`` is where the machine isocentre lies in the patient at couch 0.
    Arrays broadcast; the result has shape (..., 3).
    """
    m = fixed_to_patient_matrix(patient_position)
    iso = np.asarray(check_vector("isocentre_lps_mm", isocentre_lps_mm))
    src_f = source_position_fixed(gantry_angle_deg, sad_mm)
    shift = couch_shift_patient(couch_mm, patient_position)
    return src_f @ m.T + iso + shift


def beam_axes_patient(gantry_angle_deg, patient_position: str = "HFS"):
    """Gantry-frame unit vectors ``(xg, yg, zg)`` expressed in patient LPS, each (..., 3)."""
    m = fixed_to_patient_matrix(patient_position)
    return tuple(v @ m.T for v in beam_axes_fixed(gantry_angle_deg))
