"""Clinical protocols as versioned TOML data files, and their evaluation on a dose.

The shipped protocol ``liver_hcc_5x10_shen2021`` (PGTV 50 Gy / PTV 30 Gy in 10 fractions)
lives in ``tomodose/data/protocols/``; :func:`load_protocol` takes a shipped name or a path
to a user's own file in the same format (schema in ``docs/evaluation.md``). Files are validated
at load with errors naming the file, the entry and the expectation.

Evaluation (:func:`evaluate_protocol`)
    1. structure names are matched to the protocol's canonical names (exact, then aliases,
       case-insensitively); missing required structures are an error, missing optional ones
       give "not evaluated" rows;
    2. the target nesting option is checked (default: PGTV inside PTV);
    3. derived structures are built (normal liver, PTV minus PGTV, combined kidneys/lungs);
    4. with ``coverage_use = "normalise"`` the dose is rescaled by :func:`normalise_to_coverage`;
    5. every constraint is evaluated on the structure's DVH: value, goal and hard limit,
       margins, verdict (``pass`` / ``goal missed`` / ``hard limit failed`` / ``info`` /
       ``not evaluated``) and a borderline flag (the verdict would change if the dose moved by
       one DVH bin).
"""

from __future__ import annotations

import logging
import math
import operator as _op
try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10 (pyproject: tomli)
    import tomli as tomllib
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Mapping

import numpy as np

from tomodose._validate import check_in_range, check_positive
from tomodose.evaluation.dvh import DEFAULT_BIN_WIDTH_GY, DVH, compute_dvh
from tomodose.evaluation.metrics import (
    evaluate_metric, gradient_index, homogeneity_index, metric_threshold_dose_gy,
    paddick_conformity_index, parse_metric, r50,
)
from tomodose.geometry.grid import ImageVolume
from tomodose.geometry.structures import Structure

__all__ = [
    "SCHEMA_VERSION",
    "ProtocolError",
    "Protocol",
    "Constraint",
    "Target",
    "ConstraintResult",
    "ProtocolEvaluation",
    "available_protocols",
    "load_protocol",
    "resolve_structures",
    "derive_structures",
    "check_target_nesting",
    "normalise_to_coverage",
    "evaluate_protocol",
    "DEFAULT_PROTOCOL",
]

log = logging.getLogger(__name__)

#: schema version this code reads
SCHEMA_VERSION = 1
#: shipped default protocol
DEFAULT_PROTOCOL = "liver_hcc_5x10_shen2021"
_OPERATORS = {"<": _op.lt, "<=": _op.le, ">": _op.gt, ">=": _op.ge}
_UNITS = ("Gy", "%", "cc", "%Rx")

PASS = "pass"
GOAL_MISSED = "goal missed"
HARD_FAILED = "hard limit failed"
INFO = "info"
NOT_EVALUATED = "not evaluated"


class ProtocolError(ValueError):
    """A protocol file or its binding to structures is invalid."""


@dataclass(frozen=True)
class Target:
    name: str
    prescription_gy: float
    source: str


@dataclass(frozen=True)
class Constraint:
    """One constraint row of a protocol (see the TOML file for the meaning of each field)."""

    id: str
    structure: str
    metric: str
    unit: str
    source: str
    operator: str | None = None
    goal: float | None = None
    hard: float | None = None
    prescription_of: str | None = None
    note: str = ""

    @property
    def is_info(self) -> bool:
        return self.hard is None and self.goal is None


