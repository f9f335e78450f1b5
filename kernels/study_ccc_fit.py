#!/usr/bin/env python
"""Study: exponential representation of the energy-group kernels vs narrow-field accuracy and cost.

For each variant of the exponential fit (shared rates for all groups as before version 1.4 of
``derive_ccc_kernels.py``, per-group rates, number of terms) this script

1. prints the fit quality of every energy group against its *tabulated* ring-collapsed
   cumulative kernel (largest error per ring, of the summed rings, and at r < 3 cm, all as a
   fraction of the group total);
2. runs the collapsed-cone engine (``tomodose.evaluation.reference.engine_dose``) on the stored
   ompMC references ``water_j10/j25/j50``, ``slab_lung``, ``slab_bone`` and prints the depth-dose
   max / mean beyond d_max (absolute and normalised), the profile points failing 2 % / 1 mm and
   the process CPU time of the engine per case;
3. times one transport of the heaviest angle group of the 3 mm liver plan (process CPU s).

Tables are derived by ``kernels/derive_ccc_kernels.py`` itself (``--out-dir`` a temporary folder).

Usage::

    nice -n 10 python kernels/study_ccc_fit.py [--variants nonneg-shared4,buildup-per-group4] [--no-cases] [--liver]
    nice -n 10 python kernels/study_ccc_fit.py --variants file:old.json,file:new.json \
        --cases water_j10,water_j25,water_j50,slab_lung,slab_bone,helical_cylinder,liver_helical

(``file:<path>``: an existing table, e.g. the shipped one before and after a change; the helical
cases print the gamma 2 %/2 mm pass rate on merged voxels as the tests compute it and, for the
liver, the PTV mean dose difference.)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tomodose.transport.kernels import CollapsedConeKernel, _model_matrix  # noqa: E402

WATER = ("water_j10", "water_j25", "water_j50")
SLABS = ("slab_lung", "slab_bone")


def _derive_module():
    spec = importlib.util.spec_from_file_location("derive_ccc_kernels", ROOT / "kernels" / "derive_ccc_kernels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def derive(variant: str, out_dir: Path, extra=()) -> CollapsedConeKernel:
    """Kernel table of a variant ``<fit>-shared<K>`` or ``<fit>-per-group<K>`` (3 groups, edges 1.0,
    2.5 MeV; fit ``nonneg`` = non-negative amplitudes as before version 1.4, ``buildup``)."""
    if variant.startswith("file:"):
        return CollapsedConeKernel.load(variant[5:])
    fit, rest = variant.split("-", 1)
    mode, k = ("shared", rest[6:]) if rest.startswith("shared") else ("per-group", rest[9:])
    argv = ["--group-edges-mev", "1.0,2.5", "--name", f"study_{variant}", "--out-dir", str(out_dir),
            "--group-rates", mode, "--n-terms", k, "--fit", fit, *extra]
    with contextlib.redirect_stdout(io.StringIO()):
        _derive_module().main(argv)
    return CollapsedConeKernel.load(out_dir / f"study_{variant}.json")


def tabulated_group_cumulatives(kernel: CollapsedConeKernel) -> np.ndarray:
    """(G, P, nR + 1) tabulated ring cumulatives of the energy groups (same recipe as the script)."""
    import _common
    from tomodose.transport.kernels import polyenergetic_kernel, terma_weights

    table, _ = read = _common.read_mono_table(_common.DEFAULT_SHARED, use_mc=True)
    del read
    mu_e, mu_v = _common.read_mu_water(None)
    s_e, s_w, _ = _common.default_spectrum_arrays()
    s_e, s_w = np.asarray(s_e, float), np.asarray(s_w, float)
    edges = kernel.group_edges_mev
    step = float(table.theta_edges_deg[1] - table.theta_edges_deg[0])
    ring_edges = [int(round(e / step)) for e in kernel.polar_edges_deg]
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (s_e >= lo) & (s_e < hi)
        fine = polyenergetic_kernel(table, terma_weights(table.energies_mev, s_e, np.where(sel, s_w, 0.0), mu_e, mu_v))
        rs = np.array([fine[a:b].sum(axis=0) for a, b in zip(ring_edges[:-1], ring_edges[1:])])
        out.append(np.concatenate([np.zeros((rs.shape[0], 1)), np.cumsum(rs, axis=1)], axis=1))
    return np.array(out)


def fit_report(kernel: CollapsedConeKernel, tab: np.ndarray) -> list[dict]:
    r = kernel.radius_edges_cm
    m = _model_matrix(r, kernel.rates_per_cm)
    rows = []
    for g in range(tab.shape[0]):
        fit = kernel.group_amplitudes[g] @ m.T
        tot = tab[g, :, -1].sum()
        d = (fit - tab[g]) / tot
        near = r <= 3.0
        rows.append({"group": g, "ring_max_pct": 100 * float(np.abs(d).max()),
                     "summed_max_pct": 100 * float(np.abs(d.sum(axis=0)).max()),
                     "summed_near_pct": [round(100 * float(v), 2) for v in d.sum(axis=0)[near]],
                     "forward_rings_near_pct": [round(100 * float(v), 2) for v in d[:3][:, near].sum(axis=0)]})
    return rows


def run_cases(kernel: CollapsedConeKernel, cases) -> dict:
    from tomodose.evaluation.reference import (REFERENCE_DIR, compare_depth_dose, compare_profile, engine_dose,
                                               load_reference)

    out = {}
    for name in cases:
        ref = load_reference(REFERENCE_DIR / f"{name}.h5")
        t = time.process_time()
        ev = engine_dose(ref, "collapsed_cone", kernel=kernel, progress=False)
        cpu = time.process_time() - t
        if ref.analysis.get("type") == "helical":
            from tomodose.evaluation.reference import HELICAL_MERGE, compare_gamma

            g = compare_gamma(ref, ev, dose_percent=2.0, distance_mm=2.0, cutoff_percent=10.0, merge=HELICAL_MERGE)
            row = {"gamma_2_2_pct": float(g.pass_rate_percent), "cpu_s": cpu}
            msg = f"  {name:16s} gamma 2 %/2 mm {g.pass_rate_percent:6.2f} %"
            if "PTV" in getattr(ref.patient(), "structures", {}):
                w = np.asarray(ref.patient().structures["PTV"].occupancy, dtype=np.float64)
                diff = 100.0 * ((np.asarray(ev) * w).sum() / (ref.dose_gy * w).sum() - 1.0)
                row["ptv_mean_diff_pct"] = float(diff)
                msg += f" | PTV mean {diff:+.2f} %"
            print(msg + f" | CPU {cpu:5.1f} s", flush=True)
            out[name] = row
            continue
        nm = (15.0, 25.0) if name.startswith("slab") else (90.0, 110.0)
        dd = compare_depth_dose(ref, ev, normalise_mm=nm)
        fails = 0
        n_pts = 0
        where = []
        if name in WATER:
            for axis in ("x", "z"):
                for depth in ref.analysis["profile_depths_mm"]:
                    p = compare_profile(ref, ev, axis, depth, dose_percent=2.0, distance_mm=1.0)
                    fails += p["n_fail"]
                    n_pts += p["dd_pct"].size
                    if p["n_fail"]:
                        where.append(f"{axis}@{depth:g} {p['n_fail']} pts")
        out[name] = {"abs_max": dd["max_abs_beyond_pct"], "abs_mean": dd["mean_abs_beyond_pct"],
                     "rel_max": dd["max_rel_beyond_pct"], "rel_mean": dd["mean_rel_beyond_pct"],
                     "profile_fails": fails, "profile_points": n_pts, "profile_where": ", ".join(where), "cpu_s": cpu,
                     "diff_abs_pct": [round(float(v), 2) for v in dd["diff_abs_pct"]],
                     "depth_mm": [float(v) for v in dd["depth_mm"]]}
        print(f"  {name:10s} abs max {dd['max_abs_beyond_pct']:5.2f} mean {dd['mean_abs_beyond_pct']:+5.2f} | "
              f"rel max {dd['max_rel_beyond_pct']:5.2f} mean {dd['mean_rel_beyond_pct']:+5.2f} | "
              f"profile fails {fails:3d}/{n_pts} ({', '.join(where)}) | CPU {cpu:5.1f} s", flush=True)
    return out


_LIVER = {}


def liver_group(spacing_mm: float = 3.0):
    """(terma (3, nz, ny, nx), density, grid, beam direction, source position) of the heaviest angle
    group of the benchmark liver plan, TERMA split by the 3 energy groups (1.0, 2.5 MeV)."""
    if spacing_mm not in _LIVER:
        from tomodose.benchmarking.cases import _problem
        from tomodose.dose.engine import engine_kernel, terma_energy_edges_mev
        from tomodose.geometry.frames import beam_axes_patient, source_position_patient
        from tomodose.terma.terma import compute_terma

        patient, plan = _problem(spacing_mm, "spacing", spacing_mm, None)
        seq = plan.projections()
        tr = compute_terma(patient, seq, energy_group_edges_mev=terma_energy_edges_mev(engine_kernel()),
                           progress=False)
        per = np.asarray(tr.per_group)
        g = int(np.argmax(per.reshape(per.shape[0], -1).sum(axis=1)))
        angle = float(tr.group_angles_deg[g])
        _, _, zg = beam_axes_patient(angle, seq.patient_position)
        src = source_position_patient(angle, float(np.mean(seq.couch_mm)), seq.isocentre_lps_mm, seq.machine.sad_mm,
                                      seq.patient_position)
        _LIVER[spacing_mm] = (np.ascontiguousarray(per[g], dtype=np.float64),
                              np.ascontiguousarray(patient.mass_density_g_cm3, dtype=np.float64), patient.grid,
                              -zg, np.asarray(src, dtype=np.float64))
    return _LIVER[spacing_mm]


def time_liver(kernel: CollapsedConeKernel, repeats: int = 3, spacing_mm: float = 3.0) -> dict:
    """min process CPU s (and wall s) of one transport of the heaviest liver angle group, TERMA per
    energy group: beam direction (the engine's rotational case) and tilted toward the source."""
    from tomodose.transport.collapsed_cone import collapsed_cone_dose

    terma, rho, grid, beam, src = liver_group(spacing_mm)
    out = {"grid": list(grid.shape)}
    for mode, kw in (("beam_direction", {"beam_direction": beam}), ("tilted", {"source_position_mm": src})):
        collapsed_cone_dose(terma, rho, grid, kernel=kernel, progress=False, **kw)  # JIT / warm-up
        cpu, wall = [], []
        for _ in range(repeats):
            t, w = time.process_time(), time.perf_counter()
            collapsed_cone_dose(terma, rho, grid, kernel=kernel, progress=False, **kw)
            cpu.append(time.process_time() - t)
            wall.append(time.perf_counter() - w)
        out[mode] = {"cpu_s": min(cpu), "wall_s": min(wall)}
        print(f"  liver {spacing_mm:g} mm {grid.shape} {mode}: CPU {min(cpu):.2f} s, wall {min(wall):.2f} s", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--variants", default="nonneg-shared4,buildup-shared4,buildup-shared5,buildup-per-group3,buildup-per-group4")
    ap.add_argument("--cases", default=",".join(WATER + SLABS))
    ap.add_argument("--no-cases", action="store_true")
    ap.add_argument("--liver", action="store_true", help="also time the liver transport (3 mm grid)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for v in args.variants.split(","):
            k = derive(v, Path(tmp))
            tab = tabulated_group_cumulatives(k)
            rep = fit_report(k, tab)
            print(f"{v}: rates {np.round(k.rates_per_cm, 4).tolist()}", flush=True)
            for row in rep:
                print(f"  group {row['group']}: ring max {row['ring_max_pct']:.2f} %, summed max "
                      f"{row['summed_max_pct']:.2f} %; summed r<=3 cm {row['summed_near_pct']}; "
                      f"rings 0-2 {row['forward_rings_near_pct']}")
            res = {"rates_per_cm": k.rates_per_cm.tolist(), "fit": rep}
            if not args.no_cases:
                res["cases"] = run_cases(k, args.cases.split(","))
            if args.liver:
                res["liver"] = time_liver(k)
            results[v] = res
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
