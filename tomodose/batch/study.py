"""Studies: a table of cases (patient, plan, perturbation) and the settings they share.

A :class:`Study` holds :class:`Case` rows. Each case names

* a patient: a phantom (named configuration or TOML file, with builder-parameter overrides)
  or a volume file (a tomodose results ``.h5`` holding ``/patient``) - :class:`PhantomSpec`;
* a plan: jaw, pitch, gantry period and where the sinogram comes from (``"conformal"``,
  ``"optimised"`` against the protocol, a ``.npy`` sinogram file, or a results ``.h5`` holding a
  whole helical plan) - :class:`PlanSpec`;
* a delivery :class:`~tomodose.batch.perturbation.Perturbation`.

The study settings (:class:`StudySettings`: engine and its options, protocol and its options,
normalisation) apply to every case.

Identity by content
-------------------
Each case has a **content hash** (:meth:`Study.case_hash`): SHA-256 of a canonical JSON of
everything that determines its result - the resolved phantom builder and *all* its parameters
(a named phantom is expanded, so editing its TOML changes the hash), the SHA-256 of every input
file (volume, sinogram, plan, protocol), the plan parameters, the perturbation, the engine and
its options, the protocol options, the normalisation, the tomodose version and the batch
format version (:data:`BATCH_FORMAT_VERSION`). The case *name* is not part of it. Results are
stored as ``cases/<hash>.h5``; a re-run skips a case whose file exists with that hash, and a
changed case (any input above) gets a new hash and is computed again. Cases that share
patient, plan and settings form a *group* (:meth:`Study.group_hash`) whose shared inputs
(patient model, planned sinogram, normalisation factor) are prepared once.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from tomodose import __version__
from tomodose._validate import check_choice, check_positive
from tomodose.batch.perturbation import PERTURBATION_FIELDS, Perturbation

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["PhantomSpec", "PlanSpec", "Case", "StudySettings", "ClusterSettings", "Study", "load_study",
           "BATCH_FORMAT_VERSION", "NORMALISATIONS", "SINOGRAM_SOURCES", "file_sha256"]

#: Version of the batch case layout; part of every content hash (bump when results change meaning).
BATCH_FORMAT_VERSION = 1
#: ``"base"``: every case scaled by the factor that normalises its *unperturbed* plan to the
#: protocol's coverage (fixed monitor units: errors show as dose changes); ``"per_case"``: each case
#: renormalised on its own (hides dose-level errors); ``"none"``: calibrated dose as computed.
NORMALISATIONS = ("base", "per_case", "none")
#: Built-in sinogram sources (otherwise a file path).
SINOGRAM_SOURCES = ("conformal", "optimised")
#: Plan parameters a grid may vary.
PLAN_FIELDS = ("field_width_mm", "pitch", "gantry_period_s")


def file_sha256(path) -> str:
    """SHA-256 (hex) of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _canonical(value):
    """JSON-ready value with numbers as floats (``1`` and ``1.0`` hash alike) and sorted keys."""
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return repr(float(value))
    if hasattr(value, "item"):  # numpy scalar
        return _canonical(value.item())
    return str(value)


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(_canonical(obj), sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class PhantomSpec:
    """Where the patient model of a case comes from.

    Parameters
    ----------
    phantom : str or None
        Named phantom configuration (``tomodose.phantoms.available_phantoms()``) or a phantom TOML.
    overrides : dict
        Builder parameters replacing the configuration's (e.g. ``{"spacing_mm": 8.0}``).
    volume : str or None
        A tomodose results ``.h5`` with a ``/patient`` group (instead of ``phantom``).
    """

    phantom: str | None = "liver_default"
    overrides: dict = field(default_factory=dict)
    volume: str | None = None

    def __post_init__(self):
        if (self.phantom is None) == (self.volume is None):
            raise ValueError(f"a case needs exactly one of phantom or volume, got phantom={self.phantom!r}, "
                             f"volume={self.volume!r}")
        if not isinstance(self.overrides, dict):
            raise ValueError(f"phantom_overrides must be a table of builder parameters, got {self.overrides!r}")
        if self.volume is not None and self.overrides:
            raise ValueError(f"phantom_overrides apply to phantoms only, got {sorted(self.overrides)} with "
                             f"volume={self.volume!r}")
        if self.volume is not None and not Path(self.volume).is_file():
            raise FileNotFoundError(f"volume file {self.volume!r} does not exist")

    def identity(self) -> dict:
        """Content that determines the patient model (resolved configuration or file hash)."""
        if self.volume is not None:
            return {"volume_sha256": file_sha256(self.volume)}
        from tomodose.phantoms import phantom_config
        from tomodose.phantoms.config import _check_parameters

        cfg = phantom_config(self.phantom)
        builder = cfg["phantom"]["builder"]
        params = dict(cfg.get("parameters", {}))
        params.update(self.overrides)
        _check_parameters(builder, params, f"phantom {self.phantom!r} (phantom_overrides)")
        return {"builder": builder, "parameters": params, "name": cfg["phantom"].get("name", "")}

    def label(self) -> str:
        if self.volume is not None:
            return Path(self.volume).name
        extra = ",".join(f"{k}={v}" for k, v in sorted(self.overrides.items()))
        return f"{self.phantom}" + (f"[{extra}]" if extra else "")


@dataclass(frozen=True)
class PlanSpec:
    """The planned delivery of a case.

    Parameters
    ----------
    field_width_mm, pitch, gantry_period_s : float
        Nominal jaw (mm), pitch and gantry period (s) of a plan covering the PTV
        (:meth:`HelicalPlan.covering`, isocentre at the PTV centroid).
    sinogram : str
        ``"conformal"`` (every leaf that sees the PTV open; fast), ``"optimised"`` (optimised against
        the protocol, :func:`tomodose.optimisation.optimise_plan`; the optimiser may shorten the
        period), a ``.npy`` file with the (n_projections, 64) sinogram of the covering plan, or a
        results ``.h5`` holding a whole HelicalPlan (its jaw, pitch and period are then used).
    """

    field_width_mm: float = 25.0
    pitch: float = 0.287
    gantry_period_s: float = 40.0
    sinogram: str = "conformal"

    def __post_init__(self):
        for name in PLAN_FIELDS:
            object.__setattr__(self, name, check_positive(f"plan.{name}", getattr(self, name)))
        if not isinstance(self.sinogram, str) or not self.sinogram:
            raise ValueError(f"plan.sinogram must be one of {SINOGRAM_SOURCES} or a file path, got {self.sinogram!r}")
        if self.sinogram not in SINOGRAM_SOURCES:
            path = Path(self.sinogram)
            if path.suffix.lower() not in (".npy", ".h5", ".hdf5"):
                raise ValueError(f"plan.sinogram must be one of {SINOGRAM_SOURCES} or a .npy / .h5 file, "
                                 f"got {self.sinogram!r}")
            if not path.is_file():
                raise FileNotFoundError(f"plan.sinogram file {self.sinogram!r} does not exist")

    def identity(self) -> dict:
        d = {name: getattr(self, name) for name in PLAN_FIELDS}
        if self.sinogram in SINOGRAM_SOURCES:
            d["sinogram"] = self.sinogram
        else:
            d["sinogram_sha256"] = file_sha256(self.sinogram)
        return d


@dataclass(frozen=True)
class Case:
    """One row of a study: patient, plan and perturbation (``name`` is a label only)."""

    name: str
    phantom: PhantomSpec = field(default_factory=PhantomSpec)
    plan: PlanSpec = field(default_factory=PlanSpec)
    perturbation: Perturbation = field(default_factory=Perturbation)


def _engine_option_names(engine: str) -> tuple:
    """Keyword options :func:`tomodose.dose.compute_dose` passes to ``engine``."""
    import inspect

    if engine == "collapsed_cone":
        from tomodose.dose.engine import _ccc_engine as fn
    else:
        from tomodose.transport.pencil_beam import pencil_beam_dose as fn
    skip = {"patient", "seq", "patient_or_density", "projections", "beam_model", "kernel", "progress", "timings"}
    return tuple(n for n, p in inspect.signature(fn).parameters.items()
                 if n not in skip and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))