@dataclass(frozen=True)
class Protocol:
    """A loaded, validated protocol (see module doc)."""

    id: str
    title: str
    version: str
    schema_version: int
    n_fractions: int
    description: str
    options: dict          # name -> {"default", "choices", "doc"}
    parameters: dict
    structures: dict       # canonical name -> {"required": bool, "aliases": [...]}
    derived: dict          # name -> {"op", "operands"}
    targets: tuple
    constraints: tuple
    radiobiology: dict
    references: tuple
    path: str = ""

    def option_defaults(self) -> dict:
        return {k: v["default"] for k, v in self.options.items()}

    def resolve_options(self, overrides: Mapping | None = None) -> dict:
        """Defaults updated with ``overrides``, each checked against its choices."""
        opts = self.option_defaults()
        for k, v in (overrides or {}).items():
            if k not in self.options:
                raise ProtocolError(f"unknown protocol option {k!r}; valid options are {sorted(self.options)}")
            if v not in self.options[k]["choices"]:
                raise ProtocolError(
                    f"option {k!r} must be one of {sorted(self.options[k]['choices'])}, got {v!r}")
            opts[k] = v
        return opts

    def target(self, name: str) -> Target:
        for t in self.targets:
            if t.name == name:
                return t
        raise ProtocolError(f"protocol {self.id!r} has no target {name!r}; targets are "
                            f"{[t.name for t in self.targets]}")

    def resolve_structure_name(self, name: str, options: Mapping) -> str:
        """Replace ``{option}`` placeholders by the structure the option's value selects."""
        if name.startswith("{") and name.endswith("}"):
            key = name[1:-1]
            if key not in self.options:
                raise ProtocolError(f"structure placeholder {name!r} names no option; options are {sorted(self.options)}")
            return self.options[key]["choices"][options[key]]
        return name


# --- loading ----------------------------------------------------------------------------
def _protocol_dir():
    """Traversable of the shipped protocols (``tomodose/data/protocols``)."""
    return resources.files("tomodose").joinpath("data", "protocols")


def available_protocols() -> list[str]:
    """Names of the protocols shipped with tomodose."""
    folder = _protocol_dir()
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def _req(d: Mapping, key: str, types, where: str):
    if key not in d:
        raise ProtocolError(f"{where}: missing required key {key!r}")
    v = d[key]
    if isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise ProtocolError(f"{where}: {key!r} must be {types}, got bool {v!r}")
    if not isinstance(v, types):
        raise ProtocolError(f"{where}: {key!r} must be {getattr(types, '__name__', types)}, got {v!r}")
    return v


def _num(d: Mapping, key: str, where: str, optional: bool = False):
    if optional and key not in d:
        return None
    v = _req(d, key, (int, float), where)
    if not math.isfinite(v):
        raise ProtocolError(f"{where}: {key!r} must be finite, got {v!r}")
    return float(v)


def load_protocol(name_or_path: str | Path = DEFAULT_PROTOCOL) -> Protocol:
    """Load and validate a protocol: a shipped name (see :func:`available_protocols`) or a path."""
    text_name = str(name_or_path)
    p = Path(text_name)
    if p.suffix == ".toml" or p.exists():
        if not p.is_file():
            raise FileNotFoundError(f"protocol file {str(p)!r} does not exist")
        raw = p.read_bytes()
        where = str(p)
    else:
        shipped = available_protocols()
        if text_name not in shipped:
            raise ProtocolError(f"protocol {text_name!r} is neither a file nor a shipped protocol; shipped: {shipped}")
        raw = _protocol_dir().joinpath(text_name + ".toml").read_bytes()
        where = f"{text_name}.toml (shipped)"
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"{where}: not valid TOML: {exc}") from None
    return parse_protocol(data, where)


