import numpy as np
import pytest

from tomodose.cli.main import main
from tomodose.delivery.plan import HelicalPlan
from tomodose.io.hdf5 import read_results, write_results
from tomodose.phantoms import water_box


def test_cli_dose_writes_calibrated_dose(tmp_path, capsys):
    patient = water_box(size_mm=(120, 120, 60), spacing_mm=8.0)
    plan = HelicalPlan(sinogram=np.full((51, 64), 0.5), field_width_mm=25.0, pitch=0.3, gantry_period_s=15.0,
                       n_fractions=5)
    src = write_results(tmp_path / "in.h5", patient=patient, plan=plan)
    out = tmp_path / "out.h5"
    assert main(["--no-progress", "dose", str(src), "--out", str(out), "--export", str(tmp_path / "d.mha")]) == 0
    assert "collapsed_cone: max" in capsys.readouterr().out
    res = read_results(out)
    dose = res.doses["collapsed_cone"]
    assert dose.unit == "Gy" and dose.array.max() > 0
    assert (tmp_path / "d.mha").is_file()


def test_cli_dose_needs_a_plan(tmp_path, capsys):
    src = write_results(tmp_path / "p.h5", patient=water_box(size_mm=(40, 40, 40), spacing_mm=10.0))
    assert main(["dose", str(src)]) == 2
    assert "has no /plan group" in capsys.readouterr().err
