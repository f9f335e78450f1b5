"""``tomodose dose``: dose of the plan stored in a results file, with a named engine."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "dose", help="compute the dose (Gy) of the plan in a results file",
        description="Reads the patient (CT in HU, structures, DICOM LPS) and the plan (sinogram, pitch, "
                    "gantry period, fractions) of a tomodose HDF5 results file, computes the absolute dose "
                    "(Gy per fraction, calibrated at 5 x 40 cm, SSD 85 cm, 1.5 cm depth, machine dose rate) "
                    "with the chosen engine, and writes a results file holding the whole-course dose "
                    "(Gy = per fraction x fractions) under the engine's name.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("results", help="input .h5 with /patient and /plan (e.g. from 'tomodose phantom' plus a plan, "
                                   "'tomodose dicom import' or 'tomodose demo')")
    p.add_argument("--engine", default="collapsed_cone", choices=("collapsed_cone", "pencil_beam"))
    p.add_argument("--out", default=None, help="output .h5 (default: overwrite the input atomically)")
    p.add_argument("--name", default=None, help="dose name in the file (default: the engine name)")
    p.add_argument("--export", default=None, help="also export the dose to .mha/.nrrd/.nii(.gz)")
    p.set_defaults(func=run)


def run(args) -> int:
    from tomodose.dose import compute_dose
    from tomodose.io.hdf5 import read_results, write_results

    res = read_results(args.results)
    if res.patient is None:
        raise ValueError(f"results file {args.results!r} has no /patient group: a patient (CT + structures) is needed")
    if res.plan is None:
        raise ValueError(f"results file {args.results!r} has no /plan group: a plan is needed")
    dose = compute_dose(res.patient, res.plan, engine=args.engine)
    name = args.name or args.engine
    doses = dict(res.doses)
    doses[name] = dose.total
    out = args.out or args.results
    write_results(out, patient=res.patient, plan=res.plan, doses=doses, dvhs=res.dvhs or None,
                  extra={**res.extra, f"dose_metadata_{name}": {k: str(v) for k, v in dose.metadata.items()}})
    if args.export:
        from tomodose.io.export import export_volume

        export_volume(dose.total, args.export)
    arr = dose.total.array
    print(f"{name}: max {arr.max():.3f} Gy (whole course, {dose.n_fractions} fractions), "
          f"{dose.per_fraction.array.max():.3f} Gy per fraction; engine time {dose.metadata['timings_s']['engine_s']:.1f} s")
    print(f"written to {out}")
    return 0
