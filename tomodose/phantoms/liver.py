"""Synthetic abdominal phantom for liver SBRT / hypofractionated tomotherapy studies.

Geometry (head-first supine, DICOM LPS mm: +x patient left, +y posterior, +z superior; the
origin is near the centre of the liver). All organs are analytic shapes (ellipsoids,
elliptic cylinders, spheres); where shapes overlap the organ higher in this priority list keeps
the voxel::

    SpinalCord > Vertebra > Esophagus > Heart > Kidney_R > Kidney_L > Liver > Stomach > Bowel > Lung_R/L

================  ==============================================================  ========
structure         shape                                                           HU
================  ==============================================================  ========
Body              elliptic cylinder 340 x 240 mm (x by y) over the whole z range  —
(subcutaneous)    outer 15 mm of the body                                         -100
(soft tissue)     rest of the body                                                30
Liver             ellipsoid centre (-55, -10, 15), semi-axes (85, 72, 68), right   55
                  upper abdomen, minus higher-priority organs (~1600-1700 mL)
GTV               sphere (or ellipsoid) inside the liver, ``target_diameter_mm``   40
PGTV              GTV + 5 mm (distance transform), clipped to the PTV             —
PTV               GTV + 10 mm                                                     —
ProtectedLiver    liver voxels farther than ``protected_liver_distance_mm``        —
                  (default 30 mm) from the PTV
SpinalCord        cylinder r = 6 mm at (0, 85) inside a CSF canal r = 9 mm          35
Vertebra          vertebral body ellipse 50 x 40 mm at (0, 50) + arch ring         700
                  9-17 mm around the canal, whole z range
Kidney_R/L        ellipsoids (28, 22, 55) at (-75, 60, -45) / (75, 60, -35)        30
Stomach           ellipsoid (45, 40, 55) at (75, -15, 30); gas cap (-950 HU) in     25
                  its anterior-superior part
Bowel             duodenum ellipsoid (22, 16, 35) at (-5, 0, -30) + bowel bag       20
                  (115, 50, 45) at (0, -45, -95)
Heart             ellipsoid (60, 50, 55) at (20, -30, 140)                        40
Lung_R/L          ellipsoids (62, 80, 85) at (-85, 10, 150) / (85, 10, 150)       -750
Esophagus         cylinder r = 9 mm at (15, 22) for z >= 40 mm                     40
================  ==============================================================  ========

The grid spans x in [-180, 180], y in [-130, 130] and z in ``z_range_mm`` (default
[-120, 105]) at ``spacing_mm`` (default 3 mm): 121 x 87 x 76 voxels.

Protected liver rule
--------------------
``ProtectedLiver = {liver voxels whose centre is more than protected_liver_distance_mm from
the nearest PTV voxel centre}`` (Euclidean, mm, anisotropic spacing respected). It is the part
of the liver kept far from the high-dose region (typically the left lobe and the inferior
right lobe); a warning is logged when it is below 400 mL.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage

from tomodose._validate import check_nonnegative, check_positive, check_vector
from tomodose.geometry.grid import Grid, ImageVolume
from tomodose.geometry.patient import PatientModel
from tomodose.geometry.structures import Structure, StructureSet, expand_margin
from tomodose.phantoms.basic import _add_noise, _seed, _spacing
from tomodose.phantoms.materials import MATERIAL_HU

__all__ = ["liver_phantom", "DEFAULT_TARGET_CENTRE_MM", "STRUCTURE_NAMES"]

log = logging.getLogger(__name__)

#: Default GTV centre (LPS mm): inside the right lobe.
DEFAULT_TARGET_CENTRE_MM = (-65.0, -10.0, 10.0)

#: Structure names in the order they are stored.
STRUCTURE_NAMES = (
    "Body", "Liver", "GTV", "PGTV", "PTV", "ProtectedLiver", "SpinalCord", "Vertebra",
    "Kidney_L", "Kidney_R", "Stomach", "Bowel", "Heart", "Lung_L", "Lung_R", "Esophagus",
)

_ROLES = {"Body": "external", "GTV": "target", "PGTV": "target", "PTV": "target"}
_COLORS = {
    "Body": (0.6, 0.6, 0.6), "Liver": (0.6, 0.3, 0.1), "GTV": (1.0, 0.0, 0.0), "PGTV": (1.0, 0.5, 0.0),
    "PTV": (0.0, 0.4, 1.0), "ProtectedLiver": (0.9, 0.7, 0.2), "SpinalCord": (1.0, 1.0, 0.0),
    "Vertebra": (0.95, 0.95, 0.85), "Kidney_L": (0.6, 0.0, 0.6), "Kidney_R": (0.8, 0.2, 0.8),
    "Stomach": (0.2, 0.8, 0.2), "Bowel": (0.4, 0.6, 0.1), "Heart": (0.8, 0.0, 0.2),
    "Lung_L": (0.5, 0.8, 1.0), "Lung_R": (0.3, 0.7, 1.0), "Esophagus": (0.7, 0.5, 0.3),
}


def _ellipsoid(x, y, z, c, s):
    return ((x - c[0]) / s[0]) ** 2 + ((y - c[1]) / s[1]) ** 2 + ((z - c[2]) / s[2]) ** 2 <= 1.0


def liver_phantom(target_diameter_mm: float = 50.0, target_centre_mm=DEFAULT_TARGET_CENTRE_MM, spacing_mm=3.0,
                  seed: int = 0, *, target_semi_axes_mm=None, pgtv_margin_mm: float = 5.0,
                  ptv_margin_mm: float = 10.0, protected_liver_distance_mm: float = 30.0,
                  noise_hu: float = 5.0, z_range_mm=(-120.0, 105.0), body_size_mm=(340.0, 240.0),
                  fat_thickness_mm: float = 15.0, name: str = "liver") -> PatientModel:
    """Build the abdominal liver phantom (see the module docstring for the anatomy).

    Parameters
    ----------
    target_diameter_mm : float
        GTV sphere diameter (mm). Ignored when ``target_semi_axes_mm`` is given.
    target_centre_mm : (3,) float
        GTV centre, LPS mm (x, y, z).
    spacing_mm : float or (3,) float
        Voxel size (mm); default 3 mm isotropic.
    seed : int
        Seed of the HU noise (the only randomness).
    target_semi_axes_mm : (3,) float, optional
        Ellipsoidal GTV semi-axes (x, y, z) in mm.
    pgtv_margin_mm, ptv_margin_mm : float
        PGTV = GTV + ``pgtv_margin_mm`` clipped to PTV = GTV + ``ptv_margin_mm``.
    protected_liver_distance_mm : float
        ProtectedLiver = liver farther than this from the PTV (mm).
    noise_hu : float
        Standard deviation of Gaussian HU noise inside the body (default 5 HU).
    z_range_mm : (2,) float
        Inferior and superior z of the voxel centres (mm).
    body_size_mm : (2,) float
        Full lateral (x) and anterior-posterior (y) size of the elliptic body (mm).
    fat_thickness_mm : float
        Subcutaneous fat layer thickness (mm).

    Returns
    -------
    PatientModel
        HFS, CT in HU, structures named as in :data:`STRUCTURE_NAMES`.

    Raises
    ------
    ValueError
        When the GTV does not fit inside the liver, or any parameter is invalid.
    """
    spacing = np.array(_spacing(spacing_mm))
    seed = _seed(seed)
    centre = check_vector("target_centre_mm", target_centre_mm)
    if target_semi_axes_mm is None:
        semi = (0.5 * check_positive("target_diameter_mm", target_diameter_mm),) * 3
    else:
        semi = check_vector("target_semi_axes_mm", target_semi_axes_mm, positive=True)
    pgtv_m = check_nonnegative("pgtv_margin_mm", pgtv_margin_mm)
    ptv_m = check_nonnegative("ptv_margin_mm", ptv_margin_mm)
    if pgtv_m > ptv_m:
        raise ValueError(f"pgtv_margin_mm must be <= ptv_margin_mm = {ptv_m}, got {pgtv_m}")
    prot_d = check_nonnegative("protected_liver_distance_mm", protected_liver_distance_mm)
    z_lo, z_hi = check_vector("z_range_mm", z_range_mm, length=2)
    if z_hi <= z_lo:
        raise ValueError(f"z_range_mm must be (inferior, superior) with inferior < superior, got {z_range_mm!r}")
    bw, bh = check_vector("body_size_mm", body_size_mm, length=2, positive=True)
    fat = check_nonnegative("fat_thickness_mm", fat_thickness_mm)
    if 2 * fat >= min(bw, bh):
        raise ValueError(f"fat_thickness_mm must be < half the smallest body size {0.5 * min(bw, bh)}, got {fat}")

    # 10 mm of air around the body, rounded up to whole voxels (grid symmetric about x = y = 0)
    half_x = np.ceil((0.5 * bw + 10.0) / spacing[0]) * spacing[0]
    half_y = np.ceil((0.5 * bh + 10.0) / spacing[1]) * spacing[1]
    grid = Grid.from_extent((-half_x, -half_y, z_lo), (half_x, half_y, z_hi), tuple(spacing))
    x, y, z = grid.meshgrid_mm()
    shape = grid.shape
    full = lambda m: np.broadcast_to(m, shape).copy()  # noqa: E731

    a, b = 0.5 * bw, 0.5 * bh
    body = full((x / a) ** 2 + (y / b) ** 2 <= 1.0)
    inner = full((x / (a - fat)) ** 2 + (y / (b - fat)) ** 2 <= 1.0)

    # --- organs (raw shapes) --------------------------------------------------------------
    canal_c = (0.0, 85.0)
    r_canal2 = (x - canal_c[0]) ** 2 + (y - canal_c[1]) ** 2
    cord = full(r_canal2 <= 6.0**2)
    canal = full(r_canal2 <= 9.0**2)
    vert_body = full(((x - 0.0) / 25.0) ** 2 + ((y - 50.0) / 20.0) ** 2 <= 1.0)
    arch = full((r_canal2 > 9.0**2) & (r_canal2 <= 17.0**2) & (y >= canal_c[1] - 12.0))
    vertebra = (vert_body | arch) & ~canal
    esophagus = full(((x - 15.0) ** 2 + (y - 22.0) ** 2 <= 9.0**2) & (z >= 40.0))
    heart = _ellipsoid(x, y, z, (20.0, -30.0, 140.0), (60.0, 50.0, 55.0))
    kidney_r = _ellipsoid(x, y, z, (-75.0, 60.0, -45.0), (28.0, 22.0, 55.0))
    kidney_l = _ellipsoid(x, y, z, (75.0, 60.0, -35.0), (28.0, 22.0, 55.0))
    liver = _ellipsoid(x, y, z, (-55.0, -10.0, 15.0), (85.0, 72.0, 68.0))
    stomach = _ellipsoid(x, y, z, (75.0, -15.0, 30.0), (45.0, 40.0, 55.0))
    duodenum = _ellipsoid(x, y, z, (-5.0, 0.0, -30.0), (22.0, 16.0, 35.0))
    bowel_bag = _ellipsoid(x, y, z, (0.0, -45.0, -95.0), (115.0, 50.0, 45.0))
    bowel = duodenum | bowel_bag
    lung_r = _ellipsoid(x, y, z, (-85.0, 10.0, 150.0), (62.0, 80.0, 85.0))
    lung_l = _ellipsoid(x, y, z, (85.0, 10.0, 150.0), (62.0, 80.0, 85.0))

    # --- priorities: earlier entries keep overlapping voxels -------------------------------
    ordered = [
        ("SpinalCord", cord), ("Vertebra", vertebra), ("Esophagus", esophagus), ("Heart", heart),
        ("Kidney_R", kidney_r), ("Kidney_L", kidney_l), ("Liver", liver), ("Stomach", stomach),
        ("Bowel", bowel), ("Lung_R", lung_r), ("Lung_L", lung_l),
    ]
    taken = ~inner.copy()
    taken |= canal & ~cord  # CSF
    organs: dict[str, np.ndarray] = {}
    for oname, m in ordered:
        m = np.broadcast_to(m, shape) & ~taken
        organs[oname] = m
        taken |= m

    # --- target ----------------------------------------------------------------------------
    gtv = np.broadcast_to(_ellipsoid(x, y, z, centre, semi), shape).copy()
    if not gtv.any():
        raise ValueError(
            f"target_diameter_mm/target_semi_axes_mm = {semi} mm at target_centre_mm {centre} gives an "
            f"empty GTV on a {tuple(spacing)} mm grid; make the target larger than a voxel"
        )
    outside = gtv & ~organs["Liver"]
    if outside.any():
        frac = outside.sum() / gtv.sum()
        raise ValueError(
            f"target (GTV semi-axes {semi} mm at target_centre_mm {centre}) does not fit inside the liver: "
            f"{frac:.1%} of its voxels lie outside it; move it towards the liver centre "
            f"(-55, -10, 15) or make it smaller"
        )
    ptv = expand_margin(gtv, grid, ptv_m) & body
    pgtv = expand_margin(gtv, grid, pgtv_m) & ptv
    # protected liver: liver farther than prot_d from the PTV
    dist_ptv = ndimage.distance_transform_edt(~ptv, sampling=tuple(grid.spacing_mm[::-1]))
    protected = organs["Liver"] & (dist_ptv > prot_d)

    # --- CT numbers --------------------------------------------------------------------------
    hu_of = {
        "SpinalCord": MATERIAL_HU["cord"], "Vertebra": MATERIAL_HU["vertebra"],
        "Esophagus": MATERIAL_HU["muscle"], "Heart": MATERIAL_HU["blood"],
        "Kidney_R": MATERIAL_HU["kidney"], "Kidney_L": MATERIAL_HU["kidney"],
        "Liver": MATERIAL_HU["liver"], "Stomach": MATERIAL_HU["stomach"], "Bowel": MATERIAL_HU["bowel"],
        "Lung_R": MATERIAL_HU["lung"], "Lung_L": MATERIAL_HU["lung"],
    }
    ct = np.full(shape, MATERIAL_HU["air"])
    ct[body] = MATERIAL_HU["adipose"]
    ct[inner] = MATERIAL_HU["soft_tissue"]
    ct[canal & inner] = MATERIAL_HU["csf"]
    for oname, m in organs.items():
        ct[m] = hu_of[oname]
    # stomach gas cap: anterior-superior part of the stomach
    gas = organs["Stomach"] & full((y <= -35.0) & (z >= 45.0))
    ct[gas] = -950.0
    ct[gtv] = MATERIAL_HU["tumour"]
    ct = _add_noise(ct, body, noise_hu, seed)

    masks = {
        "Body": body, "Liver": organs["Liver"], "GTV": gtv, "PGTV": pgtv, "PTV": ptv, "ProtectedLiver": protected,
        **{k: organs[k] for k in ("SpinalCord", "Vertebra", "Kidney_L", "Kidney_R", "Stomach", "Bowel",
                                  "Heart", "Lung_L", "Lung_R", "Esophagus")},
    }
    structures = [
        Structure(n, grid, masks[n], role=_ROLES.get(n, "oar"), color=_COLORS[n]) for n in STRUCTURE_NAMES
    ]
    prot_ml = float(protected.sum()) * grid.voxel_volume_ml
    if prot_ml < 400.0:
        log.warning("ProtectedLiver is %.0f mL (< 400 mL): the target is large or central", prot_ml)
    model = PatientModel(ImageVolume(grid, ct.astype(np.float32), "HU", "ct_number"),
                         StructureSet(grid, structures), patient_position="HFS", name=name)
    log.info("liver phantom %r: grid %s, liver %.0f mL, GTV %.1f mL, PTV %.1f mL, protected liver %.0f mL",
             name, grid.shape, model.structures["Liver"].volume_ml, model.structures["GTV"].volume_ml,
             model.structures["PTV"].volume_ml, prot_ml)
    return model
