#!/usr/bin/env python
"""Monte Carlo check of the engine's depth dose for the wider MLC fields of the 50 mm jaw
(optional: needs ``pip install ompmc``, GPL-3.0, never vendored).

``kernels/study_la4_field_columns.py`` found that the engine's TPR(20 cm)/TPR(10 cm) grows by 1.67 %
from the 5 x 5 to the 5 x 10 cm field and by 1.64 % more to 5 x 20 cm, where LA4's grows by 0.10 and
0.92 %, so the engine is +1.70 % above LA4 for 5 x 20 cm at 20 cm. The 5 x 5 cm field's depth dose
agrees with ompMC within 0.55 % (``water_j50``); this script asks ompMC about the wider fields in the
engine's ideal preset (point source, sharp jaws and leaves, the default spectrum: the preset of
``validation/generate_mc_references.py``, whose ``beamlets`` it reuses): central-axis depth dose at
SSD 850 mm in a 440 x 300 x 160 mm water box, tallied in 20 x 10 x 20 mm bins (x across the leaves,
depth, z along the jaws) on the axis, and the collapsed cone (ideal preset, the static kernel and the
static-beam defaults of ``compute_dose``) averaged over the same bins. Printed: D(d)/D(100 mm), Monte
Carlo and engine, with the Monte Carlo's 1 sigma per bin.

Usage::

    python kernels/study_la4_field_growth_mc.py [--fields 50x32] [--histories 4000000] [--json out.json]

About 2,000 histories per second on 2 cores. Results in ``docs/commissioning.md`` (section *LA4's
columns are tomotherapy fields*).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "validation"))
sys.path.insert(0, str(ROOT / "kernels"))

import generate_mc_references as G  # noqa: E402
import commission_la4 as C  # noqa: E402
from study_la4_field_columns import parse_fields  # noqa: E402

from tomodose.delivery.machine import TomoMachine  # noqa: E402
from tomodose.delivery.plan import ProjectionSequence  # noqa: E402
from tomodose.dose.engine import _engine_dose, engine_kernel  # noqa: E402
from tomodose.evaluation import reference as refmod  # noqa: E402
from tomodose.geometry.grid import ImageVolume  # noqa: E402
from tomodose.terma.beam_model import BeamModel  # noqa: E402
from tomodose.terma.spectrum import default_spectrum  # noqa: E402

PHANTOM = {"builder": "water_box", "kwargs": {"size_mm": [440.0, 300.0, 160.0], "spacing_mm": 2.5}}
SURFACE_Y_MM = -150.0
DEPTHS_MM = (30.0, 50.0, 70.0, 100.0, 150.0, 200.0)


def static_field(machine: TomoMachine, jaw_mm: int, n_open: int) -> ProjectionSequence:
    """Gantry 0, ``n_open`` central leaves (an even number: centred on the axis), 60 s, SSD 850 mm."""
    if n_open % 2:
        raise ValueError(f"n_open must be even (a field centred on the axis), got {n_open}")
    return ProjectionSequence.static_beams([0.0], C.open_leaves(n_open, machine.n_leaves), 60.0, float(jaw_mm),
                                           isocentre_lps_mm=(0.0, SURFACE_Y_MM, 0.0), machine=machine)


def mc_and_engine_bins(patient, edges_mm, seq, beam_model, spectrum, kernel, *, seeds, histories: int):
    """ompMC dose and its relative 1-sigma, and the collapsed cone averaged over the same bins, of one
    static sequence on ``patient`` (bins ``edges_mm`` = (x, y, z) edges in mm, LPS).

    The ompMC settings are those of ``validation/generate_mc_references.py`` (its media, PEGS file,
    cut-offs, photon splitting, batches and beamlets); ``seeds`` are the two RNG seeds. Returns
    ``(mc, sigma, engine, mc_wall_s)``, the arrays shaped (nz, ny, nx) of the bins.
    """
    import ompmc

    xe, ye, ze = (np.asarray(e, float) for e in edges_mm)
    rho = np.maximum(G.voxel_density(patient, (xe, ye, ze)), 1e-4)
    mat = G.medium_index(rho)
    geo = ompmc.Geometry(xe / 10, ye / 10, ze / 10, list(G.MEDIA), density=np.asfortranarray(rho.transpose(2, 1, 0)),
                         material=np.asfortranarray(mat.transpose(2, 1, 0)))
    e = np.asarray(spectrum.bin_edges_mev, float)
    mc_spec = ompmc.Spectrum.from_histogram(e[1:], np.asarray(spectrum.fluence, float), e_min=float(e[0]))
    i_beam, src, corner, side1, side2, w = G.beamlets(seq, beam_model, 1)
    phys = ompmc.Physics(pegs_file=str(ompmc.data_path() / "pegs4" / f"{G.PEGS}.pegs4dat"), global_ecut=G.ECUT_MEV,
                         global_pcut=G.PCUT_MEV, n_split=G.N_SPLIT, seeds=tuple(seeds))
    t = time.perf_counter()
    dose, unc = ompmc.calc_forward(geo, ompmc.BeamletSource(i_beam, src, corner, side1, side2), w, mc_spec, phys,
                                   n_histories=int(histories), n_batches=G.N_BATCHES)
    wall = time.perf_counter() - t
    eng = _engine_dose("collapsed_cone", patient, seq, beam_model=beam_model, kernel=kernel, progress=False)
    eng_bins = refmod.bin_average(ImageVolume(patient.grid, eng.astype(np.float64), "Gy"), (xe, ye, ze))
    return np.asarray(dose).transpose(2, 1, 0), np.asarray(unc).transpose(2, 1, 0), eng_bins, wall


def edges(z_half_mm: float = 10.0):
    """Bin edges (mm): the axis bin 20 mm across the leaves and ``2 z_half_mm`` along the jaws, 10 mm
    deep bins from the surface down."""
    x = np.array([-220.0, -10.0, 10.0, 220.0])
    y = SURFACE_Y_MM + np.arange(0.0, 300.0 + 1e-9, 10.0)
    z = np.array([-80.0, -z_half_mm, z_half_mm, 80.0])
    return x, y, z


def axis_curve(dose_bins, y_edges):
    """Depths (mm, bin centres) and the axis bin's values, ``dose_bins`` shaped (nz, ny, nx)."""
    return 0.5 * (y_edges[1:] + y_edges[:-1]) - SURFACE_Y_MM, dose_bins[1, :, 1]


