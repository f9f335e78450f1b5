"""Self-describing HDF5 results files (``format = "tomodose-results"``).

Layout (every dataset carries a ``units`` attribute; see ``docs/foundation.md``)::

    /                      attrs: format, format_version, tomodose_version, created_utc, git_sha, frame
    /patient               attrs: name, patient_position, density_table (JSON), grid attrs
      ct                   (nz, ny, nx) HU, attrs: units="HU", quantity, grid attrs
      structures/<key>     (nz, ny, nx) uint8 (binary 0/1) or float32 (fractional occupancy),
                           attrs: units="1", name, role, color, order, encoding, volume_ml
    /plan                  attrs: kind ("HelicalPlan" | "ProjectionSequence"), plan scalars,
                           fields_json (exact copy of all non-array fields)
      sinogram             (n, n_leaves) leaf-open fraction, units "1" (HelicalPlan only)
      machine              group, attrs: every TomoMachine field, machine_json
      projections/         explicit ProjectionSequence arrays: gantry_angle_deg, couch_mm,
                           leaf_open_fraction, duration_s, arc_deg, couch_travel_mm
    /dose/<key>            (nz, ny, nx) float32, attrs: units (e.g. "Gy"), quantity, name, grid attrs, ...
    /dvh/<key>             group; DVH objects: datasets dose_gy (bin edges), volume_ml (cumulative),
                           differential_ml; attrs kind="DVH", name, bin_width_gy, min_gy, max_gy, mean_gy.
                           Plain mappings: one dataset per array, scalars as attrs.
    /extra                 free-form: arrays -> datasets, scalars/strings -> attrs, dicts -> groups,
                           scipy.sparse matrices -> CSC groups (see :func:`write_sparse`)

Grid attrs are ``origin_mm`` (x, y, z; centre of voxel [0, 0, 0]), ``spacing_mm`` (x, y, z),
``shape`` (nz, ny, nx), ``frame`` ("LPS"), ``direction`` (identity, row-major 9 values).
Group keys are the names with ``/`` (and a leading ``.``) percent-escaped; the ``name`` attribute
holds the real name.

Files are written atomically (temporary file in the same folder, then :func:`os.replace`).
Readers refuse a file that is not HDF5 or is truncated, has another ``format``, or a newer
major ``format_version``. No pickle anywhere.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import h5py
import numpy as np
from scipy import sparse

from tomodose import __version__
from tomodose._atomic import atomic_path
from tomodose.delivery.machine import TomoMachine
from tomodose.delivery.plan import HelicalPlan, ProjectionSequence
from tomodose.geometry.density import DensityTable
from tomodose.geometry.grid import Grid, ImageVolume
from tomodose.geometry.patient import PatientModel
from tomodose.geometry.structures import Structure, StructureSet

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "Results",
    "write_results",
    "read_results",
    "write_sparse",
    "read_sparse",
    "write_json_attr",
    "read_json_attr",
    "write_grid_attrs",
    "read_grid_attrs",
    "atomic_h5",
]

log = logging.getLogger(__name__)

FORMAT_NAME = "tomodose-results"
FORMAT_VERSION = "1.0"
_SUPPORTED_MAJOR = 1
_COMPRESS_MIN = 4096  # compress datasets with at least this many elements

_PROJECTION_ARRAYS = {
    "gantry_angle_deg": "deg",
    "couch_mm": "mm",
    "leaf_open_fraction": "1",
    "duration_s": "s",
    "arc_deg": "deg",
    "couch_travel_mm": "mm",
}


# --- small helpers ----------------------------------------------------------------------------
def _key(name: str) -> str:
    """HDF5-safe link name of a free-text name."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    k = quote(name, safe=" -_+()[]|&,=:;@#!~^'")
    if k.startswith("."):
        k = "%2E" + k[1:]
    return k


