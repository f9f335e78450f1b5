"""Shared helpers of the kernel derivation scripts in ``kernels/`` (not part of the package).

* :func:`read_mu_water` -- water mu/rho (cm2/g) vs energy: the shipped NIST table of
  :mod:`tomodose.terma` (``tomodose/data/physics/attenuation.csv``, the one TERMA uses), or a NIST
  XAAMDI CSV given by path (absorption-edge duplicates removed);
* :func:`read_mono_table` -- the mono-energetic point kernels the project derives its
  polyenergetic kernels from: the project's own ompMC kernels below 0.5 MeV
  (``tomodose/data/kernels/water_mono_ompmc.csv``, ``kernels/derive_mc_kernels.py``) merged with
  the EDKnrc kernels 0.5-6 MeV (shared data, MIT);
* :func:`default_spectrum_arrays` -- ``(energies, photon fluence, name)`` of
  :func:`tomodose.terma.spectrum.default_spectrum` at run time;
* :func:`atomic_write_bytes` / :func:`atomic_write_text` -- temporary file + ``os.replace``;
* :func:`sha256_of` -- hex digest of a file.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tomodose import _atomic  # noqa: E402
from tomodose.transport.kernels import numeric_csv_rows  # noqa: E402

#: EDKnrc mono kernels (MIT) relative to the shared data folder.
EDK_REL = "dose_physics/kernels/edknrc_mono_water_conehead.csv"
#: NIST XAAMDI water table relative to the shared data folder.
MU_REL = "dose_physics/attenuation/nist_xaamdi_water.csv"
#: the shipped NIST attenuation table (the one TERMA uses).
SHIPPED_MU = ROOT / "tomodose" / "data" / "physics" / "attenuation.csv"
#: the project's own ompMC mono kernels below 0.5 MeV.
MC_KERNELS = ROOT / "tomodose" / "data" / "kernels" / "water_mono_ompmc.csv"
DEFAULT_SHARED = ROOT.parent / "shared" / "data"


def sha256_of(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_mu_water(path: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(energies MeV, mu/rho cm2/g) of water.

    ``path=None``: the shipped table ``tomodose/data/physics/attenuation.csv`` (rows
    ``water,E,mu_rho,mu_en_rho``). A path: a NIST XAAMDI CSV (``E, mu_rho, ...``; the shared
    ``nist_xaamdi_water.csv``), duplicate energies at absorption edges removed.
    """
    if path is None or Path(path).resolve() == SHIPPED_MU.resolve():
        rows = []
        for line in SHIPPED_MU.read_text(encoding="utf-8").splitlines():
            if line.startswith("water,"):
                _, e, mu, _ = line.split(",")
                rows.append((float(e), float(mu)))
        a = np.asarray(rows)
        return a[:, 0], a[:, 1]
    a = numeric_csv_rows(path, 2)
    _, idx = np.unique(a[:, 0], return_index=True)
    a = a[np.sort(idx)]
    return a[:, 0], a[:, 1]


def mu_water_at(energies_mev, path=None) -> np.ndarray:
    """Linear attenuation coefficient of water (1/cm, density 1) at ``energies_mev`` (log-log)."""
    e, mu = read_mu_water(path)
    return np.exp(np.interp(np.log(np.asarray(energies_mev, float)), np.log(e), np.log(mu)))


def read_mono_table(shared_data: str | os.PathLike = DEFAULT_SHARED, *, mc_path=MC_KERNELS,
                    use_mc: bool = True):
    """Mono kernels used for derivation: own ompMC kernels below the first EDKnrc energy + EDKnrc.

    Returns ``(table, sources)`` with ``table`` a :class:`~tomodose.transport.kernels.MonoKernelTable`
    and ``sources`` a list (one per energy) of ``"ompMC"`` / ``"EDKnrc"``.
    """
    from tomodose.transport.kernels import merge_mono_tables, read_edk_csv

    edk = read_edk_csv(Path(shared_data) / EDK_REL)
    if not use_mc:
        return edk, ["EDKnrc"] * edk.energies_mev.size
    mc = read_edk_csv(mc_path)
    table = merge_mono_tables(mc, edk)
    n_low = int(np.sum(mc.energies_mev < edk.energies_mev[0]))
    return table, ["ompMC"] * n_low + ["EDKnrc"] * edk.energies_mev.size


def default_spectrum_arrays():
    """(energies MeV, photon fluence per bin, description) of the current default spectrum."""
    from tomodose.terma.spectrum import default_spectrum

    s = default_spectrum()
    return (np.asarray(s.energies_mev, float), np.asarray(s.fluence, float),
            f"tomodose.terma.spectrum.default_spectrum(): {s.name}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """The package's atomic write (:mod:`tomodose._atomic`), creating the folder like the scripts expect."""
    return _atomic.atomic_write_bytes(path, data, mkdir=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return _atomic.atomic_write_text(path, text, mkdir=True)


def load_script(name: str):
    """The script ``kernels/<name>.py`` as a module (loaded once per process, registered in
    ``sys.modules`` as ``_tomodose_<name>`` so that its dataclasses and pickling work)."""
    import importlib.util

    key = f"_tomodose_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, ROOT / "kernels" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            del sys.modules[key]
            raise
    return sys.modules[key]