def parse_protocol(data: Mapping, where: str = "protocol") -> Protocol:
    """Validate a protocol already parsed from TOML (a dict)."""
    sv = _req(data, "schema_version", int, where)
    if sv != SCHEMA_VERSION:
        raise ProtocolError(f"{where}: schema_version must be {SCHEMA_VERSION} (this tomodose), got {sv}")
    pid = _req(data, "id", str, where)
    n_fx = _req(data, "n_fractions", int, where)
    if n_fx < 1:
        raise ProtocolError(f"{where}: n_fractions must be >= 1, got {n_fx}")
    options = {}
    for k, o in data.get("options", {}).items():
        w = f"{where}: options.{k}"
        if not isinstance(o, Mapping):
            raise ProtocolError(f"{w} must be a table with default, choices and doc")
        choices = _req(o, "choices", Mapping, w)
        default = _req(o, "default", str, w)
        if default not in choices:
            raise ProtocolError(f"{w}: default {default!r} is not one of the choices {sorted(choices)}")
        options[k] = {"default": default, "choices": dict(choices), "doc": str(o.get("doc", "")).strip()}
    structures = {}
    for k, s in _req(data, "structures", Mapping, where).items():
        w = f"{where}: structures.{k}"
        aliases = s.get("aliases", [])
        if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
            raise ProtocolError(f"{w}: aliases must be a list of strings, got {aliases!r}")
        structures[k] = {"required": bool(s.get("required", False)), "aliases": list(aliases)}
    derived = {}
    for k, d in data.get("derived", {}).items():
        w = f"{where}: derived.{k}"
        op = _req(d, "op", str, w)
        if op not in ("minus", "union"):
            raise ProtocolError(f"{w}: op must be 'minus' or 'union', got {op!r}")
        operands = _req(d, "operands", list, w)
        if len(operands) < 2:
            raise ProtocolError(f"{w}: operands must list at least 2 structures, got {operands!r}")
        for o in operands:
            if o not in structures and o not in derived:
                raise ProtocolError(f"{w}: operand {o!r} is not a declared structure")
        if k in structures:
            raise ProtocolError(f"{w}: name clashes with a declared structure")
        derived[k] = {"op": op, "operands": list(operands)}
    targets = []
    for i, t in enumerate(_req(data, "targets", list, where)):
        w = f"{where}: targets[{i}]"
        name = _req(t, "name", str, w)
        if name not in structures:
            raise ProtocolError(f"{w}: target {name!r} is not a declared structure")
        rx = _num(t, "prescription_gy", w)
        if rx <= 0:
            raise ProtocolError(f"{w}: prescription_gy must be > 0, got {rx}")
        targets.append(Target(name, rx, _req(t, "source", str, w)))
    target_names = {t.name for t in targets}
    known = set(structures) | set(derived)
    constraints = []
    ids = set()
    for i, c in enumerate(_req(data, "constraints", list, where)):
        w = f"{where}: constraints[{i}]"
        cid = _req(c, "id", str, w)
        w = f"{where}: constraint {cid!r}"
        if cid in ids:
            raise ProtocolError(f"{w}: duplicate id")
        ids.add(cid)
        struct = _req(c, "structure", str, w)
        if struct.startswith("{"):
            key = struct.strip("{}")
            if key not in options:
                raise ProtocolError(f"{w}: placeholder {struct!r} names no option; options are {sorted(options)}")
            bad = [v for v in options[key]["choices"].values() if v not in known]
            if bad:
                raise ProtocolError(f"{w}: option {key!r} selects undeclared structure(s) {bad}")
        elif struct not in known:
            raise ProtocolError(f"{w}: structure {struct!r} is not declared under [structures] or [derived]")
        metric = _req(c, "metric", str, w)
        try:
            spec = parse_metric(metric)
        except ValueError as exc:
            raise ProtocolError(f"{w}: {exc}") from None
        unit = _req(c, "unit", str, w)
        if unit not in _UNITS:
            raise ProtocolError(f"{w}: unit must be one of {list(_UNITS)}, got {unit!r}")
        if unit != spec.unit:
            raise ProtocolError(f"{w}: metric {metric!r} gives {spec.unit!r}, but unit says {unit!r}")
        rx_of = c.get("prescription_of")
        if spec.needs_prescription and rx_of is None:
            raise ProtocolError(f"{w}: metric {metric!r} needs prescription_of = <target name>")
        if rx_of is not None and rx_of not in target_names:
            raise ProtocolError(f"{w}: prescription_of {rx_of!r} is not a target {sorted(target_names)}")
        goal = _num(c, "goal", w, optional=True)
        hard = _num(c, "hard", w, optional=True)
        oper = c.get("operator")
        if goal is not None or hard is not None:
            if oper not in _OPERATORS:
                raise ProtocolError(f"{w}: operator must be one of {list(_OPERATORS)}, got {oper!r}")
            if goal is not None and hard is not None:
                upper = oper in ("<", "<=")
                if (upper and goal > hard) or (not upper and goal < hard):
                    raise ProtocolError(f"{w}: goal {goal} must be stricter than hard limit {hard} for operator {oper!r}")
        elif oper is not None and oper not in _OPERATORS:
            raise ProtocolError(f"{w}: operator must be one of {list(_OPERATORS)}, got {oper!r}")
        constraints.append(Constraint(cid, struct, metric, unit, _req(c, "source", str, w), oper, goal, hard,
                                      rx_of, str(c.get("note", ""))))
    return Protocol(
        id=pid, title=str(data.get("title", pid)), version=str(data.get("version", "")),
        schema_version=sv, n_fractions=n_fx, description=str(data.get("description", "")).strip(),
        options=options, parameters=dict(data.get("parameters", {})), structures=structures,
        derived=derived, targets=tuple(targets), constraints=tuple(constraints),
        radiobiology=dict(data.get("radiobiology", {})),
        references=tuple(dict(r) for r in data.get("references", [])), path=where,
    )


