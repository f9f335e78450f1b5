"""Slow, obviously-correct NumPy twins of :mod:`tomodose._kernels.pencil_beam`.

* :func:`inplane_depth` - exact in-slice radiological path (all grid-line crossings, sorted,
  midpoint lookup) from every voxel centre to the source.
* :func:`inplane_exit` - exact in-slice radiological path from every voxel centre, away from the
  source, to the grid's outer faces (the exit distance of the exit correction).
* :func:`dose` - loop over samples and voxels with exact error functions (``scipy.special.ndtr``)
  and the explicit leaf sum ``sum_l a_l [Phi((u - e_l)/s) - Phi((u - e_{l+1})/s)]`` (no tables);
  the twin of both the per-sample and the angle-clustered kernels (same model); ``voxel_average``
  averages the jaw profile and the leaf edges exactly over the voxel's projected extent; ``zcol``
  truncates the pencils at the medium's longitudinal ends (:func:`medium_column_ends`); with
  ``n_gaussians`` and ``window`` it is also the twin of one windowed level of the clustered fast
  path (``cluster_dose_lattice``: level m minus level m - 1 = two windowed calls subtracted).
* :func:`trilinear` - trilinear interpolation from a node lattice, voxel by voxel.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import ndtr


def _path(density_2d, ox, oy, dx, dy, p0, p1):
    """Sum of length x density along p0 -> p1 through one slice (nearest pixel per segment)."""
    ny, nx = density_2d.shape
    xs = ox - 0.5 * dx + dx * np.arange(nx + 1)
    ys = oy - 0.5 * dy + dy * np.arange(ny + 1)
    d = np.asarray(p1, float) - np.asarray(p0, float)
    alphas = [0.0, 1.0]
    if d[0] != 0:
        alphas += list((xs - p0[0]) / d[0])
    if d[1] != 0:
        alphas += list((ys - p0[1]) / d[1])
    a = np.unique(np.clip(alphas, 0.0, 1.0))
    length = float(np.hypot(*d))
    total = 0.0
    for a0, a1 in zip(a[:-1], a[1:]):
        mid = np.asarray(p0) + 0.5 * (a0 + a1) * d
        i = int(math.floor((mid[0] - (ox - 0.5 * dx)) / dx))
        j = int(math.floor((mid[1] - (oy - 0.5 * dy)) / dy))
        if 0 <= i < nx and 0 <= j < ny:
            total += (a1 - a0) * length * density_2d[j, i]
    return total


def inplane_depth(density, origin, spacing, source_xy):
    """(nz, ny, nx) radiological depth (mm x g/cm3) from each voxel centre to the source, in-slice."""
    nz, ny, nx = density.shape
    out = np.zeros(density.shape)
    for k in range(nz):
        for j in range(ny):
            for i in range(nx):
                p0 = (origin[0] + i * spacing[0], origin[1] + j * spacing[1])
                out[k, j, i] = _path(density[k], origin[0], origin[1], spacing[0], spacing[1], p0, source_xy)
    return out


def inplane_exit(density, origin, spacing, source_xy):
    """(nz, ny, nx) radiological path (mm x g/cm3) from each voxel centre, away from the source, to
    the grid's outer faces, in-slice (exact path, no interpolation)."""
    nz, ny, nx = density.shape
    lo = (origin[0] - 0.5 * spacing[0], origin[1] - 0.5 * spacing[1])
    hi = (origin[0] + (nx - 0.5) * spacing[0], origin[1] + (ny - 0.5) * spacing[1])
    out = np.zeros(density.shape)
    for j in range(ny):
        for i in range(nx):
            p0 = np.array([origin[0] + i * spacing[0], origin[1] + j * spacing[1]])
            e = p0 - np.asarray(source_xy[:2], float)
            e = e / np.linalg.norm(e)
            s_out = min(((hi[c] if e[c] > 0 else lo[c]) - p0[c]) / e[c] for c in range(2) if abs(e[c]) > 1e-12)
            for k in range(nz):
                out[k, j, i] = _path(density[k], origin[0], origin[1], spacing[0], spacing[1], p0, p0 + s_out * e)
    return out


