"""Collapsed-cone transport: naive twin, invariants, energy conservation, physics sanity."""

from __future__ import annotations

import math

import numba
import numpy as np
import pytest

from tests.naive import collapsed_cone as naive
from tomodose.geometry.grid import Grid
from tomodose.transport import collapsed_cone_dose, load_kernel
from tomodose.transport.collapsed_cone import direction_geometry
from tomodose.transport.kernels import polyenergetic_kernel
from tests._scripts import load_script


#: the kernels' optional trailing arguments, passed explicitly: a call that omits an array default
#: cannot use numba's on-disk cache (the omitted default is part of the signature, compared by
#: identity), so it compiled the kernel again in every test process (25-45 s each on 2 busy cores)
TD_OFF = (0.5, 0.5, False, np.zeros((1, 1, 1)), np.zeros(1), False, np.zeros((1, 3)))  # ca, cb, surface...
TDS_OFF = (False, np.zeros((1, 1, 1)), np.zeros(1), False, np.zeros((1, 3)), np.zeros(3))  # surface, phi, ...


@pytest.fixture(scope="module")
def kernel():
    return load_kernel()


@pytest.fixture(scope="module")
def small_kernel():
    return load_kernel(n_azimuth=3)


def _ccc(terma, rho, grid, **kw):
    kw.setdefault("progress", False)
    return collapsed_cone_dose(terma, rho, grid, **kw)


# --- naive twin -------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("mode", ["beam", "source"])
def test_matches_naive_twin(seed, mode, small_kernel):
    rng = np.random.default_rng(seed)
    shape = (6, 5, 7) if seed == 0 else (5, 7, 4)
    spacing = (4.0, 5.0, 3.0) if seed == 0 else (2.5, 2.5, 6.0)
    origin = (-10.0, 3.0, 7.0)
    grid = Grid(shape, spacing, origin)
    terma = rng.random(shape) * (rng.random(shape) > 0.4)
    rho = rng.uniform(0.0, 2.0, shape)
    rho[0, 0, :] = 0.0  # vacuum voxels
    rho[1, :, 1] = 0.0012  # air
    if mode == "beam":
        kw = {"beam_direction": rng.normal(size=3)}
        tol = 2e-6
    else:
        kw = {"source_position_mm": np.array(grid.centre_mm) + rng.normal(size=3) * 300 + 400}
        tol = 5e-5  # the kernel tabulates the angular density on a 1/16 deg grid
    fast = _ccc(terma, rho, grid, kernel=small_kernel, **kw)
    slow = naive.collapsed_cone_dose(terma, rho, spacing, origin, small_kernel, **kw)
    assert fast.dtype == np.float32 and fast.shape == shape
    np.testing.assert_allclose(fast, slow, rtol=tol, atol=tol * slow.max())


def test_lines_visit_every_voxel_once():
    # the naive twin asserts it; exercise many directions, including axis-aligned ones
    k = load_kernel(n_azimuth=4)
    dirs, _, _ = k.directions((0.2, 0.1, -1.0))
    dirs = np.vstack([dirs, np.eye(3), -np.eye(3)])
    terma = np.zeros((3, 4, 5))
    for u in dirs:
        m, sgn, da, db, step = direction_geometry(u, (1.0, 2.0, 3.0))
        assert abs(da) <= 1 + 1e-12 and abs(db) <= 1 + 1e-12 and step > 0
        naive.transport_direction(terma, np.ones_like(terma), m, sgn, da, db, step, [1.0], lambda v: [1.0])


# --- invariants -----------------------------------------------------------------------------------
def test_direction_steppings_split_ties():
    """A direction with a unique dominant axis has one line set (direction_geometry); a tie on a
    grid diagonal is split evenly over the tied axes (weights sum to 1)."""
    from tomodose.transport.collapsed_cone import direction_steppings

    u = np.array([0.3, -0.8, 0.5])
    u /= np.linalg.norm(u)
    assert direction_steppings(u, (1.0, 1.0, 1.0)) == [(1.0,) + direction_geometry(u, (1.0, 1.0, 1.0))]
    diag = np.array([0.6, 0.6, 0.2]) / np.linalg.norm([0.6, 0.6, 0.2])
    steps = direction_steppings(diag, (2.0, 2.0, 3.0))
    assert [s[1] for s in steps] == [1, 2] and sum(s[0] for s in steps) == pytest.approx(1.0)
    for w, m, sgn, da, db, step in steps:
        assert sgn == 1 and step == pytest.approx(2.0 / diag[0] / 10.0)
        assert max(abs(da), abs(db)) == pytest.approx(1.0)
    # unequal spacing breaks the tie
    assert len(direction_steppings(diag, (2.0, 2.5, 3.0))) == 1
    body = np.ones(3) / math.sqrt(3.0)
    assert len(direction_steppings(body, (1.0, 1.0, 1.0))) == 3


def test_direction_geometry_ignores_rounding_of_the_direction():
    """Lateral shifts are snapped: a ratio of exactly 3/8 and its 1-ulp neighbour give the same
    lines (floor(4 x 0.375 + 0.5) = 2, but 1 for 0.37499999999999994)."""
    u = np.array([0.375, 1.0, 0.2])
    v = u.copy()
    v[0] = np.nextafter(0.375, 0.0)
    assert direction_geometry(u, (1.0, 1.0, 1.0)) == direction_geometry(v, (1.0, 1.0, 1.0))
    assert direction_geometry(u, (1.0, 1.0, 1.0))[3] == 0.375 or direction_geometry(u, (1.0, 1.0, 1.0))[4] == 0.375


def test_zero_terma_gives_zero(kernel):
    g = Grid((4, 5, 6), (3.0, 3.0, 3.0))
    d = _ccc(np.zeros(g.shape), np.ones(g.shape), g, beam_direction=(0, 0, 1))
    assert d.dtype == np.float32 and not d.any()


def test_linear_in_terma(small_kernel):
    rng = np.random.default_rng(3)
    g = Grid((10, 9, 8), (4.0, 4.0, 4.0))
    rho = rng.uniform(0.2, 1.5, g.shape)
    t1, t2 = rng.random(g.shape), rng.random(g.shape) * (rng.random(g.shape) > 0.7)
    kw = {"source_position_mm": (0.0, -850.0, 0.0), "kernel": small_kernel}
    d12 = _ccc(2 * t1 + 3 * t2, rho, g, **kw).astype(float)
    d1 = _ccc(t1, rho, g, **kw).astype(float)
    d2 = _ccc(t2, rho, g, **kw).astype(float)
    np.testing.assert_allclose(d12, 2 * d1 + 3 * d2, rtol=2e-5, atol=1e-6 * d12.max())


@pytest.mark.parametrize("mode", ["beam", "source"])
def test_symmetric_about_beam_axis(kernel, mode):
    g = Grid((12, 15, 15), (5.0, 5.0, 5.0), (-35.0, -35.0, -27.5))
    x, y, z = g.meshgrid_mm()
    terma = np.exp(-(x**2 + y**2) / (2 * 15.0**2)) * np.exp(-0.005 * (z - z.min())) * np.ones(g.shape)
    rho = np.ones(g.shape)
    rho[5:8] = 0.3  # a lung-like slab perpendicular to the axis keeps the symmetry
    kw = {"beam_direction": (0, 0, 1)} if mode == "beam" else {"source_position_mm": (0, 0, -850)}
    d = _ccc(terma, rho, g, **kw).astype(float)
    tol = 1e-5 * d.max()
    np.testing.assert_allclose(d, d[:, :, ::-1], atol=tol)  # x -> -x
    np.testing.assert_allclose(d, d[:, ::-1, :], atol=tol)  # y -> -y
    np.testing.assert_allclose(d, d.transpose(0, 2, 1), atol=tol)  # 90 deg about the axis (8 azimuths)


def test_far_source_equals_parallel_beam(kernel):
    """Tilting toward a very distant source reduces to the parallel-beam kernel."""
    rng = np.random.default_rng(11)
    g = Grid((9, 10, 8), (4.0, 4.0, 4.0), (-14.0, -18.0, -16.0))
    terma = rng.random(g.shape)
    rho = rng.uniform(0.1, 1.5, g.shape)
    u = np.array([0.3, -0.8, 0.2])
    u /= np.linalg.norm(u)
    par = _ccc(terma, rho, g, beam_direction=u).astype(float)
    far = _ccc(terma, rho, g, source_position_mm=np.array(g.centre_mm) - 1e7 * u).astype(float)
    np.testing.assert_allclose(far, par, rtol=2e-4, atol=2e-4 * par.max())
    near = _ccc(terma, rho, g, source_position_mm=np.array(g.centre_mm) - 300 * u).astype(float)
    assert np.abs(near - par).max() > 1e-3 * par.max()  # tilting does something at 30 cm