# --- binding structures -----------------------------------------------------------------
def resolve_structures(protocol: Protocol, structures: Mapping[str, Structure]) -> tuple[dict, list]:
    """Match the available structures to the protocol's canonical names.

    Returns
    -------
    found : dict canonical name -> Structure (renamed to the canonical name)
    missing : list of canonical names of optional structures that are absent
    """
    lower = {}
    for name in structures:
        lower.setdefault(name.strip().lower(), name)
    found, missing, missing_required = {}, [], []
    for canon, spec in protocol.structures.items():
        hit = None
        for cand in [canon, *spec["aliases"]]:
            if cand.strip().lower() in lower:
                hit = lower[cand.strip().lower()]
                break
        if hit is None:
            (missing_required if spec["required"] else missing).append(canon)
            continue
        s = structures[hit]
        if s.is_empty:
            if spec["required"]:
                raise ProtocolError(f"structure {hit!r} (protocol name {canon!r}) is empty; the protocol requires it")
            log.warning("structure %r is empty: treated as missing", hit)
            missing.append(canon)
            continue
        found[canon] = s if s.name == canon else s.renamed(canon)
    if missing_required:
        raise ProtocolError(
            f"protocol {protocol.id!r} requires structure(s) {missing_required} (or an alias: "
            f"{ {m: protocol.structures[m]['aliases'] for m in missing_required} }); available: {list(structures)}"
        )
    return found, missing


def check_target_nesting(found: Mapping[str, Structure], mode: str = "gtv_margins", *,
                         tolerance_percent: float = 1.0, inner: str = "PGTV", outer: str = "PTV") -> float:
    """Check that the boost target sits inside the other one; return the % of it outside.

    ``mode="gtv_margins"``: ``inner`` (PGTV) inside ``outer`` (PTV); ``"as_written"``: the other
    way round; ``"none"``: no check (returns nan). Raises :class:`ProtocolError` when more than
    ``tolerance_percent`` of the contained structure lies outside the containing one.
    """
    if mode == "none":
        return float("nan")
    if mode not in ("gtv_margins", "as_written"):
        raise ProtocolError(f"target_nesting must be 'gtv_margins', 'as_written' or 'none', got {mode!r}")
    a, b = (inner, outer) if mode == "gtv_margins" else (outer, inner)
    if a not in found or b not in found:
        return float("nan")
    sa, sb = found[a], found[b]
    outside = np.clip(sa.occupancy - sb.occupancy, 0.0, 1.0).sum(dtype=np.float64)
    pct = 100.0 * float(outside / sa.occupancy.sum(dtype=np.float64))
    if pct > tolerance_percent:
        raise ProtocolError(
            f"target nesting {mode!r}: {pct:.2f} % of {a} lies outside {b} (tolerance {tolerance_percent} %); "
            f"expected {a} inside {b}. Choose the option target_nesting = "
            f"{'as_written' if mode == 'gtv_margins' else 'gtv_margins'!r} or 'none' if your targets are defined differently"
        )
    return pct


