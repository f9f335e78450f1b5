#!/usr/bin/env python
"""Derive tomodose's polyenergetic collapsed-cone kernel tables from mono-energetic point kernels.

Inputs (the shared files are read where they are, never copied into the repository):

* mono-energetic water point kernels on 48 cones x 24 shells:
  - below 0.5 MeV: the project's **own** ompMC kernels
    (``tomodose/data/kernels/water_mono_ompmc.csv``, made by ``kernels/derive_mc_kernels.py``);
  - 0.5-6 MeV: EGSnrc/EDKnrc kernels, 12 energies
    (``shared/data/dose_physics/kernels/edknrc_mono_water_conehead.csv``; samuelpeet/conehead,
    **MIT** licence);
  (``--mono-kernels edknrc`` uses EDKnrc alone, as before version 1.2: lines below 0.5 MeV then
  get the 0.5 MeV kernel);
* water mu/rho: the shipped NIST table ``tomodose/data/physics/attenuation.csv`` (the one TERMA
  uses), or ``--mu nist`` for the shared NIST XAAMDI file;
* the photon spectrum: :func:`tomodose.terma.spectrum.default_spectrum` **at run time**
  (``--spectrum auto``), or a two-column CSV ``energy_MeV, fluence`` (``--spectrum FILE``).

Method (see :mod:`tomodose.transport.kernels` and ``docs/collapsed_cone.md``): weight each mono
kernel by its TERMA share ``phi(E) E mu(E)`` (a line between two kernel energies shared linearly),
sum, collapse the 48 cones onto the rings ``--polar-edges-deg`` x ``--n-azimuth`` cones, fit
``--n-terms`` shared exponentials and write ``tomodose/data/kernels/<name>.json`` (atomic write)
with a provenance block, plus a ``<name>.provenance.md`` next to it.

Regenerate all shipped collapsed-cone tables (after a spectrum change)::

    python kernels/derive_ccc_kernels.py
    python kernels/derive_ccc_kernels.py --group-edges-mev 1.0,2.5 --name ccc_water_6mv_3groups
    python kernels/derive_ccc_kernels.py --group-edges-mev 0.5,1.0,2.0,3.5 --name ccc_water_6mv_5groups

(the 5-group table follows the kernel hardening with depth about 3 x better than the 3-group one,
docs/collapsed_cone.md section 4c).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
from _common import EDK_REL, MU_REL, read_mono_table, read_mu_water  # noqa: E402,F401 (re-exported)

from tomodose.transport.kernels import (  # noqa: E402
    DEFAULT_KERNEL_NAME,
    collapse_kernel,
    polyenergetic_kernel,
    terma_weights,
)

SCRIPT_VERSION = "1.4"
#: default ring edges (deg): fine forward rings where the primary-electron energy is, coarse
#: backward; chosen by kernels/study_ccc_cones.py (see docs/collapsed_cone.md)
DEFAULT_POLAR_EDGES_DEG = (0, 3.75, 7.5, 15, 22.5, 30, 45, 60, 90, 120, 150, 180)
logger = logging.getLogger("derive_ccc_kernels")


def shipped_spectrum():
    """(energies, photon fluence, description) of the current default spectrum of tomodose.terma."""
    return _common.default_spectrum_arrays()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--shared-data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--spectrum", default="auto",
                    help="auto (tomodose.terma default_spectrum() at run time) | path to CSV energy_MeV,fluence")
    ap.add_argument("--mono-kernels", choices=("merged", "edknrc"), default="merged",
                    help="merged: own ompMC kernels below 0.5 MeV + EDKnrc (default); edknrc: EDKnrc only")
    ap.add_argument("--mu", choices=("shipped", "nist"), default="shipped",
                    help="water mu/rho: shipped tomodose table (default) or the shared NIST file")
    ap.add_argument("--polar-edges-deg", default=",".join(f"{v:g}" for v in DEFAULT_POLAR_EDGES_DEG),
                    help="ring edges in deg (multiples of the 3.75 deg fine cones), comma separated")
    ap.add_argument("--n-azimuth", type=int, default=8)
    ap.add_argument("--azimuth-stagger", action=argparse.BooleanOptionalAction, default=True,
                    help="turn the cones of odd rings by half an azimuth step (default since 1.3; "
                         "--no-azimuth-stagger: all rings at 360 (q + 1/2) / n_azimuth)")
    ap.add_argument("--n-terms", type=int, default=4)
    ap.add_argument("--group-edges-mev", default=None,
                    help="inner energy-group edges (MeV, comma separated), e.g. 1.0,2.5: adds group "
                         "kernels sharing the rates (table gets group_amplitudes)")
    ap.add_argument("--group-rates", choices=("shared", "per-group"), default="per-group",
                    help="with --group-edges-mev: per-group (default since 1.4): each group fits its own "
                         "rates (--n-terms per group; a --n-terms that is a multiple of the number of groups "
                         "and > 6 is read as the table's total); shared: one rate set for all groups (before 1.4)")
    ap.add_argument("--fit", choices=("buildup", "nonneg"), default="buildup",
                    help="buildup (default since 1.4): signed amplitudes whose differential kernel is "
                         "non-negative (follows the build-up of scatter with radius), rates by a global "
                         "search; nonneg: non-negative amplitudes, local search (before 1.4)")
    ap.add_argument("--name", default=DEFAULT_KERNEL_NAME)
    ap.add_argument("--out-dir", type=Path, default=ROOT / "tomodose" / "data" / "kernels")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)

    edk_path = args.shared_data / EDK_REL
    table, sources = read_mono_table(args.shared_data, use_mc=args.mono_kernels == "merged")
    if args.mu == "nist":
        mu_path = args.shared_data / MU_REL
        mu_e, mu_v = read_mu_water(mu_path)
        mu_file = f"shared/data/{MU_REL}"
    else:
        mu_path = _common.SHIPPED_MU
        mu_e, mu_v = read_mu_water(None)
        mu_file = "tomodose/data/physics/attenuation.csv"

    if args.spectrum == "auto":
        spec = shipped_spectrum()
    else:
        raw = np.loadtxt(args.spectrum, delimiter=",", comments="#", ndmin=2)
        spec = (raw[:, 0], raw[:, 1], f"CSV {args.spectrum}")
    s_e, s_w, s_name = spec
    weights = terma_weights(table.energies_mev, s_e, s_w, mu_e, mu_v)
    fine = polyenergetic_kernel(table, weights)
    mono_dep = table.deposited_fraction
    expected_total = float(weights @ mono_dep)
    is_edk = np.array([src == "EDKnrc" for src in sources])

    inputs = {
        "mono_kernels": {
            "file": f"shared/data/{EDK_REL}",
            "sha256": _common.sha256_of(edk_path),
            "origin": "EGSnrc EDKnrc kernels from samuelpeet/conehead (kernels/<E>MeV/*.egslst)",
            "licence": "MIT",
            "energies_mev": table.energies_mev[is_edk].tolist(),
            "deposited_fraction": [round(float(v), 6) for v in mono_dep[is_edk]],
        },
        "water_attenuation": {
            "file": mu_file,
            "sha256": _common.sha256_of(mu_path),
            "origin": "NIST XAAMDI / SRD 126 (Hubbell & Seltzer)",
            "licence": "US-Government work",
        },
        "spectrum": {
            "description": s_name,
            "energies_mev": [float(v) for v in s_e],
            "fluence": [float(v) for v in s_w],
            "mean_energy_mev": float(np.sum(s_e * s_w) / np.sum(s_w)),
        },
    }
    if not np.all(is_edk):
        mc_prov = json.loads(_common.MC_KERNELS.with_name("water_mono_ompmc.provenance.json").read_text())
        inputs["mono_kernels_low_energy"] = {
            "file": "tomodose/data/kernels/water_mono_ompmc.csv",
            "sha256": _common.sha256_of(_common.MC_KERNELS),
            "origin": (f"the project's own ompMC {mc_prov['monte_carlo']['version']} pencil-beam kernels "
                       f"(kernels/derive_mc_kernels.py, {mc_prov['date_utc']})"),
            "licence": "project's own (Apache-2.0)",
            "energies_mev": table.energies_mev[~is_edk].tolist(),
            "deposited_fraction": [round(float(v), 6) for v in mono_dep[~is_edk]],
        }
    provenance = {
        "script": "kernels/derive_ccc_kernels.py",
        "script_version": SCRIPT_VERSION,
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": ("python kernels/derive_ccc_kernels.py " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip(),
        "inputs": inputs,
        "method": (
            "poly kernel = sum_E w_E K_E with w_E ~ phi(E) E mu(E) (linear share between bracketing "
            "kernel energies, clamped at the ends, normalised); 48 cones summed into rings; cumulative "
            "per ring at shell edges; exponential fit C_p(r) = sum_k A_pk (1 - exp(-a_k r)) with rates "
            "shared by the rings, rows rescaled to the tabulated ring totals; " + (
                "build-up fit: NNLS over the terms and their pairwise differences e^(-a_j r) - e^(-a_k r) "
                "(signed A_pk, non-negative energy per unit radius), rates by differential evolution "
                "(fixed seed) + Nelder-Mead, neighbouring rates >= 1.5x apart"
                if args.fit == "buildup" else
                "non-negative A_pk by NNLS, rates by Powell/Nelder-Mead on log rates")
        ),
        "kernel_energies_mev": table.energies_mev.tolist(),
        "kernel_sources": sources,
        "terma_weights": [round(float(v), 8) for v in weights],
        "expected_total_fraction": expected_total,
    }
    edges = [float(v) for v in args.polar_edges_deg.split(",")]
    step = float(table.theta_edges_deg[1] - table.theta_edges_deg[0])
    groups = [int(round(e / step)) for e in edges]
    if any(abs(g * step - e) > 1e-6 for g, e in zip(groups, edges)):
        raise SystemExit(f"--polar-edges-deg must be multiples of {step} deg, got {edges}")
    group_fine = None
    group_edges = None
    if args.group_edges_mev:
        inner = [float(v) for v in args.group_edges_mev.split(",")]
        group_edges = [0.0] + inner + [max(float(np.max(s_e)), table.energies_mev[-1]) + 1.0]
        if any(b <= a for a, b in zip(group_edges, group_edges[1:])):
            raise SystemExit(f"--group-edges-mev must increase within the spectrum, got {inner}")
        s_e_arr, s_w_arr = np.asarray(s_e, float), np.asarray(s_w, float)
        group_fine = []
        group_share = []
        mu_s = np.exp(np.interp(np.log(s_e_arr), np.log(mu_e), np.log(mu_v)))
        for lo, hi in zip(group_edges[:-1], group_edges[1:]):
            sel = (s_e_arr >= lo) & (s_e_arr < hi)
            if not np.any(sel & (s_w_arr > 0)):
                raise SystemExit(f"energy group [{lo}, {hi}) MeV holds no spectral line")
            wg = terma_weights(table.energies_mev, s_e_arr, np.where(sel, s_w_arr, 0.0), mu_e, mu_v)
            group_fine.append(polyenergetic_kernel(table, wg))
            group_share.append(float(np.sum((s_w_arr * s_e_arr * mu_s)[sel]) / np.sum(s_w_arr * s_e_arr * mu_s)))
        provenance["energy_groups"] = {
            "edges_mev": group_edges,
            "rule": "a spectral line belongs to group g when edges[g] <= E < edges[g+1]; group kernel "
                    "= TERMA-weighted kernel of its lines; TERMA must be split the same way",
            "surface_terma_share": group_share,
        }
    group_rates = "shared"
    n_terms = args.n_terms
    if group_fine is not None and args.group_rates == "per-group":
        group_rates = "per_group"
        n_grp = len(group_fine)
        if n_terms > 6 and n_terms % n_grp == 0:
            n_terms //= n_grp  # the table's total (e.g. commission_la4 passes the engine kernel's n_terms)
        provenance["energy_groups"]["rates"] = (
            f"per group: {n_terms} rates fitted to each group alone (table rates: group g uses "
            f"rates[{n_terms} g : {n_terms} (g + 1)]); main kernel = sum of the groups weighted by "
            "surface_terma_share")
    elif group_fine is not None:
        provenance["energy_groups"]["rates"] = "shared by the main kernel and all groups (joint fit)"
    else:
        group_share = None
    kernel = collapse_kernel(
        fine, table.theta_edges_deg, table.radius_edges_cm, polar_group_edges=groups,
        n_azimuth=args.n_azimuth, n_terms=n_terms, name=args.name, provenance=provenance,
        group_fine_kernels=group_fine, group_edges_mev=group_edges, azimuth_stagger=args.azimuth_stagger,
        group_rates=group_rates, group_weights=group_share, buildup=args.fit == "buildup",
    )
    rel = abs(kernel.total_fraction - expected_total) / expected_total
    fit_rel = abs(float(kernel.fitted_cumulative([kernel.radius_edges_cm[-1]]).sum()) - expected_total) / expected_total
    if rel > 1e-3 or fit_rel > 1e-3:
        raise SystemExit(f"energy conservation violated: tabulated {rel:.2e}, fit {fit_rel:.2e}")
    kernel.provenance["checks"] = {
        "collapse_total_rel_error": rel,
        "fit_total_rel_error": fit_rel,
        "fit_max_cumulative_error_of_total": kernel.fit_error(),
        "fit_max_summed_cumulative_error_of_total": kernel.fit_error(summed=True),
        "fitted_tail_beyond_table_of_total": float(kernel.amplitudes.sum() / expected_total - 1.0),
    }
    out = kernel.save(args.out_dir / f"{args.name}.json")
    md = _provenance_md(kernel, s_name)
    _common.atomic_write_text(args.out_dir / f"{args.name}.provenance.md", md)
    print(json.dumps({"written": str(out), "total_fraction": kernel.total_fraction,
                      "expected": expected_total, "fit_error": kernel.fit_error(),
                      "rates_per_cm": kernel.rates_per_cm.tolist(),
                      "spectrum": s_name}, indent=1))
    return 0


def _provenance_md(kernel, spectrum_name: str) -> str:
    p = kernel.provenance
    inp = p["inputs"]
    return f"""# Provenance of `{kernel.name}.json`

