import numpy as np
import pytest

from tomodose.delivery.machine import TomoMachine
from tomodose.delivery.plan import HelicalPlan, ProjectionSequence, modulation_factor


def make_plan(**kw):
    args = dict(sinogram=np.full((102, 64), 0.5), field_width_mm=25.0, pitch=0.3, gantry_period_s=15.0)
    args.update(kw)
    return HelicalPlan(**args)


def test_machine_defaults():
    m = TomoMachine()
    assert m.sad_mm == 850 and m.n_leaves == 64 and m.projections_per_rotation == 51
    assert m.fan_width_mm == pytest.approx(400.0)
    e = m.leaf_edges_mm()
    assert e[0] == pytest.approx(-200) and e[-1] == pytest.approx(200) and e[32] == pytest.approx(0)
    assert m.real_fwhm_mm(25) == pytest.approx(25.1)


def test_couch_travel_per_rotation_is_pitch_times_field_width():
    p = make_plan(pitch=0.287, field_width_mm=50.0, couch_start_mm=-12.0)
    assert p.couch_travel_per_rotation_mm == pytest.approx(0.287 * 50)
    c = p.couch_mm
    np.testing.assert_allclose(c[51] - c[0], 0.287 * 50)
    assert c[0] == pytest.approx(-12.0 + 0.5 * 0.287 * 50 / 51)
    assert p.couch_speed_mm_s == pytest.approx(0.287 * 50 / 15.0)


def test_projection_angles_and_times():
    p = make_plan(start_angle_deg=10.0)
    step = 360 / 51
    np.testing.assert_allclose(p.gantry_angle_deg[:3], 10 + step * np.array([0.5, 1.5, 2.5]))
    assert p.gantry_angle_deg[51] == pytest.approx(p.gantry_angle_deg[0])
    assert np.all((p.gantry_angle_deg >= 0) & (p.gantry_angle_deg < 360))
    np.testing.assert_allclose(p.projection_time_s[:2], [15 / 51 * 0.5, 15 / 51 * 1.5])
    assert p.treatment_time_s == pytest.approx(102 * 15 / 51)
    assert p.n_rotations == pytest.approx(2.0)


def test_leaf_open_times_and_modulation_factor():
    sino = np.zeros((51, 64))
    sino[0, 10] = 1.0
    sino[1, 11] = 0.5
    p = make_plan(sinogram=sino)
    np.testing.assert_allclose(p.leaf_open_time_s[0, 10], 15 / 51)
    assert p.modulation_factor == pytest.approx(1.0 / 0.75)
    assert modulation_factor(np.zeros((3, 3))) == 0.0


def test_projection_sequence_from_plan_matches_timeline():
    p = make_plan()
    s = p.projections()
    assert isinstance(s, ProjectionSequence)
    np.testing.assert_allclose(s.gantry_angle_deg, p.gantry_angle_deg)
    np.testing.assert_allclose(s.couch_mm, p.couch_mm)
    np.testing.assert_allclose(s.arc_deg, 360 / 51)
    np.testing.assert_allclose(s.couch_travel_mm, 0.3 * 25 / 51)
    assert s.treatment_time_s == pytest.approx(p.treatment_time_s)


def test_static_beams():
    s = ProjectionSequence.static_beams([0, 90, 180], 1.0, 10.0, 50.0)
    assert s.n_projections == 3
    np.testing.assert_array_equal(s.arc_deg, 0)
    assert s.leaf_open_fraction.shape == (3, 64)


@pytest.mark.parametrize(
    "kw, err, match",
    [
        (dict(pitch=0.0), ValueError, "pitch must be > 0, got 0.0"),
        (dict(pitch=-0.2), ValueError, "pitch must be > 0, got -0.2"),
        (dict(pitch=float("nan")), ValueError, "pitch must be finite, got nan"),
        (dict(gantry_period_s=0.0), ValueError, r"gantry_period_s must be in \[11.8, 60.0\], got 0.0"),
        (dict(gantry_period_s=100.0), ValueError, r"gantry_period_s must be in \[11.8, 60.0\], got 100.0"),
        (dict(field_width_mm=30.0), ValueError, r"field_width_mm must be one of the machine's nominal jaw widths \[10.0, 25.0, 50.0\], got 30.0"),
        (dict(sinogram=np.full((5, 64), 1.2)), ValueError, "sinogram must be <= 1.0, got maximum 1.2"),
        (dict(sinogram=np.full((5, 64), -0.1)), ValueError, "sinogram must be >= 0.0, got minimum -0.1"),
        (dict(sinogram=np.full((5, 63), 0.5)), ValueError, r"sinogram must have shape \(n_projections >= 1, 64\), got \(5, 63\)"),
        (dict(sinogram=np.full((5, 64), np.nan)), ValueError, "sinogram must be finite, got 320 NaN/inf"),
        (dict(n_fractions=0), ValueError, "n_fractions must be a positive integer, got 0"),
        (dict(patient_position="XYZ"), ValueError, "patient_position must be one of"),
        (dict(prescriptions={"PTV": -3}), ValueError, r"prescriptions\['PTV'\] \(Gy\) must be > 0, got -3.0"),
        (dict(isocentre_lps_mm=(0, 0)), ValueError, r"isocentre_lps_mm must have shape \(3\), got \(2,\)"),
    ],
)
def test_plan_bad_input(kw, err, match):
    with pytest.raises(err, match=match):
        make_plan(**kw)


def test_couch_speed_limit():
    with pytest.raises(ValueError, match="couch speed"):
        make_plan(pitch=5.0, field_width_mm=50.0, gantry_period_s=12.0)


def test_sequence_bad_input():
    with pytest.raises(ValueError, match="duration_s must be > 0"):
        ProjectionSequence.static_beams([0], 1.0, 0.0, 25.0)
    with pytest.raises(ValueError, match=r"leaf_open_fraction must have shape \(1, 64\)"):
        ProjectionSequence(np.array([0.0]), np.array([0.0]), np.ones((1, 10)), np.array([1.0]), 25.0)
    with pytest.raises(ValueError, match="machine must be|n_leaves must be a positive integer"):
        TomoMachine(n_leaves=0)


def test_covering_plan_spans_target_plus_field():
    p = HelicalPlan.covering(lambda n, m: np.ones((n, m)), 40.0, -60.0, field_width_mm=25.0,
                             pitch=0.3, gantry_period_s=20.0)
    beam_plane_z = p.isocentre_lps_mm[2] - p.couch_mm  # HFS
    assert beam_plane_z[0] > 40 + 25 - 1 and beam_plane_z[-1] < -60 - 25 + 1
