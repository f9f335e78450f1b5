#!/usr/bin/env python
"""Compare the collapsed-cone transport with ompMC in a 10 x 10 cm field (optional, not a test).

A 10 x 10 cm field (defined at the surface), point source at SSD 85 cm, water phantom
20 x 20 x 20 cm; Monte Carlo tally 0.5 cm along x and depth in a central 2 cm slab across y
(the CCC dose on a 0.5 x 0.5 x 0.25 cm grid is averaged to the same bins). Monte Carlo:
``ompmc.calc_cube`` with the project's default spectrum (``default_spectrum()`` at run time,
histogram bins sampled uniformly by ompMC) or a mono-energetic beam. CCC: TERMA
``sum_s phi_s E_s mu_s exp(-mu_s d) (SSD / (SSD + d))^2`` inside the divergent field, the
spectrum's bins split into 8 sub-lines each (as ompMC samples them), then
:func:`tomodose.transport.collapsed_cone_dose` tilted toward the source, with one or several
kernels (``--kernel``, repeatable: shipped names or JSON paths) against the **same** Monte Carlo
run (cached with ``--mc-cache``). Group tables (``n_groups > 0``) get TERMA split by their
energy groups. Everything is normalised at 10 cm depth on the central axis.

ompMC is GPL-3.0: it is an optional tool here, never vendored.

Usage::

    python kernels/mc_compare_ccc.py [--histories 400000] [--kernel ccc_water_6mv_default]
        [--kernel old.json] [--mc-cache mc.npz] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

ROOT = _common.ROOT

from tomodose.geometry.grid import Grid  # noqa: E402
from tomodose.transport import collapsed_cone_dose, load_kernel  # noqa: E402
from tomodose.transport.kernels import collapse_kernel  # noqa: E402

SSD_CM = 85.0
HALF_FIELD_CM = 5.0
XB = np.linspace(-10, 10, 41)
YB = np.concatenate([np.arange(-10, -1, 0.5), [-1.0, 1.0], np.arange(1.5, 10.01, 0.5)])
ZB = np.linspace(0, 20, 41)


def run_mc(histories: int, mono: float | None, min_energy: float | None):
    import ompmc

    from tomodose.terma.spectrum import default_spectrum

    nx, ny, nz = XB.size - 1, YB.size - 1, ZB.size - 1
    if mono is None:
        spec = default_spectrum()
        edges = np.asarray(spec.bin_edges_mev, float)
        fluence = np.asarray(spec.fluence, float).copy()
        if min_energy is not None:
            fluence[np.asarray(spec.energies_mev) < min_energy] = 0.0
        mc_spec = ompmc.Spectrum.from_histogram(edges[1:], fluence, e_min=float(edges[0]))
    else:
        mc_spec = ompmc.Spectrum.monoenergetic(mono)
    geo = ompmc.Geometry(XB, YB, ZB, ["H2O700ICRU"],
                         density=np.asfortranarray(np.ones((nx, ny, nz))),
                         material=np.asfortranarray(np.ones((nx, ny, nz), dtype=np.int32)))
    src = ompmc.CollimatedSource(SSD_CM, -HALF_FIELD_CM, HALF_FIELD_CM, -HALF_FIELD_CM, HALF_FIELD_CM)
    t0 = time.perf_counter()
    mc, unc = ompmc.calc_cube(geo, src, mc_spec, n_histories=histories, n_batches=10)
    return np.asarray(mc), np.asarray(unc), time.perf_counter() - t0


def sub_lines(mono: float | None, min_energy: float | None, n_sub: int = 8):
    """(energies, photon weights) of the beam: the default spectrum's bins split into sub-lines."""
    if mono is not None:
        return np.array([mono]), np.array([1.0])
    from tomodose.terma.spectrum import default_spectrum

    spec = default_spectrum()
    edges = np.asarray(spec.bin_edges_mev, float)
    fl = np.asarray(spec.fluence, float).copy()
    if min_energy is not None:
        fl[np.asarray(spec.energies_mev) < min_energy] = 0.0
    q = (np.arange(n_sub) + 0.5) / n_sub
    e = (edges[:-1, None] + np.diff(edges)[:, None] * q[None, :]).ravel()
    w = np.repeat(fl / n_sub, n_sub)
    return e, w


