"""Energy transport from TERMA to dose: collapsed-cone convolution/superposition.

* :mod:`tomodose.transport.kernels` - polyenergetic point kernels collapsed onto cones
  (:class:`CollapsedConeKernel`, :func:`load_kernel`).
* :mod:`tomodose.transport.collapsed_cone` - :func:`collapsed_cone_dose`, the transport of TERMA
  along cone lines with density scaling and kernel tilting.
"""

from tomodose.transport.kernels import CollapsedConeKernel, load_kernel
from tomodose.transport.collapsed_cone import collapsed_cone_dose

__all__ = ["CollapsedConeKernel", "load_kernel", "collapsed_cone_dose"]
