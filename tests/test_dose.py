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


def _dose_at(dose, grid, point_lps):
    from scipy import ndimage

    kji = grid.lps_to_index(list(point_lps))
    return float(ndimage.map_coordinates(dose.per_fraction.array.astype(float), kji.reshape(3, 1), order=1)[0])


def test_calibration_point_reproduces_its_transferred_dose_rate():
    """Isocentric point at 100 mm depth (surface at SSD 750 mm), dose rate = 8.5 Gy/min x factor."""
    from tomodose.delivery.machine import TomoMachine

    ref = ReferenceCondition(ssd_mm=750.0, depth_mm=100.0, dose_rate_factor=0.75, phantom_width_mm=200.0,
                             phantom_depth_mm=200.0, phantom_length_mm=100.0, spacing_mm=(5.0, 2.5, 5.0))
    machine = TomoMachine()
    grid, iso = reference_phantom_grid(ref, machine)
    assert iso == (0.0, 100.0, 0.0)  # the isocentre at the calibration depth
    seq60 = ProjectionSequence.static_beams([0.0], np.ones((1, 64)), 60.0, 50.0, isocentre_lps_mm=iso)
    d = compute_dose(water_patient(grid), seq60, reference=ref, progress=False)
    assert _dose_at(d, grid, (0.0, 100.0, 0.0)) == pytest.approx(8.5 * 0.75, rel=1e-4)
    # the same engine calibrated at the nominal condition with the same factor scales by exactly it
    nominal = ReferenceCondition(**{**ref.__dict__, "dose_rate_factor": 1.0})
    d1 = compute_dose(water_patient(grid), seq60, reference=nominal, progress=False)
    np.testing.assert_allclose(d.per_fraction.array, 0.75 * d1.per_fraction.array, rtol=1e-6, atol=0)


def test_default_calibration_point_is_the_shipped_transfer():
    """The default machine is calibrated past the build-up (isocentre at 100 mm depth) with the
    dose rate transferred from the nominal condition by the measured TPR ratio."""
    from tomodose.dose.calibration import DOSE_CALIBRATION_PATH

    ref = ReferenceCondition.default()
    assert (ref.field_width_mm, ref.ssd_mm, ref.depth_mm) == (50.0, 750.0, 100.0)
    # (865/850)^2 / TPR(1.5 cm) with TPR(1.5 cm) = 1.37 for the 5 x 40 cm field (LA4)
    assert ref.dose_rate_factor == pytest.approx(1.035606 / 1.37, rel=0.01)
    assert ReferenceCondition.nominal() == ReferenceCondition()
    assert ReferenceCondition.from_file(DOSE_CALIBRATION_PATH) == ref


def test_shipped_dose_calibration_is_what_the_script_derives(shared_data):
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "kernels"))
    try:
        import derive_dose_calibration as ddc
    finally:
        sys.path.remove(str(root / "kernels"))
    derived = ddc.derive(shared_data, 10.0)
    assert ReferenceCondition.default().dose_rate_factor == derived["dose_rate_factor"]


def test_dose_calibration_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "cal.json"
    bad.write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="cal.json.*tomodose-dose-calibration"):
        ReferenceCondition.from_file(bad)
    bad.write_text('{"format": "tomodose-dose-calibration", "condition": {"ssd_mm": 750}}')
    with pytest.raises(ValueError, match="missing.*depth_mm.*dose_rate_factor"):
        ReferenceCondition.from_file(bad)
    bad.write_text("not json")
    with pytest.raises(ValueError, match="could not be read as JSON"):
        ReferenceCondition.from_file(bad)
    with pytest.raises(ValueError, match="dose_rate_factor"):
        ReferenceCondition(dose_rate_factor=-1.0)


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
    with pytest.raises(ValueError, match="shared_coarse_block_mm must be None or a length > 0 mm, got -1.0"):
        compute_dose(pat, seq, shared_coarse_block_mm=-1.0)
    with pytest.raises(ValueError, match="shared_coarse_block_mm must be None or a length > 0 mm, got True"):
        compute_dose(pat, seq, shared_coarse_block_mm=True)
    with pytest.raises(ValueError, match="shared_coarse_directions must be None or an integer >= 1, got 0"):
        compute_dose(pat, seq, shared_coarse_directions=0)
    with pytest.raises(ValueError, match="shared_directions must be an integer >= 1, got 2.5"):
        compute_dose(pat, seq, shared_directions=2.5)


