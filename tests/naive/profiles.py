"""NumPy twins of tomodose._kernels.profiles: the voxel mean of the truncated step by quadrature."""

from __future__ import annotations

import numpy as np
from scipy import integrate
from scipy.special import erf


def edge(x, sigma, cutoff):
    """Truncated smooth step: Phi(x / sigma) inside +-cutoff sigma, exact 0/1 outside; step for sigma 0."""
    if sigma == 0.0:
        return 1.0 if x > 0 else (0.0 if x < 0 else 0.5)
    if x > cutoff * sigma:
        return 1.0
    if x < -cutoff * sigma:
        return 0.0
    return 0.5 * (1.0 + erf(x / (np.sqrt(2.0) * sigma)))


def edge_mean(x, sigma, cutoff, a):
    """Mean of ``edge`` over [x - a, x + a] by adaptive quadrature, split at the kinks."""
    if a == 0.0:
        return edge(x, sigma, cutoff)
    breaks = sorted({b for b in (0.0, -cutoff * sigma, cutoff * sigma) if x - a < b < x + a})
    pts = [x - a] + breaks + [x + a]
    total = 0.0
    for lo, hi in zip(pts[:-1], pts[1:]):
        total += integrate.quad(lambda t: edge(t, sigma, cutoff), lo, hi, epsabs=1e-14, epsrel=1e-13, limit=200)[0]
    return total / (2.0 * a)
