"""Collapsed-cone surface correction (issues 4, 8): kernels vs the naive twin, invariants, the
surface map, the shipped table, engine options and bad input."""

from __future__ import annotations

import json
import math

import numba
import numpy as np
import pytest

from tests.naive import collapsed_cone as naive
from tomodose.geometry.grid import Grid
from tomodose.transport.ccc_surface import (SurfaceCorrection, load_surface_correction, surface_distance_mm,
                                            surface_weight)
from tomodose.transport.collapsed_cone import collapsed_cone_dose, shared_direction_dose
from tomodose.transport.kernels import load_kernel
from tests._scripts import load_script

#: a strong correction for the tests (the effect is visible on tiny grids)
STRONG = SurfaceCorrection(escape_rate_per_cm=2.0, decay_mm=6.0, cutoff_mm=12.0, slow_rate_per_cm=1.0,
                           body_threshold_g_cm3=0.1)


@pytest.fixture(scope="module")
def small_kernel():
    return load_kernel(n_azimuth=3)


def _case(seed):
    rng = np.random.default_rng(seed)
    shape = (6, 5, 7) if seed == 0 else (5, 7, 4)
    spacing = (4.0, 5.0, 3.0) if seed == 0 else (2.5, 2.5, 6.0)
    grid = Grid(shape, spacing, (-10.0, 3.0, 7.0))
    terma = rng.random(shape) * (rng.random(shape) > 0.4)
    rho = rng.uniform(0.0, 2.0, shape)
    rho[0, 0, :] = 0.0  # vacuum
    rho[1, :, 1] = 0.0012  # air
    return rng, grid, terma, rho


# --- kernels vs the naive twin ---------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("rates, esc", [
    # two escape terms, x = mu delta within the series range: the scalar series loop
    ([0.05, 0.12, 3.0, 100.0], [1.5, 1.5, 0.0, 0.0]),
    # four escape terms first (the vectorised series loop) and strong escapes (x above ESCAPE_SERIES_X:
    # the closed form with exp), a plain term after them
    ([0.05, 0.12, 0.3, 0.7, 3.0], [2.0, 40.0, 0.5, 8.0, 0.0]),
], ids=["series-scalar", "series-simd-and-closed"])
def test_transport_kernels_match_naive_escape_twin(seed, rates, esc):
    """The transport kernels' surface escape against the NumPy twin (every path of
    :func:`_deposit_escape_series` through the kernels; the recursion's closed form is pinned alone by
    ``test_escape_recursion_equals_the_closed_form``)."""
    from tomodose._kernels import collapsed_cone as _k
    from tomodose.transport.collapsed_cone import direction_steppings, fibonacci_directions

    rng, grid, _, rho = _case(seed)
    shape = grid.shape
    rates, esc = np.array(rates), np.array(esc)
    n_k = rates.size
    phi = rng.random(shape) * (rng.random(shape) > 0.3)
    src = (rng.normal(size=(n_k,) + shape) * (rng.random(shape) > 0.4)).astype(np.float32)
    src_vm = np.ascontiguousarray(np.moveaxis(src, 0, -1))
    mark = np.abs(src.astype(np.float64)).sum(axis=0)
    z3 = np.zeros(3)
    for u in fibonacci_directions(10):
        for _, m, sgn, da, db, st in direction_steppings(u, grid.spacing_mm):
            a = np.zeros(shape)
            b = np.zeros(shape)
            _k.transport_direction(src, rho, a, m, sgn, da, db, st, rates, np.eye(n_k), False, u, 0.0,
                                   np.zeros((1, 2, n_k)), 1.0, np.zeros((1, 1, 1, 1)), z3, z3, np.ones(3), z3, True,
                                   0.5, 0.5, True, phi, esc, False, np.zeros((1, 3)))  # no omitted array default:
            # such a call cannot use numba's on-disk cache (it compiled in every test process)
            _k.transport_direct_sources(src_vm, rho, b, m, sgn, da, db, st, rates, True, phi, esc, False,
                                        np.zeros((1, 3)), np.zeros(3))
            slow = naive.transport_direction_escape(
                mark, rho, m, sgn, da, db, st, rates,
                lambda v: src[(slice(None),) + v].astype(np.float64) / mark[v], lambda v: esc * phi[v])
            np.testing.assert_allclose(a, slow, rtol=1e-9, atol=1e-9 * np.abs(slow).max())
            np.testing.assert_allclose(b, slow, rtol=1e-9, atol=1e-9 * np.abs(slow).max())
            np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-12 * np.abs(a).max())


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("mode", ["beam", "source"])
def test_collapsed_cone_with_surface_matches_naive_twin(seed, mode, small_kernel):
    rng, grid, terma, rho = _case(seed)
    if mode == "beam":
        kw = {"beam_direction": rng.normal(size=3)}
        tol = 2e-6
    else:
        kw = {"source_position_mm": np.array(grid.centre_mm) + rng.normal(size=3) * 300 + 400}
        tol = 5e-5  # the kernel tabulates the angular density
    fast = collapsed_cone_dose(terma, rho, grid, kernel=small_kernel, progress=False, surface_correction=STRONG, **kw)
    phi = surface_weight(rho, grid.spacing_mm, STRONG)
    slow = naive.collapsed_cone_dose(terma, rho, grid.spacing_mm, grid.origin_mm, small_kernel, surface=(phi, STRONG),
                                     **kw)
    plain = collapsed_cone_dose(terma, rho, grid, kernel=small_kernel, progress=False, **kw)
    assert np.abs(plain - slow).max() > 20 * tol * slow.max()  # the correction is visible here
    np.testing.assert_allclose(fast, slow, rtol=tol, atol=tol * slow.max())