def _step_mean(x, s, half):
    """Mean of Phi(t / s) over t in [x - half, x + half] (exact: antiderivative t Phi(t/s) + s phi(t/s))."""
    x = np.asarray(x, dtype=float)
    if half <= 0:
        return ndtr(x / s)

    def g(t):
        return t * ndtr(t / s) + s * np.exp(-0.5 * (t / s) ** 2) / math.sqrt(2 * math.pi)

    return (g(x + half) - g(x - half)) / (2 * half)


def _leaf(u, s, a, e0, w, half=0.0):
    edges = e0 + w * np.arange(a.size + 1)
    if s <= 0:
        cdf = (u - edges > 0).astype(float)
    else:
        cdf = _step_mean(u - edges, s, half)
    return float(np.sum(a * (cdf[:-1] - cdf[1:])))


def medium_column_ends(density, origin, spacing, min_density=0.05):
    """(ny, nx, 2) z of the outer faces of the first and last voxel of density >= ``min_density`` of
    each (y, x) column (the grid's z faces for a column without one), voxel by voxel."""
    nz, ny, nx = density.shape
    out = np.empty((ny, nx, 2))
    for j in range(ny):
        for i in range(nx):
            ks = [k for k in range(nz) if density[k, j, i] >= min_density]
            k0, k1 = (ks[0], ks[-1]) if ks else (0, nz - 1)
            out[j, i] = (origin[2] + (k0 - 0.5) * spacing[2], origin[2] + (k1 + 0.5) * spacing[2])
    return out


def _jaw(v, su, jaw_h, s_jaw, av, bl, br):
    """Jaw term of one Gaussian: the blurred jaw rect, or (medium ends inside the open field) the
    aperture [max(-h, v + bl), min(h, v + br)] with the jaw penumbra weighted by Phi of the jaw
    edge's distance inside the medium end (the kernel's model, exact functions), box-averaged."""
    lim = jaw_h + 8.0 * s_jaw
    ml, mr = v + bl, v + br
    if ml <= -lim and mr >= lim:
        sv = math.hypot(su, s_jaw)
        return float(_step_mean(v + jaw_h, sv, av) - _step_mean(v - jaw_h, sv, av))
    if s_jaw > 0:
        wl, wr = ndtr((-jaw_h - ml) / s_jaw), ndtr((mr - jaw_h) / s_jaw)
    else:
        wl, wr = float(ml < -jaw_h), float(mr > jaw_h)
    el, er = max(-jaw_h, ml), min(jaw_h, mr)
    sl, sr = math.sqrt(su * su + wl * s_jaw ** 2), math.sqrt(su * su + wr * s_jaw ** 2)
    return float(_step_mean(v - el, sl, av) - _step_mean(v - er, sr, av))


def _half(ax, spacing):
    """Half-width of the box of equal variance of a voxel projected on the unit axis ``ax``."""
    return 0.5 * math.sqrt(sum((float(ax[c]) * float(spacing[c])) ** 2 for c in range(3)))


