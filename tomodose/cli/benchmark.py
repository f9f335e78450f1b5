"""``tomodose benchmark``: the benchmark suite (wall time, JIT time, peak memory; peers)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)

HELP = """\
Run the benchmark suite on the synthetic liver phantom and write benchmark.json and
benchmark.md (machine, versions, git commit, one row per measurement).

Every case runs in a fresh process: the first call (JIT compile or cache load included), the
median of warm calls (wall), their difference (JIT) and the peak resident memory above the
process baseline are reported separately. Cases: terma, ccc_group (collapsed cone of one angle
group), ccc_plan (collapsed-cone plan dose), pencil_beam_plan, influence (pencil-beam influence
matrix), gamma (2 %/2 mm), dvh_protocol (DVHs + protocol evaluation).

Ladders: grid spacings (--sizes, mm; exponent of wall time against the voxel count) and plan
lengths (--rotations, gantry rotations; exponent against the number of projections); thread
scaling over --threads. --peers adds the installed peers on the same inputs (pymedphys gamma,
dicompyler-core DVH) with the ratio peer/tomodose. --goals adds the issue's goal runs (liver
phantom at 3 mm, whole plan: minutes, GiBs). Units: spacing mm, times s, memory MiB.

Examples:
  tomodose benchmark --quick --out bench-quick
  tomodose benchmark --sizes 8,6,4.5,3 --threads 1,2 --peers --out bench
"""


def _floats(text: str) -> tuple:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def _ints(text: str) -> tuple:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _names(text: str) -> tuple:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "benchmark", help="benchmark suite: wall/JIT time and peak memory per case, ladders, peers",
        description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes, 1 repeat (smoke run, < 1 min)")
    p.add_argument("--sizes", type=_floats, metavar="MM,MM,...", help="grid spacing ladder in mm (default 8,6,4.5,3)")
    p.add_argument("--rotations", type=_floats, metavar="N,N,...",
                   help="plan-length ladder in gantry rotations (default 1,2,4,8)")
    p.add_argument("--threads", type=_ints, metavar="N,N,...", help="thread counts (default 1 and all cores)")
    p.add_argument("--ladder-threads", type=int, metavar="N",
                   help="threads of the ladder, peer and goal runs (default the largest of --threads)")
    p.add_argument("--cases", type=_names, metavar="NAME,...", help="cases to run (default all)")
    p.add_argument("--repeats", type=int, metavar="N", help="warm repetitions per case (default 3)")
    p.add_argument("--peers", action="store_true", help="also run the installed peers on the same inputs")
    p.add_argument("--goals", action="store_true", help="also run the issue's goal configurations (3 mm, slow)")
    p.add_argument("--out", type=Path, default=Path("benchmark-results"), metavar="DIR",
                   help="output folder (default ./benchmark-results)")
    p.set_defaults(func=run)


def config_from_args(args):
    """The :class:`~tomodose.benchmarking.suite.SuiteConfig` of the parsed arguments."""
    from tomodose.benchmarking.suite import QUICK, SuiteConfig

    base = QUICK if args.quick else SuiteConfig()
    changes = {}
    if args.sizes:
        changes["spacings_mm"] = args.sizes
    if args.rotations:
        changes["rotations"] = args.rotations
    if args.threads:
        changes["threads"] = args.threads
    if args.ladder_threads is not None:
        if args.ladder_threads < 1:
            raise ValueError(f"--ladder-threads must be >= 1, got {args.ladder_threads}")
        changes["ladder_threads"] = args.ladder_threads
    elif args.threads:
        changes["ladder_threads"] = None
    if args.cases:
        changes["cases"] = args.cases
        changes["plan_cases"] = tuple(c for c in base.plan_cases if c in args.cases)
        changes["thread_cases"] = tuple(c for c in base.thread_cases if c in args.cases)
    if args.repeats is not None:
        if args.repeats < 1:
            raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
        changes["repeats"] = args.repeats
    changes["peers"] = bool(args.peers)
    changes["goals"] = bool(args.goals)
    return dataclasses.replace(base, **changes)


def run(args) -> int:
    from tomodose.benchmarking.suite import format_summary, run_and_write

    cfg = config_from_args(args)

    def show(r):
        if r.error:
            print(f"  {r.name:<20} {r.peer:<12} size {r.size:<6} threads {r.threads}: ERROR {r.error}", flush=True)
        else:
            print(f"  {r.name:<20} {r.peer:<12} size {r.size:<6} threads {r.threads}: wall {r.wall_s:9.4g} s  "
                  f"JIT {r.jit_s:7.3g} s  peak {r.peak_rss_mib:7.1f} MiB", flush=True)

    print(f"tomodose benchmark: spacings {list(cfg.spacings_mm)} mm, rotations {list(cfg.rotations)}, "
          f"threads {list(cfg.threads)}, repeats {cfg.repeats}{', peers' if cfg.peers else ''}"
          f"{', goals' if cfg.goals else ''}", flush=True)
    results, summary, (jpath, mpath) = run_and_write(cfg, args.out, progress=show)
    print(format_summary(summary))
    print(f"wrote {jpath} and {mpath}")
    failed = [r for r in results if r.error and r.peer == "tomodose"]
    if failed:
        sys.stderr.write(f"tomodose benchmark: {len(failed)} case(s) failed: "
                         + ", ".join(sorted({r.name for r in failed})) + "\n")
        return 1
    return 0
