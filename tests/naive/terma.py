"""Naive twin of tomodose._kernels.terma: loop over samples and voxels in Python.

Uses the NumPy reference profiles of BeamModel, the frames module for the geometry and the
naive Siddon trace; no slab culling (every voxel is evaluated).
"""

from __future__ import annotations

import numpy as np

from tests.naive.raytrace import radiological_path
from tomodose.geometry.frames import beam_axes_patient, couch_shift_patient, source_position_patient
from tomodose.terma.attenuation import attenuation_table, material_weights


def _geometry(projections, p, frac):
    m = projections.machine
    pp = projections.patient_position
    ang = projections.gantry_angle_deg[p] + projections.arc_deg[p] * frac
    couch = projections.couch_mm[p] + projections.couch_travel_mm[p] * frac
    src = source_position_patient(ang, couch, projections.isocentre_lps_mm, m.sad_mm, pp)
    ex, ey, ez = beam_axes_patient(ang, pp)
    iso = np.asarray(projections.isocentre_lps_mm) + couch_shift_patient(couch, pp)
    return src, ex, ey, ez, iso


def _uv(pnt, geo, sad):
    src, ex, ey, ez, iso = geo
    r = pnt - iso
    dist = sad - r @ ez
    return (r @ ex) * sad / dist, (r @ ey) * sad / dist


def terma_naive(grid, density, projections, beam, n_subsamples=1, exact_subsamples=False,
                energy_group_edges_mev=None):
    """(nz, ny, nx) float64 total TERMA (same normalisation as compute_terma).

    ``exact_subsamples=False``: fluence and inverse square per sub-sample, attenuation and
    softening once per projection at its centre geometry (as compute_terma's default).
    With ``energy_group_edges_mev`` (GE + 1 edges): (GE, nz, ny, nx), the sum over the spectral
    lines with ``edges[g] <= E < edges[g + 1]`` for each group ``g``.
    """
    m = projections.machine
    sad = m.sad_mm
    spec = beam.spectrum.trimmed()
    mu = attenuation_table().anchor_mu_rho(spec.energies_mev)  # (M, E)
    ef = spec.energy_fluence
    if energy_group_edges_mev is None:
        masks = [np.ones(ef.size, dtype=bool)]
    else:
        e = np.asarray(energy_group_edges_mev, dtype=float)
        masks = [(spec.energies_mev >= lo) & (spec.energies_mev < hi) for lo, hi in zip(e[:-1], e[1:])]
    w = material_weights(density)  # (nz, ny, nx, M)
    mat = w * density[..., None]
    out = np.zeros((len(masks),) + grid.shape)
    x, y, z = grid.x_mm, grid.y_mm, grid.z_mm
    fw = projections.field_width_mm
    for p in range(projections.n_projections):
        fracs = (np.arange(n_subsamples) + 0.5) / n_subsamples - 0.5
        geos = [_geometry(projections, p, f) for f in fracs]
        dt = projections.duration_s[p] / n_subsamples
        if exact_subsamples or n_subsamples == 1:
            units = [([g], g) for g in geos]
        else:
            units = [(geos, _geometry(projections, p, 0.0))]
        for samples, tgeo in units:
            for k in range(grid.nz):
                for j in range(grid.ny):
                    for i in range(grid.nx):
                        pnt = np.array([x[i], y[j], z[k]])
                        fl = 0.0
                        for geo in samples:
                            u, v = _uv(pnt, geo, sad)
                            psi = beam.fluence(u, v, projections.leaf_open_fraction[p], fw, m)
                            fl += dt * psi * sad**2 / np.sum((geo[0] - pnt) ** 2)
                        if fl <= 0:
                            continue
                        u_t, _ = _uv(pnt, tgeo, sad)
                        h = beam.softening_factor(u_t, sad)
                        path = radiological_path(mat, grid.origin_mm, grid.spacing_mm, pnt, tgeo[0])  # mm g/cm3
                        expo = 0.1 * h * (path @ mu)  # (E,)
                        rho = density[k, j, i]
                        mu_loc = (w[k, j, i] @ mu) if rho > 0 else mu[0]
                        lines = ef * h * mu_loc * np.exp(-expo)
                        for g, sel in enumerate(masks):
                            out[g, k, j, i] += fl * np.sum(lines[sel])
    return out[0] if energy_group_edges_mev is None else out
