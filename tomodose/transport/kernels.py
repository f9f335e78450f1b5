"""Collapsed-cone point kernels: derivation helpers, the :class:`CollapsedConeKernel` table, loading.

A point energy-deposition kernel (EDK) gives the fraction of the energy released by photons
interacting at a point (TERMA) that is deposited at a given polar angle ``theta`` from the
photon direction and radiological distance ``r`` (cm of water). tomodose derives its kernels from
mono-energetic water kernels on 48 cones of 3.75 deg x 24 spherical shells -- its own ompMC kernels
below 0.5 MeV (``tomodose/data/kernels/water_mono_ompmc.csv``, ``kernels/derive_mc_kernels.py``)
and EGSnrc/EDKnrc kernels 0.5-6 MeV, combined by :func:`merge_mono_tables` -- with the script
``kernels/derive_ccc_kernels.py``:

1. **Polyenergetic kernel** (:func:`polyenergetic_kernel`): each mono kernel is weighted by its
   TERMA share ``phi(E) * E * mu(E)`` (normalised to sum 1), spectral bins between two kernel
   energies being shared linearly between them.
2. **Collapse** (:func:`collapse_kernel`): the 48 fine cones are summed into ``P`` polar bins
   (rings), each split into ``n_azimuth`` equal azimuthal cones (the kernel is symmetric about the
   photon direction). The cumulative energy fraction per ring ``C_p(r)`` is tabulated at the shell
   edges, exactly as in the data (no energy is created or lost by the collapse).
3. **Exponential representation**: ``C_p(r) ~= sum_k A[p, k] * (1 - exp(-a_k r))`` with ``K``
   decay rates ``a_k`` (1/cm, bounded to [0.02, 100]) shared by all rings and non-negative
   amplitudes; the rates are fitted by variable projection (NNLS inside a Powell/Nelder-Mead
   search on log rates) and the amplitudes of each ring are rescaled so the model reproduces the
   ring's tabulated total exactly at the last tabulated radius (60 cm). Shared rates are what makes the
   collapsed-cone recursion exact per segment *and* allows kernel tilting (the amplitude of a
   transport line may change from voxel to voxel while the transported flux keeps its decay).

Everything is in cm of water (radiological distance: density-scaled path length).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from tomodose._validate import check_array, check_positive

__all__ = [
    "CollapsedConeKernel",
    "MonoKernelTable",
    "read_edk_csv",
    "merge_mono_tables",
    "terma_weights",
    "polyenergetic_kernel",
    "collapse_kernel",
    "fit_shared_exponentials",
    "cone_directions",
    "ring_azimuths_deg",
    "load_kernel",
    "DEFAULT_KERNEL_NAME",
    "KERNEL_FORMAT",
    "KERNEL_FORMAT_VERSION",
]

logger = logging.getLogger(__name__)

#: name of the shipped default kernel (file ``tomodose/data/kernels/<name>.json``).
DEFAULT_KERNEL_NAME = "ccc_water_6mv_default"
KERNEL_FORMAT = "tomodose-collapsed-cone-kernel"
KERNEL_FORMAT_VERSION = 1
#: bounds of the fitted decay rates (1/cm of water).
RATE_MIN_PER_CM = 0.02
RATE_MAX_PER_CM = 100.0


# --------------------------------------------------------------------------------------------
# mono-energetic input tables
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MonoKernelTable:
    """Mono-energetic point kernels on a cone x shell grid.

    Attributes
    ----------
    energies_mev : (nE,) float64
        Photon energies in MeV, increasing.
    theta_edges_deg : (nC + 1,) float64
        Polar-angle bin edges from the photon direction (0 = forward ... 180).
    radius_edges_cm : (nR + 1,) float64
        Radial shell edges in cm of water, starting at 0.
    total : (nE, nC, nR) float64
        Fraction of the energy of a photon interacting at the origin deposited in each
        (cone, shell) voxel (differential, not per volume).
    """

    energies_mev: np.ndarray = field(repr=False)
    theta_edges_deg: np.ndarray = field(repr=False)
    radius_edges_cm: np.ndarray = field(repr=False)
    total: np.ndarray = field(repr=False)

    @property
    def deposited_fraction(self) -> np.ndarray:
        """(nE,) total deposited fraction of each mono kernel (about 0.93-0.98)."""
        return self.total.sum(axis=(1, 2))


def numeric_csv_rows(path, n_columns: int) -> np.ndarray:
    """(n_rows, n_columns) float64: the first ``n_columns`` comma-separated numbers of every row,
    skipping blank lines, ``#`` comments and header lines (first character a letter)."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            s = line.strip()
            if not s or s.startswith("#") or s[0].isalpha():
                continue
            rows.append([float(v) for v in s.split(",")[:n_columns]])
    return np.asarray(rows, dtype=np.float64)


