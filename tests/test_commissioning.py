"""Commissioned default machine vs the CheckTomo LA4 tables (issue 8.3).

The LA4 tables are GPL-3.0 data of one clinical unit: they are read at test time from
``../shared/data/tomotherapy/checktomo_LA4`` (the ``shared_data`` fixture skips when absent) and
never copied. The engine numbers come from tomodose itself (TERMA + collapsed cone in water, the
shipped kernel) on coarse grids; see ``kernels/commission_la4.py`` and ``docs/commissioning.md``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tomodose.terma import BeamModel
from tomodose.terma.beam_model import load_machine_parameters
from tomodose.terma.spectrum import default_spectrum
from tests._scripts import load_script

ROOT = Path(__file__).resolve().parents[1]


def _commission():
    return load_script("kernels/commission_la4.py")


@pytest.fixture(scope="module")
def com():
    return _commission()


@pytest.fixture(scope="module")
def la4(com, shared_data):
    return com.read_la4(shared_data)


# ---------------------------------------------------------------------------------------------
# machine file and presets (no shared data needed)
# ---------------------------------------------------------------------------------------------
def test_default_reads_the_machine_file():
    data = load_machine_parameters()
    b = BeamModel.default()
    for key, value in data["beam_model"].items():
        got = getattr(b, key)
        if isinstance(value, tuple):
            np.testing.assert_allclose(got, value)
        elif isinstance(value, dict):
            assert got == value
        else:
            assert got == pytest.approx(value)
    assert b.spectrum is default_spectrum()
    prov = data["provenance"]
    assert prov["script"] == "kernels/commission_la4.py" and prov["command"].startswith("python kernels/commission_la4.py")
    assert "agreement" in data


def test_ideal_is_unchanged_by_commissioning():
    b = BeamModel.ideal()
    assert (b.jaw_penumbra_sigma_mm, b.leaf_edge_sigma_mm, b.leaf_transmission, b.adjacent_leaf_output_gain,
            b.isolated_leaf_output_loss, b.offaxis_fluence_coeffs, b.offaxis_softening_per_rad,
            b.jaw_fwhm_mm) == (0.0, 0.0, 0.0, 0.0, 0.0, (), 0.0, None)


def test_machine_file_errors(tmp_path):
    p = tmp_path / "m.json"
    p.write_text(json.dumps({"format": "other", "beam_model": {}}))
    with pytest.raises(ValueError, match="format must be"):
        load_machine_parameters(p)
    p.write_text(json.dumps({"format": "tomodose-machine", "beam_model": {"colour": 1}}))
    with pytest.raises(ValueError, match="unknown beam_model entries"):
        load_machine_parameters(p)
    p.write_text(json.dumps({"format": "tomodose-machine", "beam_model": []}))
    with pytest.raises(ValueError, match="'beam_model' must be an object"):
        load_machine_parameters(p)
    with pytest.raises(FileNotFoundError, match="existing machine JSON"):
        load_machine_parameters(tmp_path / "missing.json")
    p.write_text(json.dumps({"format": "tomodose-machine", "name": "x", "beam_model": {"leaf_transmission": 0.01}}))
    b = BeamModel.from_machine_file(p)
    assert b.leaf_transmission == 0.01 and b.name == "x"


def test_write_machine_round_trip_keeps_history(com, tmp_path):
    """The machine file written by the fit carries every beam-model field (the isolated-leaf loss
    too) and keeps the earlier fits of the file it replaces under ``provenance.history``."""
    out = tmp_path / "m.json"
    b = BeamModel.default().replace(isolated_leaf_output_loss=0.05, adjacent_leaf_output_gain=0.01)
    for n in (1, 2, 3):
        com.write_machine(b.replace(leaf_edge_sigma_mm=float(n)), {"seeded_from": f"run {n}"}, {"summary": None},
                          {"summary": {"tpr_3_20cm_rms_pct": float(n)}}, out,
                          f"python kernels/commission_la4.py --stage after run {n}", t0_mev=6.0)
    data = json.loads(out.read_text())
    m = BeamModel.from_machine_file(out)
    assert (m.isolated_leaf_output_loss, m.adjacent_leaf_output_gain, m.leaf_edge_sigma_mm) == (0.05, 0.01, 3.0)
    assert m.jaw_output_factors == b.jaw_output_factors and m.jaw_fwhm_mm == b.jaw_fwhm_mm
    hist = data["provenance"]["history"]
    assert [h["command"][-5:] for h in hist] == ["run 1", "run 2"]
    assert [h["agreement"]["after"]["tpr_3_20cm_rms_pct"] for h in hist] == [1.0, 2.0]
    assert hist[0]["beam_model"]["leaf_edge_sigma_mm"] == 1.0 and "history" not in hist[1]["provenance"]
    assert data["provenance"]["fit_log"] == {"seeded_from": "run 3"}


def test_shipped_machine_keeps_earlier_fits():
    """The shipped machine file still records the earlier fits (T0 scans, agreement numbers)."""
    prov = load_machine_parameters()["provenance"]
    text = json.dumps(prov.get("history", []))
    assert "spectrum_scan_kernel_1_3" in text and "refit_2026_11_29_0241_kernel_1_3" in text


def test_shipped_machine_records_the_shipped_spectrum():
    """The machine file's spectrum record names the T0 of the spectrum the package ships (the
    2026-11-29 11:17 machine said 7.5 MeV while the shipped spectrum was the T0 = 6.0 MeV one)."""
    import re

    rec = load_machine_parameters()["spectrum"]
    name = default_spectrum().name
    t0 = float(re.search(r"T0=([0-9.]+) MeV", name).group(1))
    assert rec["electron_kinetic_energy_mev"] == pytest.approx(t0), (rec, name)
    assert f"--t0 {t0:g}" in rec["generator"]


# ---------------------------------------------------------------------------------------------
# LA4 reader
# ---------------------------------------------------------------------------------------------
def test_la4_reader(la4):
    assert sorted(la4) == [10, 25, 50]
    t = la4[50]["tpr"]
    assert t["table"].shape == (52, 17)
    k10 = int(np.argmin(abs(t["depths_cm"] - 10.0)))
    np.testing.assert_allclose(t["table"][k10], 1.0)
    for jaw, full in ((50, 1.0), (25, 0.921), (10, 0.749)):
        sp = la4[jaw]["sp"]
        assert sp["widths_cm"][-1] == 40.0 and sp["values"][-1] == pytest.approx(full)
    assert la4[50]["oarx_open"]["table"].shape == (51, 4)
    assert len(la4[25]["oary"]["tables"]) == 3 and la4[25]["oary"]["tables"][0].shape == (51, 5)
    assert len(la4[25]["oarx_leaves"]["tables"]) == 3


def test_la4_reader_errors(com, tmp_path):
    with pytest.raises(FileNotFoundError, match="must contain"):
        com.read_la4(tmp_path)


def test_la4_field_columns_name_the_tomotherapy_fields(com, la4):
    """13 of LA4's 17 TPR columns are the equivalent square of exactly one jaw x [SPdata] width."""
    sizes = la4[50]["tpr"]["sizes_cm"]
    cols = com.la4_field_columns(la4)
    assert len(cols) == 13
    for field, label in (((50, 40.0), 8.89), ((50, 20.0), 8.0), ((50, 10.0), 6.67), ((50, 5.0), 5.0),
                         ((25, 40.0), 4.71), ((25, 10.0), 4.0), ((10, 40.0), 1.95), ((10, 0.625), 0.769)):
        assert sizes[cols[field]] == pytest.approx(label)
    labels = {round(float(sizes[k]), 2) for k in cols.values()}
    assert not labels & {1.67, 3.33, 1.0, 2.1}  # two fields each (1 x 5 / 2.5 x 1.25, 2.5 x 5 / 5 x 2.5) or none


