"""Resampling between grids and conversion to/from SimpleITK images.

SimpleITK images use the same physical convention as tomodose: DICOM patient LPS in mm,
origin = centre of the first voxel, spacing in (x, y, z), and ``GetArrayFromImage`` returns
``[z, y, x]`` arrays. tomodose grids always have the identity direction matrix.

* :func:`to_sitk` / :func:`from_sitk` convert :class:`~tomodose.geometry.grid.ImageVolume`
  <-> ``SimpleITK.Image``. An image whose direction is an axis permutation/flip (e.g. a NIfTI
  read as RAS-flipped, or a feet-first stack) is re-ordered losslessly onto an identity-direction
  grid; an oblique image is refused unless ``oblique="resample"`` (then it is resampled onto the
  axis-aligned grid that covers it, same spacing).
* :func:`resample_volume` resamples a scalar volume onto a target grid (linear by default: CT,
  dose); :func:`resample_occupancy` resamples a structure occupancy linearly (partial volumes
  kept, clipped to [0, 1]); :func:`resample_mask` gives a boolean mask (nearest neighbour, or
  linear then threshold).

Target voxels outside the source image get ``default_value`` (a warning is logged with their
count when any target voxel is outside).
"""

from __future__ import annotations

import logging

import numpy as np
import SimpleITK as sitk

from tomodose._validate import check_choice, check_finite_scalar, check_in_range
from tomodose.geometry.grid import Grid, ImageVolume

__all__ = [
    "to_sitk",
    "from_sitk",
    "grid_from_sitk",
    "grid_to_sitk_reference",
    "resample_array",
    "resample_volume",
    "resample_occupancy",
    "resample_mask",
]

log = logging.getLogger(__name__)

_INTERPOLATORS = {
    "linear": sitk.sitkLinear,
    "nearest": sitk.sitkNearestNeighbor,
    "bspline": sitk.sitkBSpline,
}

_IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _array_to_image(array: np.ndarray, grid: Grid) -> sitk.Image:
    img = sitk.GetImageFromArray(np.ascontiguousarray(array))
    img.SetSpacing(tuple(float(s) for s in grid.spacing_mm))
    img.SetOrigin(tuple(float(o) for o in grid.origin_mm))
    img.SetDirection(_IDENTITY)
    return img


def to_sitk(volume: ImageVolume) -> sitk.Image:
    """SimpleITK image of ``volume`` (LPS origin and spacing in mm, identity direction).

    The pixel type follows the array dtype (float64 stays float64).
    """
    if not isinstance(volume, ImageVolume):
        raise TypeError(f"volume must be an ImageVolume, got {type(volume).__name__}")
    return _array_to_image(volume.array, volume.grid)


def grid_to_sitk_reference(grid: Grid) -> sitk.Image:
    """An empty (uint8) SimpleITK image with the geometry of ``grid`` (for resampling)."""
    if not isinstance(grid, Grid):
        raise TypeError(f"grid must be a tomodose Grid, got {type(grid).__name__}")
    ref = sitk.Image([grid.nx, grid.ny, grid.nz], sitk.sitkUInt8)
    ref.SetSpacing(tuple(float(s) for s in grid.spacing_mm))
    ref.SetOrigin(tuple(float(o) for o in grid.origin_mm))
    ref.SetDirection(_IDENTITY)
    return ref


def _check_3d(image) -> None:
    if not isinstance(image, sitk.Image):
        raise TypeError(f"image must be a SimpleITK.Image, got {type(image).__name__}")
    if image.GetDimension() != 3:
        raise ValueError(f"image must be 3-D, got {image.GetDimension()}-D")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(
            f"image must be scalar, got {image.GetNumberOfComponentsPerPixel()} components per pixel"
        )


def _is_signed_permutation(direction: np.ndarray, tol: float = 1e-6) -> bool:
    a = np.abs(direction)
    return bool(np.all((np.abs(a - 1) < tol) | (a < tol)) and np.allclose(a.sum(0), 1, atol=tol)
                and np.allclose(a.sum(1), 1, atol=tol))


