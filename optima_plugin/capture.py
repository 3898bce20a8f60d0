"""Capture block-0 inputs and every block's own call kwargs; run one block.

Blocks are not all called alike: Gemma 2/3 alternate sliding-window and full
attention masks (and Gemma 3 rotary embeddings), so each block's kwargs are
recorded during one pass of the base model in which every block is bypassed (its
weights are never read, so they may still be on disk), with ``use_cache=False``
and no cache object kept. The LM head is never run (the base model is called).
Only the modules outside the blocks are moved to the device for that pass.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from .models import ModelAdapter

_DROP = {"past_key_value", "past_key_values", "layer_past", "use_cache", "output_attentions"}


def kwargs_to(value: Any, device: torch.device) -> Any:
    """Move tensors (also inside tuples, lists and dicts) to ``device``."""
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(kwargs_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: kwargs_to(v, device) for k, v in value.items()}
    return value


def _clean(kwargs: dict) -> dict:
    out = {k: v for k, v in kwargs.items() if k not in _DROP and k != "hidden_states"}
    out["use_cache"] = False
    return out


def _outside(module: nn.Module, blocks: nn.Module) -> Iterator[nn.Module]:
    """The largest submodules of ``module`` that hold no part of ``blocks``."""
    for child in module.children():
        if child is blocks:
            continue
        if any(m is blocks for m in child.modules()):
            yield from _outside(child, blocks)
        else:
            yield child


@contextmanager
def non_blocks_on(adapter: ModelAdapter, device: torch.device, root: nn.Module | None = None) -> Iterator[None]:
    """Move the modules of ``root`` (default: the base model) outside the blocks to ``device``, then back."""
    moved = []
    for child in _outside(adapter.base if root is None else root, adapter.blocks):
        tensors = list(child.parameters()) + list(child.buffers())
        if tensors and tensors[0].device != device:
            moved.append((child, tensors[0].device))
            child.to(device)
    try:
        yield
    finally:
        for child, dev in moved:
            child.to(dev)


def capture_block_inputs(
    adapter: ModelAdapter,
    tokens: Tensor,
    *,
    device: torch.device | str,
    batch_size: int = 1,
    storage_device: torch.device | str = "cpu",
) -> tuple[Tensor, list[dict]]:
    """Return block-0 inputs for all samples and each block's call kwargs.

    One pass of the base model with every block bypassed (:func:`blocks_bypassed`):
    the embeddings run, the blocks' weights are never read (they may be on the meta
    device, see :mod:`optima_plugin.streaming`), and each block's kwargs are those the
    base model computes for it (Gemma's alternating masks included).

    Args:
        tokens: ``(n, seqlen)`` token ids.
        device: where the computation runs.
        batch_size: samples per forward; the kwargs are valid for this batch size.
        storage_device: where the ``(n, seqlen, hidden)`` inputs are kept.
    Returns:
        ``(inputs, kwargs)``: inputs in the model's dtype on ``storage_device``;
        ``kwargs[i]`` the keyword arguments block ``i`` is called with (on ``device``).
    """
    device = torch.device(device)
    captured: list[Tensor] = []
    recorded: list = [None] * len(adapter.blocks)

    def stub(i: int, hidden: Tensor, kwargs: dict) -> Tensor:
        if i == 0:
            captured.append(hidden.detach().to(storage_device))
        if recorded[i] is None:  # the first batch's: batch_kwargs cuts them for smaller batches
            recorded[i] = _clean(kwargs)
        return hidden

    with non_blocks_on(adapter, device), torch.no_grad(), blocks_bypassed(adapter, stub):
        for start in range(0, tokens.shape[0], batch_size):
            adapter.base(input_ids=tokens[start : start + batch_size].to(device), use_cache=False)
    return torch.cat(captured), recorded


@contextmanager
def blocks_bypassed(adapter: ModelAdapter, stub) -> Iterator[None]:
    """While active, calling block ``i`` returns ``stub(i, hidden, kwargs)`` instead of running it.

    The block's hooks still fire; its weights are not used. An instance ``forward`` set by
    someone else (accelerate's hooks) is put back on exit.
    """
    saved = []
    for i, block in enumerate(adapter.blocks):
        saved.append(vars(block).get("forward"))

        def forward(*args, _i=i, **kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            return stub(_i, hidden, kwargs)

        block.forward = forward  # an instance attribute shadows the class's forward
    try:
        yield
    finally:
        for block, old in zip(adapter.blocks, saved):
            if old is None:
                del block.forward
            else:
                block.forward = old


def batch_kwargs(kwargs: dict, captured: int, batch: int) -> dict:
    """``kwargs`` recorded for ``captured`` windows, cut for a forward of ``batch <= captured`` windows.

    Tensors of two or more dimensions whose first is ``captured`` (attention masks,
    per-window rotary tables) keep their first ``batch`` entries: every window's are
    alike (calibration windows have no padding).
    """
    if batch == captured:
        return kwargs

    def cut(value: Any) -> Any:
        if isinstance(value, Tensor):
            return value[:batch] if value.dim() >= 2 and value.shape[0] == captured else value
        if isinstance(value, (tuple, list)):
            return type(value)(cut(v) for v in value)
        if isinstance(value, dict):
            return {k: cut(v) for k, v in value.items()}
        return value

    return cut(kwargs)


def run_block(block: nn.Module, hidden: Tensor, kwargs: dict) -> Tensor:
    """Call ``block`` on ``hidden`` ``(b, seqlen, d)``; return its hidden states (tensor or tuple output)."""
    device = hidden.device
    out = block(hidden, **kwargs_to(kwargs, device))
    return out[0] if isinstance(out, (tuple, list)) else out
