"""The main job: synthetic liver phantom -> helical plan -> dose -> protocol report.

``tomodose demo`` runs :func:`run_demo`. Steps:

1. the default abdominal liver phantom (:func:`tomodose.phantoms.liver_phantom`);
2. a helical plan: jaw 25 mm, pitch 0.287 (~0.86/3, away from the thread effect), gantry period
   within the machine's range; the sinogram is optimised against the protocol on the pencil-beam
   influence matrix (:mod:`tomodose.optimisation`), or, with ``optimise=False``, a conformal
   sinogram (every leaf that sees the PTV open);
3. the dose with the collapsed-cone engine (absolute, Gy per fraction); with the optimiser it is
   the collapsed-cone dose of the returned plan, computed in its last correction round;
4. normalisation so the prescription isodose covers the protocol's normalisation coverage of the
   primary target (PGTV, 50 Gy; 96.5 %, just above the > 96 % rule;
   :func:`tomodose.optimisation.normalisation_scale`);
5. the protocol evaluation (Shen et al. 2021, 5 Gy x 10): JSON, Markdown and HTML report, DVH plot;
6. the HDF5 results file, dose slices and sinogram figures.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tomodose._validate import check_positive

__all__ = ["DemoConfig", "plan_study", "run_demo"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    """Settings of the demo study.

    Parameters
    ----------
    phantom : str
        Named phantom configuration (see ``phantoms/``), default ``"liver_default"``.
    spacing_mm : float
        Dose/phantom grid spacing (mm).
    field_width_mm, pitch, gantry_period_s : float
        Delivery parameters.
    engine : str
        Final dose engine, ``"collapsed_cone"`` (default) or ``"pencil_beam"``.
    optimise : bool
        Optimise the sinogram when the optimiser is available.
    protocol : str
        Protocol name or TOML path.
    """

    phantom: str = "liver_default"
    spacing_mm: float = 5.0
    field_width_mm: float = 25.0
    pitch: float = 0.287
    gantry_period_s: float = 40.0
    engine: str = "collapsed_cone"
    optimise: bool = True
    protocol: str | None = None

    def __post_init__(self):
        check_positive("spacing_mm", self.spacing_mm)


def plan_study(config: DemoConfig | None = None, *, settings=None, progress: bool | None = None) -> dict:
    """Steps 1-5 of the demo without writing files: phantom, plan, dose, normalisation, evaluation.

    Parameters
    ----------
    config : DemoConfig, optional
    settings : OptimisationSettings, optional
        Optimiser settings (default :class:`tomodose.optimisation.OptimisationSettings`).

    Returns
    -------
    dict
        ``summary`` (JSON-friendly: configuration, structure volumes, optimisation record with the
        pencil beam vs collapsed cone comparison, plan, normalisation, verdict, ``missing``: the
        protocol's structures absent from the phantom, timings), ``evaluation``
        (:class:`~tomodose.evaluation.protocol.ProtocolEvaluation`), ``dose`` (normalised
        :class:`~tomodose.dose.result.DoseResult`), ``plan``, ``patient``, ``protocol``.
    """
    from tomodose.delivery.beams_eye import conformal_sinogram
    from tomodose.delivery.plan import HelicalPlan
    from tomodose.dose import compute_dose
    from tomodose.evaluation.protocol import evaluate_protocol, load_protocol
    from tomodose.optimisation import normalisation_scale
    from tomodose.phantoms import load_phantom

    cfg = config or DemoConfig()
    summary: dict = {"config": dataclasses.asdict(cfg), "timings_s": {}}
    t_all = time.perf_counter()

    # 1. phantom
    t0 = time.perf_counter()
    patient = load_phantom(cfg.phantom, spacing_mm=cfg.spacing_mm)
    summary["timings_s"]["phantom"] = time.perf_counter() - t0
    summary["structure_volumes_ml"] = patient.structure_volumes_ml()
    log.info("phantom %s on %s", cfg.phantom, patient.grid)

    # 2. plan
    ptv = patient.structures["PTV"]
    z_in = patient.grid.z_mm[np.any(ptv.mask, axis=(1, 2))]
    cx, cy, _ = ptv.centroid_mm()
    protocol = load_protocol(cfg.protocol) if cfg.protocol else load_protocol()
    prescriptions = {t.name: t.prescription_gy for t in protocol.targets}
    n_fractions = int(getattr(protocol, "n_fractions", 10))
    template = HelicalPlan.covering(lambda n, m: np.ones((n, m)), float(z_in.max()), float(z_in.min()),
                                    field_width_mm=cfg.field_width_mm, pitch=cfg.pitch,
                                    gantry_period_s=cfg.gantry_period_s, isocentre_xy_mm=(cx, cy),
                                    n_fractions=n_fractions, prescriptions=prescriptions)
    t0 = time.perf_counter()
    dose = None
    if cfg.optimise:
        from tomodose.optimisation import optimise_plan

        plan, opt_info, ccc = optimise_plan(patient, template, protocol, settings=settings, progress=progress,
                                            return_dose=True)
        summary["optimisation"] = opt_info
        summary["pb_vs_ccc"] = opt_info.get("pb_vs_ccc", {})
        if cfg.engine == "collapsed_cone":
            dose = ccc  # the optimiser's last collapsed-cone dose is that of the returned plan
    else:
        plan = dataclasses.replace(template, sinogram=conformal_sinogram(template, ptv))
    summary["timings_s"]["plan"] = time.perf_counter() - t0
    summary["plan"] = plan.summary()

    # 3. dose
    t0 = time.perf_counter()
    if dose is None:
        dose = compute_dose(patient, plan, engine=cfg.engine, progress=progress)
    summary["timings_s"]["dose"] = time.perf_counter() - t0
    summary["dose_metadata"] = dose.metadata

    # 4-5. normalisation and protocol
    scale = normalisation_scale(protocol, dose.total, patient.structures)
    dose = dose.scaled(scale)
    summary["normalisation_factor"] = scale
    t0 = time.perf_counter()
    evaluation = evaluate_protocol(protocol, dose.total, patient.structures, dose_name=cfg.engine)
    summary["timings_s"]["evaluation"] = time.perf_counter() - t0
    summary["verdict"] = evaluation.overall
    summary["verdict_counts"] = evaluation.counts()
    summary["missing"] = list(evaluation.missing_structures)
    summary["timings_s"]["study"] = time.perf_counter() - t_all
    return {"summary": summary, "evaluation": evaluation, "dose": dose, "plan": plan, "patient": patient,
            "protocol": protocol}


def run_demo(out_dir, config: DemoConfig | None = None, *, settings=None, progress: bool | None = None) -> dict:
    """Run the demo study and write its outputs in ``out_dir``; return a summary dict.

    ``settings``: optimiser settings (see :func:`plan_study`).
    """
    from tomodose._atomic import atomic_write_text
    from tomodose.io.hdf5 import write_results
    from tomodose.report.figures import plot_dose_slices, plot_sinogram
    from tomodose.report.protocol_report import write_report

    cfg = config or DemoConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    result = plan_study(cfg, settings=settings, progress=progress)
    summary, evaluation, dose = result["summary"], result["evaluation"], result["dose"]
    plan, patient, protocol = result["plan"], result["patient"], result["protocol"]
    report_files = write_report(evaluation, json_path=out / "report.json", markdown_path=out / "report.md",
                                html_path=out / "report.html", plot_path=out / "dvh.png")
    summary["report_files"] = {kind: str(path) for kind, path in report_files.items()}

    # 6. results and figures
    primary = protocol.targets[0]
    shown = {n: patient.structures[n] for n in ("PGTV", "PTV", "Liver", "ProtectedLiver", "SpinalCord",
                                                "Stomach", "Kidney_R", "Bowel") if n in patient.structures}
    plot_dose_slices(dose.total, out / "dose_slices.png", ct=patient.ct, structures=shown,
                     centre_mm=patient.structures[primary.name].centroid_mm(),
                     prescription_gy=primary.prescription_gy,
                     title=f"{cfg.engine} dose, {plan.n_fractions} fractions (Gy)")
    plot_sinogram(plan.sinogram, out / "sinogram.png", gantry_period_s=plan.gantry_period_s)
    write_results(out / "results.h5", patient=patient, plan=plan,
                  doses={cfg.engine: dose.total},
                  dvhs=dict(evaluation.dvhs),
                  extra={"demo_summary": json.loads(json.dumps(summary, default=str))})
    summary["timings_s"]["total"] = summary["timings_s"]["study"] + time.perf_counter() - t_all
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=str))
    return result

