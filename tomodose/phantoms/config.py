"""Named phantom configurations and TOML loading.

A phantom configuration is a TOML file with two tables::

    [phantom]
    name = "liver_default"
    builder = "liver"            # liver | water | slab | cylinder
    description = "..."

    [parameters]                 # keyword arguments of the builder (units in their names)
    target_diameter_mm = 50.0
    target_centre_mm = [-65.0, -10.0, 10.0]

The named configurations live as TOML files in the top-level ``phantoms/`` folder of the source
tree. The same configurations are built into this module (:data:`NAMED_CONFIGS`), so an
installed package that has no ``phantoms/`` folder still knows them; a test keeps the two equal.
"""

from __future__ import annotations

import copy
import inspect
import sys
from pathlib import Path

from tomodose.geometry.patient import PatientModel
from tomodose.phantoms.basic import cylinder_phantom, slab_phantom, water_box
from tomodose.phantoms.liver import liver_phantom

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["BUILDERS", "NAMED_CONFIGS", "PHANTOMS_DIR", "phantom_config", "build_phantom", "load_phantom",
           "available_phantoms"]

#: Builder name -> function returning a PatientModel.
BUILDERS = {
    "liver": liver_phantom,
    "water": water_box,
    "slab": slab_phantom,
    "cylinder": cylinder_phantom,
}

#: Top-level ``phantoms/`` folder of a source checkout (may not exist in an installed package).
PHANTOMS_DIR = Path(__file__).resolve().parents[2] / "phantoms"

_LIVER_COMMON = {"spacing_mm": 3.0, "seed": 0, "noise_hu": 5.0, "pgtv_margin_mm": 5.0, "ptv_margin_mm": 10.0}

#: Built-in copies of the TOML files in ``phantoms/`` (name -> {"phantom": ..., "parameters": ...}).
NAMED_CONFIGS: dict[str, dict] = {
    "liver_default": {
        "phantom": {"name": "liver_default", "builder": "liver"},
        "parameters": {"target_diameter_mm": 50.0, "target_centre_mm": [-65.0, -10.0, 10.0], **_LIVER_COMMON,
                       "protected_liver_distance_mm": 30.0},
    },
    "liver_small_far": {
        "phantom": {"name": "liver_small_far", "builder": "liver"},
        "parameters": {"target_diameter_mm": 30.0, "target_centre_mm": [-110.0, -5.0, 20.0], **_LIVER_COMMON,
                       "protected_liver_distance_mm": 30.0},
    },
    "liver_large": {
        "phantom": {"name": "liver_large", "builder": "liver"},
        "parameters": {"target_diameter_mm": 80.0, "target_centre_mm": [-75.0, -15.0, 10.0], **_LIVER_COMMON,
                       "protected_liver_distance_mm": 20.0},
    },
    "liver_near_stomach_heart": {
        "phantom": {"name": "liver_near_stomach_heart", "builder": "liver"},
        "parameters": {"target_diameter_mm": 30.0, "target_centre_mm": [0.0, -25.0, 43.0], **_LIVER_COMMON,
                       "protected_liver_distance_mm": 30.0},
    },
    "liver_dome_lung": {
        "phantom": {"name": "liver_dome_lung", "builder": "liver"},
        "parameters": {"target_diameter_mm": 60.0, "target_centre_mm": [-50.0, -12.0, 40.0], **_LIVER_COMMON,
                       "protected_liver_distance_mm": 30.0},
    },
    "water_box": {
        "phantom": {"name": "water_box", "builder": "water"},
        "parameters": {"size_mm": [200.0, 200.0, 200.0], "spacing_mm": 2.5, "air_margin_mm": 10.0, "hu": 0.0,
                       "noise_hu": 0.0, "seed": 0},
    },
    "slab": {
        "phantom": {"name": "slab", "builder": "slab"},
        "parameters": {"layers": [["water", 30.0], ["lung", 70.0], ["water", 20.0], ["bone", 20.0], ["water", 60.0]],
                       "lateral_size_mm": [300.0, 300.0], "spacing_mm": 2.5, "air_margin_mm": 10.0,
                       "noise_hu": 0.0, "seed": 0},
    },
    "cylinder": {
        "phantom": {"name": "cylinder", "builder": "cylinder"},
        "parameters": {"diameter_mm": 300.0, "length_mm": 150.0, "spacing_mm": 2.5,
                       "inserts": [["lung", 0.0, 80.0, 30.0], ["adipose", 90.0, 80.0, 30.0],
                                   ["bone", 180.0, 80.0, 30.0], ["air", 270.0, 80.0, 30.0]],
                       "background": "water", "air_margin_mm": 10.0, "noise_hu": 0.0, "seed": 0},
    },
}


