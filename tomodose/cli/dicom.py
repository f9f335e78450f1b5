"""``tomodose dicom``: import CT + RT Structure Set (+ TomoTherapy plan), export RT Dose, inspect."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)

HELP = """\
DICOM in and out.

  import CTDIR [--rtstruct RS.dcm] [--rtplan RP.dcm] --out patient.h5
      Read a CT series (HU, LPS geometry; tilted, irregular or oblique series are refused
      unless --resample), rasterise the RT Structure Set on the CT grid (names mapped to the
      protocol names Body, Liver, GTV, PGTV, PTV, ProtectedLiver, SpinalCord, ... by aliases;
      extend them with --aliases FILE.toml), optionally import a helical TomoTherapy plan, and
      write a tomodose results file. The CT's frame of reference is stored with it, so that
      'export-dose' can refer to it later.

  export-dose results.h5 --out RD.dcm [--dose NAME] [--ct CTDIR]
      Write a dose of a results file as DICOM RT Dose (Gy, uint32 + DoseGridScaling, relative
      GridFrameOffsetVector), on the frame of reference of the imported CT (or of --ct CTDIR).

  info FILE [FILE ...]
      Summarise DICOM files: RT Plan (helical TomoTherapy), RT Dose, RT Structure Set.

Examples:
  tomodose dicom import CT/ --rtstruct RS.dcm --out patient.h5
  tomodose dicom export-dose results.h5 --out RD.dcm
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("dicom", help="import CT/RTSTRUCT/TomoTherapy plans, export RT Dose",
                              description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="dicom_command", metavar="ACTION")

    imp = sub.add_parser("import", help="CT series (+ RTSTRUCT, + RT Plan) -> results .h5",
                         description="Import a CT series, an RT Structure Set and a helical TomoTherapy "
                                     "RT Plan into a tomodose results file.")
    imp.add_argument("ct_dir", metavar="CTDIR", type=Path, help="folder holding the CT slices")
    imp.add_argument("--rtstruct", type=Path, metavar="RS.dcm", help="RT Structure Set drawn on the CT")
    imp.add_argument("--rtplan", type=Path, metavar="RP.dcm", help="helical TomoTherapy RT Plan")
    imp.add_argument("--out", type=Path, required=True, metavar="FILE.h5", help="results file to write")
    imp.add_argument("--series", metavar="UID", help="SeriesInstanceUID when CTDIR holds several series")
    imp.add_argument("--resample", action="store_true",
                     help="resample tilted, irregularly spaced or oblique CT series onto a regular grid")
    imp.add_argument("--slice-tolerance", type=float, default=0.01, metavar="MM",
                     help="allowed deviation of CT slice positions from a regular untilted stack (default 0.01 mm)")
    imp.add_argument("--aliases", type=Path, metavar="FILE.toml",
                     help="structure name aliases ([aliases] Canonical = [\"name\", ...]), added to the defaults")
    imp.add_argument("--drop-unmapped", action="store_true", help="leave out ROIs no alias matches")
    imp.add_argument("--no-frame-check", action="store_true",
                     help="accept an RTSTRUCT/plan whose frame of reference differs from the CT's")
    imp.add_argument("--supersample", type=int, metavar="N", help="in-plane supersampling of the rasteriser")
    imp.add_argument("--interpolation", choices=("auto", "shape", "slab"), default="auto",
                     help="between contour planes: shape-based, slab, or auto (shape for ROIs up to 1000 mL)")
    imp.add_argument("--end-shape", choices=("auto", "round", "straight"), default="auto",
                     help="end segments of shape-based interpolation")
    imp.add_argument("--patient-position", choices=("HFS", "HFP", "FFS", "FFP"),
                     help="override (or supply) the CT's PatientPosition")
    imp.add_argument("--gantry-period", type=float, metavar="S", help="gantry period (s) if the plan lacks it")
    imp.add_argument("--pitch", type=float, help="pitch if the plan lacks it")
    imp.set_defaults(func=run_import)

    exp = sub.add_parser("export-dose", help="dose of a results .h5 -> DICOM RT Dose",
                         description="Write a dose of a tomodose results file as DICOM RT Dose.")
    exp.add_argument("results", type=Path, metavar="RESULTS.h5", help="tomodose results file")
    exp.add_argument("--out", type=Path, required=True, metavar="RD.dcm", help="RT Dose file to write")
    exp.add_argument("--dose", metavar="NAME", help="dose name in the results file (default: the only one)")
    exp.add_argument("--ct", type=Path, metavar="CTDIR",
                     help="CT folder whose frame of reference / study / patient the dose refers to "
                          "(default: the reference stored by 'dicom import')")
    exp.add_argument("--series", metavar="UID", help="SeriesInstanceUID within --ct")
    exp.add_argument("--plan-uid", metavar="UID", help="SOPInstanceUID of the RT Plan to reference")
    exp.add_argument("--dose-type", choices=("PHYSICAL", "EFFECTIVE", "ERROR"), default="PHYSICAL")
    exp.set_defaults(func=run_export)

    info = sub.add_parser("info", help="summarise DICOM RT files", description="Summarise DICOM RT files.")
    info.add_argument("files", type=Path, nargs="+", metavar="FILE")
    info.set_defaults(func=run_info)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run_import(args) -> int:
    from tomodose.io.dicom import StructureAliases, read_patient, read_tomo_plan_info
    from tomodose.io.hdf5 import write_results

    aliases = StructureAliases.from_toml(args.aliases) if args.aliases else None
    model, series, names = read_patient(
        args.ct_dir, args.rtstruct, series_uid=args.series, resample=args.resample,
        tolerance_mm=args.slice_tolerance, aliases=aliases,
        keep_unmapped=not args.drop_unmapped, check_frame_of_reference=not args.no_frame_check,
        supersample=args.supersample, interpolation=args.interpolation, end_shape=args.end_shape,
        patient_position=args.patient_position,
    )
    plan = None
    plan_info = None
    if args.rtplan is not None:
        plan, plan_info = read_tomo_plan_info(args.rtplan, gantry_period_s=args.gantry_period, pitch=args.pitch,
                                              patient_position=None)
        ref_for = series.reference.frame_of_reference_uid
        if plan_info.frame_of_reference_uid and ref_for and plan_info.frame_of_reference_uid != ref_for:
            msg = (f"RT Plan {str(args.rtplan)!r} refers to frame of reference "
                   f"{plan_info.frame_of_reference_uid!r}, not the CT's {ref_for!r}")
            if not args.no_frame_check:
                raise ValueError(msg + " (pass --no-frame-check to import it anyway)")
            log.warning(msg)
        if plan.patient_position != model.patient_position:
            raise ValueError(f"plan patient position {plan.patient_position!r} differs from the CT's "
                             f"{model.patient_position!r}")
    extra = {"dicom_reference": series.reference.to_dict(),
             "dicom_import": {"ct_files": len(series.files), "resampled": int(series.resampled),
                              "notes": "; ".join(series.notes)}}
    if names:
        extra["dicom_structure_names"] = dict(names)
    if plan_info is not None:
        extra["dicom_plan"] = {"source": plan_info.source, "sop_instance_uid": plan_info.sop_instance_uid,
                               "beam_name": plan_info.beam_name, "notes": "; ".join(plan_info.notes)}
    write_results(args.out, patient=model, plan=plan, extra=extra)
    g = model.grid
    print(f"CT: {g.shape[2]} x {g.shape[1]} x {g.shape[0]} voxels of {g.spacing_mm[0]:.3g} x {g.spacing_mm[1]:.3g} x "
          f"{g.spacing_mm[2]:.3g} mm, origin {tuple(round(v, 3) for v in g.origin_mm)} mm (LPS), "
          f"{model.patient_position}{', resampled' if series.resampled else ''}")
    for original, name in names.items():
        s = model.structures[name]
        label = name if original == name else f"{name} <- {original!r}"
        print(f"  {label}: {s.volume_ml:.2f} mL ({s.role or 'no role'})")
    if plan is not None:
        print(f"plan: {plan.n_projections} projections, field width {plan.field_width_mm:g} mm, pitch "
              f"{plan.pitch:.4g}, gantry period {plan.gantry_period_s:.4g} s ({plan_info.source})")
    print(f"wrote {args.out}")
    return 0