def test_shared_transport_reads_the_terma_groups_without_a_copy():
    """The engine hands the TERMA result's own (G, ...) array to the shared transport when the
    groups are its consecutive items, and copies otherwise."""
    from tomodose.dose.engine import _coarse_factor, _stacked_view

    base = np.arange(4 * 2 * 3, dtype=np.float32).reshape(4, 2, 3)
    view = _stacked_view([base[i] for i in range(4)])
    assert np.shares_memory(view, base) and np.array_equal(view, base) and not view.flags.writeable
    part = _stacked_view([base[i] for i in (1, 2)])                    # consecutive, not from 0
    assert np.shares_memory(part, base) and np.array_equal(part, base[1:3])
    assert _stacked_view([base[i] for i in (0, 1, 3)]) is None          # a skipped (empty) group
    assert _stacked_view([base[i] for i in (1, 0, 2, 3)]) is None       # other order
    assert _stacked_view([base[i].copy() for i in range(4)]) is None    # not views
    assert _stacked_view([base.astype(np.float64)[i] for i in range(4)]) is None
    grid3, grid5 = Grid((2, 2, 2), (3, 3, 3)), Grid((2, 2, 2), (5, 5, 5))
    assert _coarse_factor(None, grid3) == 1
    assert _coarse_factor(7.0, grid3) == 2 and _coarse_factor(7.0, grid5) == 1


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


def _water_helix(spacing=5.0, rotations=2, jaw=25.0):
    grid = Grid.from_extent((-70, -70, -25), (70, 70, 25), (spacing, spacing, spacing))
    x, y, z = grid.meshgrid_mm()
    hu = np.where((x**2 + y**2 + 0 * z) <= 60**2, 0.0, -1000.0).astype(np.float32)
    sino = np.zeros((51 * rotations, 64))
    sino[:, 26:38] = 1.0
    plan = HelicalPlan(sinogram=sino, field_width_mm=jaw, pitch=0.3, gantry_period_s=15.0,
                       couch_start_mm=-0.3 * jaw * rotations / 2)
    return PatientModel(ImageVolume(grid, hu, "HU")), plan


@pytest.mark.slow
def test_shared_directions_close_to_per_group_reference():
    """Engine option shared_from_deg: all rings on one shared direction set (512) vs every ring per
    angle group (the reference), helical water cylinder, 51 groups: measured 2026-11-28 on this
    case max 0.6 % of max; the documented bound is 1.5 %, deposited energy within 0.5 %."""
    from tomodose.dose.engine import _ccc_transport, _terma_groups
    from tomodose.terma.terma import compute_terma

    pat, plan = _water_helix()
    seq = plan.projections()
    groups = _terma_groups(seq, compute_terma(pat, seq, n_subsamples=1, progress=False))
    tm_ref, tm_sh = {}, {}
    ref = _ccc_transport(pat, groups, progress=False, shared_from_deg=None, timings=tm_ref).astype(float)
    sh = _ccc_transport(pat, groups, progress=False, shared_from_deg=0.0, shared_directions=512,
                        timings=tm_sh).astype(float)
    again = _ccc_transport(pat, groups, progress=False, shared_from_deg=0.0, shared_directions=512).astype(float)
    assert tm_ref["shared_groups"] == 0 and tm_sh["shared_groups"] == 51
    np.testing.assert_array_equal(sh, again)  # deterministic
    body = pat.mass_density_g_cm3 > 0.5
    err = np.abs(sh - ref).max() / ref.max()
    assert err < 0.015, f"shared directions differ by {100 * err:.2f} % of max"
    assert sh[body].sum() == pytest.approx(ref[body].sum(), rel=5e-3)


