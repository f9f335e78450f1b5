"""Commission the default tomotherapy machine against the CheckTomo "LA4" beam tables.

The LA4 tables (``../shared/data/tomotherapy/checktomo_LA4``, GPL-3.0, one clinical Hi-Art
class unit; see the README there) are **read at run time only** — nothing from them is copied
into this repository. What this script writes are the project's *own fitted parameters* of the
analytic beam model (``tomodose/data/machines/*.json``) and an agreement report.

Every engine number below is computed with tomodose itself: polyenergetic TERMA
(:func:`tomodose.terma.compute_terma`) of a static beam (gantry 0) on a water phantom, then the
collapsed-cone transport with a kernel derived for the candidate spectrum from the EDKnrc
mono-energetic kernels (the same recipe as ``kernels/derive_ccc_kernels.py``, done in memory).

Quantities compared (LA4 section -> our geometry):

* ``[TPRdata]`` tissue-phantom ratio, normalised at 10 cm: detector on the central axis at the
  isocentre (SAD 85 cm), ``d`` cm of water above it (surface at SSD = 85 - d), full backscatter
  (10 cm of water below). Equivalent square ``s = 2 L W / (L + W)`` realised as the tomotherapy
  field jaw ``L`` x MLC-open width ``W``.
* ``[SPdata]`` output factor vs MLC-open width per jaw, normalised to the 5 cm jaw x 40 cm
  field: dose at 1.5 cm depth, SSD 85 cm (the CheckTomo reference condition).
* ``[OARXOPENdata]`` transverse off-axis ratio of the open fan vs fan angle at 1.5/5/10/20 cm.
* ``[OARYdata]`` longitudinal (jaw) profiles, ``[OARXLEAVESdata]`` MLC-edge profiles.

Fits, in order (each stage keeps the parameters of the previous ones):

1. **spectrum**: electron kinetic energy ``T0`` of the thick-target Schiff model
   (``kernels/derive_spectrum.py``) against TPR beyond d_max (depths 3-25 cm, three fields);
2. **output factors**: phantom scatter comes from the engine; the residual is fitted as the
   head-scatter term of :class:`~tomodose.terma.beam_model.BeamModel`;
3. **transverse off-axis fluence** (FFF cone coefficients) and off-axis softening;
4. **jaw penumbra / FWHM** per jaw; 5. **leaf-edge sigma**.

Usage::

    python kernels/commission_la4.py [--shared-data ../shared/data] [--stages spectrum,...]
        [--write-spectrum] [--write-machine] [--report docs/commissioning.md]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tomodose.delivery.machine import TomoMachine  # noqa: E402
from tomodose.delivery.plan import ProjectionSequence  # noqa: E402
from tomodose.geometry.grid import Grid, ImageVolume  # noqa: E402
from tomodose.geometry.patient import PatientModel  # noqa: E402
from tomodose.terma.beam_model import BeamModel  # noqa: E402
from tomodose.terma.spectrum import Spectrum  # noqa: E402

log = logging.getLogger("commission_la4")

LA4_REL = "tomotherapy/checktomo_LA4"
EDK_REL = "dose_physics/kernels/edknrc_mono_water_conehead.csv"
MU_REL = "dose_physics/attenuation/nist_xaamdi_water.csv"
JAWS_MM = (10, 25, 50)
LEAF_MM = 6.25


# --------------------------------------------------------------------------------------------
# LA4 reader (run time only; never copied)
# --------------------------------------------------------------------------------------------
def _sections(path: Path) -> dict[str, list[float]]:
    """All numbers of every ``[NAME]`` section of one LA4 file, in reading order."""
    out: dict[str, list[float]] = {}
    name = None
    for raw in path.read_text(encoding="latin-1").splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("["):
            name = line.split("]")[0].strip("[").strip()
            out[name] = []
            continue
        if name is None:
            continue
        out[name].extend(float(t) for t in line.replace("\t", " ").split() if t)
    return out


class _Reader:
    def __init__(self, values):
        self.v = values
        self.i = 0

    def take(self, n=None):
        if n is None:
            x = self.v[self.i]
            self.i += 1
            return x
        a = np.asarray(self.v[self.i:self.i + n], dtype=float)
        if a.size != n:
            raise ValueError(f"LA4 section ended early: wanted {n} values at {self.i}, got {a.size}")
        self.i += n
        return a


def read_la4_file(path) -> dict:
    """Parse one ``LA4data<jaw>.txt`` into arrays (layout: the README of the LA4 folder).

    Returns
    -------
    dict with ``tpr`` (depths_cm, sizes_cm, table [depth, size]), ``sp`` (widths_cm, values),
    ``oarx_open`` (depths_cm, angle_rad, table [angle, depth]), ``oarx_leaves`` (n_open list,
    depths_cm, angle_rad, tables [width][angle, depth]), ``oary`` (mlc_widths_cm, depths_cm,
    angle_rad, tables [width][angle, depth]).
    """
    s = _sections(Path(path))
    r = _Reader(s["TPRdata"])
    nd = int(r.take()); depths = r.take(nd)
    ns = int(r.take()); sizes = r.take(ns)
    tpr = r.take(nd * ns).reshape(nd, ns)
    r = _Reader(s["SPdata"])
    n = int(r.take()); widths = r.take(n); sp = r.take(n)
    r = _Reader(s["OARXOPENdata"])
    nd = int(r.take()); xd = r.take(nd); ni = int(r.take())
    oarx = r.take(ni * nd).reshape(ni, nd)
    r = _Reader(s["OARXLEAVESdata"])
    nw = int(r.take()); lw = r.take(nw); nd = int(r.take()); ld = r.take(nd)
    ni = int(r.take()); li = r.take(ni)
    leaves = [r.take(ni * nd).reshape(ni, nd) for _ in range(nw)]
    r = _Reader(s["OARYdata"])
    nw = int(r.take()); yw = r.take(nw); nd = int(r.take()); yd = r.take(nd)
    ni = int(r.take()); yi = r.take(ni)
    oary = [r.take(ni * nd).reshape(ni, nd) for _ in range(nw)]
    return {
        "tpr": {"depths_cm": depths, "sizes_cm": sizes, "table": tpr},
        "sp": {"widths_cm": widths, "values": sp},
        "oarx_open": {"depths_cm": xd, "angle_rad": 0.005 * np.arange(oarx.shape[0]), "table": oarx},
        "oarx_leaves": {"n_open": lw.astype(int).tolist(), "depths_cm": ld, "angle_rad": 0.001 * li,
                        "tables": leaves},
        "oary": {"mlc_widths_cm": yw, "depths_cm": yd, "angle_rad": 0.001 * yi, "tables": oary},
    }


def read_la4(shared_data) -> dict[int, dict]:
    """The three LA4 files (jaw 10, 25, 50 mm) under ``shared_data``."""
    folder = Path(shared_data) / LA4_REL
    if not folder.is_dir():
        raise FileNotFoundError(f"shared_data must contain {LA4_REL}, got {str(shared_data)!r}")
    return {j: read_la4_file(folder / f"LA4data{j}.txt") for j in JAWS_MM}


def la4_tpr(la4: dict, size_cm: float, depths_cm) -> np.ndarray:
    """LA4 TPR at ``depths_cm`` for equivalent square ``size_cm`` (linear in depth, exact column
    when the size is tabulated, else linear in size)."""
    t = la4[50]["tpr"]
    cols = np.array([np.interp(depths_cm, t["depths_cm"], t["table"][:, k]) for k in range(t["sizes_cm"].size)])
    return np.array([np.interp(size_cm, t["sizes_cm"], cols[:, n]) for n in range(cols.shape[1])])


def equivalent_square_cm(jaw_cm: float, width_cm: float) -> float:
    return 2.0 * jaw_cm * width_cm / (jaw_cm + width_cm)


# --------------------------------------------------------------------------------------------
# engine geometry
# --------------------------------------------------------------------------------------------
def open_leaves(n_open: int, n_leaves: int = 64) -> np.ndarray:
    """Leaf-open fractions with ``n_open`` central leaves open (odd: one more right of centre)."""
    lof = np.zeros(n_leaves)
    lo = n_leaves // 2 - n_open // 2
    lof[lo:lo + n_open] = 1.0
    return lof


def field_centre_x_mm(n_open: int) -> float:
    """Centre of the open leaf group (mm, isocentre plane)."""
    return 0.5 * LEAF_MM if n_open % 2 else 0.0


def water_dose(beam, kernel, jaw_mm, lof, ssd_mm, *, max_depth_mm, half_x_mm, half_z_mm,
               spacing_mm=(5.0, 2.5, 2.5), machine=None):
    """Dose of one static beam (gantry 0) on a water slab; returns (dose, grid).

    The slab's entrance surface is the plane y = 0 (the source is anterior, -y), the isocentre
    is on the central axis at depth ``sad - ssd``.
    """
    from tomodose.dose.engine import _engine_dose

    machine = machine or TomoMachine()
    dx, dy, dz = spacing_mm
    grid = Grid.from_extent((-half_x_mm, dy / 2, -half_z_mm), (half_x_mm, max_depth_mm - dy / 2, half_z_mm),
                            (dx, dy, dz))
    water = PatientModel(ImageVolume(grid, np.zeros(grid.shape, np.float32), "HU"), name="water")
    iso = (0.0, machine.sad_mm - ssd_mm, 0.0)
    seq = ProjectionSequence.static_beams([0.0], np.asarray(lof)[None], 1.0, float(jaw_mm),
                                          isocentre_lps_mm=iso, machine=machine)
    dose = _engine_dose("collapsed_cone", water, seq, beam_model=beam, kernel=kernel, progress=False)
    return dose.astype(np.float64), grid


def sample(dose, grid, points_lps):
    kji = grid.lps_to_index(np.asarray(points_lps, dtype=float))
    return ndimage.map_coordinates(dose, kji.T, order=1, mode="nearest")


def _half_x(n_open):
    return min(0.5 * n_open * LEAF_MM + 60.0, 215.0)


def point_dose(beam, kernel, jaw_mm, n_open, ssd_mm, depth_mm, *, back_mm=100.0, dx=None, dy=2.5, dz=None):
    """Central-axis dose at ``depth_mm`` below a surface at ``ssd_mm`` (field centre in x).

    Voxels: 2.5 mm along the beam; across the jaws 2 mm (jaw 10) or 2.5 mm; across the leaves
    5 mm, refined to a fifth of the open width (>= 1.25 mm) for narrow MLC fields."""
    dz = dz or (2.0 if jaw_mm <= 10 else 2.5)
    dx = dx or float(np.clip(n_open * LEAF_MM / 5.0, 1.25, 5.0))
    dose, grid = water_dose(beam, kernel, jaw_mm, open_leaves(n_open), ssd_mm, max_depth_mm=depth_mm + back_mm,
                            half_x_mm=_half_x(n_open), half_z_mm=0.5 * jaw_mm + 40.0, spacing_mm=(dx, dy, dz))
    return float(sample(dose, grid, [[field_centre_x_mm(n_open), depth_mm, 0.0]])[0])


def engine_tpr(beam, kernel, jaw_mm, n_open, depths_cm, *, norm_cm=10.0, sad_mm=850.0, **kw):
    """TPR (detector at the isocentre, ``d`` cm of water above it) normalised at ``norm_cm``."""
    vals = {}
    for d in sorted(set(float(x) for x in depths_cm) | {norm_cm}):
        vals[d] = point_dose(beam, kernel, jaw_mm, n_open, sad_mm - 10.0 * d, 10.0 * d, **kw)
    return np.array([vals[float(d)] / vals[norm_cm] for d in depths_cm])


# --------------------------------------------------------------------------------------------
# spectrum and kernel for a candidate
# --------------------------------------------------------------------------------------------
def _load_script(name):
    spec = importlib.util.spec_from_file_location(f"_tomodose_{name}", ROOT / "kernels" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def model_spectrum(t0_mev: float, w_mm: float = 1.0, cu_mm: float = 1.5) -> Spectrum:
    """Spectrum of the thick-target Schiff model of ``kernels/derive_spectrum.py`` (0.25 MeV bins)."""
    ds = _load_script("derive_spectrum")
    edges = ds.spectrum_bin_edges(t0_mev)
    counts = ds.bin_spectrum(t0_mev, [("W", w_mm / 10.0), ("Cu", cu_mm / 10.0)], edges)
    return Spectrum(0.5 * (edges[1:] + edges[:-1]), counts, edges,
                    f"Schiff thick target T0={t0_mev:g} MeV W {w_mm:g} mm Cu {cu_mm:g} mm")


_MONO = {}


def kernel_for_spectrum(spectrum: Spectrum, shared_data, name="commissioning"):
    """Collapsed-cone kernel for ``spectrum`` by the recipe of ``kernels/derive_ccc_kernels.py``
    (same rings, azimuths and number of exponential terms as the shipped default kernel)."""
    from tomodose.transport.kernels import (collapse_kernel, load_kernel, polyenergetic_kernel, read_edk_csv,
                                            terma_weights)

    key = str(shared_data)
    if key not in _MONO:
        table = read_edk_csv(Path(shared_data) / EDK_REL)
        mu_e, mu_v = _read_mu(Path(shared_data) / MU_REL)
        _MONO[key] = (table, mu_e, mu_v)
    table, mu_e, mu_v = _MONO[key]
    ref = load_kernel()
    step = float(table.theta_edges_deg[1] - table.theta_edges_deg[0])
    groups = [int(round(e / step)) for e in ref.polar_edges_deg]
    w = terma_weights(table.energies_mev, spectrum.energies_mev, spectrum.fluence, mu_e, mu_v)
    fine = polyenergetic_kernel(table, w)
    return collapse_kernel(fine, table.theta_edges_deg, table.radius_edges_cm, polar_group_edges=groups,
                           n_azimuth=ref.n_azimuth, n_terms=ref.n_terms, name=name,
                           provenance={"spectrum": spectrum.name})


def _read_mu(path):
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        s = line.strip()
        if not s or s.startswith("#") or s[0].isalpha():
            continue
        rows.append([float(v) for v in s.split(",")[:2]])
    a = np.asarray(rows)
    _, idx = np.unique(a[:, 0], return_index=True)
    a = a[np.sort(idx)]
    return a[:, 0], a[:, 1]


# --------------------------------------------------------------------------------------------
# stage 1: spectrum vs TPR
# --------------------------------------------------------------------------------------------
#: fields of the TPR fit: (jaw mm, open leaves); equivalent squares 8.89, 4.71, 1.95 cm
TPR_FIELDS = ((50, 64), (25, 64), (10, 64))
TPR_FIT_DEPTHS_CM = (3.0, 5.0, 7.0, 15.0, 20.0, 25.0)


def tpr_comparison(beam, kernel, la4, fields=TPR_FIELDS, depths_cm=TPR_FIT_DEPTHS_CM):
    """{(jaw, n_open): (engine TPR, LA4 TPR, equivalent square)}."""
    out = {}
    for jaw, n in fields:
        s = equivalent_square_cm(jaw / 10.0, n * LEAF_MM / 10.0)
        out[(jaw, n)] = (engine_tpr(beam, kernel, jaw, n, depths_cm), la4_tpr(la4, s, depths_cm), s)
    return out


def tpr_rms(cmp) -> float:
    d = np.concatenate([e / r - 1.0 for e, r, _ in cmp.values()])
    return float(np.sqrt(np.mean(d * d)))


# --------------------------------------------------------------------------------------------
# stage 2: output factors
# --------------------------------------------------------------------------------------------
OF_DEPTH_CM = 10.0


def la4_output_factors(la4, jaw_mm):
    """(n_open leaves, LA4 Sp) of one jaw (normalised to jaw 50 x 40 cm)."""
    sp = la4[jaw_mm]["sp"]
    n = np.rint(sp["widths_cm"] * 10.0 / LEAF_MM).astype(int)
    return n, sp["values"]


def engine_output_factors(beam, kernel, la4, jaws=JAWS_MM, n_select=None, *, depth_cm=OF_DEPTH_CM, **kw):
    """{jaw: (n_open, engine OF, LA4 OF)}: dose on the central axis of the open leaves at the
    isocentre under ``depth_cm`` of water (the TPR geometry, where CheckTomo applies Sp), relative
    to jaw 50 mm x 64 leaves."""
    d_mm = 10.0 * depth_cm
    ref = point_dose(beam, kernel, 50, 64, 850.0 - d_mm, d_mm, **kw)
    out = {}
    for jaw in jaws:
        n_all, la = la4_output_factors(la4, jaw)
        keep = [i for i, n in enumerate(n_all) if n_select is None or n in n_select]
        eng = np.array([point_dose(beam, kernel, jaw, int(n_all[i]), 850.0 - d_mm, d_mm, **kw) / ref
                        if not (jaw == 50 and n_all[i] == 64) else 1.0 for i in keep])
        out[jaw] = (n_all[keep], eng, la[keep])
    return out


# --------------------------------------------------------------------------------------------
# stage 3: transverse off-axis fluence of the open fan
# --------------------------------------------------------------------------------------------
OARX_MAX_RAD = 0.215  # inside the fan edge (0.235 rad) and its penumbra
OARX_POWERS = (1, 2, 3, 4)


def open_fan_profiles(beam, kernel, depths_cm, angles_rad, *, ssd_mm=850.0, dx=5.0, dy=2.5, dz=2.5):
    """Dose of the open fan (jaw 50 mm, 64 leaves, gantry 0, SSD ``ssd_mm``) at fan angles
    ``angles_rad`` (x = (SSD + d) tan(theta)) and depths ``depths_cm``: array (n_depths, n_angles)."""
    dmax = 10.0 * max(depths_cm) + 80.0
    half_x = (ssd_mm + dmax) * np.tan(0.25) + 10.0
    dose, grid = water_dose(beam, kernel, 50, np.ones(64), ssd_mm, max_depth_mm=dmax, half_x_mm=half_x,
                            half_z_mm=65.0, spacing_mm=(dx, dy, dz))
    out = np.empty((len(depths_cm), len(angles_rad)))
    for i, d in enumerate(depths_cm):
        x = (ssd_mm + 10.0 * d) * np.tan(np.asarray(angles_rad))
        pts = np.stack([x, np.full_like(x, 10.0 * d), np.zeros_like(x)], axis=1)
        out[i] = sample(dose, grid, pts)
    return out


def fit_offaxis(beam, kernel, la4, *, powers=OARX_POWERS, max_rad=OARX_MAX_RAD):
    """Least-squares off-axis fluence coefficients (``1 + sum c_n |theta|^n``) so that the engine's
    open-fan off-axis ratios match LA4 ``[OARXOPENdata]`` (jaw 50) at all four depths.

    Dose is linear in the fluence, so each power is computed once (a run with ``c_n = 1`` minus
    the flat run); the ratio fit is then done on these basis profiles.
    Returns (coefficients, before rms, after rms, details).
    """
    from scipy.optimize import least_squares

    t = la4[50]["oarx_open"]
    sel = t["angle_rad"] <= max_rad + 1e-9
    ang, ref, depths = t["angle_rad"][sel], t["table"][sel].T, list(t["depths_cm"])
    flat = open_fan_profiles(beam.replace(offaxis_fluence_coeffs=()), kernel, depths, ang)
    basis = []
    for p in powers:
        c = [0.0] * p
        c[p - 1] = 1.0
        basis.append(open_fan_profiles(beam.replace(offaxis_fluence_coeffs=tuple(c)), kernel, depths, ang) - flat)
    basis = np.array(basis)

    def oar(coeffs):
        d = flat + np.tensordot(coeffs, basis, axes=(0, 0))
        return d / d[:, :1]

    def resid(coeffs):
        return (oar(coeffs) - ref).ravel()

    c0 = np.zeros(len(powers))
    for i, p in enumerate(powers):
        if p <= len(beam.offaxis_fluence_coeffs):
            c0[i] = beam.offaxis_fluence_coeffs[p - 1]
    before = float(np.sqrt(np.mean(resid(c0) ** 2)))
    sol = least_squares(resid, c0)
    after = float(np.sqrt(np.mean(resid(sol.x) ** 2)))
    coeffs = [0.0] * max(powers)
    for i, p in enumerate(powers):
        coeffs[p - 1] = float(sol.x[i])
    return tuple(coeffs), before, after, {"angles_rad": ang, "la4": ref, "before": oar(c0), "after": oar(sol.x)}


# --------------------------------------------------------------------------------------------
# stage 4-5: longitudinal (jaw) and MLC-edge profiles
# --------------------------------------------------------------------------------------------
def beam_profile(beam, kernel, jaw_mm, n_open, depths_cm, angles_rad, *, axis, ssd_mm=850.0, fine_mm=1.0):
    """Dose profile along ``axis`` ("y": couch/jaw direction, "x": leaf direction) through the
    field centre at fan angles ``angles_rad`` (position (SSD + d) * angle) for each depth,
    normalised to the centre: array (n_depths, n_angles)."""
    dmax = 10.0 * max(depths_cm) + 60.0
    reach = (ssd_mm + dmax) * float(np.max(angles_rad)) + 10.0
    xc = field_centre_x_mm(n_open)
    if axis == "y":
        half_x, half_z = 0.5 * n_open * LEAF_MM + 50.0, reach
        spacing = (5.0, 2.5, fine_mm)
    else:
        half_x, half_z = abs(xc) + reach, 0.5 * jaw_mm + 30.0
        spacing = (fine_mm, 2.5, 2.5)
    dose, grid = water_dose(beam, kernel, jaw_mm, open_leaves(n_open), ssd_mm, max_depth_mm=dmax,
                            half_x_mm=half_x, half_z_mm=half_z, spacing_mm=spacing)
    out = np.empty((len(depths_cm), len(angles_rad)))
    for i, d in enumerate(depths_cm):
        pos = (ssd_mm + 10.0 * d) * np.asarray(angles_rad)
        if axis == "y":
            pts = np.stack([np.full_like(pos, xc), np.full_like(pos, 10.0 * d), pos], axis=1)
        else:
            pts = np.stack([xc + pos, np.full_like(pos, 10.0 * d), np.zeros_like(pos)], axis=1)
        v = sample(dose, grid, pts)
        out[i] = v / v[0]
    return out


def half_max_mrad(angles_rad, profile) -> float:
    """Angle (mrad) where a centre-normalised, decreasing profile falls to 0.5."""
    p = np.asarray(profile)
    k = int(np.argmax(p < 0.5))
    if k == 0:
        return float("nan")
    a = np.asarray(angles_rad) * 1e3
    return float(a[k - 1] + (p[k - 1] - 0.5) / (p[k - 1] - p[k]) * (a[k] - a[k - 1]))


def penumbra_mrad(angles_rad, profile, hi=0.8, lo=0.2) -> float:
    a = np.asarray(angles_rad) * 1e3
    p = np.asarray(profile)
    def cross(level):
        k = int(np.argmax(p < level))
        return a[k - 1] + (p[k - 1] - level) / (p[k - 1] - p[k]) * (a[k] - a[k - 1])
    return float(cross(lo) - cross(hi))


OARY_WIDTH_INDEX = 1  # the 10 cm MLC-open width of [OARYdata]


def la4_oary(la4, jaw_mm, width_index=OARY_WIDTH_INDEX):
    t = la4[jaw_mm]["oary"]
    return t["angle_rad"], t["depths_cm"], t["tables"][width_index].T, int(round(t["mlc_widths_cm"][width_index] * 10 / LEAF_MM))


def jaw_comparison(beam, kernel, la4, jaws=JAWS_MM):
    """{jaw: dict(angles, depths, la4, engine, fwhm/penumbra per depth)} at the 10 cm MLC width."""
    out = {}
    for jaw in jaws:
        ang, depths, ref, n = la4_oary(la4, jaw)
        sel = ang <= 0.09 + 1e-9
        eng = beam_profile(beam, kernel, jaw, n, list(depths), ang[sel], axis="y", fine_mm=1.0 if jaw <= 10 else 1.5)
        out[jaw] = {"angles_rad": ang[sel], "depths_cm": depths, "la4": ref[:, sel], "engine": eng,
                    "hm_la4": [half_max_mrad(ang[sel], r) for r in ref[:, sel]],
                    "hm_engine": [half_max_mrad(ang[sel], e) for e in eng],
                    "pen_la4": [penumbra_mrad(ang[sel], r) for r in ref[:, sel]],
                    "pen_engine": [penumbra_mrad(ang[sel], e) for e in eng]}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Commission the default machine against CheckTomo LA4")
    ap.add_argument("--shared-data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--stage", default="spectrum")
    ap.add_argument("--t0", default="6.0,6.5,7.0,7.5")
    ap.add_argument("--offaxis", default=None, help="c1,c2,... off-axis fluence coefficients")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    la4 = read_la4(args.shared_data)
    if args.stage == "spectrum":
        for item in args.t0.split(","):
            t0, cu = (float(v) for v in (item.split(":") + ["1.5"])[:2])
            t = time.process_time()
            sp = model_spectrum(t0, cu_mm=cu)
            k = kernel_for_spectrum(sp, args.shared_data)
            beam = BeamModel.default(sp)
            if args.offaxis:
                beam = beam.replace(offaxis_fluence_coeffs=tuple(float(v) for v in args.offaxis.split(",")))
            cmp = tpr_comparison(beam, k, la4)
            print(f"T0 {t0} Cu {cu}: mean {sp.mean_energy_mev:.3f} MeV rms {100 * tpr_rms(cmp):.2f} % "
                  f"({time.process_time() - t:.0f} s CPU)")
            for key, (e, r, s) in cmp.items():
                print("  ", key, f"s={s:.2f}", " ".join(f"{100 * (a / b - 1):+.2f}" for a, b in zip(e, r)))
    if args.stage == "oarx":
        sp = model_spectrum(float(args.t0.split(",")[0]))
        k = kernel_for_spectrum(sp, args.shared_data)
        beam = BeamModel.default(sp)
        c, b, a, det = fit_offaxis(beam, k, la4)
        np.set_printoptions(precision=3, suppress=True, linewidth=200)
        print("coeffs", c, "rms before", b, "after", a)
        print(det["la4"][:, ::5]); print(det["before"][:, ::5]); print(det["after"][:, ::5])
    if args.stage == "oary":
        sp = model_spectrum(float(args.t0.split(",")[0]))
        k = kernel_for_spectrum(sp, args.shared_data)
        beam = BeamModel.default(sp)
        if args.offaxis:
            beam = beam.replace(offaxis_fluence_coeffs=tuple(float(v) for v in args.offaxis.split(",")))
        for sig in (1.5, 3.0):
            res = jaw_comparison(beam.replace(jaw_penumbra_sigma_mm=sig), k, la4)
            for jaw, r in res.items():
                print(sig, jaw, "hm", np.round(r["hm_la4"], 2), np.round(r["hm_engine"], 2), "pen",
                      np.round(r["pen_la4"], 2), np.round(r["pen_engine"], 2), flush=True)
    if args.stage == "of":
        sp = model_spectrum(float(args.t0.split(",")[0]))
        k = kernel_for_spectrum(sp, args.shared_data)
        beam = BeamModel.default(sp)
        for jaw, (n, e, r) in engine_output_factors(beam, k, la4).items():
            print(jaw, " ".join(f"{a}:{b:.3f}/{c:.3f}" for a, b, c in zip(n, e, r)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