def run_export(args) -> int:
    from tomodose.io.dicom import DicomReference, read_ct_reference, write_rtdose
    from tomodose.io.hdf5 import read_results

    res = read_results(args.results)
    if not res.doses:
        raise ValueError(f"results file {str(args.results)!r} holds no dose")
    if args.dose is None:
        if len(res.doses) > 1:
            raise ValueError(f"results file {str(args.results)!r} holds several doses {list(res.doses)}; "
                             f"choose one with --dose")
        name, dose = next(iter(res.doses.items()))
    else:
        if args.dose not in res.doses:
            raise KeyError(f"no dose named {args.dose!r} in {str(args.results)!r}; available: {list(res.doses)}")
        name, dose = args.dose, res.doses[args.dose]
    reference = None
    if args.ct is not None:
        reference = read_ct_reference(args.ct, series_uid=args.series)
    else:
        stored = res.extra.get("dicom_reference") if isinstance(res.extra, dict) else None
        if isinstance(stored, dict) and stored.get("frame_of_reference_uid"):
            fields = DicomReference.__dataclass_fields__
            reference = DicomReference(**{k: str(v) for k, v in stored.items() if k in fields})
        else:
            log.warning("no DICOM reference in %s and no --ct given: the RT Dose gets a new frame of reference",
                        args.results)
    if dose.unit != "Gy":
        raise ValueError(f"dose {name!r} is in {dose.unit!r}; RT Dose export needs Gy")
    path = write_rtdose(dose, args.out, reference=reference, dose_type=args.dose_type,
                        referenced_plan_uid=args.plan_uid, series_description=f"tomodose {name}"[:64])
    g = dose.grid
    print(f"wrote {path}: dose {name!r}, {g.shape[2]} x {g.shape[1]} x {g.shape[0]} voxels, max "
          f"{float(dose.array.max()):.4g} Gy"
          + (f", frame of reference {reference.frame_of_reference_uid}" if reference else ""))
    return 0


