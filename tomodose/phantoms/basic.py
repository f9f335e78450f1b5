"""Simple test phantoms: water box, slab phantom, cylinder with density inserts.

All phantoms are centred on the LPS origin (the natural isocentre), are head-first supine
(HFS) and return a :class:`~tomodose.geometry.patient.PatientModel` whose CT is in HU (air
outside the phantom is -1000 HU). Optional Gaussian HU noise (``noise_hu``, standard deviation)
is drawn from ``numpy.random.default_rng(seed)`` inside the phantom only, so a phantom is a
pure function of its parameters.
"""

from __future__ import annotations

import numpy as np

from tomodose._validate import check_finite_scalar, check_nonnegative, check_positive, check_vector
from tomodose.geometry.grid import Grid, ImageVolume
from tomodose.geometry.patient import PatientModel
from tomodose.geometry.structures import Structure, StructureSet
from tomodose.phantoms.materials import material_hu

__all__ = ["water_box", "slab_phantom", "cylinder_phantom", "DEFAULT_SLAB_LAYERS", "DEFAULT_CYLINDER_INSERTS"]

#: Default slab stack from the anterior surface: (material, thickness in mm).
DEFAULT_SLAB_LAYERS = (("water", 30.0), ("lung", 70.0), ("water", 20.0), ("bone", 20.0), ("water", 60.0))

#: Default cylinder inserts: (material, angle_deg, radius_mm, diameter_mm); the angle is measured
#: in the axial plane from +x (patient left) towards +y (posterior).
DEFAULT_CYLINDER_INSERTS = (
    ("lung", 0.0, 80.0, 30.0),
    ("adipose", 90.0, 80.0, 30.0),
    ("bone", 180.0, 80.0, 30.0),
    ("air", 270.0, 80.0, 30.0),
)


def _spacing(spacing_mm) -> tuple[float, float, float]:
    if np.ndim(spacing_mm) == 0:
        s = check_positive("spacing_mm", spacing_mm)
        return (s, s, s)
    return check_vector("spacing_mm", spacing_mm, positive=True)


def _size3(name: str, size_mm) -> tuple[float, float, float]:
    if np.ndim(size_mm) == 0:
        s = check_positive(name, size_mm)
        return (s, s, s)
    return check_vector(name, size_mm, positive=True)


def _add_noise(hu: np.ndarray, inside: np.ndarray, noise_hu: float, seed: int) -> np.ndarray:
    noise_hu = check_nonnegative("noise_hu", noise_hu)
    if noise_hu > 0:
        rng = np.random.default_rng(_seed(seed))
        noise = rng.normal(0.0, noise_hu, size=hu.shape)
        hu = np.where(inside, hu + noise, hu)
        hu = np.clip(hu, -1000.0, None)
    return hu


def _seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _model(grid: Grid, hu: np.ndarray, structures: list[Structure], name: str) -> PatientModel:
    ct = ImageVolume(grid, hu.astype(np.float32), "HU", "ct_number")
    return PatientModel(ct, StructureSet(grid, structures), patient_position="HFS", name=name)


def water_box(size_mm=(200.0, 200.0, 200.0), spacing_mm=2.5, *, air_margin_mm: float = 0.0,
              hu: float = 0.0, noise_hu: float = 0.0, seed: int = 0, name: str = "water_box") -> PatientModel:
    """A homogeneous box (water by default) centred on the origin.

    Parameters
    ----------
    size_mm : float or (3,) float
        Box size (x, y, z) in mm.
    spacing_mm : float or (3,) float
        Voxel size in mm. The box covers ``round(size / spacing)`` voxels per axis.
    air_margin_mm : float
        Air (-1000 HU) added around the box on every side (mm), rounded up to whole voxels.
    hu : float or str
        CT number of the box (HU) or a material name (default water, 0 HU).
    noise_hu : float
        Standard deviation of Gaussian HU noise inside the box (default 0).
    seed : int
        Seed of the noise.

    Returns
    -------
    PatientModel
        Structures: ``"Body"`` (the box).
    """
    size = np.array(_size3("size_mm", size_mm))
    spacing = np.array(_spacing(spacing_mm))
    margin = check_nonnegative("air_margin_mm", air_margin_mm)
    value = material_hu(hu)
    n_box = np.maximum(1, np.round(size / spacing).astype(int))
    n_margin = np.ceil(margin / spacing - 1e-9).astype(int)  # at least air_margin_mm of air
    n = n_box + 2 * n_margin
    origin = -0.5 * (n - 1) * spacing
    grid = Grid(shape=(int(n[2]), int(n[1]), int(n[0])), spacing_mm=tuple(spacing), origin_mm=tuple(origin))
    inside = np.zeros(grid.shape, bool)
    mz, my, mx = n_margin[2], n_margin[1], n_margin[0]
    inside[mz:mz + n_box[2], my:my + n_box[1], mx:mx + n_box[0]] = True
    ct = np.where(inside, value, -1000.0)
    ct = _add_noise(ct, inside, noise_hu, seed)
    return _model(grid, ct, [Structure("Body", grid, inside, role="external")], name)


