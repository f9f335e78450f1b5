import sys

import numpy as np
import pytest
from scipy import ndimage

from tomodose.geometry.density import hu_to_mass_density
from tomodose.phantoms import (
    LIVER_STRUCTURE_NAMES,
    NAMED_CONFIGS,
    available_phantoms,
    cylinder_phantom,
    liver_phantom,
    load_phantom,
    phantom_config,
    slab_phantom,
    water_box,
)
from tomodose.phantoms.config import PHANTOMS_DIR

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@pytest.fixture(scope="module")
def liver():
    return liver_phantom()


def test_liver_structures_and_volumes(liver):
    s = liver.structures
    assert tuple(s) == LIVER_STRUCTURE_NAMES
    v = liver.structure_volumes_ml()
    assert 1500 <= v["Liver"] <= 1800
    normal_liver = s["Liver"].minus(s["GTV"]).volume_ml
    assert normal_liver > 700
    assert v["ProtectedLiver"] >= 400
    # 5 cm sphere = 65.4 mL
    assert v["GTV"] == pytest.approx(np.pi / 6 * 50**3 / 1000, rel=0.05)
    assert v["GTV"] < v["PGTV"] < v["PTV"]
    assert 100 <= v["Kidney_L"] <= 250 and 100 <= v["Kidney_R"] <= 250
    assert v["SpinalCord"] > 10 and v["Esophagus"] > 5 and v["Heart"] > 20
    assert v["Lung_L"] > 100 and v["Lung_R"] > 100 and v["Stomach"] > 200 and v["Bowel"] > 200
    assert 12000 < v["Body"] < 17000
    for name in LIVER_STRUCTURE_NAMES:
        assert not s[name].is_empty, name


def test_liver_containment_and_rules(liver):
    s = liver.structures
    gtv, pgtv, ptv, liv, prot, body = (s[n].mask for n in ("GTV", "PGTV", "PTV", "Liver", "ProtectedLiver", "Body"))
    assert not np.any(gtv & ~liv)
    assert not np.any(pgtv & ~ptv)
    assert not np.any(gtv & ~pgtv)
    assert not np.any(prot & ~liv)
    assert not np.any(ptv & ~body)
    # protected liver rule: > 30 mm from the PTV
    d = ndimage.distance_transform_edt(~ptv, sampling=liver.grid.spacing_mm[::-1])
    assert d[prot].min() > 30.0
    assert not np.any(liv & (d > 30.0) & ~prot)
    # organs that must not overlap
    for a, b in [("Liver", "Stomach"), ("Liver", "Kidney_R"), ("SpinalCord", "Vertebra"), ("Heart", "Lung_L"),
                 ("Lung_R", "Liver"), ("Bowel", "Stomach")]:
        assert not np.any(s[a].mask & s[b].mask), (a, b)


def test_liver_ct_numbers(liver):
    s = liver.structures
    hu = liver.ct.array
    assert liver.ct.unit == "HU" and liver.patient_position == "HFS"
    assert np.median(hu[s["Vertebra"].mask]) == pytest.approx(700, abs=10)
    assert np.median(hu[s["Lung_L"].mask]) == pytest.approx(-750, abs=10)
    assert np.median(hu[s["Liver"].mask & ~s["GTV"].mask]) == pytest.approx(55, abs=5)
    assert hu[0, 0, 0] == -1000.0
    assert hu.min() >= -1000.0 and hu.max() < 3000.0  # no clamping in the density table
    rho = liver.mass_density_g_cm3
    assert 1.0 < np.median(rho[s["Liver"].mask]) < 1.1
    # anatomy: liver on the patient's right (-x), stomach left (+x), vertebra posterior (+y), heart superior
    assert s["Liver"].centroid_mm()[0] < 0 < s["Stomach"].centroid_mm()[0]
    assert s["Vertebra"].centroid_mm()[1] > 20
    assert s["Heart"].centroid_mm()[2] > s["Liver"].centroid_mm()[2] > s["Kidney_R"].centroid_mm()[2]
    # the grid stays modest
    assert liver.grid.spacing_mm == (3.0, 3.0, 3.0) and 200 <= liver.grid.nz * 3 <= 240


