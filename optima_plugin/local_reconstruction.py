"""``--reconstruct``: local reconstruction of a pruned block against the dense model.

After the per-linear work of block ``i`` (selection, exact layer update), the kept weights of the block's
pruned linears take a few Adam steps so that each *unit*'s outputs on the pruned model's inputs match the
**dense** model's outputs of the same unit on the **dense** inputs:

    min over the kept weights   ‖f_dense(X_d) − f_pruned(X_p)‖² / ‖f_dense(X_d)‖²

Units (``--reconstruct``): ``layer`` each pruned linear; ``submodule`` the attention module and the MLP
module separately (``self_attn``, ``mlp``); ``block`` the whole decoder block. Units are done in forward
order, and a unit's pruned-path inputs are taken after the units before it were reconstructed. Unlike the
layer least-squares problem this couples the linears of a unit through its nonlinearity and attention.

- Masks are fixed: a linear's pruned set is ``weight == 0`` right after the per-linear stage (the stage
  writes ``new.masked_fill(pruned, 0)``, so this is its mask, plus any weight that was exactly 0 already:
  those stay 0 too). Gradients of pruned entries are zeroed and the entries re-zeroed after each step, so
  they stay exactly 0 and N:M patterns are unchanged. Biases, norms and the linears not pruned stay frozen.
- The optimisation runs in float32 (a lower-precision unit is cast for it; the result is written back in
  the model dtype).
- Mini-batches of ``--reconstruct_batch`` fit windows are drawn by a generator seeded from the run's seed
  and the block index, over *global* window indices, so a rerun of a block, and a run under torchrun (each
  rank computes the squared errors of the windows of the batch it holds; the gradients are summed over the
  ranks before each step), take the same steps.
- Early stopping on the held-out windows of ``--damp auto`` (:func:`optima_plugin.damping.held_out`): the
  held-out loss is evaluated at step 0 and every :data:`EVAL_EVERY` steps; the best weights (step 0
  included) are kept, and :data:`PATIENCE` evaluations without improvement stop the unit early. The
  held-out loss therefore never ends above its start.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .capture import batch_kwargs, kwargs_to
from .damping import HOLDOUT_EVERY, held_out
from .models import block_linears

log = logging.getLogger(__name__)

#: ``--reconstruct`` values
MODES = ("none", "layer", "submodule", "block")
#: ``--reconstruct_schedule`` values
SCHEDULES = ("cosine", "constant")
#: the attention and MLP modules of a block, by attribute name (Llama, Qwen2, Mistral, Gemma 2/3)
SUBMODULES = ("self_attn", "mlp")
#: steps between two evaluations of the held-out loss
EVAL_EVERY = 10
#: evaluations without a better held-out loss before a unit stops
PATIENCE = 3


def validate_config(config: Any) -> None:
    """``--reconstruct*``: known names, positive numbers, held-out windows, no compression after it."""
    if config.reconstruct not in MODES:
        raise ValueError(f"--reconstruct must be one of {', '.join(MODES)}, got {config.reconstruct!r}")
    if config.reconstruct_schedule not in SCHEDULES:
        raise ValueError(f"--reconstruct_schedule must be one of {', '.join(SCHEDULES)}, "
                         f"got {config.reconstruct_schedule!r}")
    if isinstance(config.reconstruct_steps, bool) or config.reconstruct_steps < 1:
        raise ValueError(f"--reconstruct_steps must be at least 1, got {config.reconstruct_steps}")
    if isinstance(config.reconstruct_batch, bool) or config.reconstruct_batch < 1:
        raise ValueError(f"--reconstruct_batch must be at least 1 (windows per step), got {config.reconstruct_batch}")
    lr = config.reconstruct_lr
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"--reconstruct_lr must be a finite number > 0, got {lr!r}")
    if config.reconstruct == "none":
        return
    if config.nsamples < 2:
        raise ValueError(f"--reconstruct {config.reconstruct} stops early on held-out calibration windows (one in "
                         f"{HOLDOUT_EVERY}) and fits on the others: it needs --nsamples 2 or more "
                         f"(got {config.nsamples})")
    opt = config.option
    for flag, on in (("--quantize_weight", opt("quantize_weight")), ("--lora_rank", opt("lora_rank"))):
        if on:
            raise ValueError(f"--reconstruct {config.reconstruct} moves the kept weights after the per-layer stage, "
                             f"which {flag} has already compressed (the weights would leave its grid/adapters): "
                             f"drop one of them")


def check_model(mode: str, block: nn.Module) -> None:
    """``ValueError`` when ``--reconstruct submodule`` finds no attention and MLP modules in ``block`` (OPT)."""
    if mode != "submodule":
        return
    missing = [name for name in SUBMODULES if not isinstance(getattr(block, name, None), nn.Module)]
    if missing:
        raise ValueError(f"--reconstruct submodule needs the attention and MLP modules of each block "
                         f"({' and '.join(SUBMODULES)}); {type(block).__name__} has no {', '.join(missing)} "
                         "(OPT keeps its MLP linears in the block): use --reconstruct layer or block")


@dataclass
class Settings:
    """One run's reconstruction settings (from the config)."""

    mode: str
    steps: int
    lr: float
    schedule: str
    batch: int
    seed: int

    @classmethod
    def from_config(cls, config: Any) -> "Settings":
        return cls(config.reconstruct, config.reconstruct_steps, float(config.reconstruct_lr),
                   config.reconstruct_schedule, config.reconstruct_batch, config.seed)


