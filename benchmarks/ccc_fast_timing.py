#!/usr/bin/env python
"""Transport CPU of the collapsed cone with and without the surface correction (issues 4/8,
docs/collapsed_cone.md section 4g-1).

One configuration per process (run it under old and new code alternately, e.g. with
``PYTHONPATH=<old checkout>``): the transport kernels (``transport_direction``,
``transport_direct_sources``) are wrapped to sum their process CPU and wall time; a small warm-up
call of the same code paths runs first (JIT / cache load excluded). Prints one JSON line; ``--out``
saves the dose (float64 ``.npy``) for exactness comparisons.

Cases: ``cyl_static`` (tilted static transport of a fan on a 100 x 100 x 80 grid of 3 mm, water
cylinder with a lung block, :func:`timing_cylinder`, as ``benchmarks/ccc_surface_timing.py``), ``cyl_shared`` (shared
transport, 12 beams, 96 directions), ``water_j50`` / ``water_j10`` (``engine_dose`` of the Monte Carlo
case, static beams, the calibration field included), ``liver_fast`` / ``liver_default`` (the helical
liver plan on 3 mm, ``FAST_CCC_OPTIONS`` / default options, the benchmark goal's problem).

    nice -n 10 python benchmarks/ccc_fast_timing.py --case liver_fast --surface 1 --n-azimuth 16
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

_ACC = {"cpu": 0.0, "wall": 0.0, "calls": 0}


def _wrap_kernels():
    from tomodose._kernels import collapsed_cone as _k

    for name in ("transport_direction", "transport_direct_sources", "transport_direction_surface",
                 "transport_direct_sources_surface"):
        fn = getattr(_k, name, None)
        if fn is None:  # the *_surface names exist from the series escape (7ffe114+) to the merge (session 11)
            continue

        def timed(*args, _fn=fn, **kw):
            c0, w0 = time.process_time(), time.perf_counter()
            try:
                return _fn(*args, **kw)
            finally:
                _ACC["cpu"] += time.process_time() - c0
                _ACC["wall"] += time.perf_counter() - w0
                _ACC["calls"] += 1

        setattr(_k, name, timed)


def timing_cylinder():
    """(grid, density, TERMA) of the timing cylinder: 100 x 100 x 80 voxels of 3 mm, water cylinder of radius
    135 mm in air with a lung block (0.25 g/cm3), a 100 mm wide fan of exponentially falling TERMA along +y
    (also ``benchmarks/ccc_surface_timing.py``)."""
    from tomodose.geometry.grid import Grid

    grid = Grid((80, 100, 100), (3.0, 3.0, 3.0), (-148.5, -148.5, -118.5))
    z, y, x = np.meshgrid(*(np.arange(n) for n in grid.shape), indexing="ij")
    xm = grid.origin_mm[0] + x * 3.0
    ym = grid.origin_mm[1] + y * 3.0
    rho = np.where(xm**2 + ym**2 <= 135.0**2, 1.0, 0.0012)
    rho[(np.abs(xm - 40) < 30) & (np.abs(ym) < 40)] = 0.25
    terma = np.where((np.abs(xm) < 50) & (rho > 0.1), np.exp(-0.005 * (ym + 150)), 0.0)
    return grid, rho, terma


def _setup(case: str, surface: bool, n_azimuth: int):
    """(warm-up callable, measured callable) of a case."""
    from tomodose.transport.kernels import load_kernel

    kernel = load_kernel()
    if n_azimuth != kernel.n_azimuth:
        kernel = kernel.with_azimuths(int(n_azimuth))
    if case.startswith("cyl"):
        from tomodose.transport.collapsed_cone import collapsed_cone_dose, shared_direction_dose

        grid, rho, terma = timing_cylinder()
        if case == "cyl_static":
            def run(g=grid, r=rho, t=terma):
                return collapsed_cone_dose(t, r, g, source_position_mm=(0.0, -850.0, 0.0), kernel=kernel,
                                           progress=False, surface_correction=surface)
            sl = (slice(30, 40), slice(0, 100, 4), slice(0, 100, 4))
            from tomodose.geometry.grid import Grid
            g2 = Grid((10, 25, 25), (12.0, 12.0, 3.0), grid.origin_mm)
            warm = lambda: run(g2, np.ascontiguousarray(rho[sl]), np.ascontiguousarray(terma[sl]))  # noqa: E731
            return warm, run
        beams = np.array([[np.sin(a), np.cos(a), 0.0] for a in np.radians(np.arange(0, 360, 30))])
        tg = np.stack([terma] * beams.shape[0]).astype(np.float32)

        def run():
            return shared_direction_dose(tg, beams, rho, grid, kernel=kernel, n_directions=96, progress=False,
                                         surface_correction=surface)
        return run, run
    if case.startswith("water"):
        from tomodose.evaluation.reference import REFERENCE_DIR, engine_dose, load_reference

        ref = load_reference(REFERENCE_DIR / f"{case}.h5")
        opts = {"surface_correction": surface, "static_n_azimuth": int(n_azimuth)}

        def run():
            return engine_dose(ref, "collapsed_cone", progress=False, **opts)
        return None, run
    from tomodose.benchmarking.cases import _plan, _patient
    from tomodose.dose import compute_dose
    from tomodose.dose.engine import FAST_CCC_OPTIONS

    opts = dict(FAST_CCC_OPTIONS) if case == "liver_fast" else {}
    opts["surface_correction"] = surface
    patient = _patient(3.0)
    plan = _plan(patient)
    small = _patient(12.0)
    small_plan = _plan(small, 0.3)

    def run(p=patient, pl=plan):
        res = compute_dose(p, pl, engine="collapsed_cone", progress=False, **opts)
        _ACC["timings"] = {k: round(float(v), 2) for k, v in res.metadata.get("timings_s", {}).items()
                           if isinstance(v, (int, float))}
        return res.per_fraction.array
    return (lambda: run(small, small_plan)), run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", required=True,
                    choices=("cyl_static", "cyl_shared", "water_j50", "water_j10", "liver_fast", "liver_default"))
    ap.add_argument("--surface", type=int, default=1)
    ap.add_argument("--n-azimuth", type=int, default=8)
    ap.add_argument("--out", default=None, help="save the dose here (.npy)")
    ap.add_argument("--label", default="")
    a = ap.parse_args(argv)
    _wrap_kernels()
    warm, run = _setup(a.case, bool(a.surface), a.n_azimuth)
    if warm is not None:
        warm()
    else:  # the static engine on a tiny case: same kernels and types
        from tomodose._kernels import collapsed_cone as _k  # noqa: F401
        run_small = _setup("cyl_static", bool(a.surface), a.n_azimuth)[0]
        run_small()
    _ACC.update(cpu=0.0, wall=0.0, calls=0)
    c0, w0 = time.process_time(), time.perf_counter()
    dose = run()
    out = {"label": a.label, "case": a.case, "surface": a.surface, "n_azimuth": a.n_azimuth,
           "transport_cpu_s": round(_ACC["cpu"], 2), "transport_wall_s": round(_ACC["wall"], 2),
           "calls": _ACC["calls"], "cpu_s": round(time.process_time() - c0, 2),
           "wall_s": round(time.perf_counter() - w0, 2), "threads": os.environ.get("NUMBA_NUM_THREADS", ""),
           "max_dose": float(np.max(dose)), "engine_timings_s": _ACC.get("timings", {})}
    if a.out:
        np.save(a.out, np.asarray(dose, dtype=np.float64))
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