def dose(density, origin, spacing, src, xg, yg, zg, dt, depth_maps, a, *, sad, sigma_mm, depth_mm,
         amplitude_cm2_g, e0, w, s_leaf, jaw_h, s_jaw, offc, soft, rho_floor, n_gaussians=None, window=None,
         voxel_average=False, zcol=None, exit_maps=None, exit_distance_mm=None, exit_deficit=None,
         medium_factor=None, lateral_maps=None):
    """Dose (cm2/g*s) of samples ``s`` with geometry ``src[s], xg[s], ...``, weights ``dt[s]``,
    radiological depth maps ``depth_maps[s]`` (nz, ny, nx) and leaf weights ``a[s]`` (n_leaves,).

    ``voxel_average``: the jaw profile and every leaf edge of every Gaussian are averaged exactly
    (antiderivative of the blurred step) over ``[u - au, u + au]``, ``[v - av, v + av]``, with
    ``au, av`` the voxel's equal-variance half-widths along ``xg``, ``yg`` times ``sad / den``.
    ``zcol`` (ny, nx, 2): the medium's longitudinal ends of each column (:func:`medium_column_ends`);
    pencils beyond them carry no dose (None: laterally infinite medium).
    ``exit_maps[s]`` (nz, ny, nx): exit distances (:func:`inplane_exit`); amplitude ``i`` is then
    multiplied by ``1 - x_i(t)`` with ``x = exit_deficit`` (nt, nG) given at ``exit_distance_mm``
    (linear, clamped to the table's ends). None: no exit correction.

    ``n_gaussians``: only the first (narrowest) Gaussians. ``window = (u_lo (n_s,), u_hi (n_s,), r_u,
    v_half, r_v)``: sample ``s`` only where ``u_lo[s] - r_u c <= u <= u_hi[s] + r_u c`` and
    ``|v| <= v_half + r_v c``, ``c = sad / den``.
    ``medium_factor`` (nz, ny, nx) (:func:`medium_factor`): the kernel is scaled laterally by the
    water-equivalent density ``density x medium_factor`` and the dose multiplied by the factor
    (``depth_maps`` / ``exit_maps`` traced through the water-equivalent density); None: 1.
    ``lateral_maps[s]`` (nz, ny, nx, nG) (:func:`upstream_density`): the density that scales each
    Gaussian laterally (instead of the local water-equivalent density)."""
    nz, ny, nx = density.shape
    fm = np.ones(density.shape) if medium_factor is None else medium_factor
    out = np.zeros(density.shape)
    dz_tab = depth_mm[1] - depth_mm[0]
    for s in range(src.shape[0]):
        hu = _half(xg[s], spacing) if voxel_average else 0.0
        hv = _half(yg[s], spacing) if voxel_average else 0.0
        for k in range(nz):
            for j in range(ny):
                for i in range(nx):
                    p = np.array([origin[0] + i * spacing[0], origin[1] + j * spacing[1], origin[2] + k * spacing[2]])
                    d = p - src[s]
                    den = -float(d @ zg[s])
                    u = sad * float(d @ xg[s]) / den
                    v = sad * float(d @ yg[s]) / den
                    r = float(np.linalg.norm(d))
                    if window is not None:
                        c = sad / den
                        if not (window[0][s] - window[2] * c <= u <= window[1][s] + window[2] * c
                                and abs(v) <= window[3] + window[4] * c):
                            continue
                    theta = abs(math.atan(u / sad))
                    h = 1.0 + soft * theta
                    off = 1.0 + sum(c * theta ** (n + 1) for n, c in enumerate(offc))
                    bl, br = -1e30, 1e30
                    if zcol is not None and abs(yg[s][2]) > 1e-12:
                        t1, t2 = ((zcol[j, i] - p[2]) * yg[s][2] * sad / den)
                        bl, br = min(t1, t2), max(t1, t2)
                    dd = h * depth_maps[s][k, j, i]
                    rho = max(density[k, j, i] * fm[k, j, i], rho_floor)
                    total = 0.0
                    for g, sig in enumerate(sigma_mm[:n_gaussians]):
                        amp = np.interp(dd, depth_mm, amplitude_cm2_g[:, g])
                        if dd > depth_mm[-1]:
                            ratio = amplitude_cm2_g[-1, g] / amplitude_cm2_g[-2, g] if amplitude_cm2_g[-2, g] > 0 else 0.0
                            amp = amplitude_cm2_g[-1, g] * min(ratio, 1.0) ** ((dd - depth_mm[-1]) / dz_tab)
                        if exit_maps is not None:
                            amp *= 1.0 - np.interp(exit_maps[s][k, j, i], exit_distance_mm, exit_deficit[:, g])
                        rho_lat = rho if lateral_maps is None else lateral_maps[s][k, j, i, g]
                        su = sig * sad / (rho_lat * den)
                        jv = max(_jaw(v, su, jaw_h, s_jaw, hv * sad / den, bl, br), 0.0)
                        sl = math.hypot(su, s_leaf)
                        total += amp * jv * _leaf(u, sl, a[s], e0, w, hu * sad / den)
                    out[k, j, i] += fm[k, j, i] * dt[s] * total * h * off * (sad / r) ** 2
    return out


def trilinear(values, ks, js, is_, shape):
    """(nz, ny, nx) trilinear interpolation of ``values`` given at voxel indices ``ks x js x is_``."""
    out = np.zeros(shape)

    def bracket(nodes, x):
        if nodes.size == 1:
            return 0, 0, 0.0
        a = min(max(int(np.searchsorted(nodes, x, side="right")) - 1, 0), nodes.size - 2)
        return a, a + 1, (x - nodes[a]) / (nodes[a + 1] - nodes[a])

    for k in range(shape[0]):
        a0, a1, fk = bracket(ks, k)
        for j in range(shape[1]):
            b0, b1, fj = bracket(js, j)
            for i in range(shape[2]):
                c0, c1, fi = bracket(is_, i)
                total = 0.0
                for aa, wa in ((a0, 1 - fk), (a1, fk)):
                    for bb, wb in ((b0, 1 - fj), (b1, fj)):
                        for cc, wc in ((c0, 1 - fi), (c1, fi)):
                            total += wa * wb * wc * values[aa, bb, cc]
                out[k, j, i] = total
    return out