def units(block: nn.Module, mode: str, todo: dict) -> list[tuple[str, nn.Module, dict]]:
    """``[(name, module, {rel: linear to optimise})]`` of ``block`` in forward order (units without a pruned
    linear are left out)."""
    if mode == "layer":
        return [(rel, lin, {rel: lin}) for rel, lin in block_linears(block).items() if rel in todo]
    if mode == "submodule":
        check_model(mode, block)
        out = []
        for name in SUBMODULES:
            mine = {rel: lin for rel, lin in todo.items() if rel.startswith(name + ".")}
            if mine:
                out.append((name, block.get_submodule(name), mine))
        return out
    if mode == "block":
        return [("block", block, dict(todo))] if todo else []
    raise ValueError(f"--reconstruct must be one of {', '.join(MODES)}, got {mode!r}")


def reconstruct_block(pipe, index: int, block: nn.Module, dense: nn.Module, todo: dict,
                      settings: Settings) -> dict:
    """Reconstruct the pruned linears ``todo`` (``{rel: linear}``) of ``block`` unit by unit against its
    dense copy ``dense`` (on ``pipe.dense_inputs``); returns the report's entry of the block."""
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(settings.seed * 1_000_003 + index)
    rows = []
    for name, unit, trainable in units(block, settings.mode, todo):
        inputs = pipe.unit_io(index, block, unit, pipe.inputs)
        twin = dense if unit is block else dense.get_submodule(_path(block, unit))
        targets = pipe.unit_io(index, dense, twin, pipe.dense_inputs, output=True).tensor
        fit = _Fit(pipe, unit, trainable, inputs, targets, settings, gen)
        rows.append({"unit": name, **fit.run()})
        del inputs, targets, fit
    entry = {"block": index, "mode": settings.mode, "units": rows, "seconds": time.perf_counter() - t0}
    if rows:
        log.info("block %d: reconstruct %s, held-out loss %s", index, settings.mode,
                 ", ".join(f"{r['unit']} {r['loss_heldout_before']:.4g} -> {r['loss_heldout_after']:.4g}"
                           for r in rows))
    return entry


def _path(block: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in block.named_modules() if m is module)


