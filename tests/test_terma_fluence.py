"""TERMA fast path ``fluence_method="maps"``: kernels against their NumPy twins, the whole path
against the exact per-sample path, invariants and bad inputs (tiny grids)."""

from __future__ import annotations

import numba
import numpy as np
import pytest

from tests.naive.terma_fluence import (accumulate_fluence_naive, edge_means_dense, slice_maps_naive,
                                       trace_plane_naive)
from tomodose._kernels.profiles import step_integral_table
from tomodose._kernels.terma import edge_weights
from tomodose._kernels.terma_fluence import (accumulate_fluence, edge_mean_rows, slice_maps,
                                             trace_plane_anchors)
from tomodose.delivery.plan import HelicalPlan, ProjectionSequence
from tomodose.geometry.grid import Grid, ImageVolume
from tomodose.terma import BeamModel, compute_terma

CUT = 6.0
SMOOTH = BeamModel.default()


def _lattice():
    return dict(u0=-30.3, h_u=0.7, n_u=90, den0=800.0, dden=25.0, n_m=4, sad=850.0)


def _edge_rows(lat, hu0, e0, lw, n_e, sigma):
    w = int(2 * (CUT * sigma + hu0 * lat["sad"] / lat["den0"]) / lat["h_u"]) + 2
    e2 = np.zeros((lat["n_m"], n_e, w))
    a_lo = np.zeros((lat["n_m"], n_e), dtype=np.int64)
    n_win = np.zeros((lat["n_m"], n_e), dtype=np.int64)
    edge_mean_rows(e2, a_lo, n_win, lat["u0"], lat["h_u"], lat["den0"], lat["dden"], lat["sad"], hu0, e0, lw, sigma,
                   CUT, *step_integral_table(sigma, CUT))
    return e2, a_lo, n_win


@pytest.mark.filterwarnings("ignore::scipy.integrate.IntegrationWarning")
def test_edge_mean_rows_match_twin():
    lat = _lattice()
    hu0, e0, lw, n_e, sigma = 1.3, -25.0, 6.25, 9, 1.4
    e2, a_lo, n_win = _edge_rows(lat, hu0, e0, lw, n_e, sigma)
    dense = np.zeros((lat["n_m"], n_e, lat["n_u"]))
    for m in range(lat["n_m"]):
        for e in range(n_e):
            lo, n = a_lo[m, e], n_win[m, e]
            for a in range(lat["n_u"]):
                dense[m, e, a] = 0.0 if a < lo else (1.0 if a >= lo + n else e2[m, e, a - lo])
    ref = edge_means_dense(lat["u0"], lat["h_u"], lat["n_u"], lat["den0"], lat["dden"], lat["n_m"], lat["sad"], hu0,
                           e0, lw, n_e, sigma, CUT)
    np.testing.assert_allclose(dense, ref, rtol=0, atol=5e-9)


@pytest.mark.filterwarnings("ignore::scipy.integrate.IntegrationWarning")
@pytest.mark.parametrize("hu0, hv0", [(1.3, 1.5), (0.0, 0.0)])
def test_slice_maps_match_twin(hu0, hv0):
    rng = np.random.default_rng(3)
    lat = _lattice()
    n_l, e0, lw, s_leaf, s_jaw, half = 8, -25.0, 6.25, 1.4, 2.0, 12.0
    leaf_a = rng.uniform(0, 1, (3, n_l)) * (rng.uniform(size=(3, n_l)) > 0.3)
    s_t = np.array([-9.0, -2.0, 5.0, 12.0])
    s_w = rng.uniform(0.5, 1.5, 4)
    s_p = np.array([0, 1, 2, 1], dtype=np.int64)
    slice_y = np.array([-30.0, -14.0, -3.0, 0.5, 11.0, 40.0])
    offc = np.array([-0.4, -30.0, 200.0])
    u_a = lat["u0"] + lat["h_u"] * np.arange(lat["n_u"])
    th = np.abs(np.arctan(u_a / lat["sad"]))
    fac = (1.0 + sum(c * th ** (n + 1) for n, c in enumerate(offc))) / (1.0 + (u_a / lat["sad"]) ** 2)
    e2, a_lo, n_win = _edge_rows(lat, hu0, e0, lw, n_l + 1, s_leaf)
    maps = np.full((slice_y.size, lat["n_m"], lat["n_u"]), np.nan)
    active = np.zeros(slice_y.size, dtype=np.bool_)
    slice_maps(maps, active, slice_y, s_t, s_w, s_p, edge_weights(leaf_a), e2, a_lo, n_win, fac, lat["den0"],
               lat["dden"], lat["sad"], hv0, half, s_jaw, CUT, *step_integral_table(s_jaw, CUT))
    ref = slice_maps_naive(slice_y, s_t, s_w, s_p, leaf_a, lat["u0"], lat["h_u"], lat["n_u"], lat["den0"],
                           lat["dden"], lat["n_m"], lat["sad"], hu0, hv0, e0, lw, s_leaf, half, s_jaw, CUT, offc)
    np.testing.assert_allclose(maps, ref, rtol=0, atol=2e-8 * ref.max())
    assert ref.max() > 0 and not active[-1] and np.all(maps[-1] == 0) and active[1:5].all()


