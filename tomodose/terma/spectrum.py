"""Photon spectra: the :class:`Spectrum` dataclass and the EGSnrc ``.spectrum`` reader.

A spectrum is a set of energy bins, each represented by one energy (the bin centre, MeV) and
the relative **photon fluence** in the bin (counts per bin, not per MeV). Everything downstream
(TERMA, kernels) uses the energy-fluence weights ``w_E * E / sum(w * E)``.

EGSnrc spectrum format (as written by BEAMnrc / used by DOSXYZnrc)::

    title line
    nbins  Emin  mode          # mode 1: counts per MeV, mode 0: counts per bin
    E_top_1  value_1           # one row per bin: upper bin edge (MeV) and value
    ...

Bin ``i`` spans ``[E_top_{i-1}, E_top_i]`` with ``E_top_0 = Emin``.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from tomodose._validate import check_array, check_positive

__all__ = ["Spectrum", "read_egs_spectrum", "write_egs_spectrum", "default_spectrum"]

log = logging.getLogger(__name__)

#: File name of the shipped default spectrum inside ``tomodose/data/physics``.
DEFAULT_SPECTRUM_FILE = "tomo_6mv_fff.spectrum"


@dataclass(frozen=True)
class Spectrum:
    """A binned photon spectrum.

    Parameters
    ----------
    energies_mev : (n,) float
        Representative energy of each bin (MeV), strictly increasing, > 0.
    fluence : (n,) float
        Relative photon fluence per bin (counts per bin), >= 0, not all zero. Stored normalised
        to sum 1.
    bin_edges_mev : (n + 1,) float, optional
        Bin edges (MeV), increasing, with ``edges[i] <= energies[i] <= edges[i+1]``. Defaults to
        midpoints between the energies.
    name : str
        Label (title line of the file, or a description).
    """

    energies_mev: np.ndarray
    fluence: np.ndarray
    bin_edges_mev: np.ndarray | None = None
    name: str = ""

    def __post_init__(self):
        e = check_array("energies_mev", self.energies_mev, ndim=1)
        if e.size < 1:
            raise ValueError("energies_mev must hold at least one bin, got 0")
        if np.any(e <= 0):
            raise ValueError(f"energies_mev must be > 0, got minimum {e.min()}")
        if np.any(np.diff(e) <= 0):
            raise ValueError("energies_mev must be strictly increasing")
        w = check_array("fluence", self.fluence, shape=(e.size,), low=0.0)
        total = w.sum()
        if total <= 0:
            raise ValueError("fluence must have a positive sum, got all zeros")
        w = w / total
        if self.bin_edges_mev is None:
            mid = 0.5 * (e[1:] + e[:-1])
            lo = max(e[0] - (mid[0] - e[0]) if e.size > 1 else 0.5 * e[0], 0.0)
            hi = e[-1] + (e[-1] - mid[-1]) if e.size > 1 else 1.5 * e[0]
            edges = np.concatenate([[lo], mid, [hi]])
        else:
            edges = check_array("bin_edges_mev", self.bin_edges_mev, shape=(e.size + 1,), low=0.0)
            if np.any(np.diff(edges) < 0):
                raise ValueError("bin_edges_mev must be non-decreasing")
            if np.any(e < edges[:-1] - 1e-12) or np.any(e > edges[1:] + 1e-12):
                raise ValueError("each energy must lie inside its bin [edges[i], edges[i+1]]")
        for arr in (e, w, edges):
            arr.setflags(write=False)
        object.__setattr__(self, "energies_mev", e)
        object.__setattr__(self, "fluence", w)
        object.__setattr__(self, "bin_edges_mev", edges)

    # --- derived ------------------------------------------------------------------------
    @property
    def n_bins(self) -> int:
        return int(self.energies_mev.size)

    @property
    def energy_fluence(self) -> np.ndarray:
        """(n,) energy-fluence weights ``w * E / sum(w * E)`` (dimensionless, sum 1)."""
        ef = self.fluence * self.energies_mev
        return ef / ef.sum()

    @property
    def mean_energy_mev(self) -> float:
        """Fluence-weighted mean photon energy (MeV)."""
        return float(np.sum(self.fluence * self.energies_mev))

    @property
    def mean_energy_fluence_weighted_mev(self) -> float:
        """Energy-fluence-weighted mean energy (MeV)."""
        return float(np.sum(self.energy_fluence * self.energies_mev))

    def trimmed(self, min_fraction: float = 0.0) -> "Spectrum":
        """Copy without bins whose energy-fluence weight is <= ``min_fraction`` (default: empty bins)."""
        keep = self.energy_fluence > min_fraction
        if not np.any(keep):
            raise ValueError(f"min_fraction {min_fraction} removes every bin")
        idx = np.flatnonzero(keep)
        edges = np.concatenate([self.bin_edges_mev[idx], [self.bin_edges_mev[idx[-1] + 1]]])
        if np.all(np.diff(idx) == 1):
            return Spectrum(self.energies_mev[idx], self.fluence[idx], edges, self.name)
        return Spectrum(self.energies_mev[idx], self.fluence[idx], None, self.name)

    @classmethod
    def monoenergetic(cls, energy_mev: float) -> "Spectrum":
        """A single-energy spectrum (MeV)."""
        e = check_positive("energy_mev", energy_mev)
        return cls(np.array([e]), np.array([1.0]), np.array([0.99 * e, 1.01 * e]), f"{e} MeV mono")

    @classmethod
    def from_file(cls, path) -> "Spectrum":
        """Read an EGSnrc ``.spectrum`` file (see :func:`read_egs_spectrum`)."""
        return read_egs_spectrum(path)

    @classmethod
    def default(cls) -> "Spectrum":
        """The shipped 6 MV FFF tomotherapy spectrum (see ``docs/terma.md``)."""
        return default_spectrum()


def read_egs_spectrum(path) -> Spectrum:
    """Read a spectrum in the EGSnrc format.

    Parameters
    ----------
    path : str or Path
        File with a title line, a line ``nbins Emin mode`` and ``nbins`` rows ``E_top value``.
        ``mode`` 1 means values are counts per MeV (multiplied by the bin width here), 0 counts
        per bin. Only modes 0 and 1 (histogram spectra) are supported.

    Returns
    -------
    Spectrum
        Bin-centre energies, counts per bin (normalised), bin edges; bins of zero width or
        negative content are rejected, empty trailing bins kept (weight 0).
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise FileNotFoundError(f"spectrum file {str(path)!r} cannot be read: {exc}") from None
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) < 3:
        raise ValueError(f"spectrum file {str(path)!r} must have a title, a header and bins, got {len(lines)} lines")
    title = lines[0].strip()
    head = lines[1].replace(",", " ").split()
    try:
        nbins, emin, mode = int(float(head[0])), float(head[1]), int(float(head[2]))
    except (IndexError, ValueError):
        raise ValueError(
            f"spectrum file {str(path)!r}: second line must be 'nbins Emin mode', got {lines[1]!r}"
        ) from None
    if mode not in (0, 1):
        raise ValueError(f"spectrum file {str(path)!r}: mode must be 0 (counts/bin) or 1 (counts/MeV), got {mode}")
    if nbins < 1 or len(lines) < 2 + nbins:
        raise ValueError(f"spectrum file {str(path)!r}: header announces {nbins} bins, file has {len(lines) - 2} rows")
    rows = []
    for ln in lines[2:2 + nbins]:
        parts = ln.replace(",", " ").split()
        try:
            rows.append((float(parts[0]), float(parts[1])))
        except (IndexError, ValueError):
            raise ValueError(f"spectrum file {str(path)!r}: bad bin row {ln!r}") from None
    tops = np.array([r[0] for r in rows])
    vals = np.array([r[1] for r in rows])
    edges = np.concatenate([[emin], tops])
    widths = np.diff(edges)
    if np.any(widths < 0):
        raise ValueError(f"spectrum file {str(path)!r}: bin edges must increase from Emin={emin}")
    if np.any(widths == 0):
        # Some published files start with a zero-width bin (top == Emin); in mode 0 its counts
        # sit at that energy, in mode 1 it is empty.
        log.warning("spectrum file %s has %d zero-width bin(s)", path, int(np.sum(widths == 0)))
    if np.any(vals < 0):
        raise ValueError(f"spectrum file {str(path)!r}: negative bin content")
    counts = vals * widths if mode == 1 else vals
    centres = 0.5 * (edges[1:] + edges[:-1])
    return Spectrum(centres, counts, edges, title)


