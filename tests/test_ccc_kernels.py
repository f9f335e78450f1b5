"""Collapsed-cone kernel derivation, shipped table and loader."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from tomodose.transport.kernels import (
    DEFAULT_KERNEL_NAME,
    CollapsedConeKernel,
    MonoKernelTable,
    collapse_kernel,
    cone_directions,
    load_kernel,
    merge_mono_tables,
    polyenergetic_kernel,
    read_edk_csv,
    terma_weights,
)
from tests._scripts import load_script

EDK = "dose_physics/kernels/edknrc_mono_water_conehead.csv"
MACKIE = "dose_physics/kernels/mackie_edk_mono_water.npz"
ROOT = Path(__file__).resolve().parents[1]
MC_CSV = ROOT / "tomodose" / "data" / "kernels" / "water_mono_ompmc.csv"
MC_PROV = ROOT / "tomodose" / "data" / "kernels" / "water_mono_ompmc.provenance.json"


@pytest.fixture(scope="module")
def edk(shared_data):
    return read_edk_csv(shared_data / EDK)


@pytest.fixture(scope="module")
def mc():
    return read_edk_csv(MC_CSV)


@pytest.fixture(scope="module")
def mc_prov():
    return json.loads(MC_PROV.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def merged(script, shared_data):
    """The mono kernels the shipped tables are derived from (own ompMC < 0.5 MeV + EDKnrc)."""
    return script.read_mono_table(shared_data)[0]


# --- shipped table ------------------------------------------------------------------------------
def test_shipped_kernel_loads_with_provenance():
    k = load_kernel()
    assert k.name == DEFAULT_KERNEL_NAME
    assert k.n_directions == k.n_polar * k.n_azimuth
    prov = k.provenance
    assert prov["inputs"]["mono_kernels"]["licence"] == "MIT"
    low = prov["inputs"]["mono_kernels_low_energy"]
    assert low["file"] == "tomodose/data/kernels/water_mono_ompmc.csv" and "ompMC" in low["origin"]
    assert max(low["energies_mev"]) < 0.5 and len(low["energies_mev"]) >= 4
    assert len(prov["terma_weights"]) == len(prov["kernel_energies_mev"])
    assert "spectrum" in prov["inputs"] and prov["script_version"]
    assert 0.93 < k.total_fraction < 0.99
    # the exponential model reproduces each ring's tabulated total at the table's last radius
    r_max = k.radius_edges_cm[-1]
    np.testing.assert_allclose(k.fitted_cumulative([r_max])[:, 0], k.cumulative[:, -1], rtol=1e-12)
    assert np.all(k.rates_per_cm >= 0.02) and np.all(k.rates_per_cm <= 100.0)
    # cumulative tables are monotone and start at 0
    assert np.all(np.diff(k.cumulative, axis=1) >= 0) and np.all(k.cumulative[:, 0] == 0)
    assert k.fit_error() < 0.01 and k.fit_error(summed=True) < 0.02
    # build-up fit (script 1.4; measured 0.25 % / 0.42 %, the non-negative fit gave 0.28 % / 0.94 %)
    assert k.fit_error() < 0.004 and k.fit_error(summed=True) < 0.006


def test_shipped_kernel_energy_matches_spectrum_weighted_mono_totals(merged):
    k = load_kernel()
    np.testing.assert_allclose(k.provenance["kernel_energies_mev"], merged.energies_mev)
    w = np.asarray(k.provenance["terma_weights"])
    expected = float(w @ merged.deposited_fraction)
    assert abs(k.total_fraction - expected) / expected < 1e-3
    # poly total lies between the extreme mono totals that carry weight, and in the known range
    dep = merged.deposited_fraction[w > 0]
    assert dep.min() <= k.total_fraction <= dep.max()
    assert 0.93 < k.total_fraction < 0.99


@pytest.fixture(scope="module")
def script():
    return load_script("kernels/derive_ccc_kernels.py")


def test_reproducible_from_inputs(merged, script):
    k = load_kernel()
    spec = k.provenance["inputs"]["spectrum"]
    mu_e, mu_v = script.read_mu_water(None)
    w = terma_weights(merged.energies_mev, spec["energies_mev"], spec["fluence"], mu_e, mu_v)
    np.testing.assert_allclose(w, k.provenance["terma_weights"], atol=1e-7)
    fine = polyenergetic_kernel(merged, w)
    groups = [int(round(e / 3.75)) for e in k.polar_edges_deg]
    again = collapse_kernel(fine, merged.theta_edges_deg, merged.radius_edges_cm,
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


@pytest.mark.parametrize("name", [DEFAULT_KERNEL_NAME, "ccc_water_6mv_3groups", "ccc_water_6mv_5groups"])
def test_shipped_kernels_stagger_the_odd_rings(name):
    """Odd rings are turned by half an azimuth step; each ring's cone set stays mirror symmetric
    (beam along a grid axis) and the cones still sit on their ring's polar angle."""
    k = load_kernel(name)
    assert k.azimuth_stagger
    if k.n_groups:
        assert k.group_kernel(0).azimuth_stagger
    az = k.ring_azimuth_deg
    assert az.shape == (k.n_polar, k.n_azimuth)
    np.testing.assert_allclose(az[0::2], np.broadcast_to(k.azimuth_deg, az[0::2].shape))
    np.testing.assert_allclose(az[1::2] - az[0::2][: az[1::2].shape[0]], 180.0 / k.n_azimuth)
    axis = np.array([0.0, 1.0, 0.0])
    dirs, omega, ring = k.directions(axis)
    assert omega.sum() == pytest.approx(4 * math.pi)
    np.testing.assert_allclose(np.degrees(np.arccos(np.clip(dirs @ axis, -1, 1))), k.polar_deg[ring], atol=1e-9)
    for p in range(k.n_polar):
        d = dirs[ring == p]
        for mirror in (np.array([-1.0, 1.0, 1.0]), np.array([1.0, 1.0, -1.0])):
            gap = np.abs((d * mirror)[:, None, :] - d[None, :, :]).max(axis=2).min(axis=1)
            assert gap.max() < 1e-12, (p, mirror)
    plain = load_kernel(name, azimuth_stagger=False)
    assert not plain.azimuth_stagger and plain.n_azimuth == k.n_azimuth
    np.testing.assert_allclose(plain.ring_azimuth_deg, np.broadcast_to(k.azimuth_deg, az.shape))
    np.testing.assert_array_equal(plain.directions(axis)[0][ring % 2 == 0], dirs[ring % 2 == 0])


