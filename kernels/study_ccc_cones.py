#!/usr/bin/env python
"""Accuracy/speed study of the number of collapsed cones (rings x azimuths) and exponential terms.

For each configuration the default polyenergetic kernel (same TERMA weights as the shipped table)
is re-collapsed and the dose of three test cases is computed with kernel tilting toward a source
at 85 cm: a 4 x 2.5 cm field in water, the same with a lung slab (density 0.25 between 4 and 10 cm
depth), and a 1 x 1 cm field in water. Doses are compared with a fine reference (24 rings of
7.5 deg x 16 azimuths = 384 cones). Reported: largest |difference| in % of the reference maximum
(voxels above 20 % of the maximum), mean |difference| there, and the transport time.

Usage::

    python kernels/study_ccc_cones.py [--shared-data ../shared/data] [--quick]
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

from tomodose.evaluation.gamma import gamma_index  # noqa: E402
from tomodose.geometry.grid import Grid, ImageVolume  # noqa: E402
from tomodose.transport import collapsed_cone_dose, load_kernel  # noqa: E402
from tomodose.transport.kernels import collapse_kernel, polyenergetic_kernel  # noqa: E402

sys.path.insert(0, str(ROOT / "kernels"))
from _common import read_mono_table  # noqa: E402

SAD_MM = 850.0


def cases(spacing_mm: float = 2.5):
    n_lat, n_dep = int(150 / spacing_mm), int(150 / spacing_mm)
    grid = Grid((n_lat, n_dep, n_lat), (spacing_mm,) * 3,
                (-(n_lat - 1) * spacing_mm / 2, spacing_mm / 2, -(n_lat - 1) * spacing_mm / 2))
    # beam travels along +y (anterior -> posterior); surface at y = 0, source at y = -850 mm
    x, y, z = grid.meshgrid_mm()
    src = np.array([0.0, -SAD_MM, 0.0])
    mag = (y - src[1]) / SAD_MM
    depth_cm = y / 10.0
    out = {}
    for name, (wx, wz), lung in [("4x2.5cm water", (40.0, 25.0), False),
                                 ("4x2.5cm lung slab", (40.0, 25.0), True),
                                 ("1x1cm water", (10.0, 10.0), False)]:
        rho = np.ones(grid.shape)
        if lung:
            rho[:, (y[0, :, 0] > 40) & (y[0, :, 0] < 100), :] = 0.25
        rad_depth = np.cumsum(rho, axis=1) * spacing_mm / 10.0 - 0.5 * rho * spacing_mm / 10.0
        inside = (np.abs(x) <= wx / 2 * mag) & (np.abs(z) <= wz / 2 * mag)
        terma = inside * np.exp(-0.05 * rad_depth) / mag**2 * (depth_cm >= 0)
        out[name] = (grid, np.ascontiguousarray(terma, dtype=np.float64), rho, src)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared-data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--quick", action="store_true", help="fewer configurations")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = ap.parse_args(argv)
    base = load_kernel()
    edk, _ = read_mono_table(args.shared_data)  # the merged table the shipped kernel came from
    fine = polyenergetic_kernel(edk, np.asarray(base.provenance["terma_weights"]))
    # (rings, azimuths, terms, ring edges in fine-cone indices or None for even rings)
    fwd = (0, 1, 2, 4, 6, 8, 12, 16, 24, 32, 40, 48)  # 3.75, 7.5, 15, 22.5, 30, 45, 60, 90, ... deg
    fwd8 = (0, 2, 4, 8, 12, 16, 24, 36, 48)  # 7.5, 15, 30, 45, 60, 90, 135, 180 deg
    configs = [(24, 16, 4, None)] + ([(12, 8, 4, None), (11, 8, 4, fwd)] if args.quick else [
        (6, 8, 4, None), (8, 8, 4, fwd8), (12, 6, 4, None), (12, 8, 3, None), (12, 8, 4, None),
        (11, 8, 4, fwd), (11, 6, 4, fwd), (11, 12, 4, fwd), (12, 12, 4, None), (16, 8, 4, None)])
    data = cases()
    ref = {}
    rows = []
    for n_polar, n_az, n_terms, groups in configs:
        k = collapse_kernel(fine, edk.theta_edges_deg, edk.radius_edges_cm, n_polar=n_polar,
                            n_azimuth=n_az, n_terms=n_terms, polar_group_edges=groups)
        row = {"n_polar": n_polar, "n_azimuth": n_az, "n_terms": n_terms,
               "polar_edges_deg": [round(float(v), 2) for v in k.polar_edges_deg],
               "n_directions": k.n_directions, "fit_error_summed_pct": 100 * k.fit_error(summed=True)}
        t_total = 0.0
        for name, (grid, terma, rho, src) in data.items():
            collapsed_cone_dose(terma[:4, :4, :4] * 0 + 1, rho[:4, :4, :4], Grid((4, 4, 4), (3, 3, 3)),
                                beam_direction=(0, 1, 0), kernel=k, progress=False)  # JIT warm
            t0 = time.perf_counter()
            d = collapsed_cone_dose(terma, rho, grid, source_position_mm=src, kernel=k,
                                    progress=False).astype(np.float64)
            t_total += time.perf_counter() - t0
            if (n_polar, n_az, n_terms, groups) == configs[0]:
                ref[name] = d
                continue
            r = ref[name]
            diff = np.abs(d - r) / r.max() * 100
            c = r.shape[0] // 2
            infield = r > 0.8 * r.max()
            ref_vol = ImageVolume(grid, r, "Gy")
            ev_vol = ImageVolume(grid, d, "Gy")
            g2 = gamma_index(ref_vol, ev_vol, dose_percent=2, distance_mm=1, cutoff_percent=20,
                             progress=False)
            g1 = gamma_index(ref_vol, ev_vol, dose_percent=1, distance_mm=1, cutoff_percent=20,
                             progress=False)
            row[name] = {
                "cax_max_pct": round(float(diff[c, 4:, c].max()), 2),
                "infield_max_pct": round(float(diff[infield].max()), 2),
                "max_pct_above_20pct": round(float(diff[r > 0.2 * r.max()].max()), 2),
                "gamma_2pct_1mm_pass": round(float(g2.pass_rate_percent), 2),
                "gamma_1pct_1mm_pass": round(float(g1.pass_rate_percent), 2),
            }
        row["time_s_3_cases"] = round(t_total, 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