def write_egs_spectrum(spectrum: Spectrum, path, *, mode: int = 0, title: str | None = None) -> None:
    """Write ``spectrum`` in the EGSnrc format (atomically). ``mode`` 0 counts/bin, 1 counts/MeV."""
    if mode not in (0, 1):
        raise ValueError(f"mode must be 0 or 1, got {mode!r}")
    path = Path(path)
    edges = spectrum.bin_edges_mev
    vals = spectrum.fluence if mode == 0 else spectrum.fluence / np.diff(edges)
    out = [title if title is not None else (spectrum.name or "tomodose spectrum"),
           f"{spectrum.n_bins} {edges[0]:.6g} {mode}"]
    out += [f"{t:.6e} {v:.6e}" for t, v in zip(edges[1:], vals)]
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        fh.write("\n".join(out) + "\n")
    os.replace(tmp, path)


_DEFAULT: Spectrum | None = None


def default_spectrum() -> Spectrum:
    """The shipped default 6 MV FFF spectrum (cached after the first read)."""
    global _DEFAULT
    if _DEFAULT is None:
        ref = resources.files("tomodose") / "data" / "physics" / DEFAULT_SPECTRUM_FILE
        with resources.as_file(ref) as p:
            _DEFAULT = read_egs_spectrum(p)
        log.debug("loaded default spectrum %s (mean %.3f MeV)", DEFAULT_SPECTRUM_FILE, _DEFAULT.mean_energy_mev)
    return _DEFAULT
