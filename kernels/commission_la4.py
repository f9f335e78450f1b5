"""Commission the default tomotherapy machine against the CheckTomo "LA4" beam tables.

The LA4 tables (``../shared/data/tomotherapy/checktomo_LA4``, GPL-3.0, one clinical Hi-Art
class unit; see the README there) are **read at run time only** — nothing from them is copied
into this repository. What this script writes are the project's *own fitted parameters* of the
analytic beam model (``tomodose/data/machines/*.json``) and an agreement report.

Every engine number below is computed with tomodose itself: polyenergetic TERMA
(:func:`tomodose.terma.compute_terma`) of a static beam (gantry 0) on a water phantom, then the
collapsed-cone transport with the kernel ``kernels/derive_ccc_kernels.py`` derives for the
candidate spectrum (:func:`kernel_for_spectrum` runs that script on it). Since 2026-11-29 that is
an energy-grouped kernel with the group edges and rings of the kernel the engine gives the LA4
fields (:func:`la4_kernel`: since session 13 the static kernel, 8 groups and 17 rings), and the
engine splits the TERMA by the same groups — the engine as shipped; ``--group-edges-mev none`` gives the
single polyenergetic kernel of the first fit.

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
2. **output factors**: phantom scatter comes from the engine; the shape vs the open width fits
   the adjacent-leaf gain ``g`` and the isolated-leaf output loss ``h`` of the leaf weights, the
   remaining jaw dependence the head-scatter term of :class:`~tomodose.terma.beam_model.BeamModel`;
3. **transverse off-axis fluence** (FFF cone coefficients) and off-axis softening;
4. **jaw penumbra / FWHM** per jaw; 5. **leaf-edge sigma**.

Usage (the exact sequence is in ``docs/commissioning.md``; every stage caches in ``--work``)::

    python kernels/commission_la4.py --stage spectrum --t0 5.5,6.0,6.5 --work W   # stage 1 (T0[:Cu])
    python kernels/commission_la4.py --stage fit --spectrum-t0 T0 --work W [--seed shipped]
                                                                    # stages 3, 4, 5, 2
    python kernels/commission_la4.py --stage output --spectrum-t0 T0 --work W   # stage 2 alone (g, h, jaws)
    python kernels/commission_la4.py --stage before --work W     # nominal machine
    python kernels/commission_la4.py --stage shipped --work W    # the machine as shipped, current engine
    python kernels/commission_la4.py --stage after --spectrum-t0 T0 --work W --machine-out FILE
    python kernels/commission_la4.py --stage tables --work W [--before-tag shipped]  # Markdown tables
"""

from __future__ import annotations

import argparse
import datetime as _dt
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
JAWS_MM = (10, 25, 50)
LEAF_MM = 6.25


def la4_kernel():
    """The collapsed-cone kernel of every LA4 field: they are static beams, so the engine's static
    kernel (:func:`tomodose.dose.engine.engine_kernel` with ``static=True``, the one
    ``compute_dose`` takes for them)."""
    from tomodose.dose.engine import engine_kernel

    return engine_kernel(static=True)


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


def la4_field_columns(la4: dict, *, tol_cm: float = 0.01) -> dict[tuple[int, float], int]:
    """The LA4 TPR columns that belong to exactly one tomotherapy field.

    The columns are labelled by an equivalent square; most labels are, to their three digits, the
    equivalent square of one jaw (10 / 25 / 50 mm) and one ``[SPdata]`` open width (e.g. 8.89 =
    5 x 40 cm, 8.0 = 5 x 20 cm, 1.95 = 1 x 40 cm). A label that two fields share (1.67 = 1 x 5 and
    2.5 x 1.25 cm; 3.33 = 2.5 x 5 and 5 x 2.5 cm) or that none has (1.0, 2.1 cm) is left out.

    Returns
    -------
    dict
        ``{(jaw_mm, open_width_cm): column index}``.
    """
    sizes = la4[50]["tpr"]["sizes_cm"]
    owners: dict[int, list] = {}
    for jaw in JAWS_MM:
        for w in la4[jaw]["sp"]["widths_cm"]:
            s = equivalent_square_cm(jaw / 10.0, float(w))
            k = int(np.argmin(np.abs(sizes - s)))
            if abs(sizes[k] - s) <= tol_cm:
                owners.setdefault(k, []).append((jaw, float(w)))
    return {fields[0]: k for k, fields in owners.items() if len(fields) == 1}


