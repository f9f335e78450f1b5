"""Protocol file, structure binding, constraint verdicts and reports (tomodose.evaluation.protocol)."""

from __future__ import annotations

import json
import math
try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10 (pyproject: tomli)
    import tomli as tomllib
from importlib import resources

import numpy as np
import pytest

from tomodose.evaluation.protocol import (
    DEFAULT_PROTOCOL, ProtocolError, available_protocols, check_target_nesting, evaluate_protocol,
    load_protocol, normalise_to_coverage, parse_protocol,
)
from tomodose.geometry.grid import Grid, ImageVolume
from tomodose.geometry.structures import Structure, StructureSet
from tomodose.report.protocol_report import text_table, to_dict, to_html, to_markdown, write_report

PHANTOM_NAMES = ["Body", "Liver", "GTV", "PGTV", "PTV", "ProtectedLiver", "SpinalCord", "Vertebra", "Kidney_L",
                 "Kidney_R", "Stomach", "Bowel", "Heart", "Lung_L", "Lung_R", "Esophagus"]


def raw_default() -> dict:
    text = resources.files("tomodose").joinpath("data", "protocols", DEFAULT_PROTOCOL + ".toml").read_bytes()
    return tomllib.loads(text.decode())


# --- the shipped file -------------------------------------------------------------------------
def test_shipped_protocol_loads_with_schema_version():
    assert DEFAULT_PROTOCOL in available_protocols()
    p = load_protocol()
    assert p.schema_version == 1 and p.n_fractions == 10
    assert [(t.name, t.prescription_gy) for t in p.targets] == [("PGTV", 50.0), ("PTV", 30.0)]
    assert all("Shen" in t.source for t in p.targets)
    assert set(PHANTOM_NAMES) <= set(p.structures)
    assert "Duodenum" in p.structures["Bowel"]["aliases"]


def test_every_number_has_a_source():
    raw = raw_default()
    assert raw["n_fractions_source"]
    for c in raw["constraints"]:
        assert c.get("source"), c["id"]
    for k, v in raw["parameters"].items():
        if not k.endswith("_source"):
            assert raw["parameters"].get(k + "_source"), k
    for t in raw["targets"]:
        assert t["source"]


EXPECTED = {  # id: (structure, metric, operator, goal, hard, unit) exactly as in the issue
    "PGTV_coverage": ("PGTV", "V100%Rx", ">", None, 96.0, "%"),
    "PGTV_underdose": ("PGTV", "V94%Rx", ">=", None, 97.0, "%"),
    "PTV_coverage": ("{coverage_mode}", "V100%Rx", ">", None, 96.0, "%"),
    "PTV_underdose": ("{coverage_mode}", "V94%Rx", ">=", None, 97.0, "%"),
    "NormalLiver_volume": ("{normal_liver}", "Volume", ">", None, 700.0, "cc"),
    "NormalLiver_mean": ("{normal_liver}", "Dmean", "<", None, 22.0, "Gy"),
    "ProtectedLiver_volume": ("ProtectedLiver", "Volume", ">", None, 400.0, "cc"),
    "ProtectedLiver_mean": ("ProtectedLiver", "Dmean", "<", None, 8.0, "Gy"),
    "SpinalCord_D0.03cc": ("SpinalCord", "D0.03cc", "<=", 30.0, 32.0, "Gy"),
    "Stomach_D0.5cc": ("Stomach", "D0.5cc", "<=", 30.0, 33.0, "Gy"),
    "Bowel_D0.5cc": ("Bowel", "D0.5cc", "<=", 30.0, 33.0, "Gy"),
    "Esophagus_D0.5cc": ("Esophagus", "D0.5cc", "<=", 30.0, 36.0, "Gy"),
    "Heart_D0.5cc": ("Heart", "D0.5cc", "<=", 45.0, 50.0, "Gy"),
    "Heart_mean": ("Heart", "Dmean", "<=", 15.0, 24.0, "Gy"),
    "Kidneys_mean": ("Kidneys", "Dmean", "<=", 12.0, 18.0, "Gy"),
    "Lungs_mean": ("Lungs", "Dmean", "<=", 10.0, 20.0, "Gy"),
    "Lungs_V20Gy": ("Lungs", "V20Gy", "<=", 20.0, 30.0, "%"),
}


def test_constraints_exactly_as_specified():
    p = load_protocol()
    got = {c.id: (c.structure, c.metric, c.operator, c.goal, c.hard, c.unit) for c in p.constraints if not c.is_info}
    assert got == EXPECTED
    oar = [c for c in p.constraints if c.goal is not None]
    assert all("isoeffective" in c.source for c in oar)
    assert p.derived["NormalLiver"] == {"op": "minus", "operands": ["Liver", "GTV"]}
    assert p.derived["Kidneys"]["op"] == "union" and p.derived["Lungs"]["op"] == "union"
    assert p.option_defaults() == {"target_nesting": "gtv_margins", "coverage_mode": "own_prescription",
                                   "normal_liver": "liver_minus_gtv", "coverage_use": "check"}


