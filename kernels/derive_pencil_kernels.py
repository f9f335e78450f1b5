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

SCRIPT_VERSION = "1.2"
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
#: the Monte Carlo pencil of the default spectrum in semi-infinite water (``kernels/study_pb_pencil_mc.py``)
MC_TALLY = Path(__file__).resolve().with_name("study_pb_pencil_mc.npz")
#: ring groups (mm) of the Monte Carlo correction (no correction inside the first edge: the pencil's core)
MC_R_GROUPS_MM = (2.5, 10.0, 25.0, 50.0, 100.0, 200.0, 600.0)
#: ring groups (mm) of the exit correction (the core included)
EXIT_R_GROUPS_MM = (0.0,) + MC_R_GROUPS_MM
#: decay lengths (mm of water) of the smooth fit of each ring group's exit deficit
EXIT_DECAY_MM = (2.0, 8.0, 30.0, 100.0, 400.0)
#: exit-distance step (mm) and extent of the exit table
EXIT_DT_MM = 2.5
EXIT_MAX_MM = 400.0
#: largest exit distance (mm) solved from the data: the kernel depth there (slab - t = 50 mm) is past the
#: build-up, where the pencil has its deep radial composition; beyond, the row is scaled (see below)
EXIT_T_DATA_MM = 150.0
#: depth groups (mm) of the Monte Carlo correction (edges of the tally's slabs)
MC_Z_GROUPS_MM = (0.0, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 80.0, 100.0, 130.0, 160.0, 200.0, 260.0, 340.0, 400.0)


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


def mc_surface_correction(energy_dep_rz, mc_path=MC_TALLY, depth_key="600"):
    """Factor ``c(R, z)`` (nR, nz) on the point-kernel pencil from the Monte Carlo pencil.

    The point kernels were made in infinite water: the energy they put far from the interaction
    point includes photons scattered more than once whose paths crossed the space above the
    entrance surface (lost in reality). The Monte Carlo pencil of the same spectrum entering
    water from vacuum (``kernels/study_pb_pencil_mc.py``, 600 mm deep, 600 mm radius) has the
    surface. ``c`` is the ratio Monte Carlo / point-kernel pencil of the energy in ring groups
    :data:`MC_R_GROUPS_MM` x depth groups :data:`MC_Z_GROUPS_MM` (groups: statistics),
    piecewise constant in R within a ring group and linear in depth between the groups' centres
    (constant beyond the first and last); 1 inside the first ring edge (the core, electrons of
    the first interaction). Returns ``(c, info)`` with the group ratios and their 1-sigma.
    """
    f = np.load(mc_path)
    dep = f[f"dep_{depth_key}"]
    unc = f[f"unc_{depth_key}"]
    ze = f[f"z_edges_{depth_key}"]
    if not np.allclose(f["r_edges_mm"], R_EDGES_MM):
        raise ValueError(f"{mc_path}: ring edges differ from R_EDGES_MM")
    n_r, n_z = energy_dep_rz.shape
    zc_pk = (np.arange(n_z) + 0.5) * DZ_MM
    rg, zg = np.asarray(MC_R_GROUPS_MM), np.asarray(MC_Z_GROUPS_MM)
    ratio = np.ones((rg.size - 1, zg.size - 1))
    sigma = np.zeros_like(ratio)
    for a in range(rg.size - 1):
        rows = (R_EDGES_MM[:-1] >= rg[a] - 1e-9) & (R_EDGES_MM[1:] <= rg[a + 1] + 1e-9)
        for b in range(zg.size - 1):
            cols = (ze[:-1] >= zg[b] - 1e-9) & (ze[1:] <= zg[b + 1] + 1e-9)
            if not cols.any():
                raise ValueError(f"{mc_path}: no tally slab in depth group {zg[b]}-{zg[b + 1]} mm")
            mc = dep[np.ix_(rows, cols)]
            pk = energy_dep_rz[rows][:, (zc_pk > zg[b]) & (zc_pk < zg[b + 1])].sum()
            ratio[a, b] = mc.sum() / pk
            sigma[a, b] = np.sqrt(((mc * unc[np.ix_(rows, cols)]) ** 2).sum()) / pk
    zmid = 0.5 * (zg[1:] + zg[:-1])
    c = np.ones((n_r, n_z))
    for a in range(rg.size - 1):
        rows = (R_EDGES_MM[:-1] >= rg[a] - 1e-9) & (R_EDGES_MM[1:] <= rg[a + 1] + 1e-9)
        c[rows] = np.interp(zc_pk, zmid, ratio[a])[None, :]
    return c, {"ring_groups_mm": rg.tolist(), "depth_groups_mm": zg.tolist(), "ratio": ratio.round(4).tolist(),
               "sigma": sigma.round(4).tolist()}