def read_edk_csv(path: str | os.PathLike) -> MonoKernelTable:
    """Read an EDK table in the CSV layout of the shared EDKnrc conversion.

    Columns ``energy_MeV, theta_lo_deg, theta_hi_deg, r_hi_cm, total, ...`` with ``#`` comment
    lines and one header line; rows radius-fastest, then cone, then energy.

    Parameters
    ----------
    path : path-like
        CSV file (e.g. ``shared/data/dose_physics/kernels/edknrc_mono_water_conehead.csv``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path must be an existing EDK CSV file, got {str(path)!r}")
    data = numeric_csv_rows(path, 5)
    energies = np.unique(data[:, 0])
    theta_lo = np.unique(data[:, 1])
    theta_hi = np.unique(data[:, 2])
    r_hi = np.unique(data[:, 3])
    n_e, n_c, n_r = energies.size, theta_lo.size, r_hi.size
    if data.shape[0] != n_e * n_c * n_r:
        raise ValueError(
            f"path {str(path)!r} must hold a full energy x cone x shell grid, got {data.shape[0]} rows "
            f"for {n_e} x {n_c} x {n_r}"
        )
    order = np.lexsort((data[:, 3], data[:, 1], data[:, 0]))
    total = data[order, 4].reshape(n_e, n_c, n_r)
    theta_edges = np.concatenate([theta_lo[:1], theta_hi])
    radius_edges = np.concatenate([[0.0], r_hi])
    return MonoKernelTable(energies, theta_edges, radius_edges, total)


def merge_mono_tables(low: MonoKernelTable, high: MonoKernelTable) -> MonoKernelTable:
    """Combine two mono kernel tables on the same cone x shell grid.

    The energies of ``low`` strictly below the first energy of ``high`` are put in front of all
    energies of ``high`` (tomodose: its own ompMC kernels below 0.5 MeV + EDKnrc 0.5-6 MeV).

    Parameters
    ----------
    low, high : MonoKernelTable
        Tables with identical ``theta_edges_deg`` and ``radius_edges_cm``.
    """
    if (low.theta_edges_deg.shape != high.theta_edges_deg.shape
            or not np.allclose(low.theta_edges_deg, high.theta_edges_deg)
            or low.radius_edges_cm.shape != high.radius_edges_cm.shape
            or not np.allclose(low.radius_edges_cm, high.radius_edges_cm)):
        raise ValueError("low and high must share theta_edges_deg and radius_edges_cm")
    keep = low.energies_mev < high.energies_mev[0]
    return MonoKernelTable(
        np.concatenate([low.energies_mev[keep], high.energies_mev]),
        high.theta_edges_deg.copy(),
        high.radius_edges_cm.copy(),
        np.concatenate([low.total[keep], high.total], axis=0),
    )


# --------------------------------------------------------------------------------------------
# polyenergetic kernel
# --------------------------------------------------------------------------------------------
def terma_weights(
    kernel_energies_mev,
    spectrum_energies_mev,
    spectrum_fluence,
    mu_energies_mev,
    mu_per_cm,
) -> np.ndarray:
    """TERMA share of each kernel energy for a photon spectrum.

    Each spectral line ``E`` contributes ``phi(E) * E * mu(E)`` (``mu`` interpolated log-log),
    shared linearly between the two kernel energies that bracket it (clamped at the ends).

    Parameters
    ----------
    kernel_energies_mev : (nE,) array
        Energies of the mono kernels, increasing.
    spectrum_energies_mev, spectrum_fluence : (nS,) arrays
        Photon fluence (any normalisation) at each spectral energy (MeV).
    mu_energies_mev, mu_per_cm : (nM,) arrays
        Linear (or mass) attenuation coefficient of water vs energy.

    Returns
    -------
    (nE,) float64, non-negative, summing to 1.
    """
    ek = check_array("kernel_energies_mev", kernel_energies_mev, ndim=1, low=0.0)
    es = check_array("spectrum_energies_mev", spectrum_energies_mev, ndim=1, low=0.0)
    ws = check_array("spectrum_fluence", spectrum_fluence, shape=(es.size,), low=0.0)
    em = check_array("mu_energies_mev", mu_energies_mev, ndim=1, low=0.0)
    mu = check_array("mu_per_cm", mu_per_cm, shape=(em.size,), low=0.0)
    if not np.any(ws > 0):
        raise ValueError("spectrum_fluence must have at least one entry > 0, got all zeros")
    keep = ws > 0
    es, ws = es[keep], ws[keep]
    if np.any(es <= 0):
        raise ValueError("spectrum_energies_mev must be > 0 where the fluence is > 0")
    mu_s = np.exp(np.interp(np.log(es), np.log(em), np.log(mu)))
    share = ws * es * mu_s
    out = np.zeros(ek.size)
    pos = np.interp(es, ek, np.arange(ek.size, dtype=np.float64))
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, ek.size - 1)
    frac = pos - lo
    np.add.at(out, lo, share * (1.0 - frac))
    np.add.at(out, hi, share * frac)
    return out / out.sum()


def polyenergetic_kernel(table: MonoKernelTable, weights) -> np.ndarray:
    """(nC, nR) weighted sum of the mono kernels of ``table`` with ``weights`` (nE,)."""
    w = check_array("weights", weights, shape=(table.energies_mev.size,), low=0.0)
    return np.tensordot(w, table.total, axes=(0, 0))


# --------------------------------------------------------------------------------------------
# collapse and exponential fit
# --------------------------------------------------------------------------------------------
def _model_matrix(radii_cm: np.ndarray, rates_per_cm: np.ndarray) -> np.ndarray:
    return -np.expm1(-np.outer(radii_cm, rates_per_cm))


#: smallest ratio between neighbouring rates of a build-up fit (a pair of nearly equal rates
#: would make the difference basis ill-conditioned: large amplitudes of opposite sign)
BUILDUP_MIN_RATE_RATIO = 1.5


def _fit_basis(radii, rates, buildup: bool):
    """Cumulative basis columns and their conversion to per-term amplitudes.

    Without ``buildup`` the columns are the terms ``1 - exp(-a_k r)`` (identity conversion).
    With ``buildup`` the pair differences ``e^(-a_j r) - e^(-a_k r)`` (``a_j < a_k``), each
    normalised to unit energy, are added: a non-negative combination of all columns has a
    non-negative *differential* kernel (energy per unit radius) but per-term amplitudes of either
    sign, so it can follow the build-up of scattered-photon energy with radius.

    Returns ``(B, C)``: ``B`` (nR, n_cols) cumulative of each column, ``C`` (K, n_cols) per-term
    amplitudes of each column (``amplitudes = C @ x`` for column weights ``x``).
    """
    m = _model_matrix(radii, rates)
    k = rates.size
    if not buildup:
        return m, np.eye(k)
    cols = [m]
    conv = [np.eye(k)]
    for j in range(k):
        for i in range(j + 1, k):
            a, b = float(rates[j]), float(rates[i])
            norm = 1.0 / a - 1.0 / b
            if not norm > 0.0:
                continue
            cols.append(((m[:, j] / a - m[:, i] / b) / norm)[:, None])
            v = np.zeros((k, 1))
            v[j, 0] = 1.0 / (a * norm)
            v[i, 0] = -1.0 / (b * norm)
            conv.append(v)
    return np.hstack(cols), np.hstack(conv)


def _fit_amplitudes(radii, cum, rates, totals, buildup: bool = False, n_rows_summed=None):
    """NNLS amplitudes per ring for fixed rates; rows weighted by 1/total of all rings.

    ``buildup``: non-negative weights of the :func:`_fit_basis` columns (signed amplitudes,
    non-negative differential kernel). ``n_rows_summed``: the rows form blocks of this many rings
    (several kernels fitted jointly) and the summed-ring error is taken per block.
    """
    from scipy.optimize import nnls

    basis, conv = _fit_basis(radii, rates, buildup)
    m = _model_matrix(radii, rates)
    grand = float(totals.sum())
    amps = np.zeros((cum.shape[0], rates.size))
    resid = 0.0
    for p in range(cum.shape[0]):
        if totals[p] <= 0:
            continue
        # relative weighting: errors of the cumulative as a fraction of the ring total, plus a
        # heavy row that pins the total (energy conservation)
        scale = 1.0 / max(totals[p], 1e-12)
        a_mat = np.vstack([basis * scale, 1e3 * basis[-1:] * scale])
        b_vec = np.concatenate([cum[p] * scale, [1e3 * totals[p] * scale]])
        x, _ = nnls(a_mat, b_vec, maxiter=5000)
        reach = float(basis[-1] @ x)
        if reach > 0:
            x *= totals[p] / reach
        amps[p] = conv @ x
        err = (basis @ x - cum[p]) / grand
        resid += float(np.sum(err**2)) * (totals[p] / grand)
    # the sum over rings (broad-field dose) matters most: add its error
    if n_rows_summed is None:
        err_sum = (amps.sum(axis=0) @ m.T - cum.sum(axis=0)) / grand
        resid += float(np.sum(err_sum**2))
    else:
        n_b = cum.shape[0] // int(n_rows_summed)
        for i in range(n_b):
            sl = slice(i * n_rows_summed, (i + 1) * n_rows_summed)
            err_sum = (amps[sl].sum(axis=0) @ m.T - cum[sl].sum(axis=0)) / grand
            resid += n_b * float(np.sum(err_sum**2))
    return amps, resid


def fit_shared_exponentials(
    radius_edges_cm, cumulative, n_terms: int = 5, *, initial_rates_per_cm=None, buildup: bool = False,
    n_rows_summed: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Fit ``C_p(r) ~= sum_k A[p,k] (1 - exp(-a_k r))`` with rates shared by all rings.

    Parameters
    ----------
    radius_edges_cm : (nR + 1,) array
        Radii of the tabulated cumulative values (first must be 0).
    cumulative : (P, nR + 1) array
        Cumulative deposited energy fraction per ring at those radii.
    n_terms : int
        Number of exponential terms ``K``.
    buildup : bool
        Signed amplitudes with a non-negative differential kernel (:func:`_fit_basis`): the
        rates are searched globally (differential evolution, fixed seed: deterministic) with
        neighbouring rates at least :data:`BUILDUP_MIN_RATE_RATIO` apart. Default False: the
        non-negative amplitudes and local search of tables before 2026-11-29.
    n_rows_summed : int, optional
        The rows are blocks of this many rings of different kernels fitted jointly (the summed
        error is then taken per block).

    Returns
    -------
    rates_per_cm : (K,) float64, increasing
    amplitudes : (P, K) float64 (>= 0 without ``buildup``); each row reproduces ``cumulative[p, -1]`` exactly at the
        last radius (energy conserved within the tabulated range; the model's small tail beyond
        it, ``sum_k A_k exp(-a_k r_max)``, lies outside any patient grid).
    """
    from scipy.optimize import minimize

    r = check_array("radius_edges_cm", radius_edges_cm, ndim=1, low=0.0)
    cum = check_array("cumulative", cumulative, ndim=2)
    if cum.shape[1] != r.size:
        raise ValueError(f"cumulative must have shape (P, {r.size}), got {cum.shape}")
    if int(n_terms) < 1:
        raise ValueError(f"n_terms must be >= 1, got {n_terms}")
    k = int(n_terms)
    totals = cum[:, -1]
    if initial_rates_per_cm is None:
        x0 = np.log(np.geomspace(0.04, 40.0, k))
    else:
        x0 = np.log(check_array("initial_rates_per_cm", initial_rates_per_cm, shape=(k,), low=1e-6))

    # rates are kept within [RATE_MIN, RATE_MAX] 1/cm: a vanishing rate would turn a term into a
    # huge-amplitude linear ramp (numerically useless), an enormous one into a delta function
    def to_rates(logr):
        logr = np.clip(logr, math.log(RATE_MIN_PER_CM) - 1.0, math.log(RATE_MAX_PER_CM) + 1.0)  # no overflow
        return np.sort(np.clip(np.exp(logr), RATE_MIN_PER_CM, RATE_MAX_PER_CM))

    if buildup:
        return _fit_buildup(r, cum, k, totals, n_rows_summed)

    def objective(logr):
        return _fit_amplitudes(r, cum, to_rates(logr), totals)[1]

    best = minimize(objective, x0, method="Powell",
                    options={"maxiter": 20000 * k, "xtol": 1e-5, "ftol": 1e-13})
    polish = minimize(objective, best.x, method="Nelder-Mead",
                      options={"maxiter": 4000 * k, "xatol": 1e-6, "fatol": 1e-16})
    if polish.fun < best.fun:
        best = polish
    rates = to_rates(best.x)
    amps, _ = _fit_amplitudes(r, cum, rates, totals)
    return rates, amps