@dataclass(frozen=True)
class StudySettings:
    """Settings shared by every case.

    Parameters
    ----------
    engine : str
        ``"pencil_beam"`` (default: studies are many dose calculations and the errors studied are
        differences between deliveries of one plan, which the fast engine resolves; see
        ``docs/batch.md``) or ``"collapsed_cone"``.
    engine_options : dict
        Keyword options of the engine (e.g. ``{"far_field_step": 2}``, ``{"n_subsamples": 3}``).
    protocol : str or None
        Protocol name or TOML file (default: the shipped liver protocol).
    protocol_options : dict
        Protocol option overrides.
    normalisation : str
        One of :data:`NORMALISATIONS` (default ``"base"``).
    """

    engine: str = "pencil_beam"
    engine_options: dict = field(default_factory=dict)
    protocol: str | None = None
    protocol_options: dict = field(default_factory=dict)
    normalisation: str = "base"

    def __post_init__(self):
        from tomodose.dose.engine import ENGINES

        check_choice("engine", self.engine, ENGINES)
        check_choice("normalisation", self.normalisation, NORMALISATIONS)
        for name in ("engine_options", "protocol_options"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"{name} must be a table, got {getattr(self, name)!r}")
        allowed = _engine_option_names(self.engine)
        unknown = sorted(set(self.engine_options) - set(allowed))
        if unknown:
            raise ValueError(f"engine_options {unknown} are not options of the {self.engine} engine; "
                             f"allowed: {sorted(allowed)}")
        self.load_protocol().resolve_options(self.protocol_options)  # unknown option / value -> error

    def load_protocol(self):
        from tomodose.evaluation.protocol import load_protocol

        return load_protocol(self.protocol) if self.protocol else load_protocol()

    def protocol_bytes(self) -> bytes:
        """Raw content of the protocol file (validated by loading it)."""
        from tomodose.evaluation.protocol import DEFAULT_PROTOCOL, _protocol_dir

        self.load_protocol()
        name = self.protocol or DEFAULT_PROTOCOL
        p = Path(str(name))
        if p.suffix == ".toml" or p.exists():
            return p.read_bytes()
        return _protocol_dir().joinpath(str(name) + ".toml").read_bytes()

    def identity(self) -> dict:
        return {"engine": self.engine, "engine_options": self.engine_options,
                "protocol_sha256": hashlib.sha256(self.protocol_bytes()).hexdigest(),
                "protocol_options": self.protocol_options, "normalisation": self.normalisation}


