"""CT number (HU) -> mass density and relative electron density by a calibration table.

A :class:`DensityTable` is two piecewise-linear curves sampled at the same, strictly
increasing CT numbers: HU -> mass density (g/cm^3) and HU -> relative electron density (RED,
electrons per cm^3 relative to water, dimensionless). Between table points the values are
interpolated linearly.

Out-of-range rule
-----------------
CT numbers below the first or above the last table point are **clamped**: they get the value of
the nearest end point (no extrapolation), and one ``logging`` warning states how many voxels
were clamped and the table's range. NaN or inf CT numbers are refused (``ValueError``).

Default table
-------------
:meth:`DensityTable.default` is tomodose's own generic kilovoltage-CT calibration (120 kVp
class scanner), built from nominal tissue densities, not from any particular scanner:

=======  ==================  ==========  =====================  ===================
HU       tissue              g/cm^3      Z/A (mol e/g)          RED
=======  ==================  ==========  =====================  ===================
-1000    air                 0.0012      0.4992                 0.0011
-800     lung (inflated)     0.20        0.5497                 0.1981
-100     adipose             0.95        0.5558                 0.9512
0        water               1.00        0.5551                 1.0000
40       muscle / liver      1.05        0.5494                 1.0392
1000     bone (mixed)        1.60        0.5300                 1.5277
3000     dense cortical      2.80        0.5148                 2.5968
=======  ==================  ==========  =====================  ===================

RED = mass density x (Z/A of the tissue) / (Z/A of water = 0.55508). The Z/A values are the
usual ICRU-44-type compositions (air, lung, adipose, water, skeletal muscle, cortical bone; the
1000 HU point is taken as a cortical bone / marrow mixture). Clinical use needs the scanner's own
table; pass it with :meth:`DensityTable.from_arrays` or :meth:`DensityTable.from_file`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tomodose._validate import check_array

__all__ = [
    "DensityTable",
    "hu_to_mass_density",
    "hu_to_relative_electron_density",
    "mass_density_to_hu",
    "Z_OVER_A_WATER",
]

log = logging.getLogger(__name__)

#: Electrons per gram of water divided by Avogadro's number (Z/A of H2O, mol/g).
Z_OVER_A_WATER = 0.55508

# (HU, mass density g/cm3, Z/A) of the default table.
_DEFAULT_POINTS = (
    (-1000.0, 0.0012, 0.49919),
    (-800.0, 0.20, 0.54965),
    (-100.0, 0.95, 0.55579),
    (0.0, 1.00, Z_OVER_A_WATER),
    (40.0, 1.05, 0.54938),
    (1000.0, 1.60, 0.53000),
    (3000.0, 2.80, 0.51478),
)


def _as_tuple(name: str, values, n: int | None = None) -> tuple[float, ...]:
    arr = check_array(name, values, ndim=1)
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"{name} must have {n} entries (one per HU point), got {arr.shape[0]}")
    return tuple(float(v) for v in arr)


@dataclass(frozen=True)
class DensityTable:
    """Piecewise-linear CT calibration: HU -> mass density and HU -> RED.

    Parameters
    ----------
    hu : tuple of float
        CT numbers (HU) of the table points, strictly increasing, at least 2 points.
    mass_density_g_cm3 : tuple of float
        Mass density (g/cm^3) at each point, >= 0 and non-decreasing.
    relative_electron_density : tuple of float
        Electron density relative to water (dimensionless) at each point, >= 0 and
        non-decreasing.
    name : str
        Free-text label (e.g. scanner and protocol).

    Notes
    -----
    Out-of-range CT numbers are clamped to the end values with a logged warning (see the
    module docstring).
    """

    hu: tuple[float, ...]
    mass_density_g_cm3: tuple[float, ...]
    relative_electron_density: tuple[float, ...]
    name: str = ""

    def __post_init__(self):
        hu = _as_tuple("hu", self.hu)
        if len(hu) < 2:
            raise ValueError(f"hu must have at least 2 table points, got {len(hu)}")
        d = np.diff(hu)
        if np.any(d <= 0):
            i = int(np.argmax(d <= 0))
            raise ValueError(
                f"hu must be strictly increasing, got hu[{i}] = {hu[i]} followed by hu[{i + 1}] = {hu[i + 1]}"
            )
        rho = _as_tuple("mass_density_g_cm3", self.mass_density_g_cm3, len(hu))
        red = _as_tuple("relative_electron_density", self.relative_electron_density, len(hu))
        for pname, values in (("mass_density_g_cm3", rho), ("relative_electron_density", red)):
            if min(values) < 0:
                raise ValueError(f"{pname} must be >= 0, got minimum {min(values)}")
            dv = np.diff(values)
            if np.any(dv < 0):
                i = int(np.argmax(dv < 0))
                raise ValueError(
                    f"{pname} must be non-decreasing with HU, got {values[i]} at {hu[i]} HU "
                    f"followed by {values[i + 1]} at {hu[i + 1]} HU"
                )
        if not isinstance(self.name, str):
            raise TypeError(f"name must be a string, got {type(self.name).__name__}")
        object.__setattr__(self, "hu", hu)
        object.__setattr__(self, "mass_density_g_cm3", rho)
        object.__setattr__(self, "relative_electron_density", red)

    # --- construction ---------------------------------------------------------------------
    @classmethod
    def default(cls) -> "DensityTable":
        """tomodose's generic kilovoltage-CT table (see the module docstring)."""
        pts = np.array(_DEFAULT_POINTS)
        red = pts[:, 1] * pts[:, 2] / Z_OVER_A_WATER
        return cls(tuple(pts[:, 0]), tuple(pts[:, 1]), tuple(red), name="tomodose generic kV CT v1")

    @classmethod
    def from_arrays(cls, hu, mass_density_g_cm3, relative_electron_density=None, name: str = "user") -> "DensityTable":
        """Table from arrays.

        When ``relative_electron_density`` is omitted it is derived from the mass density with
        the default table's density -> RED relation (linear interpolation in mass density,
        clamped beyond its ends; i.e. tissue Z/A of the default table).
        """
        rho = check_array("mass_density_g_cm3", mass_density_g_cm3, ndim=1)
        if relative_electron_density is None:
            ref = cls.default()
            red = np.interp(rho, ref.mass_density_g_cm3, ref.relative_electron_density)
            # below the first point (air) scale with air's Z/A; above the last, with the last Z/A
            lo_ratio = ref.relative_electron_density[0] / ref.mass_density_g_cm3[0]
            hi_ratio = ref.relative_electron_density[-1] / ref.mass_density_g_cm3[-1]
            red = np.where(rho < ref.mass_density_g_cm3[0], rho * lo_ratio, red)
            red = np.where(rho > ref.mass_density_g_cm3[-1], rho * hi_ratio, red)
            relative_electron_density = red
        return cls(hu, rho, relative_electron_density, name=name)

    @classmethod
    def from_file(cls, path) -> "DensityTable":
        """Read a 2- or 3-column text table: ``HU  mass_density_g_cm3  [RED]``.

        Columns are separated by whitespace or commas; ``#`` starts a comment; a first line that
        is not numeric is taken as a header and skipped.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"density table file {str(path)!r} does not exist")
        rows = []
        for lineno, raw in enumerate(path.read_text().splitlines(), start=1):
            line = raw.split("#", 1)[0].replace(",", " ").strip()
            if not line:
                continue
            parts = line.split()
            try:
                values = [float(p) for p in parts]
            except ValueError:
                if not rows:  # header line
                    continue
                raise ValueError(
                    f"density table {str(path)!r} line {lineno}: expected numbers, got {raw.strip()!r}"
                ) from None
            if len(values) not in (2, 3):
                raise ValueError(
                    f"density table {str(path)!r} line {lineno}: expected 2 or 3 columns "
                    f"(HU, g/cm3[, RED]), got {len(values)}"
                )
            if rows and len(values) != len(rows[0]):
                raise ValueError(
                    f"density table {str(path)!r} line {lineno}: expected {len(rows[0])} columns "
                    f"like the first row, got {len(values)}"
                )
            rows.append(values)
        if not rows:
            raise ValueError(f"density table {str(path)!r} holds no numeric rows")
        arr = np.array(rows, dtype=np.float64)
        red = arr[:, 2] if arr.shape[1] == 3 else None
        return cls.from_arrays(arr[:, 0], arr[:, 1], red, name=path.name)

    # --- evaluation -----------------------------------------------------------------------
    @property
    def hu_range(self) -> tuple[float, float]:
        return (self.hu[0], self.hu[-1])

    def _lookup(self, hu, values: tuple[float, ...], what: str) -> np.ndarray:
        arr = np.asarray(hu)
        if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number)):
            raise TypeError(f"hu must be a numeric array, got dtype {arr.dtype}")
        if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
            n_bad = int(np.count_nonzero(~np.isfinite(arr)))
            raise ValueError(f"hu must be finite, got {n_bad} NaN/inf value(s)")
        lo, hi = self.hu_range
        n_low = int(np.count_nonzero(arr < lo))
        n_high = int(np.count_nonzero(arr > hi))
        if n_low or n_high:
            log.warning(
                "%s: %d value(s) below %g HU and %d above %g HU are outside density table %r; "
                "clamped to the end values",
                what, n_low, lo, n_high, hi, self.name,
            )
        out = np.interp(arr.astype(np.float64, copy=False), self.hu, values)
        return out

    def mass_density(self, hu) -> np.ndarray:
        """Mass density (g/cm^3, float64, same shape as ``hu``)."""
        return self._lookup(hu, self.mass_density_g_cm3, "HU -> mass density")

    def electron_density(self, hu) -> np.ndarray:
        """Relative electron density (dimensionless, float64, same shape as ``hu``)."""
        return self._lookup(hu, self.relative_electron_density, "HU -> relative electron density")

    def hu_from_mass_density(self, density_g_cm3) -> np.ndarray:
        """Inverse of :meth:`mass_density` (float64 HU, same shape).

        Needs strictly increasing mass densities in the table. Densities outside the table's
        range are clamped to the end HU values with a logged warning.
        """
        rho = np.asarray(self.mass_density_g_cm3)
        if np.any(np.diff(rho) <= 0):
            raise ValueError(
                f"density table {self.name!r} is not invertible: mass_density_g_cm3 must be strictly "
                f"increasing, got {list(self.mass_density_g_cm3)}"
            )
        d = check_array("density_g_cm3", density_g_cm3, dtype=np.float64)
        n_low = int(np.count_nonzero(d < rho[0]))
        n_high = int(np.count_nonzero(d > rho[-1]))
        if n_low or n_high:
            log.warning(
                "mass density -> HU: %d value(s) below %g and %d above %g g/cm3 are outside density "
                "table %r; clamped to the end HU values", n_low, rho[0], n_high, rho[-1], self.name,
            )
        return np.interp(d, rho, self.hu)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "hu": list(self.hu),
            "mass_density_g_cm3": list(self.mass_density_g_cm3),
            "relative_electron_density": list(self.relative_electron_density),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "DensityTable":
        return cls(tuple(d["hu"]), tuple(d["mass_density_g_cm3"]), tuple(d["relative_electron_density"]),
                   name=str(d.get("name", "")))


def _table(table: DensityTable | None) -> DensityTable:
    if table is None:
        return DensityTable.default()
    if not isinstance(table, DensityTable):
        raise TypeError(f"table must be a DensityTable or None, got {type(table).__name__}")
    return table


def hu_to_mass_density(hu, table: DensityTable | None = None) -> np.ndarray:
    """Mass density (g/cm^3) of CT numbers ``hu`` (any shape; float64 result, same shape).

    ``table`` defaults to :meth:`DensityTable.default`; out-of-range HU are clamped (warning).
    """
    return _table(table).mass_density(hu)


def hu_to_relative_electron_density(hu, table: DensityTable | None = None) -> np.ndarray:
    """Electron density relative to water of CT numbers ``hu`` (float64, same shape)."""
    return _table(table).electron_density(hu)


def mass_density_to_hu(density_g_cm3, table: DensityTable | None = None) -> np.ndarray:
    """CT numbers (HU) whose mass density is ``density_g_cm3`` (inverse table; float64)."""
    return _table(table).hu_from_mass_density(density_g_cm3)