def influence_columns(density, origin, spacing, src, xg, yg, zg, dt, depth_maps, proj_of_sample, beamlets,
                      leaf_centres, *, r_u, half_v, r_v, threshold, **model):
    """Dense (n_voxels, n_beamlets) influence matrix, column by column: the dose of each beamlet
    (projection, leaf) with unit leaf weight summed over the projection's samples (:func:`dose`)
    inside its window (``|u - leaf centre| <= w / 2 + r_u c``, ``|v| <= half_v + r_v c``), then the
    entries below ``threshold`` x the column maximum (or <= 0) set to 0. ``model``: the keyword
    arguments of :func:`dose` (``w`` among them)."""
    n_leaves = leaf_centres.size
    out = np.zeros((density.size, len(beamlets)))
    fm = model.get("medium_factor")
    fm = np.ones(density.shape) if fm is None else fm
    for b, (p, l) in enumerate(beamlets):
        s = np.flatnonzero(proj_of_sample == p)
        a = np.zeros((s.size, n_leaves))
        a[:, l] = 1.0
        lo = np.full(s.size, leaf_centres[l] - 0.5 * model["w"])
        hi = np.full(s.size, leaf_centres[l] + 0.5 * model["w"])
        kw = dict(model)
        if kw.get("exit_maps") is not None:
            kw["exit_maps"] = [model["exit_maps"][i] for i in s]
        if kw.get("lateral_maps") is not None:
            kw["lateral_maps"] = [model["lateral_maps"][i] for i in s]
        col = dose(density, origin, spacing, src[s], xg[s], yg[s], zg[s], dt[s], [depth_maps[i] for i in s], a,
                   window=(lo, hi, r_u, half_v, r_v), **kw).ravel()
        raw = col / fm.ravel()  # the threshold cuts the water-equivalent dose (before the medium factor)
        col[(raw <= 0) | (raw < threshold * raw.max())] = 0.0
        out[:, b] = col
    return out


def _sample_maps(eng, make):
    """One map per sample of the engine ``eng``: ``make(source_xyz)`` evaluated once per angle group
    (at the group's source) and repeated for each of its samples."""
    from tomodose.geometry.frames import source_position_patient

    p = eng.projections
    by_group, maps = {}, []
    for q in eng.proj:
        grp = int(eng.proj_group[q])
        if grp not in by_group:
            by_group[grp] = make(source_position_patient(eng.group_angles[grp], 0.0, p.isocentre_lps_mm, eng.sad,
                                                         p.patient_position))
        maps.append(by_group[grp])
    return maps


def exit_keywords(eng, rho, grid):
    """Exact exit-distance maps (this module's :func:`inplane_exit`) of every sample of the engine
    ``eng`` (its angle group's source) and the exit-table keywords of :func:`dose`."""
    maps = _sample_maps(eng, lambda src: inplane_exit(rho, grid.origin_mm, grid.spacing_mm, src[:2]))
    k = eng.kernel
    return dict(exit_maps=maps, exit_distance_mm=k.exit_distance_mm, exit_deficit=k.exit_deficit)


def medium_factor(density, energies_mev, energy_fluence):
    """Per voxel: sum_E psi_E mu/rho_mix(E) / sum_E psi_E mu/rho_water(E), the mixture of the two
    density anchors bracketing the voxel's density (mass fractions linear in density; below the
    first anchor the first, above the last the last), voxel by voxel and energy by energy."""
    from tomodose.terma.attenuation import DENSITY_ANCHORS, attenuation_table

    t = attenuation_table()
    names = [m for m, _ in DENSITY_ANCHORS]
    rhos = [r for _, r in DENSITY_ANCHORS]

    def spectral(material):
        return sum(p * float(t.mu_rho(material, [e])[0]) for e, p in zip(energies_mev, energy_fluence))

    water = spectral("water")
    ratio = {m: spectral(m) / water for m in names}
    out = np.empty(np.shape(density))
    for idx, rho in np.ndenumerate(np.asarray(density)):
        if rho <= rhos[0]:
            out[idx] = ratio[names[0]]
            continue
        if rho >= rhos[-1]:
            out[idx] = ratio[names[-1]]
            continue
        b = next(n for n in range(1, len(rhos)) if rho < rhos[n])
        wb = (rho - rhos[b - 1]) / (rhos[b] - rhos[b - 1])
        out[idx] = (1.0 - wb) * ratio[names[b - 1]] + wb * ratio[names[b]]
    return out


