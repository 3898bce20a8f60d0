"""Streaming input Hessians ``H = mean x xᵀ`` through forward hooks (no stored activations).

The hooks are registered and removed by :func:`optima_plugin.pipeline.hooked`.

Attention sinks (``--sink_tokens``): the first position of each window, and a few tokens
with massive activations, can hold a large share of ``trace(H)`` (9–22% on some SmolLM2
layers). With :class:`SinkTokens` the accumulator flags, per window, the tokens at the
first ``positions`` positions and every token whose squared norm exceeds ``factor`` × the
window's median squared token norm, and ``keep`` s them (figures only), ``exclude`` s them
or ``cap`` s them (rescaled down to the threshold norm ``sqrt(factor × median)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

SINK_MODES = ("keep", "exclude", "cap")


@dataclass(frozen=True)
class SinkTokens:
    """How the accumulator treats attention-sink tokens.

    Attributes:
        mode: ``keep`` (H unchanged, only the figures), ``exclude`` (flagged tokens left out of H)
            or ``cap`` (flagged tokens above the threshold norm rescaled down to it).
        positions: the first ``positions`` positions of each window are flagged (inputs ``(batch,
            seqlen, d)``: position = index along dim 1; a 2-D input has no positions, only the norm rule).
        factor: a token is also flagged when ``‖x‖² > factor × median ‖x‖²`` over its window
            (a 2-D input: over the whole input); no norm rule where that median is 0.
    """

    mode: str = "keep"
    positions: int = 1
    factor: float = 100.0

    @classmethod
    def from_config(cls, config) -> "SinkTokens":
        """The settings of a :class:`~optima_plugin.config.PruneConfig` (``sink_tokens``, ``sink_positions``,
        ``sink_factor``)."""
        return cls(config.sink_tokens, config.sink_positions, config.sink_factor)


def check_sink_options(mode: str, positions: int, factor: float, seqlen: int) -> None:
    """``ValueError`` naming the flag for a bad ``--sink_tokens`` / ``--sink_positions`` / ``--sink_factor``."""
    if mode not in SINK_MODES:
        raise ValueError(f"--sink_tokens must be one of {', '.join(SINK_MODES)}, got {mode!r}")
    if isinstance(positions, bool) or not isinstance(positions, int) or positions < 0:
        raise ValueError(f"--sink_positions must be an integer >= 0 (0: the norm rule only), got {positions!r}")
    if positions >= seqlen:
        raise ValueError(f"--sink_positions {positions} would flag every token of a --seqlen {seqlen} window; "
                         f"use fewer than {seqlen}")
    if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor >= 1):
        raise ValueError(f"--sink_factor must be a finite number >= 1 (a multiple of the median squared token "
                         f"norm), got {factor!r}")


#: the order of the raw figures in :attr:`HessianAccumulator.sink_counts` (summed over ranks as one tensor)
SINK_COUNTS = ("tokens", "flagged", "by_position", "by_norm", "rescaled", "trace", "trace_flagged")


class HessianAccumulator:
    """Running mean of ``x xᵀ`` over the tokens seen by one linear layer.

    ``hessian`` is ``d x d`` in ``dtype`` (float32 by default) on the layer's device; ``tokens``
    counts the tokens in it. With ``sink`` (:class:`SinkTokens`) the sink tokens are flagged and
    kept, excluded or capped, and :attr:`sink_counts` sums their figures (float64 ``(7,)``, in
    :data:`SINK_COUNTS` order; ``trace`` = Σ‖x‖² of every token seen, ``trace_flagged`` that of
    the flagged ones, both before capping). ``sink=None``: no flagging, no figures.
    """

    def __init__(self, dtype: torch.dtype = torch.float32, sink: Optional[SinkTokens] = None) -> None:
        self.dtype = dtype
        self.sink = sink
        self.hessian: Tensor | None = None
        self.tokens = 0
        self.sink_counts = torch.zeros(len(SINK_COUNTS), dtype=torch.float64) if sink is not None else None

    def add(self, x: Tensor) -> None:
        """Add a batch of inputs ``(..., d)`` (``(batch, seqlen, d)`` for the position rule)."""
        x = x.detach()
        if self.sink is not None:
            x = self._sink_filter(x)
        x = x.reshape(-1, x.shape[-1]).to(self.dtype)
        k = x.shape[0]
        if k == 0:
            return
        if self.hessian is None:
            self.hessian = torch.zeros(x.shape[1], x.shape[1], dtype=self.dtype, device=x.device)
        n = self.tokens
        self.hessian.addmm_(x.T, x, beta=n / (n + k), alpha=1.0 / (n + k))
        self.tokens = n + k

    def _sink_filter(self, x: Tensor) -> Tensor:
        """Flag the sink tokens of ``x``, count them, and return the tokens H should see (``(..., d)`` in ``dtype``)."""
        sink = self.sink
        windows = x.reshape(-1, x.shape[-2], x.shape[-1]) if x.dim() >= 3 else x.reshape(1, -1, x.shape[-1])
        windows = windows.to(self.dtype)
        sq = windows.square().sum(-1)  # (w, s) squared token norms
        median = sq.median(dim=1, keepdim=True).values  # the lower median of each window
        limit = sink.factor * median
        by_norm = (sq > limit) & (median > 0)
        by_position = torch.zeros_like(by_norm)
        if x.dim() >= 3:
            by_position[:, : sink.positions] = True
        flagged = by_norm | by_position
        over = by_norm  # the flagged tokens cap rescales: those above the limit (a small first token stays as it is)
        rescaled = over if sink.mode == "cap" else torch.zeros_like(over)
        counts = [flagged, by_position, by_norm & ~by_position, rescaled]
        figures = torch.stack([m.sum(dtype=torch.float64) for m in counts]
                              + [sq.sum(dtype=torch.float64), sq.masked_fill(~flagged, 0).sum(dtype=torch.float64)])
        self.sink_counts[0] += sq.numel()
        self.sink_counts[1:] += figures.cpu()  # one transfer per forward
        if sink.mode == "keep":
            return windows  # x as it is (already in ``dtype``)
        if sink.mode == "exclude":
            return windows[~flagged]
        scale = torch.where(over, (limit / sq.clamp_min(torch.finfo(sq.dtype).tiny)).sqrt(), torch.ones_like(sq))
        return windows * scale.unsqueeze(-1)

    def sink_stats(self) -> Optional[dict]:
        """The report's ``hessian_stats`` of this layer: the mode, token counts, and the fractions of the
        tokens flagged (``token_fraction``) and of ``trace(H)`` of all tokens they held (``trace_fraction``);
        None without ``sink``."""
        if self.sink is None:
            return None
        c = dict(zip(SINK_COUNTS, self.sink_counts.tolist()))
        tokens = int(c["tokens"])
        out = {"sink_tokens": self.sink.mode, "tokens": tokens, "flagged": int(c["flagged"]),
               "by_position": int(c["by_position"]), "by_norm": int(c["by_norm"]),
               "token_fraction": c["flagged"] / tokens if tokens else 0.0,
               "trace_fraction": c["trace_flagged"] / c["trace"] if c["trace"] > 0 else 0.0}
        if self.sink.mode == "cap":
            out["capped"] = int(c["rescaled"])
        return out

    def hook(self, module: nn.Module, inputs: tuple, output) -> None:
        """``register_forward_hook`` callback: accumulate the module's first input."""
        self.add(inputs[0])


