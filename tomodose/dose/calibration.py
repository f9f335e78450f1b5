"""Absolute dose calibration at a documented reference condition.

The engines return dose in the TERMA normalisation (energy per mass per unit primary
energy-fluence rate at the isocentre, integrated over the beam-on time of each projection; see
:mod:`tomodose.terma.terma`). A calibration factor ``k`` (Gy per engine unit) converts it:

Nominal condition (:meth:`ReferenceCondition.nominal`, TomoTherapy convention, as in the
vendor's commissioning and CheckTomo): static gantry at 0 deg, all 64 leaves open (40 cm fan),
jaw 50 mm, flat water phantom with its surface at SSD 850 mm (the isocentre on the surface),
dose on the central axis at 15 mm depth equals the machine's nominal dose rate (8.5 Gy/min by
default).

Calibration point (:meth:`ReferenceCondition.default`, used when none is given). 15 mm is at
the depth of maximum, where a measured dose includes contaminating electrons the engines do not
model; matching the engine there would carry its build-up deficit into every deeper dose. The
default machine is therefore calibrated past the build-up, as treatment planning systems do:
the same field with the isocentre at 100 mm depth (surface at SSD 750 mm), where the dose rate
is the nominal one transferred with the unit's measured depth dose,
``dose_rate_factor = (865 / 850)^2 x TPR(10 cm) / TPR(1.5 cm)`` (LA4 TPRs of the 5 x 40 cm
field; ``kernels/derive_dose_calibration.py`` writes it to
``tomodose/data/machines/tomo_default_dose_calibration.json``, with provenance). Without that
file the nominal condition is used.

The engine computes the condition on a water phantom with a 1 s beam-on time, and
``k = (dose_rate x dose_rate_factor / 60) / D_engine(point)``. ``k`` depends on the engine,
beam model, kernel, machine and condition; it is computed once per process for each combination
(cached) and recorded in the dose metadata.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from scipy import ndimage

from tomodose._validate import check_positive
from tomodose.delivery.machine import TomoMachine
from tomodose.delivery.plan import ProjectionSequence
from tomodose.geometry.grid import Grid

__all__ = ["ReferenceCondition", "calibration_factor", "reference_phantom_grid", "reference_projections",
           "DOSE_CALIBRATION_PATH"]

log = logging.getLogger(__name__)

#: format tag of the dose-calibration file
DOSE_CALIBRATION_FORMAT = "tomodose-dose-calibration"
#: the default machine's calibration point (written by ``kernels/derive_dose_calibration.py``)
DOSE_CALIBRATION_PATH = Path(str(resources.files("tomodose") / "data" / "machines"
                                 / "tomo_default_dose_calibration.json"))

_CACHE: dict[str, float] = {}


@dataclass(frozen=True)
class ReferenceCondition:
    """Where the machine's nominal dose rate is defined.

    Parameters
    ----------
    field_width_mm : float
        Jaw width (mm), default 50; all leaves open.
    ssd_mm : float
        Source-surface distance (mm), default 850 (surface at the isocentre).
    depth_mm : float
        Depth of the reference point on the central axis (mm), default 15.
    phantom_width_mm, phantom_depth_mm, phantom_length_mm : float
        Water phantom size across the fan (x), along the beam (y) and along the couch (z).
    spacing_mm : tuple of 3 float
        Calculation grid (x, y, z) of the reference computation (mm).
    dose_rate_factor : float
        Dose rate at this condition relative to the machine's nominal dose rate (which is
        defined at the nominal condition: 1 there). Default 1.

    The constructor's defaults are the nominal condition; :meth:`default` is the calibration
    point of the default machine.
    """

    field_width_mm: float = 50.0
    ssd_mm: float = 850.0
    depth_mm: float = 15.0
    phantom_width_mm: float = 440.0
    phantom_depth_mm: float = 200.0
    phantom_length_mm: float = 160.0
    spacing_mm: tuple = (5.0, 2.5, 4.0)
    dose_rate_factor: float = 1.0

    def __post_init__(self):
        for name in ("field_width_mm", "ssd_mm", "depth_mm", "phantom_width_mm", "phantom_depth_mm",
                     "phantom_length_mm", "dose_rate_factor"):
            check_positive(name, getattr(self, name))
        if self.depth_mm >= self.phantom_depth_mm:
            raise ValueError(f"depth_mm must be < phantom_depth_mm ({self.phantom_depth_mm}), got {self.depth_mm}")

    @classmethod
    def nominal(cls) -> ReferenceCondition:
        """Where the machine's dose rate is defined: 5 x 40 cm, SSD 850 mm, 15 mm depth, factor 1."""
        return cls()

    @classmethod
    def from_file(cls, path) -> ReferenceCondition:
        """The calibration point of a dose-calibration file (format ``tomodose-dose-calibration``)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"dose calibration file {str(path)!r} could not be read as JSON: {e}") from None
        if not isinstance(data, dict) or data.get("format") != DOSE_CALIBRATION_FORMAT:
            raise ValueError(f"dose calibration file {str(path)!r}: expected format "
                             f"{DOSE_CALIBRATION_FORMAT!r}, got {data.get('format') if isinstance(data, dict) else data!r}")
        cond = data.get("condition", {})
        missing = [k for k in ("field_width_mm", "ssd_mm", "depth_mm") if k not in cond]
        missing += [k for k in ("dose_rate_factor",) if k not in data]
        if missing:
            raise ValueError(f"dose calibration file {str(path)!r}: missing {missing}")
        return cls(field_width_mm=float(cond["field_width_mm"]), ssd_mm=float(cond["ssd_mm"]),
                   depth_mm=float(cond["depth_mm"]), dose_rate_factor=float(data["dose_rate_factor"]))

    @classmethod
    def default(cls) -> ReferenceCondition:
        """The default machine's calibration point (:data:`DOSE_CALIBRATION_PATH`), or the
        nominal condition when that file is absent."""
        if not DOSE_CALIBRATION_PATH.is_file():
            log.warning("no dose calibration file %s: calibrating at the nominal condition", DOSE_CALIBRATION_PATH)
            return cls.nominal()
        return cls.from_file(DOSE_CALIBRATION_PATH)


def reference_phantom_grid(ref: ReferenceCondition, machine: TomoMachine) -> tuple[Grid, tuple[float, float, float]]:
    """Grid of the reference water phantom and the LPS isocentre of the reference beam.

    HFS, gantry 0: the source is anterior (-y). The phantom's entrance surface is the plane
    ``y = 0`` and it extends to ``y = phantom_depth_mm``; the isocentre is placed at
    ``y = sad - ssd`` (the source at ``y = -ssd``) so the surface lies at SSD.
    """
    dx, dy, dz = ref.spacing_mm
    half_w, half_l = ref.phantom_width_mm / 2, ref.phantom_length_mm / 2
    grid = Grid.from_extent((-half_w, dy / 2, -half_l), (half_w, ref.phantom_depth_mm - dy / 2, half_l),
                            (dx, dy, dz))
    iso = (0.0, machine.sad_mm - ref.ssd_mm, 0.0)
    return grid, iso


def reference_projections(ref: ReferenceCondition, machine: TomoMachine, isocentre_lps_mm) -> ProjectionSequence:
    """One static projection, gantry 0, all leaves open, 1 s beam-on."""
    return ProjectionSequence.static_beams([0.0], np.ones((1, machine.n_leaves)), 1.0, ref.field_width_mm,
                                           isocentre_lps_mm=isocentre_lps_mm, machine=machine)


def _fingerprint(*objects) -> str:
    h = hashlib.sha1()
    for obj in objects:
        if obj is None:
            h.update(b"None")
            continue
        try:
            items = asdict(obj)
        except TypeError:
            items = {"repr": repr(obj)}
        for key in sorted(items):
            value = items[key]
            h.update(key.encode())
            if isinstance(value, dict):
                value = sorted((str(k), repr(v)) for k, v in value.items()) if not any(
                    isinstance(v, np.ndarray) for v in value.values()) else [
                    (k, np.asarray(v).tobytes()) for k, v in sorted(value.items())]
            h.update(np.asarray(value).tobytes() if isinstance(value, np.ndarray) else repr(value).encode())
    return h.hexdigest()


def calibration_factor(engine: str, *, beam_model=None, machine: TomoMachine | None = None, kernel=None,
                       reference: ReferenceCondition | None = None, dose_rate_gy_per_min: float | None = None,
                       engine_options: dict | None = None) -> float:
    """Gy per engine unit so that the reference condition gives the nominal dose rate.

    Parameters
    ----------
    engine : str
        ``"collapsed_cone"`` or ``"pencil_beam"``.
    beam_model : BeamModel, optional
    machine : TomoMachine, optional
    kernel : optional
        Engine kernel (collapsed-cone kernel); default the shipped one.
    reference : ReferenceCondition, optional
        Default :meth:`ReferenceCondition.default` (the default machine's calibration point).
    dose_rate_gy_per_min : float, optional
        Overrides ``machine.dose_rate_gy_per_min`` (the nominal dose rate; the condition's
        ``dose_rate_factor`` still applies).
    engine_options : dict, optional
        Extra options passed to the engine (e.g. ``n_subsamples``).

    Returns
    -------
    float
        Calibration factor ``k`` (Gy per engine unit).
    """
    from tomodose.dose.engine import _engine_dose  # late import: engine uses this module
    from tomodose.geometry.grid import ImageVolume
    from tomodose.geometry.patient import PatientModel
    from tomodose.terma.beam_model import BeamModel

    machine = machine or TomoMachine()
    ref = reference or ReferenceCondition.default()
    beam_model = beam_model or BeamModel.default()
    rate = machine.dose_rate_gy_per_min if dose_rate_gy_per_min is None else check_positive(
        "dose_rate_gy_per_min", dose_rate_gy_per_min)
    key = _fingerprint(beam_model, machine, ref, kernel) + engine + repr(sorted((engine_options or {}).items()))
    if key not in _CACHE:
        grid, iso = reference_phantom_grid(ref, machine)
        water = PatientModel(ImageVolume(grid, np.zeros(grid.shape, np.float32), "HU"), name="reference water")
        seq = reference_projections(ref, machine, iso)
        dose = _engine_dose(engine, water, seq, beam_model=beam_model, kernel=kernel, progress=False,
                            **(engine_options or {}))
        # reference point: central axis (x = 0, z = 0), depth below the surface y = 0
        kji = grid.lps_to_index([[0.0, ref.depth_mm, 0.0]])
        value = float(ndimage.map_coordinates(dose.astype(np.float64), kji.T, order=1, mode="nearest")[0])
        if not value > 0:
            raise RuntimeError(f"engine {engine!r} gave no dose at the reference point ({value})")
        _CACHE[key] = value
        log.info("calibration %s: engine dose %.6g per s at the reference point", engine, value)
    return (rate * ref.dose_rate_factor / 60.0) / _CACHE[key]