def _synthetic_la4(sp_wide: float):
    """Two fields of the 50 mm jaw (5 x 10, 5 x 40 cm), depths 2 / 10 / 20 cm; TPR of the wide field
    lower at 2 cm by 1 % and higher at 20 cm by 1 %; its Sp ``sp_wide`` against 1.0."""
    sizes = np.array([6.6667, 8.8889])
    table = np.array([[1.30, 1.30 * 0.99], [1.0, 1.0], [0.60, 0.606]])
    sp = {"widths_cm": np.array([10.0, 40.0]), "values": np.array([1.0, sp_wide])}
    la4 = {j: {"sp": {"widths_cm": np.array([]), "values": np.array([])}} for j in (10, 25)}
    la4[50] = {"tpr": {"depths_cm": np.array([2.0, 10.0, 20.0]), "sizes_cm": sizes, "table": table}, "sp": sp}
    return la4


def test_la4_nested_dose_ratio_flags_a_wider_field_with_less_dose(com):
    ok = com.la4_nested_dose_ratios(_synthetic_la4(1.02))
    assert [(r["width_a_cm"], r["width_b_cm"], r["depth_cm"]) for r in ok] == [(10.0, 40.0, 2.0), (10.0, 40.0, 10.0),
                                                                               (10.0, 40.0, 20.0)]
    np.testing.assert_allclose([r["ratio"] for r in ok], [1.02 * 0.99, 1.02, 1.02 * 1.01])
    bad = com.la4_nested_dose_ratios(_synthetic_la4(1.005))
    assert [r["depth_cm"] for r in bad if r["ratio"] < 1.0] == [2.0]
    assert com.la4_nested_dose_ratios(_synthetic_la4(1.005), min_depth_cm=5.0)[0]["depth_cm"] == 10.0


