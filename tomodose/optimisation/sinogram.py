"""Inverse planning of the helical sinogram on the pencil-beam influence matrix.

Pipeline (:func:`optimise_plan`):

1. beamlets = (projection, leaf) pairs whose rays meet the PTV (plus a margin); their influence
   matrix ``A`` (pencil beam, calibrated to Gy for the whole course) restricted to the voxels of
   the structures that carry objectives;
2. objectives from the protocol file (:func:`build_terms`): target under-dose (each target at its
   prescription), target hot spots, OAR near-maximum doses (D0.03cc / D0.5cc goals), mean-dose
   goals (normal liver, protected liver, heart, kidneys, lungs), and a ring of normal tissue
   around the PTV that forces the dose to fall off;
3. L-BFGS-B with bounds [0, 1] (scipy); the objective of every accepted iterate is recorded
   (it decreases monotonically);
4. deliverability (:func:`make_deliverable`): the gantry period is shortened so the longest leaf
   opening fills its projection (within the machine's period range); the modulation factor is
   capped; openings shorter than the minimum leaf-open time (from the leaf latency) are rounded to
   0 or to the minimum, and the effect on the objective is reported.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import numpy as np
from scipy import optimize, sparse

from tomodose._validate import check_in_range, check_positive
from tomodose.delivery.plan import HelicalPlan
from tomodose.geometry.structures import Structure
from tomodose.optimisation.objectives import Term, evaluate_terms

__all__ = ["OptimisationSettings", "build_terms", "optimise_sinogram", "make_deliverable", "optimise_plan",
           "normalisation_scale"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OptimisationSettings:
    """Knobs of the sinogram optimisation (defaults tuned on the liver phantoms).

    Parameters
    ----------
    max_iterations : int
        L-BFGS-B iterations.
    target_weight, hotspot_weight, oar_weight, mean_weight, ring_weight : float
        Importance of each kind of term.
    target_level : float
        Under-dose penalty below ``target_level x prescription`` (slightly above 1 so that the
        coverage rule can be met after normalisation).
    hotspot_level : float
        Hot-spot penalty above ``hotspot_level x prescription`` of the primary target.
    oar_margin : float
        Near-maximum OAR terms start at ``oar_margin x goal`` (a safety margin below the goal).
    mean_margin : float
        Mean-dose terms start at ``mean_margin x goal`` (larger margin: the pencil beam's low-dose
        bath is less accurate than its high dose, and the final dose is renormalised).
    ring_inner_mm, ring_outer_mm : float
        Ring of normal tissue around the PTV (distance from the PTV surface, mm) ...
    ring_level : float
        ... penalised above ``ring_level x the lowest prescription``.
    beamlet_margin_mm : float
        Margin around the PTV for the candidate beamlets (mm).
    modulation_factor_cap : float
        Maximum modulation factor (longest / mean non-zero leaf-open time).
    influence_threshold : float or None
        Relative-dose threshold of the influence matrix (None: its default).
    far_field_step : int or None
        Add the far-field complement of the thresholded matrix on every ``step``-th voxel
        (restores the scatter tail the threshold drops, about 13 % of the target dose and more
        in low-dose regions); None: matrix only.
    correction_rounds : int
        Most rounds of collapsed-cone correction: the plan's collapsed-cone dose minus the
        optimiser's model dose is added as a fixed offset and the sinogram re-optimised (0: pencil
        beam only). Every plan is evaluated against the protocol on its collapsed-cone dose
        (normalised like the demo: :func:`normalisation_scale`); the terms of the constraints it
        misses or meets with less than ``reweight_margin`` are re-weighted before the next round.
    correction_iterations : int
        L-BFGS-B iterations of each correction round (warm-started from the previous sinogram).
    reweight_factor : float
        Weight multiplier of the terms of a constraint met with a relative margin below
        ``reweight_margin`` (squared when it is missed by more than 10 %).
    reweight_margin : float
        Relative margin (margin / limit) a constraint should keep on the collapsed-cone dose.
    max_weight_factor : float
        Cap on the accumulated re-weighting of any term.
    stop_when_passing : bool
        Stop the correction rounds as soon as a plan meets every constraint with ``reweight_margin``.
    """

    max_iterations: int = 200
    target_weight: float = 1000.0
    hotspot_weight: float = 5.0
    oar_weight: float = 10.0
    mean_weight: float = 10.0
    ring_weight: float = 2.0
    target_level: float = 1.03
    hotspot_level: float = 1.12
    oar_margin: float = 0.9
    mean_margin: float = 0.75
    ring_inner_mm: float = 6.0
    ring_outer_mm: float = 30.0
    ring_level: float = 0.6
    beamlet_margin_mm: float = 3.0
    modulation_factor_cap: float = 3.0
    influence_threshold: float | None = None
    far_field_step: int | None = 6
    correction_rounds: int = 3
    correction_iterations: int = 100
    reweight_factor: float = 3.0
    reweight_margin: float = 0.03
    max_weight_factor: float = 100.0
    stop_when_passing: bool = True

    def __post_init__(self):
        for name in ("max_iterations", "correction_iterations"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        check_in_range("reweight_margin", self.reweight_margin, 0.0, 1.0)
        if self.reweight_factor < 1:
            raise ValueError(f"reweight_factor must be >= 1, got {self.reweight_factor}")
        if self.max_weight_factor < 1:
            raise ValueError(f"max_weight_factor must be >= 1, got {self.max_weight_factor}")
        for name in ("target_weight", "hotspot_weight", "oar_weight", "mean_weight", "ring_weight", "target_level",
                     "hotspot_level", "oar_margin", "mean_margin", "ring_outer_mm", "ring_level", "modulation_factor_cap"):
            check_positive(name, getattr(self, name))
        check_in_range("ring_inner_mm", self.ring_inner_mm, 0.0, self.ring_outer_mm)
        if isinstance(self.correction_rounds, bool) or not isinstance(self.correction_rounds, int) \
                or self.correction_rounds < 0:
            raise ValueError(f"correction_rounds must be an integer >= 0, got {self.correction_rounds!r}")
        if self.modulation_factor_cap < 1:
            raise ValueError(f"modulation_factor_cap must be >= 1, got {self.modulation_factor_cap}")


def _protocol_structures(protocol, structures) -> dict[str, Structure]:
    from tomodose.evaluation.protocol import derive_structures, resolve_structures

    found, _ = resolve_structures(protocol, structures)
    return derive_structures(protocol, found)


def build_terms(protocol, structures, settings: OptimisationSettings, *, options=None):
    """Objective terms and the voxel set they use.

    Returns
    -------
    voxels : (n,) int64
        Flat (C-order) indices of the optimiser's voxels on the structures' grid.
    terms : list of Term
    """
    allst = _protocol_structures(protocol, structures)
    opts = protocol.resolve_options(options)
    grid = next(iter(allst.values())).grid
    specs = []  # (name, kind, occupancy flat array, level, weight)
    targets = list(protocol.targets)
    rx_min = min(t.prescription_gy for t in targets)
    rx_max = max(t.prescription_gy for t in targets)
    for t in targets:
        if t.name not in allst:
            continue
        occ = allst[t.name].occupancy.ravel()
        served = tuple(c.id for c in protocol.constraints if c.prescription_of == t.name and c.operator in (">", ">="))
        specs.append((f"{t.name} under {settings.target_level:g}xRx", "under", occ,
                      settings.target_level * t.prescription_gy, settings.target_weight, served))
    primary = targets[0]
    if primary.name in allst:
        specs.append((f"{primary.name} hot spots", "over", allst[primary.name].occupancy.ravel(),
                      settings.hotspot_level * rx_max, settings.hotspot_weight, ()))
    # organs at risk and normal liver: the goal (or the hard limit when there is no goal) with a margin
    for c in protocol.constraints:
        limit = c.goal if c.goal is not None else c.hard
        if limit is None or c.operator not in ("<", "<="):
            continue
        name = protocol.resolve_structure_name(c.structure, opts)
        if name not in allst or c.unit != "Gy":
            continue
        occ = allst[name].occupancy.ravel()
        metric = c.metric.replace(" ", "")
        level = (settings.mean_margin if metric.lower() == "dmean" else settings.oar_margin) * limit
        if metric.lower() == "dmean":
            specs.append((f"{name} mean < {level:.3g}", "mean", occ, level, settings.mean_weight, (c.id,)))
        elif metric.upper().startswith("D") and ("cc" in metric or metric.lower() == "dmax"):
            specs.append((f"{name} max < {level:.3g}", "over", occ, level, settings.oar_weight, (c.id,)))
    # ring of normal tissue around the PTV
    if "PTV" in allst:
        from tomodose.geometry.structures import expand_margin

        ptv_mask = allst["PTV"].mask
        outer = expand_margin(ptv_mask, grid, settings.ring_outer_mm)
        inner = expand_margin(ptv_mask, grid, settings.ring_inner_mm) if settings.ring_inner_mm > 0 else ptv_mask
        ring = outer & ~inner
        if "Body" in allst:
            ring &= allst["Body"].occupancy >= 0.5
        specs.append(("ring around PTV", "over", ring.ravel().astype(np.float32),
                      settings.ring_level * rx_min, settings.ring_weight, ()))
    used = np.zeros(grid.n_voxels, dtype=bool)
    for spec in specs:
        used |= spec[2] > 0
    voxels = np.flatnonzero(used)
    position = np.full(grid.n_voxels, -1, dtype=np.int64)
    position[voxels] = np.arange(voxels.size)
    terms = []
    for name, kind, occ, level, weight, served in specs:
        idx = np.flatnonzero(occ > 0)
        terms.append(Term(name, kind, position[idx], occ[idx].astype(np.float64), float(level), float(weight),
                          served))
    return voxels, terms


def optimise_sinogram(matrix, terms, *, x0=None, max_iterations: int = 200, far_field=None, offset_gy=None,
                      progress: bool | None = None):
    """Minimise the objective over leaf-open fractions in [0, 1] (L-BFGS-B).

    Parameters
    ----------
    matrix : scipy.sparse matrix (n_voxels_used, n_beamlets), Gy per unit leaf-open fraction
    terms : list of Term
    x0 : (n_beamlets,) float, optional
        Start (default 0.5 everywhere).
    far_field : tuple (interp, values), optional
        Low-resolution complement of a thresholded matrix: the dose is
        ``matrix @ x + interp @ (values @ x)`` with ``interp`` (n_voxels_used, n_nodes) sparse and
        ``values`` (n_nodes, n_beamlets) dense (see :func:`tomodose.transport.influence.far_field_operator`).
    offset_gy : (n_voxels_used,) float, optional
        Fixed dose added to the model dose (the correction toward the collapsed cone).

    Returns
    -------
    x : (n_beamlets,) float64 in [0, 1]
    history : list of float
        Objective after each accepted iterate (first entry: start).
    """
    from tomodose import config

    a = matrix.tocsr()
    at = a.T.tocsr()
    n = a.shape[1]
    x0 = np.full(n, 0.5) if x0 is None else np.clip(np.asarray(x0, dtype=np.float64), 0.0, 1.0)

    if far_field is not None:
        f_interp = sparse.csr_matrix(far_field[0])
        f_interp_t = f_interp.T.tocsr()
        f_values = np.asarray(far_field[1], dtype=np.float64)

        def dose_of(x):
            return a @ x + f_interp @ (f_values @ x)

        def grad_of(g):
            return at @ g + f_values.T @ (f_interp_t @ g)
    else:
        def dose_of(x):
            return a @ x

        def grad_of(g):
            return at @ g

    offset = 0.0 if offset_gy is None else np.asarray(offset_gy, dtype=np.float64)

    def fun(x):
        f, g_dose, _ = evaluate_terms(terms, dose_of(x) + offset)
        return f, grad_of(g_dose)

    history = [fun(x0)[0]]
    bar = None
    if config.progress_enabled(progress):
        from tqdm.auto import tqdm

        bar = tqdm(total=max_iterations, desc="optimisation", unit="it")

    def callback(xk):
        history.append(fun(xk)[0])
        if bar is not None:
            bar.update(1)
            bar.set_postfix(objective=f"{history[-1]:.4g}")

    try:
        res = optimize.minimize(fun, x0, jac=True, method="L-BFGS-B", bounds=[(0.0, 1.0)] * n,
                                callback=callback, options={"maxiter": max_iterations, "ftol": 1e-10, "gtol": 1e-8})
    finally:
        if bar is not None:
            bar.close()
    log.info("optimisation: %d iterations, objective %.5g -> %.5g (%s)", res.nit, history[0], history[-1], res.message)
    return np.clip(res.x, 0.0, 1.0), history


def make_deliverable(x, *, projection_duration_s: float, gantry_period_s: float, machine,
                     modulation_factor_cap: float):
    """Deliverable leaf-open fractions and gantry period.

    Steps: (1) cap the modulation factor (longest / mean non-zero opening) by clipping the
    longest openings; (2) shorten the gantry period so the longest opening fills its projection,
    within the machine's period range (dose per beamlet = fraction x period stays the same);
    (3) openings shorter than ``machine.min_leaf_open_time_s`` are rounded to 0 (below half the
    minimum) or to the minimum.

    Returns
    -------
    x_new : (n,) float
        Leaf-open fractions for the new period.
    period_s : float
    report : dict
        What changed: clipped and rounded beamlet counts, modulation factor, period.
    """
    x = np.asarray(x, dtype=np.float64).copy()
    report = {}
    t = x * gantry_period_s  # leaf-open time x 51 (proportional to delivered fluence)
    clipped = 0
    nz = t[t > 0]
    if nz.size and nz.max() > modulation_factor_cap * nz.mean():
        # the clip level c solves c = cap * mean(min(t, c)) over the open beamlets; the right side
        # grows more slowly than c, so bisection on [0, max] finds the unique root
        lo_c, hi_c = 0.0, float(nz.max())
        for _ in range(100):
            c = 0.5 * (lo_c + hi_c)
            if c < modulation_factor_cap * np.minimum(nz, c).mean():
                lo_c = c
            else:
                hi_c = c
        over = t > lo_c
        clipped = int(over.sum())
        t[over] = lo_c
    report["modulation_clipped_beamlets"] = clipped
    lo, hi = machine.gantry_period_range_s
    period = float(np.clip(t.max() if t.size and t.max() > 0 else gantry_period_s, lo, hi))
    x_new = np.clip(t / period, 0.0, 1.0)
    report["gantry_period_s"] = period
    n_proj = machine.projections_per_rotation
    x_min = machine.min_leaf_open_time_s / (period / n_proj)
    small = (x_new > 0) & (x_new < x_min)
    to_zero = small & (x_new < 0.5 * x_min)
    to_min = small & ~to_zero
    x_new[to_zero] = 0.0
    x_new[to_min] = x_min
    report.update(min_leaf_open_fraction=x_min, rounded_to_zero=int(to_zero.sum()), rounded_up=int(to_min.sum()))
    nzf = x_new[x_new > 0]
    report["modulation_factor"] = float(nzf.max() / nzf.mean()) if nzf.size else 0.0
    return x_new, period, report


def normalisation_scale(protocol, dose, structures) -> float:
    """Scale factor that normalises ``dose`` by the protocol's coverage rule (as the demo does).

    The prescription isodose of the primary target is made to cover the protocol's
    ``normalisation_coverage_percent`` (default 96.5 %) of it; the factor aims one DVH bin above
    the prescription so that the voxels that make up the coverage land above it (a steep DVH
    riser can otherwise hold ~0.5 % of a small target).

    Parameters
    ----------
    protocol : Protocol
    dose : ImageVolume
        Dose (Gy, whole course).
    structures : mapping name -> Structure
        On the dose grid; protocol aliases are resolved.

    Returns
    -------
    float
    """
    from tomodose.evaluation.dvh import DEFAULT_BIN_WIDTH_GY
    from tomodose.evaluation.protocol import normalise_to_coverage

    primary = protocol.targets[0]
    allst = _protocol_structures(protocol, structures)
    coverage = float(protocol.parameters.get("normalisation_coverage_percent", 96.5)) / 100.0
    scale = normalise_to_coverage(dose, allst[primary.name], primary.prescription_gy, coverage)
    return scale * (1.0 + DEFAULT_BIN_WIDTH_GY / primary.prescription_gy)


def _relative_margin(r) -> float | None:
    """Smallest relative margin of a constraint result over its goal and hard limit (None: info row).

    margin / |limit|, except for lower limits on a volume percentage (coverage: "V94%Rx >= 97 %"),
    where it is margin / (100 - limit): the share of the allowed under-covered volume left unused.
    """
    out = []
    for margin, limit in ((r.margin_goal, r.goal), (r.margin_hard, r.hard)):
        if margin is None or not limit:
            continue
        if r.unit == "%" and r.operator in (">", ">=") and limit < 100.0:
            out.append(margin / (100.0 - limit))
        else:
            out.append(margin / abs(limit))
    return min(out) if out else None


def _plan_score(evaluation, margin: float, steerable):
    """Sort key of a plan on its collapsed-cone evaluation (smaller is better): hard failures, goal
    misses, steerable constraints tighter than ``margin``, minus the worst steerable relative margin."""
    from tomodose.evaluation.protocol import GOAL_MISSED, HARD_FAILED

    counts = evaluation.counts()
    rel = [m for m in (_relative_margin(r) for r in evaluation.results if r.id in steerable) if m is not None]
    worst = min(rel) if rel else 0.0
    return (counts.get(HARD_FAILED, 0), counts.get(GOAL_MISSED, 0), sum(m < margin for m in rel), -worst)


def optimise_plan(patient, template: HelicalPlan, protocol, *, settings: OptimisationSettings | None = None,
                  options=None, progress: bool | None = None, return_dose: bool = False):
    """Optimise the sinogram of ``template`` (geometry, period, fractions) for ``patient``.

    Steps: pencil-beam influence matrix (+ far-field complement) -> L-BFGS-B -> deliverable
    sinogram; then up to ``settings.correction_rounds`` rounds, each of which computes the plan's
    collapsed-cone dose, normalises it by the protocol's coverage rule (:func:`normalisation_scale`),
    evaluates the protocol, stops when every constraint holds with ``settings.reweight_margin``
    (relative), and otherwise re-weights the terms of the constraints that are missed or tight,
    adds the collapsed-cone minus model dose as a fixed offset and re-optimises (warm start). The
    plans are compared on their collapsed-cone evaluation (fewest hard failures, then goal misses,
    then tight constraints, then the largest worst relative margin) and the best one is returned.

    Parameters
    ----------
    patient : PatientModel
    template : HelicalPlan
        Geometry, gantry period and fractions (its sinogram is ignored).
    protocol : Protocol
    settings : OptimisationSettings, optional
    options : mapping, optional
        Protocol option overrides.
    progress : bool, optional
    return_dose : bool
        Also return the collapsed-cone :class:`~tomodose.dose.result.DoseResult` of the returned
        plan (un-normalised; None when ``correction_rounds`` is 0), so callers need not recompute it.

    Returns
    -------
    plan : HelicalPlan
        With the optimised, deliverable sinogram (and possibly a shorter gantry period).
    info : dict
        ``objective_history`` (first optimisation; monotonic), ``correction_rounds`` (one record
        per collapsed-cone evaluation: verdict counts, tightest constraints, re-weighted
        constraints, objective history of the re-optimisation, pencil beam vs collapsed cone),
        ``selected_round``, ``pb_vs_ccc`` of the returned plan, per-term values before/after the
        deliverability step, beamlet and voxel counts, timings.
    dose : DoseResult or None
        Only with ``return_dose=True``.
    """
    from tomodose.dose.calibration import calibration_factor
    from tomodose.transport.influence import influence_matrix

    settings = settings or OptimisationSettings()
    if not isinstance(template, HelicalPlan):
        raise TypeError(f"template must be a HelicalPlan, got {type(template).__name__}")
    info: dict = {"timings_s": {}}
    t0 = time.perf_counter()
    voxels, terms = build_terms(protocol, patient.structures, settings, options=options)
    kw = {} if settings.influence_threshold is None else {"threshold": settings.influence_threshold}
    a_full, (proj, leaf) = influence_matrix(patient, template, target=patient.structures["PTV"],
                                            margin_mm=settings.beamlet_margin_mm, progress=progress,
                                            return_beamlets=True, **kw)
    info["timings_s"]["influence_matrix"] = time.perf_counter() - t0
    k = calibration_factor("pencil_beam", machine=template.machine)
    # influence per unit leaf-open fraction of the template's projection duration -> Gy whole course
    gy = np.float32(k * template.n_fractions)
    a = (a_full.tocsr()[voxels, :] * gy).astype(np.float32)
    far = None
    if settings.far_field_step is not None:
        from tomodose.transport.influence import far_field_operator

        t0 = time.perf_counter()
        ff = far_field_operator(patient, template, a_full, proj, leaf, step=settings.far_field_step,
                                progress=progress)
        far = (ff.interp.tocsr()[voxels, :] * float(gy), ff.values)
        info["timings_s"]["far_field"] = time.perf_counter() - t0
    del a_full
    info.update(n_beamlets=int(a.shape[1]), n_voxels=int(a.shape[0]), nnz=int(a.nnz))
    log.info("optimisation: %d beamlets x %d voxels (%d non-zeros)", a.shape[1], a.shape[0], a.nnz)

    def dose_of(v):
        return a @ v if far is None else a @ v + far[0] @ (far[1] @ v)

    # structures whose mean doses compare the optimiser's model with the collapsed cone
    allst = _protocol_structures(protocol, patient.structures)
    opts = protocol.resolve_options(options)
    position = np.full(patient.grid.n_voxels, -1, dtype=np.int64)
    position[voxels] = np.arange(voxels.size)
    compare = {}
    for cname in [t.name for t in protocol.targets] + [protocol.resolve_structure_name("{normal_liver}", opts),
                                                      "ProtectedLiver"]:
        if cname in allst and cname not in compare:
            occ = allst[cname].occupancy.ravel()
            idx = np.flatnonzero(occ > 0)
            if idx.size and np.all(position[idx] >= 0):
                compare[cname] = (position[idx], occ[idx].astype(np.float64))

    def pb_vs_ccc(x_eq, ccc_vox):
        model, matrix_only = dose_of(x_eq), a @ x_eq
        out = {}
        for cname, (rows, w) in compare.items():
            m_ccc = float(np.dot(w, ccc_vox[rows]) / w.sum())
            m_mod = float(np.dot(w, model[rows]) / w.sum())
            m_mat = float(np.dot(w, matrix_only[rows]) / w.sum())
            out[cname] = {"ccc_mean_gy": m_ccc, "model_mean_gy": m_mod, "matrix_only_mean_gy": m_mat,
                          "model_minus_ccc_percent": 100.0 * (m_mod - m_ccc) / m_ccc if m_ccc > 0 else float("nan"),
                          "matrix_only_minus_ccc_percent":
                              100.0 * (m_mat - m_ccc) / m_ccc if m_ccc > 0 else float("nan")}
        return out

    t0 = time.perf_counter()
    x, history = optimise_sinogram(a, terms, max_iterations=settings.max_iterations, far_field=far,
                                   progress=progress)
    info["timings_s"]["optimisation"] = time.perf_counter() - t0
    info["objective_history"] = history
    plan, x_equiv, deliver = _deliverable_plan(template, x, proj, leaf, settings)
    offset = None
    base_terms = terms
    # constraints the optimiser can steer: those served by a term, except the primary target's
    # coverage, which the normalisation sets (its margin is fixed by the coverage rule)
    primary = protocol.targets[0]
    steerable = {c for t in terms for c in t.constraints} - {
        c.id for c in protocol.constraints if c.prescription_of == primary.name and c.metric.replace(" ", "") == "V100%Rx"}
    rounds = []
    best = None  # (score, round index, plan, x, x_equiv, deliver, offset, dose)
    factors = {}  # constraint id -> accumulated weight factor
    n_rounds = int(settings.correction_rounds)
    from tomodose.dose import compute_dose
    from tomodose.evaluation.protocol import evaluate_protocol

    for round_ in range(n_rounds + 1 if n_rounds else 0):
        t0 = time.perf_counter()
        ccc = compute_dose(patient, plan, engine="collapsed_cone", progress=progress)
        ccc_vox = ccc.total.array.ravel()[voxels].astype(np.float64)
        scale = normalisation_scale(protocol, ccc.total, patient.structures)
        ev = evaluate_protocol(protocol, ccc.scaled(scale).total, patient.structures, options=options,
                               radiobiology=False)
        score = _plan_score(ev, settings.reweight_margin, steerable)
        rel = {r.id: _relative_margin(r) for r in ev.results if r.id in steerable}
        rel = {cid: m for cid, m in rel.items() if m is not None}
        tight = sorted(rel, key=rel.get)[:3]
        record = {"round": round_, "normalisation_factor": scale, "verdict": ev.overall, "counts": ev.counts(),
                  "tightest": {cid: {"value": next(r.value for r in ev.results if r.id == cid),
                                     "relative_margin": rel[cid]} for cid in tight},
                  "pb_vs_ccc": pb_vs_ccc(x_equiv, ccc_vox), "ccc_seconds": time.perf_counter() - t0}
        rounds.append(record)
        log.info("round %d: collapsed-cone verdict %s %s, tightest %s", round_, ev.overall, ev.counts(),
                 ", ".join(f"{cid} {100 * rel[cid]:+.1f} %" for cid in tight))
        if best is None or score < best[0]:
            best = (score, round_, plan, x, x_equiv, deliver, offset, ccc)
        passing = score[:3] == (0, 0, 0)
        if round_ == n_rounds or (passing and settings.stop_when_passing):
            break
        # re-weight the terms of the constraints that are missed or tight on the collapsed cone
        changed = {}
        for cid, m in rel.items():
            if m < settings.reweight_margin:
                f = settings.reweight_factor ** (2 if m < -0.1 else 1)
                new = min(factors.get(cid, 1.0) * f, settings.max_weight_factor)
                if new > factors.get(cid, 1.0):
                    changed[cid] = new
                    factors[cid] = new
        terms = [dataclasses.replace(t, weight=t.weight * max(factors.get(c, 1.0) for c in t.constraints))
                 if t.constraints else t for t in base_terms]
        offset = ccc_vox - dose_of(x_equiv)
        t1 = time.perf_counter()
        x, hist = optimise_sinogram(a, terms, x0=x, max_iterations=settings.correction_iterations, far_field=far,
                                    offset_gy=offset, progress=progress)
        plan, x_equiv, deliver = _deliverable_plan(template, x, proj, leaf, settings)
        record.update(reweighted=changed, objective_history=hist, optimisation_seconds=time.perf_counter() - t1)
        log.info("correction round %d: re-weighted %s; objective %.4g -> %.4g", round_ + 1,
                 {c: round(v, 2) for c, v in changed.items()} or "nothing", hist[0], hist[-1])
    info["correction_rounds"] = rounds
    dose = None
    if best is not None:
        _, sel, plan, x, x_equiv, deliver, offset, dose = best
        info["selected_round"] = sel
        info["pb_vs_ccc"] = rounds[sel]["pb_vs_ccc"]
        info["weight_factors"] = factors
    total_offset = 0.0 if offset is None else offset
    _, _, parts_before = evaluate_terms(terms, dose_of(x) + total_offset)
    f_after, _, parts_after = evaluate_terms(terms, dose_of(x_equiv) + total_offset)
    info["deliverability"] = {**deliver, "objective_before": float(sum(parts_before.values())),
                              "objective_after": f_after}
    info["terms_before"] = parts_before
    info["terms_after"] = parts_after
    if return_dose:
        return plan, info, dose
    return plan, info


def _deliverable_plan(template: HelicalPlan, x, proj, leaf, settings: OptimisationSettings):
    """Plan with the deliverable sinogram of ``x``; also the equivalent fractions at the template period."""
    x_del, period, deliver = make_deliverable(
        x, projection_duration_s=template.projection_duration_s, gantry_period_s=template.gantry_period_s,
        machine=template.machine, modulation_factor_cap=settings.modulation_factor_cap)
    # same fluence: fraction x period is preserved except for the deliverability changes
    x_equiv = x_del * period / template.gantry_period_s
    sino = np.zeros_like(np.asarray(template.sinogram, dtype=np.float64))
    sino[proj, leaf] = x_del
    return dataclasses.replace(template, sinogram=sino, gantry_period_s=period), x_equiv, deliver
