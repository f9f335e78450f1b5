"""Batch studies: perturbation model, study TOML and content hashes, Dask runs (LocalCluster with 2
workers) equal to serial runs, resume by content, retries and failure reports, a worker killed
mid-study, interruption without half-written files, the ``tomodose batch`` CLI."""

from __future__ import annotations

import json
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tomodose.batch import (
    Case,
    Perturbation,
    PhantomSpec,
    Study,
    apply_perturbation,
    load_study,
    run_cases_serially,
    study_from_dict,
)
from tomodose.delivery.plan import HelicalPlan

# --- a tiny study: liver phantom on a 12 mm grid, 5 cm jaw, pitch 0.86 (162 projections) ----------
TINY_BASE = {"phantom": "liver_default", "phantom_overrides": {"spacing_mm": 12.0},
             "plan": {"field_width_mm": 50.0, "pitch": 0.86, "gantry_period_s": 20.0, "sinogram": "conformal"}}


def tiny_dict(grid=None, cases=None, **study):
    data = {"study": {"name": "tiny", **study}, "base": json.loads(json.dumps(TINY_BASE))}
    data["grid"] = grid if grid is not None else [{"couch_speed_error_percent": [0.0, 3.0]},
                                                   {"leaf_latency_error_ms": [-30.0]}]
    if cases:
        data["cases"] = cases
    return data


def tiny_study(**kw) -> Study:
    return study_from_dict(tiny_dict(**kw))


def _plan(n=102, fw=25.0, pitch=0.3, period=20.0, sino=None):
    rng = np.random.default_rng(0)
    s = rng.uniform(0.0, 1.0, (n, 64)) if sino is None else sino
    s[:, :10] = 0.0
    return HelicalPlan(sinogram=s, field_width_mm=fw, pitch=pitch, gantry_period_s=period, couch_start_mm=-30.0,
                       isocentre_lps_mm=(5.0, -3.0, 1.0), n_fractions=10)


# --- perturbation model ------------------------------------------------------------------------
def test_zero_perturbation_is_the_planned_delivery():
    plan = _plan()
    seq, bm = apply_perturbation(plan, Perturbation())
    ref = plan.projections()
    for name in ("gantry_angle_deg", "couch_mm", "leaf_open_fraction", "duration_s", "arc_deg", "couch_travel_mm"):
        np.testing.assert_array_equal(getattr(seq, name), getattr(ref, name))
    assert seq.isocentre_lps_mm == ref.isocentre_lps_mm


def test_couch_speed_error_stretches_the_helix():
    plan = _plan()
    seq, _ = apply_perturbation(plan, Perturbation(couch_speed_error_percent=2.0))
    ref = plan.projections()
    np.testing.assert_allclose(seq.couch_travel_mm, ref.couch_travel_mm * 1.02, rtol=1e-12)
    np.testing.assert_allclose(seq.couch_mm - plan.couch_start_mm, (ref.couch_mm - plan.couch_start_mm) * 1.02,
                               rtol=1e-12)
    np.testing.assert_array_equal(seq.duration_s, ref.duration_s)
    np.testing.assert_array_equal(seq.leaf_open_fraction, ref.leaf_open_fraction)
    np.testing.assert_array_equal(seq.gantry_angle_deg, ref.gantry_angle_deg)


def test_gantry_period_error_lengthens_projections_and_couch_travel():
    plan = _plan()
    seq, _ = apply_perturbation(plan, Perturbation(gantry_period_error_percent=-5.0))
    ref = plan.projections()
    np.testing.assert_allclose(seq.duration_s, ref.duration_s * 0.95, rtol=1e-12)
    np.testing.assert_allclose(seq.couch_travel_mm, ref.couch_travel_mm * 0.95, rtol=1e-12)  # couch keeps mm/s
    np.testing.assert_array_equal(seq.leaf_open_fraction, ref.leaf_open_fraction)
    assert seq.treatment_time_s == pytest.approx(0.95 * plan.treatment_time_s)


