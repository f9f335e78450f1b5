"""OpenTPS photon collapsed cone (its C++ CCC engine): dose of one static MLC field.

Run by OpenTPS's own Python: ``python opentps_ccc.py CASE.npz``. Prints JSON (see package doc).
OpenTPS computes the field as a sum of beamlets of ``bixel_mm`` (its CCC engine works per
beamlet), so ``n_beamlets`` is reported too.
"""

import os
import sys

from _common import Clock, emit, load_case, peak_rss_mib


def main(path):
    clock = Clock()
    import logging

    import numpy as np
    from opentps.core.data.images._ctImage import CTImage
    from opentps.core.data.plan._photonPlan import PhotonPlan
    from opentps.core.data.plan._planPhotonBeam import PlanPhotonBeam
    from opentps.core.data.plan._planPhotonSegment import PlanPhotonSegment
    from opentps.core.io.scannerReader import readScanner
    from opentps.core.processing.doseCalculation.doseCalculationConfig import DoseCalculationConfig
    from opentps.core.processing.doseCalculation.photons.cccDoseCalculator import CCCDoseCalculator

    logging.disable(logging.INFO)
    import_s, _ = clock.lap()
    case = load_case(path)
    clock = Clock()
    ct = CTImage()
    ct.name = "CT"
    ct.imageArray = np.ascontiguousarray(np.transpose(case["hu"], (2, 1, 0)), dtype=np.float32)  # [x, y, z]
    ct.spacing = np.array(case["spacing_mm"])
    ct.origin = np.array(case["origin_mm"])

    half_x = 0.5 * float(case["field_x_mm"])
    half_y = 0.5 * case["jaw_mm"]
    step = case["bixel_mm"]
    rows = np.arange(-half_y, half_y, step)
    mlc = np.column_stack((rows, rows + step, np.full(rows.size, -half_x), np.full(rows.size, half_x)))
    plan = PhotonPlan()
    beam = PlanPhotonBeam()
    plan.appendBeam(beam)
    seg = PlanPhotonSegment()
    beam.appendBeamSegment(seg)
    beam.isocenterPosition_mm = list(case["isocentre_mm"])
    seg.gantryAngle_degree = case["gantry_deg"]
    seg.Xmlc_mm = mlc
    seg.x_jaw_mm = [-half_x, half_x]
    seg.y_jaw_mm = [-half_y, half_y]
    seg.mu = 100.0
    beam.setXBeamletSpacing_mm(step)
    beam.setYBeamletSpacing_mm(step)
    ccc = CCCDoseCalculator(batchSize=max(1, os.cpu_count() or 1))
    ccc.ctCalibration = readScanner(DoseCalculationConfig().scannerFolder)
    setup_s, _ = clock.lap()
    clock = Clock()
    dose = ccc.computeDose(ct, plan)
    compute_s, compute_cpu_s = clock.lap()
    n_beamlets = int(sum(len(s.beamletMUs) for b in plan.beams for s in b.beamSegments))
    from importlib.metadata import version

    emit({"peer": "OpenTPS", "version": version("opentps-core"),
          "engine": "photon collapsed cone (C++ engine, per beamlet)",
          "import_s": import_s, "setup_s": setup_s, "compute_s": compute_s, "compute_cpu_s": compute_cpu_s,
          "peak_rss_mib": peak_rss_mib(), "n_voxels": int(np.prod(case["hu"].shape)),
          "n_beamlets": n_beamlets, "max_dose": float(np.max(dose.imageArray)), "beamlet_mm": step})


if __name__ == "__main__":
    main(sys.argv[1])
