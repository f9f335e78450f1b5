"""Time one shared-direction transport of the liver plan in a fresh process (old vs new code).

Run once per (code, threads, configuration) so that every measurement starts alike: the first
call on a tiny grid (JIT compile or numba cache load) is timed separately, then the plan's
transport (TERMA from the ``.npy`` cache of ``benchmarks/ccc_study_shared.py``); prints one JSON
line: wall and process CPU time, peak resident memory above the start of the call.

    python benchmarks/ccc_timing.py --terma-cache /tmp/terma_pg.npy --threads 2 \\
        --config n_directions=128,coarse_factor=2,coarse_directions=256
    python benchmarks/ccc_timing.py --code-root /tmp/old --config n_directions=512   # an older checkout
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import sys
import time


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return float(line.split()[1]) / 1024.0
    return float("nan")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--terma-cache", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--config", default="n_directions=512")
    p.add_argument("--code-root", default=None, help="import tomodose from this folder (an older checkout)")
    p.add_argument("--first-call-only", action="store_true", help="time only the first call (with NUMBA_CACHE_DIR "
                   "set to an empty folder: the JIT compile time)")
    args = p.parse_args(argv)
    os.environ["NUMBA_NUM_THREADS"] = str(args.threads)
    if args.code_root:
        sys.path.insert(0, args.code_root)
    import numpy as np

    from tomodose.benchmarking import cases
    from tomodose.dose.engine import engine_kernel
    from tomodose.geometry.frames import beam_axes_patient
    from tomodose.geometry.grid import Grid
    from tomodose.transport.collapsed_cone import shared_direction_dose

    cfg = {}
    for item in filter(None, args.config.split(",")):
        k, _, v = item.partition("=")
        cfg[k] = int(v) if v.lstrip("-").isdigit() else float(v)
    patient = cases._patient(3.0)
    seq = cases._plan(patient).projections()
    kernel = engine_kernel()
    per_group = np.load(args.terma_cache, mmap_mode="r")
    with open(args.terma_cache + ".meta.pkl", "rb") as fh:
        meta = pickle.load(fh)
    keep = [g for g in range(meta["n_groups"]) if np.any(per_group[g] > 0)]
    beams = np.array([-beam_axes_patient(meta["group_angles_deg"][g], seq.patient_position)[2] for g in keep])
    stack = np.ascontiguousarray(per_group[keep])
    g4 = Grid((4, 4, 4), patient.grid.spacing_mm)
    w0, c0 = time.perf_counter(), _cpu_s()
    tiny = {k: v for k, v in cfg.items() if k != "coarse_directions"}
    tiny["n_directions"] = 8
    ones = np.ones((2,) + stack.shape[1:2] + (4, 4, 4), dtype=np.float32)  # non-zero: every kernel runs
    shared_direction_dose(ones, beams[:2], np.ones((4, 4, 4)), g4,
                          kernel=kernel, progress=False, **tiny)
    first = {"wall_s": time.perf_counter() - w0, "cpu_s": _cpu_s() - c0}
    if args.first_call_only:
        print(json.dumps({"code": args.code_root or "current", "threads": args.threads, "config": args.config,
                          "first_call": first, "numba_cache_dir": os.environ.get("NUMBA_CACHE_DIR")}), flush=True)
        return 0
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass
    base = _status_mib("VmRSS")
    w0, c0 = time.perf_counter(), _cpu_s()
    shared_direction_dose(stack, beams, patient.mass_density_g_cm3, patient.grid, kernel=kernel, progress=False, **cfg)
    out = {"code": args.code_root or "current", "threads": args.threads, "config": args.config,
           "first_call": first, "wall_s": time.perf_counter() - w0, "cpu_s": _cpu_s() - c0,
           "peak_rss_mib_above_start": _status_mib("VmHWM") - base, "load_average": os.getloadavg()[0]}
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
