"""Voxel-averaged profile edges (tomodose._kernels.profiles) against quadrature (tests/naive/profiles.py)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.naive import profiles as naive
from tomodose._kernels import profiles


@pytest.mark.parametrize("sigma", [0.0, 0.4, 2.0])
def test_edge_mean_matches_quadrature(sigma):
    rng = np.random.default_rng(7)
    for _ in range(300):
        x = rng.uniform(-20.0, 20.0)
        a = rng.choice([0.0, rng.uniform(0.01, 8.0)])
        got = profiles.edge_mean(x, sigma, 6.0, a)
        want = naive.edge_mean(x, sigma, 6.0, a)
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12), (x, a)


def test_edge_mean_limits_and_conservation():
    # far from the edge: exactly 0 or 1; the mean of a sharp step is the covered fraction
    assert profiles.edge_mean(10.0, 1.0, 6.0, 1.0) == 1.0
    assert profiles.edge_mean(-10.0, 1.0, 6.0, 1.0) == 0.0
    assert profiles.edge_mean(0.25, 0.0, 6.0, 1.0) == pytest.approx(0.625, rel=1e-15)
    # integral of a window over all centres equals its width, for any averaging half-width
    v = np.linspace(-40.0, 40.0, 16001)
    dv = v[1] - v[0]
    for sigma, a in ((0.0, 1.25), (1.5, 1.25), (3.0, 4.0)):
        w = np.array([profiles.window_mean(t, 5.25, sigma, 6.0, a) for t in v])
        assert w.sum() * dv == pytest.approx(10.5, rel=1e-6)
        assert np.all(w >= 0.0) and np.all(w <= 1.0 + 1e-15)


def test_sharp_window_mean_is_the_overlap_fraction():
    # voxel [5, 7.5] under a sharp window of half-width 5.56: 0.56 / 2.5 covered
    assert profiles.window_mean(6.25, 5.56, 0.0, 6.0, 1.25) == pytest.approx(0.56 / 2.5, rel=1e-12)


@pytest.mark.parametrize("sigma", [0.4, 1.38, 2.025, 3.0])
def test_tabulated_edge_mean_matches_closed_form(sigma):
    """The cubic Hermite table of the step's antiderivative gives the closed-form means to 5e-9."""
    h, values, slopes = profiles.step_integral_table(sigma, 6.0)
    rng = np.random.default_rng(9)
    worst = 0.0
    for _ in range(2000):
        x = rng.uniform(-9.0 * sigma, 9.0 * sigma)
        a = rng.choice([rng.uniform(0.05 * sigma, 0.3 + 0.05 * sigma), rng.uniform(0.3, 8.0)])
        got = profiles.edge_mean_table(x, sigma, 6.0, a, h, values, slopes)
        want = profiles.edge_mean(x, sigma, 6.0, a)
        worst = max(worst, abs(got - want))
        assert 0.0 <= got <= 1.0
    assert worst < 5e-9, worst
    # the antiderivative itself at and between the nodes, and its exact ends
    lim = 6.0 * sigma
    for x in (-lim, -0.3 * sigma, 0.0, 0.77 * sigma, lim, lim + 2.0):
        g = (x * naive_phi(x / sigma) + sigma * np.exp(-0.5 * (x / sigma) ** 2) / np.sqrt(2 * np.pi)
             - profiles._g(-lim, sigma)) if abs(x) < lim else (0.0 if x <= -lim else x)
        assert profiles.step_integral(x, lim, h, values, slopes) == pytest.approx(g, abs=1e-9 * sigma)
    # below the minimum half-width and for a sharp step: the closed form itself
    assert profiles.edge_mean_table(0.3, sigma, 6.0, 0.01, h, values, slopes) == profiles.edge_mean(0.3, sigma, 6.0, 0.01)
    assert (profiles.window_mean_table(1.0, 5.0, sigma, 6.0, 1.2, h, values, slopes)
            == pytest.approx(profiles.window_mean(1.0, 5.0, sigma, 6.0, 1.2), abs=2e-8))


def naive_phi(t):
    from math import erf, sqrt
    return 0.5 * (1.0 + erf(t / sqrt(2.0)))
