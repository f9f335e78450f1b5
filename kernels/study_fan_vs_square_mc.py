#!/usr/bin/env python
"""Monte Carlo check of the equivalent-square study: does a 40 cm tomotherapy fan have the depth
dose of its equivalent square? (optional: needs ``pip install ompmc``, GPL-3.0, never vendored)

``kernels/study_la4_equivalent_square.py`` found, with the engine, that the 2.5 x 40 cm fan's
TPR differs from that of a 4.375 cm square (about the same equivalent square, 4.71 vs 4.38 cm)
by −0.8 % at 3 cm and +2.6 % at 20 cm (normalised at 10 cm). This script asks ompMC the same
question in the engine's ideal preset (point source, sharp jaws and leaves, the default
spectrum: the preset of ``validation/generate_mc_references.py``, whose ``beamlets`` it reuses):
central-axis depth dose at SSD 850 mm in a 440 x 300 x 160 mm water box for

* the fan: jaw 25 mm x 64 leaves (2.5 x 40 cm);
* the square: an engine-only 43.75 mm jaw x 7 leaves (4.375 x 4.375 cm);

tallied on the axis in 20 x 10 x 5 mm bins (x across the fan, depth, z along the jaws; the
square's and the fan's doses are flat within 0.3 % over them), and the collapsed cone (ideal
preset, the same phantom) averaged over the same bins. Printed: for each field D(d)/D(100 mm),
and the ratio fan / square of those, Monte Carlo against engine.

Usage::

    python kernels/study_fan_vs_square_mc.py [--histories 3000000] [--json out.json]

About 650 CPU s of ompMC per field at 3 M histories (2-core machine). Results in
``docs/commissioning.md`` (section *Equivalent square*).
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
sys.path.insert(0, str(ROOT / "validation"))
sys.path.insert(0, str(ROOT / "kernels"))

from study_la4_field_growth_mc import DEPTHS_MM, PHANTOM, SURFACE_Y_MM, at_depths, axis_curve  # noqa: E402
from study_la4_field_growth_mc import edges as _edges  # noqa: E402
from study_la4_field_growth_mc import mc_and_engine_bins  # noqa: E402

from tomodose.delivery.machine import TomoMachine  # noqa: E402
from tomodose.delivery.plan import ProjectionSequence  # noqa: E402
from tomodose.dose.engine import engine_kernel  # noqa: E402
from tomodose.evaluation import reference as refmod  # noqa: E402
from tomodose.terma.beam_model import BeamModel  # noqa: E402
from tomodose.terma.spectrum import default_spectrum  # noqa: E402

SQUARE_MM = 43.75


def fields(machine):
    iso = (0.0, SURFACE_Y_MM, 0.0)  # SSD 850 mm
    out = {}
    for name, jaw, n in (("fan 2.5 x 40", 25.0, 64), ("square 4.375", SQUARE_MM, 7)):
        f = np.zeros(64)
        lo = 32 - n // 2
        f[lo:lo + n] = 1.0
        out[name] = ProjectionSequence.static_beams([0.0], f, 60.0, jaw, isocentre_lps_mm=iso, machine=machine)
    return out


def edges():
    """The axis bin 5 mm along the jaws (the 25 mm jaw's flat top)."""
    return _edges(2.5)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--histories", type=int, default=3_000_000)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    spectrum = default_spectrum()
    machine = TomoMachine(jaw_fwhm_mm={**TomoMachine().jaw_fwhm_mm, SQUARE_MM: SQUARE_MM})
    ideal = BeamModel.ideal(spectrum)
    ideal = dataclasses.replace(ideal, jaw_fwhm_mm={**(ideal.jaw_fwhm_mm or machine.jaw_fwhm_mm), SQUARE_MM: SQUARE_MM})
    patient = refmod.build_phantom_from_spec(PHANTOM)
    ye = edges()[1]
    kernel = engine_kernel()
    out = {"depths_mm": list(DEPTHS_MM), "histories": args.histories, "fields": {}}
    for k, (name, seq) in enumerate(fields(machine).items()):
        mc, un, eng_bins, wall = mc_and_engine_bins(patient, edges(), seq, ideal, spectrum, kernel, seeds=(2001 + k, 33),
                                                   histories=args.histories)
        c, d_mc = axis_curve(mc, ye)
        _, d_en = axis_curve(eng_bins, ye)
        _, s_mc = axis_curve(un, ye)
        out["fields"][name] = {"mc": at_depths(c, d_mc).tolist(), "engine": at_depths(c, d_en).tolist(),
                               "mc_rel_sigma_at_depths": np.interp(DEPTHS_MM, c, s_mc).tolist(), "mc_wall_s": wall}
        print(f"{name}: {wall:.0f} s ompMC; D(d)/D(100) MC  " + " ".join(f"{v:.4f}" for v in out["fields"][name]["mc"]),
              flush=True)
        print(f"{' ' * len(name)}                  engine " + " ".join(f"{v:.4f}" for v in out["fields"][name]["engine"]),
              flush=True)
    f, s = (out["fields"][n] for n in ("fan 2.5 x 40", "square 4.375"))
    for src_ in ("mc", "engine"):
        r = 100.0 * (np.array(f[src_]) / np.array(s[src_]) - 1.0)
        out[f"fan_over_square_pct_{src_}"] = r.tolist()
        print(f"fan / square - 1 (%), {src_:6s} at " + " / ".join(f"{d:g}" for d in DEPTHS_MM) + " mm: "
              + " / ".join(f"{v:+.2f}" for v in r))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