class _Fit:
    """The masked Adam fit of one unit (see the module docstring)."""

    def __init__(self, pipe, unit: nn.Module, trainable: dict, inputs, targets: Tensor, settings: Settings,
                 gen: torch.Generator) -> None:
        self.pipe, self.unit, self.settings, self.gen = pipe, unit, settings, gen
        self.dist = pipe.dist
        self.linears = list(trainable.values())
        # float32 (float64 for a float64 model): the dtype the unit is optimised in
        self.dtype = torch.float64 if self.linears[0].weight.dtype == torch.float64 else torch.float32
        self.io, self.targets = inputs, targets
        n = targets.shape[0]
        self.first = pipe.first_window
        total = n if self.dist is None else int(self.dist.sum_(torch.tensor([n], dtype=torch.int64)).item())
        windows = torch.arange(total)
        hold = held_out(windows)
        self.fit_windows, self.val_windows = windows[~hold], windows[hold]
        self.local = range(self.first, self.first + n)
        self.chunk = max(1, inputs.count or pipe.batch_size)
        # the fit targets' mean square: the training loss's scale (the same on every rank)
        fit_sq = self._reduce(torch.tensor([self._sumsq(self.fit_windows), self._elements(self.fit_windows)],
                                           dtype=torch.float64))
        self.scale = float(fit_sq[0] / fit_sq[1]) if fit_sq[0] > 0 else 1.0

    # -- the windows this process holds --------------------------------------------------------------------

    def _mine(self, windows: Tensor) -> Tensor:
        """The local indices of the global ``windows`` this process holds."""
        keep = (windows >= self.local.start) & (windows < self.local.stop)
        return windows[keep] - self.first

    def _elements(self, windows: Tensor) -> float:
        return float(self._mine(windows).numel() * self.targets[0].numel())

    def _sumsq(self, windows: Tensor) -> float:
        idx = self._mine(windows)
        return float(sum(self.targets[i].double().pow(2).sum() for i in idx.tolist())) if idx.numel() else 0.0

    def _reduce(self, t: Tensor) -> Tensor:
        return t if self.dist is None else self.dist.sum_(t)

    # -- forward --------------------------------------------------------------------------------------------

    def _chunks(self, local: Tensor):
        """``(squared error sum, target square sum)`` per chunk of the local windows ``local`` (float32
        forward of the unit; the error keeps its graph)."""
        device, io = self.pipe.device, self.io
        for s in range(0, local.numel(), self.chunk):
            idx = local[s : s + self.chunk]
            x = io.tensor[idx].to(device, self.dtype)
            kwargs = _cast(kwargs_to(batch_kwargs(io.kwargs, io.count or idx.numel(), idx.numel()), device),
                           self.dtype)
            out = self.unit(hidden_states=x, **kwargs) if io.keyword else self.unit(x, **kwargs)
            out = out[0] if isinstance(out, (tuple, list)) else out
            y = self.targets[idx].to(device, self.dtype)
            yield (out.to(self.dtype) - y).pow(2).sum(), y.double().pow(2).sum()

    def _loss(self, windows: Tensor) -> float:
        """``Σ (f − y)² / Σ y²`` over the global ``windows`` (all ranks)."""
        sse, sq = 0.0, 0.0
        with torch.no_grad():
            for e, s in self._chunks(self._mine(windows)):
                sse, sq = sse + float(e), sq + float(s)
        sse, sq = self._reduce(torch.tensor([sse, sq], dtype=torch.float64)).tolist()
        return sse / sq if sq > 0 else (0.0 if sse == 0 else math.inf)

    # -- the optimisation -----------------------------------------------------------------------------------

    def run(self) -> dict:
        unit, settings = self.unit, self.settings
        dtype = self.linears[0].weight.dtype
        cast = dtype not in (torch.float32, torch.float64)
        flags = [(p, p.requires_grad) for p in unit.parameters()]
        if cast:
            unit.to(torch.float32)
        try:
            for p, _ in flags:
                p.requires_grad_(False)
            weights = [lin.weight for lin in self.linears]
            masks = [w.detach() == 0 for w in weights]
            for w in weights:
                w.requires_grad_(True)
            with torch.enable_grad():
                return self._optimise(weights, masks)
        finally:
            for p, flag in flags:
                p.grad = None
                p.requires_grad_(flag)
            if cast:
                unit.to(dtype)

    def _optimise(self, weights: list, masks: list) -> dict:
        settings = self.settings
        fit_before, val_before = self._loss(self.fit_windows), self._loss(self.val_windows)
        best, best_step, best_weights = val_before, 0, [w.detach().clone() for w in weights]
        opt = torch.optim.Adam(weights, lr=settings.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, settings.steps) \
            if settings.schedule == "cosine" else None
        batch = min(settings.batch, self.fit_windows.numel())
        queue = torch.empty(0, dtype=torch.int64)
        n_elem = float(self.targets[0].numel())
        step, bad = 0, 0
        for step in range(1, settings.steps + 1):
            while queue.numel() < batch:  # an epoch of the fit windows at a time, in the generator's order
                queue = torch.cat([queue, self.fit_windows[torch.randperm(self.fit_windows.numel(),
                                                                          generator=self.gen)]])
            drawn, queue = queue[:batch], queue[batch:]
            opt.zero_grad(set_to_none=False)
            for w in weights:
                if w.grad is None:
                    w.grad = torch.zeros_like(w)
            denom = batch * n_elem * self.scale  # the same on every rank: the global batch's element count
            for e, _ in self._chunks(self._mine(drawn)):
                (e / denom).backward()
            for w, m in zip(weights, masks):
                if self.dist is not None:
                    self.dist.sum_(w.grad)
                w.grad.masked_fill_(m, 0)
            opt.step()
            if sched is not None:
                sched.step()
            with torch.no_grad():
                for w, m in zip(weights, masks):
                    w.masked_fill_(m, 0)
            if step % EVAL_EVERY == 0 or step == settings.steps:
                val = self._loss(self.val_windows)
                if val < best:
                    best, best_step, bad = val, step, 0
                    best_weights = [w.detach().clone() for w in weights]
                else:
                    bad += 1
                    if bad >= PATIENCE:
                        break
        with torch.no_grad():
            for w, b in zip(weights, best_weights):
                w.copy_(b)
        fit_after = self._loss(self.fit_windows) if best_step else fit_before
        return {"steps": step, "best_step": best_step, "loss_fit_before": fit_before, "loss_fit_after": fit_after,
                "loss_heldout_before": val_before, "loss_heldout_after": best}


def _cast(value: Any, dtype: torch.dtype) -> Any:
    """Floating tensors (also inside tuples, lists and dicts) as ``dtype`` (the unit's kwargs)."""
    if isinstance(value, Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value
