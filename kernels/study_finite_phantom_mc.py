#!/usr/bin/env python
"""Study: is the engine's deep excess for long tomotherapy fans a finite-phantom artefact?
(optional: needs ``pip install ompmc``, GPL-3.0, run as a tool, never vendored)

``kernels/study_fan_vs_square_mc.py`` found the collapsed cone's 2.5 x 40 cm fan depth dose
(normalised at 100 mm) +2.1 / +1.2 % above ompMC at 150 / 200 mm in a 440 x 300 x 160 mm water
box, while a 4.375 cm square agreed within 0.4 %. The kernels are infinite-medium kernels; the
box is thin along the couch (160 mm) and narrower than the fan at depth (the 40 cm fan is 49 cm
wide at 200 mm depth). This script computes the central-axis depth dose of the 64-leaf fans
(jaws 25, 50, 10 mm; ideal preset, SSD 850 mm, gantry 0) in

* ``box``: the 440 x 300 x 160 mm box of the earlier study (x across the fan, depth, z along
  the couch);
* ``large``: a 900 x 400 x 500 mm water box (at least 150 mm of water beyond the field on every
  side at 400 mm depth, 200 mm of water behind the 200 mm depth),

with ompMC (the preset of ``validation/generate_mc_references.py``, whose ``beamlets``,
media and calibration it reuses) and with the engine (``compute_dose`` with the collapsed cone
and the pencil beam, :meth:`BeamModel.ideal`, calibrated at ``ReferenceCondition.nominal()``
like :func:`tomodose.evaluation.reference.engine_dose`), averaged over the same tally bins:
on the axis, 10 mm deep, and either 20 x 5 mm (x, z; the bins of the earlier study) or
100 x 10 mm (the dose of the 40 cm fan is flat across them within about 1 %; the wider bin has
10 times the Monte Carlo counts; engine and Monte Carlo are averaged over the same bin, so the
comparison is unchanged by the bin's width to first order).

The Monte Carlo geometry *is* the tally grid (homogeneous water in coarse bins; ompMC's
transport does not depend on where the bin boundaries inside a homogeneous medium are).

Usage::

    # one Monte Carlo run per phantom and jaw (background, log to a file), results to --cache
    OMP_NUM_THREADS=1 nice -n 5 python kernels/study_finite_phantom_mc.py mc --phantom box --jaw 25 \
        --histories 6e6 --cache /tmp/finiteph
    # engines on the same bins, tables, JSON
    nice -n 10 python kernels/study_finite_phantom_mc.py analyse --cache /tmp/finiteph \
        --json kernels/study_finite_phantom_mc.json

Also ``superpose`` (the infinite-medium point-kernel superposition of
``kernels/study_ccc_energy_balance.py`` on the same bins), ``engine --option n_azimuth=16`` (and
``kernel=``, ``line_phases=``, ``tilt=``: engine-only variants) and ``la4`` (the LA4 TPR
residuals of the shipped machine for 8 and 16 azimuthal cones; the GPL table is read at run time).

Results and reading: ``docs/finite_phantom.md`` (the long-fan deep excess is the static collapsed
cone's 8-azimuth ray effect, not a finite-phantom effect).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "validation"))

import generate_mc_references as G  # noqa: E402

from tomodose.evaluation import reference as refmod  # noqa: E402

log = logging.getLogger("study_finite_phantom_mc")

SSD_MM = 850.0
DURATION_S = G.STATIC_DURATION_S  # one static projection; the calibration is per second of it
BIN_MM = 10.0  # depth bin
NORM_MM = 100.0
DEPTHS_MM = (15.0, 30.0, 50.0, 70.0, 100.0, 150.0, 200.0)
#: phantoms: size (x, depth, z) in mm, centred on (0, 0, 0); the surface is at y = -depth / 2
PHANTOMS = {
    "box": (440.0, 300.0, 160.0),
    "large": (900.0, 400.0, 500.0),
    "long_z": (440.0, 300.0, 500.0),  # only the couch axis extended: which side loses the scatter
}
#: tally bins (mm): nested so that the narrow (20 x 5) and the wide (100 x 10) axis bins are sums
X_INNER = (-50.0, -10.0, 10.0, 50.0)
Z_INNER = (-5.0, -2.5, 2.5, 5.0)
AXIS_BINS = {"narrow": ((-10.0, 10.0), (-2.5, 2.5)), "wide": ((-50.0, 50.0), (-5.0, 5.0)),
             "wide_x": ((-50.0, 50.0), (-2.5, 2.5)),  # wide_x: for the 10 mm jaw (field edge at 5.25 mm)
             "fan": ((-220.0, 220.0), (-5.0, 5.0))}  # the whole fan's core (its ends inside above 85 mm)
JAWS = (25.0, 50.0, 10.0)


def surface_y_mm(phantom: str) -> float:
    return -0.5 * PHANTOMS[phantom][1]


def edges_mm(phantom: str):
    """Tally (= Monte Carlo geometry) bin edges (x, y, z) in mm of ``phantom``."""
    sx, sy, sz = PHANTOMS[phantom]
    x = [-sx / 2, *(v for v in (-220.0, 220.0) if abs(v) < sx / 2), *X_INNER]
    z = [-sz / 2, *(v for v in (-80.0, 80.0) if abs(v) < sz / 2), *Z_INNER, sz / 2]
    x.append(sx / 2)
    y0 = surface_y_mm(phantom)
    y = y0 + np.arange(0.0, sy + 1e-9, BIN_MM)
    return np.array(sorted(x)), y, np.array(sorted(z))


def phantom_spec(phantom: str, spacing_mm: float) -> dict:
    return {"builder": "water_box", "kwargs": {"size_mm": list(PHANTOMS[phantom]), "spacing_mm": spacing_mm}}


def fan(jaw_mm: float, phantom: str, machine=None):
    """The 64-leaf static fan at gantry 0, SSD 850 mm on ``phantom``, ``DURATION_S`` long."""
    from tomodose.delivery.machine import TomoMachine
    from tomodose.delivery.plan import ProjectionSequence

    machine = machine or TomoMachine()
    iso = (0.0, surface_y_mm(phantom), 0.0)  # isocentre on the surface: SSD = SAD = 850 mm
    return ProjectionSequence.static_beams([0.0], np.ones(64), DURATION_S, jaw_mm, isocentre_lps_mm=iso,
                                           machine=machine)


def axis_sum(values, edges, which: str, sigma=None):
    """Mass-weighted mean over the axis bin ``which`` ('narrow' or 'wide') per depth bin.

    ``values`` (nz, ny, nx); with ``sigma`` (relative, same shape) also the relative 1-sigma of
    the mean (bins independent)."""
    xe, _, ze = edges
    (x0, x1), (z0, z1) = AXIS_BINS[which]
    ix, iz = refmod.bins_within(xe, x0, x1), refmod.bins_within(ze, z0, z1)
    w = np.diff(ze)[iz][:, None] * np.diff(xe)[ix][None, :]
    sub = values[iz][:, :, ix]
    mean = np.einsum("kji,ki->j", sub, w) / w.sum()
    if sigma is None:
        return mean
    s = sigma[iz][:, :, ix] * sub
    err = np.sqrt(np.einsum("kji,ki->j", s ** 2, w ** 2)) / w.sum()
    return mean, err / np.where(mean > 0, mean, 1.0)


def depth_centres(edges, phantom):
    ye = edges[1]
    return 0.5 * (ye[1:] + ye[:-1]) - surface_y_mm(phantom)


def at_depths(centres, d, depths=DEPTHS_MM):
    return np.interp(depths, centres, d)


def calibration_gy_per_weight() -> float:
    """ompMC Gy per weight unit of the validation references (nominal condition, 8.5 Gy/min)."""
    import h5py

    with h5py.File(refmod.REFERENCE_DIR / "water_j50.h5", "r") as h:
        return float(json.loads(h.attrs["calibration"])["gy_per_weight_unit"])


def atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# --------------------------------------------------------------------------------------------
# Monte Carlo
# --------------------------------------------------------------------------------------------
def run_mc(phantom: str, jaw_mm: float, histories: int, seed: int, cache: Path, tag_seed=None) -> Path:
    """One ompMC run; ``tag_seed``: an additional run (file named by its seed, pooled by the analysis)."""
    import ompmc

    from tomodose.terma.beam_model import BeamModel
    from tomodose.terma.spectrum import default_spectrum

    spectrum = default_spectrum()
    xe, ye, ze = edges_mm(phantom)
    shape = (len(ze) - 1, len(ye) - 1, len(xe) - 1)
    # homogeneous water, the density the engine's water box has (its HU -> density table)
    patient = refmod.build_phantom_from_spec(phantom_spec(phantom, 10.0))
    rho_w = float(np.median(patient.mass_density_volume().array))
    rho = np.full(shape, rho_w)
    mat = G.medium_index(rho)
    geo = ompmc.Geometry(xe / 10, ye / 10, ze / 10, list(G.MEDIA),
                         density=np.asfortranarray(rho.transpose(2, 1, 0)),
                         material=np.asfortranarray(mat.transpose(2, 1, 0)))
    seq = fan(jaw_mm, phantom)
    i_beam, src, corner, side1, side2, w = G.beamlets(seq, BeamModel.ideal(spectrum), 1)
    e = np.asarray(spectrum.bin_edges_mev, float)
    mc_spec = ompmc.Spectrum.from_histogram(e[1:], np.asarray(spectrum.fluence, float), e_min=float(e[0]))
    phys = ompmc.Physics(pegs_file=str(ompmc.data_path() / "pegs4" / f"{G.PEGS}.pegs4dat"),
                         global_ecut=G.ECUT_MEV, global_pcut=G.PCUT_MEV, n_split=G.N_SPLIT, seeds=(seed, 33))
    t0, w0 = time.process_time(), time.time()
    dose, unc = ompmc.calc_forward(geo, ompmc.BeamletSource(i_beam, src, corner, side1, side2), w, mc_spec, phys,
                                   n_histories=int(histories), n_batches=G.N_BATCHES)
    cpu, wall = time.process_time() - t0, time.time() - w0
    dose = np.asarray(dose).transpose(2, 1, 0)  # (nz, ny, nx), Gy for the weights w
    unc = np.asarray(unc).transpose(2, 1, 0)
    path = cache / (f"mc_{phantom}_j{jaw_mm:g}.npz" if tag_seed is None else f"mc_{phantom}_j{jaw_mm:g}_s{seed}.npz")
    atomic_write(path, lambda p: np.savez(open(p, "wb"), dose=dose, unc=unc, x=xe, y=ye, z=ze,
                                          histories=int(histories), seed=seed, cpu_s=cpu, wall_s=wall,
                                          rho=rho_w))
    log.info("%s jaw %g: %d histories, %.0f CPU s (%.0f s wall) -> %s", phantom, jaw_mm, histories, cpu, wall, path)
    c = depth_centres((xe, ye, ze), phantom)
    for which in AXIS_BINS:
        m, s = axis_sum(dose, (xe, ye, ze), which, unc)
        v = at_depths(c, m)
        log.info("  %s D(d)/D(100): %s; sigma %% %s", which,
                 " ".join(f"{x:.4f}" for x in v / v[DEPTHS_MM.index(NORM_MM)]),
                 " ".join(f"{100 * x:.2f}" for x in at_depths(c, s)))
    return path


# --------------------------------------------------------------------------------------------
# engines
# --------------------------------------------------------------------------------------------
def run_engine(phantom: str, jaw_mm: float, engine: str, spacing_mm: float, cache: Path, **options) -> Path:
    """Engine dose (Gy for the fan's ``DURATION_S``) averaged over the tally bins; cached."""
    from tomodose.dose import ReferenceCondition, compute_dose
    from tomodose.terma.beam_model import BeamModel
    from tomodose.terma.spectrum import default_spectrum

    tag = "".join(f"_{k}{v}" for k, v in sorted(options.items()))
    path = cache / f"engine_{engine}_{phantom}_j{jaw_mm:g}_g{spacing_mm:g}{tag}.npz"
    if path.exists():
        return path
    patient = refmod.build_phantom_from_spec(phantom_spec(phantom, spacing_mm))
    edges = edges_mm(phantom)
    t0, w0 = time.process_time(), time.time()
    options = dict(options)
    kernel = None
    if "kernel" in options or "n_azimuth" in options:  # engine-only variants: a shipped table by
        # name, or the azimuthal cones per ring (ray-effect check)
        from tomodose.dose.engine import CCC_KERNEL_NAME
        from tomodose.transport.kernels import load_kernel

        kernel = load_kernel(options.pop("kernel", CCC_KERNEL_NAME), n_azimuth=options.pop("n_azimuth", None))
    res = compute_dose(patient, fan(jaw_mm, phantom), engine, beam_model=BeamModel.ideal(default_spectrum()),
                       kernel=kernel, reference=ReferenceCondition.nominal(), progress=False, **options)
    cpu, wall = time.process_time() - t0, time.time() - w0
    bins = refmod.bin_average(res.per_fraction, edges)
    atomic_write(path, lambda p: np.savez(open(p, "wb"), dose=bins, cpu_s=cpu, wall_s=wall,
                                          shape=np.array(patient.grid.shape), commit=G.git_commit()))
    log.info("%s %s jaw %g grid %g mm %s: %.0f CPU s (%.0f s wall)", engine, phantom, jaw_mm, spacing_mm,
             patient.grid.shape, cpu, wall)
    return path


# --------------------------------------------------------------------------------------------
# exact point-kernel superposition (per spectral line; kernels/study_ccc_energy_balance.py)
# --------------------------------------------------------------------------------------------
def run_superposition(phantom: str, jaw_mm: float, kind: str, n_samples: int, seed: int, cache: Path) -> Path:
    """Infinite-medium point-kernel superposition by sampling (``kind`` 'mono': every spectral
    line its own tabulated kernel; 'group' / 'fit': the engine's energy-group kernels, tabulated
    or fitted), tallied on the study's bins in energy per unit mass (arbitrary units: compare
    normalised curves). Interactions and deposits inside ``phantom`` only."""
    from types import SimpleNamespace

    sys.path.insert(0, str(ROOT / "kernels"))
    import study_ccc_energy_balance as EB

    from tomodose.dose.engine import engine_kernel
    from tomodose.terma.spectrum import default_spectrum

    spectrum = default_spectrum()
    edges = edges_mm(phantom)
    ref = SimpleNamespace(sequence=fan(jaw_mm, phantom), spectrum=spectrum, edges_mm=edges,
                          analysis={"surface_mm": surface_y_mm(phantom)})
    sampler = EB.KernelSampler(kind, spectrum, None if kind == "mono" else engine_kernel())
    t0 = time.process_time()
    _, tally, _ = EB.superpose(ref, sampler, n_samples, seed=seed)
    cpu = time.process_time() - t0
    xe, ye, ze = edges
    vol = np.einsum("k,j,i->kji", np.diff(ze), np.diff(ye), np.diff(xe))
    dose = tally / vol  # MeV per mm3 (water): proportional to dose
    path = cache / f"sup_{kind}_{phantom}_j{jaw_mm:g}_s{seed}.npz"
    atomic_write(path, lambda p: np.savez(open(p, "wb"), dose=dose, samples=n_samples, cpu_s=cpu))
    log.info("superposition %s %s jaw %g: %d samples, %.0f CPU s", kind, phantom, jaw_mm, n_samples, cpu)
    return path


# --------------------------------------------------------------------------------------------
# LA4 TPR of the shipped machine with 8 and more azimuthal cones (issue 8)
# --------------------------------------------------------------------------------------------
def la4_tpr_azimuths(n_azimuths=(8, 16), shared_data=ROOT.parent / "shared" / "data") -> dict:
    """Engine / LA4 - 1 (%) of the 64-leaf fans' TPR (``kernels/commission_la4.py``'s geometry and
    fields, the shipped machine: :meth:`BeamModel.default`, the engine's kernel table) for each
    number of azimuthal cones per ring. The LA4 table (GPL) is read at run time, never stored."""
    sys.path.insert(0, str(ROOT / "kernels"))
    import commission_la4 as C

    from tomodose.dose.engine import CCC_KERNEL_NAME
    from tomodose.terma.beam_model import BeamModel
    from tomodose.transport.kernels import load_kernel

    la4 = C.read_la4(shared_data)
    beam = BeamModel.default()
    out = {"depths_cm": list(C.TPR_FIT_DEPTHS_CM), "fields": [list(f) for f in C.TPR_FIELDS], "by_n_azimuth": {}}
    for n in n_azimuths:
        t0 = time.process_time()
        cmp = C.tpr_comparison(beam, load_kernel(CCC_KERNEL_NAME, n_azimuth=n), la4)
        res = {f"jaw {jaw} x {k} leaves (eq. sq. {sq:.2f} cm)": (100.0 * (e / r - 1.0)).tolist()
               for (jaw, k), (e, r, sq) in cmp.items()}
        out["by_n_azimuth"][str(n)] = {"engine_over_la4_pct": res, "cpu_s": time.process_time() - t0}
        for key, v in res.items():
            log.info("n_azimuth %d, %s: engine / LA4 - 1 (%%) %s", n, key, " ".join(f"{x:+.2f}" for x in v))
    return out


# --------------------------------------------------------------------------------------------
# analysis
# --------------------------------------------------------------------------------------------
def interp_with_sigma(centres, values, abs_sigma, depth):
    """Linear interpolation at ``depth`` of independent bins, with its 1-sigma."""
    i = int(np.clip(np.searchsorted(centres, depth) - 1, 0, len(centres) - 2))
    t = (depth - centres[i]) / (centres[i + 1] - centres[i])
    v = (1 - t) * values[i] + t * values[i + 1]
    s = np.hypot((1 - t) * abs_sigma[i], t * abs_sigma[i + 1])
    return float(v), float(s)


def curve_summary(centres, mean, rel_sigma=None, depths=DEPTHS_MM):
    """Values at ``depths`` absolute and normalised at NORM_MM, with relative 1-sigma (MC)."""
    sig = np.zeros_like(mean) if rel_sigma is None else rel_sigma * mean
    v, s = zip(*(interp_with_sigma(centres, mean, sig, d) for d in (*depths, NORM_MM)))
    v, s = np.array(v), np.array(s)
    rel = s / v
    norm = v[:-1] / v[-1]
    norm_rel = np.hypot(rel[:-1], rel[-1])
    norm_rel[np.isclose(depths, NORM_MM)] = 0.0
    out = {"abs": v[:-1].tolist(), "norm": norm.tolist()}
    if rel_sigma is not None:
        out["abs_rel_sigma"] = rel[:-1].tolist()
        out["norm_rel_sigma"] = norm_rel.tolist()
    return out


def pct(a, b):
    return (100.0 * (np.asarray(a) / np.asarray(b) - 1.0)).tolist()


def pct_sigma(ra, rb):
    return (100.0 * np.hypot(np.asarray(ra), np.asarray(rb))).tolist()


def load_mc(cache: Path, phantom: str, jaw: float):
    """The Monte Carlo runs of (phantom, jaw) (``mc_<phantom>_j<jaw>[_s<seed>].npz``) pooled by
    their histories (independent seeds): dose, relative 1-sigma, edges; None if there is none."""
    files = sorted(cache.glob(f"mc_{phantom}_j{jaw:g}.npz")) + sorted(cache.glob(f"mc_{phantom}_j{jaw:g}_s*.npz"))
    if not files:
        return None
    runs = [dict(np.load(f)) for f in files]
    n = np.array([int(r["histories"]) for r in runs], float)
    dose = sum(w * r["dose"] for w, r in zip(n, runs)) / n.sum()
    var = sum((w * r["dose"] * r["unc"]) ** 2 for w, r in zip(n, runs)) / n.sum() ** 2
    unc = np.sqrt(var) / np.where(dose > 0, dose, 1.0)
    r0 = runs[0]
    return {"dose": dose, "unc": unc, "x": r0["x"], "y": r0["y"], "z": r0["z"], "histories": int(n.sum()),
            "cpu_s": float(sum(float(r["cpu_s"]) for r in runs)),
            "runs": [{"histories": int(r["histories"]), "seed": int(r["seed"]), "cpu_s": float(r["cpu_s"])} for r in runs]}


def analyse(cache: Path) -> dict:
    k = calibration_gy_per_weight()
    out = {"depths_mm": list(DEPTHS_MM), "normalisation_depth_mm": NORM_MM, "phantoms_mm": PHANTOMS,
           "axis_bins_mm": {n: {"x": list(b[0]), "z": list(b[1])} for n, b in AXIS_BINS.items()},
           "depth_bin_mm": BIN_MM, "ssd_mm": SSD_MM, "duration_s": DURATION_S,
           "mc_gy_per_weight_unit": k,
           "units": "abs: Gy for the 60 s static fan (engine calibrated at ReferenceCondition.nominal(), the Monte "
                    "Carlo by the validation references' calibration); norm: D(d)/D(100 mm)",
           "jaws": {}}
    for jaw in JAWS:
        jd = {"phantoms": {}}
        for ph in PHANTOMS:
            mc = load_mc(cache, ph, jaw)
            if mc is None:
                continue
            edges = (mc["x"], mc["y"], mc["z"])
            c = depth_centres(edges, ph)
            pd = {"mc_histories": int(mc["histories"]), "mc_cpu_s": float(mc["cpu_s"]), "mc_runs": mc["runs"],
                  "bins": {}, "engine_cpu_s": {}}
            engines = {}
            for f in sorted(cache.glob(f"engine_*_{ph}_j{jaw:g}_g*.npz")):
                name = f.stem.split(f"_{ph}_")[0].removeprefix("engine_")
                g, _, variant = f.stem.split(f"_{ph}_j{jaw:g}_g")[1].partition("_")
                label = f"{name} {float(g):g} mm" + (f" ({variant})" if variant else "")
                e = np.load(f)
                engines[label] = e["dose"]
                pd["engine_cpu_s"][label] = float(e["cpu_s"])
                if "commit" in e:
                    pd.setdefault("engine_commit", {})[label] = str(e["commit"])
            for which in AXIS_BINS:
                m, s = axis_sum(mc["dose"] * k, edges, which, mc["unc"])
                bd = {"mc": curve_summary(c, m, s)}
                bd["mc_curve"] = {"depth_mm": c.tolist(), "gy": m.tolist(), "rel_sigma": s.tolist()}
                for label, dose in engines.items():
                    es = curve_summary(c, axis_sum(dose, edges, which))
                    es["engine_over_mc_norm_pct"] = pct(es["norm"], bd["mc"]["norm"])
                    es["engine_over_mc_abs_pct"] = pct(es["abs"], bd["mc"]["abs"])
                    bd[label] = es
                sups = {}
                for f in sorted(cache.glob(f"sup_*_{ph}_j{jaw:g}_s*.npz")):
                    # superposition by sampling (runs of several seeds pooled by their samples):
                    # arbitrary units, normalised curves only
                    z = np.load(f)
                    acc = sups.setdefault(f.stem.split("_")[1], [0.0, 0])
                    acc[0] = acc[0] + z["dose"] * int(z["samples"])
                    acc[1] += int(z["samples"])
                for kind, (tot, n) in sups.items():
                    es = curve_summary(c, axis_sum(tot / n, edges, which))
                    del es["abs"]
                    es["engine_over_mc_norm_pct"] = pct(es["norm"], bd["mc"]["norm"])
                    bd[f"superposition {kind}"] = es
                    pd.setdefault("superposition_samples", {})[kind] = n
                pd["bins"][which] = bd
            jd["phantoms"][ph] = pd
        # the finite-phantom effect: large (or long_z) / box
        for ph in ("large", "long_z"):
            if ph not in jd["phantoms"] or "box" not in jd["phantoms"]:
                continue
            eff = {}
            for which in AXIS_BINS:
                a, b = jd["phantoms"][ph]["bins"][which], jd["phantoms"]["box"]["bins"][which]
                e = {"mc_norm_pct": pct(a["mc"]["norm"], b["mc"]["norm"]),
                     "mc_norm_sigma_pct": pct_sigma(a["mc"]["norm_rel_sigma"], b["mc"]["norm_rel_sigma"]),
                     "mc_abs_pct": pct(a["mc"]["abs"], b["mc"]["abs"]),
                     "mc_abs_sigma_pct": pct_sigma(a["mc"]["abs_rel_sigma"], b["mc"]["abs_rel_sigma"])}
                for key in a:
                    if key in b and key not in ("mc", "mc_curve"):
                        e[f"{key} norm_pct"] = pct(a[key]["norm"], b[key]["norm"])
                        if "abs" in a[key]:
                            e[f"{key} abs_pct"] = pct(a[key]["abs"], b[key]["abs"])
                eff[which] = e
            jd[f"{ph}_over_box"] = eff
        if jd["phantoms"]:
            out["jaws"][f"{jaw:g}"] = jd
    return out


def main_bin(jaw) -> str:
    """The axis bin of the tables: 100 x 10 mm, 100 x 5 mm for the 10 mm jaw (its field edge is
    at 5.25 mm: a 10 mm bin would average the penumbra)."""
    return "wide_x" if float(jaw) <= 10.0 else "wide"


def print_tables(res: dict, which: str = "auto") -> None:
    """Markdown tables of ``analyse``'s result (stdout: this is a study script's report)."""
    dep = res["depths_mm"]
    auto = which == "auto"
    head = "| | " + " | ".join(f"{d:g} mm" for d in dep) + " |\n|---|" + "---|" * len(dep)
    for jaw, jd in res["jaws"].items():
        which = main_bin(jaw) if auto else which
        print(f"\n### jaw {jaw} mm, {which} axis bin\n\nengine / MC - 1 (%), normalised at 100 mm; MC 1-sigma\n")
        print(head)
        for ph, pd in jd["phantoms"].items():
            b = pd["bins"][which]
            print(f"| {ph}: MC 1-sigma | " + " | ".join(f"{100 * v:.2f}" for v in b["mc"]["norm_rel_sigma"]) + " |")
            for key, v in b.items():
                if key.startswith(("collapsed", "pencil", "superposition")):
                    print(f"| {ph}: {key} | " + " | ".join(f"{x:+.2f}" for x in v["engine_over_mc_norm_pct"]) + " |")
        print("\nengine / MC - 1 (%), absolute (Gy per unit weight, nominal calibration)\n")
        print(head)
        for ph, pd in jd["phantoms"].items():
            b = pd["bins"][which]
            print(f"| {ph}: MC 1-sigma | " + " | ".join(f"{100 * v:.2f}" for v in b["mc"]["abs_rel_sigma"]) + " |")
            for key, v in b.items():
                if key.startswith(("collapsed", "pencil")):
                    print(f"| {ph}: {key} | " + " | ".join(f"{x:+.2f}" for x in v["engine_over_mc_abs_pct"]) + " |")
        for ph in ("large", "long_z"):
            eff = jd.get(f"{ph}_over_box", {}).get(which)
            if not eff:
                continue
            print(f"\n{ph} / box - 1 (%)\n")
            print(head)
            for key in ("mc_norm", "mc_abs"):
                print(f"| {key} | " + " | ".join(f"{v:+.2f} ({s:.2f})" for v, s in zip(eff[key + '_pct'],
                                                                                 eff[key + '_sigma_pct'])) + " |")
            for key, v in eff.items():
                if key.startswith(("collapsed", "pencil")):
                    print(f"| {key} | " + " | ".join(f"{x:+.2f}" for x in v) + " |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("mc", help="one ompMC run")
    p.add_argument("--phantom", choices=tuple(PHANTOMS), required=True)
    p.add_argument("--jaw", type=float, choices=JAWS, required=True)
    p.add_argument("--histories", type=float, default=6e6)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--cache", type=Path, default=Path("/tmp/finiteph"))
    p = sub.add_parser("engine", help="one engine run on the tally bins")
    p.add_argument("--phantom", choices=tuple(PHANTOMS), required=True)
    p.add_argument("--jaw", type=float, choices=JAWS, required=True)
    p.add_argument("--engine", choices=("collapsed_cone", "pencil_beam"), default="collapsed_cone")
    p.add_argument("--spacing", type=float, default=5.0)
    p.add_argument("--option", action="append", default=[],
                   help="engine option key=value (int/float parsed), or kernel=<shipped table name>")
    p.add_argument("--cache", type=Path, default=Path("/tmp/finiteph"))
    p = sub.add_parser("superpose", help="point-kernel superposition by sampling on the tally bins")
    p.add_argument("--phantom", choices=tuple(PHANTOMS), required=True)
    p.add_argument("--jaw", type=float, choices=JAWS, required=True)
    p.add_argument("--kind", choices=("mono", "group", "fit"), default="mono")
    p.add_argument("--samples", type=float, default=2e7)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--cache", type=Path, default=Path("/tmp/finiteph"))
    p = sub.add_parser("la4", help="LA4 TPR residuals of the shipped machine, 8 vs 16 azimuths")
    p.add_argument("--azimuths", default="8,16")
    p.add_argument("--out", type=Path, default=Path("/tmp/finiteph/la4_tpr.json"))
    p = sub.add_parser("analyse", help="tables and JSON from the cached runs")
    p.add_argument("--cache", type=Path, default=Path("/tmp/finiteph"))
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--bins", choices=("auto", *AXIS_BINS), default="auto")
    p.add_argument("--la4", type=Path, default=None, help="the JSON of the la4 subcommand, merged into --json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.cmd == "mc":
        seed = args.seed if args.seed is not None else 3100 + 10 * JAWS.index(args.jaw) + tuple(PHANTOMS).index(
            args.phantom)
        run_mc(args.phantom, args.jaw, int(args.histories), seed, args.cache,
               tag_seed=None if args.seed is None else args.seed)
    elif args.cmd == "engine":
        opts = {}
        for item in args.option:
            key, _, val = item.partition("=")
            for conv in (int, float, str):
                try:
                    opts[key] = conv(val)
                    break
                except ValueError:
                    continue
        run_engine(args.phantom, args.jaw, args.engine, args.spacing, args.cache, **opts)
    elif args.cmd == "superpose":
        run_superposition(args.phantom, args.jaw, args.kind, int(args.samples), args.seed, args.cache)
    elif args.cmd == "la4":
        res = la4_tpr_azimuths(tuple(int(v) for v in args.azimuths.split(",")))
        atomic_write(args.out, lambda p: Path(p).write_text(json.dumps(res, indent=1), encoding="utf-8"))
    elif args.cmd == "analyse":
        res = analyse(args.cache)
        if args.la4 and args.la4.exists():
            res["la4_tpr"] = json.loads(args.la4.read_text(encoding="utf-8"))
        print_tables(res, args.bins)
        if args.json:
            atomic_write(args.json, lambda p: Path(p).write_text(json.dumps(res, indent=1), encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