@dataclass(frozen=True)
class ClusterSettings:
    """Where and how the cases run.

    Parameters
    ----------
    address : str or None
        Dask scheduler address (``tcp://host:8786``); ``None`` starts a LocalCluster.
    n_workers : int or None
        LocalCluster worker processes (default: CPU cores // threads_per_worker, at least 1).
    threads_per_worker : int
        numba threads of each worker (each worker runs one task at a time), default 1.
    retries : int
        Extra attempts of a task that raised (default 2).
    """

    address: str | None = None
    n_workers: int | None = None
    threads_per_worker: int = 1
    retries: int = 2

    def __post_init__(self):
        for name in ("n_workers", "threads_per_worker", "retries"):
            v = getattr(self, name)
            if name == "n_workers" and v is None:
                continue
            low = 0 if name == "retries" else 1
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"cluster.{name} must be an integer >= {low}, got {v!r}")
        if self.address is not None and not isinstance(self.address, str):
            raise ValueError(f"cluster.address must be a scheduler address string, got {self.address!r}")


@dataclass(frozen=True)
class Study:
    """A named table of cases with shared settings.

    Parameters
    ----------
    name : str
    cases : tuple of Case
    settings : StudySettings
    output_dir : str or None
        Default output folder (the TOML's ``study.output``, relative to the TOML file).
    cluster : ClusterSettings
    """

    name: str
    cases: tuple
    settings: StudySettings = field(default_factory=StudySettings)
    output_dir: str | None = None
    cluster: ClusterSettings = field(default_factory=ClusterSettings)

    def __post_init__(self):
        cases = tuple(self.cases)
        if not cases:
            raise ValueError("a study needs at least one case, got none")
        for c in cases:
            if not isinstance(c, Case):
                raise TypeError(f"cases must be Case objects, got {type(c).__name__}")
        object.__setattr__(self, "cases", cases)
        self.__dict__["_hash_cache"] = {}

    def _identity(self, case: Case) -> tuple[dict, dict]:
        cache = self.__dict__.setdefault("_hash_cache", {})
        if "settings" not in cache:
            cache["settings"] = self.settings.identity()
        key = id(case)
        if key not in cache:
            group = {"format": BATCH_FORMAT_VERSION, "tomodose": __version__, "phantom": case.phantom.identity(),
                     "plan": case.plan.identity(), "settings": cache["settings"]}
            cache[key] = (case, group)
        return cache[key][1], case.perturbation.to_dict()

    def group_hash(self, case: Case) -> str:
        """Content hash of the shared inputs of ``case`` (patient, plan, settings)."""
        return _digest(self._identity(case)[0])

    def case_hash(self, case: Case) -> str:
        """Content hash of ``case`` (see the module doc)."""
        group, pert = self._identity(case)
        return _digest({"group": group, "perturbation": pert})