def _units_from_name(name: str) -> str:
    """Unit implied by a name's suffix (``dose_gy`` -> ``Gy``), else ``"1"``."""
    n = name.lower()
    for suffix, unit in (("_gy", "Gy"), ("_ml", "mL"), ("_cc", "mL"), ("_mm", "mm"), ("_cm", "cm"),
                         ("_s", "s"), ("_deg", "deg"), ("_percent", "%"), ("_pct", "%"), ("_hu", "HU"),
                         ("_g_cm3", "g/cm3"), ("_gy_per_min", "Gy/min")):
        if n.endswith(suffix):
            return unit
    return "1"


def write_json_attr(obj: h5py.HLObject, name: str, value: Any) -> None:
    """Store ``value`` (JSON-serialisable) as a UTF-8 JSON string attribute ``name``."""
    obj.attrs[name] = json.dumps(value, sort_keys=True, allow_nan=True)


def read_json_attr(obj: h5py.HLObject, name: str, default: Any = None) -> Any:
    """Inverse of :func:`write_json_attr` (``default`` when absent)."""
    if name not in obj.attrs:
        return default
    raw = obj.attrs[name]
    if isinstance(raw, bytes):
        raw = raw.decode()
    return json.loads(str(raw))


def _attr_str(obj: h5py.HLObject, name: str, default: str = "") -> str:
    v = obj.attrs.get(name, default)
    return v.decode() if isinstance(v, bytes) else str(v)


def _dataset(group: h5py.Group, key: str, data, units: str, /, **attrs) -> h5py.Dataset:
    arr = np.asarray(data)
    kwargs = {}
    if arr.size >= _COMPRESS_MIN and arr.ndim >= 1:
        kwargs = {"compression": "gzip", "compression_opts": 4, "shuffle": True}
    ds = group.create_dataset(key, data=arr, **kwargs)
    ds.attrs["units"] = units
    for k, v in attrs.items():
        if v is not None:
            ds.attrs[k] = v
    return ds


def write_grid_attrs(obj: h5py.HLObject, grid: Grid) -> None:
    """Write ``origin_mm``, ``spacing_mm``, ``shape``, ``frame`` and ``direction`` attributes."""
    obj.attrs["origin_mm"] = np.asarray(grid.origin_mm, dtype=np.float64)
    obj.attrs["spacing_mm"] = np.asarray(grid.spacing_mm, dtype=np.float64)
    obj.attrs["shape"] = np.asarray(grid.shape, dtype=np.int64)
    obj.attrs["frame"] = grid.frame
    obj.attrs["direction"] = np.eye(3).ravel()


def read_grid_attrs(obj: h5py.HLObject) -> Grid:
    """Grid from the attributes written by :func:`write_grid_attrs`."""
    for k in ("origin_mm", "spacing_mm", "shape"):
        if k not in obj.attrs:
            raise ValueError(f"HDF5 object {obj.name!r} lacks the grid attribute {k!r}")
    direction = np.asarray(obj.attrs.get("direction", np.eye(3).ravel()), dtype=float)
    if not np.allclose(direction, np.eye(3).ravel()):
        raise ValueError(f"HDF5 object {obj.name!r} has a non-identity direction {direction.tolist()}")
    return Grid(
        shape=tuple(int(n) for n in obj.attrs["shape"]),
        spacing_mm=tuple(float(v) for v in obj.attrs["spacing_mm"]),
        origin_mm=tuple(float(v) for v in obj.attrs["origin_mm"]),
        frame=_attr_str(obj, "frame", "LPS"),
    )


