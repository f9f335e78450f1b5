"""The engines against the ompMC reference of the liver phantom under a helical plan (issue 8.2).

``validation/references/liver_helical.h5`` (``validation/generate_mc_references.py``, case
``liver_helical``): the synthetic liver phantom (``liver_default`` anatomy on a 5 mm grid, z
cropped to [-75, 95] mm; the engine computes on the same cropped phantom) under the demo's kind of
delivery (jaw 25 mm, pitch 0.43, conformal sinogram: every leaf that sees the PTV open), in the
engines' ideal preset, absolutely calibrated like every other reference (Gy per fraction).

Checks (never loosened; a failing engine is ``xfail(strict=True)`` with the measured number):

* gamma 2 %/2 mm, global (MC maximum of the evaluated region), 10 % cut-off, >= 98 % (issue 8),
  on 2 x 2 x 2 merged voxels (``HELICAL_MERGE``, mass-weighted, as for the helical cylinder: the
  per-5-mm-voxel Monte Carlo noise would otherwise dominate a 2 % criterion); air excluded;
* PTV mean dose (occupancy-weighted mean over the PTV voxels) within 2 % of the Monte Carlo
  (the dose criterion of the same gamma test; the Monte Carlo 1-sigma of the PTV mean is ~0.1 %).
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest

from tomodose.evaluation.reference import (
    HELICAL_MERGE,
    REFERENCE_DIR,
    compare_gamma,
    engine_dose,
    load_reference,
    merge_bins,
)

CASE = "liver_helical"
ENGINES = ("collapsed_cone", "pencil_beam")
PTV_MEAN_TOLERANCE_PCT = 2.0
GAMMA_MIN_PASS_PCT = 98.0

#: (engine, check) -> measured result that misses the tolerance (see docs/validation.md).
#: Measured 2026-11-29 00:17 UTC (f033841, CCC with the energy-group TERMA of bf59e70): gamma
#: 98.5 % (CCC) and 99.9 % (PB), PTV mean +1.04 % (CCC) and -0.49 % (PB): no known failure.
#: CCC re-measured 2026-11-29 00:50 UTC with voxel-averaged TERMA: gamma 99.98 %, PTV mean +0.71 %.
#: Re-measured 2026-11-29 03:00 UTC with the reference regenerated for the T0 = 6.0 MeV default spectrum (and the
#: kernel tables re-derived from it): gamma 99.94 % (CCC) and 99.63 % (PB), PTV mean +0.81 % (CCC) and -0.33 % (PB).
#: Re-measured 2026-11-29 03:25 UTC with the merged engines (derive_ccc_kernels 1.4 tables, TERMA trace_sharing=
#: "angle", pencil beam voxel average + medium ends): gamma 100.0 % (CCC) and 99.98 % (PB), PTV mean -0.31 % (CCC)
#: and -0.55 % (PB).
#: Re-measured 2026-11-30 (session 11) with the reference regenerated with the medium of the engines' dominant
#: material (ICRU tissue for the liver's 1.03-1.06 g/cm3, was water; validation/notes.md): gamma 100.0 % (CCC) and
#: 99.96 % (PB), PTV mean -0.02 % (CCC) and -0.43 % (PB) (-0.70 / -1.11 % on the water-medium reference).
KNOWN_FAILURES: dict[tuple[str, str], str] = {}


def _params(checks):
    out = []
    for e in ENGINES:
        for k in checks:
            marks = [pytest.mark.slow]
            reason = KNOWN_FAILURES.get((e, k))
            if reason:
                marks.append(pytest.mark.xfail(strict=True, reason=f"measured {reason}"))
            out.append(pytest.param(e, k, marks=marks, id=f"{e}-{k}"))
    return out


@functools.lru_cache(maxsize=None)
def _ref():
    return load_reference(REFERENCE_DIR / f"{CASE}.h5")


@functools.lru_cache(maxsize=None)
def _engine(engine):
    return engine_dose(_ref(), engine, progress=False)


@functools.lru_cache(maxsize=None)
def _ptv_weights():
    # the tally bins are the phantom's own voxels: the PTV occupancy applies bin for bin
    p = _ref().patient()
    assert p.grid.shape == _ref().dose_gy.shape
    return np.asarray(p.structures["PTV"].occupancy, dtype=np.float64)


def _ptv_mean(dose):
    w = _ptv_weights()
    return float((np.asarray(dose, dtype=np.float64) * w).sum() / w.sum())


# --------------------------------------------------------------------------------------------
# the stored file
# --------------------------------------------------------------------------------------------
def test_liver_reference_holds_its_generation_settings():
    ref = _ref()
    s = ref.settings
    for key in ("ompmc_version", "histories", "seeds", "pegs_file", "ecut_mev", "pcut_mev", "n_batches", "n_split",
                "n_subsamples", "spectrum_name", "tomodose_commit", "cpu_s"):
        assert key in s, key
    assert s["scale"] == 1.0, "pilot run stored as a reference"
    assert s["n_subsamples"] == 8
    assert ref.analysis["type"] == "helical"
    assert ref.phantom["builder"] == "liver_phantom"
    assert ref.phantom["kwargs"]["spacing_mm"] == 5.0
    assert np.all(np.isfinite(ref.dose_gy)) and ref.dose_gy.max() > 0
    assert ref.dose_gy.shape == ref.rel_uncertainty.shape == ref.density_g_cm3.shape
    assert ref.is_uniform() and ref.grid().spacing_mm == (5.0, 5.0, 5.0)
    assert ref.path.stat().st_size <= 3e6, f"{ref.path.name} takes {ref.path.stat().st_size / 1e6:.2f} MB"


def test_liver_reference_is_calibrated_like_the_others():
    ref = _ref()
    other = load_reference(REFERENCE_DIR / "water_j50.h5")
    assert json.dumps(ref.calibration, sort_keys=True) == json.dumps(other.calibration, sort_keys=True)
    assert ref.spectrum.name == other.spectrum.name
    np.testing.assert_allclose(ref.spectrum.fluence, other.spectrum.fluence)


def test_liver_phantom_rebuilds_to_the_monte_carlo_densities():
    ref = _ref()
    p = ref.patient()  # raises when the builder no longer reproduces the stored densities
    assert p.grid.shape == ref.dose_gy.shape
    assert {"PTV", "Liver", "Body"} <= set(p.structures)


def test_liver_plan_is_the_conformal_helical_delivery():
    seq = _ref().sequence
    f = np.asarray(seq.leaf_open_fraction)
    assert seq.field_width_mm == 25.0
    assert set(np.unique(f)) <= {0.0, 1.0}
    assert 300 <= seq.n_projections <= 800
    assert np.ptp(seq.couch_mm) > 100.0  # the couch travels over the PTV (70 mm) + 2 field widths
    assert _ref().analysis["plan"]["pitch"] == pytest.approx(0.43)


def test_liver_monte_carlo_noise_is_small_where_compared():
    ref = _ref()
    _, mc, unc, rho = merge_bins(ref, ref.dose_gy, HELICAL_MERGE)
    body = rho >= 0.05
    hi = body & (mc >= 0.5 * mc[body].max())
    # the brief's goal: <= 1.5 % (1-sigma) on the compared (merged) bins of the high-dose region
    assert np.median(unc[hi]) <= 0.015, np.median(unc[hi])
    w = _ptv_weights()
    sig = np.sqrt(((ref.dose_gy * ref.rel_uncertainty * w) ** 2).sum()) / (ref.dose_gy * w).sum()
    assert sig < 0.005, sig
    # the PTV gets the high dose of the plan
    assert _ptv_mean(ref.dose_gy) >= 0.8 * mc[body].max()


# --------------------------------------------------------------------------------------------
# engines against Monte Carlo
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("engine, check", _params(("gamma",)))
def test_liver_helical_gamma_2_percent_2_mm(engine, check):
    g = compare_gamma(_ref(), _engine(engine), dose_percent=2.0, distance_mm=2.0, cutoff_percent=10.0,
                      merge=HELICAL_MERGE)
    assert g.pass_rate_percent >= GAMMA_MIN_PASS_PCT, \
        f"{CASE} {engine}: gamma 2%/2mm pass rate {g.pass_rate_percent:.1f} % (< {GAMMA_MIN_PASS_PCT:g} %)"


@pytest.mark.parametrize("engine, check", _params(("ptv_mean",)))
def test_liver_helical_ptv_mean_dose(engine, check):
    mc = _ptv_mean(_ref().dose_gy)
    ev = _ptv_mean(_engine(engine))
    diff = 100.0 * (ev - mc) / mc
    assert abs(diff) <= PTV_MEAN_TOLERANCE_PCT, \
        (f"{CASE} {engine}: PTV mean {ev:.4f} Gy vs MC {mc:.4f} Gy ({diff:+.2f} %, "
         f"tolerance {PTV_MEAN_TOLERANCE_PCT:g} %)")
