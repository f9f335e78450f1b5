#!/usr/bin/env python
"""Which fields are behind the LA4 TPR columns, and does the engine follow them? (engine as shipped)

The CheckTomo LA4 TPR table is labelled by the equivalent square ``2 L W / (L + W)`` of a jaw
``L`` and an MLC-open width ``W``. Fifteen of its seventeen columns are, to the three digits of
the label, the equivalent squares of tomotherapy fields that the ``[SPdata]`` widths name
(0.625 ... 40 cm) with the 1.0 / 2.5 / 5.0 cm jaws: 0.769 = 1 x 0.625 cm, 1.11 = 1 x 1.25,
1.43 = 1 x 2.5, 1.82 = 1 x 10, 1.95 = 1 x 40, 2.5 = 2.5 x 2.5, 4.0 = 2.5 x 10, 4.44 = 2.5 x 20,
4.71 = 2.5 x 40, 5.0 = 5 x 5, 6.67 = 5 x 10, 8.0 = 5 x 20, 8.89 = 5 x 40 (1.67 and 3.33 are two
fields each; 1.0 and 2.1 none). This study computes, with the shipped engine (collapsed cone,
``BeamModel.default()``, the static kernel ``commission_la4.la4_kernel()``, the point geometry of
``kernels/commission_la4.point_dose``: detector at the isocentre under ``d`` cm of water, a
tank-like slab), the TPR normalised at 10 cm of the MLC fields of one jaw at several open widths
and compares each with the column of its own field, so that a residual that follows the open
width (or only the 40 cm fan) can be told from one that follows the jaw.

The LA4 files are GPL-3.0 and read at run time from ``--shared-data`` (never copied). Each point
dose is cached in ``--work`` (JSON, resumable).

Usage::

    python kernels/study_la4_field_columns.py --work W [--fields 50x8,50x16,50x32,50x64,...]
        [--depths 3,5,20,25] [--shared-data ../shared/data]
    python kernels/study_la4_field_columns.py --work W --detector-width 10x64   # 2 point doses
    python kernels/study_la4_field_columns.py --work W --fields 50x32 --depths 3,20 --softening 0.5

The default fields are every jaw-50 and jaw-25 field of 10 cm and more with a column of its own, the
5 x 5 cm field and the 1 cm jaw's 10 and 40 cm fields. 30-150 s of wall time per point dose on 2 idle
cores (the wider and deeper, the longer). Results of session 14 (2026-11-30; the 40 cm fans' rows are
the identical points of the session 13 evaluation ``--stage shipped``) in ``docs/commissioning.md``
(section *LA4's columns are tomotherapy fields*); the engine's dose gain from 20 to 40 cm open width
there is the ratio of the cached point doses ``W/point_<jaw>x64_<d>cm.json`` / ``..x32..``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "kernels"))

import commission_la4 as C  # noqa: E402

from tomodose.terma.beam_model import BeamModel  # noqa: E402

log = logging.getLogger("study_la4_field_columns")

#: the 10 cm normalisation depth is always computed
NORM_CM = 10.0


def parse_fields(text: str) -> list[tuple[int, int]]:
    """``"50x16,25x32"`` -> [(50, 16), (25, 32)] (jaw mm, open leaves)."""
    out = []
    for item in text.split(","):
        jaw, _, n = item.strip().partition("x")
        if int(jaw) not in C.JAWS_MM or not 1 <= int(n) <= 64:
            raise ValueError(f"fields: {item!r} must be JAWxN with JAW in {C.JAWS_MM} and N in 1..64")
        out.append((int(jaw), int(n)))
    return out


def column_tpr(la4: dict, jaw_mm: int, n_open: int, depths_cm) -> tuple[float, np.ndarray]:
    """Label (cm) and TPR at ``depths_cm`` of the LA4 column of this very field
    (:func:`commission_la4.la4_field_columns`: no interpolation in size; raises when the field has no
    column of its own)."""
    t = la4[50]["tpr"]
    width_cm = n_open * C.LEAF_MM / 10.0
    k = next((k for (jaw, w), k in C.la4_field_columns(la4).items() if jaw == jaw_mm and np.isclose(w, width_cm)), None)
    if k is None:
        raise ValueError(f"no LA4 column of its own for {jaw_mm} mm x {n_open} leaves ({width_cm:g} cm)")
    return float(t["sizes_cm"][k]), np.interp(depths_cm, t["depths_cm"], t["table"][:, k])


def cached_point_dose(work: Path, beam, kernel, jaw_mm: int, n_open: int, depth_cm: float, tag: str = "") -> float:
    f = work / f"point_{jaw_mm}x{n_open}_{depth_cm:g}cm{tag}.json"
    if f.is_file():
        return float(json.loads(f.read_text())["dose"])
    t = time.perf_counter()
    d_mm = 10.0 * depth_cm
    v = C.point_dose(beam, kernel, jaw_mm, n_open, 850.0 - d_mm, d_mm)
    C._atomic_write(f, json.dumps({"dose": v, "kernel": kernel.name, "wall_s": time.perf_counter() - t}))
    log.warning("%d x %d at %g cm: %.5g (%.0f s)", jaw_mm, n_open, depth_cm, v, time.perf_counter() - t)
    return v


def detector_average_effect(beam, kernel, jaw_mm: int, n_open: int, *, depths_cm=(3.0, 10.0), dz_mm: float = 1.0,
                            half_widths_mm=(1.0, 2.0, 3.0, 3.5)) -> dict:
    """How much a detector of finite width along the couch changes TPR(d0)/TPR(d1) of a field.

    The dose on the central axis at the isocentre under ``d`` cm of water (the TPR geometry of
    :func:`commission_la4.point_dose`, ``dz_mm`` voxels across the jaw) is averaged uniformly over
    ``|z| <= h`` for each half width ``h`` (mm). Returns ``{"tpr_centre": TPR(d0)/TPR(d1) at the
    centre, "change_pct": {h: % change of that ratio for the averaged dose}}``.
    """
    z = np.arange(-8.0, 8.0 + 1e-9, 0.25)
    prof = []
    for d in depths_cm:
        d_mm = 10.0 * d
        dose, grid = C.water_dose(beam, kernel, jaw_mm, C.open_leaves(n_open), 850.0 - d_mm, max_depth_mm=d_mm + 100.0,
                                  half_x_mm=C._half_x(n_open), half_z_mm=0.5 * jaw_mm + C.SLAB_REACH_MM,
                                  spacing_mm=(float(np.clip(n_open * C.LEAF_MM / 5.0, 1.25, 5.0)), 2.5, dz_mm))
        pts = np.c_[np.full_like(z, C.field_centre_x_mm(n_open)), np.full_like(z, d_mm), z]
        prof.append(C.sample(dose, grid, pts))
    c = z.size // 2
    change = {}
    for h in half_widths_mm:
        m = np.abs(z) <= h + 1e-9
        change[h] = round(100.0 * ((prof[0][m].mean() / prof[0][c]) / (prof[1][m].mean() / prof[1][c]) - 1.0), 3)
    return {"tpr_centre": float(prof[0][c] / prof[1][c]), "change_pct": change}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared-data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--fields", default="50x8,50x16,50x32,50x64,25x16,25x32,25x64,10x16,10x64")
    ap.add_argument("--depths", default="3,5,20,25", help="depths in cm (10 cm is the normalisation)")
    ap.add_argument("--softening", type=float, default=None,
                    help="off-axis softening (1/rad) instead of the shipped machine's (cached apart)")
    ap.add_argument("--detector-width", default=None, metavar="JAWxN",
                    help="instead: the detector-width effect on TPR(3)/TPR(10) of one field "
                         "(1 mm voxels across the jaw)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.detector_width:
        (jaw, n), = parse_fields(args.detector_width)
        res = detector_average_effect(BeamModel.default(), C.la4_kernel(), jaw, n)
        print(json.dumps(res, indent=1))
        return 0
    fields = parse_fields(args.fields)
    depths = [float(v) for v in args.depths.split(",")]
    la4 = C.read_la4(args.shared_data)
    args.work.mkdir(parents=True, exist_ok=True)
    beam, kernel = BeamModel.default(), C.la4_kernel()
    tag = ""
    if args.softening is not None:
        beam, tag = beam.replace(offaxis_softening_per_rad=args.softening), f"_soft{args.softening:g}"
    rows = {}
    for jaw, n in fields:
        size, ref = column_tpr(la4, jaw, n, depths)
        norm = cached_point_dose(args.work, beam, kernel, jaw, n, NORM_CM, tag)
        eng = np.array([cached_point_dose(args.work, beam, kernel, jaw, n, d, tag) for d in depths]) / norm
        rows[f"{jaw}x{n}"] = {"column_cm": size, "depths_cm": depths, "engine": eng.round(5).tolist(),
                              "la4": ref.round(5).tolist(), "deviation_pct": (100 * (eng / ref - 1)).round(2).tolist()}
    print("| field | LA4 column (cm) | " + " | ".join(f"{d:g} cm" for d in depths) + " |")
    print("|---|---|" + "---|" * len(depths))
    for key, r in rows.items():
        jaw, n = key.split("x")
        print(f"| {int(jaw) / 10:g} x {int(n) * C.LEAF_MM / 10:g} cm | {r['column_cm']:g} | "
              + " | ".join(f"{v:+.2f}" for v in r["deviation_pct"]) + " |")
    C._atomic_write(args.work / f"field_columns{tag}.json", json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
