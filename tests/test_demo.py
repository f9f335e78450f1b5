"""The main job end to end (coarse grid so it stays quick): phantom -> optimised plan -> CCC dose ->
protocol report, figures and HDF5 results."""

import json

import numpy as np
import pytest

from tomodose.cli.main import main


@pytest.mark.slow
def test_demo_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["--no-progress", "demo", "--spacing-mm", "8", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "PGTV_coverage" in text and "overall:" in text
    for name in ("results.h5", "report.md", "report.html", "report.json", "dvh.png", "dose_slices.png",
                 "sinogram.png", "summary.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["missing"] == []
    history = summary["optimisation"]["objective_history"]
    assert all(b <= a + 1e-12 for a, b in zip(history, history[1:]))
    # the dose was normalised so the prescription isodose covers the protocol's coverage (96.5 %) of the
    # PGTV; on this coarse 8 mm grid one PGTV voxel is ~0.5 % of its volume, so the DVH value lands
    # within a voxel of it - and the protocol's rule (> 96 %) must hold
    report = json.loads((out / "report.json").read_text())
    rows = {r["id"]: r for r in report["constraints"]}
    assert rows["PGTV_coverage"]["value"] > 96.0
    assert summary["normalisation_factor"] > 0

    from tomodose.io.hdf5 import read_results

    res = read_results(out / "results.h5")
    dose = res.doses["collapsed_cone"]
    assert dose.unit == "Gy" and np.isfinite(dose.array).all() and dose.array.max() > 50
    assert res.plan.n_fractions == 10


@pytest.mark.slow
def test_demo_missing_lists_protocol_structures_absent_from_the_phantom(tmp_path):
    """A phantom cut below the heart: the protocol's Heart rows are not evaluated and the summary says why."""
    from tomodose.demo import DemoConfig, run_demo

    cfg = tmp_path / "short.toml"
    cfg.write_text('[phantom]\nname = "short"\nbuilder = "liver"\n[parameters]\nz_range_mm = [-110.0, 75.0]\n'
                   'noise_hu = 0.0\n')
    result = run_demo(tmp_path / "out", DemoConfig(phantom=str(cfg), spacing_mm=10.0, optimise=False,
                                                   engine="pencil_beam"), progress=False)
    summary = result["summary"]
    assert "Heart" in summary["missing"]
    assert set(summary["missing"]) == set(result["evaluation"].missing_structures)
    rows = {r.id: r for r in result["evaluation"].results}
    assert rows["Heart_mean"].verdict == "not evaluated"
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["missing"] == summary["missing"]
