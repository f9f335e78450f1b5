"""``tomodose phantom``: build a synthetic phantom, write it to HDF5, print structure volumes."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from tomodose.phantoms.config import NAMED_CONFIGS, load_phantom

log = logging.getLogger(__name__)

#: CLI kind -> named configuration used when no --config is given.
DEFAULT_CONFIG = {"liver": "liver_default", "water": "water_box", "slab": "slab", "cylinder": "cylinder"}
_BUILDER = {"liver": "liver", "water": "water", "slab": "slab", "cylinder": "cylinder"}

HELP = """\
Build a synthetic phantom and write it to an HDF5 results file (CT in HU, structures as
occupancy masks, grid in DICOM patient LPS mm, head-first supine).

kinds:
  liver     abdominal phantom: body, liver, GTV, PGTV (GTV+5 mm), PTV (GTV+10 mm), protected
            liver, spinal cord, vertebra, kidneys, stomach, bowel, heart, lungs, oesophagus
  water     water box;  slab  water/lung/bone slabs;  cylinder  water cylinder with inserts

Units: lengths and spacing in mm, CT numbers in HU, volumes printed in mL (= cm3).
Without --config the named configuration in phantoms/ is used (liver -> liver_default.toml,
water -> water_box.toml, slab -> slab.toml, cylinder -> cylinder.toml).
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "phantom", help="build a synthetic phantom (liver, water, slab, cylinder) and write HDF5",
        description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("kind", choices=sorted(DEFAULT_CONFIG), help="phantom type")
    p.add_argument("--config", metavar="FILE.toml",
                   help="TOML configuration (see phantoms/README.md); its builder must match KIND")
    p.add_argument("--spacing-mm", type=float, metavar="MM", help="voxel size in mm (overrides the configuration)")
    p.add_argument("--seed", type=int, help="seed of the HU noise (overrides the configuration)")
    p.add_argument("--out", metavar="FILE.h5", help="output HDF5 file (default: <name>.h5 in the current folder)")
    p.add_argument("--export-mha", metavar="DIR",
                   help="also write ct.mha and one <structure>.mha mask per structure into DIR")
    p.set_defaults(func=run)


def run(args) -> int:
    from tomodose.io.hdf5 import write_results

    source = args.config or DEFAULT_CONFIG[args.kind]
    if args.config:
        from tomodose.phantoms.config import phantom_config

        builder = phantom_config(args.config)["phantom"]["builder"]
        if builder != _BUILDER[args.kind]:
            raise ValueError(f"--config {args.config!r} builds a {builder!r} phantom, not {args.kind!r}")
    elif source not in NAMED_CONFIGS:  # pragma: no cover - registry is static
        raise ValueError(f"no default configuration for {args.kind!r}")
    overrides = {}
    if args.spacing_mm is not None:
        overrides["spacing_mm"] = args.spacing_mm
    if args.seed is not None:
        overrides["seed"] = args.seed
    model = load_phantom(source, **overrides)
    out = Path(args.out) if args.out else Path(f"{model.name or args.kind}.h5")
    write_results(out, patient=model)

    g = model.grid
    print(f"phantom {model.name!r} ({args.kind}), {model.patient_position}, grid {g.nx} x {g.ny} x {g.nz} voxels "
          f"(x, y, z) of {g.spacing_mm[0]:g} x {g.spacing_mm[1]:g} x {g.spacing_mm[2]:g} mm, "
          f"origin {tuple(round(v, 2) for v in g.origin_mm)} mm (LPS)")
    width = max([len("structure")] + [len(n) for n in model.structures])
    print(f"{'structure':<{width}}  {'volume_mL':>10}")
    for name, vol in model.structure_volumes_ml().items():
        print(f"{name:<{width}}  {vol:>10.1f}")
    if "Liver" in model.structures and "GTV" in model.structures:
        normal = model.structures["Liver"].minus(model.structures["GTV"]).volume_ml
        print(f"{'Liver-GTV':<{width}}  {normal:>10.1f}")
    print(f"wrote {out}")

    if args.export_mha:
        from tomodose.io.export import export_structure, export_volume

        folder = Path(args.export_mha)
        folder.mkdir(parents=True, exist_ok=True)
        export_volume(model.ct, folder / "ct.mha")
        for name, s in model.structures.items():
            safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
            export_structure(s, folder / f"{safe}.mha")
        print(f"exported ct.mha and {len(model.structures)} structure masks to {folder}")
    return 0
