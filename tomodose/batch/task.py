"""What a worker runs: preparing a group's shared inputs and computing one case.

Both functions are plain, deterministic functions of their arguments; :mod:`tomodose.batch.runner`
submits them to Dask, and running them one by one in a single process gives the same results
(the test suite checks it).

* :func:`prepare_group` builds the patient model, the planned :class:`HelicalPlan` (conformal,
  optimised, or read from a file) and, with ``normalisation = "base"``, the normalisation factor
  of the *unperturbed* delivery (the protocol's normalisation coverage of the primary target, one
  DVH bin above the prescription as in :mod:`tomodose.demo`). The plan and factor are cached in
  ``prepared/<group hash>.h5`` (written atomically), so a re-run does not optimise again.
* :func:`run_case` applies the perturbation (:func:`~tomodose.batch.perturbation.apply_perturbation`),
  computes the dose of the delivered sequence, scales it (calibration kept at the nominal beam,
  normalisation), evaluates the protocol (DVHs, verdicts, plan metrics, NTCP), writes
  ``cases/<case hash>.h5`` atomically and returns the case's metrics row.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tomodose.batch.perturbation import Perturbation, apply_perturbation
from tomodose.batch.study import Case, StudySettings

__all__ = ["CaseTask", "GroupTask", "Prepared", "prepare_group", "run_case", "build_patient", "build_plan",
           "case_path", "prepared_path", "read_case_row", "metrics_row"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GroupTask:
    """The inputs of :func:`prepare_group` (small; pickled to the worker)."""

    group_hash: str
    case: Case
    settings: StudySettings
    out_dir: str
    threads: int = 1


@dataclass(frozen=True)
class CaseTask:
    """The inputs of :func:`run_case` besides the shared :class:`Prepared` (small; pickled per task)."""

    name: str
    case_hash: str
    group_hash: str
    case: Case
    settings: StudySettings
    out_dir: str
    threads: int = 1


@dataclass
class Prepared:
    """Shared inputs of a group of cases (broadcast once to every worker).

    Attributes
    ----------
    group_hash : str
    patient : PatientModel
    plan : HelicalPlan
        Planned (unperturbed) delivery.
    protocol : Protocol
    scale : float
        Normalisation factor applied to every case of the group (1 unless normalisation is "base").
    info : dict
        Timings and plan summary.
    """

    group_hash: str
    patient: object
    plan: object
    protocol: object
    scale: float
    info: dict = field(default_factory=dict)


def case_path(out_dir, case_hash: str) -> Path:
    """Result file of a case: ``<out>/cases/<hash>.h5``."""
    return Path(out_dir) / "cases" / f"{case_hash}.h5"


def prepared_path(out_dir, group_hash: str) -> Path:
    """Shared-input file of a group: ``<out>/prepared/<hash>.h5``."""
    return Path(out_dir) / "prepared" / f"{group_hash}.h5"


@contextlib.contextmanager
def _limit_threads(threads: int):
    """numba threads of this thread while the block runs (a worker's environment already caps
    NUMBA_NUM_THREADS; this also holds on clusters started elsewhere); restored afterwards."""
    import numba

    before = numba.get_num_threads()
    numba.set_num_threads(max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        numba.set_num_threads(before)


def build_patient(case: Case):
    """Patient model of a case (phantom builder or the ``/patient`` of a results file)."""
    spec = case.phantom
    if spec.volume is not None:
        from tomodose.io.hdf5 import read_results

        patient = read_results(spec.volume).patient
        if patient is None:
            raise ValueError(f"volume file {spec.volume!r} has no /patient group")
        return patient
    from tomodose.phantoms import load_phantom

    return load_phantom(spec.phantom, **spec.overrides)


def build_plan(case: Case, patient, protocol, settings: StudySettings):
    """Planned HelicalPlan of a case (see :class:`~tomodose.batch.study.PlanSpec`); returns (plan, info)."""
    from tomodose.delivery.plan import HelicalPlan

    spec = case.plan
    info: dict = {"sinogram": spec.sinogram}
    if spec.sinogram.lower().endswith((".h5", ".hdf5")):
        from tomodose.io.hdf5 import read_results

        plan = read_results(spec.sinogram).plan
        if not isinstance(plan, HelicalPlan):
            raise ValueError(f"plan.sinogram file {spec.sinogram!r} must hold a HelicalPlan in /plan, "
                             f"got {type(plan).__name__}")
        return plan, info
    if patient.structures is None or "PTV" not in patient.structures:
        raise ValueError(f"patient {patient.name!r} has no 'PTV' structure: the covering plan is built around it")
    ptv = patient.structures["PTV"]
    z_in = patient.grid.z_mm[np.any(ptv.mask, axis=(1, 2))]
    cx, cy, _ = ptv.centroid_mm()
    template = HelicalPlan.covering(
        lambda n, m: np.ones((n, m)), float(z_in.max()), float(z_in.min()), field_width_mm=spec.field_width_mm,
        pitch=spec.pitch, gantry_period_s=spec.gantry_period_s, isocentre_xy_mm=(cx, cy),
        n_fractions=int(protocol.n_fractions), prescriptions={t.name: t.prescription_gy for t in protocol.targets})
    if spec.sinogram == "conformal":
        from tomodose.delivery.beams_eye import conformal_sinogram

        return dataclasses.replace(template, sinogram=conformal_sinogram(template, ptv)), info
    if spec.sinogram == "optimised":
        from tomodose.optimisation import optimise_plan

        plan, opt = optimise_plan(patient, template, protocol, options=settings.protocol_options or None,
                                  progress=False)
        info["optimisation_timings_s"] = opt.get("timings_s", {})
        return plan, info
    sino = np.load(spec.sinogram, allow_pickle=False)
    if sino.shape != template.sinogram.shape:
        raise ValueError(f"plan.sinogram file {spec.sinogram!r} has shape {sino.shape}; the covering plan of this "
                         f"patient (jaw {spec.field_width_mm:g} mm, pitch {spec.pitch:g}) needs {template.sinogram.shape}")
    return dataclasses.replace(template, sinogram=sino), info


def delivered_dose(patient, plan, perturbation: Perturbation, settings: StudySettings):
    """Whole-course dose (DoseResult) of ``plan`` delivered with ``perturbation``, calibrated with the
    nominal beam (a perturbed jaw does not change the machine's output calibration); unnormalised."""
    from tomodose.dose import compute_dose
    from tomodose.dose.calibration import calibration_factor
    from tomodose.dose.result import DoseResult
    from tomodose.geometry.grid import ImageVolume
    from tomodose.terma.beam_model import BeamModel

    nominal = BeamModel.default()
    seq, beam = apply_perturbation(plan, perturbation, nominal)
    res = compute_dose(patient, seq, settings.engine, beam_model=beam, progress=False, **settings.engine_options)
    meta = dict(res.metadata)
    arr = res.per_fraction.array
    if beam is not nominal:
        calib_options = {k: v for k, v in settings.engine_options.items() if k in ("n_subsamples",)}
        k_nominal = calibration_factor(settings.engine, beam_model=nominal, machine=seq.machine,
                                       engine_options=calib_options)
        ratio = k_nominal / float(meta["calibration_gy_per_unit"])
        meta["nominal_calibration_ratio"] = ratio
        if ratio != 1.0:
            arr = (arr * np.float32(ratio)).astype(np.float32)
    result = DoseResult(ImageVolume(patient.grid, arr, "Gy", "dose"), plan.n_fractions, settings.engine, meta)
    return result, seq


def _normalisation_factor(dose_total, patient, protocol) -> float:
    from tomodose.evaluation.dvh import DEFAULT_BIN_WIDTH_GY
    from tomodose.evaluation.protocol import normalise_to_coverage

    primary = protocol.targets[0]
    coverage = float(protocol.parameters.get("normalisation_coverage_percent", 96.5)) / 100.0
    scale = normalise_to_coverage(dose_total, patient.structures[primary.name], primary.prescription_gy, coverage)
    # as in tomodose.demo: one DVH bin above the prescription so the covering voxels land above it
    return float(scale * (1.0 + DEFAULT_BIN_WIDTH_GY / primary.prescription_gy))


def prepare_group(task: GroupTask) -> Prepared:
    """Shared inputs of a group of cases (patient, planned delivery, normalisation factor).

    Reads ``prepared/<group hash>.h5`` when present and valid; otherwise builds the plan (and the
    nominal dose for ``normalisation = "base"``) and writes that file atomically.
    """
    with _limit_threads(task.threads):
        return _prepare_group(task)


def _prepare_group(task: GroupTask) -> Prepared:
    from tomodose.io.hdf5 import read_results, write_results

    t0 = time.perf_counter()
    settings = task.settings
    patient = build_patient(task.case)
    protocol = settings.load_protocol()
    path = prepared_path(task.out_dir, task.group_hash)
    if path.is_file():
        try:
            res = read_results(path)
            meta = res.extra.get("batch_group", {})
            if meta.get("group_hash") == task.group_hash and res.plan is not None:
                log.info("group %s: reusing %s", task.group_hash[:12], path)
                return Prepared(task.group_hash, patient, res.plan, protocol, float(meta["scale"]),
                                json.loads(meta.get("info_json", "{}")))
        except (ValueError, KeyError, OSError) as exc:
            log.warning("ignoring unreadable prepared file %s (%s)", path, exc)
    plan, info = build_plan(task.case, patient, protocol, settings)
    scale = 1.0
    if settings.normalisation == "base":
        nominal, _ = delivered_dose(patient, plan, Perturbation(), settings)
        scale = _normalisation_factor(nominal.total, patient, protocol)
    info.update(plan=plan.summary(), prepare_s=time.perf_counter() - t0, normalisation_factor=scale)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_results(path, patient=patient, plan=plan,
                  extra={"batch_group": {"group_hash": task.group_hash, "scale": scale,
                                         "info_json": json.dumps(info, default=str)}})
    return Prepared(task.group_hash, patient, plan, protocol, scale, info)


def metrics_row(evaluation) -> dict:
    """Flat metrics of a protocol evaluation: overall verdict, counts, each constraint's value and
    verdict (``<id>`` and ``<id> verdict``), target plan metrics (``<target> <metric>``), NTCP."""
    from tomodose.evaluation.protocol import GOAL_MISSED, HARD_FAILED, PASS

    counts = evaluation.counts()
    row: dict = {"verdict": evaluation.overall, "n_pass": counts.get(PASS, 0),
                 "n_goal_missed": counts.get(GOAL_MISSED, 0), "n_hard_failed": counts.get(HARD_FAILED, 0)}
    for r in evaluation.results:
        row[r.id] = float("nan") if r.value is None else float(r.value)
        row[f"{r.id} verdict"] = r.verdict
    for target, pm in evaluation.plan_metrics.items():
        for k, v in pm.items():
            if k != "prescription_gy":
                row[f"{target} {k}"] = float(v)
    rb = evaluation.radiobiology or {}
    sname = rb.get("structure", "NormalLiver")
    for k in ("ntcp_rild_primary", "ntcp_rild_metastases"):
        if isinstance(rb.get(k), dict) and "ntcp" in rb[k]:
            row[f"{sname} {k}"] = float(rb[k]["ntcp"])
    if "mean_eqd2_gy" in rb:
        row[f"{sname} mean_eqd2_gy"] = float(rb["mean_eqd2_gy"])
    return row


def run_case(task: CaseTask, prepared: Prepared) -> dict:
    """Compute one case, write ``cases/<hash>.h5`` atomically, return its metrics row (a flat dict)."""
    if prepared.group_hash != task.group_hash:
        raise ValueError(f"case {task.name!r} belongs to group {task.group_hash[:12]}, got prepared inputs of "
                         f"{prepared.group_hash[:12]}")
    with _limit_threads(task.threads):
        return _run_case(task, prepared)


def _run_case(task: CaseTask, prepared: Prepared) -> dict:
    from tomodose.evaluation.protocol import evaluate_protocol
    from tomodose.io.hdf5 import write_results

    t0 = time.perf_counter()
    c0 = time.process_time()
    settings = task.settings
    patient, plan, protocol = prepared.patient, prepared.plan, prepared.protocol
    dose, seq = delivered_dose(patient, plan, task.case.perturbation, settings)
    if settings.normalisation == "per_case":
        scale = _normalisation_factor(dose.total, patient, protocol)
    else:
        scale = prepared.scale
    dose = dose.scaled(scale)
    total = dose.total
    evaluation = evaluate_protocol(protocol, total, patient.structures, options=settings.protocol_options or None,
                                   dose_name=settings.engine)
    row = {"case_hash": task.case_hash, "group_hash": task.group_hash, "normalisation_factor": scale,
           "calibration_ratio": float(dose.metadata.get("nominal_calibration_ratio", 1.0)),
           "dose_max_gy": float(total.array.max()), "treatment_time_s": float(seq.treatment_time_s),
           "couch_travel_mm": float(np.sum(seq.couch_travel_mm))}
    row.update(metrics_row(evaluation))
    row["compute_s"] = time.perf_counter() - t0
    row["compute_cpu_s"] = time.process_time() - c0
    row["worker"] = f"{socket.gethostname()}:{os.getpid()}"
    path = case_path(task.out_dir, task.case_hash)
    path.parent.mkdir(parents=True, exist_ok=True)
    case_json = {"name": task.name, "phantom": dataclasses.asdict(task.case.phantom),
                 "plan": dataclasses.asdict(task.case.plan), "perturbation": task.case.perturbation.to_dict(),
                 "settings": dataclasses.asdict(settings)}
    write_results(path, plan=seq, doses={"dose": total}, dvhs=dict(evaluation.dvhs),
                  extra={"batch": {"case_hash": task.case_hash, "group_hash": task.group_hash,
                                   "case_json": json.dumps(case_json, default=str),
                                   "row_json": json.dumps(row, default=float),
                                   "prepared_file": os.path.relpath(prepared_path(task.out_dir, task.group_hash),
                                                                    path.parent)}})
    return row


def read_case_row(path, case_hash: str) -> dict | None:
    """The metrics row stored in a finished case file, or None when the file is absent, unreadable
    or holds another case (its stored hash differs)."""
    import h5py

    path = Path(path)
    if not path.is_file():
        return None
    try:
        with h5py.File(path, "r") as f:
            g = f["extra"]["batch"]
            stored = g.attrs["case_hash"]
            stored = stored.decode() if isinstance(stored, bytes) else str(stored)
            if stored != case_hash:
                return None
            raw = g.attrs["row_json"]
            row = json.loads(raw.decode() if isinstance(raw, bytes) else str(raw))
            if "dose" not in f or "dose" not in f["dose"]:
                return None
        return row
    except (OSError, KeyError, ValueError) as exc:
        log.warning("case file %s is unreadable (%s): the case will be computed again", path, exc)
        return None
