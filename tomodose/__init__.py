"""tomodose: dose engine for helical tomotherapy.

The package is laid out as the dose pipeline, data flowing one way:

``geometry`` -> ``delivery`` (machine and plan) -> ``terma`` -> ``transport``
(collapsed cone / pencil beam) -> ``dose`` -> ``evaluation`` -> ``io`` / ``report``.

numba kernels live in the private package ``tomodose._kernels``.
"""

from __future__ import annotations

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

from tomodose.geometry.grid import Grid, ImageVolume  # noqa: E402

__all__ = ["Grid", "ImageVolume", "__version__"]
