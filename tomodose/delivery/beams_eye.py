"""Beam's-eye-view geometry: where points project in the isocentre plane of each projection.

For a projection with source ``s`` (patient LPS, mm) and gantry axes ``(xg, yg, zg)``, a point
``p`` projects along the ray from the source onto the isocentre plane (the plane through the
machine isocentre perpendicular to ``zg``) at coordinates

``u = SAD * ((p - s) . xg) / ((s - p) . zg)``  (across the fan, leaf axis, mm)
``v = SAD * ((p - s) . yg) / ((s - p) . zg)``  (along the couch axis, jaw axis, mm)

so a point at the isocentre plane keeps its lateral offsets. Longitudinal divergence is
included: ``v`` scales with the distance from the source.
"""

from __future__ import annotations

import numpy as np

from tomodose.delivery.plan import HelicalPlan, ProjectionSequence
from tomodose.geometry.frames import beam_axes_patient, source_position_patient
from tomodose.geometry.structures import Structure

__all__ = ["project_to_isocentre_plane", "leaves_seeing_structure", "conformal_sinogram"]


def project_to_isocentre_plane(points_lps_mm, gantry_angle_deg: float, couch_mm: float,
                               isocentre_lps_mm, sad_mm: float = 850.0,
                               patient_position: str = "HFS"):
    """Project (n, 3) LPS points for one projection.

    Returns
    -------
    u_mm, v_mm : (n,) float
        Coordinates in the isocentre plane along Xg (leaves) and Yg (jaws), mm.
    depth_mm : (n,) float
        Distance from the source along -Zg (mm); the isocentre plane is at ``sad_mm``.
    """
    p = np.asarray(points_lps_mm, dtype=np.float64).reshape(-1, 3)
    src = source_position_patient(gantry_angle_deg, couch_mm, isocentre_lps_mm, sad_mm, patient_position)
    xg, yg, zg = beam_axes_patient(gantry_angle_deg, patient_position)
    d = p - src
    depth = -(d @ zg)
    scale = sad_mm / depth
    return (d @ xg) * scale, (d @ yg) * scale, depth


def leaves_seeing_structure(projections: ProjectionSequence, structure: Structure, *,
                            margin_mm: float = 0.0, chunk: int = 64) -> np.ndarray:
    """(n_projections, n_leaves) bool: leaves whose beamlet meets the structure.

    A leaf sees the structure in a projection when some voxel centre of the structure (any
    occupancy > 0) projects inside the leaf's extent (widened by ``margin_mm``) across the fan
    and inside the nominal jaw opening (widened by ``margin_mm``) along the couch axis.
    """
    machine = projections.machine
    pts = structure.grid.index_to_lps(np.argwhere(structure.occupancy > 0))
    edges = machine.leaf_edges_mm()
    half_jaw = 0.5 * projections.field_width_mm + margin_mm
    out = np.zeros((projections.n_projections, machine.n_leaves), dtype=bool)
    if pts.size == 0:
        return out
    for k in range(projections.n_projections):
        u, v, _ = project_to_isocentre_plane(
            pts, projections.gantry_angle_deg[k], projections.couch_mm[k],
            projections.isocentre_lps_mm, machine.sad_mm, projections.patient_position)
        inside = np.abs(v) <= half_jaw
        if not inside.any():
            continue
        uu = u[inside]
        # per-voxel leaf range (the target may be concave in projection)
        idx_lo = np.clip(np.searchsorted(edges, uu - margin_mm, side="right") - 1, 0, machine.n_leaves - 1)
        idx_hi = np.clip(np.searchsorted(edges, uu + margin_mm, side="left") - 1, 0, machine.n_leaves - 1)
        valid = (uu + margin_mm >= edges[0]) & (uu - margin_mm <= edges[-1])
        for a, b in zip(idx_lo[valid], idx_hi[valid]):
            out[k, a:b + 1] = True
    return out


def conformal_sinogram(plan: HelicalPlan, target: Structure, *, open_fraction: float = 1.0,
                       margin_mm: float = 0.0) -> np.ndarray:
    """A sinogram opening every leaf that sees ``target`` (a 'conformal arc' starting point).

    Returns the (n_projections, n_leaves) leaf-open fractions of ``plan`` with the seeing leaves
    set to ``open_fraction`` and the others closed.
    """
    seeing = leaves_seeing_structure(plan.projections(), target, margin_mm=margin_mm)
    return np.where(seeing, float(open_fraction), 0.0)
