"""Derive the shipped default 6 MV FFF photon spectrum ``tomodose/data/physics/tomo_6mv_fff.spectrum``.

Own analytic model (no published spectrum is used to build it; the GPL/LGPL spectra in
``shared/data/dose_physics/spectra`` serve for validation in the tests only):

1. A mono-energetic pencil of electrons (kinetic energy ``T0``, default 6.0 MeV — the nominal
   incident energy of the helical tomotherapy treatment beam, Jeraj et al., Med Phys 31 (2004)
   396) enters a layered target: tungsten, then a copper backing that stops the electrons.
2. The electrons slow down continuously (CSDA). Collision stopping power from the Bethe formula
   for electrons (Rohrlich-Carlson form, no density-effect correction); radiative stopping power
   computed from the same bremsstrahlung cross section as the photon yield, so the model is
   self-consistent.
3. Photons emitted along the beam axis: thin-target Schiff cross section differential in photon
   angle (Koch & Motz, Rev Mod Phys 31 (1959) 920, formula 2BS; ``Z^2`` -> ``Z(Z+1)`` for
   electron-electron bremsstrahlung), averaged over the electron angular distribution — a
   Gaussian whose width grows along the path by multiple scattering (Highland) — so the
   energetic, still forward-going electrons near the entrance dominate the on-axis spectrum.
   The radiative stopping power uses the angle-integrated form 3BS(e).
4. A photon produced at depth ``x`` is attenuated through the rest of the target along the beam
   axis with the NIST mass attenuation coefficients of W and Cu (NIST SRD 126, Hubbell &
   Seltzer, US-Government data; values below). The depth advances by the mean direction cosine
   of the electrons times the path length. No flattening filter; the monitor chamber and the
   open collimators are neglected.
5. Counts are integrated into 0.25 MeV bins (first bin 0.05-0.25 MeV) and written in the EGSnrc
   format, counts per bin, with a provenance file beside it.

Usage::

    python kernels/derive_spectrum.py [--t0 6.0] [--w-mm 1.0] [--cu-mm 1.5] [--out tomodose/data/physics]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from pathlib import Path

import numpy as np

from tomodose._atomic import atomic_write_text

MEC2 = 0.51099895  # MeV
R0_CM = 2.8179403262e-13  # classical electron radius (cm)
ALPHA = 1.0 / 137.035999
NA = 6.02214076e23

# NIST SRD 126 mass attenuation coefficients mu/rho (cm2/g) above the K edges.
# Energies (MeV), tungsten (Z=74) and copper (Z=29) columns.
_NIST_E = np.array([0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0,
                    5.0, 6.0, 8.0, 10.0])
_NIST_W = np.array([7.810, 4.438, 1.581, 0.7844, 0.3238, 0.1925, 0.1378, 0.1093, 0.08066, 0.06618,
                    0.05577, 0.05000, 0.04433, 0.04075, 0.04038, 0.04103, 0.04210, 0.04472, 0.04747])
_NIST_CU = np.array([0.7630, 0.4584, 0.2217, 0.1559, 0.1119, 0.09413, 0.08362, 0.07625, 0.06605,
                     0.05901, 0.05261, 0.04803, 0.04205, 0.03599, 0.03318, 0.03177, 0.03108,
                     0.03074, 0.03103])

#: name -> (Z, A g/mol, mean excitation energy I MeV, density g/cm3, mu/rho table)
MATERIALS = {
    "W": (74, 183.84, 727e-6, 19.3, _NIST_W),
    "Cu": (29, 63.546, 322e-6, 8.96, _NIST_CU),
}


def mu_rho(material: str, e_mev):
    """Log-log interpolated mu/rho (cm2/g); extrapolated flat in log below 80 keV."""
    table = MATERIALS[material][4]
    e = np.clip(np.asarray(e_mev, dtype=float), _NIST_E[0], _NIST_E[-1])
    return np.exp(np.interp(np.log(e), np.log(_NIST_E), np.log(table)))


def schiff_dsigma_dk(z: int, t_mev, k_mev):
    """Koch & Motz 3BS(e): angle-integrated bremsstrahlung cross section dsigma/dk (cm2/MeV/atom).

    ``t_mev`` electron kinetic energy, ``k_mev`` photon energy (broadcast); zero for k >= T.
    """
    t = np.asarray(t_mev, dtype=float)
    k = np.asarray(k_mev, dtype=float)
    e0 = t / MEC2 + 1.0
    kk = k / MEC2
    e = e0 - kk
    valid = (kk > 0) & (e > 1.0)
    e = np.where(valid, e, 2.0)
    kk = np.where(valid, kk, 1.0)
    z3 = z ** (1.0 / 3.0)
    b = 2.0 * e0 * e * z3 / (111.0 * kk)
    inv_m = (kk / (2.0 * e0 * e)) ** 2 + (z3 / 111.0) ** 2
    ln_m = -np.log(inv_m)
    r = e / e0
    at = np.arctan(b)
    term1 = (1.0 + r * r - 2.0 / 3.0 * r) * (ln_m + 1.0 - 2.0 / b * at)
    term2 = r * (2.0 / b**2 * np.log1p(b * b) + 4.0 * (2.0 - b * b) / (3.0 * b**3) * at
                 - 8.0 / (3.0 * b * b) + 2.0 / 9.0)
    sig = 2.0 * z * (z + 1) * R0_CM**2 * ALPHA / kk * (term1 + term2)  # per unit k (mc2 units)
    return np.where(valid, np.maximum(sig, 0.0) / MEC2, 0.0)


def collision_stopping_power(material: str, t_mev):
    """Bethe mass collision stopping power for electrons (MeV cm2/g), no density effect."""
    z, a, i_mev, _, _ = MATERIALS[material]
    tau = np.asarray(t_mev, dtype=float) / MEC2
    beta2 = tau * (tau + 2.0) / (tau + 1.0) ** 2
    f = 1.0 - beta2 + (tau * tau / 8.0 - (2.0 * tau + 1.0) * np.log(2.0)) / (tau + 1.0) ** 2
    log_term = np.log(tau * tau * (tau + 2.0) / (2.0 * (i_mev / MEC2) ** 2))
    return 2.0 * np.pi * R0_CM**2 * MEC2 * NA * z / a / beta2 * (log_term + f)


def radiative_stopping_power(material: str, t_mev, n_k: int = 400):
    """Mass radiative stopping power (MeV cm2/g) from :func:`schiff_dsigma_dk`."""
    z, a, _, _, _ = MATERIALS[material]
    t = np.atleast_1d(np.asarray(t_mev, dtype=float))
    out = np.empty_like(t)
    for n, ti in enumerate(t):
        k = np.linspace(ti * 1e-4, ti * (1 - 1e-6), n_k)
        out[n] = NA / a * np.trapezoid(k * schiff_dsigma_dk(z, ti, k), k)
    return out


RADIATION_LENGTH_G_CM2 = {"W": 6.76, "Cu": 12.86}  # PDG


def schiff_dsigma_dk_domega(z: int, t_mev, k_mev, theta):
    """Koch & Motz 2BS: Schiff bremsstrahlung cross section per unit photon energy and solid angle
    at angle ``theta`` (rad) to the electron direction, up to a constant factor (cm2/MeV/sr x c).

    Its integral over the sphere is proportional to :func:`schiff_dsigma_dk` within 0.5 % for
    T = 6 MeV, k = 0.5-5.8 MeV (consistency check of both transcriptions).
    """
    e0 = np.asarray(t_mev, dtype=float) / MEC2 + 1.0
    kk = np.asarray(k_mev, dtype=float) / MEC2
    e = e0 - kk
    valid = (kk > 0) & (e > 1.0)
    e = np.where(valid, e, 2.0)
    kk = np.where(valid, kk, 1.0)
    y = e0 * np.asarray(theta, dtype=float)
    q = y * y + 1.0
    inv_m = (kk / (2.0 * e0 * e)) ** 2 + (z ** (1.0 / 3.0) / (111.0 * q)) ** 2
    ln_m = -np.log(inv_m)
    brace = (16.0 * y * y * e / (q**4 * e0) - (e0 + e) ** 2 / (q**2 * e0**2)
             + ((e0**2 + e**2) / (q**2 * e0**2) - 4.0 * y * y * e / (q**4 * e0)) * ln_m)
    return np.where(valid, np.maximum(z * (z + 1) * e0**2 / kk * brace, 0.0), 0.0)


def thick_target_forward_spectrum(t0_mev: float, layers, k_mev, n_t: int = 300, n_theta: int = 721):
    """On-axis photon spectrum (relative counts per MeV) of a thick layered target.

    The electron pencil slows down (CSDA); its direction spreads with depth: 2-D Gaussian of
    projected width theta0, d(theta0^2)/ds = (13.6 MeV / (beta c p))^2 / X0 (Highland without
    the log term). At each step the photon yield along the beam axis is the 2BS cross section
    averaged over the electron angular distribution (normalised on the sphere); the geometric
    depth advances by <cos theta> ds; photons are attenuated through the rest of the target.
    """
    k = np.asarray(k_mev, dtype=float)
    bounds = np.cumsum([0.0] + [th for _, th in layers])
    t_grid = np.linspace(t0_mev, 0.02, n_t)
    theta = np.linspace(0.0, np.pi, n_theta)
    sin_t = np.sin(theta)
    counts = np.zeros_like(k)
    x = 0.0
    theta0_sq = 0.0
    for n in range(n_t - 1):
        t_mid = 0.5 * (t_grid[n] + t_grid[n + 1])
        d_t = t_grid[n] - t_grid[n + 1]
        li = int(np.searchsorted(bounds, x, side="right") - 1)
        if li >= len(layers):
            break
        mat = layers[li][0]
        z, a, _, rho, _ = MATERIALS[mat]
        s_tot = collision_stopping_power(mat, t_mid) + radiative_stopping_power(mat, t_mid, 200)[0]
        ds_g = d_t / s_tot
        pc = np.sqrt(t_mid * (t_mid + 2.0 * MEC2))
        beta = pc / (t_mid + MEC2)
        theta0_sq_mid = theta0_sq + 0.5 * (13.6 / (beta * pc)) ** 2 * ds_g / RADIATION_LENGTH_G_CM2[mat]
        theta0_sq = theta0_sq_mid * 2.0 - theta0_sq
        f = np.exp(-0.5 * theta**2 / max(theta0_sq_mid, 1e-12))
        norm = np.trapezoid(f * 2.0 * np.pi * sin_t, theta)
        f = f / norm
        mean_cos = max(0.0, float(np.trapezoid(f * np.cos(theta) * 2.0 * np.pi * sin_t, theta)))
        dx = mean_cos * ds_g / rho
        x_mid = x + 0.5 * dx
        mu_path = np.zeros_like(k)
        for lj, (mj, th) in enumerate(layers):
            lo, hi = bounds[lj], bounds[lj + 1]
            path = max(0.0, hi - max(lo, x_mid))
            if path > 0:
                mu_path += mu_rho(mj, k) * MATERIALS[mj][3] * path
        yld = np.trapezoid(schiff_dsigma_dk_domega(z, t_mid, k[:, None], theta[None, :])
                           * (f * 2.0 * np.pi * sin_t)[None, :], theta, axis=1)
        counts += NA / a * yld * ds_g * np.exp(-mu_path)
        x += dx
    return counts


def bin_spectrum(t0_mev, layers, edges, per_bin_points: int = 9):
    """Counts per bin of the on-axis spectrum (trapezoid over ``per_bin_points`` per bin)."""
    ks = [np.linspace(edges[i], edges[i + 1], per_bin_points) for i in range(len(edges) - 1)]
    y = thick_target_forward_spectrum(t0_mev, layers, np.concatenate(ks)).reshape(len(ks), per_bin_points)
    return np.array([np.trapezoid(y[i], ks[i]) for i in range(len(ks))])


def spectrum_bin_edges(t0_mev: float) -> np.ndarray:
    """Bin edges (MeV): 0.05, then 0.25 MeV steps up to ``t0_mev`` (a last, narrower bin ends at
    ``t0_mev`` when it is not a multiple of 0.25 MeV)."""
    edges = np.concatenate([[0.05], np.arange(0.25, t0_mev + 1e-9, 0.25)])
    if edges[-1] < t0_mev - 1e-6:
        edges = np.append(edges, t0_mev)
    return edges


def main(argv=None) -> int:
    root = Path(__file__).resolve().parents[1]
    p = argparse.ArgumentParser(description="Derive the default 6 MV FFF spectrum")
    p.add_argument("--t0", type=float, default=6.0, help="electron kinetic energy (MeV)")
    p.add_argument("--w-mm", type=float, default=1.0, help="tungsten layer thickness (mm)")
    p.add_argument("--cu-mm", type=float, default=1.5, help="copper backing thickness (mm)")
    p.add_argument("--out", type=Path, default=root / "tomodose" / "data" / "physics")
    p.add_argument("--note", default="", help="free text added to the provenance (e.g. how T0 was fitted)")
    args = p.parse_args(argv)
    layers = [("W", args.w_mm / 10.0), ("Cu", args.cu_mm / 10.0)]
    edges = spectrum_bin_edges(args.t0)
    counts = bin_spectrum(args.t0, layers, edges)
    counts = counts / counts.sum()
    centres = 0.5 * (edges[1:] + edges[:-1])
    mean_e = float(np.sum(counts * centres))
    mean_ef = float(np.sum(counts * centres**2) / np.sum(counts * centres))
    title = (f"tomodose default 6 MV FFF: Schiff thick-target model, T0={args.t0} MeV, "
             f"W {args.w_mm} mm + Cu {args.cu_mm} mm, mean {mean_e:.3f} MeV")
    rows = [title, f"{len(counts)} {edges[0]:.4f} 0"]
    rows += [f"{t:.4f} {c:.6e}" for t, c in zip(edges[1:], counts)]
    out = args.out / "tomo_6mv_fff.spectrum"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "\n".join(rows) + "\n")
    # a few stopping-power values for the record
    sp = {f"{t} MeV": {"collision_MeV_cm2_g": round(float(collision_stopping_power('W', t)), 4),
                       "radiative_MeV_cm2_g": round(float(radiative_stopping_power('W', t)[0]), 4)}
          for t in (1.0, 3.0, 6.0)}
    meta = {
        "file": out.name, "generator": "kernels/derive_spectrum.py", "date": _dt.date.today().isoformat(),
        "command": " ".join(["python", "kernels/derive_spectrum.py"] + list(argv if argv is not None else sys.argv[1:])),
        "electron_kinetic_energy_mev": args.t0, "layers_mm": {"W": args.w_mm, "Cu": args.cu_mm},
        "electron_angular_model": "Gaussian, Highland width accumulated along the CSDA path", "n_bins": len(counts), "bin_edges_mev": [round(e, 4) for e in edges],
        "mean_energy_mev": round(mean_e, 4), "energy_fluence_weighted_mean_mev": round(mean_ef, 4),
        "tungsten_stopping_powers": sp, "format": "EGSnrc spectrum, mode 0 (counts per bin)",
        "note": args.note,
    }
    prov = f"""# Provenance of `tomo_6mv_fff.spectrum`

