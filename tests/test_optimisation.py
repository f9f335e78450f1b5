import numpy as np
import pytest
from scipy import sparse

from tomodose.delivery.machine import TomoMachine
from tomodose.optimisation import OptimisationSettings, make_deliverable, optimise_sinogram
from tomodose.optimisation.objectives import Term, evaluate_terms


def _terms(n):
    rng = np.random.default_rng(0)
    rows = np.arange(n)
    return [
        Term("t under", "under", rows[: n // 2], rng.uniform(0.5, 1, n // 2), 10.0, 100.0),
        Term("oar over", "over", rows[n // 2:], rng.uniform(0.5, 1, n - n // 2), 3.0, 10.0),
        Term("oar mean", "mean", rows[n // 2:], np.ones(n - n // 2), 2.0, 10.0),
    ]


def test_objective_gradient_matches_finite_differences():
    n = 40
    terms = _terms(n)
    rng = np.random.default_rng(1)
    d = rng.uniform(0, 12, n)
    f, g, parts = evaluate_terms(terms, d)
    assert f == pytest.approx(sum(parts.values()))
    eps = 1e-6
    num = np.array([(evaluate_terms(terms, d + eps * e)[0] - evaluate_terms(terms, d - eps * e)[0]) / (2 * eps)
                    for e in np.eye(n)])
    np.testing.assert_allclose(g, num, rtol=1e-5, atol=1e-9)


def test_optimiser_respects_bounds_and_decreases_monotonically():
    rng = np.random.default_rng(2)
    n_vox, n_beam = 60, 25
    a = sparse.random(n_vox, n_beam, density=0.3, random_state=3, format="csr", dtype=np.float64) * 20
    x, history = optimise_sinogram(a, _terms(n_vox), max_iterations=50, progress=False)
    assert np.all((x >= 0) & (x <= 1))
    assert all(b <= a_ + 1e-12 for a_, b in zip(history, history[1:]))
    assert history[-1] < history[0]
    del rng


def test_make_deliverable_rules():
    m = TomoMachine()
    period = 20.0
    x = np.array([0.0, 0.01, 0.04, 0.3, 0.5, 0.9])
    x_new, p, rep = make_deliverable(x, projection_duration_s=period / 51, gantry_period_s=period, machine=m,
                                     modulation_factor_cap=10.0)
    x_min = m.min_leaf_open_time_s / (p / 51)
    # the longest opening fills the projection when the period can be shortened
    assert p == pytest.approx(max(m.gantry_period_range_s[0], 0.9 * period))
    assert x_new.max() == pytest.approx(min(1.0, 0.9 * period / p))
    # no opening shorter than the minimum leaf-open time remains
    assert np.all((x_new == 0) | (x_new >= x_min - 1e-12))
    assert rep["rounded_to_zero"] + rep["rounded_up"] >= 1
    # modulation-factor cap
    y = np.array([0.1, 0.1, 0.1, 1.0])
    y_new, _, rep2 = make_deliverable(y, projection_duration_s=period / 51, gantry_period_s=period, machine=m,
                                      modulation_factor_cap=1.5)
    assert rep2["modulation_factor"] <= 1.5 + 1e-9 and rep2["modulation_clipped_beamlets"] >= 1


def test_settings_bad_input():
    with pytest.raises(ValueError, match="modulation_factor_cap must be >= 1, got 0.5"):
        OptimisationSettings(modulation_factor_cap=0.5)
    with pytest.raises(ValueError, match="max_iterations must be a positive integer, got 0"):
        OptimisationSettings(max_iterations=0)


@pytest.mark.slow
def test_optimise_plan_on_coarse_liver_phantom():
    from tomodose.delivery.plan import HelicalPlan
    from tomodose.evaluation.protocol import load_protocol
    from tomodose.optimisation import optimise_plan
    from tomodose.phantoms import load_phantom

    pat = load_phantom("liver_default", spacing_mm=7.0)
    ptv = pat.structures["PTV"]
    zs = pat.grid.z_mm[np.any(ptv.mask, axis=(1, 2))]
    cx, cy, _ = ptv.centroid_mm()
    proto = load_protocol()
    tpl = HelicalPlan.covering(lambda n, m: np.ones((n, m)), zs.max(), zs.min(), field_width_mm=25.0, pitch=0.287,
                               gantry_period_s=20.0, isocentre_xy_mm=(cx, cy), n_fractions=10)
    plan, info = optimise_plan(pat, tpl, proto, settings=OptimisationSettings(max_iterations=60), progress=False)
    h = info["objective_history"]
    assert all(b <= a + 1e-12 for a, b in zip(h, h[1:])) and h[-1] < 0.2 * h[0]
    sino = plan.sinogram
    assert np.all((sino >= 0) & (sino <= 1))
    x_min = plan.machine.min_leaf_open_time_s / plan.projection_duration_s
    assert np.all((sino == 0) | (sino >= x_min - 1e-12))
    lo, hi = plan.machine.gantry_period_range_s
    assert lo <= plan.gantry_period_s <= hi


def test_far_field_gradient_consistent():
    rng = np.random.default_rng(4)
    n_vox, n_beam, n_nodes = 30, 12, 5
    a = sparse.random(n_vox, n_beam, density=0.4, random_state=5, format="csr") * 10
    interp = sparse.random(n_vox, n_nodes, density=0.5, random_state=6, format="csr")
    values = rng.uniform(0, 2, (n_nodes, n_beam))
    terms = _terms(n_vox)
    x, history = optimise_sinogram(a, terms, max_iterations=30, far_field=(interp, values), progress=False)
    assert np.all((x >= 0) & (x <= 1)) and history[-1] <= history[0]
    # the recorded objective is that of the full (near + far) dose
    f_full = evaluate_terms(terms, a @ x + interp @ (values @ x))[0]
    assert history[-1] == pytest.approx(f_full, rel=1e-9)