def test_density_scaling_theorem(small_kernel):
    """Uniform density rho with lengths scaled by 1/rho gives the water dose (O'Connor)."""
    rng = np.random.default_rng(5)
    terma = rng.random((7, 8, 6))
    water = Grid(terma.shape, (4.0, 3.0, 5.0))
    d_water = _ccc(terma, np.ones(terma.shape), water, beam_direction=(0.3, 0.4, 0.8), kernel=small_kernel)
    for rho in (0.25, 1.8):
        g = Grid(terma.shape, tuple(s / rho for s in water.spacing_mm))
        d = _ccc(terma, np.full(terma.shape, rho), g, beam_direction=(0.3, 0.4, 0.8), kernel=small_kernel)
        np.testing.assert_allclose(d, d_water, rtol=1e-5, atol=1e-7 * d_water.max())


def test_independent_of_thread_count(small_kernel):
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba has a single thread")
    rng = np.random.default_rng(7)
    g = Grid((12, 11, 13), (3.0, 3.0, 3.0))
    terma = rng.random(g.shape)
    rho = rng.uniform(0.0, 2.0, g.shape)
    old = numba.get_num_threads()
    try:
        out = []
        for n in (1, 2, 1):
            numba.set_num_threads(n)
            out.append(_ccc(terma, rho, g, source_position_mm=(50, -800, 20), kernel=small_kernel))
    finally:
        numba.set_num_threads(old)
    np.testing.assert_array_equal(out[0], out[1])
    np.testing.assert_array_equal(out[0], out[2])


# --- energy conservation -----------------------------------------------------------------------------
def _kept_energy(v, amps_p, rates, shape, spacing_mm, src_kji):
    """Energy a unit source at voxel ``src_kji`` releases along direction ``v`` with ring amplitudes
    ``amps_p`` (T = rho = V = 1) minus what leaves the grid, from the line geometry."""
    m, sgn, da, db, step = direction_geometry(v, spacing_mm)
    a_ax, b_ax = [ax for ax in range(3) if ax != m]
    n_m = shape[m]
    n_src = src_kji[m] if sgn > 0 else n_m - 1 - src_kji[m]
    ia = src_kji[a_ax] - math.floor(n_src * da + 0.5)
    ib = src_kji[b_ax] - math.floor(n_src * db + 0.5)
    n_after = 0
    for n in range(n_src + 1, n_m):
        ja, jb = ia + math.floor(n * da + 0.5), ib + math.floor(n * db + 0.5)
        if not (0 <= ja < shape[a_ax] and 0 <= jb < shape[b_ax]):
            break
        n_after += 1
    x = rates * step
    leak = np.sum(amps_p / rates * -np.expm1(-x) * np.exp(-x * n_after))
    return amps_p.sum() - leak / step


def _expected_point_energy(kernel, grid, src_kji, axis):
    """Released energy (T = rho = V = 1) minus what leaves the grid, from the line geometry."""
    dirs, _, ring = kernel.directions(axis)
    amps = kernel.amplitudes / kernel.n_azimuth
    return sum(_kept_energy(dirs[d], amps[ring[d]], kernel.rates_per_cm, grid.shape, grid.spacing_mm, src_kji)
               for d in range(dirs.shape[0]))


@pytest.mark.parametrize("src", [(15, 15, 15), (3, 20, 27)])
def test_point_source_energy_conservation(kernel, src):
    """Deposited energy = released x kernel total - the part leaving the grid (float64 check)."""
    g = Grid((31, 31, 31), (6.0, 6.0, 6.0))
    terma = np.zeros(g.shape)
    terma[src] = 1.0
    d = _ccc(terma, np.ones(g.shape), g, beam_direction=(0, 0.6, 0.8))
    deposited = float(d.astype(np.float64).sum())
    expected = _expected_point_energy(kernel, g, src, np.array([0, 0.6, 0.8]))
    assert deposited == pytest.approx(expected, rel=1e-5)
    assert deposited < kernel.total_fraction
    if src == (15, 15, 15):
        # a 18.6 cm cube keeps most of the energy; compare with the tabulated radial integral
        assert kernel.tabulated_cumulative([9.0]).sum() < deposited < kernel.total_fraction


def test_point_source_radial_integrals(kernel):
    """Energy inside spheres around a point source vs the tabulated cumulative kernel."""
    g = Grid((41, 41, 41), (4.0, 4.0, 4.0), (-80.0, -80.0, -80.0))
    terma = np.zeros(g.shape)
    terma[20, 20, 20] = 1.0
    d = _ccc(terma, np.ones(g.shape), g, beam_direction=(0, 0, 1)).astype(np.float64)
    x, y, z = g.meshgrid_mm()
    r_cm = np.sqrt(x**2 + y**2 + z**2) / 10.0 * np.ones(g.shape)
    for radius in (1.0, 2.0, 4.0, 7.0):
        inside = d[r_cm <= radius].sum()
        ref = kernel.tabulated_cumulative([radius]).sum()
        assert inside == pytest.approx(ref, rel=0.03), radius


def test_uniform_terma_in_large_block_gives_terma_times_fraction(kernel):
    """Uniform TERMA: the centre dose approaches TERMA x (kernel energy inside the block)."""
    g = Grid((21, 21, 21), (10.0, 10.0, 10.0))
    d = _ccc(np.ones(g.shape), np.ones(g.shape), g, beam_direction=(0, 0, 1))
    centre = float(d[10, 10, 10])
    # the block reaches 10.5 cm (faces) to 18 cm (corners) from the centre
    lo = kernel.tabulated_cumulative([10.5]).sum()
    hi = kernel.tabulated_cumulative([18.2]).sum()
    assert lo * 0.98 < centre < hi * 1.02


def test_plane_integrated_dose_matches_sampled_superposition(kernel):
    """Energy balance in depth (docs/collapsed_cone.md, section 4c): per slab across a parallel
    beam, the transported energy equals that of an independent superposition by sampling of the
    same fitted kernel (interaction points, rings, cone directions and radii drawn at random; no
    lines, no recursion). Measured: total 0.02 %, 2 cm slabs within 0.1-0.4 % (sampling noise
    about 0.2 %), per 5 mm slice within 1.3 %. A transport that put energy too deep or leaked it
    through the grid boundary would fail here."""
    g = Grid((24, 36, 24), (5.0, 5.0, 5.0))
    x, y, z = (a * np.ones(g.shape) for a in g.meshgrid_mm())
    field = (np.abs(x - x.mean()) < 30.0) & (np.abs(z - z.mean()) < 30.0)
    terma = np.where(field, np.exp(-0.005 * (y - y.min())), 0.0)
    d = _ccc(terma, np.ones(g.shape), g, beam_direction=(0, 1, 0)).astype(np.float64)
    s = naive.sampled_superposition(terma, g.shape, g.spacing_mm, kernel, (0, 1, 0), 2_000_000, seed=1)
    pc, ps = d.sum(axis=(0, 2)), s.sum(axis=(0, 2))
    assert pc.sum() == pytest.approx(ps.sum(), rel=3e-3)
    for a in range(0, g.ny, 4):
        assert pc[a:a + 4].sum() == pytest.approx(ps[a:a + 4].sum(), rel=1e-2), a
    # most of the released energy stays in this 12 x 18 x 12 cm block, the rest leaves it
    assert 0.5 < pc.sum() / (terma.sum() * kernel.amplitudes.sum()) < 0.9


# --- heterogeneity, air, edges ---------------------------------------------------------------------
def test_air_and_vacuum_are_finite(kernel):
    g = Grid((20, 6, 6), (5.0, 5.0, 5.0))
    rho = np.ones(g.shape)
    rho[6:12] = 0.0012
    rho[12:14] = 0.0
    terma = np.ones(g.shape)
    d = _ccc(terma, rho, g, beam_direction=(0, 0, 1))
    assert np.all(np.isfinite(d)) and np.all(d >= 0)
    # water right after the gap is in build-down/build-up: lower than before the gap
    assert d[15, 3, 3] < d[5, 3, 3]


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 5, 4), (3, 1, 1)])
def test_degenerate_grids(kernel, shape):
    g = Grid(shape, (3.0, 3.0, 3.0))
    for kw in ({"beam_direction": (0.2, 1.0, 0.1)}, {"source_position_mm": (0.0, -850.0, 0.0)}):
        d = _ccc(np.ones(shape), np.ones(shape), g, **kw)
        assert np.all(np.isfinite(d)) and np.all(d > 0) and np.all(d < kernel.total_fraction)


