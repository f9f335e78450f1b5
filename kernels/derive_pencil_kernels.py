#!/usr/bin/env python
"""Derive tomodose's depth-dependent pencil-beam kernel from mono-energetic point kernels.

Inputs (shared files are read where they are, never copied into the repository):

* mono-energetic water point kernels on 48 cones x 24 shells, the same set the collapsed-cone
  kernels are derived from (``kernels/derive_ccc_kernels.py``): the project's own ompMC kernels
  below 0.5 MeV (``tomodose/data/kernels/water_mono_ompmc.csv``, ``kernels/derive_mc_kernels.py``)
  and EGSnrc/EDKnrc kernels 0.5-6 MeV
  (``shared/data/dose_physics/kernels/edknrc_mono_water_conehead.csv``; samuelpeet/conehead, **MIT**);
  ``--mono-kernels edknrc`` for EDKnrc alone (the version 1.0 behaviour);
* water mu/rho from the shipped attenuation table of :mod:`tomodose.terma`
  (``tomodose/data/physics/attenuation.csv``, NIST SRD 126);
* the default spectrum, :func:`tomodose.terma.spectrum.default_spectrum` at run time.

Method
------
A pencil of unit energy (energy fluence x area = 1 MeV) enters semi-infinite water at z = 0.
For every spectral line ``s`` (energy-fluence weight ``psi_s``, attenuation ``mu_s``) the TERMA
along the axis is ``psi_s mu_s/rho exp(-mu_s z')``; the point kernel of that energy is the linear
mix of the two bracketing mono kernels (the same sharing rule as the collapsed-cone derivation).
Each mono kernel is re-binned from its (cone, shell) bins into cylindrical bins
(radius R, axial offset dz) by stratified sub-sampling of every bin (uniform in volume), then
convolved along z with the TERMA. Energy deposited upstream of the surface (z < 0) is lost, as in
a semi-infinite phantom. The result is the pencil kernel ``p(R, z)`` in MeV/g per MeV
(= 1/g), tabulated on cylindrical R bins and 1 mm depth bins.

Each depth is then represented as a sum of normalised 2-D Gaussians with fixed widths
``sigma_i`` (mm of water):

    p(R, z) ~= sum_i D_i(z) exp(-R^2 / (2 sigma_i^2)) / (2 pi sigma_i^2)

with ``D_i(z) >= 0`` (cm^2/g, i.e. MeV/g per MeV/cm^2 of broad-beam energy fluence) fitted by
NNLS to the cumulative radial energy (rows weighted relative to the total) and rescaled so the
total ``sum_i D_i(z)`` reproduces the tabulated energy within 600 mm exactly. Gaussians make the
kernel separable, which gives the pencil-beam engine closed-form integrals over rectangular
beamlets (error functions).

Output: ``tomodose/data/kernels/pencil_water_6mv_default.npz`` (+ ``.provenance.md``), written
atomically.

Usage::

    python kernels/derive_pencil_kernels.py [--shared-data ../shared/data] [-v]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import io
import json
import logging
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
from _common import EDK_REL  # noqa: E402

SCRIPT_VERSION = "1.1"
logger = logging.getLogger("derive_pencil_kernels")

DEFAULT_NAME = "pencil_water_6mv_default"

#: fixed Gaussian widths (mm of water) of the separable representation.
SIGMAS_MM = np.geomspace(0.2, 200.0, 12)
#: cylindrical radius bin edges (mm of water).
R_EDGES_MM = np.array([0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0,
                       15.0, 20.0, 25.0, 30.0, 40.0, 50.0, 60.0, 80.0, 100.0, 125.0, 150.0, 200.0,
                       250.0, 300.0, 400.0, 600.0])
DZ_MM = 1.0
MAX_DEPTH_MM = 400.0   # depth range of the output table
Z_EXTENT_MM = 600.0    # interaction depths considered (beyond: < exp(-0.03*60) of TERMA... kept)


def read_spectrum():
    """(energies MeV, energy-fluence weights, name, file) of the current default spectrum."""
    from tomodose.terma.spectrum import DEFAULT_SPECTRUM_FILE, default_spectrum

    s = default_spectrum()
    return (np.asarray(s.energies_mev, float), np.asarray(s.energy_fluence, float), s.name,
            f"tomodose/data/physics/{DEFAULT_SPECTRUM_FILE}")


def cylindrical_kernel(kernel_cn, theta_edges_deg, r_edges_cm, *, n_sub=20, seed=1):
    """Re-bin one (nC, nR) point kernel into (R bin, axial offset bin) energy fractions.

    Each (cone, shell) bin's energy is spread uniformly in volume over ``n_sub x n_sub`` stratified
    points; an interaction position uniform within its 1 mm depth bin is added (jitter), so the
    result convolves exactly with per-bin TERMA. Returns ``(E[nR_cyl, nZ], z_offset_edges_mm)``
    with offsets binned on integer mm (offset bin m collects deposits m mm downstream of the
    interaction bin).
    """
    rng = np.random.default_rng(seed)
    n_c, n_r = kernel_cn.shape
    ct = np.cos(np.radians(theta_edges_deg))
    r3 = (10.0 * np.asarray(r_edges_cm)) ** 3
    q = (np.arange(n_sub) + 0.5) / n_sub
    zmax = 10.0 * r_edges_cm[-1] + 2
    z_edges = np.arange(-np.ceil(zmax), np.ceil(zmax) + 1.0, DZ_MM)
    Rs, Zs, Ws = [], [], []
    for c in range(n_c):
        cos_s = ct[c] + (ct[c + 1] - ct[c]) * q  # uniform in cos(theta)
        sin_s = np.sqrt(np.clip(1.0 - cos_s**2, 0.0, None))
        for j in range(n_r):
            e = kernel_cn[c, j]
            if e <= 0:
                continue
            rr = np.cbrt(r3[j] + (r3[j + 1] - r3[j]) * q)  # uniform in volume
            R = np.outer(rr, sin_s).ravel()
            Rs.append(R)
            Zs.append(np.outer(rr, cos_s).ravel() + rng.random(R.size) * DZ_MM)  # interaction jitter
            Ws.append(np.full(R.size, e / R.size))
    out, _, _ = np.histogram2d(np.concatenate(Rs), np.concatenate(Zs), bins=(R_EDGES_MM, z_edges),
                               weights=np.concatenate(Ws))
    return out, z_edges


def pencil_table(energies, theta_edges, r_edges_cm, total, spec_e, spec_w, mu_e, mu_v):
    """p(R, z): energy per mass (1/g, per MeV of pencil energy) on (R bins, depth bins)."""
    n_z = int(MAX_DEPTH_MM / DZ_MM)
    n_int = int(Z_EXTENT_MM / DZ_MM)
    energy_dep = np.zeros((R_EDGES_MM.size - 1, n_z))
    cyl = {}
    mu_s = np.exp(np.interp(np.log(spec_e), np.log(mu_e), np.log(mu_v)))  # cm2/g == 1/cm in water
    pos = np.interp(spec_e, energies, np.arange(energies.size, dtype=float))
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, energies.size - 1)
    frac = pos - lo
    z_int_edges_cm = np.arange(n_int + 1) * DZ_MM / 10.0
    for s in range(spec_e.size):
        if spec_w[s] <= 0:
            continue
        # TERMA per bin (released energy per MeV of pencil energy) in each 1 mm interaction bin
        rel = spec_w[s] * (np.exp(-mu_s[s] * z_int_edges_cm[:-1]) - np.exp(-mu_s[s] * z_int_edges_cm[1:]))
        for k, w in ((lo[s], 1.0 - frac[s]), (hi[s], frac[s])):
            if w <= 0:
                continue
            if k not in cyl:
                cyl[k] = cylindrical_kernel(total[k], theta_edges, r_edges_cm, seed=100 + k)
                logger.info("cylindrical kernel %.2f MeV: sum %.5f", energies[k], cyl[k][0].sum())
            kern, z_edges = cyl[k]
            off0 = int(round(-z_edges[0] / DZ_MM))  # column of offset 0
            # energy_dep[:, zb] += sum_{zi} rel[zi] * kern[:, zb - zi + off0]
            for zb in range(n_z):
                zi = np.arange(n_int)
                col = zb - zi + off0
                ok = (col >= 0) & (col < kern.shape[1])
                energy_dep[:, zb] += w * (kern[:, col[ok]] @ rel[zi[ok]])
    area_cm2 = np.pi * (R_EDGES_MM[1:] ** 2 - R_EDGES_MM[:-1] ** 2) / 100.0
    vol_cm3 = area_cm2[:, None] * (DZ_MM / 10.0)
    return energy_dep / vol_cm3, energy_dep  # 1/g (water: 1 g/cm3), and raw energy fractions


def fit_gaussians(energy_dep_rz, sigmas_mm):
    """NNLS amplitudes ``D[i, z]`` (cm^2/g) of normalised Gaussians on the cumulative radial energy."""
    from scipy.optimize import nnls

    n_z = energy_dep_rz.shape[1]
    cum = np.vstack([np.zeros((1, n_z)), np.cumsum(energy_dep_rz, axis=0)])  # (nR+1, nz)
    r = R_EDGES_MM
    m = -np.expm1(-(r[:, None] ** 2) / (2.0 * sigmas_mm[None, :] ** 2))  # (nR+1, nG)
    amps = np.zeros((sigmas_mm.size, n_z))
    errs = np.zeros(n_z)
    for z in range(n_z):
        c = cum[:, z]
        tot = c[-1]
        if tot <= 0:
            continue
        # relative weighting of the cumulative + heavy total row; plus the per-bin energy rows so the
        # near-axis density is fitted too
        a = np.vstack([m[1:] / tot, np.diff(m, axis=0) / np.maximum(np.diff(c), 1e-3 * tot)[:, None] * 0.3,
                       1e3 * m[-1:] / tot])
        b = np.concatenate([c[1:] / tot, np.diff(c) / np.maximum(np.diff(c), 1e-3 * tot) * 0.3, [1e3]])
        x, _ = nnls(a, b, maxiter=5000)
        x *= tot / (m[-1] @ x)
        amps[:, z] = x
        errs[z] = np.max(np.abs(m @ x - c)) / tot
    # energy (MeV/g per MeV): amplitudes are energy fractions per 1 mm slab -> per cm^2/g
    amps_cm2_g = amps / (DZ_MM / 10.0)
    return amps_cm2_g, errs, cum


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--shared-data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--mono-kernels", choices=("merged", "edknrc"), default="merged",
                    help="merged: own ompMC kernels below 0.5 MeV + EDKnrc (default); edknrc: EDKnrc only")
    ap.add_argument("--name", default=DEFAULT_NAME)
    ap.add_argument("--out-dir", type=Path, default=ROOT / "tomodose" / "data" / "kernels")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)

    edk_path = args.shared_data / EDK_REL
    table, sources = _common.read_mono_table(args.shared_data, use_mc=args.mono_kernels == "merged")
    energies, theta_edges, r_edges_cm, total = (table.energies_mev, table.theta_edges_deg,
                                                table.radius_edges_cm, table.total)
    mu_e, mu_v = _common.read_mu_water(None)
    mu_file, mu_sha = "tomodose/data/physics/attenuation.csv", _common.sha256_of(_common.SHIPPED_MU)
    spec_e, spec_w, spec_name, spec_file = read_spectrum()
    spec_w = spec_w / spec_w.sum()

    p_rz, energy_dep = pencil_table(energies, theta_edges, r_edges_cm, total, spec_e, spec_w, mu_e, mu_v)
    amps, errs, cum = fit_gaussians(energy_dep, SIGMAS_MM)
    depth_mm = (np.arange(p_rz.shape[1]) + 0.5) * DZ_MM
    mu_s = np.exp(np.interp(np.log(spec_e), np.log(mu_e), np.log(mu_v)))
    terma_cm2_g = np.array([np.sum(spec_w * mu_s * np.exp(-mu_s * z / 10.0)) for z in depth_mm])
    broad = amps.sum(axis=0)

    provenance = {
        "script": "kernels/derive_pencil_kernels.py",
        "script_version": SCRIPT_VERSION,
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": ("python kernels/derive_pencil_kernels.py " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip(),
        "mono_kernels": {"file": f"shared/data/{EDK_REL}",
                         "sha256": _common.sha256_of(edk_path),
                         "origin": "EGSnrc EDKnrc kernels, samuelpeet/conehead", "licence": "MIT",
                         "energies_mev": [float(e) for e, src in zip(energies, sources) if src == "EDKnrc"]},
        **({"mono_kernels_low_energy": {
            "file": "tomodose/data/kernels/water_mono_ompmc.csv",
            "sha256": _common.sha256_of(_common.MC_KERNELS),
            "origin": "the project's own ompMC pencil-beam kernels (kernels/derive_mc_kernels.py)",
            "licence": "project's own (Apache-2.0)",
            "energies_mev": [float(e) for e, src in zip(energies, sources) if src == "ompMC"]}}
           if "ompMC" in sources else {}),
        "water_attenuation": {"file": mu_file, "sha256": mu_sha,
                              "origin": "NIST SRD 126 (Hubbell & Seltzer)", "licence": "US-Government work"},
        "spectrum": {"file": spec_file, "name": spec_name,
                     "energies_mev": spec_e.tolist(), "energy_fluence": spec_w.tolist()},
        "sigmas_mm": SIGMAS_MM.tolist(),
        "max_fit_error_cumulative": float(errs.max()),
        "d_max_mm": float(depth_mm[np.argmax(broad)]),
    }
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        format=np.array("tomodose-pencil-kernel"),
        format_version=np.array(1),
        name=np.array(args.name),
        depth_mm=depth_mm.astype(np.float64),
        sigma_mm=SIGMAS_MM.astype(np.float64),
        amplitude_cm2_g=amps.T.astype(np.float64),      # (nz, nG)
        radius_edges_mm=R_EDGES_MM.astype(np.float64),
        pencil_per_g=p_rz.T.astype(np.float64),         # (nz, nR) tabulated kernel, 1/g
        terma_cm2_g=terma_cm2_g,
        fit_error=errs,
        provenance=np.array(json.dumps(provenance)),
    )
    out = args.out_dir / f"{args.name}.npz"
    _common.atomic_write_bytes(out, buf.getvalue())

    i10 = int(np.searchsorted(depth_mm, 100.0))
    frac_beyond = {r: float(1.0 - np.interp(r, R_EDGES_MM, cum[:, i10]) / cum[-1, i10]) for r in (10, 20, 50, 100)}
    low = provenance.get("mono_kernels_low_energy")
    low_row = (f"| mono point kernels {', '.join(f'{v:g}' for v in low['energies_mev'])} MeV | `{low['file']}` "
               f"(sha256 `{low['sha256'][:16]}...`) | {low['origin']} | {low['licence']} |\n") if low else ""
    md = f"""# Provenance of `{args.name}.npz`

