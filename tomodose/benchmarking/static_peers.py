"""Static-beam comparison with peers that have no helical delivery: pyRadPlan and OpenTPS.

pyRadPlan (photon pencil beam) and OpenTPS (photon collapsed cone) pin older numpy/pydantic
than this package needs, so each runs in **its own virtual environment** and receives the case
as a file: :func:`export_case` writes the liver phantom (CT numbers on the same grid, the PTV,
the body) and one static beam (gantry 0, isocentre at the PTV centroid, 5 cm along the couch,
open across the PTV's width); the runner scripts in :mod:`tomodose.benchmarking.peer_runners`
time the peer on it; :func:`ours` times the same static beam here:

* against pyRadPlan: our pencil-beam **influence matrix** of the beam's leaves (6.25 mm x 5 cm
  beamlets) vs pyRadPlan's dij of the same beam (``bixel_mm`` square beamlets);
* against OpenTPS: our **collapsed-cone dose** of the field (one transport) vs OpenTPS's CCC dose
  of the same field (OpenTPS's engine works beamlet by beamlet, so it also reports beamlets).

Beamlet sizes differ between the engines, so the fair figure is the cost per voxel x beamlet
(and, for the CCC, per voxel x field); both are printed with the raw times.

Set up the environments once (PyPI access needed)::

    python -m tomodose.benchmarking.static_peers setup [--envs DIR]
    python -m tomodose.benchmarking.static_peers run --sizes 6,4.5 [--envs DIR] [--out DIR]

``DIR`` defaults to ``$TOMODOSE_PEER_ENVS`` or ``~/.cache/tomodose/peer-envs``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
import venv
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["PEER_ENVS", "default_envs_dir", "env_python", "setup_env", "export_case", "ours", "run_peer",
           "compare", "to_markdown"]

RUNNERS = Path(__file__).with_name("peer_runners")

#: peer -> pip requirements of its environment, runner script, post-install fix-ups.
PEER_ENVS = {
    "pyradplan": {
        "requirements": ["pyRadPlan==0.5.0", "pydantic<2.12"],  # 0.5.0 fails to serialise with pydantic 2.12+
        "runner": "pyradplan_pb.py",
        "compares_with": "influence",
    },
    "opentps": {
        "requirements": ["opentps-core==2.0.0", "matplotlib"],  # matplotlib is imported but not declared
        "runner": "opentps_ccc.py",
        "compares_with": "ccc",
    },
}

CASE_PHANTOM = "liver_default"
JAW_MM = 50.0
BIXEL_MM = 5.0


def default_envs_dir() -> Path:
    return Path(os.environ.get("TOMODOSE_PEER_ENVS", Path.home() / ".cache" / "tomodose" / "peer-envs"))


def env_python(peer: str, envs_dir=None) -> Path:
    """Interpreter of ``peer``'s environment (may not exist)."""
    if peer not in PEER_ENVS:
        raise ValueError(f"peer must be one of {sorted(PEER_ENVS)}, got {peer!r}")
    return Path(envs_dir or default_envs_dir()) / peer / "bin" / "python"


def _fix_opentps(python: Path) -> None:
    """The opentps-core 2.0.0 wheel ships its CCC executable without the execute bit."""
    out = subprocess.run([str(python), "-c", "import opentps.core.processing.doseCalculation.photons as p, os;"
                          "print(os.path.dirname(p.__file__))"], capture_output=True, text=True, check=True)
    exe = Path(out.stdout.strip()) / "CCC_DoseEngine" / "CCC_DoseEngine"
    if exe.exists():
        exe.chmod(exe.stat().st_mode | 0o111)


def setup_env(peer: str, envs_dir=None) -> Path:
    """Create ``peer``'s virtual environment and install it (idempotent); return its Python."""
    python = env_python(peer, envs_dir)
    if not python.exists():
        venv.create(python.parents[1], with_pip=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *PEER_ENVS[peer]["requirements"]], check=True)
    if peer == "opentps":
        _fix_opentps(python)
    return python


