"""Radiobiology: BED / EQD2 (linear-quadratic model), gEUD, LKB NTCP for RILD, critical volume.

Linear-quadratic conversions (dose ``D`` in ``n`` fractions of ``d = D/n``)
    ``BED = D (1 + d / (alpha/beta))``,
    ``EQD2 = BED / (1 + 2 / (alpha/beta))``,
    ``EQD_x = D (d + alpha/beta) / (x + alpha/beta)`` (isoeffective dose at ``x`` Gy/fraction).
    Worked example: 50 Gy in 10 fractions, alpha/beta = 10 Gy -> BED 75 Gy, EQD2 62.5 Gy.
    No time factor (repopulation) and no incomplete-repair correction.

Default alpha/beta (Gy), :data:`DEFAULT_ALPHA_BETA_GY`
    tumour (HCC, targets) 10; liver 2.5 (the value used with the Dawson 2002 LKB fit's
    EQD conversions in much of the liver SBRT literature); spinal cord 2; other normal tissue 3.
    :data:`ALPHA_BETA_LIVER_HBV_GY` = 8 Gy is a documented option for livers with (mostly
    hepatitis-B) hepatitis: Son et al., Radiat Oncol 2013;8:61, fitted on HCC patients treated
    with helical tomotherapy; pass it explicitly.

LKB NTCP for radiation-induced liver disease (Dawson et al., IJROBP 2002;53:810-821)
    ``n = 0.97, m = 0.12, TD50 = 39.8 Gy`` (primary liver cancer) or ``45.8 Gy`` (liver
    metastases). The fit used doses delivered at 1.5 Gy per fraction (twice daily), so the
    physical DVH of normal liver (liver minus GTV) is first converted bin by bin to
    ``EQD_1.5 = D (d + a/b) / (1.5 + a/b)`` with ``d = D / n_fractions``; then
    ``gEUD = (sum_i v_i D_i^(1/n))^n`` and ``NTCP = Phi((gEUD - TD50) / (m TD50))``.

Critical-volume rule
    At least ``min_volume_ml`` (700 mL) of normal liver below a threshold dose. Default
    threshold: 15 Gy in 3 fractions (Schefter et al., IJROBP 2005;62:1371; adopted by QUANTEC,
    Pan et al., IJROBP 2010;76:S94), converted per voxel to the plan's fractionation at equal
    EQD2 with alpha/beta 2.5 Gy (about 23.3 Gy in 10 fractions). Pass another threshold
    (``threshold_gy``, ``threshold_fractions``) as needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np
from scipy.special import ndtr

from tomodose._validate import check_positive
from tomodose.evaluation.dvh import DVH
from tomodose.geometry.grid import ImageVolume

__all__ = [
    "DEFAULT_ALPHA_BETA_GY",
    "ALPHA_BETA_LIVER_HBV_GY",
    "DAWSON_2002",
    "LKBParameters",
    "bed",
    "eqd2",
    "eqd_x",
    "isoeffective_dose_gy",
    "bed_volume",
    "eqd2_volume",
    "alpha_beta_map",
    "convert_dvh",
    "geud",
    "lkb_ntcp",
    "CriticalVolumeResult",
    "critical_volume_rule",
]

#: alpha/beta (Gy) by structure role/name; ``"default"`` for everything else.
DEFAULT_ALPHA_BETA_GY: dict[str, float] = {
    "target": 10.0,  # HCC
    "GTV": 10.0,
    "PGTV": 10.0,
    "PTV": 10.0,
    "Liver": 2.5,
    "NormalLiver": 2.5,
    "ProtectedLiver": 2.5,
    "SpinalCord": 2.0,
    "default": 3.0,
}
#: documented option for hepatitis(-B) livers (Son et al., Radiat Oncol 2013;8:61)
ALPHA_BETA_LIVER_HBV_GY = 8.0


@dataclass(frozen=True)
class LKBParameters:
    """Lyman-Kutcher-Burman parameters (doses in Gy at ``reference_dose_per_fraction_gy``)."""

    n: float
    m: float
    td50_gy: float
    reference_dose_per_fraction_gy: float
    source: str = ""

    def __post_init__(self):
        check_positive("n", self.n)
        check_positive("m", self.m)
        check_positive("td50_gy", self.td50_gy)
        check_positive("reference_dose_per_fraction_gy", self.reference_dose_per_fraction_gy)


#: Dawson et al. 2002 RILD fits (1.5 Gy per fraction)
DAWSON_2002 = {
    "primary": LKBParameters(0.97, 0.12, 39.8, 1.5, "Dawson et al., IJROBP 2002;53:810 (primary liver cancer)"),
    "metastases": LKBParameters(0.97, 0.12, 45.8, 1.5, "Dawson et al., IJROBP 2002;53:810 (liver metastases)"),
}


def _fx(n_fractions) -> float:
    if isinstance(n_fractions, bool):
        raise TypeError(f"n_fractions must be a number, got bool {n_fractions!r}")
    return check_positive("n_fractions", n_fractions)


def bed(dose_gy, n_fractions, alpha_beta_gy):
    """Biologically effective dose (Gy): ``D (1 + D / (n alpha/beta))``; arrays broadcast."""
    n = _fx(n_fractions)
    d = np.asarray(dose_gy, dtype=np.float64)
    ab = np.asarray(alpha_beta_gy, dtype=np.float64)
    if np.any(d < 0) or not np.all(np.isfinite(d)):
        raise ValueError("dose_gy must be finite and >= 0")
    if np.any(ab <= 0) or not np.all(np.isfinite(ab)):
        raise ValueError(f"alpha_beta_gy must be finite and > 0, got {alpha_beta_gy!r}")
    out = d * (1.0 + d / (n * ab))
    return float(out) if out.ndim == 0 else out


def eqd2(dose_gy, n_fractions, alpha_beta_gy):
    """Equivalent dose in 2 Gy fractions (Gy)."""
    return eqd_x(dose_gy, n_fractions, alpha_beta_gy, 2.0)


def eqd_x(dose_gy, n_fractions, alpha_beta_gy, reference_dose_per_fraction_gy):
    """Isoeffective dose (Gy) at ``reference_dose_per_fraction_gy``: ``D (d + a/b) / (x + a/b)``."""
    x = check_positive("reference_dose_per_fraction_gy", reference_dose_per_fraction_gy)
    b = bed(dose_gy, n_fractions, alpha_beta_gy)
    ab = np.asarray(alpha_beta_gy, dtype=np.float64)
    out = np.asarray(b) / (1.0 + x / ab)
    return float(out) if out.ndim == 0 else out


def isoeffective_dose_gy(dose_gy: float, from_fractions, to_fractions, alpha_beta_gy: float) -> float:
    """Total dose in ``to_fractions`` fractions with the same BED as ``dose_gy`` in ``from_fractions``."""
    target_bed = bed(dose_gy, from_fractions, alpha_beta_gy)
    n = _fx(to_fractions)
    ab = check_positive("alpha_beta_gy", alpha_beta_gy)
    # D^2 / (n ab) + D - BED = 0
    a = 1.0 / (n * ab)
    return float((-1.0 + math.sqrt(1.0 + 4.0 * a * target_bed)) / (2.0 * a))


def alpha_beta_map(structures: Mapping, alpha_beta_gy: Mapping[str, float] | None = None,
                   default_gy: float | None = None, order=None) -> np.ndarray:
    """Per-voxel alpha/beta (Gy) from structures.

    Voxels with occupancy >= 0.5 in a structure take its alpha/beta (looked up by name, then by
    ``role``, then ``default``); structures are painted in ``order`` (default: the mapping's order
    with targets last, so tumour values win where structures overlap).
    """
    table = dict(DEFAULT_ALPHA_BETA_GY)
    if alpha_beta_gy:
        table.update(alpha_beta_gy)
    default = float(table.get("default", 3.0) if default_gy is None else default_gy)
    names = list(order) if order is not None else sorted(
        structures, key=lambda k: structures[k].role == "target" or table.get(k) == table["target"]
    )
    grid = structures.grid if hasattr(structures, "grid") else structures[names[0]].grid
    out = np.full(grid.shape, default, dtype=np.float64)
    for name in names:
        s = structures[name]
        ab = table.get(name, table.get(s.role, None))
        if ab is None:
            continue
        out[s.mask] = check_positive(f"alpha/beta of {name!r}", ab)
    return out


def bed_volume(dose: ImageVolume, n_fractions, alpha_beta_gy) -> ImageVolume:
    """Per-voxel BED (Gy) of a physical dose; ``alpha_beta_gy`` scalar or (nz, ny, nx) array."""
    if not isinstance(dose, ImageVolume):
        raise TypeError(f"dose must be an ImageVolume, got {type(dose).__name__}")
    ab = np.broadcast_to(np.asarray(alpha_beta_gy, dtype=np.float64), dose.grid.shape)
    return dose.with_array(bed(dose.array, n_fractions, ab), unit="Gy", quantity="BED")


def eqd2_volume(dose: ImageVolume, n_fractions, alpha_beta_gy) -> ImageVolume:
    """Per-voxel EQD2 (Gy) of a physical dose; ``alpha_beta_gy`` scalar or (nz, ny, nx) array."""
    if not isinstance(dose, ImageVolume):
        raise TypeError(f"dose must be an ImageVolume, got {type(dose).__name__}")
    ab = np.broadcast_to(np.asarray(alpha_beta_gy, dtype=np.float64), dose.grid.shape)
    return dose.with_array(eqd2(dose.array, n_fractions, ab), unit="Gy", quantity="EQD2")


def _dvh_bins(dvh: DVH) -> tuple[np.ndarray, np.ndarray]:
    """(dose, relative volume) of the non-empty DVH bins (bin centres clamped to [min, max])."""
    if not isinstance(dvh, DVH):
        raise TypeError(f"dvh must be a DVH, got {type(dvh).__name__}")
    keep = dvh.differential_ml > 0
    d = np.clip(dvh.centres_gy[keep], dvh.min_gy, dvh.max_gy)
    v = dvh.differential_ml[keep] / dvh.total_volume_ml
    return d, v


def convert_dvh(dvh: DVH, n_fractions, alpha_beta_gy: float, reference_dose_per_fraction_gy: float = 2.0) -> DVH:
    """DVH of the isoeffective dose at ``reference_dose_per_fraction_gy`` (EQD2 by default)."""
    d, v = _dvh_bins(dvh)
    dx = np.asarray(eqd_x(d, n_fractions, alpha_beta_gy, reference_dose_per_fraction_gy))
    return DVH.from_samples(np.atleast_1d(dx), v * dvh.total_volume_ml, name=dvh.name,
                            bin_width_gy=dvh.bin_width_gy)


def geud(dvh: DVH, a: float) -> float:
    """Generalised EUD (Gy): ``(sum_i v_i D_i^a)^(1/a)``, ``a`` != 0 (a = 1 gives the mean)."""
    a = float(a)
    if a == 0 or not math.isfinite(a):
        raise ValueError(f"a must be finite and non-zero, got {a}")
    d, v = _dvh_bins(dvh)
    if a < 0 and np.any(d <= 0):
        raise ValueError("a < 0 needs doses > 0 in every non-empty bin")
    return float(np.sum(v * d ** a) ** (1.0 / a))


def lkb_ntcp(dvh: DVH, n_fractions, *, parameters: LKBParameters | str = "primary",
             alpha_beta_gy: float = DEFAULT_ALPHA_BETA_GY["Liver"]) -> dict:
    """LKB NTCP of a physical DVH (default: RILD, Dawson 2002, primary liver cancer).

    The DVH is converted to the parameters' reference dose per fraction (EQD_1.5 for Dawson)
    with ``alpha_beta_gy``, then ``NTCP = Phi((gEUD - TD50) / (m TD50))`` with
    ``gEUD = (sum v_i D_i^(1/n))^n``.

    Returns
    -------
    dict with ``ntcp`` (0..1), ``geud_gy`` (at the reference fractionation), ``t`` and the
    parameters used.
    """
    if isinstance(parameters, str) and parameters not in DAWSON_2002:
        raise ValueError(f"parameters must be one of {sorted(DAWSON_2002)} or LKBParameters, got {parameters!r}")
    p = DAWSON_2002[parameters] if isinstance(parameters, str) else parameters
    if not isinstance(p, LKBParameters):
        raise TypeError(f"parameters must be 'primary', 'metastases' or LKBParameters, got {parameters!r}")
    ab = check_positive("alpha_beta_gy", alpha_beta_gy)
    d, v = _dvh_bins(dvh)
    dref = np.atleast_1d(eqd_x(d, n_fractions, ab, p.reference_dose_per_fraction_gy))
    g = float(np.sum(v * dref ** (1.0 / p.n)) ** p.n)
    t = (g - p.td50_gy) / (p.m * p.td50_gy)
    return {
        "ntcp": float(ndtr(t)),
        "geud_gy": g,
        "t": t,
        "n": p.n,
        "m": p.m,
        "td50_gy": p.td50_gy,
        "reference_dose_per_fraction_gy": p.reference_dose_per_fraction_gy,
        "alpha_beta_gy": ab,
        "source": p.source,
    }


@dataclass(frozen=True)
class CriticalVolumeResult:
    """Outcome of the critical-volume rule."""

    spared_volume_ml: float
    min_volume_ml: float
    threshold_gy: float
    passed: bool
    source: str

    def to_dict(self) -> dict:
        return {"spared_volume_ml": self.spared_volume_ml, "min_volume_ml": self.min_volume_ml,
                "threshold_gy": self.threshold_gy, "passed": self.passed, "source": self.source}


def critical_volume_rule(dvh: DVH, n_fractions, *, min_volume_ml: float = 700.0,
                         threshold_gy: float = 15.0, threshold_fractions=3,
                         alpha_beta_gy: float = DEFAULT_ALPHA_BETA_GY["Liver"]) -> CriticalVolumeResult:
    """Volume (mL) of the structure below a threshold dose, against ``min_volume_ml``.

    The threshold ``threshold_gy`` in ``threshold_fractions`` fractions is converted to the
    plan's ``n_fractions`` at equal BED (``alpha_beta_gy``); see the module doc for the default.
    """
    if not isinstance(dvh, DVH):
        raise TypeError(f"dvh must be a DVH, got {type(dvh).__name__}")
    check_positive("min_volume_ml", min_volume_ml)
    thr = isoeffective_dose_gy(check_positive("threshold_gy", threshold_gy), threshold_fractions,
                               n_fractions, alpha_beta_gy)
    spared = dvh.total_volume_ml - dvh.volume_at_dose_ml(thr)
    return CriticalVolumeResult(
        spared_volume_ml=float(spared), min_volume_ml=float(min_volume_ml), threshold_gy=thr,
        passed=bool(spared >= min_volume_ml),
        source=(f">= {min_volume_ml:g} mL below {threshold_gy:g} Gy in {threshold_fractions:g} fx "
                f"(Schefter 2005 / QUANTEC Pan 2010), = {thr:.2f} Gy in {n_fractions:g} fx at "
                f"alpha/beta {alpha_beta_gy:g} Gy"),
    )
