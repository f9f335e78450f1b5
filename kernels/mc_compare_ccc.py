#!/usr/bin/env python
"""Prototype comparison of the collapsed-cone transport with ompMC (optional, not a test).

A 10 x 10 cm field (defined at the surface), point source at SSD 85 cm, water phantom
20 x 20 x 20 cm; Monte Carlo tally 0.5 cm along x and depth in a central 2 cm slab across y
(the CCC dose on a 0.5 x 0.5 x 0.25 cm grid is averaged to the same bins). Monte Carlo: ``ompmc.calc_cube`` with the
project's default spectrum (tomodose.terma). CCC: polyenergetic TERMA built from the kernel's
TERMA weights ``sum_E w_E exp(-mu_E d) (SSD / (SSD + d))^2`` inside the divergent field, then
:func:`tomodose.transport.collapsed_cone_dose` tilted toward the source. Both are normalised at
10 cm depth on the central axis. ompMC is GPL-3.0: it is an optional tool here, never vendored.

Usage::

    python kernels/mc_compare_ccc.py [--histories 300000] [--out result.json]
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

from tomodose.geometry.grid import Grid  # noqa: E402
from tomodose.transport import collapsed_cone_dose, load_kernel  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--histories", type=int, default=300_000)
    ap.add_argument("--shared-data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--mono", type=float, default=None,
                    help="mono-energetic beam (MeV, one of the EDKnrc energies) instead of the spectrum")
    ap.add_argument("--min-energy", type=float, default=None,
                    help="drop spectral bins whose representative energy is below this (MeV), in both "
                         "the Monte Carlo and the kernel (re-derived for the cut spectrum)")
    args = ap.parse_args(argv)
    import ompmc

    from tomodose.terma.spectrum import default_spectrum

    sys.path.insert(0, str(ROOT / "kernels"))
    import derive_ccc_kernels as script

    ssd = 85.0
    half_field = 5.0
    # Monte Carlo tally: 0.5 cm along x and depth, one 2 cm bin across y at the centre
    xb = np.linspace(-10, 10, 41)
    yb = np.concatenate([np.arange(-10, -1, 0.5), [-1.0, 1.0], np.arange(1.5, 10.01, 0.5)])
    zb = np.linspace(0, 20, 41)
    nx, ny, nz = xb.size - 1, yb.size - 1, zb.size - 1
    jc = int(np.argmin(np.abs(0.5 * (yb[1:] + yb[:-1]))))

    if args.mono is None:
        spec = default_spectrum()
        edges = np.asarray(spec.bin_edges_mev, float)
        fluence = np.asarray(spec.fluence, float).copy()
        if args.min_energy is not None:
            fluence[np.asarray(spec.energies_mev) < args.min_energy] = 0.0
        mc_spec = ompmc.Spectrum.from_histogram(edges[1:], fluence, e_min=float(edges[0]))
    else:
        mc_spec = ompmc.Spectrum.monoenergetic(args.mono)
    geo = ompmc.Geometry(xb, yb, zb, ["H2O700ICRU"],
                         density=np.asfortranarray(np.ones((nx, ny, nz))),
                         material=np.asfortranarray(np.ones((nx, ny, nz), dtype=np.int32)))
    src = ompmc.CollimatedSource(ssd, -half_field, half_field, -half_field, half_field)
    t0 = time.perf_counter()
    mc, unc = ompmc.calc_cube(geo, src, mc_spec, n_histories=args.histories, n_batches=10)
    t_mc = time.perf_counter() - t0
    mc_prof = np.asarray(mc)[:, jc, :].T  # (z, x) in the central 2 cm y slab
    unc_prof = np.asarray(unc)[:, jc, :].T

    # CCC on a 0.5 x 0.5 x 0.25 cm grid with the kernel's TERMA weights, averaged to the tally
    kernel = load_kernel()
    w = np.asarray(kernel.provenance["terma_weights"])
    mu_e, mu_v = script.read_mu_water(args.shared_data / script.MU_REL)
    e_k = np.asarray(kernel.provenance["inputs"]["mono_kernels"]["energies_mev"])
    if args.mono is None and args.min_energy is not None:
        from tomodose.transport.kernels import (collapse_kernel, polyenergetic_kernel, read_edk_csv,
                                                terma_weights)

        edk = read_edk_csv(args.shared_data / script.EDK_REL)
        w = terma_weights(edk.energies_mev, spec.energies_mev, fluence, mu_e, mu_v)
        groups = [int(round(e / 3.75)) for e in kernel.polar_edges_deg]
        kernel = collapse_kernel(polyenergetic_kernel(edk, w), edk.theta_edges_deg,
                                 edk.radius_edges_cm, polar_group_edges=groups,
                                 n_azimuth=kernel.n_azimuth, n_terms=kernel.n_terms)
    if args.mono is not None:
        from tomodose.transport.kernels import collapse_kernel, read_edk_csv

        edk = read_edk_csv(args.shared_data / script.EDK_REL)
        ie = int(np.argmin(np.abs(edk.energies_mev - args.mono)))
        groups = [int(round(e / 3.75)) for e in kernel.polar_edges_deg]
        kernel = collapse_kernel(edk.total[ie], edk.theta_edges_deg, edk.radius_edges_cm,
                                 polar_group_edges=groups, n_azimuth=kernel.n_azimuth,
                                 n_terms=kernel.n_terms)
        w = np.zeros(edk.energies_mev.size)
        w[ie] = 1.0
    mu = np.exp(np.interp(np.log(e_k), np.log(mu_e), np.log(mu_v)))
    gz = 80
    grid = Grid((gz, 40, 40), (5.0, 5.0, 2.5), (-97.5, -97.5, 1.25))
    x, y, z = grid.meshgrid_mm()
    d_cm = z / 10.0
    mag = (ssd + d_cm) / ssd
    inside = (np.abs(x / 10) <= half_field * mag) & (np.abs(y / 10) <= half_field * mag)
    terma = inside * np.einsum("e,zyxe->zyx", w, np.exp(-d_cm[..., None] * mu)) / mag**2
    t0 = time.perf_counter()
    ccc = collapsed_cone_dose(terma * np.ones(grid.shape), np.ones(grid.shape), grid,
                              source_position_mm=(0.0, 0.0, -ssd * 10), kernel=kernel,
                              progress=False).astype(float)
    t_ccc = time.perf_counter() - t0
    ccc_prof = ccc[:, 18:22, :].mean(axis=1).reshape(nz, 2, nx).mean(axis=1)  # (z, x)

    zc = 0.5 * (zb[1:] + zb[:-1])
    i10 = int(np.argmin(np.abs(zc - 10.0)))
    c_mc = mc_prof[:, nx // 2 - 2:nx // 2 + 2].mean(axis=1)
    c_ccc = ccc_prof[:, nx // 2 - 2:nx // 2 + 2].mean(axis=1)
    c_mc = c_mc / c_mc[i10]
    c_ccc = c_ccc / c_ccc[i10]
    beyond = zc >= 2.0
    prof_mc = mc_prof[i10] / mc_prof[i10, nx // 2 - 4:nx // 2 + 4].mean()
    prof_ccc = ccc_prof[i10] / ccc_prof[i10, nx // 2 - 4:nx // 2 + 4].mean()
    unc = unc_prof
    i_c = nx // 2
    result = {
        "histories": args.histories,
        "beam": ("default spectrum" + ("" if args.min_energy is None else f" >= {args.min_energy} MeV")
                 if args.mono is None else f"{args.mono} MeV"),
        "time_mc_s": round(t_mc, 1),
        "time_ccc_s": round(t_ccc, 2),
        "mc_voxel_unc_pct_at_10cm_cax": round(float(unc[i10, i_c] * 100), 2),
        "dmax_mc_cm": float(zc[np.argmax(c_mc)]),
        "dmax_ccc_cm": float(zc[np.argmax(c_ccc)]),
        "cax_ratio_beyond_2cm_min": round(float((c_ccc / c_mc)[beyond].min()), 4),
        "cax_ratio_beyond_2cm_max": round(float((c_ccc / c_mc)[beyond].max()), 4),
        "cax_depth_cm": zc.round(3).tolist(),
        "cax_mc": c_mc.round(4).tolist(),
        "cax_ccc": c_ccc.round(4).tolist(),
        "profile_x_cm": (0.5 * (xb[1:] + xb[:-1])).round(2).tolist(),
        "profile_mc_10cm": prof_mc.round(4).tolist(),
        "profile_ccc_10cm": prof_ccc.round(4).tolist(),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
