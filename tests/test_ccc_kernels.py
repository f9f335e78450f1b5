"""Collapsed-cone kernel derivation, shipped table and loader."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tomodose.transport.kernels import (
    DEFAULT_KERNEL_NAME,
    CollapsedConeKernel,
    collapse_kernel,
    cone_directions,
    load_kernel,
    polyenergetic_kernel,
    read_edk_csv,
    terma_weights,
)

EDK = "dose_physics/kernels/edknrc_mono_water_conehead.csv"
MACKIE = "dose_physics/kernels/mackie_edk_mono_water.npz"


@pytest.fixture(scope="module")
def edk(shared_data):
    return read_edk_csv(shared_data / EDK)


# --- shipped table ------------------------------------------------------------------------------
def test_shipped_kernel_loads_with_provenance():
    k = load_kernel()
    assert k.name == DEFAULT_KERNEL_NAME
    assert k.n_directions == k.n_polar * k.n_azimuth
    prov = k.provenance
    assert prov["inputs"]["mono_kernels"]["licence"] == "MIT"
    assert "spectrum" in prov["inputs"] and prov["script_version"]
    assert 0.93 < k.total_fraction < 0.99
    # the exponential model reproduces each ring's tabulated total at the table's last radius
    r_max = k.radius_edges_cm[-1]
    np.testing.assert_allclose(k.fitted_cumulative([r_max])[:, 0], k.cumulative[:, -1], rtol=1e-12)
    assert np.all(k.rates_per_cm >= 0.02) and np.all(k.rates_per_cm <= 100.0)
    # cumulative tables are monotone and start at 0
    assert np.all(np.diff(k.cumulative, axis=1) >= 0) and np.all(k.cumulative[:, 0] == 0)
    assert k.fit_error() < 0.01 and k.fit_error(summed=True) < 0.02


def test_shipped_kernel_energy_matches_spectrum_weighted_mono_totals(edk):
    k = load_kernel()
    w = np.asarray(k.provenance["terma_weights"])
    expected = float(w @ edk.deposited_fraction)
    assert abs(k.total_fraction - expected) / expected < 1e-3


@pytest.fixture(scope="module")
def script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "kernels" / "derive_ccc_kernels.py"
    spec = importlib.util.spec_from_file_location("derive_ccc_kernels", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_reproducible_from_inputs(edk, script, shared_data):
    k = load_kernel()
    spec = k.provenance["inputs"]["spectrum"]
    mu_e, mu_v = script.read_mu_water(shared_data / script.MU_REL)
    w = terma_weights(edk.energies_mev, spec["energies_mev"], spec["fluence"], mu_e, mu_v)
    np.testing.assert_allclose(w, k.provenance["terma_weights"], atol=1e-7)
    fine = polyenergetic_kernel(edk, w)
    groups = [int(round(e / 3.75)) for e in k.polar_edges_deg]
    again = collapse_kernel(fine, edk.theta_edges_deg, edk.radius_edges_cm,
                            polar_group_edges=groups, n_azimuth=k.n_azimuth, n_terms=k.n_terms)
    np.testing.assert_allclose(again.cumulative, k.cumulative, rtol=1e-9, atol=1e-12)


# --- energy conservation of the collapse ------------------------------------------------------------
@pytest.mark.parametrize("n_polar", [6, 8, 12, 16])
def test_collapse_preserves_each_mono_total(edk, n_polar):
    for ie in (0, 5, 11):
        fine = edk.total[ie]
        k = collapse_kernel(fine, edk.theta_edges_deg, edk.radius_edges_cm, n_polar=n_polar,
                            n_azimuth=8, n_terms=4)
        total = fine.sum()
        assert 0.93 < total < 0.99
        assert abs(k.total_fraction - total) / total < 1e-3
        fitted = k.fitted_cumulative([edk.radius_edges_cm[-1]]).sum()
        assert abs(fitted - total) / total < 1e-3


def test_mono_totals_are_known_values(edk):
    dep = edk.deposited_fraction
    assert dep[0] == pytest.approx(0.984, abs=1e-3)
    assert dep[-1] == pytest.approx(0.9335, abs=1e-3)
    assert np.all(np.diff(dep) < 0)


def test_collapsed_radial_integrals_agree_with_mackie(edk, shared_data):
    """Validation only: Mackie kernels (AGPL) are read at test time, never used for tables."""
    m = np.load(shared_data / MACKIE)
    for energy in (1.0, 2.0, 4.0, 6.0):
        a = edk.total[list(edk.energies_mev).index(energy)]
        b = m["total"][list(np.round(m["energies_MeV"], 3)).index(energy)]
        ka = collapse_kernel(a, edk.theta_edges_deg, edk.radius_edges_cm, n_polar=12, n_terms=4)
        kb = collapse_kernel(b, m["angle_edges_deg"], m["radius_edges_cm"], n_polar=12, n_terms=4)
        assert abs(ka.total_fraction - kb.total_fraction) / kb.total_fraction < 2e-3
        diff = np.abs(ka.cumulative - kb.cumulative).max() / kb.total_fraction
        assert diff < 0.02, (energy, diff)


# --- TERMA weights -----------------------------------------------------------------------------------
def test_terma_weights_mono_and_linear_share():
    ek = np.array([0.5, 1.0, 1.5])
    mu_e = np.array([0.1, 10.0])
    mu = np.array([0.07, 0.07])
    np.testing.assert_allclose(terma_weights(ek, [1.0], [3.0], mu_e, mu), [0, 1, 0])
    np.testing.assert_allclose(terma_weights(ek, [1.25], [1.0], mu_e, mu), [0, 0.5, 0.5])
    # below/above the kernel range: clamped to the end energies
    np.testing.assert_allclose(terma_weights(ek, [0.2, 3.0], [1.0, 1.0], mu_e, mu),
                               [0.2 / 3.2, 0, 3.0 / 3.2])
    # weight ~ phi E mu
    w = terma_weights(ek, [0.5, 1.5], [1.0, 1.0], np.array([0.5, 1.5]), np.array([0.1, 0.05]))
    np.testing.assert_allclose(w, [0.05 / 0.125, 0, 0.075 / 0.125])


def test_terma_weights_bad_input():
    ek = np.array([0.5, 1.0])
    with pytest.raises(ValueError, match="spectrum_fluence"):
        terma_weights(ek, [1.0], [0.0], [0.1, 10], [1, 1])
    with pytest.raises(ValueError, match="spectrum_fluence"):
        terma_weights(ek, [1.0], [-1.0], [0.1, 10], [1, 1])
    with pytest.raises(ValueError, match="spectrum_fluence must have shape"):
        terma_weights(ek, [1.0, 2.0], [1.0], [0.1, 10], [1, 1])


# --- directions ------------------------------------------------------------------------------------
@pytest.mark.parametrize("axis", [(0, 0, 1), (0.3, -0.5, 0.8), (-1, 0, 0)])
def test_directions_cover_the_sphere(axis):
    k = load_kernel()
    dirs, omega, ring = k.directions(axis)
    assert dirs.shape == (k.n_directions, 3)
    np.testing.assert_allclose(np.linalg.norm(dirs, axis=1), 1.0)
    assert omega.sum() == pytest.approx(4 * math.pi)
    ax = np.asarray(axis, float) / np.linalg.norm(axis)
    theta = np.degrees(np.arccos(np.clip(dirs @ ax, -1, 1)))
    np.testing.assert_allclose(theta, k.polar_deg[ring], atol=1e-9)
    assert k.azimuth_deg.shape == (k.n_azimuth,) and k.azimuth_deg[0] == 180.0 / k.n_azimuth
    assert np.all(theta >= k.polar_edges_deg[ring]) and np.all(theta <= k.polar_edges_deg[ring + 1])


def test_cone_directions_bad_axis():
    with pytest.raises(ValueError, match="axis"):
        cone_directions([10.0], 4, (0, 0, 0))


# --- table validation and io -------------------------------------------------------------------
def test_kernel_roundtrip(tmp_path):
    k = load_kernel()
    path = k.save(tmp_path / "k.json")
    again = load_kernel(str(path))
    np.testing.assert_array_equal(again.amplitudes, k.amplitudes)
    assert again.n_azimuth == k.n_azimuth
    assert load_kernel(n_azimuth=4).n_directions == 4 * k.n_polar
    assert not k.cumulative.flags.writeable


def test_kernel_bad_input(tmp_path, edk):
    k = load_kernel()
    with pytest.raises(ValueError, match="name must be a shipped kernel"):
        load_kernel("no_such_kernel")
    d = k.to_dict()
    d["format_version"] = 99
    with pytest.raises(ValueError, match="format_version"):
        CollapsedConeKernel.from_dict(d)
    d = k.to_dict()
    d["format"] = "other"
    with pytest.raises(ValueError, match="format must be"):
        CollapsedConeKernel.from_dict(d)
    with pytest.raises(ValueError, match="n_azimuth"):
        k.with_azimuths(0)
    with pytest.raises(ValueError, match="polar_edges_deg"):
        CollapsedConeKernel("x", [0, 90], [10, 100], 4, k.radius_edges_cm,
                            k.cumulative[:2], k.rates_per_cm, k.amplitudes[:2])
    with pytest.raises(ValueError, match="n_polar must divide"):
        collapse_kernel(edk.total[0], edk.theta_edges_deg, edk.radius_edges_cm, n_polar=7)
    with pytest.raises(ValueError, match="polar_group_edges"):
        collapse_kernel(edk.total[0], edk.theta_edges_deg, edk.radius_edges_cm,
                        polar_group_edges=[0, 30, 20, 48])
    with pytest.raises(FileNotFoundError, match="path"):
        read_edk_csv(tmp_path / "missing.csv")
    json.dumps(k.to_dict())  # serialisable


# --- energy-group table ----------------------------------------------------------------------------
def test_group_table_conserves_each_group_energy(edk, script, shared_data):
    k = load_kernel("ccc_water_6mv_3groups")
    assert k.n_groups == 3 and k.group_amplitudes.shape == (3, k.n_polar, k.n_terms)
    spec = k.provenance["inputs"]["spectrum"]
    e = np.asarray(spec["energies_mev"])
    f = np.asarray(spec["fluence"])
    mu_e, mu_v = script.read_mu_water(shared_data / script.MU_REL)
    edges = k.group_edges_mev
    r_max = k.radius_edges_cm[-1]
    for g in range(3):
        sel = (e >= edges[g]) & (e < edges[g + 1])
        w = terma_weights(edk.energies_mev, e, np.where(sel, f, 0.0), mu_e, mu_v)
        expected = float(w @ edk.deposited_fraction)
        fitted = float(k.group_kernel(g).fitted_cumulative([r_max]).sum())
        assert abs(fitted - expected) / expected < 1e-3, g
    # harder groups deposit less within the table (more escapes) -- physics ordering
    totals = [k.group_kernel(g).total_fraction for g in range(3)]
    assert totals[0] > totals[1] > totals[2]
    again = CollapsedConeKernel.from_dict(k.to_dict())
    np.testing.assert_array_equal(again.group_amplitudes, k.group_amplitudes)


def test_group_fields_validation():
    k = load_kernel()
    assert k.n_groups == 0
    with pytest.raises(ValueError, match="group_kernel needs"):
        k.group_kernel(0)
    with pytest.raises(ValueError, match="together"):
        CollapsedConeKernel(k.name, k.polar_edges_deg, k.polar_deg, 8, k.radius_edges_cm,
                            k.cumulative, k.rates_per_cm, k.amplitudes, {},
                            group_amplitudes=k.amplitudes[None])
    with pytest.raises(ValueError, match="group_amplitudes must have shape"):
        CollapsedConeKernel(k.name, k.polar_edges_deg, k.polar_deg, 8, k.radius_edges_cm,
                            k.cumulative, k.rates_per_cm, k.amplitudes, {},
                            group_amplitudes=k.amplitudes[None, :, :2], group_edges_mev=[0, 7])


@pytest.mark.parametrize("name", [DEFAULT_KERNEL_NAME, "ccc_water_6mv_3groups"])
def test_shipped_kernel_uses_the_current_default_spectrum(name):
    """Guard against a stale table: regenerate with kernels/derive_ccc_kernels.py if this fails."""
    from tomodose.terma.spectrum import default_spectrum

    spec = default_spectrum()
    stored = load_kernel(name).provenance["inputs"]["spectrum"]
    fl = np.asarray(stored["fluence"], float)
    same = (np.allclose(spec.energies_mev, stored["energies_mev"])
            and np.allclose(np.asarray(spec.fluence) / np.sum(spec.fluence), fl / fl.sum()))
    assert same, (f"{name}.json was derived for another spectrum; run "
                  "`python kernels/derive_ccc_kernels.py` (and with --group-edges-mev 1.0,2.5 "
                  "--name ccc_water_6mv_3groups)")
