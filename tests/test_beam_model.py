"""BeamModel: jaw FWHM, leaf edges, transmission, neighbouring-leaf effect, off-axis, presets."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tomodose.delivery.machine import TomoMachine
from tomodose.terma import BeamModel, Spectrum
from tomodose.terma.beam_model import jaw_half_width_mm

M = TomoMachine()


@pytest.mark.parametrize("fw", [10.0, 25.0, 50.0])
@pytest.mark.parametrize("sigma", [0.0, 1.5, 3.0])
@pytest.mark.parametrize("preset", ["nominal", "default"])
def test_jaw_fwhm_matches_machine(fw, sigma, preset):
    # nominal: the machine's FWHM; default (commissioned): the fitted per-jaw FWHM of the machine file
    b = getattr(BeamModel, preset)().replace(jaw_penumbra_sigma_mm=sigma)
    half = np.linspace(0, 60, 120001)
    v = np.concatenate([-half[:0:-1], half])  # exactly symmetric samples
    j = b.jaw_profile(v, fw, M)
    above = v[j >= 0.5 * j.max()]
    expected = M.real_fwhm_mm(fw) if preset == "nominal" else b.jaw_fwhm_mm[fw]
    assert b.real_fwhm_mm(fw, M) == expected
    assert above[-1] - above[0] == pytest.approx(expected, abs=2e-3)
    np.testing.assert_allclose(j, j[::-1], atol=1e-12)


def test_jaw_half_width_errors_and_sharp():
    assert jaw_half_width_mm(10.0, 0.0) == 5.0
    with pytest.raises(ValueError, match="too small"):
        jaw_half_width_mm(2.0, 3.0)


def test_ideal_is_sharp_flat_and_leakfree():
    b = BeamModel.ideal()
    a = b.leaf_weights(np.zeros(64))
    assert np.all(a == 0)
    u = np.array([-199.0, -3.0, 0.1, 150.0, 201.0])
    np.testing.assert_array_equal(b.leaf_fluence(u, b.leaf_weights(np.ones(64)), M), [1, 1, 1, 1, 0])
    np.testing.assert_array_equal(b.offaxis_fluence(u, 850.0), 1.0)
    np.testing.assert_array_equal(b.softening_factor(u, 850.0), 1.0)
    np.testing.assert_array_equal(b.jaw_profile(np.array([-12.0, 12.0, 12.6]), 25.0, M), [1, 1, 0])


def test_leaf_edges_blurred_by_source():
    # nominal sigma 0.5 mm (the commissioned default is 1.41 mm)
    b = BeamModel.nominal().replace(adjacent_leaf_output_gain=0.0, leaf_transmission=0.0)
    f = np.zeros(64)
    f[32] = 1.0  # leaf 32 spans [0, 6.25] mm
    u = np.array([0.0, 3.125, 6.25, -3.0])
    val = b.leaf_fluence(u, b.leaf_weights(f), M)
    assert val[0] == pytest.approx(0.5) and val[2] == pytest.approx(0.5)
    assert val[1] == pytest.approx(1.0, abs=1e-6) and val[3] < 1e-6


def test_transmission_and_neighbour_effect():
    b = BeamModel.nominal()  # Balog's 4.9 %; the commissioned default fits g = 0, h = 0.0621 (docs/commissioning.md)
    g, t = b.adjacent_leaf_output_gain, b.leaf_transmission
    assert g == pytest.approx(0.049) and t == pytest.approx(0.005)
    single = np.zeros(64)
    single[30] = 1.0
    pair = single.copy()
    pair[31] = 1.0
    a1 = b.leaf_weights(single)
    a2 = b.leaf_weights(pair)
    # Balog 1999: +4.9 % output for a leaf when an adjacent leaf is open
    assert (a2[30] - t * 0) / (a1[30]) == pytest.approx(1.049)
    assert a1[10] == pytest.approx(t)
    assert b.leaf_weights(np.ones(64))[10:50] == pytest.approx(1.0)
    # partial openings overlap for min(f_i, f_j)
    f = np.zeros(64)
    f[20], f[21] = 0.4, 0.9
    a = b.leaf_weights(f)
    assert a[20] == pytest.approx((0.4 + g * 0.4) / (1 + 2 * g) + t * 0.6)
    assert a[21] == pytest.approx((0.9 + g * 0.4) / (1 + 2 * g) + t * 0.1)


def test_offaxis_cone_and_softening():
    b = BeamModel.default()
    u = np.array([0.0, 100.0, 200.0])
    o = b.offaxis_fluence(u, 850.0)
    # commissioned FFF cone (LA4 open-fan OAR ~0.55 at 0.2 rad): ~0.49 at the fan edge (200 mm)
    assert o[0] == 1.0 and o[0] > o[1] > o[2] > 0.4
    theta = np.linspace(0.0, 0.235, 200)
    assert np.all(np.diff(b.offaxis_fluence(850.0 * np.tan(theta), 850.0)) < 0)
    h = b.softening_factor(u, 850.0)
    assert h[0] == 1.0 and 1.0 < h[1] < h[2] < 1.05  # Jeraj 2004: < 5 % mean-energy change off axis


def test_fluence_combines_profiles():
    b = BeamModel.default()
    f = np.random.default_rng(0).uniform(0, 1, 64)
    u = np.linspace(-190, 190, 7)
    v = np.linspace(-15, 15, 7)
    psi = b.fluence(u, v, f, 25.0, M)
    expected = (b.jaw_output_factor(25.0, M) * b.jaw_profile(v, 25.0, M) * b.leaf_fluence(u, b.leaf_weights(f), M)
                * b.offaxis_fluence(u, M.sad_mm))
    np.testing.assert_allclose(psi, expected)
    assert b.jaw_output_factor(25.0, M) != 1.0  # the commissioned head-scatter factor is in play


def test_frozen_and_validation():
    b = BeamModel.default()
    with pytest.raises(dataclasses.FrozenInstanceError):
        b.leaf_transmission = 0.1
    with pytest.raises(ValueError, match="leaf_transmission must be < 1"):
        b.replace(leaf_transmission=1.0)
    with pytest.raises(ValueError, match="jaw_penumbra_sigma_mm must be >= 0"):
        b.replace(jaw_penumbra_sigma_mm=-1.0)
    with pytest.raises(ValueError, match="leaf_edge_sigma_mm must be >= 0"):
        b.replace(leaf_edge_sigma_mm=-0.1)
    with pytest.raises(ValueError, match="adjacent_leaf_output_gain"):
        b.replace(adjacent_leaf_output_gain=-0.01)
    with pytest.raises(ValueError, match="non-positive fluence"):
        b.replace(offaxis_fluence_coeffs=(0.0, -100.0))
    with pytest.raises(TypeError, match="spectrum must be a Spectrum"):
        BeamModel(spectrum="6MV")
    with pytest.raises(ValueError, match="jaw_fwhm_mm"):
        b.replace(jaw_fwhm_mm={})
    with pytest.raises(ValueError, match="no entry"):
        b.replace(jaw_fwhm_mm={25.0: 25.0}).real_fwhm_mm(10.0, M)
    with pytest.raises(ValueError, match="leaf_open_fraction must be <= 1"):
        b.leaf_weights(np.full(64, 1.5))


def test_presets_carry_the_spectrum():
    s = Spectrum.monoenergetic(2.0)
    assert BeamModel.ideal(s).spectrum is s and BeamModel.default(s).spectrum is s
    assert BeamModel.ideal().name == "ideal"
    assert hash(BeamModel.default()) == hash(BeamModel.default())


def _old_leaf_weights(f, g, t):
    """The leaf-weight model before the isolated-leaf term (h = 0), written out."""
    pad = np.zeros(f.shape[:-1] + (1,))
    left = np.concatenate([pad, f[..., :-1]], axis=-1)
    right = np.concatenate([f[..., 1:], pad], axis=-1)
    return (f + g * (np.minimum(f, left) + np.minimum(f, right))) / (1.0 + 2.0 * g) + t * (1.0 - f)


def test_isolated_leaf_loss_zero_is_the_old_model():
    rng = np.random.default_rng(3)
    f = rng.uniform(0, 1, (5, 64))
    f[f < 0.3] = 0.0
    for preset in ("nominal", "default"):
        b = getattr(BeamModel, preset)().replace(isolated_leaf_output_loss=0.0)
        np.testing.assert_array_equal(b.leaf_weights(f), _old_leaf_weights(f, b.adjacent_leaf_output_gain,
                                                                          b.leaf_transmission))
    assert BeamModel.nominal().isolated_leaf_output_loss == 0.0 and BeamModel.ideal().isolated_leaf_output_loss == 0.0


def test_isolated_leaf_loss_on_one_open_leaf():
    g, h, t = 0.02, 0.07, 0.005
    b = BeamModel.nominal().replace(adjacent_leaf_output_gain=g, isolated_leaf_output_loss=h, leaf_transmission=t)
    single = np.zeros(64)
    single[30] = 1.0
    a = b.leaf_weights(single)
    assert a[30] == pytest.approx((1.0 - h) / (1.0 + 2.0 * g))  # both neighbours closed: loses h
    assert a[29] == pytest.approx(t) and a[31] == pytest.approx(t)
    pair = single.copy()
    pair[31] = 1.0
    a2 = b.leaf_weights(pair)  # a leaf with an open neighbour is not isolated: the g model only
    assert a2[30] == pytest.approx((1.0 + g) / (1.0 + 2.0 * g)) and a2[31] == a2[30]
    np.testing.assert_allclose(b.leaf_weights(np.ones(64))[1:-1], 1.0)  # open fan unchanged
    # partial openings, centred intervals: leaf 20 open 0.9, neighbours 0.4 and 0.1 -> isolated 0.5
    f = np.zeros(64)
    f[19], f[20], f[21] = 0.4, 0.9, 0.1
    a = b.leaf_weights(f)
    assert a[20] == pytest.approx((0.9 - h * 0.5 + g * (0.4 + 0.1)) / (1 + 2 * g) + t * 0.1)
    assert a[19] == pytest.approx((0.4 - h * 0.0 + g * 0.4) / (1 + 2 * g) + t * 0.6)  # never isolated (0.4 < 0.9)
    # the isolated leaf's output falls linearly in h and the engines' weights stay >= 0 up to h -> 1
    assert b.replace(isolated_leaf_output_loss=0.999).leaf_weights(single)[30] > 0.0


def test_isolated_leaf_loss_validation_and_machine_file(tmp_path):
    import json

    from tomodose.terma.beam_model import load_machine_parameters

    b = BeamModel.nominal()
    for bad in (-0.1, 1.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="isolated_leaf_output_loss"):
            b.replace(isolated_leaf_output_loss=bad)
    p = tmp_path / "m.json"
    p.write_text(json.dumps({"format": "tomodose-machine", "name": "iso",
                             "beam_model": {"isolated_leaf_output_loss": 0.0625, "adjacent_leaf_output_gain": 0.01}}))
    assert load_machine_parameters(p)["beam_model"]["isolated_leaf_output_loss"] == 0.0625
    m = BeamModel.from_machine_file(p)
    assert m.isolated_leaf_output_loss == 0.0625 and m.adjacent_leaf_output_gain == 0.01
    assert hash(m) != hash(m.replace(isolated_leaf_output_loss=0.0))
    # the shipped machine file sets it (fitted by kernels/commission_la4.py)
    assert "isolated_leaf_output_loss" in load_machine_parameters()["beam_model"]
