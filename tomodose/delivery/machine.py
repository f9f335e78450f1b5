"""The TomoTherapy-class delivery machine.

Geometry follows :mod:`tomodose.geometry.frames`: leaves are indexed 0..63 along +Xg (the
across-fan axis of the gantry frame); leaf ``i`` spans
``[(i - 32) * w, (i - 31) * w] + leaf_offset_mm`` at the isocentre plane, ``w = 6.25 mm``, so
the central axis lies between leaves 31 and 32. The jaws define the field along Yg (the couch
axis).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tomodose._validate import check_finite_scalar, check_in_range, check_positive

__all__ = ["TomoMachine", "NOMINAL_JAW_WIDTHS_MM"]

#: Nominal jaw field widths at the isocentre (mm).
NOMINAL_JAW_WIDTHS_MM = (10.0, 25.0, 50.0)


@dataclass(frozen=True)
class TomoMachine:
    """Static description of a helical tomotherapy unit.

    Parameters
    ----------
    sad_mm : float
        Source-axis distance (mm). Default 850.
    n_leaves : int
        Number of binary leaves. Default 64.
    leaf_width_mm : float
        Leaf width projected at the isocentre (mm). Default 6.25 (fan 400 mm).
    leaf_offset_mm : float
        Lateral offset of the leaf bank along Xg at the isocentre (mm). Default 0.
    projections_per_rotation : int
        Projections per gantry rotation. Default 51.
    jaw_fwhm_mm : dict
        Real longitudinal FWHM at the isocentre (mm) of each nominal jaw width (mm).
        Defaults are typical measured values (10 -> 10.5, 25 -> 25.1, 50 -> 50.4).
    dose_rate_gy_per_min : float
        Nominal dose rate at the reference condition (5 x 40 cm open field, SSD 850 mm,
        depth 15 mm in water). Default 8.5.
    leaf_latency_s : float
        Time for a leaf to open or close fully (s); leaf-open times shorter than this are not
        delivered as planned. Default 0.018.
    min_leaf_open_time_s : float
        Shortest leaf-open time the plan may request (s). Default 0.018.
    gantry_period_range_s : tuple of 2 float
        Allowed gantry period (s per rotation). Default (11.8, 60.0).
    max_couch_speed_mm_s : float
        Fastest couch speed (mm/s). Default 10 (a tabletop in practice moves slower).
    name : str
        Machine label.
    """

    sad_mm: float = 850.0
    n_leaves: int = 64
    leaf_width_mm: float = 6.25
    leaf_offset_mm: float = 0.0
    projections_per_rotation: int = 51
    jaw_fwhm_mm: dict = field(default_factory=lambda: {10.0: 10.5, 25.0: 25.1, 50.0: 50.4})
    dose_rate_gy_per_min: float = 8.5
    leaf_latency_s: float = 0.018
    min_leaf_open_time_s: float = 0.018
    gantry_period_range_s: tuple[float, float] = (11.8, 60.0)
    max_couch_speed_mm_s: float = 10.0
    name: str = "generic TomoTherapy (nominal)"

    def __post_init__(self):
        check_positive("sad_mm", self.sad_mm)
        for attr in ("n_leaves", "projections_per_rotation"):
            value = getattr(self, attr)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{attr} must be a positive integer, got {value!r}")
        check_positive("leaf_width_mm", self.leaf_width_mm)
        check_finite_scalar("leaf_offset_mm", self.leaf_offset_mm)
        if not isinstance(self.jaw_fwhm_mm, dict) or not self.jaw_fwhm_mm:
            raise ValueError(f"jaw_fwhm_mm must be a non-empty dict nominal_mm -> fwhm_mm, got {self.jaw_fwhm_mm!r}")
        fwhm = {}
        for nominal, real in self.jaw_fwhm_mm.items():
            fwhm[check_positive("jaw_fwhm_mm key (nominal width)", nominal)] = check_positive(
                f"jaw_fwhm_mm[{nominal}]", real
            )
        object.__setattr__(self, "jaw_fwhm_mm", fwhm)
        check_positive("dose_rate_gy_per_min", self.dose_rate_gy_per_min)
        check_positive("leaf_latency_s", self.leaf_latency_s)
        check_positive("min_leaf_open_time_s", self.min_leaf_open_time_s)
        lo, hi = self.gantry_period_range_s
        check_positive("gantry_period_range_s[0]", lo)
        check_positive("gantry_period_range_s[1]", hi)
        if hi < lo:
            raise ValueError(f"gantry_period_range_s must be (min, max) with min <= max, got {self.gantry_period_range_s}")
        check_positive("max_couch_speed_mm_s", self.max_couch_speed_mm_s)

    def __hash__(self):  # dict field: hash on the items
        return hash((self.sad_mm, self.n_leaves, self.leaf_width_mm, self.leaf_offset_mm,
                     self.projections_per_rotation, tuple(sorted(self.jaw_fwhm_mm.items())),
                     self.dose_rate_gy_per_min, self.leaf_latency_s, self.min_leaf_open_time_s,
                     self.gantry_period_range_s, self.max_couch_speed_mm_s, self.name))

    @property
    def fan_width_mm(self) -> float:
        """Full width of the fan at the isocentre (mm): 64 x 6.25 = 400."""
        return self.n_leaves * self.leaf_width_mm

    @property
    def gantry_step_deg(self) -> float:
        """Gantry rotation per projection (deg): 360 / 51."""
        return 360.0 / self.projections_per_rotation

    def leaf_edges_mm(self) -> np.ndarray:
        """(n_leaves + 1,) leaf boundaries along Xg at the isocentre plane (mm)."""
        return (np.arange(self.n_leaves + 1) - self.n_leaves / 2) * self.leaf_width_mm + self.leaf_offset_mm

    def leaf_centres_mm(self) -> np.ndarray:
        """(n_leaves,) leaf centres along Xg at the isocentre plane (mm)."""
        e = self.leaf_edges_mm()
        return 0.5 * (e[:-1] + e[1:])

    def check_field_width(self, field_width_mm: float) -> float:
        """Return the nominal jaw width if it is one of this machine's, else raise."""
        fw = check_positive("field_width_mm", field_width_mm)
        for nominal in self.jaw_fwhm_mm:
            if abs(nominal - fw) < 1e-6:
                return nominal
        raise ValueError(
            f"field_width_mm must be one of the machine's nominal jaw widths "
            f"{sorted(self.jaw_fwhm_mm)}, got {fw}"
        )

    def real_fwhm_mm(self, field_width_mm: float) -> float:
        """Measured (real) FWHM at the isocentre (mm) of a nominal jaw width."""
        return self.jaw_fwhm_mm[self.check_field_width(field_width_mm)]

    def check_gantry_period(self, gantry_period_s: float) -> float:
        lo, hi = self.gantry_period_range_s
        return check_in_range("gantry_period_s", gantry_period_s, lo, hi)
