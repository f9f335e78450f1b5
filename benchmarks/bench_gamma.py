#!/usr/bin/env python
"""Benchmark: tomodose gamma index against ``pymedphys.gamma`` on the same 3-D inputs.

Standalone script (not collected by pytest)::

    python benchmarks/bench_gamma.py                 # 100^3 = 1 M voxels, 2 %/2 mm, cut-off 10 %
    python benchmarks/bench_gamma.py --n 40 --threads 2 --json out.json
    python benchmarks/bench_gamma.py --no-pymedphys  # tomodose only

Reported: numba compile time (fresh cache folder) and cache-load time apart from the steady
state; steady-state wall time (best of ``--repeat``); peak memory of Python-level allocations
(tracemalloc: NumPy buffers, which is where both implementations keep their data) and the
process' peak RSS; pass rates of both and their difference; gamma map agreement.

Case: a smooth "helical-like" dose on an ``n^3`` grid of 2.5 mm voxels: a high-dose ellipsoidal
target with penumbra (Gaussian-blurred), a low-dose bath and an organ-sparing notch.
Evaluated dose: the same shifted by ``--shift`` mm along x, scaled by ``--scale`` and with 0.5 %
Gaussian noise (fixed seed). Settings are matched: same dose/distance criteria, cut-off,
global normalisation (max reference), search step DTA/10 (pymedphys ``interp_fraction=10``),
maximum search radius = ``max_gamma`` x DTA.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_case(n: int, spacing_mm: float, shift_mm: float, scale: float, seed: int = 3):
    from scipy.ndimage import gaussian_filter

    from tomodose.geometry.grid import Grid, ImageVolume

    grid = Grid((n, n, n), (spacing_mm,) * 3, (0.0, 0.0, 0.0))
    c = 0.5 * spacing_mm * (n - 1)

    def dose(dx):
        x, y, z = grid.meshgrid_mm()
        x = x - dx
        r = ((x - c) / (0.3 * c)) ** 2 + ((y - c) / (0.22 * c)) ** 2 + ((z - c) / (0.35 * c)) ** 2
        target = (r <= 1.0).astype(float)
        notch = ((x - c - 0.18 * c) ** 2 + (y - c) ** 2) <= (0.12 * c) ** 2
        target = np.where(notch, 0.55 * target, target)
        bath = 0.25 * np.exp(-(((x - c) / (0.7 * c)) ** 2 + ((y - c) / (0.6 * c)) ** 2))
        return 2.0 * (gaussian_filter(target, sigma=6.0 / spacing_mm) + bath)

    # the shift is applied analytically (sub-voxel), then noise
    rng = np.random.default_rng(seed)
    ref = dose(0.0)
    ev = scale * dose(shift_mm)
    ev = np.clip(ev + rng.normal(0.0, 0.01 * ref.max(), ev.shape), 0.0, None)
    return grid, ImageVolume(grid, ref, "Gy", "dose"), ImageVolume(grid, ev, "Gy", "dose")


def measure(fn):
    """Wall time and tracemalloc peak (MiB) of ``fn()``."""
    tracemalloc.start()
    t0 = time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return out, wall, peak / 2**20


def first_call_seconds(cache_dir: str | None) -> float:
    """Seconds for a fresh interpreter to run a tiny gamma (compile or cache load)."""
    code = (
        "import time, numpy as np\n"
        "from tomodose.geometry.grid import Grid, ImageVolume\n"
        "g = Grid((6, 6, 6), (2.0, 2.0, 2.0))\n"
        "a = ImageVolume(g, np.random.default_rng(0).uniform(1, 2, g.shape), 'Gy')\n"
        "from tomodose.evaluation.gamma import gamma_index\n"
        "t = time.perf_counter(); gamma_index(a, a.with_array(a.array * 1.01));"
        "print(time.perf_counter() - t)\n"
    )
    env = dict(os.environ)
    if cache_dir:
        env["NUMBA_CACHE_DIR"] = cache_dir
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100, help="voxels per side (default 100: 1 M voxels)")
    p.add_argument("--spacing", type=float, default=2.5, help="voxel size in mm")
    p.add_argument("--dd", type=float, default=2.0, help="dose criterion (%%)")
    p.add_argument("--dta", type=float, default=2.0, help="distance criterion (mm)")
    p.add_argument("--cutoff", type=float, default=10.0, help="low-dose cut-off (%%)")
    p.add_argument("--max-gamma", type=float, default=2.0, help="search radius / DTA")
    p.add_argument("--local", action="store_true", help="local gamma")
    p.add_argument("--shift", type=float, default=1.5, help="shift of the evaluated dose (mm)")
    p.add_argument("--scale", type=float, default=1.03, help="scale of the evaluated dose")
    p.add_argument("--threads", type=int, default=None, help="numba threads (default: all)")
    p.add_argument("--repeat", type=int, default=3, help="steady-state repetitions (best of)")
    p.add_argument("--no-pymedphys", action="store_true", help="skip pymedphys")
    p.add_argument("--json", type=Path, help="write the results as JSON")
    args = p.parse_args(argv)

    import numba

    if args.threads:
        numba.set_num_threads(args.threads)
    from tomodose.evaluation.gamma import gamma_index

    with tempfile.TemporaryDirectory() as tmp:
        compile_s = first_call_seconds(tmp)
        cache_load_s = first_call_seconds(tmp)

    grid, ref, ev = make_case(args.n, args.spacing, args.shift, args.scale)
    crit = dict(dose_percent=args.dd, distance_mm=args.dta, cutoff_percent=args.cutoff,
                local=args.local, max_search_radius_mm=args.max_gamma * args.dta,
                search_step_mm=args.dta / 10)
    gamma_index(ref, ev, **crit, progress=False)  # warm (JIT already cached)
    walls = []
    for _ in range(args.repeat):
        ours, wall, peak_ours = measure(lambda: gamma_index(ref, ev, **crit, progress=False))
        walls.append(wall)
    result = {
        "n_voxels": grid.n_voxels,
        "shape": list(grid.shape),
        "spacing_mm": args.spacing,
        "criteria": ours.criteria.label,
        "max_gamma": args.max_gamma,
        "threads": numba.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "tomodose": {
            "compile_s": compile_s,
            "cache_load_first_call_s": cache_load_s,
            "wall_s": min(walls),
            "walls_s": walls,
            "peak_traced_mib": peak_ours,
            "n_evaluated": ours.n_evaluated,
            "pass_rate_percent": ours.pass_rate_percent,
        },
    }
    if not args.no_pymedphys:
        try:
            import pymedphys
        except ImportError:
            print("pymedphys not installed: skipped (pip install pymedphys)", file=sys.stderr)
        else:
            axes = (grid.z_mm, grid.y_mm, grid.x_mm)
            theirs, wall_p, peak_p = measure(
                lambda: pymedphys.gamma(
                    axes, ref.array, axes, ev.array, args.dd, args.dta,
                    lower_percent_dose_cutoff=args.cutoff, interp_fraction=10,
                    max_gamma=args.max_gamma, local_gamma=args.local,
                )
            )
            valid = ~np.isnan(theirs)
            ours_v = np.minimum(ours.gamma.array[valid], args.max_gamma)
            pr = 100.0 * float(np.mean(theirs[valid] <= 1.0))
            diff = np.abs(ours_v - theirs[valid])
            result["pymedphys"] = {
                "version": pymedphys.__version__,
                "wall_s": wall_p,
                "peak_traced_mib": peak_p,
                "n_evaluated": int(valid.sum()),
                "pass_rate_percent": pr,
            }
            result["comparison"] = {
                "speed_ratio": wall_p / min(walls),
                "pass_rate_difference_pp": ours.pass_rate_percent - pr,
                "same_evaluated_voxels": bool(np.array_equal(valid, ~np.isnan(ours.gamma.array))),
                "gamma_abs_diff_median": float(np.median(diff)),
                "gamma_abs_diff_p99": float(np.percentile(diff, 99)),
                "pass_fail_disagreement_percent": 100.0 * float(np.mean((ours_v <= 1) != (theirs[valid] <= 1))),
            }
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
