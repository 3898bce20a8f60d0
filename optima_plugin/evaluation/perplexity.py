"""Perplexity with the standard protocol: joined text, non-overlapping windows."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data import get_eval_tokens


@torch.no_grad()
def perplexity_of_tokens(model, tokens: torch.Tensor, seqlen: int, *, max_windows: Optional[int] = None,
                         batch_size: int = 1, device=None, progress: bool = True) -> float:
    """``exp`` of the mean next-token NLL over non-overlapping ``seqlen`` windows of ``tokens`` ``(1, N)``.

    The loss is computed window batch by window batch, so full-vocabulary logits
    of more than ``batch_size`` windows are never held at once.
    """
    device = torch.device(device) if device else next(model.parameters()).device
    n = tokens.shape[1] // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"{tokens.shape[1]} evaluation tokens are fewer than one window of {seqlen}")
    windows = tokens[0, : n * seqlen].view(n, seqlen)
    total, count = 0.0, 0
    for start in tqdm(range(0, n, batch_size), desc="perplexity", unit="batch", disable=not progress):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total += float(loss)
        count += batch[:, 1:].numel()
    return math.exp(total / count)


def eval_ppl(model, tokenizer, dataset: str = "pydoc", seqlen: int = 512, *, max_windows: Optional[int] = None,
             batch_size: int = 1, device=None, progress: bool = True) -> float:
    """Perplexity of ``model`` on ``dataset`` (``pydoc``: its held-out last 20%; ``wikitext2``; ``c4``; a path)."""
    tokens = get_eval_tokens(dataset, tokenizer, seqlen)
    return perplexity_of_tokens(model, tokens, seqlen, max_windows=max_windows, batch_size=batch_size,
                                device=device, progress=progress)
