"""The benchmark suite: ladders of grid sizes and plan lengths, thread scaling, peers.

:func:`run_suite` runs every case of :mod:`tomodose.benchmarking.cases` in a fresh process (see
:mod:`tomodose.benchmarking.harness`) on

* the **spacing ladder** (grid spacings, e.g. 8, 6, 4.5, 3 mm of the liver phantom; plan-based
  cases use a plan cut to ``ladder_rotations`` rotations so that only the voxel count grows),
  exponent fitted against the number of voxels;
* the **plan ladder** (number of gantry rotations at ``plan_spacing_mm``) for the plan-based cases,
  exponent fitted against the number of projections;
* **thread scaling**: selected cases at 1 thread and at every count of ``threads``;
* **peers** (:mod:`tomodose.benchmarking.peers`), only those installed, on the same inputs;
* optionally the **goals** of issue 9 (liver phantom at 3 mm, whole plan, all threads).

Results are written as ``benchmark.json`` and ``benchmark.md`` by
:func:`tomodose.benchmarking.harness.write_reports` with the fits, the thread speed-ups, the
peer ratios and the goals as extra sections.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass

import numpy as np

from tomodose.benchmarking.cases import CASES, PLAN_CASES
from tomodose.benchmarking.harness import CaseResult, fit_exponent, run_case, write_reports

log = logging.getLogger(__name__)

__all__ = ["SuiteConfig", "QUICK", "GOALS", "available_threads", "run_suite", "summarise"]


def available_threads() -> int:
    """Cores this process may use (affinity mask when the OS reports it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class SuiteConfig:
    """What the suite runs.

    Parameters
    ----------
    spacings_mm : tuple of float
        Spacing ladder (mm), coarse to fine.
    ladder_rotations : float
        Plan length (gantry rotations) of the plan-based cases on the spacing ladder.
    rotations : tuple of float
        Plan-length ladder (rotations); empty to skip.
    plan_spacing_mm : float
        Grid spacing of the plan ladder (mm).
    threads : tuple of int
        Thread counts of the thread-scaling runs (default 1 and all available cores).
    ladder_threads : int, optional
        Threads of the ladder, peer and goal runs (default the largest of ``threads``).
    thread_cases : tuple of str
        Cases measured at every thread count (at ``thread_spacing_mm``).
    thread_spacing_mm : float
        Grid spacing of the thread-scaling runs (mm).
    cases : tuple of str
        Cases to run (default all of :data:`~tomodose.benchmarking.cases.CASES`).
    plan_cases : tuple of str
        Cases on the plan ladder.
    peers : bool
        Run the installed peers.
    peer_spacings_mm : tuple of float
        Spacings of the peer comparisons (mm).
    repeats : int
        Warm repetitions per case (median reported).
    timeout_s : float
        Per case.
    """

    spacings_mm: tuple = (8.0, 6.0, 4.5, 3.0)
    ladder_rotations: float = 2.0
    rotations: tuple = (1.0, 2.0, 4.0, 8.0)
    plan_spacing_mm: float = 6.0
    threads: tuple = ()
    ladder_threads: int | None = None
    thread_cases: tuple = ("terma", "ccc_group", "pencil_beam_plan", "gamma")
    thread_spacing_mm: float = 4.5
    cases: tuple = tuple(CASES)
    plan_cases: tuple = PLAN_CASES
    peers: bool = False
    peer_spacings_mm: tuple = (8.0, 6.0)
    repeats: int = 3
    timeout_s: float = 1800.0
    goals: bool = False

    def __post_init__(self):
        unknown = sorted(set(self.cases) - set(CASES)) + sorted(set(self.plan_cases) - set(CASES))
        if unknown:
            raise ValueError(f"cases must be among {sorted(CASES)}, got unknown {unknown}")
        if not self.spacings_mm or any(float(s) <= 0 for s in self.spacings_mm):
            raise ValueError(f"spacings_mm must be positive spacings in mm, got {self.spacings_mm!r}")
        if any(float(r) <= 0 for r in self.rotations):
            raise ValueError(f"rotations must be positive, got {self.rotations!r}")
        if any(int(t) < 1 for t in self.threads):
            raise ValueError(f"threads must be positive integers, got {self.threads!r}")
        if int(self.repeats) < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats!r}")
        if not self.threads:
            n = available_threads()
            object.__setattr__(self, "threads", (1, n) if n > 1 else (1,))


