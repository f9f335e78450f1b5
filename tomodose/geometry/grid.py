"""Regular voxel grids and scalar volumes in DICOM patient coordinates (LPS, mm).

Conventions (used everywhere in tomodose)
----------------------------------------
* Arrays are indexed ``[k, j, i]`` = ``[z, y, x]``: shape ``(nz, ny, nx)``, x fastest in memory
  (the order of ``SimpleITK.GetArrayFromImage`` and of DICOM pixel data stacked by slice).
* ``spacing_mm`` and ``origin_mm`` are given in **(x, y, z)** order, like DICOM and SimpleITK.
* ``origin_mm`` is the centre of voxel ``[0, 0, 0]``.
* The frame is DICOM patient **LPS**: +x towards the patient's left, +y posterior,
  +z superior. Grids are axis-aligned with identity direction cosines; oblique or flipped
  grids are refused (resample them first, see :mod:`tomodose.geometry.resample`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tomodose._validate import check_array, check_choice, check_vector

__all__ = ["Grid", "ImageVolume", "FRAME"]

#: The only supported patient frame.
FRAME = "LPS"


@dataclass(frozen=True)
class Grid:
    """Axis-aligned regular grid in DICOM patient LPS.

    Parameters
    ----------
    shape : tuple of 3 int
        Array shape ``(nz, ny, nx)``.
    spacing_mm : tuple of 3 float
        Voxel size ``(dx, dy, dz)`` in mm, all > 0.
    origin_mm : tuple of 3 float
        LPS position ``(x, y, z)`` in mm of the centre of voxel ``[0, 0, 0]``.
    frame : str
        Must be ``"LPS"``.
    """

    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    frame: str = FRAME

    def __post_init__(self):
        shape = tuple(self.shape) if not isinstance(self.shape, np.ndarray) else tuple(self.shape.tolist())
        if len(shape) != 3 or not all(
            isinstance(n, (int, np.integer)) and not isinstance(n, bool) for n in shape
        ):
            raise ValueError(f"shape must be 3 integers (nz, ny, nx), got {self.shape!r}")
        if any(n < 1 for n in shape):
            raise ValueError(f"shape must have all entries >= 1, got {shape}")
        object.__setattr__(self, "shape", tuple(int(n) for n in shape))
        object.__setattr__(self, "spacing_mm", check_vector("spacing_mm", self.spacing_mm, positive=True))
        object.__setattr__(self, "origin_mm", check_vector("origin_mm", self.origin_mm))
        check_choice("frame", self.frame, (FRAME,))

    # --- construction ---------------------------------------------------------------------
    @classmethod
    def from_extent(cls, lower_mm, upper_mm, spacing_mm) -> "Grid":
        """Grid whose voxel centres cover the box ``[lower_mm, upper_mm]`` (x, y, z), inclusive.

        The number of voxels per axis is ``round((upper - lower) / spacing) + 1``, and the grid is
        centred on the box.
        """
        lower = np.array(check_vector("lower_mm", lower_mm))
        upper = np.array(check_vector("upper_mm", upper_mm))
        spacing = np.array(check_vector("spacing_mm", spacing_mm, positive=True))
        if np.any(upper < lower):
            raise ValueError(f"upper_mm must be >= lower_mm per axis, got {upper.tolist()} < {lower.tolist()}")
        n = np.maximum(1, np.round((upper - lower) / spacing).astype(int) + 1)
        centre = 0.5 * (lower + upper)
        origin = centre - 0.5 * (n - 1) * spacing
        return cls(shape=(int(n[2]), int(n[1]), int(n[0])), spacing_mm=tuple(spacing), origin_mm=tuple(origin))

    # --- derived quantities --------------------------------------------------------------
    @property
    def nx(self) -> int:
        return self.shape[2]

    @property
    def ny(self) -> int:
        return self.shape[1]

    @property
    def nz(self) -> int:
        return self.shape[0]

    @property
    def n_voxels(self) -> int:
        return self.shape[0] * self.shape[1] * self.shape[2]

    @property
    def voxel_volume_mm3(self) -> float:
        dx, dy, dz = self.spacing_mm
        return dx * dy * dz

    @property
    def voxel_volume_ml(self) -> float:
        """Voxel volume in mL (= cm^3)."""
        return self.voxel_volume_mm3 / 1000.0

    def axis_mm(self, axis: str) -> np.ndarray:
        """Voxel-centre coordinates (mm, LPS) along ``axis`` in ``{"x", "y", "z"}``."""
        check_choice("axis", axis, ("x", "y", "z"))
        a = "xyz".index(axis)
        n = self.shape[2 - a]
        return self.origin_mm[a] + self.spacing_mm[a] * np.arange(n, dtype=np.float64)

    @property
    def x_mm(self) -> np.ndarray:
        return self.axis_mm("x")

    @property
    def y_mm(self) -> np.ndarray:
        return self.axis_mm("y")

    @property
    def z_mm(self) -> np.ndarray:
        return self.axis_mm("z")

    @property
    def upper_mm(self) -> tuple[float, float, float]:
        """LPS position of the centre of the last voxel ``[nz-1, ny-1, nx-1]`` (x, y, z)."""
        return tuple(
            self.origin_mm[a] + self.spacing_mm[a] * (self.shape[2 - a] - 1) for a in range(3)
        )

    @property
    def centre_mm(self) -> tuple[float, float, float]:
        """LPS centre of the grid (x, y, z)."""
        return tuple(0.5 * (lo + hi) for lo, hi in zip(self.origin_mm, self.upper_mm))

    def meshgrid_mm(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable coordinate arrays ``(x, y, z)`` of shapes (1,1,nx), (1,ny,1), (nz,1,1)."""
        return (
            self.x_mm[None, None, :],
            self.y_mm[None, :, None],
            self.z_mm[:, None, None],
        )

    def index_to_lps(self, index_kji) -> np.ndarray:
        """Convert (..., 3) array indices ``(k, j, i)`` (may be fractional) to LPS mm ``(x, y, z)``."""
        idx = np.asarray(index_kji, dtype=np.float64)
        ijk = idx[..., ::-1]
        return np.asarray(self.origin_mm) + ijk * np.asarray(self.spacing_mm)

    def lps_to_index(self, points_mm) -> np.ndarray:
        """Convert (..., 3) LPS points ``(x, y, z)`` in mm to fractional indices ``(k, j, i)``."""
        p = np.asarray(points_mm, dtype=np.float64)
        ijk = (p - np.asarray(self.origin_mm)) / np.asarray(self.spacing_mm)
        return ijk[..., ::-1]

    def contains_mm(self, points_mm) -> np.ndarray:
        """True for LPS points inside the grid's bounding box (voxel edges included)."""
        kji = self.lps_to_index(points_mm)
        shape = np.asarray(self.shape)
        return np.all((kji >= -0.5) & (kji <= shape - 0.5), axis=-1)

    def same_as(self, other: "Grid", tol_mm: float = 1e-6) -> bool:
        """True when both grids have the same shape and geometry within ``tol_mm``."""
        return (
            self.shape == other.shape
            and np.allclose(self.spacing_mm, other.spacing_mm, atol=tol_mm, rtol=0)
            and np.allclose(self.origin_mm, other.origin_mm, atol=tol_mm, rtol=0)
            and self.frame == other.frame
        )

    def require_same(self, other: "Grid", what: str = "grid") -> None:
        """Raise ValueError naming ``what`` when ``other`` differs from this grid."""
        if not self.same_as(other):
            raise ValueError(
                f"{what} must be on the same grid: expected shape {self.shape}, spacing_mm "
                f"{self.spacing_mm}, origin_mm {self.origin_mm}; got shape {other.shape}, "
                f"spacing_mm {other.spacing_mm}, origin_mm {other.origin_mm}"
            )

    def to_dict(self) -> dict:
        return {
            "shape": list(self.shape),
            "spacing_mm": list(self.spacing_mm),
            "origin_mm": list(self.origin_mm),
            "frame": self.frame,
        }


