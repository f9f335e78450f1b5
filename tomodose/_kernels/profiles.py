"""Voxel-averaged beam-profile edges (numba; private, no validation).

The TERMA of a voxel stands for the energy released in the whole voxel, so the fluence profile
should be averaged over the voxel, not sampled at its centre: a sharp or steep jaw or leaf edge
sampled at voxel centres moves in whole-voxel steps with depth (divergence), which on a 2.5 mm
grid changed the z-integral of a 10 mm-jaw field's TERMA by up to 10 % (docs/terma.md).

``edge(x)`` is the truncated smooth step used by the beam model: ``Phi(x / sigma)`` for
``|x| <= L sigma`` (``L = cutoff``), exactly 0 below and 1 above; a unit step (0.5 at 0) for
``sigma = 0``. Its antiderivative from minus infinity is, with ``g(x) = x Phi(x/s) + s phi(x/s)``::

    G(x) = 0                                    x < -L s
    G(x) = g(x) - g(-L s)                       |x| <= L s
    G(x) = g(L s) - g(-L s) + (x - L s)         x > L s          (sigma = 0: G = max(x, 0))

and the mean of ``edge`` over ``[x - a, x + a]`` is ``(G(x + a) - G(x - a)) / (2 a)``.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from tomodose.config import NUMBA_OPTIONS

_SQRT2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
#: below this half-width (mm) the mean is the centre value (no cancellation in G differences)
MIN_HALF_WIDTH_MM = 1e-6


@numba.njit(**NUMBA_OPTIONS)
def edge(x, sigma, cutoff):
    """Phi(x / sigma) with exact step for sigma == 0 and 0/1 beyond ``cutoff`` sigmas."""
    if sigma == 0.0:
        if x > 0.0:
            return 1.0
        if x < 0.0:
            return 0.0
        return 0.5
    if x > cutoff * sigma:
        return 1.0
    if x < -cutoff * sigma:
        return 0.0
    return 0.5 * (1.0 + math.erf(x / (_SQRT2 * sigma)))


@numba.njit(**NUMBA_OPTIONS)
def _g(x, sigma):
    t = x / sigma
    return x * 0.5 * (1.0 + math.erf(t / _SQRT2)) + sigma * _INV_SQRT_2PI * math.exp(-0.5 * t * t)


@numba.njit(**NUMBA_OPTIONS)
def edge_mean(x, sigma, cutoff, a):
    """Mean of the truncated step ``edge`` over ``[x - a, x + a]`` (``a`` >= 0, mm).

    ``G(x + a) - G(x - a)`` written with ``H = G + g(-L s)`` (``H = g(-L s)`` below the cutoff,
    ``g(x)`` inside, ``x + g(-L s)`` above, because ``g(L s) - g(-L s) = L s``), so the constant
    ``g(-L s)`` is evaluated only when the interval crosses one cutoff: two ``g`` at most.
    """
    if a < MIN_HALF_WIDTH_MM:
        return edge(x, sigma, cutoff)
    hi = x + a
    lo = x - a
    if sigma == 0.0:
        return ((hi if hi > 0.0 else 0.0) - (lo if lo > 0.0 else 0.0)) / (2.0 * a)
    lim = cutoff * sigma
    if lo > lim:
        return 1.0
    if hi < -lim:
        return 0.0
    if hi > lim:
        if lo < -lim:
            r = hi / (2.0 * a)
        else:
            r = (hi + _g(-lim, sigma) - _g(lo, sigma)) / (2.0 * a)
    elif lo < -lim:
        r = (_g(hi, sigma) - _g(-lim, sigma)) / (2.0 * a)
    else:
        r = (_g(hi, sigma) - _g(lo, sigma)) / (2.0 * a)
    # a mean of a step lies in [0, 1]; the differences above may round a few ulp outside
    return min(max(r, 0.0), 1.0)


@numba.njit(**NUMBA_OPTIONS)
def window_mean(v, half, sigma, cutoff, a):
    """Mean over ``[v - a, v + a]`` of ``edge(v + half) - edge(v - half)`` (a jaw-like window)."""
    return edge_mean(v + half, sigma, cutoff, a) - edge_mean(v - half, sigma, cutoff, a)



@numba.njit(**NUMBA_OPTIONS)
def offaxis_polynomial(theta_abs, coeffs):
    """Off-axis fluence factor ``1 + sum_c coeffs[c - 1] |theta|^c`` (``theta_abs`` = |fan angle|, rad)."""
    off = 1.0
    p = 1.0
    for c in range(coeffs.shape[0]):
        p *= theta_abs
        off += coeffs[c] * p
    return off

# ---------------------------------------------------------------------------------------------
# Tabulated antiderivative (same means, no erf/exp per call)
# ---------------------------------------------------------------------------------------------
#: Table nodes per sigma of :func:`step_integral_table`: cubic Hermite error <= h^4/384 max|G''''|
#: = sigma * 0.4 / (384 * 48^4) ~ 2e-10 sigma (mm) in G.
TABLE_NODES_PER_SIGMA = 48
#: Below this averaging half-width (in sigmas) the table's mean is not used (its error / (2 a)
#: grows); at it the mean is within ~2e-9 of the closed form.
MIN_TABLE_HALF_WIDTH_SIGMAS = 0.05


@numba.njit(**NUMBA_OPTIONS)
def step_integral_table(sigma, cutoff):
    """Node values of the antiderivative ``G(x)`` and of its derivative ``edge(x)`` on ``[-L s, L s]``.

    Returns ``(h, values, slopes)``: node spacing (mm) and the two (N + 1,) arrays at
    ``x_n = -L s + n h``, both exact (closed form). ``sigma`` must be > 0.
    """
    lim = cutoff * sigma
    n = int(math.ceil(2.0 * cutoff * TABLE_NODES_PER_SIGMA))
    h = 2.0 * lim / n
    values = np.empty(n + 1)
    slopes = np.empty(n + 1)
    g_lo = _g(-lim, sigma)
    for k in range(n + 1):
        x = -lim + k * h
        values[k] = _g(x, sigma) - g_lo
        slopes[k] = edge(x, sigma, cutoff)
    values[n] = lim  # G(L s) = g(L s) - g(-L s) = L s exactly
    return h, values, slopes


@numba.njit(**NUMBA_OPTIONS)
def step_integral(x, lim, h, values, slopes):
    """``G(x)``, the antiderivative of the truncated step (module docstring; ``lim = L s``): cubic
    Hermite interpolation of the exact node values and slopes inside ``[-lim, lim]``, exact
    outside (0 below, ``x`` above)."""
    if x <= -lim:
        return 0.0
    if x >= lim:
        return x
    t = (x + lim) / h
    k = int(t)
    n = values.shape[0] - 1
    if k >= n:
        k = n - 1
    s = t - k
    s2 = s * s
    s3 = s2 * s
    return ((2.0 * s3 - 3.0 * s2 + 1.0) * values[k] + (s3 - 2.0 * s2 + s) * h * slopes[k]
            + (-2.0 * s3 + 3.0 * s2) * values[k + 1] + (s3 - s2) * h * slopes[k + 1])


@numba.njit(**NUMBA_OPTIONS)
def edge_mean_table(x, sigma, cutoff, a, h, values, slopes):
    """:func:`edge_mean` from the table of :func:`step_integral_table` (same ``sigma``, ``cutoff``):
    the same early exits, the table for ``a >= MIN_TABLE_HALF_WIDTH_SIGMAS * sigma`` and
    ``sigma > 0``, the closed form otherwise. Differs from :func:`edge_mean` by ~2e-10 sigma / (2 a)."""
    if sigma == 0.0 or a < MIN_TABLE_HALF_WIDTH_SIGMAS * sigma:
        return edge_mean(x, sigma, cutoff, a)
    lim = cutoff * sigma
    lo = x - a
    if lo > lim:
        return 1.0
    hi = x + a
    if hi < -lim:
        return 0.0
    r = (step_integral(hi, lim, h, values, slopes) - step_integral(lo, lim, h, values, slopes)) / (2.0 * a)
    return min(max(r, 0.0), 1.0)


@numba.njit(**NUMBA_OPTIONS)
def window_mean_table(v, half, sigma, cutoff, a, h, values, slopes):
    """:func:`window_mean` from the table of :func:`step_integral_table`."""
    return (edge_mean_table(v + half, sigma, cutoff, a, h, values, slopes)
            - edge_mean_table(v - half, sigma, cutoff, a, h, values, slopes))
