"""The 5 Gy x 10 liver protocol on several phantom configurations (target size, distance to the OARs).

Run: ``python examples/protocol_configurations.py [--spacing-mm 5] [--jobs 2] [--doc docs/optimisation.md]``.

Each configuration goes through the same pipeline as ``tomodose demo`` (:func:`tomodose.demo.plan_study`:
phantom -> optimised helical plan with collapsed-cone correction rounds -> collapsed-cone dose ->
normalisation by the coverage rule -> protocol evaluation). The script writes, in ``--out``:

* ``<configuration>.json``: every constraint (value, limits, margins, verdict), the pencil beam vs
  collapsed cone comparison, the optimiser's rounds, timings (wall and CPU), and the normal-liver
  dose budget (mean dose and volume of the normal liver inside the PGTV, inside the rest of the
  PTV, and in shells 0-10 mm, 10-20 mm, 20-30 mm and > 30 mm from the PTV);
* ``configurations.md``: the tables; with ``--doc`` they also replace the block between
  ``<!-- protocol-configurations:start -->`` and ``<!-- protocol-configurations:end -->`` in that file.

``--from-json`` rebuilds the tables from the JSON files without recomputing.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

CONFIGURATIONS = ("liver_default", "liver_small_far", "liver_near_stomach_heart", "liver_dome_lung", "liver_large")
START, END = "<!-- protocol-configurations:start -->", "<!-- protocol-configurations:end -->"
SHELLS_MM = (10.0, 20.0, 30.0)


def dose_budget(patient, dose, protocol) -> dict:
    """Normal-liver dose budget: volume (mL), mean dose (Gy) and share of the mean by region."""
    from scipy import ndimage

    s = patient.structures
    grid = patient.grid
    vv = grid.voxel_volume_ml
    d = dose.array
    liver, gtv, pgtv, ptv = (s[n].mask for n in ("Liver", "GTV", "PGTV", "PTV"))
    nl = liver & ~gtv
    dist = ndimage.distance_transform_edt(~ptv, sampling=tuple(grid.spacing_mm[::-1]))
    regions = {"in PGTV": nl & pgtv, "in PTV - PGTV": nl & ptv & ~pgtv}
    lo = 0.0
    for hi in SHELLS_MM:
        regions[f"{lo:g}-{hi:g} mm from PTV"] = nl & ~ptv & (dist > lo) & (dist <= hi)
        lo = hi
    regions[f"> {lo:g} mm from PTV"] = nl & ~ptv & (dist > lo)
    total_ml = float(nl.sum() * vv)
    out = {"normal_liver_ml": total_ml, "normal_liver_mean_gy": float(d[nl].mean()), "regions": {}}
    for name, m in regions.items():
        ml = float(m.sum() * vv)
        mean = float(d[m].mean()) if m.any() else 0.0
        out["regions"][name] = {"ml": ml, "mean_gy": mean, "share_of_nl_mean_gy": mean * ml / total_ml}
    prot = s["ProtectedLiver"].mask if "ProtectedLiver" in s else None
    if prot is not None and prot.any():
        out["protected_liver_ml"] = float(prot.sum() * vv)
        out["protected_liver_mean_gy"] = float(d[prot].mean())
    return out


def run_configuration(name: str, spacing_mm: float, out_dir: str) -> dict:
    """Plan, evaluate and record one configuration; writes ``<name>.json`` and returns its record."""
    from tomodose.demo import DemoConfig, plan_study

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name} %(name)s: %(message)s", force=True)
    t_wall, t_cpu = time.perf_counter(), time.process_time()
    commit, started = _commit(), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    result = plan_study(DemoConfig(phantom=name, spacing_mm=spacing_mm), progress=False)
    ev, summary = result["evaluation"], result["summary"]
    opt = summary.get("optimisation", {})
    record = {
        "configuration": name, "spacing_mm": spacing_mm, "commit": commit, "started": started,
        "verdict": ev.overall, "counts": ev.counts(),
        "constraints": [r.to_dict() for r in ev.results],
        "missing": summary["missing"],
        "structure_volumes_ml": {k: float(v) for k, v in summary["structure_volumes_ml"].items()},
        "normalisation_factor": summary["normalisation_factor"],
        "plan": summary["plan"],
        "pb_vs_ccc": summary.get("pb_vs_ccc", {}),
        "rounds": [{k: r.get(k) for k in ("round", "verdict", "counts", "tightest", "reweighted", "pb_vs_ccc",
                                          "normalisation_factor")} for r in opt.get("correction_rounds", [])],
        "selected_round": opt.get("selected_round"),
        "weight_factors": opt.get("weight_factors"),
        "deliverability": opt.get("deliverability"),
        "budget": dose_budget(result["patient"], result["dose"].total, result["protocol"]),
        "timings_s": {**summary["timings_s"], **{f"optimiser_{k}": v for k, v in opt.get("timings_s", {}).items()}},
        "wall_s": time.perf_counter() - t_wall, "cpu_s": time.process_time() - t_cpu,
    }
    path = Path(out_dir) / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1, default=_json_default))
    os.replace(tmp, path)
    return record


def _commit() -> str:
    """Short commit of the checkout (``+`` when the working tree has changes), or ""."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=here,
                              check=False).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=here, check=False).stdout.strip()
    except OSError:
        return ""
    return head + ("+" if head and dirty else "")


