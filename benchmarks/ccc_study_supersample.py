"""Internal supersampling of the collapsed-cone transport against the Monte Carlo references.

Option (c) of issue 4: the TERMA is computed on the reference grid as the engine does, then
repeated piecewise-constant onto a grid ``f`` times finer along every axis (the density too),
transported there (``_ccc_transport``, the engine's own transport) and mass-averaged back onto
the reference grid; the calibration field is computed the same way. Only the transport lines are
refined (the TERMA stays at the coarse resolution), so this isolates the line discretisation.
``--terma-fine`` computes the TERMA on the fine grid as well (the "1.25 mm grid" of
docs/collapsed_cone.md section 4a item 4).

    nice -n 10 python benchmarks/ccc_study_supersample.py --factors 1,2 --out study.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from scipy import ndimage


def _fine_patient(patient, f):
    from tomodose.geometry.grid import Grid, ImageVolume
    from tomodose.geometry.patient import PatientModel

    g = patient.grid
    sp = np.asarray(g.spacing_mm, float)
    fine = Grid(tuple(int(n) * f for n in g.shape), tuple(sp / f),
                tuple(np.asarray(g.origin_mm, float) - 0.5 * (f - 1) / f * sp))
    hu = np.asarray(patient.ct.array)
    for ax in range(3):
        hu = np.repeat(hu, f, axis=ax)
    return PatientModel(ImageVolume(fine, hu, "HU"), patient_position=patient.patient_position,
                        density_table=patient.density_table)


def raw_dose(patient, seq, beam_model, f, *, terma_fine=False, line_phases=1):
    """Engine-unit dose on ``patient.grid`` with the transport on an ``f`` times finer grid."""
    from tomodose.dose.engine import _ccc_transport, _terma_groups, engine_kernel, terma_energy_edges_mev
    from tomodose.terma.terma import compute_terma

    kernel = engine_kernel()
    kw = {"energy_group_edges_mev": terma_energy_edges_mev(kernel)}
    if f == 1:
        tr = compute_terma(patient, seq, beam_model, progress=False, **kw)
        return _ccc_transport(patient, _terma_groups(seq, tr), kernel=kernel, line_phases=line_phases)
    fp = _fine_patient(patient, f)
    if terma_fine:
        tr = compute_terma(fp, seq, beam_model, progress=False, **kw)
        groups = _terma_groups(seq, tr)
    else:
        tr = compute_terma(patient, seq, beam_model, progress=False, **kw)
        groups = []
        for s, t, angle, couches, travel in _terma_groups(seq, tr):
            t = np.asarray(t)
            for ax in range(t.ndim - 3, t.ndim):
                t = np.repeat(t, f, axis=ax)
            groups.append((s, np.ascontiguousarray(t), angle, couches, travel))
    d = _ccc_transport(fp, groups, kernel=kernel, line_phases=line_phases).astype(np.float64)
    rho = np.asarray(fp.mass_density_g_cm3, float)
    nz, ny, nx = patient.grid.shape
    m = (rho * d).reshape(nz, f, ny, f, nx, f).sum(axis=(1, 3, 5))
    w = rho.reshape(nz, f, ny, f, nx, f).sum(axis=(1, 3, 5))
    plain = d.reshape(nz, f, ny, f, nx, f).mean(axis=(1, 3, 5))
    return np.where(w > 0, m / np.where(w > 0, w, 1.0), plain)


def calibration(beam_model, machine, f, **kw):
    from tomodose.dose.calibration import ReferenceCondition, reference_phantom_grid, reference_projections
    from tomodose.geometry.grid import ImageVolume
    from tomodose.geometry.patient import PatientModel

    ref = ReferenceCondition.nominal()
    grid, iso = reference_phantom_grid(ref, machine)
    water = PatientModel(ImageVolume(grid, np.zeros(grid.shape, np.float32), "HU"), name="reference water")
    seq = reference_projections(ref, machine, iso)
    dose = raw_dose(water, seq, beam_model, f, **kw)
    kji = grid.lps_to_index([[0.0, ref.depth_mm, 0.0]])
    value = float(ndimage.map_coordinates(dose, kji.T, order=1, mode="nearest")[0])
    return (machine.dose_rate_gy_per_min * ref.dose_rate_factor / 60.0) / value


def main(argv=None) -> int:
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from ccc_study_lines import _checks

    from tomodose.evaluation.reference import REFERENCE_DIR, bin_average, load_reference
    from tomodose.geometry.grid import ImageVolume
    from tomodose.terma.beam_model import BeamModel

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--factors", default="1,2")
    ap.add_argument("--cases", default="water_j10,water_j25,water_j50,slab_lung,slab_bone")
    ap.add_argument("--terma-fine", action="store_true")
    ap.add_argument("--line-phases", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    for f in (int(v) for v in args.factors.split(",")):
        for name in args.cases.split(","):
            ref = load_reference(REFERENCE_DIR / f"{name}.h5")
            bm = BeamModel.ideal(ref.spectrum)
            t0 = time.process_time()
            k = calibration(bm, ref.sequence.machine, f, terma_fine=args.terma_fine, line_phases=args.line_phases)
            patient = ref.patient()
            raw = raw_dose(patient, ref.sequence, bm, f, terma_fine=args.terma_fine, line_phases=args.line_phases)
            ev = bin_average(ImageVolume(patient.grid, raw * k, "Gy", "dose"), ref.edges_mm)
            row = {"variant": f"supersample {f}" + (" terma fine" if args.terma_fine else "")
                   + (f" phases {args.line_phases}" if args.line_phases > 1 else ""),
                   "case": name, "total_cpu_s": round(time.process_time() - t0, 1)}
            row.update(_checks(name, ref, ev))
            line = json.dumps(row)
            print(line, flush=True)
            if args.out:
                with open(args.out, "a") as fh:
                    fh.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
