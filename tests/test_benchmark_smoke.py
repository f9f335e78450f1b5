"""Smoke run of the benchmark suite through the CLI (tiny sizes), so it cannot rot."""

from __future__ import annotations

import json

import pytest

from tomodose.benchmarking.cases import CASES
from tomodose.benchmarking.harness import fit_exponent, run_case
from tomodose.benchmarking.suite import SuiteConfig, summarise
from tomodose.cli.main import main


def test_quick_suite_writes_json_and_markdown(tmp_path, capsys):
    rc = main(["benchmark", "--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    payload = json.loads((tmp_path / "benchmark.json").read_text())
    md = (tmp_path / "benchmark.md").read_text()
    names = {r["name"] for r in payload["results"]}
    assert names == set(CASES)
    for r in payload["results"]:
        assert r["error"] is None, r
        assert r["wall_s"] > 0 and r["first_call_s"] > 0 and r["peak_rss_mib"] >= 0
    for name in CASES:
        assert f"| {name} |" in md
        assert name in payload["exponents"]
    assert payload["machine"]["numba"] and "git_commit" in payload["machine"]
    assert "terma" in payload["thread_scaling"]
    assert "exponents" in out


def test_fit_exponent_recovers_power_law():
    x = [1e3, 1e4, 1e5]
    assert fit_exponent(x, [2e-3 * v**1.5 for v in x]) == pytest.approx(1.5)
    assert fit_exponent([1.0], [1.0]) != fit_exponent([1.0], [1.0])  # NaN with < 2 points


def test_failing_case_is_reported_not_hung():
    r = run_case("bad", "tomodose.benchmarking.cases:no_such_case", 1.0, repeats=1, timeout_s=60)
    assert r.error and "no_such_case" in r.error


def test_summarise_thread_speed_up():
    from tomodose.benchmarking.harness import CaseResult

    rows = [CaseResult("terma", "8.0", t, 2.0, w, 1.0, 10.0, {"ladder": "threads"}) for t, w in ((1, 2.0), (2, 1.0))]
    s = summarise(rows)
    assert s["thread_scaling"]["terma"]["2 threads"]["speed_up"] == pytest.approx(2.0)


@pytest.mark.parametrize("kwargs, word", [
    ({"cases": ("nope",)}, "cases"),
    ({"spacings_mm": (0.0,)}, "spacings_mm"),
    ({"threads": (0,)}, "threads"),
    ({"repeats": 0}, "repeats"),
    ({"rotations": (-1.0,)}, "rotations"),
])
def test_bad_config_is_refused(kwargs, word):
    with pytest.raises(ValueError, match=word):
        SuiteConfig(**kwargs)


def test_bad_cli_sizes_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["benchmark", "--sizes", "8,abc"])
    assert exc.value.code == 2
    assert "comma-separated" in capsys.readouterr().err
