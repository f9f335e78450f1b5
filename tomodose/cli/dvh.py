"""``tomodose dvh``: evaluate a dose in a results file against a protocol and print the table."""

from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger(__name__)

HELP = """\
Compute DVHs of the structures stored in an HDF5 results file and evaluate a clinical protocol
(default: the shipped liver_hcc_5x10_shen2021, PGTV 50 Gy / PTV 30 Gy in 10 fractions).
Prints one row per constraint: value, limits, margins, verdict (pass / goal missed / hard limit
failed / info / not evaluated) and a borderline flag (within one DVH bin of a limit).

Doses in Gy (whole treatment), volumes in mL (cc). Exit status: 0 when every hard limit is met,
1 when a hard limit failed, 2 on an input error.
"""


def _option(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--option must be KEY=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    return k.strip(), v.strip()


def register(subparsers) -> None:
    p = subparsers.add_parser("dvh", help="DVHs and protocol evaluation of a results file",
                              description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", metavar="RESULTS.h5", help="HDF5 results file with a patient and a dose")
    p.add_argument("--protocol", metavar="NAME|FILE.toml", default=None,
                   help="shipped protocol name or your own TOML file (default liver_hcc_5x10_shen2021)")
    p.add_argument("--dose", metavar="NAME", help="which dose of the file (default: the only one, or 'total')")
    p.add_argument("--option", metavar="KEY=VALUE", type=_option, action="append", default=[],
                   help="override a protocol option, e.g. normal_liver=liver_minus_ptv (repeatable)")
    p.add_argument("--bin-width-gy", type=float, default=0.01, metavar="GY", help="DVH bin width (default 0.01 Gy)")
    p.add_argument("--json", metavar="OUT.json", help="write the full evaluation as JSON")
    p.add_argument("--markdown", metavar="OUT.md", help="write a Markdown report")
    p.add_argument("--html", metavar="OUT.html", help="write an HTML report")
    p.add_argument("--plot", metavar="OUT.png", help="write the DVH plot (PNG)")
    p.add_argument("--list-protocols", action="store_true", help="list the shipped protocols and exit")
    p.set_defaults(func=run)


def _pick_dose(doses: dict, name: str | None):
    if not doses:
        raise ValueError("the results file holds no dose")
    if name is not None:
        if name not in doses:
            raise ValueError(f"--dose {name!r} is not in the file; doses: {sorted(doses)}")
        return name, doses[name]
    if len(doses) == 1:
        return next(iter(doses.items()))
    for k in ("total", "dose"):
        if k in doses:
            return k, doses[k]
    raise ValueError(f"the file holds several doses {sorted(doses)}; choose one with --dose")


def run(args) -> int:
    from tomodose.evaluation.protocol import DEFAULT_PROTOCOL, available_protocols, evaluate_protocol
    from tomodose.report.protocol_report import text_table, write_report

    if args.list_protocols:
        for name in available_protocols():
            print(name)
        return 0
    from tomodose.io.hdf5 import read_results

    res = read_results(args.results)
    if res.patient is None:
        raise ValueError(f"{args.results!r} holds no patient (structures are needed)")
    dose_name, dose = _pick_dose(res.doses, args.dose)
    ev = evaluate_protocol(args.protocol or DEFAULT_PROTOCOL, dose, res.patient.structures,
                           options=dict(args.option), bin_width_gy=args.bin_width_gy, dose_name=dose_name)
    sys.stdout.write(text_table(ev) + "\n")
    written = write_report(ev, json_path=args.json, markdown_path=args.markdown, html_path=args.html,
                           plot_path=args.plot)
    for kind, path in written.items():
        print(f"wrote {kind}: {path}")
    return 1 if ev.overall == "hard limit failed" else 0