def test_lung_slab_lowers_dose_behind_small_field(kernel):
    """Lateral electronic disequilibrium: a narrow field loses dose in low density."""
    g = Grid((30, 21, 21), (4.0, 4.0, 4.0), (-40.0, -40.0, 0.0))
    x, y, _ = g.meshgrid_mm()
    field = ((np.abs(x) <= 10) & (np.abs(y) <= 10)) * np.ones(g.shape)
    rho = np.ones(g.shape)
    d_w = _ccc(field, rho, g, beam_direction=(0, 0, 1))
    rho[10:20] = 0.25
    d_l = _ccc(field, rho, g, beam_direction=(0, 0, 1))
    assert d_l[15, 10, 10] < 0.9 * d_w[15, 10, 10]
    # upstream of the slab the dose barely changes (only backscatter is lost)
    assert d_l[5, 10, 10] == pytest.approx(d_w[5, 10, 10], rel=0.03)


# --- physics sanity: broad-beam depth dose vs brute-force convolution ----------------------------
def _slab_transfer(fine, theta_edges_deg, r_edges_cm, dz, nz, half_width_cm, ns=10, nphi=16, sub=8):
    """Energy from a uniform source slab into slab offsets -nz..nz, integrating the 3-D kernel
    by sampling every (cone, shell) voxel, kept only within the lateral square of the grid."""
    h = dz / sub
    edges = np.arange(-nz * dz, nz * dz + h / 2, h)
    hist = np.zeros(edges.size - 1)
    te = np.radians(theta_edges_deg)
    u = (np.arange(ns) + 0.5) / ns
    phi = (np.arange(nphi) + 0.5) / nphi * 2 * np.pi
    for c in range(fine.shape[0]):
        ct = np.cos(te[c]) + (np.cos(te[c + 1]) - np.cos(te[c])) * u
        for s in range(fine.shape[1]):
            if fine[c, s] == 0:
                continue
            r = np.cbrt(r_edges_cm[s] ** 3 + (r_edges_cm[s + 1] ** 3 - r_edges_cm[s] ** 3) * u)
            rr, cc, pp = np.meshgrid(r, ct, phi, indexing="ij")
            ss = np.sqrt(np.clip(1 - cc**2, 0, 1))
            ok = (np.abs(rr * ss * np.cos(pp)) <= half_width_cm) & (np.abs(rr * ss * np.sin(pp)) <= half_width_cm)
            hist += np.histogram((rr * cc)[ok], bins=edges, weights=np.full(ok.sum(), fine[c, s] / rr.size))[0]
    zc = 0.5 * (edges[1:] + edges[:-1])
    tr = np.zeros(2 * nz + 1)
    for q in range(sub):
        m = np.floor(((q + 0.5) * h + zc) / dz).astype(int)
        ok = (m >= -nz) & (m <= nz)
        np.add.at(tr, m[ok] + nz, hist[ok] / sub)
    return tr


def test_broad_beam_depth_dose_matches_brute_force_convolution(kernel, shared_data):
    script = load_script("kernels/derive_ccc_kernels.py")
    edk, _ = script.read_mono_table(shared_data)  # the merged table the shipped kernel came from
    mu_e, mu_v = script.read_mu_water(shared_data / script.MU_REL)
    w = np.asarray(kernel.provenance["terma_weights"])
    fine = polyenergetic_kernel(edk, w)
    mu = np.exp(np.interp(np.log(edk.energies_mev), np.log(mu_e), np.log(mu_v)))

    nz, dz = 64, 0.25
    zc = (np.arange(nz) + 0.5) * dz
    terma_z = (w[None, :] * np.exp(-np.outer(zc, mu))).sum(axis=1)  # polyenergetic, hardening
    g = Grid((nz, 40, 40), (5.0, 5.0, dz * 10))
    half = 20 * 0.5
    tr = _slab_transfer(fine, edk.theta_edges_deg, edk.radius_edges_cm, dz, nz, half)
    ref = np.array([sum(terma_z[i] * tr[j - i + nz] for i in range(nz)) for j in range(nz)])
    terma = np.broadcast_to(terma_z[:, None, None], g.shape)
    d = _ccc(terma, np.ones(g.shape), g, beam_direction=(0, 0, 1))[:, 20, 20].astype(float)
    dmax_ref, dmax_ccc = zc[np.argmax(ref)], zc[np.argmax(d)]
    assert 1.0 <= dmax_ref <= 2.2 and abs(dmax_ccc - dmax_ref) <= 0.5
    beyond = zc >= 2.0
    ratio = d[beyond] / ref[beyond]
    assert np.all(np.abs(ratio - 1) < 0.03), ratio
    # build-up: surface dose well below the maximum, then exponential-like fall-off
    assert d[0] < 0.7 * d.max() and d[-1] < 0.85 * d.max()


# --- validation ------------------------------------------------------------------------------------
def test_bad_input(kernel):
    g = Grid((3, 4, 5), (2.0, 2.0, 2.0))
    t = np.ones(g.shape)
    rho = np.ones(g.shape)
    with pytest.raises(ValueError, match="terma must have shape"):
        _ccc(np.ones((3, 4, 4)), rho, g, beam_direction=(0, 0, 1))
    with pytest.raises(ValueError, match="terma must be >= 0"):
        _ccc(-t, rho, g, beam_direction=(0, 0, 1))
    bad = rho.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="density_g_cm3 must be finite"):
        _ccc(t, bad, g, beam_direction=(0, 0, 1))
    with pytest.raises(ValueError, match="density_g_cm3 must be >= 0"):
        _ccc(t, -rho, g, beam_direction=(0, 0, 1))
    with pytest.raises(ValueError, match="exactly one of"):
        _ccc(t, rho, g)
    with pytest.raises(ValueError, match="exactly one of"):
        _ccc(t, rho, g, beam_direction=(0, 0, 1), source_position_mm=(0, 0, -850))
    with pytest.raises(ValueError, match="beam_direction must be a non-zero"):
        _ccc(t, rho, g, beam_direction=(0, 0, 0))
    with pytest.raises(ValueError, match="beam_direction must have shape"):
        _ccc(t, rho, g, beam_direction=(0, 1))
    with pytest.raises(ValueError, match="source_position_mm must differ"):
        _ccc(t, rho, g, source_position_mm=g.centre_mm)
    with pytest.raises(TypeError, match="kernel must be a CollapsedConeKernel"):
        _ccc(t, rho, g, beam_direction=(0, 0, 1), kernel="default")
    with pytest.raises(TypeError, match="grid must be a tomodose Grid"):
        _ccc(t, rho, (3, 4, 5), beam_direction=(0, 0, 1))


# --- energy groups -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def group_kernel():
    return load_kernel("ccc_water_6mv_3groups", n_azimuth=3)


@pytest.mark.parametrize("mode", ["beam", "source"])
def test_energy_groups_match_naive_twin(group_kernel, mode):
    rng = np.random.default_rng(21)
    shape, spacing, origin = (5, 6, 4), (4.0, 3.0, 5.0), (1.0, -2.0, 3.0)
    grid = Grid(shape, spacing, origin)
    terma = rng.random((3,) + shape) * (rng.random((3,) + shape) > 0.3)
    rho = rng.uniform(0.0, 2.0, shape)
    kw = {"beam_direction": (0.1, 0.9, -0.3)} if mode == "beam" else {"source_position_mm": (200, -700, 100)}
    assert np.any(group_kernel.group_amplitudes < 0)  # build-up terms: signed sources are covered
    fast = _ccc(terma, rho, grid, kernel=group_kernel, **kw)
    slow = naive.collapsed_cone_dose(terma, rho, spacing, origin, group_kernel, **kw)
    np.testing.assert_allclose(fast, slow, rtol=5e-5, atol=5e-5 * slow.max())