def _fit_buildup(r, cum, k, totals, n_rows_summed):
    """Rates and signed amplitudes of a build-up fit (see :func:`fit_shared_exponentials`)."""
    from scipy.optimize import differential_evolution, minimize

    log_sep = math.log(BUILDUP_MIN_RATE_RATIO)

    def to_rates(x):
        # x[0]: log of the slowest rate; x[i > 0]: log ratio of neighbouring rates beyond the minimum
        return np.exp(np.cumsum(np.concatenate([[x[0]], log_sep + np.maximum(x[1:], 0.0)])))

    def objective(x):
        rates = to_rates(x)
        if rates[-1] > RATE_MAX_PER_CM:
            return 1.0 + math.log(rates[-1] / RATE_MAX_PER_CM)
        return _fit_amplitudes(r, cum, rates, totals, True, n_rows_summed)[1]

    bounds = [(math.log(RATE_MIN_PER_CM), math.log(2.0))] + [(0.0, 5.0)] * (k - 1)
    best = differential_evolution(objective, bounds, seed=20261129, tol=1e-8, maxiter=300, polish=False)
    polish = minimize(objective, best.x, method="Nelder-Mead",
                      options={"maxiter": 2000 * k, "xatol": 1e-6, "fatol": 1e-14})
    x = polish.x if polish.fun < best.fun else best.x
    rates = to_rates(x)
    amps, _ = _fit_amplitudes(r, cum, rates, totals, True, n_rows_summed)
    return rates, amps