Generated by `{p['script']}` version {p['script_version']} on {p['date_utc']}:

    {p.get('command', '')}

| input | file | origin | licence |
|---|---|---|---|
{_low_md(inp)}| mono kernels {', '.join(f'{v:g}' for v in inp['mono_kernels']['energies_mev'])} MeV | `{inp['mono_kernels']['file']}` (sha256 `{inp['mono_kernels']['sha256'][:16]}...`) | {inp['mono_kernels']['origin']} | {inp['mono_kernels']['licence']} |
| water mu/rho | `{inp['water_attenuation']['file']}` (sha256 `{inp['water_attenuation']['sha256'][:16]}...`) | {inp['water_attenuation']['origin']} | {inp['water_attenuation']['licence']} |
| spectrum | - | {spectrum_name} (mean {inp['spectrum']['mean_energy_mev']:.3f} MeV) | project's own |

Method: {p['method']}.

Result: {kernel.n_polar} polar rings (edges {', '.join(f'{v:g}' for v in kernel.polar_edges_deg)} deg) x
{kernel.n_azimuth} azimuthal cones = {kernel.n_directions} directions{_stagger_md(kernel)}; {kernel.n_terms} exponential terms with
rates {', '.join(f'{v:.4g}' for v in kernel.rates_per_cm)} 1/cm.