def write_sparse(group: h5py.Group, name: str, matrix, units: str = "1") -> h5py.Group:
    """Store a sparse matrix as a CSC group ``name`` (datasets data, indices, indptr; attr shape).

    Parameters
    ----------
    group : h5py.Group
    name : str
    matrix : scipy.sparse matrix or array (any format; converted to CSC)
    units : str
        Unit of the stored values (the ``units`` attribute of ``data``).
    """
    if not sparse.issparse(matrix):
        raise TypeError(f"matrix must be a scipy.sparse matrix, got {type(matrix).__name__}")
    m = sparse.csc_matrix(matrix)
    m.sort_indices()
    g = group.create_group(name)
    g.attrs["format"] = "csc"
    g.attrs["shape"] = np.asarray(m.shape, dtype=np.int64)
    g.attrs["units"] = units
    _dataset(g, "data", m.data, units)
    _dataset(g, "indices", m.indices, "1")
    _dataset(g, "indptr", m.indptr, "1")
    return g


def read_sparse(group: h5py.Group) -> sparse.csc_matrix:
    """Inverse of :func:`write_sparse`."""
    if _attr_str(group, "format") != "csc":
        raise ValueError(f"HDF5 group {group.name!r} is not a CSC sparse matrix (format attribute "
                         f"{_attr_str(group, 'format')!r})")
    shape = tuple(int(n) for n in group.attrs["shape"])
    return sparse.csc_matrix((group["data"][()], group["indices"][()], group["indptr"][()]), shape=shape)


_GIT_SHA: str | None | bool = False


def _git_sha() -> str | None:
    global _GIT_SHA
    if _GIT_SHA is False:
        sha = None
        try:
            root = Path(__file__).resolve().parents[2]
            if (root / ".git").exists():
                out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                     timeout=5, check=False)
                if out.returncode == 0:
                    sha = out.stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            sha = None
        _GIT_SHA = sha
    return _GIT_SHA  # type: ignore[return-value]


@contextmanager
def atomic_h5(path) -> Iterator[h5py.File]:
    """Context manager: an ``h5py.File`` open for writing on a temporary file in the target's
    folder, moved onto ``path`` with :func:`os.replace` on success and deleted on any error
    (including ``KeyboardInterrupt``)."""
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as fh:
            yield fh


# --- writers ----------------------------------------------------------------------------------
def _write_patient(g: h5py.Group, patient: PatientModel) -> None:
    g.attrs["name"] = patient.name
    g.attrs["patient_position"] = patient.patient_position
    write_json_attr(g, "density_table", patient.density_table.to_dict())
    write_grid_attrs(g, patient.grid)
    ds = _dataset(g, "ct", patient.ct.array, patient.ct.unit, quantity=patient.ct.quantity or "ct_number")
    write_grid_attrs(ds, patient.grid)
    sg = g.create_group("structures")
    for order, (name, s) in enumerate(patient.structures.items()):
        occ = s.occupancy
        binary = bool(np.all((occ == 0) | (occ == 1)))
        data = occ.astype(np.uint8) if binary else occ.astype(np.float32)
        d = _dataset(sg, _key(name), data, "1", name=name, role=s.role, order=order,
                     encoding="binary_uint8" if binary else "occupancy_float32", volume_ml=s.volume_ml)
        if s.color is not None:
            d.attrs["color"] = np.asarray(s.color, dtype=np.float64)


def _json_value(v):
    if isinstance(v, dict):
        return {"__dict_items__": [[_json_value(k), _json_value(x)] for k, x in v.items()]}
    if isinstance(v, (tuple, list)):
        return [_json_value(x) for x in v]
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    return v


def _from_json_value(v):
    if isinstance(v, dict) and "__dict_items__" in v:
        return {_from_json_value(k): _from_json_value(x) for k, x in v["__dict_items__"]}
    if isinstance(v, list):
        return tuple(_from_json_value(x) for x in v)
    return v


def _scalar_attrs(obj: h5py.HLObject, values: dict) -> None:
    """Readable copies of simple values as attributes (numbers, strings, numeric tuples)."""
    for k, v in values.items():
        if isinstance(v, (bool, np.bool_)):
            obj.attrs[k] = bool(v)
        elif isinstance(v, (int, float, str, np.integer, np.floating)):
            obj.attrs[k] = v
        elif isinstance(v, (tuple, list)) and v and all(isinstance(x, (int, float)) for x in v):
            obj.attrs[k] = np.asarray(v)


