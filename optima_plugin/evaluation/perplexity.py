"""Perplexity with the standard protocol: joined text, non-overlapping windows."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data import get_eval_tokens


def _windows(tokens: torch.Tensor, seqlen: int, max_windows: Optional[int]) -> torch.Tensor:
    """``(n, seqlen)`` non-overlapping windows of ``tokens`` ``(1, N)``, at most ``max_windows``."""
    n = tokens.shape[1] // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"{tokens.shape[1]} evaluation tokens are fewer than one window of {seqlen}")
    return tokens[0, : n * seqlen].view(n, seqlen)


def _nll(logits: torch.Tensor, batch: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL of ``batch`` ``(b, seqlen)`` from its logits ``(b, seqlen, vocab)``; tokens counted."""
    logits = logits[:, :-1].float()
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
    return float(loss), batch[:, 1:].numel()


@torch.no_grad()
def perplexity_of_tokens(model, tokens: torch.Tensor, seqlen: int, *, max_windows: Optional[int] = None,
                         batch_size: int = 1, device=None, progress: bool = True) -> float:
    """``exp`` of the mean next-token NLL over non-overlapping ``seqlen`` windows of ``tokens`` ``(1, N)``.

    The loss is computed window batch by window batch, so full-vocabulary logits
    of more than ``batch_size`` windows are never held at once.
    """
    device = torch.device(device) if device else next(model.parameters()).device
    windows = _windows(tokens, seqlen, max_windows)
    total, count = 0.0, 0
    for start in tqdm(range(0, windows.shape[0], batch_size), desc="perplexity", unit="batch", disable=not progress):
        batch = windows[start : start + batch_size].to(device)
        loss, n = _nll(model(input_ids=batch, use_cache=False).logits, batch)
        total, count = total + loss, count + n
    return math.exp(total / count)


@torch.no_grad()
def perplexity_streamed(stream, tokens: torch.Tensor, seqlen: int, *, max_windows: Optional[int] = None,
                        batch_size: int = 1, device=None, progress: bool = True) -> float:
    """:func:`perplexity_of_tokens` of a :class:`~optima_plugin.streaming.StreamedModel`, block by block.

    The windows' hidden states go through the blocks with the
    :class:`~optima_plugin.pipeline.BlockPipeline` (each block read from disk once, for all
    windows); then the model's own forward, its blocks bypassed, turns the last hidden
    states into logits (final norm, head, any logit soft-capping). Same numbers as the
    model in memory; memory: one block and the ``(n, seqlen, hidden)`` hidden states.
    """
    from ..capture import blocks_bypassed, non_blocks_on
    from ..pipeline import BlockPipeline

    device = torch.device(device or "cpu")
    windows = _windows(tokens, seqlen, max_windows)
    batch_size = min(batch_size, windows.shape[0])
    adapter = stream.adapter
    pipe = BlockPipeline(adapter, device=device, batch_size=batch_size, storage=torch.device("cpu"), stream=stream)
    pipe.capture(windows)
    pipe.run(tqdm(range(len(adapter.blocks)), desc="perplexity (streamed)", unit="block", disable=not progress),
             lambda i, block: None)  # nothing but onload, propagate, offload
    total, count = 0.0, 0
    with non_blocks_on(adapter, device, root=stream.model):
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start : start + batch_size].to(device)
            last = pipe.inputs[start : start + batch_size].to(device)
            with blocks_bypassed(adapter, lambda i, hidden, kwargs: last if i == 0 else hidden):
                loss, n = _nll(stream.model(input_ids=batch, use_cache=False).logits, batch)
            total, count = total + loss, count + n
    return math.exp(total / count)


def eval_ppl(model, tokenizer, dataset: str = "pydoc", seqlen: int = 512, *, max_windows: Optional[int] = None,
             batch_size: int = 1, device=None, progress: bool = True) -> float:
    """Perplexity of ``model`` on ``dataset`` (``pydoc``: its held-out last 20%; ``wikitext2``; ``c4``; a path).

    ``model``: a causal LM, or a :class:`~optima_plugin.streaming.StreamedModel` (evaluated
    block by block, on ``device``, default CPU).
    """
    tokens = get_eval_tokens(dataset, tokenizer, seqlen)
    return measure(model, tokens, seqlen, max_windows=max_windows, batch_size=batch_size, device=device,
                   progress=progress)


def measure(model, tokens: torch.Tensor, seqlen: int, **kwargs) -> float:
    """:func:`perplexity_streamed` of a :class:`~optima_plugin.streaming.StreamedModel`, else
    :func:`perplexity_of_tokens` (same keyword arguments)."""
    from ..streaming import StreamedModel

    of = perplexity_streamed if isinstance(model, StreamedModel) else perplexity_of_tokens
    return of(model, tokens, seqlen, **kwargs)
