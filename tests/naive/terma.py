"""Naive twin of tomodose._kernels.terma: loop over samples and voxels in Python.

Uses the NumPy reference profiles of BeamModel, the frames module for the geometry and the
naive Siddon trace; no slab culling (every voxel is evaluated).
"""

from __future__ import annotations

import numpy as np

from tests.naive.raytrace import radiological_path
from tomodose.geometry.frames import beam_axes_patient, couch_shift_patient, source_position_patient
from tomodose.terma.attenuation import attenuation_table, material_weights


def terma_naive(grid, density, projections, beam, n_subsamples=1):
    """(nz, ny, nx) float64 total TERMA (same normalisation as compute_terma)."""
    m = projections.machine
    sad = m.sad_mm
    spec = beam.spectrum.trimmed()
    mu = attenuation_table().anchor_mu_rho(spec.energies_mev)  # (M, E)
    ef = spec.energy_fluence
    w = material_weights(density)  # (nz, ny, nx, M)
    mat = w * density[..., None]
    out = np.zeros(grid.shape)
    x, y, z = grid.x_mm, grid.y_mm, grid.z_mm
    pp = projections.patient_position
    for p in range(projections.n_projections):
        a = beam.leaf_weights(projections.leaf_open_fraction[p])
        for s in range(n_subsamples):
            frac = (s + 0.5) / n_subsamples - 0.5
            ang = projections.gantry_angle_deg[p] + projections.arc_deg[p] * frac
            couch = projections.couch_mm[p] + projections.couch_travel_mm[p] * frac
            dt = projections.duration_s[p] / n_subsamples
            src = source_position_patient(ang, couch, projections.isocentre_lps_mm, sad, pp)
            ex, ey, ez = beam_axes_patient(ang, pp)
            iso = np.asarray(projections.isocentre_lps_mm) + couch_shift_patient(couch, pp)
            for k in range(grid.nz):
                for j in range(grid.ny):
                    for i in range(grid.nx):
                        pnt = np.array([x[i], y[j], z[k]])
                        r = pnt - iso
                        dist = sad - r @ ez
                        u = (r @ ex) * sad / dist
                        v = (r @ ey) * sad / dist
                        psi = (beam.jaw_profile(v, projections.field_width_mm, m)
                               * beam.leaf_fluence(u, a, m) * beam.offaxis_fluence(u, sad))
                        if psi <= 0:
                            continue
                        h = beam.softening_factor(u, sad)
                        path = radiological_path(mat, grid.origin_mm, grid.spacing_mm, pnt, src)  # mm g/cm3
                        expo = 0.1 * h * (path @ mu)  # (E,)
                        rho = density[k, j, i]
                        mu_loc = (w[k, j, i] @ mu) if rho > 0 else mu[0]
                        invsq = sad**2 / np.sum((src - pnt) ** 2)
                        out[k, j, i] += dt * psi * invsq * np.sum(ef * h * mu_loc * np.exp(-expo))
    return out
