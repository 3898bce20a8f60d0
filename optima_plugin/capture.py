"""Capture block-0 inputs and every block's own call kwargs; run one block.

Blocks are not all called alike: Gemma 2/3 alternate sliding-window and full
attention masks (and Gemma 3 rotary embeddings), so each block's kwargs are
recorded by a forward pre-hook during one dense pass, with ``use_cache=False``
and no cache object kept. The LM head is never run (the base model is called).
With the model on CPU (offload), only the modules outside the blocks and one
block at a time are moved to the device.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from .models import ModelAdapter

_DROP = {"past_key_value", "past_key_values", "layer_past", "use_cache", "output_attentions"}


class _Stop(Exception):
    """Raised by the block-0 hook once it has the inputs it needs."""


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


@contextmanager
def _non_blocks_on(adapter: ModelAdapter, device: torch.device) -> Iterator[None]:
    """Move the base model's modules other than the blocks to ``device``, then back."""
    moved = []
    for child in adapter.base.children():
        if child is adapter.blocks:
            continue
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
    blocks = adapter.blocks
    captured: list[Tensor] = []

    def grab(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        captured.append(hidden.detach().to(storage_device))
        raise _Stop

    recorded: list = [None] * len(blocks)
    homes: list = [None] * len(blocks)

    def record(i):
        def pre(module, args, kwargs):
            recorded[i] = _clean(kwargs)
            homes[i] = next(module.parameters()).device
            module.to(device)

        return pre

    def release(i):
        def post(module, args, output):
            module.to(homes[i])

        return post

    with _non_blocks_on(adapter, device), torch.no_grad():
        handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            for start in range(0, tokens.shape[0], batch_size):
                try:
                    adapter.base(input_ids=tokens[start : start + batch_size].to(device), use_cache=False)
                except _Stop:
                    pass
        finally:
            handle.remove()
        handles = []
        for i, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(record(i), with_kwargs=True))
            handles.append(block.register_forward_hook(release(i)))
        try:
            adapter.base(input_ids=tokens[:batch_size].to(device), use_cache=False)
        finally:
            for h in handles:
                h.remove()
    return torch.cat(captured), recorded


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