Generated by `kernels/derive_pencil_kernels.py` version {SCRIPT_VERSION} on {provenance['date_utc']}:

    {provenance['command']}

| input | file | origin | licence |
|---|---|---|---|
{low_row}| mono point kernels {', '.join(f'{v:g}' for v in provenance['mono_kernels']['energies_mev'])} MeV | `shared/data/{EDK_REL}` (sha256 `{provenance['mono_kernels']['sha256'][:16]}...`) | EGSnrc EDKnrc, samuelpeet/conehead | MIT |
| water mu/rho | `{mu_file}` (sha256 `{mu_sha[:16]}...`) | NIST SRD 126 | US-Government work |
| spectrum | `{spec_file}` | {spec_name} | project's own |

Method: a pencil of unit energy enters semi-infinite water; for each spectral line the TERMA
`psi_s mu_s exp(-mu_s z)` is convolved along the axis with the point kernel of that energy
(linear share between the two bracketing kernel energies), re-binned from (cone, shell) into
cylindrical (R, dz) bins by stratified sub-sampling (uniform in volume). Depth bins 1 mm, 0-{MAX_DEPTH_MM:g} mm;
interactions to {Z_EXTENT_MM:g} mm. Then `p(R, z) = sum_i D_i(z) g_i(R)` with normalised 2-D Gaussians of
widths {', '.join(f'{s:g}' for s in SIGMAS_MM)} mm (NNLS on the cumulative radial energy,
totals kept exactly).

