import logging

import numpy as np
import pytest

from tomodose.geometry.density import (
    DensityTable,
    Z_OVER_A_WATER,
    hu_to_mass_density,
    hu_to_relative_electron_density,
    mass_density_to_hu,
)


def test_default_table_points_and_interpolation():
    t = DensityTable.default()
    assert t.hu[0] == -1000 and t.hu[-1] == 3000
    np.testing.assert_allclose(hu_to_mass_density([-1000, -100, 0, 40, 1000, 3000]),
                               [0.0012, 0.95, 1.0, 1.05, 1.6, 2.8])
    # halfway between 0 (1.0) and 40 HU (1.05)
    assert hu_to_mass_density(20.0) == pytest.approx(1.025)
    # water has RED 1 exactly; lung (-750 HU) between its table neighbours
    assert hu_to_relative_electron_density(0.0) == pytest.approx(1.0)
    red_lung = hu_to_relative_electron_density(-750.0)
    assert 0.2 < red_lung < 0.3
    # bone RED is below its mass density (Z/A of bone < water)
    assert hu_to_relative_electron_density(1000.0) < hu_to_mass_density(1000.0)
    assert Z_OVER_A_WATER == pytest.approx(0.555, abs=1e-3)


def test_shape_preserved_and_monotone():
    hu = np.linspace(-1000, 3000, 60).reshape(3, 4, 5)
    rho = hu_to_mass_density(hu)
    assert rho.shape == hu.shape
    assert np.all(np.diff(rho.ravel()) >= 0)


def test_clamping_rule_warns_with_count(caplog):
    with caplog.at_level(logging.WARNING, logger="tomodose.geometry.density"):
        rho = hu_to_mass_density(np.array([-1200.0, -1024.0, 0.0, 3500.0]))
    np.testing.assert_allclose(rho, [0.0012, 0.0012, 1.0, 2.8])
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "2 value(s) below -1000 HU" in msg and "1 above 3000 HU" in msg and "clamped" in msg


def test_no_warning_inside_range(caplog):
    with caplog.at_level(logging.WARNING, logger="tomodose.geometry.density"):
        hu_to_mass_density(np.array([-1000.0, 3000.0]))
    assert not caplog.records


def test_inverse_round_trip():
    hu = np.array([-1000, -800, -500, -100, 0, 20, 40, 700, 1000, 3000.0])
    np.testing.assert_allclose(mass_density_to_hu(hu_to_mass_density(hu)), hu, atol=1e-9)


def test_user_table_from_arrays_and_derived_red():
    t = DensityTable.from_arrays([-1000, 0, 2000], [0.001, 1.0, 2.0], [0.001, 1.0, 1.9], name="mine")
    assert hu_to_mass_density(1000, t) == pytest.approx(1.5)
    assert hu_to_relative_electron_density(1000, t) == pytest.approx(1.45)
    t2 = DensityTable.from_arrays([-1000, 0, 1000], [0.0012, 1.0, 1.6])
    np.testing.assert_allclose(t2.relative_electron_density, DensityTable.default().electron_density([-1000, 0, 1000]))


def test_user_table_from_file(tmp_path):
    p = tmp_path / "ct.txt"
    p.write_text("# my scanner\nHU, density, RED\n-1000, 0.001, 0.001\n0, 1.0, 1.0\n1500, 1.9, 1.8\n")
    t = DensityTable.from_file(p)
    assert t.hu == (-1000.0, 0.0, 1500.0) and t.name == "ct.txt"
    p2 = tmp_path / "two.txt"
    p2.write_text("-1000 0.0012\n0 1\n1000 1.6\n")
    t2 = DensityTable.from_file(p2)
    assert len(t2.relative_electron_density) == 3


@pytest.mark.parametrize(
    "hu, rho, red, err, match",
    [
        ([0, -100, 100], [1, 1, 1], [1, 1, 1], ValueError, r"hu must be strictly increasing, got hu\[0\] = 0.0 followed by hu\[1\] = -100.0"),
        ([0, 0, 100], [1, 1, 1], [1, 1, 1], ValueError, "hu must be strictly increasing"),
        ([0, np.nan, 100], [1, 1, 1], [1, 1, 1], ValueError, "hu must be finite, got 1 NaN/inf"),
        ([0, 100], [1, np.nan], [1, 1], ValueError, "mass_density_g_cm3 must be finite"),
        ([0, 100], [1, 0.5], [1, 1], ValueError, "mass_density_g_cm3 must be non-decreasing"),
        ([0, 100], [1, 1.1], [1, -1], ValueError, "relative_electron_density must be >= 0"),
        ([0, 100], [1, 1.1, 1.2], [1, 1], ValueError, "mass_density_g_cm3 must have 2 entries"),
        ([0], [1], [1], ValueError, "at least 2 table points"),
    ],
)
def test_bad_tables(hu, rho, red, err, match):
    with pytest.raises(err, match=match):
        DensityTable(hu, rho, red)


def test_bad_file_and_values(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DensityTable.from_file(tmp_path / "nope.txt")
    p = tmp_path / "bad.txt"
    p.write_text("-1000 0.001 0.001 7\n")
    with pytest.raises(ValueError, match="expected 2 or 3 columns"):
        DensityTable.from_file(p)
    p.write_text("-1000 0.001\n0 abc\n")
    with pytest.raises(ValueError, match="line 2: expected numbers"):
        DensityTable.from_file(p)
    with pytest.raises(ValueError, match="hu must be finite, got 1 NaN"):
        hu_to_mass_density(np.array([0.0, np.nan]))
    with pytest.raises(TypeError, match="table must be a DensityTable"):
        hu_to_mass_density(0.0, table="default")


def test_dict_round_trip():
    t = DensityTable.default()
    assert DensityTable.from_dict(t.to_dict()) == t


def test_inverse_clamps_and_needs_invertible_table(caplog):
    with caplog.at_level(logging.WARNING, logger="tomodose.geometry.density"):
        hu = mass_density_to_hu(np.array([0.0, 1.0, 5.0]))
    np.testing.assert_allclose(hu, [-1000.0, 0.0, 3000.0])
    assert "1 value(s) below" in caplog.text and "1 above" in caplog.text
    flat = DensityTable([-1000, 0, 100], [0.0, 1.0, 1.0], [0.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="is not invertible: mass_density_g_cm3 must be strictly increasing"):
        mass_density_to_hu(1.0, flat)
    with pytest.raises(ValueError, match="density_g_cm3 must be finite"):
        mass_density_to_hu([np.inf])


def test_integer_ct_input():
    rho = hu_to_mass_density(np.array([[-1000, 0, 1000]], dtype=np.int16))
    np.testing.assert_allclose(rho, [[0.0012, 1.0, 1.6]])
