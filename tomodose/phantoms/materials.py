"""Nominal CT numbers (HU) of the materials used by the synthetic phantoms.

With the default :class:`~tomodose.geometry.density.DensityTable` these map to the mass
densities listed in the comments.
"""

from __future__ import annotations

from tomodose._validate import check_finite_scalar

__all__ = ["MATERIAL_HU", "material_hu"]

#: Material name -> CT number (HU).
MATERIAL_HU: dict[str, float] = {
    "air": -1000.0,        # 0.0012 g/cm3
    "lung": -750.0,        # ~0.25 g/cm3 (inflated lung)
    "adipose": -100.0,     # 0.95 g/cm3
    "water": 0.0,          # 1.00 g/cm3
    "csf": 15.0,           # 1.01 g/cm3
    "bowel": 20.0,         # bowel contents
    "stomach": 25.0,
    "soft_tissue": 30.0,
    "kidney": 30.0,
    "cord": 35.0,
    "tumour": 40.0,        # hypodense lesion on a non-contrast scan
    "muscle": 40.0,        # 1.05 g/cm3
    "blood": 40.0,
    "liver": 55.0,         # ~1.06 g/cm3
    "vertebra": 700.0,     # vertebral bone (cancellous + cortex), ~1.43 g/cm3
    "bone": 1000.0,        # dense bone, 1.60 g/cm3
}


def material_hu(material) -> float:
    """HU of a material given by name (see :data:`MATERIAL_HU`) or directly as a number."""
    if isinstance(material, str):
        key = material.strip().lower()
        if key not in MATERIAL_HU:
            raise ValueError(
                f"material must be one of {sorted(MATERIAL_HU)} or a CT number in HU, got {material!r}"
            )
        return MATERIAL_HU[key]
    return check_finite_scalar("material (HU)", material)
