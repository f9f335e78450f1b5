"""``tomodose dvh`` on an HDF5 results file (tomodose.cli.dvh)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tomodose.cli.main import main
from tomodose.geometry.grid import ImageVolume

hdf5 = pytest.importorskip("tomodose.io.hdf5", reason="tomodose.io.hdf5 (helper FOUNDATION) not available")


@pytest.fixture(scope="module")
def results_file(tmp_path_factory):
    from scipy import ndimage

    from tomodose.phantoms.liver import liver_phantom

    p = liver_phantom(spacing_mm=6.0)
    ptv, pgtv = p.structures["PTV"].mask, p.structures["PGTV"].mask
    dist = ndimage.distance_transform_edt(~ptv, sampling=p.grid.spacing_mm[::-1])
    d = 31.0 * np.exp(-dist / 15.0)
    d[pgtv] = 51.0
    path = tmp_path_factory.mktemp("cli") / "res.h5"
    hdf5.write_results(path, patient=p, doses={"total": ImageVolume(p.grid, d, "Gy", "dose"),
                                               "other": ImageVolume(p.grid, np.full(p.grid.shape, 40.0), "Gy", "dose")})
    return path


def test_dvh_prints_protocol_table_and_writes_reports(results_file, tmp_path, capsys):
    out_json, out_md, out_png = tmp_path / "e.json", tmp_path / "e.md", tmp_path / "e.png"
    rc = main(["dvh", str(results_file), "--dose", "total", "--json", str(out_json), "--markdown", str(out_md),
               "--plot", str(out_png)])
    text = capsys.readouterr().out
    assert rc in (0, 1)
    assert "PGTV_coverage" in text and "margin to hard" in text and "NormalLiver_mean" in text
    data = json.loads(out_json.read_text())
    assert data["dose"] == "total" and len(data["constraints"]) == 19
    assert "margin to goal" in out_md.read_text()
    assert out_png.stat().st_size > 1000


def test_dvh_hard_failure_exit_status_and_options(results_file, capsys):
    rc = main(["dvh", str(results_file), "--dose", "other", "--option", "normal_liver=liver_minus_ptv"])
    text = capsys.readouterr().out
    assert "NormalLiver_exPTV" in text
    assert rc == 1 and "FAIL" in text  # 40 Gy everywhere breaks hard limits


def test_dvh_errors(results_file, tmp_path, capsys):
    assert main(["dvh", str(results_file)]) == 0  # two doses: 'total' is the default
    assert "on dose 'total'" in capsys.readouterr().out
    assert main(["dvh", str(results_file), "--dose", "nope"]) == 2
    assert "--dose 'nope'" in capsys.readouterr().err
    assert main(["dvh", str(tmp_path / "absent.h5")]) == 2
    assert main(["dvh", str(results_file), "--dose", "total", "--protocol", "no_such"]) == 2
    assert "no_such" in capsys.readouterr().err
    assert main(["dvh", "x.h5", "--list-protocols"]) == 0
    assert "liver_hcc_5x10_shen2021" in capsys.readouterr().out
