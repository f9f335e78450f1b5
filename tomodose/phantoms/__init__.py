"""Synthetic, parametric and seeded phantoms returning :class:`~tomodose.geometry.patient.PatientModel`.

* :func:`water_box` - homogeneous box;
* :func:`slab_phantom` - water with lung and bone slabs;
* :func:`cylinder_phantom` - water cylinder with density inserts;
* :func:`liver_phantom` - abdominal phantom for liver studies (GTV/PGTV/PTV, protected liver, OARs);
* :func:`load_phantom` - build a named configuration (``phantoms/*.toml``) or a TOML file.
"""

from tomodose.phantoms.basic import cylinder_phantom, slab_phantom, water_box
from tomodose.phantoms.config import (
    BUILDERS,
    NAMED_CONFIGS,
    available_phantoms,
    build_phantom,
    load_phantom,
    phantom_config,
)
from tomodose.phantoms.liver import STRUCTURE_NAMES as LIVER_STRUCTURE_NAMES
from tomodose.phantoms.liver import liver_phantom
from tomodose.phantoms.materials import MATERIAL_HU

__all__ = [
    "water_box",
    "slab_phantom",
    "cylinder_phantom",
    "liver_phantom",
    "load_phantom",
    "build_phantom",
    "phantom_config",
    "available_phantoms",
    "BUILDERS",
    "NAMED_CONFIGS",
    "LIVER_STRUCTURE_NAMES",
    "MATERIAL_HU",
]
