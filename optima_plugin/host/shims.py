"""Compatibility shims that let an unmodified host script run in this process.

Each shim is small and named; ``optima-host --no_shim NAME`` turns one off.

* ``cuda_on_cpu`` (only when no CUDA GPU is present): the hosts hard-code CUDA
  (``torch.device("cuda:0")``, ``.cuda()``, ``.to("cuda")``, ``device=dev`` with
  ``dev = "cuda"``). A :class:`~torch.overrides.TorchFunctionMode` rewrites every
  CUDA device argument of a torch function, factory or tensor method to the CPU
  (``Tensor.cuda()`` returns the tensor), ``from_pretrained(device_map="cuda"/0)``
  loads on the CPU, and ``torch.cuda.synchronize``/``empty_cache`` do nothing.
* ``hf_device_map``: transformers 5 sets ``model.hf_device_map`` only when the
  ``device_map`` spans several devices; the hosts read it (``"model.embed_tokens" in
  model.hf_device_map``), so a model loaded with a ``device_map`` and without one
  gets ``{"": its device}``.
* ``position_embeddings``: transformers ≥ 4.48 decoder layers need the rotary
  ``(cos, sin)`` pair, which the hosts' calibration ``Catcher`` (Wanda, OWL,
  AlphaPruning) does not record; a block called without it gets it from the
  model's ``rotary_emb`` and the call's ``position_ids`` (``0..n-1`` if absent).
* ``tuple_outputs``: recent transformers decoder layers return the hidden states
  as a tensor, not a tuple; a block the host calls directly returns ``(hidden,)``
  again, so the hosts' ``layer(...)[0]`` is the whole batch, as they were written for.

* ``removed_imports``: OWL's ``main.py`` imports, for fine-tuning code the pruning
  run never reaches, names that current libraries removed
  (``huggingface_hub.Repository``, ``transformers.utils.get_full_repo_name`` and
  ``send_example_telemetry``); each missing one gets a placeholder that raises on use.

Two shims act only when asked for:

* ``--host_seqlen N`` pins ``model.seqlen`` (the hosts set it to
  ``max_position_embeddings`` or 2048, the length of every calibration and
  evaluation window) to ``N``; the model and its config are untouched.
* ``--host_dtype D`` loads the model in ``D`` instead of the host's hard-coded
  float16 (half-precision matmuls are several times slower than float32 on CPUs).
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..models import ModelAdapter

log = logging.getLogger(__name__)

SHIMS = ("cuda_on_cpu", "hf_device_map", "position_embeddings", "tuple_outputs", "removed_imports")

_CUDA = re.compile(r"^cuda(:\d+)?$")
_CPU = torch.device("cpu")


def _is_cuda(value: Any) -> bool:
    if isinstance(value, str):
        return bool(_CUDA.match(value))
    return isinstance(value, torch.device) and value.type == "cuda"


def _to_cpu(value: Any) -> Any:
    return _CPU if _is_cuda(value) else value


class CudaOnCpu(TorchFunctionMode):
    """Run code written for CUDA on the CPU: every CUDA device argument becomes ``cpu``."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        args = tuple(_to_cpu(a) for a in args)
        if "device" in kwargs:
            kwargs = dict(kwargs, device=_to_cpu(kwargs["device"]))
        return func(*args, **kwargs)


def leave_mode(mode: TorchFunctionMode) -> None:
    """Take ``mode`` off torch's function-mode stack wherever it is (``mode.__exit__`` pops the top,
    which is another mode when the host left its own entered): the modes above it stay, in order."""
    from torch.overrides import _get_current_function_mode_stack, _pop_mode, _push_mode

    stack = _get_current_function_mode_stack()
    if not any(m is mode for m in stack):
        return
    above = []
    while True:
        top = _pop_mode()
        if top is mode:
            break
        above.append(top)
    for m in reversed(above):
        _push_mode(m)
    if above:
        log.warning("optima-host: the host left %d torch function mode(s) entered (%s); they stay, the CUDA "
                    "shim is removed from under them", len(above), ", ".join(type(m).__name__ for m in above))


def cpu_device_map(device_map: Any) -> Any:
    """``from_pretrained``'s ``device_map`` with CUDA devices (names, ``torch.device``, GPU indices) on the CPU."""
    if isinstance(device_map, int) and not isinstance(device_map, bool):
        return "cpu"
    if isinstance(device_map, dict):
        return {k: cpu_device_map(v) for k, v in device_map.items()}
    if _is_cuda(device_map):
        return "cpu"
    return device_map


def pin_seqlen(model: nn.Module, seqlen: int) -> None:
    """Make ``model.seqlen`` read ``seqlen`` whatever the host assigns to it.

    The model's class is replaced by a subclass of the same name whose ``seqlen``
    is a property that ignores assignments (``save_pretrained`` is unaffected).
    """
    cls = type(model)
    pinned = type(cls.__name__, (cls,), {
        "seqlen": property(lambda self: seqlen, lambda self, value: None),
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
    })
    model.__class__ = pinned


