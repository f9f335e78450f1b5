"""Running a study on a Dask distributed cluster (a LocalCluster by default).

:func:`run_study`

1. removes temporaries left by an earlier interrupted run (``.*.tmp`` in the output folders: the
   only place a half-written file can exist, since every file is written to a temporary and moved
   into place with :func:`os.replace`);
2. looks up every case by its content hash (:meth:`Study.case_hash`): a case whose
   ``cases/<hash>.h5`` exists with that hash is *cached* and not computed again;
3. connects to ``address`` or starts a LocalCluster of ``n_workers`` processes, each running one
   task at a time with ``threads_per_worker`` numba threads (``NUMBA_NUM_THREADS``,
   ``OMP_NUM_THREADS``, ... set in the worker environment before tomodose is imported; default
   ``n_workers = cores // threads_per_worker``, so the machine is not oversubscribed);
4. submits one :func:`~tomodose.batch.task.prepare_group` task per group of cases that share patient,
   plan and settings; when it finishes, its :class:`~tomodose.batch.task.Prepared` inputs (patient
   model, planned sinogram, normalisation factor) are broadcast once to every worker with
   ``client.scatter(..., broadcast=True)`` and the group's :func:`~tomodose.batch.task.run_case`
   tasks are submitted against that one copy;
5. collects the results as they complete. A task that raises is retried ``retries`` times by Dask,
   then reported (``status = "failed"`` and its ``error`` in the summary). A worker that dies is
   replaced by its nanny and its tasks are rescheduled by Dask; if the broadcast inputs were lost
   with it they are scattered again and the cases resubmitted. Every case ends ``done``,
   ``cached`` or ``failed``; none is lost;
6. writes the summary table ``summary.csv`` (and ``summary.parquet`` on request) atomically, one
   row per case in study order. On an interruption (Ctrl-C) the summary is written with the
   unfinished cases marked ``not run`` and the interruption is re-raised, after the cancelled
   cases still running on the workers have stopped (up to 2 minutes: Dask cannot stop a running
   thread), so that nothing of the run writes into the output folder once it has returned.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tomodose import config
from tomodose.batch.study import PLAN_FIELDS, Study
from tomodose.batch.task import CaseTask, GroupTask, case_path, prepare_group, read_case_row, run_case

__all__ = ["run_study", "run_cases_serially", "StudyResult", "clean_temporaries", "local_cluster",
           "SUMMARY_FORMATS", "worker_environment"]

log = logging.getLogger(__name__)

#: Summary table formats (CSV is always written; Parquet needs pyarrow).
SUMMARY_FORMATS = ("csv", "parquet")
#: Status of a case in the summary.
DONE, CACHED, FAILED, NOT_RUN = "done", "cached", "failed", "not run"
_MAX_RESUBMITS = 3
#: after an interruption, how long to wait for the study's tasks already running on the workers
#: to stop before the temporaries are cleaned (a cancelled task's thread runs to its end)
_DRAIN_TIMEOUT_S = 120.0


@dataclass
class StudyResult:
    """Outcome of :func:`run_study`.

    Attributes
    ----------
    summary : pandas.DataFrame
        One row per case (study order): identity columns, ``status``, ``error``, metrics.
    summary_path : Path
        The CSV written.
    out_dir : Path
    counts : dict
        Cases per status (``done``, ``cached``, ``failed``, ``not run``).
    elapsed_s : float
        Wall time of the run.
    """

    summary: object
    summary_path: Path
    out_dir: Path
    counts: dict = field(default_factory=dict)
    elapsed_s: float = 0.0


def clean_temporaries(out_dir) -> list[Path]:
    """Remove the temporaries (``.*.tmp``) an interrupted run may leave in the output folders."""
    removed = []
    out = Path(out_dir)
    for folder in (out, out / "cases", out / "prepared"):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file():
                try:
                    p.unlink()
                    removed.append(p)
                except FileNotFoundError:  # pragma: no cover - raced with another cleaner
                    pass
    if removed:
        log.info("removed %d temporary file(s) of an interrupted run in %s", len(removed), out)
    return removed


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def worker_environment(threads_per_worker: int) -> dict:
    """Environment of each worker process: thread counts of numba and the BLAS/OpenMP runtimes."""
    t = str(int(threads_per_worker))
    return {"NUMBA_NUM_THREADS": t, "OMP_NUM_THREADS": t, "MKL_NUM_THREADS": t, "OPENBLAS_NUM_THREADS": t,
            "TOMODOSE_PROGRESS": "0"}


def local_cluster(n_workers: int | None = None, threads_per_worker: int = 1, **kwargs):
    """A ``distributed.LocalCluster`` of worker processes for tomodose studies.

    Each worker runs one task at a time (Dask ``threads_per_worker=1``) with ``threads_per_worker``
    numba threads set through its environment (:func:`worker_environment`) before tomodose is
    imported there. ``n_workers`` defaults to CPU cores // threads_per_worker (at least 1).
    """
    from distributed import LocalCluster

    t = int(threads_per_worker)
    if t < 1:
        raise ValueError(f"threads_per_worker must be >= 1, got {threads_per_worker!r}")
    n = max(1, _cpu_count() // t) if n_workers is None else int(n_workers)
    if n < 1:
        raise ValueError(f"n_workers must be >= 1, got {n_workers!r}")
    if n * t > _cpu_count():
        log.warning("%d workers x %d threads oversubscribe the %d CPU cores", n, t, _cpu_count())
    options = {"processes": True, "dashboard_address": ":0", "silence_logs": logging.ERROR}
    options.update(kwargs)
    return LocalCluster(n_workers=n, threads_per_worker=1, env=worker_environment(t), **options)


def _identity_columns(study: Study, case) -> dict:
    s = study.settings
    row = {"case": case.name, "phantom": case.phantom.label()}
    for name in PLAN_FIELDS:
        row[name] = getattr(case.plan, name)
    row["sinogram"] = case.plan.sinogram if case.plan.sinogram in ("conformal", "optimised") else Path(
        case.plan.sinogram).name
    row["engine"] = s.engine
    row["normalisation"] = s.normalisation
    for k, v in case.perturbation.to_dict().items():
        if k == "setup_shift_mm":
            for axis, x in zip("xyz", v):
                row[f"setup_shift_{axis}_mm"] = x
        else:
            row[k] = v
    return row


def _write_summary(df, out: Path, formats) -> Path:
    from tomodose._atomic import atomic_path

    path = out / "summary.csv"
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    if "parquet" in formats:
        with atomic_path(out / "summary.parquet") as tmp:
            df.to_parquet(tmp, index=False)
    return path


def _summary_frame(study: Study, hashes: list[str], rows: dict, status: dict, errors: dict, out: Path):
    import pandas as pd

    records = []
    for case, h in zip(study.cases, hashes):
        rec = _identity_columns(study, case)
        st = status.get(h, NOT_RUN)
        rec["status"] = st
        rec["error"] = errors.get(h, "")
        rec["case_hash"] = h
        rec["file"] = os.path.relpath(case_path(out, h), out) if st in (DONE, CACHED) else ""
        metrics = rows.get(h, {})
        for k, v in metrics.items():
            if k not in rec:
                rec[k] = v
        records.append(rec)
    return pd.DataFrame.from_records(records)


def _is_lost(exc) -> bool:
    import asyncio
    import concurrent.futures

    name = type(exc).__name__
    return isinstance(exc, (asyncio.CancelledError, concurrent.futures.CancelledError)) or name in (
        "FutureCancelledError", "CancelledError")


def run_study(study: Study, out_dir=None, *, client=None, address: str | None = None, n_workers: int | None = None,
              threads_per_worker: int | None = None, retries: int | None = None, progress: bool | None = None,
              summary_formats=("csv",), on_result=None, case_function=None) -> StudyResult:
    """Run every case of ``study`` on Dask and write the per-case files and the summary table.

    Parameters
    ----------
    study : Study
    out_dir : str or Path, optional
        Output folder (default ``study.output_dir``, else ``<study name>-results``); it must be
        visible at the same path to every worker (a shared file system on a cluster).
        Layout: ``cases/<case hash>.h5``, ``prepared/<group hash>.h5``, ``summary.csv``.
    client : distributed.Client, optional
        An existing client (not closed here). Otherwise ``address`` or a new LocalCluster.
    address : str, optional
        Scheduler address of a running cluster (default ``study.cluster.address``). Its workers
        should run one task at a time (``--nthreads 1``) with ``NUMBA_NUM_THREADS`` set; each task
        also calls ``numba.set_num_threads(threads_per_worker)``.
    n_workers, threads_per_worker, retries : int, optional
        LocalCluster workers, numba threads per worker, extra attempts of a failing task
        (defaults from ``study.cluster``).
    progress : bool, optional
        Progress bar over the cases (default: ``tomodose.config.settings.progress``).
    summary_formats : tuple of str
        ``"csv"`` (always written) and optionally ``"parquet"`` (needs pyarrow).
    on_result : callable, optional
        ``on_result(case_name, row, client)`` called in this process after each computed case.
    case_function : callable, optional
        Replaces :func:`~tomodose.batch.task.run_case` (same signature; instrumentation and tests).

    Returns
    -------
    StudyResult
    """
    t_start = time.perf_counter()
    if not isinstance(study, Study):
        raise TypeError(f"study must be a Study, got {type(study).__name__}")
    formats = tuple(summary_formats)
    for f in formats:
        if f not in SUMMARY_FORMATS:
            raise ValueError(f"summary_formats must contain only {SUMMARY_FORMATS}, got {f!r}")
    if "parquet" in formats:
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise ValueError("summary_formats 'parquet' needs pyarrow (pip install pyarrow)") from None
    cl = study.cluster
    threads = cl.threads_per_worker if threads_per_worker is None else threads_per_worker
    retries = cl.retries if retries is None else retries
    address = cl.address if address is None else address
    n_workers = cl.n_workers if n_workers is None else n_workers
    for name, value, low in (("threads_per_worker", threads, 1), ("retries", retries, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    case_function = case_function or run_case
    from distributed import Client, as_completed

    out = Path(out_dir if out_dir is not None else (study.output_dir or f"{study.name}-results"))
    (out / "cases").mkdir(parents=True, exist_ok=True)
    (out / "prepared").mkdir(parents=True, exist_ok=True)
    clean_temporaries(out)

    hashes = [study.case_hash(c) for c in study.cases]
    groups_of = {h: study.group_hash(c) for c, h in zip(study.cases, hashes)}
    first_case = {}
    for c, h in zip(study.cases, hashes):
        first_case.setdefault(h, c)
    rows: dict = {}
    status: dict = {}
    errors: dict = {}
    for h in first_case:
        row = read_case_row(case_path(out, h), h)
        if row is not None:
            rows[h], status[h] = row, CACHED
    pending = [h for h in first_case if h not in rows]
    log.info("study %s: %d cases (%d distinct), %d cached, %d to compute", study.name, len(study.cases),
             len(first_case), len(first_case) - len(pending), len(pending))
    groups: dict[str, list[str]] = {}
    for h in pending:
        groups.setdefault(groups_of[h], []).append(h)

    own_client = own_cluster = None
    bar = None
    interrupted = False
    try:
        if pending:
            if client is None:
                if address:
                    client = own_client = Client(address)
                else:
                    own_cluster = local_cluster(n_workers, threads)
                    client = own_client = Client(own_cluster)
            if config.progress_enabled(progress):
                from tqdm.auto import tqdm

                bar = tqdm(total=len(pending), desc=f"study {study.name}", unit="case")
            _execute(client, as_completed, study, out, groups, first_case, threads, retries, case_function,
                     rows, status, errors, bar, on_result)
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        if bar is not None:
            bar.close()
        if own_client is not None:
            own_client.close()
        if own_cluster is not None:
            own_cluster.close()
        clean_temporaries(out)
        df = _summary_frame(study, hashes, rows, status, errors, out)
        path = _write_summary(df, out, formats)
        if interrupted:
            log.warning("study %s interrupted: summary of the finished cases written to %s", study.name, path)
    counts = {s: int((df["status"] == s).sum()) for s in (DONE, CACHED, FAILED, NOT_RUN)}
    return StudyResult(df, path, out, counts, time.perf_counter() - t_start)


def _execute(client, as_completed, study, out, groups, first_case, threads, retries, case_function,
             rows, status, errors, bar, on_result):
    token = uuid.uuid4().hex[:8]
    ac = as_completed()
    meta: dict = {}
    prepared: dict = {}   # group hash -> Prepared (kept to scatter again if the broadcast copies are lost)
    shared: dict = {}     # group hash -> scattered future
    resubmits: dict = {}
    names = {h: c.name for h, c in first_case.items()}

    def submit_case(h):
        g = study.group_hash(first_case[h])
        task = CaseTask(names[h], h, g, first_case[h], study.settings, str(out), threads)
        fut = client.submit(case_function, task, shared[g], key=f"case-{h[:16]}-{token}-{resubmits.get(h, 0)}",
                            retries=retries, pure=False)
        meta[fut.key] = ("case", (h, shared[g].key), fut)
        ac.add(fut)

    def scatter(g):
        shared[g] = client.scatter(prepared[g], broadcast=True, hash=False)

    for g, hs in groups.items():
        task = GroupTask(g, first_case[hs[0]], study.settings, str(out), threads)
        fut = client.submit(prepare_group, task, key=f"prepare-{g[:16]}-{token}", retries=retries, pure=False)
        meta[fut.key] = ("prepare", g, fut)
        ac.add(fut)

    def fail(h, message):
        status[h] = FAILED
        errors[h] = message
        log.error("case %r failed: %s", names[h], message)
        if bar is not None:
            bar.update(1)

    try:
        _collect(client, ac, meta, study, groups, first_case, prepared, shared, resubmits, names, rows, status,
                 submit_case, scatter, fail, bar, on_result)
    except BaseException:
        # interrupted (or on_result raised): nothing more is started; running tasks finish or stop
        # on their own and their files appear whole or not at all
        client.cancel([entry[2] for entry in meta.values()], force=True)
        _wait_until_stopped(client, token, _DRAIN_TIMEOUT_S)
        raise
    if bar is not None:
        bar.refresh()


def _running_study_tasks(dask_worker, token):
    """Keys of the tasks carrying ``token`` that occupy a thread of this worker (run on the worker)."""
    return [str(ts.key) for ts in dask_worker.state.all_running_tasks if token in str(ts.key)]


def _wait_until_stopped(client, token, timeout_s):
    """Wait until no task of this run (keys containing ``token``) is still running on a worker.

    Dask cannot stop a running task's thread: a cancelled case keeps computing and writes its
    file (to a temporary, then renamed) when it ends. Waiting here means that once
    :func:`run_study` returns nothing of this run is still writing into the output folder, so
    the temporaries it cleans up stay cleaned. Gives up with a warning after ``timeout_s``
    (the next run removes what such a task leaves behind).
    """
    deadline = time.monotonic() + timeout_s
    running: list = []
    while True:
        try:
            per_worker = client.run(_running_study_tasks, token=token)
        except Exception as e:  # noqa: BLE001 - the cluster may be gone; nothing left to wait for
            log.debug("could not ask the workers for running tasks: %s", e)
            return
        running = sorted(k for keys in per_worker.values() for k in keys)
        if not running:
            return
        if time.monotonic() >= deadline:
            log.warning("%d cancelled task(s) still running after %.0f s (%s); their temporaries are "
                        "removed by the next run", len(running), timeout_s, ", ".join(running))
            return
        time.sleep(0.1)


def _collect(client, ac, meta, study, groups, first_case, prepared, shared, resubmits, names, rows, status,
             submit_case, scatter, fail, bar, on_result):
    for fut in ac:
        kind, ident, _ = meta.pop(fut.key)
        exc = None
        value = None
        fut_status = fut.status
        if fut_status == "finished":
            try:
                value = fut.result()
            except Exception as e:  # noqa: BLE001 - reported, never lost
                exc = e
        else:
            try:
                exc = fut.exception()
            except Exception as e:  # noqa: BLE001 - cancelled futures raise here
                exc = e
            if exc is None:
                exc = RuntimeError(f"task ended with status {fut.status!r}")
        fut.release()
        if kind == "prepare":
            g = ident
            if exc is not None:
                for h in groups[g]:
                    fail(h, f"preparation failed: {type(exc).__name__}: {exc}")
                continue
            prepared[g] = value
            scatter(g)
            for h in groups[g]:
                submit_case(h)
            continue
        h, shared_key = ident
        if exc is None:
            rows[h], status[h] = value, DONE
            if bar is not None:
                bar.update(1)
            if on_result is not None:
                on_result(names[h], value, client)
            continue
        g = study.group_hash(first_case[h])
        # cancelled by the scheduler (its broadcast input was lost with the workers holding it), or
        # submitted against a broadcast copy that has since been replaced
        lost = (fut_status == "cancelled" or _is_lost(exc) or shared_key != shared[g].key
                or shared[g].status != "finished")
        if lost and resubmits.get(h, 0) < _MAX_RESUBMITS:
            resubmits[h] = resubmits.get(h, 0) + 1
            log.warning("case %r lost its inputs (task %s, %s): resubmitting", names[h], fut_status,
                        type(exc).__name__)
            if shared[g].status != "finished":
                scatter(g)
            submit_case(h)
            continue
        fail(h, f"{type(exc).__name__}: {exc}")


def run_cases_serially(study: Study, out_dir, *, case_function=None) -> dict:
    """Run every distinct case of ``study`` in this process, one after the other (no Dask).

    The reference for the distributed run: returns ``{case hash: metrics row}`` and writes the same
    files. Failures raise.
    """
    case_function = case_function or run_case
    out = Path(out_dir)
    (out / "cases").mkdir(parents=True, exist_ok=True)
    prepared: dict = {}
    rows: dict = {}
    for case in study.cases:
        h, g = study.case_hash(case), study.group_hash(case)
        if h in rows:
            continue
        if g not in prepared:
            prepared[g] = prepare_group(GroupTask(g, case, study.settings, str(out), study.cluster.threads_per_worker))
        rows[h] = case_function(CaseTask(case.name, h, g, case, study.settings, str(out),
                                         study.cluster.threads_per_worker), prepared[g])
    return rows
