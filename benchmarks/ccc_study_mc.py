"""Shared-direction collapsed-cone configurations against the Monte Carlo references.

For each configuration the engine dose of the stored ompMC cases is computed as the tests do
(``tomodose.evaluation.reference.engine_dose``) and compared: helical cases (``helical_cylinder``,
``liver_helical``) by gamma 2 %/2 mm (global, 10 % cut-off, 2 x 2 x 2 bins merged, as
``tests/test_mc_references.py`` / ``tests/test_mc_liver.py``) and, for the liver, the PTV mean
dose; static cases (``water_j50``, ``slab_lung``) by ``compare_depth_dose`` (their single-source
beams never use the shared transport, so the shared options must leave them unchanged).

A configuration is ``reference`` (every ring per angle group, the engine default) or a comma list
of ``key=value`` keyword arguments of ``shared_direction_dose`` (``n_directions``, ``neighbours``,
``coarse_factor``, ``coarse_rate_per_cm``, ``coarse_directions``), run through ``compute_dose``
with ``shared_from_deg=0``: the engine passes ``shared_directions`` as ``n_directions``; the
other options are injected by wrapping ``shared_direction_dose`` (until the engine takes them).

    python benchmarks/ccc_study_mc.py --config reference --config n_directions=128,coarse_factor=2,coarse_directions=256
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

from tomodose.benchmarking.harness import parse_options, process_cpu_s


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", action="append", default=[])
    p.add_argument("--cases", default="helical_cylinder,liver_helical,water_j50,slab_lung")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.threads:
        os.environ["NUMBA_NUM_THREADS"] = str(args.threads)
    import numpy as np

    import tomodose.transport.collapsed_cone as cc
    from tomodose.evaluation.reference import (HELICAL_MERGE, REFERENCE_DIR, compare_depth_dose, compare_gamma,
                                               engine_dose, load_reference)

    original = cc.shared_direction_dose
    results = {"configs": []}
    for text in args.config:
        cfg = {} if text == "reference" else parse_options(text)
        opts = {}
        if text != "reference":
            extra = {k: v for k, v in cfg.items() if k != "n_directions"}
            cc.shared_direction_dose = functools.partial(original, **extra)
            opts = {"shared_from_deg": 0.0, "shared_directions": int(cfg.get("n_directions", 512))}
        else:
            cc.shared_direction_dose = original
        entry = {"config": text, "cases": {}}
        for case in filter(None, args.cases.split(",")):
            ref = load_reference(REFERENCE_DIR / f"{case}.h5")
            w0, c0 = time.perf_counter(), process_cpu_s()
            ev = engine_dose(ref, "collapsed_cone", progress=False, **opts)
            res = {"wall_s": time.perf_counter() - w0, "cpu_s": process_cpu_s() - c0}
            if ref.analysis.get("type") == "helical":
                g = compare_gamma(ref, ev, dose_percent=2.0, distance_mm=2.0, cutoff_percent=10.0, merge=HELICAL_MERGE)
                res["gamma_2pct_2mm_pass_pct"] = float(g.pass_rate_percent)
                g1 = compare_gamma(ref, ev, dose_percent=1.0, distance_mm=1.0, cutoff_percent=10.0, merge=HELICAL_MERGE)
                res["gamma_1pct_1mm_pass_pct"] = float(g1.pass_rate_percent)
                if "PTV" in ref.patient().structures and ref.patient().grid.shape == ref.dose_gy.shape:
                    w = np.asarray(ref.patient().structures["PTV"].occupancy, dtype=np.float64)
                    mc = float((ref.dose_gy * w).sum() / w.sum())
                    res["ptv_mean_diff_pct"] = 100.0 * (float((ev * w).sum() / w.sum()) - mc) / mc
            else:
                kw = {"normalise_mm": (15.0, 25.0)} if case.startswith("slab") else {}
                dd = compare_depth_dose(ref, ev, **kw)
                res["depth_max_abs_beyond_pct"] = float(dd["max_abs_beyond_pct"])
                res["depth_max_rel_beyond_pct"] = float(dd["max_rel_beyond_pct"])
            entry["cases"][case] = res
            print(f"{text} | {case}: " + ", ".join(f"{k} {v:.3f}" for k, v in res.items()), flush=True)
        results["configs"].append(entry)
    cc.shared_direction_dose = original
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=1)
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
