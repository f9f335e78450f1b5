import pytest

from tomodose.cli.main import main
from tomodose.io.hdf5 import read_results


def test_phantom_liver_writes_file_and_prints_volumes(tmp_path, capsys):
    out = tmp_path / "liver.h5"
    rc = main(["--no-progress", "phantom", "liver", "--spacing-mm", "6", "--out", str(out),
               "--export-mha", str(tmp_path / "mha")])
    assert rc == 0 and out.is_file()
    text = capsys.readouterr().out
    for name in ("Body", "Liver", "GTV", "PGTV", "PTV", "ProtectedLiver", "SpinalCord", "Kidney_L", "Heart"):
        assert name in text
    assert "volume_mL" in text and "Liver-GTV" in text
    res = read_results(out)
    assert res.patient.grid.spacing_mm == (6.0, 6.0, 6.0)
    vols = res.patient.structure_volumes_ml()
    liver_line = next(line for line in text.splitlines() if line.startswith("Liver "))
    assert float(liver_line.split()[-1]) == pytest.approx(vols["Liver"], abs=0.05)
    assert (tmp_path / "mha" / "ct.mha").is_file() and (tmp_path / "mha" / "PTV.mha").is_file()


def test_phantom_water_and_config(tmp_path, capsys):
    cfg = tmp_path / "box.toml"
    cfg.write_text('[phantom]\nname = "box"\nbuilder = "water"\n[parameters]\nsize_mm = 40.0\nspacing_mm = 4.0\n')
    out = tmp_path / "b.h5"
    assert main(["phantom", "water", "--config", str(cfg), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Body" in text and "64.0" in text
    assert read_results(out).patient.name == "box"
    # mismatched kind and config
    assert main(["phantom", "slab", "--config", str(cfg), "--out", str(tmp_path / "x.h5")]) == 2
    assert "builds a 'water' phantom, not 'slab'" in capsys.readouterr().err
    assert not (tmp_path / "x.h5").exists()


def test_phantom_help_explains_units(capsys):
    with pytest.raises(SystemExit):
        main(["phantom", "--help"])
    text = capsys.readouterr().out
    assert "mm" in text and "HU" in text and "mL" in text and "LPS" in text


def test_phantom_bad_spacing(tmp_path, capsys):
    assert main(["phantom", "cylinder", "--spacing-mm", "0", "--out", str(tmp_path / "c.h5")]) == 2
    assert "spacing_mm must be > 0, got 0.0" in capsys.readouterr().err