def grid_from_sitk(image: sitk.Image) -> Grid:
    """The tomodose grid of an identity-direction SimpleITK image (else ValueError)."""
    _check_3d(image)
    d = np.array(image.GetDirection()).reshape(3, 3)
    if not np.allclose(d, np.eye(3), atol=1e-6):
        raise ValueError(
            f"image direction must be the identity (axis-aligned LPS), got {np.round(d, 6).tolist()}; "
            "use from_sitk(..., oblique='resample') or reorient the image first"
        )
    nx, ny, nz = image.GetSize()
    return Grid(shape=(nz, ny, nx), spacing_mm=image.GetSpacing(), origin_mm=image.GetOrigin())


def from_sitk(image: sitk.Image, unit: str, quantity: str = "", *, oblique: str = "refuse",
              interpolation: str = "linear", dtype=None) -> ImageVolume:
    """Convert a SimpleITK image to an :class:`ImageVolume` on an identity-direction LPS grid.

    Parameters
    ----------
    image : SimpleITK.Image
        3-D scalar image (physical space: LPS, mm).
    unit, quantity : str
        Stored on the volume (e.g. ``"Gy"``, ``"dose"``).
    oblique : {"refuse", "resample"}
        What to do with a direction matrix that is not an axis permutation/flip. Permutations
        and flips are always re-ordered exactly (no interpolation).
    interpolation : {"linear", "nearest", "bspline"}
        Used only when an oblique image is resampled.
    dtype : numpy dtype, optional
        Array dtype; default float32 for float32 images, else float64.
    """
    _check_3d(image)
    check_choice("oblique", oblique, ("refuse", "resample"))
    check_choice("interpolation", interpolation, tuple(_INTERPOLATORS))
    d = np.array(image.GetDirection()).reshape(3, 3)
    if not np.allclose(d, np.eye(3), atol=1e-6):
        if _is_signed_permutation(d):
            image = sitk.DICOMOrient(image, "LPS")
            d = np.array(image.GetDirection()).reshape(3, 3)
            if not np.allclose(d, np.eye(3), atol=1e-6):  # pragma: no cover - defensive
                raise ValueError(f"could not reorient the image to identity direction, got {d.tolist()}")
        elif oblique == "refuse":
            raise ValueError(
                f"image direction {np.round(d, 6).tolist()} is oblique; tomodose grids are axis-aligned "
                "LPS. Pass oblique='resample' to resample it onto an axis-aligned grid"
            )
        else:
            image = _resample_oblique(image, interpolation)
    grid = grid_from_sitk(image)
    arr = sitk.GetArrayFromImage(image)
    if dtype is None:
        dtype = np.float32 if arr.dtype == np.float32 else np.float64
    return ImageVolume(grid, np.ascontiguousarray(arr, dtype=dtype), unit, quantity)


def _resample_oblique(image: sitk.Image, interpolation: str) -> sitk.Image:
    """Resample an oblique image onto the axis-aligned grid covering its voxel centres."""
    size = np.array(image.GetSize())
    corners = np.array([[i, j, k] for i in (0, size[0] - 1) for j in (0, size[1] - 1) for k in (0, size[2] - 1)])
    pts = np.array([image.TransformContinuousIndexToPhysicalPoint(tuple(float(c) for c in p)) for p in corners])
    spacing = np.array(image.GetSpacing())
    # spacing along each output axis: the smallest input spacing (no loss of resolution)
    out_spacing = np.full(3, spacing.min())
    lower, upper = pts.min(0), pts.max(0)
    grid = Grid.from_extent(lower, upper, out_spacing)
    log.warning("oblique image resampled onto an axis-aligned grid %s (%s interpolation)", grid, interpolation)
    res = sitk.Resample(image, grid_to_sitk_reference(grid), sitk.Transform(), _INTERPOLATORS[interpolation],
                        0.0, image.GetPixelID())
    return res


