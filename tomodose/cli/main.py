"""Entry point of the ``tomodose`` command."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys

from tomodose import __version__
from tomodose.cli import SUBCOMMANDS

UNITS_HELP = """\
Units and frames: lengths in mm, doses in Gy, times in s, angles in deg, volumes in mL (cc).
Volumes are in DICOM patient LPS (+x left, +y posterior, +z superior); gantry and couch follow
IEC 61217 (gantry angle clockwise seen from the foot of the couch; 90 deg = source at the
patient's left for head-first supine). Set TOMODOSE_PROGRESS=0 to hide progress bars.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tomodose",
        description="Helical tomotherapy dose engine and protocol evaluation.",
        epilog=UNITS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"tomodose {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        modname = f"tomodose.cli.{name}"
        if importlib.util.find_spec(modname) is None:
            continue
        importlib.import_module(modname).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose + 1, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if args.no_progress:
        from tomodose import config

        config.update(progress=False)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, KeyError) as exc:
        logging.getLogger("tomodose").debug("error", exc_info=True)
        sys.stderr.write(f"tomodose {args.command}: error: {exc}\n")
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
