"""Input and output: HDF5 results files, image export (MHA/NRRD/NIfTI), DICOM (``tomodose.io.dicom``).

Import the submodules directly (``from tomodose.io.hdf5 import write_results``); this package
imports nothing heavy by itself, so ``tomodose.io.dicom`` (which needs pydicom) stays optional.
"""

__all__ = ["hdf5", "export"]
