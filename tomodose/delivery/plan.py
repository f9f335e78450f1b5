"""Treatment plans: helical sinograms and explicit projection sequences.

A :class:`ProjectionSequence` is what every dose engine consumes: one row per projection with
its gantry angle, couch position, duration, the gantry arc and couch travel swept during it, and
the 64 leaf-open fractions. A :class:`HelicalPlan` describes a helical delivery by its sinogram
and delivery parameters and derives the sequence (its timeline). A sequence can also be built
directly (fixed-angle beams, delivery logs, comparisons with other engines).

Timeline conventions
--------------------
* Projection ``k`` (0-based) lasts ``T / 51`` seconds (``T`` the gantry period) and spans the
  gantry arc ``[a0 + k * 360/51, a0 + (k + 1) * 360/51]`` (``a0`` the start angle, IEC 61217,
  clockwise seen from the foot of the couch). Its reported ``gantry_angle_deg`` is the angle at
  the **centre** of that arc, in [0, 360).
* The couch moves at constant speed ``pitch * field_width / T`` along +Y (into the bore);
  ``couch_mm`` is the couch position at the centre of the projection. Couch travel per rotation
  is ``pitch * field_width_mm``.
* Leaf-open time = leaf-open fraction x projection duration.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from tomodose._validate import (
    check_array,
    check_choice,
    check_finite_scalar,
    check_positive,
    check_vector,
)
from tomodose.delivery.machine import TomoMachine
from tomodose.geometry.frames import PATIENT_POSITIONS

__all__ = ["ProjectionSequence", "HelicalPlan", "modulation_factor"]

log = logging.getLogger(__name__)


def modulation_factor(leaf_open_time_s: np.ndarray) -> float:
    """Modulation factor: maximum leaf-open time / mean of the non-zero leaf-open times.

    Returns 0.0 when every leaf is closed.
    """
    t = np.asarray(leaf_open_time_s, dtype=np.float64)
    open_ = t[t > 0]
    if open_.size == 0:
        return 0.0
    return float(open_.max() / open_.mean())


def _prescriptions(value) -> tuple[tuple[str, float], ...]:
    if value is None:
        return ()
    items = value.items() if isinstance(value, dict) else value
    out = []
    for item in items:
        try:
            name, dose = item
        except (TypeError, ValueError):
            raise ValueError(
                f"prescriptions must map target name -> total dose in Gy, got entry {item!r}"
            ) from None
        if not isinstance(name, str) or not name:
            raise ValueError(f"prescriptions target name must be a non-empty string, got {name!r}")
        out.append((name, check_positive(f"prescriptions[{name!r}] (Gy)", dose)))
    return tuple(out)


@dataclass(frozen=True)
class ProjectionSequence:
    """An explicit list of projections (the input of the dose engines).

    Parameters
    ----------
    gantry_angle_deg : (n,) float
        IEC 61217 gantry angle at the centre of each projection (deg).
    couch_mm : (n,) float
        Couch longitudinal position (IEC +Yf, mm) at the centre of each projection.
    leaf_open_fraction : (n, n_leaves) float
        Fraction of the projection each leaf is open, in [0, 1].
    duration_s : (n,) float
        Duration of each projection (s), > 0.
    field_width_mm : float
        Nominal jaw width (mm); one of the machine's.
    arc_deg : (n,) float, optional
        Gantry rotation during each projection (deg, >= 0); 0 for fixed beams (default).
    couch_travel_mm : (n,) float, optional
        Couch travel during each projection (mm); 0 for a static couch (default).
    isocentre_lps_mm : (3,) float
        LPS position (mm) of the machine isocentre in the patient at couch position 0.
    patient_position : str
        ``"HFS"`` (default), ``"HFP"``, ``"FFS"`` or ``"FFP"``.
    machine : TomoMachine
    """

    gantry_angle_deg: np.ndarray
    couch_mm: np.ndarray
    leaf_open_fraction: np.ndarray
    duration_s: np.ndarray
    field_width_mm: float
    arc_deg: np.ndarray | None = None
    couch_travel_mm: np.ndarray | None = None
    isocentre_lps_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    patient_position: str = "HFS"
    machine: TomoMachine = field(default_factory=TomoMachine)

    def __post_init__(self):
        if not isinstance(self.machine, TomoMachine):
            raise TypeError(f"machine must be a TomoMachine, got {type(self.machine).__name__}")
        angles = check_array("gantry_angle_deg", self.gantry_angle_deg, ndim=1)
        n = angles.shape[0]
        if n == 0:
            raise ValueError("gantry_angle_deg must hold at least one projection, got 0")
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        set_("gantry_angle_deg", np.mod(angles, 360.0))
        set_("couch_mm", check_array("couch_mm", self.couch_mm, shape=(n,)))
        set_("leaf_open_fraction", check_array(
            "leaf_open_fraction", self.leaf_open_fraction, shape=(n, self.machine.n_leaves),
            low=0.0, high=1.0))
        dur = check_array("duration_s", self.duration_s, shape=(n,))
        if np.any(dur <= 0):
            raise ValueError(f"duration_s must be > 0 for every projection, got minimum {dur.min()}")
        set_("duration_s", dur)
        arc = np.zeros(n) if self.arc_deg is None else check_array("arc_deg", self.arc_deg, shape=(n,), low=0.0)
        set_("arc_deg", arc)
        travel = np.zeros(n) if self.couch_travel_mm is None else check_array(
            "couch_travel_mm", self.couch_travel_mm, shape=(n,))
        set_("couch_travel_mm", travel)
        set_("field_width_mm", self.machine.check_field_width(self.field_width_mm))
        set_("isocentre_lps_mm", check_vector("isocentre_lps_mm", self.isocentre_lps_mm))
        check_choice("patient_position", self.patient_position, PATIENT_POSITIONS)
        for arr in (self.gantry_angle_deg, self.couch_mm, self.leaf_open_fraction, self.duration_s,
                    self.arc_deg, self.couch_travel_mm):
            arr.setflags(write=False)

    @property
    def n_projections(self) -> int:
        return int(self.gantry_angle_deg.shape[0])

    @property
    def leaf_open_time_s(self) -> np.ndarray:
        """(n, n_leaves) leaf-open time of each leaf in each projection (s)."""
        return self.leaf_open_fraction * self.duration_s[:, None]

    @property
    def treatment_time_s(self) -> float:
        """Beam-on time of one fraction (s)."""
        return float(self.duration_s.sum())

    @property
    def modulation_factor(self) -> float:
        return modulation_factor(self.leaf_open_time_s)

    @classmethod
    def static_beams(cls, gantry_angles_deg, leaf_open_fraction, duration_s, field_width_mm,
                     couch_mm=0.0, **kwargs) -> "ProjectionSequence":
        """Fixed-gantry, fixed-couch beams (one projection each)."""
        angles = check_array("gantry_angles_deg", np.atleast_1d(gantry_angles_deg), ndim=1)
        n = angles.shape[0]
        return cls(
            gantry_angle_deg=angles,
            couch_mm=np.broadcast_to(np.asarray(couch_mm, dtype=float), (n,)).copy(),
            leaf_open_fraction=np.asarray(leaf_open_fraction, dtype=float).reshape(n, -1)
            if np.ndim(leaf_open_fraction) == 2 else np.broadcast_to(
                np.asarray(leaf_open_fraction, dtype=float), (n, kwargs.get("machine", TomoMachine()).n_leaves)).copy(),
            duration_s=np.broadcast_to(np.asarray(duration_s, dtype=float), (n,)).copy(),
            field_width_mm=field_width_mm,
            **kwargs,
        )


@dataclass(frozen=True)
class HelicalPlan:
    """A helical tomotherapy plan.

    Parameters
    ----------
    sinogram : (n_projections, n_leaves) float
        Leaf-open fraction of every leaf in every projection, in [0, 1].
    field_width_mm : float
        Nominal jaw width (mm): 10, 25 or 50 on the default machine.
    pitch : float
        Couch travel per rotation / field width (dimensionless), > 0.
    gantry_period_s : float
        Time per gantry rotation (s), within the machine's range.
    start_angle_deg : float
        Gantry angle at the start of delivery (IEC 61217, deg).
    couch_start_mm : float
        Couch position (IEC +Yf, mm) at the start of delivery.
    isocentre_lps_mm : (3,) float
        LPS position (mm) of the machine isocentre in the patient at couch position 0.
    n_fractions : int
        Number of fractions.
    prescriptions : dict of str -> float
        Total prescribed dose (Gy, all fractions) per target name, e.g.
        ``{"PGTV": 50.0, "PTV": 30.0}``.
    patient_position : str
        ``"HFS"`` (default), ``"HFP"``, ``"FFS"`` or ``"FFP"``.
    machine : TomoMachine
    """

    sinogram: np.ndarray
    field_width_mm: float
    pitch: float
    gantry_period_s: float
    start_angle_deg: float = 0.0
    couch_start_mm: float = 0.0
    isocentre_lps_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    n_fractions: int = 1
    prescriptions: tuple = ()
    patient_position: str = "HFS"
    machine: TomoMachine = field(default_factory=TomoMachine)

    def __post_init__(self):
        if not isinstance(self.machine, TomoMachine):
            raise TypeError(f"machine must be a TomoMachine, got {type(self.machine).__name__}")
        sino = check_array("sinogram", self.sinogram, ndim=2, low=0.0, high=1.0)
        if sino.shape[1] != self.machine.n_leaves or sino.shape[0] < 1:
            raise ValueError(
                f"sinogram must have shape (n_projections >= 1, {self.machine.n_leaves}), got {sino.shape}"
            )
        sino.setflags(write=False)
        object.__setattr__(self, "sinogram", sino)
        object.__setattr__(self, "field_width_mm", self.machine.check_field_width(self.field_width_mm))
        pitch = check_positive("pitch", self.pitch)
        if pitch > 1.0:
            log.warning("pitch %.3f > 1 leaves longitudinal gaps between rotations", pitch)
        object.__setattr__(self, "pitch", pitch)
        object.__setattr__(self, "gantry_period_s", self.machine.check_gantry_period(self.gantry_period_s))
        object.__setattr__(self, "start_angle_deg", check_finite_scalar("start_angle_deg", self.start_angle_deg))
        object.__setattr__(self, "couch_start_mm", check_finite_scalar("couch_start_mm", self.couch_start_mm))
        object.__setattr__(self, "isocentre_lps_mm", check_vector("isocentre_lps_mm", self.isocentre_lps_mm))
        nf = self.n_fractions
        if isinstance(nf, bool) or not isinstance(nf, (int, np.integer)) or nf < 1:
            raise ValueError(f"n_fractions must be a positive integer, got {nf!r}")
        object.__setattr__(self, "prescriptions", _prescriptions(self.prescriptions))
        check_choice("patient_position", self.patient_position, PATIENT_POSITIONS)
        speed = self.couch_speed_mm_s
        if speed > self.machine.max_couch_speed_mm_s:
            raise ValueError(
                f"couch speed pitch * field_width_mm / gantry_period_s = {speed:.3f} mm/s exceeds "
                f"the machine maximum {self.machine.max_couch_speed_mm_s} mm/s"
            )

    # --- derived timeline ---------------------------------------------------------------
    @property
    def n_projections(self) -> int:
        return int(self.sinogram.shape[0])

    @property
    def n_rotations(self) -> float:
        return self.n_projections / self.machine.projections_per_rotation

    @property
    def projection_duration_s(self) -> float:
        return self.gantry_period_s / self.machine.projections_per_rotation

    @property
    def couch_travel_per_rotation_mm(self) -> float:
        """``pitch * field_width_mm``."""
        return self.pitch * self.field_width_mm

    @property
    def couch_travel_per_projection_mm(self) -> float:
        return self.couch_travel_per_rotation_mm / self.machine.projections_per_rotation

    @property
    def couch_speed_mm_s(self) -> float:
        return self.couch_travel_per_rotation_mm / self.gantry_period_s

    @property
    def projection_time_s(self) -> np.ndarray:
        """(n,) time at the centre of each projection since the start of delivery (s)."""
        return (np.arange(self.n_projections) + 0.5) * self.projection_duration_s

    @property
    def gantry_angle_deg(self) -> np.ndarray:
        """(n,) gantry angle at the centre of each projection, in [0, 360) deg."""
        k = np.arange(self.n_projections) + 0.5
        return np.mod(self.start_angle_deg + k * self.machine.gantry_step_deg, 360.0)

    @property
    def couch_mm(self) -> np.ndarray:
        """(n,) couch position at the centre of each projection (mm)."""
        k = np.arange(self.n_projections) + 0.5
        return self.couch_start_mm + k * self.couch_travel_per_projection_mm

    @property
    def leaf_open_time_s(self) -> np.ndarray:
        """(n, n_leaves) leaf-open times (s)."""
        return self.sinogram * self.projection_duration_s

    @property
    def modulation_factor(self) -> float:
        return modulation_factor(self.leaf_open_time_s)

    @property
    def treatment_time_s(self) -> float:
        """Beam-on time of one fraction (s)."""
        return self.n_projections * self.projection_duration_s

    @property
    def couch_travel_mm(self) -> float:
        """Total couch travel during one fraction (mm)."""
        return self.n_projections * self.couch_travel_per_projection_mm

    def projections(self) -> ProjectionSequence:
        """The explicit projection sequence of this plan."""
        n = self.n_projections
        return ProjectionSequence(
            gantry_angle_deg=self.gantry_angle_deg,
            couch_mm=self.couch_mm,
            leaf_open_fraction=np.array(self.sinogram),
            duration_s=np.full(n, self.projection_duration_s),
            field_width_mm=self.field_width_mm,
            arc_deg=np.full(n, self.machine.gantry_step_deg),
            couch_travel_mm=np.full(n, self.couch_travel_per_projection_mm),
            isocentre_lps_mm=self.isocentre_lps_mm,
            patient_position=self.patient_position,
            machine=self.machine,
        )

    def summary(self) -> dict:
        """Scalars describing the delivery, for reports and logs."""
        return {
            "n_projections": self.n_projections,
            "n_rotations": self.n_rotations,
            "field_width_mm": self.field_width_mm,
            "pitch": self.pitch,
            "gantry_period_s": self.gantry_period_s,
            "couch_speed_mm_s": self.couch_speed_mm_s,
            "couch_travel_mm": self.couch_travel_mm,
            "treatment_time_s": self.treatment_time_s,
            "modulation_factor": self.modulation_factor,
            "n_fractions": self.n_fractions,
            "prescriptions_gy": dict(self.prescriptions),
        }

    @classmethod
    def covering(cls, sinogram_fn, z_superior_mm: float, z_inferior_mm: float, *, field_width_mm: float,
                 pitch: float, gantry_period_s: float, isocentre_xy_mm=(0.0, 0.0),
                 patient_position: str = "HFS", machine: TomoMachine | None = None, **kwargs) -> "HelicalPlan":
        """A plan whose beam plane sweeps a patient z range plus one field width on each side.

        ``sinogram_fn(n_projections, n_leaves) -> (n, n_leaves) array`` supplies the sinogram
        (e.g. ``lambda n, m: np.ones((n, m))``). Only head-first positions are supported here:
        the couch moves into the bore, so the beam plane moves from superior to inferior.
        """
        machine = machine or TomoMachine()
        check_choice("patient_position", patient_position, ("HFS", "HFP"))
        zs = check_finite_scalar("z_superior_mm", z_superior_mm)
        zi = check_finite_scalar("z_inferior_mm", z_inferior_mm)
        if zs < zi:
            raise ValueError(f"z_superior_mm must be >= z_inferior_mm, got {zs} < {zi}")
        fw = machine.check_field_width(field_width_mm)
        travel = (zs - zi) + 2.0 * fw
        per_proj = check_positive("pitch", pitch) * fw / machine.projections_per_rotation
        n = int(np.ceil(travel / per_proj))
        # beam plane z = iso_z - couch; start one field width above the superior edge
        iso = (float(isocentre_xy_mm[0]), float(isocentre_xy_mm[1]), 0.0)
        couch_start = -(zs + fw)
        sino = np.asarray(sinogram_fn(n, machine.n_leaves), dtype=float)
        return cls(sinogram=sino, field_width_mm=fw, pitch=pitch, gantry_period_s=gantry_period_s,
                   couch_start_mm=couch_start, isocentre_lps_mm=iso, patient_position=patient_position,
                   machine=machine, **kwargs)
