"""CT image series -> :class:`~tomodose.geometry.grid.ImageVolume` in HU on an LPS grid.

Pixels are read with SimpleITK's ``ImageSeriesReader`` (GDCM: every transfer syntax GDCM
supports, rescale slope/intercept of each slice applied, so values are HU). The geometry is
checked from the slice headers (read with pydicom) before anything is accepted:

* all slices share ImageOrientationPatient, PixelSpacing, Rows and Columns;
* slices are sorted along the slice normal ``row x column``; duplicated positions are refused;
* **gantry tilt**: the slice positions move off the normal (or GantryDetectorTilt != 0);
* **irregular spacing**: the distances between neighbouring slices differ by more than
  ``tolerance_mm`` (missing slices, mixed thicknesses);
* **oblique orientation**: row/column directions not along the LPS axes.

Axis-aligned series (also flipped ones, e.g. feet-first CTs with a row direction of -x) are
re-ordered exactly, without interpolation. Tilted, irregular or oblique series are refused with
a message saying why, unless ``resample=True``: then the slices are interpolated (trilinear,
``default_hu`` outside) onto an axis-aligned grid covering all voxel centres, and a warning is
logged. tomodose grids are always axis-aligned (see :mod:`tomodose.geometry.grid`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tomodose import config
from tomodose._validate import check_finite_scalar, check_positive, check_vector
from tomodose.geometry.grid import Grid, ImageVolume
from tomodose.io.dicom._common import (
    DicomError,
    DicomReference,
    as_floats,
    check_pydicom,
    optional,
    require,
    tag_label,
)

__all__ = ["CTSeries", "read_ct_series", "read_ct_reference", "list_ct_series", "CT_IMAGE_STORAGE"]

log = logging.getLogger(__name__)

#: SOP Class UID of CT Image Storage.
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"


@dataclass(frozen=True)
class CTSeries:
    """A CT series read from DICOM.

    Attributes
    ----------
    volume : ImageVolume
        CT numbers (HU, float32), (nz, ny, nx) on an axis-aligned LPS grid.
    reference : DicomReference
        FrameOfReferenceUID, StudyInstanceUID, patient identifiers and PatientPosition.
    files : tuple of str
        The slice files, sorted along the slice normal.
    resampled : bool
        True when the series was interpolated onto a new grid (tilt, irregular spacing or
        oblique orientation with ``resample=True``).
    notes : tuple of str
        What was found and done (reorientation, resampling reasons).
    """

    volume: ImageVolume
    reference: DicomReference
    files: tuple
    resampled: bool = False
    notes: tuple = ()

    @property
    def grid(self) -> Grid:
        return self.volume.grid

    @property
    def patient_position(self) -> str:
        """DICOM PatientPosition of the series ("" when absent)."""
        return self.reference.patient_position


@dataclass
class _Slice:
    path: str
    ds: object
    ipp: np.ndarray
    iop: np.ndarray
    spacing: np.ndarray
    rows: int
    cols: int


def _scan(folder: Path) -> dict[str, list]:
    """Headers of every DICOM CT image in ``folder`` (not recursive), grouped by series UID."""
    pydicom = check_pydicom()
    from pydicom.errors import InvalidDicomError

    groups: dict[str, list] = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        except InvalidDicomError:
            log.debug("skipping non-DICOM file %s", path)
            continue
        except Exception as exc:
            raise DicomError(f"CT file {str(path)!r} could not be read (truncated or corrupt?): "
                             f"{type(exc).__name__}: {exc}") from None
        where = f"CT file {str(path)!r}"
        sop_class = str(optional(ds, "SOPClassUID", where, ""))
        modality = str(optional(ds, "Modality", where, ""))
        if sop_class == ENHANCED_CT_IMAGE_STORAGE:
            raise DicomError(f"{where}: Enhanced CT (multi-frame) objects are not supported; "
                             f"export the CT as single-frame CT Image Storage")
        if modality != "CT" and sop_class != CT_IMAGE_STORAGE:
            log.debug("skipping %s (Modality %r)", path, modality)
            continue
        uid = str(require(ds, "SeriesInstanceUID", where))
        groups.setdefault(uid, []).append((str(path), ds))
    return groups


def list_ct_series(folder) -> list[dict]:
    """CT series in ``folder``: dicts with ``series_uid``, ``n_slices``, ``description``."""
    folder = _folder(folder)
    out = []
    for uid, items in _scan(folder).items():
        ds = items[0][1]
        out.append({"series_uid": uid, "n_slices": len(items),
                    "description": str(optional(ds, "SeriesDescription", uid, ""))})
    return out


def read_ct_reference(folder, *, series_uid: str | None = None) -> DicomReference:
    """Frame of reference, study and patient identifiers of a CT series (headers only)."""
    folder = _folder(folder)
    groups = _scan(folder)
    if not groups:
        raise DicomError(f"CT folder {str(folder)!r} holds no CT images (Modality CT)")
    if series_uid is None:
        if len(groups) > 1:
            raise DicomError(f"CT folder {str(folder)!r} holds {len(groups)} CT series; choose one with "
                             f"series_uid (CLI --series): {list(groups)}")
        series_uid = next(iter(groups))
    if series_uid not in groups:
        raise DicomError(f"series_uid {series_uid!r} is not among the CT series of {str(folder)!r}: {list(groups)}")
    return DicomReference.from_dataset(groups[series_uid][0][1])


def _folder(folder) -> Path:
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"CT folder {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise DicomError(f"CT folder {str(folder)!r} is not a folder")
    return folder


def _slice(path: str, ds) -> _Slice:
    where = f"CT file {path!r}"
    ipp = as_floats(require(ds, "ImagePositionPatient", where), tag_label("ImagePositionPatient"), where, n=3)
    iop = as_floats(require(ds, "ImageOrientationPatient", where), tag_label("ImageOrientationPatient"), where, n=6)
    spacing = as_floats(require(ds, "PixelSpacing", where), tag_label("PixelSpacing"), where, n=2)
    if np.any(spacing <= 0):
        raise DicomError(f"{where}: {tag_label('PixelSpacing')} must be > 0, got {spacing.tolist()}")
    rows = int(as_floats(require(ds, "Rows", where), tag_label("Rows"), where, n=1)[0])
    cols = int(as_floats(require(ds, "Columns", where), tag_label("Columns"), where, n=1)[0])
    if rows < 1 or cols < 1:
        raise DicomError(f"{where}: Rows and Columns must be >= 1, got {rows} x {cols}")
    return _Slice(path, ds, ipp, iop, spacing, rows, cols)


def _signed_axis(vec: np.ndarray) -> tuple[int, int] | None:
    """(axis, sign) when ``vec`` is +-e_axis, else None."""
    for axis in range(3):
        target = np.zeros(3)
        target[axis] = 1.0
        if np.allclose(vec, target, atol=1e-4):
            return axis, 1
        if np.allclose(vec, -target, atol=1e-4):
            return axis, -1
    return None


def _read_pixels(files: list[str]) -> np.ndarray:
    """(n, rows, cols) float32 HU of the files, in the given order (SimpleITK)."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.SetOutputPixelType(sitk.sitkFloat32)
    warn = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # we check spacing ourselves
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise DicomError(f"CT pixel data could not be read by SimpleITK (truncated or unsupported "
                         f"file among {len(files)} slices, first {files[0]!r}): "
                         f"{first[-1] if first else exc}") from None
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warn)
    arr = sitk.GetArrayFromImage(image)
    return np.ascontiguousarray(arr, dtype=np.float32)


