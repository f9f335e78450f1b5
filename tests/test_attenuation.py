"""Shipped NIST attenuation table, log-log interpolation, density -> material mixing rule."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tomodose.terma import DENSITY_ANCHORS, attenuation_table, material_weights
from tomodose.terma.attenuation import interpolate_loglog


def test_spot_values():
    t = attenuation_table()
    assert t.mu_rho("water", 1.0) == pytest.approx(0.07072)
    assert t.mu_en_rho("water", 1.0) == pytest.approx(0.03103)
    assert t.mu_rho("bone", 6.0) > t.mu_rho("water", 6.0) * 0.9
    assert set(n for n, _ in DENSITY_ANCHORS) <= set(t.materials)


def test_loglog_interpolation_between_nodes():
    t = attenuation_table()
    e = 1.1
    expected = np.exp(np.interp(np.log(e), np.log([1.0, 1.25]), np.log([0.07072, 0.06323])))
    assert t.mu_rho("water", e) == pytest.approx(expected, rel=1e-12)
    assert interpolate_loglog([1.0, 10.0], [1.0, 100.0], 3.0) == pytest.approx(9.0)


def test_unknown_material():
    with pytest.raises(ValueError, match="material must be one of"):
        attenuation_table().mu_rho("unobtainium", 1.0)


def test_table_equals_nist_source(shared_data):
    folder = shared_data / "dose_physics" / "attenuation"
    t = attenuation_table()
    stems = {"air": "air", "lung": "lung", "adipose": "adipose", "water": "water", "soft_tissue": "tissue",
             "bone": "bone"}
    for name, stem in stems.items():
        rows = [ln.split(",") for ln in (folder / f"nist_xaamdi_{stem}.csv").read_text().splitlines()
                if ln and not ln.startswith("#")]
        src = np.array(rows, dtype=float)
        sel = src[(src[:, 0] >= 0.03 - 1e-12) & (src[:, 0] <= 10.0 + 1e-12)]
        np.testing.assert_allclose(t.energies_mev[name], sel[:, 0], rtol=1e-4)
        np.testing.assert_allclose(t.mu_rho_cm2_g[name], sel[:, 1], rtol=1e-4)
        np.testing.assert_allclose(t.mu_en_rho_cm2_g[name], sel[:, 2], rtol=1e-4)


def test_material_rule_anchor_points():
    anchors = np.array([d for _, d in DENSITY_ANCHORS])
    w = material_weights(anchors)
    np.testing.assert_array_equal(w, np.eye(len(anchors)))
    below_above = material_weights(np.array([0.0, 3.0]))
    assert below_above[0, 0] == 1.0 and below_above[1, -1] == 1.0
    mid = material_weights(np.array([1.03]))[0]
    np.testing.assert_allclose(mid[3:5], [0.5, 0.5])


@settings(max_examples=50, deadline=None)
@given(st.floats(0.0, 3.0))
def test_material_weights_partition_of_unity(rho):
    w = material_weights(np.array([rho]))[0]
    assert w.sum() == pytest.approx(1.0)
    assert np.count_nonzero(w) <= 2
    nz = np.flatnonzero(w)
    assert nz.size == 1 or nz[1] - nz[0] == 1


def test_material_weights_bad_input():
    with pytest.raises(ValueError, match="mass_density_g_cm3 must be >= 0"):
        material_weights(np.array([-0.1]))
    with pytest.raises(ValueError, match="finite"):
        material_weights(np.array([np.nan]))


def test_mu_rho_ratio_to_water_matches_twin_and_pins_values():
    """The spectrum-averaged mu/rho ratio (pencil-beam medium factor) against the voxel-by-voxel
    NumPy twin; water exactly 1; Compton-dominated 6 MV values: bone about 6 % below water (fewer
    electrons per gram), lung and soft tissue within 1 %."""
    from tests.naive.pencil_beam import medium_factor
    from tomodose.terma.attenuation import mu_rho_ratio_to_water
    from tomodose.terma.spectrum import default_spectrum

    s = default_spectrum()
    rng = np.random.default_rng(3)
    rho = np.concatenate([rng.uniform(0.0, 2.2, 40), [0.0, 0.0012, 0.26, 0.95, 1.0, 1.06, 1.92, 2.5]])
    got = mu_rho_ratio_to_water(rho, s.energies_mev, s.energy_fluence)
    np.testing.assert_allclose(got, medium_factor(rho, s.energies_mev, s.energy_fluence), rtol=1e-12)
    assert mu_rho_ratio_to_water(np.ones((2, 3)), s.energies_mev, s.energy_fluence).tolist() == [[1.0] * 3] * 2
    lung, tissue, bone = mu_rho_ratio_to_water([0.26, 1.06, 1.92], s.energies_mev, s.energy_fluence)
    assert 0.98 < lung < 1.0 and 0.98 < tissue < 1.0 and 0.92 < bone < 0.96
    # a harder spectrum (6 MeV only) raises bone's pair production: closer to water than at 1 MeV
    b6 = mu_rho_ratio_to_water([1.92], [6.0], [1.0])[0]
    b1 = mu_rho_ratio_to_water([1.92], [1.0], [1.0])[0]
    assert b1 < b6


def test_mu_rho_ratio_to_water_bad_input():
    from tomodose.terma.attenuation import mu_rho_ratio_to_water

    with pytest.raises(ValueError, match="energy_fluence must not be all zero"):
        mu_rho_ratio_to_water([1.0], [1.0, 2.0], [0.0, 0.0])
    with pytest.raises(ValueError, match="energy_fluence"):
        mu_rho_ratio_to_water([1.0], [1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="mass_density_g_cm3"):
        mu_rho_ratio_to_water([-1.0], [1.0], [1.0])