def test_energy_groups_with_surface_match_naive_twin():
    kernel = load_kernel("ccc_water_6mv_3groups", n_azimuth=2)
    rng, grid, terma, rho = _case(0)
    tg = np.stack([terma * w for w in (0.2, 0.5, 0.3)])
    kw = {"beam_direction": (0.3, -1.0, 0.2)}
    fast = collapsed_cone_dose(tg, rho, grid, kernel=kernel, progress=False, surface_correction=STRONG, **kw)
    phi = surface_weight(rho, grid.spacing_mm, STRONG)
    slow = naive.collapsed_cone_dose(tg, rho, grid.spacing_mm, grid.origin_mm, kernel, surface=(phi, STRONG), **kw)
    np.testing.assert_allclose(fast, slow, rtol=2e-6, atol=2e-6 * slow.max())


def test_shared_directions_with_surface_match_naive_twin():
    kernel = load_kernel(n_azimuth=3)
    rng = np.random.default_rng(43)
    shape, spacing = (6, 5, 7), (4.0, 5.0, 3.0)
    grid = Grid(shape, spacing, (-10.0, 3.0, 7.0))
    angles = np.radians([0.0, 100.0, 230.0])
    beams = np.stack([np.sin(angles), -np.cos(angles), np.zeros(3)], axis=1)
    terma = rng.random((3,) + shape) * (rng.random((3,) + shape) > 0.4)
    rho = rng.uniform(0.0, 2.0, shape)
    rho[0, 0, :] = 0.0
    fast = shared_direction_dose(terma, beams, rho, grid, kernel=kernel, n_directions=24, batch=5, progress=False,
                                 surface_correction=STRONG)
    phi = surface_weight(rho, grid.spacing_mm, STRONG)
    slow = naive.shared_direction_dose(terma, beams, rho, grid.spacing_mm, kernel, range(kernel.n_polar), 24,
                                       surface=(phi, STRONG))
    np.testing.assert_allclose(fast, slow, rtol=2e-6, atol=2e-6 * slow.max())


