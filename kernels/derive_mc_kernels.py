#!/usr/bin/env python
"""Derive mono-energetic point kernels in water from ompMC pencil beams (tomodose's own kernels).

Why: the permissive EDKnrc kernels start at 0.5 MeV; the spectral lines below it (about 30 % of
the photons of a 6 MV FFF spectrum) need kernels of their own. This script makes them with the
Monte Carlo code ompMC (``pip install ompmc``, GPL-3.0: an optional tool that is run, never
vendored; the numbers it produces are the project's).

Method
------
A mono-energetic photon pencil (energy ``E``) starts **inside** a large water cylinder
(ompMC ``calc_radial`` with a one-particle IAEA phase space moved into the phantom; medium on both
sides: 80 cm upstream, 100 cm downstream, 80 cm radius) and travels along +z from the origin.
The pencil dose ``p(R, z)`` (energy deposited per volume per incident photon, in units of ``E``)
is the convolution of the point kernel ``h`` (energy fraction per volume of a photon interacting
at the origin) with the interaction density ``mu exp(-mu z')`` along the axis:

    p(R, z) = int_0^inf mu exp(-mu z') h(R, z - z') dz' = int_-inf^z mu exp(-mu (z - s)) h(R, s) ds.

Differentiating under the integral,

    dp/dz = mu h(R, z) - mu p(R, z)     =>     h = p + (1/mu) dp/dz,

exact in an infinite homogeneous medium (``mu``: linear attenuation coefficient of water at ``E``
from the shipped NIST table, the one TERMA uses; ompMC's own photon cross sections are XCOM
with Rayleigh scattering, the same physics as the NIST mu/rho with coherent scattering).
Integrated over a volume the derivative term is a surface term, so over a chain of cells of one
ring it telescopes: for cell (ring i, slab [z_a, z_b]) with area A_i,

    H_i(z_a, z_b) = A_i int p dz + (A_i / mu) [p_i(z_b) - p_i(z_a)],

with the slab-edge values ``p_i(z)`` linearly interpolated between the slab centres. In the rings
inside the first kernel shell (R < 0.05 cm) the pencil dose is discontinuous at the start plane
z = 0 (energy deposited at the interaction point, e.g. electrons below ECUT); there the edge
values are taken one-sided and the jump ``(A_i/mu)(p_i(0+) - p_i(0-))`` -- the energy deposited
at the interaction point -- is spread over the cones of the first shell by solid angle (a point
deposit has no direction; the collapsed-cone transport keeps first-shell energy in the
interaction voxel whatever its cone). Each cell's ``H`` is then re-binned onto the EDKnrc layout
(48 polar cones of 3.75 deg x 24 spherical shells to 60 cm) by stratified sub-sampling uniform
in volume. Energy beyond 60 cm is dropped, as in the EDKnrc tables.

Statistics: ``--runs`` independent runs (different ompMC seeds) per energy; the table holds the
mean and the standard error of the mean per bin (percent), like the EDKnrc CSV.

Output: ``tomodose/data/kernels/water_mono_ompmc.csv`` (same columns as the shared EDKnrc CSV, read
by :func:`tomodose.transport.kernels.read_edk_csv`) and ``water_mono_ompmc.provenance.json`` /
``.provenance.md`` (ompMC version, PEGS file, ECUT/PCUT, histories, seeds, uncertainties,
deposited fractions, mu check, date, command). Raw r-z results are cached in ``--raw-dir`` so
the re-binning can be redone without Monte Carlo (``--no-mc``).

Usage::

    python kernels/derive_mc_kernels.py --energies 0.1,0.15,0.2,0.3,0.4,0.5 \
        --histories 100000 --runs 4 [-v]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import io
import json
import logging
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

ROOT = _common.ROOT
SCRIPT_VERSION = "1.0"
logger = logging.getLogger("derive_mc_kernels")

#: kernel layout of the EDKnrc tables (collapse code takes it unchanged)
THETA_EDGES_DEG = np.arange(49) * 3.75
RADIUS_EDGES_CM = np.array([0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.5, 2.0, 3.0,
                            4.0, 5.0, 6.0, 8.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0])
#: phantom: upstream / downstream / radius (cm) around the start point
UPSTREAM_CM, DOWNSTREAM_CM, RADIUS_CM = 80.0, 100.0, 80.0
#: first-shell radius: rings inside it get the jump treatment at z = 0
JUMP_RING_MAX_CM = 0.05
#: near-axis rings: edge values from a local regression beyond this depth (cm; past the
#: electron build-up of the transported electrons, ECUT 0.7 MeV: < 0.1 cm for E <= 0.5 MeV)
Z_SMOOTH_CM = 0.1
PEGS = {"700": ("700icru.pegs4dat", "H2O700ICRU", 0.7), "521": ("521icru.pegs4dat", "H2O521ICRU", 0.521)}


def scoring_edges() -> tuple[np.ndarray, np.ndarray]:
    """(R edges, z edges relative to the start point) of the r-z tally, cm.

    Fine (0.0125 cm) near the start point, then growing by 10 % per cell to 60 cm; one outer cell
    each beyond (the rest of the phantom, scored but outside the 60 cm kernel sphere).
    """
    fine = np.arange(0.0, 0.2 + 1e-9, 0.0125)
    grow = [0.2]
    while grow[-1] < 60.0:
        grow.append(min(60.0, grow[-1] * 1.1))
    pos = np.unique(np.round(np.concatenate([fine, grow[1:]]), 6))
    r = np.concatenate([pos, [RADIUS_CM]])
    z = np.concatenate([[-UPSTREAM_CM], -pos[:0:-1], pos, [DOWNSTREAM_CM]])
    return r, z


def write_pencil_phsp(base: Path, energy_mev: float, n: int) -> None:
    """IAEA phase space of ``n`` identical photons at the origin moving along +z (new histories)."""
    rec = np.zeros(n, dtype=np.dtype([("t", "i1"), ("e", "<f4"), ("x", "<f4"), ("y", "<f4"),
                                      ("z", "<f4"), ("u", "<f4"), ("v", "<f4"), ("wt", "<f4")]))
    rec["t"] = 1            # photon, w > 0
    rec["e"] = -energy_mev  # negative energy: first particle of a new history
    rec["wt"] = 1.0
    data = rec.tobytes()
    Path(str(base) + ".IAEAphsp").write_bytes(data)
    header = "\n".join([
        "$IAEA_INDEX:", "0", "$TITLE:", f"tomodose pencil {energy_mev} MeV", "$FILE_TYPE:", "0",
        "$CHECKSUM:", str(len(data)), "$RECORD_CONTENTS:",
        "    1     // X is stored ?", "    1     // Y is stored ?", "    1     // Z is stored ?",
        "    1     // U is stored ?", "    1     // V is stored ?", "    1     // W is stored ?",
        "    1     // Weight is stored ?", "    0     // Extra floats stored ?",
        "    0     // Extra longs stored ?", "$RECORD_CONSTANT:", "$RECORD_LENGTH:",
        str(rec.dtype.itemsize), "$BYTE_ORDER:", "1234", "$ORIG_HISTORIES:", str(n),
        "$PARTICLES:", str(n), "$PHOTONS:", str(n), ""])
    Path(str(base) + ".IAEAheader").write_text(header)


def run_pencil(energy_mev: float, n_histories: int, seed: int, pegs: str, pcut: float, workdir: Path):
    """ompMC r-z tally of one pencil run: (energy per history per cell in MeV, rel. unc, seconds)."""
    import ompmc

    pegs_file, medium, ecut = PEGS[pegs]
    r_edges, z_rel = scoring_edges()
    base = workdir / f"pencil_{int(round(energy_mev * 1000))}keV"
    write_pencil_phsp(base, energy_mev, max(1000, n_histories // 10))
    geo = ompmc.CylinderGeometry(r_bounds=r_edges, z_bounds=z_rel + UPSTREAM_CM, material=medium,
                                 density=1.0)
    src = ompmc.PhaseSpaceSource(str(base), translation=[0.0, 0.0, UPSTREAM_CM])
    phys = ompmc.Physics(pegs_file=ompmc.data_path() / "pegs4" / pegs_file, global_ecut=ecut,
                         global_pcut=pcut, seeds=(97 + seed, 33 + 7 * seed))
    t0 = time.perf_counter()
    dep, unc, summary = ompmc.calc_radial(geo, src, physics=phys, n_histories=int(n_histories),
                                          n_batches=10, output_dose=False)
    return np.asarray(dep, float), np.asarray(unc, float), time.perf_counter() - t0, summary


def compton_electron_cone_weights(energy_mev: float, t_max_mev: float = np.inf) -> np.ndarray:
    """(48,) fractions of the kinetic energy given to Compton electrons (Klein-Nishina, free
    electrons) with kinetic energy below ``t_max_mev``, by the electron's initial polar angle in
    the 3.75 deg cones (all in the forward hemisphere)."""
    k = energy_mev / 0.51099895
    cos_g = np.linspace(-1.0, 1.0, 200001)
    ratio = 1.0 / (1.0 + k * (1.0 - cos_g))                       # E'/E
    dsig = ratio**2 * (ratio + 1.0 / ratio - (1.0 - cos_g**2))    # dsigma/dOmega (x r_e^2 / 2)
    t = energy_mev * (1.0 - ratio)                                  # electron kinetic energy
    half = np.arccos(np.clip(cos_g, -1, 1)) / 2.0
    with np.errstate(divide="ignore"):
        phi_e = np.degrees(np.arctan2(1.0, (1.0 + k) * np.tan(half)))  # cot(phi) = (1+k) tan(g/2)
    w = dsig * t * (t < t_max_mev)
    hist, _ = np.histogram(phi_e, bins=THETA_EDGES_DEG, weights=w)
    return hist / hist.sum()


def pencil_to_point_kernel(dep_mev, energy_mev: float, mu_per_cm: float, *, n_sub: int = 6,
                           ecut_kinetic_mev: float = 0.7 - 0.51099895):
    """Point kernel on the EDKnrc layout from one r-z pencil tally.

    Parameters
    ----------
    dep_mev : (nR, nZ) array
        Energy deposited per incident photon in each (ring, slab) cell, MeV, on
        :func:`scoring_edges`.
    energy_mev : float
        Photon energy.
    mu_per_cm : float
        Linear attenuation coefficient of water at ``energy_mev``.

    Returns
    -------
    kernel : (48, 24) float64
        Energy fraction per (cone, shell) bin (differential).
    info : dict
        ``pencil_fraction`` (energy deposited in the whole phantom / E), ``jump_fraction``
        (energy at the interaction point, first shell), ``negative_bins`` (count).
    """
    r_edges, z_edges = scoring_edges()
    f = np.asarray(dep_mev, float) / energy_mev           # energy fraction per cell
    area = np.pi * (r_edges[1:] ** 2 - r_edges[:-1] ** 2)  # (nR,)
    dz = np.diff(z_edges)
    p = f / (area[:, None] * dz[None, :])                  # fraction per cm3
    zc = 0.5 * (z_edges[1:] + z_edges[:-1])
    nR, nZ = p.shape
    j0 = int(np.searchsorted(z_edges, 0.0))               # z_edges[j0] == 0: first slab above is j0
    assert abs(z_edges[j0]) < 1e-12
    # slab-edge values: linear between centres; ends: the end cells' values
    w = (z_edges[1:-1] - zc[:-1]) / (zc[1:] - zc[:-1])
    pe = np.empty((nR, nZ + 1))
    pe[:, 1:-1] = p[:, :-1] + (p[:, 1:] - p[:, :-1]) * w[None, :]
    pe[:, 0], pe[:, -1] = p[:, 0], p[:, -1]
    pe_lo = pe[:, :-1].copy()   # value at the bottom edge of each cell
    pe_hi = pe[:, 1:].copy()    # value at the top edge
    jump_rings = r_edges[1:] <= JUMP_RING_MAX_CM + 1e-12
    # one-sided at z = 0 for the rings inside the first shell
    pe_hi[jump_rings, j0 - 1] = p[jump_rings, j0 - 1]
    pe_lo[jump_rings, j0] = p[jump_rings, j0]
    jump = area[jump_rings] / mu_per_cm * (p[jump_rings, j0] - p[jump_rings, j0 - 1])
    # near-axis rings downstream: the interaction-point deposits of every interaction along the
    # axis make p large and its cell values noisy; their kernel is the point deposit (the jump
    # above), so beyond the electron build-up the edge values come from a local linear regression
    # of g = p exp(mu z) (smooth there) instead of two neighbouring cells
    for i in np.flatnonzero(jump_rings):
        pe_sm = _smoothed_edges(p[i], zc, z_edges, dz, mu_per_cm)
        sel = z_edges[1:-1] >= Z_SMOOTH_CM
        inner = pe_sm[1:-1]
        pe_hi[i, :-1][sel] = inner[sel]
        pe_lo[i, 1:][sel] = inner[sel]
    h_cell = f + area[:, None] / mu_per_cm * (pe_hi - pe_lo)   # (nR, nZ) energy fraction

    # re-bin cells onto (cone, shell) by stratified sub-sampling uniform in volume
    q = (np.arange(n_sub) + 0.5) / n_sub
    ra2, rb2 = r_edges[:-1] ** 2, r_edges[1:] ** 2
    rs = np.sqrt(ra2[:, None] + (rb2 - ra2)[:, None] * q[None, :])          # (nR, n_sub)
    zs = z_edges[:-1, None] + dz[:, None] * q[None, :]                        # (nZ, n_sub)
    R = np.broadcast_to(rs[:, None, :, None], (nR, nZ, n_sub, n_sub))
    Z = np.broadcast_to(zs[None, :, None, :], (nR, nZ, n_sub, n_sub))
    W = np.broadcast_to((h_cell / n_sub**2)[:, :, None, None], (nR, nZ, n_sub, n_sub))
    rr = np.hypot(R, Z).ravel()
    th = np.degrees(np.arctan2(R, Z)).ravel()
    ok = rr < RADIUS_EDGES_CM[-1]
    kernel, _, _ = np.histogram2d(np.minimum(th[ok], 180.0 - 1e-9), rr[ok],
                                  bins=(THETA_EDGES_DEG, RADIUS_EDGES_CM), weights=W.ravel()[ok])
    # the point deposit at the origin (electrons below ECUT): first shell, over the cones by the
    # Klein-Nishina initial directions of those electrons, weighted by their energy
    kernel[:, 0] += float(jump.sum()) * compton_electron_cone_weights(energy_mev, ecut_kinetic_mev)
    info = {
        "pencil_fraction": float(f.sum()),
        "jump_fraction": float(jump.sum()),
        "negative_bins": int(np.sum(kernel < 0)),
    }
    return kernel, info


def _smoothed_edges(p_ring, zc, z_edges, dz, mu):
    """Edge values of one ring's p from local linear regressions of ``p exp(mu z)`` over the
    cells with centre >= Z_SMOOTH_CM within +-max(0.15 cm, 0.4 z) of the edge (cell-length weights)."""
    out = np.full(z_edges.size, np.nan)
    ok = zc >= Z_SMOOTH_CM
    zc_ok, g_ok, w_ok = zc[ok], p_ring[ok] * np.exp(mu * zc[ok]), dz[ok]
    for k, ze in enumerate(z_edges):
        if ze < Z_SMOOTH_CM or ze > 60.0:
            continue
        half = max(0.15, 0.4 * ze)
        m = np.abs(zc_ok - ze) <= half
        if m.sum() < 3:
            continue
        x, y, w = zc_ok[m] - ze, g_ok[m], w_ok[m]
        sw, sx, sxx = w.sum(), (w * x).sum(), (w * x * x).sum()
        sy, sxy = (w * y).sum(), (w * x * y).sum()
        det = sw * sxx - sx * sx
        a = (sxx * sy - sx * sxy) / det if det > 0 else sy / sw
        out[k] = a * np.exp(-mu * ze)
    # fall back to plain interpolation where no regression was possible
    interp = np.interp(z_edges, zc, p_ring)
    return np.where(np.isfinite(out), out, interp)


def fit_mu_from_axis(dep_mev, energy_mev: float) -> float:
    """Apparent attenuation coefficient (1/cm) from the near-axis deposit along z in 1-20 cm
    (rings inside 0.05 cm: dominated by the interaction-point deposit ~ mu exp(-mu z))."""
    r_edges, z_edges = scoring_edges()
    zc = 0.5 * (z_edges[1:] + z_edges[:-1])
    rings = r_edges[1:] <= JUMP_RING_MAX_CM + 1e-12
    line = np.asarray(dep_mev)[rings].sum(axis=0) / np.diff(z_edges)
    sel = (zc > 1.0) & (zc < 20.0) & (line > 0)
    slope = np.polyfit(zc[sel], np.log(line[sel]), 1, w=np.sqrt(line[sel]))[0]
    return float(-slope)


def _csv_text(energies, kernels, unc_pct, header_lines) -> str:
    out = io.StringIO()
    for line in header_lines:
        out.write(f"# {line}\n")
    out.write("energy_MeV,theta_lo_deg,theta_hi_deg,r_hi_cm,total,total_unc_pct\n")
    for e, k, u in zip(energies, kernels, unc_pct):
        for c in range(k.shape[0]):
            for s in range(k.shape[1]):
                out.write(f"{e:g},{THETA_EDGES_DEG[c]:.2f},{THETA_EDGES_DEG[c + 1]:.2f},"
                          f"{RADIUS_EDGES_CM[s + 1]:g},{k[c, s]:.5e},{u[c, s]:.4g}\n")
    return out.getvalue()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--energies", default="0.1,0.15,0.2,0.3,0.4,0.5",
                    help="photon energies (MeV), comma separated")
    ap.add_argument("--histories", default="100000",
                    help="histories per run: one value or one per energy (comma separated)")
    ap.add_argument("--runs", type=int, default=4, help="independent runs (seeds) per energy")
    ap.add_argument("--pegs", choices=sorted(PEGS), default="700",
                    help="PEGS data: 700 (H2O700ICRU, ECUT 0.7 MeV total) or 521 (ECUT 0.521)")
    ap.add_argument("--pcut", type=float, default=0.01, help="photon cut-off (MeV)")
    ap.add_argument("--raw-dir", type=Path, default=Path(tempfile.gettempdir()) / "tomodose_mc_kernels")
    ap.add_argument("--no-mc", action="store_true", help="re-bin cached raw results only")
    ap.add_argument("--out", type=Path, default=_common.MC_KERNELS)
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(message)s")

    energies = [float(v) for v in args.energies.split(",")]
    hist = [int(float(v)) for v in args.histories.split(",")]
    if len(hist) == 1:
        hist = hist * len(energies)
    if len(hist) != len(energies):
        raise SystemExit(f"--histories must give 1 or {len(energies)} values, got {len(hist)}")
    args.raw_dir.mkdir(parents=True, exist_ok=True)
    mu = _common.mu_water_at(energies)

    try:
        import ompmc  # noqa: F401
        ompmc_version = getattr(ompmc, "__version__", None)
        if ompmc_version is None:
            from importlib.metadata import version
            ompmc_version = version("ompmc")
    except ImportError:
        if not args.no_mc:
            raise SystemExit("ompMC is needed: pip install ompmc (GPL-3.0, optional tool)")
        ompmc_version = "unknown (cached raw results)"

    kernels, uncs, per_energy = [], [], []
    for e, n_h, mu_e in zip(energies, hist, mu):
        runs, seconds, infos, mus = [], [], [], []
        for k in range(args.runs):
            raw = args.raw_dir / f"pencil_{args.pegs}_{e:g}MeV_{n_h}h_seed{k}.npz"
            if raw.is_file():
                dep = np.load(raw)["dep_mev"]
                sec = float(np.load(raw)["seconds"])
            elif args.no_mc:
                raise SystemExit(f"--no-mc: missing cached run {raw}")
            else:
                with tempfile.TemporaryDirectory() as td:
                    dep, _, sec, summary = run_pencil(e, n_h, k, args.pegs, args.pcut, Path(td))
                np.savez_compressed(raw, dep_mev=dep, seconds=sec)
                logger.info("%.3g MeV run %d: %d histories in %.0f s, phantom fraction %.4f",
                            e, k, n_h, sec, summary.energy_fraction)
            kern, info = pencil_to_point_kernel(dep, e, float(mu_e),
                                                ecut_kinetic_mev=PEGS[args.pegs][2] - 0.51099895)
            runs.append(kern)
            seconds.append(sec)
            infos.append(info)
            mus.append(fit_mu_from_axis(dep, e))
        stack = np.asarray(runs)
        mean = stack.mean(axis=0)
        sem = stack.std(axis=0, ddof=1) / np.sqrt(len(runs)) if len(runs) > 1 else np.zeros_like(mean)
        unc_pct = np.where(mean != 0, 100.0 * sem / np.abs(np.where(mean != 0, mean, 1.0)), 0.0)
        totals = stack.sum(axis=(1, 2))
        shell_first = stack[:, :, 0].sum(axis=1)
        # standard errors of the cumulative energy (all cones, and per default ring) at the shell
        # edges, from the spread of the runs: what a comparison with another kernel set is judged by
        cum_all = np.concatenate([np.zeros((len(runs), 1)), np.cumsum(stack.sum(axis=1), axis=1)], axis=1)
        rings = [0, 1, 2, 4, 6, 8, 12, 16, 24, 32, 40, 48]
        cum_ring = np.stack([np.concatenate([np.zeros((len(runs), 1)),
                                             np.cumsum(stack[:, a:b].sum(axis=1), axis=1)], axis=1)
                             for a, b in zip(rings[:-1], rings[1:])], axis=1)   # (runs, 11, 25)
        n_r = np.sqrt(len(runs))
        rec = {
            "energy_mev": e,
            "mu_per_cm_nist": float(mu_e),
            "mu_per_cm_fitted_axis": float(np.mean(mus)),
            "histories_per_run": n_h,
            "runs": len(runs),
            "cpu_wall_s_per_run": [round(s, 1) for s in seconds],
            "deposited_fraction_60cm": float(totals.mean()),
            "deposited_fraction_sem": float(totals.std(ddof=1) / np.sqrt(len(runs))) if len(runs) > 1 else None,
            "deposited_fraction_whole_phantom": float(np.mean([i["pencil_fraction"] for i in infos])),
            "interaction_point_fraction": float(np.mean([i["jump_fraction"] for i in infos])),
            "first_shell_fraction": float(shell_first.mean()),
            "negative_bins": int(np.sum(mean < 0)),
            "sem_summed_cumulative": (cum_all.std(axis=0, ddof=1) / n_r).round(7).tolist(),
            "sem_ring_cumulative_fine_cone_edges": rings,
            "sem_ring_cumulative": (cum_ring.std(axis=0, ddof=1) / n_r).round(7).tolist(),
        }
        per_energy.append(rec)
        logger.info("%.3g MeV: deposited %.4f +- %.4f within 60 cm (whole phantom %.4f), mu fit %.4f vs "
                    "NIST %.4f", e, rec["deposited_fraction_60cm"], rec["deposited_fraction_sem"] or 0,
                    rec["deposited_fraction_whole_phantom"], rec["mu_per_cm_fitted_axis"], mu_e)
        if rec["negative_bins"]:
            logger.warning("%.3g MeV: %d bins with a negative mean (noise of the derivative term); "
                           "set to 0 with their energy moved to the next shell inward", e, rec["negative_bins"])
        kernels.append(_fix_negative(mean))
        uncs.append(unc_pct)

    pegs_file, medium, ecut = PEGS[args.pegs]
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    argl = list(argv if argv is not None else sys.argv[1:])
    command = "python kernels/derive_mc_kernels.py " + " ".join(shlex.quote(a) for a in argl)
    mc_command = "python kernels/derive_mc_kernels.py " + " ".join(
        shlex.quote(a) for a in argl if a not in ("--no-mc", "-v", "--verbose"))
    provenance = {
        "script": "kernels/derive_mc_kernels.py",
        "script_version": SCRIPT_VERSION,
        "date_utc": date,
        "command": command,
        "monte_carlo_command": mc_command,
        "monte_carlo": {
            "code": "ompMC (pip install ompmc), GPL-3.0, run as an optional tool, not vendored",
            "version": ompmc_version,
            "pegs_file": pegs_file,
            "medium": medium,
            "ecut_mev_total": ecut,
            "pcut_mev": args.pcut,
            "photon_splitting": 20,
            "seeds": [[97 + k, 33 + 7 * k] for k in range(args.runs)],
            "source": "IAEA phase space of one photon at the origin along +z, moved 80 cm into the cylinder",
            "phantom_cm": {"upstream": UPSTREAM_CM, "downstream": DOWNSTREAM_CM, "radius": RADIUS_CM},
            "tally": "calc_radial r-z rings x slabs, 0.0125 cm near the start, +10 % per cell to 60 cm",
        },
        "method": "h = p + (1/mu) dp/dz from the pencil dose p, cell-integrated (telescoping slab-edge "
                  "values), interaction-point jump (electrons below ECUT) spread over shell 0 by the Klein-Nishina electron directions, re-binned onto "
                  "48 cones x 24 shells by sub-sampling; mean of independent runs, SEM as uncertainty",
        "mu_source": "tomodose/data/physics/attenuation.csv (NIST SRD 126, water, with coherent)",
        "energies": per_energy,
        "layout": {"theta_edges_deg": THETA_EDGES_DEG.tolist(), "radius_edges_cm": RADIUS_EDGES_CM.tolist()},
    }
    header = [
        f"tomodose's own mono-energetic point kernels in water from ompMC {ompmc_version} pencil beams "
        f"started inside a water cylinder; {medium} ({pegs_file}), ECUT {ecut} MeV total, PCUT {args.pcut} MeV.",
        "Method h = p + (1/mu) dp/dz; see kernels/derive_mc_kernels.py and water_mono_ompmc.provenance.md.",
        f"Generated {date}: {command}",
        "48 cones x 24 shells (EDKnrc layout). total = fraction of the interacting photon's energy deposited "
        "per bin; total_unc_pct = standard error of the mean of the independent runs (percent of the |mean| before "
        "negative noise bins were moved inward within their cone).",
    ]
    _common.atomic_write_text(args.out, _csv_text(energies, kernels, uncs, header))
    prov_json = args.out.with_name(args.out.stem + ".provenance.json")
    _common.atomic_write_text(prov_json, json.dumps(provenance, indent=1) + "\n")
    _common.atomic_write_text(args.out.with_name(args.out.stem + ".provenance.md"), _md(provenance, args.out.name))
    print(json.dumps({"written": str(args.out), "energies": per_energy}, indent=1))
    return 0


def _fix_negative(kernel: np.ndarray) -> np.ndarray:
    """Move the (noise) energy of negative bins to the next shell inward of the same cone (a
    negative first shell: outward), so every bin is >= 0 and each cone's total is unchanged."""
    k = kernel.copy()
    for c in range(k.shape[0]):
        for s in range(k.shape[1] - 1, 0, -1):
            if k[c, s] < 0:
                k[c, s - 1] += k[c, s]
                k[c, s] = 0.0
        for s in range(k.shape[1] - 1):  # a negative first shell borrows outward
            if k[c, s] >= 0:
                break
            k[c, s + 1] += k[c, s]
            k[c, s] = 0.0
    return k