def test_liver_seeded(liver):
    again = liver_phantom()
    np.testing.assert_array_equal(again.ct.array, liver.ct.array)
    other = liver_phantom(seed=1)
    assert not np.array_equal(other.ct.array, liver.ct.array)
    for n in LIVER_STRUCTURE_NAMES:
        np.testing.assert_array_equal(other.structures[n].occupancy, liver.structures[n].occupancy)
    quiet = liver_phantom(noise_hu=0.0)
    assert np.all(quiet.ct.array[liver.structures["Vertebra"].mask] == 700)


def test_liver_target_parameters():
    p = liver_phantom(target_semi_axes_mm=(20, 15, 25), target_centre_mm=(-60, -10, 10), spacing_mm=4.0)
    assert p.structures["GTV"].volume_ml == pytest.approx(4 / 3 * np.pi * 20 * 15 * 25 / 1000, rel=0.1)
    assert p.grid.spacing_mm == (4.0, 4.0, 4.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(target_centre_mm=(80.0, -10.0, 10.0)), "does not fit inside the liver"),
        (dict(target_diameter_mm=200.0), "does not fit inside the liver"),
        (dict(target_diameter_mm=-5.0), "target_diameter_mm must be > 0, got -5.0"),
        (dict(target_centre_mm=(0.0, np.nan, 0.0)), "target_centre_mm must be finite"),
        (dict(pgtv_margin_mm=12.0), "pgtv_margin_mm must be <= ptv_margin_mm"),
        (dict(seed=-1), "seed must be a non-negative integer, got -1"),
        (dict(spacing_mm=0.0), "spacing_mm must be > 0, got 0.0"),
        (dict(z_range_mm=(50.0, -50.0)), "z_range_mm must be"),
    ],
)
def test_liver_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        liver_phantom(**kwargs)


def test_water_box():
    p = water_box(size_mm=(100, 60, 40), spacing_mm=(2, 2, 4), air_margin_mm=10)
    assert p.grid.shape == (10 + 6, 30 + 10, 50 + 10)
    assert p.structures["Body"].volume_ml == pytest.approx(240.0)
    np.testing.assert_allclose(p.grid.centre_mm, (0, 0, 0), atol=1e-9)
    assert set(np.unique(p.ct.array)) == {-1000.0, 0.0}
    with pytest.raises(ValueError, match="size_mm must have all entries > 0"):
        water_box(size_mm=(10, 0, 10))
    with pytest.raises(ValueError, match="material must be one of"):
        water_box(hu="unobtainium")