def test_shared_directions_not_used_for_point_source_groups():
    """Fixed beams (one source per group) keep the per-group tilted transport."""
    from tomodose.dose.engine import _ccc_transport, _terma_groups
    from tomodose.terma.terma import compute_terma

    grid = Grid.from_extent((-40, -40, -20), (40, 40, 20), (8, 8, 8))
    pat = water_patient(grid)
    seq = ProjectionSequence.static_beams([0.0, 90.0, 180.0], np.ones((3, 64)), 1.0, 25.0)
    groups = _terma_groups(seq, compute_terma(pat, seq, n_subsamples=1, progress=False))
    tm = {}
    a = _ccc_transport(pat, groups, progress=False, shared_from_deg=0.0, shared_directions=8, timings=tm)
    b = _ccc_transport(pat, groups, progress=False, shared_from_deg=None)
    assert tm["shared_groups"] == 0
    np.testing.assert_array_equal(a, b)


def test_shared_direction_options_bad_input():
    grid = Grid((3, 3, 3), (5, 5, 5))
    pat = water_patient(grid)
    seq = ProjectionSequence.static_beams([0.0], np.ones((1, 64)), 1.0, 25.0)
    with pytest.raises(ValueError, match="shared_from_deg must be an angle in \\[0, 180\\] deg or None, got 200"):
        compute_dose(pat, seq, reference=SMALL_REF, progress=False, shared_from_deg=200)
    with pytest.raises(ValueError, match="shared_directions must be an integer >= 1, got 0"):
        compute_dose(pat, seq, reference=SMALL_REF, progress=False, shared_from_deg=0.0, shared_directions=0)


# --- static beams on a supersampled grid, line phases (docs/collapsed_cone.md section 4f) ----------------
def test_supersampled_patient_and_block_mean():
    from tomodose.dose.engine import block_mean_dose, supersampled_patient

    grid = Grid((3, 4, 5), (2.0, 2.5, 3.0), (-4.0, 1.0, 7.0))
    hu = np.linspace(-1000.0, 800.0, int(np.prod(grid.shape))).reshape(grid.shape).astype(np.float32)
    pat = PatientModel(ImageVolume(grid, hu, "HU"))
    fine = supersampled_patient(pat, 2)
    assert fine.grid.shape == (6, 8, 10)
    np.testing.assert_allclose(fine.grid.spacing_mm, (1.0, 1.25, 1.5))
    # the mean of the fine voxel centres of a block is the coarse voxel centre
    np.testing.assert_allclose(np.asarray(fine.grid.origin_mm) + 0.5 * np.asarray(fine.grid.spacing_mm),
                               grid.origin_mm)
    rho, rho_f = pat.mass_density_g_cm3, fine.mass_density_g_cm3
    np.testing.assert_array_equal(rho_f[::2, ::2, ::2], rho)
    # a dose constant over each block comes back unchanged; any dose keeps its energy (mass-weighted)
    np.testing.assert_allclose(block_mean_dose(np.repeat(np.repeat(np.repeat(rho + 1, 2, 0), 2, 1), 2, 2),
                                               rho_f, 2), rho + 1, rtol=1e-6)
    d = np.random.default_rng(2).random(fine.grid.shape)
    coarse = block_mean_dose(d, rho_f, 2).astype(float)
    assert (coarse * rho).sum() * 8 == pytest.approx((d * rho_f).sum(), rel=1e-6)
    vacuum = np.zeros_like(rho_f)  # no mass: plain mean
    np.testing.assert_allclose(block_mean_dose(d, vacuum, 2), d.reshape(3, 2, 4, 2, 5, 2).mean(axis=(1, 3, 5)),
                               rtol=1e-6)


def test_supersample_factor_limits():
    from tomodose.dose.engine import STATIC_SUPERSAMPLE_MAX_VOXELS, supersample_factor

    assert supersample_factor(2, Grid((10, 10, 10), (2.5, 2.5, 2.5))) == 2
    assert supersample_factor(3, Grid((10, 10, 10), (2.5, 2.5, 3.0))) == 2  # fine voxels >= 1 mm
    assert supersample_factor(2, Grid((10, 10, 10), (1.5, 2.5, 2.5))) == 1
    assert supersample_factor(1, Grid((10, 10, 10), (5.0, 5.0, 5.0))) == 1
    n = int(round((STATIC_SUPERSAMPLE_MAX_VOXELS / 8) ** (1 / 3))) + 1  # 2x would exceed the voxel cap
    assert supersample_factor(2, Grid((n, n, n), (5.0, 5.0, 5.0))) == 1