@dataclass(frozen=True)
class ImageVolume:
    """A scalar 3-D quantity on a :class:`Grid` (CT numbers, density, dose, ...).

    Parameters
    ----------
    grid : Grid
    array : (nz, ny, nx) ndarray
        Values, C-contiguous; must be finite.
    unit : str
        Unit of the values, e.g. ``"HU"``, ``"g/cm3"``, ``"Gy"``, ``"1"`` (dimensionless).
    quantity : str
        What the values are, e.g. ``"ct_number"``, ``"mass_density"``, ``"dose"``.
    allow_nonfinite : bool
        Accept NaN/inf values (default False: they are refused). Evaluation maps use it, with
        NaN for "not evaluated" and inf for "not found"; physical inputs (CT, density, dose)
        never should.
    """

    grid: Grid
    array: np.ndarray = field(repr=False)
    unit: str
    quantity: str = ""
    allow_nonfinite: bool = False

    def __post_init__(self):
        if not isinstance(self.grid, Grid):
            raise TypeError(f"grid must be a tomodose Grid, got {type(self.grid).__name__}")
        dtype = self.array.dtype if isinstance(self.array, np.ndarray) and np.issubdtype(
            self.array.dtype, np.floating
        ) else np.float64
        arr = check_array("array", self.array, shape=self.grid.shape, dtype=dtype,
                          finite=not self.allow_nonfinite)
        object.__setattr__(self, "array", arr)
        if not isinstance(self.unit, str) or not self.unit:
            raise ValueError(f"unit must be a non-empty string, got {self.unit!r}")

    def with_array(self, array: np.ndarray, unit: str | None = None, quantity: str | None = None) -> "ImageVolume":
        """Same grid, new values."""
        return ImageVolume(self.grid, array, unit or self.unit, self.quantity if quantity is None else quantity,
                           allow_nonfinite=self.allow_nonfinite)
