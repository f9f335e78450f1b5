#!/usr/bin/env python
"""Can any spectrum make the engine's TPR fit the LA4 table? (issue 8, spectrum weights)

The commissioned spectrum is the one-parameter Schiff thick-target model of
``kernels/derive_spectrum.py`` (T0 = 6.0 MeV); the TPR checks of ``tests/test_commissioning.py``
still miss 1 % at shallow depth (jaw 50 +2.40 / +1.75 % at 3 / 5 cm, jaws 25 and 10 +1.30 / +1.40 %
at 3 cm). This study asks whether *spectrum weights* of any shape could close them, without
re-deriving a kernel per candidate:

* The collapsed cone transports each energy group of the TERMA with its own kernel (the engine's
  5-group kernel, inner edges 0.5, 1, 2, 3.5 MeV). Scaling every spectral bin of group ``g`` by one
  factor ``s_g`` leaves the group kernels unchanged (each is a TERMA-weighted mean of mono kernels
  *within* the group), so the dose is exactly linear in ``s``:
  ``D(s) = sum_g s_g F_g D_g`` with ``F_g`` the group's share of the energy fluence and ``D_g`` the
  dose per unit energy fluence of the group alone. The script computes ``D_g`` at the TPR points
  (detector at the isocentre, ``d`` cm of water above, 10 cm below: ``commission_la4.point_dose``,
  the shipped machine ``BeamModel.default()`` with its spectrum masked to one group, the engine's
  kernel) and checks the linearity on the first point against the full spectrum.
* Fits: (1) free group weights (``s_2 = 1``, log-parametrised, optional smoothness penalty
  ``lambda * diff(log s)``) to the TPR at 3 / 5 / 20 cm of the three 40 cm fans (the tested points);
  (2) the physical family of ``derive_spectrum.py`` (T0 and the copper backing varied), whose group
  shares give ``s`` (within-group shape changes ignored: checked against the stage-1 sensitivities
  of ``commission_la4.py``, +0.25 MeV: 3 cm -0.47 %, 20 cm +0.70 %, vs -0.55 / +0.7 % re-derived).

The LA4 files are GPL-3.0 and read at run time from ``--shared-data`` (never copied); the cache
(``--work``) holds only engine doses. About 60 static collapsed-cone runs, 25 CPU minutes on the
2-core machine (12 TPR points x 5 groups). Results of 2026-11-30 in ``docs/commissioning.md``
(section *Spectrum weights*): session 11, in the 40 mm slab (``--reach-mm 40``). The default is now
the 150 mm slab of ``point_dose`` (session 12); the study has not been rerun there (the long-slab T0
scan of ``commission_la4.py`` is in the section *Refit in a tank-like slab*).

Usage::

    python kernels/study_la4_spectrum_groups.py [--work /tmp/la4_groups] [--depths 3,5,20] [--reach-mm 40]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

GROUP_EDGES_MEV = (0.0, 0.5, 1.0, 2.0, 3.5, np.inf)
JAWS_MM = (50, 25, 10)
NORM_CM = 10.0


def group_of(energies_mev, edges_mev=GROUP_EDGES_MEV) -> np.ndarray:
    """Energy group (0 .. len(edges_mev) - 2) of each spectral line."""
    return np.searchsorted(np.asarray(edges_mev), np.asarray(energies_mev), side="right") - 1


def group_shares(spectrum, edges_mev=GROUP_EDGES_MEV) -> np.ndarray:
    """(n_groups,) share of each group (``edges_mev``, default the 5 groups) in the energy fluence of
    ``spectrum``."""
    e = np.asarray(spectrum.energies_mev)
    ef = np.asarray(spectrum.fluence) * e
    g = group_of(e, edges_mev)
    return np.array([ef[g == k].sum() for k in range(len(edges_mev) - 1)]) / ef.sum()


def group_spectrum(spectrum, g, edges_mev=GROUP_EDGES_MEV):
    """``spectrum`` restricted to the bins of group ``g`` of ``edges_mev`` (contiguous bins, edges kept)."""
    from tomodose.terma.spectrum import Spectrum

    idx = np.flatnonzero(group_of(spectrum.energies_mev, edges_mev) == g)
    edges = np.asarray(spectrum.bin_edges_mev)[np.r_[idx, idx[-1] + 1]]
    return Spectrum(np.asarray(spectrum.energies_mev)[idx], np.asarray(spectrum.fluence)[idx], edges, f"group{g}")


def group_doses(C, work: Path, depths_cm, reach_mm: float) -> dict:
    """``{"g|jaw|depth": dose per unit energy fluence of group g}`` at the TPR points in a slab reaching
    ``reach_mm`` beyond the jaw's half width along the couch (cached in ``work``, one file per reach)."""
    from tomodose.dose.engine import engine_kernel
    from tomodose.terma.beam_model import BeamModel

    path = work / f"group_doses_reach{reach_mm:g}.json"
    res = json.loads(path.read_text()) if path.exists() else {}
    beam = BeamModel.default()
    kernel = engine_kernel()
    res["F"] = group_shares(beam.spectrum).tolist()
    points = [(j, float(d)) for j in JAWS_MM for d in sorted(set(depths_cm) | {NORM_CM})]
    full_key = f"full|{points[0][0]}|{points[0][1]:g}"
    if full_key not in res:  # linearity check point: the full spectrum
        res[full_key] = C.point_dose(beam, kernel, points[0][0], 64, 850.0 - 10 * points[0][1], 10 * points[0][1],
                                     reach_mm=reach_mm)
    for g in range(5):
        b = dataclasses.replace(beam, spectrum=group_spectrum(beam.spectrum, g))
        for jaw, d in points:
            key = f"{g}|{jaw}|{d:g}"
            if key not in res:
                res[key] = C.point_dose(b, kernel, jaw, 64, 850.0 - 10 * d, 10 * d, reach_mm=reach_mm)
                print(key, res[key], flush=True)
                _common.atomic_write_text(path, json.dumps(res))
    _common.atomic_write_text(path, json.dumps(res))
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared-data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--work", type=Path, default=Path("/tmp/la4_groups"))
    ap.add_argument("--depths", default="3,5,20", help="TPR depths (cm) compared; 10 cm is the normalisation")
    ap.add_argument("--lambdas", default="0,0.003,0.01", help="smoothness penalties of the free fit")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--reach-mm", type=float, default=None,
                    help="slab reach along the couch beyond the jaw's half width (mm); default "
                         "commission_la4.SLAB_REACH_MM (150; the session 11 results: 40)")
    args = ap.parse_args(argv)
    from scipy.optimize import least_squares

    from tomodose.terma.beam_model import BeamModel

    C = _common.load_script("commission_la4")
    la4 = C.read_la4(args.shared_data)
    depths = [float(x) for x in args.depths.split(",")]
    reach = C.SLAB_REACH_MM if args.reach_mm is None else args.reach_mm
    res = group_doses(C, args.work, depths, reach)
    F = np.array(res["F"])
    j0, d0 = JAWS_MM[0], min(sorted(set(depths) | {NORM_CM}))
    lin = sum(F[g] * res[f"{g}|{j0}|{d0:g}"] for g in range(5)) / res[f"full|{j0}|{d0:g}"] - 1.0
    print(f"linearity: sum_g F_g D_g / D(full spectrum) - 1 = {lin:.2e}")
    D = {(j, d): np.array([res[f"{g}|{j}|{d:g}"] for g in range(5)]) for j in JAWS_MM for d in depths + [NORM_CM]}
    la = {j: C.la4_tpr(la4, C.equivalent_square_cm(j / 10.0, 40.0), depths) for j in JAWS_MM}

    def resid(s):
        out = []
        for j in JAWS_MM:
            n = (s * F * D[(j, NORM_CM)]).sum()
            out += [(s * F * D[(j, d)]).sum() / n / la[j][k] - 1.0 for k, d in enumerate(depths)]
        return np.array(out)

    report = []

    def show(s, label, **extra):
        r = 100.0 * resid(s)
        row = {"label": label, "s": (s / s[2]).round(4).tolist(), "rms_pct": float(np.sqrt(np.mean(r * r))),
               "max_pct": float(np.abs(r).max()),
               "tpr_diff_pct": {f"{j}|{d:g}": round(float(r[i * len(depths) + k]), 3)
                                for i, j in enumerate(JAWS_MM) for k, d in enumerate(depths)}, **extra}
        report.append(row)
        print(f"{label}: s = {row['s']}, rms {row['rms_pct']:.2f} %, max {row['max_pct']:.2f} %")
        for i, j in enumerate(JAWS_MM):
            print(f"    jaw {j}: " + "  ".join(f"{d:g} cm {r[i * len(depths) + k]:+.2f}" for k, d in enumerate(depths)))

    show(np.ones(5), "shipped spectrum")
    for lam in (float(x) for x in args.lambdas.split(",")):
        def f(x, lam=lam):
            s = np.exp(np.insert(x, 2, 0.0))
            return np.concatenate([resid(s), lam * np.diff(np.log(s))])
        s = np.exp(np.insert(least_squares(f, np.zeros(4)).x, 2, 0.0))
        show(s, f"free group weights, lambda {lam:g}")
    base = group_shares(BeamModel.default().spectrum)
    fam = []
    for t0 in (5.0, 5.5, 6.0, 6.5, 7.0, 7.5, 8.0):
        for cu in (0.0, 1.5, 3.0, 6.0, 10.0, 15.0):
            s = group_shares(C.model_spectrum(t0, 1.0, cu)) / base
            r = 100.0 * resid(s)
            fam.append((float(np.abs(r).max()), t0, cu, s))
    fam.sort(key=lambda x: x[0])
    for _, t0, cu, s in fam[:4]:
        show(s, f"Schiff model T0 {t0:g} MeV, Cu {cu:g} mm", t0_mev=t0, cu_mm=cu)
    if args.json:
        _common.atomic_write_text(args.json, json.dumps({"linearity": lin, "depths_cm": depths, "fits": report},
                                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
