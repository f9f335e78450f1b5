"""Radiological path (Siddon/Jacobs kernel) vs naive Siddon and brute-force line integration."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.naive.raytrace import brute_force_line_integral, radiological_path
from tomodose._kernels.raytrace import radiological_paths, trace_pairs_from_voxel


def _volume(rng, shape=(6, 7, 8), m=2):
    return rng.uniform(0.0, 2.0, shape + (m,))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_naive_siddon_random_heterogeneous(seed):
    rng = np.random.default_rng(seed)
    vals = _volume(rng)
    origin = rng.uniform(-5, 5, 3)
    spacing = rng.uniform(0.5, 3.0, 3)
    starts = rng.uniform(-15, 25, (40, 3))
    ends = rng.uniform(-15, 25, (40, 3))
    got = radiological_paths(vals, origin, spacing, starts, ends)
    for n in range(40):
        ref = radiological_path(vals, origin, spacing, starts[n], ends[n])
        np.testing.assert_allclose(got[n], ref, rtol=1e-10, atol=1e-10)


def test_matches_brute_force_line_integration():
    rng = np.random.default_rng(7)
    vals = _volume(rng, (8, 9, 10), 1)
    origin = np.array([-9.0, -8.0, -7.0])
    spacing = np.array([2.0, 2.0, 2.0])
    # voxel centre -> far point (like voxel -> source)
    centres = origin + spacing * rng.integers(0, 8, (15, 3))
    far = rng.normal(size=(15, 3))
    far = 850.0 * far / np.linalg.norm(far, axis=1, keepdims=True)
    got = radiological_paths(vals, origin, spacing, centres, far)
    for n in range(15):
        ref = brute_force_line_integral(vals, origin, spacing, centres[n], far[n], n_samples=400_000)
        np.testing.assert_allclose(got[n], ref, rtol=2e-3, atol=5e-3)


def test_axis_parallel_and_missing_rays():
    vals = np.ones((3, 4, 5, 1))
    origin = np.zeros(3)
    spacing = np.ones(3)
    starts = np.array([[-10.0, 1.0, 1.0], [2.0, -10.0, 1.0], [2.0, 1.0, 10.0], [-10.0, 50.0, 1.0], [1.0, 1.0, 1.0]])
    ends = np.array([[10.0, 1.0, 1.0], [2.0, 10.0, 1.0], [2.0, 1.0, -10.0], [10.0, 50.0, 1.0], [1.0, 1.0, 1.0]])
    got = radiological_paths(vals, origin, spacing, starts, ends)[:, 0]
    np.testing.assert_allclose(got, [5.0, 4.0, 3.0, 0.0, 0.0], atol=1e-12)


def test_half_voxel_from_centre():
    vals = np.arange(1.0, 6.0).reshape(1, 1, 5, 1)
    got = radiological_paths(vals, np.zeros(3), np.ones(3), np.array([[2.0, 0.0, 0.0]]), np.array([[100.0, 0.0, 0.0]]))
    assert got[0, 0] == pytest.approx(0.5 * 3 + 4 + 5)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-30, 30), min_size=6, max_size=6), st.floats(0.3, 4.0))
def test_uniform_volume_gives_clipped_length(coords, value):
    """In a uniform volume the integral is value x (length of the segment inside the box)."""
    p0 = np.array(coords[:3])
    p1 = np.array(coords[3:])
    shape = (4, 5, 6)
    spacing = np.array([1.5, 2.0, 2.5])
    origin = np.array([-3.0, -4.0, -2.0])
    vals = np.full(shape + (1,), value)
    lo = origin - 0.5 * spacing
    hi = lo + spacing * np.array(shape[::-1])
    # analytic slab clipping
    d = p1 - p0
    a0, a1 = 0.0, 1.0
    for a in range(3):
        if d[a] == 0:
            if not (lo[a] <= p0[a] <= hi[a]):
                a0, a1 = 1.0, 0.0
            continue
        t1, t2 = sorted(((lo[a] - p0[a]) / d[a], (hi[a] - p0[a]) / d[a]))
        a0, a1 = max(a0, t1), min(a1, t2)
    expected = value * max(0.0, a1 - a0) * np.linalg.norm(d)
    got = radiological_paths(vals, origin, spacing, p0[None], p1[None])[0, 0]
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("seed", [0, 1])
def test_pairs_from_voxel_matches_naive_siddon(seed):
    """The fused voxel-centre trace of the TERMA kernel (two-anchor mixtures) vs naive Siddon."""
    rng = np.random.default_rng(seed)
    nz, ny, nx, m = 5, 6, 7, 4
    origin = rng.uniform(-5, 5, 3)
    spacing = rng.uniform(0.5, 3.0, 3)
    mat_lo = rng.integers(0, m - 1, nz * ny * nx)
    mat_pair = rng.uniform(0.0, 2.0, (nz * ny * nx, 2))
    dense = np.zeros((nz * ny * nx, m))
    dense[np.arange(mat_lo.size), mat_lo] += mat_pair[:, 0]
    dense[np.arange(mat_lo.size), mat_lo + 1] += mat_pair[:, 1]
    dense = dense.reshape(nz, ny, nx, m)
    ends = np.concatenate([rng.normal(size=(20, 3)) * 300.0,                 # far (source-like)
                           rng.uniform(-10, 20, (10, 3)),                    # inside or near the grid
                           [[1e3, 0, 0], [0, -1e3, 0], [0, 0, 1e3]]])        # axis-parallel directions
    for n, end in enumerate(ends):
        i, j, k = rng.integers(0, nx), rng.integers(0, ny), rng.integers(0, nz)
        p0 = origin + spacing * np.array([i, j, k])
        p1 = end if n < 30 else p0 + end
        acc = np.full(m, 0.25)
        trace_pairs_from_voxel(nz, ny, nx, *origin, *spacing, i, j, k, *p1, mat_lo, mat_pair, acc)
        ref = radiological_path(dense, origin, spacing, p0, p1)
        np.testing.assert_allclose(acc - 0.25, ref, rtol=1e-10, atol=1e-10)