#: ``--hessian_shrink auto`` (the default with the OPTIMA update): this much at layer sparsity up to
#: SHRINK_FULL_UNTIL, none from SHRINK_NONE_FROM, linear in between (docs/quality.md "Quality on text the model
#: was not calibrated on": measured at 50% and 2:4, where the exact update's fit to the calibration
#: text's input correlations does not transfer, and at 70%, where shrinking costs half the gain)
DEFAULT_HESSIAN_SHRINK = 0.3
SHRINK_FULL_UNTIL = 0.5
SHRINK_NONE_FROM = 0.7


def default_hessian_shrink(ratio: float) -> float:
    """``--hessian_shrink auto`` for a layer pruned to ``ratio`` (its share of pruned weights)."""
    if ratio <= SHRINK_FULL_UNTIL:
        return DEFAULT_HESSIAN_SHRINK
    if ratio >= SHRINK_NONE_FROM:
        return 0.0
    return DEFAULT_HESSIAN_SHRINK * (SHRINK_NONE_FROM - ratio) / (SHRINK_NONE_FROM - SHRINK_FULL_UNTIL)


def layer_shrink(setting, ratio: float) -> float:
    """The shrink of one layer: ``setting`` itself when a number, :func:`default_hessian_shrink` for ``auto``."""
    return default_hessian_shrink(float(ratio)) if setting == "auto" else float(setting)


def parse_shrink(text) -> "float | str":
    """``--hessian_shrink``: ``auto`` or a number in [0, 1); ``ValueError`` otherwise."""
    if isinstance(text, str) and text.strip().lower() == "auto":
        return "auto"
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = float("nan")
    if isinstance(text, bool) or not 0.0 <= value < 1.0:
        raise ValueError(f"--hessian_shrink must be auto or a number in [0, 1) (the share of the correlations "
                         f"between inputs taken out of H), got {text!r}")
    return value


def resolve_shrink(setting, weight_update: str, damp) -> "float | str":
    """A run's ``--hessian_shrink`` after validation: ``auto`` stays ``auto`` (resolved per layer) with the
    OPTIMA update and a numeric damp; otherwise ``auto`` is 0 (the selectors' own updates stay as their
    authors wrote them, and ``--damp auto`` chooses on unshrunk held-out Hessians). Numbers pass through."""
    value = parse_shrink(setting)
    if value == "auto" and (weight_update != "optima" or isinstance(damp, str)):
        return 0.0
    return value


def shrink_to_diagonal(matrix: Tensor, alpha: float) -> Tensor:
    """``(1 - alpha) · M + alpha · diag(M)``: a ``d x d`` statistic's off-diagonal part scaled by ``1 - alpha``.

    ``--hessian_shrink``: covariance shrinkage towards the diagonal (Ledoit-Wolf style). The diagonal
    (each input's energy, what Wanda's score reads) is kept; the correlations between inputs, the part of
    ``H`` that differs most from one kind of text to another, are trusted less. ``alpha = 0`` returns
    ``matrix`` itself. Applied to the Hessian and (``--objective dense``) to the cross term alike.
    """
    if alpha == 0:
        return matrix
    out = matrix * (1.0 - alpha)
    out.diagonal().copy_(matrix.diagonal())
    return out


def validate_sinks(config) -> None:
    """The ``--sink_tokens`` options of a config (see :func:`check_sink_options`)."""
    check_sink_options(config.sink_tokens, config.sink_positions, config.sink_factor, config.seqlen)


def validate_shrink(config) -> dict:
    """``--hessian_shrink``: ``auto`` or a number in [0, 1); returns it resolved (:func:`resolve_shrink`)."""
    given = parse_shrink(config.hessian_shrink)
    if given != "auto" and given and isinstance(config.damp, str):
        raise ValueError(f"--hessian_shrink {given} with --damp {config.damp}: the damp is chosen on "
                         "unshrunk held-out Hessians; give --damp a number with --hessian_shrink, or drop one")
    return {"hessian_shrink": resolve_shrink(given, config.weight_update, config.damp)}
