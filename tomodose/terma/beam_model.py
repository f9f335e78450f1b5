"""The primary-fluence beam model of the rotating fan beam.

All lateral coordinates are **projected to the isocentre plane** along rays from the source
(mm): ``u`` across the fan (IEC Xg, the leaf axis), ``v`` along the couch (IEC Yg, the jaw
axis). A point ``P`` at distance ``D`` from the source along the central axis projects to
``u = (P - iso) . xg * SAD / D``; profiles defined at the isocentre therefore scale with beam
divergence automatically.

Energy fluence per unit beam-on time, in air, on the sphere of radius SAD around the source
(i.e. before the inverse-square factor of :mod:`tomodose.terma.terma`)::

    Psi(u, v) = H(W) * J(v) * O(theta) * sum_i a_i * L_i(u),       theta = atan(u / SAD)

* ``H(W)`` head-scatter output factor of the jaw setting ``W`` (``jaw_output_factors``; commissioned
  against the LA4 output factors, 1 in the nominal and ideal models).

* ``J(v)`` longitudinal jaw profile: a rect of half-width ``h`` convolved with a Gaussian of
  ``jaw_penumbra_sigma_mm``: ``J = [erf((v+h)/(sqrt2 s)) - erf((v-h)/(sqrt2 s))]/2``; ``h`` is
  solved so that the FWHM equals the machine's real FWHM for the nominal jaw width.
* ``L_i(u)`` leaf ``i`` aperture blurred by the source size: ``Phi((u-e_i)/s) - Phi((u-e_{i+1})/s)``
  with leaf edges ``e`` from :meth:`TomoMachine.leaf_edges_mm` and ``s = leaf_edge_sigma_mm``.
* ``a_i`` time-integrated output of leaf ``i`` in the projection (leaf-open fraction ``f_i``)::

      a_i = [f_i - h s_i + g (min(f_i, f_{i-1}) + min(f_i, f_{i+1}))] / (1 + 2 g) + t (1 - f_i)
      s_i = max(0, f_i - max(f_{i-1}, f_{i+1}))

  ``g`` = ``adjacent_leaf_output_gain`` (Balog et al., Med Phys 26 (1999) 55: the energy
  fluence of a leaf increases by 4.9 % when an adjacent leaf is open), assuming the leaf-open
  intervals are centred in the projection so two neighbours are open together for
  ``min(f_i, f_j)``; normalised so that a fully open fan has ``a = 1``; leaves outside the bank
  count as closed. ``t`` = ``leaf_transmission`` (closed-leaf transmission, ~0.5 %).

  ``h`` = ``isolated_leaf_output_loss``: relative output loss of an open leaf for the time
  ``s_i`` both its neighbours are closed (centred intervals: ``f_i - max(f_{i-1}, f_{i+1})``).
  The sides of the closed neighbours (tongue and groove, the occlusion of the finite source by
  the 10 cm deep leaf tunnel) narrow the effective opening next to a closed leaf. For an
  isolated leaf both narrowed edges lie within half a leaf width of its whole opening and
  remove a large part of its output; for a run of two or more open leaves the same edges lie
  a leaf width or more from most of the run and remove far less (collapsed cone, 10 cm deep:
  an edge moved in by 0.3 mm lowers the central dose of 1 / 2 / 4 open leaves by 4.3 / 0.6 /
  0.15 %). A uniform leaf weight per closed neighbour (``g``) cannot have this 7 : 1 ratio
  (it gives 2 : 1); the engines take one weight per leaf and fixed edges, so the isolated
  leaf's loss is this separate term. ``h = 0`` is the model without it.
* ``O(theta) = 1 + sum_n c_n |theta|^n`` transverse off-axis fluence of the flattening-filter-free
  fan (cone shaped; ``offaxis_fluence_coeffs = (c_1, c_2, ...)``, theta in rad).
* Off-axis softening: all mass attenuation coefficients are multiplied by
  ``1 + offaxis_softening_per_rad * |theta|`` (an effective-attenuation model of the softer
  off-axis spectrum; applies both to the attenuation along the ray and to the local mu/rho).

With every leaf open, jaws wide and ``O = 1``, ``Psi = 1`` on the central axis: TERMA is per
unit energy fluence rate at the isocentre in air (see :mod:`tomodose.terma.terma`).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field, replace
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
from scipy.special import erf

from tomodose._validate import check_array, check_finite_scalar, check_in_range, check_nonnegative
from tomodose.delivery.machine import TomoMachine
from tomodose.terma.spectrum import Spectrum, default_spectrum

__all__ = ["BeamModel", "jaw_half_width_mm", "load_machine_parameters", "DEFAULT_MACHINE_FILE"]

log = logging.getLogger(__name__)

#: Commissioned default machine (``tomodose/data/machines``), read by :meth:`BeamModel.default`.
DEFAULT_MACHINE_FILE = "tomo_default.json"
MACHINE_FORMAT = "tomodose-machine"
#: BeamModel fields a machine file may set (everything but the spectrum and the name).
_MACHINE_FIELDS = ("jaw_penumbra_sigma_mm", "leaf_edge_sigma_mm", "leaf_transmission", "adjacent_leaf_output_gain",
                   "isolated_leaf_output_loss", "offaxis_fluence_coeffs", "offaxis_softening_per_rad", "jaw_fwhm_mm", "jaw_output_factors")
_MACHINE_CACHE: dict[str, dict] = {}


def load_machine_parameters(path=None) -> dict:
    """Beam-model parameters of a machine file (JSON, format ``tomodose-machine``).

    Parameters
    ----------
    path : str or Path, optional
        A machine JSON file; default the shipped commissioned machine
        ``tomodose/data/machines/tomo_default.json`` (see ``docs/commissioning.md``).

    Returns
    -------
    dict
        ``{"name": str, "beam_model": {field: value}}`` plus the file's other top-level entries
        (provenance, agreement). ``beam_model`` holds only :class:`BeamModel` fields; tuples and
        dict keys are converted (``offaxis_fluence_coeffs`` tuple, ``jaw_fwhm_mm`` float keys).
    """
    key = "<default>" if path is None else str(path)
    if key not in _MACHINE_CACHE:
        if path is None:
            ref = resources.files("tomodose").joinpath("data", "machines", DEFAULT_MACHINE_FILE)
            text = ref.read_text(encoding="utf-8")
        else:
            p = Path(path)
            if not p.is_file():
                raise FileNotFoundError(f"path must be an existing machine JSON file, got {str(path)!r}")
            text = p.read_text(encoding="utf-8")
        data = json.loads(text)
        if data.get("format") != MACHINE_FORMAT:
            raise ValueError(f"machine file {key!r}: format must be {MACHINE_FORMAT!r}, got {data.get('format')!r}")
        raw = data.get("beam_model")
        if not isinstance(raw, dict):
            raise ValueError(f"machine file {key!r}: 'beam_model' must be an object, got {type(raw).__name__}")
        unknown = sorted(set(raw) - set(_MACHINE_FIELDS))
        if unknown:
            raise ValueError(f"machine file {key!r}: unknown beam_model entries {unknown}; allowed {list(_MACHINE_FIELDS)}")
        params = dict(raw)
        if "offaxis_fluence_coeffs" in params:
            params["offaxis_fluence_coeffs"] = tuple(float(c) for c in params["offaxis_fluence_coeffs"])
        for name in ("jaw_fwhm_mm", "jaw_output_factors"):
            if params.get(name) is not None:
                params[name] = {float(k): float(v) for k, v in params[name].items()}
        data = dict(data)
        data["beam_model"] = params
        _MACHINE_CACHE[key] = data
    out = dict(_MACHINE_CACHE[key])
    out["beam_model"] = dict(out["beam_model"])
    return out

#: Profiles are truncated (set to exactly 0) beyond this many sigmas from an edge.
EDGE_CUTOFF_SIGMAS = 6.0


@lru_cache(maxsize=64)
def jaw_half_width_mm(fwhm_mm: float, sigma_mm: float) -> float:
    """Half-width ``h`` of the rect whose convolution with a Gaussian (``sigma_mm``) has FWHM ``fwhm_mm``."""
    half = 0.5 * fwhm_mm
    if sigma_mm == 0.0:
        return half
    c = math.sqrt(2.0) * sigma_mm

    def excess(h):  # J(half) - J(0)/2 ; increasing in h
        j0 = math.erf(h / c)
        jh = 0.5 * (math.erf((half + h) / c) - math.erf((half - h) / c))
        return jh - 0.5 * j0

    lo, hi = 1e-9, half + 10.0 * sigma_mm
    if excess(lo) > 0:
        raise ValueError(
            f"jaw FWHM {fwhm_mm} mm is too small for a penumbra sigma of {sigma_mm} mm "
            f"(a Gaussian alone has FWHM {2.3548 * sigma_mm:.3f} mm)")
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if excess(mid) < 0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _edge(x, sigma):
    """Phi(x / sigma): smooth step (0.5 at x = 0); exact step for sigma = 0; 0/1 beyond the cutoff."""
    x = np.asarray(x, dtype=np.float64)
    if sigma == 0.0:
        return np.where(x > 0, 1.0, np.where(x < 0, 0.0, 0.5))
    out = 0.5 * (1.0 + erf(x / (math.sqrt(2.0) * sigma)))
    out = np.where(x > EDGE_CUTOFF_SIGMAS * sigma, 1.0, out)
    return np.where(x < -EDGE_CUTOFF_SIGMAS * sigma, 0.0, out)


@dataclass(frozen=True)
class BeamModel:
    """Fluence model of the fan beam (frozen).

    Parameters
    ----------
    spectrum : Spectrum
        Photon spectrum on the central axis.
    jaw_penumbra_sigma_mm : float
        Gaussian sigma of the longitudinal jaw edges at the isocentre plane (mm); 0 = sharp.
    leaf_edge_sigma_mm : float
        Gaussian sigma of the leaf-edge blur (source size projected through the MLC) at the
        isocentre plane (mm); 0 = sharp.
    leaf_transmission : float
        Fraction of the open fluence transmitted through a closed leaf, in [0, 1).
    adjacent_leaf_output_gain : float
        Relative increase of a leaf's output per adjacent open leaf (Balog 1999: 0.049).
    isolated_leaf_output_loss : float
        Relative output loss of an open leaf while both neighbours are closed, in [0, 1)
        (module docstring; 0 = none, the nominal and ideal models).
    offaxis_fluence_coeffs : tuple of float
        ``(c_1, c_2, ...)`` of ``O(theta) = 1 + sum c_n |theta|^n`` (theta fan angle, rad).
    offaxis_softening_per_rad : float
        Relative increase of all mu/rho per radian of fan angle (>= 0).
    jaw_fwhm_mm : dict or None
        Real FWHM (mm) per nominal jaw width (mm); ``None`` uses the machine's.
    jaw_output_factors : dict or None
        Head-scatter output factor per nominal jaw width (mm -> factor, 1 for the 50 mm
        calibration jaw): the part of the measured jaw dependence of the output that the engine's
        phantom scatter and jaw profile do not produce (fitted to the LA4 output factors, see
        ``docs/commissioning.md``). ``None`` = 1 for every jaw. Read it with
        :meth:`jaw_output_factor`; it multiplies the whole fluence of a plan.
    name : str
    """

    spectrum: Spectrum = field(default_factory=default_spectrum)
    jaw_penumbra_sigma_mm: float = 1.5
    leaf_edge_sigma_mm: float = 0.5
    leaf_transmission: float = 0.005
    adjacent_leaf_output_gain: float = 0.049
    isolated_leaf_output_loss: float = 0.0
    offaxis_fluence_coeffs: tuple = (0.0, -7.0)
    offaxis_softening_per_rad: float = 0.13
    jaw_fwhm_mm: dict | None = None
    jaw_output_factors: dict | None = None
    name: str = "default"

    def __post_init__(self):
        if not isinstance(self.spectrum, Spectrum):
            raise TypeError(f"spectrum must be a Spectrum, got {type(self.spectrum).__name__}")
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        set_("jaw_penumbra_sigma_mm", check_nonnegative("jaw_penumbra_sigma_mm", self.jaw_penumbra_sigma_mm))
        set_("leaf_edge_sigma_mm", check_nonnegative("leaf_edge_sigma_mm", self.leaf_edge_sigma_mm))
        set_("leaf_transmission", check_in_range("leaf_transmission", self.leaf_transmission, 0.0, 1.0))
        if self.leaf_transmission >= 1.0:
            raise ValueError(f"leaf_transmission must be < 1, got {self.leaf_transmission}")
        set_("adjacent_leaf_output_gain", check_nonnegative("adjacent_leaf_output_gain", self.adjacent_leaf_output_gain))
        set_("isolated_leaf_output_loss", check_in_range("isolated_leaf_output_loss", self.isolated_leaf_output_loss,
                                                         0.0, 1.0))
        if self.isolated_leaf_output_loss >= 1.0:
            raise ValueError(f"isolated_leaf_output_loss must be < 1, got {self.isolated_leaf_output_loss}")
        coeffs = tuple(check_finite_scalar(f"offaxis_fluence_coeffs[{n}]", c)
                       for n, c in enumerate(np.atleast_1d(np.asarray(self.offaxis_fluence_coeffs, dtype=float)).tolist()))
        set_("offaxis_fluence_coeffs", coeffs)
        set_("offaxis_softening_per_rad", check_nonnegative("offaxis_softening_per_rad", self.offaxis_softening_per_rad))
        if self.jaw_fwhm_mm is not None:
            if not isinstance(self.jaw_fwhm_mm, dict) or not self.jaw_fwhm_mm:
                raise ValueError(f"jaw_fwhm_mm must be None or a dict nominal_mm -> fwhm_mm, got {self.jaw_fwhm_mm!r}")
            set_("jaw_fwhm_mm", {float(k): float(check_in_range(f"jaw_fwhm_mm[{k}]", v, 1e-6, 1e4))
                                 for k, v in self.jaw_fwhm_mm.items()})
        if self.jaw_output_factors is not None:
            if not isinstance(self.jaw_output_factors, dict) or not self.jaw_output_factors:
                raise ValueError("jaw_output_factors must be None or a dict nominal_mm -> factor, got "
                                 f"{self.jaw_output_factors!r}")
            set_("jaw_output_factors", {float(k): float(check_in_range(f"jaw_output_factors[{k}]", v, 0.1, 10.0))
                                        for k, v in self.jaw_output_factors.items()})
        # O(theta) must stay > 0 over the fan (|theta| <= 0.25 rad)
        th = np.linspace(0.0, 0.25, 51)
        if np.any(self._offaxis(th) <= 0):
            raise ValueError(f"offaxis_fluence_coeffs {coeffs} give a non-positive fluence within 0.25 rad of the axis")

    def __hash__(self):
        return hash((id(self.spectrum), self.jaw_penumbra_sigma_mm, self.leaf_edge_sigma_mm, self.leaf_transmission,
                     self.adjacent_leaf_output_gain, self.isolated_leaf_output_loss, self.offaxis_fluence_coeffs, self.offaxis_softening_per_rad,
                     None if self.jaw_fwhm_mm is None else tuple(sorted(self.jaw_fwhm_mm.items())),
                     None if self.jaw_output_factors is None else tuple(sorted(self.jaw_output_factors.items())),
                     self.name))

    # --- presets ------------------------------------------------------------------------
    @classmethod
    def default(cls, spectrum: Spectrum | None = None) -> "BeamModel":
        """The commissioned default machine: the shipped 6 MV FFF spectrum and the beam-model
        parameters of ``tomodose/data/machines/tomo_default.json`` (fitted to the CheckTomo LA4
        tables by ``kernels/commission_la4.py``; see ``docs/commissioning.md``)."""
        return cls.from_machine_file(None, spectrum)

    @classmethod
    def nominal(cls, spectrum: Spectrum | None = None) -> "BeamModel":
        """The uncommissioned nominal parameters (the dataclass defaults; see docs/terma.md)."""
        return cls(spectrum=spectrum or default_spectrum(), name="nominal")

    @classmethod
    def from_machine_file(cls, path=None, spectrum: Spectrum | None = None) -> "BeamModel":
        """Beam model with the parameters of a machine JSON file (see :func:`load_machine_parameters`);
        fields the file does not set keep the nominal defaults."""
        data = load_machine_parameters(path)
        return cls(spectrum=spectrum or default_spectrum(), name=str(data.get("name", "default")),
                   **data["beam_model"])

    @classmethod
    def ideal(cls, spectrum: Spectrum | None = None) -> "BeamModel":
        """Point source, sharp leaf and jaw edges, no transmission, no neighbour effect, flat fluence."""
        return cls(spectrum=spectrum or default_spectrum(), jaw_penumbra_sigma_mm=0.0, leaf_edge_sigma_mm=0.0,
                   leaf_transmission=0.0, adjacent_leaf_output_gain=0.0, offaxis_fluence_coeffs=(),
                   offaxis_softening_per_rad=0.0, name="ideal")

    def replace(self, **changes) -> "BeamModel":
        """Copy with some fields changed (validated again)."""
        return replace(self, **changes)

    # --- profiles (NumPy reference definitions; the kernel implements the same formulas) ---
    def real_fwhm_mm(self, field_width_mm: float, machine: TomoMachine) -> float:
        nominal = machine.check_field_width(field_width_mm)
        table = self.jaw_fwhm_mm if self.jaw_fwhm_mm is not None else machine.jaw_fwhm_mm
        for k, v in table.items():
            if abs(k - nominal) < 1e-6:
                return float(v)
        raise ValueError(f"jaw_fwhm_mm has no entry for the nominal jaw width {nominal} mm; keys {sorted(table)}")

    def jaw_output_factor(self, field_width_mm: float, machine: TomoMachine) -> float:
        """Head-scatter output factor of the jaw setting (1 when ``jaw_output_factors`` is None)."""
        nominal = machine.check_field_width(field_width_mm)
        if self.jaw_output_factors is None:
            return 1.0
        for k, v in self.jaw_output_factors.items():
            if abs(k - nominal) < 1e-6:
                return float(v)
        raise ValueError(f"jaw_output_factors has no entry for the nominal jaw width {nominal} mm; "
                         f"keys {sorted(self.jaw_output_factors)}")

    def jaw_half_width_mm(self, field_width_mm: float, machine: TomoMachine) -> float:
        """Half-width of the rect of the jaw profile (mm, isocentre plane)."""
        return jaw_half_width_mm(self.real_fwhm_mm(field_width_mm, machine), self.jaw_penumbra_sigma_mm)

    def jaw_extent_mm(self, field_width_mm: float, machine: TomoMachine) -> float:
        """|v| beyond which the jaw profile is exactly 0 (mm, isocentre plane)."""
        return self.jaw_half_width_mm(field_width_mm, machine) + EDGE_CUTOFF_SIGMAS * self.jaw_penumbra_sigma_mm

    def jaw_profile(self, v_mm, field_width_mm: float, machine: TomoMachine) -> np.ndarray:
        """Longitudinal profile ``J(v)`` (dimensionless) at isocentre-plane positions ``v_mm``."""
        h = self.jaw_half_width_mm(field_width_mm, machine)
        v = np.asarray(v_mm, dtype=np.float64)
        s = self.jaw_penumbra_sigma_mm
        return _edge(v + h, s) - _edge(v - h, s)

    def leaf_weights(self, leaf_open_fraction) -> np.ndarray:
        """Time-integrated output ``a_i`` of each leaf, shape like ``leaf_open_fraction`` (..., n_leaves)."""
        f = check_array("leaf_open_fraction", leaf_open_fraction, low=0.0, high=1.0)
        g = self.adjacent_leaf_output_gain
        pad = np.zeros(f.shape[:-1] + (1,))
        left = np.concatenate([pad, f[..., :-1]], axis=-1)
        right = np.concatenate([f[..., 1:], pad], axis=-1)
        open_part = f + g * (np.minimum(f, left) + np.minimum(f, right))
        h = self.isolated_leaf_output_loss
        if h:  # the time leaf i is open with both neighbours closed (centred intervals)
            open_part = open_part - h * np.maximum(f - np.maximum(left, right), 0.0)
        return open_part / (1.0 + 2.0 * g) + self.leaf_transmission * (1.0 - f)

    def leaf_fluence(self, u_mm, leaf_weights, machine: TomoMachine) -> np.ndarray:
        """``sum_i a_i L_i(u)`` at isocentre-plane positions ``u_mm`` for one projection's ``a`` (n_leaves,)."""
        u = np.asarray(u_mm, dtype=np.float64)[..., None]
        e = machine.leaf_edges_mm()
        s = self.leaf_edge_sigma_mm
        apert = _edge(u - e[:-1], s) - _edge(u - e[1:], s)
        return apert @ np.asarray(leaf_weights, dtype=np.float64)

    def _offaxis(self, theta) -> np.ndarray:
        t = np.abs(np.asarray(theta, dtype=np.float64))
        out = np.ones_like(t)
        for n, c in enumerate(self.offaxis_fluence_coeffs, start=1):
            out = out + c * t**n
        return out

    def offaxis_fluence(self, u_mm, sad_mm: float) -> np.ndarray:
        """Transverse off-axis factor ``O(theta)``, theta = atan(u / SAD)."""
        return self._offaxis(np.arctan(np.asarray(u_mm, dtype=np.float64) / sad_mm))

    def softening_factor(self, u_mm, sad_mm: float) -> np.ndarray:
        """Multiplier ``1 + s |theta|`` of every mu/rho at fan angle atan(u / SAD)."""
        return 1.0 + self.offaxis_softening_per_rad * np.abs(np.arctan(np.asarray(u_mm, dtype=np.float64) / sad_mm))

    def fluence(self, u_mm, v_mm, leaf_open_fraction, field_width_mm: float, machine: TomoMachine) -> np.ndarray:
        """Relative energy fluence ``Psi(u, v)`` of one projection (broadcast ``u_mm``, ``v_mm``)."""
        a = self.leaf_weights(np.asarray(leaf_open_fraction, dtype=float))
        u, v = np.broadcast_arrays(np.asarray(u_mm, float), np.asarray(v_mm, float))
        return (self.jaw_profile(v, field_width_mm, machine) * self.leaf_fluence(u, a, machine)
                * self.offaxis_fluence(u, machine.sad_mm) * self.jaw_output_factor(field_width_mm, machine))