Checks: total deposited fraction {kernel.total_fraction:.6f} (TERMA-weighted mean of the mono totals
{p['expected_total_fraction']:.6f}, relative difference {p['checks']['collapse_total_rel_error']:.1e});
the fitted model at the last tabulated radius ({kernel.radius_edges_cm[-1]:g} cm) differs by
{p['checks']['fit_total_rel_error']:.1e}; largest cumulative fit error {100 * p['checks']['fit_max_cumulative_error_of_total']:.2f} %
of the total per ring and {100 * p['checks']['fit_max_summed_cumulative_error_of_total']:.2f} % for the sum of all rings; the
exponential tail beyond the table radius (never inside a patient grid) is
{100 * p['checks']['fitted_tail_beyond_table_of_total']:.1f} % of the total.

{_groups_md(kernel)}No Mackie (AGPL) or other copyleft data were used to derive this table.
"""


def _stagger_md(kernel) -> str:
    if not kernel.azimuth_stagger:
        return " (azimuths 360 (q + 1/2) / n_azimuth deg in every ring)"
    return (" (azimuths 360 (q + 1/2) / n_azimuth deg in even rings, 360 (q + 1) / n_azimuth deg in odd "
            "rings: staggered, see docs/collapsed_cone.md)")


def _low_md(inp) -> str:
    low = inp.get("mono_kernels_low_energy")
    if not low:
        return ""
    e = ", ".join(f"{v:g}" for v in low["energies_mev"])
    return (f"| mono kernels {e} MeV | `{low['file']}` (sha256 `{low['sha256'][:16]}...`) | "
            f"{low['origin']} | {low['licence']} |\n")


def _groups_md(kernel) -> str:
    if kernel.n_groups == 0:
        return ""
    rule = kernel.provenance.get("energy_groups", {}).get("rates", "kernels sharing the rates")
    lines = [f"Energy groups (rates: {rule}; TERMA must be split the same way):", ""]
    edges = kernel.group_edges_mev
    for g in range(kernel.n_groups):
        gk = kernel.group_kernel(g)
        lines.append(f"* group {g}: {edges[g]:g} <= E < {edges[g + 1]:g} MeV, emitted fraction "
                     f"{float(gk.amplitudes.sum()):.4f}, deposited within {kernel.radius_edges_cm[-1]:g} cm "
                     f"{gk.total_fraction:.4f}")
    return "\n".join(lines) + "\n\n"


if __name__ == "__main__":
    sys.exit(main())
