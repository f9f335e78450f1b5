#!/usr/bin/env python
"""Monte Carlo check of the equivalent-square study: does a 40 cm tomotherapy fan have the depth
dose of its equivalent square? (optional: needs ``pip install ompmc``, GPL-3.0, never vendored)

``kernels/study_la4_equivalent_square.py`` found, with the engine, that the 2.5 x 40 cm fan's
TPR differs from that of a 4.375 cm square (about the same equivalent square, 4.71 vs 4.38 cm)
by −0.8 % at 3 cm and +2.6 % at 20 cm (normalised at 10 cm). This script asks ompMC the same
question in the engine's ideal preset (point source, sharp jaws and leaves, the default
spectrum: the preset of ``validation/generate_mc_references.py``, whose ``beamlets`` it reuses):
central-axis depth dose at SSD 850 mm in a 440 x 300 x 160 mm water box for

* the fan: jaw 25 mm x 64 leaves (2.5 x 40 cm);
* the square: an engine-only 43.75 mm jaw x 7 leaves (4.375 x 4.375 cm);

tallied on the axis in 20 x 10 x 5 mm bins (x across the fan, depth, z along the jaws; the
square's and the fan's doses are flat within 0.3 % over them), and the collapsed cone (ideal
preset, the same phantom) averaged over the same bins. Printed: for each field D(d)/D(100 mm),
and the ratio fan / square of those, Monte Carlo against engine.

Usage::

    python kernels/study_fan_vs_square_mc.py [--histories 3000000] [--json out.json]

About 650 CPU s of ompMC per field at 3 M histories (2-core machine). Results in
``docs/commissioning.md`` (section *Equivalent square*).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "validation"))

import generate_mc_references as G  # noqa: E402

from tomodose.delivery.machine import TomoMachine  # noqa: E402
from tomodose.delivery.plan import ProjectionSequence  # noqa: E402
from tomodose.dose.engine import _engine_dose, engine_kernel  # noqa: E402
from tomodose.evaluation import reference as refmod  # noqa: E402
from tomodose.geometry.grid import ImageVolume  # noqa: E402
from tomodose.terma.beam_model import BeamModel  # noqa: E402
from tomodose.terma.spectrum import default_spectrum  # noqa: E402

SQUARE_MM = 43.75
PHANTOM = {"builder": "water_box", "kwargs": {"size_mm": [440.0, 300.0, 160.0], "spacing_mm": 2.5}}
SURFACE_Y_MM = -150.0
DEPTHS_MM = (30.0, 50.0, 70.0, 100.0, 150.0, 200.0)


def fields(machine):
    iso = (0.0, SURFACE_Y_MM, 0.0)  # SSD 850 mm
    out = {}
    for name, jaw, n in (("fan 2.5 x 40", 25.0, 64), ("square 4.375", SQUARE_MM, 7)):
        f = np.zeros(64)
        lo = 32 - n // 2
        f[lo:lo + n] = 1.0
        out[name] = ProjectionSequence.static_beams([0.0], f, 60.0, jaw, isocentre_lps_mm=iso, machine=machine)
    return out


def edges():
    x = np.array([-220.0, -10.0, 10.0, 220.0])
    y = SURFACE_Y_MM + np.arange(0.0, 300.0 + 1e-9, 10.0)
    z = np.array([-80.0, -2.5, 2.5, 80.0])
    return x, y, z


def axis_curve(dose_bins, y_edges):
    centres = 0.5 * (y_edges[1:] + y_edges[:-1]) - SURFACE_Y_MM
    d = dose_bins[1, :, 1]
    return centres, d


def at_depths(centres, d):
    v = np.interp(DEPTHS_MM, centres, d)
    return v / v[DEPTHS_MM.index(100.0)]


def main(argv=None) -> int:
    import ompmc

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--histories", type=int, default=3_000_000)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    spectrum = default_spectrum()
    machine = TomoMachine(jaw_fwhm_mm={**TomoMachine().jaw_fwhm_mm, SQUARE_MM: SQUARE_MM})
    ideal = BeamModel.ideal(spectrum)
    ideal = dataclasses.replace(ideal, jaw_fwhm_mm={**(ideal.jaw_fwhm_mm or machine.jaw_fwhm_mm), SQUARE_MM: SQUARE_MM})
    patient = refmod.build_phantom_from_spec(PHANTOM)
    xe, ye, ze = edges()
    rho = np.maximum(G.voxel_density(patient, (xe, ye, ze)), 1e-4)
    mat = G.medium_index(rho)
    geo = ompmc.Geometry(xe / 10, ye / 10, ze / 10, [m for _, m in G.MEDIA],
                         density=np.asfortranarray(rho.transpose(2, 1, 0)),
                         material=np.asfortranarray(mat.transpose(2, 1, 0)))
    e = np.asarray(spectrum.bin_edges_mev, float)
    mc_spec = ompmc.Spectrum.from_histogram(e[1:], np.asarray(spectrum.fluence, float), e_min=float(e[0]))
    kernel = engine_kernel()
    out = {"depths_mm": list(DEPTHS_MM), "histories": args.histories, "fields": {}}
    for k, (name, seq) in enumerate(fields(machine).items()):
        i_beam, src, corner, side1, side2, w = G.beamlets(seq, ideal, 1)
        phys = ompmc.Physics(pegs_file=str(ompmc.data_path() / "pegs4" / f"{G.PEGS}.pegs4dat"),
                             global_ecut=G.ECUT_MEV, global_pcut=G.PCUT_MEV, n_split=G.N_SPLIT, seeds=(2001 + k, 33))
        t = time.process_time()
        dose, unc = ompmc.calc_forward(geo, ompmc.BeamletSource(i_beam, src, corner, side1, side2), w, mc_spec, phys,
                                       n_histories=args.histories, n_batches=G.N_BATCHES)
        cpu = time.process_time() - t
        mc = np.asarray(dose).transpose(2, 1, 0)  # -> (nz, ny, nx), as generate_mc_references
        un = np.asarray(unc).transpose(2, 1, 0)
        eng = _engine_dose("collapsed_cone", patient, seq, beam_model=ideal, kernel=kernel, progress=False)
        eng_bins = refmod.bin_average(ImageVolume(patient.grid, eng.astype(np.float64), "Gy"), (xe, ye, ze))
        c, d_mc = axis_curve(mc, ye)
        _, d_en = axis_curve(eng_bins, ye)
        _, s_mc = axis_curve(un, ye)
        out["fields"][name] = {"mc": at_depths(c, d_mc).tolist(), "engine": at_depths(c, d_en).tolist(),
                               "mc_rel_sigma_at_depths": np.interp(DEPTHS_MM, c, s_mc).tolist(), "cpu_s": cpu}
        print(f"{name}: {cpu:.0f} CPU s; D(d)/D(100) MC  " + " ".join(f"{v:.4f}" for v in out["fields"][name]["mc"]),
              flush=True)
        print(f"{' ' * len(name)}                  engine " + " ".join(f"{v:.4f}" for v in out["fields"][name]["engine"]),
              flush=True)
    f, s = (out["fields"][n] for n in ("fan 2.5 x 40", "square 4.375"))
    for src_ in ("mc", "engine"):
        r = 100.0 * (np.array(f[src_]) / np.array(s[src_]) - 1.0)
        out[f"fan_over_square_pct_{src_}"] = r.tolist()
        print(f"fan / square - 1 (%), {src_:6s} at " + " / ".join(f"{d:g}" for d in DEPTHS_MM) + " mm: "
              + " / ".join(f"{v:+.2f}" for v in r))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