# --- validation of user files -----------------------------------------------------------------
@pytest.mark.parametrize("mutate,match", [
    (lambda d: d.update(schema_version=2), "schema_version must be 1"),
    (lambda d: d.pop("schema_version"), "missing required key 'schema_version'"),
    (lambda d: d["constraints"][0].update(metric="D95"), "not understood"),
    (lambda d: d["constraints"][0].update(structure="Pancreas"), "not declared"),
    (lambda d: d["constraints"][0].update(operator="=="), "operator must be"),
    (lambda d: d["constraints"][0].update(unit="Gy"), "unit says"),
    (lambda d: d["constraints"][0].pop("source"), "missing required key 'source'"),
    (lambda d: d["constraints"][0].pop("prescription_of"), "needs prescription_of"),
    (lambda d: d["constraints"][10].update(goal=40.0), "stricter"),
    (lambda d: d["targets"][0].update(prescription_gy=-5), "prescription_gy must be > 0"),
    (lambda d: d["options"]["normal_liver"].update(default="liver_minus_cat"), "not one of the choices"),
    (lambda d: d["derived"]["Kidneys"].update(op="xor"), "op must be"),
    (lambda d: d["constraints"].append(dict(d["constraints"][0])), "duplicate id"),
])
def test_invalid_protocols_rejected(mutate, match):
    d = raw_default()
    mutate(d)
    with pytest.raises(ProtocolError, match=match):
        parse_protocol(d, "test.toml")


def test_user_protocol_file(tmp_path):
    import tomli_w

    d = raw_default()
    d["id"] = "my_protocol"
    d["constraints"] = [c for c in d["constraints"] if c["id"] in ("PGTV_coverage", "SpinalCord_D0.03cc")]
    path = tmp_path / "mine.toml"
    path.write_bytes(tomli_w.dumps(d).encode())
    p = load_protocol(path)
    assert p.id == "my_protocol" and len(p.constraints) == 2
    bad = tmp_path / "bad.toml"
    bad.write_text("schema_version = [")
    with pytest.raises(ProtocolError, match="not valid TOML"):
        load_protocol(bad)
    with pytest.raises(FileNotFoundError):
        load_protocol(tmp_path / "absent.toml")
    with pytest.raises(ProtocolError, match="neither a file nor a shipped protocol"):
        load_protocol("no_such_protocol")


# --- evaluation on a small synthetic patient ------------------------------------------------
G = Grid((24, 30, 30), (4.0, 4.0, 4.0), (-58.0, -58.0, -46.0))


