"""Pin the IEC 61217 <-> DICOM LPS conventions (directions of rotation and couch motion)."""

import numpy as np
import pytest

from tomodose.geometry import frames


def test_hfs_gantry_zero_source_is_anterior():
    src = frames.source_position_patient(0.0, 0.0, (0, 0, 0), sad_mm=850)
    np.testing.assert_allclose(src, (0, -850, 0), atol=1e-9)  # anterior = -y in LPS


def test_hfs_gantry_90_source_is_patient_left():
    # brief: at 90 deg the source is at +X, the patient's left for head-first supine
    src = frames.source_position_patient(90.0, 0.0, (0, 0, 0), sad_mm=850)
    np.testing.assert_allclose(src, (850, 0, 0), atol=1e-9)


def test_gantry_rotates_clockwise_seen_from_foot():
    # seen from the foot looking at the gantry (towards +Y), +X is to the right and +Z up;
    # clockwise means: top (0) -> right (90) -> bottom (180) -> left (270)
    pos = frames.source_position_fixed(np.array([0, 90, 180, 270]), 1.0)
    np.testing.assert_allclose(pos, [[0, 0, 1], [1, 0, 0], [0, 0, -1], [-1, 0, 0]], atol=1e-12)
    # right-handed about +Y: angular momentum of the source along +Y
    a = frames.source_position_fixed(10.0, 1.0)
    b = frames.source_position_fixed(11.0, 1.0)
    assert np.cross(a, b)[1] > 0


def test_gantry_frame_right_handed_and_source_on_zg():
    for angle in (0, 37, 90, 200):
        xg, yg, zg = frames.beam_axes_fixed(angle)
        np.testing.assert_allclose(np.cross(xg, yg), zg, atol=1e-12)
        np.testing.assert_allclose(frames.source_position_fixed(angle, 850) / 850, zg, atol=1e-12)
        r = frames.gantry_to_fixed_matrix(angle)
        np.testing.assert_allclose(r, np.stack([xg, yg, zg], axis=1), atol=1e-12)


def test_couch_into_bore_moves_beam_plane_inferior_for_hfs():
    iso0 = (10.0, 20.0, 30.0)
    src = frames.source_position_patient(0.0, 100.0, iso0)
    # the isocentre moves 100 mm inferior (-z) relative to a head-first patient
    np.testing.assert_allclose(src, (10, 20 - 850, 30 - 100), atol=1e-9)
    np.testing.assert_allclose(frames.couch_shift_patient(100.0, "FFS"), (0, 0, 100), atol=1e-12)


@pytest.mark.parametrize("pos", frames.PATIENT_POSITIONS)
def test_fixed_patient_round_trip_and_proper_rotation(pos):
    m = frames.fixed_to_patient_matrix(pos)
    assert np.linalg.det(m) == pytest.approx(1.0)
    np.testing.assert_allclose(m @ m.T, np.eye(3), atol=1e-12)
    rng = np.random.default_rng(1)
    pts = rng.normal(size=(5, 3)) * 100
    iso = (1.0, -2.0, 3.0)
    back = frames.patient_to_fixed(frames.fixed_to_patient(pts, iso, pos), iso, pos)
    np.testing.assert_allclose(back, pts, atol=1e-9)


@pytest.mark.parametrize(
    "pos, up, toward_gantry, right",
    [
        ("HFS", (0, -1, 0), (0, 0, 1), (1, 0, 0)),   # up = anterior, gantry = head, right = left
        ("HFP", (0, 1, 0), (0, 0, 1), (-1, 0, 0)),   # up = posterior
        ("FFS", (0, -1, 0), (0, 0, -1), (-1, 0, 0)),  # gantry side = feet
        ("FFP", (0, 1, 0), (0, 0, -1), (1, 0, 0)),
    ],
)
def test_patient_orientations(pos, up, toward_gantry, right):
    m = frames.fixed_to_patient_matrix(pos)
    np.testing.assert_allclose(m @ [0, 0, 1], up)
    np.testing.assert_allclose(m @ [0, 1, 0], toward_gantry)
    np.testing.assert_allclose(m @ [1, 0, 0], right)


def test_unknown_orientation_refused():
    with pytest.raises(ValueError, match=r"patient_position must be one of \['HFS', 'HFP', 'FFS', 'FFP'\], got 'XYZ'"):
        frames.fixed_to_patient_matrix("XYZ")
    with pytest.raises(ValueError, match="decubitus"):
        frames.fixed_to_patient_matrix("HFDL")