def test_slab_phantom_depths():
    p = slab_phantom(layers=[("water", 20.0), ("lung", 40.0), ("bone", 10.0), ("water", 30.0)],
                     lateral_size_mm=(50, 50), spacing_mm=2.0, air_margin_mm=0.0)
    assert p.grid.ny == 50
    hu_col = p.ct.array[p.grid.nz // 2, :, p.grid.nx // 2]
    np.testing.assert_array_equal(hu_col[:10], 0.0)
    np.testing.assert_array_equal(hu_col[10:30], -750.0)
    np.testing.assert_array_equal(hu_col[30:35], 1000.0)
    np.testing.assert_array_equal(hu_col[35:], 0.0)
    assert list(p.structures) == ["Body", "Lung", "Bone"]
    assert p.structures["Lung"].volume_ml == pytest.approx(5 * 4 * 5)
    with pytest.raises(ValueError, match=r"layers\[1\] thickness_mm must be > 0"):
        slab_phantom(layers=[("water", 10.0), ("lung", 0.0)])
    with pytest.raises(ValueError, match="layers must hold at least one"):
        slab_phantom(layers=[])


def test_cylinder_phantom_inserts():
    p = cylinder_phantom(diameter_mm=200, length_mm=20, spacing_mm=2.0,
                         inserts=[("lung", 0, 50, 30), ("bone", 180, 50, 30)])
    s = p.structures
    assert list(s) == ["Body", "Insert_Lung", "Insert_Bone"]
    assert s["Insert_Lung"].centroid_mm()[0] == pytest.approx(50, abs=0.5)
    assert s["Insert_Bone"].centroid_mm()[0] == pytest.approx(-50, abs=0.5)
    assert np.all(p.ct.array[s["Insert_Bone"].mask] == 1000.0)
    rho = hu_to_mass_density(p.ct.array[s["Insert_Lung"].mask])
    assert np.allclose(rho, hu_to_mass_density(-750.0))
    assert s["Body"].volume_ml == pytest.approx(np.pi * 100**2 * 20 / 1000, rel=0.02)
    with pytest.raises(ValueError, match=r"inserts\[0\] must lie inside the cylinder"):
        cylinder_phantom(diameter_mm=100, inserts=[("lung", 0, 45, 30)])
    with pytest.raises(ValueError, match=r"inserts\[0\] must be \(material, angle_deg, radius_mm, diameter_mm\)"):
        cylinder_phantom(inserts=[("lung", 0)])


def test_noise_is_seeded_and_inside_only():
    a = water_box(size_mm=40, spacing_mm=4, air_margin_mm=8, noise_hu=10, seed=3)
    b = water_box(size_mm=40, spacing_mm=4, air_margin_mm=8, noise_hu=10, seed=3)
    np.testing.assert_array_equal(a.ct.array, b.ct.array)
    outside = ~a.structures["Body"].mask
    assert np.all(a.ct.array[outside] == -1000.0)
    assert a.ct.array[~outside].std() > 5


@pytest.mark.skipif(not PHANTOMS_DIR.is_dir(), reason="source tree phantoms/ folder absent")
def test_toml_files_match_builtin_configs():
    files = sorted(PHANTOMS_DIR.glob("*.toml"))
    assert {p.stem for p in files} == set(NAMED_CONFIGS)
    for path in files:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
        ref = NAMED_CONFIGS[path.stem]
        assert data["phantom"]["name"] == path.stem
        assert data["phantom"]["builder"] == ref["phantom"]["builder"]
        assert data["parameters"] == ref["parameters"], path.name


@pytest.mark.parametrize("name", ["liver_small_far", "liver_large", "liver_near_stomach_heart", "liver_dome_lung"])
def test_liver_variants(name):
    p = load_phantom(name)
    v = p.structure_volumes_ml()
    s = p.structures
    assert p.name == name
    assert v["ProtectedLiver"] >= 400
    assert s["Liver"].minus(s["GTV"]).volume_ml > 700
    assert not np.any(s["GTV"].mask & ~s["Liver"].mask)
    d = ndimage.distance_transform_edt(~s["PTV"].mask, sampling=p.grid.spacing_mm[::-1])
    if name == "liver_small_far":
        assert v["GTV"] == pytest.approx(14.1, rel=0.1)
        for oar in ("Stomach", "Heart", "Kidney_R", "Kidney_L", "Bowel", "SpinalCord", "Esophagus"):
            assert d[s[oar].mask].min() >= 25.0, oar
    elif name == "liver_large":
        assert v["GTV"] == pytest.approx(268.1, rel=0.05)
    elif name == "liver_dome_lung":
        assert v["GTV"] == pytest.approx(113.1, rel=0.05)  # 6 cm sphere
        assert d[s["Lung_R"].mask].min() <= 10.0
        assert d[s["Heart"].mask].min() <= 35.0 and d[s["Esophagus"].mask].min() <= 35.0
    else:
        assert d[s["Stomach"].mask].min() <= 15.0
        assert d[s["Heart"].mask].min() <= 30.0


def test_load_phantom_files_and_errors(tmp_path):
    assert "liver_default" in available_phantoms()
    p = load_phantom("water_box", spacing_mm=10.0)
    assert p.grid.spacing_mm == (10.0, 10.0, 10.0)
    cfg = tmp_path / "mine.toml"
    cfg.write_text('[phantom]\nname = "mine"\nbuilder = "water"\n[parameters]\nsize_mm = 50.0\nspacing_mm = 5.0\n')
    q = load_phantom(cfg)
    assert q.name == "mine" and q.grid.shape == (10, 10, 10)
    assert phantom_config(str(cfg))["phantom"]["builder"] == "water"
    with pytest.raises(ValueError, match="phantom must be a TOML file or one of"):
        load_phantom("no_such_phantom")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_phantom(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text('[phantom]\nbuilder = "water"\n[parameters]\nsize_cm = 5\n')
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['size_cm'\] for builder 'water'"):
        load_phantom(bad)
    bad.write_text('[phantom]\nbuilder = "sphere"\n')
    with pytest.raises(ValueError, match=r"builder must be one of \['cylinder', 'liver', 'slab', 'water'\], got 'sphere'"):
        load_phantom(bad)
    bad.write_text('this is = = not toml')
    with pytest.raises(ValueError, match="is not valid TOML"):
        load_phantom(bad)
