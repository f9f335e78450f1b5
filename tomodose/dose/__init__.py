"""Absolute dose: engines behind one call, calibration, dose results."""

from tomodose.dose.calibration import ReferenceCondition, calibration_factor
from tomodose.dose.engine import ENGINES, compute_dose
from tomodose.dose.result import DoseResult

__all__ = ["compute_dose", "DoseResult", "ReferenceCondition", "calibration_factor", "ENGINES"]
