"""Dose results: the object every engine returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tomodose.geometry.grid import Grid, ImageVolume

__all__ = ["DoseResult"]


@dataclass(frozen=True)
class DoseResult:
    """Absolute dose of a plan on a patient grid.

    Attributes
    ----------
    per_fraction : ImageVolume
        Dose of one fraction (Gy), (nz, ny, nx) float32 on the patient grid (DICOM LPS).
    n_fractions : int
        Number of fractions of the plan.
    engine : str
        ``"collapsed_cone"`` or ``"pencil_beam"``.
    metadata : dict
        Calibration factor and reference condition, beam model, kernel, timings, grouping.
    """

    per_fraction: ImageVolume
    n_fractions: int
    engine: str
    metadata: dict = field(default_factory=dict)

    @property
    def grid(self) -> Grid:
        return self.per_fraction.grid

    @property
    def total(self) -> ImageVolume:
        """Dose of the whole course (Gy) = per-fraction dose x number of fractions."""
        return ImageVolume(self.grid, (self.per_fraction.array * np.float32(self.n_fractions)).astype(np.float32),
                           "Gy", "dose")

    def scaled(self, factor: float) -> "DoseResult":
        """Copy with the dose multiplied by ``factor`` (e.g. a normalisation), recorded in metadata."""
        meta = dict(self.metadata)
        meta["scale_factor"] = float(meta.get("scale_factor", 1.0)) * float(factor)
        arr = (self.per_fraction.array * np.float32(factor)).astype(np.float32)
        return DoseResult(ImageVolume(self.grid, arr, "Gy", "dose"), self.n_fractions, self.engine, meta)