def _write_machine(g: h5py.Group, machine: TomoMachine) -> None:
    mg = g.create_group("machine")
    values = {f.name: getattr(machine, f.name) for f in dataclasses.fields(machine)}
    _scalar_attrs(mg, values)
    jaw = machine.jaw_fwhm_mm
    mg.attrs["jaw_nominal_mm"] = np.asarray(list(jaw.keys()), dtype=np.float64)
    mg.attrs["jaw_real_fwhm_mm"] = np.asarray(list(jaw.values()), dtype=np.float64)
    write_json_attr(mg, "machine_json", {k: _json_value(v) for k, v in values.items()})


def _write_projections(g: h5py.Group, seq: ProjectionSequence) -> None:
    pg = g.create_group("projections")
    for name, unit in _PROJECTION_ARRAYS.items():
        _dataset(pg, name, getattr(seq, name), unit)
    pg.attrs["field_width_mm"] = seq.field_width_mm
    pg.attrs["isocentre_lps_mm"] = np.asarray(seq.isocentre_lps_mm)
    pg.attrs["patient_position"] = seq.patient_position
    pg.attrs["n_projections"] = seq.n_projections
    pg.attrs["treatment_time_s"] = seq.treatment_time_s


def _write_plan(g: h5py.Group, plan) -> None:
    if isinstance(plan, HelicalPlan):
        g.attrs["kind"] = "HelicalPlan"
        values = {f.name: getattr(plan, f.name) for f in dataclasses.fields(plan)
                  if f.name not in ("sinogram", "machine")}
        _scalar_attrs(g, values)
        write_json_attr(g, "prescriptions_gy", {name: dose for name, dose in plan.prescriptions})
        write_json_attr(g, "fields_json", {k: _json_value(v) for k, v in values.items()})
        write_json_attr(g, "summary", _json_value(plan.summary()))
        _dataset(g, "sinogram", plan.sinogram, "1", description="leaf-open fraction per projection and leaf")
        _write_machine(g, plan.machine)
        _write_projections(g, plan.projections())
    elif isinstance(plan, ProjectionSequence):
        g.attrs["kind"] = "ProjectionSequence"
        _write_machine(g, plan.machine)
        _write_projections(g, plan)
    else:
        raise TypeError(f"plan must be a HelicalPlan or ProjectionSequence, got {type(plan).__name__}")


def _write_volume(group: h5py.Group, name: str, vol: ImageVolume, dtype=np.float32) -> None:
    if not isinstance(vol, ImageVolume):
        raise TypeError(f"doses[{name!r}] must be an ImageVolume, got {type(vol).__name__}")
    ds = _dataset(group, _key(name), vol.array.astype(dtype, copy=False), vol.unit, quantity=vol.quantity,
                  name=name)
    write_grid_attrs(ds, vol.grid)
    if vol.allow_nonfinite:
        ds.attrs["allow_nonfinite"] = True


def _write_mapping(g: h5py.Group, mapping: dict, what: str) -> None:
    for k, v in mapping.items():
        if not isinstance(k, str):
            raise TypeError(f"{what} keys must be strings, got {k!r}")
        key = _key(k)
        if sparse.issparse(v):
            sg = write_sparse(g, key, v, units=_units_from_name(k))
            sg.attrs["name"] = k
        elif isinstance(v, ImageVolume):
            _write_volume(g, k, v, dtype=v.array.dtype)
            g[key].attrs["kind"] = "ImageVolume"
        elif isinstance(v, dict):
            sub = g.create_group(key)
            sub.attrs["name"] = k
            _write_mapping(sub, v, f"{what}[{k!r}]")
        elif isinstance(v, np.ndarray) or (isinstance(v, (list, tuple)) and v and
                                           all(isinstance(x, (int, float, np.number)) for x in np.ravel(v))):
            arr = np.asarray(v)
            if arr.dtype == object:
                raise TypeError(f"{what}[{k!r}] must be a numeric array, got dtype object")
            _dataset(g, key, arr, _units_from_name(k), name=k)
        elif v is None:
            continue
        elif isinstance(v, (bool, int, float, str, np.integer, np.floating, np.bool_)):
            g.attrs[k] = v
        else:
            try:
                write_json_attr(g, k, _json_value(v))
                write_json_attr(g, "json_attrs", read_json_attr(g, "json_attrs", []) + [k])
            except TypeError:
                raise TypeError(
                    f"{what}[{k!r}] of type {type(v).__name__} cannot be stored (arrays, numbers, strings, "
                    "dicts, ImageVolume and scipy.sparse matrices are supported)"
                ) from None


