import numpy as np
import pytest

from tomodose.delivery.beams_eye import (
    conformal_sinogram, leaves_seeing_structure, project_to_isocentre_plane,
)
from tomodose.delivery.plan import HelicalPlan, ProjectionSequence
from tomodose.geometry.grid import Grid
from tomodose.geometry.structures import Structure, ellipsoid_mask


def test_projection_scales_with_divergence():
    # HFS, gantry 0: source anterior at y = -850; xg = +x (patient left), yg = +z (superior)
    u, v, depth = project_to_isocentre_plane([[10, 0, 5], [10, 85, 5]], 0.0, 0.0, (0, 0, 0))
    np.testing.assert_allclose(u, [10, 10 * 850 / 935])
    np.testing.assert_allclose(v, [5, 5 * 850 / 935])
    np.testing.assert_allclose(depth, [850, 935])


def test_leaf_direction_pinned():
    g = Grid.from_extent((-60, -60, -10), (60, 60, 10), (2, 2, 2))
    target = Structure("t", g, ellipsoid_mask(g, (50, 0, 0), (3, 3, 3)))  # patient left
    seq = ProjectionSequence.static_beams([0.0, 180.0], 1.0, 1.0, 25.0)
    seen = leaves_seeing_structure(seq, target)
    # gantry 0: +x maps to +Xg -> leaves above 32 (u ~ +50 mm -> leaf 40)
    assert set(np.flatnonzero(seen[0])) == {39, 40}
    # gantry 180: Xg = -x -> mirrored leaves
    assert set(np.flatnonzero(seen[1])) == {23, 24}


def test_conformal_sinogram_only_when_target_in_jaw():
    g = Grid.from_extent((-40, -40, -40), (40, 40, 40), (4, 4, 4))
    target = Structure("t", g, ellipsoid_mask(g, (0, 0, 0), (15, 15, 15)))
    plan = HelicalPlan.covering(lambda n, m: np.ones((n, m)), 20, -20, field_width_mm=10.0,
                                pitch=0.5, gantry_period_s=20.0)
    sino = conformal_sinogram(plan, target)
    beam_z = -plan.couch_mm  # HFS, isocentre z = 0
    far = np.abs(beam_z) > 15 + 5 + 2
    assert sino[far].sum() == 0
    near = np.abs(beam_z) < 5
    assert np.all(sino[near].sum(axis=1) >= 4)
    assert set(np.unique(sino)) <= {0.0, 1.0}