def at_depths(centres, d):
    v = np.interp(DEPTHS_MM, centres, d)
    return v / v[DEPTHS_MM.index(100.0)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fields", default="50x32", help="JAWxN fields (N even), comma separated")
    ap.add_argument("--histories", type=int, default=4_000_000)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.histories < 1:
        raise ValueError(f"histories must be >= 1, got {args.histories}")
    fields = parse_fields(args.fields)
    spectrum = default_spectrum()
    machine = TomoMachine()
    ideal = BeamModel.ideal(spectrum)
    patient = refmod.build_phantom_from_spec(PHANTOM)
    ye = edges()[1]
    kernel = engine_kernel(static=True)
    out = {"depths_mm": list(DEPTHS_MM), "histories": args.histories, "kernel": kernel.name, "fields": {}}
    for k, (jaw, n) in enumerate(fields):
        name = f"{jaw}x{n}"
        seq = static_field(machine, jaw, n)
        mc, un, eng_bins, wall = mc_and_engine_bins(patient, edges(), seq, ideal, spectrum, kernel,
                                                    seeds=(3001 + k, 47), histories=args.histories)
        c, d_mc = axis_curve(mc, ye)
        _, d_en = axis_curve(eng_bins, ye)
        _, s_mc = axis_curve(un, ye)
        r_mc, r_en = at_depths(c, d_mc), at_depths(c, d_en)
        out["fields"][name] = {"mc": r_mc.tolist(), "engine": r_en.tolist(),
                               "mc_rel_sigma_at_depths": np.interp(DEPTHS_MM, c, s_mc).tolist(),
                               "engine_over_mc_pct": (100 * (r_en / r_mc - 1)).tolist(), "mc_wall_s": wall}
        print(f"{name}: {wall:.0f} s; D(d)/D(100 mm) at " + " / ".join(f"{d:g}" for d in DEPTHS_MM), flush=True)
        print("  MC     " + " ".join(f"{v:.4f}" for v in r_mc), flush=True)
        print("  sigma  " + " ".join(f"{100 * v:.2f}%" for v in out["fields"][name]["mc_rel_sigma_at_depths"]))
        print("  engine " + " ".join(f"{v:.4f}" for v in r_en), flush=True)
        print("  engine / MC - 1 (%) " + " / ".join(f"{v:+.2f}" for v in out["fields"][name]["engine_over_mc_pct"]))
    if args.json:
        tmp = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp.write_text(json.dumps(out, indent=1), encoding="utf-8")
        tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
