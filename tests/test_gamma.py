"""Gamma index, dose-difference and distance-to-agreement maps.

Analytic checks (closed forms derived in docs/gamma.md), the kernels against their brute-force
NumPy twins (tests/naive/gamma.py), determinism, pymedphys agreement (optional peer), bad input.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.naive import gamma as naive
from tomodose._kernels import gamma as kg
from tomodose.evaluation.gamma import (
    GammaCriteria,
    GammaResult,
    distance_to_agreement_map,
    dose_difference_map,
    gamma_index,
    search_offsets_mm,
)
from tomodose.geometry.grid import Grid, ImageVolume


def _dose(grid: Grid, array) -> ImageVolume:
    return ImageVolume(grid, np.broadcast_to(array, grid.shape).astype(float), "Gy", "dose")


def _ramp(grid: Grid, d0: float, g_gy_per_mm: float, shift_mm: float = 0.0, x0_mm: float = 0.0) -> ImageVolume:
    """D(x) = d0 + G (x - x0 - shift), uniform in y and z."""
    x, _, _ = grid.meshgrid_mm()
    return _dose(grid, d0 + g_gy_per_mm * (x - x0_mm - shift_mm))


def _ramp_gamma(shift_mm, dta_mm, dd_gy, g_gy_per_mm):
    """Closed form for a linear ramp shifted by s: min_u u^2/DTA^2 + G^2 (u - s)^2 / DD^2
    = s^2 / (DTA^2 + (DD / G)^2)."""
    return abs(shift_mm) / math.sqrt(dta_mm**2 + (dd_gy / g_gy_per_mm) ** 2)


def _ramp_bound(exact, dta_mm, dd_gy, g_gy_per_mm, step_mm):
    """Upper bound of the sampled minimum: some search point lies within 1.2 h of the exact
    minimiser and the Hessian of gamma^2 is 2 (1/DTA^2 + G^2/DD^2) along x (2/DTA^2 across)."""
    curv = 1.0 / dta_mm**2 + (g_gy_per_mm / dd_gy) ** 2
    return math.sqrt(exact**2 + curv * (1.2 * step_mm) ** 2)


INTERIOR = (slice(None), slice(None), slice(8, -8))


# ------------------------------------------------------------------------------------------
# search offsets
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("radius,step", [(3.0, 0.2), (3.0, 0.5), (1.0, 0.3)])
def test_offsets_sorted_and_cover_each_shell(radius, step):
    offs, dist, shell = search_offsets_mm(radius, step)
    assert np.all(offs[0] == 0) and dist[0] == 0
    assert np.all(np.diff(dist) >= 0) and np.all(np.diff(shell) >= 0)
    np.testing.assert_allclose(np.linalg.norm(offs, axis=1), dist, atol=1e-12)
    assert dist[-1] <= radius + 1e-9 and dist[-1] > radius - step - 1e-9
    # covering: any point of a shell has a search point of that shell within one step
    rng = np.random.default_rng(1)
    for k in range(1, shell.max() + 1):
        pts = offs[shell == k]
        u = rng.normal(size=(200, 3))
        probe = k * step * u / np.linalg.norm(u, axis=1, keepdims=True)
        nearest = np.min(np.linalg.norm(probe[:, None, :] - pts[None, :, :], axis=2), axis=1)
        assert nearest.max() <= step, (k, nearest.max())


def test_offsets_2d_and_1d():
    offs, dist, _ = search_offsets_mm(1.0, 0.25, (True, True, False))
    assert np.all(offs[:, 2] == 0)
    np.testing.assert_allclose(np.linalg.norm(offs, axis=1), dist, atol=1e-12)
    offs, dist, _ = search_offsets_mm(1.0, 0.25, (False, False, True))
    assert np.all(offs[:, :2] == 0) and offs.shape[0] == 1 + 2 * 4


# ------------------------------------------------------------------------------------------
# analytic cases
# ------------------------------------------------------------------------------------------
GRID = Grid((5, 6, 40), (1.0, 1.25, 1.5), (-20.0, 3.0, -2.0))  # x in [-20, 19] mm


def test_identical_doses_give_zero():
    ref = _ramp(GRID, 2.5, 0.05)
    res = gamma_index(ref, ref, cutoff_percent=0)
    assert res.n_evaluated == GRID.n_voxels and res.pass_rate_percent == 100.0
    assert np.all(res.gamma.array == 0.0)


@pytest.mark.parametrize("shift_mm", [0.7, -1.3, 3.0])
@pytest.mark.parametrize("local", [False, True])
def test_shifted_ramp_matches_closed_form(shift_mm, local):
    g, dta, pct, step = 0.06, 2.0, 2.0, 0.2
    ref = _ramp(GRID, 2.0, g)
    ev = _ramp(GRID, 2.0, g, shift_mm)
    res = gamma_index(ref, ev, dose_percent=pct, distance_mm=dta, local=local, cutoff_percent=0)
    gam = res.gamma.array[INTERIOR]
    dd = pct / 100 * (ref.array[INTERIOR] if local else ref.array.max())
    exact = abs(shift_mm) / np.sqrt(dta**2 + (dd / g) ** 2)
    bound = np.sqrt(exact**2 + (1 / dta**2 + (g / dd) ** 2) * (1.2 * step) ** 2)
    assert np.all(gam >= exact - 1e-9)
    assert np.all(gam <= bound)


def test_shifted_ramp_converges_with_step():
    g, dta, dd = 0.05, 2.0, 0.04
    ref = _ramp(GRID, 2.5, g)
    ev = _ramp(GRID, 2.5, g, 1.0)
    exact = _ramp_gamma(1.0, dta, dd, g)
    errs = []
    for step in (0.4, 0.2, 0.05):
        res = gamma_index(ref, ev, distance_mm=dta, normalisation_gy=2.0, dose_percent=2.0,
                          cutoff_percent=0, search_step_mm=step, max_search_radius_mm=dta)
        gam = res.gamma.array[INTERIOR]
        assert np.all(gam <= _ramp_bound(exact, dta, dd, g, step))
        errs.append(np.max(gam) - exact)
    assert errs[2] < errs[0] and errs[2] < 2e-3


def test_scaled_dose_in_flat_region():
    for scale in (1.01, 0.97, 1.05):
        ref = _dose(GRID, 3.0)
        ev = _dose(GRID, 3.0 * scale)
        res = gamma_index(ref, ev, dose_percent=3, distance_mm=2, normalisation_gy=4.0)
        np.testing.assert_allclose(res.gamma.array, abs(scale - 1) * 3.0 / (0.03 * 4.0), rtol=1e-12)
        res = gamma_index(ref, ev, dose_percent=3, distance_mm=2, local=True)
        np.testing.assert_allclose(res.gamma.array, abs(scale - 1) / 0.03, rtol=1e-12)
    # 5 % against 3 %: gamma 5/3 (resolved: below the default 3 x DTA radius), all fail
    assert res.pass_rate_percent == 0.0


def test_different_grids_are_interpolated():
    """Evaluated ramp on a finer, offset grid: trilinear interpolation of a linear function is
    exact, so the closed form still holds."""
    g, shift = 0.05, 1.0
    ref = _ramp(GRID, 2.5, g)
    fine = Grid((13, 17, 90), (0.5, 0.6, 0.7), (-21.3, 2.1, -3.9))
    ev = _ramp(fine, 2.5, g, shift)
    res = gamma_index(ref, ev, cutoff_percent=0)
    dd = 0.02 * ref.array.max()
    exact = _ramp_gamma(shift, 2.0, dd, g)
    gam = res.gamma.array[INTERIOR]
    assert np.all(gam >= exact - 1e-9) and np.all(gam <= _ramp_bound(exact, 2.0, dd, g, 0.2))


def test_cutoff_and_outside_voxels_are_nan():
    ref = _ramp(GRID, 0.0, 0.1, -20.0)  # 0 ... 3.9 Gy along x
    ev_grid = Grid((5, 6, 20), (1.0, 1.25, 1.5), (-20.0, 3.0, -2.0))  # covers only x <= -1
    ev = _ramp(ev_grid, 0.0, 0.1, -20.0)
    res = gamma_index(ref, ev, cutoff_percent=25, max_search_radius_mm=4.0, distance_mm=2.0)
    x = GRID.x_mm
    below = ref.array < 0.25 * ref.array.max()
    assert np.all(np.isnan(res.gamma.array[below]))
    # the evaluated grid ends at x = -1 mm; search radius 4 mm, step 0.2 mm
    far = np.broadcast_to(x > -1 + 4.0 + 1e-6, GRID.shape)
    assert np.all(np.isnan(res.gamma.array[far]))
    near = np.broadcast_to(x <= -1 + 4.0 - 0.2, GRID.shape)
    assert np.all(np.isfinite(res.gamma.array[near & ~below]))
    assert res.n_outside == int(np.count_nonzero(np.isnan(res.gamma.array) & ~below))
    assert res.n_outside >= int(np.count_nonzero(far & ~below))
    assert res.n_evaluated + res.n_outside == int(np.count_nonzero(~below))


def test_two_dimensional_grids():
    g2 = Grid((1, 30, 30), (1.0, 1.0, 3.0))
    x, y, _ = g2.meshgrid_mm()
    ref = _dose(g2, 1.0 + 0.04 * x + 0.03 * y)
    ev = _dose(g2, 1.0 + 0.04 * (x - 1.0) + 0.03 * y)
    res = gamma_index(ref, ev, dose_percent=2, distance_mm=2, cutoff_percent=0)
    # 2-D: the search stays in the plane; the gradient magnitude is 0.05 Gy/mm along (0.8, 0.6)
    dd, G = 0.02 * ref.array.max(), 0.05
    exact = _ramp_gamma(0.04 / G * 1.0, 2.0, dd, G)  # shift along the gradient 0.8 mm
    gam = res.gamma.array[0, 6:-6, 6:-6]
    assert np.all(gam >= exact - 1e-9) and np.all(gam <= _ramp_bound(exact, 2.0, dd, G, 0.2))


# ------------------------------------------------------------------------------------------
# kernels against the naive twins
# ------------------------------------------------------------------------------------------
def _random_case(seed):
    rng = np.random.default_rng(seed)
    # reference voxels within [0, 6] mm; evaluated grid [-1.5 .. -1, >= 6.7] mm: partly
    # beyond the edges (searches that leave the grid), voxel centres all covered
    ref_grid = Grid((4, 5, 6), tuple(rng.uniform(0.8, 1.2, 3)), tuple(rng.uniform(0, 1, 3)))
    ev_grid = Grid((7, 8, 9), tuple(rng.uniform(0.9, 1.3, 3)), tuple(rng.uniform(-1.5, -1, 3)))
    ref = rng.uniform(0.1, 2.0, ref_grid.shape)
    ev = rng.uniform(0.1, 2.0, ev_grid.shape)
    return _dose(ref_grid, ref), _dose(ev_grid, ev)


def _kernel_inputs(reference, evaluated, radius, step, dta):
    from tomodose.evaluation.gamma import _grid_mapping

    offs, dist, shell = search_offsets_mm(radius, step)
    base0, scale = _grid_mapping(reference, evaluated)
    offs_idx = np.ascontiguousarray(offs / np.asarray(evaluated.grid.spacing_mm))
    return dict(
        ref_flat=np.ascontiguousarray(reference.array.ravel()),
        ref_shape_yx=np.array(reference.grid.shape[1:], dtype=np.int64),
        points=np.arange(reference.array.size, dtype=np.int64),
        ev=np.ascontiguousarray(evaluated.array),
        base0=base0, scale=scale, offs=offs_idx, dist=dist, shell=shell,
        dist2=np.ascontiguousarray((dist / dta) ** 2),
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("local", [False, True])
def test_gamma_kernel_matches_naive(seed, local):
    reference, evaluated = _random_case(seed)
    a = _kernel_inputs(reference, evaluated, radius=1.5, step=0.5, dta=1.0)
    from tomodose.evaluation.gamma import _BLOCK, _block_extrema

    bmin, bmax = _block_extrema(a["ev"])
    reach = np.abs(a["offs"]).max(axis=0)
    args = (a["ref_flat"], a["ref_shape_yx"], a["points"], a["ev"], a["base0"], a["scale"],
            a["offs"], a["dist2"], 1.0 / 0.06, local, 0.03, bmin, bmax, _BLOCK, reach)
    fast = kg.gamma_search(*args, np.empty(a["points"].size))
    slow = naive.gamma_search(*args, np.empty(a["points"].size))
    assert np.array_equal(np.isinf(fast), np.isinf(slow))
    fin = np.isfinite(slow)
    assert fin.all()
    np.testing.assert_allclose(fast[fin], slow[fin], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("local", [False, True])
def test_aligned_fast_path_matches_naive(local):
    """Reference voxel centres on evaluated voxel centres (same spacing, origin a whole number of
    voxels away, partly outside): the precomputed-weight kernel against the brute-force twin."""
    from tomodose.evaluation import gamma as gm

    rng = np.random.default_rng(11)
    sp = (1.0, 1.2, 0.9)
    ref_grid = Grid((4, 5, 6), sp, (0.0, 0.0, 0.0))
    ev_grid = Grid((5, 6, 6), sp, (-2 * sp[0], -1 * sp[1], -1 * sp[2]))
    reference = _dose(ref_grid, rng.uniform(0.5, 2.0, ref_grid.shape))
    evaluated = _dose(ev_grid, rng.uniform(0.5, 2.0, ev_grid.shape))
    a = _kernel_inputs(reference, evaluated, radius=1.5, step=0.5, dta=1.0)
    assert gm._aligned_shift(a["base0"], a["scale"]) is not None
    res = gamma_index(reference, evaluated, dose_percent=3.0, distance_mm=1.0, local=local,
                      normalisation_gy=2.0, cutoff_percent=0, max_search_radius_mm=1.5,
                      search_step_mm=0.5)
    bmin, bmax = gm._block_extrema(a["ev"])
    slow = naive.gamma_search(
        a["ref_flat"], a["ref_shape_yx"], a["points"], a["ev"], a["base0"], a["scale"],
        a["offs"], a["dist2"], 1.0 / 0.06, local, 0.03, bmin, bmax, gm._BLOCK, None,
        np.empty(a["points"].size))
    slow[np.isinf(slow)] = np.nan
    fast = res.gamma.array.ravel()
    np.testing.assert_array_equal(np.isnan(fast), np.isnan(slow))
    assert np.isnan(slow).any() and np.isfinite(slow).sum() > 0.5 * slow.size
    np.testing.assert_allclose(fast, slow, rtol=1e-10, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("seed,ev_scale", [(0, 1.0), (3, 1.0), (4, 2.5)])
def test_dta_and_sampling_kernels_match_naive(seed, ev_scale):
    reference, evaluated = _random_case(seed)
    evaluated = evaluated.with_array(evaluated.array * ev_scale)  # 2.5: some Dr out of reach
    a = _kernel_inputs(reference, evaluated, radius=1.5, step=0.5, dta=1.0)
    from tomodose.evaluation.gamma import _BLOCK, _block_extrema

    bmin, bmax = _block_extrema(a["ev"])
    args = (a["ref_flat"], a["ref_shape_yx"], a["points"], a["ev"], a["base0"], a["scale"],
            a["offs"], np.linalg.norm(a["offs"] * np.asarray(evaluated.grid.spacing_mm), axis=1),
            a["shell"], bmin, bmax, _BLOCK, np.abs(a["offs"]).max(axis=0))
    fast = kg.dta_search(*args, np.empty(a["points"].size))
    slow = naive.dta_search(*args, np.empty(a["points"].size))
    np.testing.assert_array_equal(np.isnan(fast), np.isnan(slow))
    np.testing.assert_array_equal(np.isinf(fast), np.isinf(slow))
    assert np.isinf(slow).any() or ev_scale == 1.0
    fin = np.isfinite(slow)
    assert fin.sum() > 0.5 * slow.size
    np.testing.assert_allclose(fast[fin], slow[fin], rtol=1e-9, atol=1e-9)
    shape = np.array(reference.grid.shape, dtype=np.int64)
    f = kg.sample_at_reference(shape, a["ev"], a["base0"], a["scale"], np.empty(reference.grid.shape))
    s = naive.sample_at_reference(shape, a["ev"], a["base0"], a["scale"], np.empty(reference.grid.shape))
    np.testing.assert_allclose(f, s, rtol=1e-12, equal_nan=True)


def test_trilinear_edges_and_single_voxel_axis():
    ev = np.arange(2 * 3 * 4, dtype=float).reshape(2, 3, 4)
    pts = np.array([[0, 0, 0], [3, 2, 1], [3 + 1e-12, 2, 1], [1.5, 0.5, 0.25], [-0.1, 0, 0],
                    [3.1, 0, 0], [0, 0, 1.5]])
    fast = np.array([kg.trilinear(ev, *p) for p in pts])
    np.testing.assert_allclose(fast, naive.trilinear(ev, pts), equal_nan=True)
    assert np.isnan(fast[4]) and np.isnan(fast[5]) and np.isnan(fast[6])
    np.testing.assert_allclose(fast[3], 0.25 * 12 + 0.5 * 4 + 1.5)  # linear in the indices
    flat = ev[:1]
    assert kg.trilinear(flat, 1.0, 1.0, 0.0) == flat[0, 1, 1]
    assert np.isnan(kg.trilinear(flat, 1.0, 1.0, 0.01))


def test_results_deterministic_and_thread_independent():
    import numba

    rng = np.random.default_rng(5)
    grid = Grid((10, 12, 14), (1.0, 1.0, 1.0))
    ref = _dose(grid, rng.uniform(0.5, 1.5, grid.shape))
    ev = _dose(grid, rng.uniform(0.5, 1.5, grid.shape))
    first = gamma_index(ref, ev, dose_percent=3, distance_mm=1.5).gamma.array
    again = gamma_index(ref, ev, dose_percent=3, distance_mm=1.5).gamma.array
    n = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        single = gamma_index(ref, ev, dose_percent=3, distance_mm=1.5).gamma.array
    finally:
        numba.set_num_threads(n)
    assert np.array_equal(first, again, equal_nan=True)
    assert np.array_equal(first, single, equal_nan=True)


# ------------------------------------------------------------------------------------------
# dose difference and DTA maps
# ------------------------------------------------------------------------------------------
def test_dose_difference_map():
    g, s = 0.05, 1.2
    ref = _ramp(GRID, 2.5, g)
    ev = _ramp(Grid((9, 8, 50), (0.8, 1.0, 1.0), (-21.0, 2.0, -3.0)), 2.5, g, s)
    diff = dose_difference_map(ref, ev)
    assert diff.unit == "Gy"
    inside = ~np.isnan(diff.array)
    assert inside.sum() > 0.5 * diff.array.size
    np.testing.assert_allclose(diff.array[inside], -g * s, atol=1e-12)
    glob = dose_difference_map(ref, ev, relative="global", normalisation_gy=2.0)
    np.testing.assert_allclose(glob.array[inside], -100 * g * s / 2.0, atol=1e-10)
    loc = dose_difference_map(ref, ev, relative="local")
    np.testing.assert_allclose(loc.array[inside], (-100 * g * s / ref.array)[inside], rtol=1e-10)
    assert glob.unit == "%" and loc.unit == "%"


@pytest.mark.parametrize("shift_mm", [0.45, -1.0, 2.3])
def test_dta_of_shifted_ramp(shift_mm):
    """The agreement surface of a ramp shifted by s is the plane at distance |s|."""
    ref = _ramp(GRID, 2.0, 0.05)
    ev = _ramp(GRID, 2.0, 0.05, shift_mm)
    step = 0.2
    dta = distance_to_agreement_map(ref, ev, max_search_radius_mm=4.0, search_step_mm=step)
    assert dta.unit == "mm"
    val = dta.array[INTERIOR]
    assert np.all(val >= abs(shift_mm) - 1e-6) and np.all(val <= abs(shift_mm) + step)
    assert np.all(distance_to_agreement_map(ref, ref).array == 0.0)
    far = distance_to_agreement_map(ref, _ramp(GRID, 2.0, 0.05, 5.0), max_search_radius_mm=2.0)
    assert np.all(np.isinf(far.array[INTERIOR]))


# ------------------------------------------------------------------------------------------
# result object: histogram, JSON, plot
# ------------------------------------------------------------------------------------------
def test_result_outputs(tmp_path):
    ref = _ramp(GRID, 2.5, 0.08)
    x, _, _ = GRID.meshgrid_mm()
    ev = ref.with_array(ref.array * np.where(x > 0, 1.05, 1.0))  # +5 % on one side
    res = gamma_index(ref, ev, dose_percent=2, distance_mm=1, cutoff_percent=20)
    assert isinstance(res, GammaResult)
    counts, edges = res.histogram(bin_width=0.1)
    assert counts.sum() == res.n_evaluated and edges[0] == 0 and math.isclose(edges[-1], 3.0)
    assert 0 < res.pass_rate_percent < 100
    path = res.write_json(tmp_path / "g.json")
    data = json.loads(path.read_text())
    assert data["pass_rate_percent"] == pytest.approx(res.pass_rate_percent)
    assert data["criteria"]["max_search_radius_mm"] == 3.0
    png = res.plot(tmp_path / "sub" / "g.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "sub").glob(".*tmp"))
    assert "pass rate" in res.summary()
    with pytest.raises(ValueError, match="slice_index"):
        res.plot(tmp_path / "x.png", slice_index=99)


# ------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(dose_percent=0), "dose_percent must be > 0"),
        (dict(distance_mm=-1), "distance_mm must be > 0"),
        (dict(cutoff_percent=120), r"cutoff_percent must be in \[0.0, 100.0\]"),
        (dict(normalisation_gy=0), "normalisation_gy must be > 0"),
        (dict(max_search_radius_mm=1.0, distance_mm=2.0), "max_search_radius_mm must be >= distance_mm"),
        (dict(search_step_mm=3.0, distance_mm=2.0), "search_step_mm must be <= distance_mm"),
        (dict(local="yes"), "local must be a bool"),
    ],
)
def test_bad_criteria(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        GammaCriteria(**kwargs)


def test_search_set_size_is_limited():
    ref = _ramp(GRID, 2.5, 0.05)
    with pytest.raises(ValueError, match="needs about .* search points"):
        gamma_index(ref, ref, distance_mm=2, search_step_mm=0.01)


def test_bad_doses():
    ref = _ramp(GRID, 2.5, 0.05)
    with pytest.raises(TypeError, match="evaluated must be a tomodose ImageVolume"):
        gamma_index(ref, ref.array)
    with pytest.raises(ValueError, match="reference must be a dose in Gy"):
        gamma_index(ImageVolume(GRID, ref.array, "HU"), ref)
    assert ref.array.min() > 0
    with pytest.raises(ValueError, match="evaluated must be >= 0 Gy"):
        gamma_index(ref, ref.with_array(ref.array - 10))
    with pytest.raises(ValueError, match="positive maximum dose"):
        gamma_index(_dose(GRID, 0.0), ref)
    with pytest.raises(TypeError, match="not both"):
        gamma_index(ref, ref, GammaCriteria(), dose_percent=3)
    with pytest.raises(ValueError, match="relative must be one of"):
        dose_difference_map(ref, ref, relative="percent")
    with pytest.raises(ValueError, match="search_step_mm must be <= max_search_radius_mm"):
        distance_to_agreement_map(ref, ref, max_search_radius_mm=1.0, search_step_mm=2.0)


# ------------------------------------------------------------------------------------------
# pymedphys (optional peer; Apache-2.0)
# ------------------------------------------------------------------------------------------
def _smooth_case(n=24, spacing=2.0, seed=7):
    """A smooth 3-D dose (sum of Gaussian blobs) and a shifted, scaled, noisy evaluated dose."""
    rng = np.random.default_rng(seed)
    grid = Grid((n, n, n), (spacing,) * 3, (0.0, 0.0, 0.0))
    x, y, z = grid.meshgrid_mm()
    ext = spacing * (n - 1)

    def blobs(dx):
        d = np.zeros(grid.shape)
        r = np.random.default_rng(seed)
        for _ in range(6):
            c = r.uniform(0.25, 0.75, 3) * ext
            w = r.uniform(0.1, 0.25) * ext
            a = r.uniform(0.5, 1.0)
            d += a * np.exp(-((x - c[0] - dx) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * w**2))
        return d

    ref = 2.0 * blobs(0.0)
    ev = 2.0 * 1.02 * blobs(2.0) + rng.normal(0, 0.02, grid.shape)
    return grid, ref, np.clip(ev, 0, None)


@pytest.mark.parametrize("local,different_grids", [(False, False), (True, False), (False, True)])
def test_agrees_with_pymedphys(local, different_grids):
    pymedphys = pytest.importorskip("pymedphys")
    grid, ref, ev = _smooth_case()
    axes = (grid.z_mm, grid.y_mm, grid.x_mm)
    ev_grid, ev_axes = grid, axes
    if different_grids:
        # the evaluated dose resampled (linearly) on a finer, shifted grid
        from scipy.interpolate import RegularGridInterpolator

        ev_grid = Grid((40, 38, 36), (1.3, 1.25, 1.2), (0.7, -0.4, 0.3))
        ev_axes = (ev_grid.z_mm, ev_grid.y_mm, ev_grid.x_mm)
        interp = RegularGridInterpolator(axes, ev, bounds_error=False, fill_value=None)
        zz, yy, xx = np.meshgrid(*ev_axes, indexing="ij")
        ev = np.clip(interp(np.stack([zz, yy, xx], axis=-1)), 0, None)
    kw = dict(dose_percent=2.0, distance_mm=2.0, cutoff_percent=10.0, local=local)
    ours = gamma_index(_dose(grid, ref), _dose(ev_grid, ev), max_search_radius_mm=2 * 2.0,
                       search_step_mm=2.0 / 10, **kw)
    theirs = pymedphys.gamma(
        axes, ref, ev_axes, ev, kw["dose_percent"], kw["distance_mm"],
        lower_percent_dose_cutoff=kw["cutoff_percent"], interp_fraction=10, max_gamma=2.0,
        local_gamma=local,
    )
    valid = ~np.isnan(theirs)
    pr_theirs = 100.0 * np.mean(theirs[valid] <= 1)
    assert np.array_equal(valid, ~np.isnan(ours.gamma.array))
    assert 5 < ours.pass_rate_percent < 99.5  # a discriminating case
    assert abs(ours.pass_rate_percent - pr_theirs) <= 0.5
    both = np.minimum(ours.gamma.array[valid], 2.0)
    assert np.median(np.abs(both - theirs[valid])) < 0.02


# ------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------
def _cli_doses():
    ref = _ramp(GRID, 2.5, 0.08)
    x, _, _ = GRID.meshgrid_mm()
    return ref, ref.with_array(ref.array * np.where(x > 0, 1.05, 1.0))


def test_cli_images(tmp_path, capsys):
    from tomodose.cli.main import main
    from tomodose.io.export import export_volume

    ref, ev = _cli_doses()
    a = export_volume(ref, tmp_path / "ref.mha")
    b = export_volume(ev, tmp_path / "eval.nrrd")
    out_json, out_png = tmp_path / "g.json", tmp_path / "g.png"
    rc = main(["gamma", str(a), str(b), "--dd", "2", "--dta", "1", "--cutoff", "20",
               "--json", str(out_json), "--plot", str(out_png)])
    assert rc == 0
    text = capsys.readouterr().out
    expected = gamma_index(ref, ev, dose_percent=2, distance_mm=1, cutoff_percent=20)
    data = json.loads(out_json.read_text())
    # images are stored as float32: pass rates agree to the voxel
    assert abs(data["n_passed"] - expected.n_passed) <= 2
    assert f"{data['pass_rate_percent']:.2f}%" in text
    assert out_png.stat().st_size > 1000
    assert main(["gamma", str(a), str(b), "--dta", "1", "--min-pass", "99.9"]) == 1
    # NIfTI records no unit: read as Gy with a warning
    c = export_volume(ev, tmp_path / "eval.nii.gz")
    assert main(["gamma", str(a), str(c), "--dta", "1", "--json", str(out_json)]) == 0
    assert abs(json.loads(out_json.read_text())["n_passed"] - expected.n_passed) <= 2
    assert main(["gamma", str(a), str(b), "--dose-eval", "x"]) == 2
    assert "applies to .h5 results files only" in capsys.readouterr().err


def test_cli_results_files(tmp_path, capsys):
    from tomodose.cli.main import main

    hdf5 = pytest.importorskip("tomodose.io.hdf5", reason="tomodose.io.hdf5 not available yet")
    ref, ev = _cli_doses()
    a = hdf5.write_results(tmp_path / "ref.h5", doses={"total": ref})
    b = hdf5.write_results(tmp_path / "eval.h5", doses={"total": ev, "other": ref})
    assert main(["gamma", str(a), str(b), "--dta", "1", "--dose-eval", "total", "--local"]) == 0
    assert "local" in capsys.readouterr().out
    # several doses without a choice, an unknown name: clear errors, status 2
    assert main(["gamma", str(a), str(b)]) == 2
    assert "holds several doses ['other', 'total']" in capsys.readouterr().err
    assert main(["gamma", str(a), str(b), "--dose-eval", "nope"]) == 2
    assert "'nope' not in" in capsys.readouterr().err
    assert main(["gamma", str(a), str(tmp_path / "missing.h5")]) == 2
    assert main(["gamma", str(a), str(a), "--dta", "0"]) == 2
    assert "distance_mm must be > 0" in capsys.readouterr().err


def test_no_overlap_gives_nan_pass_rate_and_valid_json(tmp_path, caplog):
    ref = _ramp(GRID, 2.5, 0.05)
    far_grid = Grid((3, 3, 3), (1.0, 1.0, 1.0), (500.0, 500.0, 500.0))
    with caplog.at_level("WARNING"):
        res = gamma_index(ref, _dose(far_grid, 1.0))
    assert "no evaluated dose within" in caplog.text
    assert res.n_evaluated == 0 and res.n_outside > 0 and math.isnan(res.pass_rate_percent)
    data = json.loads(res.write_json(tmp_path / "g.json").read_text())
    assert data["pass_rate_percent"] is None and data["statistics"]["mean"] is None


def test_default_plot_slice_shows_failures():
    ref = _dose(GRID, 2.0)
    bump = np.zeros(GRID.shape)
    bump[3] = 0.2  # +10 % on slice 3 only: gamma 5 there
    res = gamma_index(ref, ref.with_array(ref.array + bump), dose_percent=2, distance_mm=1)
    assert res.default_slice() == 3
    assert gamma_index(ref, ref).default_slice() == GRID.nz // 2


# ------------------------------------------------------------------------------------------
# invariants (hypothesis)
# ------------------------------------------------------------------------------------------
@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), shift=st.tuples(*[st.floats(-50, 50)] * 3),
       local=st.booleans())
def test_invariants_translation_and_criteria(seed, shift, local):
    """Translating both grids together changes nothing; with a fixed search set, looser criteria
    never raise gamma (every term of the minimum decreases)."""
    rng = np.random.default_rng(seed)
    g_ref = Grid((3, 4, 5), (1.0, 1.1, 1.3), (0.0, 0.0, 0.0))
    g_ev = Grid((4, 5, 6), (0.9, 1.0, 1.2), (-0.7, -0.4, -0.9))
    ref, ev = rng.uniform(0.5, 2.0, g_ref.shape), rng.uniform(0.5, 2.0, g_ev.shape)
    fixed = dict(max_search_radius_mm=1.5, search_step_mm=0.3, cutoff_percent=0, local=local,
                 normalisation_gy=2.0)
    base = gamma_index(_dose(g_ref, ref), _dose(g_ev, ev), dose_percent=3, distance_mm=1.0, **fixed)
    moved = gamma_index(
        _dose(Grid(g_ref.shape, g_ref.spacing_mm, tuple(np.add(g_ref.origin_mm, shift))), ref),
        _dose(Grid(g_ev.shape, g_ev.spacing_mm, tuple(np.add(g_ev.origin_mm, shift))), ev),
        dose_percent=3, distance_mm=1.0, **fixed)
    np.testing.assert_allclose(moved.gamma.array, base.gamma.array, rtol=1e-6, atol=1e-9,
                               equal_nan=True)
    looser_dd = gamma_index(_dose(g_ref, ref), _dose(g_ev, ev), dose_percent=4, distance_mm=1.0, **fixed)
    looser_dta = gamma_index(_dose(g_ref, ref), _dose(g_ev, ev), dose_percent=3, distance_mm=1.4, **fixed)
    ok = ~np.isnan(base.gamma.array)
    assert np.all(looser_dd.gamma.array[ok] <= base.gamma.array[ok] + 1e-12)
    assert np.all(looser_dta.gamma.array[ok] <= base.gamma.array[ok] + 1e-12)
    assert looser_dd.n_passed >= base.n_passed and looser_dta.n_passed >= base.n_passed


def test_mask_restricts_evaluation():
    from tomodose.geometry.structures import Structure

    ref = _ramp(GRID, 2.5, 0.05)
    ev = _ramp(GRID, 2.5, 0.05, 1.0)
    full = gamma_index(ref, ev, cutoff_percent=0)
    x, _, _ = GRID.meshgrid_mm()
    inside = np.broadcast_to(x < 0, GRID.shape)
    part = gamma_index(ref, ev, cutoff_percent=0, mask=inside)
    assert part.n_evaluated == int(inside.sum())
    assert np.all(np.isnan(part.gamma.array[~inside]))
    np.testing.assert_array_equal(part.gamma.array[inside], full.gamma.array[inside])
    body = Structure("body", GRID, inside.astype(float))
    assert gamma_index(ref, ev, cutoff_percent=0, mask=body).n_evaluated == part.n_evaluated
    with pytest.raises(ValueError, match="mask must have the reference shape"):
        gamma_index(ref, ev, mask=np.ones((2, 2, 2), bool))
    with pytest.raises(TypeError, match="mask must be a bool array"):
        gamma_index(ref, ev, mask=inside.astype(int))
