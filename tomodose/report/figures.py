"""Figures for people: dose colour-wash with isodose lines and structure outlines on axial,
coronal and sagittal slices, and the sinogram. matplotlib Agg backend, atomic writes."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from tomodose.geometry.grid import ImageVolume
from tomodose._atomic import atomic_write_bytes

__all__ = ["plot_dose_slices", "plot_sinogram"]

_OUTLINE_COLOURS = ("red", "magenta", "orange", "cyan", "lime", "yellow", "blue", "chocolate", "pink", "white")


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path, dpi: int) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    _figure().close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def plot_dose_slices(dose: ImageVolume, path, *, ct: ImageVolume | None = None, structures=None,
                     centre_mm=None, prescription_gy: float | None = None,
                     isodose_percent=(30, 50, 80, 95, 100, 107), title: str = "", dpi: int = 110) -> Path:
    """Axial, coronal and sagittal slices of ``dose`` (Gy) through ``centre_mm`` (LPS x, y, z).

    The colour wash shows dose above 5 % of the prescription (or of the maximum) over the CT in
    grey; isodose lines are drawn at ``isodose_percent`` of ``prescription_gy``; ``structures``
    (mapping name -> Structure) are outlined. Images are shown in radiological convention
    (patient left on the image right for axial and coronal views).
    """
    plt = _figure()
    grid = dose.grid
    ref = float(prescription_gy) if prescription_gy else float(dose.array.max() or 1.0)
    if centre_mm is None:
        k, j, i = np.unravel_index(int(np.argmax(dose.array)), grid.shape)
    else:
        k, j, i = np.clip(np.round(grid.lps_to_index(np.asarray(centre_mm, float))).astype(int), 0,
                          np.asarray(grid.shape) - 1)
    x, y, z = grid.x_mm, grid.y_mm, grid.z_mm
    views = [
        ("axial (z = %.0f mm)" % z[k], lambda a: a[k, :, :], (x, y), ("x (mm, patient left ->)", "y (mm, posterior ->)"), True),
        ("coronal (y = %.0f mm)" % y[j], lambda a: a[:, j, :], (x, z), ("x (mm, patient left ->)", "z (mm, superior ->)"), False),
        ("sagittal (x = %.0f mm)" % x[i], lambda a: a[:, :, i], (y, z), ("y (mm, posterior ->)", "z (mm, superior ->)"), False),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.5))
    cmap = plt.get_cmap("jet").copy()
    cmap.set_under(alpha=0.0)
    levels = sorted(p / 100.0 * ref for p in isodose_percent)
    line_colours = plt.get_cmap("viridis")(np.linspace(0, 1, len(levels)))
    im = None
    for ax, (label, cut, (h, v), (hl, vl), flip_v) in zip(axes, views, strict=True):
        extent = (h[0], h[-1], v[0], v[-1])
        if ct is not None:
            ax.imshow(cut(ct.array), cmap="gray", vmin=-400, vmax=400, origin="lower", extent=extent,
                      aspect="equal", interpolation="nearest")
        d = cut(dose.array)
        im = ax.imshow(np.ma.masked_less(d, 0.05 * ref), cmap=cmap, alpha=0.45, origin="lower", extent=extent,
                       vmin=0.05 * ref, vmax=max(1.1 * ref, float(dose.array.max())), aspect="equal",
                       interpolation="bilinear")
        if np.nanmax(d) > levels[0]:
            cs = ax.contour(h, v, d, levels=levels, colors=line_colours, linewidths=1.0)
            ax.clabel(cs, fmt=lambda val: f"{100 * val / ref:.0f}%", fontsize=6)
        if structures:
            for n, (name, s) in enumerate(structures.items()):
                m = cut(s.occupancy)
                if m.max() >= 0.5 and m.min() < 0.5:
                    ax.contour(h, v, m, levels=[0.5], colors=[_OUTLINE_COLOURS[n % len(_OUTLINE_COLOURS)]],
                               linewidths=0.8, linestyles="--")
        if flip_v:
            ax.invert_yaxis()  # anterior (-y) at the top of axial images
        ax.set_title(label, fontsize=9)
        ax.set_xlabel(hl, fontsize=8)
        ax.set_ylabel(vl, fontsize=8)
        ax.tick_params(labelsize=7)
    if im is not None:
        cb = fig.colorbar(im, ax=axes, shrink=0.8, pad=0.01)
        cb.set_label("dose (Gy)")
    if structures:
        handles = [plt.Line2D([], [], color=_OUTLINE_COLOURS[n % len(_OUTLINE_COLOURS)], ls="--", label=name)
                   for n, name in enumerate(structures)]
        fig.legend(handles=handles, loc="lower center", ncol=min(8, len(handles)), fontsize=7, frameon=False)
    fig.suptitle(title or f"dose (Gy); isodoses in % of {ref:.3g} Gy", fontsize=10)
    return _save(fig, path, dpi)


def plot_sinogram(sinogram, path, *, gantry_period_s: float | None = None, title: str = "sinogram",
                  dpi: int = 110) -> Path:
    """Leaf-open fraction image: projections (rows, time running down) x leaves (columns)."""
    plt = _figure()
    s = np.asarray(sinogram, dtype=float)
    fig, ax = plt.subplots(figsize=(5, 7))
    im = ax.imshow(s, aspect="auto", cmap="magma", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xlabel("leaf (0..63, along +Xg)")
    ax.set_ylabel("projection" + (f" ({gantry_period_s / 51:.3g} s each)" if gantry_period_s else ""))
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="leaf-open fraction")
    return _save(fig, path, dpi)