def test_static_delivery_detection():
    from tomodose.dose.engine import STATIC_SUPERSAMPLE_MAX_BEAMS, is_static_delivery

    assert is_static_delivery(ProjectionSequence.static_beams([0.0, 90.0], np.ones((2, 64)), 1.0, 25.0))
    many = np.linspace(0.0, 350.0, STATIC_SUPERSAMPLE_MAX_BEAMS + 1)
    assert not is_static_delivery(ProjectionSequence.static_beams(many, np.ones((many.size, 64)), 1.0, 25.0))
    plan = HelicalPlan(sinogram=np.full((51, 64), 0.5), field_width_mm=25.0, pitch=0.3, gantry_period_s=15.0)
    assert not is_static_delivery(plan.projections())


def test_static_supersample_keeps_the_calibration_and_the_field_centre():
    """With static_supersample=2 the calibrated engine still reproduces the dose rate at its own
    calibration point (the calibration field is computed the same way); a narrow field's dose in
    its centre changes by little (the refinement resolves the edges, docs/collapsed_cone.md 4f)."""
    from tomodose.delivery.machine import TomoMachine
    from tomodose.dose.engine import CCC_KERNEL_NAME, STATIC_CCC_KERNEL_NAME
    from tomodose.transport.kernels import load_kernel

    machine = TomoMachine()
    grid, iso = reference_phantom_grid(SMALL_REF, machine)
    seq60 = ProjectionSequence.static_beams([0.0], np.ones((1, 64)), 60.0, 50.0, isocentre_lps_mm=iso)
    d = compute_dose(water_patient(grid), seq60, reference=SMALL_REF, progress=False, n_subsamples=1,
                     static_supersample=2)
    assert d.metadata["timings_s"]["static_supersample"] == 2
    assert d.per_fraction.grid.shape == grid.shape
    assert _dose_at(d, grid, (0.0, 15.0, 0.0)) == pytest.approx(8.5, rel=1e-4)
    narrow = ProjectionSequence.static_beams([0.0], np.ones((1, 64)), 1.0, 10.0, isocentre_lps_mm=iso)
    # the 3 % bound was measured with the 5-group, 11-ring kernel (2.2 %); the static default kernel (8 groups,
    # 17 rings, docs/collapsed_cone.md 4h) loses more on these 5 mm voxels unrefined (-1.4 %: 4.1 % from its
    # refined dose), and once refined the two kernels agree (0.5 % measured)
    helical_kernel = load_kernel(CCC_KERNEL_NAME)
    d1 = compute_dose(water_patient(grid), narrow, reference=SMALL_REF, progress=False, n_subsamples=1,
                      static_supersample=1, kernel=helical_kernel)
    d2 = compute_dose(water_patient(grid), narrow, reference=SMALL_REF, progress=False, n_subsamples=1,
                      static_supersample=2, kernel=helical_kernel)
    assert "static_supersample" not in d1.metadata["timings_s"]
    c1, c2 = _dose_at(d1, grid, (0.0, 50.0, 0.0)), _dose_at(d2, grid, (0.0, 50.0, 0.0))
    assert c2 == pytest.approx(c1, rel=0.03)
    d_static = compute_dose(water_patient(grid), narrow, reference=SMALL_REF, progress=False, n_subsamples=1,
                            static_supersample=2)
    assert d_static.metadata["kernel"] == STATIC_CCC_KERNEL_NAME
    assert _dose_at(d_static, grid, (0.0, 50.0, 0.0)) == pytest.approx(c2, rel=0.01)


def test_static_supersample_and_line_phases_bad_input():
    grid = Grid((3, 3, 3), (5, 5, 5))
    pat = water_patient(grid)
    seq = ProjectionSequence.static_beams([0.0], np.ones((1, 64)), 1.0, 25.0)
    for bad in (0, 5, 1.5, True):
        with pytest.raises(ValueError, match=r"static_supersample must be an integer in \[1, 4\] \(grid refinement "
                                             rf"factor of static beams; 1 = off\), got {bad!r}"):
            compute_dose(pat, seq, reference=SMALL_REF, progress=False, static_supersample=bad)
    for bad in (0, 17, 2.0, False):
        with pytest.raises(ValueError, match=r"line_phases must be an integer in \[1, 16\] \(sub-voxel line phases "
                                             rf"per lateral axis\), got {bad!r}"):
            compute_dose(pat, seq, reference=SMALL_REF, progress=False, line_phases=bad)