def available_phantoms() -> list[str]:
    """Names of the named configurations (built in, plus any extra TOML in ``phantoms/``)."""
    names = set(NAMED_CONFIGS)
    if PHANTOMS_DIR.is_dir():
        names |= {p.stem for p in PHANTOMS_DIR.glob("*.toml")}
    return sorted(names)


def _read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"phantom config {str(path)!r} is not valid TOML: {exc}") from None
    return data


def _check_config(cfg: dict, source: str) -> dict:
    if not isinstance(cfg.get("phantom"), dict) or "builder" not in cfg["phantom"]:
        raise ValueError(f"phantom config {source} must have a [phantom] table with a 'builder' key "
                         f"(one of {sorted(BUILDERS)})")
    builder = cfg["phantom"]["builder"]
    if builder not in BUILDERS:
        raise ValueError(f"phantom config {source}: builder must be one of {sorted(BUILDERS)}, got {builder!r}")
    params = cfg.get("parameters", {})
    if not isinstance(params, dict):
        raise ValueError(f"phantom config {source}: [parameters] must be a table, got {type(params).__name__}")
    _check_parameters(builder, params, source)
    return cfg


def _check_parameters(builder: str, params: dict, source: str) -> None:
    sig = inspect.signature(BUILDERS[builder])
    allowed = [n for n in sig.parameters]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"phantom config {source}: unknown parameter(s) {unknown} for builder {builder!r}; "
                         f"allowed: {allowed}")


def phantom_config(name_or_path) -> dict:
    """The configuration dict of a named phantom or a TOML file.

    ``name_or_path`` is a path to a ``.toml`` file, or a name: first looked up as
    ``phantoms/<name>.toml`` in the source tree, then in :data:`NAMED_CONFIGS`.
    """
    text = str(name_or_path)
    path = Path(text)
    if path.suffix.lower() == ".toml" or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"phantom config file {text!r} does not exist")
        return _check_config(_read_toml(path), repr(text))
    candidate = PHANTOMS_DIR / f"{text}.toml"
    if candidate.is_file():
        return _check_config(_read_toml(candidate), repr(str(candidate)))
    if text in NAMED_CONFIGS:
        return copy.deepcopy(NAMED_CONFIGS[text])
    raise ValueError(f"phantom must be a TOML file or one of {available_phantoms()}, got {text!r}")


def build_phantom(builder: str, **parameters) -> PatientModel:
    """Call the builder named ``builder`` (``liver``, ``water``, ``slab``, ``cylinder``)."""
    if builder not in BUILDERS:
        raise ValueError(f"builder must be one of {sorted(BUILDERS)}, got {builder!r}")
    _check_parameters(builder, parameters, f"for builder {builder!r}")
    return BUILDERS[builder](**parameters)


def load_phantom(name_or_path, **overrides) -> PatientModel:
    """Build a phantom from a named configuration or a TOML file.

    Parameters
    ----------
    name_or_path : str or path
        A name from :func:`available_phantoms` (e.g. ``"liver_default"``) or a TOML file.
    **overrides
        Builder parameters replacing those of the file (e.g. ``spacing_mm=4.0``).
    """
    cfg = phantom_config(name_or_path)
    builder = cfg["phantom"]["builder"]
    params = dict(cfg.get("parameters", {}))
    params.update(overrides)
    if "name" not in params and cfg["phantom"].get("name"):
        params["name"] = str(cfg["phantom"]["name"])
    return build_phantom(builder, **params)