def test_shared_coarse_with_surface_uses_block_mean_map():
    """Coarse option: the long-range terms see the block mean of the surface map."""
    from tomodose._kernels import collapsed_cone as _k
    from tomodose.transport.collapsed_cone import refine_coarse_dose

    kernel = load_kernel(n_azimuth=3)
    rng = np.random.default_rng(5)
    shape = (8, 6, 10)
    grid = Grid(shape, (3.0, 3.0, 3.0), (0.0, 0.0, 0.0))
    rho = np.ones(shape)
    rho[:, :, :2] = 0.0
    terma = rng.random((2,) + shape).astype(np.float32)
    beams = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    rates = np.asarray(kernel.rates_per_cm)
    slow_terms = np.flatnonzero(rates < 1.0)
    fast_terms = np.flatnonzero(rates >= 1.0)
    kw = dict(kernel=kernel, n_directions=16, progress=False, surface_correction=STRONG)
    got = shared_direction_dose(terma, beams, rho, grid, coarse_factor=2, **kw)
    fine = shared_direction_dose(terma, beams, rho, grid, **kw)
    assert np.all(np.isfinite(got)) and np.abs(got - fine).max() < 0.2 * np.abs(fine).max()
    # the composition by hand: fast terms on the grid, slow terms on blocks with the block-mean map
    phi = surface_weight(rho, grid.spacing_mm, STRONG)
    rho_c, mass_c = _k.coarse_density(rho, 2)
    phi_c = _k.coarse_density(phi, 2)[0]
    t_c = _k.coarse_sources(terma, rho, mass_c, 2)
    grid_c = Grid(rho_c.shape, (6.0, 6.0, 6.0), (1.5, 1.5, 1.5))
    corr_c = naive.shared_direction_dose(t_c, beams, rho_c, grid_c.spacing_mm, kernel, range(kernel.n_polar), 16,
                                         terms=slow_terms, surface=(phi_c, STRONG))
    corr_f = naive.shared_direction_dose(terma, beams, rho, grid.spacing_mm, kernel, range(kernel.n_polar), 16,
                                         terms=fast_terms, surface=(phi, STRONG))
    want = corr_f + refine_coarse_dose(corr_c, 2, shape)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


# --- invariants ------------------------------------------------------------------------------------
def test_off_is_bitwise_unchanged_and_phi_zero_is_uncorrected(small_kernel):
    _, grid, terma, rho = _case(0)
    kw = {"beam_direction": (0.2, 1.0, -0.3), "kernel": small_kernel, "progress": False}
    base = collapsed_cone_dose(terma, rho, grid, **kw)
    np.testing.assert_array_equal(collapsed_cone_dose(terma, rho, grid, surface_correction=False, **kw), base)
    np.testing.assert_array_equal(collapsed_cone_dose(terma, rho, grid, surface_correction=None, **kw), base)
    zero = np.zeros(grid.shape)
    np.testing.assert_array_equal(
        collapsed_cone_dose(terma, rho, grid, surface_correction=STRONG, surface_weight_map=zero, **kw), base)
    t3 = np.stack([terma] * 3)[None].astype(np.float32)
    k3 = load_kernel("ccc_water_6mv_3groups", n_azimuth=2)
    sb = shared_direction_dose(t3, np.array([[0.0, 1.0, 0.0]]), rho, grid, kernel=k3, n_directions=20, progress=False)
    np.testing.assert_array_equal(
        shared_direction_dose(t3, np.array([[0.0, 1.0, 0.0]]), rho, grid, kernel=k3, n_directions=20, progress=False,
                              surface_correction=STRONG, surface_weight_map=zero), sb)


def test_deep_inside_the_dose_is_unchanged():
    """TERMA and receivers deep inside (phi = 0 on every line between them): bit for bit the same."""
    kernel = load_kernel(n_azimuth=4)
    shape = (14, 14, 14)
    grid = Grid(shape, (3.0, 3.0, 3.0), (0.0, 0.0, 0.0))
    rho = np.ones(shape)
    corr = SurfaceCorrection(2.0, 3.0, 9.0)  # phi = 0 from 9 mm (3 voxels) inside
    phi = surface_weight(rho, grid.spacing_mm, corr)
    inner = (slice(4, 10),) * 3
    assert np.all(phi[inner] == 0.0) and phi.max() > 0.5
    terma = np.zeros(shape)
    terma[inner] = np.random.default_rng(2).random((6, 6, 6))
    for kw in ({"beam_direction": (0.3, 1.0, 0.1)}, {"source_position_mm": (20.0, -800.0, 20.0)}):
        a = collapsed_cone_dose(terma, rho, grid, kernel=kernel, progress=False, **kw)
        b = collapsed_cone_dose(terma, rho, grid, kernel=kernel, progress=False, surface_correction=corr, **kw)
        np.testing.assert_array_equal(a[inner], b[inner])
        assert (b < a * 0.999).any() and float(b.sum()) < float(a.sum())


