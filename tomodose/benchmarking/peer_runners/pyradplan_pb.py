"""pyRadPlan photon pencil beam (SVD kernel, matRad port): influence matrix of one static beam.

Run by pyRadPlan's own Python: ``python pyradplan_pb.py CASE.npz``. Prints JSON (see package doc).
"""

import sys

from _common import Clock, emit, load_case, peak_rss_mib


def main(path):
    clock = Clock()
    import numpy as np
    import SimpleITK as sitk
    import pyRadPlan
    from pyRadPlan import PhotonPlan, calc_dose_influence, generate_stf, validate_ct
    from pyRadPlan.cst import ExternalVOI, Target, create_cst

    import_s, _ = clock.lap()
    case = load_case(path)
    clock = Clock()
    img = sitk.GetImageFromArray(np.ascontiguousarray(case["hu"], dtype=np.float64))  # [z, y, x]
    img.SetSpacing(case["spacing_mm"])
    img.SetOrigin(case["origin_mm"])
    ct = validate_ct({"cube_hu": img})

    def mask(a):
        m = sitk.GetImageFromArray(np.ascontiguousarray(a, dtype=np.uint8))
        m.CopyInformation(img)
        return m

    cst = create_cst([Target(name="PTV", mask=mask(case["target"]), ct_image=ct),
                      ExternalVOI(name="BODY", mask=mask(case["body"]), ct_image=ct)], ct=ct)
    pln = PhotonPlan(machine="Generic")
    pln.prop_stf = {"gantry_angles": [case["gantry_deg"]], "couch_angles": [0.0],
                    "bixel_width": case["bixel_mm"], "iso_center": [case["isocentre_mm"]]}
    dx, dy, dz = case["spacing_mm"]
    pln.prop_dose_calc = {"dose_grid": {"resolution": {"x": dx, "y": dy, "z": dz}}}
    stf = generate_stf(ct, cst, pln)
    setup_s, _ = clock.lap()
    clock = Clock()
    dij = calc_dose_influence(ct, cst, stf, pln)
    compute_s, compute_cpu_s = clock.lap()
    mat = dij.physical_dose.flat[0]
    emit({"peer": "pyRadPlan", "version": pyRadPlan.__version__, "engine": "photon SVD pencil beam (dij)",
          "import_s": import_s, "setup_s": setup_s, "compute_s": compute_s, "compute_cpu_s": compute_cpu_s,
          "peak_rss_mib": peak_rss_mib(), "n_voxels": int(np.prod(case["hu"].shape)),
          "n_beamlets": int(mat.shape[1]), "nnz": int(mat.nnz), "beamlet_mm": case["bixel_mm"]})


if __name__ == "__main__":
    main(sys.argv[1])
