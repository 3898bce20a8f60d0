"""``emit_mask``: the one call a host author adds after applying a mask.

::

    subset[name].weight.data[W_mask] = 0
    emit_mask(f"model.layers.{i}.{name}", subset[name], W_mask)      # optima_plugin.host.emit_mask

It calls the ``optima_mask_emitted`` hook (``pm.hook.optima_mask_emitted(...)``);
the first plugin that answers (the OPTIMA plugin, registered by
:func:`optima_plugin.host.install` or ``optima-host``) gives the layer's new weights,
which are written into ``module.weight`` (its dtype and device, pruned entries 0).
Under an installed seam the dense weights and the input Hessian come from the seam
when not passed.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..hessian import layer_shrink, shrink_to_diagonal
from ..plugins import get_plugin_manager


def emit_mask(name: str, module: nn.Module, pruned: Tensor, hessian: Optional[Tensor] = None,
              dense_weight: Optional[Tensor] = None) -> Optional[Tensor]:
    """Announce that the host applied ``pruned`` (bool ``r x d``, True = pruned) to ``module.weight``.

    Args:
        name: the layer's name (reports and logs).
        module: the linear layer, its mask already applied.
        pruned: the mask.
        hessian: ``d x d`` mean of ``x xᵀ`` over the layer's calibration inputs
            (from the seam when installed and not given).
        dense_weight: the weights before the mask (from the seam when installed: its copy of the
            block, taken at the host's first call of it, or the checkpoint's safetensors).

    Returns:
        ``module.weight`` after the plugins' answer was written, or None when no
        plugin answered (the host's weights stay).
    """
    from .install import active_options, active_seam

    pruned = pruned.to(dtype=torch.bool)
    seam = active_seam()
    found = seam.find(module) if seam is not None else None
    if found is not None:
        seam.emit(*found, hessian=hessian, pruned=pruned, dense=dense_weight)
        return module.weight
    if dense_weight is None:
        raise ValueError(f"emit_mask({name!r}): pass dense_weight= (the weights before the mask), or run the "
                         "host under optima-host / after optima_plugin.host.install() so the seam has them")
    options = active_options()
    if hessian is not None and options is not None:  # as the seam does (--hessian_shrink)
        hessian = shrink_to_diagonal(hessian, layer_shrink(options.hessian_shrink, float(pruned.float().mean())))
    answer = get_plugin_manager().hook.optima_mask_emitted(name=name, module=module, pruned=pruned,
                                                           hessian=hessian, dense_weight=dense_weight)
    if answer is None:
        return None
    weight = module.weight
    with torch.no_grad():
        weight.data.copy_(answer.to(device=weight.device, dtype=weight.dtype).masked_fill(pruned.to(weight.device), 0))
    return weight
