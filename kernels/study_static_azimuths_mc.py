"""Monte Carlo checks of the static collapsed cone with a given number of azimuthal cones per ring.

Runs the checks of ``tests/test_mc_references.py`` (depth dose beyond d_max in Gy and normalised,
profiles 2 %/1 mm) on the stored references with the engine's default kernel re-collapsed onto
``--n-azimuth`` cones per ring (the calibration field gets the same kernel), and prints one JSON line
per case. Context: docs/finite_phantom.md (the long fans' 8-azimuth ray effect).

    python kernels/study_static_azimuths_mc.py --n-azimuth 16 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

CASES = ("water_j10", "water_j25", "water_j50", "slab_lung", "slab_bone")


def check_case(name: str, kernel) -> dict:
    """Depth-dose and profile checks of one reference case with ``kernel`` (the numbers of
    :func:`tomodose.evaluation.reference.compare_case`; slabs normalised at 15-25 mm as the tests do)."""
    from tomodose.evaluation.reference import (REFERENCE_DIR, compare_case, compare_depth_dose, engine_dose,
                                               load_reference)

    ref = load_reference(REFERENCE_DIR / f"{name}.h5")
    t0 = time.process_time()
    ev = engine_dose(ref, "collapsed_cone", kernel=kernel, progress=False)
    cpu = time.process_time() - t0
    res = compare_case(ref, ev)
    dd = compare_depth_dose(ref, ev, normalise_mm=(15.0, 25.0)) if name.startswith("slab") else res["depth_dose"]
    return {"abs_pct": round(dd["max_abs_beyond_pct"], 2), "mean_abs_pct": round(dd["mean_abs_beyond_pct"], 2),
            "rel_pct": round(dd["max_rel_beyond_pct"], 2), "cpu_s": round(cpu, 1),
            "profile_fails": [f"{k}: {v['n_fail']}" for k, v in res["profiles"].items() if v["n_fail"]]}


def main(argv=None) -> int:
    from tomodose.dose.engine import CCC_KERNEL_NAME
    from tomodose.transport.kernels import load_kernel

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-azimuth", type=int, default=16)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    kernel = load_kernel(CCC_KERNEL_NAME, n_azimuth=args.n_azimuth)
    out = {"n_azimuth": args.n_azimuth, "cases": {}}
    for name in args.cases.split(","):
        out["cases"][name] = check_case(name, kernel)
        print(name, json.dumps(out["cases"][name]), flush=True)
    if args.json:
        tmp = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp.write_text(json.dumps(out, indent=1), encoding="utf-8")
        tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
