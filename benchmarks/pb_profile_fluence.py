#!/usr/bin/env python
"""Stage profile of the pencil-beam fluence fast path (``method="fluence"``, default beam model) on
the liver plan of ``bench_pencil_beam.py`` (3 mm grid): process CPU and wall seconds per stage of a
first and of repeated calls.

Every numba kernel and the main Python steps that the fast path calls are wrapped in timers (by
replacing the module attributes the driver looks up at call time), so the split is exact for the
kernels and covers the Python glue in "rest". Works on any checkout: run it with
``PYTHONPATH=<tree>`` (the tree's ``tomodose`` is imported; this file only reads it).

Usage::

    python benchmarks/pb_profile_fluence.py [--threads 2] [--repeats 3] [--spacing 3] [--json out.json]
        [--no-stages] [--save-dose out.npy]

``--no-stages``: no wrappers (plain timings of the calls, as the benchmark).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

STAGES: dict = defaultdict(lambda: [0.0, 0.0, 0])


def _wrap(module, name, label=None):
    fn = getattr(module, name)
    label = label or name

    def timed(*a, **k):
        c, t = time.process_time(), time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            st = STAGES[label]
            st[0] += time.process_time() - c
            st[1] += time.perf_counter() - t
            st[2] += 1

    setattr(module, name, timed)


def _install():
    import tomodose._kernels.pb_fluence as kf
    import tomodose._kernels.pencil_beam as kp
    import tomodose.transport.pb_fluence as tf
    import tomodose.transport.pencil_beam as tp

    for name in ("fluence_profiles", "fluence_accumulate", "fluence_lookup", "coarse_lookup", "aperture_tables"):
        if hasattr(kf, name):
            _wrap(kf, name)
    for name in ("trilinear_add", "inplane_depth", "inplane_exit", "inplane_trace", "inplane_maps"):
        if hasattr(kp, name):
            _wrap(kp, name)
    for name in ("_resolve", "_leaf_weights"):
        _wrap(tp, name)
    for name in ("_fluence_geometry", "_window_rows", "_medium_ends", "_uniform_part"):
        if hasattr(tf, name):
            _wrap(tf, name, "py:" + name)
    _wrap(tp._Engine, "depth_map", "engine.depth_map (incl. trace)")
    _wrap(tp._Engine, "exit_map", "engine.exit_map (incl. trace)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--spacing", type=float, default=3.0)
    ap.add_argument("--no-stages", action="store_true")
    ap.add_argument("--leaf-model", default="beam")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--save-dose", type=Path, default=None)
    args = ap.parse_args(argv)
    os.environ.setdefault("NUMBA_NUM_THREADS", str(args.threads))
    from tomodose import config  # noqa: F401  (OMP_WAIT_POLICY before numba's threads start)
    import numba
    import numpy as np

    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_pencil_beam import _plan_for

    from tomodose.benchmarking.harness import peak_rss_mib
    from tomodose.delivery.plan import HelicalPlan
    from tomodose.phantoms.basic import water_box
    from tomodose.phantoms.liver import liver_phantom
    from tomodose.transport.pencil_beam import pencil_beam_dose

    config.update(progress=False)
    small = water_box((60.0, 60.0, 40.0), 10.0)
    tiny = HelicalPlan.covering(lambda n, m: np.ones((n, m)), 10, -10, field_width_mm=25.0, pitch=0.5,
                                gantry_period_s=20.0)
    c, t = time.process_time(), time.perf_counter()
    pencil_beam_dose(small, tiny, progress=False, method="fluence", far_field_step=4, lateral_scaling="local")
    out = {"tomodose": str(Path(sys.modules["tomodose"].__file__).parent), "threads": numba.get_num_threads(),
           "jit_s": round(time.perf_counter() - t, 3), "jit_cpu_s": round(time.process_time() - c, 3)}
    patient = liver_phantom(spacing_mm=args.spacing)
    plan = _plan_for(patient.structures["PTV"], 25.0, 0.3)
    if not args.no_stages:
        _install()
    calls = []
    dose0 = None
    for rep in range(args.repeats + 1):
        STAGES.clear()
        load = os.getloadavg()[0]
        c, t, m = time.process_time(), time.perf_counter(), time.thread_time()
        d = pencil_beam_dose(patient, plan, progress=False, method="fluence", far_field_step=4,
                             leaf_model=args.leaf_model, lateral_scaling="local")
        rec = {"wall_s": round(time.perf_counter() - t, 3), "cpu_s": round(time.process_time() - c, 3),
               "main_thread_cpu_s": round(time.thread_time() - m, 3), "load_before": round(load, 2),
               "peak_rss_mib": round(peak_rss_mib(), 1)}
        if not args.no_stages:
            tot = sum(v[0] for k, v in STAGES.items() if not k.startswith("engine.") and k not in
                      ("inplane_depth", "inplane_exit", "inplane_trace", "inplane_maps", "aperture_tables"))
            rec["stages_cpu_wall_calls"] = {k: [round(v[0], 3), round(v[1], 3), v[2]] for k, v in
                                            sorted(STAGES.items(), key=lambda kv: -kv[1][0])}
            rec["rest_cpu_s"] = round(rec["cpu_s"] - tot - sum(v[0] for k, v in STAGES.items()
                                                                   if k.startswith("engine.")), 3)
        if dose0 is None:
            dose0 = d
        else:
            rec["identical_to_first"] = bool((d == dose0).all())
        calls.append(rec)
        print(("first" if rep == 0 else f"repeat {rep}"), json.dumps(rec), file=sys.stderr, flush=True)
    out["calls"] = calls
    out["dose_max"] = float(dose0.max())
    print(json.dumps(out, indent=1))
    if args.save_dose:
        np.save(args.save_dose, dose0)
    if args.json:
        tmp = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp.write_text(json.dumps(out, indent=1))
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