#: Tiny sizes for the smoke test and ``tomodose benchmark --quick`` (well under a minute).
#: The ladders run on one thread (oversubscribed cores make numba's parallel loops erratic).
QUICK = SuiteConfig(spacings_mm=(20.0, 16.0), ladder_rotations=0.15, rotations=(0.15, 0.3),
                    plan_spacing_mm=20.0, ladder_threads=1, thread_cases=("terma",), thread_spacing_mm=16.0,
                    plan_cases=("terma",), peer_spacings_mm=(16.0,), repeats=1, timeout_s=300.0)

#: The configurations of the goals of issue 9: liver demo at 3 mm, whole plan, all threads.
GOALS = {
    "ccc_plan": {"size": 3.0, "params": {"fast": True}, "goal_s": 10.0,
                 "note": "FAST_CCC_OPTIONS (96 + 128 shared directions, long-range terms on <= 7 mm blocks)"},
    "pencil_beam_plan": {"size": 3.0, "params": {"method": "fluence", "lateral_scaling": "local"}, "goal_s": 1.0,
                         "note": "method='fluence' (the full-plan fast path) with the local lateral scaling (the goal's "
                                 "configuration; the default upstream scaling adds one sweep per angle group)"},
    "influence": {"size": 3.0, "params": {}, "goal_s": 30.0, "goal_mib": 2048.0},
    "gamma": {"size": 3.0, "params": {}, "goal_s": 2.0, "note": "goal is for 1 M voxels"},
}


def _target(name: str) -> str:
    return CASES[name][0]


def _run(name, size, params, threads, cfg: SuiteConfig, progress, peer="tomodose", target=None):
    log.info("benchmark %s (%s) size %s, %d thread(s)", name, peer, size, threads)
    r = run_case(name, target or _target(name), size, params=params, threads=threads, repeats=cfg.repeats,
                 timeout_s=cfg.timeout_s, peer=peer)
    if progress:
        progress(r)
    return r


def run_suite(config: SuiteConfig | None = None, *, progress=None) -> tuple[list[CaseResult], dict]:
    """Run the suite; return the results and the summary (fits, thread scaling, peers, goals).

    ``progress`` is an optional callable receiving each :class:`CaseResult` as it completes.
    """
    cfg = config or SuiteConfig()
    tmax = int(cfg.ladder_threads) if cfg.ladder_threads else max(cfg.threads)
    results: list[CaseResult] = []
    plan_based = {"terma", "ccc_group", "ccc_plan", "pencil_beam_plan", "influence"}

    for name in cfg.cases:
        for sp in cfg.spacings_mm:
            params = {"ladder": "spacing"}
            if name in plan_based:
                params["rotations"] = cfg.ladder_rotations
            r = _run(name, float(sp), params, tmax, cfg, progress)
            r.info["ladder"] = "spacing"
            results.append(r)
    for name in cfg.plan_cases:
        if name not in cfg.cases:
            continue
        for rot in cfg.rotations:
            r = _run(name, float(rot), {"ladder": "rotations", "spacing_mm": cfg.plan_spacing_mm}, tmax, cfg,
                     progress)
            r.info["ladder"] = "rotations"
            results.append(r)
    for name in cfg.thread_cases:
        if name not in cfg.cases:
            continue
        params = {"ladder": "spacing"}
        if name in plan_based:
            params["rotations"] = cfg.ladder_rotations
        for t in sorted(set(cfg.threads)):
            r = _run(name, float(cfg.thread_spacing_mm), params, int(t), cfg, progress)
            r.info["ladder"] = "threads"
            results.append(r)
    if cfg.peers:
        from tomodose.benchmarking import peers as peers_mod

        for peer in peers_mod.available_peers():
            for sp in cfg.peer_spacings_mm:
                ours, theirs = peers_mod.PEERS[peer]["cases"]
                for who, target in (("tomodose", ours), (peer, theirs)):
                    r = _run(peers_mod.PEERS[peer]["name"], float(sp), {}, tmax, cfg, progress, peer=who,
                             target=target)
                    r.info["ladder"] = "peer"
                    results.append(r)
    if cfg.goals:
        for name, goal in GOALS.items():
            if name not in cfg.cases:
                continue
            params = {"ladder": "spacing", **goal["params"]}
            r = _run(name, goal["size"], params, tmax, cfg, progress)
            r.info["ladder"] = "goal"
            results.append(r)
    return results, summarise(results, cfg)


