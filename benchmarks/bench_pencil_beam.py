#!/usr/bin/env python
"""Benchmark of the pencil-beam engine on the liver demo phantom (3 mm grid).

Reports (does not assert): influence-matrix build time (wall and CPU seconds of all threads; the
machine may be shared, so CPU / threads approximates the wall time on an idle machine), peak memory (RSS high-water mark of the
process), voxel / beamlet / entry counts, the dose error of the thresholded matrix against the
full-plan dose, and the full-plan pencil-beam dose time (JIT compilation timed apart).

Goals from the issue: influence matrix <= 30 s and <= 2 GiB on 2 cores; full-plan dose <= 1 s.
Also timed: the far-field complement of the matrix and the fast full-plan mode (``--far-step``).

Usage::

    python benchmarks/bench_pencil_beam.py [--threads 2] [--threshold 0.01] [--pitch 0.3]
        [--field-width 25] [--spacing 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--threshold", type=float, default=None, help="default: the module default")
    ap.add_argument("--pitch", type=float, default=0.3)
    ap.add_argument("--field-width", type=float, default=25.0)
    ap.add_argument("--spacing", type=float, default=3.0)
    ap.add_argument("--target", default="PTV")
    ap.add_argument("--skip-full", action="store_true",
                    help="skip the exact full-plan dose (minutes on 2 cores) and the error checks")
    ap.add_argument("--far-step", type=int, default=6, help="far-field node step (0: skip the far field)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    os.environ.setdefault("NUMBA_NUM_THREADS", str(args.threads))
    import numba
    import numpy as np

    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))

    from tomodose import config
    from tomodose.delivery.beams_eye import conformal_sinogram
    from tomodose.delivery.plan import HelicalPlan
    from tomodose.phantoms.liver import liver_phantom
    from tomodose.transport.influence import DEFAULT_THRESHOLD, beamlet_weights, far_field_operator, influence_matrix
    from tomodose.transport.pencil_beam import pencil_beam_dose

    config.update(progress=False)
    threshold = DEFAULT_THRESHOLD if args.threshold is None else args.threshold
    patient = liver_phantom(spacing_mm=args.spacing)
    target = patient.structures[args.target]
    zs = target.grid.z_mm[np.flatnonzero(target.occupancy.any(axis=(1, 2)))]
    cx, cy = [float(v) for v in target.grid.index_to_lps(np.argwhere(target.occupancy > 0)).mean(axis=0)[:2]]
    plan = HelicalPlan.covering(lambda n, m: np.ones((n, m)), float(zs.max()), float(zs.min()),
                                field_width_mm=args.field_width, pitch=args.pitch, gantry_period_s=20.0,
                                isocentre_xy_mm=(cx, cy))
    sino = conformal_sinogram(plan, target)
    import dataclasses
    plan = dataclasses.replace(plan, sinogram=sino)
    out = {"grid_shape": list(patient.grid.shape), "n_voxels": patient.grid.n_voxels,
           "n_projections": plan.n_projections, "threads": numba.get_num_threads(), "threshold": threshold,
           "field_width_mm": args.field_width, "pitch": args.pitch}

    # JIT warm-up on a tiny case (compile time reported apart)
    from tomodose.phantoms.basic import water_box
    from tomodose.geometry.structures import Structure, ellipsoid_mask
    t = time.perf_counter()
    small = water_box((60.0, 60.0, 40.0), 10.0)
    tgt_small = Structure("T", small.grid, ellipsoid_mask(small.grid, (0, 0, 0), (15, 15, 10)), role="target")
    tiny = HelicalPlan.covering(lambda n, m: np.ones((n, m)), 10, -10, field_width_mm=25.0, pitch=0.5,
                                gantry_period_s=20.0)
    pencil_beam_dose(small, tiny, progress=False)
    influence_matrix(small, tiny, target=tgt_small, threshold=threshold, progress=False)
    out["jit_warmup_s"] = time.perf_counter() - t

    rss0 = _peak_rss_mib()
    c = time.process_time()
    t = time.perf_counter()
    matrix, (p, l) = influence_matrix(patient, plan, target=target, threshold=threshold, progress=False,
                                      return_beamlets=True)
    out["influence_s"] = time.perf_counter() - t
    out["influence_cpu_s"] = time.process_time() - c  # all threads; / threads = wall on an idle machine
    out["load_average_1min"] = os.getloadavg()[0]
    out["peak_rss_mib"] = _peak_rss_mib()
    out["peak_rss_before_mib"] = rss0
    out["n_beamlets"] = int(matrix.shape[1])
    out["nnz"] = int(matrix.nnz)
    out["matrix_mib"] = (matrix.data.nbytes + matrix.indices.nbytes + matrix.indptr.nbytes) / 2**20

    far = None
    if args.far_step > 0:
        c = time.process_time()
        t = time.perf_counter()
        far = far_field_operator(patient, plan, matrix, p, l, step=args.far_step, progress=False)
        out["far_field_s"] = time.perf_counter() - t
        out["far_field_cpu_s"] = time.process_time() - c
        out["far_field_nodes"] = int(far.node_flat.size)
        out["far_field_mib"] = far.values.nbytes / 2**20
        out["peak_rss_after_far_mib"] = _peak_rss_mib()

    fast = None
    if args.far_step > 0:
        c = time.process_time()
        t = time.perf_counter()
        fast = pencil_beam_dose(patient, plan, leaf_model="linear", far_field_step=args.far_step, progress=False)
        out["full_plan_fast_dose_s"] = time.perf_counter() - t
        out["full_plan_fast_dose_cpu_s"] = time.process_time() - c

    if not args.skip_full:
        c = time.process_time()
        t = time.perf_counter()
        full = pencil_beam_dose(patient, plan, leaf_model="linear", progress=False)
        out["full_plan_dose_s"] = time.perf_counter() - t
        out["full_plan_dose_cpu_s"] = time.process_time() - c
        approx = (matrix @ beamlet_weights(sino, p, l)).reshape(patient.grid.shape)
        m = target.mask
        out["matrix_error_max_rel_to_max"] = float(np.abs(approx - full).max() / full.max())
        out["matrix_error_target_mean_rel"] = float((approx - full)[m].mean() / full[m].mean())
        out["matrix_error_target_max_rel"] = float(np.abs(approx - full)[m].max() / full[m].mean())
        if fast is not None:
            out["fast_error_max_rel_to_max"] = float(np.abs(fast - full).max() / full.max())
            out["fast_error_target_mean_rel"] = float((fast - full)[m].mean() / full[m].mean())
        if far is not None:
            x = beamlet_weights(sino, p, l)
            both = approx + far.dose(x).reshape(patient.grid.shape)
            out["matrix_far_error_max_rel_to_max"] = float(np.abs(both - full).max() / full.max())
            out["matrix_far_error_target_mean_rel"] = float((both - full)[m].mean() / full[m].mean())
            out["matrix_far_error_target_max_rel"] = float(np.abs(both - full)[m].max() / full[m].mean())
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