def _static_projection(patient):
    """One static projection at gantry 0, every leaf that sees the PTV open, isocentre at its centroid."""
    from tomodose.delivery.beams_eye import leaves_seeing_structure
    from tomodose.delivery.plan import ProjectionSequence

    ptv = patient.structures["PTV"]
    iso = tuple(float(v) for v in ptv.centroid_mm())
    probe = ProjectionSequence(gantry_angle_deg=np.zeros(1), couch_mm=np.zeros(1),
                               leaf_open_fraction=np.ones((1, 64)), duration_s=np.ones(1),
                               field_width_mm=JAW_MM, isocentre_lps_mm=iso)
    seeing = leaves_seeing_structure(probe, ptv)
    import dataclasses

    return dataclasses.replace(probe, leaf_open_fraction=seeing.astype(float)), int(seeing.sum())


def export_case(path, spacing_mm: float, phantom: str = CASE_PHANTOM) -> Path:
    """Write the static-beam case for the peer runners (``.npz``); return the path."""
    from tomodose._atomic import atomic_path
    from tomodose.phantoms import load_phantom

    patient = load_phantom(phantom, spacing_mm=float(spacing_mm))
    proj, n_open = _static_projection(patient)
    hu = patient.ct.array.astype(np.float32)
    body = patient.structures["Body"].mask if "Body" in patient.structures else hu > -500
    field_x_mm = n_open * proj.machine.leaf_width_mm
    with atomic_path(path, suffix=".tmp.npz") as tmp:
        np.savez_compressed(tmp, hu=hu, spacing_mm=np.array(patient.grid.spacing_mm),
                            origin_mm=np.array(patient.grid.origin_mm), target=patient.structures["PTV"].mask,
                            body=body, isocentre_mm=np.array(proj.isocentre_lps_mm), jaw_mm=JAW_MM,
                            bixel_mm=BIXEL_MM, gantry_deg=0.0, field_x_mm=field_x_mm)
    return Path(path)


