#!/usr/bin/env python
"""Derive the default machine's dose calibration point ``tomodose/data/machines/tomo_default_dose_calibration.json``.

Why. A TomoTherapy unit's dose rate is specified at the vendor's reference condition: 5 x 40 cm
open fan, SSD 85 cm, 1.5 cm depth (8.5 Gy/min, :class:`tomodose.delivery.machine.TomoMachine`).
1.5 cm is at the depth of maximum, where the measured dose includes contaminating electrons from
the head that the engines do not model; calibrating there scales every deeper dose by the
engine's build-up deficit (about 2 % in the 2026-11-28 comparison with the CheckTomo formula,
``docs/commissioning.md``). Treatment planning systems calibrate past the build-up instead,
transferring the unit's dose rate with its measured depth dose. This script does that transfer
with the measured tissue-phantom ratios of the commissioning data set (CheckTomo LA4,
``../shared/data/tomotherapy/checktomo_LA4``, GPL-3.0: read at run time, only the derived ratio is
written):

* calibration point: the isocentre at ``--depth-cm`` (default 10 cm) in water, surface at
  ``SAD - depth`` (the TPR geometry of the LA4 tables, with the phantom's 10 cm of backscatter),
  same 5 x 40 cm field;
* dose rate there, relative to the nominal one:

      f = (SSD_nom + d_nom)^2 / SAD^2  x  TPR(depth, s) / TPR(d_nom, s)

  with ``s = 2 L W / (L + W)`` = 8.89 cm the equivalent square of the 5 x 40 cm field, SSD_nom =
  85 cm, d_nom = 1.5 cm (inverse square from 86.5 cm to the isocentre). The field at the nominal
  point is 1.8 % wider than at the isocentre; its phantom-scatter change is neglected (< 0.2 %).

Output: JSON (format ``tomodose-dose-calibration``) with the condition, ``dose_rate_factor`` and
provenance (input file digest, TPR values, command); written atomically.

Usage::

    python kernels/derive_dose_calibration.py [--shared ../shared/data] [--depth-cm 10] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import sys
from pathlib import Path

import _common  # noqa: F401  (puts the repository root on sys.path)
from commission_la4 import LA4_REL, equivalent_square_cm, la4_tpr, read_la4

from tomodose._atomic import atomic_write_text
from tomodose.delivery.machine import TomoMachine
from tomodose.dose.calibration import DOSE_CALIBRATION_FORMAT, DOSE_CALIBRATION_PATH

log = logging.getLogger("derive_dose_calibration")

SCRIPT_VERSION = "1.0"
NOMINAL_SSD_CM = 85.0
NOMINAL_DEPTH_CM = 1.5
JAW_CM = 5.0
OPEN_WIDTH_CM = 40.0


def transfer_factor(tpr_depth: float, tpr_nominal: float, sad_cm: float) -> float:
    """Dose rate at the isocentric calibration point relative to the nominal condition."""
    return ((NOMINAL_SSD_CM + NOMINAL_DEPTH_CM) / sad_cm) ** 2 * tpr_depth / tpr_nominal


def derive(shared: Path, depth_cm: float) -> dict:
    la4 = read_la4(shared)
    s = equivalent_square_cm(JAW_CM, OPEN_WIDTH_CM)
    tpr_d, tpr_nom = (float(v) for v in la4_tpr(la4, s, [depth_cm, NOMINAL_DEPTH_CM]))
    machine = TomoMachine()
    sad_cm = machine.sad_mm / 10.0
    f = transfer_factor(tpr_d, tpr_nom, sad_cm)
    src = Path(shared) / LA4_REL / "LA4data50.txt"
    return {
        "format": DOSE_CALIBRATION_FORMAT,
        "condition": {"field_width_mm": 10 * JAW_CM, "ssd_mm": machine.sad_mm - 10 * depth_cm,
                      "depth_mm": 10 * depth_cm},
        "dose_rate_factor": round(f, 6),
        "dose_rate_gy_per_min_at_condition": round(f * machine.dose_rate_gy_per_min, 4),
        "provenance": {
            "script": f"kernels/derive_dose_calibration.py {SCRIPT_VERSION}",
            "command": "python " + " ".join(["kernels/derive_dose_calibration.py"] + sys.argv[1:]),
            "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "nominal_condition": {"field_width_mm": 10 * JAW_CM, "ssd_mm": 10 * NOMINAL_SSD_CM,
                                  "depth_mm": 10 * NOMINAL_DEPTH_CM,
                                  "dose_rate_gy_per_min": machine.dose_rate_gy_per_min},
            "equivalent_square_cm": round(s, 4),
            "tpr": {f"{depth_cm:g} cm": round(tpr_d, 5), f"{NOMINAL_DEPTH_CM:g} cm": round(tpr_nom, 5),
                    "normalised_at": "10 cm"},
            "inverse_square": round(((NOMINAL_SSD_CM + NOMINAL_DEPTH_CM) / sad_cm) ** 2, 6),
            "data": {"file": f"{LA4_REL}/LA4data50.txt [TPRdata] (CheckTomo LA4, GPL-3.0, read at run time)",
                     "sha256": _common.sha256_of(src)},
            "formula": "f = ((SSD_nom + d_nom) / SAD)^2 * TPR(depth, s) / TPR(d_nom, s)",
        },
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=_common.DEFAULT_SHARED)
    ap.add_argument("--depth-cm", type=float, default=10.0, help="depth of the isocentric calibration point (cm)")
    ap.add_argument("--out", type=Path, default=DOSE_CALIBRATION_PATH)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not 3.0 <= args.depth_cm <= 20.0:
        ap.error(f"--depth-cm must lie in [3, 20] cm (past the build-up, inside the TPR table), got {args.depth_cm}")
    out = derive(args.shared, args.depth_cm)
    atomic_write_text(args.out, json.dumps(out, indent=2) + "\n")
    log.info("dose rate factor %.6f (%.4f Gy/min at the isocentre, %g cm depth): %s", out["dose_rate_factor"],
             out["dose_rate_gy_per_min_at_condition"], args.depth_cm, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