def test_la4_fan_columns_contradict_their_own_output_factors(com, la4):
    """The reason behind the jaw-50 shallow TPR xfails (docs/commissioning.md, *LA4's columns are
    tomotherapy fields*): with CheckTomo's own dose model ``Sp x TPR`` the LA4 tables give the 5 x 40 cm
    fan **less** central-axis dose than the 5 x 20 cm field it contains, by 0.94 % at 3 cm and 0.67 % at
    5 cm (2.5 x 40 vs 2.5 x 20 cm: 0.29 / 0.11 %); the 1 cm jaw's fields are consistent."""
    rows = com.la4_nested_dose_ratios(la4)

    def ratio(jaw, a, b, d):
        return next(r["ratio"] for r in rows if (r["jaw_mm"], r["width_a_cm"], r["width_b_cm"], r["depth_cm"]) ==
                    (jaw, a, b, d))

    assert 100 * (ratio(50, 20.0, 40.0, 3.0) - 1) == pytest.approx(-0.94, abs=0.01)
    assert 100 * (ratio(50, 20.0, 40.0, 5.0) - 1) == pytest.approx(-0.67, abs=0.01)
    assert 100 * (ratio(25, 20.0, 40.0, 3.0) - 1) == pytest.approx(-0.29, abs=0.01)
    assert min(r["ratio"] for r in rows if r["jaw_mm"] == 10 and r["depth_cm"] <= 30.0) >= 1.0

def test_jaw_output_factor_lookup_and_validation():
    from tomodose.delivery.machine import TomoMachine

    m = TomoMachine()
    b = BeamModel.nominal().replace(jaw_output_factors={10.0: 0.95, 25.0: 0.99, 50.0: 1.0})
    assert b.jaw_output_factor(10.0, m) == 0.95 and b.jaw_output_factor(50.0, m) == 1.0
    assert BeamModel.ideal().jaw_output_factor(10.0, m) == 1.0
    with pytest.raises(ValueError, match="no entry"):
        b.replace(jaw_output_factors={50.0: 1.0}).jaw_output_factor(25.0, m)
    with pytest.raises(ValueError, match="jaw_output_factors must be None or a dict"):
        b.replace(jaw_output_factors={})
    with pytest.raises(ValueError, match=r"jaw_output_factors\[10.0\]"):
        b.replace(jaw_output_factors={10.0: -1.0})


def test_reference_phantom_places_the_surface_at_ssd():
    from tomodose.delivery.machine import TomoMachine
    from tomodose.dose.calibration import ReferenceCondition, reference_phantom_grid
    from tomodose.geometry.frames import source_position_patient

    m = TomoMachine()
    for ssd in (850.0, 800.0):
        grid, iso = reference_phantom_grid(ReferenceCondition(ssd_mm=ssd), m)
        src = source_position_patient(0.0, 0.0, iso, m.sad_mm, "HFS")
        assert src[0] == pytest.approx(0.0) and src[2] == pytest.approx(0.0)
        assert 0.0 - src[1] == pytest.approx(ssd)  # the entrance surface is the plane y = 0


