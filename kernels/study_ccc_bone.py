#!/usr/bin/env python
"""Study: where the collapsed cone's error in the bone slab comes from (stored ompMC reference).

The ``slab_bone`` reference (water 30 / bone 20 / water 150 mm, ICRP bone at 1.6 g/cm3) and
``water_j50`` (same field in water) are computed with the engine; the script prints, per depth
bin, the ratio bone-slab / water dose of the Monte Carlo and of the engine and the engine's
excess over the Monte Carlo in that ratio (the water case's own error cancels).

Then the same with the TERMA's material model changed to the Monte Carlo's (``--mc-media``: every
voxel >= 1.2 g/cm3 is pure bone composition, as ``validation/generate_mc_references.py`` assigns
ICRPBONE700ICRU; the engine's :data:`tomodose.terma.attenuation.DENSITY_ANCHORS` map 1.6 g/cm3 to a
soft-tissue / cortical-bone mixture instead). Patched in this process only.

Usage::

    nice -n 10 python kernels/study_ccc_bone.py [--kernel NAME_OR_JSON]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tomodose.evaluation.reference import REFERENCE_DIR, compare_depth_dose, engine_dose, load_reference  # noqa: E402


def ratios(kernel, label):
    rb = load_reference(REFERENCE_DIR / "slab_bone.h5")
    rw = load_reference(REFERENCE_DIR / "water_j50.h5")
    eb = engine_dose(rb, "collapsed_cone", kernel=kernel, progress=False)
    ew = engine_dose(rw, "collapsed_cone", kernel=kernel, progress=False)
    db = compare_depth_dose(rb, eb, normalise_mm=(15.0, 25.0))
    dw = compare_depth_dose(rw, ew)
    print(f"{label}: slab_bone abs max {db['max_abs_beyond_pct']:.2f} % (mean {db['mean_abs_beyond_pct']:+.2f} %), "
          f"rel max {db['max_rel_beyond_pct']:.2f} % (mean {db['mean_rel_beyond_pct']:+.2f} %)")
    print("  depth (mm) | MC bone/water | engine bone/water | engine excess (%) | engine - MC in bone slab (%) | MC 1-sigma (%)")
    for z, mb, mw, cb, cw, d, s in zip(db["depth_mm"], db["mc_gy"], dw["mc_gy"], db["engine_gy"], dw["engine_gy"],
                                       db["diff_abs_pct"], db["mc_sigma_gy"] / db["mc_gy"]):
        if 25.0 <= z <= 70.0:
            print(f"  {z:6.2f} | {mb / mw:.4f} | {cb / cw:.4f} | {100 * ((cb / cw) / (mb / mw) - 1):+.2f} | {d:+.2f} | "
                  f"{100 * s:.2f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--kernel", default=None)
    args = ap.parse_args(argv)
    from tomodose.transport.kernels import load_kernel

    kernel = load_kernel(args.kernel) if args.kernel else None
    ratios(kernel, "engine as shipped (TERMA media: density anchors)")
    import tomodose.terma.attenuation as att

    anchors = att.DENSITY_ANCHORS
    att.DENSITY_ANCHORS = tuple((m, d) for m, d in anchors if m != "bone" and d < 1.2) + (("bone", 1.2),)
    try:
        from tomodose.dose import calibration

        calibration._CACHE.clear()
        ratios(kernel, "TERMA media as in the Monte Carlo (>= 1.2 g/cm3: bone composition)")
    finally:
        att.DENSITY_ANCHORS = anchors
    return 0


if __name__ == "__main__":
    sys.exit(main())