def la4_nested_dose_ratios(la4: dict, *, min_depth_cm: float = 2.0) -> list[dict]:
    """Central-axis dose ratio of two nested MLC fields of one jaw, as the LA4 tables imply it.

    CheckTomo computes the dose of a field ``F`` at depth ``d`` as ``Sp(F) x TPR_F(d)`` times
    field-independent factors (``README`` of the LA4 folder; the TPR is normalised at 10 cm, so
    ``Sp`` is the output at the isocentre under 10 cm of water, where ``tests/test_commissioning.py``
    compares it). For two fields of one jaw with centred open widths ``a < b`` the wider field
    contains the narrower one, so its central-axis dose cannot be lower at any depth:
    ``Sp(b) TPR_b(d) / (Sp(a) TPR_a(d)) >= 1``. Returns one row per field pair (columns of
    :func:`la4_field_columns`) and tabulated depth >= ``min_depth_cm`` (past the build-up) with
    keys ``jaw_mm``, ``width_a_cm``, ``width_b_cm``, ``depth_cm``, ``ratio``.
    """
    t = la4[50]["tpr"]
    depths = np.asarray(t["depths_cm"], dtype=float)
    cols = la4_field_columns(la4)
    rows = []
    for jaw in JAWS_MM:
        widths = np.asarray(la4[jaw]["sp"]["widths_cm"], dtype=float)
        sp = np.asarray(la4[jaw]["sp"]["values"], dtype=float)
        own = sorted((w, cols[(jaw, w)]) for w in widths if (jaw, w) in cols)
        for i, (wa, ka) in enumerate(own):
            for wb, kb in own[i + 1:]:
                ratio = (sp[widths == wb][0] * t["table"][:, kb]) / (sp[widths == wa][0] * t["table"][:, ka])
                rows += [{"jaw_mm": jaw, "width_a_cm": wa, "width_b_cm": wb, "depth_cm": float(d), "ratio": float(r)}
                         for d, r in zip(depths, ratio) if d >= min_depth_cm]
    return rows


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
               spacing_mm=(5.0, 2.5, 2.5), machine=None, engine_options=None):
    """Dose of one static beam (gantry 0) on a water slab; returns (dose, grid).

    The slab's entrance surface is the plane y = 0 (the source is anterior, -y), the isocentre
    is on the central axis at depth ``sad - ssd``. ``engine_options`` (dict, default none) go to the
    collapsed cone as ``compute_dose``'s engine options do (e.g. ``static_supersample``).
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
    dose = _engine_dose("collapsed_cone", water, seq, beam_model=beam, kernel=kernel, progress=False,
                        **(engine_options or {}))
    return dose.astype(np.float64), grid


def sample(dose, grid, points_lps):
    kji = grid.lps_to_index(np.asarray(points_lps, dtype=float))
    return ndimage.map_coordinates(dose, kji.T, order=1, mode="nearest")


def _half_x(n_open):
    return min(0.5 * n_open * LEAF_MM + 60.0, 215.0)


#: Reach of the point-dose water slab along the couch axis beyond the jaw's half width (mm). The
#: LA4 TPR and output factors are measured in a tank; with the collapsed cone's surface correction
#: (engine default since session 9) a short slab loses the scatter the tank's water beyond it sends
#: back. Until session 12 the slab reached 40 mm (TPR 3 / 20 cm -0.3 / +0.4-0.7 % and the dose at
#: 10 cm -0.3 % against this reach; ``kernels/study_la4_phantom_length.py``, docs/commissioning.md
#: *Phantom length*). 150 mm is converged: 250 mm changes the 50 mm jaw's dose at 10 and 20 cm depth
#: by less than 0.003 % (session 12).
SLAB_REACH_MM = 150.0


def point_dose(beam, kernel, jaw_mm, n_open, ssd_mm, depth_mm, *, back_mm=100.0, reach_mm=SLAB_REACH_MM,
               dx=None, dy=2.5, dz=None, engine_options=None):
    """Central-axis dose at ``depth_mm`` below a surface at ``ssd_mm`` (field centre in x), in a
    water slab reaching ``reach_mm`` beyond the jaw's half width along the couch axis and
    ``back_mm`` below the point.

    Voxels: 2.5 mm along the beam; across the jaws 2 mm (jaw 10) or 2.5 mm; across the leaves
    5 mm, refined to a fifth of the open width (>= 1.25 mm) for narrow MLC fields. ``engine_options``:
    see :func:`water_dose` (default: the engine's static-beam defaults, as the tests run)."""
    dz = dz or (2.0 if jaw_mm <= 10 else 2.5)
    dx = dx or float(np.clip(n_open * LEAF_MM / 5.0, 1.25, 5.0))
    dose, grid = water_dose(beam, kernel, jaw_mm, open_leaves(n_open), ssd_mm, max_depth_mm=depth_mm + back_mm,
                            half_x_mm=_half_x(n_open), half_z_mm=0.5 * jaw_mm + reach_mm, spacing_mm=(dx, dy, dz),
                            engine_options=engine_options)
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
    if str(ROOT / "kernels") not in sys.path:
        sys.path.insert(0, str(ROOT / "kernels"))
    import _common

    return _common.load_script(name)


def model_spectrum(t0_mev: float, w_mm: float = 1.0, cu_mm: float = 1.5) -> Spectrum:
    """Spectrum of the thick-target Schiff model of ``kernels/derive_spectrum.py`` (0.25 MeV bins)."""
    ds = _load_script("derive_spectrum")
    edges = ds.spectrum_bin_edges(t0_mev)
    counts = ds.bin_spectrum(t0_mev, [("W", w_mm / 10.0), ("Cu", cu_mm / 10.0)], edges)
    return Spectrum(0.5 * (edges[1:] + edges[:-1]), counts, edges,
                    f"Schiff thick target T0={t0_mev:g} MeV W {w_mm:g} mm Cu {cu_mm:g} mm")


def engine_group_edges_mev() -> tuple[float, ...]:
    """Inner energy-group edges (MeV) of the LA4 fields' collapsed-cone kernel (:func:`la4_kernel`;
    ``(0.25, 0.5, 1, 1.5, 2, 3, 4)`` for the static ``ccc_water_6mv_8groups_17rings``), ``()`` when
    that kernel has no groups."""
    k = la4_kernel()
    return tuple(float(v) for v in k.group_edges_mev[1:-1]) if getattr(k, "n_groups", 0) else ()


def kernel_for_spectrum(spectrum: Spectrum, shared_data, name="commissioning", *, group_edges_mev="engine",
                        cache_dir=None):
    """Collapsed-cone kernel for ``spectrum``, derived by ``kernels/derive_ccc_kernels.py`` itself.

    The script's :func:`main` runs on the candidate spectrum (written as a two-column CSV) with
    its mono-kernel set (own ompMC below 0.5 MeV + EDKnrc) and the layout of the LA4 fields' kernel
    (:func:`la4_kernel`: ring edges, azimuths, azimuth stagger, exponential terms) and
    ``--group-edges-mev``: by default that kernel's inner group edges
    (:func:`engine_group_edges_mev`), so the result is the candidate-spectrum twin of the shipped
    static kernel and the engine splits the TERMA by the same groups
    (``tomodose.dose.engine._ccc_engine`` does so for any kernel with ``n_groups``).
    ``group_edges_mev=()`` or None gives the single polyenergetic kernel (the recipe of the
    2026-11-28 commissioning). ``cache_dir``: the derived JSON tables are kept there, keyed by a
    hash of the spectrum and the options, and reused.
    """
    import contextlib
    import hashlib
    import io

    from tomodose.transport.kernels import CollapsedConeKernel

    if isinstance(group_edges_mev, str) and group_edges_mev == "engine":
        group_edges_mev = engine_group_edges_mev()
    inner = tuple(float(v) for v in (group_edges_mev or ()))
    e = np.asarray(spectrum.energies_mev, dtype=float)
    w = np.asarray(spectrum.fluence, dtype=float)
    ref = la4_kernel()
    derive = _derive_script()
    layout = ["--polar-edges-deg", ",".join(f"{v:g}" for v in ref.polar_edges_deg), "--n-azimuth",
              str(ref.n_azimuth), "--n-terms", str(ref.n_terms)]
    if "--azimuth-stagger" in Path(derive.__file__).read_text(encoding="utf-8"):
        layout.append("--azimuth-stagger" if getattr(ref, "azimuth_stagger", False) else "--no-azimuth-stagger")
    key = hashlib.sha256(e.tobytes() + w.tobytes() + repr((inner, str(shared_data), layout)).encode()).hexdigest()[:16]
    folder = Path(cache_dir) if cache_dir is not None else Path(tempfile.mkdtemp(prefix="commission_kernel_"))
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"kernel_{key}.json"
    if not out.is_file():
        csv = folder / f"spectrum_{key}.csv"
        _atomic_write(csv, f"# {spectrum.name}\n" + "".join(f"{float(a)!r},{float(b)!r}\n" for a, b in zip(e, w)))
        argv = ["--shared-data", str(shared_data), "--spectrum", str(csv), "--name", f"kernel_{key}",
                "--out-dir", str(folder)] + layout
        if inner:
            argv += ["--group-edges-mev", ",".join(f"{v:g}" for v in inner)]
        t = time.process_time()
        with contextlib.redirect_stdout(io.StringIO()):
            derive.main(argv)
        log.info("kernel for %s (groups %s): %.0f s CPU", spectrum.name, inner, time.process_time() - t)
    k = CollapsedConeKernel.load(out)
    return k if k.name == name else _renamed(k, name)


_DERIVE = []


def _derive_script():
    """``kernels/derive_ccc_kernels.py``, loaded once per process (one consistent version)."""
    if not _DERIVE:
        _DERIVE.append(_load_script("derive_ccc_kernels"))
    return _DERIVE[0]


def _renamed(kernel, name):
    import dataclasses

    return dataclasses.replace(kernel, name=name)


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


def tpr_deviations(cmp, depths_cm=TPR_FIT_DEPTHS_CM, max_depth_cm=20.0) -> np.ndarray:
    """Engine / LA4 - 1 of every field at the depths <= ``max_depth_cm`` (the fit range 3-20 cm;
    25 cm is reported only, see ``docs/commissioning.md``)."""
    keep = np.asarray(depths_cm, dtype=float) <= max_depth_cm
    return np.concatenate([(e / r - 1.0)[keep] for e, r, _ in cmp.values()])


def tpr_rms(cmp, depths_cm=TPR_FIT_DEPTHS_CM, max_depth_cm=20.0) -> float:
    """rms of :func:`tpr_deviations` (fraction)."""
    d = tpr_deviations(cmp, depths_cm, max_depth_cm)
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


def open_fan_profiles(beam, kernel, depths_cm, angles_rad, *, ssd_mm=850.0, dx=5.0, dy=2.5, dz=2.5,
                      engine_options=None):
    """Dose of the open fan (jaw 50 mm, 64 leaves, gantry 0, SSD ``ssd_mm``) at fan angles
    ``angles_rad`` (x = (SSD + d) tan(theta)) and depths ``depths_cm``: array (n_depths, n_angles).
    ``engine_options``: see :func:`water_dose`."""
    dmax = 10.0 * max(depths_cm) + 80.0
    half_x = (ssd_mm + dmax) * np.tan(0.25) + 10.0
    dose, grid = water_dose(beam, kernel, 50, np.ones(64), ssd_mm, max_depth_mm=dmax, half_x_mm=half_x,
                            half_z_mm=65.0, spacing_mm=(dx, dy, dz), engine_options=engine_options)
    out = np.empty((len(depths_cm), len(angles_rad)))
    for i, d in enumerate(depths_cm):
        x = (ssd_mm + 10.0 * d) * np.tan(np.asarray(angles_rad))
        pts = np.stack([x, np.full_like(x, 10.0 * d), np.zeros_like(x)], axis=1)
        out[i] = sample(dose, grid, pts)
    return out


def la4_open_fan_oar(la4: dict, max_rad: float = OARX_MAX_RAD):
    """LA4 ``[OARXOPENdata]`` (jaw 50) within ``max_rad``: (angles rad (n,), OAR (n_depths, n), depths cm)."""
    t = la4[50]["oarx_open"]
    sel = t["angle_rad"] <= max_rad + 1e-9
    return t["angle_rad"][sel], t["table"][sel].T, list(t["depths_cm"])


def fit_offaxis(beam, kernel, la4, *, powers=OARX_POWERS, max_rad=OARX_MAX_RAD):
    """Least-squares off-axis fluence coefficients (``1 + sum c_n |theta|^n``) so that the engine's
    open-fan off-axis ratios match LA4 ``[OARXOPENdata]`` (jaw 50) at all four depths.

    Dose is linear in the fluence, so each power is computed once (a run with ``c_n = 1`` minus
    the flat run); the ratio fit is then done on these basis profiles.
    Returns (coefficients, before rms, after rms, details).
    """
    from scipy.optimize import least_squares

    ang, ref, depths = la4_open_fan_oar(la4, max_rad)
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


def fit_jaws(beam, kernel, la4, sigmas_mm=(1.5, 3.0), jaws=JAWS_MM, machine=None):
    """Jaw penumbra sigma (one for all jaws: the TERMA kernel takes a scalar) and fluence FWHM per
    jaw from the LA4 ``[OARYdata]`` profiles (10 cm MLC width, all five depths).

    The engine's dose profiles are computed for two sigmas at the current FWHMs; the 80-20 %
    penumbra is interpolated linearly in sigma and the sigma minimising the squared penumbra
    error over jaws and depths is taken; then each jaw's fluence FWHM is shifted by the mean
    difference of the half-maximum positions (engine minus LA4, interpolated to that sigma,
    converted to the isocentre plane). Returns (sigma, {jaw: fwhm}, details)."""
    machine = machine or TomoMachine()
    runs = {sg: jaw_comparison(beam.replace(jaw_penumbra_sigma_mm=sg), kernel, la4, jaws) for sg in sigmas_mm}
    s0, s1 = sigmas_mm
    grid = np.linspace(min(sigmas_mm) * 0.5, max(sigmas_mm) * 1.5, 401)
    cost = np.zeros_like(grid)
    for jaw in jaws:
        p0, p1 = np.array(runs[s0][jaw]["pen_engine"]), np.array(runs[s1][jaw]["pen_engine"])
        target = np.array(runs[s0][jaw]["pen_la4"])
        for n, sg in enumerate(grid):
            cost[n] += np.sum((p0 + (p1 - p0) * (sg - s0) / (s1 - s0) - target) ** 2)
    sigma = float(grid[int(np.argmin(cost))])
    fwhm = {}
    for jaw in jaws:
        h0, h1 = np.array(runs[s0][jaw]["hm_engine"]), np.array(runs[s1][jaw]["hm_engine"])
        h = h0 + (h1 - h0) * (sigma - s0) / (s1 - s0)
        diff_mrad = float(np.mean(h - np.array(runs[s0][jaw]["hm_la4"])))
        fwhm[float(jaw)] = round(beam.real_fwhm_mm(float(jaw), machine) - 2.0 * diff_mrad * 1e-3 * machine.sad_mm, 3)
    return round(sigma, 3), fwhm, runs


def la4_leaf_profiles(la4, jaw_mm, n_index):
    t = la4[jaw_mm]["oarx_leaves"]
    return t["angle_rad"], t["depths_cm"], t["tables"][n_index].T, t["n_open"][n_index]


def leaf_comparison(beam, kernel, la4, jaw_mm=25, max_rad=0.04):
    """{n_open: dict(...)} MLC-edge profiles (1, 2, 4 open leaves) of one jaw vs LA4."""
    out = {}
    for i in range(3):
        ang, depths, ref, n = la4_leaf_profiles(la4, jaw_mm, i)
        sel = ang <= max_rad + 1e-9
        eng = beam_profile(beam, kernel, jaw_mm, n, list(depths), ang[sel], axis="x", fine_mm=1.0)
        out[n] = {"angles_rad": ang[sel], "depths_cm": depths, "la4": ref[:, sel], "engine": eng,
                  "hm_la4": [half_max_mrad(ang[sel], r) for r in ref[:, sel]],
                  "hm_engine": [half_max_mrad(ang[sel], e) for e in eng],
                  "rms": float(np.sqrt(np.mean((eng - ref[:, sel]) ** 2)))}
    return out


def fit_leaf_sigma(beam, kernel, la4, sigmas_mm=(0.5, 1.5), jaw_mm=25):
    """Leaf-edge sigma minimising the rms profile difference (interpolated linearly in sigma
    between two engine runs) of the 1/2/4-leaf LA4 profiles. Returns (sigma, details)."""
    runs = {sg: leaf_comparison(beam.replace(leaf_edge_sigma_mm=sg), kernel, la4, jaw_mm) for sg in sigmas_mm}
    s0, s1 = sigmas_mm
    grid = np.linspace(0.0, max(sigmas_mm) * 1.5, 301)
    cost = np.zeros_like(grid)
    for n in runs[s0]:
        e0, e1, ref = runs[s0][n]["engine"], runs[s1][n]["engine"], runs[s0][n]["la4"]
        for k, sg in enumerate(grid):
            cost[k] += np.sum((e0 + (e1 - e0) * (sg - s0) / (s1 - s0) - ref) ** 2)
    return round(float(grid[int(np.argmin(cost))]), 3), runs


OF_FIT_LEAVES = (1, 2, 4, 8, 16, 64)


def _edge_weight(n_open: int, g: float, h: float) -> float:
    """Leaf weight ``a`` of the edge leaves of ``n_open`` contiguous open leaves (BeamModel.leaf_weights):
    a single leaf ``(1 - h)/(1 + 2g)`` (isolated), otherwise ``(1 + g)/(1 + 2g)``."""
    return (1.0 - h) / (1 + 2 * g) if n_open == 1 else (1 + g) / (1 + 2 * g)


def fit_output(beam, kernel, la4, *, g_values=(0.0, 0.1), n_open=OF_FIT_LEAVES, jaws=JAWS_MM, cache=None,
               parts_only=False, fit_isolated=True, **kw):
    """Adjacent-leaf output gain ``g``, isolated-leaf output loss ``h`` and one output factor per
    jaw from the LA4 ``[SPdata]``.

    The dose is linear in the leaf weights ``a_i`` and, for ``n`` contiguous open leaves, only
    the two edge leaves depend on ``g`` and ``h`` (``a = (1 + g)/(1 + 2g)``; a single leaf
    ``(1 - h)/(1 + 2g)``, :func:`_edge_weight`), so two engine runs per field (``g_values``, at
    ``h = 0``) give the dose as an exact function of ``(g, h)``. ``(g, h)`` minimise the squared
    log-ratio of the per-jaw-normalised output factors (shape vs the open width; ``h`` held at 0
    when ``fit_isolated`` is False: the model before 2026-11-29 05:30 UTC); the jaw factor is then
    the geometric-mean LA4/engine ratio of each jaw over the open widths of 8 leaves (5 cm) and
    more, relative to that of the 50 mm jaw (the calibration field).
    ``cache`` ({jaw: parts}) reuses the engine runs of an earlier call with ``parts_only=True``
    (which returns them instead: the runs of each jaw can go to a separate process).
    Returns (g, h, {jaw: factor}, details {jaw: (n, engine(g, h), la4)})."""
    from scipy.optimize import minimize

    g0, g1 = g_values
    d_mm = 10.0 * OF_DEPTH_CM
    base = beam.replace(isolated_leaf_output_loss=0.0)

    def parts(jaw, n):
        dd = [point_dose(base.replace(adjacent_leaf_output_gain=g), kernel, jaw, n, 850.0 - d_mm, d_mm, **kw)
              for g in g_values]
        e0, e1 = _edge_weight(n, g0, 0.0), _edge_weight(n, g1, 0.0)
        # D(g) = I + e(g) E  -> solve for I (interior) and E (edge leaves)
        edge = (dd[0] - dd[1]) / (e0 - e1)
        return dd[0] - e0 * edge, edge, n == 1

    table = {}
    for jaw in jaws:
        n_all, la = la4_output_factors(la4, jaw)
        cached = (cache or {}).get(str(jaw))
        rows = []
        for k, n in enumerate(n_open):
            i = int(np.flatnonzero(n_all == n)[0])
            rows.append((n, tuple(cached[k]) if cached else parts(jaw, n), la[i]))
        table[jaw] = rows
    if parts_only:
        return {str(jaw): [list(p) for _, p, _ in rows] for jaw, rows in table.items()}

    def dose(part, g, h):
        interior, edge, single = part
        return interior + _edge_weight(1 if single else 2, g, h) * edge

    def shape_cost(p):
        g, h = p
        c = 0.0
        for jaw, rows in table.items():
            eng = np.array([dose(q, g, h) for _, q, _ in rows])
            ref = np.array([r for _, _, r in rows])
            lr = np.log(eng / eng[-1]) - np.log(ref / ref[-1])
            c += float(np.sum(lr ** 2))
        return c

    bounds = [(0.0, 0.3), (0.0, 0.5 if fit_isolated else 0.0)]
    best = min((minimize(shape_cost, x0, method="L-BFGS-B", bounds=bounds)
                for x0 in ([0.03, 0.0], [0.0, 0.05 if fit_isolated else 0.0], [0.1, 0.1 if fit_isolated else 0.0])),
               key=lambda r: r.fun)
    g, h = (float(v) for v in best.x)
    ref50 = dose(table[50][-1][1], g, h)
    factors, details = {}, {}
    for jaw, rows in table.items():
        eng = np.array([dose(p, g, h) for _, p, _ in rows]) / ref50
        la = np.array([r for _, _, r in rows])
        wide = np.array([n >= 8 for n, _, _ in rows])
        factors[float(jaw)] = float(np.exp(np.mean(np.log(la[wide] / eng[wide]))))
        details[jaw] = (np.array([n for n, _, _ in rows]), eng, la)
    norm = factors[50.0]
    factors = {k: round(v / norm, 4) for k, v in factors.items()}
    return round(g, 4), round(h, 4), factors, details


# --------------------------------------------------------------------------------------------
# evaluation, machine file, report
# --------------------------------------------------------------------------------------------
EVAL_TPR_DEPTHS_CM = (3.0, 5.0, 7.0, 15.0, 20.0, 25.0)
EVAL_OF_LEAVES = (1, 2, 4, 8, 16, 64)


EVAL_PARTS = ("tpr", "output_factors", "oarx_open", "oary", "oarx_leaves")


def evaluate(beam, kernel, la4, *, jaw_output_factors=None, parts=EVAL_PARTS, cache_dir=None, tag="after") -> dict:
    """All agreement numbers of one machine (JSON-serialisable).

    ``jaw_output_factors`` ({jaw: factor}) multiplies the engine output factors of each jaw (the
    fitted head-scatter term; see :meth:`BeamModel.jaw_output_factor`). ``parts`` selects the
    comparisons; with ``cache_dir`` each part is stored as ``<tag>_<part>.json`` and reused, so
    the parts can run in parallel processes and be assembled by a last call."""
    out = {}
    for part in parts:
        f = None if cache_dir is None else Path(cache_dir) / f"{tag}_{part}.json"
        if f is not None and f.is_file():
            out[part] = json.loads(f.read_text())
            continue
        t0 = time.process_time()
        out[part] = _EVAL[part](beam, kernel, la4, jaw_output_factors)
        log.warning("evaluate %s: %s done (%.0f s CPU)", tag, part, time.process_time() - t0)
        if f is not None:
            _atomic_write(f, json.dumps(out[part], indent=1))
    if all(p in out for p in EVAL_PARTS):
        out["summary"] = summarise(out)
    return out


def _eval_tpr(beam, kernel, la4, jaw_output_factors):
    out = {}
    for (jaw, n), (e, r, sq) in tpr_comparison(beam, kernel, la4, depths_cm=EVAL_TPR_DEPTHS_CM).items():
        out[f"{jaw}x{n}"] = {"equivalent_square_cm": round(sq, 3), "depths_cm": list(EVAL_TPR_DEPTHS_CM),
                             "engine": np.round(e, 5).tolist(), "la4": np.round(r, 5).tolist(),
                             "deviation_pct": np.round(100 * (e / r - 1), 2).tolist()}
    return out


def _eval_of(beam, kernel, la4, jaw_output_factors):
    out = {}
    d_mm = 10.0 * OF_DEPTH_CM
    ref = point_dose(beam, kernel, 50, 64, 850.0 - d_mm, d_mm)
    for jaw in JAWS_MM:
        n_all, la = la4_output_factors(la4, jaw)
        f = 1.0 if not jaw_output_factors else float(jaw_output_factors.get(float(jaw), 1.0))
        rows = []
        for n in EVAL_OF_LEAVES:
            i = int(np.flatnonzero(n_all == n)[0])
            e = 1.0 if (jaw == 50 and n == 64) else f * point_dose(beam, kernel, jaw, n, 850.0 - d_mm, d_mm) / ref
            rows.append((n, e, float(la[i])))
        out[str(jaw)] = {"n_open": [r[0] for r in rows], "engine": [round(r[1], 4) for r in rows],
                         "la4": [r[2] for r in rows], "deviation_pct": [round(100 * (r[1] / r[2] - 1), 2) for r in rows]}
    return out


def _eval_oarx(beam, kernel, la4, jaw_output_factors):
    ang, ref, depths = la4_open_fan_oar(la4)
    eng = open_fan_profiles(beam, kernel, depths, ang)
    eng = eng / eng[:, :1]
    diff = eng - ref
    return {"depths_cm": [float(d) for d in depths], "max_angle_rad": OARX_MAX_RAD,
                        "rms_per_depth": np.round(np.sqrt(np.mean(diff ** 2, axis=1)), 4).tolist(),
                        "max_abs_per_depth": np.round(np.abs(diff).max(axis=1), 4).tolist(),
                        "at_0.1_rad": {"engine": np.round(eng[:, 20], 4).tolist(),
                                       "la4": np.round(ref[:, 20], 4).tolist()},
                        "at_0.2_rad": {"engine": np.round(eng[:, 40], 4).tolist(),
                                       "la4": np.round(ref[:, 40], 4).tolist()}}


def _eval_oary(beam, kernel, la4, jaw_output_factors):
    out = {}
    for jaw, r in jaw_comparison(beam, kernel, la4).items():
        out[str(jaw)] = {"depths_cm": r["depths_cm"].tolist(),
                                 "fwhm_mm_iso_la4": np.round(2 * 0.85 * np.array(r["hm_la4"]), 2).tolist(),
                                 "fwhm_mm_iso_engine": np.round(2 * 0.85 * np.array(r["hm_engine"]), 2).tolist(),
                                 "penumbra_80_20_mrad_la4": np.round(r["pen_la4"], 2).tolist(),
                                 "penumbra_80_20_mrad_engine": np.round(r["pen_engine"], 2).tolist(),
                                 "rms": round(float(np.sqrt(np.mean((r["engine"] - r["la4"]) ** 2))), 4)}
    return out


def _eval_leaves(beam, kernel, la4, jaw_output_factors):
    out = {}
    for n, r in leaf_comparison(beam, kernel, la4).items():
        out[str(n)] = {"jaw_mm": 25, "depths_cm": r["depths_cm"].tolist(),
                                      "fwhm_mm_iso_la4": np.round(2 * 0.85 * np.array(r["hm_la4"]), 2).tolist(),
                                      "fwhm_mm_iso_engine": np.round(2 * 0.85 * np.array(r["hm_engine"]), 2).tolist(),
                                      "rms": round(r["rms"], 4)}
    return out


_EVAL = {"tpr": _eval_tpr, "output_factors": _eval_of, "oarx_open": _eval_oarx, "oary": _eval_oary,
         "oarx_leaves": _eval_leaves}


def summarise(ev) -> dict:
    tpr = np.concatenate([np.array(v["deviation_pct"])[np.array(v["depths_cm"]) <= 20.0] for v in ev["tpr"].values()])
    of = np.concatenate([np.array(v["deviation_pct"]) for v in ev["output_factors"].values()])
    of_wide = np.concatenate([np.array(v["deviation_pct"])[np.array(v["n_open"]) >= 4]
                              for v in ev["output_factors"].values()])
    return {"tpr_3_20cm_rms_pct": round(float(np.sqrt(np.mean(tpr ** 2))), 2),
            "tpr_3_20cm_max_abs_pct": round(float(np.abs(tpr).max()), 2),
            "of_rms_pct": round(float(np.sqrt(np.mean(of ** 2))), 2),
            "of_max_abs_pct": round(float(np.abs(of).max()), 2),
            "of_4_leaves_and_more_max_abs_pct": round(float(np.abs(of_wide).max()), 2),
            "oarx_open_rms": round(float(np.mean(ev["oarx_open"]["rms_per_depth"])), 4),
            "oary_rms": round(float(np.mean([v["rms"] for v in ev["oary"].values()])), 4),
            "oarx_leaves_rms": round(float(np.mean([v["rms"] for v in ev["oarx_leaves"].values()])), 4)}


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def nominal_machine(shared_data, t0_mev=6.0, *, groups="engine", cache_dir=None):
    """The machine before commissioning: nominal beam model, spectrum of the nominal T0."""
    sp = model_spectrum(t0_mev)
    return BeamModel.nominal(sp), kernel_for_spectrum(sp, shared_data, name="nominal", group_edges_mev=groups,
                                                      cache_dir=cache_dir)


#: stage 3-5 results that ``--seed shipped`` takes from the shipped machine file
GEOMETRY_PARAMS = ("offaxis_fluence_coeffs", "jaw_penumbra_sigma_mm", "jaw_fwhm_mm", "leaf_edge_sigma_mm")


def seed_params(work: Path, source=None, keys=GEOMETRY_PARAMS) -> dict:
    """Start ``work/params.json`` with the stage 3-5 results ``keys`` of a machine file (default the
    shipped one), so that a refit after a spectrum change can redo the other stages alone (all of
    them: stage 2 only; the off-axis fluence alone: stages 4, 5 and 2); no-op when it exists."""
    from tomodose.terma.beam_model import load_machine_parameters

    path = work / "params.json"
    if path.is_file():
        return json.loads(path.read_text())
    data = load_machine_parameters(source)
    bm = data["beam_model"]
    params = {k: bm[k] for k in keys}
    fitted = data.get("provenance", {}).get("date_utc")
    params["seeded_from"] = str(source or "tomodose/data/machines/tomo_default.json") + (
        f" as fitted {fitted}" if fitted else "") + (
        "" if tuple(keys) == GEOMETRY_PARAMS else f" ({', '.join(keys)} only; the other stages refitted)")
    _atomic_write(path, json.dumps(params, indent=1))
    return params


def fit_spectrum(t0_item=None) -> Spectrum:
    """The spectrum of the fit and report stages: ``"T0[:Cu mm]"`` of the Schiff model
    (:func:`model_spectrum`), or the shipped default spectrum when None."""
    from tomodose.terma.spectrum import default_spectrum

    if t0_item is None:
        return default_spectrum()
    t0, cu = (float(v) for v in (str(t0_item).split(":") + ["1.5"])[:2])
    return model_spectrum(t0, cu_mm=cu)


def run_fit(shared_data, la4, work: Path, spectrum=None, groups="engine", fit_isolated=True) -> dict:
    """Stages 3-5 and 2 for ``spectrum`` (default: the shipped one) with the candidate kernel of
    :func:`kernel_for_spectrum` (energy groups ``groups``), cached in ``work/params.json``
    (``fit_isolated``: stage 2 fits the isolated-leaf output loss ``h`` too, else ``h = 0``)."""
    from tomodose.terma.spectrum import default_spectrum

    path = work / "params.json"
    params = json.loads(path.read_text()) if path.is_file() else {}
    sp = spectrum or default_spectrum()
    kernel = kernel_for_spectrum(sp, shared_data, group_edges_mev=groups, cache_dir=work / "kernels")
    beam = BeamModel.nominal(sp)

    def current():
        kw = {k: v for k, v in params.items() if k in ("jaw_penumbra_sigma_mm", "leaf_edge_sigma_mm",
                                                        "adjacent_leaf_output_gain", "isolated_leaf_output_loss",
                                                        "offaxis_softening_per_rad")}
        if "offaxis_fluence_coeffs" in params:
            kw["offaxis_fluence_coeffs"] = tuple(params["offaxis_fluence_coeffs"])
        if "jaw_fwhm_mm" in params:
            kw["jaw_fwhm_mm"] = {float(k): v for k, v in params["jaw_fwhm_mm"].items()}
        return beam.replace(**kw)

    def save():
        _atomic_write(path, json.dumps(params, indent=1))

    if "offaxis_fluence_coeffs" not in params:
        c, before, after, _ = fit_offaxis(current(), kernel, la4)
        params.update(offaxis_fluence_coeffs=[round(v, 4) for v in c], offaxis_rms_before=before, offaxis_rms_after=after)
        save()
        log.warning("off-axis: %s (rms %.4f -> %.4f)", c, before, after)
    if "jaw_penumbra_sigma_mm" not in params:
        sigma, fwhm, _ = fit_jaws(current(), kernel, la4)
        params.update(jaw_penumbra_sigma_mm=sigma, jaw_fwhm_mm={str(k): v for k, v in fwhm.items()})
        save()
        log.warning("jaws: sigma %.3f mm, FWHM %s", sigma, fwhm)
    def leaf_stage():
        b = current()
        sg, _ = fit_leaf_sigma(b, kernel, la4)
        params.update(leaf_edge_sigma_mm=sg,
                      leaf_sigma_fitted_with_g_h=[b.adjacent_leaf_output_gain, b.isolated_leaf_output_loss])
        save()
        log.warning("leaf-edge sigma %.3f mm (g %.4f, h %.4f)", sg, *params["leaf_sigma_fitted_with_g_h"])

    def output_stage():
        cache = {}
        for jaw in JAWS_MM:
            f = work / f"of_parts_{jaw}.json"
            if f.is_file():
                data = json.loads(f.read_text())
                if data["beam"] == _beam_key(current()):
                    cache.update(data["parts"])
        g, h, factors, _ = fit_output(current(), kernel, la4, cache=cache, fit_isolated=fit_isolated)
        params.update(adjacent_leaf_output_gain=g, isolated_leaf_output_loss=h,
                      jaw_output_factors={str(k): v for k, v in factors.items()})
        save()
        log.warning("output: g %.4f, h %.4f, jaw factors %s", g, h, factors)

    if "leaf_edge_sigma_mm" not in params:
        leaf_stage()
    if "adjacent_leaf_output_gain" not in params or "isolated_leaf_output_loss" not in params:
        output_stage()
    # the 4-leaf profile of stage 5 depends on the leaf weights of stage 2: when stage 5 ran with other
    # (g, h) than stage 2 found (the nominal g = 0.049 on a fresh fit), one more pass of stages 5 and 2
    used = params.get("leaf_sigma_fitted_with_g_h")
    found = [params["adjacent_leaf_output_gain"], params["isolated_leaf_output_loss"]]
    if used is not None and not params.get("leaf_sigma_repass") and max(abs(a - b) for a, b in zip(used, found)) > 5e-3:
        params.update(leaf_edge_sigma_mm_pass1=params["leaf_edge_sigma_mm"], g_h_pass1=found, leaf_sigma_repass=True)
        leaf_stage()
        output_stage()
    return params


def _beam_key(beam) -> str:
    return repr((beam.jaw_penumbra_sigma_mm, beam.leaf_edge_sigma_mm, beam.offaxis_fluence_coeffs,
                 sorted((beam.jaw_fwhm_mm or {}).items())))


def run_of_parts(shared_data, la4, work: Path, jaw: int, spectrum=None, groups="engine") -> None:
    """The output-factor engine runs of one jaw (stage 2), for a parallel process; needs the
    stages 3-5 results in ``work/params.json``."""
    from tomodose.terma.spectrum import default_spectrum

    params = json.loads((work / "params.json").read_text())
    sp = spectrum or default_spectrum()
    beam = BeamModel.nominal(sp).replace(
        offaxis_fluence_coeffs=tuple(params["offaxis_fluence_coeffs"]),
        jaw_penumbra_sigma_mm=params["jaw_penumbra_sigma_mm"],
        jaw_fwhm_mm={float(k): v for k, v in params["jaw_fwhm_mm"].items()},
        leaf_edge_sigma_mm=params["leaf_edge_sigma_mm"])
    kernel = kernel_for_spectrum(sp, shared_data, group_edges_mev=groups, cache_dir=work / "kernels")
    parts = fit_output(beam, kernel, la4, jaws=(jaw,), parts_only=True)
    _atomic_write(work / f"of_parts_{jaw}.json", json.dumps({"beam": _beam_key(beam), "parts": parts}))


def machine_from_params(params, spectrum=None) -> BeamModel:
    from tomodose.terma.spectrum import default_spectrum

    """The commissioned beam model from the fit results (missing stages keep nominal values, so
    comparisons that do not depend on them can start early)."""
    nominal = BeamModel.nominal(spectrum or default_spectrum())
    kw = {"name": "default", "offaxis_fluence_coeffs": tuple(params["offaxis_fluence_coeffs"]),
          "jaw_penumbra_sigma_mm": params["jaw_penumbra_sigma_mm"],
          "jaw_fwhm_mm": {float(k): v for k, v in params["jaw_fwhm_mm"].items()}}
    for key in ("leaf_edge_sigma_mm", "adjacent_leaf_output_gain", "isolated_leaf_output_loss"):
        if key in params:
            kw[key] = params[key]
    if "jaw_output_factors" in params:
        kw["jaw_output_factors"] = {float(k): v for k, v in params["jaw_output_factors"].items()}
    return nominal.replace(**kw)


def write_machine(beam: BeamModel, params: dict, before: dict, after: dict, out: Path, command: str, *,
                  t0_mev: float = 7.5, cu_mm: float = 1.5, groups=(), extra_agreement=None, spectrum_scan=None,
                  stagger: bool = False, note: str | None = None) -> None:
    bm = {"jaw_penumbra_sigma_mm": beam.jaw_penumbra_sigma_mm, "leaf_edge_sigma_mm": beam.leaf_edge_sigma_mm,
          "leaf_transmission": beam.leaf_transmission, "adjacent_leaf_output_gain": beam.adjacent_leaf_output_gain,
          "isolated_leaf_output_loss": beam.isolated_leaf_output_loss,
          "offaxis_fluence_coeffs": list(beam.offaxis_fluence_coeffs),
          "offaxis_softening_per_rad": beam.offaxis_softening_per_rad,
          "jaw_fwhm_mm": {f"{k:g}": v for k, v in beam.jaw_fwhm_mm.items()},
          "jaw_output_factors": {f"{k:g}": v for k, v in beam.jaw_output_factors.items()}}
    history = _machine_history(out)
    data = {
        "format": "tomodose-machine", "version": 1, "name": "default",
        "description": "TomoTherapy-like helical machine commissioned against the CheckTomo LA4 tables "
                       "(one clinical Hi-Art class unit); the project's own fitted parameters",
        "beam_model": bm,
        "spectrum": {"file": "tomodose/data/physics/tomo_6mv_fff.spectrum",
                     "electron_kinetic_energy_mev": t0_mev,
                     "generator": f"python kernels/derive_spectrum.py --t0 {t0_mev:g}"
                                  + ("" if cu_mm == 1.5 else f" --cu-mm {cu_mm:g}")},
        "provenance": {
            "script": "kernels/commission_la4.py", "command": command,
            "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "reference_data": "CheckTomo LA4 tables (mwgeurts/thomas_tomocalc, GPL-3.0), read at run time "
                              "from shared/data/tomotherapy/checktomo_LA4, never copied",
            "engine": ("tomodose TERMA + collapsed cone in water; every fit and the agreement below with the "
                       "kernel kernels/derive_ccc_kernels.py derives for the candidate spectrum (ring/azimuth layout "
                       "of the engine's kernel" + (", staggered azimuths" if stagger else "") + (f", energy groups split at {', '.join(f'{g:g}' for g in groups)} MeV with the "
                                   "TERMA split the same way (engine default since 2026-11-29)" if groups else
                                   ", one polyenergetic kernel") + ")"),
            "unchanged_nominal": ["leaf_transmission", "offaxis_softening_per_rad"],
            "fit_log": {**{k: v for k, v in params.items() if k.endswith(("_before", "_after", "_pass1"))
                           or k in ("seeded_from", "leaf_sigma_fitted_with_g_h")}, **({"note": note} if note else {})},
            **({"spectrum_scan": spectrum_scan} if spectrum_scan else {}),
            **({"history": history} if history else {}),
        },
        "agreement": {**({"before": before["summary"]} if before.get("summary") else {}), "after": after["summary"],
                      **(extra_agreement or {})},
    }
    _atomic_write(out, json.dumps(data, indent=2) + "\n")


def _machine_history(path: Path) -> list:
    """Earlier fits kept by :func:`write_machine`: the ``provenance.history`` of the machine file at
    ``path`` (when it exists) followed by that file's own fit (its date, command, beam model,
    provenance and agreement), so a refit never drops the record of the earlier ones (scans,
    agreement numbers)."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    if old.get("format") != "tomodose-machine":
        return []
    prov = dict(old.get("provenance") or {})
    history = list(prov.pop("history", []))
    history.append({"date_utc": prov.get("date_utc"), "command": prov.get("command"),
                    "beam_model": old.get("beam_model"), "spectrum": old.get("spectrum"),
                    "provenance": {k: v for k, v in prov.items() if k not in ("date_utc", "command")},
                    "agreement": old.get("agreement")})
    return history


def _scan_summary(folder: Path) -> list:
    """TPR rms / max (3-20 cm) of every cached stage-1 candidate in ``folder`` (sorted by T0, Cu)."""
    rows = []
    for f in sorted(Path(folder).glob("T0_*.json")):
        r = json.loads(f.read_text())
        rows.append({"t0_mev": r["t0_mev"], "cu_mm": r["cu_mm"], "kernel": r.get("kernel", f.stem.split("_", 4)[-1]),
                     # the couch-axis reach of the point-dose slab (40 mm for scans before session 12)
                     "slab_reach_mm": r.get("slab_reach_mm", 40.0),
                     "mean_energy_mev": round(r["mean_energy_mev"], 4),
                     "tpr_3_20cm_rms_pct": round(r["rms_3_20cm_pct"], 2),
                     "tpr_3_20cm_max_abs_pct": round(r["max_abs_3_20cm_pct"], 2)})
    return sorted(rows, key=lambda r: (r["kernel"], r["t0_mev"], r["cu_mm"]))


def markdown_tables(before: dict, after: dict, before_label: str = "before") -> str:
    """Before/after agreement tables (Markdown) from two :func:`evaluate` results."""
    head = {"before": "before (nominal)", "shipped": "before (shipped 2026-11-28 fit)"}.get(before_label, before_label)
    out = ["#### Summary", "", f"| quantity | {head} | after (commissioned) |", "|---|---|---|"]
    labels = {"tpr_3_20cm_rms_pct": "TPR 3-20 cm, rms deviation %", "tpr_3_20cm_max_abs_pct": "TPR 3-20 cm, max abs deviation %",
              "of_rms_pct": "output factors, rms deviation %", "of_max_abs_pct": "output factors, max abs deviation %",
              "of_4_leaves_and_more_max_abs_pct": "output factors >= 4 leaves, max abs deviation %",
              "oarx_open_rms": "open-fan OAR (<= 0.215 rad), rms", "oary_rms": "jaw profiles, rms",
              "oarx_leaves_rms": "1/2/4-leaf profiles, rms"}
    for k, lab in labels.items():
        out.append(f"| {lab} | {before['summary'][k]} | {after['summary'][k]} |")
    out += ["", "#### TPR (engine / LA4 - 1, %)", "",
            "| field (jaw mm x leaves) | eq. square cm | " + " | ".join(f"{d:g} cm" for d in EVAL_TPR_DEPTHS_CM) + " |",
            "|---|---|" + "---|" * len(EVAL_TPR_DEPTHS_CM)]
    for name, tag in (("before", before), ("after", after)):
        for key, v in tag["tpr"].items():
            out.append(f"| {key} ({name}) | {v['equivalent_square_cm']:.2f} | "
                       + " | ".join(f"{x:+.2f}" for x in v["deviation_pct"]) + " |")
    out += ["", "#### Output factors at 10 cm depth (isocentre), engine / LA4", "",
            "| jaw | " + " | ".join(f"{n} leaves" for n in EVAL_OF_LEAVES) + " |", "|---|" + "---|" * len(EVAL_OF_LEAVES)]
    for name, tag in (("before", before), ("after", after)):
        for jaw, v in tag["output_factors"].items():
            out.append(f"| {jaw} mm ({name}) | " + " | ".join(
                f"{e:.3f} / {r:.3f} ({d:+.1f} %)" for e, r, d in zip(v["engine"], v["la4"], v["deviation_pct"])) + " |")
    out += ["", "#### Jaw profiles (10 cm MLC width): FWHM at the isocentre plane (mm) and 80-20 % penumbra (mrad), "
            "depths 1.5/5/10/15/20 cm", "", "| jaw | FWHM LA4 | FWHM before | FWHM after | penumbra LA4 | before | after |",
            "|---|---|---|---|---|---|---|"]
    for jaw in after["oary"]:
        b, a = before["oary"][jaw], after["oary"][jaw]
        f = lambda xs: " / ".join(f"{x:.2f}" for x in xs)  # noqa: E731
        out.append(f"| {jaw} mm | {f(a['fwhm_mm_iso_la4'])} | {f(b['fwhm_mm_iso_engine'])} | {f(a['fwhm_mm_iso_engine'])} | "
                   f"{f(a['penumbra_80_20_mrad_la4'])} | {f(b['penumbra_80_20_mrad_engine'])} | {f(a['penumbra_80_20_mrad_engine'])} |")
    out += ["", "#### MLC-defined fields (jaw 25 mm): FWHM at the isocentre plane (mm), depths 1.5/5/10/20 cm", "",
            "| open leaves | LA4 | before | after | rms before | rms after |", "|---|---|---|---|---|---|"]
    for n in after["oarx_leaves"]:
        b, a = before["oarx_leaves"][n], after["oarx_leaves"][n]
        f = lambda xs: " / ".join(f"{x:.2f}" for x in xs)  # noqa: E731
        out.append(f"| {n} | {f(a['fwhm_mm_iso_la4'])} | {f(b['fwhm_mm_iso_engine'])} | {f(a['fwhm_mm_iso_engine'])} | "
                   f"{b['rms']:.3f} | {a['rms']:.3f} |")
    b, a = before["oarx_open"], after["oarx_open"]
    out += ["", "#### Open-fan transverse off-axis ratio (jaw 50 mm), depths 1.5/5/10/20 cm", "",
            "| | LA4 | before | after |", "|---|---|---|---|",
            "| at 0.1 rad | " + " / ".join(f"{x:.3f}" for x in a["at_0.1_rad"]["la4"]) + " | "
            + " / ".join(f"{x:.3f}" for x in b["at_0.1_rad"]["engine"]) + " | "
            + " / ".join(f"{x:.3f}" for x in a["at_0.1_rad"]["engine"]) + " |",
            "| at 0.2 rad | " + " / ".join(f"{x:.3f}" for x in a["at_0.2_rad"]["la4"]) + " | "
            + " / ".join(f"{x:.3f}" for x in b["at_0.2_rad"]["engine"]) + " | "
            + " / ".join(f"{x:.3f}" for x in a["at_0.2_rad"]["engine"]) + " |",
            "| rms (<= 0.215 rad) | | " + " / ".join(f"{x:.4f}" for x in b["rms_per_depth"]) + " | "
            + " / ".join(f"{x:.4f}" for x in a["rms_per_depth"]) + " |"]
    return "\n".join(out) + "\n"


def _study_beam(args, *, offaxis: bool = True):
    """Default beam model and kernel of the first ``--t0`` candidate spectrum for the study stages
    (with the ``--offaxis`` coefficients when given and ``offaxis``)."""
    sp = model_spectrum(float(args.t0.split(",")[0]))
    beam = BeamModel.default(sp)
    if offaxis and args.offaxis:
        beam = beam.replace(offaxis_fluence_coeffs=tuple(float(v) for v in args.offaxis.split(",")))
    return beam, kernel_for_spectrum(sp, args.shared_data)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Commission the default machine against CheckTomo LA4")
    ap.add_argument("--shared-data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--stage", default="spectrum",
                    help="spectrum | oarx | oary | leaves | of (single-stage studies); fit | output | of-parts-<jaw> | "
                         "before | shipped | after | tables (the commissioning run, cached in --work; output: "
                         "stage 2 alone on the cached stage 3-5 results)")
    ap.add_argument("--t0", default="6.0,6.5,7.0,7.5")
    ap.add_argument("--offaxis", default=None, help="c1,c2,... off-axis fluence coefficients")
    ap.add_argument("--softening", type=float, default=None, help="off-axis softening (1/rad), stage spectrum")
    ap.add_argument("--group-edges-mev", default="engine",
                    help="inner energy-group edges of the candidate kernels (MeV, comma separated): 'engine' "
                         "(default: those of la4_kernel(), the engine's static kernel) or 'none' (one "
                         "polyenergetic kernel, the recipe before 2026-11-29)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "tomodose_commissioning")
    ap.add_argument("--parts", default=None, help="comma-separated subset of " + ",".join(EVAL_PARTS))
    ap.add_argument("--spectrum-t0", default=None,
                    help="T0[:Cu mm] of the Schiff-model spectrum for the fit/of-parts/after stages (default: the "
                         "shipped spectrum)")
    ap.add_argument("--seed", choices=("none", "shipped", "shipped-offaxis"), default="none",
                    help="stage fit: start from the shipped stage 3-5 results (off-axis, jaws, leaf edge; "
                         "shipped-offaxis: the off-axis fluence alone) and refit what is missing")
    ap.add_argument("--note", default=None, help="stage after: a note for the machine file's fit log")
    ap.add_argument("--no-isolated", action="store_true",
                    help="stages fit/output: keep the isolated-leaf output loss h at 0 (the model before "
                         "2026-11-29 05:30 UTC)")
    ap.add_argument("--machine-out", type=Path, default=None,
                    help="stage after: write the machine JSON here (implies --write-machine)")
    ap.add_argument("--before-tag", default="before", help="stage tables: before | shipped")
    ap.add_argument("--scan-dir", type=Path, default=None,
                    help="stage after: folder of the stage-1 results summarised in the machine file "
                         "(default WORK/spectrum)")
    ap.add_argument("--write-machine", action="store_true",
                    help="write tomodose/data/machines/tomo_default.json (stage report)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    la4 = read_la4(args.shared_data)
    if args.group_edges_mev == "engine":
        groups = engine_group_edges_mev()
    elif args.group_edges_mev.lower() == "none":
        groups = ()
    else:
        groups = tuple(float(v) for v in args.group_edges_mev.split(","))
    spectrum = fit_spectrum(args.spectrum_t0)
    if args.stage.startswith("of-parts-"):
        run_of_parts(args.shared_data, la4, args.work, int(args.stage.rsplit("-", 1)[1]), spectrum, groups)
        return 0
    if args.stage == "output":
        # stage 2 alone (g, h, jaw factors) on the stage 3-5 results cached in WORK/params.json
        path = args.work / "params.json"
        params = json.loads(path.read_text())
        for key in ("adjacent_leaf_output_gain", "isolated_leaf_output_loss", "jaw_output_factors"):
            params.pop(key, None)
        _atomic_write(path, json.dumps(params, indent=1))
        print(json.dumps(run_fit(args.shared_data, la4, args.work, spectrum, groups, not args.no_isolated), indent=1))
        return 0
    if args.stage == "fit":
        if args.seed == "shipped":
            seed_params(args.work)
        elif args.seed == "shipped-offaxis":
            seed_params(args.work, keys=("offaxis_fluence_coeffs",))
        print(json.dumps(run_fit(args.shared_data, la4, args.work, spectrum, groups, not args.no_isolated), indent=1))
        return 0
    parts = tuple(args.parts.split(",")) if args.parts else EVAL_PARTS
    if args.stage == "before":
        beam, k = nominal_machine(args.shared_data, groups=groups, cache_dir=args.work / "kernels")
        ev = evaluate(beam, k, la4, parts=parts, cache_dir=args.work, tag="before")
        if "summary" in ev:
            _atomic_write(args.work / "before.json", json.dumps(ev, indent=1))
            print(json.dumps(ev["summary"], indent=1))
        return 0
    if args.stage == "shipped":
        # the machine as shipped (BeamModel.default() and the engine's own kernel), in the current engine
        ev = evaluate(BeamModel.default(), la4_kernel(), la4, parts=parts, cache_dir=args.work, tag="shipped")
        if "summary" in ev:
            _atomic_write(args.work / "shipped.json", json.dumps(ev, indent=1))
            print(json.dumps(ev["summary"], indent=1))
        return 0
    if args.stage == "after":
        params = json.loads((args.work / "params.json").read_text())
        beam = machine_from_params(params, spectrum)
        # the kernel derive_ccc_kernels.py makes for this spectrum (the shipped default kernel when the
        # spectrum is the shipped one); the engines apply the jaw factors themselves (compute_terma)
        kernel = kernel_for_spectrum(spectrum, args.shared_data, group_edges_mev=groups, cache_dir=args.work / "kernels")
        ev = evaluate(beam, kernel, la4, parts=parts, cache_dir=args.work, tag="after")
        if "summary" not in ev:
            return 0
        _atomic_write(args.work / "after.json", json.dumps(ev, indent=1))
        print(json.dumps(ev["summary"], indent=1))
        if args.write_machine or args.machine_out:
            bf = args.work / "before.json"
            before = json.loads(bf.read_text()) if bf.is_file() else {"summary": None}
            sf = args.work / "shipped.json"
            extra = {"shipped_2026_11_28": json.loads(sf.read_text())["summary"]} if sf.is_file() else None
            t0, cu = (float(v) for v in ((args.spectrum_t0 or "7.5").split(":") + ["1.5"])[:2])
            g = ",".join(f"{v:g}" for v in groups) if groups else "none"
            st = f" --spectrum-t0 {args.spectrum_t0}" if args.spectrum_t0 else ""
            cmd = (f"python kernels/commission_la4.py --stage spectrum --t0 <scan> --group-edges-mev {g} --work W; "
                   f"python kernels/commission_la4.py --stage fit{st} --group-edges-mev {g} --work W"
                   + ("" if args.seed == "none" else f" --seed {args.seed}") + "; "
                   + (f"python kernels/commission_la4.py --stage before --group-edges-mev {g} --work W; " if bf.is_file() else "")
                   + ("python kernels/commission_la4.py --stage shipped --work W; " if sf.is_file() else "")
                   + f"python kernels/commission_la4.py --stage after{st} --group-edges-mev {g} --work W --write-machine "
                   f"(then python kernels/derive_spectrum.py --t0 {t0:g}" + ("" if cu == 1.5 else f" --cu-mm {cu:g}")
                   + " ships the spectrum)")
            out = args.machine_out or ROOT / "tomodose" / "data" / "machines" / "tomo_default.json"
            write_machine(beam, params, before, ev, out, cmd, t0_mev=t0, cu_mm=cu, groups=groups, extra_agreement=extra,
                          spectrum_scan=_scan_summary(args.scan_dir or args.work / "spectrum"),
                          stagger=bool(getattr(kernel, "azimuth_stagger", False)), note=args.note)
            print(f"wrote {out}")
        return 0
    if args.stage == "tables":
        before = json.loads((args.work / f"{args.before_tag}.json").read_text())
        after = json.loads((args.work / "after.json").read_text())
        print(markdown_tables(before, after, before_label=args.before_tag))
        return 0
    if args.stage == "spectrum":
        # one cached result per candidate (resumable; items "T0[:Cu mm]")
        folder = args.work / "spectrum"
        # the result names carry the kernel layout the engine had (energy groups, azimuth stagger)
        tag = ("single" if not groups else "g" + "-".join(f"{v:g}" for v in groups)) + \
            ("_stagger" if getattr(la4_kernel(), "azimuth_stagger", False) else "")
        for item in args.t0.split(","):
            t0, cu = (float(v) for v in (item.split(":") + ["1.5"])[:2])
            extra = ("" if args.offaxis is None else f"_oa{args.offaxis}") + \
                    ("" if args.softening is None else f"_soft{args.softening:g}")
            f = folder / f"T0_{t0:g}_cu_{cu:g}_{tag}{extra}.json"
            if f.is_file():
                res = json.loads(f.read_text())
            else:
                t = time.process_time()
                sp = model_spectrum(t0, cu_mm=cu)
                k = kernel_for_spectrum(sp, args.shared_data, group_edges_mev=groups, cache_dir=args.work / "kernels")
                beam = BeamModel.default(sp)
                if args.offaxis:
                    beam = beam.replace(offaxis_fluence_coeffs=tuple(float(v) for v in args.offaxis.split(",")))
                if args.softening is not None:
                    beam = beam.replace(offaxis_softening_per_rad=args.softening)
                cmp = tpr_comparison(beam, k, la4)
                dev = tpr_deviations(cmp)
                res = {"t0_mev": t0, "cu_mm": cu, "groups_mev": list(groups), "offaxis": args.offaxis,
                       "kernel": tag, "engine_kernel": la4_kernel().name, "slab_reach_mm": SLAB_REACH_MM,
                       "softening_per_rad": beam.offaxis_softening_per_rad,
                       "mean_energy_mev": sp.mean_energy_mev, "depths_cm": list(TPR_FIT_DEPTHS_CM),
                       "rms_3_20cm_pct": 100 * tpr_rms(cmp), "max_abs_3_20cm_pct": 100 * float(np.abs(dev).max()),
                       "fields": {f"{j}x{n}": {"equivalent_square_cm": s_, "engine": e.tolist(), "la4": r.tolist(),
                                              "deviation_pct": (100 * (e / r - 1)).tolist()}
                                  for (j, n), (e, r, s_) in cmp.items()},
                       "cpu_s": time.process_time() - t}
                _atomic_write(f, json.dumps(res, indent=1))
            print(f"T0 {t0} Cu {cu} ({tag}{extra}): mean {res['mean_energy_mev']:.3f} MeV rms(3-20 cm) "
                  f"{res['rms_3_20cm_pct']:.2f} % max {res['max_abs_3_20cm_pct']:.2f} % ({res['cpu_s']:.0f} s CPU)",
                  flush=True)
            for key, v in res["fields"].items():
                print("  ", key, f"s={v['equivalent_square_cm']:.2f}", " ".join(f"{x:+.2f}" for x in v["deviation_pct"]),
                      flush=True)
    if args.stage == "oarx":
        beam, k = _study_beam(args, offaxis=False)
        c, b, a, det = fit_offaxis(beam, k, la4)
        np.set_printoptions(precision=3, suppress=True, linewidth=200)
        print("coeffs", c, "rms before", b, "after", a)
        print(det["la4"][:, ::5]); print(det["before"][:, ::5]); print(det["after"][:, ::5])
    if args.stage == "oary":
        beam, k = _study_beam(args)
        for sig in (1.5, 3.0):
            res = jaw_comparison(beam.replace(jaw_penumbra_sigma_mm=sig), k, la4)
            for jaw, r in res.items():
                print(sig, jaw, "hm", np.round(r["hm_la4"], 2), np.round(r["hm_engine"], 2), "pen",
                      np.round(r["pen_la4"], 2), np.round(r["pen_engine"], 2), flush=True)
    if args.stage == "leaves":
        beam, k = _study_beam(args)
        sg, runs = fit_leaf_sigma(beam, k, la4)
        print("leaf sigma", sg)
        for s_, r in runs.items():
            for n, d in r.items():
                print(s_, n, "hm", np.round(d["hm_la4"], 2), np.round(d["hm_engine"], 2), "rms", round(d["rms"], 4), flush=True)
    if args.stage == "of":
        beam, k = _study_beam(args)
        for jaw, (n, e, r) in engine_output_factors(beam, k, la4).items():
            print(jaw, " ".join(f"{a}:{b:.3f}/{c:.3f}" for a, b, c in zip(n, e, r)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
