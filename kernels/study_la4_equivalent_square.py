#!/usr/bin/env python
"""How well does an elongated tomotherapy fan follow its equivalent square? (TPR, engine as shipped)

The CheckTomo LA4 TPR table is one function of the equivalent square ``2 L W / (L + W)`` (the same
table in the three jaw files), and ``tests/test_commissioning.py`` compares the engine's 40 cm
fans (jaw ``L`` x 64 leaves) with the column of their equivalent square. A tomotherapy unit cannot
open a square field wider than its 5 cm jaw, so which fields LA4's columns were measured with is
not known. This study computes, with the shipped engine (collapsed cone, default beam model,
default kernel), the TPR (normalised at 10 cm, detector at the isocentre, the geometry of
``kernels/commission_la4.py``) of

* the 40 cm fan of each jaw (10 / 25 / 50 mm x 64 leaves), and
* a square field of about the same equivalent square (a jaw of ``n`` leaf widths x ``n`` leaves:
  18.75 / 43.75 / 87.5 mm, an engine-only jaw with a sharp-FWHM equal to its width and output
  factor 1; the TPR does not depend on the output factor),

and prints engine / LA4 - 1 for both, and the engine's fan / square - 1. Voxels as in
``commission_la4.point_dose`` (2.5 mm along the beam; 2 mm across jaws <= 20 mm, else 2.5 mm;
across the leaves a fifth of the open width, 1.25-5 mm). The LA4 files are GPL-3.0 and read at
run time from ``--shared-data`` (never copied).

Usage::

    python kernels/study_la4_equivalent_square.py [--shared-data ../shared/data] [--json out.json]

About 2 CPU minutes. Results of 2026-11-29 in ``docs/commissioning.md`` (section *Equivalent square*).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "kernels"))

import commission_la4 as C  # noqa: E402

from tomodose.delivery.machine import TomoMachine  # noqa: E402
from tomodose.dose.engine import engine_kernel  # noqa: E402
from tomodose.terma.beam_model import BeamModel  # noqa: E402

DEPTHS_CM = (3.0, 5.0, 7.0, 10.0, 15.0, 20.0)
#: (fan jaw mm, square side in leaves)
PAIRS = ((50.0, 14), (25.0, 7), (10.0, 3))


def _with_square_jaw(side_mm: float):
    beam = BeamModel.default()
    fwhm = dict(beam.jaw_fwhm_mm or TomoMachine().jaw_fwhm_mm)
    fwhm[side_mm] = side_mm
    factors = dict(beam.jaw_output_factors or {})
    factors[side_mm] = 1.0
    beam = dataclasses.replace(beam, jaw_fwhm_mm=fwhm, jaw_output_factors=factors)
    machine_fwhm = dict(TomoMachine().jaw_fwhm_mm)
    machine_fwhm[side_mm] = side_mm
    return beam, TomoMachine(jaw_fwhm_mm=machine_fwhm)


def engine_tpr(beam, machine, kernel, jaw_mm: float, n_open: int) -> np.ndarray:
    """TPR at DEPTHS_CM normalised at 10 cm (detector at the isocentre, field centre)."""
    dx = float(np.clip(n_open * C.LEAF_MM / 5.0, 1.25, 5.0))
    dz = 2.0 if jaw_mm <= 20.0 else 2.5
    vals = []
    for d in DEPTHS_CM:
        depth_mm = 10.0 * d
        dose, grid = C.water_dose(beam, kernel, jaw_mm, C.open_leaves(n_open), machine.sad_mm - depth_mm,
                                  max_depth_mm=depth_mm + 100.0, half_x_mm=C._half_x(n_open),
                                  # the slab of commission_la4.point_dose until session 12 (the documented numbers)
                                  half_z_mm=0.5 * jaw_mm + 40.0, spacing_mm=(dx, 2.5, dz), machine=machine)
        vals.append(float(C.sample(dose, grid, [[C.field_centre_x_mm(n_open), depth_mm, 0.0]])[0]))
    v = np.asarray(vals)
    return v / v[DEPTHS_CM.index(10.0)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared-data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    la4 = C.read_la4(args.shared_data)
    kernel = engine_kernel()
    out = {"depths_cm": list(DEPTHS_CM), "pairs": []}

    def pct(a, b):
        return " / ".join(f"{100.0 * (x / y - 1.0):+.2f}" for x, y in zip(a, b))

    print("engine / LA4 - 1 (%) at " + " / ".join(f"{d:g}" for d in DEPTHS_CM) + " cm")
    for jaw, n_sq in PAIRS:
        side = n_sq * C.LEAF_MM
        beam, machine = _with_square_jaw(side)
        fan = engine_tpr(beam, machine, kernel, jaw, 64)
        sq = engine_tpr(beam, machine, kernel, side, n_sq)
        es_fan = C.equivalent_square_cm(jaw / 10.0, 64 * C.LEAF_MM / 10.0)
        es_sq = side / 10.0
        la4_fan, la4_sq = C.la4_tpr(la4, es_fan, DEPTHS_CM), C.la4_tpr(la4, es_sq, DEPTHS_CM)
        print(f"  fan {jaw:g} mm x 40 cm (eq. sq. {es_fan:.2f} cm): {pct(fan, la4_fan)}")
        print(f"  square {side:g} mm (eq. sq. {es_sq:.2f} cm):       {pct(sq, la4_sq)}")
        print(f"  engine fan / engine square - 1:            {pct(fan, sq)}")
        out["pairs"].append({"jaw_mm": jaw, "square_mm": side, "eq_square_fan_cm": es_fan, "eq_square_square_cm": es_sq,
                             "engine_fan": fan.tolist(), "engine_square": sq.tolist(),
                             "la4_fan": la4_fan.tolist(), "la4_square": la4_sq.tolist()})
    if args.json:
        args.json.write_text(json.dumps(out, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