def test_accumulate_fluence_matches_twin():
    rng = np.random.default_rng(4)
    lat = _lattice()
    shape, origin, spacing = (5, 6, 7), (-9.0, -8.0, -6.0), (3.0, 2.5, 3.0)
    maps = rng.uniform(0, 1, (3, lat["n_m"], lat["n_u"]))
    ang = np.deg2rad(37.0)
    ex, ez = np.array([np.cos(ang), np.sin(ang), 0.0]), np.array([-np.sin(ang), np.cos(ang), 0.0])
    c0 = np.array([1.0, -2.0, 0.5])
    fl = np.zeros(shape)
    accumulate_fluence(fl, maps, np.array([True, True, True]), 1, shape[1], shape[2], *origin, *spacing, c0, ex, ez,
                       lat["sad"], lat["u0"], lat["h_u"], lat["den0"], lat["dden"])
    ref = accumulate_fluence_naive(shape, maps, 1, origin, spacing, c0, ex, ez, lat["sad"], lat["u0"], lat["h_u"],
                                   lat["den0"], lat["dden"])
    np.testing.assert_allclose(fl, ref, rtol=1e-12, atol=0)
    assert np.count_nonzero(ref) > 50 and np.all(fl[0] == 0) and np.all(fl[4] == 0)


def test_trace_plane_matches_naive_siddon():
    rng = np.random.default_rng(5)
    shape, origin, spacing = (3, 7, 9), (-10.0, -6.0, 2.0), (2.5, 1.5, 3.0)
    vec = np.zeros(shape + (6,))
    lo = rng.integers(0, 5, shape)
    w = rng.uniform(0, 1, shape)
    rho = rng.uniform(0.1, 2.0, shape)
    np.put_along_axis(vec, lo[..., None], (w * rho)[..., None], axis=3)
    np.put_along_axis(vec, lo[..., None] + 1, ((1 - w) * rho)[..., None], axis=3)
    flat = np.ascontiguousarray(vec.reshape(-1, 6))
    for case in range(60):
        k, j, i = (int(rng.integers(n)) for n in shape)
        ang = rng.uniform(0, 2 * np.pi) if case % 4 else (case // 4) * np.pi / 4
        r = rng.uniform(1.0, 30.0) if case % 2 else 850.0
        x1 = origin[0] + i * spacing[0] + r * np.cos(ang)
        y1 = origin[1] + j * spacing[1] + r * np.sin(ang)
        acc = np.zeros(6)
        trace_plane_anchors(shape[1], shape[2], origin[0], origin[1], spacing[0], spacing[1], i, j,
                            k * shape[1] * shape[2], x1, y1, flat, acc)
        np.testing.assert_allclose(acc, trace_plane_naive(vec, origin, spacing, i, j, k, x1, y1), rtol=1e-10,
                                   atol=1e-12)


def _helical_case(position="HFS", n_rot=3, seed=7):
    rng = np.random.default_rng(seed)
    grid = Grid((7, 12, 13), (5.0, 5.0, 4.0), (-30.0, -27.0, -12.0))
    dens = rng.choice([0.001, 0.3, 0.95, 1.0, 1.05, 1.6], size=grid.shape)
    n = 51 * n_rot // 3  # 17 angles per rotation
    ang = np.arange(n) * 360.0 / 17
    lof = rng.uniform(0.2, 1, (n, 64)) * (rng.uniform(size=(n, 64)) > 0.4)
    lof[:, :24] = 0.0
    lof[:, 40:] = 0.0
    ps = ProjectionSequence(gantry_angle_deg=ang, couch_mm=np.linspace(-10.0, 10.0, n), leaf_open_fraction=lof,
                            duration_s=rng.uniform(0.2, 0.4, n), field_width_mm=25.0, arc_deg=np.full(n, 360.0 / 17),
                            couch_travel_mm=np.full(n, 20.0 / n), isocentre_lps_mm=(1.0, 2.0, -1.0),
                            patient_position=position)
    return grid, ImageVolume(grid, dens, "g/cm3", "mass_density"), ps


@pytest.mark.parametrize("position", ["HFS", "FFP"])
def test_maps_close_to_exact_path(position):
    """Whole path against the exact per-sample fluence (same traces): interpolation only."""
    grid, vol, ps = _helical_case(position)
    edges = [0.0, 1.0, 2.5, 100.0]
    kw = dict(n_subsamples=3, energy_group_edges_mev=edges, angle_groups=17, progress=False)
    ex = compute_terma(vol, ps, SMOOTH, fluence_method="exact", **kw)
    mp = compute_terma(vol, ps, SMOOTH, fluence_method="maps", **kw)
    top = ex.total.max()
    assert top > 0 and mp.metadata["fluence_method"] == "maps"
    assert np.abs(mp.total - ex.total).max() <= 3e-3 * top
    assert np.abs(mp.per_group - ex.per_group).max() <= 3e-3 * top
    np.testing.assert_array_equal(mp.total == 0, ex.total == 0)
    np.testing.assert_allclose(mp.per_group.sum(axis=(0, 1)), mp.total, rtol=1e-5, atol=1e-7 * top)
    # per projection sharing: every cluster has one sample; a static angle too
    pp = compute_terma(vol, ps, SMOOTH, fluence_method="maps", trace_sharing="projection", **kw)
    px = compute_terma(vol, ps, SMOOTH, fluence_method="exact", trace_sharing="projection", **kw)
    assert np.abs(pp.total - px.total).max() <= 3e-3 * px.total.max()


def test_maps_deterministic_and_thread_independent():
    grid, vol, ps = _helical_case()
    a = compute_terma(vol, ps, SMOOTH, n_subsamples=2, fluence_method="maps", progress=False)
    b = compute_terma(vol, ps, SMOOTH, n_subsamples=2, fluence_method="maps", progress=False)
    old = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        c = compute_terma(vol, ps, SMOOTH, n_subsamples=2, fluence_method="maps", progress=False)
    finally:
        numba.set_num_threads(old)
    for r in (b, c):
        assert np.array_equal(a.total, r.total) and np.array_equal(a.per_group, r.per_group)


def test_maps_closed_sinogram_zero_and_linear():
    grid, vol, ps = _helical_case()
    beam = SMOOTH.replace(leaf_transmission=0.0, adjacent_leaf_output_gain=0.0, isolated_leaf_output_loss=0.0)
    kw = dict(n_subsamples=2, fluence_method="maps", progress=False)

    def with_lof(lof):
        return ProjectionSequence(gantry_angle_deg=ps.gantry_angle_deg, couch_mm=ps.couch_mm, leaf_open_fraction=lof,
                                  duration_s=ps.duration_s, field_width_mm=25.0, arc_deg=ps.arc_deg,
                                  couch_travel_mm=ps.couch_travel_mm, isocentre_lps_mm=ps.isocentre_lps_mm)

    closed = compute_terma(vol, with_lof(np.zeros_like(ps.leaf_open_fraction)), beam, **kw)
    assert np.all(closed.total == 0.0) and np.all(closed.per_group == 0.0)
    lof = ps.leaf_open_fraction
    half = lof * (np.arange(64) % 2 == 0)
    t1 = compute_terma(vol, with_lof(lof), beam, **kw)
    ta = compute_terma(vol, with_lof(half), beam, **kw)
    tb = compute_terma(vol, with_lof(lof - half), beam, **kw)
    t3 = compute_terma(vol, with_lof(0.37 * lof), beam, **kw)
    top = t1.total.max()
    assert top > 0
    np.testing.assert_allclose(ta.total + tb.total, t1.total, rtol=1e-5, atol=1e-6 * top)
    np.testing.assert_allclose(t3.total, 0.37 * t1.total, rtol=1e-5, atol=1e-6 * top)


def test_maps_uniform_sinogram_on_centred_cylinder_is_symmetric():
    n, sp, nz = 21, 4.0, 5
    c = (n - 1) / 2 * sp
    grid = Grid((nz, n, n), (sp, sp, 4.0), (-c, -c, -(nz - 1) / 2 * 4.0))
    x, y, _ = grid.meshgrid_mm()
    dens = np.broadcast_to(np.where(x**2 + y**2 <= 36.0**2, 1.0, 0.0), grid.shape).copy()
    vol = ImageVolume(grid, dens, "g/cm3", "mass_density")
    plan = HelicalPlan(sinogram=np.ones((51, 64)), field_width_mm=50.0, pitch=1e-6, gantry_period_s=20.0)
    res = compute_terma(vol, plan, SMOOTH, n_subsamples=2, fluence_method="maps", progress=False)
    mid = res.total[nz // 2]
    inside = dens[nz // 2] > 0
    assert mid[inside].min() > 0
    for other in (np.rot90(mid, 1), np.rot90(mid, 2), np.rot90(mid, 3), mid.T):
        np.testing.assert_allclose(other[inside], mid[inside], rtol=5e-3)


def test_maps_bad_inputs_are_named():
    grid, vol, ps = _helical_case()
    with pytest.raises(ValueError, match="fluence_method"):
        compute_terma(vol, ps, SMOOTH, fluence_method="fast", progress=False)
    with pytest.raises(ValueError, match="trace_sharing='sample'"):
        compute_terma(vol, ps, SMOOTH, fluence_method="maps", trace_sharing="sample", progress=False)
    with pytest.raises(ValueError, match="leaf_edge_sigma_mm must be > 0, got 0.0"):
        compute_terma(vol, ps, BeamModel.ideal(), fluence_method="maps", progress=False)
    with pytest.raises(ValueError, match="jaw_penumbra_sigma_mm must be > 0"):
        compute_terma(vol, ps, SMOOTH.replace(jaw_penumbra_sigma_mm=0.0), fluence_method="maps", progress=False)
