"""The static-beam peer comparison (pyRadPlan, OpenTPS in their own environments)."""

import json
import sys

import numpy as np
import pytest

from tomodose.benchmarking import static_peers
from tests._scripts import load_script


def _load_runner_common():
    return load_script(static_peers.RUNNERS / "_common.py", "_peer_common")


def test_case_file_is_what_the_runners_read(tmp_path):
    path = static_peers.export_case(tmp_path / "case.npz", 12.0)
    case = _load_runner_common().load_case(path)
    nz, ny, nx = case["hu"].shape
    assert case["target"].shape == case["body"].shape == (nz, ny, nx)
    assert case["target"].sum() > 0 and not np.any(case["target"] & ~case["body"])
    assert len(case["spacing_mm"]) == len(case["origin_mm"]) == len(case["isocentre_mm"]) == 3
    assert case["jaw_mm"] == static_peers.JAW_MM and case["gantry_deg"] == 0.0
    assert float(case["field_x_mm"]) > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case.npz"]  # no temporary left


def test_missing_environment_is_reported_not_raised(tmp_path):
    res = static_peers.run_peer("pyradplan", tmp_path / "case.npz", envs_dir=tmp_path)
    assert res["status"].startswith("not installed")
    with pytest.raises(ValueError, match="peer must be one of"):
        static_peers.env_python("matRad")


def test_runner_output_is_parsed(tmp_path, monkeypatch):
    """A fake environment whose 'python' prints a result line: the parent parses the last JSON line."""
    fake = tmp_path / "envs" / "opentps" / "bin"
    fake.mkdir(parents=True)
    py = fake / "python"
    py.write_text(f"#!{sys.executable}\nprint('noise')\nprint('{{\"compute_s\": 2.0, \"n_voxels\": 10, "
                  f"\"n_beamlets\": 5}}')\n")
    py.chmod(0o755)
    res = static_peers.run_peer("opentps", tmp_path / "case.npz", envs_dir=tmp_path / "envs")
    assert res == {"status": "ok", "compute_s": 2.0, "n_voxels": 10, "n_beamlets": 5}
    py.write_text(f"#!{sys.executable}\nimport sys\nsys.exit('boom')\n")
    res = static_peers.run_peer("opentps", tmp_path / "case.npz", envs_dir=tmp_path / "envs")
    assert res["status"].startswith("failed (exit 1)") and "boom" in res["status"]


def test_ours_and_table(tmp_path):
    mine = static_peers.ours(12.0, "influence", repeats=1)
    assert mine["n_beamlets"] > 0 and mine["nnz"] > 0 and mine["compute_s"] > 0
    theirs = {"status": "ok", "peer": "pyRadPlan", "version": "x", "engine": "pb", "compute_s": 1.0,
              "n_voxels": mine["n_voxels"], "n_beamlets": 10, "peak_rss_mib": 100.0}
    row = {"size_mm": 12.0, "peer": "pyradplan", "ours": mine, "theirs": theirs,
           "ratio_time": 1.0 / mine["compute_s"], "ratio_per_voxel_beamlet": 1.0}
    md = static_peers.to_markdown([row, {**row, "theirs": {"status": "not installed"}}])
    assert md.count("\n") == 4 and "not installed" in md
    json.dumps(row)
    with pytest.raises(ValueError, match="what must be"):
        static_peers.ours(12.0, "mc")
