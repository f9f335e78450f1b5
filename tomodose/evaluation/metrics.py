"""Plan metrics: DVH point metrics from the strings users write, and plan-quality indices.

Metric names (case-insensitive for the unit suffixes, spaces ignored)
---------------------------------------------------------------------
``Dmean``, ``Dmin``, ``Dmax``           mean / minimum / maximum dose (Gy)
``D95%``, ``D2%``, ``D50%``             minimum dose to the hottest x % of the volume (Gy)
``D0.03cc``, ``D0.5cc`` (or ``ml``)     minimum dose to the hottest x cm^3 (Gy)
``V20Gy``, ``V20Gy[%]``                 % of the volume receiving >= 20 Gy
``V20Gy[cc]`` (or ``[ml]``)             cm^3 receiving >= 20 Gy
``V95%Rx``, ``V95%Rx[cc]``              volume receiving >= 95 % of the prescription (needs
                                        ``prescription_gy``)
``D95%[%Rx]``, ``Dmean[%Rx]``           a dose metric expressed in % of the prescription
``Volume`` (``Volume[cc]``)             structure volume (cm^3)

All interpolate in the DVH (see :mod:`tomodose.evaluation.dvh`), never nearest-bin.

Indices
-------
* homogeneity index (ICRU Report 83): ``HI = (D2% - D98%) / D50%``;
* Paddick conformity index (Paddick 2000): ``CI = TV_PIV**2 / (TV x PIV)``;
* gradient index (Paddick & Lippitz 2006): ``GI = PIV_50% / PIV_100%``;
* R50% (RTOG 0915/0813): ``V(50 % of Rx isodose) / target volume``.

Isodose volumes (PIV) count the dose-grid voxels with dose >= the level, weighted by the
occupancy of ``body`` when given (else the whole grid).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from tomodose._validate import check_positive
from tomodose.evaluation.dvh import DVH
from tomodose.geometry.grid import ImageVolume
from tomodose.geometry.structures import Structure

__all__ = [
    "MetricSpec",
    "parse_metric",
    "evaluate_metric",
    "homogeneity_index",
    "isodose_volume_ml",
    "paddick_conformity_index",
    "gradient_index",
    "r50",
]

_NUM = r"(\d+(?:\.\d*)?|\.\d+)"
_RE_STAT = re.compile(r"^d(mean|min|max)(?:\[(%rx|gy)\])?$")
_RE_D = re.compile(rf"^d{_NUM}(%|cc|ml|cm3)(?:\[(%rx|gy)\])?$")
_RE_V = re.compile(rf"^v{_NUM}(gy|%rx)(?:\[(%|cc|ml|cm3)\])?$")
_RE_VOL = re.compile(r"^(?:volume|vol|v)(?:\[(cc|ml|cm3)\])?$")


@dataclass(frozen=True)
class MetricSpec:
    """A parsed DVH metric.

    Attributes
    ----------
    text : str
        The name as written.
    kind : str
        ``"mean"``, ``"min"``, ``"max"``, ``"dose_at_percent"``, ``"dose_at_cc"``,
        ``"volume_at_gy"``, ``"volume_at_rx_percent"`` or ``"volume"``.
    value : float or None
        The number in the name (x in Dx% / Dxcc / VxGy / Vx%Rx).
    unit : str
        Unit of the result: ``"Gy"``, ``"%Rx"``, ``"%"`` or ``"cc"``.
    """

    text: str
    kind: str
    value: float | None
    unit: str

    @property
    def is_dose(self) -> bool:
        return self.unit in ("Gy", "%Rx")

    @property
    def needs_prescription(self) -> bool:
        return self.kind == "volume_at_rx_percent" or self.unit == "%Rx"


def parse_metric(text: str) -> MetricSpec:
    """Parse a metric name such as ``"D95%"``, ``"D0.03cc"``, ``"V20Gy[cc]"`` or ``"Dmean"``."""
    if not isinstance(text, str):
        raise TypeError(f"metric must be a string, got {type(text).__name__}")
    t = text.replace(" ", "").lower()
    m = _RE_STAT.match(t)
    if m:
        return MetricSpec(text, m.group(1), None, "%Rx" if m.group(2) == "%rx" else "Gy")
    m = _RE_D.match(t)
    if m:
        x = float(m.group(1))
        unit = "%Rx" if m.group(3) == "%rx" else "Gy"
        if m.group(2) == "%":
            if not 0.0 <= x <= 100.0:
                raise ValueError(f"metric {text!r}: the volume must be in [0, 100] %, got {x}")
            return MetricSpec(text, "dose_at_percent", x, unit)
        return MetricSpec(text, "dose_at_cc", x, unit)
    m = _RE_V.match(t)
    if m:
        x = float(m.group(1))
        out = {"%": "%", None: "%"}.get(m.group(3), "cc")
        kind = "volume_at_gy" if m.group(2) == "gy" else "volume_at_rx_percent"
        return MetricSpec(text, kind, x, out)
    m = _RE_VOL.match(t)
    if m and t != "v":
        return MetricSpec(text, "volume", None, "cc")
    raise ValueError(
        f"metric {text!r} is not understood; expected e.g. 'Dmean', 'Dmax', 'D95%', 'D0.03cc', "
        "'V20Gy', 'V20Gy[cc]', 'V95%Rx', 'D95%[%Rx]' or 'Volume'"
    )


def metric_threshold_dose_gy(spec: MetricSpec, prescription_gy: float | None = None) -> float | None:
    """Dose (Gy) a volume metric thresholds at (None for dose metrics)."""
    if spec.kind == "volume_at_gy":
        return spec.value
    if spec.kind == "volume_at_rx_percent":
        if prescription_gy is None:
            raise ValueError(f"metric {spec.text!r} needs prescription_gy")
        return spec.value / 100.0 * prescription_gy
    return None


def evaluate_metric(dvh: DVH, metric, *, prescription_gy: float | None = None) -> float:
    """Value of ``metric`` (str or :class:`MetricSpec`) on ``dvh``, in the metric's unit."""
    spec = parse_metric(metric) if isinstance(metric, str) else metric
    if not isinstance(dvh, DVH):
        raise TypeError(f"dvh must be a DVH, got {type(dvh).__name__}")
    if spec.needs_prescription:
        if prescription_gy is None:
            raise ValueError(f"metric {spec.text!r} needs prescription_gy, got None")
        prescription_gy = check_positive("prescription_gy", prescription_gy)
    k = spec.kind
    if k == "volume":
        return dvh.total_volume_ml
    if k in ("volume_at_gy", "volume_at_rx_percent"):
        d = metric_threshold_dose_gy(spec, prescription_gy)
        return dvh.volume_at_dose_ml(d) if spec.unit == "cc" else dvh.volume_at_dose_percent(d)
    if k == "mean":
        gy = dvh.mean_gy
    elif k == "min":
        gy = dvh.min_gy
    elif k == "max":
        gy = dvh.max_gy
    elif k == "dose_at_percent":
        gy = dvh.dose_at_volume_percent(spec.value)
    elif k == "dose_at_cc":
        gy = dvh.dose_at_volume_ml(spec.value)
    else:  # pragma: no cover
        raise ValueError(f"unknown metric kind {k!r}")
    return 100.0 * gy / prescription_gy if spec.unit == "%Rx" else gy


