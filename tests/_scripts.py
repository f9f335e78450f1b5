"""Load the project's command-line scripts (``kernels/``, ``validation/``, ``benchmarks/``) as modules.

The scripts are not part of the installed package; tests that check them load them from their
file, fresh on every call (a test may patch the module it gets).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_script(path, module_name: str | None = None) -> ModuleType:
    """Execute the script at ``path`` (absolute, or relative to the repository root) as a module.

    The module is registered in ``sys.modules`` under ``module_name`` (default
    ``_tomodose_script_<stem>``) while and after it runs: dataclasses and pickling look their
    module up there.
    """
    path = Path(path)
    if not path.is_absolute():
        path = ROOT / path
    if not path.is_file():
        raise FileNotFoundError(f"script path {str(path)!r} does not exist")
    name = module_name or f"_tomodose_script_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return mod