def test_static_supersample_identical_for_1_and_2_threads():
    import numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba has a single thread")
    grid = Grid.from_extent((-30, 0, -20), (30, 50, 20), (5, 5, 5))
    pat = water_patient(grid)
    seq = ProjectionSequence.static_beams([0.0, 40.0], np.ones((2, 64)), 1.0, 10.0, isocentre_lps_mm=(0, 25, 0))
    old = numba.get_num_threads()
    out = []
    try:
        for n in (1, 2):
            numba.set_num_threads(n)
            out.append(compute_dose(pat, seq, reference=SMALL_REF, progress=False, n_subsamples=1,
                                    static_supersample=2).per_fraction.array)
    finally:
        numba.set_num_threads(old)
    np.testing.assert_array_equal(out[0], out[1])


def test_surface_correction_and_static_azimuths_keep_the_calibration():
    """With surface_correction and static_n_azimuth the calibration field is computed with the same
    options: the engine still reproduces the dose rate at its calibration point; the options change
    the calibration factor and the dose of a narrow field relative to it (the long fan loses more of
    its scatter near the surface than a narrow field); the defaults (both on since session 9, with the
    refitted machine) equal the explicit options bit for bit."""
    from tomodose.delivery.machine import TomoMachine
    from tomodose.dose.engine import STATIC_N_AZIMUTH, SURFACE_CORRECTION

    assert SURFACE_CORRECTION is True and STATIC_N_AZIMUTH == 16  # flipped together with the machine refit
    machine = TomoMachine()
    grid, iso = reference_phantom_grid(SMALL_REF, machine)
    pat = water_patient(grid)
    seq60 = ProjectionSequence.static_beams([0.0], np.ones((1, 64)), 60.0, 50.0, isocentre_lps_mm=iso)
    kw = dict(reference=SMALL_REF, progress=False, n_subsamples=1, static_supersample=1)
    off_opts = {"surface_correction": False, "static_n_azimuth": None}
    k = {}
    for i, opts in enumerate((off_opts, {"surface_correction": True, "static_n_azimuth": None},
                              {"surface_correction": True, "static_n_azimuth": 16})):
        d = compute_dose(pat, seq60, **kw, **opts)
        assert _dose_at(d, grid, (0.0, 15.0, 0.0)) == pytest.approx(8.5, rel=1e-4)
        k[i] = d.metadata["calibration_gy_per_unit"]
    assert k[1] > k[0] * 1.001 and k[2] != k[1]  # less engine dose at the calibration point: larger factor
    narrow = ProjectionSequence.static_beams([0.0], np.ones((1, 64)) * (np.arange(64) // 4 == 8), 1.0, 25.0,
                                             isocentre_lps_mm=iso)
    default = compute_dose(pat, narrow, **kw)
    explicit = compute_dose(pat, narrow, **kw, surface_correction=True, static_n_azimuth=16)
    np.testing.assert_array_equal(default.per_fraction.array, explicit.per_fraction.array)
    off = compute_dose(pat, narrow, **kw, **off_opts)
    on = compute_dose(pat, narrow, **kw, surface_correction=True, static_n_azimuth=None)
    c_off, c_on = _dose_at(off, grid, (0.0, 50.0, 0.0)), _dose_at(on, grid, (0.0, 50.0, 0.0))
    assert c_on > c_off and c_on == pytest.approx(c_off, rel=0.02)


def test_surface_correction_in_helical_shared_and_coarse_transport():
    """A helical plan with the shared direction set (and its coarse option) runs with the surface
    correction; the relative dose in the target changes by little, more at the surface."""
    pat, plan = _water_helix(spacing=5.0, rotations=1)
    kw = dict(reference=SMALL_REF, progress=False, n_subsamples=1, shared_directions=64)
    off = compute_dose(pat, plan, **kw, surface_correction=False).per_fraction.array
    on = compute_dose(pat, plan, **kw, surface_correction=True).per_fraction.array
    coarse = compute_dose(pat, plan, **kw, surface_correction=True, shared_coarse_block_mm=10.0).per_fraction.array
    mx = off.max()
    assert np.abs(on - off).max() < 0.05 * mx and np.abs(on - off).max() > 1e-4 * mx
    assert np.abs(coarse - on).max() < 0.05 * mx


def test_surface_and_azimuth_options_bad_input():
    grid = Grid((3, 3, 3), (5, 5, 5))
    pat = water_patient(grid)
    seq = ProjectionSequence.static_beams([0.0], np.ones((1, 64)), 1.0, 25.0)
    for bad in (1, "yes", None):
        with pytest.raises(ValueError, match=r"surface_correction must be a bool \(collapsed-cone surface escape "
                                             rf"on/off\), got {bad!r}"):
            compute_dose(pat, seq, reference=SMALL_REF, progress=False, surface_correction=bad)
    for bad in (0, 257, 16.0, True):
        with pytest.raises(ValueError, match=r"static_n_azimuth must be None \(the kernel's own\) or an integer in "
                                             rf"\[1, 256\] \(cones per kernel ring of static beams\), got {bad!r}"):
            compute_dose(pat, seq, reference=SMALL_REF, progress=False, static_n_azimuth=bad)


def test_static_and_helical_deliveries_use_their_own_kernels():
    """Static deliveries (and their calibration field) use the 8-group, 17-ring kernel, every other
    delivery the 5-group, 11-ring one (docs/collapsed_cone.md 4h); a kernel given by the caller is used
    for both the plan and its calibration; the dose metadata names the kernel."""
    from tomodose.delivery.machine import TomoMachine
    from tomodose.dose.engine import CCC_KERNEL_NAME, STATIC_CCC_KERNEL_NAME, engine_kernel
    from tomodose.transport.kernels import load_kernel

    assert STATIC_CCC_KERNEL_NAME == "ccc_water_6mv_8groups_17rings" and CCC_KERNEL_NAME == "ccc_water_6mv_5groups"
    static_k, helical_k = engine_kernel(static=True), engine_kernel()
    assert (static_k.name, static_k.n_groups, static_k.n_polar) == (STATIC_CCC_KERNEL_NAME, 8, 17)
    assert (helical_k.name, helical_k.n_groups, helical_k.n_polar) == (CCC_KERNEL_NAME, 5, 11)
    assert engine_kernel(helical_k, static=True) is helical_k
    machine = TomoMachine()
    grid, iso = reference_phantom_grid(SMALL_REF, machine)
    pat = water_patient(grid)
    kw = dict(reference=SMALL_REF, progress=False, n_subsamples=1, static_supersample=1)
    seq60 = ProjectionSequence.static_beams([0.0], np.ones((1, 64)), 60.0, 50.0, isocentre_lps_mm=iso)
    d = compute_dose(pat, seq60, **kw)
    assert d.metadata["kernel"] == STATIC_CCC_KERNEL_NAME
    assert _dose_at(d, grid, (0.0, 15.0, 0.0)) == pytest.approx(8.5, rel=1e-4)  # calibrated with its own kernel
    explicit = compute_dose(pat, seq60, kernel=load_kernel(STATIC_CCC_KERNEL_NAME), **kw)
    np.testing.assert_array_equal(d.per_fraction.array, explicit.per_fraction.array)
    small = Grid.from_extent((-60, -60, -30), (60, 60, 30), (6, 6, 6))
    plan = HelicalPlan(sinogram=np.full((51, 64), 0.5), field_width_mm=25.0, pitch=0.3, gantry_period_s=15.0)
    h = compute_dose(water_patient(small), plan, **kw)
    assert h.metadata["kernel"] == CCC_KERNEL_NAME
    h_explicit = compute_dose(water_patient(small), plan, kernel=load_kernel(CCC_KERNEL_NAME), **kw)
    assert h.metadata["calibration_gy_per_unit"] == h_explicit.metadata["calibration_gy_per_unit"]
    np.testing.assert_array_equal(h.per_fraction.array, h_explicit.per_fraction.array)
    # the two kernels give different calibration factors: each delivery is calibrated with its own
    assert h.metadata["calibration_gy_per_unit"] != d.metadata["calibration_gy_per_unit"]