def slab_phantom(layers=DEFAULT_SLAB_LAYERS, lateral_size_mm=(300.0, 300.0), spacing_mm=2.5, *,
                 air_margin_mm: float = 10.0, noise_hu: float = 0.0, seed: int = 0,
                 name: str = "slab") -> PatientModel:
    """A stack of slabs perpendicular to the anterior-posterior (y) axis.

    For a head-first supine patient the gantry-0 beam enters the anterior (-y) surface, so
    depth along +y is the depth of that beam. Layer boundaries are placed at exact voxel edges
    when the thicknesses are multiples of the y spacing.

    Parameters
    ----------
    layers : sequence of (material, thickness_mm)
        From the anterior surface; material is a name of
        :data:`~tomodose.phantoms.materials.MATERIAL_HU` or a CT number. Default: water 30 mm,
        lung 70 mm, water 20 mm, bone 20 mm, water 60 mm (200 mm in all).
    lateral_size_mm : (2,) float
        Size of the slabs along x (left-right) and z (superior-inferior), mm.
    spacing_mm : float or (3,) float
    air_margin_mm : float
        Air around the stack on every side (mm).

    Returns
    -------
    PatientModel
        Structures: ``"Body"`` and one per distinct non-water material, named after it
        capitalised (``"Lung"``, ``"Bone"``, ...; numeric materials: ``"Slab_<HU>HU"``).
        The anterior surface lies at ``y = -total_thickness / 2``; a layer starting at depth
        ``d`` (mm, the sum of the thicknesses before it) starts at ``y = -total / 2 + d``.
    """
    spacing = np.array(_spacing(spacing_mm))
    lat = check_vector("lateral_size_mm", lateral_size_mm, length=2, positive=True)
    margin = check_nonnegative("air_margin_mm", air_margin_mm)
    try:
        parsed = [(mat, check_positive(f"layers[{i}] thickness_mm", t)) for i, (mat, t) in enumerate(layers)]
    except (TypeError, ValueError) as exc:
        if "thickness_mm" in str(exc):
            raise
        raise ValueError(f"layers must be a sequence of (material, thickness_mm) pairs, got {layers!r}") from None
    if not parsed:
        raise ValueError("layers must hold at least one (material, thickness_mm) pair, got none")
    values = [material_hu(m) for m, _ in parsed]
    total = sum(t for _, t in parsed)
    extent = np.array([lat[0], total, lat[1]]) + 2 * margin
    n = np.maximum(1, np.round(extent / spacing).astype(int))
    origin = -0.5 * (n - 1) * spacing
    grid = Grid(shape=(int(n[2]), int(n[1]), int(n[0])), spacing_mm=tuple(spacing), origin_mm=tuple(origin))
    x, y, z = grid.meshgrid_mm()
    in_xz = (np.abs(x) <= 0.5 * lat[0]) & (np.abs(z) <= 0.5 * lat[1])
    y0 = -0.5 * total
    ct = np.full(grid.shape, -1000.0)
    body = np.zeros(grid.shape, bool)
    groups: dict[str, np.ndarray] = {}
    depth = 0.0
    for (mat, t), value in zip(parsed, values):
        in_layer = in_xz & (y >= y0 + depth) & (y < y0 + depth + t)
        ct[in_layer] = value
        body |= in_layer
        if value != 0.0:
            key = mat.strip().capitalize() if isinstance(mat, str) else f"Slab_{value:g}HU"
            groups[key] = groups.get(key, np.zeros(grid.shape, bool)) | in_layer
        depth += t
    ct = _add_noise(ct, body, noise_hu, seed)
    structures = [Structure("Body", grid, body, role="external")]
    structures += [Structure(k, grid, m, role="insert") for k, m in groups.items()]
    return _model(grid, ct, structures, name)


