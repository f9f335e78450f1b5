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
