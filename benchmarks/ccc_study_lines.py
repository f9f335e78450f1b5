"""Line phases of the collapsed-cone transport against the Monte Carlo references (issue 4).

For every variant (``line_phases`` per lateral axis and phase layout) the static reference cases
are computed as ``tests/test_mc_references.py`` computes them (``engine_dose(ref,
"collapsed_cone", line_phases=n, static_supersample=f)``, calibration at the nominal condition with the same option)
and every check is printed: depth dose beyond d_max (absolute max / mean, normalised max),
profile points failing 2 %/1 mm per axis and depth, slab depth doses; plus the process CPU time
of the collapsed-cone transports (TERMA excluded) and the number of transports.

    nice -n 10 python benchmarks/ccc_study_lines.py --variants 1:product,2:product --out study.json

The variants are chosen by convergence (docs/collapsed_cone.md section 4f), never fitted to the
references: this script only reports.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import numpy as np

CASES = ("water_j10", "water_j25", "water_j50", "slab_lung", "slab_bone")


def _checks(name, ref, ev):
    from tomodose.evaluation.reference import compare_depth_dose, compare_profile

    out = {}
    if name.startswith("water"):
        dd = compare_depth_dose(ref, ev)
        fails = {}
        worst_dd = 0.0
        for axis in ("x", "z"):
            for depth in ref.analysis["profile_depths_mm"]:
                p = compare_profile(ref, ev, axis, depth, dose_percent=2.0, distance_mm=1.0)
                if p["n_fail"]:
                    fails[f"{axis}@{depth:g}"] = int(p["n_fail"])
                worst_dd = max(worst_dd, p["max_dd_in_field_pct"])
        out["profile_fails"] = fails
        out["profile_infield_max_dd_pct"] = worst_dd
    else:
        dd = compare_depth_dose(ref, ev, normalise_mm=(15.0, 25.0))
    out.update(abs_max=dd["max_abs_beyond_pct"], abs_mean=dd["mean_abs_beyond_pct"],
               rel_max=dd["max_rel_beyond_pct"], rel_mean=dd["mean_rel_beyond_pct"])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="1:product,2:product",
                    help="n:layout[:f],... (line phases per axis, layout product|diagonal, static_supersample f)")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--out", default=None, help="JSON lines appended here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import tomodose.transport.collapsed_cone as tcc
    from tomodose.dose import calibration
    from tomodose.evaluation.reference import REFERENCE_DIR, engine_dose, load_reference

    original_set = tcc.line_phase_set
    original_ccc = tcc.collapsed_cone_dose
    clock = {"cpu": 0.0, "wall": 0.0, "calls": 0}

    def timed_ccc(*a, **kw):
        c0, w0 = time.process_time(), time.perf_counter()
        try:
            return original_ccc(*a, **kw)
        finally:
            clock["cpu"] += time.process_time() - c0
            clock["wall"] += time.perf_counter() - w0
            clock["calls"] += 1

    tcc.collapsed_cone_dose = timed_ccc
    for spec in args.variants.split(","):
        parts = spec.split(":")
        n, layout = int(parts[0]), parts[1]
        f = int(parts[2]) if len(parts) > 2 else 1
        tcc.line_phase_set = lambda p, layout_=layout, _l=layout: original_set(p, _l)
        calibration._CACHE.clear()  # the calibration field uses the same phases
        for name in args.cases.split(","):
            ref = load_reference(REFERENCE_DIR / f"{name}.h5")
            clock.update(cpu=0.0, wall=0.0, calls=0)
            t0 = time.process_time()
            ev = engine_dose(ref, "collapsed_cone", progress=False, line_phases=n, static_supersample=f)
            row = {"variant": spec, "n_phase_pairs": len(original_set(n, layout)), "case": name,
                   "transport_cpu_s": round(clock["cpu"], 2), "transport_wall_s": round(clock["wall"], 2),
                   "transports": clock["calls"], "total_cpu_s": round(time.process_time() - t0, 2)}
            row.update(_checks(name, ref, ev))
            line = json.dumps(row)
            print(line, flush=True)
            if args.out:
                with open(args.out, "a") as fh:
                    fh.write(line + "\n")
    tcc.line_phase_set = original_set
    tcc.collapsed_cone_dose = original_ccc
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