def ours(spacing_mm: float, what: str, phantom: str = CASE_PHANTOM, repeats: int = 2) -> dict:
    """Time our side of the static case: ``what`` = ``"influence"`` (pencil beam) or ``"ccc"``.

    The first call includes JIT loading/compilation (reported as ``first_s``); ``compute_s`` is the
    best of ``repeats`` warm calls.
    """
    import resource

    from tomodose.dose.engine import compute_dose
    from tomodose.phantoms import load_phantom
    from tomodose.transport.influence import influence_matrix

    patient = load_phantom(phantom, spacing_mm=float(spacing_mm))
    proj, n_open = _static_projection(patient)
    if what == "influence":
        def work():
            m = influence_matrix(patient, proj, target="PTV", progress=False)
            return {"n_beamlets": int(m.shape[1]), "nnz": int(m.nnz)}
        engine = "pencil-beam influence matrix (6.25 mm x 5 cm beamlets)"
    elif what == "ccc":
        def work():
            d = compute_dose(patient, proj, engine="collapsed_cone", progress=False)
            return {"n_beamlets": n_open, "max_dose": float(d.per_fraction.array.max())}
        engine = "collapsed cone, one field (88 cones)"
    else:
        raise ValueError(f"what must be 'influence' or 'ccc', got {what!r}")
    t0 = time.perf_counter()
    info = work()
    first = time.perf_counter() - t0
    best, best_cpu = np.inf, np.inf
    for _ in range(max(1, repeats)):
        t0, c0 = time.perf_counter(), time.process_time()
        info = work()
        best = min(best, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    return {"peer": "tomodose", "engine": engine, "first_s": first, "compute_s": best, "compute_cpu_s": best_cpu,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
            "n_voxels": int(np.prod(patient.grid.shape)), **info}


def run_peer(peer: str, case_path, envs_dir=None, timeout_s: float = 3600.0) -> dict:
    """Run ``peer``'s runner on a case in its environment; a dict with ``status`` and its numbers."""
    python = env_python(peer, envs_dir)
    if not python.exists():
        return {"peer": peer, "status": f"not installed (no {python}; run "
                                        f"`python -m tomodose.benchmarking.static_peers setup`)"}
    script = RUNNERS / PEER_ENVS[peer]["runner"]
    env = dict(os.environ, MPLBACKEND="Agg")
    env.pop("PYTHONPATH", None)
    try:
        out = subprocess.run([str(python), str(script), str(case_path)], capture_output=True, text=True,
                             timeout=timeout_s, env=env, cwd=Path(case_path).parent)
    except subprocess.TimeoutExpired:
        return {"peer": peer, "status": f"timed out after {timeout_s:g} s"}
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
        return {"peer": peer, "status": f"failed (exit {out.returncode}): {' | '.join(tail)}"}
    return {"status": "ok", **json.loads(lines[-1])}


def compare(sizes_mm, envs_dir=None, work_dir=None, peers=None) -> list[dict]:
    """Rows ``{size_mm, peer, ours, theirs, ratio_per_voxel_beamlet}`` for each size and peer."""
    import tempfile

    rows = []
    peers = list(peers or PEER_ENVS)
    work = Path(work_dir or tempfile.mkdtemp(prefix="tomodose-peers-"))
    work.mkdir(parents=True, exist_ok=True)
    for size in sizes_mm:
        case = export_case(work / f"static_{size:g}mm.npz", size)
        for peer in peers:
            what = PEER_ENVS[peer]["compares_with"]
            log.info("static case %g mm: %s vs ours (%s)", size, peer, what)
            theirs = run_peer(peer, case, envs_dir)
            mine = ours(size, what)
            row = {"size_mm": float(size), "peer": peer, "ours": mine, "theirs": theirs}
            if theirs.get("status") == "ok":
                per = lambda r: r["compute_s"] / (r["n_voxels"] * max(r["n_beamlets"], 1))  # noqa: E731
                row["ratio_time"] = theirs["compute_s"] / mine["compute_s"]
                row["ratio_per_voxel_beamlet"] = per(theirs) / per(mine)
            rows.append(row)
    return rows


def to_markdown(rows: list[dict]) -> str:
    """One table line per (size, peer)."""
    out = ["| grid (mm) | comparison | voxels | beamlets ours / peer | ours (s) | peer (s) | peer / ours "
           "(time) | peer / ours (per voxel x beamlet) | peer peak memory (MiB) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        o, t = r["ours"], r["theirs"]
        if t.get("status") != "ok":
            out.append(f"| {r['size_mm']:g} | {r['peer']} | {o['n_voxels']} | {o['n_beamlets']} / - | "
                       f"{o['compute_s']:.3g} | {t['status']} | | | |")
            continue
        out.append(f"| {r['size_mm']:g} | {t['peer']} {t.get('version', '')}: {t['engine']} vs {o['engine']} | "
                   f"{o['n_voxels']} | {o['n_beamlets']} / {t['n_beamlets']} | {o['compute_s']:.3g} | "
                   f"{t['compute_s']:.3g} | {r['ratio_time']:.3g} | {r['ratio_per_voxel_beamlet']:.3g} | "
                   f"{t['peak_rss_mib']:.0f} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tomodose.benchmarking.static_peers", description=__doc__.split("\n")[0])
    ap.add_argument("action", choices=["setup", "run"])
    ap.add_argument("--envs", type=Path, default=None, help="folder of the peer environments")
    ap.add_argument("--peers", default=",".join(PEER_ENVS), help="comma-separated subset of " + ",".join(PEER_ENVS))
    ap.add_argument("--sizes", default="6", help="grid spacings (mm), comma-separated")
    ap.add_argument("--out", type=Path, default=Path("bench-peers"), help="output folder (run)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    for p in peers:
        if p not in PEER_ENVS:
            ap.error(f"--peers: unknown peer {p!r}; expected some of {sorted(PEER_ENVS)}")
    if args.action == "setup":
        for p in peers:
            log.info("%s: %s", p, setup_env(p, args.envs))
        return 0
    sizes = [float(s) for s in args.sizes.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    rows = compare(sizes, args.envs, args.out, peers)
    from tomodose._atomic import atomic_write_text
    from tomodose.benchmarking.harness import machine_description

    atomic_write_text(args.out / "static_peers.json", json.dumps({"machine": machine_description(), "rows": rows},
                                                                   indent=1))
    md = to_markdown(rows)
    atomic_write_text(args.out / "static_peers.md", md)
    sys.stdout.write(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
