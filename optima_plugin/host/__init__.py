"""OPTIMA inside host codebases (Wanda, TRIM, OWL, AlphaPruning) without porting them.

* ``optima-host main.py [host args] --weight_update optima`` (:mod:`.launcher`) runs the
  host's own script with the plugin installed;
* :func:`install` does the same from Python (shims, dataset routing, the seam, the plugin);
* :func:`emit_mask` is the one explicit hook call a host author may add after applying a mask;
* :class:`OptimaMaskPlugin` is the OPTIMA implementation of the ``optima_mask_emitted`` hook;
* :class:`HostSeam` (:mod:`.seam`) finds the masks of an unmodified host loop through hooks.

See ``integrations/`` for each host's command lines and limits.
"""

from .emit import emit_mask
from .install import HostOptions, Installation, active_seam, install
from .plugin import OptimaMaskPlugin
from .seam import HostSeam, SeamSettings

__all__ = ["HostOptions", "HostSeam", "Installation", "OptimaMaskPlugin", "SeamSettings", "active_seam",
           "emit_mask", "install"]
