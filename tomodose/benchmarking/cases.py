"""Benchmark cases for :mod:`tomodose.benchmarking.harness`.

Every case is a module-level function ``setup(size, **params) -> (callable, info)``: the setup
builds the inputs (phantom, plan, TERMA, doses) outside the timed region and returns a
zero-argument callable doing only the measured work, and a dict of problem sizes (voxels,
projections, beamlets, angle groups). The harness runs each case in a fresh process.

``size`` is the value on the ladder of the case:

* ``ladder="spacing"`` (default): ``size`` is the grid spacing in mm of the liver phantom
  (``"liver_default"``), the plan covering the whole PTV;
* ``ladder="rotations"``: ``size`` is the number of gantry rotations of the plan (the covering
  plan cut after that many rotations), on a grid of ``spacing_mm``.

The plan is the demo's (jaw 25 mm, pitch 0.287, gantry period 40 s, isocentre at the PTV
centroid) with a conformal sinogram (every leaf that sees the PTV open). Doses for gamma and the
protocol are synthetic and smooth (a blurred PTV at ~52 Gy plus a low-dose bath), so these cases
do not depend on the speed or correctness of the dose engines.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import numpy as np

log = logging.getLogger(__name__)

__all__ = [
    "CASES",
    "PLAN_CASES",
    "terma",
    "ccc_group",
    "ccc_plan",
    "pencil_beam_plan",
    "influence",
    "gamma",
    "dvh_protocol",
]

PHANTOM = "liver_default"
FIELD_WIDTH_MM = 25.0
PITCH = 0.287
GANTRY_PERIOD_S = 40.0


@functools.lru_cache(maxsize=4)
def _patient(spacing_mm: float, phantom: str = PHANTOM):
    from tomodose.phantoms import load_phantom

    return load_phantom(phantom, spacing_mm=float(spacing_mm))


def _plan(patient, rotations: float | None = None):
    """The demo's helical plan over the PTV z extent with a conformal sinogram."""
    from tomodose.delivery.beams_eye import conformal_sinogram
    from tomodose.delivery.plan import HelicalPlan

    ptv = patient.structures["PTV"]
    z_in = patient.grid.z_mm[np.any(ptv.mask, axis=(1, 2))]
    cx, cy, _ = ptv.centroid_mm()
    template = HelicalPlan.covering(lambda n, m: np.ones((n, m)), float(z_in.max()), float(z_in.min()),
                                    field_width_mm=FIELD_WIDTH_MM, pitch=PITCH, gantry_period_s=GANTRY_PERIOD_S,
                                    isocentre_xy_mm=(cx, cy))
    sino = conformal_sinogram(template, ptv)
    if rotations is not None:
        per_rot = template.machine.projections_per_rotation
        n = int(np.clip(round(float(rotations) * per_rot), 1, sino.shape[0]))
        if rotations * per_rot > sino.shape[0]:
            log.warning("plan of %.3g rotations asked, the covering plan has only %.3g", rotations,
                        sino.shape[0] / per_rot)
        # centre the cut on the open part of the sinogram, so the cut plan delivers dose
        open_rows = np.flatnonzero(sino.any(axis=1))
        mid = int(open_rows.mean()) if open_rows.size else sino.shape[0] // 2
        start = int(np.clip(mid - n // 2, 0, sino.shape[0] - n))
        couch_start = template.couch_start_mm + start * template.pitch * template.field_width_mm / per_rot
        sino = sino[start:start + n]
        return dataclasses.replace(template, sinogram=sino, couch_start_mm=couch_start,
                                   start_angle_deg=float(template.start_angle_deg
                                                         + 360.0 * start / per_rot) % 360.0)
    return dataclasses.replace(template, sinogram=sino)


def _problem(size, ladder: str, spacing_mm: float, rotations: float | None):
    if ladder == "spacing":
        spacing_mm, rotations = float(size), rotations
    elif ladder == "rotations":
        rotations = float(size)
    else:
        raise ValueError(f"ladder must be 'spacing' or 'rotations', got {ladder!r}")
    patient = _patient(float(spacing_mm))
    plan = _plan(patient, rotations)
    return patient, plan


def _info(patient, plan, **extra) -> dict:
    sino = np.asarray(plan.sinogram)
    info = {
        "spacing_mm": float(patient.grid.spacing_mm[0]),
        "shape": "x".join(str(n) for n in patient.grid.shape),
        "n_voxels": int(patient.grid.n_voxels),
        "n_projections": int(sino.shape[0]),
        "n_beamlets_open": int(np.count_nonzero(sino > 0)),
        "rotations": round(sino.shape[0] / plan.machine.projections_per_rotation, 3),
    }
    info.update(extra)
    return info


def _synthetic_dose(patient, shift_mm: float = 0.0, scale: float = 1.0):
    """Smooth dose (Gy, whole treatment): blurred PTV (6 mm) at 52 Gy plus a bath inside the body
    (8 Gy everywhere + up to 20 Gy from a 30 mm blur of the PTV), so that the whole body is above a
    10 % cut-off (the gamma case then evaluates ~all body voxels)."""
    from scipy import ndimage

    from tomodose.geometry.grid import ImageVolume

    grid = patient.grid
    sigma = [6.0 / s for s in grid.spacing_mm[::-1]]  # (z, y, x) voxels for 6 mm
    ptv = patient.structures["PTV"].occupancy.astype(np.float64)
    body = patient.structures["Body"].occupancy.astype(np.float64) if "Body" in patient.structures else 1.0
    core = ndimage.gaussian_filter(ptv, sigma)
    bath = ndimage.gaussian_filter(ptv, [5 * s for s in sigma], mode="constant")
    dose = 52.0 * core / max(core.max(), 1e-12) + (8.0 + 20.0 * bath / max(bath.max(), 1e-12)) * body
    if shift_mm:
        dose = ndimage.shift(dose, (0.0, 0.0, shift_mm / grid.spacing_mm[0]), order=1, mode="nearest")
    return ImageVolume(grid, (dose * scale).astype(np.float32), "Gy", "dose")


# --------------------------------------------------------------------------------------------
# cases


def terma(size, *, ladder: str = "spacing", spacing_mm: float = 6.0, rotations: float | None = None,
          n_subsamples: int = 8):
    """TERMA of the whole helical plan (:func:`tomodose.terma.terma.compute_terma`)."""
    from tomodose.terma import BeamModel
    from tomodose.terma.terma import compute_terma

    patient, plan = _problem(size, ladder, spacing_mm, rotations)
    beam = BeamModel.default()
    seq = plan.projections()
    info = _info(patient, plan, n_subsamples=n_subsamples)

    def work():
        res = compute_terma(patient, seq, beam, n_subsamples=n_subsamples, progress=False)
        info["n_angle_groups"] = res.n_groups
        info["kernel_s"] = round(float(res.metadata.get("kernel_time_s", float("nan"))), 3)

    return work, info


def ccc_group(size, *, ladder: str = "spacing", spacing_mm: float = 6.0, rotations: float | None = None):
    """Collapsed-cone transport of one angle group's TERMA (the engine's inner step)."""
    from tomodose.geometry.frames import beam_axes_patient
    from tomodose.terma.terma import compute_terma
    from tomodose.transport.collapsed_cone import collapsed_cone_dose
    from tomodose.transport.kernels import load_kernel

    patient, plan = _problem(size, ladder, spacing_mm, rotations)
    seq = plan.projections()
    tr = compute_terma(patient, seq, progress=False)
    g = int(np.argmax(tr.per_group.reshape(tr.n_groups, -1).sum(axis=1)))
    terma_g = np.ascontiguousarray(tr.per_group[g])
    density = np.ascontiguousarray(patient.mass_density_g_cm3)
    _, _, zg = beam_axes_patient(float(tr.group_angles_deg[g]), seq.patient_position)
    kernel = load_kernel()
    n_dirs = int(kernel.directions(-zg)[0].shape[0])
    info = _info(patient, plan, n_angle_groups=tr.n_groups, n_directions=n_dirs,
                 voxel_directions=int(patient.grid.n_voxels * n_dirs))
    del tr

    def work():
        collapsed_cone_dose(terma_g, density, patient.grid, beam_direction=-zg, kernel=kernel, progress=False)

    return work, info


def _plan_dose(engine: str, size, ladder: str, spacing_mm: float, rotations: float | None, options=None):
    """Full helical plan dose with ``engine`` through :func:`tomodose.dose.compute_dose` (engine
    ``options`` passed on); the engine's own timings (``metadata["timings_s"]``) are added to the info."""
    from tomodose.dose import compute_dose

    patient, plan = _problem(size, ladder, spacing_mm, rotations)
    options = dict(options or {})
    info = _info(patient, plan, **({"engine_options": options} if options else {}))

    def work():
        res = compute_dose(patient, plan, engine=engine, progress=False, **options)
        t = res.metadata.get("timings_s", {})
        info.update({k: round(float(v), 3) for k, v in t.items() if isinstance(v, (int, float))})

    return work, info


def ccc_plan(size, *, ladder: str = "spacing", spacing_mm: float = 6.0, rotations: float | None = None,
             fast: bool = False):
    """Full helical plan dose with the collapsed-cone engine (TERMA + transport of 51 angle groups;
    ``fast``: :data:`tomodose.dose.engine.FAST_CCC_OPTIONS`)."""
    from tomodose.dose.engine import FAST_CCC_OPTIONS

    return _plan_dose("collapsed_cone", size, ladder, spacing_mm, rotations, FAST_CCC_OPTIONS if fast else None)


def pencil_beam_plan(size, *, ladder: str = "spacing", spacing_mm: float = 6.0, rotations: float | None = None,
                     method: str | None = None, lateral_scaling: str | None = None):
    """Full helical plan dose with the pencil-beam engine (no matrix; ``method``: e.g. ``"fluence"``,
    the fast path, default the engine's; ``lateral_scaling`` default the engine's, ``"upstream"``)."""
    options = {"method": method} if method else {}
    if lateral_scaling is not None:
        options["lateral_scaling"] = lateral_scaling
    return _plan_dose("pencil_beam", size, ladder, spacing_mm, rotations, options or None)


def influence(size, *, ladder: str = "spacing", spacing_mm: float = 6.0, rotations: float | None = None):
    """Sparse pencil-beam influence matrix of the beamlets meeting the PTV."""
    from tomodose.transport.influence import influence_matrix

    patient, plan = _problem(size, ladder, spacing_mm, rotations)
    info = _info(patient, plan)

    def work():
        m = influence_matrix(patient, plan, target="PTV", progress=False)
        mib = (m.data.nbytes + m.indices.nbytes + m.indptr.nbytes) / 2**20
        info.update(n_beamlets=int(m.shape[1]), nnz=int(m.nnz), matrix_mib=round(mib, 1))

    return work, info


def _gamma_inputs(size, ladder, spacing_mm):
    sp = float(size) if ladder == "spacing" else float(spacing_mm)
    patient = _patient(sp)
    return patient, _synthetic_dose(patient), _synthetic_dose(patient, shift_mm=1.0, scale=1.01)


def gamma(size, *, ladder: str = "spacing", spacing_mm: float = 6.0, dose_percent: float = 2.0,
          distance_mm: float = 2.0, cutoff_percent: float = 10.0):
    """Global 3-D gamma (2 %/2 mm, 10 % cut-off) of a synthetic dose against a shifted copy."""
    from tomodose.evaluation.gamma import gamma_index

    patient, ref, ev = _gamma_inputs(size, ladder, spacing_mm)
    info = {"spacing_mm": float(patient.grid.spacing_mm[0]), "n_voxels": int(patient.grid.n_voxels),
            "n_evaluated": int(np.count_nonzero(ref.array >= cutoff_percent / 100.0 * ref.array.max()))}

    def work():
        res = gamma_index(ref, ev, dose_percent=dose_percent, distance_mm=distance_mm,
                          cutoff_percent=cutoff_percent, progress=False)
        info["pass_rate_percent"] = round(float(res.pass_rate_percent), 3)

    return work, info


def dvh_protocol(size, *, ladder: str = "spacing", spacing_mm: float = 6.0):
    """DVHs of every protocol structure and the full protocol evaluation (default protocol)."""
    from tomodose.evaluation.protocol import evaluate_protocol, load_protocol

    sp = float(size) if ladder == "spacing" else float(spacing_mm)
    patient = _patient(sp)
    dose = _synthetic_dose(patient)
    protocol = load_protocol()
    structures = patient.structures
    info = {"spacing_mm": sp, "n_voxels": int(patient.grid.n_voxels), "n_structures": len(structures),
            "protocol": protocol.name if hasattr(protocol, "name") else "default"}

    def work():
        ev = evaluate_protocol(protocol, dose, structures, dose_name="synthetic")
        info["verdict"] = ev.overall

    return work, info


#: name -> ("module:function", what the spacing ladder's exponent is fitted against)
CASES = {
    "terma": ("tomodose.benchmarking.cases:terma", "n_voxels"),
    "ccc_group": ("tomodose.benchmarking.cases:ccc_group", "n_voxels"),
    "ccc_plan": ("tomodose.benchmarking.cases:ccc_plan", "n_voxels"),
    "pencil_beam_plan": ("tomodose.benchmarking.cases:pencil_beam_plan", "n_voxels"),
    "influence": ("tomodose.benchmarking.cases:influence", "n_voxels"),
    "gamma": ("tomodose.benchmarking.cases:gamma", "n_voxels"),
    "dvh_protocol": ("tomodose.benchmarking.cases:dvh_protocol", "n_voxels"),
}

#: Cases that also run on the plan-length ladder (exponent against the number of projections).
PLAN_CASES = ("terma", "ccc_plan", "pencil_beam_plan", "influence")
