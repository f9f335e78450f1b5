"""Delivery perturbations of a helical plan (the machine quantities of the TG-148 QA report).

A :class:`Perturbation` turns the *planned* delivery (a :class:`~tomodose.delivery.plan.HelicalPlan`)
into the *delivered* one: a :class:`~tomodose.delivery.plan.ProjectionSequence` and the
:class:`~tomodose.terma.beam_model.BeamModel` it is delivered with
(:func:`apply_perturbation`). Every error is modelled on the delivery itself, so any dose engine
sees it the way the machine would produce it:

``couch_speed_error_percent`` (TG-148 couch speed / couch translation uniformity)
    The couch moves at ``(1 + e/100)`` times the planned speed; it starts at the planned
    position and the gantry keeps its timing. In the sequence: ``couch_travel_mm`` of every
    projection is multiplied by ``1 + e/100`` and ``couch_mm[k] = couch_start + (k + 1/2) x
    travel``, so the error accumulates along the treatment (the helix is stretched: the pitch
    changes and the superior-inferior extent of the dose moves).
``gantry_period_error_percent`` (TG-148 gantry rotation period / synchrony)
    The gantry turns in ``(1 + e/100)`` times the planned period. Leaves stay synchronised to
    the gantry projections (leaf-open *fractions* unchanged), the output rate is unchanged, so
    every projection's ``duration_s`` (and its dose) scales with ``1 + e/100``; the couch keeps
    its own (planned) speed in mm/s, so its travel per projection also grows by ``1 + e/100``
    (a couch-gantry synchrony error).
``leaf_latency_error_ms`` (TG-148 MLC leaf latency)
    Every leaf that the plan opens in a projection stays open ``e`` ms longer (``e > 0``, late
    closing / early opening) or shorter (``e < 0``) than planned:
    ``t_open = clip(f x duration + e/1000, 0, duration)``, new ``f = t_open / duration``; closed
    leaves stay closed. Applied after the gantry-period error (the latency is an absolute time).
``jaw_width_error_mm`` (TG-148 jaw width / longitudinal profile)
    The real longitudinal FWHM of the plan's jaw setting is ``real_fwhm + e`` (mm at the
    isocentre): the beam model's ``jaw_fwhm_mm`` table gets that entry (the jaw penumbra is
    unchanged). The machine's output calibration stays that of the unperturbed beam (the
    reference condition is measured once, at commissioning): :mod:`tomodose.batch.task` applies
    the ratio of the nominal to the perturbed calibration factor, which is exactly 1 unless the
    plan uses the reference jaw (50 mm).
``setup_shift_mm`` (LPS, TG-148 / patient set-up; also the lasers-to-isocentre agreement)
    The patient lies ``(dx, dy, dz)`` mm away from the planned position (DICOM LPS: +x left,
    +y posterior, +z superior). In the patient frame the machine isocentre is then at
    ``isocentre_lps_mm - shift``: the sequence's ``isocentre_lps_mm`` is moved by ``-shift``.

All errors are zero by default; the zero perturbation reproduces ``plan.projections()`` exactly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

from tomodose._validate import check_finite_scalar, check_vector
from tomodose.delivery.plan import HelicalPlan, ProjectionSequence

__all__ = ["Perturbation", "apply_perturbation", "PERTURBATION_FIELDS"]


@dataclass(frozen=True)
class Perturbation:
    """Delivery errors of one case (all zero = the planned delivery).

    Parameters
    ----------
    couch_speed_error_percent : float
        Relative couch-speed error (%), > -100.
    leaf_latency_error_ms : float
        Leaf-open time added to (or, negative, removed from) every opened leaf (ms).
    jaw_width_error_mm : float
        Error of the real longitudinal FWHM of the plan's jaw setting (mm at the isocentre).
    setup_shift_mm : (3,) float
        Patient set-up error, LPS (mm).
    gantry_period_error_percent : float
        Relative gantry-period error (%), > -100.
    """

    couch_speed_error_percent: float = 0.0
    leaf_latency_error_ms: float = 0.0
    jaw_width_error_mm: float = 0.0
    setup_shift_mm: tuple = (0.0, 0.0, 0.0)
    gantry_period_error_percent: float = 0.0

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        for name in ("couch_speed_error_percent", "leaf_latency_error_ms", "jaw_width_error_mm",
                     "gantry_period_error_percent"):
            set_(name, float(check_finite_scalar(f"perturbation.{name}", getattr(self, name))))
        for name in ("couch_speed_error_percent", "gantry_period_error_percent"):
            if getattr(self, name) <= -100.0:
                raise ValueError(f"perturbation.{name} must be > -100 (a speed/period stays positive), "
                                 f"got {getattr(self, name)}")
        set_("setup_shift_mm", tuple(float(v) for v in check_vector("perturbation.setup_shift_mm",
                                                                     self.setup_shift_mm)))

    @classmethod
    def from_dict(cls, values: dict | None, where: str = "perturbation") -> "Perturbation":
        """Build from a mapping (TOML table); unknown keys are an error naming the valid ones."""
        values = dict(values or {})
        unknown = sorted(set(values) - set(PERTURBATION_FIELDS))
        if unknown:
            raise ValueError(f"{where}: unknown perturbation parameter(s) {unknown}; valid: {list(PERTURBATION_FIELDS)}")
        return cls(**values)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["setup_shift_mm"] = list(self.setup_shift_mm)
        return d

    @property
    def is_zero(self) -> bool:
        return self == Perturbation()

    def label(self) -> str:
        """Short text naming the non-zero errors (``"nominal"`` when none)."""
        parts = []
        if self.couch_speed_error_percent:
            parts.append(f"couch {self.couch_speed_error_percent:+g}%")
        if self.leaf_latency_error_ms:
            parts.append(f"latency {self.leaf_latency_error_ms:+g} ms")
        if self.jaw_width_error_mm:
            parts.append(f"jaw {self.jaw_width_error_mm:+g} mm")
        if any(self.setup_shift_mm):
            parts.append("shift (" + ", ".join(f"{x:+g}" for x in self.setup_shift_mm) + ") mm")
        if self.gantry_period_error_percent:
            parts.append(f"period {self.gantry_period_error_percent:+g}%")
        return ", ".join(parts) or "nominal"


#: Names of the perturbation parameters (TOML keys).
PERTURBATION_FIELDS = tuple(f.name for f in fields(Perturbation))


def apply_perturbation(plan: HelicalPlan, perturbation: Perturbation, beam_model=None):
    """The delivered projection sequence and beam model of ``plan`` under ``perturbation``.

    Parameters
    ----------
    plan : HelicalPlan
        The planned delivery.
    perturbation : Perturbation
    beam_model : BeamModel, optional
        Nominal beam model (default :meth:`BeamModel.default`).

    Returns
    -------
    sequence : ProjectionSequence
        Delivered projections (see the module doc for each error).
    beam_model : BeamModel
        The nominal model, or a copy whose ``jaw_fwhm_mm`` has the perturbed FWHM of the plan's jaw.
    """
    from tomodose.terma.beam_model import BeamModel

    if not isinstance(plan, HelicalPlan):
        raise TypeError(f"plan must be a HelicalPlan, got {type(plan).__name__}")
    if not isinstance(perturbation, Perturbation):
        raise TypeError(f"perturbation must be a Perturbation, got {type(perturbation).__name__}")
    beam_model = beam_model or BeamModel.default()
    p = perturbation
    if p.is_zero:
        return plan.projections(), beam_model
    machine = plan.machine
    n = plan.n_projections
    period_factor = 1.0 + p.gantry_period_error_percent / 100.0
    speed_factor = 1.0 + p.couch_speed_error_percent / 100.0
    duration = plan.projection_duration_s * period_factor
    travel = plan.couch_speed_mm_s * speed_factor * duration  # couch speed (mm/s) x real projection time
    k = np.arange(n) + 0.5
    couch = plan.couch_start_mm + k * travel
    f = np.array(plan.sinogram, dtype=np.float64)
    if p.leaf_latency_error_ms != 0.0:
        opened = f > 0
        t_open = np.clip(f * duration + p.leaf_latency_error_ms / 1000.0, 0.0, duration)
        f = np.where(opened, t_open / duration, 0.0)
    iso = tuple(float(a - b) for a, b in zip(plan.isocentre_lps_mm, p.setup_shift_mm))
    seq = ProjectionSequence(
        gantry_angle_deg=plan.gantry_angle_deg, couch_mm=couch, leaf_open_fraction=f,
        duration_s=np.full(n, duration), field_width_mm=plan.field_width_mm,
        arc_deg=np.full(n, machine.gantry_step_deg), couch_travel_mm=np.full(n, travel),
        isocentre_lps_mm=iso, patient_position=plan.patient_position, machine=machine)
    if p.jaw_width_error_mm != 0.0:
        real = beam_model.real_fwhm_mm(plan.field_width_mm, machine)
        new = real + p.jaw_width_error_mm
        if not new > 0:
            raise ValueError(f"perturbation.jaw_width_error_mm = {p.jaw_width_error_mm} makes the real FWHM of the "
                             f"{plan.field_width_mm:g} mm jaw {new:g} mm; it must stay > 0")
        table = dict(beam_model.jaw_fwhm_mm if beam_model.jaw_fwhm_mm is not None else machine.jaw_fwhm_mm)
        table = {key: (new if abs(key - plan.field_width_mm) < 1e-6 else val) for key, val in table.items()}
        beam_model = beam_model.replace(jaw_fwhm_mm=table, name=f"{beam_model.name} (jaw {p.jaw_width_error_mm:+g} mm)")
    return seq, beam_model
