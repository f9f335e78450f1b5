#!/usr/bin/env python
"""Study (issue 8): the pencil beam's lateral density scaling at lung and bone interfaces.

The pencil-beam engine scales every Gaussian of its kernel laterally by the *local* water-equivalent
density of the voxel (O'Connor). At an interface this changes the lateral spread at once, while the
particles carrying a Gaussian's energy crossed the medium *upstream* of the voxel: the Monte Carlo
slab references show the consequence (``slab_lung``: -6.8 % in the first lung bin, +7.4 % in the
first water bin behind the lung, a slow -3 ... +4 % drift inside and behind it).

Variant studied here, not in the engine: Gaussian ``i`` (width ``sigma_i`` mm of water) is scaled by
an *effective* density, the harmonic mean of the water-equivalent density along the ray upstream of
the voxel, weighted by ``exp(-s / L_i)`` in radiological distance ``s`` (medium only: density
>= 0.05 g/cm3), with ``L_i = C sigma_i``: energy spread laterally by ``sigma_i`` travelled a path of
about that length. ``C = 1`` is the natural scale (no fit); other values show the sensitivity.

Method: the stored static gantry-0 references (beam along +y, in-slice ray approximated by the
column along y: the slabs are laterally uniform), the engine as ``engine_dose`` runs it, once per
Gaussian with the other amplitudes zeroed and the Gaussian's own lateral density map, summed;
depth dose beyond d_max in Gy and normalised (tolerance 3 %), profile points failing 2 %/1 mm.

    python kernels/study_pb_lateral_density.py --cases slab_lung,slab_bone --c 0,0.5,1,2,4 [--json out.json]

``--c 0`` is the engine as shipped (local density). Cost: 12 engine runs per case and C (about 10 s
per case on 2 cores).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def upstream_density(rho_t: np.ndarray, dy_mm: float, window_mm: float, min_medium: float = 0.05) -> np.ndarray:
    """Harmonic mean of ``rho_t`` (ny, nx, nz) upstream of each voxel centre along -y, weighted by
    ``exp(-s / window_mm)`` in radiological distance ``s`` (mm of water), over voxels of density >=
    ``min_medium`` (air excluded); the voxel itself counts from its centre (half a voxel)."""
    ny = rho_t.shape[0]
    out = np.empty_like(rho_t)
    med = rho_t >= min_medium
    for j in range(ny):
        num = np.zeros(rho_t.shape[1:])
        wsum = np.zeros(rho_t.shape[1:])
        s0 = np.zeros(rho_t.shape[1:])
        for jj in range(j, -1, -1):
            r = np.maximum(rho_t[jj], 1e-6)
            dl = 0.5 * dy_mm if jj == j else dy_mm
            a = np.exp(-s0 / window_mm) * (1.0 - np.exp(-r * dl / window_mm)) * window_mm
            wsum += np.where(med[jj], a, 0.0)
            num += np.where(med[jj], a / r, 0.0)
            s0 = s0 + r * dl
        out[j] = np.where(wsum > 0, wsum / np.maximum(num, 1e-30), rho_t[j])
    return out


def run_case(name: str, c: float) -> dict:
    import tomodose.transport.pencil_beam as pb
    from tomodose.evaluation.reference import (REFERENCE_DIR, compare_case, compare_depth_dose,
                                               depth_normalisation_mm, engine_dose, load_reference)

    ref = load_reference(REFERENCE_DIR / f"{name}.h5")
    if c == 0:
        ev = engine_dose(ref, "pencil_beam", progress=False)
    else:
        state = {"i": 0}
        post0 = pb._Engine.__post_init__
        dose0 = pb.pencil_beam_dose

        def post(self):
            post0(self)
            i = state["i"]
            mask = np.zeros(self.amps.shape[1])
            mask[i] = 1.0
            self.amps = np.ascontiguousarray(self.amps * mask[None, :])
            window = c * float(self.kernel.sigma_mm[i])
            lat = upstream_density(np.maximum(self._dens_t, 1e-4), float(self.spacing[1]), window)
            self.rho_t = np.ascontiguousarray(np.maximum(lat, self.rho_floor))

        def dose(*args, **kwargs):
            total = None
            for i in range(12):
                state["i"] = i
                pb.clear_depth_cache()
                d = dose0(*args, **kwargs).astype(float)
                total = d if total is None else total + d
            return total.astype(np.float32)

        pb._Engine.__post_init__, pb.pencil_beam_dose = post, dose
        try:
            ev = engine_dose(ref, "pencil_beam", progress=False)
        finally:
            pb._Engine.__post_init__, pb.pencil_beam_dose = post0, dose0
    dd = compare_depth_dose(ref, ev, normalise_mm=depth_normalisation_mm(ref))
    prof = compare_case(ref, ev)["profiles"]
    return {"abs_pct": round(dd["max_abs_beyond_pct"], 2), "rel_pct": round(dd["max_rel_beyond_pct"], 2),
            "mean_abs_pct": round(dd["mean_abs_beyond_pct"], 2),
            "profile_fails": int(sum(v["n_fail"] for v in prof.values())),
            "diff_abs_by_depth": [[round(float(z), 1), round(float(v), 2)]
                                  for z, v, b in zip(dd["depth_mm"], dd["diff_abs_pct"], dd["beyond"]) if b]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="slab_lung,slab_bone")
    ap.add_argument("--c", default="0,1", help="window scales C (L_i = C sigma_i); 0 = the engine as shipped")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    out = {}
    for c in (float(v) for v in args.c.split(",")):
        for name in args.cases.split(","):
            r = run_case(name, c)
            out[f"{name} C={c:g}"] = r
            print(name, f"C={c:g}", json.dumps({k: v for k, v in r.items() if k != "diff_abs_by_depth"}), flush=True)
    if args.json:
        tmp = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp.write_text(json.dumps(out, indent=1), encoding="utf-8")
        tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