def test_signed_direct_sources_give_the_buildup_kernel():
    """Direct term sources of a build-up pair (amplitudes +1/a, -1/b: energy per unit radius
    e^(-a r) - e^(-b r) >= 0) transported along one line equal the closed-form segment energies."""
    from tomodose._kernels import collapsed_cone as _k

    n, d = 12, 0.5
    rates = np.array([0.5, 2.0])
    amp = np.array([1.0 / 0.5, -1.0 / 2.0])
    src = np.zeros((2, n, 1, 1))
    src[:, 0, 0, 0] = amp
    dose = np.zeros((n, 1, 1))
    z3 = np.zeros(3)
    _k.transport_direction(src, np.ones((n, 1, 1)), dose, 0, 1, 0.0, 0.0, d, rates, np.eye(2), False,
                           np.array([0.0, 0.0, 1.0]), 0.0, np.zeros((1, 2, 2)), 1.0, np.zeros((1, 1, 1, 1)), z3, z3,
                           np.ones(3), z3, True, *TD_OFF)
    expected = np.zeros(n)
    for a, big_a in zip(rates, amp):
        e = -np.expm1(-a * d)
        expected[0] += big_a * (1.0 - e / (a * d))
        expected[1:] += big_a / a * e * e * np.exp(-a * d * np.arange(n - 1)) / d
    assert np.all(expected > 0)
    np.testing.assert_allclose(dose[:, 0, 0], expected, rtol=1e-10, atol=1e-14)


def test_energy_groups_are_one_transport_of_the_group_sum(group_kernel):
    """Grouped TERMA == sum over groups of single-group transports (exact linearity)."""
    rng = np.random.default_rng(22)
    grid = Grid((8, 7, 9), (4.0, 4.0, 4.0))
    terma = rng.random((3,) + grid.shape)
    rho = rng.uniform(0.1, 1.5, grid.shape)
    kw = {"source_position_mm": (0.0, -850.0, 30.0)}
    grouped = _ccc(terma, rho, grid, kernel=group_kernel, **kw).astype(float)
    parts = sum(_ccc(terma[g], rho, grid, kernel=group_kernel.group_kernel(g), **kw).astype(float)
                for g in range(3))
    np.testing.assert_allclose(grouped, parts, rtol=2e-5, atol=1e-6 * grouped.max())


def test_energy_groups_parallel_beam_with_diagonal_ties():
    """Beam along a grid axis with the full staggered 3-group kernel (cones on grid diagonals are
    split over the tied axes): the per-ring contracted sources give the sum of the per-group
    transports, and the dose keeps the lateral symmetries."""
    k = load_kernel("ccc_water_6mv_3groups")
    rng = np.random.default_rng(23)
    g = Grid((6, 7, 7), (4.0, 4.0, 4.0), (-12.0, -12.0, 0.0))
    base = rng.random((3, 6, 4, 4))
    terma = np.zeros((3,) + g.shape)
    # symmetric under x -> -x, y -> -y and x <-> y
    q = np.concatenate([base, base[:, :, :, ::-1][:, :, :, 1:]], axis=3)
    q = np.concatenate([q, q[:, :, ::-1][:, :, 1:]], axis=2)
    terma[:] = 0.5 * (q + q.transpose(0, 1, 3, 2))
    rho = np.ones(g.shape)
    kw = {"beam_direction": (0, 0, 1)}
    grouped = _ccc(terma, rho, g, kernel=k, **kw).astype(float)
    parts = sum(_ccc(terma[e], rho, g, kernel=k.group_kernel(e), **kw).astype(float) for e in range(3))
    np.testing.assert_allclose(grouped, parts, rtol=2e-5, atol=1e-6 * grouped.max())
    tol = 1e-5 * grouped.max()
    np.testing.assert_allclose(grouped, grouped[:, :, ::-1], atol=tol)
    np.testing.assert_allclose(grouped, grouped[:, ::-1, :], atol=tol)
    np.testing.assert_allclose(grouped, grouped.transpose(0, 2, 1), atol=tol)


def test_grouped_tilt_normalisation_equals_one_pass_per_group(group_kernel):
    """The one-pass normalisation of all energy groups is the per-group one (to rounding)."""
    from tomodose._kernels import collapsed_cone as _k

    rng = np.random.default_rng(24)
    shape, spacing, origin = (5, 6, 7), np.array([3.0, 4.0, 2.5]), np.array([-5.0, 2.0, 1.0])
    terma = rng.random((3,) + shape) * (rng.random((3,) + shape) > 0.4)
    k = group_kernel
    tables = [k._density_table(a) for a in k.group_amplitudes]
    ds = tables[0][1]
    src = np.array([150.0, -700.0, 60.0])
    axis = -src / np.linalg.norm(src)
    dirs, omega, _ = k.directions(axis)
    totals = np.stack([t.sum(axis=1) for t, _ in tables])
    fractions = np.array([float(a.sum()) for a in k.group_amplitudes])
    one = _k.tilt_normalisation_groups(terma, dirs, omega, totals, ds, src, origin, spacing, fractions, axis)
    each = np.stack([_k.tilt_normalisation(np.ascontiguousarray(terma[g]), dirs, omega, totals[g], ds, src, origin,
                                           spacing, fractions[g], axis) for g in range(3)])
    np.testing.assert_allclose(one, each, rtol=1e-14, atol=0)
    assert np.all((one > 0) == (terma > 0))


def test_energy_groups_bad_input(kernel, group_kernel):
    g = Grid((3, 4, 5), (2.0, 2.0, 2.0))
    rho = np.ones(g.shape)
    with pytest.raises(ValueError, match="energy groups"):
        _ccc(np.ones((3,) + g.shape), rho, g, beam_direction=(0, 0, 1), kernel=kernel)
    with pytest.raises(ValueError, match="energy groups"):
        _ccc(np.ones((2,) + g.shape), rho, g, beam_direction=(0, 0, 1), kernel=group_kernel)
    with pytest.raises(ValueError, match="terma must have shape"):
        _ccc(np.ones((3, 3, 4, 4)), rho, g, beam_direction=(0, 0, 1), kernel=group_kernel)


# --- fast kernel vs the reference kernel (pre speed-up) ----------------------------------------
@pytest.mark.parametrize("tilt", [False, True])
def test_fast_kernel_matches_reference_kernel(group_kernel, tilt):
    """The row-task kernel with the inlined exp gives the reference kernel's dose to 1e-10
    ((1 - e^-x) / x instead of expm1 loses ~1e-16 / x relative for small x)."""
    from tomodose._kernels import collapsed_cone as _k

    rng = np.random.default_rng(31)
    shape, spacing, origin = (9, 11, 7), (3.0, 4.0, 2.5), (-5.0, 2.0, 1.0)
    terma = rng.random((3,) + shape) * (rng.random((3,) + shape) > 0.5)
    rho = rng.uniform(0.0, 2.0, shape)
    rho[2] = 0.0  # vacuum slab
    rho[4, 3:6] = 1e-4  # x < 1e-4 series branch
    k = group_kernel
    tables = [k._density_table(a) for a in k.group_amplitudes]
    table = np.ascontiguousarray(np.stack([t for t, _ in tables]))
    ds = tables[0][1]
    norm = rng.uniform(0.5, 1.5, (3,) + shape) if tilt else np.zeros((1, 1, 1, 1))
    src = np.array([150.0, -700.0, 60.0])
    axis = -src / np.linalg.norm(src)
    dirs, omega, ring = k.directions(axis)
    rates = np.ascontiguousarray(k.rates_per_cm)
    amps = np.asarray(k.group_amplitudes) / k.n_azimuth
    o, s = np.array(origin), np.array(spacing)
    for d in range(dirs.shape[0]):
        m, sgn, da, db, step = direction_geometry(dirs[d], spacing)
        out = [np.zeros(shape), np.zeros(shape)]
        args = (terma, rho, None, m, sgn, da, db, step, rates, np.ascontiguousarray(amps[:, ring[d]]), tilt,
                np.ascontiguousarray(dirs[d]), float(omega[d]), table, ds, norm, src, o, s, axis)
        _k.transport_direction(*args[:2], out[0], *args[3:], False, *TD_OFF)
        _k.transport_direction_reference(*args[:2], out[1], *args[3:])
        np.testing.assert_allclose(out[0], out[1], rtol=1e-10, atol=1e-14 * out[1].max())


