#!/usr/bin/env python
"""Monte Carlo checks of the collapsed cone with and without the surface correction (issues 4, 8).

For one engine configuration (``--n-azimuth``: cones per ring of static beams, the calibration field
included, ``static_n_azimuth``; ``--surface``: ``surface_correction``) runs the checks of
``tests/test_mc_references.py`` / ``tests/test_mc_liver.py`` on the stored references: water depth
dose beyond d_max in Gy and normalised (1 %), profiles 2 %/1 mm, slabs normalised at 15-25 mm (3 %),
helical gamma 2 %/2 mm on 2 x 2 x 2 merged voxels (>= 98 %), and the outer-leaf share at the
calibration point (``reference_outer`` / ``water_j50`` at the centre, 12.5-17.5 mm deep; the Monte
Carlo gives 1.55 %). One JSON line per case, with the process CPU time.

    nice -n 10 python kernels/study_ccc_surface_mc.py --n-azimuth 16 --surface 1 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

CASES = ("water_j10", "water_j25", "water_j50", "slab_lung", "slab_bone", "outer", "helical_cylinder",
         "liver_helical")


def _central(ref, dose):
    """Mean dose at the calibration point volume (x, z in [-10, 10] mm, 12.5-17.5 mm deep)."""
    import numpy as np

    from tomodose.evaluation.reference import bins_within

    ix = bins_within(ref.x_edges_mm, -10.0, 10.0)
    iz = bins_within(ref.z_edges_mm, -10.0, 10.0)
    iy = bins_within(ref.y_edges_mm, -100.0 + 12.5, -100.0 + 17.5)
    w = np.einsum("k,j,i->kji", np.diff(ref.z_edges_mm)[iz], np.diff(ref.y_edges_mm)[iy], np.diff(ref.x_edges_mm)[ix])
    return float((dose[np.ix_(iz, iy, ix)] * w).sum() / w.sum())


def check_case(name: str, options: dict) -> dict:
    from tomodose.evaluation.reference import (HELICAL_MERGE, REFERENCE_DIR, compare_case, compare_depth_dose,
                                               compare_gamma, depth_normalisation_mm, engine_dose,
                                               load_reference)

    t0 = time.process_time()
    w0 = time.perf_counter()
    if name == "outer":
        ref_o = load_reference(REFERENCE_DIR / "reference_outer.h5")
        ref_c = load_reference(REFERENCE_DIR / "water_j50.h5")
        ev_o = engine_dose(ref_o, "collapsed_cone", progress=False, **options)
        ev_c = engine_dose(ref_c, "collapsed_cone", progress=False, **options)
        return {"engine_pct": round(100 * _central(ref_o, ev_o) / _central(ref_c, ev_c), 3),
                "mc_pct": round(100 * _central(ref_o, ref_o.dose_gy) / _central(ref_c, ref_c.dose_gy), 3),
                "cpu_s": round(time.process_time() - t0, 1), "wall_s": round(time.perf_counter() - w0, 1)}
    ref = load_reference(REFERENCE_DIR / f"{name}.h5")
    ev = engine_dose(ref, "collapsed_cone", progress=False, **options)
    cpu = time.process_time() - t0
    wall = time.perf_counter() - w0
    if "helical" in name:
        g = compare_gamma(ref, ev, dose_percent=2.0, distance_mm=2.0, cutoff_percent=10.0, merge=HELICAL_MERGE)
        return {"gamma_pass_pct": round(g.pass_rate_percent, 2), "cpu_s": round(cpu, 1), "wall_s": round(wall, 1)}
    profiles = compare_case(ref, ev)["profiles"]
    dd = compare_depth_dose(ref, ev, normalise_mm=depth_normalisation_mm(ref))  # as the tests normalise
    out = {"abs_pct": round(dd["max_abs_beyond_pct"], 2), "mean_abs_pct": round(dd["mean_abs_beyond_pct"], 2),
           "rel_pct": round(dd["max_rel_beyond_pct"], 2), "cpu_s": round(cpu, 1), "wall_s": round(wall, 1),
           "profile_fails": [f"{k}: {v['n_fail']}" for k, v in profiles.items() if v["n_fail"]],
           "diff_abs_by_depth": [[round(float(z), 1), round(float(v), 2)]
                                 for z, v, b in zip(dd["depth_mm"], dd["diff_abs_pct"], dd["beyond"]) if b]}
    if name.startswith("slab"):
        import hashlib

        out["reference_sha1"] = hashlib.sha1((REFERENCE_DIR / f"{name}.h5").read_bytes()).hexdigest()[:12]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-azimuth", type=int, default=8, help="static_n_azimuth (8 = the kernel's own)")
    ap.add_argument("--surface", type=int, choices=(0, 1), default=1)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--table", default=None, help="surface-correction table (default: the engine's SURFACE_TABLE)")
    args = ap.parse_args(argv)
    if args.table:
        from tomodose.dose import engine

        engine.SURFACE_TABLE = args.table  # a study of another shipped table (one per process)
    options = {"static_n_azimuth": None if args.n_azimuth == 8 else args.n_azimuth,
               "surface_correction": bool(args.surface)}
    out = {"n_azimuth": args.n_azimuth, "surface_correction": bool(args.surface), "table": args.table, "cases": {}}
    for name in args.cases.split(","):
        out["cases"][name] = check_case(name, options)
        print(name, json.dumps(out["cases"][name]), flush=True)
    if args.json:
        from tomodose._atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