def test_linear_in_terma_and_energy_never_increases(small_kernel):
    rng, grid, terma, rho = _case(1)
    t2 = rng.random(grid.shape)
    kw = {"source_position_mm": (0.0, -900.0, 30.0), "kernel": small_kernel, "progress": False,
          "surface_correction": True}
    a = collapsed_cone_dose(terma, rho, grid, **kw).astype(np.float64)
    b = collapsed_cone_dose(t2, rho, grid, **kw).astype(np.float64)
    c = collapsed_cone_dose(2.0 * terma + t2, rho, grid, **kw).astype(np.float64)
    np.testing.assert_allclose(c, 2.0 * a + b, rtol=1e-5, atol=1e-6 * c.max())
    for corr in (True, STRONG):
        kw["surface_correction"] = corr
        on = collapsed_cone_dose(terma, rho, grid, **kw)
        kw["surface_correction"] = False
        off = collapsed_cone_dose(terma, rho, grid, **kw)
        assert float((rho * on).sum()) < float((rho * off).sum())


def test_thread_independent(small_kernel):
    _, grid, terma, rho = _case(0)
    old = numba.get_num_threads()
    out, shared = [], []
    beams = np.array([[1.0, 0.2, 0.0], [0.0, -1.0, 0.3]])
    try:
        for n in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(n)
            out.append(collapsed_cone_dose(terma, rho, grid, source_position_mm=(0.0, -900.0, 0.0),
                                           kernel=small_kernel, progress=False, surface_correction=STRONG))
            shared.append(shared_direction_dose(np.stack([terma, terma]), beams, rho, grid, kernel=small_kernel,
                                                n_directions=32, progress=False, surface_correction=STRONG,
                                                coarse_factor=2))
    finally:
        numba.set_num_threads(old)
    np.testing.assert_array_equal(out[0], out[1])
    np.testing.assert_array_equal(shared[0], shared[1])


def test_symmetry_preserved():
    """Water block mirror-symmetric across x, beam along y, symmetric TERMA: the corrected dose is
    as symmetric as the uncorrected one."""
    kernel = load_kernel(n_azimuth=4)
    shape = (9, 10, 11)
    grid = Grid(shape, (3.0, 3.0, 3.0), (-15.0, 0.0, -12.0))
    rho = np.ones(shape)
    rho[:, :2, :] = 0.0  # air above the entrance
    terma = np.zeros(shape)
    terma[2:7, 2:, 3:8] = np.exp(-0.05 * np.arange(8))[None, :, None]
    for corr in (False, True):
        d = collapsed_cone_dose(terma, rho, grid, beam_direction=(0.0, 1.0, 0.0), kernel=kernel, progress=False,
                                surface_correction=corr).astype(np.float64)
        asym = np.abs(d - d[:, :, ::-1]).max() / d.max()
        if not corr:
            base = asym
    assert asym <= base + 1e-6


# --- the surface map -------------------------------------------------------------------------------
def test_surface_distance_of_a_slab_and_filled_lungs():
    shape = (6, 12, 8)
    sp = (2.0, 2.5, 4.0)  # dx, dy, dz
    rho = np.zeros(shape)
    rho[:, 2:, :] = 1.0  # air in rows 0-1, then water to the grid boundary (exterior beyond it)
    rho[2:4, 5:8, 3:5] = 0.25  # lung inside
    rho[2:4, 6, 4] = 0.001  # air in the lung: a hole, filled
    s = surface_distance_mm(rho, sp)
    assert np.all(s[:, :2, :] == 0.0)
    # central column (z index 3, x index 4): the nearest exterior voxel centre is the air row 1, the
    # padded layer beyond the far face (row 12), the x faces (4 voxels of 2 mm) or the z faces (3 of 4 mm);
    # s = that distance minus half the smallest voxel side (1 mm)
    j = np.arange(2, 12)
    want = np.minimum(np.minimum((j - 1) * 2.5, (12 - j) * 2.5), min(8.0, 12.0)) - 1.0
    np.testing.assert_allclose(s[3, 2:, 4], want, atol=1e-9)
    assert s[2, 6, 4] > 0  # the air in the lung counts as inside
    phi = surface_weight(rho, sp, SurfaceCorrection(0.05, 10.0, 5.0))
    assert np.all(phi[s >= 5.0] == 0.0) and np.all(phi[:, :2, :] == 0.0)
    inside = (s > 0) & (s < 5.0)
    np.testing.assert_allclose(phi[inside], np.exp(-s[inside] / 10.0))


def test_lung_cut_by_the_grid_end_counts_as_inside():
    rho = np.ones((4, 9, 9))
    rho[:, 3:6, 3:6] = 0.001  # an air channel through every slice, open to both z end faces
    s = surface_distance_mm(rho, (1.0, 1.0, 1.0))
    assert np.all(s[1:3, 3:6, 3:6] > 0)