def homogeneity_index(dvh: DVH) -> float:
    """ICRU 83 homogeneity index ``(D2% - D98%) / D50%`` (0 = perfectly homogeneous)."""
    d50 = dvh.dose_at_volume_percent(50.0)
    if d50 <= 0:
        raise ValueError(f"structure {dvh.name!r}: D50% is {d50} Gy, the homogeneity index is undefined")
    return (dvh.dose_at_volume_percent(2.0) - dvh.dose_at_volume_percent(98.0)) / d50


def _check_dose(dose) -> None:
    if not isinstance(dose, ImageVolume):
        raise TypeError(f"dose must be an ImageVolume, got {type(dose).__name__}")


def isodose_volume_ml(dose: ImageVolume, level_gy: float, body: Structure | None = None) -> float:
    """Volume (mL) with dose >= ``level_gy`` (inside ``body`` when given)."""
    _check_dose(dose)
    level = check_positive("level_gy", level_gy)
    inside = dose.array >= level
    if body is not None:
        dose.grid.require_same(body.grid, f"structure {body.name!r}")
        return float(body.occupancy[inside].sum(dtype=np.float64) * dose.grid.voxel_volume_ml)
    return float(np.count_nonzero(inside) * dose.grid.voxel_volume_ml)


def _target_volume(dose: ImageVolume, target: Structure) -> float:
    _check_dose(dose)
    if not isinstance(target, Structure):
        raise TypeError(f"target must be a Structure, got {type(target).__name__}")
    dose.grid.require_same(target.grid, f"structure {target.name!r}")
    if target.is_empty:
        raise ValueError(f"structure {target.name!r} is empty")
    return target.volume_ml


def paddick_conformity_index(dose: ImageVolume, target: Structure, prescription_gy: float,
                             body: Structure | None = None) -> float:
    """Paddick conformity index ``TV_PIV**2 / (TV x PIV)`` in [0, 1] (1 = perfect)."""
    tv = _target_volume(dose, target)
    rx = check_positive("prescription_gy", prescription_gy)
    piv = isodose_volume_ml(dose, rx, body)
    if piv <= 0:
        return 0.0
    tv_piv = float(target.occupancy[dose.array >= rx].sum(dtype=np.float64) * dose.grid.voxel_volume_ml)
    return tv_piv * tv_piv / (tv * piv)


def gradient_index(dose: ImageVolume, prescription_gy: float, body: Structure | None = None) -> float:
    """Paddick gradient index ``PIV(50 % Rx) / PIV(100 % Rx)``."""
    _check_dose(dose)
    rx = check_positive("prescription_gy", prescription_gy)
    piv100 = isodose_volume_ml(dose, rx, body)
    if piv100 <= 0:
        raise ValueError(f"no voxel reaches the prescription {rx} Gy: the gradient index is undefined")
    return isodose_volume_ml(dose, 0.5 * rx, body) / piv100


def r50(dose: ImageVolume, target: Structure, prescription_gy: float, body: Structure | None = None) -> float:
    """R50%: volume of the 50 % prescription isodose / target volume."""
    tv = _target_volume(dose, target)
    rx = check_positive("prescription_gy", prescription_gy)
    return isodose_volume_ml(dose, 0.5 * rx, body) / tv
