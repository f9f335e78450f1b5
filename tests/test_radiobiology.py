"""Radiobiology worked examples computed by hand (tomodose.evaluation.radiobiology)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tomodose.evaluation import radiobiology as rb
from tomodose.evaluation.dvh import DVH
from tomodose.geometry.grid import Grid, ImageVolume
from tomodose.geometry.structures import Structure, StructureSet


def test_bed_eqd2_worked_example():
    # 50 Gy in 10 fractions, alpha/beta 10: BED = 50 (1 + 5/10) = 75; EQD2 = 75 / 1.2 = 62.5
    assert rb.bed(50.0, 10, 10.0) == pytest.approx(75.0)
    assert rb.eqd2(50.0, 10, 10.0) == pytest.approx(62.5)
    # 30 Gy in 10 fx, alpha/beta 3: BED = 30 (1 + 3/3) = 60; EQD2 = 60 / (5/3) = 36
    assert rb.bed(30.0, 10, 3.0) == pytest.approx(60.0)
    assert rb.eqd2(30.0, 10, 3.0) == pytest.approx(36.0)
    # 2 Gy fractions are their own EQD2
    assert rb.eqd2(60.0, 30, 2.5) == pytest.approx(60.0)


def test_eqd_1p5_for_dawson():
    # EQD_1.5 = D (d + a/b) / (1.5 + a/b): 50 Gy / 10 fx, a/b 2.5 -> 50 * 7.5 / 4 = 93.75
    assert rb.eqd_x(50.0, 10, 2.5, 1.5) == pytest.approx(93.75)


def test_arrays_broadcast():
    d = np.array([0.0, 10.0, 50.0])
    np.testing.assert_allclose(rb.bed(d, 10, np.array([10.0, 2.0, 10.0])), [0.0, 15.0, 75.0])


def test_isoeffective_threshold_hand_computed():
    # 15 Gy in 3 fx at a/b 2.5: BED = 15 (1 + 5/2.5) = 45. In 10 fx: D^2/25 + D - 45 = 0
    # -> D = (-25 + sqrt(625 + 4500)) / 2 = 23.2891
    assert rb.isoeffective_dose_gy(15.0, 3, 10, 2.5) == pytest.approx((-25 + math.sqrt(5125)) / 2)
    assert rb.isoeffective_dose_gy(20.0, 10, 10, 3.0) == pytest.approx(20.0)


def uniform_dvh(dose_gy, volume_ml=1000.0):
    return DVH.from_samples([dose_gy], [volume_ml], name="liver", bin_width_gy=0.001)


def test_lkb_ntcp_at_td50_is_half():
    # physical D in 10 fx with EQD_1.5 = 39.8 (a/b 2.5): D^2/10 + 2.5 D - 4 * 39.8 = 0
    d = (-2.5 + math.sqrt(2.5 ** 2 + 4 * 0.1 * 159.2)) / 0.2
    out = rb.lkb_ntcp(uniform_dvh(d), 10, parameters="primary", alpha_beta_gy=2.5)
    assert out["geud_gy"] == pytest.approx(39.8, abs=0.01)
    assert out["ntcp"] == pytest.approx(0.5, abs=0.002)
    met = rb.lkb_ntcp(uniform_dvh(d), 10, parameters="metastases")
    assert met["ntcp"] < 0.5 and met["td50_gy"] == 45.8


def test_lkb_ntcp_one_sigma():
    # gEUD = TD50 (1 + m) -> NTCP = Phi(1) = 0.8413; doses already at 1.5 Gy/fx (15 fractions
    # of 1.5 Gy... use n_fractions such that d = 1.5 Gy: D = 1.5 n)
    target = 39.8 * 1.12
    out = rb.lkb_ntcp(uniform_dvh(target), target / 1.5, parameters="primary")
    assert out["ntcp"] == pytest.approx(0.841345, abs=1e-3)


def test_geud():
    dvh = DVH.from_samples([10.0, 20.0], [1.0, 1.0], bin_width_gy=0.001)
    assert rb.geud(dvh, 1.0) == pytest.approx(15.0, abs=1e-3)
    assert rb.geud(dvh, 2.0) == pytest.approx(math.sqrt(250.0), abs=1e-3)
    assert rb.geud(dvh, 200.0) == pytest.approx(20.0, rel=0.01)
    with pytest.raises(ValueError, match="a must"):
        rb.geud(dvh, 0.0)


def test_critical_volume_rule():
    # 1000 mL: 600 mL at 10 Gy, 400 mL at 40 Gy; threshold 15 Gy / 3 fx -> 23.29 Gy in 10 fx
    dvh = DVH.from_samples([10.0, 40.0], [600.0, 400.0], bin_width_gy=0.01)
    res = rb.critical_volume_rule(dvh, 10)
    assert res.threshold_gy == pytest.approx((-25 + math.sqrt(5125)) / 2)  # 23.2946
    assert res.spared_volume_ml == pytest.approx(600.0)
    assert not res.passed
    res2 = rb.critical_volume_rule(dvh, 10, min_volume_ml=500.0)
    assert res2.passed
    res3 = rb.critical_volume_rule(dvh, 5, threshold_gy=15.0, threshold_fractions=5)
    assert res3.threshold_gy == pytest.approx(15.0)


def test_convert_dvh_to_eqd2():
    dvh = DVH.from_samples([50.0], [10.0], bin_width_gy=0.01)
    e = rb.convert_dvh(dvh, 10, 10.0)
    assert e.mean_gy == pytest.approx(62.5, abs=0.02)


def test_voxel_maps_and_alpha_beta_map():
    g = Grid((2, 2, 2), (1.0, 1.0, 1.0))
    dose = ImageVolume(g, np.full(g.shape, 50.0), "Gy", "dose")
    occ_t = np.zeros(g.shape, np.float32)
    occ_t[0] = 1
    occ_c = np.zeros(g.shape, np.float32)
    occ_c[1, 0] = 1
    ss = StructureSet(g, [Structure("SpinalCord", g, occ_c), Structure("GTV", g, occ_t, role="target")])
    ab = rb.alpha_beta_map(ss)
    assert ab[0].tolist() == [[10.0, 10.0], [10.0, 10.0]]
    assert ab[1, 0].tolist() == [2.0, 2.0] and ab[1, 1].tolist() == [3.0, 3.0]
    bed = rb.bed_volume(dose, 10, ab)
    assert bed.array[0, 0, 0] == pytest.approx(75.0) and bed.quantity == "BED"
    e = rb.eqd2_volume(dose, 10, ab)
    assert e.array[0, 0, 0] == pytest.approx(62.5)
    assert e.array[1, 0, 0] == pytest.approx(50 * (5 + 2) / 4)
    hbv = rb.alpha_beta_map(ss, {"SpinalCord": rb.ALPHA_BETA_LIVER_HBV_GY})
    assert hbv[1, 0, 0] == 8.0


@pytest.mark.parametrize("call,match", [
    (lambda: rb.bed(-1.0, 10, 10), "dose_gy"),
    (lambda: rb.bed(10.0, 0, 10), "n_fractions"),
    (lambda: rb.bed(10.0, 10, 0.0), "alpha_beta_gy"),
    (lambda: rb.eqd_x(10.0, 10, 3, 0.0), "reference_dose_per_fraction_gy"),
    (lambda: rb.lkb_ntcp(uniform_dvh(10), 10, parameters="bogus"), "bogus"),
    (lambda: rb.LKBParameters(0.97, 0.0, 39.8, 1.5), "m must"),
    (lambda: rb.critical_volume_rule(uniform_dvh(10), 10, min_volume_ml=0), "min_volume_ml"),
])
def test_bad_input(call, match):
    with pytest.raises((ValueError, TypeError, KeyError), match=match):
        call()