# --- the shipped table -----------------------------------------------------------------------------
def test_engine_table_is_the_direction_weighted_fit():
    from tomodose.dose.engine import SURFACE_TABLE

    corr = load_surface_correction(SURFACE_TABLE)
    iso = load_surface_correction("ccc_surface_water_6mv")
    assert corr.directional and not iso.directional
    assert load_surface_correction() is corr  # surface_correction=True means the engine's table
    assert corr.provenance["fit"]["chi2_per_dof"] <= iso.provenance["fit"]["chi2_per_dof"]


@pytest.mark.parametrize("name", ["ccc_surface_water_6mv", "ccc_surface_water_6mv_directional"])
def test_shipped_table_loads_with_provenance(name):
    from importlib import resources

    corr = load_surface_correction(name)
    assert corr.name == name
    assert 0.0 < corr.escape_rate_per_cm < 1.0 and 5.0 < corr.decay_mm < 100.0
    assert corr.cutoff_mm >= 5 * corr.decay_mm and corr.slow_rate_per_cm == 1.0
    prov = corr.provenance
    assert prov["script"] == "kernels/derive_ccc_surface.py" and "study_pb_pencil_mc.npz" in json.dumps(prov)
    fit = prov["fit"]
    assert fit["chi2_per_dof"] < 0.2 * fit["chi2_per_dof_uncorrected"]
    folder = resources.files("tomodose").joinpath("data", "kernels")
    md = folder.joinpath(f"{name}.provenance.md").read_text(encoding="utf-8")
    assert "derive_ccc_surface.py" in md and "validation reference was used" in md
    # one parametrisation for every shipped kernel: the slow terms of each are corrected, the fast not
    for name in ("ccc_water_6mv_default", "ccc_water_6mv_3groups", "ccc_water_6mv_5groups"):
        r = load_kernel(name).rates_per_cm
        e = corr.escape_rates(r)
        assert np.all(e[r < 1.0] == corr.escape_rate_per_cm) and np.all(e[r >= 1.0] == 0.0)
        assert (r < 1.0).sum() >= 2


@pytest.mark.slow
def test_derivation_reproduces_the_shipped_table(capsys):
    mod = load_script("kernels/derive_ccc_surface.py")
    assert mod.fit(["--check-only"]) == 0
    models = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines() if line.startswith("{")]
    for name in ("ccc_surface_water_6mv", "ccc_surface_water_6mv_directional"):
        model = next(m for m in models if m["name"] == name)
        corr = load_surface_correction(name)
        assert model["directional"] == corr.directional
        assert math.isclose(model["escape_rate_per_cm"], corr.escape_rate_per_cm, rel_tol=1e-3)
        assert math.isclose(model["decay_mm"], corr.decay_mm, rel_tol=1e-3)


# --- bad input -------------------------------------------------------------------------------------
def test_bad_input(small_kernel):
    _, grid, terma, rho = _case(0)
    kw = {"beam_direction": (0.0, 1.0, 0.0), "kernel": small_kernel, "progress": False}
    with pytest.raises(TypeError, match="surface_correction must be None, a bool or a SurfaceCorrection"):
        collapsed_cone_dose(terma, rho, grid, surface_correction="yes", **kw)
    with pytest.raises(ValueError, match="surface_weight_map"):
        collapsed_cone_dose(terma, rho, grid, surface_correction=True, surface_weight_map=np.zeros((2, 2, 2)), **kw)
    with pytest.raises(ValueError, match="surface_weight_map"):
        collapsed_cone_dose(terma, rho, grid, surface_correction=True, surface_weight_map=np.full(grid.shape, 1.5),
                            **kw)
    with pytest.raises(TypeError, match="surface_correction"):
        shared_direction_dose(terma[None], np.array([[0.0, 1.0, 0.0]]), rho, grid, kernel=small_kernel,
                              surface_correction=1, progress=False)
    with pytest.raises(ValueError, match="escape_rate_per_cm must be a finite rate >= 0"):
        SurfaceCorrection(-0.1, 10.0, 50.0)
    with pytest.raises(ValueError, match=r"decay_mm must be a finite number > 0, got 0"):
        SurfaceCorrection(0.1, 0.0, 50.0)
    with pytest.raises(ValueError, match="cutoff_mm must be a finite number > 0"):
        SurfaceCorrection(0.1, 10.0, float("nan"))
    with pytest.raises(ValueError, match="name must be a shipped surface correction"):
        load_surface_correction("nope")
    with pytest.raises(ValueError, match="surface correction data must have format"):
        SurfaceCorrection.from_dict({"format": "other"})
    with pytest.raises(ValueError, match="model misses"):
        SurfaceCorrection.from_dict({"format": "tomodose-ccc-surface-correction", "model": {}})
    with pytest.raises(ValueError, match="spacing_mm must be 3 finite lengths > 0"):
        surface_distance_mm(rho, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="density_g_cm3"):
        surface_distance_mm(-rho, (1.0, 1.0, 1.0))
    with pytest.raises(TypeError, match="correction must be a SurfaceCorrection"):
        surface_weight(rho, (1.0, 1.0, 1.0), True)