def test_point_doses_are_computed_in_a_tank_like_slab(com, monkeypatch):
    """The LA4 points (every fit stage and the checks below) sit in water reaching SLAB_REACH_MM
    beyond the jaw edge along the couch and 100 mm below the point: the tables are measured in a
    tank, and with the surface correction a 40 mm reach lost 0.3 % at 10 cm (docs/commissioning.md,
    *Phantom length*)."""
    from tomodose.geometry.grid import Grid

    seen = []

    def fake_water_dose(beam, kernel, jaw_mm, lof, ssd_mm, *, max_depth_mm, half_x_mm, half_z_mm,
                        spacing_mm=(5.0, 2.5, 2.5), machine=None, engine_options=None):
        assert engine_options is None  # the checks run the engine's static-beam defaults
        seen.append((jaw_mm, max_depth_mm, half_z_mm, float(np.sum(lof))))
        dx, dy, dz = spacing_mm
        grid = Grid.from_extent((-half_x_mm, dy / 2, -half_z_mm), (half_x_mm, max_depth_mm - dy / 2, half_z_mm),
                                (dx, dy, dz))
        return np.ones(grid.shape), grid

    monkeypatch.setattr(com, "water_dose", fake_water_dose)
    assert com.SLAB_REACH_MM >= 150.0
    for jaw, n in ((10, 1), (25, 64), (50, 8)):
        assert com.point_dose(None, None, jaw, n, 750.0, 100.0) == pytest.approx(1.0)
        assert seen[-1] == (jaw, 200.0, 0.5 * jaw + com.SLAB_REACH_MM, float(n))
    com.point_dose(None, None, 50, 64, 750.0, 100.0, reach_mm=40.0)
    assert seen[-1][2] == 65.0


# ---------------------------------------------------------------------------------------------
# issue 8's check: TPR within 1 % past d_max, output factors within 1 % (engine as shipped)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(com, shared_data):
    return BeamModel.default(), com.la4_kernel()  # the LA4 fields are static beams: the static kernel


# Measured with the engine as shipped (2026-11-30, session 12): energy-group TERMA, the 5-group kernel
# ccc_water_6mv_5groups, staggered azimuths, voxel-averaged TERMA, static beams on a 2x finer grid
# (static_supersample=2), the collapsed-cone surface correction (direction-weighted) and 16 azimuths per ring for
# static beams (engine defaults SURFACE_CORRECTION, STATIC_N_AZIMUTH). Since session 12 every point sits in a slab
# reaching SLAB_REACH_MM = 150 mm beyond the jaw edge along the couch (40 mm before: the surface correction took
# 0.3 % of scatter a tank gives back) and stage 2 was refitted there (g 0.0069, h 0.0533, jaw factors 0.9462 /
# 0.9915 / 1; docs/commissioning.md, *Refit in a tank-like slab*). T0 = 6.0 MeV; the scan in the long slab
# (5.75 / 6.0 / 6.25 MeV) is in the same section. Against the 40 mm slab the 25 mm jaw's 3 cm TPR now passes
# (+1.30 -> +0.96 %) and the 50 mm jaw's 20 cm TPR fails (+0.82 -> +1.51 %). A part that cannot meet 1 % is an
# xfail(strict=True) carrying its number and the reason, never a looser tolerance.
# Session 13 (2026-11-30): static beams use the 8-group, 17-ring kernel (STATIC_CCC_KERNEL_NAME; the Monte Carlo
# 10 mm jaw now passes, docs/collapsed_cone.md 4h); the machine was NOT refitted for it. Re-measured (before ->
# now): TPR jaw 50 at 3 / 5 / 20 cm +2.11 / +1.46 / +1.51 -> +2.07 / +1.48 / +1.76 %, jaw 10 at 3 cm +1.12 -> +1.32 %,
# jaw 25 at 3 cm +0.96 % (unchanged, passes); output 50 x 1 +5.19 -> +5.50 %, 25 x 2 +0.59 -> +0.94 % (passes);
# TPR 3-20 cm rms 0.96 -> 0.99 % (docs/commissioning.md, *Static kernel*).
# Session 14 (2026-11-30): 13 of LA4's 17 TPR columns are tomotherapy fields (jaw x [SPdata] width,
# com.la4_field_columns), so the 5 x 20 cm field (50 mm jaw, 32 leaves: column 8.0) is tested too. Against it
# the engine is +0.92 / +0.52 / +1.70 % at 3 / 5 / 20 cm, against the 5 x 40 cm fan +2.07 / +1.48 / +1.76 %, and
# LA4's own Sp x TPR gives the fan 0.94 / 0.67 % less dose at 3 / 5 cm than the 5 x 20 cm field inside it
# (docs/commissioning.md, *LA4's columns are tomotherapy fields*; kernels/study_la4_field_columns.py).
_TPR_FAN50 = ("TPR({} cm)/TPR(10 cm), 5 x 40 cm fan: engine {} % vs LA4's 8.89 cm column, which contradicts "
              "LA4's own output factors: with CheckTomo's dose model Sp x TPR the fan gets 0.94 / 0.67 % less dose "
              "at 3 / 5 cm than the 5 x 20 cm field it contains (test_la4_fan_columns_contradict_their_own_"
              "output_factors); against the 5 x 20 cm column the engine is +0.92 / +0.52 % (passes); "
              "docs/commissioning.md, *LA4's columns are tomotherapy fields*")