def test_stagger_roundtrip_and_bad_input(tmp_path):
    k = load_kernel()
    for flag in (True, False):
        path = k.with_azimuths(6, flag).save(tmp_path / f"k{flag}.json")
        again = CollapsedConeKernel.load(path)
        assert again.azimuth_stagger is flag and again.n_azimuth == 6
    d = k.to_dict()
    del d["azimuth_stagger"]  # tables written before the key existed
    assert CollapsedConeKernel.from_dict(d).azimuth_stagger is False
    assert k.with_azimuths(4).azimuth_stagger is k.azimuth_stagger
    with pytest.raises(TypeError, match="azimuth_stagger must be a bool"):
        k.with_azimuths(4, "yes")
    with pytest.raises(TypeError, match="azimuth_stagger must be a bool or None"):
        load_kernel(azimuth_stagger=1)


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
@pytest.mark.parametrize("name, n_groups", [("ccc_water_6mv_3groups", 3), ("ccc_water_6mv_5groups", 5)])
def test_group_table_conserves_each_group_energy(merged, script, name, n_groups):
    k = load_kernel(name)
    assert k.n_groups == n_groups and k.group_amplitudes.shape == (n_groups, k.n_polar, k.n_terms)
    spec = k.provenance["inputs"]["spectrum"]
    e = np.asarray(spec["energies_mev"])
    f = np.asarray(spec["fluence"])
    mu_e, mu_v = script.read_mu_water(None)
    edges = k.group_edges_mev
    r_max = k.radius_edges_cm[-1]
    for g in range(n_groups):
        sel = (e >= edges[g]) & (e < edges[g + 1])
        w = terma_weights(merged.energies_mev, e, np.where(sel, f, 0.0), mu_e, mu_v)
        expected = float(w @ merged.deposited_fraction)
        fitted = float(k.group_kernel(g).fitted_cumulative([r_max]).sum())
        assert abs(fitted - expected) / expected < 1e-3, g
    # harder groups deposit less within the table (more escapes) -- physics ordering
    totals = [k.group_kernel(g).total_fraction for g in range(n_groups)]
    assert all(a > b for a, b in zip(totals, totals[1:]))
    again = CollapsedConeKernel.from_dict(k.to_dict())
    np.testing.assert_array_equal(again.group_amplitudes, k.group_amplitudes)


