"""Export and import of volumes (dose, CT, masks) as MHA, NRRD or NIfTI through SimpleITK.

The format follows the file suffix: ``.mha`` (MetaImage, single file), ``.nrrd``, ``.nii`` or
``.nii.gz``. Geometry is written in physical LPS millimetres through SimpleITK, which converts
to the file's own convention: NIfTI stores RAS in its qform/sform, and ITK flips x and y on
write and back on read, so a round trip keeps the LPS geometry (checked by the tests to
0.01 mm). Writes are atomic (temporary file in the target folder, then :func:`os.replace`).

MHA and NRRD also keep the unit and quantity as metadata (``tomodose_unit``,
``tomodose_quantity``); NIfTI cannot, so pass ``unit=`` when importing a NIfTI file.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from tomodose._atomic import atomic_path

from tomodose.geometry.grid import ImageVolume
from tomodose.geometry.resample import from_sitk, to_sitk
from tomodose.geometry.structures import Structure

__all__ = ["SUFFIXES", "export_volume", "export_structure", "import_volume", "image_format"]

log = logging.getLogger(__name__)

#: Supported suffixes -> format name.
SUFFIXES = {".mha": "MetaImage", ".nrrd": "NRRD", ".nii": "NIfTI", ".nii.gz": "NIfTI (gzip)"}

_META_UNIT = "tomodose_unit"
_META_QUANTITY = "tomodose_quantity"


def image_format(path) -> str:
    """The suffix of ``path`` that selects the format (``.mha``, ``.nrrd``, ``.nii``, ``.nii.gz``)."""
    name = Path(path).name.lower()
    for suffix in (".nii.gz", ".mha", ".nrrd", ".nii"):
        if name.endswith(suffix):
            return suffix
    raise ValueError(f"path must end with one of {list(SUFFIXES)}, got {str(path)!r}")


def _atomic_write(image: sitk.Image, path: Path, compress: bool) -> Path:
    suffix = image_format(path)
    with atomic_path(path, suffix=f".tmp{suffix}") as tmp:
        sitk.WriteImage(image, str(tmp), compress)
    log.info("wrote %s (%s)", path, SUFFIXES[suffix])
    return path


def export_volume(volume: ImageVolume, path, *, compress: bool = True, dtype=None) -> Path:
    """Write an :class:`ImageVolume` (dose, CT, density, ...) to MHA/NRRD/NIfTI.

    Parameters
    ----------
    volume : ImageVolume
    path : str or Path
        Output file; the suffix selects the format.
    compress : bool
        Compress the pixel data (zlib/gzip) where the format allows.
    dtype : numpy dtype, optional
        Pixel type on disk; default: the array's dtype.

    Returns
    -------
    Path of the written file.
    """
    if not isinstance(volume, ImageVolume):
        raise TypeError(f"volume must be an ImageVolume, got {type(volume).__name__}")
    path = Path(path)
    image_format(path)
    vol = volume if dtype is None else volume.with_array(volume.array.astype(dtype))
    img = to_sitk(vol)
    img.SetMetaData(_META_UNIT, volume.unit)
    img.SetMetaData(_META_QUANTITY, volume.quantity or "")
    return _atomic_write(img, path, compress)


def export_structure(structure: Structure, path, *, compress: bool = True, threshold: float | None = 0.5) -> Path:
    """Write a structure as a uint8 mask (``threshold`` given: occupancy >= threshold -> 1) or, with
    ``threshold=None``, its float32 occupancy in [0, 1]."""
    if not isinstance(structure, Structure):
        raise TypeError(f"structure must be a Structure, got {type(structure).__name__}")
    path = Path(path)
    image_format(path)
    if threshold is None:
        arr = structure.occupancy.astype(np.float32)
        unit = "1"
    else:
        arr = (structure.occupancy >= float(threshold)).astype(np.uint8)
        unit = "mask"
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr))
    img.SetSpacing(structure.grid.spacing_mm)
    img.SetOrigin(structure.grid.origin_mm)
    img.SetMetaData(_META_UNIT, unit)
    img.SetMetaData(_META_QUANTITY, f"structure:{structure.name}")
    return _atomic_write(img, path, compress)


def import_volume(path, unit: str | None = None, quantity: str | None = None, *, oblique: str = "refuse") -> ImageVolume:
    """Read an MHA/NRRD/NIfTI file (or any format SimpleITK reads) as an :class:`ImageVolume`.

    Images with flipped or permuted axes (e.g. NIfTI in RAS order) are re-ordered exactly onto
    an identity-direction LPS grid; oblique images are refused unless ``oblique="resample"``.

    Parameters
    ----------
    path : str or Path
    unit, quantity : str, optional
        Override (or supply, for NIfTI) the unit and quantity. Without ``unit`` the file must
        carry the ``tomodose_unit`` metadata.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {str(path)!r} does not exist")
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise ValueError(f"{str(path)!r} cannot be read as an image: {str(exc).strip().splitlines()[-1]}") from None
    meta_unit = img.GetMetaData(_META_UNIT) if img.HasMetaDataKey(_META_UNIT) else None
    meta_quantity = img.GetMetaData(_META_QUANTITY) if img.HasMetaDataKey(_META_QUANTITY) else ""
    if unit is None:
        if not meta_unit:
            raise ValueError(f"{str(path)!r} does not record its unit (e.g. NIfTI); pass unit=, e.g. unit='Gy'")
        unit = meta_unit
    vol = from_sitk(img, unit, meta_quantity if quantity is None else quantity, oblique=oblique)
    return vol
