"""Accuracy/speed study of the shared-direction collapsed-cone transport of a helical plan.

Every candidate configuration of :func:`tomodose.transport.collapsed_cone.shared_direction_dose`
(shared directions, neighbours, coarse grid for the long-range kernel terms) transports the TERMA
of all angle groups of the liver demo plan (energy groups of the engine's kernel, as
``compute_dose`` does) and is compared with the reference mode (every kernel ring per angle group,
``tomodose.dose.engine._ccc_transport`` with ``shared_from_deg=None``): max |difference| in % of
the reference maximum (all voxels, and voxels above 50 % of it), gamma 1 %/1 mm and 2 %/2 mm
(global, 10 % cut-off), deposited energy ratio (dose x mass), wall and process CPU time, peak
resident memory of the call.

    python benchmarks/ccc_study_shared.py --terma-cache /tmp/terma_pg.npy --reference-cache /tmp/ref.npy \\
        --config n_directions=512 --config n_directions=256,coarse_factor=2,coarse_directions=512 --out study.json

``--terma-cache`` (``.npy`` of the (G, E, nz, ny, nx) TERMA, with ``<name>.meta.pkl`` beside it)
and ``--reference-cache`` are read when they exist and written otherwise (TERMA about 76 s,
reference transport several minutes on 2 idle cores). A configuration is a comma list of
``key=value`` keyword arguments of ``shared_direction_dose``.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import time

from tomodose.benchmarking.harness import parse_options, process_cpu_s


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _rss_mib(key: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return float(line.split()[1]) / 1024.0
    return float("nan")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spacing", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--terma-cache", default=None)
    p.add_argument("--reference-cache", default=None)
    p.add_argument("--config", action="append", default=[], help="key=value,... of shared_direction_dose (repeatable)")
    p.add_argument("--repeat", type=int, default=1, help="calls per configuration (the fastest is reported)")
    p.add_argument("--save-doses", default=None, help="folder to save each configuration's dose (.npy)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.threads:
        os.environ["NUMBA_NUM_THREADS"] = str(args.threads)
    import numba
    import numpy as np

    from tomodose.benchmarking import cases
    from tomodose.dose.engine import _ccc_transport, engine_kernel, terma_energy_edges_mev
    from tomodose.evaluation.gamma import gamma_index
    from tomodose.geometry.frames import beam_axes_patient
    from tomodose.geometry.grid import ImageVolume
    from tomodose.terma import BeamModel
    from tomodose.terma.terma import compute_terma
    from tomodose.transport.collapsed_cone import shared_direction_dose

    patient = cases._patient(args.spacing)
    plan = cases._plan(patient)
    seq = plan.projections()
    grid = patient.grid
    kernel = engine_kernel()
    if args.terma_cache and os.path.exists(args.terma_cache):
        per_group = np.load(args.terma_cache, mmap_mode="r")
        with open(args.terma_cache + ".meta.pkl", "rb") as fh:
            meta = pickle.load(fh)
    else:
        t0 = time.perf_counter()
        tr = compute_terma(patient, seq, BeamModel.default(), energy_group_edges_mev=terma_energy_edges_mev(kernel),
                           progress=False)
        print(f"TERMA {tr.per_group.shape}: {time.perf_counter() - t0:.1f} s", flush=True)
        per_group = tr.per_group
        meta = {"group_angles_deg": tr.group_angles_deg, "projection_group": tr.projection_group,
                "n_groups": tr.n_groups}
        if args.terma_cache:
            np.save(args.terma_cache, per_group)
            with open(args.terma_cache + ".meta.pkl", "wb") as fh:
                pickle.dump(meta, fh)
    keep = [g for g in range(meta["n_groups"]) if np.any(per_group[g] > 0)]
    beams = np.array([-beam_axes_patient(meta["group_angles_deg"][g], seq.patient_position)[2] for g in keep])
    stack = np.ascontiguousarray(per_group[keep])
    density = patient.mass_density_g_cm3
    mass = density.astype(np.float64)
    results = {"grid": list(grid.shape), "n_voxels": int(grid.n_voxels), "n_angle_groups": len(keep),
               "kernel": kernel.name, "n_terms": int(kernel.n_terms), "threads": numba.get_num_threads(),
               "configs": []}
    print(f"grid {grid.shape}, {len(keep)} angle groups, kernel {kernel.name} ({kernel.n_terms} terms), "
          f"{numba.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}", flush=True)

    if args.reference_cache and os.path.exists(args.reference_cache):
        ref = np.load(args.reference_cache)
    else:
        groups = []
        for g in range(meta["n_groups"]):
            mem = np.flatnonzero(meta["projection_group"] == g)
            groups.append((seq, np.asarray(per_group[g]), meta["group_angles_deg"][g], seq.couch_mm[mem],
                           seq.couch_travel_mm[mem]))
        w0, c0 = time.perf_counter(), process_cpu_s()
        ref = _ccc_transport(patient, groups, kernel=kernel, progress=False, shared_from_deg=None)
        print(f"reference (every ring per angle group): wall {time.perf_counter() - w0:.1f} s, "
              f"cpu {process_cpu_s() - c0:.1f} s", flush=True)
        results["reference"] = {"wall_s": time.perf_counter() - w0, "cpu_s": process_cpu_s() - c0}
        if args.reference_cache:
            np.save(args.reference_cache, ref)
    ref = np.asarray(ref, dtype=np.float64)
    ref_max = float(ref.max())
    ref_vol = ImageVolume(grid, ref.astype(np.float32), "Gy", "dose")
    # warm-up (JIT or cache load) on a tiny problem with every code path
    tiny = np.ones((2,) + stack.shape[1:2] + (4, 4, 4), dtype=np.float32)  # non-zero: every kernel runs
    from tomodose.geometry.grid import Grid

    g4 = Grid((4, 4, 4), grid.spacing_mm)
    shared_direction_dose(tiny, beams[:2], np.ones((4, 4, 4)), g4, kernel=kernel, n_directions=8, coarse_factor=2,
                          progress=False)

    for text in args.config:
        cfg = parse_options(text)
        best = None
        for _ in range(max(1, args.repeat)):
            _reset_peak()
            base = _rss_mib("VmRSS")
            w0, c0 = time.perf_counter(), process_cpu_s()
            dose = shared_direction_dose(stack, beams, density, grid, kernel=kernel, progress=False, **cfg)
            wall, cpu = time.perf_counter() - w0, process_cpu_s() - c0
            peak = _rss_mib("VmHWM") - base
            if best is None or wall < best[0]:
                best = (wall, cpu, peak)
        diff = np.abs(dose - ref) / ref_max
        new_vol = ImageVolume(grid, dose.astype(np.float32), "Gy", "dose")
        g11 = gamma_index(ref_vol, new_vol, dose_percent=1.0, distance_mm=1.0, cutoff_percent=10.0, progress=False)
        g22 = gamma_index(ref_vol, new_vol, dose_percent=2.0, distance_mm=2.0, cutoff_percent=10.0, progress=False)
        entry = {"config": cfg, "wall_s": best[0], "cpu_s": best[1], "peak_rss_mib_above_start": best[2],
                 "load_average": os.getloadavg()[0],
                 "max_diff_pct_of_max": 100 * float(diff.max()),
                 "max_diff_pct_of_max_above_50pct": 100 * float(diff[ref > 0.5 * ref_max].max()),
                 "gamma_1pct_1mm_pass_pct": float(g11.pass_rate_percent),
                 "gamma_2pct_2mm_pass_pct": float(g22.pass_rate_percent),
                 "energy_ratio": float((dose * mass).sum() / (ref * mass).sum())}
        results["configs"].append(entry)
        print("{cfg}: wall {wall_s:.1f} s, cpu {cpu_s:.1f} s, peak +{peak_rss_mib_above_start:.0f} MiB, load "
              "{load_average:.1f} | max diff {max_diff_pct_of_max:.2f} % ({max_diff_pct_of_max_above_50pct:.2f} % "
              "above 50 %), gamma 1/1 {gamma_1pct_1mm_pass_pct:.2f} %, 2/2 {gamma_2pct_2mm_pass_pct:.2f} %, "
              "energy {energy_ratio:.4f}".format(cfg=text, **entry), flush=True)
        if args.save_doses:
            os.makedirs(args.save_doses, exist_ok=True)
            np.save(os.path.join(args.save_doses, text.replace(",", "_").replace("=", "") + ".npy"),
                    dose.astype(np.float32))
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=1)
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