def differential_kernel(rates_per_cm, amplitudes, radius_cm) -> np.ndarray:
    """(..., n) energy per unit radius ``sum_k A_k a_k exp(-a_k r)`` of exponential-model rows.

    Parameters
    ----------
    rates_per_cm : (K,) array
    amplitudes : (..., K) array
    radius_cm : (n,) array
    """
    r = np.atleast_1d(np.asarray(radius_cm, dtype=np.float64))
    rates = np.asarray(rates_per_cm, dtype=np.float64)
    return np.asarray(amplitudes) @ (rates[:, None] * np.exp(-np.outer(rates, r)))


def collapse_kernel(
    fine_kernel,
    theta_edges_deg,
    radius_edges_cm,
    *,
    n_polar: int = 12,
    n_azimuth: int = 8,
    polar_group_edges: Sequence[int] | None = None,
    n_terms: int = 5,
    name: str = "custom",
    provenance: Mapping | None = None,
    group_fine_kernels: Sequence | None = None,
    group_edges_mev=None,
    azimuth_stagger: bool = False,
    group_rates: str = "shared",
    group_weights=None,
    buildup: bool = False,
) -> "CollapsedConeKernel":
    """Collapse a (nC, nR) kernel onto ``P`` polar rings x ``n_azimuth`` cones.

    Parameters
    ----------
    fine_kernel : (nC, nR) array
        Energy fraction per (fine cone, shell) voxel (e.g. from :func:`polyenergetic_kernel`).
    theta_edges_deg : (nC + 1,) array
        Fine cone edges (deg from the photon direction).
    radius_edges_cm : (nR + 1,) array
        Shell edges (cm of water).
    n_polar : int
        Number of polar rings; the fine cones are grouped evenly (nC must be divisible by it)
        unless ``polar_group_edges`` is given.
    n_azimuth : int
        Cones per ring.
    polar_group_edges : sequence of int, optional
        Fine-cone indices of the ring edges (first 0, last nC), for uneven rings.
    n_terms : int
        Exponential terms of the fit.
    name : str
        Kernel name stored in the table.
    provenance : mapping, optional
        Free-form provenance stored with the table.
    group_fine_kernels : sequence of (nC, nR) arrays, optional
        Energy-group kernels; they are collapsed the same way and fitted jointly with the main
        kernel so all share the same rates.
    group_edges_mev : (G + 1,) array, optional
        Energy range of each group (required with ``group_fine_kernels``).
    azimuth_stagger : bool
        Turn the cones of odd rings by half an azimuth step (see :class:`CollapsedConeKernel`).
    group_rates : {"shared", "per_group"}
        With group kernels: ``"shared"`` fits ``n_terms`` rates jointly for the main kernel and
        all groups; ``"per_group"`` fits ``n_terms`` rates for each group alone (the table then
        has ``G * n_terms`` rates, group ``g`` using only the block ``g * n_terms ... (g + 1) *
        n_terms - 1``, zeros elsewhere) and the main kernel is ``sum_g group_weights[g] x group
        g`` (its model is then exactly the weighted sum of the group models).
    group_weights : (G,) array, optional
        Share of each group in the main kernel (the TERMA share of its lines; sum 1); required
        with ``group_rates="per_group"``.
    buildup : bool
        Signed amplitudes with non-negative differential kernels (:func:`fit_shared_exponentials`).
    """
    fk = check_array("fine_kernel", fine_kernel, ndim=2, low=0.0)
    te = check_array("theta_edges_deg", theta_edges_deg, shape=(fk.shape[0] + 1,))
    re = check_array("radius_edges_cm", radius_edges_cm, shape=(fk.shape[1] + 1,), low=0.0)
    n_c = fk.shape[0]
    if polar_group_edges is None:
        if int(n_polar) < 1 or n_c % int(n_polar):
            raise ValueError(f"n_polar must divide the {n_c} fine cones, got {n_polar}")
        step = n_c // int(n_polar)
        groups = list(range(0, n_c + 1, step))
    else:
        groups = [int(g) for g in polar_group_edges]
        if groups[0] != 0 or groups[-1] != n_c or any(b <= a for a, b in zip(groups, groups[1:])):
            raise ValueError(
                f"polar_group_edges must increase strictly from 0 to {n_c}, got {groups}"
            )
    if int(n_azimuth) < 1:
        raise ValueError(f"n_azimuth must be >= 1, got {n_azimuth}")
    p = len(groups) - 1
    ring_shell = np.array([fk[groups[i]:groups[i + 1]].sum(axis=0) for i in range(p)])
    cumulative = np.concatenate([np.zeros((p, 1)), np.cumsum(ring_shell, axis=1)], axis=1)
    polar_edges = te[groups]
    # representative polar angle: energy-weighted mean of cos(theta) over the ring's fine cones
    cos_c = 0.5 * (np.cos(np.radians(te[:-1])) + np.cos(np.radians(te[1:])))
    e_c = fk.sum(axis=1)
    polar_deg = np.empty(p)
    for i in range(p):
        sl = slice(groups[i], groups[i + 1])
        w = e_c[sl]
        mean_cos = float(np.sum(w * cos_c[sl]) / w.sum()) if w.sum() > 0 else float(cos_c[sl].mean())
        polar_deg[i] = math.degrees(math.acos(max(-1.0, min(1.0, mean_cos))))
    group_amps = None
    if group_fine_kernels is not None:
        if group_edges_mev is None:
            raise ValueError("group_edges_mev must be given with group_fine_kernels")
        stacks = [cumulative]
        for i, gk in enumerate(group_fine_kernels):
            g = check_array(f"group_fine_kernels[{i}]", gk, shape=fk.shape, low=0.0)
            rs = np.array([g[groups[j]:groups[j + 1]].sum(axis=0) for j in range(p)])
            stacks.append(np.concatenate([np.zeros((p, 1)), np.cumsum(rs, axis=1)], axis=1))
        if group_rates == "shared":
            rates, all_amps = fit_shared_exponentials(re, np.concatenate(stacks, axis=0), n_terms, buildup=buildup,
                                                      n_rows_summed=p if buildup else None)
            amps = all_amps[:p]
            group_amps = all_amps[p:].reshape(len(group_fine_kernels), p, -1)
        elif group_rates == "per_group":
            n_grp = len(group_fine_kernels)
            if group_weights is None:
                raise ValueError('group_weights must be given with group_rates="per_group"')
            gw = check_array("group_weights", group_weights, shape=(n_grp,), low=0.0)
            k = int(n_terms)
            rates = np.zeros(n_grp * k)
            group_amps = np.zeros((n_grp, p, n_grp * k))
            for g in range(n_grp):
                r_g, a_g = fit_shared_exponentials(re, stacks[1 + g], k, buildup=buildup)
                rates[g * k:(g + 1) * k] = r_g
                group_amps[g, :, g * k:(g + 1) * k] = a_g
            amps = np.tensordot(gw, group_amps, axes=(0, 0))
        else:
            raise ValueError(f'group_rates must be "shared" or "per_group", got {group_rates!r}')
    else:
        rates, amps = fit_shared_exponentials(re, cumulative, n_terms, buildup=buildup)
    return CollapsedConeKernel(
        name=name,
        polar_edges_deg=polar_edges,
        polar_deg=polar_deg,
        n_azimuth=int(n_azimuth),
        radius_edges_cm=re,
        cumulative=cumulative,
        rates_per_cm=rates,
        amplitudes=amps,
        provenance=dict(provenance or {}),
        group_amplitudes=group_amps,
        group_edges_mev=group_edges_mev if group_amps is not None else None,
        azimuth_stagger=bool(azimuth_stagger),
    )


