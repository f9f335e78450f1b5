#!/usr/bin/env python
"""Benchmark of the pencil-beam engine on the liver demo phantom (3 mm grid) and a water cylinder.

Reports (does not assert), for each phase: wall seconds, CPU seconds of the whole process (all
threads; the build machine is shared, so CPU / threads approximates the wall time on an idle
machine), the peak RSS of the process after the phase (a high-water mark: it only grows), and
voxel / projection / beamlet / entry counts:

* JIT warm-up (first calls on a tiny case: compilation, or loading the numba cache);
* the influence matrix (threshold, entries, memory) and its far-field complement;
* the full-plan pencil-beam dose in each mode: ``exact`` (per sample), ``windowed`` (per sample,
  windows + far field), ``clustered`` exact (samples of one beam orientation together) and the
  ``clustered`` fast path (levels + far-field step) and ``fluence`` (fluence maps per beam orientation +
  far-field step), the latter two twice each: first call, and a repeated
  call on the same patient and geometry (an optimiser's next evaluation: radiological depths cached);
  these use ``leaf_model="linear"`` (the influence matrix's model);
* ``fluence_beam``: the fluence path with the **default leaf model** (``leaf_model="beam"``: adjacent-leaf
  gain and the closed-leaf transmission), first and repeated call; ``clustered_beam``: its exact
  reference (``method="clustered"``, beam model; slow: ~3 CPU-minutes on the liver plan), against
  which ``fluence_beam``'s accuracy is reported;
* the accuracy of every approximate dose against the exact full-plan dose (``leaf_model="linear"``,
  so that the matrix is comparable): largest difference in % of the maximum (everywhere and inside
  the body), target mean difference, gamma pass rates (1 %/1 mm and 2 %/2 mm, global, 10 % cut-off,
  inside the body), and ``matrix @ sinogram`` of the threshold-0 check is in the tests.

Goals from the issue: influence matrix <= 30 s and <= 2 GiB on 2 cores; full-plan dose <= 1 s.

Usage::

    python benchmarks/bench_pencil_beam.py [--threads 2] [--spacing 3] [--modes exact,windowed,clustered,fast,fluence]
        [--fast-step 4] [--skip-matrix] [--skip-cylinder] [--no-voxel-average] [--no-medium-ends]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tomodose.benchmarking.harness import peak_rss_mib  # noqa: E402


class _Timer:
    """Wall, CPU and peak-RSS of a ``with`` block, stored under ``out[name + '_...']``."""

    def __init__(self, out, name):
        self.out, self.name = out, name

    def __enter__(self):
        self.c, self.t, self.m = time.process_time(), time.perf_counter(), time.thread_time()
        return self

    def __exit__(self, *exc):
        self.out[f"{self.name}_s"] = round(time.perf_counter() - self.t, 3)
        self.out[f"{self.name}_cpu_s"] = round(time.process_time() - self.c, 3)
        # CPU of the calling thread alone (serial Python + its share of the parallel loops): on an
        # idle machine the wall time is about this plus the waits for the other threads
        self.out[f"{self.name}_main_thread_cpu_s"] = round(time.thread_time() - self.m, 3)
        self.out[f"{self.name}_peak_rss_mib"] = round(peak_rss_mib(), 1)
        self.out[f"{self.name}_load_average"] = round(os.getloadavg()[0], 2)
        print(f"{self.name}: {self.out[f'{self.name}_s']:.2f} s wall, {self.out[f'{self.name}_cpu_s']:.2f} s CPU",
              file=sys.stderr, flush=True)


def _accuracy(dose, ref, grid, body, target=None, gamma=True):
    import numpy as np

    from tomodose.evaluation.gamma import gamma_index
    from tomodose.geometry.grid import ImageVolume

    diff = dose.astype(np.float64) - ref
    out = {"max_diff_pct_of_max": round(100 * float(np.abs(diff).max() / ref.max()), 3),
           "max_diff_in_body_pct_of_max": round(100 * float(np.abs(diff)[body].max() / ref.max()), 3)}
    if target is not None:
        out["target_mean_diff_pct"] = round(100 * float(diff[target].mean() / ref[target].mean()), 3)
    if gamma:
        s = 1.0 / ref.max()  # gamma wants Gy: any scale works for global criteria
        r = ImageVolume(grid, ref * s, "Gy", "dose")
        e = ImageVolume(grid, dose.astype(np.float64) * s, "Gy", "dose")
        for dp, dm in ((1.0, 1.0), (2.0, 2.0)):
            res = gamma_index(r, e, dose_percent=dp, distance_mm=dm, cutoff_percent=10.0, mask=body, progress=False)
            out[f"gamma_{dp:g}pct_{dm:g}mm_pass_pct"] = round(float(res.pass_rate_percent), 3)
    return out


def _plan_for(target, field_width, pitch):
    import numpy as np

    from tomodose.delivery.beams_eye import conformal_sinogram
    from tomodose.delivery.plan import HelicalPlan

    zs = target.grid.z_mm[np.flatnonzero(target.occupancy.any(axis=(1, 2)))]
    cx, cy = [float(v) for v in target.grid.index_to_lps(np.argwhere(target.occupancy > 0)).mean(axis=0)[:2]]
    plan = HelicalPlan.covering(lambda n, m: np.ones((n, m)), float(zs.max()), float(zs.min()),
                                field_width_mm=field_width, pitch=pitch, gantry_period_s=20.0,
                                isocentre_xy_mm=(cx, cy))
    return dataclasses.replace(plan, sinogram=conformal_sinogram(plan, target))


#: model options of every engine call (``--no-voxel-average``, ``--no-medium-ends``)
#: one model for every mode, so the modes compare (the local lateral scaling: the timings of before session 10)
MODEL_OPTIONS: dict = {"lateral_scaling": "local"}


def _modes_run(out, prefix, patient, plan, modes, fast_step, body, target):
    """Full-plan doses of the requested modes; the exact one (or clustered exact) is the reference."""
    from tomodose.transport.pencil_beam import pencil_beam_dose

    kw = dict(progress=False, **MODEL_OPTIONS)
    linear = dict(leaf_model="linear")
    beam = dict(leaf_model="beam")  # the default of pencil_beam_dose
    calls = {"exact": dict(method="exact", **linear), "clustered": dict(method="clustered", **linear),
             "windowed": dict(method="windowed", far_field_step=6, **linear),
             "fast": dict(method="clustered", far_field_step=fast_step, **linear),
             "fluence": dict(method="fluence", far_field_step=fast_step, **linear),
             "clustered_beam": dict(method="clustered", **beam),
             "fluence_beam": dict(method="fluence", far_field_step=fast_step, **beam)}
    doses = {}
    for m in ("exact", "clustered", "windowed", "fast", "fluence", "clustered_beam", "fluence_beam"):
        if m not in modes:
            continue
        out[f"{prefix}full_plan_{m}_leaf_model"] = calls[m]["leaf_model"]
        with _Timer(out, f"{prefix}full_plan_{m}"):
            doses[m] = pencil_beam_dose(patient, plan, **kw, **calls[m])
        if m in ("fast", "fluence", "fluence_beam"):
            # an optimiser's next evaluation: same patient and geometry (radiological depths cached)
            with _Timer(out, f"{prefix}full_plan_{m}_repeat"):
                again = pencil_beam_dose(patient, plan, **kw, **calls[m])
            out[f"{prefix}full_plan_{m}_repeat_identical"] = bool((again == doses[m]).all())
    ref_name = "exact" if "exact" in doses else ("clustered" if "clustered" in doses else None)
    if ref_name is not None:
        ref = doses[ref_name].astype("float64")
        out[f"{prefix}reference"] = ref_name
        for m, d in doses.items():
            if m != ref_name and not m.endswith("_beam"):
                out[f"{prefix}accuracy_{m}"] = _accuracy(d, ref, patient.grid, body, target,
                                                         gamma=(m not in ("exact", "clustered")))
    if "clustered_beam" in doses and "fluence_beam" in doses:
        out[f"{prefix}accuracy_fluence_beam"] = _accuracy(doses["fluence_beam"],
                                                          doses["clustered_beam"].astype("float64"), patient.grid,
                                                          body, target)
    return doses


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--threshold", type=float, default=None, help="default: the module default")
    ap.add_argument("--pitch", type=float, default=0.3)
    ap.add_argument("--field-width", type=float, default=25.0)
    ap.add_argument("--spacing", type=float, default=3.0)
    ap.add_argument("--target", default="PTV")
    ap.add_argument("--modes", default="exact,clustered,windowed,fast,fluence,fluence_beam",
                    help="full-plan modes to time (comma list of exact, clustered, windowed, fast, fluence "
                         "[leaf_model='linear'], fluence_beam, clustered_beam [the default leaf_model='beam'])")
    ap.add_argument("--fast-step", type=int, default=4, help="far-field step of the clustered fast path")
    ap.add_argument("--far-step", type=int, default=6, help="far-field complement of the matrix (0: skip)")
    ap.add_argument("--skip-matrix", action="store_true", help="skip the influence matrix")
    ap.add_argument("--matrix-method", default="clustered", choices=("clustered", "beamlet"),
                    help="influence_matrix(method=...)")
    ap.add_argument("--skip-cylinder", action="store_true", help="skip the water-cylinder accuracy check")
    ap.add_argument("--no-voxel-average", action="store_true",
                    help="voxel_average=False (profiles sampled at the voxel centres, the earlier model)")
    ap.add_argument("--no-medium-ends", action="store_true",
                    help="medium_ends=False (laterally infinite medium, the earlier model)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.no_voxel_average:
        MODEL_OPTIONS["voxel_average"] = False
    if args.no_medium_ends:
        MODEL_OPTIONS["medium_ends"] = False

    os.environ.setdefault("NUMBA_NUM_THREADS", str(args.threads))
    # tomodose.config first: it sets OMP_WAIT_POLICY=passive (unless given), which OpenMP reads when
    # numba starts its threads (set_num_threads below); later it has no effect
    from tomodose import config
    import numba
    import numpy as np

    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))

    from tomodose.delivery.plan import HelicalPlan
    from tomodose.geometry.structures import Structure, ellipsoid_mask
    from tomodose.phantoms.basic import cylinder_phantom, water_box
    from tomodose.phantoms.liver import liver_phantom
    from tomodose.transport.influence import DEFAULT_THRESHOLD, beamlet_weights, far_field_operator, influence_matrix
    from tomodose.transport.pencil_beam import pencil_beam_dose

    config.update(progress=False)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    threshold = DEFAULT_THRESHOLD if args.threshold is None else args.threshold
    out = {"threads": numba.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "threshold": threshold, "matrix_method": args.matrix_method, "field_width_mm": args.field_width,
           "pitch": args.pitch, "spacing_mm": args.spacing, "fast_step": args.fast_step, "model_options": MODEL_OPTIONS}

    # JIT warm-up on a tiny case (compilation, or loading numba's cache)
    small = water_box((60.0, 60.0, 40.0), 10.0)
    tgt_small = Structure("T", small.grid, ellipsoid_mask(small.grid, (0, 0, 0), (15, 15, 10)), role="target")
    tiny = HelicalPlan.covering(lambda n, m: np.ones((n, m)), 10, -10, field_width_mm=25.0, pitch=0.5,
                                gantry_period_s=20.0)
    with _Timer(out, "jit_warmup"):
        for kw in (dict(), dict(far_field_step=6), dict(method="clustered"),
                   dict(method="clustered", far_field_step=args.fast_step)):
            pencil_beam_dose(small, tiny, progress=False, **kw)
        if not args.skip_matrix:
            influence_matrix(small, tiny, target=tgt_small, threshold=threshold, progress=False,
                             method=args.matrix_method)
    if "fluence" in modes or "fluence_beam" in modes:
        # separately: the fluence-map kernels' compilation (or cache load)
        with _Timer(out, "jit_warmup_fluence"):
            pencil_beam_dose(small, tiny, progress=False, method="fluence", far_field_step=args.fast_step,
                             lateral_scaling="local")

    patient = liver_phantom(spacing_mm=args.spacing)
    target = patient.structures[args.target]
    plan = _plan_for(target, args.field_width, args.pitch)
    body = patient.mass_density_g_cm3 > 0.2
    tmask = target.mask
    out.update({"grid_shape": list(patient.grid.shape), "n_voxels": patient.grid.n_voxels,
                "n_body_voxels": int(body.sum()), "n_projections": plan.n_projections,
                "n_open_beamlets": int(np.count_nonzero(plan.sinogram))})
    print(f"liver: {out['grid_shape']} = {out['n_voxels']} voxels, {plan.n_projections} projections",
          file=sys.stderr, flush=True)

    doses = _modes_run(out, "", patient, plan, modes, args.fast_step, body, tmask)

    if not args.skip_matrix:
        with _Timer(out, "influence"):
            matrix, (p, l) = influence_matrix(patient, plan, target=target, threshold=threshold, progress=False,
                                              return_beamlets=True, method=args.matrix_method, **MODEL_OPTIONS)
        out["n_beamlets"] = int(matrix.shape[1])
        out["nnz"] = int(matrix.nnz)
        out["matrix_mib"] = round((matrix.data.nbytes + matrix.indices.nbytes + matrix.indptr.nbytes) / 2**20, 1)
        x = beamlet_weights(plan.sinogram, p, l)
        approx = (matrix @ x).reshape(patient.grid.shape)
        ref_name = out.get("reference")
        if ref_name:
            ref = doses[ref_name].astype(np.float64)
            out["accuracy_matrix"] = _accuracy(approx, ref, patient.grid, body, tmask, gamma=False)
        if args.far_step > 0:
            with _Timer(out, "far_field"):
                far = far_field_operator(patient, plan, matrix, p, l, step=args.far_step, progress=False,
                                         **MODEL_OPTIONS)
            out["far_field_nodes"] = int(far.node_flat.size)
            out["far_field_mib"] = round(far.values.nbytes / 2**20, 1)
            if ref_name:
                both = approx + far.dose(x).reshape(patient.grid.shape)
                out["accuracy_matrix_far"] = _accuracy(both, ref, patient.grid, body, tmask, gamma=False)
        del matrix

    if not args.skip_cylinder:
        cyl = cylinder_phantom(diameter_mm=300.0, length_mm=150.0, spacing_mm=args.spacing, inserts=())
        ctgt = Structure("T", cyl.grid, ellipsoid_mask(cyl.grid, (30.0, 0.0, 0.0), (40.0, 30.0, 35.0)),
                         role="target")
        cplan = _plan_for(ctgt, args.field_width, args.pitch)
        cbody = cyl.mass_density_g_cm3 > 0.2
        out.update({"cylinder_grid_shape": list(cyl.grid.shape), "cylinder_n_projections": cplan.n_projections})
        cmodes = [m for m in ("clustered", "fast", "fluence", "clustered_beam", "fluence_beam")
                  if m in modes or m == "clustered"]
        _modes_run(out, "cylinder_", cyl, cplan, cmodes, args.fast_step, cbody, ctgt.mask)

    print(json.dumps(out, indent=1))
    if args.json:
        tmp = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp.write_text(json.dumps(out, indent=1))
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