def _hardening_error(k, merged, script, depth_cm):
    """Largest error (fraction of the total) of the ring-collapsed cumulative kernel when the
    spectrum has crossed ``depth_cm`` of water: energy-group approximation (each group's
    surface-spectrum kernel weighted by the group's TERMA at depth, what the engine transports)
    against the exact kernel of the hardened spectrum (every line weighted by its own TERMA at
    depth). Tabulated kernels (no fit): the group approximation alone. Returns (summed over
    rings, forward rings 0-2 summed)."""
    spec = k.provenance["inputs"]["spectrum"]
    e = np.asarray(spec["energies_mev"], float)
    f = np.asarray(spec["fluence"], float)
    mu_e, mu_v = script.read_mu_water(None)
    mu_s = np.exp(np.interp(np.log(e), np.log(mu_e), np.log(mu_v)))
    att = f * np.exp(-mu_s * depth_cm)
    edges = np.asarray(k.group_edges_mev, float)
    grp = np.searchsorted(edges, e, side="right") - 1
    rings = [int(round(v / 3.75)) for v in k.polar_edges_deg]

    def collapse(fine):
        rs = np.array([fine[a:b].sum(axis=0) for a, b in zip(rings[:-1], rings[1:])])
        return np.concatenate([np.zeros((rs.shape[0], 1)), np.cumsum(rs, axis=1)], axis=1)

    exact = collapse(polyenergetic_kernel(merged, terma_weights(merged.energies_mev, e, att, mu_e, mu_v)))
    share = np.array([np.sum((att * e * mu_s)[grp == g]) for g in range(k.n_groups)])
    share /= share.sum()
    approx = sum(share[g] * collapse(polyenergetic_kernel(
        merged, terma_weights(merged.energies_mev, e, np.where(grp == g, f, 0.0), mu_e, mu_v)))
        for g in range(k.n_groups))
    tot = exact[:, -1].sum()
    d = approx - exact
    return float(np.abs(d.sum(axis=0)).max() / tot), float(np.abs(d[:3].sum(axis=0)).max() / tot)


@pytest.mark.parametrize("name, bound_ok", [("ccc_water_6mv_5groups", True), ("ccc_water_6mv_3groups", False)])
def test_energy_groups_follow_the_kernel_hardening(merged, script, name, bound_ok):
    """Kernel hardening with depth (docs/collapsed_cone.md, section 4c): 20 cm below the surface the
    group approximation must stay within 0.3 % of the total (summed over rings) of the exact
    kernel of the hardened spectrum. Measured: 3 groups (1.0, 2.5 MeV) 0.62 % summed, 0.37 % in
    the forward rings (what moved narrow fields 0.5-0.9 % low on the axis in the sampled
    superposition); 5 groups (0.5, 1.0, 2.0, 3.5 MeV) 0.21 % / 0.13 %; 8 groups 0.10 % / 0.06 %.
    The 3-group table is kept (and expected to miss the bound) for comparisons."""
    k = load_kernel(name)
    assert _hardening_error(k, merged, script, 0.0)[0] < 1e-12  # the surface spectrum: exact
    summed, forward = _hardening_error(k, merged, script, 20.0)
    assert (summed < 0.003 and forward < 0.002) == bound_ok, (name, summed, forward)


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


