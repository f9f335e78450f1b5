"""Mass attenuation data and the density -> material model used by the TERMA.

Data: ``tomodose/data/physics/attenuation.csv`` (NIST SRD 126 mu/rho and mu_en/rho, written by
``kernels/derive_attenuation.py``), interpolated log-log in energy.

Material model (documented rule, per-voxel mixing)
--------------------------------------------------
Each voxel's **mass density** rho (g/cm3) is mapped to a mixture of two neighbouring anchor
materials of :data:`DENSITY_ANCHORS` (ordered by density)::

    air 0.0012 | lung 0.26 | adipose 0.95 | water 1.00 | soft tissue 1.06 | cortical bone 1.92

For ``rho_a <= rho <= rho_b`` (adjacent anchors) the mass fraction of ``b`` is
``w_b = (rho - rho_a) / (rho_b - rho_a)`` and ``w_a = 1 - w_b``; below air the voxel is air,
above cortical bone it is bone. The mixture's ``mu/rho(E) = sum_m w_m mu_m/rho(E)`` (Bragg
additivity of mass coefficients), and its linear attenuation is ``rho * mu/rho``. The lung
anchor uses NIST lung *composition* at an inflated-lung density. Pure water (rho = 1.000 g/cm3)
maps to water exactly, so water phantoms are attenuated with water coefficients.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import numpy as np

from tomodose._validate import check_array

__all__ = [
    "DENSITY_ANCHORS",
    "AttenuationTable",
    "attenuation_table",
    "material_weights",
    "mu_rho_ratio_to_water",
    "interpolate_loglog",
]

#: (material name in the table, anchor mass density g/cm3), increasing density.
DENSITY_ANCHORS: tuple[tuple[str, float], ...] = (
    ("air", 0.0012),
    ("lung", 0.26),
    ("adipose", 0.95),
    ("water", 1.00),
    ("soft_tissue", 1.06),
    ("bone", 1.92),
)


def interpolate_loglog(x_table, y_table, x):
    """Log-log linear interpolation (clamped at the table ends)."""
    xt = np.log(np.asarray(x_table, dtype=np.float64))
    yt = np.log(np.asarray(y_table, dtype=np.float64))
    xq = np.log(np.clip(np.asarray(x, dtype=np.float64), np.exp(xt[0]), np.exp(xt[-1])))
    return np.exp(np.interp(xq, xt, yt))


@dataclass(frozen=True)
class AttenuationTable:
    """NIST mass attenuation data of the tomodose materials.

    Attributes
    ----------
    materials : tuple of str
    energies_mev : dict str -> (n,) float
    mu_rho_cm2_g, mu_en_rho_cm2_g : dict str -> (n,) float
    """

    materials: tuple
    energies_mev: dict
    mu_rho_cm2_g: dict
    mu_en_rho_cm2_g: dict

    def _check(self, material: str) -> str:
        if material not in self.materials:
            raise ValueError(f"material must be one of {list(self.materials)}, got {material!r}")
        return material

    def mu_rho(self, material: str, energies_mev) -> np.ndarray:
        """mu/rho (cm2/g) of ``material`` at ``energies_mev`` (log-log interpolation)."""
        m = self._check(material)
        return interpolate_loglog(self.energies_mev[m], self.mu_rho_cm2_g[m], energies_mev)

    def mu_en_rho(self, material: str, energies_mev) -> np.ndarray:
        """mu_en/rho (cm2/g) of ``material`` at ``energies_mev`` (log-log interpolation)."""
        m = self._check(material)
        return interpolate_loglog(self.energies_mev[m], self.mu_en_rho_cm2_g[m], energies_mev)

    def anchor_mu_rho(self, energies_mev) -> np.ndarray:
        """(n_anchors, n_energies) mu/rho (cm2/g) of the density anchors, in anchor order."""
        return np.stack([self.mu_rho(m, energies_mev) for m, _ in DENSITY_ANCHORS])

    def anchor_mu_en_rho(self, energies_mev) -> np.ndarray:
        """(n_anchors, n_energies) mu_en/rho (cm2/g) of the density anchors."""
        return np.stack([self.mu_en_rho(m, energies_mev) for m, _ in DENSITY_ANCHORS])


@lru_cache(maxsize=1)
def attenuation_table() -> AttenuationTable:
    """The shipped NIST table (read once)."""
    ref = resources.files("tomodose") / "data" / "physics" / "attenuation.csv"
    text = ref.read_text()
    rows = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    reader = csv.DictReader(io.StringIO("\n".join(rows)))
    data: dict[str, list] = {}
    for r in reader:
        data.setdefault(r["material"], []).append(
            (float(r["energy_mev"]), float(r["mu_rho_cm2_g"]), float(r["mu_en_rho_cm2_g"])))
    mats = tuple(data)
    arrs = {m: np.asarray(v) for m, v in data.items()}
    return AttenuationTable(
        materials=mats,
        energies_mev={m: a[:, 0] for m, a in arrs.items()},
        mu_rho_cm2_g={m: a[:, 1] for m, a in arrs.items()},
        mu_en_rho_cm2_g={m: a[:, 2] for m, a in arrs.items()},
    )


def material_weights(mass_density_g_cm3) -> np.ndarray:
    """Mass fractions of the density anchors for each voxel.

    Parameters
    ----------
    mass_density_g_cm3 : array (...), g/cm3, >= 0

    Returns
    -------
    (..., n_anchors) float64
        Mass fractions (sum 1) of :data:`DENSITY_ANCHORS`; at most two adjacent ones non-zero.
    """
    rho = check_array("mass_density_g_cm3", mass_density_g_cm3, dtype=np.float64, low=0.0)
    anchors = np.array([d for _, d in DENSITY_ANCHORS])
    n = anchors.size
    r = np.clip(rho, anchors[0], anchors[-1])
    hi = np.clip(np.searchsorted(anchors, r, side="right"), 1, n - 1)
    lo = hi - 1
    f = (r - anchors[lo]) / (anchors[hi] - anchors[lo])
    out = np.zeros(rho.shape + (n,))
    np.put_along_axis(out, lo[..., None], (1.0 - f)[..., None], axis=-1)
    np.put_along_axis(out, hi[..., None], f[..., None], axis=-1)
    return out


def mu_rho_ratio_to_water(mass_density_g_cm3, energies_mev, energy_fluence) -> np.ndarray:
    """Spectrum-averaged mass attenuation of each voxel's material relative to water.

    ``f = sum_E Psi_E mu/rho_m(E) / sum_E Psi_E mu/rho_water(E)``, with the voxel's material the
    mixture of :func:`material_weights` and ``Psi_E`` the energy fluence of the beam: the TERMA per
    unit mass of the material relative to that of water at the same energy fluence (Compton
    scattering dominates at 6 MV, so ``f`` is close to the ratio of electrons per gram). A voxel of
    mass density ``rho`` attenuates like water of density ``rho f``, and under charged-particle
    equilibrium its dose is ``f`` times that of that water. Pure water (1.000 g/cm3) gives exactly 1.

    Parameters
    ----------
    mass_density_g_cm3 : array (...), g/cm3, >= 0
    energies_mev : (n_e,) float, MeV
    energy_fluence : (n_e,) float
        Relative energy fluence of each energy (any normalisation, not all zero).

    Returns
    -------
    (...) float64, dimensionless (soft tissue 1.06 g/cm3 about 0.991, lung 0.992, cortical bone 0.94
    for the default spectrum).
    """
    e = check_array("energies_mev", energies_mev, dtype=np.float64, ndim=1, low=0.0)
    psi = check_array("energy_fluence", energy_fluence, dtype=np.float64, shape=e.shape, low=0.0)
    if not psi.sum() > 0.0:
        raise ValueError("energy_fluence must not be all zero")
    t = attenuation_table()
    water = float((psi * t.mu_rho("water", e)).sum())
    ratio = (t.anchor_mu_rho(e) @ psi) / water
    ratio[[m for m, _ in DENSITY_ANCHORS].index("water")] = 1.0
    return material_weights(mass_density_g_cm3) @ ratio
