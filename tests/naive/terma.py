"""Naive twin of tomodose._kernels.terma: loop over samples and voxels in Python.

Uses the NumPy reference profiles of BeamModel, the frames module for the geometry and the
naive Siddon trace; no slab culling (every voxel is evaluated).
"""

from __future__ import annotations

import numpy as np

from tests.naive.profiles import edge_mean
from tests.naive.raytrace import radiological_path
from tomodose.terma.beam_model import EDGE_CUTOFF_SIGMAS
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


def _fluence_mean(beam, u, v, hu, hv, lof, fw, machine):
    """Beam-model fluence with the jaw profile averaged over [v - hv, v + hv] and the leaf
    fluence over [u - hu, u + hu] (each edge's mean by quadrature, tests/naive/profiles.py)."""
    cut = EDGE_CUTOFF_SIGMAS
    h = beam.jaw_half_width_mm(fw, machine)
    sj = beam.jaw_penumbra_sigma_mm
    jaw = edge_mean(v + h, sj, cut, hv) - edge_mean(v - h, sj, cut, hv)
    e = machine.leaf_edges_mm()
    sl = beam.leaf_edge_sigma_mm
    a = beam.leaf_weights(np.asarray(lof, dtype=float))
    steps = np.array([edge_mean(u - ek, sl, cut, hu) for ek in e])
    leaf = float(np.sum(a * (steps[:-1] - steps[1:])))
    return (jaw * leaf * float(beam.offaxis_fluence(u, machine.sad_mm))
            * beam.jaw_output_factor(fw, machine))


def terma_naive(grid, density, projections, beam, n_subsamples=1, exact_subsamples=False,
                energy_group_edges_mev=None, voxel_average=True, same_angle=False):
    """(nz, ny, nx) float64 total TERMA (same normalisation as compute_terma).

    ``exact_subsamples=False``: fluence and inverse square per sub-sample, attenuation and
    softening once per projection at its centre geometry (as compute_terma's default).
    With ``energy_group_edges_mev`` (GE + 1 edges): (GE, nz, ny, nx), the sum over the spectral
    lines with ``edges[g] <= E < edges[g + 1]`` for each group ``g``.
    ``voxel_average``: jaw profile and leaf fluence averaged over the voxel's extent along ``ey``
    and ``ex`` projected to the isocentre plane (half-width ``0.5 * SAD / D * |e * spacing|``).
    ``same_angle`` (``trace_sharing="angle"``): the projections of one gantry angle (mod 360) share
    the trace, from the voxel to the first one's centre source moved to the voxel's z (an angle
    of one projection: to its centre source).
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
    fracs = (np.arange(n_subsamples) + 0.5) / n_subsamples - 0.5
    units = []  # (samples [(projection, geometry)], trace geometry)
    if same_angle:
        by_angle = {}
        for p in range(projections.n_projections):
            key = round(float(np.mod(projections.gantry_angle_deg[p], 360.0)), 6) % 360.0
            by_angle.setdefault(key, []).append(p)
        for ps in by_angle.values():
            units.append(([(p, _geometry(projections, p, f)) for p in ps for f in fracs],
                          _geometry(projections, ps[0], 0.0), len(ps) > 1))
    else:
        for p in range(projections.n_projections):
            geos = [(p, _geometry(projections, p, f)) for f in fracs]
            if exact_subsamples or n_subsamples == 1:
                units += [([pg], pg[1], False) for pg in geos]
            else:
                units.append((geos, _geometry(projections, p, 0.0), False))
    for samples, tgeo, transverse in units:
        for k in range(grid.nz):
            for j in range(grid.ny):
                for i in range(grid.nx):
                    pnt = np.array([x[i], y[j], z[k]])
                    fl = 0.0
                    for p, geo in samples:
                        dt = projections.duration_s[p] / n_subsamples
                        u, v = _uv(pnt, geo, sad)
                        if voxel_average:
                            sp = np.asarray(grid.spacing_mm, dtype=float)
                            scale = sad / (sad - (pnt - geo[4]) @ geo[3])
                            hu = 0.5 * scale * np.linalg.norm(geo[1] * sp)
                            hv = 0.5 * scale * np.linalg.norm(geo[2] * sp)
                            psi = _fluence_mean(beam, u, v, hu, hv, projections.leaf_open_fraction[p], fw, m)
                        else:
                            psi = beam.fluence(u, v, projections.leaf_open_fraction[p], fw, m)
                        fl += dt * psi * sad**2 / np.sum((geo[0] - pnt) ** 2)
                    if fl <= 0:
                        continue
                    u_t, _ = _uv(pnt, tgeo, sad)
                    h = beam.softening_factor(u_t, sad)
                    target = np.array([tgeo[0][0], tgeo[0][1], pnt[2]]) if transverse else tgeo[0]
                    path = radiological_path(mat, grid.origin_mm, grid.spacing_mm, pnt, target)  # mm g/cm3
                    expo = 0.1 * h * (path @ mu)  # (E,)
                    rho = density[k, j, i]
                    mu_loc = (w[k, j, i] @ mu) if rho > 0 else mu[0]
                    lines = ef * h * mu_loc * np.exp(-expo)
                    for g, sel in enumerate(masks):
                        out[g, k, j, i] += fl * np.sum(lines[sel])
    return out[0] if energy_group_edges_mev is None else out
