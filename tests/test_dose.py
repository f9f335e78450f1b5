"""Absolute dose API: calibration, fractions, linearity, helical grouping."""

import numpy as np
import pytest

from tomodose.delivery.plan import HelicalPlan, ProjectionSequence
from tomodose.dose import ReferenceCondition, compute_dose
from tomodose.dose.calibration import reference_phantom_grid, reference_projections
from tomodose.geometry.grid import Grid, ImageVolume
from tomodose.geometry.patient import PatientModel
from tomodose.geometry.structures import ellipsoid_mask

# a small reference condition keeps the calibration cheap in tests (the default is bigger)
SMALL_REF = ReferenceCondition(phantom_width_mm=200.0, phantom_depth_mm=100.0, phantom_length_mm=100.0,
                               spacing_mm=(5.0, 2.5, 5.0))


def water_patient(grid):
    return PatientModel(ImageVolume(grid, np.zeros(grid.shape, np.float32), "HU"), name="water")


def test_reference_condition_reproduces_the_dose_rate():
    # computing the reference field itself with the calibrated engine gives 8.5 Gy/min at 15 mm
    from tomodose.delivery.machine import TomoMachine

    machine = TomoMachine()
    grid, iso = reference_phantom_grid(SMALL_REF, machine)
    seq = reference_projections(SMALL_REF, machine, iso)
    seq60 = ProjectionSequence.static_beams([0.0], np.ones((1, 64)), 60.0, 50.0, isocentre_lps_mm=iso)
    d = compute_dose(water_patient(grid), seq60, reference=SMALL_REF, progress=False)
    kji = grid.lps_to_index([0.0, 15.0, 0.0])
    from scipy import ndimage

    value = ndimage.map_coordinates(d.per_fraction.array.astype(float), kji.reshape(3, 1), order=1)[0]
    assert value == pytest.approx(8.5, rel=1e-4)
    assert seq.duration_s[0] == 1.0


def test_dose_is_linear_in_beam_on_time_and_fractions():
    grid = Grid.from_extent((-60, 0, -40), (60, 80, 40), (5, 5, 5))
    pat = water_patient(grid)
    s1 = ProjectionSequence.static_beams([0.0], np.ones((1, 64)), 1.0, 25.0, isocentre_lps_mm=(0, 40, 0))
    s3 = ProjectionSequence.static_beams([0.0], np.ones((1, 64)), 3.0, 25.0, isocentre_lps_mm=(0, 40, 0))
    d1 = compute_dose(pat, s1, reference=SMALL_REF, progress=False).per_fraction.array
    d3 = compute_dose(pat, s3, reference=SMALL_REF, progress=False).per_fraction.array
    np.testing.assert_allclose(d3, 3 * d1, rtol=1e-5, atol=1e-7 * d3.max())
    closed = ProjectionSequence.static_beams([0.0], np.zeros((1, 64)), 1.0, 25.0, isocentre_lps_mm=(0, 40, 0))
    dz = compute_dose(pat, closed, reference=SMALL_REF, beam_model=_ideal(), progress=False)
    assert np.all(dz.per_fraction.array == 0)


def _ideal():
    from tomodose.terma.beam_model import BeamModel

    return BeamModel.ideal()


def test_total_is_fractions_times_per_fraction_and_metadata():
    grid = Grid.from_extent((-60, -60, -30), (60, 60, 30), (6, 6, 6))
    pat = water_patient(grid)
    plan = HelicalPlan(sinogram=np.full((51, 64), 0.5), field_width_mm=25.0, pitch=0.3, gantry_period_s=15.0,
                       n_fractions=10)
    d = compute_dose(pat, plan, reference=SMALL_REF, progress=False)
    np.testing.assert_allclose(d.total.array, 10 * d.per_fraction.array, rtol=1e-6)
    assert d.per_fraction.unit == "Gy" and d.engine == "collapsed_cone"
    assert d.metadata["calibration_gy_per_unit"] > 0


def test_bad_input():
    grid = Grid((3, 3, 3), (5, 5, 5))
    pat = water_patient(grid)
    seq = ProjectionSequence.static_beams([0.0], np.ones((1, 64)), 1.0, 25.0)
    with pytest.raises(ValueError, match="engine must be one of \\['collapsed_cone', 'pencil_beam'\\], got 'mc'"):
        compute_dose(pat, seq, engine="mc")
    with pytest.raises(TypeError, match="plan must be a HelicalPlan or ProjectionSequence"):
        compute_dose(pat, "plan")
    with pytest.raises(TypeError, match="patient must be a PatientModel"):
        compute_dose(np.zeros((3, 3, 3)), seq)
    ffs = ProjectionSequence.static_beams([0.0], np.ones((1, 64)), 1.0, 25.0, patient_position="FFS")
    with pytest.raises(ValueError, match="plan patient_position 'FFS' differs from the patient's 'HFS'"):
        compute_dose(pat, ffs)


@pytest.mark.slow
def test_angle_grouping_error_against_per_projection_transport():
    """Helical grouping (51 angle groups) vs transporting every projection with its own source.

    Measured on a water cylinder, 2 rotations, jaw 25 mm, pitch 0.43: the maximum difference in the
    high-dose region (> 50 % of max) must stay below 2 % of the maximum (MPPG 5.b in-field).
    """
    grid = Grid.from_extent((-80, -80, -40), (80, 80, 40), (5, 5, 5))
    x, y, _ = grid.meshgrid_mm()
    hu = np.where((x**2 + y**2 + 0 * _) <= 75**2, 0.0, -1000.0).astype(np.float32)
    pat = PatientModel(ImageVolume(grid, hu, "HU"))
    target = ellipsoid_mask(grid, (0, 0, 0), (30, 30, 30))
    assert target.any()
    plan = HelicalPlan(sinogram=np.full((102, 64), 1.0), field_width_mm=25.0, pitch=0.43, gantry_period_s=15.0,
                       couch_start_mm=-0.43 * 25)
    grouped = compute_dose(pat, plan, reference=SMALL_REF, progress=False, n_subsamples=1).per_fraction.array
    single = compute_dose(pat, plan, reference=SMALL_REF, progress=False, n_subsamples=1,
                          grouping="projection").per_fraction.array
    high = single > 0.5 * single.max()
    err = np.abs(grouped - single)[high].max() / single.max()
    assert err < 0.02, f"grouping error {100 * err:.2f} % of max"
