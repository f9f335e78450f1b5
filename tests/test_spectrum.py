"""Spectrum dataclass, EGSnrc reader/writer, shipped default spectrum (validated against published spectra)."""

from __future__ import annotations

import numpy as np
import pytest

from tomodose.terma import Spectrum, attenuation_table, read_egs_spectrum, write_egs_spectrum
from tomodose.terma.spectrum import default_spectrum


def test_reader_mode0_and_mode1(tmp_path):
    p0 = tmp_path / "a.spectrum"
    p0.write_text("title\n3 0.0 0\n1.0 1.0\n2.0 2.0\n4.0 1.0\n")
    s = read_egs_spectrum(p0)
    np.testing.assert_allclose(s.energies_mev, [0.5, 1.5, 3.0])
    np.testing.assert_allclose(s.fluence, [0.25, 0.5, 0.25])
    np.testing.assert_allclose(s.bin_edges_mev, [0, 1, 2, 4])
    assert s.name == "title"
    p1 = tmp_path / "b.spectrum"
    p1.write_text("per MeV\n3, 0.0, 1\n1.0 1.0\n2.0 2.0\n4.0 1.0\n")
    s1 = read_egs_spectrum(p1)
    np.testing.assert_allclose(s1.fluence, np.array([1.0, 2.0, 2.0]) / 5.0)


@pytest.mark.parametrize("mode", [0, 1])
def test_round_trip(tmp_path, mode):
    s = Spectrum(np.array([0.3, 1.0, 2.5]), np.array([3.0, 2.0, 1.0]), np.array([0.1, 0.5, 1.5, 3.5]), "x")
    p = tmp_path / "s.spectrum"
    write_egs_spectrum(s, p, mode=mode)
    r = read_egs_spectrum(p)
    np.testing.assert_allclose(r.fluence, s.fluence, rtol=1e-6)
    np.testing.assert_allclose(r.bin_edges_mev, s.bin_edges_mev, rtol=1e-6)


def test_derived_quantities():
    s = Spectrum(np.array([1.0, 3.0]), np.array([1.0, 1.0]))
    assert s.mean_energy_mev == pytest.approx(2.0)
    np.testing.assert_allclose(s.energy_fluence, [0.25, 0.75])
    assert s.mean_energy_fluence_weighted_mev == pytest.approx(2.5)
    t = Spectrum(np.array([1.0, 2.0, 3.0]), np.array([1.0, 0.0, 1.0])).trimmed()
    assert t.n_bins == 2
    m = Spectrum.monoenergetic(1.25)
    assert m.n_bins == 1 and m.mean_energy_mev == 1.25


@pytest.mark.parametrize(
    "text, match",
    [
        ("t\n", "title"),
        ("t\nabc\n1 1\n", "nbins Emin mode"),
        ("t\n2 0 2\n1 1\n2 1\n", "mode"),
        ("t\n3 0 0\n1 1\n2 1\n", "announces 3 bins"),
        ("t\n2 0 0\n1 1\n0.5 1\n", "edges"),
        ("t\n2 0 0\n1 -1\n2 1\n", "negative"),
        ("t\n2 0 0\n1 x\n2 1\n", "bad bin row"),
    ],
)
def test_reader_errors(tmp_path, text, match):
    p = tmp_path / "bad.spectrum"
    p.write_text(text)
    with pytest.raises(ValueError, match=match):
        read_egs_spectrum(p)


def test_reader_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="cannot be read"):
        read_egs_spectrum(tmp_path / "nope.spectrum")


def test_spectrum_validation():
    with pytest.raises(ValueError, match="energies_mev must be > 0"):
        Spectrum(np.array([0.0, 1.0]), np.array([1.0, 1.0]))
    with pytest.raises(ValueError, match="strictly increasing"):
        Spectrum(np.array([2.0, 1.0]), np.array([1.0, 1.0]))
    with pytest.raises(ValueError, match="positive sum"):
        Spectrum(np.array([1.0, 2.0]), np.array([0.0, 0.0]))
    with pytest.raises(ValueError, match="fluence must be >= 0"):
        Spectrum(np.array([1.0, 2.0]), np.array([-1.0, 2.0]))
    with pytest.raises(ValueError, match="inside its bin"):
        Spectrum(np.array([1.0, 2.0]), np.array([1.0, 1.0]), np.array([1.5, 1.8, 2.5]))
    with pytest.raises(ValueError, match="energy_mev must be > 0"):
        Spectrum.monoenergetic(-1.0)


def test_default_spectrum_properties():
    s = default_spectrum()
    # commissioned electron energy T0 = 6.0 MeV (kernels/commission_la4.py with the energy-group
    # engine, docs/commissioning.md): 0.25 MeV bins up to T0 (the 2026-11-28 fit with the single
    # polyenergetic kernel had T0 = 7.5 MeV: 30 bins, mean 1.481 MeV)
    assert s.n_bins == 24
    assert s.bin_edges_mev[-1] == pytest.approx(6.0)
    assert np.all(s.fluence > 0)
    # documented in tomodose/data/physics/tomo_6mv_fff.provenance.md
    assert s.mean_energy_mev == pytest.approx(1.261, abs=0.002)
    assert s.mean_energy_fluence_weighted_mev == pytest.approx(2.262, abs=0.002)


def _narrow_beam_mu_eff(spec: Spectrum, d1_cm=5.0, d2_cm=15.0) -> float:
    """Effective attenuation (1/cm) of the TERMA in water between two depths (narrow beam)."""
    tab = attenuation_table()
    mu = tab.mu_rho("water", spec.energies_mev)
    t = [np.sum(spec.energy_fluence * mu * np.exp(-mu * d)) for d in (d1_cm, d2_cm)]
    return float(np.log(t[0] / t[1]) / (d2_cm - d1_cm))


def test_published_spectra_read_and_compare(shared_data):
    """Validation only: the GPL/LGPL spectra are read at test time, never shipped or fitted."""
    folder = shared_data / "dose_physics" / "spectra"
    nrc = read_egs_spectrum(folder / "nrc_varian_clinac2100_6mv.spectrum")
    mohan = read_egs_spectrum(folder / "mohan6.spectrum")  # mode 1 (counts/MeV)
    elekta = read_egs_spectrum(folder / "cerr_6MVElekta_sheikhbagheri_rogers2002.spectrum")  # zero-width bin
    assert nrc.mean_energy_mev == pytest.approx(1.48, abs=0.01)
    assert mohan.mean_energy_mev == pytest.approx(1.90, abs=0.01)
    assert 1.5 < elekta.mean_energy_mev < 2.1
    # Beam quality of the default (documented in docs/terma.md): the effective attenuation of the
    # TERMA in water (5-15 cm) of the commissioned spectrum (fitted to the LA4 TPR) is 0.0594 /cm,
    # 9.5 % softer than the flattened NRC Clinac 6 MV beam (0.0542 /cm) and softer than Mohan and
    # S-B Elekta, less than the ~13 % that separates flattened and FFF 6 MV beams in TPR20,10
    # (0.665 vs 0.630 gives ln-ratio 0.41 vs 0.46).
    mu_def = _narrow_beam_mu_eff(default_spectrum())
    mu_nrc = _narrow_beam_mu_eff(nrc)
    assert mu_nrc < mu_def < 1.15 * mu_nrc
    assert mu_def > _narrow_beam_mu_eff(mohan) and mu_def > _narrow_beam_mu_eff(elekta)
