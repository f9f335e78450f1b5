"""Benchmark of compute_terma on a helical liver-like plan (standalone; not a test).

Prints JIT compile time, wall time, throughput (voxel-samples per second) and peak resident
memory for the liver phantom on a 3 mm grid, then how the time grows with the number of voxels
(grid spacing) and of projections / sub-samples.

    python benchmarks/bench_terma.py [--threads N] [--quick] [--cold] [--subsamples 8]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None, help="numba threads (default: all)")
    p.add_argument("--subsamples", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="skip the scaling series")
    p.add_argument("--cold", action="store_true", help="empty numba cache: measure the real JIT compile time")
    args = p.parse_args(argv)
    if args.threads:
        os.environ["NUMBA_NUM_THREADS"] = str(args.threads)
    if args.cold:
        import tempfile
        os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="tomodose-bench-numba-")
    import numba
    import numpy as np

    from tomodose.delivery.beams_eye import conformal_sinogram
    from tomodose.delivery.plan import HelicalPlan, ProjectionSequence
    from tomodose.geometry.grid import Grid, ImageVolume
    from tomodose.phantoms.liver import liver_phantom
    from tomodose.terma import BeamModel, compute_terma

    beam = BeamModel.default()
    print(f"numba threads: {numba.get_num_threads()}, python {sys.version.split()[0]}")

    # JIT / cache-load time: first call on a tiny problem
    t0 = time.perf_counter()
    g = Grid((2, 3, 3), (5.0, 5.0, 5.0), (-5.0, -5.0, -2.5))
    compute_terma(ImageVolume(g, np.ones(g.shape), "g/cm3", "mass_density"),
                  ProjectionSequence.static_beams([0.0], np.ones(64), 1.0, 25.0), beam, progress=False)
    t_jit = time.perf_counter() - t0
    what = "JIT compile" if args.cold else "JIT compile or cache load"
    print(f"first call ({what}): {t_jit:.2f} s")

    def plan_for(patient, fraction_of_projections=1.0):
        ptv = patient.structures["PTV"]
        zs = ptv.grid.z_mm[np.any(ptv.mask, axis=(1, 2))]
        base = HelicalPlan.covering(lambda n, m: np.ones((n, m)), float(zs.max()), float(zs.min()),
                                    field_width_mm=25.0, pitch=0.3, gantry_period_s=20.0,
                                    isocentre_xy_mm=(-65.0, -10.0))
        sino = conformal_sinogram(base, ptv)
        rng = np.random.default_rng(0)
        sino = sino * rng.uniform(0.2, 1.0, sino.shape)
        n = max(51, int(round(sino.shape[0] * fraction_of_projections)))
        return HelicalPlan(sinogram=sino[:n], field_width_mm=25.0, pitch=0.3, gantry_period_s=20.0,
                           couch_start_mm=base.couch_start_mm, isocentre_lps_mm=base.isocentre_lps_mm)

    def run(spacing, frac=1.0, nsub=args.subsamples, label=""):
        patient = liver_phantom(spacing_mm=spacing)
        plan = plan_for(patient, frac)
        t = time.perf_counter()
        c = _cpu_s()
        res = compute_terma(patient, plan, beam, n_subsamples=nsub, progress=False)
        wall = time.perf_counter() - t
        cpu = _cpu_s() - c
        nvox = patient.grid.n_voxels
        print(f"{label:>8} {spacing:4.1f} mm  grid {str(patient.grid.shape):>15} {nvox/1e6:5.2f} Mvox  "
              f"{plan.n_projections:4d} proj x {nsub} sub  groups {res.n_groups:2d}  wall {wall:7.1f} s  "
              f"cpu {cpu:7.1f} s  {nvox * plan.n_projections / cpu / 1e6:5.2f} Mvox-proj per cpu-s  "
              f"peak RSS {_peak_rss_mb():6.0f} MB  (load {os.getloadavg()[0]:.1f})")
        return wall

    print("\nfull helical liver plan (25 mm jaw, pitch 0.3, conformal modulated sinogram):")
    run(3.0, label="reference")
    if not args.quick:
        print("\nscaling with voxels (same plan):")
        for sp in (6.0, 4.5):
            run(sp, label="voxels")
        print("\nscaling with projections (3 mm grid):")
        for frac in (0.25, 0.5):
            run(3.0, frac=frac, label="proj")
        print("\nscaling with sub-samples (3 mm grid; attenuation traced once per projection):")
        for nsub in (1, 3):
            run(3.0, nsub=nsub, label="subsamp")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
