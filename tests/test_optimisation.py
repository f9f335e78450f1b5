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
    with pytest.raises(ValueError, match="correction_iterations must be a positive integer, got 1.5"):
        OptimisationSettings(correction_iterations=1.5)
    with pytest.raises(ValueError, match="correction_rounds must be an integer >= 0, got -1"):
        OptimisationSettings(correction_rounds=-1)
    with pytest.raises(ValueError, match="reweight_factor must be >= 1, got 0.5"):
        OptimisationSettings(reweight_factor=0.5)
    with pytest.raises(ValueError, match="max_weight_factor must be >= 1, got 0"):
        OptimisationSettings(max_weight_factor=0)
    with pytest.raises(ValueError, match="reweight_margin"):
        OptimisationSettings(reweight_margin=2.0)


def test_relative_margin_and_plan_score():
    from tomodose.evaluation.protocol import ConstraintResult
    from tomodose.optimisation.sinogram import _plan_score, _relative_margin

    def res(cid, value, op, hard, goal=None, unit="Gy", verdict="pass"):
        m = (lambda lim: None if lim is None else (lim - value if op in ("<", "<=") else value - lim))
        return ConstraintResult(cid, "S", "Dmean", unit, op, goal, hard, value, m(goal), m(hard), verdict, False, "")

    # upper limit: margin / limit, the tighter of goal and hard
    assert _relative_margin(res("a", 7.6, "<", 8.0)) == pytest.approx(0.05)
    assert _relative_margin(res("b", 14.0, "<=", 18.0, goal=12.0, verdict="goal missed")) == pytest.approx(-2 / 12)
    # coverage (lower limit on a volume percentage): share of the allowed under-covered volume left
    assert _relative_margin(res("c", 99.0, ">=", 97.0, unit="%")) == pytest.approx(2 / 3)
    assert _relative_margin(res("d", 5.0, None, None)) is None

    class Ev:
        def __init__(self, results):
            self.results = results

        def counts(self):
            out = {}
            for r in self.results:
                out[r.verdict] = out.get(r.verdict, 0) + 1
            return out

    good = Ev([res("a", 7.0, "<", 8.0), res("x", 8.5, "<", 8.0, verdict="hard limit failed")])
    bad = Ev([res("a", 8.2, "<", 8.0, verdict="hard limit failed")])
    # only the steerable constraints enter the margins; hard failures are counted over all rows
    assert _plan_score(good, 0.03, {"a"}) == (1, 0, 0, -0.125)
    assert _plan_score(bad, 0.03, {"a"}) > _plan_score(Ev([res("a", 7.9, "<", 8.0)]), 0.03, {"a"})


def test_build_terms_link_protocol_constraints_and_normalisation_scale():
    from tomodose.evaluation.protocol import evaluate_protocol, load_protocol
    from tomodose.geometry.grid import ImageVolume
    from tomodose.optimisation import build_terms, normalisation_scale
    from tomodose.phantoms import load_phantom

    pat = load_phantom("liver_default", spacing_mm=10.0, noise_hu=0.0)
    proto = load_protocol()
    voxels, terms = build_terms(proto, pat.structures, OptimisationSettings())
    by = {t.name.split()[0] + " " + t.kind: t for t in terms}
    assert by["PGTV under"].constraints == ("PGTV_coverage", "PGTV_underdose")
    assert by["PTV under"].constraints == ("PTV_coverage", "PTV_underdose")
    assert by["NormalLiver mean"].constraints == ("NormalLiver_mean",)
    assert by["ProtectedLiver mean"].constraints == ("ProtectedLiver_mean",)
    assert all(t.rows.max() < voxels.size for t in terms)
    # a smooth dose peaked on the target: after normalisation the coverage rule holds (96.5 % aimed)
    x, y, z = pat.grid.meshgrid_mm()
    c = pat.structures["PGTV"].centroid_mm()
    r2 = (x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2
    dose = ImageVolume(pat.grid, np.broadcast_to(40.0 * np.exp(-r2 / (2 * 40.0**2)), pat.grid.shape).astype(np.float32),
                       "Gy", "dose")
    s = normalisation_scale(proto, dose, pat.structures)
    ev = evaluate_protocol(proto, dose.with_array(dose.array * s), pat.structures, radiobiology=False)
    cov = next(r for r in ev.results if r.id == "PGTV_coverage")
    assert 96.0 < cov.value <= 100.0


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


# --- the protocol on the phantom configurations (the acceptance check, coarse grid) -------------
#: Coarse grid of the configuration test; docs/optimisation.md holds the 5 mm table of
#: examples/protocol_configurations.py.
CONFIG_SPACING_MM = 8.0
#: Configurations that cannot pass and the constraints they miss (docs/optimisation.md says why).
CANNOT_PASS: dict = {"liver_large": ("NormalLiver_mean", "ProtectedLiver_mean")}


@pytest.mark.slow
@pytest.mark.parametrize("name", [
    "liver_default", "liver_small_far", "liver_near_stomach_heart", "liver_dome_lung",
    pytest.param("liver_large", marks=pytest.mark.xfail(
        "liver_large" in CANNOT_PASS, strict=True, raises=AssertionError,
        reason="8 cm target: see docs/optimisation.md (normal-liver budget)")),
])
def test_protocol_passes_on_configuration(name):
    from tomodose.demo import DemoConfig, plan_study
    from tomodose.evaluation.protocol import GOAL_MISSED, HARD_FAILED

    r = plan_study(DemoConfig(phantom=name, spacing_mm=CONFIG_SPACING_MM), progress=False)
    ev = r["evaluation"]
    assert r["summary"]["missing"] == []
    missed = sorted(x.id for x in ev.results if x.verdict in (HARD_FAILED, GOAL_MISSED))
    expected = sorted(CANNOT_PASS.get(name, ()))
    unexpected = sorted(set(missed) - set(expected))
    if unexpected:  # not an AssertionError: a configuration's undocumented failure is a real failure
        pytest.fail(f"{name}: constraints missed: {unexpected} "
                    f"({[(x.id, x.value, x.hard) for x in ev.results if x.id in unexpected]})")
    assert missed == [], f"{name}: documented failures {missed}"
    # the optimiser's record: monotonic first optimisation, every round evaluated on the collapsed cone
    h = r["summary"]["optimisation"]["objective_history"]
    assert all(b <= a + 1e-12 for a, b in zip(h, h[1:]))
    assert r["summary"]["optimisation"]["correction_rounds"][0]["pb_vs_ccc"]["PGTV"]["ccc_mean_gy"] > 0
