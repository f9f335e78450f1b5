"""``tomodose batch``: run a study TOML (many cases, Dask) and write the summary table."""

from __future__ import annotations

def register(subparsers) -> None:
    p = subparsers.add_parser(
        "batch", help="run a study (phantoms x plans x delivery perturbations) on Dask",
        description="Reads a study TOML (format: docs/batch.md): a base case, grids and lists of cases "
                    "(phantom or volume, plan, TG-148 delivery perturbations: couch speed %, leaf latency ms, "
                    "jaw width mm, set-up shift mm LPS, gantry period %). Every case's dose (Gy), DVHs and "
                    "protocol verdicts go to <out>/cases/<content hash>.h5, the metrics to <out>/summary.csv. "
                    "Cases already finished (same content hash) are skipped; failures are retried, then "
                    "reported in the summary. Needs the 'batch' extra (dask[distributed], pandas).",
    )
    p.add_argument("study", help="study TOML file")
    p.add_argument("--out", default=None, help="output folder (default: the study's output, else <study>-results "
                                               "beside the TOML)")
    p.add_argument("--address", default=None, help="Dask scheduler address (default: start a LocalCluster)")
    p.add_argument("--workers", type=int, default=None, help="LocalCluster worker processes "
                                                             "(default: study [cluster] or cores // threads)")
    p.add_argument("--threads-per-worker", type=int, default=None,
                   help="numba threads per worker (default: study [cluster], else 1)")
    p.add_argument("--retries", type=int, default=None, help="extra attempts of a failing case (default: 2)")
    p.add_argument("--parquet", action="store_true", help="also write summary.parquet (needs pyarrow)")
    p.add_argument("--list", action="store_true", help="list the cases, their content hashes and whether they "
                                                       "are already finished; compute nothing")
    p.set_defaults(func=run)


def run(args) -> int:
    import importlib.util
    import sys
    from pathlib import Path

    from tomodose.batch import load_study, run_study
    from tomodose.batch.task import case_path, read_case_row

    study = load_study(args.study)
    out = Path(args.out) if args.out else Path(study.output_dir)
    missing = [m for m in ("distributed", "pandas") if importlib.util.find_spec(m) is None]
    if missing and not args.list:
        sys.stderr.write(f"tomodose batch: error: needs {', '.join(missing)}: "
                         "pip install 'tomodose[batch]' (dask[distributed], pandas)\n")
        return 2
    if args.list:
        for case in study.cases:
            h = study.case_hash(case)
            done = read_case_row(case_path(out, h), h) is not None
            print(f"{h[:16]}  {'finished' if done else 'pending ':8}  {case.name}")
        print(f"{len(study.cases)} cases; output folder {out}")
        return 0
    res = run_study(study, out, address=args.address, n_workers=args.workers,
                    threads_per_worker=args.threads_per_worker, retries=args.retries,
                    summary_formats=("csv", "parquet") if args.parquet else ("csv",))
    df = res.summary
    width = max(len(str(c)) for c in df["case"])
    for _, row in df.iterrows():
        verdict = row.get("verdict", "")
        verdict = "" if not isinstance(verdict, str) else verdict
        extra = row["error"] if row["status"] == "failed" else verdict
        print(f"{row['case']:<{width}}  {row['status']:<7}  {extra}")
    counts = ", ".join(f"{v} {k}" for k, v in res.counts.items() if v)
    print(f"study {study.name}: {counts} in {res.elapsed_s:.1f} s; summary {res.summary_path}")
    return 1 if res.counts.get("failed", 0) or res.counts.get("not run", 0) else 0