def ccc_profile(kernel, energies, weights, *, normalise: bool = True):
    """CCC dose averaged onto the tally bins: (nz, nx) in the central y slab."""
    nx, nz = XB.size - 1, ZB.size - 1
    mu = _common.mu_water_at(energies)
    grid = Grid((80, 40, 40), (5.0, 5.0, 2.5), (-97.5, -97.5, 1.25))
    x, y, z = grid.meshgrid_mm()
    d_cm = z[:, 0, 0] / 10.0
    mag = (SSD_CM + d_cm) / SSD_CM
    inside = ((np.abs(x / 10) <= HALF_FIELD_CM * mag[:, None, None])
              & (np.abs(y / 10) <= HALF_FIELD_CM * mag[:, None, None]))
    released = weights * energies * mu                     # (nS,)
    per_line = np.exp(-np.outer(d_cm, mu)) / mag[:, None] ** 2  # (nz, nS)
    if kernel.n_groups:
        ge = kernel.group_edges_mev
        terma = np.stack([
            inside * (per_line @ np.where((energies >= ge[g]) & (energies < ge[g + 1]), released, 0.0))[:, None, None]
            for g in range(kernel.n_groups)])
        if normalise:
            terma = terma / terma.sum(axis=0).max()
    else:
        terma = inside * (per_line @ released)[:, None, None]
        if normalise:
            terma = terma / terma.max()
    t0 = time.perf_counter()
    dose = collapsed_cone_dose(terma, np.ones(grid.shape), grid, source_position_mm=(0.0, 0.0, -SSD_CM * 10),
                               kernel=kernel, progress=False).astype(float)
    dt = time.perf_counter() - t0
    return dose[:, 18:22, :].mean(axis=1).reshape(nz, 2, nx).mean(axis=1), dt