@pytest.mark.parametrize("name", [DEFAULT_KERNEL_NAME, "ccc_water_6mv_3groups", "ccc_water_6mv_5groups"])
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
                  "--name ccc_water_6mv_3groups, --group-edges-mev 0.5,1.0,2.0,3.5 --name ccc_water_6mv_5groups)")


# --- the project's own ompMC mono kernels (kernels/derive_mc_kernels.py) -----------------------------
def test_mc_table_loads_on_the_edknrc_layout(mc, mc_prov, edk):
    assert mc.total.shape == (mc.energies_mev.size, 48, 24)
    np.testing.assert_allclose(mc.theta_edges_deg, edk.theta_edges_deg)
    np.testing.assert_allclose(mc.radius_edges_cm, edk.radius_edges_cm)
    assert np.all(mc.total >= 0)
    low = mc.energies_mev[mc.energies_mev < 0.5]
    assert low.size >= 4 and low.min() <= 0.15
    carlo = mc_prov["monte_carlo"]
    for key in ("version", "pegs_file", "ecut_mev_total", "pcut_mev", "seeds"):
        assert carlo[key] not in (None, "")
    assert mc_prov["command"].startswith("python kernels/derive_mc_kernels.py") and mc_prov["date_utc"]
    rec = {round(r["energy_mev"], 4): r for r in mc_prov["energies"]}
    for e, dep in zip(mc.energies_mev, mc.deposited_fraction):
        r = rec[round(float(e), 4)]
        assert r["histories_per_run"] * r["runs"] >= 100_000
        # the CSV holds the mean of the runs (negative noise bins moved within their cone)
        assert dep == pytest.approx(r["deposited_fraction_60cm"], abs=1e-4)


def test_mc_kernel_energy_conservation(mc, mc_prov):
    """Deposited fraction within 60 cm: high (0.97-1) at these energies, falling with energy
    (more escaped scatter), within 3 standard errors; the pencil's whole-phantom fraction is
    higher (its phantom extends beyond 60 cm)."""
    rec = sorted(mc_prov["energies"], key=lambda r: r["energy_mev"])
    dep = np.array([r["deposited_fraction_60cm"] for r in rec])
    sem = np.array([r["deposited_fraction_sem"] for r in rec])
    assert np.all((dep > 0.97) & (dep < 1.0))
    assert np.all(np.diff(dep) < 3 * np.hypot(sem[1:], sem[:-1]))
    for r in rec:
        assert r["deposited_fraction_whole_phantom"] >= r["deposited_fraction_60cm"] - 3 * r["deposited_fraction_sem"]
        # the attenuation coefficient used in h = p + (1/mu) dp/dz is the one the transport obeys
        assert r["mu_per_cm_fitted_axis"] == pytest.approx(r["mu_per_cm_nist"], rel=0.02)


@pytest.mark.parametrize("n_polar", [8, 12])
def test_collapse_conserves_mc_kernels(mc, n_polar):
    for ie in range(mc.energies_mev.size):
        fine = mc.total[ie]
        k = collapse_kernel(fine, mc.theta_edges_deg, mc.radius_edges_cm, n_polar=n_polar,
                            n_azimuth=8, n_terms=4)
        total = fine.sum()
        assert abs(k.total_fraction - total) / total < 1e-3
        fitted = k.fitted_cumulative([mc.radius_edges_cm[-1]]).sum()
        assert abs(fitted - total) / total < 1e-3