class CallDepth:
    """How deep the process is inside whole-model forwards.

    Blocks called while ``depth == 0`` are called by the host's own pruning loop
    (a *standalone* call); inside a model forward they are evaluation or calibration
    capture. ``entered`` callbacks run when a top-level forward starts (depth 1).
    The post-hook runs even when the forward raises (the hosts' ``Catcher``).
    """

    def __init__(self) -> None:
        self.depth = 0
        self.entered: list[Callable[[nn.Module], None]] = []

    @property
    def standalone(self) -> bool:
        return self.depth == 0

    def attach(self, modules: list[nn.Module]) -> list:
        def pre(module, args, kwargs):
            self.depth += 1
            if self.depth == 1:
                try:
                    for callback in self.entered:
                        callback(module)
                except BaseException:
                    self.depth -= 1
                    raise

        def post(module, args, kwargs, output):
            self.depth -= 1

        handles = []
        for m in modules:
            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(m.register_forward_hook(post, with_kwargs=True, always_call=True))
        return handles


def add_position_embeddings(adapter: ModelAdapter) -> list:
    """Forward pre-hooks giving blocks called without ``position_embeddings`` the model's rotary pair."""
    rotary = getattr(adapter.base, "rotary_emb", None)
    if rotary is None:
        return []

    def pre(module, args, kwargs):
        if kwargs.get("position_embeddings") is not None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = torch.arange(hidden.shape[-2], device=hidden.device).unsqueeze(0)
        with torch.no_grad():
            cos, sin = rotary(hidden, positions.to(hidden.device))
        return args, dict(kwargs, position_embeddings=(cos.to(hidden.device), sin.to(hidden.device)))

    return [block.register_forward_pre_hook(pre, with_kwargs=True) for block in adapter.blocks]


def tuple_outputs(adapter: ModelAdapter, calls: CallDepth) -> list:
    """Forward hooks making blocks the host calls directly return ``(hidden,)`` instead of a tensor."""

    def post(module, args, output):
        if calls.standalone and torch.is_tensor(output):
            return (output,)
        return None

    return [block.register_forward_hook(post) for block in adapter.blocks]


@dataclass
class LoadOptions:
    """How ``from_pretrained`` is adjusted in the host process.

    Attributes:
        cpu_only: map CUDA ``device_map`` values to the CPU.
        dtype: load in this dtype instead of the host's (None: the host's).
        seqlen: pin ``model.seqlen`` (None: the host's).
        device_map: give a model loaded with a ``device_map`` a single-device ``hf_device_map``.
        loaded: callbacks run on every loaded model, in order.
    """

    cpu_only: bool = False
    dtype: Optional[torch.dtype] = None
    seqlen: Optional[int] = None
    device_map: bool = True
    loaded: list = field(default_factory=list)

    def adjust(self, kwargs: dict) -> dict:
        kwargs = dict(kwargs)
        if self.cpu_only and "device_map" in kwargs:
            kwargs["device_map"] = cpu_device_map(kwargs["device_map"])
        if self.dtype is not None:
            kwargs.pop("torch_dtype", None)
            kwargs["dtype"] = self.dtype
        return kwargs


def patch_from_pretrained(options: LoadOptions) -> Callable[[], None]:
    """Wrap ``PreTrainedModel.from_pretrained`` with ``options``; return the function that undoes it."""
    from transformers import PreTrainedModel

    original = PreTrainedModel.__dict__["from_pretrained"]

    @functools.wraps(original.__func__)
    def from_pretrained(cls, *args, **kwargs):
        model = original.__func__(cls, *args, **options.adjust(kwargs))
        if options.device_map and kwargs.get("device_map") is not None and not hasattr(model, "hf_device_map"):
            model.hf_device_map = {"": str(next(model.parameters()).device)}
        if options.seqlen is not None:
            pin_seqlen(model, options.seqlen)
        for callback in options.loaded:
            callback(model)
        return model

    PreTrainedModel.from_pretrained = classmethod(from_pretrained)

    def undo() -> None:
        PreTrainedModel.from_pretrained = original

    return undo


def quiet_cuda_calls() -> Callable[[], None]:
    """Make ``torch.cuda.synchronize`` and ``torch.cuda.empty_cache`` no-ops; return the undo function."""
    saved = {name: getattr(torch.cuda, name) for name in ("synchronize", "empty_cache")}
    for name in saved:
        setattr(torch.cuda, name, lambda *args, **kwargs: None)

    def undo() -> None:
        for name, fn in saved.items():
            setattr(torch.cuda, name, fn)

    return undo


#: (module, name) pairs some hosts import and current libraries no longer have.
REMOVED_IMPORTS = (("huggingface_hub", "Repository"), ("transformers.utils", "get_full_repo_name"),
                   ("transformers.utils", "send_example_telemetry"))


def _removed(module: str, name: str):
    def placeholder(*args, **kwargs):
        raise ImportError(f"{module}.{name} no longer exists in the installed version; optima-host only lets "
                          "the host import it")

    placeholder.__name__ = name
    return placeholder


def removed_imports() -> Callable[[], None]:
    """Give each missing name of :data:`REMOVED_IMPORTS` a placeholder raising on use; return the undo function."""
    import importlib

    added = []
    for module_name, name in REMOVED_IMPORTS:
        module = importlib.import_module(module_name)
        if not hasattr(module, name):
            setattr(module, name, _removed(module_name, name))
            added.append((module, name))

    def undo() -> None:
        for module, name in added:
            delattr(module, name)

    return undo
