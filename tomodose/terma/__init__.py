"""Primary photon beam: spectrum, attenuation data, beam model and TERMA."""

from tomodose.terma.attenuation import DENSITY_ANCHORS, AttenuationTable, attenuation_table, material_weights
from tomodose.terma.beam_model import BeamModel
from tomodose.terma.spectrum import Spectrum, default_spectrum, read_egs_spectrum, write_egs_spectrum
from tomodose.terma.terma import TERMA_UNIT, TermaResult, assign_angle_groups, compute_terma

__all__ = [
    "Spectrum", "read_egs_spectrum", "write_egs_spectrum", "default_spectrum",
    "AttenuationTable", "attenuation_table", "material_weights", "DENSITY_ANCHORS",
    "BeamModel", "TermaResult", "compute_terma", "assign_angle_groups", "TERMA_UNIT",
]
