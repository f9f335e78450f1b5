#!/usr/bin/env python
"""CPU cost of the collapsed-cone surface correction (docs/collapsed_cone.md section 4g).

Times (process CPU and wall) the tilted static transport and the shared-direction transport on a
100 x 100 x 80 grid (3 mm; water cylinder of radius 135 mm in air, with a lung block), without and
with ``surface_correction``, after a warm-up call of each (JIT excluded), and the surface map alone.

    nice -n 10 python benchmarks/ccc_surface_timing.py
"""

from __future__ import annotations

import json
import time

import numpy as np


def main() -> int:
    from ccc_fast_timing import timing_cylinder  # this folder (the script's own path entry)

    from tomodose.transport.ccc_surface import load_surface_correction, surface_weight
    from tomodose.transport.collapsed_cone import collapsed_cone_dose, shared_direction_dose
    from tomodose.transport.kernels import load_kernel

    grid, rho, terma = timing_cylinder()
    kernel = load_kernel()
    corr = load_surface_correction()
    out = {}

    def timed(label, fn):
        fn()  # warm-up (JIT / cache load)
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        out[label] = {"cpu_s": round(time.process_time() - c0, 2), "wall_s": round(time.perf_counter() - w0, 2)}
        print(label, json.dumps(out[label]), flush=True)

    src = (0.0, -850.0, 0.0)
    timed("surface map", lambda: surface_weight(rho, grid.spacing_mm, corr))
    for on in (False, True):
        timed(f"static tilted, surface {on}", lambda: collapsed_cone_dose(
            terma, rho, grid, source_position_mm=src, kernel=kernel, progress=False, surface_correction=on))
    beams = np.array([[np.sin(a), np.cos(a), 0.0] for a in np.radians(np.arange(0, 360, 30))])
    tg = np.stack([terma] * beams.shape[0]).astype(np.float32)
    for on in (False, True):
        timed(f"shared 96 directions, surface {on}", lambda: shared_direction_dose(
            tg, beams, rho, grid, kernel=kernel, n_directions=96, progress=False, surface_correction=on))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