def run_info(args) -> int:
    from tomodose.io.dicom import DicomError, StructureAliases, read_rtdose_info, read_rtstruct, read_tomo_plan_info
    from tomodose.io.dicom._common import optional, read_dataset

    status = 0
    for path in args.files:
        try:
            ds = read_dataset(path, "DICOM", stop_before_pixels=True)
            modality = str(optional(ds, "Modality", str(path), ""))
            if modality == "RTPLAN":
                plan, info = read_tomo_plan_info(path)
                s = plan.summary()
                print(f"{path}: RT Plan ({info.source}), beam {info.beam_number} {info.beam_name!r}: "
                      f"{s['n_projections']} projections, width {s['field_width_mm']:g} mm, pitch {s['pitch']:.4g}, "
                      f"period {s['gantry_period_s']:.4g} s, {s['treatment_time_s']:.1f} s beam-on, MF "
                      f"{s['modulation_factor']:.3f}, {s['n_fractions']} fraction(s)")
            elif modality == "RTDOSE":
                vol, info = read_rtdose_info(path)
                g = vol.grid
                print(f"{path}: RT Dose {info.dose_type}/{info.summation_type}, grid {g.shape} (z, y, x), spacing "
                      f"{g.spacing_mm} mm, origin {g.origin_mm} mm, max {float(vol.array.max()):.4g} Gy")
            elif modality == "RTSTRUCT":
                rois = read_rtstruct(path)
                aliases = StructureAliases()
                print(f"{path}: RT Structure Set, {len(rois)} ROI(s)")
                for r in rois:
                    canonical = aliases.canonical(r.name)
                    print(f"  {r.number}: {r.name!r} -> {canonical or '(unmapped)'}, {r.n_contours} contour(s)")
            else:
                print(f"{path}: Modality {modality!r} (not an RT object; CT folders are read by 'import')")
        except (DicomError, FileNotFoundError) as exc:
            print(f"{path}: error: {exc}")
            status = 2
    return status