# --- the direction-weighted variant (study option) -------------------------------------------------
DIRECTIONAL = SurfaceCorrection(2.0, 6.0, 12.0, directional=True)


@pytest.mark.parametrize("mode", ["beam", "source"])
def test_directional_escape_matches_naive_twin(mode, small_kernel):
    from tomodose.transport.ccc_surface import surface_normal_weight

    rng, grid, terma, rho = _case(0)
    kw = {"beam_direction": (0.3, -1.0, 0.2)} if mode == "beam" else {"source_position_mm": (50.0, -800.0, 30.0)}
    tol = 2e-6 if mode == "beam" else 5e-5
    fast = collapsed_cone_dose(terma, rho, grid, kernel=small_kernel, progress=False, surface_correction=DIRECTIONAL,
                               **kw)
    phi = surface_weight(rho, grid.spacing_mm, DIRECTIONAL)
    normal = surface_normal_weight(rho, grid.spacing_mm, DIRECTIONAL).reshape(grid.shape + (3,))
    slow = naive.collapsed_cone_dose(terma, rho, grid.spacing_mm, grid.origin_mm, small_kernel,
                                     surface=(phi, DIRECTIONAL, normal), **kw)
    iso = collapsed_cone_dose(terma, rho, grid, kernel=small_kernel, progress=False, surface_correction=STRONG, **kw)
    assert np.abs(iso - fast).max() > 20 * tol * slow.max()  # the weighting matters here
    np.testing.assert_allclose(fast, slow, rtol=tol, atol=tol * slow.max())
    given = collapsed_cone_dose(terma, rho, grid, kernel=small_kernel, progress=False, surface_correction=DIRECTIONAL,
                                surface_weight_map=phi, surface_normal_map=normal.reshape(-1, 3), **kw)
    np.testing.assert_array_equal(given, fast)  # precomputed maps: the same
    with pytest.raises(ValueError, match="surface_normal_map"):
        collapsed_cone_dose(terma, rho, grid, kernel=small_kernel, progress=False, surface_correction=DIRECTIONAL,
                            surface_normal_map=np.zeros((3, 3)), **kw)


def test_directional_shared_matches_naive_twin_and_threads():
    from tomodose.transport.ccc_surface import surface_normal_weight

    kernel = load_kernel(n_azimuth=3)
    rng, grid, terma, rho = _case(1)
    beams = np.array([[1.0, 0.2, 0.0], [0.0, -1.0, 0.3]])
    tg = np.stack([terma, terma * 0.5])
    old = numba.get_num_threads()
    out = []
    try:
        for n in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(n)
            out.append(shared_direction_dose(tg, beams, rho, grid, kernel=kernel, n_directions=20, progress=False,
                                             surface_correction=DIRECTIONAL))
    finally:
        numba.set_num_threads(old)
    np.testing.assert_array_equal(out[0], out[1])
    phi = surface_weight(rho, grid.spacing_mm, DIRECTIONAL)
    normal = surface_normal_weight(rho, grid.spacing_mm, DIRECTIONAL).reshape(grid.shape + (3,))
    slow = naive.shared_direction_dose(tg, beams, rho, grid.spacing_mm, kernel, range(kernel.n_polar), 20,
                                       surface=(phi, DIRECTIONAL, normal))
    np.testing.assert_allclose(out[0], slow, rtol=2e-6, atol=2e-6 * slow.max())