def _md(p: dict, csv_name: str) -> str:
    mc = p["monte_carlo"]
    rows = "\n".join(
        f"| {r['energy_mev']:g} | {r['runs']} x {r['histories_per_run']} | {r['deposited_fraction_60cm']:.4f} "
        f"+- {r['deposited_fraction_sem'] or 0:.4f} | {r['deposited_fraction_whole_phantom']:.4f} | "
        f"{r['first_shell_fraction']:.4f} | {r['mu_per_cm_nist']:.4f} / {r['mu_per_cm_fitted_axis']:.4f} | "
        f"{np.mean(r['cpu_wall_s_per_run']):.0f} |"
        for r in p["energies"])
    return f"""# Provenance of `{csv_name}`

Generated by `{p['script']}` version {p['script_version']} on {p['date_utc']}:

    {p['command']}

(Monte Carlo runs: `{p['monte_carlo_command']}`; with `--no-mc` the cached raw r-z results of
those runs are re-binned, without new Monte Carlo.)

Monte Carlo: {mc['code']}, version {mc['version']}; PEGS file `{mc['pegs_file']}` (medium
`{mc['medium']}`), ECUT {mc['ecut_mev_total']} MeV (total energy), PCUT {mc['pcut_mev']} MeV, photon
splitting {mc['photon_splitting']}, seeds {mc['seeds']} (one independent run per seed).
Source: {mc['source']}; phantom {mc['phantom_cm']} cm; tally: {mc['tally']}.

Method: {p['method']}. mu: {p['mu_source']}.

| E (MeV) | runs x histories | deposited within 60 cm (+- SEM) | whole phantom | first shell (r < 0.5 mm) | mu NIST / fitted on axis (1/cm) | wall s per run (2 threads) |
|---|---|---|---|---|---|---|
{rows}

Uncertainty column of the CSV: standard error of the mean over the runs, per bin (percent).
Energy deposited more than 60 cm from the interaction point is not in the table (as EDKnrc).
"""


if __name__ == "__main__":
    sys.exit(main())