_TPR_JAW10 = ("TPR(3 cm)/TPR(10 cm), jaw 10 mm: engine {} % vs LA4, and +1.34 % for the 1 x 10 cm field: the "
              "excess follows the 10 mm jaw, not the open width (jaws 25 / 50 up to 20 cm wide: +0.58 to +0.92 %); "
              "a harder spectrum lowers the 3 cm TPR by 0.45-0.73 % per 0.25 MeV of T0 but raises the 20 cm points "
              "by 0.67-0.83 %, which the 50 mm jaw cannot take (docs/commissioning.md, *Spectrum weights* and "
              "*LA4's columns are tomotherapy fields*)")
_TPR_DEEP = ("TPR(20 cm)/TPR(10 cm), 5 x {} cm: engine {} % vs LA4; the engine's 20 cm TPR grows by 3.3 % from the "
             "5 x 5 cm field (which passes at -0.58 %) to 5 x 20 cm, LA4's by 1.0 %, and ompMC confirms the engine's "
             "growth in the ideal beam to 0.45 +- 0.57 % (kernels/study_la4_field_growth_mc.py); a softer spectrum "
             "lowers the 20 cm TPR by 0.67-0.83 % per 0.25 MeV of T0 and raises the 3 cm points by 0.45-0.73 % "
             "(docs/commissioning.md, *LA4's columns are tomotherapy fields*)")
TPR_XFAIL = {(50, 64, 3.0): _TPR_FAN50.format(3, "+2.07"), (50, 64, 5.0): _TPR_FAN50.format(5, "+1.48"),
             (50, 64, 20.0): _TPR_DEEP.format(40, "+1.76"), (50, 32, 20.0): _TPR_DEEP.format(20, "+1.70"),
             (10, 64, 3.0): _TPR_JAW10.format("+1.32")}
_OF_SINGLE = ("{} leaf, jaw {} mm: engine {} % vs LA4 with the fitted isolated-leaf output loss h = 0.0533; LA4's "
              "single leaf is jaw-inconsistent with the engine (single/pair output 0.876 at jaw 10, 0.773 at jaw 50 "
              "against 0.89 / 0.87 in the engine without leaf effects), so one h leaves jaw 10 -7.6 %, jaw 25 +4.0 %, "
              "jaw 50 +5.5 % (static 8-group kernel, machine fitted with the 5-group one); see docs/commissioning.md")
OF_XFAIL = {(50, 1): _OF_SINGLE.format(1, 50, "+5.50")}


def _param(table, key, *values):
    reason = table.get(key)
    marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
    return pytest.param(*values, marks=marks, id=str(key))


TPR_CASES = [(50, 64), (50, 32), (25, 64), (10, 64)]
TPR_DEPTHS_CM = (3.0, 5.0, 20.0)


_TPR_NORM: dict = {}


@pytest.mark.slow
@pytest.mark.parametrize("jaw, n_open, depth_cm", [
    _param(TPR_XFAIL, (jaw, n, d), jaw, n, d) for jaw, n in TPR_CASES for d in TPR_DEPTHS_CM])
def test_tpr_within_one_percent_past_dmax(com, la4, engine, jaw, n_open, depth_cm):
    beam, kernel = engine
    if (jaw, n_open) not in _TPR_NORM:  # dose under 10 cm, shared by the depths of a field
        _TPR_NORM[(jaw, n_open)] = com.point_dose(beam, kernel, jaw, n_open, 750.0, 100.0)
    d_mm = 10.0 * depth_cm
    e = com.point_dose(beam, kernel, jaw, n_open, 850.0 - d_mm, d_mm) / _TPR_NORM[(jaw, n_open)]
    s = com.equivalent_square_cm(jaw / 10.0, n_open * com.LEAF_MM / 10.0)
    r = com.la4_tpr(la4, s, [depth_cm])[0]
    assert e == pytest.approx(r, rel=0.01), f"TPR({depth_cm} cm, {s:.2f} cm) engine {e:.4f} LA4 {r:.4f}"