def ball(c, r):
    x, y, z = G.meshgrid_mm()
    return (((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) <= r * r).astype(np.float32)


def box(lo, hi):
    x, y, z = G.meshgrid_mm()
    m = (x >= lo[0]) & (x <= hi[0]) & (y >= lo[1]) & (y <= hi[1]) & (z >= lo[2]) & (z <= hi[2])
    return m.astype(np.float32)


def patient(skip=(), rename=None):
    gtv = ball((0, 0, 0), 10)
    s = {
        "Body": np.ones(G.shape, np.float32),
        "Liver": np.maximum(ball((0, 0, 0), 55), 0) * 1.0,
        "GTV": gtv,
        "PGTV": ball((0, 0, 0), 15),
        "PTV": ball((0, 0, 0), 20),
        "ProtectedLiver": ball((30, 30, 0), 25) * ball((0, 0, 0), 55),
        "SpinalCord": box((-4, 40, -40), (4, 48, 40)),
        "Kidney_L": box((30, 20, -40), (50, 40, -20)),
        "Stomach": box((-50, -50, 20), (-30, -30, 40)),
    }
    s["ProtectedLiver"] = np.clip(s["ProtectedLiver"] - ball((0, 0, 0), 40), 0, 1)
    rename = rename or {}
    return StructureSet(G, [Structure(rename.get(k, k), G, v) for k, v in s.items() if k not in skip])


def plan_dose(pgtv_gy=51.0, ptv_gy=31.0, falloff_mm=12.0):
    x, y, z = G.meshgrid_mm()
    r = np.sqrt(x ** 2 + y ** 2 + z ** 2)
    d = np.where(r <= 15, pgtv_gy, np.where(r <= 20, ptv_gy, ptv_gy * np.exp(-(r - 20) / falloff_mm)))
    return ImageVolume(G, d, "Gy", "dose")


def test_evaluation_pass_and_not_evaluated():
    ev = evaluate_protocol(DEFAULT_PROTOCOL, plan_dose(), patient())
    by = {r.id: r for r in ev.results}
    assert by["PGTV_coverage"].verdict == "pass" and by["PGTV_coverage"].value == pytest.approx(100.0)
    assert by["PGTV_coverage"].margin_hard == pytest.approx(4.0)
    assert by["Heart_mean"].verdict == "not evaluated" and by["Heart_mean"].value is None
    assert "Heart" in ev.missing_structures
    assert by["Kidneys_mean"].verdict == "pass"  # union of the kidneys present
    assert by["NormalLiver_exPTV_mean_info"].verdict == "info"
    assert ev.structure_volumes_ml["NormalLiver"] == pytest.approx(
        ev.structure_volumes_ml["Liver"] - ev.structure_volumes_ml["GTV"], rel=1e-6)
    nl = by["NormalLiver_mean"]
    assert nl.structure == "NormalLiver" and nl.verdict in ("pass", "hard limit failed")
    assert ev.plan_metrics["PGTV"]["Paddick_CI"] == pytest.approx(1.0)
    assert ev.radiobiology["ntcp_rild_primary"]["ntcp"] >= 0.0
    assert ev.radiobiology["targets"]["PGTV"]["prescription_eqd2_gy"] == pytest.approx(62.5)


def test_verdicts_goal_missed_hard_failed_and_margins():
    d = plan_dose()
    arr = d.array.copy()
    cord = patient()["SpinalCord"].mask
    arr[cord] = 31.0  # between goal 30 and hard 32
    stomach = patient()["Stomach"].mask
    arr[stomach] = 40.0  # above hard 33
    ev = evaluate_protocol(DEFAULT_PROTOCOL, d.with_array(arr), patient())
    by = {r.id: r for r in ev.results}
    cord_r = by["SpinalCord_D0.03cc"]
    assert cord_r.verdict == "goal missed"
    assert cord_r.value == pytest.approx(31.0, abs=0.01)
    assert cord_r.margin_goal == pytest.approx(-1.0, abs=0.01) and cord_r.margin_hard == pytest.approx(1.0, abs=0.01)
    assert by["Stomach_D0.5cc"].verdict == "hard limit failed"
    assert ev.overall == "hard limit failed"


def test_borderline_within_one_bin():
    d = plan_dose()
    arr = d.array.copy()
    arr[patient()["SpinalCord"].mask] = 32.005  # half a bin above the hard limit
    ev = evaluate_protocol(DEFAULT_PROTOCOL, d.with_array(arr), patient())
    r = {x.id: x for x in ev.results}["SpinalCord_D0.03cc"]
    assert r.verdict == "hard limit failed" and r.borderline
    arr[patient()["SpinalCord"].mask] = 20.0
    ev = evaluate_protocol(DEFAULT_PROTOCOL, d.with_array(arr), patient())
    assert not {x.id: x for x in ev.results}["SpinalCord_D0.03cc"].borderline


def test_options_normal_liver_and_coverage_mode():
    ev = evaluate_protocol(DEFAULT_PROTOCOL, plan_dose(), patient(),
                           options={"normal_liver": "liver_minus_ptv", "coverage_mode": "ptv_minus_pgtv"})
    by = {r.id: r for r in ev.results}
    assert by["NormalLiver_mean"].structure == "NormalLiver_exPTV"
    assert by["PTV_coverage"].structure == "PTV_exPGTV"
    with pytest.raises(ProtocolError, match="must be one of"):
        evaluate_protocol(DEFAULT_PROTOCOL, plan_dose(), patient(), options={"normal_liver": "all"})
    with pytest.raises(ProtocolError, match="unknown protocol option"):
        evaluate_protocol(DEFAULT_PROTOCOL, plan_dose(), patient(), options={"colour": "red"})


def test_coverage_as_normalisation():
    low = plan_dose(pgtv_gy=45.0, ptv_gy=28.0)
    ev = evaluate_protocol(DEFAULT_PROTOCOL, low, patient(), options={"coverage_use": "normalise"})
    assert ev.scale_factor == pytest.approx(50.0 / 45.0, rel=1e-3)
    r = {x.id: x for x in ev.results}["PGTV_coverage"]
    assert r.value >= 96.5 - 1e-6 and r.verdict == "pass"


def test_normalise_to_coverage_hand_computed():
    g = Grid((10, 10, 100), (1.0, 1.0, 1.0))
    rng = np.random.default_rng(1)
    d = ImageVolume(g, rng.uniform(40.0, 60.0, g.shape), "Gy", "dose")  # uniform doses 40..60 Gy
    s = Structure("T", g, np.ones(g.shape, np.float32))
    f = normalise_to_coverage(d, s, 50.0, coverage=0.96)
    # D96% of U(40, 60) is 40.8 Gy -> factor 50 / 40.8
    assert f == pytest.approx(50.0 / 40.8, rel=2e-3)
    from tomodose.evaluation.dvh import compute_dvh
    assert compute_dvh(d.with_array(d.array * f), s).volume_at_dose_percent(50.0) == pytest.approx(96.0, abs=0.05)
    with pytest.raises(ValueError, match="coverage"):
        normalise_to_coverage(d, s, 50.0, coverage=1.5)


def test_missing_required_structure_and_aliases():
    with pytest.raises(ProtocolError, match=r"requires structure\(s\) \['GTV'\]"):
        evaluate_protocol(DEFAULT_PROTOCOL, plan_dose(), patient(skip=("GTV",)))
    ev = evaluate_protocol(DEFAULT_PROTOCOL, plan_dose(), patient(rename={"SpinalCord": "spinal_cord",
                                                                          "Stomach": "STOMACH"}))
    by = {r.id: r for r in ev.results}
    assert by["SpinalCord_D0.03cc"].verdict == "pass" and by["Stomach_D0.5cc"].verdict == "pass"


def test_empty_required_structure():
    ss = patient()
    items = [ss[k] for k in ss if k != "GTV"] + [Structure("GTV", G, np.zeros(G.shape, np.float32))]
    with pytest.raises(ProtocolError, match="empty"):
        evaluate_protocol(DEFAULT_PROTOCOL, plan_dose(), StructureSet(G, items))


def test_target_nesting_check():
    ss = patient()
    # swap PGTV and PTV: PGTV (r 20) no longer inside PTV (r 15)
    swapped = [ss[k] for k in ss if k not in ("PGTV", "PTV")] + [ss["PTV"].renamed("PGTV"), ss["PGTV"].renamed("PTV")]
    with pytest.raises(ProtocolError, match="lies outside PTV"):
        evaluate_protocol(DEFAULT_PROTOCOL, plan_dose(), StructureSet(G, swapped))
    ev = evaluate_protocol(DEFAULT_PROTOCOL, plan_dose(), StructureSet(G, swapped), options={"target_nesting": "as_written"})
    assert ev.nesting_outside_percent == pytest.approx(0.0)
    assert math.isnan(check_target_nesting({}, "none"))


def test_mismatching_grids():
    other = Grid(G.shape, G.spacing_mm, (0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="same grid"):
        evaluate_protocol(DEFAULT_PROTOCOL, ImageVolume(other, plan_dose().array, "Gy"), patient())
    with pytest.raises(ValueError, match="Gy"):
        evaluate_protocol(DEFAULT_PROTOCOL, ImageVolume(G, plan_dose().array, "cGy"), patient())


def test_reports(tmp_path):
    ev = evaluate_protocol(DEFAULT_PROTOCOL, plan_dose(), patient())
    files = write_report(ev, json_path=tmp_path / "r.json", markdown_path=tmp_path / "r.md",
                         html_path=tmp_path / "r.html", plot_path=tmp_path / "r.png")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["protocol"]["schema_version"] == 1 and data["overall"] in ("pass", "goal missed", "hard limit failed")
    row = next(c for c in data["constraints"] if c["id"] == "PGTV_coverage")
    assert {"value", "hard", "margin_hard", "verdict", "borderline", "source"} <= set(row)
    assert "PGTV" in data["dvhs"]
    md = (tmp_path / "r.md").read_text()
    assert "| PGTV_coverage | PGTV | V100%Rx |" in md and "![DVH](r.png)" in md and "margin to hard" in md
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<table>" in (tmp_path / "r.html").read_text()
    assert "not evaluated" in text_table(ev)
    assert set(files) == {"json", "markdown", "html", "plot"}
    assert to_dict(ev)["scale_factor"] == 1.0 and "<html>" in to_html(ev) and "# Protocol" in to_markdown(ev)


def test_borderline_volume_metric():
    from tomodose.evaluation.dvh import DVH
    from tomodose.evaluation.protocol import Constraint, _evaluate_constraint

    doses = np.linspace(0.0, 40.0, 40001)  # uniform: V20Gy = 50 %, 1 % per 0.4 Gy
    dvh = DVH.from_samples(doses, np.ones_like(doses), name="Lungs")
    near = Constraint("v", "Lungs", "V20Gy", "%", "test", "<=", None, 50.01)
    far = Constraint("v", "Lungs", "V20Gy", "%", "test", "<=", None, 55.0)
    r_near = _evaluate_constraint(near, "Lungs", dvh, None, 0.01)
    r_far = _evaluate_constraint(far, "Lungs", dvh, None, 0.01)
    assert r_near.value == pytest.approx(50.0, abs=0.01)
    assert r_near.verdict == "pass" and r_near.borderline  # 0.01 Gy lower -> 50.025 % > 50.01 %
    assert r_far.verdict == "pass" and not r_far.borderline
    assert r_far.margin_hard == pytest.approx(5.0, abs=0.01)
