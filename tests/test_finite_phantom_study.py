"""Checks of kernels/study_finite_phantom_mc.py's geometry and bookkeeping (no Monte Carlo run)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests._scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "kernels" / "study_finite_phantom_mc.py"
RESULTS = ROOT / "kernels" / "study_finite_phantom_mc.json"


@pytest.fixture(scope="module")
def study():
    return load_script(SCRIPT)


@pytest.mark.parametrize("phantom", ["box", "large", "long_z"])
def test_tally_bins_cover_the_phantom_and_nest_the_axis_bins(study, phantom):
    xe, ye, ze = study.edges_mm(phantom)
    sx, sy, sz = study.PHANTOMS[phantom]
    for e, size in ((xe, sx), (ye - study.surface_y_mm(phantom), sy), (ze, sz)):
        assert np.all(np.diff(e) > 0)
    assert xe[0] == -sx / 2 and xe[-1] == sx / 2 and ze[0] == -sz / 2 and ze[-1] == sz / 2
    assert ye[0] == study.surface_y_mm(phantom) and ye[-1] == pytest.approx(ye[0] + sy)
    for (x0, x1), (z0, z1) in study.AXIS_BINS.values():  # the axis bins are unions of tally bins
        assert x0 in xe and x1 in xe and z0 in ze and z1 in ze


def test_large_phantom_has_150_mm_of_water_beyond_the_field(study):
    sx, sy, sz = study.PHANTOMS["large"]
    depth = sy  # the field's widest point is at the exit
    mag = (study.SSD_MM + depth) / study.SSD_MM
    assert sx / 2 - 200.0 * mag >= 150.0  # 64 leaves x 6.25 mm = 400 mm at the isocentre
    assert sz / 2 - 0.5 * max(study.JAWS) * mag >= 150.0
    assert sy >= 200.0 + 100.0


def test_axis_mean_and_sigma(study):
    edges = study.edges_mm("box")
    shape = tuple(len(e) - 1 for e in edges[::-1])
    rng = np.random.default_rng(1)
    d = rng.uniform(1.0, 2.0, shape)
    s = np.full(shape, 0.02)
    m, r = study.axis_sum(d, edges, "narrow", s)
    # the narrow bin is exactly one tally bin
    xe, _, ze = edges
    i, k = list(xe).index(-10.0), list(ze).index(-2.5)
    np.testing.assert_allclose(m, d[k, :, i])
    np.testing.assert_allclose(r, 0.02)
    m, r = study.axis_sum(d, edges, "wide", s)
    assert np.all(r < 0.02)  # more bins, smaller relative error


def test_interpolation_with_sigma(study):
    c = np.array([5.0, 15.0, 25.0])
    v = np.array([1.0, 2.0, 4.0])
    val, sig = study.interp_with_sigma(c, v, np.array([0.1, 0.1, 0.2]), 20.0)
    assert val == pytest.approx(3.0) and sig == pytest.approx(np.hypot(0.05, 0.1))
    out = study.curve_summary(c, v, np.full(3, 0.01), depths=(10.0, 15.0))
    assert out["abs"] == pytest.approx([1.5, 2.0])


def test_stored_results_are_consistent():
    """The JSON's ratio columns follow from its own curves (when the results are committed)."""
    if not RESULTS.exists():
        pytest.skip("kernels/study_finite_phantom_mc.json not generated")
    res = json.loads(RESULTS.read_text(encoding="utf-8"))
    for jd in res["jaws"].values():
        for pd in jd["phantoms"].values():
            for b in pd["bins"].values():
                mc = np.array(b["mc"]["norm"])
                assert mc[res["depths_mm"].index(res["normalisation_depth_mm"])] == pytest.approx(1.0)
                for key, e in b.items():
                    if key.startswith(("collapsed", "pencil")):
                        np.testing.assert_allclose(e["engine_over_mc_norm_pct"], 100 * (np.array(e["norm"]) / mc - 1),
                                                   atol=1e-9)