def summarise(results: list[CaseResult], cfg: SuiteConfig | None = None) -> dict:
    """Exponent fits per case and ladder, thread speed-ups, peer ratios, goals."""
    fits: dict = {}
    for ladder, key in (("spacing", "n_voxels"), ("rotations", "n_projections")):
        names = sorted({r.name for r in results if r.info.get("ladder") == ladder})
        for name in names:
            rows = [r for r in results if r.name == name and r.info.get("ladder") == ladder and not r.error]
            x = [r.info.get(key, np.nan) for r in rows]
            fits.setdefault(name, {})[f"{ladder}: wall ~ {key}^b"] = round(
                fit_exponent(x, [r.wall_s for r in rows]), 3)
            if ladder == "spacing":
                fits[name]["spacing: peak RSS ~ n_voxels^b"] = round(
                    fit_exponent(x, [r.peak_rss_mib for r in rows]), 3)
    threads: dict = {}
    for name in sorted({r.name for r in results if r.info.get("ladder") == "threads"}):
        rows = {r.threads: r for r in results if r.name == name and r.info.get("ladder") == "threads"}
        base = rows.get(1)
        threads[name] = {
            f"{t} threads": {"wall_s": round(r.wall_s, 4),
                             "speed_up": round(base.wall_s / r.wall_s, 2) if base and r.wall_s > 0 else None}
            for t, r in sorted(rows.items())
        }
    peers: dict = {}
    for r in results:
        if r.info.get("ladder") != "peer" or r.peer == "tomodose":
            continue
        ours = next((o for o in results if o.info.get("ladder") == "peer" and o.peer == "tomodose"
                     and o.name == r.name and o.size == r.size), None)
        if ours is None:
            continue
        peers.setdefault(r.name, []).append({
            "size": r.size, "peer": r.peer, "tomodose_wall_s": ours.wall_s, "peer_wall_s": r.wall_s,
            "peer_over_tomodose": (r.wall_s / ours.wall_s) if ours.wall_s > 0 else None,
            "tomodose_info": ours.info, "peer_info": r.info, "peer_error": r.error,
        })
    goals: dict = {}
    for r in results:
        if r.info.get("ladder") != "goal":
            continue
        g = GOALS[r.name]
        goals[r.name] = {"wall_s": r.wall_s, "goal_s": g["goal_s"], "met": bool(r.wall_s <= g["goal_s"]),
                         "peak_rss_mib": r.peak_rss_mib, "threads": r.threads, "n_voxels": r.info.get("n_voxels")}
        if "note" in g:
            goals[r.name]["configuration"] = g["note"]
        if "goal_mib" in g:
            goals[r.name]["goal_mib"] = g["goal_mib"]
            goals[r.name]["memory_met"] = bool(r.peak_rss_mib <= g["goal_mib"])
    out = {"exponents": fits, "thread_scaling": threads, "peers": peers}
    if goals:
        out["goals"] = goals
    if cfg is not None:
        out["config"] = dataclasses.asdict(cfg)
    return out


def format_summary(summary: dict) -> str:
    """Plain-text lines of the fits, thread scaling, peer ratios and goals (for the CLI)."""
    lines = ["exponents (wall ~ size^b):"]
    for name, fits in summary.get("exponents", {}).items():
        lines.append("  " + name + ": " + ", ".join(f"{k} b={v}" for k, v in fits.items()))
    if summary.get("thread_scaling"):
        lines.append("thread scaling:")
        for name, rows in summary["thread_scaling"].items():
            lines.append("  " + name + ": " + ", ".join(
                f"{t}: {v['wall_s']:.4g} s (x{v['speed_up']})" for t, v in rows.items()))
    if summary.get("peers"):
        lines.append("peers (same inputs):")
        for name, rows in summary["peers"].items():
            for row in rows:
                ratio = row["peer_over_tomodose"]
                lines.append(f"  {name} [{row['size']}]: tomodose {row['tomodose_wall_s']:.4g} s, {row['peer']} "
                             f"{row['peer_wall_s']:.4g} s, ratio peer/tomodose "
                             f"{'n/a' if ratio is None else f'{ratio:.3g}'}"
                             + (f" (peer error: {row['peer_error']})" if row["peer_error"] else ""))
    if summary.get("goals"):
        lines.append("goals (issue 9):")
        for name, g in summary["goals"].items():
            lines.append(f"  {name}: {g['wall_s']:.4g} s (goal {g['goal_s']} s, {'met' if g['met'] else 'NOT met'}), "
                         f"peak RSS {g['peak_rss_mib']:.0f} MiB"
                         + (f" [{g['configuration']}]" if g.get("configuration") else ""))
    return "\n".join(lines)


def run_and_write(config: SuiteConfig | None, out_dir, *, progress=None) -> tuple[list[CaseResult], dict, tuple]:
    """:func:`run_suite` then :func:`~tomodose.benchmarking.harness.write_reports`."""
    from tomodose.benchmarking import peers as peers_mod

    results, summary = run_suite(config, progress=progress)
    extra = dict(summary)
    extra["peers_status"] = peers_mod.peer_status()
    paths = write_reports(results, out_dir, extra=extra)
    return results, summary, paths
