"""Objective terms for sinogram optimisation, built from a protocol.

The dose in the optimiser is ``d = A x`` (Gy, whole course) with ``A`` the influence matrix
restricted to the voxels of the structures that appear in objectives and ``x`` the leaf-open
fractions of the candidate beamlets, in [0, 1].

Each term is dimensionless (doses divided by their reference dose) and weighted:

* ``under`` — target voxels below ``level_gy``: ``w * sum_i o_i relu(level - d_i)^2 / (sum o) / level^2``
* ``over`` — voxels above ``level_gy`` (targets' hot spots, OAR near-maximum doses, the ring of
  normal tissue around the target): the same with ``relu(d_i - level)``;
* ``mean`` — a structure's occupancy-weighted mean dose above ``level_gy``:
  ``w * relu(mean - level)^2 / level^2``.

``o_i`` are voxel occupancies. Gradients are exact (tested against finite differences).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Term", "evaluate_terms"]


@dataclass(frozen=True)
class Term:
    """One objective term on a subset of the optimiser's voxels.

    Attributes
    ----------
    name : str
    kind : str
        ``"under"``, ``"over"`` or ``"mean"``.
    rows : (n,) int64
        Indices into the optimiser's voxel list.
    weights : (n,) float64
        Voxel occupancies (volume weights).
    level_gy : float
        Dose level (Gy, whole course).
    weight : float
        Importance.
    constraints : tuple of str
        Ids of the protocol constraints this term serves (used to re-weight the term when the
        collapsed-cone dose of a plan misses them, see :func:`tomodose.optimisation.optimise_plan`).
    """

    name: str
    kind: str
    rows: np.ndarray
    weights: np.ndarray
    level_gy: float
    weight: float
    constraints: tuple = ()


def evaluate_terms(terms, dose_gy: np.ndarray) -> tuple[float, np.ndarray, dict]:
    """Objective value, its gradient with respect to the dose, and per-term values."""
    grad = np.zeros_like(dose_gy, dtype=np.float64)
    total = 0.0
    parts = {}
    for t in terms:
        d = dose_gy[t.rows]
        w = t.weights
        wsum = float(w.sum())
        if wsum <= 0:
            continue
        scale = t.weight / (wsum * t.level_gy**2)
        if t.kind == "under":
            r = np.maximum(t.level_gy - d, 0.0)
            value = scale * float(np.dot(w, r * r))
            np.add.at(grad, t.rows, -2.0 * scale * w * r)
        elif t.kind == "over":
            r = np.maximum(d - t.level_gy, 0.0)
            value = scale * float(np.dot(w, r * r))
            np.add.at(grad, t.rows, 2.0 * scale * w * r)
        elif t.kind == "mean":
            mean = float(np.dot(w, d)) / wsum
            r = max(mean - t.level_gy, 0.0)
            value = t.weight * r * r / t.level_gy**2
            if r > 0:
                np.add.at(grad, t.rows, 2.0 * t.weight * r / t.level_gy**2 * w / wsum)
        else:  # pragma: no cover - constructed internally
            raise ValueError(f"unknown term kind {t.kind!r}")
        parts[t.name] = value
        total += value
    return total, grad, parts
