"""Influence matrix: consistency with the full-plan pencil-beam dose, threshold, chunking, HDF5."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import sparse

from tomodose.delivery.beams_eye import conformal_sinogram
from tomodose.delivery.plan import HelicalPlan
from tomodose.geometry.grid import Grid, ImageVolume
from tomodose.geometry.structures import Structure, ellipsoid_mask
from tomodose.terma import BeamModel
from tomodose.transport.influence import (
    DEFAULT_THRESHOLD,
    beamlet_weights,
    far_field_operator,
    influence_beamlets,
    influence_matrix,
    read_influence,
    write_influence,
)
from tomodose.transport.pencil_beam import beamlet_dose, pencil_beam_dose

from tests.naive import pencil_beam as naive


@pytest.fixture(scope="module")
def case():
    g = Grid(shape=(8, 12, 12), spacing_mm=(12.0, 12.0, 10.0), origin_mm=(-66.0, -66.0, -35.0))
    rho = np.ones(g.shape)
    rho[:, :, :3] = 0.3  # a lung-like block on one side
    rho[:, :1, :] = 0.0012
    dens = ImageVolume(g, rho, "g/cm3", "mass density")
    target = Structure("PTV", g, ellipsoid_mask(g, (5.0, 0.0, 0.0), (25.0, 25.0, 18.0)), role="target")
    plan = HelicalPlan.covering(lambda n, m: np.ones((n, m)), 18.0, -18.0, field_width_mm=25.0, pitch=0.9,
                                gantry_period_s=15.0)
    rng = np.random.default_rng(11)
    sino = conformal_sinogram(plan, target) * rng.uniform(0.1, 1.0, (plan.n_projections, 64))
    plan = dataclasses.replace(plan, sinogram=sino)
    return dens, target, plan, sino


@pytest.fixture(scope="module")
def exact(case):
    """Threshold-0 matrix of the case (default beam model, 1 sub-sample)."""
    dens, target, plan, _ = case
    return influence_matrix(dens, plan, target=target, threshold=0.0, progress=False, return_beamlets=True)


@pytest.mark.parametrize("n_sub", [1, 2])
def test_matrix_times_sinogram_equals_full_dose(case, exact, n_sub):
    dens, target, plan, sino = case
    beam = BeamModel.default()
    full = pencil_beam_dose(dens, plan, beam, leaf_model="linear", n_subsamples=n_sub, progress=False)
    if n_sub == 1:
        m, (p, l) = exact
    else:
        m, (p, l) = influence_matrix(dens, plan, target=target, threshold=0.0, beam_model=beam,
                                     n_subsamples=n_sub, progress=False, return_beamlets=True)
    assert isinstance(m, sparse.csc_matrix) and m.dtype == np.float32
    assert m.shape == (dens.grid.n_voxels, p.size)
    assert m.has_sorted_indices
    approx = (m @ beamlet_weights(sino, p, l)).reshape(dens.grid.shape)
    assert full.max() > 0
    assert np.abs(approx - full).max() <= 1e-5 * full.max()


def test_beamlets_are_those_seeing_the_target(case):
    dens, target, plan, _ = case
    p, l = influence_beamlets(plan, target)
    assert np.all(np.diff(p * 64 + l) > 0)  # sorted by projection, then leaf
    from tomodose.delivery.beams_eye import leaves_seeing_structure

    seeing = leaves_seeing_structure(plan.projections(), target)
    assert p.size == seeing.sum() and np.all(seeing[p, l])


def test_column_equals_beamlet_dose(case, exact):
    dens, target, plan, _ = case
    m, (p, l) = exact
    b = p.size // 2
    ref = beamlet_dose(dens, plan, int(p[b]), int(l[b])).ravel()
    col = m[:, b].toarray().ravel()
    np.testing.assert_allclose(col, ref, rtol=1e-6, atol=1e-7 * ref.max())


def test_threshold_and_its_error(case, exact):
    dens, target, plan, sino = case
    m0, (p, l) = exact
    x = beamlet_weights(sino, p, l)
    exact = m0 @ x
    previous = None
    # the threshold cuts the water-equivalent dose (the entries before the medium factor)
    fm = naive.beam_medium_factor(dens.array, BeamModel.default()).ravel()
    m0_w = sparse.diags(1.0 / fm) @ m0
    for thr in (1e-3, DEFAULT_THRESHOLD):
        m = influence_matrix(dens, plan, target=target, threshold=thr, progress=False)
        # every kept entry is >= threshold x its column maximum, and none is invented
        cmax = m0_w.max(axis=0).toarray().ravel()
        for b in range(0, m.shape[1], max(1, m.shape[1] // 25)):
            col = m[:, b]
            assert np.all(col.data / fm[col.indices] >= thr * cmax[b] * (1 - 1e-6))
            np.testing.assert_allclose(col.toarray().ravel()[col.indices], m0[:, b].toarray().ravel()[col.indices],
                                       rtol=1e-6)
        # nothing above the threshold is missed by the evaluation windows (water/lung case; the
        # reach is computed in water, so a small margin of 2 x threshold is allowed for the lung)
        for b in range(0, m.shape[1], max(1, m.shape[1] // 25)):
            full_col = m0_w[:, b].toarray().ravel()
            big = np.flatnonzero(full_col >= 2 * thr * cmax[b])
            assert np.all(np.isin(big, m[:, b].indices))
        approx = m @ x
        deficit = (exact - approx)[target.mask.ravel()]
        assert np.all(deficit >= -1e-6 * exact.max())  # dropping entries only lowers the dose
        rel = deficit.mean() / exact[target.mask.ravel()].mean()
        assert rel < 0.25
        if previous is not None:
            assert m.nnz <= previous
        previous = m.nnz


def test_far_field_restores_the_dropped_scatter(case, exact):
    dens, target, plan, sino = case
    m0, (p, l) = exact
    x = beamlet_weights(sino, p, l)
    full = m0 @ x
    m = influence_matrix(dens, plan, target=target, threshold=DEFAULT_THRESHOLD, progress=False)
    near = m @ x
    far = far_field_operator(dens, plan, m, p, l, step=2, progress=False)
    assert far.values.shape == (far.node_flat.size, p.size) and far.interp.shape == (dens.grid.n_voxels,
                                                                                      far.node_flat.size)
    both = near + far.dose(x)
    t = target.mask.ravel()
    err_near = abs((near - full)[t].mean()) / full[t].mean()
    err_both = abs((both - full)[t].mean()) / full[t].mean()
    assert err_both < 0.02 and err_both < 0.5 * err_near
    assert np.abs(both - full).max() < 0.05 * full.max()
    # at the nodes themselves near + far is the full dose (interpolation is exact there)
    np.testing.assert_allclose(both[far.node_flat], full[far.node_flat], rtol=1e-4, atol=1e-6 * full.max())
    with pytest.raises(ValueError, match="step must be"):
        far_field_operator(dens, plan, m, p, l, step=0, progress=False)
    with pytest.raises(ValueError, match="matrix must have shape"):
        far_field_operator(dens, plan, m[:, :3], p, l, progress=False)


@pytest.mark.parametrize("n_sub", [1, 2])
def test_clustered_columns_equal_per_beamlet_columns(case, n_sub):
    """The default (angle-clustered) evaluation and the per-beamlet one: same model, same windows,
    same threshold: the same sparsity pattern and the same values to rounding."""
    dens, target, plan, _ = case
    kw = dict(target=target, threshold=DEFAULT_THRESHOLD, n_subsamples=n_sub, progress=False)
    a = influence_matrix(dens, plan, method="clustered", **kw)
    b = influence_matrix(dens, plan, method="beamlet", **kw)
    assert np.array_equal(a.indptr, b.indptr)
    assert np.array_equal(a.indices, b.indices)
    np.testing.assert_allclose(a.data, b.data, rtol=1e-6, atol=1e-7 * b.data.max())


def test_clustered_columns_match_naive_twin():
    """cluster_column_entries + threshold_columns vs the NumPy twin (exact error functions,
    beamlet by beamlet) on a tiny grid: 2 sub-samples, so columns merge entries of two clusters."""
    from tomodose.transport.influence import beamlet_reach_mm
    from tomodose.transport.pencil_beam import _resolve

    rng = np.random.default_rng(5)
    g = Grid(shape=(4, 6, 5), spacing_mm=(9.0, 9.0, 7.0), origin_mm=(-18.0, -22.5, -10.5))
    rho = rng.uniform(0.2, 1.8, g.shape)
    dens = ImageVolume(g, rho, "g/cm3", "mass density")
    target = Structure("T", g, ellipsoid_mask(g, (0.0, 0.0, 0.0), (8.0, 8.0, 6.0)), role="target")
    from tomodose.delivery.plan import ProjectionSequence

    # two beam orientations, three and two couch positions each (clusters of several projections)
    seq = ProjectionSequence(gantry_angle_deg=[10.0, 10.0, 10.0, 200.0, 200.0], couch_mm=[-4.0, 0.0, 4.0, -3.0, 3.0],
                             leaf_open_fraction=np.ones((5, 64)), duration_s=[0.3, 0.4, 0.5, 0.3, 0.2],
                             field_width_mm=25.0, arc_deg=[7.0] * 5, couch_travel_mm=[1.0] * 5)
    beam = BeamModel.default()
    thr = 1e-2
    m, (p, l) = influence_matrix(dens, seq, target=target, threshold=thr, n_subsamples=2, beam_model=beam,
                                 progress=False, return_beamlets=True)
    assert 0 < p.size < 60
    eng = _resolve(dens, seq, beam, None, 2, 0.05, None)
    r_u, r_v = beamlet_reach_mm(eng, thr)
    k = eng.kernel
    maps = [eng.depth_map(int(eng.proj_group[q])).transpose(2, 0, 1) for q in eng.proj]
    fm = naive.beam_medium_factor(rho, beam)
    ref = naive.influence_columns(rho, g.origin_mm, g.spacing_mm, eng.src, eng.xg, eng.yg, eng.zg, eng.dt, maps,
                                  eng.proj, list(zip(p, l)), seq.machine.leaf_centres_mm(), r_u=r_u,
                                  half_v=eng.jaw_h, r_v=r_v, threshold=thr, sad=850.0, sigma_mm=k.sigma_mm,
                                  depth_mm=k.depth_mm, amplitude_cm2_g=k.amplitude_cm2_g, e0=eng.e0, w=eng.w,
                                  s_leaf=eng.s_leaf, jaw_h=eng.jaw_h, s_jaw=eng.s_jaw, offc=eng.offc, soft=eng.soft,
                                  rho_floor=0.05, voxel_average=True,
                                  zcol=naive.medium_column_ends(rho, g.origin_mm, g.spacing_mm), medium_factor=fm,
                                  **naive.exit_keywords(eng, rho * fm, g),
                                  **naive.lateral_keywords(eng, rho * fm, g, eng.kernel.sigma_mm))
    # the threshold cuts the water-equivalent dose (before the medium factor): compared in those units
    got = m.toarray() / fm.ravel()[:, None]
    ref = ref / fm.ravel()[:, None]
    cmax = ref.max(axis=0)
    assert np.all(cmax > 0)
    # values: lookup tables vs exact error functions; entries near the cut may fall on either side
    # (kept by one, dropped by the other): compared where both keep them, and away from the cut
    near_cut = np.abs(np.where(got > 0, got, ref) - thr * cmax) < 3e-3 * cmax
    both = (got > 0) & (ref > 0)
    np.testing.assert_allclose(got[both | ~near_cut], ref[both | ~near_cut], rtol=0, atol=3e-3 * cmax.max())
    assert np.array_equal((got > 0) | near_cut, (ref > 0) | near_cut)


def test_chunking_and_threads_do_not_change_the_matrix(case):
    import numba

    dens, target, plan, _ = case
    a = influence_matrix(dens, plan, target=target, threshold=DEFAULT_THRESHOLD, chunk_beamlets=37, progress=False)
    n = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        b = influence_matrix(dens, plan, target=target, threshold=DEFAULT_THRESHOLD, chunk_beamlets=10_000,
                             progress=False)
    finally:
        numba.set_num_threads(n)
    assert np.array_equal(a.indptr, b.indptr)
    assert np.array_equal(a.indices, b.indices)
    assert np.array_equal(a.data, b.data)


def test_hdf5_roundtrip(case, tmp_path):
    import h5py

    dens, target, plan, _ = case
    m, (p, l) = influence_matrix(dens, plan, target=target, progress=False, return_beamlets=True)
    path = tmp_path / "influence.h5"
    with h5py.File(path, "w") as f:
        write_influence(f, "ptv", m, p, l, threshold=DEFAULT_THRESHOLD, metadata={"target": "PTV"})
    with h5py.File(path, "r") as f:
        m2, p2, l2, attrs = read_influence(f["ptv"])
        with pytest.raises(ValueError, match="not an influence matrix"):
            read_influence(f["ptv/matrix"])
    assert (m2 != m).nnz == 0 and m2.dtype == np.float32
    assert np.array_equal(p2, p) and np.array_equal(l2, l)
    assert attrs["threshold"] == DEFAULT_THRESHOLD and attrs["metadata"] == {"target": "PTV"}


def test_results_file_extra_roundtrip(case, tmp_path):
    """The matrix also travels in the results file's free-form section (FOUNDATION's writer)."""
    from tomodose.io.hdf5 import read_results, write_results

    dens, target, plan, _ = case
    m = influence_matrix(dens, plan, target=target, progress=False)
    path = write_results(tmp_path / "r.h5", plan=plan, extra={"influence_ptv": m})
    back = read_results(path).extra["influence_ptv"]
    assert (sparse.csc_matrix(back) != m).nnz == 0


def test_bad_inputs(case):
    dens, target, plan, _ = case
    with pytest.raises(ValueError, match="threshold must be"):
        influence_matrix(dens, plan, target=target, threshold=1.0, progress=False)
    with pytest.raises(ValueError, match="threshold"):
        influence_matrix(dens, plan, target=target, threshold=-0.1, progress=False)
    with pytest.raises(ValueError, match="chunk_beamlets"):
        influence_matrix(dens, plan, target=target, chunk_beamlets=0, progress=False)
    with pytest.raises(ValueError, match="method must be 'clustered' or 'beamlet'"):
        influence_matrix(dens, plan, target=target, method="fast", progress=False)
    with pytest.raises(TypeError, match="needs a PatientModel"):
        influence_matrix(dens, plan, target="PTV", progress=False)
    with pytest.raises(TypeError, match="target must be"):
        influence_matrix(dens, plan, target=3, progress=False)
    with pytest.raises(TypeError, match="projections_or_plan"):
        influence_matrix(dens, np.ones((3, 64)), target=target, progress=False)
    with pytest.raises(ValueError, match="margin_mm"):
        influence_matrix(dens, plan, target=target, margin_mm=-1.0, progress=False)
    m = influence_matrix(dens, plan, target=target, progress=False)
    with pytest.raises(ValueError, match="projection and leaf"):
        import h5py
        import io

        with h5py.File(io.BytesIO(), "w") as f:
            write_influence(f, "x", m, np.zeros(2), np.zeros(2))
