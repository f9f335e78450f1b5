"""Upstream lateral density of the pencil beam (``lateral_scaling="upstream"``, docs/pencil_beam.md):
the numba sweep against its NumPy twin, closed forms, invariants and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.naive import pencil_beam as naive
from tomodose.delivery.plan import ProjectionSequence
from tomodose.geometry.frames import source_position_patient
from tomodose.geometry.grid import Grid, ImageVolume
from tomodose.terma import BeamModel
from tomodose.transport.pencil_beam import LATERAL_WINDOW_SCALE, _resolve, pencil_beam_dose


def _engine(rho, grid, angles, lateral_scaling="upstream"):
    seq = ProjectionSequence.static_beams(angles, np.ones(64), 1.0, 25.0)
    return _resolve(ImageVolume(grid, rho, "g/cm3", "mass density"), seq, BeamModel.ideal(), None, 1, 0.05, None,
                    lateral_scaling=lateral_scaling), seq


@pytest.mark.parametrize("angles", [[0.0, 10.0, 200.0], [95.0, 250.0, 300.0]])
def test_upstream_density_matches_naive_twin(angles):
    """Sweeps along y (gantry near 0 / 180) and x (near 90 / 270), from either side, against the
    voxel-by-voxel twin on a random phantom with air (no weight) and lung-like voxels."""
    rng = np.random.default_rng(5)
    g = Grid(shape=(3, 9, 8), spacing_mm=(6.0, 5.0, 4.0), origin_mm=(-21.0, -20.0, -4.0))
    rho = rng.uniform(0.0, 1.9, g.shape)
    rho[rho < 0.1] = 0.001
    eng, seq = _engine(rho, g, angles)
    rho_w = eng._dens_t.transpose(2, 0, 1)
    window = LATERAL_WINDOW_SCALE * eng.kernel.sigma_mm
    iso = np.asarray(seq.isocentre_lps_mm, float)
    for grp, ang in enumerate(eng.group_angles):
        s = source_position_patient(ang, 0.0, seq.isocentre_lps_mm, 850.0)
        along_y = abs(iso[1] - s[1]) >= abs(iso[0] - s[0])
        assert along_y == (math.cos(math.radians(ang)) ** 2 > 0.5)
        ref = naive.upstream_density(rho_w, g.origin_mm, g.spacing_mm, s[:2], window, along_y)
        got = eng.lateral_map(grp).transpose(2, 0, 1, 3)
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=0)


def test_homogeneous_medium_keeps_its_density_and_local_mode_is_the_voxel():
    g = Grid(shape=(2, 12, 7), spacing_mm=(5.0, 5.0, 5.0), origin_mm=(-15.0, -30.0, 0.0))
    for rho0 in (0.26, 1.0, 1.6):
        eng, _ = _engine(np.full(g.shape, rho0), g, [0.0, 130.0, 240.0])
        for grp in range(3):
            m = eng.lateral_map(grp)
            assert m.shape == (12, 7, 2, eng.kernel.sigma_mm.size)
            np.testing.assert_allclose(m, np.broadcast_to(eng.rho_t[..., None], m.shape), rtol=1e-12)
    eng, _ = _engine(np.full(g.shape, 0.5), g, [0.0], lateral_scaling="local")
    assert eng.lateral_map(0).shape == (12, 7, 2, 1) and np.array_equal(eng.lateral_map(0)[..., 0], eng.rho_t)


def test_central_column_behind_an_interface_follows_the_closed_form():
    """Gantry 0 (source at -y), the central column (x = 0: no lateral interpolation): water rows then
    lung rows. The recursion gives each step (previous centre -> centre) the density of its end voxel,
    so at lung row ``n`` (1 = first) the lung path is ``n dy``, the water path ``n_w dy``, and

        N = L / rho_l (1 - a) + a L / rho_w (1 - b),  W = L (1 - a) + a L (1 - b)
        a = exp(-rho_l n dy / L),  b = exp(-rho_w n_w dy / L)."""
    dy = 2.5
    n_w, n_l = 12, 30
    g = Grid(shape=(1, n_w + n_l, 3), spacing_mm=(5.0, dy, 5.0), origin_mm=(-5.0, -60.0, 0.0))
    rho_w_, rho_l = 1.0, 0.26
    rho = np.full(g.shape, rho_w_)
    rho[:, n_w:, :] = rho_l
    eng, _ = _engine(rho, g, [0.0])
    m = eng.lateral_map(0)[:, 1, 0, :]  # (ny, nG) central column
    f_l = float(eng._dens_t[n_w, 1, 0]) / rho_l  # lung's water-equivalent factor
    r_l = rho_l * f_l
    for gi, sig in enumerate(eng.kernel.sigma_mm):
        lg = LATERAL_WINDOW_SCALE * sig
        for n in (1, 4, 29):
            a = math.exp(-r_l * n * dy / lg)
            b = math.exp(-rho_w_ * n_w * dy / lg)
            num = lg / r_l * (1 - a) + a * lg / rho_w_ * (1 - b)
            den = lg * (1 - a) + a * lg * (1 - b)
            assert m[n_w - 1 + n, gi] == pytest.approx(max(den / num, 0.05), rel=1e-10)
    # far into the lung the narrow windows forget the water, the widest still remember it
    assert m[-1, 0] == pytest.approx(r_l, rel=1e-9)
    assert m[-1, -1] > 1.2 * r_l


def test_upstream_scaling_changes_only_heterogeneous_phantoms_and_is_deterministic():
    """Water: the upstream and the local scaling give the same dose (to rounding); a lung slab:
    different doses (the interface is smoothed); repeated runs are bitwise identical."""
    g = Grid(shape=(3, 16, 9), spacing_mm=(8.0, 5.0, 8.0), origin_mm=(-32.0, -40.0, -8.0))
    f = np.zeros((2, 64))
    f[:, 28:36] = 1.0
    seq = ProjectionSequence.static_beams([0.0, 90.0], f, 1.0, 25.0)
    water = ImageVolume(g, np.ones(g.shape), "g/cm3", "mass density")
    up = pencil_beam_dose(water, seq, BeamModel.ideal(), progress=False)
    loc = pencil_beam_dose(water, seq, BeamModel.ideal(), progress=False, lateral_scaling="local")
    np.testing.assert_allclose(up, loc, rtol=1e-6, atol=1e-9 * loc.max())
    rho = np.ones(g.shape)
    rho[:, 6:11, :] = 0.26
    lung = ImageVolume(g, rho, "g/cm3", "mass density")
    up = pencil_beam_dose(lung, seq, BeamModel.ideal(), progress=False)
    loc = pencil_beam_dose(lung, seq, BeamModel.ideal(), progress=False, lateral_scaling="local")
    assert np.abs(up - loc).max() > 0.01 * loc.max()
    assert np.array_equal(up, pencil_beam_dose(lung, seq, BeamModel.ideal(), progress=False))


def test_lateral_scaling_bad_input():
    g = Grid(shape=(2, 4, 3), spacing_mm=(5.0, 5.0, 5.0), origin_mm=(-5.0, -10.0, 0.0))
    dens = ImageVolume(g, np.ones(g.shape), "g/cm3", "mass density")
    seq = ProjectionSequence.static_beams([0.0], np.ones(64), 1.0, 25.0)
    with pytest.raises(ValueError, match=r"lateral_scaling must be one of \('upstream', 'local'\), got 'wide'"):
        pencil_beam_dose(dens, seq, progress=False, lateral_scaling="wide")
    with pytest.raises(ValueError, match="lateral_scaling must be one of"):
        pencil_beam_dose(dens, seq, method="fluence", progress=False, lateral_scaling=None)
