#!/usr/bin/env python
"""Study: energy balance of the collapsed-cone engine against the ompMC water references.

Per depth bin, the dose integrated over the whole profile plane (x and z; the Monte Carlo bins
cover the whole water cross-section) times the mass is the energy deposited in that slab. This
script compares it, for the references ``water_j10/j25/j50``, between

* the Monte Carlo (``validation/references``);
* the collapsed-cone engine as :func:`tomodose.evaluation.reference.engine_dose` runs it;
* an independent **superposition by sampling** (no collapsed cones, no exponential fit): photons
  of each spectral line enter through the aperture of the case (point source, ideal collimator,
  the reference's phantom 440 x 200 x 160 mm), interact along their ray with the shipped water
  mu, and the point kernel places the released energy (per (cone, shell) bin, uniform in volume
  within the bin, kernel axis along the photon's ray, random azimuth); energy landing outside the
  phantom is lost. Kernel variants (``--kernels``):

  - ``mono``: the tabulated mono-energetic kernels, each line with its own kernel (the line shared
    linearly between the bracketing kernel energies, as in the derivation);
  - ``group``: the tabulated (48-cone) energy-group kernels of the shipped 3-group table's recipe,
    each line with its group's kernel;
  - ``ring``: the tabulated group kernels with every fine cone moved to its ring's representative
    polar angle (the collapse of the engine), radius from the table;
  - ``fit``: the shipped fitted group kernels (rings at their representative polar angle, radius
    drawn from the fitted exponential model including the tail beyond 60 cm);
  - ``file:<path>``: the fitted group kernels of another table.

The TERMA of the engine (plane integral of ``compute_terma``) is checked against the analytic
``sum_E Psi_E mu_E exp(-mu_E d / cos) / cos`` (spectral lines at the bin energies, as the engine,
and integrated uniformly over each bin, as ompMC samples them).

Absolute units without the calibration: the Monte Carlo's raw dose per weight unit (photon per
cm2 at the isocentre) against the engine's TERMA normalisation (per unit energy fluence at the
isocentre) times the spectrum's mean energy.

Options: ``--within-shell fit`` places the tabulated kernels' energy inside a shell with the shape
of the fitted model instead of uniformly in volume; ``--larger-phantom`` lets the photons interact
in the larger phantom of ``kernels/study_ccc_phantom_size.py`` (tally still in the reference
phantom); ``--profiles`` prints z profiles at the central x bin (CCC and superpositions / MC).
Results: ``docs/collapsed_cone.md`` section 4c.

Usage::

    nice -n 10 python kernels/study_ccc_energy_balance.py [--cases water_j10,...] [--samples 2e7]
        [--kernels mono,group,ring,fit,file:table.json] [--engine-cache DIR] [--engine-kernel table.json]
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

MEV_J = 1.602176634e-13
WATER = ("water_j10", "water_j25", "water_j50")
#: how the tabulated kernels place energy inside a shell ("volume": uniform in volume; "fit": the
#: shape of the shipped fitted ring model between the shell edges); set by --within-shell
WITHIN_SHELL = "volume"


# --------------------------------------------------------------------------------------------
# geometry of a reference case
# --------------------------------------------------------------------------------------------
def case_geometry(ref):
    """Source, aperture and phantom box of a static gantry-0 reference (LPS mm)."""
    from tomodose.terma.beam_model import BeamModel

    seq = ref.sequence
    m = seq.machine
    assert np.allclose(seq.gantry_angle_deg, 0.0)
    bm = BeamModel.ideal(ref.spectrum)
    edges = m.leaf_edges_mm()
    open_ = np.flatnonzero(seq.leaf_open_fraction[0] > 0)
    u_lo, u_hi = float(edges[open_[0]]), float(edges[open_[-1] + 1])
    half_v = 0.5 * bm.real_fwhm_mm(seq.field_width_mm, m)
    iso = np.asarray(seq.isocentre_lps_mm, float)
    src = iso - np.array([0.0, m.sad_mm, 0.0])  # gantry 0, HFS: source anterior (-y)
    xe, ye, ze = ref.edges_mm
    box = np.array([[xe[0], xe[-1]], [ye[0], ye[-1]], [ze[0], ze[-1]]])
    return {"src": src, "iso": iso, "sad": m.sad_mm, "u": (u_lo, u_hi), "v": (-half_v, half_v), "box": box,
            "surface_y": float(ref.analysis["surface_mm"])}


def _mu_water(e_mev):
    from tomodose.terma.attenuation import attenuation_table

    return attenuation_table().mu_rho("water", np.asarray(e_mev, float))


# --------------------------------------------------------------------------------------------
# (a) TERMA
# --------------------------------------------------------------------------------------------
def analytic_terma_plane(ref, depth_edges_mm, *, bins: bool = False, n_sub: int = 64, n_ap: int = 41):
    """Energy released per unit depth (MeV per cm of depth per photon-per-cm2 at the isocentre) in
    each depth bin (mean over the bin), for the case's aperture and phantom, exact obliquity.

    ``bins=False``: spectral lines at the bin energies (as the engine); True: each bin sampled
    uniformly in energy (as ompMC samples a histogram spectrum)."""
    g = case_geometry(ref)
    sp = ref.spectrum
    if bins:
        e_list, w_list = [], []
        for lo, hi, f in zip(sp.bin_edges_mev[:-1], sp.bin_edges_mev[1:], sp.fluence):
            e = lo + (np.arange(n_sub) + 0.5) / n_sub * (hi - lo)
            e_list.append(e)
            w_list.append(np.full(n_sub, f / n_sub))
        e, w = np.concatenate(e_list), np.concatenate(w_list)
    else:
        e, w = np.asarray(sp.energies_mev, float), np.asarray(sp.fluence, float)
    mu = _mu_water(e) / 10.0  # 1/mm
    u = np.linspace(*g["u"], n_ap)
    v = np.linspace(*g["v"], n_ap)
    uu, vv = np.meshgrid(0.5 * (u[1:] + u[:-1]), 0.5 * (v[1:] + v[:-1]))
    da = np.diff(u)[0] * np.diff(v)[0] / 100.0  # cm2
    cos = g["sad"] / np.sqrt(g["sad"] ** 2 + uu ** 2 + vv ** 2)
    # photons through the aperture element: fluence 1/cm2 at iso scaled by cos^3 (per solid angle)
    n_ph = (cos ** 3 * da).ravel()
    # the surface is at the isocentre plane (SSD = SAD): path in water to depth d is d / cos
    de = np.asarray(depth_edges_mm, float)
    out = np.zeros(de.size - 1)
    for c, n in zip(cos.ravel(), n_ph):
        # mean over each depth bin of mu/cos exp(-mu d / cos): exact integral
        s_lo = de[:-1, None] / c
        s_hi = de[1:, None] / c
        rel = (np.exp(-mu * s_lo) - np.exp(-mu * s_hi)) / (np.diff(de)[:, None])  # released per mm of depth
        out += n * (rel * w * e).sum(axis=1)
    return out * 10.0  # per cm of depth


def plane_energy(ref, dose_gy):
    """(ny,) energy per depth bin per cm of depth (Gy g / cm = mJ / cm): sum over x, z of D rho V."""
    xe, ye, ze = ref.edges_mm
    vol = np.einsum("k,j,i->kji", np.diff(ze), np.diff(ye), np.diff(xe)) / 1000.0  # cm3
    return (np.asarray(dose_gy) * ref.density_g_cm3 * vol).sum(axis=(0, 2)) / (np.diff(ye) / 10.0)


# --------------------------------------------------------------------------------------------
# (b) superposition by sampling
# --------------------------------------------------------------------------------------------
class KernelSampler:
    """Draws (polar angle, radius) displacements from a kernel for given line indices."""

    def __init__(self, kind, spectrum, kernel=None, rng=None):
        import _common
        from tomodose.transport.kernels import polyenergetic_kernel, terma_weights

        self.kind = kind
        self.rng = rng
        e_s = np.asarray(spectrum.energies_mev, float)
        self.n_lines = e_s.size
        mu_e, mu_v = _common.read_mu_water(None)
        if kind in ("mono", "group", "ring"):
            table, _ = _common.read_mono_table(_common.DEFAULT_SHARED, use_mc=True)
            self.theta_edges = np.radians(table.theta_edges_deg)
            self.r_edges = table.radius_edges_cm
            fines = []
            if kind == "ring":
                # the tabulated group kernel with every fine cone moved to its ring's direction
                # (the collapse of the engine), radius still from the table
                fine_deg = 0.5 * (table.theta_edges_deg[1:] + table.theta_edges_deg[:-1])
                ring = np.searchsorted(np.asarray(kernel.polar_edges_deg), fine_deg) - 1
                self.ring_theta = np.radians(np.asarray(kernel.polar_deg))[ring]
            if kind == "mono":
                for i in range(e_s.size):
                    one = np.zeros(e_s.size)
                    one[i] = 1.0
                    wk = terma_weights(table.energies_mev, e_s, one, mu_e, mu_v)
                    fines.append(polyenergetic_kernel(table, wk))
                self.line_kernel = np.arange(e_s.size)
            else:
                edges = np.asarray(kernel.group_edges_mev, float).copy()
                edges[0], edges[-1] = 0.0, 1e3
                w_s = np.asarray(spectrum.fluence, float)
                grp = np.searchsorted(edges, e_s, side="right") - 1
                for gi in range(edges.size - 1):
                    wk = terma_weights(table.energies_mev, e_s, np.where(grp == gi, w_s, 0.0), mu_e, mu_v)
                    fines.append(polyenergetic_kernel(table, wk))
                self.line_kernel = grp
            self.fines = [f.ravel() for f in fines]
            self.within = None
            if kind in ("group", "ring") and WITHIN_SHELL == "fit":
                # radius inside a shell drawn from the fitted ring model of the shipped table (the
                # shell contents stay the tabulated ones); "volume": uniform in volume
                fine_deg = 0.5 * (table.theta_edges_deg[1:] + table.theta_edges_deg[:-1])
                self.fine_ring = np.searchsorted(np.asarray(kernel.polar_edges_deg), fine_deg) - 1
                rg = np.linspace(0.0, 1.0, 201)
                self.within = []
                for gi in range(len(fines)):
                    amps = kernel.group_amplitudes[gi]
                    per_ring = []
                    for pi in range(amps.shape[0]):
                        rows = []
                        for r0, r1 in zip(table.radius_edges_cm[:-1], table.radius_edges_cm[1:]):
                            rr = r0 + rg * (r1 - r0)
                            c = (amps[pi][None, :] * -np.expm1(-np.outer(rr, kernel.rates_per_cm))).sum(axis=1)
                            c = np.maximum.accumulate(c - c[0])
                            rows.append((rr, c / c[-1] if c[-1] > 0 else rg))
                        per_ring.append(rows)
                    self.within.append(per_ring)
            self.totals = np.array([f.sum() for f in self.fines])
            self.cdfs = [np.cumsum(f) / f.sum() for f in self.fines]
            self.n_r = table.radius_edges_cm.size - 1
        else:  # fitted group kernel
            edges = np.asarray(kernel.group_edges_mev, float).copy()
            edges[0], edges[-1] = 0.0, 1e3
            self.line_kernel = np.searchsorted(edges, e_s, side="right") - 1
            self.polar = np.radians(kernel.polar_deg)
            r = np.concatenate([[0.0], np.geomspace(1e-4, 400.0, 4000)])
            self.r_grid = r
            self.totals, self.ring_cdf, self.r_cdf = [], [], []
            for gi in range(kernel.n_groups):
                amps = kernel.group_amplitudes[gi]
                rates = kernel.rates_per_cm
                cum = (amps[:, None, :] * -np.expm1(-np.outer(r, rates))[None]).sum(axis=2)  # (P, nr)
                cum = np.maximum.accumulate(np.maximum(cum, 0.0), axis=1)
                ring_tot = cum[:, -1]
                self.totals.append(ring_tot.sum())
                self.ring_cdf.append(np.cumsum(ring_tot) / ring_tot.sum())
                self.r_cdf.append(cum / np.maximum(ring_tot[:, None], 1e-300))
            self.totals = np.array(self.totals)

    def draw(self, line):
        """(theta rad, r cm, weight = deposited fraction of the kernel) for line indices ``line``."""
        rng = self.rng
        kid = self.line_kernel[line]
        n = line.size
        theta = np.empty(n)
        r = np.empty(n)
        for k in np.unique(kid):
            sel = np.flatnonzero(kid == k)
            if self.kind in ("mono", "group", "ring"):
                idx = np.searchsorted(self.cdfs[k], rng.random(sel.size), side="right")
                idx = np.minimum(idx, self.cdfs[k].size - 1)
                c, s = np.divmod(idx, self.n_r)
                c0, c1 = np.cos(self.theta_edges[c]), np.cos(self.theta_edges[c + 1])
                theta[sel] = np.arccos(c0 + rng.random(sel.size) * (c1 - c0))
                if self.kind == "ring":
                    theta[sel] = self.ring_theta[c]
                r0, r1 = self.r_edges[s], self.r_edges[s + 1]
                uu = rng.random(sel.size)
                if self.within is None:
                    r[sel] = np.cbrt(r0 ** 3 + uu * (r1 ** 3 - r0 ** 3))
                else:
                    rp = self.fine_ring[c]
                    out = np.empty(sel.size)
                    for key in np.unique(rp * 1000 + s):
                        m = (rp * 1000 + s) == key
                        rr, cc = self.within[k][key // 1000][key % 1000]
                        out[m] = np.interp(uu[m], cc, rr)
                    r[sel] = out
            else:
                p = np.searchsorted(self.ring_cdf[k], rng.random(sel.size), side="right")
                p = np.minimum(p, self.ring_cdf[k].size - 1)
                theta[sel] = self.polar[p]
                u = rng.random(sel.size)
                rr = np.empty(sel.size)
                for pi in np.unique(p):
                    m = p == pi
                    rr[m] = np.interp(u[m], self.r_cdf[k][pi], self.r_grid)
                r[sel] = rr
        return theta, r, self.totals[kid]


def superpose(ref, sampler, n_samples: int, seed: int = 1, batch: int = 500_000, bins: bool = True,
              phantom_box=None):
    """Energy deposited per depth bin per cm (MeV per photon-per-cm2 at iso), plus the 3-D tally
    on the reference bins (MeV) and the released energy per depth bin (MeV / cm).

    ``phantom_box`` ((3, 2) mm, optional): the water the photons interact in (default the
    reference phantom); energy is tallied inside the reference phantom only."""
    rng = np.random.default_rng(seed)
    sampler.rng = rng
    g = case_geometry(ref)
    region = g["box"].copy()
    if phantom_box is not None:
        g["box"] = np.asarray(phantom_box, float)
    sp = ref.spectrum
    e_c = np.asarray(sp.energies_mev, float)
    f = np.asarray(sp.fluence, float)
    lo_e, hi_e = sp.bin_edges_mev[:-1], sp.bin_edges_mev[1:]
    (u0, u1), (v0, v1) = g["u"], g["v"]
    area_cm2 = (u1 - u0) * (v1 - v0) / 100.0
    box = g["box"]
    xe, ye, ze = ref.edges_mm
    tally = np.zeros((ze.size - 1, ye.size - 1, xe.size - 1))
    released = np.zeros(ye.size - 1)
    n_done = 0
    while n_done < n_samples:
        n = min(batch, n_samples - n_done)
        n_done += n
        line = rng.choice(e_c.size, size=n, p=f)
        e = lo_e[line] + rng.random(n) * (hi_e[line] - lo_e[line]) if bins else e_c[line]
        mu = _mu_water(e) / 10.0  # 1/mm
        uu = u0 + rng.random(n) * (u1 - u0)
        vv = v0 + rng.random(n) * (v1 - v0)
        d = np.stack([uu, np.full(n, g["sad"]), vv], axis=1)
        d /= np.linalg.norm(d, axis=1)[:, None]
        cos = d[:, 1]
        w = cos ** 3 * area_cm2 * e  # MeV per photon/cm2 at iso (uniform per solid angle)
        # path in the box from the surface plane (y = surface) to the exit
        p0 = g["src"][None, :] + d * ((g["surface_y"] - g["src"][1]) / d[:, 1])[:, None]
        t_exit = np.full(n, np.inf)
        for a in range(3):
            with np.errstate(divide="ignore", invalid="ignore"):
                t_hi = np.where(d[:, a] > 0, (box[a, 1] - p0[:, a]) / d[:, a], np.inf)
                t_lo = np.where(d[:, a] < 0, (box[a, 0] - p0[:, a]) / d[:, a], np.inf)
            t_exit = np.minimum(t_exit, np.minimum(t_hi, t_lo))
        p_int = -np.expm1(-mu * t_exit)
        s = -np.log1p(-rng.random(n) * p_int) / mu
        w = w * p_int
        pos = p0 + d * s[:, None]
        released += np.histogram(pos[:, 1], bins=ye, weights=w)[0]
        theta, r_cm, dep = sampler.draw(line)
        w = w * dep
        phi = rng.random(n) * 2 * np.pi
        # orthonormal frame around d
        a_ref = np.where(np.abs(d[:, 0:1]) < 0.9, np.array([[1.0, 0, 0]]), np.array([[0, 0, 1.0]]))
        e1 = np.cross(d, a_ref)
        e1 /= np.linalg.norm(e1, axis=1)[:, None]
        e2 = np.cross(d, e1)
        r_mm = 10.0 * r_cm
        disp = (np.cos(theta) * r_mm)[:, None] * d + (np.sin(theta) * r_mm)[:, None] * (
            np.cos(phi)[:, None] * e1 + np.sin(phi)[:, None] * e2)
        q = pos + disp
        inside = np.all((q >= region[:, 0]) & (q <= region[:, 1]), axis=1)
        h, _ = np.histogramdd(np.stack([q[inside, 2], q[inside, 1], q[inside, 0]], axis=1), bins=(ze, ye, xe),
                              weights=w[inside])
        tally += h
    tally *= 1.0 / n_samples
    released *= 1.0 / n_samples / (np.diff(ye) / 10.0)
    per_depth = tally.sum(axis=(0, 2)) / (np.diff(ye) / 10.0)
    return per_depth, tally, released


# --------------------------------------------------------------------------------------------
# engine doses (cached)
# --------------------------------------------------------------------------------------------
def engine_results(ref, kernel, cache: Path | None, tag: str):
    """CCC dose (Gy) on the reference bins, TERMA x k (Gy) on the bins, k and the engine-unit
    dose at the calibration point."""
    from tomodose.dose.calibration import calibration_factor
    from tomodose.dose.engine import engine_kernel
    from tomodose.evaluation.reference import bin_average, engine_dose
    from tomodose.geometry.grid import ImageVolume
    from tomodose.terma.beam_model import BeamModel
    from tomodose.terma.terma import compute_terma

    path = None if cache is None else cache / f"eng_{tag}_{ref.name}.npz"
    if path is not None and path.is_file():
        z = np.load(path)
        return {k: z[k] for k in z.files}
    kern = engine_kernel(kernel)
    bm = BeamModel.ideal(ref.spectrum)
    out = {"collapsed_cone": engine_dose(ref, "collapsed_cone", kernel=kern, progress=False)}
    p = ref.patient()
    tr = compute_terma(p, ref.sequence, bm, progress=False)
    k = calibration_factor("collapsed_cone", beam_model=bm, machine=ref.sequence.machine, kernel=kern)
    out["terma_gy"] = bin_average(ImageVolume(p.grid, tr.total.astype(np.float64) * k, "Gy", "terma"), ref.edges_mm)
    out["k_ccc"] = np.array(k)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **out)
    return out


def print_profiles(ref, mc_to_mev, ccc, tallies, windows=((40.0, 60.0), (90.0, 110.0), (140.0, 160.0))):
    """z profile (central x bin, depth window) of the MC, and CCC / MC and SUP / MC per z bin
    (both sides averaged), in energy per bin (physical units; ``ccc`` is the engine dose on the
    MC's Gy scale, i.e. with the ratio of the two calibrations removed)."""
    xe, ye, ze = ref.edges_mm
    vol = np.einsum("k,j,i->kji", np.diff(ze), np.diff(ye), np.diff(xe)) / 1000.0
    ix = int(np.searchsorted(xe, 0.0, side="right") - 1)
    zc = 0.5 * (ze[1:] + ze[:-1])
    depth_e = ye - ref.analysis["surface_mm"]
    mc_e = ref.dose_gy * ref.density_g_cm3 * vol * mc_to_mev  # MeV per bin per photon/cm2
    fields = {"MC": mc_e}
    if ccc is not None:
        # ccc: engine dose in the MC's Gy scale (calibration ratio removed)
        fields["CCC"] = np.asarray(ccc) * ref.density_g_cm3 * vol * mc_to_mev
    for lo, hi in windows:
        m = (depth_e[:-1] >= lo - 1e-6) & (depth_e[1:] <= hi + 1e-6)
        prof = {}
        for key, arr in list(fields.items()) + [(f"SUP[{k}]", t) for k, t in tallies.items()]:
            p = arr[:, m, ix].sum(axis=1)
            prof[key] = 0.5 * (p + p[::-1])  # both sides
        c = int(np.searchsorted(ze, 0.0, side="right") - 1)
        print(f"  z profile at x bin {xe[ix]:.0f}..{xe[ix + 1]:.0f} mm, depth {lo:.0f}-{hi:.0f} mm: "
              "z (mm) | MC / MC(centre) | ratios to MC")
        for j in range(c, zc.size):
            if zc[j] > 45:
                break
            print(f"   {zc[j]:6.2f}  {prof['MC'][j] / prof['MC'][c]:7.4f}  " + "  ".join(
                f"{key} {prof[key][j] / prof['MC'][j]:.3f}" for key in prof if key != "MC"))


def _fmt(v):
    return " ".join(f"{x:7.4f}" for x in v)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--cases", default=",".join(WATER))
    ap.add_argument("--samples", type=float, default=4e6)
    ap.add_argument("--kernels", default="mono,group,fit")
    ap.add_argument("--engine-cache", type=Path, default=None)
    ap.add_argument("--engine-tag", default="shipped")
    ap.add_argument("--engine-kernel", default=None, help="path of a kernel table for the engine (default shipped)")
    ap.add_argument("--no-engine", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--larger-phantom", action="store_true",
                    help="photons interact in the larger phantom of study_ccc_phantom_size.py (z +-300 mm, "
                         "depth 450 mm); energy tallied in the reference phantom")
    ap.add_argument("--profiles", action="store_true", help="print z profiles at the central x bin")
    ap.add_argument("--within-shell", choices=("volume", "fit"), default="volume")
    args = ap.parse_args(argv)
    global WITHIN_SHELL
    WITHIN_SHELL = args.within_shell

    from tomodose.dose.engine import engine_kernel
    from tomodose.evaluation.reference import load_reference
    from tomodose.transport.kernels import CollapsedConeKernel

    eng_kernel = CollapsedConeKernel.load(args.engine_kernel) if args.engine_kernel else None
    shipped = engine_kernel(None)
    report = {}
    windows_mm = ((10.0, 20.0), (40.0, 60.0), (90.0, 110.0), (140.0, 160.0), (180.0, 200.0))
    for name in args.cases.split(","):
        ref = load_reference(name)
        ye = ref.y_edges_mm
        depth_e = ye - ref.analysis["surface_mm"]
        dc = 0.5 * (depth_e[1:] + depth_e[:-1])
        wd = np.diff(depth_e)

        def win(a, depth_e=depth_e, wd=wd):
            # mean over the depth windows (bin-width weighted): a is per cm of depth
            out = []
            for lo, hi in windows_mm:
                m = (depth_e[:-1] >= lo - 1e-6) & (depth_e[1:] <= hi + 1e-6)
                out.append(float(np.sum(a[m] * wd[m]) / np.sum(wd[m])))
            return np.array(out)

        k_mc = ref.calibration["gy_per_weight_unit"]
        beam_on_s = float(np.sum(ref.sequence.duration_s))
        # weight unit = 1 photon per cm2 at the isocentre per s of beam-on time
        mc_raw = plane_energy(ref, ref.dose_gy) / k_mc / beam_on_s  # Gy g / cm per photon/cm2
        to_mev = 1e-3 / MEV_J  # Gy g = mJ -> MeV
        mc = mc_raw * to_mev  # MeV / cm per photon-per-cm2 at iso
        row = {"windows_mm": windows_mm, "mc_total_mev": float((mc * np.diff(depth_e) / 10).sum())}
        print(f"\n=== {name}: MC deposited {row['mc_total_mev']:.4f} MeV per photon/cm2 at iso", flush=True)
        t_lines = analytic_terma_plane(ref, depth_e, bins=False)
        t_bins = analytic_terma_plane(ref, depth_e, bins=True)
        print("depth windows (mm)       ", " ".join(f"{a:3.0f}-{b:3.0f}" for a, b in windows_mm))
        print("analytic TERMA bins/lines", _fmt(win(t_bins) / win(t_lines)))
        if not args.no_engine:
            eng = engine_results(ref, eng_kernel, args.engine_cache, args.engine_tag)
            k = float(eng["k_ccc"])
            # engine units -> MeV per photon/cm2: dose_units x E_mean(J) x 1000 (Gy) ; dose_gy = units x k
            e_mean_j = ref.spectrum.mean_energy_mev * MEV_J
            conv = e_mean_j * 1000.0 / k * to_mev / beam_on_s
            terma_e = plane_energy(ref, eng["terma_gy"]) * conv
            ccc_e = plane_energy(ref, eng["collapsed_cone"]) * conv
            print("engine TERMA / analytic  ", _fmt(win(terma_e) / win(t_lines)))
            print("CCC / MC (physical units)", _fmt(win(ccc_e) / win(mc)))
            print("CCC / MC (calibrated Gy) ", _fmt(win(plane_energy(ref, eng["collapsed_cone"]))
                                                  / win(plane_energy(ref, ref.dose_gy))))
            phys_over_cal = (conv / (to_mev / k_mc / beam_on_s))
            print(f"engine/MC physical = engine/MC calibrated x {phys_over_cal:.4f} (engine k {k:.5g}, MC k {k_mc:.5g})")
            row["physical_over_calibrated"] = phys_over_cal
            row.update(terma_over_analytic=(win(terma_e) / win(t_lines)).tolist(),
                       ccc_over_mc=(win(ccc_e) / win(mc)).tolist(),
                       ccc_total_mev=float((ccc_e * np.diff(depth_e) / 10).sum()),
                       terma_total_mev=float((terma_e * np.diff(depth_e) / 10).sum()))
            print(f"totals (MeV per photon/cm2): released (engine TERMA) {row['terma_total_mev']:.4f}, "
                  f"CCC deposited {row['ccc_total_mev']:.4f}, MC deposited {row['mc_total_mev']:.4f}")
        tallies = {}
        for kind in args.kernels.split(","):
            t0 = time.process_time()
            if kind.startswith("file:"):
                sampler = KernelSampler("fit", ref.spectrum, CollapsedConeKernel.load(kind[5:]))
            else:
                sampler = KernelSampler(kind, ref.spectrum, shipped)
            big = None
            if args.larger_phantom:
                big = case_geometry(ref)["box"].copy()
                big[1, 1] = big[1, 0] + 450.0
                big[2] = (-300.0, 300.0)
            sup, tally, rel = superpose(ref, sampler, int(args.samples), phantom_box=big)
            if args.profiles:
                tallies[kind] = tally
            print(f"SUP[{kind:5s}] / MC          ", _fmt(win(sup) / win(mc)),
                  f"| total {100 * ((sup * np.diff(depth_e) / 10).sum() / row['mc_total_mev'] - 1):+.2f} %"
                  f" | released/analytic {_fmt(win(rel) / win(t_bins))} ({time.process_time() - t0:.0f} s)",
                  flush=True)
            row[f"sup_{kind}_over_mc"] = (win(sup) / win(mc)).tolist()
            row[f"sup_{kind}_total_mev"] = float((sup * np.diff(depth_e) / 10).sum())
        if args.profiles:
            print_profiles(ref, mc_to_mev=to_mev / k_mc / beam_on_s,
                           ccc=None if args.no_engine else eng["collapsed_cone"] * phys_over_cal,
                           tallies=tallies)
        report[name] = row
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