def _write_dvh(g: h5py.Group, name: str, dvh) -> None:
    sub = g.create_group(_key(name))
    sub.attrs["name"] = name
    if hasattr(dvh, "differential_ml") and hasattr(dvh, "bin_width_gy"):
        sub.attrs["kind"] = "DVH"
        for attr in ("bin_width_gy", "min_gy", "max_gy", "mean_gy"):
            sub.attrs[attr] = float(getattr(dvh, attr))
        sub.attrs["structure"] = str(getattr(dvh, "name", name))
        sub.attrs["total_volume_ml"] = float(np.sum(dvh.differential_ml))
        _dataset(sub, "differential_ml", dvh.differential_ml, "mL",
                 description="volume (mL) with dose in [j w, (j + 1) w)")
        if hasattr(dvh, "edges_gy") and hasattr(dvh, "cumulative_ml"):
            _dataset(sub, "dose_gy", dvh.edges_gy, "Gy", description="bin edges")
            _dataset(sub, "volume_ml", dvh.cumulative_ml, "mL",
                     description="cumulative: volume receiving at least dose_gy")
    elif isinstance(dvh, dict):
        sub.attrs["kind"] = "mapping"
        _write_mapping(sub, dvh, f"dvhs[{name!r}]")
    else:
        raise TypeError(f"dvhs[{name!r}] must be a DVH or a dict of arrays, got {type(dvh).__name__}")


def write_results(path, *, patient: PatientModel | None = None, plan=None, doses: dict | None = None,
                  dvhs: dict | None = None, extra: dict | None = None) -> Path:
    """Write a results file atomically.

    Parameters
    ----------
    path : str or Path
        Output file (conventionally ``.h5``); its folder must exist. Replaced if present.
    patient : PatientModel, optional
    plan : HelicalPlan or ProjectionSequence, optional
    doses : dict of str -> ImageVolume, optional
        Dose distributions (stored as float32 in their unit, normally Gy).
    dvhs : dict of str -> DVH or dict of arrays, optional
    extra : dict, optional
        Free-form content (arrays, numbers, strings, nested dicts, ImageVolume, scipy.sparse).

    Returns
    -------
    Path of the written file.
    """
    if patient is not None and not isinstance(patient, PatientModel):
        raise TypeError(f"patient must be a PatientModel, got {type(patient).__name__}")
    if plan is not None and not isinstance(plan, (HelicalPlan, ProjectionSequence)):
        raise TypeError(f"plan must be a HelicalPlan or ProjectionSequence, got {type(plan).__name__}")
    for what, value in (("doses", doses), ("dvhs", dvhs), ("extra", extra)):
        if value is not None and not isinstance(value, dict):
            raise TypeError(f"{what} must be a dict, got {type(value).__name__}")
    path = Path(path)
    with atomic_h5(path) as f:
        f.attrs["format"] = FORMAT_NAME
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["tomodose_version"] = __version__
        f.attrs["created_utc"] = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        f.attrs["frame"] = "LPS"
        f.attrs["units_convention"] = "mm, Gy, s, deg, mL; DICOM patient LPS; IEC 61217 gantry/couch"
        sha = _git_sha()
        if sha:
            f.attrs["git_sha"] = sha
        if patient is not None:
            _write_patient(f.create_group("patient"), patient)
        if plan is not None:
            _write_plan(f.create_group("plan"), plan)
        if doses:
            dg = f.create_group("dose")
            for name, vol in doses.items():
                _write_volume(dg, name, vol)
        if dvhs:
            vg = f.create_group("dvh")
            for name, dvh in dvhs.items():
                _write_dvh(vg, name, dvh)
        if extra:
            _write_mapping(f.create_group("extra"), extra, "extra")
    log.info("wrote results file %s", path)
    return path