def cylinder_phantom(diameter_mm: float = 300.0, length_mm: float = 150.0, spacing_mm=2.5, *,
                     inserts=DEFAULT_CYLINDER_INSERTS, background="water", air_margin_mm: float = 10.0,
                     noise_hu: float = 0.0, seed: int = 0, name: str = "cylinder") -> PatientModel:
    """A water cylinder along the z (superior-inferior) axis with cylindrical density inserts.

    Parameters
    ----------
    diameter_mm, length_mm : float
        Cylinder size (mm).
    inserts : sequence of (material, angle_deg, radius_mm, diameter_mm)
        Rods parallel to z running the whole length; centre at ``radius_mm`` from the axis at
        ``angle_deg`` measured in the axial plane from +x (patient left) towards +y
        (posterior). Default: lung, adipose, bone and air rods of 30 mm at 80 mm radius.
    background : str or float
        Cylinder material (default water).

    Returns
    -------
    PatientModel
        Structures: ``"Body"`` and ``"Insert_<Material>"`` per insert (``"Insert_<k>"`` for
        numeric materials).
    """
    diameter = check_positive("diameter_mm", diameter_mm)
    length = check_positive("length_mm", length_mm)
    spacing = np.array(_spacing(spacing_mm))
    margin = check_nonnegative("air_margin_mm", air_margin_mm)
    bg = material_hu(background)
    extent = np.array([diameter, diameter, length]) + np.array([2 * margin, 2 * margin, 0.0])
    n = np.maximum(1, np.round(extent / spacing).astype(int))
    origin = -0.5 * (n - 1) * spacing
    grid = Grid(shape=(int(n[2]), int(n[1]), int(n[0])), spacing_mm=tuple(spacing), origin_mm=tuple(origin))
    x, y, z = grid.meshgrid_mm()
    r2 = x**2 + y**2
    body = np.broadcast_to((r2 <= (0.5 * diameter) ** 2) & (np.abs(z) <= 0.5 * length + 1e-9), grid.shape).copy()
    ct = np.where(body, bg, -1000.0)
    structures = [Structure("Body", grid, body, role="external")]
    used = set()
    for k, ins in enumerate(inserts):
        try:
            mat, angle, radius, d = ins
        except (TypeError, ValueError):
            raise ValueError(
                f"inserts[{k}] must be (material, angle_deg, radius_mm, diameter_mm), got {ins!r}"
            ) from None
        value = material_hu(mat)
        a = np.deg2rad(check_finite_scalar(f"inserts[{k}] angle_deg", angle))
        rad = check_nonnegative(f"inserts[{k}] radius_mm", radius)
        dia = check_positive(f"inserts[{k}] diameter_mm", d)
        if rad + 0.5 * dia > 0.5 * diameter:
            raise ValueError(
                f"inserts[{k}] must lie inside the cylinder: radius_mm + diameter_mm/2 = {rad + 0.5 * dia} "
                f"> cylinder radius {0.5 * diameter}"
            )
        cx, cy = rad * np.cos(a), rad * np.sin(a)
        m = body & ((x - cx) ** 2 + (y - cy) ** 2 <= (0.5 * dia) ** 2)
        ct[m] = value
        label = f"Insert_{mat.strip().capitalize()}" if isinstance(mat, str) else f"Insert_{k}"
        if label in used:
            label = f"{label}_{k}"
        used.add(label)
        structures.append(Structure(label, grid, m, role="insert"))
    ct = _add_noise(ct, body, noise_hu, seed)
    return _model(grid, ct, structures, name)
