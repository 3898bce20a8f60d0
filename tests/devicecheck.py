"""Device checking without a GPU: CPU tensors that stand for accelerator tensors.

:class:`FakeCuda` is a CPU tensor that reports ``device`` as ``cuda``; ops on it return ``FakeCuda`` tensors.
Under :class:`DeviceCheck`, a tensor created with ``device=<a FakeCuda tensor's device>`` (``torch.zeros(d,
device=w.device)``, ``x.to(w.device)``) is a ``FakeCuda`` tensor too (made on the CPU), and every op that meets
both a ``FakeCuda`` tensor and a plain CPU tensor of one or more dimensions is recorded: on a GPU that op would
raise (or copy host memory each call), e.g. ``torch.eye(d)`` without ``device=`` used with the layer's weights.
A plain CPU scalar (0-dim) meeting a GPU tensor is allowed, as PyTorch allows it. ``.numpy()`` of a
``FakeCuda`` tensor is recorded too (a GPU tensor has none).
"""
from __future__ import annotations

import traceback
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

CUDA = torch.device("cuda")
_DEVICE_GET = torch.Tensor.device.__get__
_GRAD_GET = torch.Tensor.grad.__get__  # autograd fills .grad with plain tensors: a FakeCuda one has FakeCuda grads


class FakeCuda(torch.Tensor):
    """A CPU tensor that stands for one on ``cuda`` (its ``device`` says so; see :class:`DeviceCheck`)."""


def fake(t: torch.Tensor) -> FakeCuda:
    """``t`` as a :class:`FakeCuda` tensor (the same storage)."""
    return t.as_subclass(FakeCuda)


def _is_cuda(x: Any) -> bool:
    return (isinstance(x, torch.device) and x.type == "cuda") or (isinstance(x, str) and x.startswith("cuda"))


def _to_cpu(x: Any) -> Any:
    return torch.device("cpu") if _is_cuda(x) else x


class DeviceCheck(TorchFunctionMode):
    """Records (in ``mixed``) every op that meets a :class:`FakeCuda` tensor and a plain CPU tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.mixed: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func == _DEVICE_GET and isinstance(args[0], FakeCuda):
            return CUDA
        leaves = tree_flatten((args, kwargs))[0]
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        tagged = any(isinstance(x, FakeCuda) for x in tensors)
        plain = [tuple(x.shape) for x in tensors if not isinstance(x, FakeCuda) and x.dim() > 0]
        to_cuda = any(_is_cuda(x) for x in leaves)
        name = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
        if tagged and (plain or name in ("Tensor.numpy",)):
            where = "".join(traceback.format_stack(limit=8)[:-1])
            self.mixed.append(f"{name}: a cuda tensor met cpu tensor(s) of shape {plain}\n{where}")
        if to_cuda:
            args, kwargs = tree_map(_to_cpu, args), tree_map(_to_cpu, kwargs)
        out = func(*args, **kwargs)
        if (to_cuda and not tagged) or (func == _GRAD_GET and tagged):
            out = tree_map(lambda x: fake(x) if type(x) is torch.Tensor else x, out)
        return out