def upstream_density(density_w, origin, spacing, source_xy, window, along_y, min_medium=0.05, rho_floor=0.05):
    """(nz, ny, nx, nG) upstream lateral density, voxel by voxel (the recursion of
    :func:`tomodose._kernels.pb_lateral.upstream_density`, written out): rows (``along_y``; columns
    otherwise) from the source's side; each voxel continues the running sums ``N, W`` of the previous
    row at its ray's crossing point (linear between the two columns; nothing outside), over the step
    ``dl = d sqrt(1 + t^2)`` with its own density ``rho`` (>= ``min_medium``):
    ``N = N' e + (1 - e) L / rho``, ``W = W' e + (1 - e) L``, ``e = exp(-rho dl / L)``; the value
    ``max(W / N, rho_floor)`` (the voxel's density where ``N = 0``)."""
    dens = np.asarray(density_w, float)
    o = [float(origin[0]), float(origin[1])]
    sp = [float(spacing[0]), float(spacing[1])]
    src = [float(source_xy[0]), float(source_xy[1])]
    if not along_y:  # the same on the slices transposed (x <-> y)
        dens = dens.transpose(0, 2, 1)
        o, sp, src = o[::-1], sp[::-1], src[::-1]
    nz, ny, nx = dens.shape
    ox, oy = o
    dx, dy = sp
    sx, sy = src
    rows = list(range(ny)) if sy < oy else list(range(ny - 1, -1, -1))
    out = np.zeros((nz, ny, nx, len(window)))
    cols = np.arange(nx, dtype=float)
    for k in range(nz):
        for g, lg in enumerate(window):
            n_prev = np.zeros(nx)
            w_prev = np.zeros(nx)
            for step, j in enumerate(rows):
                py = oy + j * dy
                n_cur = np.zeros(nx)
                w_cur = np.zeros(nx)
                for i in range(nx):
                    px = ox + i * dx
                    t = (px - sx) / (py - sy)
                    dl = dy * math.sqrt(1.0 + t * t)
                    n_up = w_up = 0.0
                    if step > 0:
                        py_prev = oy + rows[step - 1] * dy
                        q = (px - t * (py - py_prev) - ox) / dx
                        if 0.0 <= q <= nx - 1:
                            n_up = float(np.interp(q, cols, n_prev))
                            w_up = float(np.interp(q, cols, w_prev))
                    rho = dens[k, j, i]
                    if rho >= min_medium:
                        e = math.exp(-rho * dl / lg)
                        n_cur[i] = n_up * e + (1.0 - e) * lg / rho
                        w_cur[i] = w_up * e + (1.0 - e) * lg
                    else:
                        n_cur[i], w_cur[i] = n_up, w_up
                    val = w_cur[i] / n_cur[i] if n_cur[i] > 0.0 else rho
                    out[k, j, i, g] = max(val, rho_floor)
                n_prev, w_prev = n_cur, w_cur
    return out if along_y else out.transpose(0, 2, 1, 3)


def lateral_keywords(eng, rho_w, grid, window):
    """Upstream lateral-density maps (this module's :func:`upstream_density`, windows ``window``) of
    every sample of the engine ``eng`` (its angle group's source; rows swept along the axis closer to
    the beam's central axis), as the ``lateral_maps`` keyword of :func:`dose`."""
    iso = np.asarray(eng.projections.isocentre_lps_mm, float)

    def make(src):
        along_y = abs(iso[1] - src[1]) >= abs(iso[0] - src[0])
        return upstream_density(rho_w, grid.origin_mm, grid.spacing_mm, src[:2], window, along_y)

    return {"lateral_maps": _sample_maps(eng, make)}


def beam_medium_factor(density, beam):
    """:func:`medium_factor` of ``density`` for the spectrum of the beam model ``beam``."""
    return medium_factor(density, beam.spectrum.energies_mev, beam.spectrum.energy_fluence)