# --- readers ----------------------------------------------------------------------------------
@dataclass
class Results:
    """Content of a results file.

    Attributes
    ----------
    patient : PatientModel or None
    plan : HelicalPlan, ProjectionSequence or None
    doses : dict of str -> ImageVolume
    dvhs : dict of str -> DVH (when :mod:`tomodose.evaluation.dvh` is available) or dict
    extra : dict
    attrs : dict
        Root attributes (format, format_version, tomodose_version, created_utc, git_sha, ...).
    """

    patient: PatientModel | None = None
    plan: Any = None
    doses: dict = field(default_factory=dict)
    dvhs: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    attrs: dict = field(default_factory=dict)


def _open_checked(path: Path) -> h5py.File:
    if not path.is_file():
        raise FileNotFoundError(f"results file {str(path)!r} does not exist")
    try:
        is_h5 = h5py.is_hdf5(path)
    except OSError:
        is_h5 = False
    if not is_h5:
        raise ValueError(f"{str(path)!r} is not an HDF5 file (or its header is damaged); expected a "
                         f"{FORMAT_NAME} file")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise ValueError(f"{str(path)!r} cannot be opened as HDF5: the file is truncated or corrupt ({exc})") from None
    fmt = _attr_str(f, "format", "")
    if fmt != FORMAT_NAME:
        f.close()
        raise ValueError(f"{str(path)!r} has format {fmt!r}; expected {FORMAT_NAME!r}")
    version = _attr_str(f, "format_version", "")
    try:
        major = int(version.split(".")[0])
    except ValueError:
        f.close()
        raise ValueError(f"{str(path)!r} has an unreadable format_version {version!r}; expected 'MAJOR.MINOR'") from None
    if major > _SUPPORTED_MAJOR:
        f.close()
        raise ValueError(
            f"{str(path)!r} has format_version {version}, newer than this tomodose ({__version__}) reads "
            f"(major version {_SUPPORTED_MAJOR}); upgrade tomodose"
        )
    return f


def _read_patient(g: h5py.Group) -> PatientModel:
    ds = g["ct"]
    grid = read_grid_attrs(ds)
    ct = ImageVolume(grid, ds[()], _attr_str(ds, "units"), _attr_str(ds, "quantity"))
    items = []
    sg = g.get("structures")
    if sg is not None:
        entries = sorted(sg.values(), key=lambda d: int(d.attrs.get("order", 0)))
        for d in entries:
            name = _attr_str(d, "name", unquote(d.name.rsplit("/", 1)[-1]))
            occ = d[()].astype(np.float32)
            color = tuple(float(c) for c in d.attrs["color"]) if "color" in d.attrs else None
            items.append(Structure(name, grid, occ, _attr_str(d, "role"), color))
    table_dict = read_json_attr(g, "density_table")
    table = DensityTable.from_dict(table_dict) if table_dict else DensityTable.default()
    return PatientModel(ct, StructureSet(grid, items), _attr_str(g, "patient_position", "HFS"),
                        _attr_str(g, "name"), table)


def _read_machine(g: h5py.Group) -> TomoMachine:
    values = {k: _from_json_value(v) for k, v in read_json_attr(g, "machine_json").items()}
    valid = {f.name for f in dataclasses.fields(TomoMachine)}
    return TomoMachine(**{k: v for k, v in values.items() if k in valid})


