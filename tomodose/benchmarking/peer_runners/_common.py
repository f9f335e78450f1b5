"""Helpers shared by the peer runner scripts (plain Python + NumPy; copied into no package)."""

import json
import os
import resource
import sys
import time

import numpy as np


def load_case(path):
    """The case as a dict of NumPy arrays and Python scalars."""
    with np.load(path) as f:
        case = {k: f[k] for k in f.files}
    for k in ("spacing_mm", "origin_mm", "isocentre_mm"):
        case[k] = [float(v) for v in case[k]]
    for k in ("jaw_mm", "bixel_mm", "gantry_deg"):
        case[k] = float(case[k])
    return case


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def emit(result):
    """Print the result as the last stdout line (the parent parses it)."""
    sys.stdout.flush()
    print(json.dumps(result))


def _cpu_s():
    """CPU time of this process and its finished children (OpenTPS runs a C++ engine as one)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class Clock:
    """Wall and CPU time (children included) since creation."""

    def __init__(self):
        self.wall = time.perf_counter()
        self.cpu = _cpu_s()

    def lap(self):
        return time.perf_counter() - self.wall, _cpu_s() - self.cpu
