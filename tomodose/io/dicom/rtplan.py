"""Helical TomoTherapy RT Plan import -> :class:`~tomodose.delivery.plan.HelicalPlan`.

Two encodings are understood.

First-generation export (private tags)
--------------------------------------
An RT Plan (RT Plan Storage) with one helical beam whose items carry a private block of the
creator ``"TOMO_HA_01"`` in group 300D. The creator element ``(300D,00bb)`` reserves the
elements ``(300D,bbxx)``; the usual block is ``bb = 0x10``, but any block number is found.

==================  ===========================================  =====================
element (in block)  meaning                                      where
==================  ===========================================  =====================
``xxA7``            leaf-open fraction of every leaf (64 values)  each control point
``xx60``            pitch (couch travel per rotation / width)     beam (or dataset)
``xx40``            gantry period (s per rotation)                beam (or dataset)
==================  ===========================================  =====================

Values may be stored as numbers (DS/FL/FD) or, as TomoTherapy does, as ASCII decimal text in an
``UN``/``OB`` element with ``\\``-separated values.

Standard attributes, DICOM Supplement 176
-----------------------------------------
Where present, the **Tomotherapeutic Leaf Open Durations (3010,0099)** (seconds, one value
per leaf, in the order of the leaf boundaries) of the **Tomotherapeutic Control Point
Sequence (3010,0098)** items (ordered by RT Control Point Index (300A,0600)) are read: in a
control point item, in the beam, or at the top level. They are converted to leaf-open
fractions with the projection duration ``T / 51``. When both encodings are present they must
agree. Tomotherapeutic Leaf Initial Closed Durations (3010,009A) (off-centre opening within a
projection) are checked for consistency; the timing offset itself is not modelled (the dose
engines open each leaf centred in its projection), which is logged.

Standard attributes used from the RT Plan
-----------------------------------------
* Control point ``k`` (0-based) starts projection ``k``; ``N`` control points give ``N - 1``
  projections. Values at the final control point describe no delivery (ignored, with a warning
  when non-zero).
* Gantry Angle (300A,011E) of control point 0 is the start angle; later angles, when given,
  must advance by 360/51 deg per control point. Gantry Rotation Direction (300A,011F) must be
  CW (or the angles must show it).
* Jaws: ``ASYMY`` Leaf/Jaw Positions (300A,011C) of Beam Limiting Device Position Sequence
  (300A,011A): field width = y2 - y1, matched to a nominal width of the machine; the jaws
  must be static and centred (dynamic jaws are refused).
* Isocenter Position (300A,012C) of control point 0 is the machine isocentre in the patient at
  the start of delivery (``isocentre_lps_mm``, couch start 0). Later isocentre positions, when
  given, must follow the couch motion implied by pitch and field width.
* Patient Position (0018,5100) from Patient Setup Sequence, Number of Fractions Planned
  (300A,0078) and TARGET Dose References (Target Prescription Dose, 300A,0026).

Anything not understood is a :class:`~tomodose.io.dicom._common.DicomError` naming the tag;
values missing from the file may be supplied as keyword arguments, never guessed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from tomodose.delivery.machine import TomoMachine
from tomodose.delivery.plan import HelicalPlan
from tomodose.geometry.frames import PATIENT_POSITIONS, couch_shift_patient
from tomodose.io.dicom._common import (
    DicomError,
    as_floats,
    optional,
    read_dataset,
    require,
    tag_label,
)

__all__ = ["read_tomo_plan", "read_tomo_plan_info", "TomoPlanInfo", "TOMO_PRIVATE_CREATOR",
           "TOMO_LEAF_FRACTIONS", "TOMO_PITCH", "TOMO_GANTRY_PERIOD"]

log = logging.getLogger(__name__)

RT_PLAN_STORAGE = "1.2.840.10008.5.1.4.1.1.481.5"
TOMOTHERAPEUTIC_RADIATION_STORAGE = "1.2.840.10008.5.1.4.1.1.481.14"
#: Private creator of the first-generation TomoTherapy export.
TOMO_PRIVATE_CREATOR = "TOMO_HA_01"
TOMO_GROUP = 0x300D
#: Element offsets (low byte) inside the private block.
TOMO_LEAF_FRACTIONS = 0xA7
TOMO_PITCH = 0x60
TOMO_GANTRY_PERIOD = 0x40
_NAMES = {TOMO_LEAF_FRACTIONS: "leaf-open fractions", TOMO_PITCH: "pitch", TOMO_GANTRY_PERIOD: "gantry period"}

_ANGLE_TOL_DEG = 0.1
_JAW_TOL_MM = 0.1


@dataclass(frozen=True)
class TomoPlanInfo:
    """Where the imported plan came from.

    Attributes
    ----------
    source : str
        ``"TOMO_HA_01"``, ``"Supplement 176"`` or ``"TOMO_HA_01 + Supplement 176"``.
    beam_number, beam_name : int, str
        The helical beam that was read.
    jaw_positions_mm : tuple of 2 float or None
        ASYMY jaw positions (y1, y2) at the isocentre.
    sop_instance_uid, frame_of_reference_uid : str
    notes : tuple of str
    """

    source: str
    beam_number: int
    beam_name: str
    jaw_positions_mm: tuple | None
    sop_instance_uid: str
    frame_of_reference_uid: str
    notes: tuple = ()


def _ptag(block: int, offset: int) -> int:
    return (TOMO_GROUP << 16) | (block << 8) | offset


def _label(block: int | None, offset: int) -> str:
    b = "xx" if block is None else f"{block:02X}"
    return f"(300D,{b}{offset:02X}) [{TOMO_PRIVATE_CREATOR} {_NAMES.get(offset, 'private')}]"


def _creator_block(ds) -> int | None:
    """Block number ``bb`` of the TOMO_HA_01 creator (300D,00bb) in ``ds``, or None."""
    for bb in range(0x10, 0x100):
        tag = (TOMO_GROUP << 16) | bb
        if tag not in ds:
            continue
        try:
            value = ds[tag].value
        except Exception:
            continue
        if isinstance(value, (bytes, bytearray)):
            try:
                value = bytes(value).decode("ascii")
            except UnicodeDecodeError:
                continue
        if isinstance(value, str) and value.strip("\x00 ").strip() == TOMO_PRIVATE_CREATOR:
            return bb
    return None


def _decode_numbers(elem, label: str, where: str) -> np.ndarray:
    """Numbers of a private element stored as DS/FL/FD or as ASCII text in UN/OB/LO/LT."""
    try:
        value = elem.value
    except Exception as exc:
        raise DicomError(f"{where}: {label} could not be decoded: {type(exc).__name__}: {exc}") from None
    if isinstance(value, (bytes, bytearray)):
        raw = bytes(value)
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            raise DicomError(f"{where}: {label} holds binary data (VR {elem.VR}, {len(raw)} bytes); "
                             f"expected ASCII decimal text or an FL/FD/DS value") from None
        value = text
    if isinstance(value, str):
        text = value.replace("\x00", "").strip()
        if not text:
            raise DicomError(f"{where}: {label} is empty")
        parts = [p.strip() for p in text.split("\\")]
        try:
            arr = np.array([float(p) for p in parts], dtype=np.float64)
        except ValueError:
            raise DicomError(f"{where}: {label} must be '\\'-separated decimal numbers, got "
                             f"{text[:60]!r}") from None
    else:
        arr = as_floats(value, label, where)
    if arr.size == 0 or not np.all(np.isfinite(arr)):
        raise DicomError(f"{where}: {label} must hold finite numbers, got {arr.tolist()[:6]}")
    return arr


def _private_numbers(ds, offset: int, where: str) -> tuple[np.ndarray | None, str]:
    block = _creator_block(ds)
    if block is None:
        return None, _label(None, offset)
    tag = _ptag(block, offset)
    label = _label(block, offset)
    if tag not in ds:
        return None, label
    try:
        elem = ds[tag]
    except Exception as exc:
        raise DicomError(f"{where}: {label} could not be decoded (wrong VR or corrupt value): "
                         f"{type(exc).__name__}: {str(exc)[:120]}") from None
    return _decode_numbers(elem, label, where), label


def _private_scalar(beam, ds, offset: int, where: str) -> tuple[float | None, str]:
    """A private scalar from the beam item or, failing that, the top-level dataset."""
    values = []
    label = _label(None, offset)
    for item, w in ((beam, f"{where}, beam"), (ds, where)):
        arr, lab = _private_numbers(item, offset, w)
        if "xx" in label and "xx" not in lab:
            label = lab  # name the element in the block that exists
        if arr is not None:
            if arr.size != 1:
                raise DicomError(f"{w}: {lab} must hold one value, got {arr.size}")
            values.append(float(arr[0]))
            label = lab
    if not values:
        return None, label
    if len(values) == 2 and not np.isclose(values[0], values[1], rtol=1e-6, atol=0):
        raise DicomError(f"{where}: {label} differs between the beam ({values[0]}) and the plan ({values[1]})")
    return values[0], label


def _merge(name: str, from_file: float | None, given: float | None, label: str, where: str,
           kwarg: str) -> float:
    if from_file is None and given is None:
        raise DicomError(f"{where}: {name} not found ({label}); pass {kwarg}= to supply it")
    if from_file is not None and given is not None and not np.isclose(from_file, given, rtol=1e-6, atol=1e-9):
        raise DicomError(f"{where}: {name} {from_file} in {label} contradicts {kwarg}={given}")
    return float(from_file if from_file is not None else given)


def _check_declared_count(item, keyword: str, actual: int, where: str, expectation: str) -> None:
    """Raise unless the optional count attribute ``keyword`` of ``item`` is absent or ``actual``."""
    declared = optional(item, keyword, where, None)
    if declared is not None and int(as_floats(declared, tag_label(keyword), where, n=1)[0]) != actual:
        raise DicomError(f"{where}: {tag_label(keyword)} is {declared} but {expectation}")


def _select_beam(ds, beam_number, where):
    beams = list(require(ds, "BeamSequence", where))
    candidates = []
    for i, beam in enumerate(beams):
        w = f"{where}, BeamSequence item {i}"
        number = optional(beam, "BeamNumber", w, None)
        number = int(as_floats(number, tag_label("BeamNumber"), w, n=1)[0]) if number is not None else i + 1
        delivery = str(optional(beam, "TreatmentDeliveryType", w, "TREATMENT")).upper()
        candidates.append((number, beam, delivery))
    if beam_number is not None:
        for number, beam, _ in candidates:
            if number == beam_number:
                return number, beam
        raise DicomError(f"{where}: no beam with BeamNumber {beam_number}; beams: {[c[0] for c in candidates]}")
    treatment = [(n, b) for n, b, d in candidates if d == "TREATMENT"]
    if len(treatment) != 1:
        names = [(n, str(optional(b, "BeamName", where, ""))) for n, b, _ in candidates]
        raise DicomError(f"{where}: expected one helical treatment beam, found {len(treatment)} "
                         f"treatment beam(s) among {names}; choose one with beam_number=")
    return treatment[0]


def _sup176_items(beam, ds, where):
    """Tomotherapeutic Control Point Sequence of the beam or of the dataset, sorted by index."""
    for item, w in ((beam, f"{where}, beam"), (ds, where)):
        seq = optional(item, "TomotherapeuticControlPointSequence", w, None)
        if seq:
            indexed = []
            for j, cp in enumerate(seq):
                wc = f"{w}, {tag_label('TomotherapeuticControlPointSequence')} item {j}"
                idx = int(as_floats(require(cp, "RTControlPointIndex", wc), tag_label("RTControlPointIndex"), wc, n=1)[0])
                indexed.append((idx, cp, wc))
            indexed.sort(key=lambda t: t[0])
            idxs = [t[0] for t in indexed]
            if idxs != list(range(1, len(idxs) + 1)):
                raise DicomError(f"{w}: {tag_label('RTControlPointIndex')} must run 1, 2, ... without gaps, got "
                                 f"{idxs[:8]}{'...' if len(idxs) > 8 else ''}")
            return indexed
    return None


def read_tomo_plan_info(
    path,
    *,
    beam_number: int | None = None,
    machine: TomoMachine | None = None,
    gantry_period_s: float | None = None,
    pitch: float | None = None,
    field_width_mm: float | None = None,
    patient_position: str | None = None,
) -> tuple[HelicalPlan, TomoPlanInfo]:
    """Import a helical TomoTherapy RT Plan.

    Parameters
    ----------
    path : str or Path
        RT Plan file.
    beam_number : int, optional
        BeamNumber of the helical beam when the plan holds several treatment beams.
    machine : TomoMachine, optional
        Machine model (number of leaves, nominal jaw widths, projections per rotation).
    gantry_period_s, pitch, field_width_mm, patient_position : optional
        Values to use when the file lacks them. When the file has them too they must agree.

    Returns
    -------
    plan : HelicalPlan
    info : TomoPlanInfo

    Raises
    ------
    DicomError
        Missing, malformed or not understood attributes (the message names the tag).
    """
    machine = machine or TomoMachine()
    if not isinstance(machine, TomoMachine):
        raise TypeError(f"machine must be a TomoMachine, got {type(machine).__name__}")
    where = f"RT Plan {str(path)!r}"
    ds = read_dataset(path, "RT Plan")
    sop_class = str(optional(ds, "SOPClassUID", where, ""))
    modality = str(optional(ds, "Modality", where, ""))
    if sop_class == TOMOTHERAPEUTIC_RADIATION_STORAGE and "BeamSequence" not in ds:
        raise DicomError(f"{where}: stand-alone Tomotherapeutic Radiation objects (Supplement 176 IOD) are "
                         f"not supported; only RT Plans (with {tag_label('BeamSequence')}) are")
    if modality != "RTPLAN" and sop_class != RT_PLAN_STORAGE:
        raise DicomError(f"{where}: not an RT Plan (Modality {modality!r}, SOPClassUID {sop_class!r})")
    number, beam = _select_beam(ds, beam_number, where)
    wb = f"{where}, beam {number}"
    cps = list(require(beam, "ControlPointSequence", wb))
    n_cp = len(cps)
    if n_cp < 2:
        raise DicomError(f"{wb}: {tag_label('ControlPointSequence')} must hold at least 2 control points "
                         f"(start and end of delivery), got {n_cp}")
    _check_declared_count(beam, "NumberOfControlPoints", n_cp, wb, f"ControlPointSequence holds {n_cp} items")
    n_leaves = machine.n_leaves
    n_proj = n_cp - 1
    notes = []

    # --- leaf-open fractions (private) ---------------------------------------------------
    fractions = None
    priv_label = _label(None, TOMO_LEAF_FRACTIONS)
    rows = []
    for k, cp in enumerate(cps):
        wc = f"{wb}, control point {k}"
        arr, priv_label = _private_numbers(cp, TOMO_LEAF_FRACTIONS, wc)
        rows.append(arr)
    present = [r is not None for r in rows]
    if any(present):
        for k in range(n_proj):
            if rows[k] is None:
                raise DicomError(f"{wb}, control point {k}: {priv_label} is missing while other control "
                                 f"points have it")
        for k, r in enumerate(rows):
            if r is not None and r.size != n_leaves:
                raise DicomError(f"{wb}, control point {k}: {priv_label} holds {r.size} values, expected "
                                 f"{n_leaves} (one per leaf)")
            if r is not None and (r.min() < 0 or r.max() > 1 + 1e-9):
                raise DicomError(f"{wb}, control point {k}: {priv_label} must be fractions in [0, 1], got "
                                 f"range [{r.min()}, {r.max()}]")
        if rows[-1] is not None and np.any(rows[-1] > 0):
            log.warning("%s: leaf-open fractions at the final control point are ignored (no projection "
                        "follows it)", wb)
            notes.append("non-zero leaf-open fractions at the final control point ignored")
        fractions = np.clip(np.array(rows[:n_proj]), 0.0, 1.0)

    # --- scalars ----------------------------------------------------------------------------
    f_pitch, pitch_label = _private_scalar(beam, ds, TOMO_PITCH, where)
    f_period, period_label = _private_scalar(beam, ds, TOMO_GANTRY_PERIOD, where)
    period = _merge("gantry period", f_period, gantry_period_s, period_label, where, "gantry_period_s")
    if period <= 0:
        raise DicomError(f"{where}: gantry period must be > 0 s, got {period} ({period_label})")
    proj_s = period / machine.projections_per_rotation

    # --- Supplement 176 durations ---------------------------------------------------------
    durations = None
    inline = [optional(cp, "TomotherapeuticLeafOpenDurations", f"{wb}, control point {k}", None)
              for k, cp in enumerate(cps)]
    items = None
    if any(v is not None for v in inline):
        items = [(k + 1, cp, f"{wb}, control point {k}") for k, cp in enumerate(cps)]
    else:
        items = _sup176_items(beam, ds, wb)
    if items is not None:
        dlabel = tag_label("TomotherapeuticLeafOpenDurations")
        clabel = tag_label("TomotherapeuticLeafInitialClosedDurations")
        if len(items) != n_cp:
            raise DicomError(f"{wb}: {len(items)} tomotherapeutic control points but {n_cp} items in "
                             f"ControlPointSequence")
        _check_declared_count(beam, "NumberOfParallelRTBeamDelimiters", n_leaves, wb, f"expected {n_leaves} leaves")
        drows = []
        for idx, cp, wc in items:
            raw = optional(cp, "TomotherapeuticLeafOpenDurations", wc, None)
            if raw is None:
                if idx == len(items):
                    drows.append(None)
                    continue
                raise DicomError(f"{wc}: missing {dlabel}")
            d = as_floats(raw, dlabel, wc, n=n_leaves)
            if d.min() < 0:
                raise DicomError(f"{wc}: {dlabel} must be >= 0 s, got minimum {d.min()}")
            closed = optional(cp, "TomotherapeuticLeafInitialClosedDurations", wc, None)
            total = d
            if closed is not None:
                c = as_floats(closed, clabel, wc, n=n_leaves)
                if c.min() < 0:
                    raise DicomError(f"{wc}: {clabel} must be >= 0 s, got minimum {c.min()}")
                total = d + c
                if np.any(c > 0) and "off-centre leaf openings" not in " ".join(notes):
                    notes.append("off-centre leaf openings (initial closed durations) modelled as centred")
                    log.info("%s: %s present; leaf openings are modelled centred in each projection", wb, clabel)
            if idx < len(items) and total.max() > proj_s * (1 + 1e-6) + 1e-9:
                raise DicomError(f"{wc}: leaf open (+ initial closed) duration {total.max():.6g} s exceeds the "
                                 f"projection duration {proj_s:.6g} s (gantry period {period} s / "
                                 f"{machine.projections_per_rotation})")
            drows.append(d)
        if drows[-1] is not None and np.any(drows[-1] > 0):
            log.warning("%s: %s at the final control point ignored (no projection follows it)", wb, dlabel)
        durations = np.array(drows[:n_proj])
        sup_fractions = np.clip(durations / proj_s, 0.0, 1.0)
        if fractions is not None:
            diff = np.abs(sup_fractions - fractions)
            if diff.max() > 1e-3:
                k, leaf = np.unravel_index(int(np.argmax(diff)), diff.shape)
                raise DicomError(f"{wb}: {dlabel} and {priv_label} disagree at projection {k}, leaf {leaf}: "
                                 f"{durations[k, leaf]:.6g} s vs fraction {fractions[k, leaf]:.6g} x "
                                 f"{proj_s:.6g} s")
        else:
            fractions = sup_fractions
    if fractions is None:
        raise DicomError(f"{wb}: no leaf-open data: neither {priv_label} in the control points nor "
                         f"{tag_label('TomotherapeuticLeafOpenDurations')}")
    source = " + ".join(s for s, ok in ((TOMO_PRIVATE_CREATOR, any(present)), ("Supplement 176", durations is not None)) if ok)

    # --- gantry -------------------------------------------------------------------------------
    w0 = f"{wb}, control point 0"
    start = float(as_floats(require(cps[0], "GantryAngle", w0), tag_label("GantryAngle"), w0, n=1)[0])
    direction = optional(cps[0], "GantryRotationDirection", w0, None)
    step = machine.gantry_step_deg
    n_angles = 0
    for k, cp in enumerate(cps[1:], start=1):
        wc = f"{wb}, control point {k}"
        a = optional(cp, "GantryAngle", wc, None)
        if a is None:
            continue
        a = float(as_floats(a, tag_label("GantryAngle"), wc, n=1)[0])
        expected = (start + k * step) % 360.0
        err = (a - expected + 180.0) % 360.0 - 180.0
        if abs(err) > _ANGLE_TOL_DEG:
            raise DicomError(f"{wc}: {tag_label('GantryAngle')} is {a} deg, expected {expected:.3f} deg for a "
                             f"clockwise helical delivery with {machine.projections_per_rotation} projections "
                             f"per rotation")
        n_angles += 1
    if direction is not None:
        direction = str(direction).strip().upper()
        if direction != "CW":
            raise DicomError(f"{w0}: {tag_label('GantryRotationDirection')} is {direction!r}; a helical "
                             f"TomoTherapy beam rotates CW")
    elif n_angles == 0:
        raise DicomError(f"{w0}: {tag_label('GantryRotationDirection')} is missing and no later control point "
                         f"gives a GantryAngle, so the rotation direction is unknown")

    # --- jaws ---------------------------------------------------------------------------------
    jaws = None
    for k, cp in enumerate(cps):
        wc = f"{wb}, control point {k}"
        for dev in optional(cp, "BeamLimitingDevicePositionSequence", wc, []) or []:
            kind = str(optional(dev, "RTBeamLimitingDeviceType", wc, "")).strip().upper()
            if kind != "ASYMY":
                continue
            pos = as_floats(require(dev, "LeafJawPositions", wc), tag_label("LeafJawPositions"), wc, n=2)
            if pos[1] <= pos[0]:
                raise DicomError(f"{wc}: ASYMY {tag_label('LeafJawPositions')} must be y1 < y2, got {pos.tolist()}")
            if jaws is None:
                jaws = pos
            elif np.max(np.abs(pos - jaws)) > _JAW_TOL_MM and k < n_cp - 1:
                raise DicomError(f"{wc}: ASYMY {tag_label('LeafJawPositions')} {pos.tolist()} differ from control "
                                 f"point 0 {jaws.tolist()}; dynamic jaws are not supported")
    file_width = None
    if jaws is not None:
        centre = 0.5 * (jaws[0] + jaws[1])
        if abs(centre) > 0.5:
            raise DicomError(f"{wb}: ASYMY jaws {jaws.tolist()} are off-centre by {centre:.2f} mm; only "
                             f"centred jaws are supported")
        width = float(jaws[1] - jaws[0])
        for nominal, fwhm in machine.jaw_fwhm_mm.items():
            tol = max(1.0, 0.05 * nominal)
            if abs(width - nominal) <= tol or abs(width - fwhm) <= tol:
                file_width = float(nominal)
                break
        if file_width is None:
            raise DicomError(f"{wb}: ASYMY jaw opening {width:.2f} mm matches none of the machine's nominal "
                             f"field widths {sorted(machine.jaw_fwhm_mm)} mm")
    if file_width is None and field_width_mm is None:
        raise DicomError(f"{wb}: no ASYMY jaw positions ({tag_label('LeafJawPositions')} in "
                         f"{tag_label('BeamLimitingDevicePositionSequence')}); pass field_width_mm= to supply it")
    if file_width is not None and field_width_mm is not None and abs(field_width_mm - file_width) > 1e-6:
        raise DicomError(f"{wb}: field width {file_width} mm from the ASYMY jaws contradicts "
                         f"field_width_mm={field_width_mm}")
    fw = file_width if file_width is not None else machine.check_field_width(field_width_mm)

    pitch_value = _merge("pitch", f_pitch, pitch, pitch_label, where, "pitch")
    if pitch_value <= 0:
        raise DicomError(f"{where}: pitch must be > 0, got {pitch_value} ({pitch_label})")

    # --- patient position, isocentre ---------------------------------------------------------
    pos = None
    for item in optional(ds, "PatientSetupSequence", where, []) or []:
        value = optional(item, "PatientPosition", where, None)
        if value:
            pos = str(value).strip().upper()
            break
    if pos is None and patient_position is None:
        raise DicomError(f"{where}: no {tag_label('PatientPosition')} in {tag_label('PatientSetupSequence')}; "
                         f"pass patient_position= to supply it")
    if pos is not None and patient_position is not None and pos != patient_position:
        raise DicomError(f"{where}: PatientPosition {pos!r} contradicts patient_position={patient_position!r}")
    pos = pos or patient_position
    if pos not in PATIENT_POSITIONS:
        raise DicomError(f"{where}: {tag_label('PatientPosition')} {pos!r} is not supported; expected one of "
                         f"{list(PATIENT_POSITIONS)}")
    iso0 = as_floats(require(cps[0], "IsocenterPosition", w0), tag_label("IsocenterPosition"), w0, n=3)
    travel = pitch_value * fw / machine.projections_per_rotation
    for k, cp in enumerate(cps[1:], start=1):
        wc = f"{wb}, control point {k}"
        iso = optional(cp, "IsocenterPosition", wc, None)
        if iso is None:
            continue
        iso = as_floats(iso, tag_label("IsocenterPosition"), wc, n=3)
        expected = iso0 + couch_shift_patient(k * travel, pos)
        if np.max(np.abs(iso - iso0)) > 1e-3 and np.max(np.abs(iso - expected)) > 0.5:
            raise DicomError(f"{wc}: {tag_label('IsocenterPosition')} {iso.tolist()} follows neither a fixed "
                             f"isocentre nor the couch motion of pitch {pitch_value} x {fw} mm per rotation "
                             f"(expected {np.round(expected, 3).tolist()})")

    # --- fractions and prescriptions ---------------------------------------------------------
    n_fractions = 1
    groups = optional(ds, "FractionGroupSequence", where, []) or []
    if groups:
        nf = optional(groups[0], "NumberOfFractionsPlanned", where, None)
        if nf is not None:
            n_fractions = int(as_floats(nf, tag_label("NumberOfFractionsPlanned"), where, n=1)[0])
            if n_fractions < 1:
                raise DicomError(f"{where}: {tag_label('NumberOfFractionsPlanned')} must be >= 1, got {n_fractions}")
    else:
        notes.append("no FractionGroupSequence: 1 fraction assumed")
        log.warning("%s: no %s; n_fractions = 1", where, tag_label("FractionGroupSequence"))
    prescriptions = {}
    for i, ref in enumerate(optional(ds, "DoseReferenceSequence", where, []) or []):
        wr = f"{where}, DoseReferenceSequence item {i}"
        if str(optional(ref, "DoseReferenceType", wr, "")).upper() != "TARGET":
            continue
        dose = optional(ref, "TargetPrescriptionDose", wr, None)
        if dose is None:
            continue
        dose = float(as_floats(dose, tag_label("TargetPrescriptionDose"), wr, n=1)[0])
        name = str(optional(ref, "DoseReferenceDescription", wr, "") or f"DoseReference{i + 1}")
        if dose > 0:
            prescriptions[name] = dose

    try:
        plan = HelicalPlan(
            sinogram=fractions, field_width_mm=fw, pitch=pitch_value, gantry_period_s=period,
            start_angle_deg=start % 360.0, couch_start_mm=0.0, isocentre_lps_mm=tuple(iso0),
            n_fractions=n_fractions, prescriptions=prescriptions, patient_position=pos, machine=machine,
        )
    except ValueError as exc:
        raise DicomError(f"{where}: the plan's values are out of the machine's range: {exc}") from None
    info = TomoPlanInfo(
        source=source, beam_number=number, beam_name=str(optional(beam, "BeamName", wb, "")),
        jaw_positions_mm=None if jaws is None else (float(jaws[0]), float(jaws[1])),
        sop_instance_uid=str(optional(ds, "SOPInstanceUID", where, "")),
        frame_of_reference_uid=str(optional(ds, "FrameOfReferenceUID", where, "")),
        notes=tuple(notes),
    )
    log.info("imported %s: %d projections, pitch %.4g, period %.4g s, width %g mm (%s)", where, n_proj,
             pitch_value, period, fw, source)
    return plan, info


def read_tomo_plan(path, **kwargs) -> HelicalPlan:
    """Import a helical TomoTherapy RT Plan; see :func:`read_tomo_plan_info`."""
    return read_tomo_plan_info(path, **kwargs)[0]