def test_merge_mono_tables(mc, edk):
    m = merge_mono_tables(mc, edk)
    assert m.energies_mev[0] == mc.energies_mev[0]
    np.testing.assert_array_equal(m.energies_mev[m.energies_mev >= 0.5], edk.energies_mev)
    assert np.all(np.diff(m.energies_mev) > 0)
    np.testing.assert_array_equal(m.total[-1], edk.total[-1])
    bad = MonoKernelTable(mc.energies_mev, mc.theta_edges_deg, mc.radius_edges_cm * 2, mc.total)
    with pytest.raises(ValueError, match="share theta_edges_deg and radius_edges_cm"):
        merge_mono_tables(bad, edk)


def _edk_sem(shared_data, energy):
    """(48, 24) absolute standard uncertainty of an EDKnrc kernel (its total_unc_pct column)."""
    rows = np.loadtxt(shared_data / EDK, delimiter=",", comments="#", skiprows=4, usecols=(0, 1, 3, 4, 5))
    rows = rows[np.isclose(rows[:, 0], energy)]
    order = np.lexsort((rows[:, 2], rows[:, 1]))
    return (rows[order, 3] * rows[order, 4] / 100.0).reshape(48, 24)


def test_overlap_energy_agrees_with_edknrc(mc, mc_prov, edk, shared_data):
    """The method check: the ompMC kernel at 0.5 MeV against the independent EDKnrc one.

    Compared: the cumulative energy of all cones at every shell edge from 0.2 to 50 cm (what a
    broad field sees), judged by the combined standard error sigma (ompMC: spread of the
    independent runs, stored in the provenance; EDKnrc: its own uncertainty column); 4 sigma
    because the largest of 18 correlated radii is taken. Measured (2026-11-28): largest
    |difference| 0.10 % of the total, 3.1 sigma; within 50 cm 0.9678 vs 0.9685 (2.3 sigma).
    Not compared: r < 0.2 cm (ECUT 0.7 MeV here vs 0.521 MeV in EDKnrc and the first-shell
    direction model, see docs/collapsed_cone.md 1a) and the 50-60 cm shell (EDKnrc scores in a
    60 cm sphere surrounded by vacuum: no backscatter from beyond; the ompMC phantom reaches 80-100
    cm, so that shell is higher here -- checked below as an ordering).
    """
    e = 0.5
    a = mc.total[list(mc.energies_mev).index(e)]
    b = edk.total[list(edk.energies_mev).index(e)]
    rec = next(r for r in mc_prov["energies"] if r["energy_mev"] == e)
    sem_mc = np.asarray(rec["sem_summed_cumulative"])
    sem_edk = np.concatenate([[0.0], np.sqrt(np.cumsum((_edk_sem(shared_data, e) ** 2).sum(axis=0)))])
    sigma = np.hypot(sem_mc, sem_edk)
    ca = np.concatenate([[0.0], np.cumsum(a.sum(axis=0))])
    cb = np.concatenate([[0.0], np.cumsum(b.sum(axis=0))])
    r = mc.radius_edges_cm
    sel = (r >= 0.2) & (r <= 50.0)
    z = np.abs(ca - cb)[sel] / sigma[sel]
    assert np.all(z < 4.0), dict(zip(r[sel].tolist(), z.round(1).tolist()))
    # backscatter from beyond 60 cm exists in the ompMC phantom only
    shell_sigma = math.hypot(rec["sem_summed_cumulative"][-1], rec["sem_summed_cumulative"][-2])
    assert a[:, -1].sum() - b[:, -1].sum() > 3 * shell_sigma