def _read_plan(g: h5py.Group):
    kind = _attr_str(g, "kind")
    machine = _read_machine(g["machine"])
    if kind == "HelicalPlan":
        values = {k: _from_json_value(v) for k, v in read_json_attr(g, "fields_json").items()}
        valid = {f.name for f in dataclasses.fields(HelicalPlan)}
        return HelicalPlan(sinogram=g["sinogram"][()], machine=machine,
                           **{k: v for k, v in values.items() if k in valid})
    if kind == "ProjectionSequence":
        pg = g["projections"]
        arrays = {name: pg[name][()] for name in _PROJECTION_ARRAYS}
        return ProjectionSequence(
            **arrays, field_width_mm=float(pg.attrs["field_width_mm"]),
            isocentre_lps_mm=tuple(float(v) for v in pg.attrs["isocentre_lps_mm"]),
            patient_position=_attr_str(pg, "patient_position", "HFS"), machine=machine,
        )
    raise ValueError(f"/plan has an unknown kind {kind!r}; expected 'HelicalPlan' or 'ProjectionSequence'")


def _read_volume(d: h5py.Dataset) -> ImageVolume:
    return ImageVolume(read_grid_attrs(d), d[()], _attr_str(d, "units"), _attr_str(d, "quantity"),
                       allow_nonfinite=bool(d.attrs.get("allow_nonfinite", False)))


def _attr_value(v):
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.ndarray):
        return v
    if isinstance(v, np.generic):
        return v.item()
    return v


def _read_mapping(g: h5py.Group) -> dict:
    out: dict = {}
    for k, v in g.attrs.items():
        if k in ("name", "kind", "json_attrs"):
            continue
        out[k] = _attr_value(v)
    for k in read_json_attr(g, "json_attrs", []):
        out[k] = _from_json_value(read_json_attr(g, k))
    for key, item in g.items():
        name = _attr_str(item, "name", unquote(key))
        if isinstance(item, h5py.Group):
            if _attr_str(item, "format") == "csc":
                out[name] = read_sparse(item)
            else:
                out[name] = _read_mapping(item)
        elif _attr_str(item, "kind") == "ImageVolume":
            out[name] = _read_volume(item)
        else:
            out[name] = item[()]
    return out


def _read_dvh(g: h5py.Group):
    kind = _attr_str(g, "kind")
    if kind == "DVH":
        try:
            from tomodose.evaluation.dvh import DVH
        except ImportError:  # pragma: no cover - evaluation package absent
            DVH = None
        if DVH is not None:
            return DVH(_attr_str(g, "structure"), float(g.attrs["bin_width_gy"]), g["differential_ml"][()],
                       float(g.attrs["min_gy"]), float(g.attrs["max_gy"]), float(g.attrs["mean_gy"]))
    return _read_mapping(g)


def read_results(path) -> Results:
    """Read a file written by :func:`write_results`.

    Raises
    ------
    FileNotFoundError
        When ``path`` does not exist.
    ValueError
        When the file is not HDF5, is truncated, has another format, or a newer major version.
    """
    path = Path(path)
    with _open_checked(path) as f:
        try:
            res = Results(attrs={k: _attr_value(v) for k, v in f.attrs.items()})
            if "patient" in f:
                res.patient = _read_patient(f["patient"])
            if "plan" in f:
                res.plan = _read_plan(f["plan"])
            if "dose" in f:
                res.doses = {_attr_str(d, "name", unquote(k)): _read_volume(d) for k, d in f["dose"].items()}
            if "dvh" in f:
                res.dvhs = {_attr_str(d, "name", unquote(k)): _read_dvh(d) for k, d in f["dvh"].items()}
            if "extra" in f:
                res.extra = _read_mapping(f["extra"])
        except (OSError, KeyError) as exc:
            raise ValueError(f"{str(path)!r} is damaged or incomplete: {exc}") from None
    return res
