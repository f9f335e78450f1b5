"""``tomodose gamma``: gamma index of an evaluated dose against a reference dose."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)

HELP = """\
Compare two dose distributions with the 3-D gamma index (Low et al. 1998).

REF and EVAL are tomodose results files (.h5, doses in Gy; pick one with --dose-ref /
--dose-eval when a file holds several) or dose images (.mha, .nrrd, .nii, .nii.gz; Gy).
The grids may differ: the evaluated dose is interpolated trilinearly. The search for the
minimum runs on concentric shells every DTA/10 (or --step) up to --max-gamma x DTA.

Prints the pass rate (gamma <= 1) and gamma statistics; --plot saves an axial gamma map with a
histogram, --json the full summary (criteria, counts, histogram). With --min-pass the exit
status is 1 when the pass rate is below it.

Example:
  tomodose gamma ref.h5 eval.h5 --dd 2 --dta 2 --cutoff 10 --plot gamma.png --json gamma.json
"""

_H5_SUFFIXES = (".h5", ".hdf5", ".he5")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "gamma", help="gamma index (global/local, 3-D) of an evaluated dose against a reference",
        description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("reference", metavar="REF", help="reference dose: results .h5 or .mha/.nrrd/.nii")
    p.add_argument("evaluated", metavar="EVAL", help="evaluated dose: results .h5 or .mha/.nrrd/.nii")
    p.add_argument("--dose-ref", metavar="NAME", help="dose name in REF (results files)")
    p.add_argument("--dose-eval", metavar="NAME", help="dose name in EVAL (results files)")
    p.add_argument("--dd", type=float, default=2.0, metavar="PCT", help="dose criterion in %% (default 2)")
    p.add_argument("--dta", type=float, default=2.0, metavar="MM", help="distance criterion in mm (default 2)")
    p.add_argument("--local", action="store_true", help="local dose difference (default global)")
    p.add_argument("--normalisation-gy", type=float, metavar="GY",
                   help="global normalisation dose in Gy (default: maximum reference dose)")
    p.add_argument("--cutoff", type=float, default=10.0, metavar="PCT",
                   help="low-dose cut-off in %% of the normalisation, on the reference (default 10)")
    p.add_argument("--max-gamma", type=float, default=3.0, metavar="G",
                   help="search radius in units of DTA (default 3)")
    p.add_argument("--step", type=float, metavar="MM", help="search step in mm (default DTA/10)")
    p.add_argument("--plot", type=Path, metavar="FILE.png", help="save gamma map slice + histogram")
    p.add_argument("--slice", type=int, metavar="K", help="axial slice index for --plot")
    p.add_argument("--json", type=Path, metavar="FILE.json", help="save the summary as JSON")
    p.add_argument("--min-pass", type=float, metavar="PCT",
                   help="exit with status 1 when the pass rate is below PCT")
    p.set_defaults(func=run)


def read_dose(path, name: str | None = None, what: str = "dose"):
    """Read a dose (Gy) from a results file or an image file.

    Parameters
    ----------
    path : str or Path
        ``.h5`` results file (:func:`tomodose.io.hdf5.read_results`) or an image readable by
        SimpleITK (``.mha``, ``.nrrd``, ``.nii``, ...).
    name : str or None
        Dose name inside a results file; None: the only dose in the file.
    what : str
        Label used in error messages (e.g. ``"REF"``).

    Returns
    -------
    ImageVolume
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {str(path)!r} does not exist")
    if path.suffix.lower() in _H5_SUFFIXES:
        from tomodose.io.hdf5 import read_results

        doses = read_results(path).doses
        if not doses:
            raise ValueError(f"{what} file {str(path)!r} holds no dose")
        if name is None:
            if len(doses) > 1:
                raise ValueError(
                    f"{what} file {str(path)!r} holds several doses {sorted(doses)}; choose one "
                    f"with --dose-{'ref' if what == 'REF' else 'eval'}"
                )
            return next(iter(doses.values()))
        if name not in doses:
            raise KeyError(f"{what} dose {name!r} not in {str(path)!r}; available: {sorted(doses)}")
        return doses[name]
    if name is not None:
        raise ValueError(f"--dose-{'ref' if what == 'REF' else 'eval'} applies to .h5 results files only, "
                         f"got an image file {str(path)!r}")
    from tomodose.io.export import import_volume

    try:
        return import_volume(path)
    except ValueError as exc:
        if "does not record its unit" not in str(exc):
            raise
        log.warning("%s file %s does not record its unit: assuming Gy", what, path)
        return import_volume(path, unit="Gy", quantity="dose")


def run(args) -> int:
    from tomodose.evaluation.gamma import GammaCriteria, gamma_index

    if not args.max_gamma >= 1:
        raise ValueError(f"--max-gamma must be >= 1, got {args.max_gamma}")
    criteria = GammaCriteria(
        dose_percent=args.dd,
        distance_mm=args.dta,
        local=args.local,
        normalisation_gy=args.normalisation_gy,
        cutoff_percent=args.cutoff,
        max_search_radius_mm=args.max_gamma * abs(args.dta),
        search_step_mm=args.step,
    )
    ref = read_dose(args.reference, args.dose_ref, "REF")
    ev = read_dose(args.evaluated, args.dose_eval, "EVAL")
    res = gamma_index(ref, ev, criteria)
    stats = res.statistics()
    print(res.summary())
    print(
        f"evaluated {res.n_evaluated} voxels (cut-off {res.cutoff_gy:.4g} Gy), passed {res.n_passed}, "
        f"no evaluated dose in reach {res.n_outside}; gamma median {stats['median']:.3f}, "
        f"95th percentile {stats['p95']:.3f}"
    )
    if args.json:
        print(f"wrote {res.write_json(args.json)}")
    if args.plot:
        print(f"wrote {res.plot(args.plot, slice_index=args.slice)}")
    if args.min_pass is not None and not res.pass_rate_percent >= args.min_pass:
        print(f"FAIL: pass rate {res.pass_rate_percent:.2f}% < {args.min_pass:g}%")
        return 1
    return 0