def _derive(protocol: Protocol, found: dict) -> dict:
    """Build derived structures (skipped when a required operand is missing)."""
    out = dict(found)
    for name, d in protocol.derived.items():
        ops = [out.get(o) for o in d["operands"]]
        if d["op"] == "union":
            present = [s for s in ops if s is not None]
            if not present:
                continue
            s = present[0]
            for t in present[1:]:
                s = s.union(t)
        else:
            if ops[0] is None:
                continue
            s = ops[0]
            for t in ops[1:]:
                if t is not None:
                    s = s.minus(t)
        if s.is_empty:
            log.warning("derived structure %r is empty", name)
            continue
        out[name] = s.renamed(name)
    return out


def derive_structures(protocol: Protocol, found: dict) -> dict:
    """The bound structures plus the protocol's derived ones (``[derived]``: normal liver, PTV
    minus PGTV, combined kidneys / lungs). Unions use the operands present; a ``minus`` whose
    first operand is absent, or an empty result, is left out."""
    return _derive(protocol, found)


# --- normalisation ----------------------------------------------------------------------
def normalise_to_coverage(dose: ImageVolume, structure: Structure, prescription_gy: float,
                          coverage: float = 0.96, *, bin_width_gy: float = DEFAULT_BIN_WIDTH_GY) -> float:
    """Scale factor ``s`` such that ``s x dose`` covers ``coverage`` of ``structure`` with the prescription.

    ``s = prescription_gy / D_(100 coverage)%`` (the DVH dose at that volume fraction).

    Parameters
    ----------
    dose : ImageVolume
        Dose (Gy).
    structure : Structure
        Target, on the dose grid.
    prescription_gy : float
    coverage : float
        Fraction of the target volume in (0, 1], default 0.96.
    """
    rx = check_positive("prescription_gy", prescription_gy)
    cov = check_in_range("coverage", coverage, 0.0, 1.0)
    if cov <= 0:
        raise ValueError(f"coverage must be in (0, 1], got {cov}")
    dvh = compute_dvh(dose, structure, bin_width_gy=bin_width_gy)
    d = dvh.dose_at_volume_percent(100.0 * cov)
    if d <= 0:
        raise ValueError(f"structure {structure.name!r}: D{100 * cov:g}% is 0 Gy, the dose cannot be normalised")
    return rx / d


# --- evaluation -------------------------------------------------------------------------
@dataclass(frozen=True)
class ConstraintResult:
    """Outcome of one constraint."""

    id: str
    structure: str
    metric: str
    unit: str
    operator: str | None
    goal: float | None
    hard: float | None
    value: float | None
    margin_goal: float | None
    margin_hard: float | None
    verdict: str
    borderline: bool
    source: str
    note: str = ""

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class ProtocolEvaluation:
    """Everything :func:`evaluate_protocol` found (rendered by :mod:`tomodose.report`)."""

    protocol: Protocol
    options: dict
    dose_name: str
    scale_factor: float
    bin_width_gy: float
    results: tuple
    dvhs: dict = field(repr=False)
    structure_volumes_ml: dict = field(default_factory=dict)
    plan_metrics: dict = field(default_factory=dict)
    radiobiology: dict = field(default_factory=dict)
    missing_structures: tuple = ()
    nesting_outside_percent: float = float("nan")

    @property
    def overall(self) -> str:
        verdicts = {r.verdict for r in self.results}
        for v in (HARD_FAILED, GOAL_MISSED):
            if v in verdicts:
                return v
        return PASS

    def counts(self) -> dict:
        out: dict[str, int] = {}
        for r in self.results:
            out[r.verdict] = out.get(r.verdict, 0) + 1
        return out


def _margin(value: float, limit: float | None, oper: str | None) -> float | None:
    if limit is None or oper is None:
        return None
    return (limit - value) if oper in ("<", "<=") else (value - limit)


def _verdict(value: float, c: Constraint) -> str:
    if c.is_info:
        return INFO
    f = _OPERATORS[c.operator]
    if c.hard is not None and not f(value, c.hard):
        return HARD_FAILED
    if c.goal is not None and not f(value, c.goal):
        return GOAL_MISSED
    return PASS


