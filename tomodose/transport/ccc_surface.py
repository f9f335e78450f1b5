"""Surface correction of the collapsed-cone transport (issues 4 and 8).

The collapsed-cone point kernels were made in *infinite* water: the energy they carry far from the
interaction point includes photons scattered more than once whose paths crossed the space outside
the body; in a real patient those photons leave. The correction (``docs/collapsed_cone.md``,
section "Surface correction") gives every *slow* exponential term of the kernel (rate below
``slow_rate_per_cm``: the scattered-photon part) an extra **escape rate** along its transport
lines, ``escape_rate_per_cm * phi(s)`` per cm of radiological path, with

    phi(s) = exp(-s / decay_mm)   (s < cutoff_mm),   0   (s >= cutoff_mm),

``s`` the distance (mm) of the voxel to the body's exterior. The escaped energy is not deposited
(the correction only removes energy); deep inside (``s >= cutoff_mm``) the transport is exactly the
uncorrected one. Energy travelling along a surface loses most, energy going into depth quickly
leaves the surface layer. One map ``phi`` serves every transport direction, static and rotational
deliveries, and sees every face of a finite phantom.

``s`` is the Euclidean distance transform (grid spacing) of the filled body mask (density above
``body_threshold_g_cm3``, holes filled in 3-D and in every axial slice, so lungs are inside),
minus half the smallest voxel side (the distance from a voxel centre to the surface half a voxel
outside the last body voxel). **The grid boundary counts as exterior**, as it does for the
transport (energy reaching it leaves).

The parameters are fitted by ``kernels/derive_ccc_surface.py`` to the project's own Monte Carlo
pencil (``kernels/study_pb_pencil_mc.npz``) and shipped in
``tomodose/data/kernels/ccc_surface_water_6mv.json`` (isotropic) and
``ccc_surface_water_6mv_directional.json`` (the escape weighted by ``1 - (u . n)**2``, ``u`` the
line and ``n`` the surface normal: energy travelling along a surface escapes, energy crossing it
does not; the default, :data:`DEFAULT_SURFACE_NAME`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from tomodose._validate import check_array

__all__ = ["SurfaceCorrection", "load_surface_correction", "surface_distance_mm", "surface_weight",
           "DEFAULT_SURFACE_NAME", "SURFACE_FORMAT", "resolve_surface_correction", "body_mask",
           "surface_normal_weight", "surface_maps"]

#: shipped surface-correction table used for ``surface_correction=True``: the direction-weighted line
#: escape (``ccc_surface_water_6mv`` is the isotropic variant; docs/collapsed_cone.md section 4g)
DEFAULT_SURFACE_NAME = "ccc_surface_water_6mv_directional"
#: format tag of the table
SURFACE_FORMAT = "tomodose-ccc-surface-correction"

_CACHE: dict = {}


def _check_positive_finite(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not math.isfinite(value) \
            or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class SurfaceCorrection:
    """Parameters of the collapsed-cone surface escape.

    Attributes
    ----------
    escape_rate_per_cm : float
        Escape rate (1/cm of radiological path) of every slow term at the surface (``phi = 1``), >= 0.
    decay_mm : float
        Decay length of ``phi(s) = exp(-s / decay_mm)`` (mm), > 0.
    cutoff_mm : float
        ``phi = 0`` at and beyond this distance to the exterior (mm), > 0: deep inside the
        transport is the uncorrected one, bit for bit.
    slow_rate_per_cm : float
        Terms with a rate below this (1/cm) are corrected (the scattered-photon terms); the fast
        (electron) terms are untouched. > 0.
    body_threshold_g_cm3 : float
        Density above which a voxel belongs to the body (before hole filling), > 0.
    name : str
    provenance : dict
    directional : bool
        False (the shipped model): the escape rate is the same for every line through a voxel.
        True: weighted by ``1 - (u . n)**2`` (``u`` the line, ``n`` the surface normal: the
        gradient of the distance map), so only energy travelling along a surface escapes
        (studied in docs/collapsed_cone.md section 4g).
    """

    escape_rate_per_cm: float
    decay_mm: float
    cutoff_mm: float
    slow_rate_per_cm: float = 1.0
    body_threshold_g_cm3: float = 0.1
    name: str = "custom"
    provenance: dict = field(default_factory=dict, repr=False, compare=False)
    directional: bool = False

    def __post_init__(self):
        rate = self.escape_rate_per_cm
        if isinstance(rate, bool) or not isinstance(rate, (int, float, np.number)) or not math.isfinite(rate) \
                or rate < 0:
            raise ValueError(f"escape_rate_per_cm must be a finite rate >= 0 (1/cm), got {rate!r}")
        object.__setattr__(self, "escape_rate_per_cm", float(rate))
        if not isinstance(self.directional, (bool, np.bool_)):
            raise TypeError(f"directional must be a bool, got {self.directional!r}")
        object.__setattr__(self, "directional", bool(self.directional))
        for name in ("decay_mm", "cutoff_mm", "slow_rate_per_cm", "body_threshold_g_cm3"):
            object.__setattr__(self, name, _check_positive_finite(name, getattr(self, name)))

    def escape_rates(self, rates_per_cm) -> np.ndarray:
        """(K,) escape rate at ``phi = 1`` of each kernel term (1/cm): ``escape_rate_per_cm`` for
        the slow terms (rate < ``slow_rate_per_cm``), 0 for the others."""
        r = np.asarray(rates_per_cm, dtype=np.float64)
        return np.where(r < self.slow_rate_per_cm, self.escape_rate_per_cm, 0.0)

    def phi(self, s_mm) -> np.ndarray:
        """Surface weight ``phi(s)`` (float64) of distances ``s_mm`` to the exterior (mm)."""
        s = np.asarray(s_mm, dtype=np.float64)
        return np.where(s < self.cutoff_mm, np.exp(-s / self.decay_mm), 0.0)

    @classmethod
    def from_dict(cls, data) -> "SurfaceCorrection":
        if not isinstance(data, dict) or data.get("format") != SURFACE_FORMAT:
            raise ValueError(f"surface correction data must have format {SURFACE_FORMAT!r}, got "
                             f"{data.get('format') if isinstance(data, dict) else type(data).__name__!r}")
        m = data.get("model", {})
        missing = [k for k in ("escape_rate_per_cm", "decay_mm", "cutoff_mm", "slow_rate_per_cm",
                               "body_threshold_g_cm3") if k not in m]
        if missing:
            raise ValueError(f"surface correction data: model misses {missing}")
        return cls(m["escape_rate_per_cm"], m["decay_mm"], m["cutoff_mm"], m["slow_rate_per_cm"],
                   m["body_threshold_g_cm3"], str(data.get("name", "custom")), dict(data.get("provenance", {})),
                   bool(m.get("directional", False)))


def load_surface_correction(name: str = DEFAULT_SURFACE_NAME) -> SurfaceCorrection:
    """The shipped table ``tomodose/data/kernels/<name>.json`` (or a JSON path)."""
    key = str(name)
    if key in _CACHE:
        return _CACHE[key]
    path = Path(key)
    if path.suffix == ".json" and path.is_file():
        text = path.read_text(encoding="utf-8")
    else:
        ref = resources.files("tomodose").joinpath("data", "kernels", f"{key}.json")
        if not key.startswith("ccc_surface") or not ref.is_file():
            raise ValueError(f"name must be a shipped surface correction ({DEFAULT_SURFACE_NAME!r}) or a JSON path, "
                             f"got {name!r}")
        text = ref.read_text(encoding="utf-8")
    corr = SurfaceCorrection.from_dict(json.loads(text))
    _CACHE[key] = corr
    return corr


def body_mask(density_g_cm3, threshold_g_cm3: float) -> np.ndarray:
    """(nz, ny, nx) bool: density above ``threshold_g_cm3``, holes filled in 3-D and in every
    axial slice (a lung cut by the grid's end slices is open to the border in 3-D, not in its slice)."""
    from scipy import ndimage

    mask = np.asarray(density_g_cm3) > threshold_g_cm3
    filled = ndimage.binary_fill_holes(mask)
    for k in range(mask.shape[0]):
        filled[k] |= ndimage.binary_fill_holes(mask[k])
    return filled


def surface_distance_mm(density_g_cm3, spacing_mm, threshold_g_cm3: float = 0.1) -> np.ndarray:
    """(nz, ny, nx) float64 distance (mm) of each voxel centre to the body's exterior.

    Parameters
    ----------
    density_g_cm3 : (nz, ny, nx) array_like
        Density relative to water (>= 0).
    spacing_mm : (3,) voxel size (dx, dy, dz) in mm.
    threshold_g_cm3 : float
        Body threshold (see :func:`body_mask`).

    Euclidean distance transform of the filled body mask, padded by one exterior voxel on every
    side (the grid boundary is exterior, as for the transport), minus half the smallest voxel side;
    0 outside the body.
    """
    from scipy import ndimage

    rho = check_array("density_g_cm3", density_g_cm3, ndim=3, low=0.0)
    sp = np.asarray(spacing_mm, dtype=np.float64)
    if sp.shape != (3,) or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise ValueError(f"spacing_mm must be 3 finite lengths > 0 (dx, dy, dz), got {spacing_mm!r}")
    _check_positive_finite("threshold_g_cm3", threshold_g_cm3)
    mask = np.pad(body_mask(rho, threshold_g_cm3), 1, constant_values=False)
    dist = ndimage.distance_transform_edt(mask, sampling=(sp[2], sp[1], sp[0]))[1:-1, 1:-1, 1:-1]
    return np.where(dist > 0, np.maximum(dist - 0.5 * float(sp.min()), 0.0), 0.0)


def surface_weight(density_g_cm3, spacing_mm, correction: SurfaceCorrection) -> np.ndarray:
    """(nz, ny, nx) float64 C-contiguous ``phi(s)`` of every voxel (0 at and beyond ``cutoff_mm``
    and outside the body, where there is nothing to deposit in)."""
    return surface_maps(density_g_cm3, spacing_mm, correction, normals=False)[0]


def surface_maps(density_g_cm3, spacing_mm, correction: SurfaceCorrection, *, normals: bool | None = None):
    """The surface maps of one density from a single distance transform.

    Returns ``(phi, normal)``: ``phi`` as :func:`surface_weight`; ``normal`` as
    :func:`surface_normal_weight`, or None when not wanted (``normals`` False; default: when
    ``correction.directional``).
    """
    if not isinstance(correction, SurfaceCorrection):
        raise TypeError(f"correction must be a SurfaceCorrection, got {type(correction).__name__}")
    s = surface_distance_mm(density_g_cm3, spacing_mm, correction.body_threshold_g_cm3)
    phi = correction.phi(s)
    phi[s == 0.0] = 0.0  # outside the body (a body voxel has s >= half the smallest voxel side)
    phi = np.ascontiguousarray(phi)
    if normals is None:
        normals = correction.directional
    return phi, (_normal_weight(s, spacing_mm, phi) if normals else None)


def _normal_weight(s, spacing_mm, phi) -> np.ndarray:
    """``sqrt(phi) n`` (n_vox, 3) from the distance map ``s`` (see :func:`surface_normal_weight`)."""
    sp = np.asarray(spacing_mm, dtype=np.float64)
    gz, gy, gx = np.gradient(s, sp[2], sp[1], sp[0])
    g = np.stack([gx, gy, gz], axis=-1)
    norm = np.linalg.norm(g, axis=-1, keepdims=True)
    n = np.where(norm > 0, g / np.where(norm > 0, norm, 1.0), 0.0)
    out = n * np.sqrt(np.asarray(phi, dtype=np.float64))[..., None]
    return np.ascontiguousarray(out.reshape(-1, 3))


def resolve_surface_correction(value) -> SurfaceCorrection | None:
    """``surface_correction`` argument of the transports: None/False (off), True (the shipped
    table) or a :class:`SurfaceCorrection`."""
    if value is None or value is False:
        return None
    if value is True:
        return load_surface_correction()
    if isinstance(value, SurfaceCorrection):
        return value
    raise TypeError(f"surface_correction must be None, a bool or a SurfaceCorrection, got {value!r}")


def surface_normal_weight(density_g_cm3, spacing_mm, correction: SurfaceCorrection, phi=None) -> np.ndarray:
    """(nz * ny * nx, 3) float64 ``sqrt(phi) n`` of every voxel (LPS x, y, z) for the direction-weighted
    escape: ``n`` the unit gradient of the distance map (pointing inward; 0 where the gradient
    vanishes), 0 where ``phi`` is 0. ``phi``: :func:`surface_weight`, when computed already
    (:func:`surface_maps` gives both from one distance transform)."""
    if phi is None:
        return surface_maps(density_g_cm3, spacing_mm, correction, normals=True)[1]
    s = surface_distance_mm(density_g_cm3, spacing_mm, correction.body_threshold_g_cm3)
    return _normal_weight(s, spacing_mm, phi)

