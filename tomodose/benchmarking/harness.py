"""Benchmark harness: wall time, JIT compile time and peak memory measured separately.

Each case runs in a fresh child process (``multiprocessing`` spawn context) so that its JIT
compilation and its peak resident memory are its own:

* ``first_call_s`` — the first call, compile included;
* ``wall_s`` — median of ``repeats`` warm calls (steady state);
* ``jit_s`` — ``first_call_s - wall_s`` (compile and first-touch cost);
* ``peak_rss_mib`` — peak resident set size of the child above its baseline before the case
  was set up (``resource.getrusage``; includes numba's allocations, which ``tracemalloc``
  cannot see).

A case is a module-level function ``setup(size, **params) -> (callable, info_dict)``; the
callable runs the work. Results are plain dicts, written as JSON and a Markdown table.
"""

from __future__ import annotations

import importlib
import json
import logging
import multiprocessing as mp
import os
import platform
import queue as queue_mod
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tomodose._atomic import atomic_write_text

log = logging.getLogger(__name__)

__all__ = ["CaseResult", "run_case", "fit_exponent", "machine_description", "write_reports", "peak_rss_mib",
           "process_cpu_s", "parse_options"]


@dataclass
class CaseResult:
    """One measured case."""

    name: str
    size: str
    threads: int
    first_call_s: float
    wall_s: float
    jit_s: float
    peak_rss_mib: float
    info: dict = field(default_factory=dict)
    peer: str = "tomodose"
    error: str | None = None


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (MiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024.0 if sys.platform != "darwin" else peak / 2**20


def process_cpu_s() -> float:
    """User + system CPU time of this process, all threads (s)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def parse_options(text: str) -> dict:
    """``"key=value,key=value"`` -> dict, each value an int when it reads as one, else a float
    (the ``--config`` strings of the benchmark scripts)."""
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, _, value = item.partition("=")
        try:
            out[key.strip()] = int(value)
        except ValueError:
            out[key.strip()] = float(value)
    return out


def _child(queue, target: str, size, params: dict, threads: int, repeats: int):
    try:
        os.environ["NUMBA_NUM_THREADS"] = str(threads)
        os.environ.setdefault("TOMODOSE_PROGRESS", "0")
        module_name, func_name = target.split(":")
        setup = getattr(importlib.import_module(module_name), func_name)
        base = peak_rss_mib()
        work, info = setup(size, **params)
        t0 = time.perf_counter()
        work()
        first = time.perf_counter() - t0
        times = []
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            work()
            times.append(time.perf_counter() - t0)
        wall = float(np.median(times))
        queue.put({"first_call_s": first, "wall_s": wall, "jit_s": max(0.0, first - wall),
                   "peak_rss_mib": max(0.0, peak_rss_mib() - base), "info": info})
    except BaseException as exc:  # report, never hang the parent
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def run_case(name: str, target: str, size, *, params: dict | None = None, threads: int = 1,
             repeats: int = 3, timeout_s: float = 900.0, peer: str = "tomodose") -> CaseResult:
    """Run ``target`` (``"module:setup_function"``) for ``size`` in a fresh process."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, target, size, params or {}, threads, repeats))
    proc.start()
    out = None
    deadline = time.monotonic() + timeout_s
    while out is None:
        try:
            out = queue.get(timeout=1.0)
        except queue_mod.Empty:
            if not proc.is_alive():
                # the child died without reporting (crash, killed, unimportable __main__)
                try:
                    out = queue.get(timeout=1.0)
                except queue_mod.Empty:
                    out = {"error": f"child process exited with code {proc.exitcode} without a result"}
            elif time.monotonic() > deadline:
                out = {"error": f"timed out after {timeout_s} s"}
    proc.join(timeout=10)
    if proc.is_alive():
        proc.kill()
    if "error" in out:
        log.warning("benchmark %s [%s] failed: %s", name, size, out["error"])
        return CaseResult(name, str(size), threads, float("nan"), float("nan"), float("nan"),
                          float("nan"), {}, peer, out["error"])
    return CaseResult(name=name, size=str(size), threads=threads, peer=peer, **out)


def fit_exponent(sizes, times) -> float:
    """Exponent ``b`` of ``time ~ a * size**b`` by least squares in log-log (NaN if < 2 points)."""
    s = np.asarray(sizes, dtype=float)
    t = np.asarray(times, dtype=float)
    ok = np.isfinite(s) & np.isfinite(t) & (s > 0) & (t > 0)
    if ok.sum() < 2:
        return float("nan")
    return float(np.polyfit(np.log(s[ok]), np.log(t[ok]), 1)[0])


def _git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[2]
        return subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=5).stdout.strip() or None
    except Exception:
        return None


def machine_description() -> dict:
    """Machine, versions and git commit for the report."""
    import numba
    import scipy

    import tomodose

    try:
        import numba.np.ufunc.parallel as npar
        layer = npar._get_threading_layer() if hasattr(npar, "_get_threading_layer") else None
    except Exception:
        layer = None
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "numba": numba.__version__,
        "scipy": scipy.__version__,
        "tomodose": tomodose.__version__,
        "git_commit": _git_commit(),
        "threading_layer": layer,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_reports(results: list[CaseResult], out_dir, *, extra: dict | None = None) -> tuple[Path, Path]:
    """Write ``benchmark.json`` and ``benchmark.md`` in ``out_dir``; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_description()
    payload = {"machine": machine, "results": [asdict(r) for r in results], **(extra or {})}
    jpath = out / "benchmark.json"
    atomic_write_text(jpath, json.dumps(payload, indent=2, default=float))
    lines = [
        "# tomodose benchmark",
        "",
        f"Machine: {machine['platform']}, {machine['cpu_count']} CPUs; python {machine['python']}, "
        f"numpy {machine['numpy']}, numba {machine['numba']}; commit {machine['git_commit']}; "
        f"{machine['date_utc']}.",
        "",
        "| case | peer | size | threads | wall (s) | JIT (s) | first call (s) | peak RSS (MiB) | info |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        info = ", ".join(f"{k}={v}" for k, v in r.info.items()) if not r.error else f"ERROR {r.error}"
        lines.append(f"| {r.name} | {r.peer} | {r.size} | {r.threads} | {r.wall_s:.4g} | {r.jit_s:.3g} | "
                     f"{r.first_call_s:.4g} | {r.peak_rss_mib:.1f} | {info} |")
    for key, value in (extra or {}).items():
        lines += ["", f"## {key}", "", "```", json.dumps(value, indent=2, default=float), "```"]
    mpath = out / "benchmark.md"
    atomic_write_text(mpath, "\n".join(lines) + "\n")
    return jpath, mpath
