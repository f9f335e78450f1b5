"""Shared-direction configurations on the engine's small helical test cases (``tests/test_dose.py``).

* grouping case (water cylinder r = 75 mm, 5 mm grid, 102 projections, jaw 25 mm, all leaves
  open, 1 sub-sample): max difference above 50 % of the maximum from the per-projection transport
  (``grouping="projection"``, every projection tilted toward its own source; the engine's bound
  for its default is 2 %);
* water helix (r = 60 mm, 5 mm grid, 2 rotations, 12 leaves): max difference from the per-group
  transport (every ring per angle group; the documented bound of the shared option is 1.5 %) and
  the deposited energy ratio in the body.

A configuration is ``reference`` or a comma list of ``shared_direction_dose`` keywords, run with
``shared_from_deg=0`` (``n_directions`` passed as ``shared_directions``, the others injected;
``shared_from_deg=8`` etc. keeps the rings below that angle per angle group).

    python benchmarks/ccc_study_grouping.py --config n_directions=512 --config n_directions=128,coarse_factor=2
"""

from __future__ import annotations

import argparse
import functools
import sys

from tomodose.benchmarking.harness import parse_options


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", action="append", default=[])
    args = p.parse_args(argv)
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.test_dose (the cases)
    import numpy as np

    import tomodose.transport.collapsed_cone as cc
    from tomodose.delivery.plan import HelicalPlan
    from tomodose.dose import compute_dose
    from tomodose.dose.engine import _ccc_transport, _terma_groups
    from tomodose.geometry.grid import Grid, ImageVolume
    from tomodose.geometry.patient import PatientModel
    from tomodose.terma.terma import compute_terma
    from tests.test_dose import SMALL_REF, _water_helix

    original = cc.shared_direction_dose
    grid = Grid.from_extent((-80, -80, -40), (80, 80, 40), (5.0, 5.0, 5.0))
    x, y, _ = grid.meshgrid_mm()
    hu = np.where((x**2 + y**2 + 0 * _) <= 75**2, 0.0, -1000.0).astype(np.float32)
    pat = PatientModel(ImageVolume(grid, hu, "HU"))
    plan = HelicalPlan(sinogram=np.full((102, 64), 1.0), field_width_mm=25.0, pitch=0.43, gantry_period_s=15.0,
                       couch_start_mm=-0.43 * 25)
    single = compute_dose(pat, plan, reference=SMALL_REF, progress=False, n_subsamples=1,
                          grouping="projection").per_fraction.array.astype(float)
    high = single > 0.5 * single.max()
    hpat, hplan = _water_helix()
    hseq = hplan.projections()
    groups = _terma_groups(hseq, compute_terma(hpat, hseq, n_subsamples=1, progress=False))
    href = _ccc_transport(hpat, groups, progress=False, shared_from_deg=None).astype(float)
    body = hpat.mass_density_g_cm3 > 0.5
    for text in args.config:
        opts = {}
        if text != "reference":
            cfg = parse_options(text)
            cc.shared_direction_dose = functools.partial(original, **{k: v for k, v in cfg.items()
                                                                      if k not in ("n_directions", "shared_from_deg")})
            opts = {"shared_from_deg": float(cfg.get("shared_from_deg", 0.0)),
                    "shared_directions": int(cfg.get("n_directions", 512))}
        else:
            cc.shared_direction_dose = original
        grouped = compute_dose(pat, plan, reference=SMALL_REF, progress=False, n_subsamples=1,
                               **opts).per_fraction.array.astype(float)
        err = np.abs(grouped - single)[high].max() / single.max()
        sh = _ccc_transport(hpat, groups, progress=False, **opts).astype(float)
        herr = np.abs(sh - href).max() / href.max()
        print(f"{text}: grouping case max diff vs per projection (> 50 %) {100 * err:.2f} %; water helix vs "
              f"per group {100 * herr:.2f} % of max, energy {sh[body].sum() / href[body].sum():.5f}", flush=True)
    cc.shared_direction_dose = original
    return 0


if __name__ == "__main__":
    sys.exit(main())