# --------------------------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------------------------
#: radii (cm) where :func:`_check_differential` evaluates a kernel's energy per unit radius
_CHECK_RADII_CM = np.concatenate([[0.0], np.geomspace(1e-4, 300.0, 400)])


def _check_differential(name: str, rates, amps) -> None:
    """Every row of ``amps`` must describe a non-negative energy per unit radius (amplitudes may be
    signed: build-up fits) that emits a positive total (zero rows allowed)."""
    d = differential_kernel(rates, amps, _CHECK_RADII_CM)
    scale = np.abs(np.asarray(amps) * np.asarray(rates)).sum(axis=-1, keepdims=True)
    if np.any(d < -1e-9 * np.maximum(scale, 1e-300)):
        raise ValueError(f"{name} must give a non-negative kernel sum_k A_k a_k exp(-a_k r) at every radius "
                         "(signed amplitudes are allowed only as build-up terms)")
    if np.any(np.asarray(amps).sum(axis=-1) < 0):
        raise ValueError(f"{name} must emit a non-negative total (row sums >= 0)")


def _readonly(a, dtype=np.float64) -> np.ndarray:
    out = np.array(a, dtype=dtype, copy=True)
    out.setflags(write=False)
    return out


@dataclass(frozen=True, eq=False)
class CollapsedConeKernel:
    """Polyenergetic collapsed-cone kernel in water.

    The kernel is symmetric about the photon direction. Its sphere of directions is divided into
    ``P`` polar rings (edges ``polar_edges_deg``), each split into ``n_azimuth`` equal cones, so
    there are ``P * n_azimuth`` transport directions (see :meth:`directions`).

    Attributes
    ----------
    name : str
    polar_edges_deg : (P + 1,) float64
        Ring edges in degrees from the photon direction (0 ... 180).
    polar_deg : (P,) float64
        Direction of each ring (energy-weighted mean polar angle of its fine cones).
    n_azimuth : int
        Cones per ring (equal azimuth sectors).
    radius_edges_cm : (nR + 1,) float64
        Radii (cm of water) of the tabulated cumulative kernel, from 0.
    cumulative : (P, nR + 1) float64
        Fraction of the interacting photon energy deposited in ring ``p`` within radius ``r``
        (all azimuths of the ring together), as tabulated from the Monte Carlo data.
    rates_per_cm : (K,) float64
        Decay rates ``a_k`` (1/cm of water) shared by all rings.
    amplitudes : (P, K) float64
        ``C_p(r) ~= sum_k amplitudes[p, k] * (1 - exp(-rates_per_cm[k] * r))``; the model equals
        ``cumulative[p, -1]`` exactly at the last tabulated radius (energy conserved by
        construction within the table's range, 60 cm for EDKnrc).
    provenance : dict
        Inputs, licence, method, date, script version.
    group_amplitudes : (G, P, K) float64 or None
        Optional energy-group kernels with the **same** rates: group ``g`` covers spectral lines
        in ``[group_edges_mev[g], group_edges_mev[g + 1])``; each row set is that group's own
        (TERMA-weighted, normalised) kernel. Transporting TERMA split by group with these
        amplitudes accounts for beam hardening in the kernel at the cost of one transport.
    group_edges_mev : (G + 1,) float64 or None
    azimuth_stagger : bool
        If True, the cones of every odd ring are turned by half an azimuth step
        (``360 (q + 1) / n_azimuth`` deg instead of ``360 (q + 1/2) / n_azimuth``): neighbouring
        rings then fill each other's azimuthal gaps, which halves the ray effect of the lateral
        spread at no cost (see ``docs/collapsed_cone.md``, narrow fields). Both sets are
        symmetric under the lateral reflections (and 90 deg rotation for ``n_azimuth`` a
        multiple of 4). Default False (tables written before 2026-11-29 have no such key).
    """

    name: str
    polar_edges_deg: np.ndarray = field(repr=False)
    polar_deg: np.ndarray = field(repr=False)
    n_azimuth: int
    radius_edges_cm: np.ndarray = field(repr=False)
    cumulative: np.ndarray = field(repr=False)
    rates_per_cm: np.ndarray = field(repr=False)
    amplitudes: np.ndarray = field(repr=False)
    provenance: dict = field(default_factory=dict, repr=False)
    group_amplitudes: np.ndarray | None = field(default=None, repr=False)
    group_edges_mev: np.ndarray | None = field(default=None, repr=False)
    azimuth_stagger: bool = False

    def __post_init__(self):
        pe = check_array("polar_edges_deg", self.polar_edges_deg, ndim=1, low=0.0, high=180.0)
        p = pe.size - 1
        if p < 1 or np.any(np.diff(pe) <= 0) or pe[0] != 0.0 or pe[-1] != 180.0:
            raise ValueError(f"polar_edges_deg must increase strictly from 0 to 180, got {pe.tolist()}")
        pd = check_array("polar_deg", self.polar_deg, shape=(p,), low=0.0, high=180.0)
        if isinstance(self.n_azimuth, bool) or int(self.n_azimuth) != self.n_azimuth or self.n_azimuth < 1:
            raise ValueError(f"n_azimuth must be an integer >= 1, got {self.n_azimuth!r}")
        re = check_array("radius_edges_cm", self.radius_edges_cm, ndim=1, low=0.0)
        if re.size < 2 or re[0] != 0.0 or np.any(np.diff(re) <= 0):
            raise ValueError("radius_edges_cm must increase strictly from 0")
        cum = check_array("cumulative", self.cumulative, shape=(p, re.size), low=0.0)
        rates = check_array("rates_per_cm", self.rates_per_cm, ndim=1)
        if rates.size < 1 or np.any(rates <= 0):
            raise ValueError(f"rates_per_cm must be > 0, got {rates.tolist()}")
        amps = check_array("amplitudes", self.amplitudes, shape=(p, rates.size))
        _check_differential("amplitudes", rates, amps)
        object.__setattr__(self, "polar_edges_deg", _readonly(pe))
        object.__setattr__(self, "polar_deg", _readonly(pd))
        object.__setattr__(self, "n_azimuth", int(self.n_azimuth))
        object.__setattr__(self, "radius_edges_cm", _readonly(re))
        object.__setattr__(self, "cumulative", _readonly(cum))
        object.__setattr__(self, "rates_per_cm", _readonly(rates))
        object.__setattr__(self, "amplitudes", _readonly(amps))
        object.__setattr__(self, "provenance", dict(self.provenance))
        if not isinstance(self.azimuth_stagger, (bool, np.bool_)):
            raise TypeError(f"azimuth_stagger must be a bool, got {self.azimuth_stagger!r}")
        object.__setattr__(self, "azimuth_stagger", bool(self.azimuth_stagger))
        if (self.group_amplitudes is None) != (self.group_edges_mev is None):
            raise ValueError("group_amplitudes and group_edges_mev must be given together")
        if self.group_amplitudes is not None:
            ga = check_array("group_amplitudes", self.group_amplitudes, ndim=3)
            if ga.shape[1:] != (p, rates.size) or ga.shape[0] < 1:
                raise ValueError(
                    f"group_amplitudes must have shape (G, {p}, {rates.size}), got {ga.shape}"
                )
            _check_differential("group_amplitudes", rates, ga)
            ge = check_array("group_edges_mev", self.group_edges_mev, shape=(ga.shape[0] + 1,), low=0.0)
            if np.any(np.diff(ge) <= 0):
                raise ValueError(f"group_edges_mev must increase strictly, got {ge.tolist()}")
            object.__setattr__(self, "group_amplitudes", _readonly(ga))
            object.__setattr__(self, "group_edges_mev", _readonly(ge))

    # --- sizes and totals -------------------------------------------------------------------
    @property
    def n_polar(self) -> int:
        return self.polar_deg.size

    @property
    def n_terms(self) -> int:
        return self.rates_per_cm.size

    @property
    def n_directions(self) -> int:
        return self.n_polar * self.n_azimuth

    @property
    def total_fraction(self) -> float:
        """Deposited fraction of the released energy within the table (sum over rings; ~0.96).

        The exponential model emits ``amplitudes.sum()`` (a few % more: its tail beyond the
        table radius), and reproduces ``total_fraction`` at the table radius.
        """
        return float(self.cumulative[:, -1].sum())

    @property
    def azimuth_deg(self) -> np.ndarray:
        """(n_azimuth,) azimuths of the cones of ring 0 (and of every ring without
        ``azimuth_stagger``), ``360 (q + 1/2) / n_azimuth`` deg."""
        return 360.0 * (np.arange(self.n_azimuth) + 0.5) / self.n_azimuth

    @property
    def ring_azimuth_deg(self) -> np.ndarray:
        """(P, n_azimuth) azimuths of the cones of each ring (deg; see ``azimuth_stagger``)."""
        return ring_azimuths_deg(self.n_polar, self.n_azimuth, self.azimuth_stagger)

    @property
    def ring_solid_angle_sr(self) -> np.ndarray:
        """(P,) solid angle of each ring (sr); they sum to 4 pi."""
        c = np.cos(np.radians(self.polar_edges_deg))
        return 2.0 * np.pi * (c[:-1] - c[1:])

    # --- evaluation ---------------------------------------------------------------------------
    def fitted_cumulative(self, radius_cm) -> np.ndarray:
        """(P, n) exponential-model cumulative fraction per ring at ``radius_cm`` (n,) cm."""
        r = np.atleast_1d(np.asarray(radius_cm, dtype=np.float64))
        return self.amplitudes @ _model_matrix(r, self.rates_per_cm).T

    def tabulated_cumulative(self, radius_cm) -> np.ndarray:
        """(P, n) tabulated cumulative per ring, linear between shell edges, flat beyond."""
        r = np.atleast_1d(np.asarray(radius_cm, dtype=np.float64))
        return np.array([np.interp(r, self.radius_edges_cm, c) for c in self.cumulative])

    def fit_error(self, *, summed: bool = False) -> float:
        """Max |fitted - tabulated| cumulative at the shell edges, as a fraction of the total.

        Per ring, or (``summed=True``) for the sum over all rings (what a broad field sees).
        """
        d = self.fitted_cumulative(self.radius_edges_cm) - self.cumulative
        if summed:
            d = d.sum(axis=0)
        return float(np.abs(d).max() / self.total_fraction)

    def with_azimuths(self, n_azimuth: int, azimuth_stagger: bool | None = None) -> "CollapsedConeKernel":
        """The same kernel with another number of cones per ring (and optionally another
        ``azimuth_stagger``; default: unchanged)."""
        return CollapsedConeKernel(
            self.name, self.polar_edges_deg, self.polar_deg, int(n_azimuth), self.radius_edges_cm,
            self.cumulative, self.rates_per_cm, self.amplitudes, self.provenance,
            self.group_amplitudes, self.group_edges_mev,
            self.azimuth_stagger if azimuth_stagger is None else azimuth_stagger,
        )

    @property
    def n_groups(self) -> int:
        """Number of energy groups (0 when the table has none)."""
        return 0 if self.group_amplitudes is None else int(self.group_amplitudes.shape[0])

    def group_kernel(self, g: int) -> "CollapsedConeKernel":
        """Kernel of energy group ``g`` alone (same rings, rates and azimuths; no cumulative
        table of its own: ``cumulative`` is the model evaluated at the shell edges)."""
        if self.group_amplitudes is None:
            raise ValueError("group_kernel needs a kernel with energy groups, this one has none")
        if not 0 <= int(g) < self.n_groups:
            raise ValueError(f"g must be in [0, {self.n_groups - 1}], got {g}")
        amps = self.group_amplitudes[int(g)]
        # terms the group does not use (per-group rates of the other groups) are dropped
        used = np.flatnonzero(np.any(amps != 0.0, axis=0))
        if used.size == 0:
            used = np.arange(self.n_terms)
        amps = amps[:, used]
        rates = self.rates_per_cm[used]
        cum = amps @ _model_matrix(self.radius_edges_cm, rates).T
        return CollapsedConeKernel(
            f"{self.name}[group {g}]", self.polar_edges_deg, self.polar_deg, self.n_azimuth,
            self.radius_edges_cm, cum, rates, amps, {}, azimuth_stagger=self.azimuth_stagger,
        )

    def directions(self, axis=(0.0, 0.0, 1.0)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Transport directions of the collapsed cones about ``axis``.

        Parameters
        ----------
        axis : (3,) array
            Photon direction (any frame; normalised here).

        Returns
        -------
        directions : (P * n_azimuth, 3) float64
            Unit vectors, ring-major (cone ``p * n_azimuth + q``), in the frame of ``axis``.
        solid_angle_sr : (P * n_azimuth,) float64
            Solid angle of each cone (ring solid angle / n_azimuth).
        ring : (P * n_azimuth,) int64
            Ring index of each cone.
        """
        return cone_directions(self.polar_deg, self.n_azimuth, axis, self.ring_solid_angle_sr,
                               stagger=self.azimuth_stagger)

    def angular_density_table(self, n_points: int = 2881) -> tuple[np.ndarray, float]:
        """(n_points, K) energy per steradian of each term vs polar angle, for kernel tilting.

        The per-steradian amplitude of ring ``p`` (``amplitudes[p] / ring solid angle``) is placed
        at ``polar_deg[p]`` and interpolated linearly in angle (constant before the first and
        after the last ring). The table is sampled uniformly in ``s = sqrt(1 - cos(theta))``
        (``s = i * ds``, ``0 <= s <= sqrt(2)``), so a kernel can look it up from a cosine
        without ``acos``; the angular step is about 0.04 deg near the forward direction.
        Returns ``(table, ds)``.
        """
        return self._density_table(self.amplitudes, n_points)

    def _density_table(self, amplitudes, n_points: int = 2881) -> tuple[np.ndarray, float]:
        s_grid = np.linspace(0.0, math.sqrt(2.0), int(n_points))
        theta = 2.0 * np.arcsin(np.clip(s_grid / math.sqrt(2.0), 0.0, 1.0))
        dens = np.asarray(amplitudes) / self.ring_solid_angle_sr[:, None]
        nodes = np.radians(self.polar_deg)
        table = np.stack([np.interp(theta, nodes, dens[:, k]) for k in range(self.n_terms)], axis=1)
        return np.ascontiguousarray(table), float(s_grid[1] - s_grid[0])

    # --- io -------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": KERNEL_FORMAT,
            "format_version": KERNEL_FORMAT_VERSION,
            "name": self.name,
            "units": {"radius": "cm of water (radiological)", "angles": "deg from photon direction",
                      "cumulative": "fraction of interacting photon energy", "rates": "1/cm"},
            "provenance": self.provenance,
            "n_azimuth": self.n_azimuth,
            "azimuth_stagger": self.azimuth_stagger,
            "polar_edges_deg": self.polar_edges_deg.tolist(),
            "polar_deg": self.polar_deg.tolist(),
            "radius_edges_cm": self.radius_edges_cm.tolist(),
            "cumulative": self.cumulative.tolist(),
            "rates_per_cm": self.rates_per_cm.tolist(),
            "amplitudes": self.amplitudes.tolist(),
            "group_edges_mev": None if self.group_edges_mev is None else self.group_edges_mev.tolist(),
            "group_amplitudes": None if self.group_amplitudes is None else self.group_amplitudes.tolist(),
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> "CollapsedConeKernel":
        if data.get("format") != KERNEL_FORMAT:
            raise ValueError(f"format must be {KERNEL_FORMAT!r}, got {data.get('format')!r}")
        if data.get("format_version") != KERNEL_FORMAT_VERSION:
            raise ValueError(
                f"format_version must be {KERNEL_FORMAT_VERSION}, got {data.get('format_version')!r}"
            )
        return cls(
            name=data["name"],
            polar_edges_deg=data["polar_edges_deg"],
            polar_deg=data["polar_deg"],
            n_azimuth=data["n_azimuth"],
            radius_edges_cm=data["radius_edges_cm"],
            cumulative=data["cumulative"],
            rates_per_cm=data["rates_per_cm"],
            amplitudes=data["amplitudes"],
            provenance=data.get("provenance", {}),
            group_amplitudes=data.get("group_amplitudes"),
            group_edges_mev=data.get("group_edges_mev"),
            azimuth_stagger=bool(data.get("azimuth_stagger", False)),
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write the table as JSON atomically (temporary file + ``os.replace``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(self.to_dict(), fh, indent=1)
                fh.write("\n")
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CollapsedConeKernel":
        with open(path, encoding="utf-8") as fh:
            return cls.from_dict(json.load(fh))


def ring_azimuths_deg(n_polar: int, n_azimuth: int, stagger: bool = False) -> np.ndarray:
    """(n_polar, n_azimuth) cone azimuths (deg): ``360 (q + 1/2) / n_azimuth`` for every ring, or
    with ``stagger`` ``360 (q + 1) / n_azimuth`` for the odd rings (half a step turned)."""
    q = np.arange(int(n_azimuth), dtype=np.float64)
    shift = 0.5 + (0.5 * (np.arange(int(n_polar)) % 2) if stagger else np.zeros(int(n_polar)))
    return 360.0 * (q[None, :] + shift[:, None]) / n_azimuth


def cone_directions(polar_deg, n_azimuth: int, axis=(0.0, 0.0, 1.0), ring_solid_angle_sr=None, *,
                    stagger: bool = False):
    """Unit vectors of rings of cones about ``axis`` (see :meth:`CollapsedConeKernel.directions`).

    Azimuths are ``2 pi (q + 0.5) / n_azimuth`` from a fixed vector perpendicular to ``axis`` (the
    lab axis least aligned with it); with ``stagger`` the odd rings use ``2 pi (q + 1) / n_azimuth``
    (:func:`ring_azimuths_deg`). For an axis along a grid axis and ``n_azimuth`` a multiple of 4
    both sets are symmetric under both lateral reflections and 90 deg rotation, so a beam along a
    grid axis gives exactly symmetric transport lines (the unstaggered set has no direction on a
    grid diagonal; the staggered odd rings do, and :func:`direction_geometry
    <tomodose.transport.collapsed_cone.direction_geometry>` breaks such ties the same way for
    mirrored directions).
    """
    ax = np.asarray(axis, dtype=np.float64)
    norm = float(np.linalg.norm(ax))
    if not np.isfinite(norm) or norm == 0.0:
        raise ValueError(f"axis must be a finite non-zero vector, got {ax.tolist()}")
    ax = ax / norm
    helper = np.zeros(3)
    helper[int(np.argmin(np.abs(ax)))] = 1.0
    e1 = np.cross(ax, helper)
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(ax, e1)
    th = np.radians(np.asarray(polar_deg, dtype=np.float64))
    p = th.size
    dirs = np.empty((p * n_azimuth, 3))
    ring = np.repeat(np.arange(p), n_azimuth)
    shift = 0.5 + (0.5 * (np.arange(p) % 2) if stagger else np.zeros(p))
    for i in range(p):
        for q in range(n_azimuth):
            phi = 2.0 * np.pi * (q + shift[i]) / n_azimuth
            dirs[i * n_azimuth + q] = (
                math.cos(th[i]) * ax + math.sin(th[i]) * (math.cos(phi) * e1 + math.sin(phi) * e2)
            )
    dirs /= np.linalg.norm(dirs, axis=1)[:, None]
    if ring_solid_angle_sr is None:
        omega = np.full(p * n_azimuth, 4.0 * np.pi / (p * n_azimuth))
    else:
        omega = np.repeat(np.asarray(ring_solid_angle_sr, dtype=np.float64), n_azimuth) / n_azimuth
    return dirs, omega, ring


_CACHE: dict[tuple[str, int | None, bool | None], CollapsedConeKernel] = {}


def load_kernel(name: str = DEFAULT_KERNEL_NAME, *, n_azimuth: int | None = None,
                azimuth_stagger: bool | None = None) -> CollapsedConeKernel:
    """Load a shipped kernel table from ``tomodose/data/kernels/<name>.json`` (or a path).

    Parameters
    ----------
    name : str or path
        Name of a shipped table, or a path to a JSON kernel file.
    n_azimuth : int, optional
        Override the number of cones per ring.
    azimuth_stagger : bool, optional
        Override the table's ``azimuth_stagger`` (odd rings turned by half an azimuth step).
    """
    if azimuth_stagger is not None and not isinstance(azimuth_stagger, (bool, np.bool_)):
        raise TypeError(f"azimuth_stagger must be a bool or None, got {azimuth_stagger!r}")
    key = (str(name), n_azimuth, None if azimuth_stagger is None else bool(azimuth_stagger))
    if key in _CACHE:
        return _CACHE[key]
    candidate = Path(str(name))
    if candidate.suffix == ".json" and candidate.is_file():
        kernel = CollapsedConeKernel.load(candidate)
    else:
        folder = resources.files("tomodose").joinpath("data", "kernels")
        ref = folder.joinpath(f"{name}.json")
        if not ref.is_file():
            available = sorted(
                p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json")
            ) if folder.is_dir() else []
            raise ValueError(f"name must be a shipped kernel {available} or a JSON path, got {name!r}")
        kernel = CollapsedConeKernel.from_dict(json.loads(ref.read_text(encoding="utf-8")))
    if n_azimuth is not None:
        check_positive("n_azimuth", n_azimuth)
    if n_azimuth is not None or azimuth_stagger is not None:
        kernel = kernel.with_azimuths(kernel.n_azimuth if n_azimuth is None else int(n_azimuth),
                                      None if azimuth_stagger is None else bool(azimuth_stagger))
    _CACHE[key] = kernel
    return kernel