Generated by `kernels/derive_spectrum.py` (tomodose, Apache-2.0) — an own analytic model, **not**
derived from any published or copyleft spectrum. Method (see the script's docstring):
CSDA slowing-down of a {args.t0} MeV electron pencil in a tungsten ({args.w_mm} mm) + copper
({args.cu_mm} mm) target; Bethe collision stopping power; Schiff angle-integrated bremsstrahlung
cross section (Koch & Motz 1959, 3BS(e)) with Z(Z+1); self-attenuation in the rest of the target
with NIST SRD 126 mu/rho of W and Cu (US-Government data); on-axis yield from the Schiff
angular cross section (Koch & Motz 2BS) averaged over a Gaussian electron angular distribution
whose width grows along the path (Highland); no flattening filter.

* Mean photon energy: **{mean_e:.3f} MeV** (energy-fluence-weighted mean {mean_ef:.3f} MeV).
{('* ' + args.note) if args.note else ''}
* Literature context: Jeraj et al., Med Phys 31 (2004) 396 — the helical tomotherapy treatment
  beam uses ~6 MeV electrons, has a spectrum "similar to that of more conventional radiation
  treatment units" and less than 5 % off-axis mean-energy variation (no flattening filter).
* Known simplifications: small-angle Gaussian multiple scattering; no Elwert / Coulomb
  correction (Schiff underestimates low-energy emission in high Z); no electron energy spread;
  no head scatter; no annihilation line. Treat it as a nominal machine-independent default; a
  measured/commissioned spectrum can be supplied as an EGSnrc `.spectrum` file.
* Validation (tests only, read at test time from `shared/data`): mean energy compared with the
  NRC BEAM Varian Clinac 2100 6 MV (1.48 MeV) and Mohan 1985 (1.90 MeV) spectra.

```json
{json.dumps(meta, indent=2)}
```
"""
    atomic_write_text(args.out / "tomo_6mv_fff.provenance.md", prov)
    print(f"wrote {out}: {len(counts)} bins, mean {mean_e:.3f} MeV, energy-fluence mean {mean_ef:.3f} MeV")
    print(json.dumps(sp))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
