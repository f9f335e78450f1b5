"""DVH and plan metrics on hand-computed cases (tomodose.evaluation.dvh / metrics)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tomodose.evaluation.dvh import DVH, compute_dvh, dvh_from_contours, refined_grid
from tomodose.evaluation.metrics import (
    evaluate_metric, gradient_index, homogeneity_index, isodose_volume_ml, paddick_conformity_index,
    parse_metric, r50,
)
from tomodose.geometry.grid import Grid, ImageVolume
from tomodose.geometry.structures import Structure

GRID = Grid((10, 10, 10), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))  # voxel 8 mm3 = 0.008 mL


def dose_of(arr, grid=GRID):
    return ImageVolume(grid, np.asarray(arr, float), "Gy", "dose")


def whole(grid=GRID, name="all"):
    return Structure(name, grid, np.ones(grid.shape, np.float32))


def test_uniform_dose_is_a_step():
    dvh = compute_dvh(dose_of(np.full(GRID.shape, 12.34)), whole())
    assert dvh.total_volume_ml == pytest.approx(1000 * 0.008)
    assert dvh.min_gy == dvh.max_gy == pytest.approx(12.34)
    assert dvh.mean_gy == pytest.approx(12.34)
    for p in (1, 50, 95, 99):
        assert dvh.dose_at_volume_percent(p) == pytest.approx(12.34)
    assert dvh.volume_at_dose_percent(12.33) == 100.0
    assert dvh.volume_at_dose_percent(12.35) == 0.0
    assert dvh.cumulative_percent[0] == 100.0
    assert dvh.differential_ml.sum() == pytest.approx(dvh.total_volume_ml)


@settings(max_examples=25, deadline=None)
@given(st.floats(0.05, 80.0), st.floats(0.001, 0.5))
def test_uniform_dose_step_property(level, bw):
    dvh = compute_dvh(dose_of(np.full(GRID.shape, level)), whole(), bin_width_gy=bw)
    assert dvh.dose_at_volume_percent(50) == pytest.approx(level)
    assert dvh.volume_at_dose_percent(level * 0.999) == 100.0
    assert dvh.volume_at_dose_percent(level * 1.001 + 1e-9) == 0.0


def test_fractional_occupancy_weights_hand_computed():
    occ = np.zeros(GRID.shape, np.float32)
    occ[0, 0, 0], occ[0, 0, 1] = 1.0, 0.5
    d = np.zeros(GRID.shape)
    d[0, 0, 0], d[0, 0, 1] = 10.0, 20.0
    dvh = compute_dvh(dose_of(d), Structure("s", GRID, occ))
    assert dvh.total_volume_ml == pytest.approx(1.5 * 0.008)
    assert dvh.mean_gy == pytest.approx((10 + 0.5 * 20) / 1.5)
    assert dvh.min_gy == 10.0 and dvh.max_gy == 20.0
    # one third of the volume at 20 Gy: V20Gy = 33.3 %, V(>10.005) = 33.3 %
    assert evaluate_metric(dvh, "V15Gy") == pytest.approx(100 / 3)
    assert evaluate_metric(dvh, "V15Gy[cc]") == pytest.approx(0.5 * 0.008)
    assert evaluate_metric(dvh, "Dmean") == pytest.approx(13.3333333)
    # D(1/3 of volume) = 20 Gy: within the top bin, interpolated; D(2/3) lies in the 10 Gy bin
    assert evaluate_metric(dvh, "D10%") == pytest.approx(20.0, abs=0.01)
    assert evaluate_metric(dvh, "D80%") == pytest.approx(10.0, abs=0.01)


def test_linear_gradient_metrics_interpolated_not_nearest_bin():
    # 1-D gradient along x: 10 slabs of doses 0.5, 1.5, ..., 9.5 Gy; supersampled to be continuous
    x = np.arange(10) + 0.5
    d = np.broadcast_to(x[None, None, :], GRID.shape).copy()
    dvh = compute_dvh(dose_of(d), whole(), supersample=1, bin_width_gy=0.5)
    # discrete: each dose holds 10 %; bins of 0.5 Gy -> doses sit at bin lower edges
    assert dvh.mean_gy == pytest.approx(5.0)
    # D50%: half the volume at >= 5.5 Gy; interpolation inside bin [5.5, 6.0) holds 10 %
    assert dvh.dose_at_volume_percent(50) == pytest.approx(5.5)
    assert dvh.dose_at_volume_percent(45) == pytest.approx(5.75)  # half-way through that bin
    assert dvh.volume_at_dose_percent(5.75) == pytest.approx(45.0)


def test_supersampling_makes_linear_dose_continuous():
    g = Grid((4, 4, 20), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    d = np.broadcast_to(np.arange(20.0)[None, None, :], g.shape).copy()  # D = x
    occ = np.zeros(g.shape, np.float32)
    occ[:, :, 5:15] = 1.0  # x voxels 5..14 -> x in [4.5, 14.5]
    s = Structure("s", g, occ)
    dvh = compute_dvh(dose_of(d, g), s, supersample=5, bin_width_gy=0.001)
    assert dvh.mean_gy == pytest.approx(9.5)
    assert dvh.min_gy == pytest.approx(4.6) and dvh.max_gy == pytest.approx(14.4)
    assert dvh.dose_at_volume_percent(50) == pytest.approx(9.5, abs=0.1)
    assert dvh.dose_at_volume_percent(95) == pytest.approx(4.5 + 0.05 * 10, abs=0.1)


def test_structure_on_finer_grid_uses_trilinear_dose():
    g = Grid((5, 5, 10), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    d = np.broadcast_to((2.0 * np.arange(10.0))[None, None, :], g.shape).copy()  # D = x (mm) Gy
    fine = refined_grid(g, (4.0, 2.0, 2.0), (12.0, 6.0, 6.0), 4)
    assert fine.spacing_mm == (0.5, 0.5, 0.5)
    s = Structure("fine", fine, np.ones(fine.shape, np.float32))
    dvh = compute_dvh(dose_of(d, g), s)
    xs = fine.x_mm
    assert dvh.mean_gy == pytest.approx(xs.mean())
    assert dvh.min_gy == pytest.approx(xs.min()) and dvh.max_gy == pytest.approx(xs.max())


def test_dvh_from_contours_cube_in_linear_dose():
    g = Grid((20, 20, 20), (2.0, 2.0, 2.0), (-19.0, -19.0, -19.0))
    x, _, _ = g.meshgrid_mm()
    d = np.broadcast_to(20.0 + x, g.shape).copy()  # 1 Gy/mm along x
    planes = [np.array([[-5, -5, z], [5, -5, z], [5, 5, z], [-5, 5, z]], float) for z in np.arange(-4.5, 4.51, 1.0)]
    dvh = dvh_from_contours(dose_of(d, g), planes, name="cube", resolution_mm=0.25)
    assert dvh.total_volume_ml == pytest.approx(1.0, rel=1e-3)  # 10 x 10 x 10 mm with end caps
    assert dvh.mean_gy == pytest.approx(20.0, abs=0.01)
    assert dvh.dose_at_volume_percent(95) == pytest.approx(15.5, abs=0.05)
    assert dvh.dose_at_volume_percent(5) == pytest.approx(24.5, abs=0.05)
    assert dvh.dose_at_volume_ml(0.03) == pytest.approx(24.7, abs=0.05)


@pytest.mark.parametrize("text,kind,value,unit", [
    ("D95%", "dose_at_percent", 95.0, "Gy"),
    ("D0.03cc", "dose_at_cc", 0.03, "Gy"),
    ("D0.5 cc", "dose_at_cc", 0.5, "Gy"),
    ("d2%", "dose_at_percent", 2.0, "Gy"),
    ("V20Gy", "volume_at_gy", 20.0, "%"),
    ("V20Gy[cc]", "volume_at_gy", 20.0, "cc"),
    ("V20Gy[%]", "volume_at_gy", 20.0, "%"),
    ("V95%Rx", "volume_at_rx_percent", 95.0, "%"),
    ("Dmean", "mean", None, "Gy"),
    ("Dmax", "max", None, "Gy"),
    ("D95%[%Rx]", "dose_at_percent", 95.0, "%Rx"),
    ("Volume", "volume", None, "cc"),
])
def test_parse_metric(text, kind, value, unit):
    m = parse_metric(text)
    assert (m.kind, m.value, m.unit) == (kind, value, unit)


@pytest.mark.parametrize("bad", ["D", "D95", "Dfoo", "V20", "X20Gy", "D120%", "", "V20Gy[kg]"])
def test_parse_metric_errors(bad):
    with pytest.raises(ValueError, match="metric"):
        parse_metric(bad)


def test_metric_needing_prescription():
    dvh = compute_dvh(dose_of(np.full(GRID.shape, 50.0)), whole())
    with pytest.raises(ValueError, match="prescription"):
        evaluate_metric(dvh, "V95%Rx")
    assert evaluate_metric(dvh, "V95%Rx", prescription_gy=50.0) == 100.0
    assert evaluate_metric(dvh, "Dmean[%Rx]", prescription_gy=40.0) == pytest.approx(125.0)


def test_indices_hand_computed():
    d = np.zeros(GRID.shape)
    target = np.zeros(GRID.shape, np.float32)
    target[3:7, 3:7, 3:7] = 1  # 64 voxels
    d[2:8, 3:7, 3:7] = 50.0  # PIV 96 voxels, covers the target
    d[1:9, 2:8, 2:8] = np.where(d[1:9, 2:8, 2:8] > 0, 50.0, 25.0)  # 50 % isodose: 8*6*6 = 288 voxels
    dose, t = dose_of(d), Structure("PTV", GRID, target)
    vv = GRID.voxel_volume_ml
    assert isodose_volume_ml(dose, 50.0) == pytest.approx(96 * vv)
    assert paddick_conformity_index(dose, t, 50.0) == pytest.approx(64 ** 2 / (64 * 96))
    assert gradient_index(dose, 50.0) == pytest.approx(288 / 96)
    assert r50(dose, t, 50.0) == pytest.approx(288 / 64)
    body = Structure("Body", GRID, np.pad(np.ones((10, 10, 5), np.float32), ((0, 0), (0, 0), (0, 5))))
    assert isodose_volume_ml(dose, 50.0, body) == pytest.approx(6 * 4 * 2 * vv)  # x < 5 only


def test_homogeneity_index():
    d = np.broadcast_to(np.arange(10.0)[None, None, :] + 45, GRID.shape).copy()
    dvh = compute_dvh(dose_of(d), whole(), supersample=4, bin_width_gy=0.001)
    hi = homogeneity_index(dvh)
    d2, d98, d50 = (dvh.dose_at_volume_percent(p) for p in (2, 98, 50))
    assert hi == pytest.approx((d2 - d98) / d50)
    assert d50 == pytest.approx(49.5, abs=0.25)  # discrete sub-sample doses 0.25 Gy apart


def test_dvh_table_and_dict():
    dvh = compute_dvh(dose_of(np.full(GRID.shape, 3.0)), whole())
    t = dvh.to_dict(step_gy=1.0)
    assert t["cumulative"]["dose_gy"][:4] == [0.0, 1.0, 2.0, 3.0]
    assert t["cumulative"]["volume_percent"][:3] == [100.0, 100.0, 100.0]


# --- bad input -------------------------------------------------------------------------------
def test_empty_structure():
    with pytest.raises(ValueError, match="empty"):
        compute_dvh(dose_of(np.ones(GRID.shape)), Structure("e", GRID, np.zeros(GRID.shape)))


def test_structure_outside_dose_grid():
    far = Grid((4, 4, 4), (1.0, 1.0, 1.0), (100.0, 100.0, 100.0))
    with pytest.raises(ValueError, match="outside the dose grid"):
        compute_dvh(dose_of(np.ones(GRID.shape)), whole(far, "far"))


def test_structure_partly_outside_allowed_drops_part(caplog):
    part = Grid((10, 10, 20), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))  # x beyond the dose grid
    with pytest.raises(ValueError, match="outside"):
        compute_dvh(dose_of(np.ones(GRID.shape)), whole(part))
    dvh = compute_dvh(dose_of(np.ones(GRID.shape)), whole(part), allow_outside=True)
    assert dvh.total_volume_ml == pytest.approx(1000 * 0.008)
    assert "left out" in caplog.text


def test_mismatching_grids_in_indices():
    other = Grid((10, 10, 10), (2.0, 2.0, 2.0), (1.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="same grid"):
        paddick_conformity_index(dose_of(np.ones(GRID.shape)), whole(other), 1.0)


def test_dose_unit_and_sign():
    with pytest.raises(ValueError, match="Gy"):
        compute_dvh(ImageVolume(GRID, np.ones(GRID.shape), "cGy"), whole())
    with pytest.raises(ValueError, match=">= 0"):
        compute_dvh(dose_of(-np.ones(GRID.shape)), whole())
    with pytest.raises(ValueError, match="bin_width_gy"):
        compute_dvh(dose_of(np.ones(GRID.shape)), whole(), bin_width_gy=0)
    with pytest.raises(ValueError, match="supersample"):
        compute_dvh(dose_of(np.ones(GRID.shape)), whole(), supersample=0)
    with pytest.raises(TypeError, match="Structure"):
        compute_dvh(dose_of(np.ones(GRID.shape)), np.ones(GRID.shape))


def test_dvh_from_samples_and_bad_percent():
    dvh = DVH.from_samples([1.0, 2.0, 3.0], [1.0, 1.0, 2.0], name="x")
    assert dvh.mean_gy == pytest.approx(9 / 4)
    with pytest.raises(ValueError, match="percent"):
        dvh.dose_at_volume_percent(120)
    with pytest.raises(ValueError, match="empty"):
        DVH.from_samples([1.0], [0.0])


def test_dvh_from_contours_outside_grid():
    planes = [np.array([[500, 500, z], [510, 500, z], [510, 510, z]], float) for z in (0.0, 2.0)]
    with pytest.raises(ValueError, match="outside the dose grid"):
        dvh_from_contours(dose_of(np.ones(GRID.shape)), planes, name="far")


def test_vectorised_volumes_match_scalar():
    rng = np.random.default_rng(3)
    dvh = DVH.from_samples(rng.uniform(0, 60, 5000), rng.uniform(0.1, 1.0, 5000))
    doses = np.linspace(-1.0, 62.0, 500)
    np.testing.assert_allclose(dvh.volumes_at_doses_ml(doses), [dvh.volume_at_dose_ml(d) for d in doses])


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([1, 2]))
def test_dvh_invariants_property(seed, supersample):
    rng = np.random.default_rng(seed)
    g = Grid((4, 5, 6), (1.5, 2.0, 2.5), (-3.0, 1.0, 7.0))
    d = rng.uniform(0, 70, g.shape) * (rng.uniform(size=g.shape) > 0.2)
    occ = rng.uniform(0, 1, g.shape).astype(np.float32)
    occ[0, 0, 0] = 1.0
    s = Structure("s", g, occ)
    dvh = compute_dvh(dose_of(d, g), s, supersample=supersample)
    assert dvh.total_volume_ml == pytest.approx(s.volume_ml, rel=1e-6)
    cum = dvh.cumulative_ml
    assert np.all(np.diff(cum) <= 1e-12) and cum[0] == pytest.approx(dvh.total_volume_ml)
    assert dvh.min_gy - 1e-12 <= dvh.mean_gy <= dvh.max_gy + 1e-12
    if supersample == 1:
        w = occ.astype(np.float64)
        assert dvh.mean_gy == pytest.approx(float((d * w).sum() / w.sum()), rel=1e-9)
    ps = np.array([1, 2, 5, 50, 95, 98, 99])
    ds = [dvh.dose_at_volume_percent(p) for p in ps]
    assert np.all(np.diff(ds) <= 1e-9)  # more volume -> lower dose