def _json_default(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)


def _num(v, nd=2) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.{nd}f}"


_SHORT = {"pass": "pass", "goal missed": "GOAL", "hard limit failed": "**FAIL**", "info": "info",
          "not evaluated": "n/e"}


def _limit(c) -> str:
    op = c["operator"] or ""
    parts = []
    if c["goal"] is not None:
        parts.append(f"goal {op} {c['goal']:g}")
    if c["hard"] is not None:
        parts.append(f"{op} {c['hard']:g}")
    return ", ".join(parts) + (f" {c['unit']}" if parts else "")


def _margin(c) -> str:
    """Margin to the hard limit (and to the goal in brackets), in the constraint's unit."""
    if c["margin_hard"] is None and c["margin_goal"] is None:
        return "-"
    text = _num(c["margin_hard"]) if c["margin_hard"] is not None else "-"
    if c["margin_goal"] is not None:
        text += f" ({_num(c['margin_goal'])})"
    return text


def tables(records: list[dict]) -> str:
    """Markdown: overview per configuration, then constraint x configuration (value, margin, verdict)."""
    lines = []
    lines.append("| configuration | GTV / PTV (mL) | verdict | tightest hard margins | PB model - CCC, PGTV mean | "
                 "correction rounds (selected) | plan: MF, period, time | wall / CPU (s) | code, run |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for r in records:
        cons = [c for c in r["constraints"] if c["margin_hard"] is not None and c["verdict"] != "info"]
        rel = []
        for c in cons:
            if c["unit"] == "%" and c["operator"] in (">", ">=") and c["hard"] < 100:
                rel.append((c["margin_hard"] / (100 - c["hard"]), c))
            else:
                rel.append((c["margin_hard"] / abs(c["hard"]), c))
        rel.sort(key=lambda t: t[0])
        tight = "; ".join(f"{c['id']} {_num(c['value'])} ({c['margin_hard']:+.2f} {c['unit']})" for _, c in rel[:3])
        pgtv = r["pb_vs_ccc"].get("PGTV", {})
        v = r["structure_volumes_ml"]
        plan = r["plan"]
        verdict = r["verdict"] if r["verdict"] != "hard limit failed" else "**FAIL**"
        lines.append(
            f"| {r['configuration']} | {v['GTV']:.0f} / {v['PTV']:.0f} | {verdict} | {tight} | "
            f"{_num(pgtv.get('model_minus_ccc_percent'), 1)} % (matrix only "
            f"{_num(pgtv.get('matrix_only_minus_ccc_percent'), 1)} %) | {len(r['rounds'])} ({r['selected_round']}) | "
            f"{plan['modulation_factor']:.2f}, {plan['gantry_period_s']:.1f} s, {plan['treatment_time_s']:.0f} s | "
            f"{r['wall_s']:.0f} / {r['cpu_s']:.0f} | {r.get('commit') or '-'}, {r.get('started') or '-'} |")
    lines.append("")
    names = [r["configuration"] for r in records]
    lines.append("Value, margin to the hard limit (margin to the goal) and verdict; margins are positive when met.")
    lines.append("")
    lines.append("| constraint | limit | " + " | ".join(names) + " |")
    lines.append("|---|---|" + "---|" * len(names))
    ids = [c["id"] for c in records[0]["constraints"]]
    by = [{c["id"]: c for c in r["constraints"]} for r in records]
    for cid in ids:
        c0 = by[0][cid]
        cells = []
        for b in by:
            c = b.get(cid)
            if c is None or c["value"] is None:
                cells.append("n/e")
            elif c["verdict"] == "info":
                cells.append(f"{_num(c['value'])}")
            else:
                cells.append(f"{_num(c['value'])}, {_margin(c)}, {_SHORT.get(c['verdict'], c['verdict'])}")
        lines.append(f"| {cid} | {_limit(c0) or 'info'} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Normal-liver dose budget (liver minus GTV): volume (mL), mean dose (Gy), and the region's share of "
                 "the normal-liver mean (Gy) = mean x volume / normal-liver volume.")
    lines.append("")
    regions = list(records[0]["budget"]["regions"])
    lines.append("| configuration | NL (mL) | NL mean | " + " | ".join(regions) + " | protected liver mL, mean |")
    lines.append("|---|---|---|" + "---|" * len(regions) + "---|")
    for r in records:
        b = r["budget"]
        cells = [f"{b['regions'][k]['ml']:.0f} mL, {b['regions'][k]['mean_gy']:.1f} Gy -> "
                 f"{b['regions'][k]['share_of_nl_mean_gy']:.1f}" for k in regions]
        prot = f"{b.get('protected_liver_ml', 0):.0f}, {_num(b.get('protected_liver_mean_gy'))}"
        lines.append(f"| {r['configuration']} | {b['normal_liver_ml']:.0f} | {b['normal_liver_mean_gy']:.2f} | "
                     + " | ".join(cells) + f" | {prot} |")
    lines.append("")
    return "\n".join(lines)


def update_doc(doc: Path, text: str, header: str) -> None:
    """Replace the block between the markers in ``doc`` (appended when absent), atomically."""
    old = doc.read_text() if doc.is_file() else ""
    block = f"{START}\n{header}\n\n{text}\n{END}"
    if START in old and END in old:
        new = old[:old.index(START)] + block + old[old.index(END) + len(END):]
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    tmp = doc.with_suffix(doc.suffix + ".tmp")
    tmp.write_text(new)
    os.replace(tmp, doc)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGURATIONS), help="phantom configurations")
    ap.add_argument("--spacing-mm", type=float, default=5.0, help="grid spacing (mm), as the demo")
    ap.add_argument("--jobs", type=int, default=1, help="configurations run in parallel (processes)")
    ap.add_argument("--out", default="protocol-configurations", help="output folder (JSON per configuration)")
    ap.add_argument("--doc", default=None, help="Markdown file whose marked block receives the tables")
    ap.add_argument("--from-json", action="store_true", help="only rebuild the tables from the JSON files")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.from_json:
        if args.jobs > 1:
            with ProcessPoolExecutor(max_workers=args.jobs) as pool:
                list(pool.map(run_configuration, args.configs, [args.spacing_mm] * len(args.configs),
                              [str(out)] * len(args.configs)))
        else:
            for name in args.configs:
                run_configuration(name, args.spacing_mm, str(out))
    records = [json.loads((out / f"{n}.json").read_text()) for n in args.configs if (out / f"{n}.json").is_file()]
    if not records:
        print("no results", file=sys.stderr)
        return 1
    spacings = sorted({r["spacing_mm"] for r in records})
    header = (f"Generated by `examples/protocol_configurations.py` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
              f"grid {', '.join(f'{x:g}' for x in spacings)} mm; column 'code, run': the commit each configuration ran "
              "on, '+' when the shared working tree had uncommitted changes, and when it started). Wall times were "
              "measured on a 2-core machine shared with ~20 other processes (load ~25): compare CPU times.")
    text = tables(records)
    (out / "configurations.md").write_text(header + "\n\n" + text)
    print(text)
    if args.doc:
        update_doc(Path(args.doc), text, header)
    return 0


if __name__ == "__main__":
    sys.exit(main())