OF_CASES = [(10, 64), (25, 64), (50, 8), (50, 4), (10, 8), (50, 16), (25, 2), (50, 1)]


@pytest.fixture(scope="module")
def of_reference(com, engine):
    beam, kernel = engine
    return com.point_dose(beam, kernel, 50, 64, 750.0, 100.0)


def _terma_applies_jaw_factor() -> bool:
    """Whether compute_terma multiplies the fluence by ``BeamModel.jaw_output_factor``."""
    from tomodose.delivery.plan import ProjectionSequence
    from tomodose.geometry.grid import Grid, ImageVolume
    from tomodose.terma import compute_terma

    grid = Grid.from_extent((-10, 0, -10), (10, 20, 10), (5, 5, 5))
    vol = ImageVolume(grid, np.ones(grid.shape, np.float32), "g/cm3")
    seq = ProjectionSequence.static_beams([0.0], np.ones((1, 64)), 1.0, 10.0, isocentre_lps_mm=(0.0, 10.0, 0.0))
    b = BeamModel.nominal()
    t1 = compute_terma(vol, seq, b, n_subsamples=1, progress=False).total
    t2 = compute_terma(vol, seq, b.replace(jaw_output_factors={10.0: 0.5, 25.0: 1.0, 50.0: 1.0}),
                       n_subsamples=1, progress=False).total
    assert t1.max() > 0, "probe TERMA is empty"
    return bool(np.allclose(t2, 0.5 * t1, rtol=1e-6))


