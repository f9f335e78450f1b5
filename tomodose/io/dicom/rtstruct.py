"""RT Structure Set import (pydicom): ROI contours -> polygons in LPS mm -> fractional masks.

Reading
-------
:func:`read_rtstruct` returns one :class:`ROIContours` per ROI: its number, name, display
colour, RT ROI Interpreted Type and the CLOSED_PLANAR contours as ``(n_points, 3)`` float arrays
in LPS mm, each at constant z (axial). Other geometric types (POINT, OPEN_PLANAR,
OPEN_NONPLANAR) are skipped with a log message; contours that are not axial are refused (the
rasteriser works slice by slice). The structure set's frame of reference is checked against the
CT's when one is given.

Rasterising
-----------
:func:`rasterise_rois` turns the polygons into occupancy fractions on a grid with
:func:`tomodose.geometry.contours.rasterise_contours` (even-odd rule: holes and several
contours per slice; parts outside the grid clipped; by default shape-based interpolation
between contour planes for ROIs up to 1000 mL of bounding box, the slab model for larger ones)
and returns a :class:`~tomodose.geometry.structures.StructureSet`.

Names and roles
---------------
Protocols refer to structures by canonical names (:data:`CANONICAL_NAMES`: ``"Body"``,
``"Liver"``, ``"GTV"``, ``"PGTV"``, ``"PTV"``, ``"ProtectedLiver"``, ``"SpinalCord"``, ...).
:class:`StructureAliases` maps the names found in files to them. Matching ignores case, spaces,
underscores and other punctuation (``"spinal_cord"`` = ``"Spinal Cord"`` = ``"SPINALCORD"``).
The default aliases can be extended or replaced from a dict or a TOML file::

    [aliases]
    Liver = ["Leber", "liver_total"]
    SpinalCord = ["Myelon"]
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from tomodose.geometry.grid import Grid
from tomodose.geometry.structures import Structure, StructureSet
from tomodose.io.dicom._common import (
    DicomError,
    DicomReference,
    as_floats,
    optional,
    read_dataset,
    require,
    tag_label,
)

__all__ = [
    "ROIContours",
    "read_rtstruct",
    "rasterise_rois",
    "read_structures",
    "StructureAliases",
    "CANONICAL_NAMES",
    "DEFAULT_ALIASES",
    "role_of",
    "normalise_name",
]

log = logging.getLogger(__name__)

RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"

#: Names the protocols use.
CANONICAL_NAMES = (
    "Body", "Liver", "GTV", "PGTV", "PTV", "ProtectedLiver", "SpinalCord", "Vertebra",
    "Kidney_L", "Kidney_R", "Stomach", "Bowel", "Heart", "Lung_L", "Lung_R", "Esophagus",
)

#: Default aliases (canonical name -> names seen in clinical files, English and German).
DEFAULT_ALIASES: dict[str, tuple[str, ...]] = {
    "Body": ("BODY", "External", "Outline", "Skin", "Body contour", "Patient", "Aussenkontur",
             "Außenkontur", "Körper", "Koerper"),
    "Liver": ("liver", "LIVER", "Leber", "Liver total", "Liver_whole"),
    "GTV": ("GTV", "GTV1", "GTV_1", "GTV total", "Tumour", "Tumor"),
    "PGTV": ("PGTV", "P-GTV", "PTV_GTV", "PTV boost", "PTVboost", "PTV_SIB", "SIB"),
    "PTV": ("PTV", "PTV1", "PTV_1", "PTV total", "PTV_total"),
    "ProtectedLiver": ("Protected liver", "Liver-PTV", "Liver_minus_PTV", "Liver-GTV",
                       "Liver_minus_GTV", "Normal liver", "Liver normal", "Leber-PTV", "Leber-GTV"),
    "SpinalCord": ("cord", "spinal cord", "Spinal_Cord", "SpinalCanal", "Spinal canal", "Canal",
                   "Myelon", "Rückenmark", "Rueckenmark"),
    "Vertebra": ("vertebra", "vertebrae", "vertebral body", "vertebral bodies", "Wirbelkörper",
                 "Wirbelkoerper", "Wirbel"),
    "Kidney_L": ("Kidney L", "Kidney_Lt", "Kidney left", "Left kidney", "L kidney", "Kidney_Left",
                 "Niere links", "Niere li", "Niere_L"),
    "Kidney_R": ("Kidney R", "Kidney_Rt", "Kidney right", "Right kidney", "R kidney", "Kidney_Right",
                 "Niere rechts", "Niere re", "Niere_R"),
    "Stomach": ("stomach", "Magen"),
    "Bowel": ("bowel", "small bowel", "bowel bag", "Bowel_Bag", "Bowel_Small", "intestine",
              "Darm", "Dünndarm", "Duenndarm"),
    "Heart": ("heart", "Herz"),
    "Lung_L": ("Lung L", "Lung_Lt", "Lung left", "Left lung", "L lung", "Lunge links", "Lunge li"),
    "Lung_R": ("Lung R", "Lung_Rt", "Lung right", "Right lung", "R lung", "Lunge rechts", "Lunge re"),
    "Esophagus": ("esophagus", "oesophagus", "Oesophagus", "Ösophagus", "Speiseröhre", "Speiseroehre"),
}

_TARGETS = {"GTV", "PGTV", "PTV"}
_INTERPRETED_ROLE = {"EXTERNAL": "external", "PTV": "target", "CTV": "target", "GTV": "target",
                     "ORGAN": "oar", "AVOIDANCE": "oar", "TREATED_VOLUME": "target",
                     "IRRAD_VOLUME": "target"}


def normalise_name(name: str) -> str:
    """Comparison key of a structure name: case-folded letters and digits only."""
    return "".join(ch for ch in str(name).casefold() if ch.isalnum())


def role_of(canonical_or_name: str, interpreted_type: str = "") -> str:
    """Protocol role: ``"external"`` (Body), ``"target"`` (GTV/PGTV/PTV) or ``"oar"``.

    Names that are not canonical fall back to the DICOM RT ROI Interpreted Type ("" if unknown).
    """
    if canonical_or_name == "Body":
        return "external"
    if canonical_or_name in _TARGETS:
        return "target"
    if canonical_or_name in CANONICAL_NAMES:
        return "oar"
    return _INTERPRETED_ROLE.get(str(interpreted_type).upper(), "")


@dataclass(frozen=True)
class StructureAliases:
    """Mapping of structure names found in files to canonical protocol names.

    Parameters
    ----------
    aliases : mapping of str -> sequence of str
        Canonical name -> alternative names. A canonical name always matches itself.

    Raises
    ------
    ValueError
        An alias (after normalisation) points to two canonical names.
    """

    aliases: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: dict(DEFAULT_ALIASES))

    def __post_init__(self):
        if not isinstance(self.aliases, Mapping):
            raise TypeError(f"aliases must be a mapping canonical name -> list of names, got "
                            f"{type(self.aliases).__name__}")
        clean: dict[str, tuple[str, ...]] = {}
        lookup: dict[str, str] = {}
        for canonical, names in self.aliases.items():
            if not isinstance(canonical, str) or not canonical.strip():
                raise ValueError(f"aliases keys must be non-empty strings, got {canonical!r}")
            if isinstance(names, str) or not isinstance(names, Iterable):
                raise ValueError(f"aliases[{canonical!r}] must be a list of names, got {names!r}")
            names = tuple(names)
            for alias in names:
                if not isinstance(alias, str) or not normalise_name(alias):
                    raise ValueError(f"aliases[{canonical!r}] holds an invalid name {alias!r}")
            clean[canonical] = names
            for alias in (canonical, *names):
                key = normalise_name(alias)
                other = lookup.get(key)
                if other is not None and other != canonical:
                    raise ValueError(f"alias {alias!r} maps to both {other!r} and {canonical!r}")
                lookup[key] = canonical
        object.__setattr__(self, "aliases", clean)
        object.__setattr__(self, "_lookup", lookup)

    @classmethod
    def default(cls) -> "StructureAliases":
        return cls()

    @classmethod
    def from_dict(cls, mapping: Mapping, *, extend: bool = True) -> "StructureAliases":
        """Aliases from a dict; ``extend=True`` adds them to the defaults."""
        if not isinstance(mapping, Mapping):
            raise TypeError(f"mapping must be a dict canonical name -> list of names, got {type(mapping).__name__}")
        if "aliases" in mapping and isinstance(mapping["aliases"], Mapping):
            mapping = mapping["aliases"]
        merged: dict[str, tuple[str, ...]] = dict(DEFAULT_ALIASES) if extend else {}
        for canonical, names in mapping.items():
            if isinstance(names, str):
                names = (names,)
            merged[canonical] = tuple(merged.get(canonical, ())) + tuple(names)
        return cls(merged)

    @classmethod
    def from_toml(cls, path, *, extend: bool = True) -> "StructureAliases":
        """Aliases from a TOML file (an ``[aliases]`` table or top-level keys)."""
        try:
            import tomllib
        except ImportError:  # pragma: no cover - Python < 3.11
            import tomli as tomllib
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"aliases file {str(path)!r} does not exist")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"aliases file {str(path)!r} is not valid TOML: {exc}") from None
        return cls.from_dict(data, extend=extend)

    def canonical(self, name: str) -> str | None:
        """Canonical name of ``name``, or None when no alias matches."""
        return self._lookup.get(normalise_name(name))

    def map_names(self, names: Iterable[str]) -> dict[str, str | None]:
        """Original name -> canonical name (None when unmatched).

        Raises
        ------
        ValueError
            Two different names map to the same canonical name.
        """
        out: dict[str, str | None] = {}
        seen: dict[str, str] = {}
        for name in names:
            canonical = self.canonical(name)
            if canonical is not None and canonical in seen:
                raise ValueError(
                    f"structures {seen[canonical]!r} and {name!r} both map to {canonical!r}; "
                    f"give explicit aliases (or rename one) so that only one does"
                )
            if canonical is not None:
                seen[canonical] = name
            out[name] = canonical
        return out


@dataclass(frozen=True)
class ROIContours:
    """The contours of one ROI of an RT Structure Set.

    Attributes
    ----------
    number : int
        ROINumber.
    name : str
        ROIName as in the file.
    contours : tuple of (n_points, 3) float64 arrays
        CLOSED_PLANAR contours in LPS mm, each at constant z.
    color : tuple of 3 float or None
        ROIDisplayColor scaled to [0, 1].
    interpreted_type : str
        RTROIInterpretedType ("" when absent).
    frame_of_reference_uid : str
        ReferencedFrameOfReferenceUID of the ROI.
    """

    number: int
    name: str
    contours: tuple = field(repr=False)
    color: tuple | None = None
    interpreted_type: str = ""
    frame_of_reference_uid: str = ""

    @property
    def n_contours(self) -> int:
        return len(self.contours)

    @property
    def z_range_mm(self) -> tuple[float, float] | None:
        if not self.contours:
            return None
        z = [float(c[0, 2]) for c in self.contours]
        return min(z), max(z)


def read_rtstruct(path, *, frame_of_reference_uid: str | None = None,
                  planar_tolerance_mm: float = 0.01) -> list[ROIContours]:
    """Read the ROIs of an RT Structure Set.

    Parameters
    ----------
    path : str or Path
        RTSTRUCT file.
    frame_of_reference_uid : str, optional
        FrameOfReferenceUID of the CT; the structure set must refer to it (checked).
    planar_tolerance_mm : float
        Largest z spread tolerated within one contour (mm); z is then set to the mean.

    Returns
    -------
    list of ROIContours
        In the order of StructureSetROISequence.

    Raises
    ------
    DicomError
        Not an RTSTRUCT, missing or malformed attributes, non-axial contours, frame of
        reference mismatch.
    """
    where = f"RT Structure Set {str(path)!r}"
    ds = read_dataset(path, "RT Structure Set")
    modality = str(optional(ds, "Modality", where, ""))
    sop_class = str(optional(ds, "SOPClassUID", where, ""))
    if modality != "RTSTRUCT" and sop_class != RT_STRUCTURE_SET_STORAGE:
        raise DicomError(f"{where}: not an RT Structure Set (Modality {modality!r}, SOPClassUID {sop_class!r})")
    roi_seq = require(ds, "StructureSetROISequence", where)
    contour_seq = optional(ds, "ROIContourSequence", where, []) or []
    obs_seq = optional(ds, "RTROIObservationsSequence", where, []) or []
    set_fors = set()
    for item in optional(ds, "ReferencedFrameOfReferenceSequence", where, []) or []:
        uid = optional(item, "FrameOfReferenceUID", where, None)
        if uid:
            set_fors.add(str(uid))

    info: dict[int, dict] = {}
    for i, roi in enumerate(roi_seq):
        w = f"{where}, StructureSetROISequence item {i}"
        number = int(as_floats(require(roi, "ROINumber", w), tag_label("ROINumber"), w, n=1)[0])
        if number in info:
            raise DicomError(f"{w}: ROINumber {number} is used twice")
        name = str(require(roi, "ROIName", w)).strip()
        if not name:
            raise DicomError(f"{w}: {tag_label('ROIName')} is empty")
        info[number] = {"name": name, "for": str(optional(roi, "ReferencedFrameOfReferenceUID", w, "")),
                        "contours": [], "color": None, "type": ""}
    for i, obs in enumerate(obs_seq):
        w = f"{where}, RTROIObservationsSequence item {i}"
        ref = optional(obs, "ReferencedROINumber", w, None)
        if ref is None:
            continue
        number = int(as_floats(ref, tag_label("ReferencedROINumber"), w, n=1)[0])
        if number in info:
            info[number]["type"] = str(optional(obs, "RTROIInterpretedType", w, "") or "")

    skipped: dict[str, int] = {}
    for i, rc in enumerate(contour_seq):
        w = f"{where}, ROIContourSequence item {i}"
        number = int(as_floats(require(rc, "ReferencedROINumber", w), tag_label("ReferencedROINumber"), w, n=1)[0])
        if number not in info:
            raise DicomError(f"{w}: {tag_label('ReferencedROINumber')} {number} is not in StructureSetROISequence")
        entry = info[number]
        w = f"{where}, ROI {entry['name']!r}"
        color = optional(rc, "ROIDisplayColor", w, None)
        if color is not None:
            rgb = as_floats(color, tag_label("ROIDisplayColor"), w, n=3)
            entry["color"] = tuple(float(v) for v in np.clip(rgb / 255.0, 0.0, 1.0))
        for j, item in enumerate(optional(rc, "ContourSequence", w, []) or []):
            wc = f"{w}, contour {j}"
            gtype = str(require(item, "ContourGeometricType", wc)).strip().upper()
            if gtype != "CLOSED_PLANAR":
                skipped[gtype] = skipped.get(gtype, 0) + 1
                continue
            data = as_floats(require(item, "ContourData", wc), tag_label("ContourData"), wc, min_n=3)
            if data.size % 3:
                raise DicomError(f"{wc}: {tag_label('ContourData')} holds {data.size} values, not a multiple of 3")
            pts = data.reshape(-1, 3)
            npts = optional(item, "NumberOfContourPoints", wc, None)
            if npts is not None:
                npts = int(as_floats(npts, tag_label("NumberOfContourPoints"), wc, n=1)[0])
                if npts != pts.shape[0]:
                    raise DicomError(f"{wc}: {tag_label('NumberOfContourPoints')} is {npts} but ContourData "
                                     f"holds {pts.shape[0]} points")
            if pts.shape[0] < 3:
                log.info("%s: CLOSED_PLANAR contour with %d point(s) ignored", wc, pts.shape[0])
                continue
            spread = float(np.ptp(pts[:, 2]))
            if spread > planar_tolerance_mm:
                raise DicomError(f"{wc}: contour is not axial (its z spans {spread:.3f} mm); only contours "
                                 f"drawn on axial slices are supported")
            pts = pts.copy()
            pts[:, 2] = float(np.mean(pts[:, 2]))
            entry["contours"].append(pts)
    for gtype, count in skipped.items():
        log.info("%s: %d contour(s) of type %s skipped (only CLOSED_PLANAR are rasterised)", where, count, gtype)

    if frame_of_reference_uid:
        uids = set_fors | {e["for"] for e in info.values() if e["for"]}
        if uids and frame_of_reference_uid not in uids:
            raise DicomError(
                f"{where}: refers to frame of reference {sorted(uids)}, not to the CT's "
                f"{frame_of_reference_uid!r}; the structures were drawn on another image set "
                f"(pass check_frame_of_reference=False / --no-frame-check to use them anyway)"
            )
    out = []
    for number, e in info.items():
        out.append(ROIContours(number, e["name"], tuple(e["contours"]), e["color"], e["type"], e["for"]))
    return out


def rasterise_rois(
    rois: Iterable[ROIContours],
    grid: Grid,
    *,
    aliases: StructureAliases | None = None,
    keep_unmapped: bool = True,
    supersample: int | None = None,
    interpolation: str = "auto",
    end_shape: str = "auto",
) -> tuple[StructureSet, dict[str, str]]:
    """Rasterise ROIs to fractional masks on ``grid`` and name them canonically.

    Parameters
    ----------
    rois : iterable of ROIContours
    grid : Grid
        Usually the CT grid.
    aliases : StructureAliases, optional
        Name mapping; default :meth:`StructureAliases.default`. Mapped ROIs get the canonical
        name and its role (``"external"``, ``"target"``, ``"oar"``).
    keep_unmapped : bool
        Keep ROIs no alias matches, under their own name (role from RTROIInterpretedType).
        Default True.
    supersample : int, optional
        In-plane supersampling of the rasteriser (default: its own).
    interpolation : {"auto", "shape", "slab"}
        Between contour planes (see :func:`tomodose.geometry.contours.rasterise_contours`):
        default ``"auto"``, shape-based interpolation for ROIs whose bounding box is at most
        1000 mL (targets, small organs), the slab model for larger ones (body, liver, lungs).
    end_shape : {"auto", "round", "straight"}
        End segments of shape-based interpolation.

    Returns
    -------
    structures : StructureSet
        Empty ROIs and ROIs wholly outside the grid are left out (logged).
    names : dict
        Original ROI name -> structure name in the set.
    """
    from tomodose.geometry.contours import rasterise_contours

    if not isinstance(grid, Grid):
        raise TypeError(f"grid must be a tomodose Grid, got {type(grid).__name__}")
    aliases = aliases if aliases is not None else StructureAliases.default()
    if not isinstance(aliases, StructureAliases):
        raise TypeError(f"aliases must be a StructureAliases, got {type(aliases).__name__}")
    rois = list(rois)
    mapping = aliases.map_names([r.name for r in rois])
    structures, names = [], {}
    taken = set()
    for roi in rois:
        canonical = mapping[roi.name]
        if canonical is None and not keep_unmapped:
            log.info("ROI %r matches no alias; left out", roi.name)
            continue
        name = canonical or roi.name
        if name in taken:
            log.warning("ROI %r: a structure named %r already exists; left out", roi.name, name)
            continue
        if not roi.contours:
            log.warning("ROI %r has no closed planar contours; left out", roi.name)
            continue
        kwargs = {} if supersample is None else {"supersample": supersample}
        occ = rasterise_contours(grid, list(roi.contours), interpolation=interpolation,
                                 end_shape=end_shape, **kwargs)
        if not np.any(occ > 0):
            log.warning("ROI %r lies wholly outside the grid (z %s mm); left out", roi.name, roi.z_range_mm)
            continue
        role = role_of(canonical, roi.interpreted_type) if canonical else role_of(roi.name, roi.interpreted_type)
        structures.append(Structure(name, grid, occ, role, roi.color))
        names[roi.name] = name
        taken.add(name)
    return StructureSet(grid, structures), names


def read_structures(
    path,
    grid: Grid,
    *,
    reference: DicomReference | None = None,
    check_frame_of_reference: bool = True,
    aliases: StructureAliases | None = None,
    keep_unmapped: bool = True,
    supersample: int | None = None,
    interpolation: str = "auto",
    end_shape: str = "auto",
) -> tuple[StructureSet, dict[str, str]]:
    """Read an RTSTRUCT and rasterise it on ``grid`` (see :func:`read_rtstruct`, :func:`rasterise_rois`).

    ``reference`` (from the CT) enables the frame-of-reference check.
    """
    uid = reference.frame_of_reference_uid if (reference is not None and check_frame_of_reference) else None
    rois = read_rtstruct(path, frame_of_reference_uid=uid)
    return rasterise_rois(rois, grid, aliases=aliases, keep_unmapped=keep_unmapped, supersample=supersample,
                          interpolation=interpolation, end_shape=end_shape)