def test_low_energy_mc_kernels_agree_with_mackie(mc, mc_prov, shared_data):
    """Validation only (Mackie/EGS4 kernels are AGPL: read at test time, never used for tables).

    EGS4 (1985) and ompMC (EGSnrc physics, XCOM) differ systematically by more than the ompMC
    noise (up to 25 sigma at 0.1 MeV), so the check is a cross-code bound, not a statistical one:
    measured largest |difference| of the cumulative of all cones (0.2-50 cm) 0.30 % of the total
    (0.1 MeV), of the energy within 50 cm 0.07 % (0.1 MeV); asserted: 0.5 % and 0.2 %.
    """
    m = np.load(shared_data / MACKIE)
    r = mc.radius_edges_cm
    sel = (r >= 0.2) & (r <= 50.0)
    i50 = int(np.flatnonzero(np.isclose(r, 50.0))[0])
    for ie, e in enumerate(mc.energies_mev):
        if e >= 0.5:
            continue
        a = mc.total[ie]
        b = m["total"][int(np.argmin(np.abs(m["energies_MeV"] - e)))]
        ca = np.concatenate([[0.0], np.cumsum(a.sum(axis=0))])
        cb = np.concatenate([[0.0], np.cumsum(b.sum(axis=0))])
        assert np.max(np.abs(ca - cb)[sel]) / cb[-1] < 0.005, e
        assert abs(ca[i50] - cb[i50]) / cb[-1] < 0.002, e


@pytest.fixture(scope="module")
def mc_script():
    return load_script("kernels/derive_mc_kernels.py")


def test_pencil_to_point_kernel_recovers_a_point_deposit(mc_script):
    """h = p + (1/mu) dp/dz on a synthetic tally: every interaction deposits its energy where it
    happens (a delta kernel), so p lives on the axis ring as mu exp(-mu z); the derived kernel must
    hold all of it in the first shell, and nothing anywhere else."""
    r_edges, z_edges = mc_script.scoring_edges()
    mu, energy = 0.15, 0.2
    dep = np.zeros((r_edges.size - 1, z_edges.size - 1))
    za, zb = np.clip(z_edges[:-1], 0, None), np.clip(z_edges[1:], 0, None)
    dep[0] = energy * (np.exp(-mu * za) - np.exp(-mu * zb))
    kern, info = mc_script.pencil_to_point_kernel(dep, energy, mu)
    assert kern.shape == (48, 24)
    assert info["jump_fraction"] == pytest.approx(1.0, abs=2e-3)
    assert kern[:, 0].sum() == pytest.approx(1.0, abs=2e-3)
    assert np.abs(kern[:, 1:]).sum() < 2e-3


def test_compton_electron_cone_weights(mc_script):
    for e in (0.1, 0.3, 0.5):
        w = mc_script.compton_electron_cone_weights(e)
        assert w.shape == (48,) and np.all(w >= 0) and w.sum() == pytest.approx(1.0)
        assert w[24:].sum() == 0.0  # Compton electrons never go backwards
    # a cut keeps only the slower electrons, which leave at larger angles
    cut = mc_script.compton_electron_cone_weights(0.5, 0.189)
    full = mc_script.compton_electron_cone_weights(0.5)
    mean = np.arange(48) * 3.75 + 1.875
    assert (cut * mean).sum() > (full * mean).sum()


# --- build-up fit and per-group rates (script version 1.4) -------------------------------------------
def test_buildup_fit_follows_a_buildup_kernel():
    """A kernel whose energy per unit radius *rises* first (r e^(-r), like multiply scattered photon
    energy) cannot be fitted by non-negative decaying terms; the build-up basis (signed amplitudes,
    non-negative differential) can, and never produces a negative energy density."""
    from tomodose.transport.kernels import differential_kernel, fit_shared_exponentials

    r = np.concatenate([[0.0], np.geomspace(0.05, 60.0, 30)])
    shape = 1.0 - np.exp(-r) * (1.0 + r)  # cumulative of r e^(-r) (build-up, peak at 1 cm)
    fast = 1.0 - np.exp(-8.0 * r)  # a plain decaying ring
    cum = np.stack([0.6 * shape, 0.3 * fast])
    errs = {}
    for buildup in (False, True):
        rates, amps = fit_shared_exponentials(r, cum, 4, buildup=buildup)
        model = amps @ (-np.expm1(-np.outer(r, rates))).T
        errs[buildup] = float(np.abs(model - cum).max() / cum[:, -1].sum())
        np.testing.assert_allclose(model[:, -1], cum[:, -1], rtol=1e-9)  # totals pinned
        assert np.all(differential_kernel(rates, amps, np.geomspace(1e-4, 300, 500)) >= -1e-12)
        if buildup:
            assert np.any(amps < 0)  # signed amplitudes
            assert np.all(np.diff(np.sort(rates)) > 0) and np.all(rates[1:] / rates[:-1] >= 1.5 - 1e-9)
    assert errs[False] > 0.02  # non-negative terms: a few % off
    assert errs[True] < 0.003, errs


