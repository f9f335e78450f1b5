"""DICOM in and out (needs pydicom; CT pixels via SimpleITK).

* :func:`read_ct_series` (:mod:`.ct`): CT series -> HU :class:`~tomodose.geometry.grid.ImageVolume`
  on an axis-aligned LPS grid (tilted, irregular or oblique series refused or resampled).
* :func:`read_rtstruct`, :func:`read_structures` (:mod:`.rtstruct`): RT Structure Sets ->
  polygons in LPS mm -> fractional masks, names mapped by :class:`StructureAliases`.
* :func:`write_rtdose`, :func:`read_rtdose` (:mod:`.rtdose`): RT Dose out and in.
* :func:`read_tomo_plan` (:mod:`.rtplan`): helical TomoTherapy RT Plans (TOMO_HA_01 private
  tags, Supplement 176 leaf-open durations) -> :class:`~tomodose.delivery.plan.HelicalPlan`.
* :func:`read_patient` : CT folder + optional RTSTRUCT -> :class:`~tomodose.geometry.patient.PatientModel`.

Every problem with an input file raises :class:`DicomError` (a ``ValueError``) naming the file
and the attribute.
"""

from __future__ import annotations

from tomodose.io.dicom._common import DicomError, DicomReference
from tomodose.io.dicom.ct import CTSeries, list_ct_series, read_ct_reference, read_ct_series
from tomodose.io.dicom.rtdose import RTDoseInfo, read_rtdose, read_rtdose_info, write_rtdose
from tomodose.io.dicom.rtplan import TomoPlanInfo, read_tomo_plan, read_tomo_plan_info
from tomodose.io.dicom.rtstruct import (
    CANONICAL_NAMES,
    DEFAULT_ALIASES,
    ROIContours,
    StructureAliases,
    rasterise_rois,
    read_rtstruct,
    read_structures,
)

__all__ = [
    "DicomError",
    "DicomReference",
    "CTSeries",
    "read_ct_series",
    "read_ct_reference",
    "list_ct_series",
    "read_rtdose",
    "read_rtdose_info",
    "write_rtdose",
    "RTDoseInfo",
    "read_tomo_plan",
    "read_tomo_plan_info",
    "TomoPlanInfo",
    "ROIContours",
    "read_rtstruct",
    "read_structures",
    "rasterise_rois",
    "StructureAliases",
    "CANONICAL_NAMES",
    "DEFAULT_ALIASES",
    "read_patient",
]


def read_patient(
    ct_folder,
    rtstruct=None,
    *,
    series_uid: str | None = None,
    resample: bool = False,
    tolerance_mm: float = 0.01,
    aliases: StructureAliases | None = None,
    keep_unmapped: bool = True,
    check_frame_of_reference: bool = True,
    supersample: int | None = None,
    interpolation: str = "auto",
    end_shape: str = "auto",
    patient_position: str | None = None,
    name: str | None = None,
):
    """Build a :class:`~tomodose.geometry.patient.PatientModel` from a CT folder and an RTSTRUCT.

    Parameters
    ----------
    ct_folder : str or Path
        Folder of CT slices (see :func:`read_ct_series`).
    rtstruct : str or Path, optional
        RT Structure Set drawn on that CT.
    series_uid, resample, tolerance_mm : see :func:`read_ct_series`.
    aliases, keep_unmapped, supersample, interpolation, end_shape : see :func:`rasterise_rois`
        (between contour planes: shape-based interpolation for ROIs up to 1000 mL by default).
    check_frame_of_reference : bool
        Refuse an RTSTRUCT whose frame of reference differs from the CT's (default True).
    patient_position : str, optional
        Override the CT's PatientPosition (required when the CT lacks it).
    name : str, optional
        Model name; default the PatientID.

    Returns
    -------
    model : PatientModel
    series : CTSeries
        The CT as read (its ``reference`` is needed to export RT Dose on the same frame).
    names : dict
        Original ROI name -> structure name in the model.
    """
    import logging

    from tomodose.geometry.patient import PatientModel

    series = read_ct_series(ct_folder, series_uid=series_uid, resample=resample, tolerance_mm=tolerance_mm)
    structures, names = None, {}
    if rtstruct is not None:
        structures, names = read_structures(
            rtstruct, series.grid, reference=series.reference,
            check_frame_of_reference=check_frame_of_reference, aliases=aliases,
            keep_unmapped=keep_unmapped, supersample=supersample, interpolation=interpolation,
            end_shape=end_shape,
        )
    position = patient_position or series.patient_position
    if not position:
        raise DicomError(f"CT series in {str(ct_folder)!r} has no PatientPosition (0018,5100); "
                         f"pass patient_position= (CLI --patient-position)")
    if patient_position and series.patient_position and patient_position != series.patient_position:
        logging.getLogger(__name__).warning("patient position %s overrides the CT's %s", patient_position,
                                            series.patient_position)
    model = PatientModel(series.volume, structures, position, name if name is not None else series.reference.patient_id)
    return model, series, names