def _evaluate_constraint(c: Constraint, structure_name: str, dvh: DVH | None, rx: float | None,
                         bin_width: float) -> ConstraintResult:
    base = dict(id=c.id, structure=structure_name, metric=c.metric, unit=c.unit, operator=c.operator,
                goal=c.goal, hard=c.hard, source=c.source)
    if dvh is None:
        return ConstraintResult(**base, value=None, margin_goal=None, margin_hard=None,
                                verdict=NOT_EVALUATED, borderline=False,
                                note=f"structure {structure_name!r} is absent (optional)")
    spec = parse_metric(c.metric)
    value = evaluate_metric(dvh, spec, prescription_gy=rx)
    verdict = _verdict(value, c)
    borderline = False
    if verdict != INFO:
        limits = [x for x in (c.goal, c.hard) if x is not None]
        if spec.kind == "volume":
            alt = []
        elif spec.is_dose:
            step = bin_width if spec.unit == "Gy" else 100.0 * bin_width / rx
            alt = [value - step, value + step]
        else:
            d = metric_threshold_dose_gy(spec, rx)
            alt = [evaluate_metric(dvh, replace(spec, kind="volume_at_gy", value=dd), prescription_gy=rx)
                   for dd in (max(d - bin_width, 0.0), d + bin_width)]
        borderline = any(_verdict(a, c) != verdict for a in alt) or any(abs(value - x) <= 1e-12 for x in limits)
    return ConstraintResult(**base, value=float(value), margin_goal=_margin(value, c.goal, c.operator),
                            margin_hard=_margin(value, c.hard, c.operator), verdict=verdict,
                            borderline=bool(borderline), note=c.note)


def evaluate_protocol(
    protocol: Protocol | str | Path,
    dose: ImageVolume,
    structures: Mapping[str, Structure],
    *,
    options: Mapping | None = None,
    bin_width_gy: float = DEFAULT_BIN_WIDTH_GY,
    dose_name: str = "dose",
    radiobiology: bool = True,
) -> ProtocolEvaluation:
    """Evaluate ``protocol`` on ``dose`` (Gy) with ``structures`` (same grid); see the module doc.

    Parameters
    ----------
    protocol : Protocol, shipped name or path
    dose : ImageVolume
        Physical dose of the whole treatment (all fractions), Gy.
    structures : mapping name -> Structure
        E.g. a :class:`~tomodose.geometry.structures.StructureSet` or ``PatientModel.structures``.
    options : mapping, optional
        Overrides of the protocol's options (e.g. ``{"normal_liver": "liver_minus_ptv"}``).
    bin_width_gy : float
        DVH bin width (Gy); also the borderline band.
    """
    if not isinstance(protocol, Protocol):
        protocol = load_protocol(protocol)
    if not isinstance(dose, ImageVolume):
        raise TypeError(f"dose must be an ImageVolume, got {type(dose).__name__}")
    if dose.unit != "Gy":
        raise ValueError(f"dose must be in Gy, got unit {dose.unit!r}")
    bw = check_positive("bin_width_gy", bin_width_gy)
    opts = protocol.resolve_options(options)
    for name, s in structures.items():
        if not isinstance(s, Structure):
            raise TypeError(f"structures[{name!r}] must be a Structure, got {type(s).__name__}")
        dose.grid.require_same(s.grid, f"structure {name!r} and the dose")
    found, missing = resolve_structures(protocol, structures)
    params = protocol.parameters
    nesting = float("nan")
    if "target_nesting" in opts:
        nesting = check_target_nesting(found, opts["target_nesting"],
                                       tolerance_percent=float(params.get("nesting_tolerance_percent", 1.0)))
    allst = _derive(protocol, found)

    scale = 1.0
    if opts.get("coverage_use") == "normalise":
        primary = protocol.targets[0]
        cov = float(params.get("normalisation_coverage_percent", 96.0)) / 100.0
        scale = normalise_to_coverage(dose, allst[primary.name], primary.prescription_gy, cov, bin_width_gy=bw)
        log.info("dose normalised by %.5f so that %.1f %% of %s receives %.3g Gy", scale, 100 * cov,
                 primary.name, primary.prescription_gy)
        dose = dose.with_array(dose.array * scale)

    dvhs: dict[str, DVH] = {}

    def dvh_of(name: str) -> DVH | None:
        if name not in allst:
            return None
        if name not in dvhs:
            dvhs[name] = compute_dvh(dose, allst[name], bin_width_gy=bw)
        return dvhs[name]

    results = []
    for c in protocol.constraints:
        sname = protocol.resolve_structure_name(c.structure, opts)
        rx = protocol.target(c.prescription_of).prescription_gy if c.prescription_of else None
        results.append(_evaluate_constraint(c, sname, dvh_of(sname), rx, bw))
    for name in allst:  # every structure's DVH for the plot and the table
        dvh_of(name)

    plan_metrics = {}
    body = allst.get("Body")
    for t in protocol.targets:
        s = allst.get(t.name)
        if s is None:
            continue
        pm = {"prescription_gy": t.prescription_gy}
        d = dvhs[t.name]
        for k in ("D2%", "D50%", "D95%", "D98%"):
            pm[k] = evaluate_metric(d, k)
        pm["Dmean"], pm["Dmax"] = d.mean_gy, d.max_gy
        pm["HI"] = homogeneity_index(d)
        pm["Paddick_CI"] = paddick_conformity_index(dose, s, t.prescription_gy, body)
        try:
            pm["GI"] = gradient_index(dose, t.prescription_gy, body)
        except ValueError:
            pm["GI"] = float("nan")
        pm["R50%"] = r50(dose, s, t.prescription_gy, body)
        plan_metrics[t.name] = pm

    rb = {}
    if radiobiology and protocol.radiobiology:
        rb = _radiobiology(protocol, opts, dvhs, dvh_of)

    return ProtocolEvaluation(
        protocol=protocol, options=opts, dose_name=dose_name, scale_factor=scale, bin_width_gy=bw,
        results=tuple(results), dvhs=dvhs,
        structure_volumes_ml={k: float(v.volume_ml) for k, v in allst.items()},
        plan_metrics=plan_metrics, radiobiology=rb, missing_structures=tuple(missing),
        nesting_outside_percent=nesting,
    )


