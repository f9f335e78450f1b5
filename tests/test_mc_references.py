"""The engines against the stored ompMC references (validation/references/*.h5).

Tolerances (issues 4 and 8, never loosened): water depth dose within 1 % beyond d_max (absolute
Gy, and normalised at 90-110 mm depth); profiles 2 % / 1 mm (dose difference as % of the central
dose, OR distance to agreement) at every depth and axis; slab depth doses within 3 % beyond
d_max (absolute, and normalised in the first water layer at 15-25 mm); helical gamma 2 %/2 mm
global, 10 % cut-off >= 98 %. Where an engine fails, the case is marked
``xfail(strict=True)`` with the measured number (KNOWN_FAILURES), so the failure stays visible
and the test turns red (XPASS) when the engine improves. How the references were made and what
they contain: docs/validation.md.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest

from tomodose.evaluation.reference import (
    HELICAL_MERGE,
    REFERENCE_DIR,
    bin_average,
    bins_within,
    compare_case,
    compare_depth_dose,
    compare_gamma,
    compare_profile,
    depth_normalisation_mm,
    engine_dose,
    load_reference,
    overlap_matrix,
)
from tomodose.geometry.grid import Grid, ImageVolume
from tests._scripts import load_script

WATER = ("water_j10", "water_j25", "water_j50")
SLABS = ("slab_lung", "slab_bone")
ENGINES = ("collapsed_cone", "pencil_beam")

#: (case, engine, check) -> measured result that misses the tolerance
#: measured 2026-11-29 11:17 UTC (4x-history water references, every reference recalibrated by water_j50; T0 = 6.0 MeV
#: spectrum). Collapsed cone: 5-group kernel, TERMA fluence maps and the shared direction set (512) for helical plans,
#: static beams on a 2x finer grid (static_supersample=2, default since 11:30 UTC: every water profile and the j10
#: normalised / j25 absolute depth doses pass; docs/collapsed_cone.md 4f). Pencil beam: exact path, voxel-averaged
#: profiles, medium ends, kernel 1.2 with the Monte Carlo surface correction and the exit (missing backscatter)
#: table (docs/pencil_beam.md; the j10/j25 depth doses and the j50 normalised one pass). Both engines calibrated at the
#: nominal condition. Slabs re-measured 13:30 UTC against their 6x-history references (3 M histories; the 500 k ones
#: had a depth-bin 1-sigma of up to 1.4 %: the collapsed cone's lung 3.2 % was Monte Carlo noise, 1.6 % now).
#: Session 9 (2026-11-29 evening): water_j50 and water_j10 regenerated with 4x the histories again (19.2 M / 11.2 M,
#: per-bin 1-sigma 0.23 / 0.25 %, every reference recalibrated, +0.006 %), and the collapsed cone's defaults turned on:
#: surface correction + 16 azimuths for static beams (docs/dose.md): water_j10 in Gy 1.55 -> 1.2 %, water_j50 in Gy
#: 0.8 %; the pencil beam's water_j50 in Gy (1.08 % on the lighter reference) passes at 0.75 %.
#: Session 13 (2026-11-30): static beams use the 8-group, 17-ring kernel (STATIC_CCC_KERNEL_NAME,
#: docs/collapsed_cone.md 4h): water_j10 in Gy 1.20 -> 0.88 % (mean -0.76 -> -0.56 %) passes; j25 0.66 %,
#: j50 0.55 %. No known failure is left.
#: validation/build_report.py prints this table from validation/results.json
KNOWN_FAILURES: dict[tuple[str, str, str], str] = {}


def _mark(case, engine, check):
    reason = KNOWN_FAILURES.get((case, engine, check))
    marks = [pytest.mark.slow] if engine == "collapsed_cone" or case.startswith("helical") else []
    if reason:
        marks.append(pytest.mark.xfail(strict=True, reason=f"measured {reason}"))
    return marks


def _params(cases, checks):
    return [pytest.param(c, e, k, marks=_mark(c, e, k), id=f"{c}-{e}-{k}")
            for c in cases for e in ENGINES for k in checks]


@functools.lru_cache(maxsize=None)
def _ref(name):
    return load_reference(REFERENCE_DIR / f"{name}.h5")


@functools.lru_cache(maxsize=None)
def _engine(name, engine):
    return engine_dose(_ref(name), engine, progress=False)


# --------------------------------------------------------------------------------------------
# the stored files
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", WATER + SLABS + ("helical_cylinder", "reference_outer"))
def test_reference_file_holds_its_generation_settings(name):
    ref = _ref(name)
    s = ref.settings
    for key in ("ompmc_version", "histories", "seeds", "pegs_file", "ecut_mev", "pcut_mev", "n_batches",
                "spectrum_name", "tomodose_commit"):
        assert key in s, key
    assert s["scale"] == 1.0, "pilot run stored as a reference"
    assert ref.calibration["gy_per_weight_unit"] > 0
    assert ref.calibration["rel_uncertainty"] < 0.01
    assert np.all(np.isfinite(ref.dose_gy)) and ref.dose_gy.max() > 0
    assert ref.dose_gy.shape == ref.rel_uncertainty.shape == ref.density_g_cm3.shape
    assert ref.sequence.n_projections >= 1
    assert ref.spectrum.n_bins > 1



def _generator():
    return load_script("validation/generate_mc_references.py")


def test_every_reference_has_the_medium_of_the_engines_material():
    """Each stored Monte Carlo voxel's medium is the generator's rule (the ompMC medium of the engine's
    dominant material at the voxel's density), so engine and reference agree on composition: e.g. the
    liver (1.03-1.06 g/cm3) is ICRU tissue, not water; 1.6 g/cm3 is bone; lung is lung."""
    import h5py

    gen = _generator()
    assert gen.medium_index(np.array([0.0012, 0.26, 0.95, 1.0, 1.06, 1.44, 1.6, 1.92])).tolist() == [
        gen.MEDIA.index(m) + 1 for m in ("AIR700ICRU", "LUNG700ICRU", "H2O700ICRU", "H2O700ICRU",
                                         "ICRUTISSUE700ICRU", "ICRUTISSUE700ICRU", "ICRPBONE700ICRU",
                                         "ICRPBONE700ICRU")]
    names = sorted(REFERENCE_DIR.glob("*.h5"))
    assert len(names) >= 8
    for path in names:
        with h5py.File(path, "r") as h:
            media = np.array(json.loads(h.attrs["media"]))
            stored = media[h["medium_index"][()].astype(int) - 1]
            rule = np.array(gen.MEDIA)[gen.medium_index(h["density_g_cm3"][()]) - 1]
        assert np.array_equal(stored, rule), (path.name, int((stored != rule).sum()))

def test_references_are_small():
    total = sum(p.stat().st_size for p in REFERENCE_DIR.glob("*.h5"))
    assert total < 20e6, f"references take {total / 1e6:.1f} MB"


@pytest.mark.parametrize("name", WATER)
def test_monte_carlo_noise_is_small_where_compared(name):
    ref = _ref(name)
    dd = compare_depth_dose(ref, ref.dose_gy)
    # largest 1-sigma of a depth bin beyond d_max: measured 0.42 / 0.36 / 0.64 % for jaws 50 / 25 / 10
    # (medians 0.25 / 0.19 / 0.29 %) with the 4x-history references of 2026-11-29 (0.6-0.9 % before);
    # the 1 % depth-dose tolerance is only meaningful while this stays well below it
    assert dd["mc_sigma_beyond_pct"] < 0.7, dd["mc_sigma_beyond_pct"]
    assert dd["max_abs_beyond_pct"] == 0.0


# --------------------------------------------------------------------------------------------
# the comparison tools
# --------------------------------------------------------------------------------------------
def test_overlap_matrix_rows_and_alignment():
    a = overlap_matrix([0.0, 2.5, 10.0], np.array([1.25, 3.75, 6.25, 8.75]), 2.5)
    np.testing.assert_allclose(a, [[1, 0, 0, 0], [0, 1 / 3, 1 / 3, 1 / 3]])
    np.testing.assert_allclose(overlap_matrix([-5.0, 5.0], np.array([0.0]), 5.0), [[0.5]])


def test_bin_average_is_exact_for_aligned_bins_and_conserves_the_mean():
    grid = Grid((4, 5, 6), (2.0, 2.0, 2.0), (1.0, 1.0, 1.0))
    arr = np.random.default_rng(3).random(grid.shape)
    vol = ImageVolume(grid, arr, "Gy", "dose")
    edges = (np.arange(7) * 2.0, np.arange(6) * 2.0, np.arange(5) * 2.0)
    np.testing.assert_allclose(bin_average(vol, edges), arr)
    coarse = bin_average(vol, ([0.0, 12.0], [0.0, 10.0], [0.0, 8.0]))
    assert coarse.shape == (1, 1, 1)
    assert coarse[0, 0, 0] == pytest.approx(arr.mean())


def test_bin_average_validates_its_inputs():
    grid = Grid((2, 2, 2), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    vol = ImageVolume(grid, np.ones(grid.shape), "Gy", "dose")
    with pytest.raises(TypeError, match="volume must be an ImageVolume"):
        bin_average(np.ones((2, 2, 2)), ([0, 1], [0, 1], [0, 1]))
    with pytest.raises(ValueError, match="x edges must be a strictly increasing"):
        bin_average(vol, ([1.0, 0.0], [0, 1], [0, 1]))
    with pytest.raises(ValueError, match="three edge arrays"):
        bin_average(vol, ([0, 1], [0, 1]))


def test_bins_within():
    np.testing.assert_array_equal(bins_within([0.0, 1.0, 2.0, 3.0], 0.5, 3.0), [1, 2])


def test_profile_distance_to_agreement_finds_a_known_shift():
    ref = _ref("water_j50")
    # the MC dose shifted by one 2.5 mm bin along x in the fine region: DTA ~2.5 mm at the edges
    shifted = np.roll(ref.dose_gy, 1, axis=2)
    p = compare_profile(ref, shifted, "x", 100.0, distance_mm=1.0)
    assert p["n_fail"] > 0
    p = compare_profile(ref, ref.dose_gy, "x", 100.0)
    assert p["pass_rate_pct"] == 100.0 and np.all(np.abs(p["dd_pct"]) < 1e-9)
    with pytest.raises(ValueError, match="axis"):
        compare_profile(ref, ref.dose_gy, "y", 100.0)
    with pytest.raises(ValueError, match="dose_percent"):
        compare_profile(ref, ref.dose_gy, "x", 100.0, dose_percent=0.0)


def test_load_reference_refuses_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_reference(tmp_path / "nope.h5")


def test_engine_dose_validates_its_inputs():
    with pytest.raises(TypeError, match="ref must be an McReference"):
        engine_dose("water_j50")
    with pytest.raises(ValueError, match="engine"):
        engine_dose(_ref("water_j50"), "magic")


# --------------------------------------------------------------------------------------------
# engines against Monte Carlo
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case, engine, check", _params(WATER, ("depth_abs", "depth_rel")))
def test_water_depth_dose_within_1_percent_beyond_dmax(case, engine, check):
    dd = compare_depth_dose(_ref(case), _engine(case, engine))
    worst = dd["max_abs_beyond_pct"] if check == "depth_abs" else dd["max_rel_beyond_pct"]
    assert worst <= 1.0, f"{case} {engine} {check}: max |diff| beyond d_max {worst:.2f} %"


@pytest.mark.parametrize("case, engine, check", _params(WATER, ("profiles",)))
def test_water_profiles_2_percent_1_mm(case, engine, check):
    ref = _ref(case)
    ev = _engine(case, engine)
    failures = []
    for axis in ("x", "z"):
        for depth in ref.analysis["profile_depths_mm"]:
            p = compare_profile(ref, ev, axis, depth, dose_percent=2.0, distance_mm=1.0)
            if p["n_fail"]:
                failures.append(f"{axis}@{depth:g} mm: {p['n_fail']} points (worst at {p['worst']['pos_mm']:.1f} mm)")
    assert not failures, f"{case} {engine}: " + "; ".join(failures)


@pytest.mark.parametrize("case, engine, check", _params(SLABS, ("depth_abs", "depth_rel")))
def test_slab_depth_dose_within_3_percent(case, engine, check):
    dd = compare_depth_dose(_ref(case), _engine(case, engine), normalise_mm=(15.0, 25.0))
    worst = dd["max_abs_beyond_pct"] if check == "depth_abs" else dd["max_rel_beyond_pct"]
    assert worst <= 3.0, f"{case} {engine} {check}: max |diff| beyond d_max {worst:.2f} %"


@pytest.mark.parametrize("case", ("slab_lung", "water_j25"))
def test_compare_case_normalises_as_the_tests(case):
    # the report's numbers (compare_case) are the tests' numbers: slabs 15-25 mm, water fans 90-110 mm
    ref = _ref(case)
    ev = _engine(case, "pencil_beam")
    norm = (15.0, 25.0) if case.startswith("slab") else (90.0, 110.0)
    assert depth_normalisation_mm(ref) == norm
    dd = compare_depth_dose(ref, ev, normalise_mm=norm)
    got = compare_case(ref, ev)["depth_dose"]
    for key in ("max_abs_beyond_pct", "max_rel_beyond_pct", "mean_rel_beyond_pct"):
        assert got[key] == dd[key], key


@pytest.mark.parametrize("case, engine, check", _params(("helical_cylinder",), ("gamma",)))
def test_helical_gamma_2_percent_2_mm(case, engine, check):
    # 2 x 2 x 2 voxels merged (10 mm, mass-weighted): the Monte Carlo noise per 5 mm voxel (~2 %)
    # would dominate a 2 % criterion; merged it is ~0.8 % (docs/validation.md)
    g = compare_gamma(_ref(case), _engine(case, engine), dose_percent=2.0, distance_mm=2.0, cutoff_percent=10.0,
                      merge=HELICAL_MERGE)
    assert g.pass_rate_percent >= 98.0, f"{case} {engine}: gamma 2%/2mm pass rate {g.pass_rate_percent:.1f} %"


def test_calibration_is_recorded_in_every_file():
    ks = {json.dumps(_ref(n).calibration, sort_keys=True) for n in WATER + SLABS + ("helical_cylinder", "liver_helical")}
    assert len(ks) == 1
