"""The patient model: CT volume (HU), structures on the same grid, orientation, density table.

Everything downstream (TERMA, transport, evaluation) takes a :class:`PatientModel`. The mass
density and relative electron density volumes are derived from the CT once, with the model's
:class:`~tomodose.geometry.density.DensityTable`, and cached.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterable

import numpy as np

from tomodose._validate import check_choice
from tomodose.geometry.density import DensityTable
from tomodose.geometry.frames import PATIENT_POSITIONS
from tomodose.geometry.grid import Grid, ImageVolume
from tomodose.geometry.structures import Structure, StructureSet

__all__ = ["PatientModel"]


@dataclass(frozen=True, eq=False)
class PatientModel:
    """CT, structures and orientation of one patient (or phantom).

    Parameters
    ----------
    ct : ImageVolume
        CT numbers in HU (``unit == "HU"``), (nz, ny, nx) on an LPS grid.
    structures : StructureSet, iterable of Structure, or None
        Regions of interest, all on the CT grid (checked). ``None`` gives an empty set.
    patient_position : str
        DICOM patient position: ``"HFS"`` (default), ``"HFP"``, ``"FFS"`` or ``"FFP"``.
    name : str
        Label (phantom or patient identifier).
    density_table : DensityTable
        HU calibration; defaults to :meth:`DensityTable.default`.

    Notes
    -----
    Instances are immutable; arrays of the CT and the derived densities are read-only.
    Equality is identity (arrays are not compared).
    """

    ct: ImageVolume
    structures: StructureSet | None = None
    patient_position: str = "HFS"
    name: str = ""
    density_table: DensityTable = field(default_factory=DensityTable.default)

    def __post_init__(self):
        if not isinstance(self.ct, ImageVolume):
            raise TypeError(f"ct must be an ImageVolume, got {type(self.ct).__name__}")
        if self.ct.unit != "HU":
            raise ValueError(f"ct unit must be 'HU', got {self.ct.unit!r}")
        structures = self.structures
        if structures is None:
            structures = StructureSet(self.ct.grid)
        elif not isinstance(structures, StructureSet):
            try:
                items = list(structures)
            except TypeError:
                raise TypeError(
                    f"structures must be a StructureSet or an iterable of Structure, got "
                    f"{type(structures).__name__}"
                ) from None
            structures = StructureSet(self.ct.grid, items)
        self.ct.grid.require_same(structures.grid, "structures (StructureSet) and ct")
        object.__setattr__(self, "structures", structures)
        check_choice("patient_position", self.patient_position, PATIENT_POSITIONS)
        if not isinstance(self.name, str):
            raise TypeError(f"name must be a string, got {type(self.name).__name__}")
        if not isinstance(self.density_table, DensityTable):
            raise TypeError(f"density_table must be a DensityTable, got {type(self.density_table).__name__}")

    @property
    def grid(self) -> Grid:
        """The CT grid (also that of every structure)."""
        return self.ct.grid

    @property
    def hu(self) -> np.ndarray:
        """(nz, ny, nx) CT numbers (HU)."""
        return self.ct.array

    @cached_property
    def mass_density_g_cm3(self) -> np.ndarray:
        """(nz, ny, nx) float32 mass density (g/cm^3), read-only, computed once."""
        out = self.density_table.mass_density(self.ct.array).astype(np.float32)
        out.setflags(write=False)
        return out

    @cached_property
    def relative_electron_density(self) -> np.ndarray:
        """(nz, ny, nx) float32 electron density relative to water, read-only, computed once."""
        out = self.density_table.electron_density(self.ct.array).astype(np.float32)
        out.setflags(write=False)
        return out

    def mass_density_volume(self) -> ImageVolume:
        """Mass density as an :class:`ImageVolume` (g/cm3)."""
        return ImageVolume(self.grid, self.mass_density_g_cm3, "g/cm3", "mass_density")

    def structure_volumes_ml(self) -> dict[str, float]:
        """Volume (mL) of every structure, in order."""
        return self.structures.volumes_ml()

    def with_structures(self, structures: StructureSet | Iterable[Structure], *, replace: bool = True) -> "PatientModel":
        """Copy with other structures.

        Parameters
        ----------
        structures : StructureSet or iterable of Structure
            On the CT grid.
        replace : bool
            ``True`` (default): the new set replaces the old one. ``False``: the new structures
            are added to the existing ones; a structure with an existing name replaces it.
        """
        items = list(structures.values()) if isinstance(structures, StructureSet) else list(structures)
        if not replace:
            new_names = {s.name for s in items}
            items = [s for n, s in self.structures.items() if n not in new_names] + items
        return PatientModel(self.ct, StructureSet(self.grid, items), self.patient_position, self.name,
                            self.density_table)

    def resampled(self, grid: Grid) -> "PatientModel":
        """The model on another grid: CT linear, structure occupancies linear (fractions kept).

        Voxels of ``grid`` outside the CT get -1000 HU (air) and occupancy 0.
        """
        from tomodose.geometry.resample import resample_occupancy, resample_volume

        if not isinstance(grid, Grid):
            raise TypeError(f"grid must be a tomodose Grid, got {type(grid).__name__}")
        ct = resample_volume(self.ct, grid, interpolation="linear", default_value=-1000.0)
        structures = [
            Structure(s.name, grid, resample_occupancy(s.occupancy, self.grid, grid), s.role, s.color)
            for s in self.structures.values()
        ]
        return PatientModel(ct, StructureSet(grid, structures), self.patient_position, self.name,
                            self.density_table)

    def __repr__(self) -> str:
        return (f"PatientModel(name={self.name!r}, grid={self.grid}, patient_position="
                f"{self.patient_position!r}, structures={list(self.structures)})")