def test_directional_escape_spares_lines_across_a_surface():
    """A water slab with its surface normal along y: energy travelling along y (across the surface)
    loses nothing with the directional escape, energy travelling along x (along the surface) loses."""
    shape = (3, 12, 12)
    grid = Grid(shape, (3.0, 3.0, 3.0), (0.0, 0.0, 0.0))
    rho = np.ones(shape)
    rho[:, :3, :] = 0.0
    from tomodose.transport.ccc_surface import surface_normal_weight

    nw = surface_normal_weight(rho, grid.spacing_mm, DIRECTIONAL).reshape(shape + (3,))
    # away from the x faces the normal is along +y (inward)
    mid = nw[1, 4, 4:8]
    np.testing.assert_allclose(mid[:, 0], 0.0, atol=1e-12)
    assert np.all(mid[:, 1] > 0)
    phi = surface_weight(rho, grid.spacing_mm, DIRECTIONAL)
    np.testing.assert_allclose(mid[:, 1] ** 2, phi[1, 4, 4:8])


def test_surface_maps_equal_the_single_maps():
    # one distance transform for both maps gives what the two single-map functions give
    from tomodose.transport.ccc_surface import load_surface_correction, surface_maps, surface_normal_weight

    _, grid, _, rho = _case(1)
    corr = load_surface_correction()
    phi, normal = surface_maps(rho, grid.spacing_mm, corr)
    assert corr.directional and normal is not None
    np.testing.assert_array_equal(phi, surface_weight(rho, grid.spacing_mm, corr))
    np.testing.assert_array_equal(normal, surface_normal_weight(rho, grid.spacing_mm, corr))
    np.testing.assert_array_equal(normal, surface_normal_weight(rho, grid.spacing_mm, corr, phi))
    assert surface_maps(rho, grid.spacing_mm, corr, normals=False)[1] is None


# --- the fast escape recursion (docs/collapsed_cone.md section 4g, "Cost") -------------------------
def test_escape_recursion_equals_the_closed_form():
    """:func:`_deposit_escape_series`: the series paths (``x <= ESCAPE_SERIES_X``: scalar loop, vectorised loop
    of >= ``ESCAPE_SIMD_TERMS`` terms placed first, terms not contiguous) and the closed-form path give
    the exact segment recursion to float64 rounding (reference in 80-bit)."""
    from tomodose._kernels import collapsed_cone as _k

    rng = np.random.default_rng(11)
    ld = np.longdouble
    r4 = np.array([0.06, 0.09, 2.6, 29.8])
    r7 = np.array([0.04, 0.06, 0.08, 0.1, 0.13, 2.6, 29.8])
    cases = ((r4, np.array([0.0592, 0.0592, 0.0, 0.0]), (0.0, 1e-5, 0.03, 0.3, 0.6, 1.2, 1.5)),  # scalar series
             (r7, np.array([0.0592] * 5 + [0.0, 0.0]), (0.0, 1e-5, 0.03, 0.3, 0.6, 1.1, 1.5)),  # vectorised
             (r4, np.array([2.0, 0.0, 1.5, 0.0]), (0.01, 0.3, 1.0, 3.0)))  # both paths, not contiguous
    assert _k.ESCAPE_SIMD_TERMS <= 5
    for rates, esc, deltas in cases:
        n_k = rates.size
        inv = 1.0 / rates
        esc_idx, plain_idx, e_lo, e_hi, a_max, e_max = _k._escape_terms(True, esc, rates)
        for delta in deltas:
            for _ in range(20):
                ph = float(rng.random())
                flux = rng.random((2, n_k)) * 5.0
                src = rng.normal(size=n_k)
                ex = np.exp(-rates * delta)[None].repeat(2, 0)
                gg = np.where(rates * delta > 0, -np.expm1(-rates * delta) / np.maximum(rates * delta, 1e-300), 1.0)
                gg = gg[None].repeat(2, 0)
                f0 = flux[1].copy()
                other = flux[0].copy()
                d = _k._deposit_escape_series(flux, ex, gg, 1, src, rates, inv, delta, ph, esc, esc_idx, plain_idx,
                                              e_lo, e_hi, a_max, e_max)
                want_d = ld(0.0)
                for k in np.asarray(esc_idx):
                    a, mu = ld(rates[k]), ld(rates[k]) + ld(esc[k]) * ld(ph)
                    x = mu * ld(delta)
                    if x == 0:
                        g, one_minus_g = ld(1.0), ld(0.0)
                    else:
                        om = -np.expm1(-x)
                        g = om / x
                        one_minus_g = (x - om) / x  # 80-bit: cancellation 1e-19 / x
                    want_d += ld(f0[k]) * a * g + ld(src[k]) * (a / mu) * one_minus_g
                    want_f = ld(f0[k]) * np.exp(-x) + ld(src[k]) * (x * g / mu if x > 0 else ld(0.0))
                    assert abs(float(want_f) - flux[1, k]) <= 1e-14 * (abs(float(want_f)) + abs(src[k]) * delta)
                for k in np.asarray(plain_idx):
                    want_d += ld(f0[k] * rates[k] * gg[1, k] + src[k] * (1.0 - gg[1, k]))
                scale = float(np.abs(f0 * rates).sum() + np.abs(src).sum())
                assert abs(d - float(want_d)) <= 1e-14 * scale, (esc, delta, d, float(want_d))
                np.testing.assert_array_equal(flux[0], other)  # other lines untouched


