#!/usr/bin/env python
"""Study: how much of the engine's plane-integrated excess is the finite phantom (ompMC, optional).

A point-kernel superposition (and the collapsed-cone engine built on it) deposits the energy an
*infinite* water medium would deposit at each point inside the phantom, including the part
carried by photons whose path left the phantom and came back. In the Monte Carlo those photons
are lost. This script runs ompMC on the ``water_j50`` case (8 leaves x jaw 50 mm, gantry 0, SSD
850 mm) in the reference phantom (440 x 200 x 160 mm) and in a larger one (``--extend``: more
water along the couch axis z and behind the exit surface), and prints, per depth, the energy
deposited inside the region of the reference phantom (plane integral) in the larger phantom
divided by that in the reference phantom.

Usage::

    nice -n 10 python kernels/study_ccc_phantom_size.py [--histories 300000] [--out /tmp/x.npz]

Needs ``pip install ompmc`` (GPL-3.0; run as a tool, never vendored).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "validation"))


def run(edges_mm, box_mm, histories, seed, ref):
    """ompMC dose (Gy per weight unit x weights, (nz, ny, nx)) of water_j50's delivery in a water
    box ``box_mm`` = ((x0, x1), (y0, y1), (z0, z1)) on the bins ``edges_mm``."""
    import generate_mc_references as gen
    import ompmc

    from tomodose.terma.beam_model import BeamModel

    xe, ye, ze = (np.asarray(e, float) for e in edges_mm)
    c = [0.5 * (e[1:] + e[:-1]) for e in (xe, ye, ze)]
    inside = ((c[2][:, None, None] > box_mm[2][0]) & (c[2][:, None, None] < box_mm[2][1])
              & (c[1][None, :, None] > box_mm[1][0]) & (c[1][None, :, None] < box_mm[1][1])
              & (c[0][None, None, :] > box_mm[0][0]) & (c[0][None, None, :] < box_mm[0][1]))
    rho = np.where(inside, 1.0, 1e-4)
    mat = gen.medium_index(rho)
    geo = ompmc.Geometry(xe / 10, ye / 10, ze / 10, [m for _, m in gen.MEDIA],
                         density=np.asfortranarray(rho.transpose(2, 1, 0)),
                         material=np.asfortranarray(mat.transpose(2, 1, 0)))
    bm = BeamModel.ideal(ref.spectrum)
    i_beam, src, corner, side1, side2, w = gen.beamlets(ref.sequence, bm, 1)
    source = ompmc.BeamletSource(i_beam, src, corner, side1, side2)
    e = np.asarray(ref.spectrum.bin_edges_mev, float)
    spec = ompmc.Spectrum.from_histogram(e[1:], np.asarray(ref.spectrum.fluence, float), e_min=float(e[0]))
    phys = ompmc.Physics(pegs_file=str(ompmc.data_path() / "pegs4" / f"{gen.PEGS}.pegs4dat"),
                         global_ecut=gen.ECUT_MEV, global_pcut=gen.PCUT_MEV, n_split=gen.N_SPLIT, seeds=(seed, 33))
    t0 = time.process_time()
    dose, unc = ompmc.calc_forward(geo, source, w, spec, phys, n_histories=int(histories), n_batches=gen.N_BATCHES)
    print(f"  ompMC {histories} histories, {rho.shape} bins: {time.process_time() - t0:.0f} CPU s", flush=True)
    return np.asarray(dose).transpose(2, 1, 0), np.asarray(unc).transpose(2, 1, 0), rho


def plane(edges_mm, dose, rho, region):
    """Energy per depth bin (dose x mass summed over x, z inside ``region``), and the depth bins."""
    xe, ye, ze = (np.asarray(e, float) for e in edges_mm)
    cx, cz = 0.5 * (xe[1:] + xe[:-1]), 0.5 * (ze[1:] + ze[:-1])
    sel = ((cz[:, None] > region[2][0]) & (cz[:, None] < region[2][1])
           & (cx[None, :] > region[0][0]) & (cx[None, :] < region[0][1]))
    vol = np.einsum("k,j,i->kji", np.diff(ze), np.diff(ye), np.diff(xe))
    return ((dose * rho * vol) * sel[:, None, :]).sum(axis=(0, 2))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--histories", type=float, default=3e5)
    ap.add_argument("--extend-z-mm", type=float, default=300.0, help="half-length along z of the larger phantom")
    ap.add_argument("--extend-depth-mm", type=float, default=450.0, help="depth of the larger phantom")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    from tomodose.evaluation.reference import load_reference

    ref = load_reference("water_j50")
    xe, ye, ze = ref.edges_mm
    box = ((xe[0], xe[-1]), (ye[0], ye[-1]), (ze[0], ze[-1]))
    # same bins inside the reference phantom; the larger phantom adds coarse bins around it
    zx = float(args.extend_z_mm)
    ze2 = np.unique(np.concatenate([[-zx, -200.0], ze, [200.0, zx]]))
    ze2 = ze2[(ze2 >= -zx) & (ze2 <= zx)]
    y_end = ye[0] + float(args.extend_depth_mm)
    ye2 = np.unique(np.concatenate([ye, np.arange(ye[-1], y_end + 1e-6, 25.0)]))
    big = ((xe[0], xe[-1]), (ye2[0], ye2[-1]), (ze2[0], ze2[-1]))
    print("reference phantom", box, flush=True)
    d0, u0, r0 = run(ref.edges_mm, box, args.histories, 2001, ref)
    print("larger phantom", big, flush=True)
    d1, u1, r1 = run((xe, ye2, ze2), big, args.histories, 2002, ref)
    p0 = plane(ref.edges_mm, d0, r0, box)
    p1 = plane((xe, ye2, ze2), d1, r1, box)[: ye.size - 1]
    p_ref = plane(ref.edges_mm, ref.dose_gy, ref.density_g_cm3, box)
    depth = 0.5 * (ye[1:] + ye[:-1]) - ref.analysis["surface_mm"]
    # the stored reference's scale: Gy = raw x k; compare shapes of the two runs with the reference
    k = ref.calibration["gy_per_weight_unit"]
    print(" depth   ref-size run / stored   larger / ref-size (inside the reference region)")
    for j in range(depth.size):
        print(f" {depth[j]:6.1f}   {p0[j] * k / p_ref[j]:.4f}   {p1[j] / p0[j]:.4f}")
    tot0, tot1 = p0.sum(), p1.sum()
    print(f"total inside the reference region: larger / ref-size {tot1 / tot0:.4f}")
    if args.out:
        np.savez(args.out, depth_mm=depth, p_ref_size=p0 * k, p_larger=p1 * k, p_stored=p_ref)
    return 0


if __name__ == "__main__":
    sys.exit(main())