def test_kernel_rejects_a_negative_energy_density():
    k = load_kernel()
    amps = np.array(k.amplitudes)
    amps[3] = 0.0
    amps[3, 0], amps[3, -1] = 0.02, -0.01  # slow positive, fast negative: negative near r = 0
    with pytest.raises(ValueError, match="non-negative kernel"):
        CollapsedConeKernel(k.name, k.polar_edges_deg, k.polar_deg, 8, k.radius_edges_cm, k.cumulative,
                            k.rates_per_cm, amps)
    with pytest.raises(ValueError, match="non-negative kernel"):
        CollapsedConeKernel(k.name, k.polar_edges_deg, k.polar_deg, 8, k.radius_edges_cm, k.cumulative,
                            k.rates_per_cm, k.amplitudes, group_amplitudes=amps[None], group_edges_mev=[0, 7])
    with pytest.raises(ValueError, match="group_rates"):
        collapse_kernel(np.ones((48, 24)), np.linspace(0, 180, 49), np.linspace(0, 60, 25), n_polar=12,
                        group_fine_kernels=[np.ones((48, 24))], group_edges_mev=[0, 7], group_rates="own")
    with pytest.raises(ValueError, match="group_weights"):
        collapse_kernel(np.ones((48, 24)), np.linspace(0, 180, 49), np.linspace(0, 60, 25), n_polar=12,
                        group_fine_kernels=[np.ones((48, 24))], group_edges_mev=[0, 7], group_rates="per_group")


def _group_cumulatives(k, merged, script):
    """(G, P, nR + 1) tabulated ring cumulatives of the groups of ``k`` (the script's recipe)."""
    spec = k.provenance["inputs"]["spectrum"]
    e, f = np.asarray(spec["energies_mev"]), np.asarray(spec["fluence"])
    mu_e, mu_v = script.read_mu_water(None)
    rings = [int(round(v / 3.75)) for v in k.polar_edges_deg]
    out = []
    for g in range(k.n_groups):
        sel = (e >= k.group_edges_mev[g]) & (e < k.group_edges_mev[g + 1])
        fine = polyenergetic_kernel(merged, terma_weights(merged.energies_mev, e, np.where(sel, f, 0.0), mu_e, mu_v))
        rs = np.array([fine[a:b].sum(axis=0) for a, b in zip(rings[:-1], rings[1:])])
        out.append(np.concatenate([np.zeros((rs.shape[0], 1)), np.cumsum(rs, axis=1)], axis=1))
    return np.array(out)


@pytest.mark.parametrize("name, n_groups, ring_max, summed_max", [
    ("ccc_water_6mv_3groups", 3, 0.005, 0.012), ("ccc_water_6mv_5groups", 5, 0.007, 0.025)])