def test_without_escape_terms_the_kernels_are_the_uncorrected_ones_bitwise():
    """The series-escape kernels with no term having an escape rate run their uncorrected path (bit for
    bit as with ``surface=False``); the transports then use the uncorrected kernels (bit for bit the
    dose without the correction); the shipped table: 1 vs 2 threads bit for bit."""
    from tomodose._kernels import collapsed_cone as _k
    from tomodose.transport.collapsed_cone import direction_steppings, fibonacci_directions

    rng, grid, _, rho = _case(0)
    shape = grid.shape
    rates = np.array([0.05, 0.12, 3.0, 100.0])
    phi = rng.random(shape)
    src = (rng.normal(size=(4,) + shape) * (rng.random(shape) > 0.4)).astype(np.float32)
    src_vm = np.ascontiguousarray(np.moveaxis(src, 0, -1))
    z3 = np.zeros(3)
    for u in fibonacci_directions(6):
        for _, m, sgn, da, db, st in direction_steppings(u, grid.spacing_mm):
            out = []
            for surf in (False, True):
                a = np.zeros(shape)
                b = np.zeros(shape)
                _k.transport_direction(src, rho, a, m, sgn, da, db, st, rates, np.eye(4), False, u, 0.0,
                                       np.zeros((1, 2, 4)), 1.0, np.zeros((1, 1, 1, 1)), z3, z3, np.ones(3), z3, True,
                                       0.5, 0.5, surf, phi, np.zeros(4), False, np.zeros((1, 3)))
                _k.transport_direct_sources(src_vm, rho, b, m, sgn, da, db, st, rates, surf, phi, np.zeros(4),
                                                    False,
                                            np.zeros((1, 3)), np.zeros(3))
                out.append((a, b))
            np.testing.assert_array_equal(out[0][0], out[1][0])
            np.testing.assert_array_equal(out[0][1], out[1][1])
    kernel = load_kernel(n_azimuth=3)
    beams = np.array([[1.0, 0.2, 0.0], [0.0, -1.0, 0.3]])
    terma = rng.random((2,) + shape)
    old = numba.get_num_threads()
    res = []
    try:
        for n in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(n)
            res.append(shared_direction_dose(terma, beams, rho, grid, kernel=kernel, n_directions=20, progress=False,
                                             surface_correction=True))
            res.append(collapsed_cone_dose(terma[0], rho, grid, kernel=kernel, source_position_mm=(0.0, -900.0, 0.0),
                                           progress=False, surface_correction=True))
    finally:
        numba.set_num_threads(old)
    np.testing.assert_array_equal(res[0], res[2])
    np.testing.assert_array_equal(res[1], res[3])
    # an escape for no term: the transports run the uncorrected kernels, bit for bit
    none = SurfaceCorrection(0.0, 26.0, 210.0, directional=True)
    for kw in ({"source_position_mm": (0.0, -900.0, 0.0)}, {"beam_direction": (0.2, 1.0, 0.1)}):
        np.testing.assert_array_equal(
            collapsed_cone_dose(terma[0], rho, grid, kernel=kernel, progress=False, surface_correction=none, **kw),
            collapsed_cone_dose(terma[0], rho, grid, kernel=kernel, progress=False, **kw))
    np.testing.assert_array_equal(
        shared_direction_dose(terma, beams, rho, grid, kernel=kernel, n_directions=20, progress=False, coarse_factor=2,
                              surface_correction=none),
        shared_direction_dose(terma, beams, rho, grid, kernel=kernel, n_directions=20, progress=False, coarse_factor=2))