@pytest.mark.parametrize("latency_ms", [-30.0, 12.0])
def test_leaf_latency_changes_open_times_of_opened_leaves_only(latency_ms):
    plan = _plan()
    seq, _ = apply_perturbation(plan, Perturbation(leaf_latency_error_ms=latency_ms))
    dur = plan.projection_duration_s
    t_plan = plan.sinogram * dur
    t_real = seq.leaf_open_fraction * dur
    opened = plan.sinogram > 0
    expected = np.clip(t_plan + latency_ms / 1000.0, 0.0, dur)
    np.testing.assert_allclose(t_real[opened], expected[opened], atol=1e-12)
    assert np.all(seq.leaf_open_fraction[~opened] == 0.0)
    if latency_ms < 0:  # some short openings vanish, none goes negative
        assert np.any((t_real == 0) & opened) and seq.leaf_open_fraction.min() >= 0.0
    else:
        assert seq.leaf_open_fraction.max() <= 1.0


def test_jaw_width_error_changes_the_real_fwhm_of_the_plan_jaw_only():
    from tomodose.terma.beam_model import BeamModel

    plan = _plan()
    nominal = BeamModel.default()
    seq, bm = apply_perturbation(plan, Perturbation(jaw_width_error_mm=1.5), nominal)
    # relative to the beam model's own (commissioned) FWHM of the plan's jaw
    fwhm0 = nominal.real_fwhm_mm(25.0, plan.machine)
    assert bm.real_fwhm_mm(25.0, plan.machine) == pytest.approx(fwhm0 + 1.5)
    assert bm.real_fwhm_mm(50.0, plan.machine) == nominal.real_fwhm_mm(50.0, plan.machine)
    v = np.linspace(-30, 30, 601)
    prof = bm.jaw_profile(v, 25.0, plan.machine)
    above = v[prof >= 0.5]
    assert above[-1] - above[0] == pytest.approx(fwhm0 + 1.5, abs=0.15)  # measured FWHM of the new profile
    with pytest.raises(ValueError, match="jaw_width_error_mm"):
        apply_perturbation(plan, Perturbation(jaw_width_error_mm=-30.0), nominal)


def test_setup_shift_moves_the_isocentre_opposite_to_the_patient():
    plan = _plan()
    seq, _ = apply_perturbation(plan, Perturbation(setup_shift_mm=(2.0, -1.0, 3.0)))
    assert seq.isocentre_lps_mm == pytest.approx((5.0 - 2.0, -3.0 + 1.0, 1.0 - 3.0))


def test_setup_shift_shifts_the_dose_with_the_patient():
    """Physics: a patient lying 20 mm superior of the planned position (two 10 mm slices) in a long
    water box gets the same dose pattern, two slices more inferior in the patient (pencil beam)."""
    from tomodose.dose import compute_dose
    from tomodose.phantoms import water_box

    patient = water_box(size_mm=(120.0, 120.0, 160.0), spacing_mm=10.0, air_margin_mm=10.0)
    sino = np.zeros((51, 64))
    sino[:, 28:36] = 1.0
    plan = HelicalPlan(sinogram=sino, field_width_mm=25.0, pitch=0.3, gantry_period_s=20.0, couch_start_mm=-4.0)
    base, _ = apply_perturbation(plan, Perturbation())
    shifted, _ = apply_perturbation(plan, Perturbation(setup_shift_mm=(0.0, 0.0, 20.0)))
    d0 = compute_dose(patient, base, "pencil_beam", progress=False).per_fraction.array
    d1 = compute_dose(patient, shifted, "pencil_beam", progress=False).per_fraction.array
    inner = slice(3, -3)  # away from the ends of the box
    np.testing.assert_allclose(d1[inner], np.roll(d0, -2, axis=0)[inner], rtol=0, atol=1e-6 * d0.max())
    assert np.argmax(d1.max(axis=(1, 2))) == np.argmax(d0.max(axis=(1, 2))) - 2


# --- study TOML, names and content hashes --------------------------------------------------------
def test_study_grid_expansion_and_names():
    st = tiny_study(grid=[{"name": "couch", "couch_speed_error_percent": [-1, 0, 1]},
                          {"leaf_latency_error_ms": [0, 10], "jaw_width_error_mm": [0.0, 1.0]}],
                    cases=[{"name": "shifted", "perturbation": {"setup_shift_mm": [0, 0, 5]}}])
    names = [c.name for c in st.cases]
    assert len(names) == 3 + 4 + 1 and len(set(names)) == len(names)
    assert names[0] == "couch: couch -1%" and names[1] == "couch: nominal"
    assert st.cases[-1].perturbation.setup_shift_mm == (0.0, 0.0, 5.0)
    assert st.cases[0].phantom.overrides == {"spacing_mm": 12.0}
    # the nominal case of each grid has the same content: one hash
    nominal = [st.case_hash(c) for c in st.cases if c.perturbation.is_zero]
    assert len(nominal) == 2 and nominal[0] == nominal[1]