def summarise(prof, zc, i10):
    nx = prof.shape[1]
    cax = prof[:, nx // 2 - 2:nx // 2 + 2].mean(axis=1)
    cax = cax / cax[i10]
    p10 = prof[i10] / prof[i10, nx // 2 - 4:nx // 2 + 4].mean()
    return cax, p10


def mono_kernel(energy: float, template, shared: Path):
    table, _ = _common.read_mono_table(shared)
    ie = int(np.argmin(np.abs(table.energies_mev - energy)))
    if abs(table.energies_mev[ie] - energy) > 1e-9:
        raise SystemExit(f"--mono must be one of the kernel energies {table.energies_mev.tolist()}")
    groups = [int(round(e / 3.75)) for e in template.polar_edges_deg]
    return collapse_kernel(table.total[ie], table.theta_edges_deg, table.radius_edges_cm,
                           polar_group_edges=groups, n_azimuth=template.n_azimuth, n_terms=template.n_terms,
                           name=f"mono {energy} MeV")


def per_energy_profile(energies, weights, shared: Path, *, use_mc: bool = True):
    """Sum of mono-energetic CCC doses: each kernel energy transports the TERMA of the lines
    shared to it (same linear rule as the polyenergetic weights, each line with its own mu) with
    its own collapsed kernel -- no single-kernel (hardening) approximation."""
    table, _ = _common.read_mono_table(shared, use_mc=use_mc)
    template = load_kernel()
    groups = [int(round(e / 3.75)) for e in template.polar_edges_deg]
    ek = table.energies_mev
    pos = np.interp(energies, ek, np.arange(ek.size, dtype=float))
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, ek.size - 1)
    frac = pos - lo
    total, seconds = None, 0.0
    for k in range(ek.size):
        share = np.where(lo == k, 1.0 - frac, 0.0) + np.where(hi == k, frac, 0.0)
        share[(lo == k) & (hi == k)] = 1.0
        w = weights * share
        if not np.any(w > 0):
            continue
        kern = collapse_kernel(table.total[k], table.theta_edges_deg, table.radius_edges_cm,
                               polar_group_edges=groups, n_azimuth=template.n_azimuth,
                               n_terms=template.n_terms, name=f"mono {ek[k]:g} MeV")
        prof, dt = ccc_profile(kern, energies, w, normalise=False)
        total = prof if total is None else total + prof
        seconds += dt
    return total, seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--histories", type=int, default=400_000)
    ap.add_argument("--shared-data", type=Path, default=_common.DEFAULT_SHARED)
    ap.add_argument("--kernel", action="append", default=None,
                    help="kernel name or JSON path (repeatable; default: the shipped default table); "
                         "'per-energy' sums mono-energetic CCC doses (each kernel energy with its own "
                         "TERMA and kernel; 'per-energy-edknrc': EDKnrc kernels only)")
    ap.add_argument("--mc-cache", type=Path, default=None,
                    help="npz with a previous Monte Carlo run of the same beam (written when missing)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--mono", type=float, default=None,
                    help="mono-energetic beam (MeV, one of the mono kernel energies) instead of the "
                         "spectrum; the CCC uses the collapsed mono kernel of that energy")
    ap.add_argument("--min-energy", type=float, default=None,
                    help="drop spectral bins whose representative energy is below this (MeV) in the "
                         "Monte Carlo and in the TERMA (the kernels are used as given)")
    args = ap.parse_args(argv)

    if args.mc_cache is not None and args.mc_cache.is_file():
        c = np.load(args.mc_cache)
        mc, unc, t_mc = c["dose"], c["unc"], float(c["seconds"])
    else:
        mc, unc, t_mc = run_mc(args.histories, args.mono, args.min_energy)
        if args.mc_cache is not None:
            np.savez_compressed(args.mc_cache, dose=mc, unc=unc, seconds=t_mc, histories=args.histories)
    nx = XB.size - 1
    jc = int(np.argmin(np.abs(0.5 * (YB[1:] + YB[:-1]))))
    mc_prof = mc[:, jc, :].T
    unc_prof = unc[:, jc, :].T
    zc = 0.5 * (ZB[1:] + ZB[:-1])
    xc = 0.5 * (XB[1:] + XB[:-1])
    i10 = int(np.argmin(np.abs(zc - 10.0)))
    cax_mc, p_mc = summarise(mc_prof, zc, i10)
    edge_10 = HALF_FIELD_CM * (SSD_CM + 10.0) / SSD_CM
    outside = np.round(np.abs(xc) - edge_10, 2)
    # out-of-field bins, both sides averaged (the setup is symmetric)
    dist = sorted({round(float(v), 2) for v in outside[outside > 0]})

    def sym(p):
        return {f"{d:.2f}": round(float(np.mean(p[outside == d])), 4) for d in dist}

    energies, weights = sub_lines(args.mono, args.min_energy)
    names = args.kernel or ["ccc_water_6mv_default"]
    result = {
        "histories": args.histories,
        "beam": ("default spectrum" + ("" if args.min_energy is None else f" >= {args.min_energy} MeV")
                 if args.mono is None else f"{args.mono} MeV"),
        "time_mc_s": round(t_mc, 1),
        "mc_voxel_unc_pct_at_10cm_cax": round(float(unc_prof[i10, nx // 2] * 100), 2),
        "mc_voxel_unc_pct_at_10cm_outside_mean": round(float(unc_prof[i10, outside > 0].mean() * 100), 2),
        "edge_at_10cm_cm": round(edge_10, 3),
        "profile_x_cm": xc.round(2).tolist(),
        "profile_mc_10cm": p_mc.round(4).tolist(),
        "outside_distance_cm": dist,
        "outside_mc_10cm": sym(p_mc),
        "cax_depth_cm": zc.round(3).tolist(),
        "cax_mc": cax_mc.round(4).tolist(),
        "kernels": {},
    }
    for name in names:
        if name == "per-energy":
            prof, t_ccc = per_energy_profile(energies, weights, args.shared_data,
                                             use_mc=True)
        elif name == "per-energy-edknrc":
            prof, t_ccc = per_energy_profile(energies, weights, args.shared_data,
                                             use_mc=False)
        else:
            kernel = load_kernel(name)
            if args.mono is not None:
                kernel = mono_kernel(args.mono, kernel, args.shared_data)
            prof, t_ccc = ccc_profile(kernel, energies, weights)
        cax, p10 = summarise(prof, zc, i10)
        beyond = zc >= 2.0
        excess = {k: round(sym(p10)[k] - result["outside_mc_10cm"][k], 4) for k in result["outside_mc_10cm"]}
        result["kernels"][str(name)] = {
            "time_ccc_s": round(t_ccc, 2),
            "dmax_cm": float(zc[np.argmax(cax)]),
            "cax_ratio_beyond_2cm_min": round(float((cax / cax_mc)[beyond].min()), 4),
            "cax_ratio_beyond_2cm_max": round(float((cax / cax_mc)[beyond].max()), 4),
            "cax_mean_abs_dev_beyond_2cm_pct": round(float(np.mean(np.abs(cax / cax_mc - 1)[beyond]) * 100), 2),
            "outside_ccc_10cm": sym(p10),
            "outside_excess_10cm_of_central": excess,
            "outside_excess_mean_of_central": round(float(np.mean(list(excess.values()))), 4),
            "cax": cax.round(4).tolist(),
            "profile_10cm": p10.round(4).tolist(),
        }
    result["dmax_mc_cm"] = float(zc[np.argmax(cax_mc)])
    text = json.dumps(result, indent=1)
    short = {k: v for k, v in result.items() if k not in ("profile_x_cm", "profile_mc_10cm", "cax_depth_cm", "cax_mc")}
    short["kernels"] = {k: {kk: vv for kk, vv in v.items() if kk not in ("cax", "profile_10cm")}
                        for k, v in result["kernels"].items()}
    print(json.dumps(short, indent=1))
    if args.out:
        _common.atomic_write_text(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
