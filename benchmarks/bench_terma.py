"""Benchmark of compute_terma on the helical liver plan of the collapsed-cone benchmark (standalone; not a test).

The case of ``benchmarks/bench_ccc.py`` / ``tomodose.benchmarking.cases``: liver phantom
(``liver_default``) on a ``--spacing`` grid, the demo's helical plan (25 mm jaw, pitch 0.287,
40 s rotation, conformal sinogram of the PTV), commissioned beam model, TERMA split by the energy
groups of the engine's collapsed-cone kernel (as ``compute_dose`` asks for it). Prints the JIT
time (first call on a tiny problem), then wall and process CPU time, peak resident memory and
the size of ``per_group`` for each ``--fluence-method``; with ``--compare`` (both methods), the
difference of the fast path from the exact one (max in % of the maximum, total and per angle
group, and gamma 1 %/1 mm).

    python benchmarks/bench_terma.py --threads 2                       # fast path ("maps")
    python benchmarks/bench_terma.py --threads 2 --fluence-method maps,exact --compare
    python benchmarks/bench_terma.py --threads 1 --cold                # JIT compile time too

On a machine shared with other jobs the wall time is not a property of the code: compare CPU
times measured in the same conditions.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from tomodose.benchmarking.harness import peak_rss_mib, process_cpu_s


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None, help="numba threads (default: all)")
    p.add_argument("--spacing", type=float, default=3.0, help="grid spacing of the liver phantom (mm)")
    p.add_argument("--subsamples", type=int, default=8)
    p.add_argument("--fluence-method", default="maps", help="comma list of maps, exact")
    p.add_argument("--compare", action="store_true", help="accuracy of maps against exact (needs both)")
    p.add_argument("--no-energy-groups", action="store_true", help="TERMA without the kernel's energy groups")
    p.add_argument("--cold", action="store_true", help="empty numba cache: measure the real JIT compile time")
    args = p.parse_args(argv)
    if args.threads:
        os.environ["NUMBA_NUM_THREADS"] = str(args.threads)
    if args.cold:
        import tempfile
        os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="tomodose-bench-numba-")
    import numba
    import numpy as np

    from tomodose.benchmarking import cases
    from tomodose.delivery.plan import ProjectionSequence
    from tomodose.dose.engine import engine_kernel, terma_energy_edges_mev
    from tomodose.geometry.grid import Grid, ImageVolume
    from tomodose.terma import BeamModel, compute_terma

    methods = [m.strip() for m in args.fluence_method.split(",") if m.strip()]
    bad = [m for m in methods if m not in ("maps", "exact")]
    if bad:
        p.error(f"--fluence-method must list 'maps' and/or 'exact', got {bad}")
    beam = BeamModel.default()
    print(f"numba threads: {numba.get_num_threads()}, python {sys.version.split()[0]}, "
          f"load average {os.getloadavg()[0]:.1f}")

    # JIT / cache-load time: first call of each path on a tiny helical problem
    g = Grid((3, 4, 4), (5.0, 5.0, 5.0), (-7.5, -7.5, -5.0))
    tiny = ImageVolume(g, np.ones(g.shape), "g/cm3", "mass_density")
    ps = ProjectionSequence(gantry_angle_deg=np.array([0.0, 360.0]), couch_mm=np.array([0.0, 5.0]),
                            leaf_open_fraction=np.ones((2, 64)), duration_s=np.ones(2), field_width_mm=25.0,
                            arc_deg=np.full(2, 7.0), couch_travel_mm=np.full(2, 1.0))
    what = "JIT compile" if args.cold else "JIT compile or cache load"
    for m in methods:
        t, c = time.perf_counter(), process_cpu_s()
        compute_terma(tiny, ps, beam, n_subsamples=2, energy_group_edges_mev=[0.0, 1.0, 100.0],
                      fluence_method=m, progress=False)
        print(f"first call [{m}] ({what}): wall {time.perf_counter() - t:.2f} s, cpu {process_cpu_s() - c:.2f} s")

    patient = cases._patient(args.spacing)
    seq = cases._plan(patient).projections()
    edges = None if args.no_energy_groups else terma_energy_edges_mev(engine_kernel())
    n_ge = 1 if edges is None else len(edges) - 1
    print(f"\nliver plan: grid {patient.grid.shape} = {patient.grid.n_voxels} voxels, {seq.n_projections} projections "
          f"x {args.subsamples} sub-samples, {n_ge} energy group(s)")
    results = {}
    for m in methods:
        rss0 = peak_rss_mib()
        t, c = time.perf_counter(), process_cpu_s()
        res = compute_terma(patient, seq, beam, n_subsamples=args.subsamples, energy_group_edges_mev=edges,
                            fluence_method=m, progress=False)
        wall, cpu = time.perf_counter() - t, process_cpu_s() - c
        results[m] = res
        print(f"TERMA [{m}]: wall {wall:.2f} s, cpu {cpu:.2f} s, {res.n_groups} angle groups, per_group "
              f"{res.per_group.nbytes / 2**20:.0f} MiB, peak RSS {peak_rss_mib():.0f} MiB (+{peak_rss_mib() - rss0:.0f}) "
              f"(load {os.getloadavg()[0]:.1f})")
    if args.compare and {"maps", "exact"} <= set(results):
        from tomodose.evaluation.gamma import gamma_index

        ex, mp = results["exact"], results["maps"]
        top = float(ex.total.max())
        d = np.abs(mp.total.astype(float) - ex.total)
        ge = ex.per_group.astype(float).reshape(ex.n_groups, n_ge, -1) if edges is not None else \
            ex.per_group.astype(float).reshape(ex.n_groups, 1, -1)
        gm = mp.per_group.astype(float).reshape(ge.shape)
        per_angle = np.abs(gm.sum(1) - ge.sum(1)).max(1) / ge.sum(1).max(1)
        per_cell = (np.abs(gm - ge).max(2) / np.maximum(ge.max(2), 1e-300)).max()
        gam = gamma_index(ImageVolume(patient.grid, ex.total, "Gy", "dose"), ImageVolume(patient.grid, mp.total, "Gy", "dose"),
                          dose_percent=1.0, distance_mm=1.0, cutoff_percent=10.0, progress=False)
        print(f"maps vs exact: total max |diff| {100 * d.max() / top:.4f} % of max; per angle group max "
              f"{100 * per_angle.max():.4f} % of the group's max (median {100 * np.median(per_angle):.4f} %); per "
              f"angle x energy group {100 * per_cell:.4f} %; gamma 1 %/1 mm {gam.pass_rate_percent:.3f} %; "
              f"sum ratio {mp.total.sum(dtype=float) / ex.total.sum(dtype=float):.6f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