# --- TOML ---------------------------------------------------------------------------------------
def _table(data: dict, key: str, where: str) -> dict:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ValueError(f"{where}: [{key}] must be a table, got {type(value).__name__}")
    return value


def _check_keys(table: dict, allowed, where: str) -> None:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def _path(value, root: Path) -> str:
    p = Path(str(value)).expanduser()
    return str(p if p.is_absolute() else (root / p))


def _phantom_value(value, root: Path) -> str:
    text = str(value)
    return _path(text, root) if text.lower().endswith(".toml") else text


def _plan_spec(values: dict, root: Path, where: str) -> PlanSpec:
    _check_keys(values, (*PLAN_FIELDS, "sinogram"), where)
    values = dict(values)
    sino = values.get("sinogram")
    if isinstance(sino, str) and sino not in SINOGRAM_SOURCES:
        values["sinogram"] = _path(sino, root)
    return PlanSpec(**values)


_CASE_KEYS = ("name", "phantom", "phantom_overrides", "volume", "plan", "perturbation")


def _case_from(base: dict, entry: dict, root: Path, where: str) -> Case:
    _check_keys(entry, _CASE_KEYS, where)
    merged = copy.deepcopy(base)
    for key in ("phantom_overrides", "plan", "perturbation"):
        if key in entry:
            if not isinstance(entry[key], dict):
                raise ValueError(f"{where}: {key} must be a table, got {entry[key]!r}")
            merged.setdefault(key, {}).update(entry[key])
    if "volume" in entry:
        merged.pop("phantom", None)
        merged["phantom_overrides"] = dict(entry.get("phantom_overrides", {}))
        merged["volume"] = entry["volume"]
    if "phantom" in entry:
        merged.pop("volume", None)
        merged["phantom"] = entry["phantom"]
    volume = merged.get("volume")
    phantom = None if volume is not None else merged.get("phantom", "liver_default")
    spec = PhantomSpec(phantom=None if phantom is None else _phantom_value(phantom, root),
                       overrides=dict(merged.get("phantom_overrides", {})),
                       volume=None if volume is None else _path(volume, root))
    plan = _plan_spec(merged.get("plan", {}), root, f"{where}.plan")
    pert = Perturbation.from_dict(merged.get("perturbation", {}), f"{where}.perturbation")
    name = entry.get("name")
    if name is None:
        name = pert.label()
    return Case(name=str(name), phantom=spec, plan=plan, perturbation=pert)


