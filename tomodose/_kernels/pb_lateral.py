"""numba kernel of the pencil beam's upstream lateral density (plain arrays in and out; no validation).

Gaussian ``g`` of the pencil kernel is scaled laterally by the harmonic mean of the water-equivalent
density upstream of the voxel along the ray from the source, weighted by ``exp(-s / L_g)`` in
radiological distance ``s`` (mm of water), over medium only (density >= ``min_medium``): see
``docs/pencil_beam.md`` ("Lateral scaling by the upstream density"). Along a ray the two running
sums obey, over a step of length ``dl`` through density ``rho`` (``E = exp(-rho dl / L)``)::

    N <- N E + (1 - E) L / rho        W <- W E + (1 - E) L        rho_eff = W / N

(exact for a density constant over the step; a homogeneous medium gives ``rho_eff = rho``).
"""

from __future__ import annotations

import math

import numba
import numpy as np

from tomodose.config import NUMBA_PARALLEL_OPTIONS


@numba.njit(**NUMBA_PARALLEL_OPTIONS)
def upstream_density(dens_t, ox, oy, dx, dy, sx, sy, window, min_medium, out):
    """Upstream-weighted harmonic mean density of every voxel, per window, for a source at ``(sx, sy)``
    projected onto each slice (in-slice rays, like the depth trace).

    ``dens_t`` (ny, nx, nz) water-equivalent density (g/cm3), rows ``j`` along y; the source must lie
    outside the rows' y range (the caller transposes the grid when the beam runs along x). Rows are
    visited from the source's side; voxel ``(j, i)`` continues the sums of the previous row at the
    point where its ray from the source crosses that row (linear interpolation between the two
    neighbouring columns; nothing before the first row or outside the columns), over the step
    ``dl = dy sqrt(1 + t^2)`` (``t`` the ray's slope dx/dy) with its own density. ``window`` (nG,) mm of
    water. ``out`` (ny, nx, nz, nG) is overwritten with ``W / N`` (the voxel's own density where no
    medium lies upstream). Parallel over the columns of a row (each writes its own voxels).
    """
    ny, nx, nz = dens_t.shape
    ng = window.shape[0]
    forward = sy < oy
    n_prev = np.zeros((nx, nz, ng))
    w_prev = np.zeros((nx, nz, ng))
    n_cur = np.zeros((nx, nz, ng))
    w_cur = np.zeros((nx, nz, ng))
    for step in range(ny):
        j = step if forward else ny - 1 - step
        py = oy + j * dy
        dy_step = dy if forward else -dy  # previous row at py - dy_step
        for i in numba.prange(nx):
            px = ox + i * dx
            t = (px - sx) / (py - sy)
            dl = dy * math.sqrt(1.0 + t * t)
            # previous row: crossing point and its interpolation weights
            have = step > 0
            i0 = 0
            f = 0.0
            if have:
                q = (px - t * dy_step - ox) / dx
                if q < 0.0 or q > nx - 1:
                    have = False
                else:
                    i0 = int(math.floor(q))
                    if i0 > nx - 2:
                        i0 = nx - 2 if nx > 1 else 0
                    f = q - i0
            i1 = i0 + 1 if nx > 1 else i0
            for k in range(nz):
                rho = dens_t[j, i, k]
                med = rho >= min_medium
                for g in range(ng):
                    n_up = 0.0
                    w_up = 0.0
                    if have:
                        n_up = (1.0 - f) * n_prev[i0, k, g] + f * n_prev[i1, k, g]
                        w_up = (1.0 - f) * w_prev[i0, k, g] + f * w_prev[i1, k, g]
                    if med:
                        lg = window[g]
                        one_e = -math.expm1(-rho * dl / lg)
                        e = 1.0 - one_e
                        n_new = n_up * e + one_e * lg / rho
                        w_new = w_up * e + one_e * lg
                    else:
                        n_new = n_up
                        w_new = w_up
                    n_cur[i, k, g] = n_new
                    w_cur[i, k, g] = w_new
                    out[j, i, k, g] = w_new / n_new if n_new > 0.0 else rho
        n_prev, n_cur = n_cur, n_prev
        w_prev, w_cur = w_cur, w_prev