# --- shared direction set (rotational delivery) ----------------------------------------------------
def test_contract_sources_matches_naive_twin():
    from tomodose._kernels import collapsed_cone as _k

    rng = np.random.default_rng(41)
    terma = (rng.random((5, 5000)) * (rng.random((5, 5000)) > 0.3)).astype(np.float32)
    w = rng.random((3, 5, 4)) * (rng.random((3, 5, 4)) > 0.4)
    w[1, 2] = 0.0
    out = np.empty((3, 4, 5000), dtype=np.float32)
    _k.contract_sources(terma, w, out)
    np.testing.assert_allclose(out, naive.contract_sources(terma, w), rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def rotation_case():
    rng = np.random.default_rng(43)
    shape, spacing = (6, 5, 7), (4.0, 5.0, 3.0)
    grid = Grid(shape, spacing, (-10.0, 3.0, 7.0))
    angles = np.radians([0.0, 100.0, 230.0])
    beams = np.stack([np.sin(angles), -np.cos(angles), np.zeros(3)], axis=1)
    terma = rng.random((3,) + shape) * (rng.random((3,) + shape) > 0.4)
    rho = rng.uniform(0.0, 2.0, shape)
    rho[0, 0, :] = 0.0
    return grid, beams, terma, rho


@pytest.mark.parametrize("rings", [None, [5, 6, 7, 8, 9, 10]])
def test_shared_directions_match_naive_twin(rotation_case, kernel, rings):
    from tomodose.transport.collapsed_cone import shared_direction_dose

    grid, beams, terma, rho = rotation_case
    k = kernel.with_azimuths(3)
    fast = shared_direction_dose(terma, beams, rho, grid, kernel=k, rings=rings, n_directions=24, batch=5,
                                 progress=False)
    slow = naive.shared_direction_dose(terma, beams, rho, grid.spacing_mm, k,
                                       range(k.n_polar) if rings is None else rings, 24)
    assert fast.dtype == np.float64 and fast.shape == grid.shape
    np.testing.assert_allclose(fast, slow, rtol=2e-6, atol=2e-6 * slow.max())


def test_shared_directions_deterministic_and_thread_independent(rotation_case, kernel):
    from tomodose.transport.collapsed_cone import shared_direction_dose

    grid, beams, terma, rho = rotation_case
    old = numba.get_num_threads()
    out = []
    try:
        for n in (1, min(2, numba.config.NUMBA_NUM_THREADS), 1):
            numba.set_num_threads(n)
            out.append(shared_direction_dose(terma, beams, rho, grid, kernel=kernel, n_directions=64, progress=False))
    finally:
        numba.set_num_threads(old)
    np.testing.assert_array_equal(out[0], out[1])
    np.testing.assert_array_equal(out[0], out[2])


@pytest.mark.parametrize("neighbours", [1, 3])
def test_shared_directions_conserve_energy(kernel, neighbours):
    """Point source, two beams: deposited = released - what leaves the grid along the shared lines
    (each cone shared among its ``neighbours`` nearest directions, weights 1 / angle, sum 1)."""
    from tomodose.transport.collapsed_cone import fibonacci_directions, shared_direction_dose

    g = Grid((25, 25, 25), (6.0, 6.0, 6.0))
    src = (12, 12, 12)
    terma = np.zeros((2,) + g.shape)
    terma[0][src] = 1.0
    terma[1][src] = 0.5
    beams = np.array([[0.0, 1.0, 0.0], [0.6, 0.0, -0.8]])
    n_dir = 96
    d = shared_direction_dose(terma, beams, np.ones(g.shape), g, kernel=kernel, n_directions=n_dir,
                              neighbours=neighbours, progress=False)
    fixed = fibonacci_directions(n_dir)
    amps = kernel.amplitudes / kernel.n_azimuth
    rates = kernel.rates_per_cm
    def kept(v, p):  # energy of ring p's cone released along v that stays in the grid
        return _kept_energy(v, amps[p], rates, g.shape, g.spacing_mm, src)

    expected = 0.0
    for b, t in zip(beams, (1.0, 0.5)):
        dirs, _, ring = kernel.directions(b)
        for u, p in zip(dirs, ring):
            dots = fixed @ u
            near = np.argsort(-dots, kind="stable")[:neighbours]
            inv = 1.0 / (np.arccos(np.clip(dots[near], -1, 1)) + 1e-6)
            expected += t * sum(share * kept(v, p) for v, share in zip(fixed[near], inv / inv.sum()))
    assert float(d.sum()) == pytest.approx(expected, rel=1e-5)


def test_rings_partition_the_dose(kernel):
    """Transporting a partition of the rings separately sums to the full transport."""
    rng = np.random.default_rng(47)
    g = Grid((7, 8, 6), (4.0, 4.0, 4.0))
    terma = rng.random(g.shape)
    rho = rng.uniform(0.1, 1.5, g.shape)
    for kw in ({"beam_direction": (0.2, 1.0, 0.1)}, {"source_position_mm": (30.0, -850.0, 10.0)}):
        full = _ccc(terma, rho, g, **kw).astype(float)
        parts = (_ccc(terma, rho, g, rings=[0, 1, 2], **kw).astype(float)
                 + _ccc(terma, rho, g, rings=range(3, kernel.n_polar), **kw).astype(float))
        np.testing.assert_allclose(parts, full, rtol=1e-5, atol=1e-6 * full.max())


@pytest.fixture(scope="module")
def rotation_case_energy_groups(rotation_case):
    grid, beams, _, rho = rotation_case
    rng = np.random.default_rng(44)
    terma = rng.random((3, 3) + grid.shape) * (rng.random((3, 3) + grid.shape) > 0.4)
    return grid, beams, terma, rho


@pytest.mark.parametrize("rings", [None, [5, 6, 7, 8, 9, 10]])
def test_shared_directions_energy_groups_match_naive_twin(rotation_case_energy_groups, group_kernel, rings):
    from tomodose.transport.collapsed_cone import shared_direction_dose

    grid, beams, terma, rho = rotation_case_energy_groups
    fast = shared_direction_dose(terma, beams, rho, grid, kernel=group_kernel, rings=rings, n_directions=24,
                                 batch=5, progress=False)
    slow = naive.shared_direction_dose(terma, beams, rho, grid.spacing_mm, group_kernel,
                                       range(group_kernel.n_polar) if rings is None else rings, 24)
    assert fast.dtype == np.float64 and fast.shape == grid.shape
    np.testing.assert_allclose(fast, slow, rtol=2e-6, atol=2e-6 * slow.max())


@pytest.mark.parametrize("neighbours", [1, 2])
def test_shared_directions_energy_groups_are_the_sum_of_group_kernels(rotation_case_energy_groups, group_kernel,
                                                                       neighbours):
    """(beams, energy groups) TERMA == sum over groups of the beams' TERMA of that group transported
    with that group's kernel alone; and a single energy group equals the 4-D call."""
    from tomodose.transport.collapsed_cone import shared_direction_dose

    grid, beams, terma, rho = rotation_case_energy_groups
    kw = dict(n_directions=40, neighbours=neighbours, progress=False)
    grouped = shared_direction_dose(terma, beams, rho, grid, kernel=group_kernel, **kw)
    parts = sum(shared_direction_dose(terma[:, e], beams, rho, grid, kernel=group_kernel.group_kernel(e), **kw)
                for e in range(group_kernel.n_groups))
    np.testing.assert_allclose(grouped, parts, rtol=1e-5, atol=1e-7 * grouped.max())
    assert grouped.max() > 0
    # energy: each beam releases sum_e T_ge x group e's emitted fraction, independent of the grouping
    only0 = np.zeros_like(terma)
    only0[:, 0] = terma[:, 0]
    np.testing.assert_allclose(
        shared_direction_dose(only0, beams, rho, grid, kernel=group_kernel, **kw),
        shared_direction_dose(terma[:, 0], beams, rho, grid, kernel=group_kernel.group_kernel(0), **kw),
        rtol=1e-5, atol=1e-7 * grouped.max())


def test_shared_directions_energy_groups_bad_input(rotation_case_energy_groups, kernel, group_kernel):
    from tomodose.transport.collapsed_cone import shared_direction_dose

    grid, beams, terma, rho = rotation_case_energy_groups
    with pytest.raises(ValueError, match="terma_groups has 3 energy groups but the kernel"):
        shared_direction_dose(terma, beams, rho, grid, kernel=kernel)
    with pytest.raises(ValueError, match="terma_groups has 2 energy groups but the kernel"):
        shared_direction_dose(terma[:, :2], beams, rho, grid, kernel=group_kernel)
    with pytest.raises(ValueError, match="terma_groups must have shape"):
        shared_direction_dose(terma[:, :, :2], beams, rho, grid, kernel=group_kernel)
    with pytest.raises(ValueError, match="terma_groups must be >= 0"):
        shared_direction_dose(-terma, beams, rho, grid, kernel=group_kernel)


def test_shared_directions_bad_input(rotation_case, kernel):
    from tomodose.transport.collapsed_cone import shared_direction_dose

    grid, beams, terma, rho = rotation_case
    with pytest.raises(ValueError, match="beam_directions must have shape"):
        shared_direction_dose(terma, beams[:2], rho, grid)
    with pytest.raises(ValueError, match="beam_directions must be non-zero"):
        shared_direction_dose(terma, np.zeros((3, 3)), rho, grid)
    with pytest.raises(ValueError, match="n_directions must be an integer >= 1"):
        shared_direction_dose(terma, beams, rho, grid, n_directions=0)
    with pytest.raises(ValueError, match="neighbours must be an integer in \\[1, n_directions\\]"):
        shared_direction_dose(terma, beams, rho, grid, n_directions=4, neighbours=5)
    with pytest.raises(ValueError, match="batch must be an integer >= 1"):
        shared_direction_dose(terma, beams, rho, grid, batch=1.5)
    with pytest.raises(ValueError, match="terma_groups must be >= 0"):
        shared_direction_dose(-terma, beams, rho, grid)
    with pytest.raises(ValueError, match="rings must be ring indices"):
        shared_direction_dose(terma, beams, rho, grid, rings=[11])
    with pytest.raises(ValueError, match="rings must be ring indices"):
        _ccc(terma[0], rho, grid, beam_direction=(0, 0, 1), rings=[-1])
    with pytest.raises(TypeError, match="grid must be a tomodose Grid"):
        shared_direction_dose(terma, beams, rho, grid.shape)


# --- multi-resolution shared transport (long-range terms on a coarser grid) -------------------------
def test_sparse_contraction_matches_naive_twin_and_dense_contraction():
    from tomodose._kernels import collapsed_cone as _k

    rng = np.random.default_rng(51)
    terma = (rng.random((6, 3000)) * (rng.random((6, 3000)) > 0.3)).astype(np.float32)
    w = rng.normal(size=(4, 6, 3)) * (rng.random((4, 6, 3)) > 0.5)  # signed (build-up terms)
    w[2] = 0.0
    wt = w.transpose(0, 2, 1)
    j, k, r = np.nonzero(wt)
    ptr = np.zeros(4 * 3 + 1, dtype=np.int64)
    np.cumsum(np.bincount(j * 3 + k, minlength=12), out=ptr[1:])
    out = np.full((4, 3000, 3), np.nan, dtype=np.float32)  # voxel-major
    _k.contract_sources_sparse(terma, ptr, r.astype(np.int64), np.ascontiguousarray(wt[j, k, r]), out)
    out = out.transpose(0, 2, 1)
    np.testing.assert_allclose(out, naive.contract_sources_sparse(terma, ptr, r, wt[j, k, r], 4, 3), rtol=1e-6,
                               atol=1e-6)
    np.testing.assert_allclose(out, naive.contract_sources(terma, w), rtol=1e-6, atol=1e-6)
    assert not out[2].any()


@pytest.mark.parametrize("f", [2, 3])
def test_coarse_restriction_matches_naive_twin_and_keeps_released_energy(f):
    from tomodose._kernels import collapsed_cone as _k

    rng = np.random.default_rng(52 + f)
    shape = (5, 7, 4)
    rho = rng.uniform(0.0, 2.0, shape)
    rho[:2, :2, :2] = 0.0  # an empty block: its TERMA is 0, not a division by zero
    terma = rng.random((3,) + shape).astype(np.float32)
    rho_c, mass_c = _k.coarse_density(rho, f)
    t_c = _k.coarse_sources(terma, rho, mass_c, f)
    rho_n, t_n = naive.coarse_grid_values(terma, rho, f)
    assert rho_c.shape == tuple(-(-n // f) for n in shape) and t_c.dtype == np.float32
    np.testing.assert_allclose(rho_c, rho_n, rtol=1e-12)
    np.testing.assert_allclose(t_c, t_n, rtol=1e-6, atol=1e-7)
    # energy released (density x TERMA x volume) is kept; the far blocks hold fewer voxels
    counts = np.zeros(rho_c.shape)
    np.add.at(counts, tuple(np.meshgrid(*[np.arange(n) // f for n in shape], indexing="ij")), 1.0)
    np.testing.assert_allclose((t_c * rho_c * counts).sum(axis=(1, 2, 3)), (terma * rho).sum(axis=(1, 2, 3)),
                               rtol=1e-6)


@pytest.mark.parametrize("f, shape", [(2, (5, 7, 4)), (3, (7, 4, 9)), (2, (8, 2, 6))])
def test_refine_coarse_dose_matches_naive_twin(f, shape):
    from tomodose.transport.collapsed_cone import refine_coarse_dose

    rng = np.random.default_rng(53)
    coarse = rng.random(tuple(-(-n // f) for n in shape))
    out = refine_coarse_dose(coarse, f, shape)
    assert out.shape == shape
    np.testing.assert_allclose(out, naive.refine(coarse, shape, f), rtol=1e-9, atol=1e-9)


def test_refine_coarse_dose_keeps_constants_linear_fields_and_block_sums():
    """Constants and linear fields are reproduced (the sharpening vanishes, the quadratic is exact);
    inside, the fine voxels of a block average to its sharpened value (conservative)."""
    from tomodose.transport.collapsed_cone import refine_coarse_dose

    shape_c = (5, 6, 7)
    np.testing.assert_allclose(refine_coarse_dose(np.full(shape_c, 2.5), 2, (10, 12, 14)), 2.5, rtol=1e-14)
    kc, jc, ic = np.meshgrid(*[np.arange(n, dtype=float) for n in shape_c], indexing="ij")
    lin = 1.0 + 0.3 * kc - 0.2 * jc + 0.1 * ic  # block averages of a linear field (fine index / 2)
    out = refine_coarse_dose(lin, 2, (10, 12, 14))
    k, j, i = np.meshgrid(*[(np.arange(2 * n) - 0.5) / 2 for n in shape_c], indexing="ij")
    inner = (slice(2, -2), slice(2, -2), slice(2, -2))
    np.testing.assert_allclose(out[inner], (1.0 + 0.3 * k - 0.2 * j + 0.1 * i)[inner], rtol=1e-12)
    rng = np.random.default_rng(55)
    a = rng.random(shape_c)
    fine = refine_coarse_dose(a, 2, (10, 12, 14))
    sums = fine.reshape(5, 2, 6, 2, 7, 2).mean(axis=(1, 3, 5))
    sharp = a.copy()
    for ax in range(3):  # per-axis sharpening, inner blocks only
        b = np.moveaxis(sharp, ax, -1).copy()
        b[..., 1:-1] -= (b[..., 2:] - 2 * b[..., 1:-1] + b[..., :-2]) / 24.0
        sharp = np.moveaxis(b, -1, ax)
    np.testing.assert_allclose(sums[1:-1, 1:-1, 1:-1], sharp[1:-1, 1:-1, 1:-1], rtol=1e-12)


def _coarse_case(group_kernel):
    rng = np.random.default_rng(54)
    shape, spacing = (6, 5, 7), (4.0, 5.0, 3.0)
    grid = Grid(shape, spacing, (-10.0, 3.0, 7.0))
    angles = np.radians([0.0, 100.0, 230.0])
    beams = np.stack([np.sin(angles), -np.cos(angles), np.zeros(3)], axis=1)
    terma = rng.random((3, group_kernel.n_groups) + shape) * (rng.random((3, 1) + shape) > 0.4)
    rho = rng.uniform(0.0, 2.0, shape)
    rho[0, 0, :] = 0.0  # vacuum
    rho[1, :, 1] = 0.0012  # air
    return grid, beams, terma, rho


@pytest.mark.parametrize("seed", [0, 1])
def test_direct_source_kernel_matches_transport_direction(seed):
    """The voxel-major direct-source kernel of the shared transport equals transport_direction
    with direct sources (term-major), with vacuum, air and signed sources, for every stepping axis."""
    from tomodose._kernels import collapsed_cone as _k
    from tomodose.transport.collapsed_cone import direction_steppings, fibonacci_directions

    rng = np.random.default_rng(60 + seed)
    shape, spacing = ((6, 5, 7), (4.0, 5.0, 3.0)) if seed == 0 else ((5, 8, 4), (2.5, 2.5, 6.0))
    rho = rng.uniform(0.0, 2.0, shape)
    rho[0, 0, :] = 0.0
    rho[1, :, 1] = 0.0012
    rates = np.array([0.05, 0.12, 3.0, 100.0])
    src = (rng.normal(size=(4,) + shape) * (rng.random(shape) > 0.4)).astype(np.float32)
    src_vm = np.ascontiguousarray(np.moveaxis(src, 0, -1))
    z3 = np.zeros(3)
    for u in fibonacci_directions(12):
        for w, m, sgn, da, db, st in direction_steppings(u, spacing):
            a = np.zeros(shape)
            b = np.zeros(shape)
            _k.transport_direction(src, rho, a, m, sgn, da, db, st, rates, np.eye(4), False, u, 0.0,
                                   np.zeros((1, 2, 4)), 1.0, np.zeros((1, 1, 1, 1)), z3, z3, np.ones(3), z3, True,
                                   *TD_OFF)
            _k.transport_direct_sources(src_vm, rho, b, m, sgn, da, db, st, rates, *TDS_OFF)
            np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-12 * np.abs(a).max())


def test_shared_coarse_matches_naive_composition(group_kernel):
    """Fast terms on the grid + the long-range terms transported on the 2x coarser grid (mass-weighted
    TERMA, mean density) and interpolated back = the naive twins composed the same way."""
    from tomodose.transport.collapsed_cone import shared_direction_dose

    grid, beams, terma, rho = _coarse_case(group_kernel)
    k = group_kernel.with_azimuths(3)
    rates = np.asarray(k.rates_per_cm)
    fast_t, slow_t = np.flatnonzero(rates >= 1.0), np.flatnonzero(rates < 1.0)
    assert fast_t.size and slow_t.size
    got = shared_direction_dose(terma, beams, rho, grid, kernel=k, n_directions=20, coarse_factor=2,
                                coarse_rate_per_cm=1.0, coarse_directions=14, batch=3, progress=False)
    fine = naive.shared_direction_dose(terma, beams, rho, grid.spacing_mm, k, range(k.n_polar), 20, terms=fast_t)
    flat = terma.reshape((-1,) + grid.shape)
    rho_c, t_c = naive.coarse_grid_values(flat, rho, 2)
    coarse = naive.shared_direction_dose(t_c.reshape(terma.shape[:2] + rho_c.shape), beams, rho_c,
                                         tuple(2 * s for s in grid.spacing_mm), k, range(k.n_polar), 14, terms=slow_t)
    expected = fine + naive.refine(coarse, grid.shape, 2)
    assert got.dtype == np.float64 and got.shape == grid.shape
    np.testing.assert_allclose(got, expected, rtol=2e-6, atol=2e-6 * expected.max())


def test_shared_coarse_invariants(group_kernel):
    """Linear in TERMA, zero TERMA gives zero, identical run to run and for 1 or 2 threads;
    coarse_factor=1 ignores the split (all terms on the grid)."""
    from tomodose.transport.collapsed_cone import shared_direction_dose

    grid, beams, terma, rho = _coarse_case(group_kernel)
    kw = dict(kernel=group_kernel, n_directions=32, coarse_factor=2, coarse_directions=24, progress=False)
    one = shared_direction_dose(terma, beams, rho, grid, **kw)
    assert one.max() > 0
    np.testing.assert_allclose(shared_direction_dose(2.5 * terma, beams, rho, grid, **kw), 2.5 * one, rtol=1e-6,
                               atol=1e-7 * one.max())
    assert not shared_direction_dose(np.zeros_like(terma), beams, rho, grid, **kw).any()
    old = numba.get_num_threads()
    out = []
    try:
        for n in (1, min(2, numba.config.NUMBA_NUM_THREADS), 1):
            numba.set_num_threads(n)
            out.append(shared_direction_dose(terma, beams, rho, grid, **kw))
    finally:
        numba.set_num_threads(old)
    np.testing.assert_array_equal(out[0], one)
    np.testing.assert_array_equal(out[1], one)
    np.testing.assert_array_equal(out[2], one)
    plain = shared_direction_dose(terma, beams, rho, grid, kernel=group_kernel, n_directions=32, progress=False)
    np.testing.assert_array_equal(
        shared_direction_dose(terma, beams, rho, grid, kernel=group_kernel, n_directions=32, coarse_factor=1,
                              coarse_rate_per_cm=50.0, coarse_directions=5, progress=False), plain)


def test_shared_coarse_close_to_full_resolution_in_water_and_lung(group_kernel):
    """Physics: a 2 x 2 cm beam pair in water with a lung slab (0.25 g/cm3), 4 mm voxels; the
    long-range terms on 8 mm voxels change the dose by < 1.5 % of the maximum and keep the
    deposited energy within 0.5 % of the all-terms-on-the-grid transport."""
    from tomodose.transport.collapsed_cone import shared_direction_dose

    g = Grid((24, 24, 24), (4.0, 4.0, 4.0))
    rho = np.ones(g.shape)
    rho[:, 10:15, :] = 0.25
    terma = np.zeros((2, group_kernel.n_groups) + g.shape)
    for e in range(group_kernel.n_groups):
        terma[0, e, 9:14, :, 9:14] = np.exp(-0.05 * np.arange(24))[None, :, None] * (e + 1)
        terma[1, e, 9:14, 9:14, :] = np.exp(-0.05 * np.arange(24))[None, None, :] * (e + 1)
    beams = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    full = shared_direction_dose(terma, beams, rho, g, kernel=group_kernel, n_directions=96, progress=False)
    split = shared_direction_dose(terma, beams, rho, g, kernel=group_kernel, n_directions=96, coarse_factor=2,
                                  progress=False)
    diff = np.abs(split - full).max() / full.max()
    assert diff < 0.015, diff
    assert (split * rho).sum() == pytest.approx((full * rho).sum(), rel=5e-3)


def test_shared_coarse_bad_input(rotation_case, kernel):
    from tomodose.transport.collapsed_cone import shared_direction_dose

    grid, beams, terma, rho = rotation_case
    for bad in (0, 1.5, True, 9):
        with pytest.raises(ValueError, match=r"coarse_factor must be an integer in \[1, 8\], got"):
            shared_direction_dose(terma, beams, rho, grid, coarse_factor=bad)
    for bad in (0.0, -1.0, float("nan"), "1"):
        with pytest.raises(ValueError, match="coarse_rate_per_cm must be a finite rate > 0"):
            shared_direction_dose(terma, beams, rho, grid, coarse_factor=2, coarse_rate_per_cm=bad)
    for bad in (0, 2.5, False):
        with pytest.raises(ValueError, match="coarse_directions must be an integer >= 1 or None"):
            shared_direction_dose(terma, beams, rho, grid, coarse_factor=2, coarse_directions=bad)


def test_shared_terms_with_equal_rates_are_merged_exactly():
    """The 5-group kernel has the 100 /cm fit bound in two energy groups (equal to 2e-10): the shared
    transport carries them as one term (sources added); the naive twin keeps them apart."""
    from tomodose.transport.collapsed_cone import shared_direction_dose

    k5 = load_kernel("ccc_water_6mv_5groups", n_azimuth=3)
    r = np.asarray(k5.rates_per_cm)
    assert np.sum(np.abs(r[:, None] - r[None, :]) <= 1e-6 * r[None, :]) > r.size  # a pair within 1e-6
    rng = np.random.default_rng(56)
    grid = Grid((5, 4, 6), (4.0, 5.0, 3.0))
    terma = rng.random((2, 5) + grid.shape) * (rng.random((2, 1) + grid.shape) > 0.3)
    rho = rng.uniform(0.0, 1.8, grid.shape)
    beams = np.array([[0.0, 1.0, 0.0], [0.8, -0.6, 0.0]])
    got = shared_direction_dose(terma, beams, rho, grid, kernel=k5, n_directions=16, progress=False)
    want = naive.shared_direction_dose(terma, beams, rho, grid.spacing_mm, k5, range(k5.n_polar), 16)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6 * want.max())


def test_range_check_matches_numpy_and_shared_input_errors(rotation_case, kernel):
    from tomodose._kernels import collapsed_cone as _k
    from tomodose.transport.collapsed_cone import shared_direction_dose

    rng = np.random.default_rng(57)
    v = rng.normal(size=200_003).astype(np.float32)
    v[[5, 70_000]] = np.nan
    v[199_999] = np.inf
    m, n_bad, pos = _k.range_check(v)
    fin = v[np.isfinite(v)]
    assert m == fin.min() and n_bad == 3 and pos
    assert _k.range_check(np.zeros(10, np.float32))[1:] == (0, False)
    grid, beams, terma, rho = rotation_case
    bad = terma.copy()
    bad[1, 2, 3, 4] = np.nan
    with pytest.raises(ValueError, match=r"terma_groups must be finite, got 1 NaN/inf value\(s\)"):
        shared_direction_dose(bad, beams, rho, grid, kernel=kernel)
    bad[1, 2, 3, 4] = -0.5
    with pytest.raises(ValueError, match="terma_groups must be >= 0.0, got minimum -0.5"):
        shared_direction_dose(bad, beams, rho, grid, kernel=kernel)


# --- sub-voxel line phases (docs/collapsed_cone.md section 4f) ----------------------------------------
@pytest.mark.parametrize("mode", ["beam", "source"])
def test_line_phases_match_naive_twin(mode, small_kernel):
    rng = np.random.default_rng(11)
    shape, spacing, origin = (5, 6, 4), (3.0, 2.5, 4.0), (-5.0, 2.0, 1.0)
    grid = Grid(shape, spacing, origin)
    terma = rng.random(shape) * (rng.random(shape) > 0.3)
    rho = rng.uniform(0.0, 2.0, shape)
    rho[0, 1, :] = 0.0
    if mode == "beam":
        kw, tol = {"beam_direction": (0.3, -0.5, 0.8)}, 2e-6
    else:
        kw, tol = {"source_position_mm": (60.0, -700.0, 300.0)}, 5e-5
    fast = _ccc(terma, rho, grid, kernel=small_kernel, line_phases=2, **kw)
    slow = naive.collapsed_cone_dose(terma, rho, spacing, origin, small_kernel, line_phases=2, **kw)
    np.testing.assert_allclose(fast, slow, rtol=tol, atol=tol * slow.max())
    # and it is not the nearest-voxel dose
    assert np.abs(_ccc(terma, rho, grid, kernel=small_kernel, **kw) - fast).max() > 1e-3 * slow.max()


def test_line_phase_set_layouts():
    from tomodose.transport.collapsed_cone import line_phase_set

    np.testing.assert_array_equal(line_phase_set(1), [[0.5, 0.5]])
    p = line_phase_set(2)
    assert sorted(map(tuple, p)) == [(0.25, 0.25), (0.25, 0.75), (0.75, 0.25), (0.75, 0.75)]
    for n in (3, 4):
        for layout in ("product", "diagonal"):
            p = line_phase_set(n, layout)
            assert p.shape == ((n * n, 2) if layout == "product" else (2 * n, 2))
            # unchanged by c -> 1 - c on either axis and by exchanging the axes (symmetry of the dose)
            s = sorted(tuple(np.round(v, 12)) for v in p)
            assert s == sorted((round(1 - a, 12), b) for a, b in s) == sorted((b, a) for a, b in s)
            # every axis alone sees the n phases equally often
            col = np.round(p[:, 0] * n - 0.5, 9)
            assert np.array_equal(np.unique(col, return_counts=True)[1], np.full(n, p.shape[0] // n))


@pytest.mark.parametrize("phases", [1, 3])
def test_phase_lines_visit_every_voxel_once(phases):
    # every phase is a partition of the voxels (the naive twin asserts it), for many directions
    k = load_kernel(n_azimuth=4)
    dirs, _, _ = k.directions((0.2, 0.1, -1.0))
    dirs = np.vstack([dirs, np.eye(3), -np.eye(3)])
    terma = np.zeros((3, 4, 5))
    c = [(j + 0.5) / phases for j in range(phases)]
    for u in dirs:
        m, sgn, da, db, step = direction_geometry(u, (1.0, 2.0, 3.0))
        for ca in c:
            naive.transport_direction(terma, np.ones_like(terma), m, sgn, da, db, step, [1.0], lambda v: [1.0],
                                      ca, c[-1] - ca + c[0])


@pytest.mark.parametrize("phases", [1, 2, 8])
def test_line_phases_put_a_line_at_its_exact_lateral_position_on_average(phases):
    """A point source transported along one direction with slope d: averaged over the phases the
    lateral displacement of the deposit at step n is n d within 1 / n_phases voxel (the mean of
    the rounded source and receiver offsets each within 1 / (2 n_phases)), for a source at any
    position along the line; nearest-voxel lines (1 phase) are off by up to a voxel, phased on
    the source's position."""
    from tomodose._kernels import collapsed_cone as _k
    from tomodose.transport.collapsed_cone import line_phase_set

    n_m, n_a = 24, 40
    d_a = 0.3183
    rates = np.array([0.001])
    worst = 0.0
    for n_src in (0, 3, 7):
        dose = np.zeros((n_m, n_a, 1))
        terma = np.zeros((1, n_m, n_a, 1))
        terma[0, n_src, 10, 0] = 1.0
        pset = line_phase_set(phases)
        for ca, cb in pset:
            _k.transport_direction(terma, np.ones((n_m, n_a, 1)), dose, 0, 1, d_a, 0.0, 0.25, rates,
                                   np.ones((1, 1)), False, np.zeros(3), 0.0, np.zeros((1, 2, 1)), 1.0,
                                   np.zeros((1, 1, 1, 1)), np.zeros(3), np.zeros(3), np.ones(3), np.zeros(3),
                                   False, ca, cb, *TD_OFF[2:])
        for n in range(n_src + 1, n_m):
            row = dose[n, :, 0]
            centroid = float(np.sum(np.arange(n_a) * row) / row.sum()) - 10.0
            worst = max(worst, abs(centroid - (n - n_src) * d_a))
    assert worst <= 1.0 / phases + 1e-9
    if phases == 1:
        assert worst > 0.5


def test_line_phases_invariants(kernel, small_kernel):
    """Symmetric TERMA -> symmetric dose, linearity, zero TERMA -> zero, identical for 1 and 2 threads."""
    g = Grid((10, 13, 13), (5.0, 5.0, 5.0), (-30.0, -30.0, -22.5))
    x, y, z = g.meshgrid_mm()
    terma = np.exp(-(x**2 + y**2) / (2 * 12.0**2)) * np.exp(-0.005 * (z - z.min())) * np.ones(g.shape)
    rho = np.ones(g.shape)
    rho[4:7] = 0.3
    for kw in ({"beam_direction": (0, 0, 1)}, {"source_position_mm": (0, 0, -850)}):
        d = _ccc(terma, rho, g, line_phases=2, **kw).astype(float)
        tol = 1e-5 * d.max()
        np.testing.assert_allclose(d, d[:, :, ::-1], atol=tol)
        np.testing.assert_allclose(d, d[:, ::-1, :], atol=tol)
        np.testing.assert_allclose(d, d.transpose(0, 2, 1), atol=tol)
    rng = np.random.default_rng(5)
    t1, t2 = rng.random(g.shape), rng.random(g.shape) * (rng.random(g.shape) > 0.7)
    kw = {"source_position_mm": (10.0, -850.0, 5.0), "kernel": small_kernel, "line_phases": 2}
    d12 = _ccc(2 * t1 + 3 * t2, rho, g, **kw).astype(float)
    np.testing.assert_allclose(d12, 2 * _ccc(t1, rho, g, **kw) + 3 * _ccc(t2, rho, g, **kw).astype(float),
                               rtol=2e-5, atol=1e-6 * d12.max())
    assert not _ccc(np.zeros(g.shape), rho, g, **kw).any()
    if numba.config.NUMBA_NUM_THREADS >= 2:
        old = numba.get_num_threads()
        try:
            out = []
            for n in (1, 2):
                numba.set_num_threads(n)
                out.append(_ccc(t1, rho, g, **kw))
        finally:
            numba.set_num_threads(old)
        np.testing.assert_array_equal(out[0], out[1])


def test_line_phases_bad_input():
    from tomodose.transport.collapsed_cone import line_phase_set

    g = Grid((3, 4, 5), (2.0, 2.0, 2.0))
    t = np.ones(g.shape)
    for bad in (0, 17, 1.5, True, "2"):
        with pytest.raises(ValueError, match=r"line_phases must be an integer in \[1, 16\], got"):
            _ccc(t, t, g, beam_direction=(0, 0, 1), line_phases=bad)
    with pytest.raises(ValueError, match="layout must be 'product' or 'diagonal', got 'grid'"):
        line_phase_set(2, "grid")
