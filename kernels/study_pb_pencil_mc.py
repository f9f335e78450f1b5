#!/usr/bin/env python
"""Monte Carlo pencil of the default spectrum in water: surface and exit effects of the pencil kernel.

Why (issue 8): the pencil-beam kernel (``kernels/derive_pencil_kernels.py``) integrates
infinite-medium point kernels along a pencil in semi-infinite water. Two places where the finite
phantom differs: (1) near the entrance surface, photons scattered more than once that would cross the
surface and return are lost in reality (the point kernel keeps them: it was made in infinite water);
(2) near the exit of a slab, the backscatter from beyond the exit is missing. This script runs ompMC
(``calc_radial``, GPL-3.0 tool, run not vendored) with a parallel pencil of the default spectrum
entering water at z = 0 from vacuum, scored in the pencil table's cylindrical rings and 2.5 mm
slabs, for a deep phantom (600 mm) and a 200 mm slab, with the **same seeds** (histories are
identical until a particle passes 200 mm, so their difference has little noise).

Output: ``kernels/study_pb_pencil_mc.npz`` (energy per history per ring/slab, MeV, normalised to
the mean photon energy: fractions of the pencil energy; relative uncertainties; settings).

Usage::

    OMP_NUM_THREADS=1 nice -n 10 python kernels/study_pb_pencil_mc.py --histories 400000
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
from derive_pencil_kernels import R_EDGES_MM  # noqa: E402

OUT = Path(__file__).with_suffix(".npz")
DZ_MM = 2.5


def z_edges_mm(depth_mm: float) -> np.ndarray:
    fine = np.arange(0.0, min(depth_mm, 200.0) + 1e-9, DZ_MM)
    if depth_mm <= 200.0:
        return fine
    return np.concatenate([fine, np.arange(220.0, depth_mm + 1e-9, 20.0)])


def run(depth_mm: float, n_histories: int, seeds=(97, 33)):
    import ompmc
    from tomodose.terma.spectrum import default_spectrum

    s = default_spectrum()
    edges = np.asarray(s.bin_edges_mev, float)
    spec = ompmc.Spectrum.from_histogram(edges[1:], np.asarray(s.fluence, float), e_min=float(edges[0]))
    geo = ompmc.CylinderGeometry(r_bounds=R_EDGES_MM / 10.0, z_bounds=z_edges_mm(depth_mm) / 10.0,
                                 material="H2O700ICRU", density=1.0)
    phys = ompmc.Physics(pegs_file=ompmc.data_path() / "pegs4" / "700icru.pegs4dat", global_ecut=0.7,
                         global_pcut=0.01, seeds=seeds)
    t0 = time.process_time()
    dep, unc, _ = ompmc.calc_radial(geo, ompmc.PencilBeamSource(), spec, phys, n_histories=int(n_histories),
                                    n_batches=10, output_dose=False)
    mean_e = float(np.sum(s.fluence * s.energies_mev) / np.sum(s.fluence))
    return np.asarray(dep, float) / mean_e, np.asarray(unc, float), time.process_time() - t0, mean_e


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--histories", type=int, default=400_000)
    ap.add_argument("--depths", default="600,200", help="phantom depths (mm), same seeds")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    res = {}
    for d in [float(v) for v in args.depths.split(",")]:
        dep, unc, cpu, mean_e = run(d, args.histories)
        res[f"dep_{d:g}"] = dep
        res[f"unc_{d:g}"] = unc
        res[f"z_edges_{d:g}"] = z_edges_mm(d)
        print(json.dumps({"depth_mm": d, "cpu_s": round(cpu, 1), "shape": list(dep.shape),
                          "deposited_fraction": float(dep.sum())}), flush=True)
    import ompmc
    settings = {"histories": args.histories, "seeds": [97, 33], "pegs": "700icru", "ecut_mev": 0.7, "pcut_mev": 0.01,
                "n_split": 20, "ompmc_version": getattr(ompmc, "__version__", "?"), "mean_energy_mev": mean_e,
                "source": "parallel pencil, default spectrum, entering at z = 0 from vacuum",
                "script": "kernels/study_pb_pencil_mc.py"}
    buf = io.BytesIO()
    np.savez_compressed(buf, r_edges_mm=R_EDGES_MM, settings=np.array(json.dumps(settings)), **res)
    _common.atomic_write_bytes(args.out, buf.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
