"""Package-wide settings: numba options in one place, data locations, progress bars.

Settings are read from ``TOMODOSE_*`` environment variables at import time and may be
changed at run time through :data:`settings` or temporarily with :func:`patch`::

    from tomodose import config
    with config.patch(progress=False):
        ...

Numba options (``NUMBA_OPTIONS``) are fixed at import: kernels are compiled with
``cache=True`` and an explicit fastmath *flag set* that keeps NaN/inf semantics
(``nnan``/``ninf`` are deliberately absent).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path

#: OpenMP threads (numba's threading layer here) sleep between parallel regions instead of
#: spinning: with the default active wait, 2 threads on a loaded 2-core machine burned 2-3x the
#: CPU of the pencil-beam fluence path (docs/pencil_beam.md); a user's own setting wins. Must be
#: set before numba starts its thread pool (the first parallel kernel call).
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

#: fastmath flags for all kernels: reassociation and contraction, but NaN/inf checks keep working.
FASTMATH_FLAGS = frozenset({"contract", "afn", "reassoc", "arcp", "nsz"})

#: keyword arguments of every ``numba.njit`` in :mod:`tomodose._kernels`.
NUMBA_OPTIONS = {"cache": True, "nogil": True, "fastmath": set(FASTMATH_FLAGS)}
#: the same for kernels that use ``prange``.
NUMBA_PARALLEL_OPTIONS = {**NUMBA_OPTIONS, "parallel": True}


def _env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    return raw.strip().lower() not in {"0", "false", "no", "off", ""}


@dataclass(frozen=True)
class Settings:
    """Run-time settings.

    Attributes
    ----------
    progress : bool
        Show tqdm progress bars on long work (``TOMODOSE_PROGRESS``; default on).
    shared_data_dir : pathlib.Path or None
        Reference data folder used by validation scripts and tests
        (``TOMODOSE_SHARED_DATA``; default ``../shared/data`` beside the source tree if present).
    """

    progress: bool = True
    shared_data_dir: Path | None = None


def _default_settings() -> Settings:
    shared = os.environ.get("TOMODOSE_SHARED_DATA")
    if shared:
        shared_dir: Path | None = Path(shared)
    else:
        guess = Path(__file__).resolve().parents[2] / "shared" / "data"
        shared_dir = guess if guess.is_dir() else None
    return Settings(progress=_env_bool("TOMODOSE_PROGRESS", True), shared_data_dir=shared_dir)


settings: Settings = _default_settings()


def update(**changes) -> Settings:
    """Change settings for the rest of the process; unknown keys are rejected."""
    global settings
    valid = {f.name for f in fields(Settings)}
    unknown = set(changes) - valid
    if unknown:
        raise KeyError(f"unknown setting(s) {sorted(unknown)}; valid settings are {sorted(valid)}")
    settings = replace(settings, **changes)
    return settings


@contextlib.contextmanager
def patch(**changes):
    """Temporarily change settings (for tests and scripts)."""
    old = settings
    try:
        update(**changes)
        yield settings
    finally:
        globals()["settings"] = old


def progress_enabled(progress: bool | None) -> bool:
    """Resolve a function's ``progress=`` argument against the global setting."""
    return settings.progress if progress is None else bool(progress)
