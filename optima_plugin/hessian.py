"""Streaming input Hessians ``H = mean x xᵀ`` through forward hooks (no stored activations).

The hooks are registered and removed by :func:`optima_plugin.pipeline.hooked`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class HessianAccumulator:
    """Running mean of ``x xᵀ`` over the tokens seen by one linear layer.

    ``hessian`` is ``d x d`` in ``dtype`` (float32 by default) on the layer's device.
    """

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        self.dtype = dtype
        self.hessian: Tensor | None = None
        self.tokens = 0

    def add(self, x: Tensor) -> None:
        """Add a batch of inputs ``(..., d)``."""
        x = x.detach().reshape(-1, x.shape[-1]).to(self.dtype)
        k = x.shape[0]
        if k == 0:
            return
        if self.hessian is None:
            self.hessian = torch.zeros(x.shape[1], x.shape[1], dtype=self.dtype, device=x.device)
        n = self.tokens
        self.hessian.addmm_(x.T, x, beta=n / (n + k), alpha=1.0 / (n + k))
        self.tokens = n + k

    def hook(self, module: nn.Module, inputs: tuple, output) -> None:
        """``register_forward_hook`` callback: accumulate the module's first input."""
        self.add(inputs[0])