def resample_array(array: np.ndarray, source_grid: Grid, target_grid: Grid, *, interpolation: str = "linear",
                   default_value: float = 0.0) -> np.ndarray:
    """Resample a (nz, ny, nx) array from ``source_grid`` onto ``target_grid``.

    Returns float32 for float32 input, float64 otherwise (nearest keeps integer/bool dtypes).
    Identical grids return a copy without interpolation.
    """
    if not isinstance(source_grid, Grid) or not isinstance(target_grid, Grid):
        raise TypeError("source_grid and target_grid must be tomodose Grids")
    check_choice("interpolation", interpolation, tuple(_INTERPOLATORS))
    default_value = check_finite_scalar("default_value", default_value)
    arr = np.asarray(array)
    if arr.shape != source_grid.shape:
        raise ValueError(f"array must have the source grid shape {source_grid.shape}, got {arr.shape}")
    if source_grid.same_as(target_grid, tol_mm=1e-9):
        return arr.copy()
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if interpolation != "nearest" and arr.dtype not in (np.float32, np.float64):
        arr = arr.astype(np.float64)
    img = _array_to_image(arr, source_grid)
    out_type = img.GetPixelID()
    res = sitk.Resample(img, grid_to_sitk_reference(target_grid), sitk.Transform(),
                        _INTERPOLATORS[interpolation], default_value, out_type)
    out = sitk.GetArrayFromImage(res)
    n_in = 1
    for a, axis in enumerate("xyz"):
        idx = (target_grid.axis_mm(axis) - source_grid.origin_mm[a]) / source_grid.spacing_mm[a]
        n_in *= int(np.count_nonzero((idx >= -0.5) & (idx <= source_grid.shape[2 - a] - 0.5)))
    n_out = target_grid.n_voxels - n_in
    if n_out:
        log.warning("resample: %d of %d target voxels lie outside the source grid; set to %g",
                    n_out, target_grid.n_voxels, default_value)
    if np.asarray(array).dtype == np.bool_:
        out = out.astype(bool)
    return out


def resample_volume(volume: ImageVolume, grid: Grid, *, interpolation: str = "linear",
                    default_value: float = 0.0) -> ImageVolume:
    """Resample an :class:`ImageVolume` onto ``grid`` (linear for CT and dose by default).

    Use ``default_value=-1000`` for CT (air outside the scan) and 0 for dose.
    """
    if not isinstance(volume, ImageVolume):
        raise TypeError(f"volume must be an ImageVolume, got {type(volume).__name__}")
    out = resample_array(volume.array, volume.grid, grid, interpolation=interpolation,
                         default_value=default_value)
    return ImageVolume(grid, out, volume.unit, volume.quantity)


def resample_occupancy(occupancy: np.ndarray, source_grid: Grid, target_grid: Grid) -> np.ndarray:
    """Linear resampling of a structure occupancy in [0, 1]; float32 result clipped to [0, 1]."""
    occ = np.asarray(occupancy, dtype=np.float32)
    out = resample_array(occ, source_grid, target_grid, interpolation="linear", default_value=0.0)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def resample_mask(mask: np.ndarray, source_grid: Grid, target_grid: Grid, *, method: str = "nearest",
                  threshold: float = 0.5) -> np.ndarray:
    """Boolean mask on ``target_grid``.

    ``method="nearest"`` takes the nearest source voxel; ``"linear"`` interpolates the 0/1
    mask linearly and keeps voxels ``>= threshold`` (smoother boundaries when grids differ).
    """
    check_choice("method", method, ("nearest", "linear"))
    threshold = check_in_range("threshold", threshold, 0.0, 1.0, inclusive=False)
    m = np.asarray(mask)
    if m.shape != source_grid.shape:
        raise ValueError(f"mask must have the source grid shape {source_grid.shape}, got {m.shape}")
    if method == "nearest":
        return resample_array(m.astype(bool), source_grid, target_grid, interpolation="nearest").astype(bool)
    out = resample_array(m.astype(np.float32), source_grid, target_grid, interpolation="linear")
    return out >= threshold