def _grid_cases(base: dict, grid: dict, root: Path, where: str) -> list[Case]:
    allowed = ("name", "phantom", *PLAN_FIELDS, *PERTURBATION_FIELDS)
    _check_keys(grid, allowed, where)
    prefix = grid.get("name")
    axes = []
    for key, values in grid.items():
        if key == "name":
            continue
        if key == "setup_shift_mm":
            ok = isinstance(values, list) and values and all(isinstance(v, list) for v in values)
            if not ok:
                raise ValueError(f"{where}.setup_shift_mm must be a list of [x, y, z] shifts (mm), got {values!r}")
        elif not isinstance(values, list) or not values:
            raise ValueError(f"{where}.{key} must be a non-empty list of values, got {values!r}")
        axes.append((key, values))
    if not axes:
        raise ValueError(f"{where}: a grid needs at least one parameter list; allowed: {sorted(allowed)}")
    cases = []
    for combo in itertools.product(*[v for _, v in axes]):
        entry: dict = {}
        label = []
        for (key, _), value in zip(axes, combo):
            if key == "phantom":
                entry["phantom"] = value
                label.append(str(value))
            elif key in PLAN_FIELDS:
                entry.setdefault("plan", {})[key] = value
                label.append(f"{key}={value}")
            else:
                entry.setdefault("perturbation", {})[key] = value
        case = _case_from(base, entry, root, where)
        text = " ".join(label + ([case.perturbation.label()] if "perturbation" in entry else []))
        cases.append(replace(case, name=f"{prefix}: {text}" if prefix else text or case.name))
    return cases


def study_from_dict(data: dict, root=".", source: str = "study") -> Study:
    """Build a :class:`Study` from the parsed TOML mapping (paths relative to ``root``)."""
    root = Path(root)
    _check_keys(data, ("study", "cluster", "base", "grid", "cases"), source)
    st = _table(data, "study", source)
    _check_keys(st, ("name", "output", "engine", "engine_options", "protocol", "protocol_options",
                     "normalisation"), f"{source} [study]")
    protocol = st.get("protocol")
    if isinstance(protocol, str) and protocol.lower().endswith(".toml"):
        protocol = _path(protocol, root)
    settings = StudySettings(engine=st.get("engine", "pencil_beam"), engine_options=dict(st.get("engine_options", {})),
                             protocol=protocol, protocol_options=dict(st.get("protocol_options", {})),
                             normalisation=st.get("normalisation", "base"))
    cl = _table(data, "cluster", source)
    _check_keys(cl, ("address", "n_workers", "threads_per_worker", "retries"), f"{source} [cluster]")
    cluster = ClusterSettings(address=cl.get("address") or None, n_workers=cl.get("n_workers"),
                              threads_per_worker=cl.get("threads_per_worker", 1), retries=cl.get("retries", 2))
    base = _table(data, "base", source)
    _check_keys(base, _CASE_KEYS[1:], f"{source} [base]")
    if "phantom" not in base and "volume" not in base:
        base = {**base, "phantom": "liver_default"}
    cases: list[Case] = []
    grids = data.get("grid", [])
    if isinstance(grids, dict):
        grids = [grids]
    if not isinstance(grids, list):
        raise ValueError(f"{source}: grid must be a table or an array of tables, got {type(grids).__name__}")
    for i, g in enumerate(grids):
        if not isinstance(g, dict):
            raise ValueError(f"{source}: grid[{i}] must be a table, got {type(g).__name__}")
        cases += _grid_cases(base, g, root, f"{source} grid[{i}]")
    entries = data.get("cases", [])
    if not isinstance(entries, list):
        raise ValueError(f"{source}: cases must be an array of tables ([[cases]]), got {type(entries).__name__}")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"{source}: cases[{i}] must be a table, got {type(entry).__name__}")
        cases.append(_case_from(base, entry, root, f"{source} cases[{i}]"))
    if not cases:
        cases.append(_case_from(base, {"name": "base"}, root, f"{source} [base]"))
    # unique names (content duplicates are allowed: they share one result)
    seen: dict[str, int] = {}
    named = []
    for c in cases:
        n = seen.get(c.name, 0)
        seen[c.name] = n + 1
        named.append(c if n == 0 else replace(c, name=f"{c.name} #{n + 1}"))
    output = st.get("output")
    name = str(st.get("name", Path(source).stem if source.endswith(".toml") else "study"))
    return Study(name=name, cases=tuple(named), settings=settings,
                 output_dir=None if output is None else _path(output, root), cluster=cluster)


def load_study(path) -> Study:
    """Read a study TOML file (format: ``docs/batch.md``); errors name the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"study file {str(path)!r} does not exist")
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"study file {str(path)!r} is not valid TOML: {exc}") from None
    study = study_from_dict(data, root=path.resolve().parent, source=str(path))
    if study.output_dir is None:
        study = replace(study, output_dir=str(path.resolve().parent / f"{path.stem}-results"))
    return study