def read_ct_series(
    folder,
    *,
    series_uid: str | None = None,
    resample: bool = False,
    spacing_mm=None,
    default_hu: float = -1000.0,
    tolerance_mm: float = 0.01,
    progress: bool | None = None,
) -> CTSeries:
    """Read a CT series from a folder of single-frame DICOM CT images.

    Parameters
    ----------
    folder : str or Path
        Folder holding the slices (non-DICOM files and other modalities are ignored).
    series_uid : str, optional
        SeriesInstanceUID to read when the folder holds several CT series (required then).
    resample : bool
        Interpolate gantry-tilted, irregularly spaced or oblique series onto an axis-aligned
        regular grid instead of refusing them. Default False.
    spacing_mm : tuple of 3 float, optional
        (dx, dy, dz) of the resampled grid (mm); default: the pixel spacing and the median
        slice distance. Only used when resampling.
    default_hu : float
        Value outside the original slices when resampling (HU), default -1000 (air).
    tolerance_mm : float
        Allowed deviation of slice positions from a regular, untilted stack (mm).
    progress : bool, optional
        Progress bar while resampling (default from :mod:`tomodose.config`).

    Returns
    -------
    CTSeries

    Raises
    ------
    DicomError
        No CT in the folder, several series without ``series_uid``, inconsistent slices,
        tilted/irregular/oblique series without ``resample=True``, unreadable pixel data.
    """
    folder = _folder(folder)
    tol = check_positive("tolerance_mm", tolerance_mm)
    default_hu = check_finite_scalar("default_hu", default_hu)
    if spacing_mm is not None:
        spacing_mm = check_vector("spacing_mm", spacing_mm, positive=True)
    groups = _scan(folder)
    if not groups:
        raise DicomError(f"CT folder {str(folder)!r} holds no CT images (Modality CT)")
    if series_uid is None:
        if len(groups) > 1:
            listing = "; ".join(f"{uid} ({len(v)} slices)" for uid, v in groups.items())
            raise DicomError(f"CT folder {str(folder)!r} holds {len(groups)} CT series; choose one "
                             f"with series_uid (CLI --series): {listing}")
        series_uid = next(iter(groups))
    elif series_uid not in groups:
        raise DicomError(f"series_uid {series_uid!r} is not among the CT series of {str(folder)!r}: "
                         f"{list(groups)}")
    slices = [_slice(p, ds) for p, ds in groups[series_uid]]
    where = f"CT series {series_uid!r} in {str(folder)!r}"
    first = slices[0]
    for s in slices[1:]:
        if not np.allclose(s.iop, first.iop, atol=1e-4):
            raise DicomError(f"{where}: slices have different {tag_label('ImageOrientationPatient')} "
                             f"({first.iop.tolist()} in {first.path!r}, {s.iop.tolist()} in {s.path!r})")
        if not np.allclose(s.spacing, first.spacing, atol=1e-4) or (s.rows, s.cols) != (first.rows, first.cols):
            raise DicomError(f"{where}: slices have different PixelSpacing/Rows/Columns "
                             f"({first.path!r} vs {s.path!r})")
    row = first.iop[:3]
    col = first.iop[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3 or abs(row @ col) > 1e-3:
        raise DicomError(f"{where}: {tag_label('ImageOrientationPatient')} {first.iop.tolist()} is not two "
                         f"orthogonal unit vectors")
    row = row / np.linalg.norm(row)
    col = col - (col @ row) * row
    col = col / np.linalg.norm(col)
    normal = np.cross(row, col)
    d = np.array([normal @ s.ipp for s in slices])
    order = np.argsort(d, kind="stable")
    slices = [slices[i] for i in order]
    d = d[order]
    n = len(slices)
    if n > 1 and np.min(np.diff(d)) <= tol:
        k = int(np.argmin(np.diff(d)))
        raise DicomError(f"{where}: slices {slices[k].path!r} and {slices[k + 1].path!r} share the position "
                         f"{d[k]:.3f} mm along the slice normal (duplicate slices or several acquisitions)")
    ipps = np.array([s.ipp for s in slices])
    reasons = []
    tilt_tag = optional(first.ds, "GantryDetectorTilt", where, None)
    tilt_deg = 0.0
    if tilt_tag is not None:
        try:
            tilt_deg = float(tilt_tag)
        except (TypeError, ValueError):
            raise DicomError(f"{where}: {tag_label('GantryDetectorTilt')} must be a number, got {tilt_tag!r}") from None
    off_normal = ipps - ipps[:1] - np.outer(d - d[0], normal)
    max_off = float(np.max(np.linalg.norm(off_normal, axis=1))) if n > 1 else 0.0
    if max_off > tol or abs(tilt_deg) > 1e-3:
        reasons.append(f"gantry-tilted series (GantryDetectorTilt {tilt_deg:g} deg; slice positions leave "
                       f"the slice normal by up to {max_off:.3f} mm)")
    if n > 1:
        steps = np.diff(d)
        dz = float(np.median(steps))
        if np.max(np.abs(steps - dz)) > tol:
            reasons.append(f"irregular slice spacing (distances from {steps.min():.3f} to {steps.max():.3f} mm; "
                           f"missing slices or mixed thickness)")
    else:
        thick = optional(first.ds, "SliceThickness", where, None)
        dz = float(as_floats(thick, tag_label("SliceThickness"), where, n=1)[0]) if thick is not None else 0.0
        if dz <= 0:
            raise DicomError(f"{where}: a single-slice series needs {tag_label('SliceThickness')} > 0")
    ax_row = _signed_axis(row)
    ax_col = _signed_axis(col)
    if ax_row is None or ax_col is None:
        reasons.append(f"oblique orientation (ImageOrientationPatient {first.iop.tolist()})")

    files = [s.path for s in slices]
    pixels = _read_pixels(files)
    if pixels.shape != (n, first.rows, first.cols):
        raise DicomError(f"{where}: pixel data shape {pixels.shape} differs from "
                         f"(slices, Rows, Columns) = {(n, first.rows, first.cols)}")
    dy_row, dx_col = float(first.spacing[0]), float(first.spacing[1])  # PixelSpacing = row\column spacing
    reference = DicomReference.from_dataset(first.ds)
    if not reference.frame_of_reference_uid:
        log.warning("%s has no FrameOfReferenceUID; RT objects cannot be checked against it", where)

    notes = []
    if not reasons:
        # exact reorientation: array axes (slice, row index, column index) -> LPS (z, y, x)
        ax_norm = _signed_axis(normal)
        axes = {ax_row[0]: (2, ax_row[1], dx_col), ax_col[0]: (1, ax_col[1], dy_row),
                ax_norm[0]: (0, ax_norm[1], dz)}
        if len(axes) != 3:  # pragma: no cover - impossible for orthonormal vectors
            raise DicomError(f"{where}: degenerate orientation {first.iop.tolist()}")
        perm = [axes[2][0], axes[1][0], axes[0][0]]  # source axis for LPS z, y, x
        arr = np.transpose(pixels, perm)
        flips = [axes[a][1] < 0 for a in (2, 1, 0)]
        for out_axis, flip in enumerate(flips):
            if flip:
                arr = np.flip(arr, axis=out_axis)
        # origin: minimum voxel-centre coordinate along each LPS axis
        corners = []
        for kk in (0, n - 1):
            for jj in (0, first.rows - 1):
                for ii in (0, first.cols - 1):
                    corners.append(ipps[kk] + ii * dx_col * row + jj * dy_row * col)
        origin = np.min(np.array(corners), axis=0)
        spacing = (axes[0][2], axes[1][2], axes[2][2])
        grid = Grid(shape=arr.shape, spacing_mm=spacing, origin_mm=tuple(origin))
        if perm != [0, 1, 2] or any(flips):
            notes.append(f"re-ordered axes exactly (transpose {perm}, flips z/y/x {flips})")
        volume = ImageVolume(grid, np.ascontiguousarray(arr), "HU", "ct_number")
        return CTSeries(volume, reference, tuple(files), False, tuple(notes))

    message = "; ".join(reasons)
    if not resample:
        raise DicomError(f"{where}: {message}. tomodose needs an axis-aligned regular grid: pass "
                         f"resample=True (CLI --resample) to interpolate onto one (positions are compared "
                         f"with tolerance_mm={tol:g}, CLI --slice-tolerance)")
    log.warning("%s: %s; resampling onto an axis-aligned grid (trilinear)", where, message)
    grid = _target_grid(ipps, row, col, dx_col, dy_row, first.rows, first.cols, dz, spacing_mm)
    arr = _resample(pixels, ipps, d, row, col, normal, dx_col, dy_row, grid, default_hu, tol, progress)
    notes.append(f"resampled: {message}")
    volume = ImageVolume(grid, arr, "HU", "ct_number")
    return CTSeries(volume, reference, tuple(files), True, tuple(notes))


def _target_grid(ipps, row, col, dx_col, dy_row, rows, cols, dz, spacing_mm) -> Grid:
    corners = []
    for p in (ipps[0], ipps[-1]):
        for jj in (0, rows - 1):
            for ii in (0, cols - 1):
                corners.append(p + ii * dx_col * row + jj * dy_row * col)
    corners = np.array(corners)
    lower, upper = corners.min(axis=0), corners.max(axis=0)
    spacing = spacing_mm if spacing_mm is not None else (dx_col, dy_row, dz)
    # voxel centres from lower in steps of spacing, not beyond upper (+ small slack)
    n = np.floor((upper - lower) / np.asarray(spacing) + 1e-6).astype(int) + 1
    return Grid(shape=(int(n[2]), int(n[1]), int(n[0])), spacing_mm=tuple(spacing), origin_mm=tuple(lower))


def _resample(pixels, ipps, d, row, col, normal, dx_col, dy_row, grid, default_hu, tol, progress) -> np.ndarray:
    from scipy.ndimage import map_coordinates
    from tqdm import tqdm

    n, rows, cols = pixels.shape
    out = np.empty(grid.shape, dtype=np.float32)
    x = grid.x_mm[None, :]
    y = grid.y_mm[:, None]
    kidx = np.arange(n, dtype=np.float64)
    for kz in tqdm(range(grid.nz), desc="resampling CT", unit="slice",
                   disable=not config.progress_enabled(progress)):
        z = grid.z_mm[kz]
        px = np.broadcast_to(x, (grid.ny, grid.nx))
        py = np.broadcast_to(y, (grid.ny, grid.nx))
        pz = np.full((grid.ny, grid.nx), z)
        dist = normal[0] * px + normal[1] * py + normal[2] * pz
        if n > 1:
            kf = np.interp(dist, d, kidx)
            k0 = np.clip(np.floor(kf).astype(int), 0, n - 2)
            frac = kf - k0
            origin = ipps[k0] + frac[..., None] * (ipps[k0 + 1] - ipps[k0])
        else:
            kf = np.zeros_like(dist)
            origin = np.broadcast_to(ipps[0], dist.shape + (3,))
        q = np.stack([px, py, pz], axis=-1) - origin
        ii = q @ row / dx_col
        jj = q @ col / dy_row
        inside = (dist >= d[0] - tol) & (dist <= d[-1] + tol)
        for coord, size in ((ii, cols), (jj, rows)):
            near = (coord > -1e-6) & (coord < size - 1 + 1e-6)
            np.clip(coord, 0, size - 1, out=coord, where=near)
        vals = map_coordinates(pixels, [kf.ravel(), jj.ravel(), ii.ravel()], order=1, mode="constant",
                               cval=default_hu).reshape(dist.shape)
        out[kz] = np.where(inside, vals, default_hu)
    return out