def _radiobiology(protocol: Protocol, opts: Mapping, dvhs: dict, dvh_of) -> dict:
    from tomodose.evaluation import radiobiology as rbm

    cfg = protocol.radiobiology
    sname = protocol.resolve_structure_name(str(cfg.get("structure", "NormalLiver")), opts)
    d = dvh_of(sname)
    if d is None:
        return {"structure": sname, "note": "structure absent: not evaluated"}
    ab = float(cfg.get("alpha_beta_liver_gy", rbm.DEFAULT_ALPHA_BETA_GY["Liver"]))
    n = protocol.n_fractions
    out = {"structure": sname, "alpha_beta_gy": ab, "n_fractions": n}
    for model in ("primary", "metastases"):
        out[f"ntcp_rild_{model}"] = rbm.lkb_ntcp(d, n, parameters=model, alpha_beta_gy=ab)
    out["lkb_model"] = str(cfg.get("lkb_model", "primary"))
    out["mean_eqd2_gy"] = rbm.convert_dvh(d, n, ab).mean_gy
    cv = rbm.critical_volume_rule(
        d, n, min_volume_ml=float(cfg.get("critical_volume_ml", 700.0)),
        threshold_gy=float(cfg.get("critical_volume_threshold_gy", 15.0)),
        threshold_fractions=cfg.get("critical_volume_threshold_fractions", 3), alpha_beta_gy=ab)
    out["critical_volume"] = cv.to_dict()
    tgt = {}
    for t in protocol.targets:
        if t.name in dvhs:
            td = dvhs[t.name]
            abt = rbm.DEFAULT_ALPHA_BETA_GY["target"]
            tgt[t.name] = {"alpha_beta_gy": abt,
                           "prescription_bed_gy": rbm.bed(t.prescription_gy, n, abt),
                           "prescription_eqd2_gy": rbm.eqd2(t.prescription_gy, n, abt),
                           "mean_eqd2_gy": rbm.convert_dvh(td, n, abt).mean_gy}
    out["targets"] = tgt
    return out