def test_group_table_has_per_group_rates_and_fits_each_group(merged, script, name, n_groups, ring_max, summed_max):
    """Shipped group tables: each group owns 4 rates (zeros elsewhere), the main kernel is the
    TERMA-share-weighted sum of the groups, and every group's fitted cumulative follows its
    tabulated one (measured 2026-11-29, 3 groups: per ring <= 0.34 %, summed over rings <= 1.16 %
    of the group total; with the earlier shared non-negative fit 0.8-1.95 % and 3.9-6.2 %.
    5 groups (0.5, 1.0, 2.0, 3.5 MeV): per ring 0.12-0.58 %, summed 0.20 / 0.66 / 0.64 / 1.56 /
    2.34 %: the narrower high-energy groups are followed less well by 4 shared rates (5 rates:
    1.43 / 2.19 %), a known limit of this table, docs/collapsed_cone.md section 4c)."""
    k = load_kernel(name)
    assert k.n_terms == 4 * n_groups
    assert tuple(int(v) for v in k.provenance["script_version"].split(".")) >= (1, 4)
    share = np.asarray(k.provenance["energy_groups"]["surface_terma_share"])
    for g in range(n_groups):
        block = np.zeros(k.n_terms, dtype=bool)
        block[4 * g:4 * g + 4] = True
        assert np.all(k.group_amplitudes[g][:, ~block] == 0.0)
        gk = k.group_kernel(g)
        assert gk.n_terms == 4
        np.testing.assert_array_equal(gk.rates_per_cm, k.rates_per_cm[block])
    np.testing.assert_allclose(k.amplitudes, np.tensordot(share, k.group_amplitudes, axes=(0, 0)), rtol=1e-12,
                               atol=1e-15)
    tab = _group_cumulatives(k, merged, script)
    model = np.einsum("gpk,rk->gpr", k.group_amplitudes, -np.expm1(-np.outer(k.radius_edges_cm, k.rates_per_cm)))
    for g in range(n_groups):
        d = (model[g] - tab[g]) / tab[g, :, -1].sum()
        assert np.abs(d).max() < ring_max, (g, np.abs(d).max())
        assert np.abs(d.sum(axis=0)).max() < summed_max, (g, np.abs(d.sum(axis=0)).max())
    assert np.any(k.group_amplitudes < 0)  # build-up terms


@pytest.mark.slow
def test_group_table_is_reproduced_by_the_script_as_commissioning_calls_it(script, shared_data, tmp_path):
    """kernels/commission_la4.py passes the engine kernel's layout, including ``--n-terms
    <kernel.n_terms>`` (12 = 3 groups x 4): the script reads it as the table's total and
    reproduces the shipped table (deterministic global search)."""
    k = load_kernel("ccc_water_6mv_3groups")
    argv = ["--shared-data", str(shared_data), "--name", "again", "--out-dir", str(tmp_path),
            "--polar-edges-deg", ",".join(f"{v:g}" for v in k.polar_edges_deg), "--n-azimuth", str(k.n_azimuth),
            "--n-terms", str(k.n_terms), "--azimuth-stagger", "--group-edges-mev", "1,2.5"]
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        assert script.main(argv) == 0
    again = CollapsedConeKernel.load(tmp_path / "again.json")
    np.testing.assert_allclose(again.rates_per_cm, k.rates_per_cm, rtol=1e-9)
    np.testing.assert_allclose(again.group_amplitudes, k.group_amplitudes, rtol=1e-7, atol=1e-12)


@pytest.mark.slow
def test_five_group_table_is_reproduced_by_the_script(script, shared_data, tmp_path):
    """The 5-group table (docs/collapsed_cone.md section 4c) comes out of the script's documented
    command unchanged (deterministic global search; about 20 s CPU)."""
    k = load_kernel("ccc_water_6mv_5groups")
    assert k.provenance["command"].endswith("--group-edges-mev 0.5,1.0,2.0,3.5 --name ccc_water_6mv_5groups")
    argv = ["--shared-data", str(shared_data), "--group-edges-mev", "0.5,1.0,2.0,3.5", "--name", "again",
            "--out-dir", str(tmp_path)]
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        assert script.main(argv) == 0
    again = CollapsedConeKernel.load(tmp_path / "again.json")
    np.testing.assert_allclose(again.rates_per_cm, k.rates_per_cm, rtol=1e-9)
    np.testing.assert_allclose(again.group_amplitudes, k.group_amplitudes, rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(again.cumulative, k.cumulative, rtol=1e-12, atol=1e-15)
