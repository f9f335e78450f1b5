"""Input validation used at the public boundary (never inside numba kernels).

Every check raises :class:`ValueError` (or :class:`TypeError`) whose message names the
parameter, the offending value and what was expected, e.g.
``"pitch must be > 0, got 0.0"``.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

__all__ = [
    "check_finite_scalar",
    "check_positive",
    "check_nonnegative",
    "check_in_range",
    "check_choice",
    "check_array",
    "check_vector",
]


def _short(value) -> str:
    """Compact repr of a value for error messages."""
    if isinstance(value, np.ndarray):
        if value.size <= 6:
            return repr(value.tolist())
        return f"array of shape {value.shape} and dtype {value.dtype}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_finite_scalar(name: str, value) -> float:
    """Return ``value`` as a float after checking it is a finite real number."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a real number, got bool {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {_short(value)}") from None
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {out}")
    return out


def check_positive(name: str, value) -> float:
    """Finite and strictly positive."""
    out = check_finite_scalar(name, value)
    if out <= 0:
        raise ValueError(f"{name} must be > 0, got {out}")
    return out


def check_nonnegative(name: str, value) -> float:
    """Finite and >= 0."""
    out = check_finite_scalar(name, value)
    if out < 0:
        raise ValueError(f"{name} must be >= 0, got {out}")
    return out


def check_in_range(name: str, value, low: float, high: float, *, inclusive: bool = True) -> float:
    """Finite and within [low, high] (or (low, high) when ``inclusive`` is False)."""
    out = check_finite_scalar(name, value)
    ok = (low <= out <= high) if inclusive else (low < out < high)
    if not ok:
        brackets = "[{}, {}]" if inclusive else "({}, {})"
        raise ValueError(f"{name} must be in {brackets.format(low, high)}, got {out}")
    return out


def check_choice(name: str, value, choices: Iterable):
    """``value`` must be one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def check_array(
    name: str,
    value,
    *,
    ndim: int | None = None,
    shape: Sequence[int | None] | None = None,
    dtype=np.float64,
    finite: bool = True,
    low: float | None = None,
    high: float | None = None,
) -> np.ndarray:
    """Convert to a C-contiguous array of ``dtype`` and check shape, finiteness and range.

    ``shape`` entries that are ``None`` are free. ``low``/``high`` are inclusive bounds.
    """
    try:
        arr = np.asarray(value)
    except Exception as exc:  # pragma: no cover - exotic inputs
        raise TypeError(f"{name} must be array-like, got {type(value).__name__}") from exc
    if arr.dtype == object:
        raise TypeError(f"{name} must be a numeric array, got dtype object")
    if dtype is not None:
        if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
            raise TypeError(f"{name} must be numeric, got dtype {arr.dtype}")
        arr = np.ascontiguousarray(arr, dtype=dtype)
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {arr.shape}")
    if shape is not None:
        if arr.ndim != len(shape) or any(
            s is not None and s != a for s, a in zip(shape, arr.shape)
        ):
            expected = "(" + ", ".join("any" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{name} must have shape {expected}, got {arr.shape}")
    if finite and np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
        n_bad = int(np.count_nonzero(~np.isfinite(arr)))
        raise ValueError(f"{name} must be finite, got {n_bad} NaN/inf value(s)")
    if arr.size and low is not None:
        vmin = arr.min()
        if vmin < low:
            raise ValueError(f"{name} must be >= {low}, got minimum {vmin}")
    if arr.size and high is not None:
        vmax = arr.max()
        if vmax > high:
            raise ValueError(f"{name} must be <= {high}, got maximum {vmax}")
    return arr


def check_vector(name: str, value, length: int = 3, *, positive: bool = False) -> tuple[float, ...]:
    """A finite real vector of ``length`` entries, returned as a tuple of floats."""
    arr = check_array(name, value, shape=(length,))
    if positive and np.any(arr <= 0):
        raise ValueError(f"{name} must have all entries > 0, got {arr.tolist()}")
    return tuple(float(v) for v in arr)
