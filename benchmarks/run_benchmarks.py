"""Run the tomodose benchmark suite (same options as ``tomodose benchmark``).

    python benchmarks/run_benchmarks.py --quick --out bench-quick
    python benchmarks/run_benchmarks.py --sizes 8,6,4.5,3 --threads 1,2 --peers --out bench

Writes benchmark.json and benchmark.md; see docs/performance.md.
"""

from __future__ import annotations

import sys

from tomodose.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["benchmark", *sys.argv[1:]]))