def test_case_hash_is_content_not_name(tmp_path):
    st = tiny_study()
    c = st.cases[1]
    renamed = Study("other", (replace(c, name="renamed"),), st.settings)
    assert renamed.case_hash(renamed.cases[0]) == st.case_hash(c)
    # integer and float spellings of a number are the same content
    a = study_from_dict(tiny_dict(grid=[{"couch_speed_error_percent": [3]}]))
    assert a.case_hash(a.cases[0]) == st.case_hash(c)
    changed = [
        replace(c, perturbation=replace(c.perturbation, couch_speed_error_percent=3.5)),
        replace(c, phantom=PhantomSpec("liver_default", {"spacing_mm": 11.0})),
        replace(c, plan=replace(c.plan, pitch=0.8)),
    ]
    hashes = {st.case_hash(c)} | {Study("x", (x,), st.settings).case_hash(x) for x in changed}
    hashes.add(Study("x", (c,), replace(st.settings, engine="collapsed_cone")).case_hash(c))
    hashes.add(Study("x", (c,), replace(st.settings, normalisation="none")).case_hash(c))
    assert len(hashes) == 6
    # a phantom TOML edited on disk changes the hash of a case that names it
    toml = tmp_path / "ph.toml"
    toml.write_text('[phantom]\nbuilder = "water"\n[parameters]\nsize_mm = [100.0, 100.0, 100.0]\n')
    s1 = Study("t", (Case("w", PhantomSpec(str(toml))),), st.settings)
    h1 = s1.case_hash(s1.cases[0])
    toml.write_text('[phantom]\nbuilder = "water"\n[parameters]\nsize_mm = [100.0, 100.0, 110.0]\n')
    s2 = Study("t", (Case("w", PhantomSpec(str(toml))),), st.settings)
    assert s2.case_hash(s2.cases[0]) != h1


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d["base"]["perturbation"].update(couch_speed_error=1.0), "couch_speed_error"),
    (lambda d: d["base"]["plan"].update(pitch=-0.3), "plan.pitch"),
    (lambda d: d["base"]["plan"].update(sinogram="magic"), "plan.sinogram"),
    (lambda d: d["study"].update(engine="monte_carlo"), "engine"),
    (lambda d: d["study"].update(normalisation="max"), "normalisation"),
    (lambda d: d["grid"][0].update(couch_speed_error_percent=2.0), "couch_speed_error_percent"),
    (lambda d: d["grid"][0].update(pitchh=[0.3]), "pitchh"),
    (lambda d: d["grid"][0].update(couch_speed_error_percent=[-120.0]), "couch_speed_error_percent"),
    (lambda d: d["grid"][0].update(setup_shift_mm=[1.0, 2.0]), "setup_shift_mm"),
    (lambda d: d["grid"][0].update(leaf_latency_error_ms=[float("nan")]), "leaf_latency_error_ms"),
    (lambda d: d.update(cluster={"n_workers": 0}), "n_workers"),
    (lambda d: d.update(cluster={"retries": -1}), "retries"),
    (lambda d: d["base"]["phantom_overrides"].update(spacing_cm=1.0), "spacing_cm"),
    (lambda d: d["base"].update(phantom="no_such_phantom"), "no_such_phantom"),
    (lambda d: d.update(studdy={}), "studdy"),
    (lambda d: d["study"].update(engine_options={"far_field_stepp": 2}), "far_field_stepp"),
    (lambda d: d["study"].update(protocol_options={"normal_liver": "whole"}), "normal_liver"),
    (lambda d: d["study"].update(protocol="no_protocol"), "no_protocol"),
])
def test_bad_study_input_names_the_parameter(mutate, match):
    d = tiny_dict()
    d["base"].setdefault("perturbation", {})
    mutate(d)
    with pytest.raises((ValueError, KeyError)) as info:
        st = study_from_dict(d)
        st.case_hash(st.cases[0])  # phantom parameters are resolved with the content
    assert match in str(info.value)


