"""Benchmark of the helical collapsed-cone dose of the liver phantom plan (standalone; not a test).

Issue 4/9 goal: the full helical collapsed-cone dose of the liver demo plan on a 3 mm grid in
<= 10 s on 2 cores after JIT warm-up. This script reports, separately:

* JIT: the first call of each kernel on a tiny grid (compile, or load from numba's cache);
* TERMA of the whole plan (``compute_terma``, 51 angle groups) - or loaded from ``--terma-cache``;
* one angle group (the heaviest): all 88 cones, and the forward rings alone;
* the transport of the whole plan for each ``--modes`` entry: ``reference`` (every ring per
  angle group, 51 x 88 transports) and ``shared`` (``shared_from_deg`` / ``shared_directions``:
  rings at least that far from the beam share one direction set over all angle groups), with
  the time per angle group, the peak resident memory and, for ``shared``, its accuracy against
  the reference (max difference in % of the maximum, gamma 1 %/1 mm, deposited energy ratio).

Wall and process CPU time are both printed: on a machine shared with other jobs the wall time
is not a property of the code.

    python benchmarks/bench_ccc.py                          # 3 mm, both modes, TERMA 8 sub-samples
    python benchmarks/bench_ccc.py --spacing 6 --subsamples 1 --terma-cache /tmp/terma6.pkl
    python benchmarks/bench_ccc.py --modes shared --shared-from-deg 0 --shared-directions 512
    python benchmarks/bench_ccc.py --threads 2 --out ccc.json
    python benchmarks/bench_ccc.py --modes shared --shared-directions 128 --coarse-factor 2 --coarse-directions 256

Since 2026-11-29 the script uses the engine's kernel (``--kernel engine``: 5 energy groups, TERMA
split by energy as ``compute_dose`` does); ``--kernel default`` gives the single polyenergetic
kernel its earlier numbers were measured with. ``--coarse-factor`` etc. set the multi-resolution
options of the shared transport (``docs/collapsed_cone.md`` section 2a).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import time

from tomodose.benchmarking.harness import peak_rss_mib, process_cpu_s


class _Timer:
    def __enter__(self):
        self.w0, self.c0 = time.perf_counter(), process_cpu_s()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.w0
        self.cpu = process_cpu_s() - self.c0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spacing", type=float, default=3.0, help="grid spacing of the liver phantom (mm)")
    p.add_argument("--threads", type=int, default=None, help="numba threads (default: all)")
    p.add_argument("--subsamples", type=int, default=8, help="TERMA sub-samples per projection")
    p.add_argument("--terma-cache", default=None,
                   help="pickle of the TERMA result: read if it exists, written otherwise")
    p.add_argument("--modes", default="reference,shared", help="comma list of reference, shared")
    p.add_argument("--shared-from-deg", type=float, default=0.0)
    p.add_argument("--shared-directions", type=int, default=512)
    p.add_argument("--coarse-factor", type=int, default=1,
                   help="shared mode: long-range kernel terms on a grid this many times coarser (1 = off)")
    p.add_argument("--coarse-directions", type=int, default=None,
                   help="shared mode: direction set of the coarse grid (default --shared-directions)")
    p.add_argument("--coarse-rate-per-cm", type=float, default=1.0,
                   help="shared mode: terms with a rate below this (1/cm) go to the coarse grid")
    p.add_argument("--kernel", choices=("engine", "default"), default="engine",
                   help="engine: compute_dose's kernel (5 energy groups, TERMA split by energy as the engine "
                        "does); default: the single polyenergetic kernel (what this script used before "
                        "2026-11-29 07:45 UTC)")
    p.add_argument("--cold", action="store_true", help="empty numba cache: measure the real JIT compile time")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.threads:
        os.environ["NUMBA_NUM_THREADS"] = str(args.threads)
    if args.cold:
        import tempfile

        os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="tomodose-bench-numba-")
    import functools

    import numba
    import numpy as np

    from tomodose.benchmarking import cases
    import tomodose.transport.collapsed_cone as cc
    from tomodose.dose.engine import _ccc_transport, _terma_groups, engine_kernel, terma_energy_edges_mev
    from tomodose.evaluation.gamma import gamma_index
    from tomodose.geometry.frames import beam_axes_patient
    from tomodose.geometry.grid import Grid, ImageVolume
    from tomodose.terma import BeamModel
    from tomodose.terma.terma import compute_terma
    from tomodose.transport import load_kernel
    from tomodose.transport.collapsed_cone import collapsed_cone_dose, shared_direction_dose

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("reference", "shared")]
    if bad:
        p.error(f"--modes must list 'reference' and/or 'shared', got {bad}")
    shared_kw = {"shared_from_deg": args.shared_from_deg, "shared_directions": args.shared_directions}
    if args.coarse_factor > 1:
        shared_kw_print = {**shared_kw, "coarse_factor": args.coarse_factor,
                           "coarse_directions": args.coarse_directions or args.shared_directions,
                           "coarse_rate_per_cm": args.coarse_rate_per_cm}
    else:
        shared_kw_print = shared_kw
    results: dict = {"spacing_mm": args.spacing, "threads": numba.get_num_threads(), "python": sys.version.split()[0],
                     "numba": numba.__version__, "load_average_start": os.getloadavg()[0], "cases": {}}
    print(f"numba threads: {numba.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")

    # --- JIT: first calls on a tiny grid ------------------------------------------------------
    kernel = engine_kernel() if args.kernel == "engine" else load_kernel()
    terma_kw = {"energy_group_edges_mev": terma_energy_edges_mev(kernel)} if kernel.n_groups else {}
    results["kernel"] = kernel.name
    coarse_kw = {"coarse_factor": args.coarse_factor, "coarse_directions": args.coarse_directions,
                 "coarse_rate_per_cm": args.coarse_rate_per_cm}
    # the engine passes shared_directions as n_directions; the coarse options are injected here
    cc.shared_direction_dose = functools.partial(shared_direction_dose, **coarse_kw)
    g = Grid((4, 5, 6), (3.0, 3.0, 3.0))
    n_e = max(1, kernel.n_groups)
    t_tiny = np.ones((2, n_e) + g.shape) if kernel.n_groups else np.ones((2,) + g.shape)
    with _Timer() as t:
        collapsed_cone_dose(t_tiny[0], np.ones(g.shape), g, beam_direction=(0, 1, 0), kernel=kernel, progress=False)
        collapsed_cone_dose(t_tiny[0], np.ones(g.shape), g, source_position_mm=(0, -850, 0), kernel=kernel,
                            progress=False)
        shared_direction_dose(t_tiny, [[0, 1, 0], [1, 0, 0]], np.ones(g.shape), g, kernel=kernel, n_directions=8,
                              progress=False, **{**coarse_kw, "coarse_directions": None})
    what = "JIT compile" if args.cold else "JIT compile or cache load"
    print(f"first calls ({what}): wall {t.wall:.2f} s, cpu {t.cpu:.2f} s")
    results["jit"] = {"wall_s": t.wall, "cpu_s": t.cpu, "cold": bool(args.cold)}

    # --- problem --------------------------------------------------------------------------------
    rss0 = peak_rss_mib()
    patient = cases._patient(args.spacing)
    plan = cases._plan(patient)
    seq = plan.projections()
    tr = None
    if args.terma_cache and args.terma_cache.endswith(".npy") and os.path.exists(args.terma_cache):
        # benchmarks/ccc_study_shared.py's cache: the per-group TERMA and <name>.meta.pkl
        import types

        with open(args.terma_cache + ".meta.pkl", "rb") as fh:
            tr = types.SimpleNamespace(per_group=np.load(args.terma_cache), **pickle.load(fh))
        print(f"TERMA loaded from {args.terma_cache}")
    elif args.terma_cache and os.path.exists(args.terma_cache):
        with open(args.terma_cache, "rb") as fh:
            tr = pickle.load(fh)
        tr = tr["tr"] if isinstance(tr, dict) else tr
        print(f"TERMA loaded from {args.terma_cache}")
    else:
        with _Timer() as t:
            tr = compute_terma(patient, seq, BeamModel.default(), n_subsamples=args.subsamples, progress=False,
                               **terma_kw)
        print(f"TERMA ({seq.n_projections} projections x {args.subsamples} sub-samples, {tr.n_groups} groups): "
              f"wall {t.wall:.1f} s, cpu {t.cpu:.1f} s")
        results["terma"] = {"wall_s": t.wall, "cpu_s": t.cpu, "n_subsamples": args.subsamples}
        if args.terma_cache:
            with open(args.terma_cache, "wb") as fh:
                pickle.dump(tr, fh, protocol=4)
    grid = patient.grid
    print(f"grid {grid.shape} = {grid.n_voxels} voxels, {seq.n_projections} projections, {tr.n_groups} angle groups")
    results.update(shape=list(grid.shape), n_voxels=int(grid.n_voxels), n_projections=int(seq.n_projections),
                   n_angle_groups=int(tr.n_groups))
    groups = _terma_groups(seq, tr)
    density = patient.mass_density_g_cm3

    # --- one angle group (the heaviest) ---------------------------------------------------------
    heaviest = int(np.argmax(tr.per_group.reshape(tr.n_groups, -1).sum(axis=1)))
    _, _, zg = beam_axes_patient(tr.group_angles_deg[heaviest], seq.patient_position)
    for label, rings in (("all rings", None), (f"rings < {args.shared_from_deg:g} deg",
                                                np.flatnonzero(kernel.polar_deg < args.shared_from_deg))):
        if rings is not None and rings.size == 0:
            continue
        with _Timer() as t:
            collapsed_cone_dose(tr.per_group[heaviest], density, grid, beam_direction=-zg, rings=rings,
                                kernel=kernel, progress=False)
        n_cones = kernel.n_azimuth * (kernel.n_polar if rings is None else rings.size)
        print(f"one angle group, {label} ({n_cones} cones): wall {t.wall:.2f} s, cpu {t.cpu:.2f} s, "
              f"{1e9 * t.cpu / (n_cones * grid.n_voxels):.1f} cpu-ns per voxel-cone")
        results["cases"][f"group_{label}"] = {"wall_s": t.wall, "cpu_s": t.cpu, "n_cones": int(n_cones)}

    # --- whole plan ------------------------------------------------------------------------------
    doses = {}
    for mode in modes:
        kw = {} if mode == "reference" else shared_kw
        timings: dict = {}
        with _Timer() as t:
            dose = _ccc_transport(patient, groups, kernel=kernel, progress=False, timings=timings, **kw)
        doses[mode] = dose
        per_group = np.asarray(timings.get("per_group_s", []))
        entry = {"options": shared_kw_print if mode == "shared" else kw, "wall_s": t.wall, "cpu_s": t.cpu,
                 "n_transported_groups": int(timings["n_transports"]),
                 "per_group_wall_s_mean": float(per_group.mean()) if per_group.size else 0.0,
                 "shared_wall_s": float(timings.get("shared_s", 0.0)),
                 "peak_rss_mib_above_start": peak_rss_mib() - rss0, "load_average": os.getloadavg()[0]}
        results["cases"][f"plan_{mode}"] = entry
        print(f"plan transport [{mode} {entry['options']}]: wall {t.wall:.1f} s, cpu {t.cpu:.1f} s; per angle group "
              f"{entry['per_group_wall_s_mean']:.2f} s wall; shared part {entry['shared_wall_s']:.1f} s wall; "
              f"peak RSS +{entry['peak_rss_mib_above_start']:.0f} MiB (load {entry['load_average']:.1f})")
    if "reference" in doses and "shared" in doses:
        ref, new = doses["reference"].astype(np.float64), doses["shared"].astype(np.float64)
        diff = np.abs(new - ref) / ref.max()
        gam = gamma_index(ImageVolume(grid, doses["reference"], "Gy", "dose"), ImageVolume(grid, doses["shared"], "Gy", "dose"),
                          dose_percent=1.0, distance_mm=1.0, cutoff_percent=10.0, progress=False)
        acc = {"max_diff_percent_of_max": 100 * float(diff.max()),
               "max_diff_percent_of_max_above_50pct": 100 * float(diff[ref > 0.5 * ref.max()].max()),
               "gamma_1pct_1mm_pass_percent": float(gam.pass_rate_percent),
               "energy_ratio": float(new.sum() / ref.sum())}
        results["accuracy_shared_vs_reference"] = acc
        print("shared vs reference: max diff {max_diff_percent_of_max:.2f} % of max ({max_diff_percent_of_max_above_50pct:.2f} % "
              "above 50 %), gamma 1 %/1 mm {gamma_1pct_1mm_pass_percent:.2f} %, energy ratio {energy_ratio:.5f}".format(**acc))
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=1)
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
