"""Structures (regions of interest) as voxel masks on a :class:`~tomodose.geometry.grid.Grid`.

A :class:`Structure` holds an occupancy array in [0, 1]: 1 for voxels fully inside, fractional
values for partial-volume voxels (e.g. from rasterised contours), 0 outside. Boolean masks are
accepted and stored as occupancy 0/1. Volumes are reported in mL (cm^3).

Margins (GTV -> PTV) are grown with a Euclidean distance transform scaled per axis, so
anisotropic margins give an ellipsoidal structuring element in mm, independent of voxel size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Mapping

import numpy as np
from scipy import ndimage

from tomodose._validate import check_array, check_nonnegative, check_vector
from tomodose.geometry.grid import Grid

__all__ = ["Structure", "StructureSet", "expand_margin", "ellipsoid_mask"]


@dataclass(frozen=True)
class Structure:
    """A named region on a grid.

    Parameters
    ----------
    name : str
        Structure name (e.g. ``"PTV"``).
    grid : Grid
    occupancy : (nz, ny, nx) array
        Fraction of each voxel inside the structure, in [0, 1]; bool accepted. Stored as float32.
    role : str, optional
        Protocol role (``"target"``, ``"oar"``, ``"external"``, ...), free text.
    color : tuple of 3 float, optional
        RGB in [0, 1] for plots.
    """

    name: str
    grid: Grid
    occupancy: np.ndarray = field(repr=False)
    role: str = ""
    color: tuple[float, float, float] | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.grid, Grid):
            raise TypeError(f"grid must be a tomodose Grid, got {type(self.grid).__name__}")
        occ = check_array(
            f"occupancy of structure {self.name!r}", self.occupancy, shape=self.grid.shape,
            dtype=np.float32, low=0.0, high=1.0,
        )
        object.__setattr__(self, "occupancy", occ)

    @property
    def mask(self) -> np.ndarray:
        """Boolean mask: voxels whose occupancy is >= 0.5."""
        return self.occupancy >= 0.5

    @property
    def any_voxel(self) -> np.ndarray:
        """Boolean mask: voxels with any occupancy > 0."""
        return self.occupancy > 0

    @property
    def volume_ml(self) -> float:
        """Volume in mL: sum of occupancies x voxel volume."""
        return float(self.occupancy.sum(dtype=np.float64) * self.grid.voxel_volume_ml)

    @property
    def is_empty(self) -> bool:
        return not np.any(self.occupancy > 0)

    def centroid_mm(self) -> tuple[float, float, float]:
        """Occupancy-weighted centroid (x, y, z) in LPS mm."""
        if self.is_empty:
            raise ValueError(f"structure {self.name!r} is empty: it has no centroid")
        w = self.occupancy.astype(np.float64)
        total = w.sum()
        x, y, z = self.grid.meshgrid_mm()
        return (
            float((w * x).sum() / total),
            float((w * y).sum() / total),
            float((w * z).sum() / total),
        )

    def renamed(self, name: str) -> "Structure":
        return Structure(name, self.grid, self.occupancy, self.role, self.color)

    # --- boolean algebra on masks (occupancy-aware) -----------------------------------
    def union(self, other: "Structure", name: str | None = None) -> "Structure":
        self.grid.require_same(other.grid, f"structure {other.name!r}")
        return Structure(name or f"{self.name}|{other.name}", self.grid,
                         np.maximum(self.occupancy, other.occupancy), self.role)

    def intersection(self, other: "Structure", name: str | None = None) -> "Structure":
        self.grid.require_same(other.grid, f"structure {other.name!r}")
        return Structure(name or f"{self.name}&{other.name}", self.grid,
                         np.minimum(self.occupancy, other.occupancy), self.role)

    def minus(self, other: "Structure", name: str | None = None) -> "Structure":
        """Occupancy of ``self`` outside ``other``: ``max(0, a - b)``."""
        self.grid.require_same(other.grid, f"structure {other.name!r}")
        return Structure(name or f"{self.name}-{other.name}", self.grid,
                         np.clip(self.occupancy - other.occupancy, 0.0, 1.0), self.role)

    def expanded(self, margin_mm, name: str | None = None) -> "Structure":
        """Grow by ``margin_mm`` (scalar or (x, y, z)); see :func:`expand_margin`."""
        occ = expand_margin(self.mask, self.grid, margin_mm).astype(np.float32)
        return Structure(name or f"{self.name}+{margin_mm}mm", self.grid, occ, self.role)


def expand_margin(mask: np.ndarray, grid: Grid, margin_mm) -> np.ndarray:
    """Expand a boolean mask by an (anisotropic) margin in mm.

    A voxel is in the result when its centre lies within the ellipsoid of semi-axes
    ``margin_mm = (mx, my, mz)`` around the centre of some voxel of ``mask``:
    ``(dx/mx)^2 + (dy/my)^2 + (dz/mz)^2 <= 1``. Computed with one exact Euclidean distance
    transform whose sampling is ``spacing / margin`` per axis (no dilation loops).
    A zero margin on an axis means no growth along that axis.

    Parameters
    ----------
    mask : (nz, ny, nx) bool array
    grid : Grid
    margin_mm : float or tuple of 3 float
        Margin in mm, scalar or (x, y, z); each >= 0.

    Returns
    -------
    (nz, ny, nx) bool array
    """
    mask = check_array("mask", mask, shape=grid.shape, dtype=bool)
    if np.ndim(margin_mm) == 0:
        m = check_nonnegative("margin_mm", margin_mm)
        margins = (m, m, m)
    else:
        margins = check_vector("margin_mm", margin_mm)
        for axis, m in zip("xyz", margins):
            check_nonnegative(f"margin_mm[{axis}]", m)
    if not mask.any() or all(m == 0 for m in margins):
        return mask.copy()
    # axes with a zero margin: expand the others slice by slice along that axis
    spacing_zyx = np.array(grid.spacing_mm[::-1])
    margins_zyx = np.array(margins[::-1])
    active = margins_zyx > 0
    # sampling for active axes: spacing / margin; inactive axes are handled by a huge sampling,
    # which makes any step along them cost more than 1 (i.e. never within the ellipsoid).
    sampling = np.where(active, spacing_zyx / np.where(active, margins_zyx, 1.0), 1e9)
    dist = ndimage.distance_transform_edt(~mask, sampling=sampling)
    return dist <= 1.0 + 1e-9


def ellipsoid_mask(grid: Grid, centre_mm, semi_axes_mm) -> np.ndarray:
    """Boolean mask of voxel centres inside an axis-aligned ellipsoid (LPS mm, (x, y, z))."""
    cx, cy, cz = check_vector("centre_mm", centre_mm)
    ax, ay, az = check_vector("semi_axes_mm", semi_axes_mm, positive=True)
    x, y, z = grid.meshgrid_mm()
    return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 + ((z - cz) / az) ** 2 <= 1.0


class StructureSet(Mapping[str, Structure]):
    """Ordered, name-keyed collection of :class:`Structure` on one grid."""

    def __init__(self, grid: Grid, structures=()):
        if not isinstance(grid, Grid):
            raise TypeError(f"grid must be a tomodose Grid, got {type(grid).__name__}")
        self.grid = grid
        self._items: dict[str, Structure] = {}
        for s in structures:
            self.add(s)

    def add(self, structure: Structure) -> None:
        if not isinstance(structure, Structure):
            raise TypeError(f"structure must be a Structure, got {type(structure).__name__}")
        self.grid.require_same(structure.grid, f"structure {structure.name!r}")
        if structure.name in self._items:
            raise ValueError(f"structure name {structure.name!r} is already in the set")
        self._items[structure.name] = structure

    def __getitem__(self, name: str) -> Structure:
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(
                f"no structure named {name!r}; available: {list(self._items)}"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def volumes_ml(self) -> dict[str, float]:
        """Volume in mL of every structure, in order."""
        return {name: s.volume_ml for name, s in self._items.items()}

    def __repr__(self) -> str:
        return f"StructureSet({list(self._items)}, grid={self.grid})"