def test_missing_files_are_named(tmp_path):
    d = tiny_dict()
    d["base"]["plan"]["sinogram"] = "absent.npy"
    with pytest.raises(FileNotFoundError, match="absent.npy"):
        study_from_dict(d, root=tmp_path)
    d = tiny_dict()
    d["base"] = {"volume": "patient.h5"}
    with pytest.raises(FileNotFoundError, match="patient.h5"):
        study_from_dict(d, root=tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.toml"):
        load_study(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[study\nname=1")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_study(bad)


def test_run_study_rejects_bad_arguments(tmp_path):
    from tomodose.batch import run_study

    st = tiny_study()
    with pytest.raises(ValueError, match="threads_per_worker"):
        run_study(st, tmp_path, threads_per_worker=0)
    with pytest.raises(ValueError, match="retries"):
        run_study(st, tmp_path, retries=-2)
    with pytest.raises(ValueError, match="summary_formats"):
        run_study(st, tmp_path, summary_formats=("xlsx",))
    with pytest.raises(TypeError, match="study"):
        run_study({"cases": []}, tmp_path)


def test_worked_example_study_file_loads():
    path = Path(__file__).resolve().parents[1] / "examples" / "studies" / "liver_couch_latency.toml"
    st = load_study(path)
    assert st.settings.engine == "pencil_beam" and len(st.cases) >= 10
    assert {c.phantom.phantom for c in st.cases} == {"liver_default"}
    assert len({st.case_hash(c) for c in st.cases}) == len(st.cases) - 1  # two grids share the nominal case


# --- Dask runs (need the batch extra: dask[distributed], pandas) ---------------------------------
def _need_batch_extra():
    pytest.importorskip("pandas", reason="needs the batch extra (pandas)")
    return pytest.importorskip("distributed", reason="needs the batch extra (dask[distributed])")

_METRIC_SKIP = {"compute_s", "compute_cpu_s", "worker"}


@pytest.fixture(scope="module")
def cluster_client():
    distributed = _need_batch_extra()
    from tomodose.batch import local_cluster

    cluster = local_cluster(n_workers=2, threads_per_worker=1)
    client = distributed.Client(cluster)
    yield client
    client.close()
    cluster.close()


def _no_temporaries(out: Path):
    return [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def _all_readable(out: Path):
    from tomodose.io.hdf5 import read_results

    files = sorted((out / "cases").glob("*.h5"))
    for f in files:
        res = read_results(f)
        assert "dose" in res.doses and res.extra["batch"]["case_hash"] == f.stem
    return files


@pytest.mark.slow
@pytest.mark.distributed
def test_cluster_run_equals_serial_then_resumes_by_content(cluster_client, tmp_path):
    from tomodose.batch import run_study
    from tomodose.io.hdf5 import read_results

    st = tiny_study()
    out = tmp_path / "dask"
    res = run_study(st, out, client=cluster_client, progress=False)
    assert res.counts == {"done": 3, "cached": 0, "failed": 0, "not run": 0}
    df = res.summary
    assert list(df["case"]) == [c.name for c in st.cases]
    assert (out / "summary.csv").is_file() and not _no_temporaries(out)
    workers = set(df["worker"])
    # the same cases one by one in this process
    serial = run_cases_serially(st, tmp_path / "serial")
    for _, row in df.iterrows():
        ref = serial[row["case_hash"]]
        for k, v in ref.items():
            if k in _METRIC_SKIP:
                continue
            if isinstance(v, float):
                assert row[k] == pytest.approx(v, rel=1e-12, abs=1e-12, nan_ok=True), k
            else:
                assert row[k] == v, k
        a = read_results(out / row["file"]).doses["dose"].array
        b = read_results(tmp_path / "serial" / row["file"]).doses["dose"].array
        np.testing.assert_array_equal(a, b)
    # physics sanity: leaf latency -30 ms shortens every opening: less dose, lower PGTV coverage
    nominal = df[df["case"] == "nominal"].iloc[0]
    short = df[df["leaf_latency_error_ms"] == -30.0].iloc[0]
    assert short["treatment_time_s"] == pytest.approx(nominal["treatment_time_s"])
    assert short["PGTV Dmean"] < nominal["PGTV Dmean"]
    assert nominal["PGTV_coverage"] == pytest.approx(96.5, abs=1.5)  # base normalisation on the nominal delivery
    assert len(workers) >= 1

    # re-run: everything cached, nothing computed (and a Parquet copy of the summary when pyarrow is there)
    import importlib.util

    formats = ("csv", "parquet") if importlib.util.find_spec("pyarrow") else ("csv",)
    computed = []
    res2 = run_study(st, out, client=cluster_client, progress=False, summary_formats=formats,
                     on_result=lambda n, r, c: computed.append(n))
    assert res2.counts["cached"] == 3 and computed == []
    assert res2.summary.drop(columns=["status"]).equals(res.summary.drop(columns=["status"]))
    if "parquet" in formats:
        import pandas as pd

        assert list(pd.read_parquet(out / "summary.parquet")["case"]) == list(res2.summary["case"])
    # a renamed case is still cached; a changed case runs again; the others are skipped
    st3 = tiny_study(grid=[{"couch_speed_error_percent": [0.0, 4.0]}, {"leaf_latency_error_ms": [-30.0]}])
    st3 = replace(st3, cases=(replace(st3.cases[0], name="renamed nominal"),) + st3.cases[1:])
    res3 = run_study(st3, out, client=cluster_client, progress=False, on_result=lambda n, r, c: computed.append(n))
    assert computed == ["couch +4%"]
    assert list(res3.summary["status"]) == ["cached", "done", "cached"]
    assert len(_all_readable(out)) == 4


def _flaky_case(task, prepared):
    """Fails on its first attempt for one case, on every attempt for another; counts attempts in a file."""
    from tomodose.batch.task import run_case

    counter = Path(task.out_dir) / f"attempts-{task.case_hash[:8]}.txt"
    with open(counter, "a") as fh:
        fh.write("x")
    n = len(counter.read_text())
    if task.case.perturbation.leaf_latency_error_ms != 0.0:
        raise RuntimeError(f"injected failure on attempt {n}")
    if task.case.perturbation.couch_speed_error_percent != 0.0 and n == 1:
        raise RuntimeError("injected transient failure")
    return run_case(task, prepared)


@pytest.mark.slow
@pytest.mark.distributed
def test_failing_case_is_retried_then_reported(cluster_client, tmp_path):
    import cloudpickle

    from tomodose.batch import run_study

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        st = tiny_study()
        res = run_study(st, tmp_path, client=cluster_client, retries=2, progress=False, case_function=_flaky_case)
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    df = res.summary.set_index("case")
    assert res.counts["done"] == 2 and res.counts["failed"] == 1
    assert df.loc["couch +3%", "status"] == "done"             # failed once, then the retry succeeded
    failed = df.loc["latency -30 ms"]
    assert failed["status"] == "failed" and "injected failure on attempt 3" in failed["error"]
    assert failed["file"] == "" and not (tmp_path / "cases" / f"{failed['case_hash']}.h5").exists()
    attempts = {p.name: len(p.read_text()) for p in tmp_path.glob("attempts-*.txt")}
    assert attempts[f"attempts-{failed['case_hash'][:8]}.txt"] == 3  # 1 + retries
    assert attempts[f"attempts-{df.loc['couch +3%', 'case_hash'][:8]}.txt"] == 2
    # the failure is in the CSV too, and a re-run computes only the failed case again
    import pandas as pd

    csv = pd.read_csv(tmp_path / "summary.csv")
    assert "injected failure" in csv.set_index("case").loc["latency -30 ms", "error"]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("victims", ["one", "all"])
def test_killing_workers_mid_study_loses_no_case(tmp_path, victims):
    """SIGKILL one busy worker process (or all of them, losing every broadcast copy of the shared
    inputs) after the first case finishes: the nannies restart them, Dask reschedules the running
    tasks, the inputs are scattered again, every case ends done or reported, no half-written file."""
    from tomodose.batch import local_cluster, run_study

    distributed = _need_batch_extra()
    st = tiny_study(grid=[{"couch_speed_error_percent": [0.0, 2.0, 4.0]}, {"leaf_latency_error_ms": [-30.0]}])
    killed = []

    def kill_one(name, row, client):
        if killed:
            return
        pids = client.run(os.getpid)
        busy = [w for w, tasks in client.processing().items() if tasks]
        targets = sorted(pids) if victims == "all" else [busy[0] if busy else sorted(pids)[0]]
        for target in targets:
            os.kill(pids[target], signal.SIGKILL)
        killed.extend(targets)

    cluster = local_cluster(n_workers=2, threads_per_worker=1)
    with distributed.Client(cluster) as client:
        res = run_study(st, tmp_path, client=client, progress=False, on_result=kill_one)
    cluster.close()
    assert killed
    assert res.counts["not run"] == 0
    assert res.counts["done"] + res.counts["failed"] == 4
    assert res.counts["done"] >= 3  # a killed worker's task is rescheduled, not failed
    assert not _no_temporaries(tmp_path)
    assert len(_all_readable(tmp_path)) == res.counts["done"]


@pytest.mark.slow
@pytest.mark.distributed
def test_interrupted_study_leaves_no_half_written_files(cluster_client, tmp_path):
    from tomodose.batch import run_study

    stale = tmp_path / "cases"
    stale.mkdir(parents=True)
    (stale / ".deadbeef.h5.abc123.tmp").write_bytes(b"half a file")  # left by a killed writer

    def interrupt(name, row, client):
        raise KeyboardInterrupt

    st = tiny_study()
    with pytest.raises(KeyboardInterrupt):
        run_study(st, tmp_path, client=cluster_client, progress=False, on_result=interrupt)
    # the cancelled cases that were running have stopped before run_study returned, so nothing
    # can write a temporary after its clean-up (a race CI once caught)
    running = cluster_client.run(lambda dask_worker: len(dask_worker.state.all_running_tasks))
    assert sum(running.values()) == 0, running
    import pandas as pd

    df = pd.read_csv(tmp_path / "summary.csv", keep_default_na=False)
    assert (df["status"] == "done").sum() == 1 and (df["status"] == "not run").sum() == 2
    assert not _no_temporaries(tmp_path)
    assert len(_all_readable(tmp_path)) >= 1
    # the next run completes the study, reusing what was finished
    res = run_study(st, tmp_path, client=cluster_client, progress=False)
    assert res.counts["not run"] == 0 and res.counts["cached"] >= 1 and res.counts["failed"] == 0


# --- CLI -------------------------------------------------------------------------------------------
def _write_study_toml(path: Path, out: Path, grid_line: str) -> Path:
    path.write_text(f"""
[study]
name = "cli"
output = "{out.as_posix()}"

[cluster]
n_workers = 1

[base]
phantom = "liver_default"
phantom_overrides = {{ spacing_mm = 12.0 }}
plan = {{ field_width_mm = 50.0, pitch = 0.86, gantry_period_s = 20.0 }}

[[grid]]
{grid_line}
""")
    return path


def test_cli_lists_cases_and_reports_bad_input(tmp_path, capsys):
    from tomodose.cli.main import main

    toml = _write_study_toml(tmp_path / "s.toml", tmp_path / "out", "couch_speed_error_percent = [0, 1]")
    assert main(["batch", str(toml), "--list"]) == 0
    text = capsys.readouterr().out
    assert "pending" in text and "couch +1%" in text and "2 cases" in text
    bad = _write_study_toml(tmp_path / "b.toml", tmp_path / "out", "couch_speed_error_percent = [-150]")
    assert main(["batch", str(bad)]) == 2
    assert "couch_speed_error_percent" in capsys.readouterr().err
    assert main(["batch", str(tmp_path / "missing.toml")]) == 2


@pytest.mark.slow
@pytest.mark.distributed
def test_cli_batch_smoke(tmp_path, capsys):
    from tomodose.cli.main import main

    _need_batch_extra()
    toml = _write_study_toml(tmp_path / "s.toml", tmp_path / "out", "gantry_period_error_percent = [2]")
    assert main(["--no-progress", "batch", str(toml), "--workers", "1"]) == 0
    text = capsys.readouterr().out
    assert "period +2%" in text and "1 done" in text
    assert (tmp_path / "out" / "summary.csv").is_file()
    assert main(["--no-progress", "batch", str(toml)]) == 0  # all cached: no cluster started
    assert "1 cached" in capsys.readouterr().out