def test_engines_apply_the_jaw_factor():
    """TERMA and the pencil beam scale the whole fluence by the jaw's head-scatter factor."""
    from tomodose.delivery.plan import ProjectionSequence
    from tomodose.geometry.grid import Grid, ImageVolume
    from tomodose.transport.pencil_beam import pencil_beam_dose

    assert _terma_applies_jaw_factor()
    grid = Grid.from_extent((-10, 0, -10), (10, 20, 10), (5, 5, 5))
    vol = ImageVolume(grid, np.ones(grid.shape, np.float32), "g/cm3")
    seq = ProjectionSequence.static_beams([0.0], np.ones((1, 64)), 1.0, 10.0, isocentre_lps_mm=(0.0, 10.0, 0.0))
    b = BeamModel.nominal()
    d1 = pencil_beam_dose(vol, seq, b, progress=False)
    d2 = pencil_beam_dose(vol, seq, b.replace(jaw_output_factors={10.0: 0.5, 25.0: 1.0, 50.0: 1.0}), progress=False)
    assert d1.max() > 0
    np.testing.assert_allclose(d2, 0.5 * d1, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("jaw, n_open", [_param(OF_XFAIL, (jaw, n), jaw, n) for jaw, n in OF_CASES])
def test_output_factor_within_one_percent(com, la4, engine, of_reference, jaw, n_open):

    beam, kernel = engine
    e = com.point_dose(beam, kernel, jaw, n_open, 750.0, 100.0) / of_reference
    n_all, la = com.la4_output_factors(la4, jaw)
    r = float(la[int(np.flatnonzero(n_all == n_open)[0])])
    assert e == pytest.approx(r, rel=0.01), f"OF(jaw {jaw}, {n_open} leaves) engine {e:.4f} LA4 {r:.4f}"


def test_field_columns_study_picks_each_fields_own_column(la4):
    """kernels/study_la4_field_columns.py: the exact column of a field, never a neighbour's or a shared one."""
    study = load_script("kernels/study_la4_field_columns.py")
    assert study.parse_fields("50x32, 10x16") == [(50, 32), (10, 16)]
    for bad in ("40x16", "50x65", "50x0"):
        with pytest.raises(ValueError, match="fields"):
            study.parse_fields(bad)
    label, tpr = study.column_tpr(la4, 50, 32, [3.0, 10.0])
    assert label == pytest.approx(8.0)
    t = la4[50]["tpr"]
    assert tpr[1] == pytest.approx(1.0) and tpr[0] == pytest.approx(t["table"][21, 15])
    with pytest.raises(ValueError, match="no LA4 column"):
        study.column_tpr(la4, 25, 8, [3.0])  # 2.5 x 5 cm shares 3.33 with 5 x 2.5 cm


# ---------------------------------------------------------------------------------------------
# kernels/study_la4_spectrum_minimax.py: the linear programs (synthetic; no engine run)
# ---------------------------------------------------------------------------------------------
def test_spectrum_minimax_balances_two_conflicting_points():
    """Two points share one mixture ratio x of two groups (ratios 1.0 and 1.2) but want 1.05 and 1.15:
    the minimax deviation balances them, x (1/1.05 + 1/1.15) = 2, t* = x/1.05 - 1 = 4.546 %; one point
    alone is met exactly (t* = 0); a target outside the groups' range is out of reach within bounds."""
    mm = load_script("kernels/study_la4_spectrum_minimax.py")
    rows_d = np.array([[1.0, 1.2], [1.0, 1.2]])
    rows_n = np.ones((2, 2))
    shares = np.array([0.5, 0.5])
    t, s = mm.minimax(rows_d, rows_n, np.array([1.05, 1.15]), shares, [(0, None)] * 2)
    x = 2.0 / (1 / 1.05 + 1 / 1.15)
    assert t == pytest.approx(x / 1.05 - 1.0, abs=2e-5)
    assert (s @ rows_d[0]) / (s @ rows_n[0]) == pytest.approx(x, abs=1e-4)
    assert s @ shares == pytest.approx(1.0)
    t1, _ = mm.minimax(rows_d[:1], rows_n[:1], np.array([1.05]), shares, [(0, None)] * 2)
    assert t1 < 2e-5
    # within s in [1/1.1, 1.1] the ratio stays near 1.1: 1.05 needs a larger deviation than without bounds
    tb, sb = mm.minimax(rows_d[:1], rows_n[:1], np.array([1.05]), shares, [(1 / 1.1, 1.1)] * 2)
    assert np.all(sb >= 1 / 1.1 - 1e-9) and np.all(sb <= 1.1 + 1e-9)
    s1 = 1 / 1.1  # the least group 1 the bounds allow; shares . s = 1 then sets s0 = 2 - s1 (< 1.1)
    lo = ((2 - s1) * 1.0 + s1 * 1.2) / 2.0  # the smallest ratio within the bounds
    assert tb == pytest.approx(lo / 1.05 - 1.0, abs=2e-5)
    assert mm.feasible(0.001, rows_d, rows_n, np.array([1.3, 1.3]), shares, [(0, None)] * 2) is None


def test_spectrum_minimax_weights_are_anchored_to_the_tested_tpr():
    """At the shipped weights (s = 1) the study's TPR is the test geometry's, whatever the basis runs
    give; a group weight moves it by the basis ratio only."""
    mm = load_script("kernels/study_la4_spectrum_minimax.py")
    key, norm = (50, 64, 3.0), (50, 64, 10.0)
    groups = {key: np.array([0.6, 0.9]), norm: np.array([0.5, 0.5])}
    basis = {key: 1.5, norm: 1.0}
    test = {key: 1.3, norm: 1.0}
    assert mm.tpr_of_weights([1, 1], groups, basis, test, [key])[0] == pytest.approx(1.3)
    assert mm.tpr_of_weights([2, 0], groups, basis, test, [key])[0] == pytest.approx(1.3 * (1.2 / 1.0) / 1.5)


def test_spectrum_minimax_group_masks_partition_the_spectrum():
    """The group spectra of the kernel's edges cover every bin once, their energy-fluence shares sum to 1,
    and weights of 1 give back the shipped spectrum."""
    mm = load_script("kernels/study_la4_spectrum_minimax.py")
    sg = load_script("kernels/study_la4_spectrum_groups.py")
    spec = default_spectrum()
    edges = np.r_[0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, np.inf]
    shares = sg.group_shares(spec, edges)
    assert shares.size == 8 and shares.sum() == pytest.approx(1.0) and np.all(shares > 0)
    n = [sg.group_spectrum(spec, g, edges).energies_mev.size for g in range(8)]
    assert sum(n) == spec.energies_mev.size
    np.testing.assert_allclose(mm.weighted_spectrum(spec, np.ones(8), edges).fluence, spec.fluence)
    heavy = mm.weighted_spectrum(spec, np.r_[np.ones(7), 3.0], edges)
    assert mm.mean_energy_mev(heavy) > mm.mean_energy_mev(spec)


def test_fluence_minimax_rows_keep_the_profiles_and_a_positive_fluence():
    """kernels/study_la4_fluence_minimax.py: the OAR rows hold exactly when the basis profile's off-axis
    ratio is within eps of LA4; the positivity rows reject a fluence that turns negative in the fan."""
    fm = load_script("kernels/study_la4_fluence_minimax.py")
    assert fm.basis_coeffs(0, 3) == () and fm.basis_coeffs(2, 3) == (0.0, 1.0, 0.0)
    # basis: flat profile (1, 0.8) and one power adding (0, -0.2) per unit coefficient; LA4 OAR 0.7
    prof = np.array([[[1.0, 0.8]], [[0.0, -0.2]]])
    la = np.array([[1.0, 0.7]])
    rows = fm.oar_rows(prof, la, 0.01)
    for c, ok in ((0.5, True), (0.45, True), (0.0, False), (1.0, False)):
        assert bool(np.all(rows @ np.array([1.0, c]) <= 1e-12)) is ok, c
    pos = fm.positivity_rows(1)
    assert np.all(pos @ np.array([1.0, -4.0]) <= 1e-12)  # O = 1 - 4 theta reaches 0 at the fan edge
    assert np.any(pos @ np.array([1.0, -5.0]) > 0)  # negative beyond 0.2 rad


def test_spectrum_minimax_points_name_tested_points_only():
    mm = load_script("kernels/study_la4_spectrum_minimax.py")
    assert list(mm.FIELDS) == TPR_CASES and mm.DEPTHS_CM == TPR_DEPTHS_CM  # the studies follow the tests
    assert len(mm.tested_points()) == 12
    assert mm.tested_points("50x64@3, 50x64@5")[0] == (50, 64, 20.0)
    assert mm.parse_points("10x64@3") == [(10, 64, 3.0)]
    for bad in ("50x64@10", "40x64@3", "50x64", "x@"):
        with pytest.raises(ValueError, match="exclude"):
            mm.tested_points(bad)


def test_spectrum_minimax_smallest_box_is_the_least_reshaping_that_passes():
    """One point, groups with ratios 1.0 and 1.2, target 1.05: within [1/b, b] (shares 0.5 / 0.5) the
    smallest ratio is 1 + 0.1 / b, so t = 0 needs b = 2 and t = 1 % needs b = 0.1 / 0.0605."""
    mm = load_script("kernels/study_la4_spectrum_minimax.py")
    args = (np.array([[1.0, 1.2]]), np.ones((1, 2)), np.array([1.05]), np.array([0.5, 0.5]))
    b0, s0 = mm.smallest_box(*args, 0.0)
    assert b0 == pytest.approx(2.0, abs=2e-4) and s0[1] == pytest.approx(0.5, abs=1e-3)
    b1, _ = mm.smallest_box(*args, 0.01)
    assert b1 == pytest.approx(0.1 / (1.05 * 1.01 - 1.0), abs=2e-4)
    assert mm.smallest_box(*args, 0.0, b_hi=1.5) == (float("inf"), None)


def test_fluence_minimax_joint_alternation_uses_both_freedoms():
    """One point 10 % high: the spectrum box (x1.5, shares 0.5 / 0.5) can lower the TPR by the factor
    (2 / 3 + 0.9 x 4 / 3) / 2 / 0.95 and the fluence (c <= 0.5 by its row) by 1 - 0.1 c; together they
    reach 1.1 x both factors, which neither reaches alone."""
    fm = load_script("kernels/study_la4_fluence_minimax.py")
    spec = (np.array([[1.0, 0.9]]), np.ones((1, 2)), np.array([0.5, 0.5]), np.ones(2))
    flu = (np.array([[1.0, -0.1]]), np.array([[1.0, 0.0]]), np.array([1.0, 0.0]), np.array([1.0, 0.0]))
    rows = np.array([[-0.5, 1.0]])  # c <= 0.5
    t, s, x = fm.joint_alternating(spec, flu, np.array([1.0]), np.array([1.1]), rows, [(1 / 1.5, 1.5)] * 2)
    s_factor = (2 / 3 + 0.9 * 4 / 3) / 2 / 0.95
    assert t == pytest.approx(1.1 * s_factor * 0.95 - 1.0, abs=1e-4)
    assert x[1] == pytest.approx(0.5, abs=1e-4) and s[1] == pytest.approx(4 / 3, abs=1e-4)  # bisection to 1e-5
