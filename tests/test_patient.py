import numpy as np
import pytest

from tomodose.geometry.density import DensityTable
from tomodose.geometry.grid import Grid, ImageVolume
from tomodose.geometry.patient import PatientModel
from tomodose.geometry.structures import Structure, StructureSet


def _model(**kw):
    g = Grid((4, 5, 6), (2.0, 2.0, 2.0), (-5.0, -4.0, -3.0))
    hu = np.zeros(g.shape)
    hu[:, :, :2] = -1000.0
    hu[:, :, 4:] = 1000.0
    ct = ImageVolume(g, hu, "HU", "ct_number")
    box = np.zeros(g.shape, bool)
    box[1:3, 1:4, 1:5] = True
    return PatientModel(ct, StructureSet(g, [Structure("Box", g, box)]), **kw)


def test_densities_cached_float32_readonly():
    p = _model(name="t")
    rho = p.mass_density_g_cm3
    assert rho.dtype == np.float32 and rho.shape == p.grid.shape
    assert rho is p.mass_density_g_cm3
    assert not rho.flags.writeable
    np.testing.assert_allclose(rho[0, 0, [0, 2, 5]], [0.0012, 1.0, 1.6], rtol=1e-6)
    red = p.relative_electron_density
    assert red[0, 0, 2] == pytest.approx(1.0)
    assert p.structure_volumes_ml()["Box"] == pytest.approx(24 * 0.008)


def test_with_structures_and_user_table():
    p = _model()
    g = p.grid
    s2 = Structure("Other", g, np.ones(g.shape))
    q = p.with_structures([s2], replace=False)
    assert list(q.structures) == ["Box", "Other"]
    r = p.with_structures(StructureSet(g, [s2]))
    assert list(r.structures) == ["Other"]
    t = DensityTable.from_arrays([-1000, 0, 1000], [0.0, 1.0, 2.0], [0.0, 1.0, 2.0])
    p2 = _model(density_table=t)
    assert p2.mass_density_g_cm3[0, 0, 5] == pytest.approx(2.0)


def test_resampled_keeps_geometry():
    p = _model(patient_position="FFS")
    g2 = Grid((2, 5, 6), (2.0, 2.0, 4.0), (-5.0, -4.0, -3.0))
    q = p.resampled(g2)
    assert q.grid == g2 and q.patient_position == "FFS"
    np.testing.assert_allclose(q.ct.array[0, 0], p.ct.array[0, 0])
    assert q.structures["Box"].occupancy.max() <= 1.0


def test_bad_inputs():
    p = _model()
    g = p.grid
    with pytest.raises(ValueError, match="ct unit must be 'HU', got 'Gy'"):
        PatientModel(ImageVolume(g, np.zeros(g.shape), "Gy"))
    with pytest.raises(TypeError, match="ct must be an ImageVolume"):
        PatientModel(np.zeros(g.shape))
    other = Grid((4, 5, 6), (1.0, 2.0, 2.0))
    with pytest.raises(ValueError, match="must be on the same grid"):
        PatientModel(p.ct, StructureSet(other))
    with pytest.raises(ValueError, match=r"patient_position must be one of \['HFS', 'HFP', 'FFS', 'FFP'\], got 'XYZ'"):
        PatientModel(p.ct, patient_position="XYZ")
    with pytest.raises(TypeError, match="density_table must be a DensityTable"):
        PatientModel(p.ct, density_table={"hu": [0]})