def exit_deficit_table(sigmas_mm, amps_cm2_g, mc_path=MC_TALLY, slab_mm=200.0, smooth=0.05):
    """Relative amplitude deficit ``x_i(t)`` of each Gaussian at exit distance ``t`` (mm of water).

    Near the exit face of a phantom there is no backscatter from beyond it (no interactions there,
    and photons that leave do not return). The Monte Carlo pencils of a 600 mm and a ``slab_mm``
    deep water phantom (same seeds, ``kernels/study_pb_pencil_mc.py``) give, per ring group
    :data:`EXIT_R_GROUPS_MM` and 2.5 mm slab at depth ``z``, the deficit
    ``r_g(t) = 1 - E_slab / E_600`` at ``t = slab_mm - z``; each group's deficit is fitted with a
    non-negative sum of exponentials in ``t`` (decay lengths :data:`EXIT_DECAY_MM`, weights 1/sigma)
    to smooth the noise. The missing energy of each ring group is then ``r_g(t)`` times the ring
    group's energy of the kernel itself (amplitudes ``amps_cm2_g`` (nz, nG) at depth
    ``z = slab_mm - t``), and ``x_i in [0, 1]`` is the bounded least-squares solution of
    ``sum_i x_i A_i(z) (energy of Gaussian i inside each ring-group edge) = the cumulative missing
    energy`` (relative rows, plus ``smooth`` x (x_i - x_i+1) rows: the problem has more Gaussians
    than ring groups): the deficit keeps its own radial shape (larger far from the axis, so a
    narrow field loses less than a broad one). Beyond :data:`EXIT_T_DATA_MM` (kernel depths in the
    build-up, and beyond ``slab_mm``: no data) the row at :data:`EXIT_T_DATA_MM` is scaled by the
    smoothed broad-field deficit (the exponential fits, extrapolated beyond ``slab_mm``), so the
    deficit keeps the radial shape of the deep pencil. Returns ``(t_mm, x (nt, nG), info)``.
    """
    from scipy.optimize import lsq_linear, nnls

    f = np.load(mc_path)
    full, slab = f["dep_600"], f[f"dep_{slab_mm:g}"]
    u_full, u_slab = f["unc_600"], f[f"unc_{slab_mm:g}"]
    ze = f[f"z_edges_{slab_mm:g}"]
    n = ze.size - 1
    t_mc = slab_mm - 0.5 * (ze[1:] + ze[:-1])
    rg = np.asarray(EXIT_R_GROUPS_MM)
    L = np.asarray(EXIT_DECAY_MM)
    t_tab = np.arange(0.0, EXIT_MAX_MM + 0.5 * EXIT_DT_MM, EXIT_DT_MM)
    r_fit = np.zeros((rg.size - 1, t_tab.size))
    coef, chi2 = [], []
    for a in range(rg.size - 1):
        rows = (R_EDGES_MM[:-1] >= rg[a] - 1e-9) & (R_EDGES_MM[1:] <= rg[a + 1] + 1e-9)
        e_f, e_s = full[rows, :n].sum(0), slab[rows, :n].sum(0)
        s_f = np.sqrt(((full[rows, :n] * u_full[rows, :n]) ** 2).sum(0))
        s_s = np.sqrt(((slab[rows, :n] * u_slab[rows, :n]) ** 2).sum(0))
        r = 1.0 - e_s / e_f
        sig = np.hypot(s_f / e_f, s_s / e_f) + 1e-4  # independent noise assumed (conservative)
        m = np.exp(-t_mc[:, None] / L[None, :])
        c, _ = nnls(m / sig[:, None], r / sig)
        r_fit[a] = np.exp(-t_tab[:, None] / L[None, :]) @ c
        coef.append(c.round(5).tolist())
        chi2.append(float(np.mean(((m @ c - r) / sig) ** 2)))
    sg = np.asarray(sigmas_mm, dtype=np.float64)
    n_g = sg.size
    edges = np.append(rg[1:-1], np.inf)  # outer edges of the ring groups (the last: all)
    m_in = -np.expm1(-(edges[:, None] ** 2) / (2.0 * sg[None, :] ** 2))  # (ng, nG) energy inside each edge
    w_ring = np.diff(np.vstack([np.zeros((1, n_g)), m_in]), axis=0)  # (ng, nG) energy in each group
    d_tab = (np.arange(amps_cm2_g.shape[0]) + 0.5) * DZ_MM
    x = np.zeros((t_tab.size, n_g))
    smooth_rows = smooth * (np.eye(n_g)[:-1] - np.eye(n_g)[1:])
    t_last = EXIT_T_DATA_MM
    broad = np.zeros(t_tab.size)
    k_last = int(round(t_last / EXIT_DT_MM))
    for k, t in enumerate(t_tab):
        z = slab_mm - min(t, t_last)
        amp = np.array([np.interp(z, d_tab, amps_cm2_g[:, i]) for i in range(n_g)])
        e_ring = w_ring @ amp  # kernel energy per ring group at depth z
        miss = np.cumsum(r_fit[:, k] * e_ring)
        broad[k] = miss[-1] / e_ring.sum()
        if t > t_last:
            x[k] = x[k_last] * (broad[k] / broad[k_last] if broad[k_last] > 0 else 0.0)
            continue
        a_mat = np.vstack([m_in * amp[None, :] / e_ring.sum(), smooth_rows])
        b_vec = np.concatenate([miss / e_ring.sum(), np.zeros(n_g - 1)])
        x[k] = lsq_linear(a_mat, b_vec, bounds=(0.0, 1.0)).x
    return t_tab, np.clip(x, 0.0, 1.0), {"ring_groups_mm": rg.tolist(), "decay_mm": L.tolist(), "coefficients": coef,
                                         "chi2_per_point": [round(v, 2) for v in chi2], "slab_mm": slab_mm,
                                         "smooth": smooth,
                                         "broad_field_deficit_at_t_mm": {
                                             f"{t:g}": round(float(broad[int(round(t / EXIT_DT_MM))]), 4)
                                             for t in (0, 5, 10, 20, 50, 100, 185)}}

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
    ap.add_argument("--mc-tally", type=Path, default=MC_TALLY,
                    help="Monte Carlo pencil tally of kernels/study_pb_pencil_mc.py (surface correction)")
    ap.add_argument("--no-mc-correction", action="store_true",
                    help="the point-kernel pencil alone (the version 1.1 behaviour)")
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
    mc_info = None
    if not args.no_mc_correction:
        corr, mc_info = mc_surface_correction(energy_dep, args.mc_tally)
        energy_dep = energy_dep * corr
        p_rz = p_rz * corr
        mc_set = json.loads(str(np.load(args.mc_tally)["settings"]))
        mc_info.update({"file": str(Path(args.mc_tally).resolve().relative_to(ROOT)) if Path(args.mc_tally).resolve()
                        .is_relative_to(ROOT) else str(args.mc_tally), "sha256": _common.sha256_of(args.mc_tally),
                        "settings": mc_set})
    amps, errs, cum = fit_gaussians(energy_dep, SIGMAS_MM)
    if args.no_mc_correction:
        exit_t, exit_x, exit_info = np.array([0.0, EXIT_DT_MM]), np.zeros((2, SIGMAS_MM.size)), None
    else:
        exit_t, exit_x, exit_info = exit_deficit_table(SIGMAS_MM, amps.T, args.mc_tally)
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
        "mc_surface_correction": mc_info,
        "exit_correction": exit_info,
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
        exit_distance_mm=exit_t.astype(np.float64),     # (nt,) uniform step
        exit_deficit=exit_x.astype(np.float64),         # (nt, nG) relative amplitude deficit near an exit face
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
    mc_md, exit_md = "", "\nNo exit correction (`exit_deficit` zero).\n"
    mc_row = (f"| Monte Carlo pencil tally (surface and exit corrections) | `{mc_info['file']}` (sha256 "
              f"`{mc_info['sha256'][:16]}...`) | the project's own ompMC run (`kernels/study_pb_pencil_mc.py`) "
              f"| project's own (Apache-2.0) |\n") if mc_info is not None else ""
    if mc_info is not None:
        ratio = np.asarray(mc_info["ratio"])
        mc_md = (f"Surface correction (version 1.2): the point kernels were made in infinite water, so "
                 f"their far energy includes photons whose paths crossed the space above the entrance surface. "
                 f"The pencil is multiplied by the ratio of an ompMC pencil of the same spectrum entering water "
                 f"from vacuum (`{mc_info['file']}`, sha256 `{mc_info['sha256'][:16]}...`, "
                 f"{mc_info['settings']['histories']} histories, `kernels/study_pb_pencil_mc.py`, GPL tool run, "
                 f"not vendored) to the point-kernel pencil, per ring group {mc_info['ring_groups_mm']} mm x depth "
                 f"group {mc_info['depth_groups_mm']} mm (1 inside 2.5 mm; linear in depth between groups); "
                 f"ratios at 0-5 mm depth {', '.join(f'{v:.3f}' for v in ratio[:, 0])}, at 100-130 mm "
                 f"{', '.join(f'{v:.3f}' for v in ratio[:, 9])} (largest 1-sigma "
                 f"{100 * np.max(mc_info['sigma']):.1f} %). ")
    if exit_info is not None:
        bd = exit_info["broad_field_deficit_at_t_mm"]
        exit_md = (f"\nExit correction: the relative amplitude deficit `x_i(t)` at exit distance `t` (mm of water; "
                   f"missing backscatter) from the same Monte Carlo in a {exit_info['slab_mm']:g} mm and a 600 mm "
                   f"deep phantom (same seeds): per ring group {exit_info['ring_groups_mm']} mm a non-negative sum "
                   f"of exponentials (decay {exit_info['decay_mm']} mm) fitted to `1 - E_slab/E_600`, then "
                   f"`x_i in [0, 1]` by bounded least squares on the cumulative missing energy (smoothing "
                   f"{exit_info['smooth']}); rows beyond {EXIT_T_DATA_MM:g} mm scaled by the broad-field deficit. "
                   f"Broad-field deficit at t = " + ", ".join(f"{k} mm: {100 * v:.1f} %" for k, v in bd.items())
                   + ".\n")
    md = f"""# Provenance of `{args.name}.npz`

Generated by `kernels/derive_pencil_kernels.py` version {SCRIPT_VERSION} on {provenance['date_utc']}:

    {provenance['command']}

| input | file | origin | licence |
|---|---|---|---|
{low_row}| mono point kernels {', '.join(f'{v:g}' for v in provenance['mono_kernels']['energies_mev'])} MeV | `shared/data/{EDK_REL}` (sha256 `{provenance['mono_kernels']['sha256'][:16]}...`) | EGSnrc EDKnrc, samuelpeet/conehead | MIT |
| water mu/rho | `{mu_file}` (sha256 `{mu_sha[:16]}...`) | NIST SRD 126 | US-Government work |
| spectrum | `{spec_file}` | {spec_name} | project's own |
{mc_row}
Method: a pencil of unit energy enters semi-infinite water; for each spectral line the TERMA
`psi_s mu_s exp(-mu_s z)` is convolved along the axis with the point kernel of that energy
(linear share between the two bracketing kernel energies), re-binned from (cone, shell) into
cylindrical (R, dz) bins by stratified sub-sampling (uniform in volume). Depth bins 1 mm, 0-{MAX_DEPTH_MM:g} mm;
interactions to {Z_EXTENT_MM:g} mm. {mc_md}Then `p(R, z) = sum_i D_i(z) g_i(R)` with normalised 2-D Gaussians of
widths {', '.join(f'{s:g}' for s in SIGMAS_MM)} mm (NNLS on the cumulative radial energy,
totals kept exactly).
{exit_md}
Contents: `depth_mm` (nz), `sigma_mm` (nG), `amplitude_cm2_g` (nz, nG) = D_i(z) in MeV/g per MeV/cm^2,
`radius_edges_mm`, `pencil_per_g` (nz, nR) tabulated p(R, z) in 1/g (MeV/g per MeV),
`terma_cm2_g` (nz) primary TERMA per unit energy fluence, `fit_error` (nz), `exit_distance_mm` (nt),
`exit_deficit` (nt, nG) relative amplitude deficit at an exit distance.

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
