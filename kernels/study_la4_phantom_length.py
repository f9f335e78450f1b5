#!/usr/bin/env python
"""How much does the length of the commissioning phantom along the couch axis move the TPR? (issue 8)

Until session 12 ``kernels/commission_la4.point_dose`` (and so ``tests/test_commissioning.py`` and
every fit stage) computed the LA4 TPR points in a water slab that reached ``jaw / 2 + 40 mm`` from the
axis along the couch (13 cm long for the 50 mm jaw); it now reaches ``jaw / 2 + SLAB_REACH_MM``
(150 mm) because of this study. With the collapsed cone's surface correction on (the engine
default), scatter that would come back from the water beyond the slab's ends is missing, as in a
real short phantom, while a TPR measurement is made in a tank. This study recomputes the TPR
(normalised at 10 cm, detector at the isocentre, the shipped machine and engine, the voxels of
``point_dose``) with the slab reaching ``jaw / 2 + extra`` for each ``--extra`` and prints the ratios.

Usage::

    python kernels/study_la4_phantom_length.py [--jaws 50,25,10] [--extra 40,150] [--depths 3,5,20]

About 15 CPU minutes for the defaults (the 150 mm slab is 2.5-3.5x the voxels). Results of
2026-11-30 in ``docs/commissioning.md`` (section *Phantom length*).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

NORM_CM = 10.0


def tpr(C, beam, kernel, jaw_mm, extra_mm, depths_cm):
    """{depth: TPR(depth) / TPR(10 cm)} of jaw x 64 leaves in a slab reaching ``jaw / 2 + extra_mm``."""
    vals = {}
    for d in sorted(set(depths_cm) | {NORM_CM}):
        vals[d] = C.point_dose(beam, kernel, jaw_mm, 64, 850.0 - 10.0 * d, 10.0 * d, reach_mm=extra_mm)
    return {d: vals[d] / vals[NORM_CM] for d in depths_cm}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jaws", default="50,25,10")
    ap.add_argument("--extra", default="40,150",
                    help="slab reach beyond the jaw's half width (mm); 40 = commission_la4 before session 12, "
                         "150 = its SLAB_REACH_MM")
    ap.add_argument("--depths", default="3,5,20")
    args = ap.parse_args(argv)
    C = _common.load_script("commission_la4")
    from tomodose.dose.engine import engine_kernel
    from tomodose.terma.beam_model import BeamModel

    beam, kernel = BeamModel.default(), engine_kernel()
    depths = [float(x) for x in args.depths.split(",")]
    extras = [float(x) for x in args.extra.split(",")]
    for jaw in (int(x) for x in args.jaws.split(",")):
        t = {e: tpr(C, beam, kernel, jaw, e, depths) for e in extras}
        row = {"jaw_mm": jaw, "tpr": {f"{e:g}": {f"{d:g}": round(v, 5) for d, v in t[e].items()} for e in extras},
               "ratio_pct": {f"{e:g}": {f"{d:g}": round(100 * (t[e][d] / t[extras[0]][d] - 1), 3) for d in depths}
                             for e in extras[1:]}}
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