Contents: `depth_mm` (nz), `sigma_mm` (nG), `amplitude_cm2_g` (nz, nG) = D_i(z) in MeV/g per MeV/cm^2,
`radius_edges_mm`, `pencil_per_g` (nz, nR) tabulated p(R, z) in 1/g (MeV/g per MeV),
`terma_cm2_g` (nz) primary TERMA per unit energy fluence, `fit_error` (nz).

Checks: largest cumulative fit error {100 * errs.max():.2f} % of the total at its depth; broad-beam
maximum at {provenance['d_max_mm']:.1f} mm; at 100 mm depth the fraction of pencil energy beyond
R = 10/20/50/100 mm is {frac_beyond[10]:.3f}/{frac_beyond[20]:.3f}/{frac_beyond[50]:.3f}/{frac_beyond[100]:.3f};
broad-beam dose / TERMA at 100 mm = {broad[i10] / terma_cm2_g[i10]:.4f}.

No Mackie (AGPL) or other copyleft data were used to derive this table.
"""
    _common.atomic_write_bytes(args.out_dir / f"{args.name}.provenance.md", md.encode("utf-8"))
    print(json.dumps({"written": str(out), "max_fit_error": float(errs.max()),
                      "d_max_mm": provenance["d_max_mm"], "frac_beyond_100mm_depth": frac_beyond,
                      "broad_over_terma_100mm": float(broad[i10] / terma_cm2_g[i10])}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
