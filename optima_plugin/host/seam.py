"""The host seam: emit the masks of an unmodified host's pruning loop, write back the answers.

Every host (Wanda, SparseGPT, TRIM, OWL, AlphaPruning) prunes one decoder block at
a time with the same loop::

    pass 1: run the block on its calibration inputs, forward hooks on its linears
    prune:  weight[W_mask] = 0           (per linear; TRIM may re-run the block in between)
    pass 2: run the block again; the outputs are the next block's inputs

:class:`HostSeam` watches that loop from outside, through hooks only:

* at load, it snapshots the dense weights of every decoder linear (CPU, the model's dtype);
* while the host calls a block directly (not inside a whole-model forward), forward
  hooks on the block's linears stream one Hessian ``H = mean x xᵀ`` per distinct
  input, for the linears that are still dense;
* when the block is called again and a linear's weight has new zeros, the host has
  applied its mask: ``pruned = weight == 0`` (new zeros, and the dense weight's own
  zeros, which the host counts as pruned too: its zero pattern is kept exactly). The seam emits it
  through the ``optima_mask_emitted`` hook (the OPTIMA plugin answers with the exact
  reconstruction from the dense weights) and writes the answer into the weight, in
  its dtype and device, pruned entries exactly zero, before the block runs;
* a mask found with no Hessian for it (the hosts' magnitude paths never run a
  statistics pass, or the host left the block without re-running it) is handled by
  the seam's own pass at the next whole-model forward: it captures the block
  inputs itself from calibration tokens, runs each such block with its dense
  weights to stream the Hessians, emits, and propagates the updated block's outputs.

A linear's mask is therefore handled before the host (or its evaluation) uses the
pruned weights. The results are reported like the engine's
(:class:`~optima_plugin.engine.LayerResult` through ``optima_layer_done``), plus
``host_objective``: the reconstruction objective of the host's own weights.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn

from ..capture import capture_block_inputs, run_block
from ..data import get_calibration
from ..engine import LayerResult, blocks_path, resolve_device
from ..files import write_json
from ..hessian import HessianAccumulator, attach
from ..models import ModelAdapter, block_linears, get_adapter, input_groups
from ..plugins import get_plugin_manager, lookup
from ..solvers.problem import reconstruction_error
from .selection import reselect
from .shims import CallDepth

log = logging.getLogger(__name__)


@dataclass
class SeamSettings:
    """How the seam works.

    Attributes:
        hessian_dtype: accumulation dtype of the streamed Hessians.
        mask_selector: a registered selector that replaces the host's masks (at the host's per-row counts).
        calibration: the seam's own pass: calibration source (``c4``, ``wikitext2``, ``pydoc``, a path).
        nsamples, seqlen, seed: its windows (seqlen None: the host's ``model.seqlen``, else ≤ 2048).
        device: where its own pass runs (``auto``: the GPU if there is one).
        report: JSON file for the per-layer results, written by :meth:`HostSeam.finish`.
    """

    hessian_dtype: torch.dtype = torch.float32
    mask_selector: Optional[str] = None
    calibration: str = "c4"
    nsamples: int = 128
    seqlen: Optional[int] = None
    seed: int = 0
    device: str = "auto"
    report: Optional[str] = None


@dataclass
class LinearState:
    """One decoder linear as the seam sees it."""

    name: str
    rel: str
    module: nn.Linear
    owner: str  # the member of its input group whose forward hook streams the shared Hessian
    dense: Optional[Tensor]  # CPU snapshot of the dense weight (freed once handled and left)
    seen_zeros: int  # zeros after the seam's last write (at load: the dense weight's)
    handled: bool = False


@dataclass
class BlockState:
    index: int
    block: nn.Module
    linears: dict[str, LinearState]
    accs: dict[str, HessianAccumulator] = field(default_factory=dict)
    collect: set = field(default_factory=set)


def _zeros(weight: Tensor) -> int:
    """Number of zero entries of ``weight`` (counted at every block call, so the fast way:
    ``eq(0).sum()`` takes a third of ``count_nonzero``'s time on CPUs)."""
    return int(weight.detach().eq(0).sum())


class HostSeam:
    """Watches a host's block loop and emits its masks (see the module docstring).

    Args:
        settings: :class:`SeamSettings`.
        calls: the process's :class:`~optima_plugin.host.shims.CallDepth` (tells
            host block calls from whole-model forwards); the seam registers on it.
        stats_source: optional object with ``pop_stats(name) -> dict`` (the
            answering plugin's solver statistics, for the report).
    """

    def __init__(self, settings: SeamSettings, calls: CallDepth, stats_source=None) -> None:
        self.settings = settings
        self.calls = calls
        self.stats_source = stats_source
        self.pm = get_plugin_manager()
        self.selector = (lookup("selectors", settings.mask_selector, "--mask_selector")
                         if settings.mask_selector else None)
        self.model: Optional[nn.Module] = None
        self.adapter: Optional[ModelAdapter] = None
        self.blocks: list[BlockState] = []
        self.layers: list[dict] = []
        self.own_passes: list[dict] = []
        self._current: Optional[int] = None
        #: the block of the host's loop running now (None outside it: loading, a whole-model forward)
        self.in_block: Optional[int] = None
        self._busy = False
        self._handles: list = []
        self._tokens: Optional[Tensor] = None
        calls.entered.append(self._model_called)

    # -- attaching -------------------------------------------------------------

    def attach(self, model: nn.Module) -> bool:
        """Snapshot ``model``'s decoder linears and hook its blocks; False (and a warning) if unsupported."""
        try:
            adapter = get_adapter(model)
        except ValueError as err:
            log.warning("optima-host leaves %s alone: %s", type(model).__name__, err)
            return False
        if self.adapter is not None:
            log.warning("a second model was loaded; the plugin follows the newest one")
            self.detach()
        self.model, self.adapter = model, adapter
        prefix = blocks_path(adapter)
        for i, block in enumerate(adapter.blocks):
            linears = block_linears(block)
            owners = {rel: group[0] for group in input_groups(block) for rel in group}
            states = {
                rel: LinearState(name=f"{prefix}.{i}.{rel}", rel=rel, module=lin, owner=owners[rel],
                                 dense=lin.weight.detach().to("cpu", copy=True), seen_zeros=_zeros(lin.weight))
                for rel, lin in linears.items()
            }
            st = BlockState(index=i, block=block, linears=states)
            self.blocks.append(st)
            self._handles.append(block.register_forward_pre_hook(self._block_hook(i)))
            for owner in sorted(set(owners.values())):
                self._handles.append(linears[owner].register_forward_hook(self._collector(st, owner)))
        n = sum(len(st.linears) for st in self.blocks)
        mb = sum(ls.dense.numel() * ls.dense.element_size() for st in self.blocks for ls in st.linears.values()) / 2**20
        log.info("optima-host: watching %d linears in %d blocks of %s (dense snapshot %.0f MB on CPU)",
                 n, len(self.blocks), type(model).__name__, mb)
        return True

    def detach(self) -> None:
        """Remove the seam's hooks and forget the model."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.blocks.clear()
        self.model = self.adapter = None
        self._current = self.in_block = None

    def find(self, module: nn.Module) -> Optional[tuple[BlockState, LinearState]]:
        """The block and linear state of a watched linear ``module``, or None."""
        for st in self.blocks:
            for ls in st.linears.values():
                if ls.module is module:
                    return st, ls
        return None

    # -- hooks -----------------------------------------------------------------

    def _block_hook(self, index: int):
        def pre(module, args):
            self._block_called(index)

        return pre

    def _collector(self, st: BlockState, owner: str):
        def hook(module, args, output):
            if owner in st.collect and self.calls.standalone and not self._busy:
                st.accs[owner].add(args[0])

        return hook

    def _block_called(self, index: int) -> None:
        """A block forward: handle the masks applied since the block last ran, then collect."""
        if self._busy or not self.calls.standalone or not self.blocks:
            return
        self.in_block = index
        self._busy = True
        try:
            if self._current is not None and self._current != index:
                self._leave(self.blocks[self._current])
            self._current = index
            st = self.blocks[index]
            changed = self._changed(st)
            if changed:
                self._handle(st, changed)
            self._collect(st, reset=bool(changed))
        finally:
            self._busy = False

    def _model_called(self, module: nn.Module) -> None:
        """A whole-model forward starts: no mask may stay unhandled while the model runs."""
        if self._busy or not self.blocks:
            return
        self.in_block = None
        self._busy = True
        try:
            self._flush()
        finally:
            self._busy = False

    def flush(self) -> None:
        """Handle every mask applied and not yet emitted (before a save, at the end)."""
        self._model_called(None)

    # -- bookkeeping -----------------------------------------------------------

    def _changed(self, st: BlockState) -> list[LinearState]:
        return [ls for ls in st.linears.values() if _zeros(ls.module.weight) != ls.seen_zeros]

    def _collect(self, st: BlockState, reset: bool) -> None:
        owners = {ls.owner for ls in st.linears.values() if not ls.handled}
        for owner in owners:
            if reset or owner not in st.accs:
                st.accs[owner] = HessianAccumulator(self.settings.hessian_dtype)
        st.collect = owners

    def _leave(self, st: BlockState) -> None:
        """The host moved on to another block: handle what is left, free the block's statistics."""
        changed = self._changed(st)
        if changed:
            self._handle(st, changed)
        st.accs.clear()
        st.collect = set()
        for ls in st.linears.values():
            if ls.handled:
                ls.dense = None

    def _hessian(self, st: BlockState, ls: LinearState) -> Optional[Tensor]:
        acc = st.accs.get(ls.owner)
        return acc.hessian if acc is not None and acc.tokens > 0 else None

    def _handle(self, st: BlockState, changed: list[LinearState]) -> None:
        missing = []
        for ls in changed:
            hessian = self._hessian(st, ls)
            if hessian is None:
                missing.append(ls)
            else:
                self._emit(st, ls, hessian)
        if missing:
            self._own_pass({st.index: missing})

    def _flush(self) -> None:
        pending = {st.index: ch for st in self.blocks if (ch := self._changed(st))}
        if not pending:
            return
        if set(pending) == {self._current}:
            self._handle(self.blocks[self._current], pending[self._current])
        else:  # masks applied without the host's statistics pass (magnitude paths): one sequential own pass
            self._own_pass(pending)

    # -- emitting --------------------------------------------------------------

    def emit(self, st: BlockState, ls: LinearState, hessian: Optional[Tensor] = None,
             pruned: Optional[Tensor] = None, dense: Optional[Tensor] = None) -> None:
        """Emit ``ls``'s mask now (the explicit ``emit_mask`` call); statistics from the seam when not given."""
        if self._busy:
            raise RuntimeError("emit_mask was called from inside the seam's own pass")
        self._busy = True
        try:
            hessian = hessian if hessian is not None else self._hessian(st, ls)
            if hessian is None:
                self._own_pass({st.index: [ls]})
            else:
                self._emit(st, ls, hessian, pruned=pruned, dense=dense)
        finally:
            self._busy = False

    def _emit(self, st: BlockState, ls: LinearState, hessian: Tensor, pruned: Optional[Tensor] = None,
              dense: Optional[Tensor] = None) -> None:
        t0 = time.perf_counter()
        weight = ls.module.weight
        if dense is None and ls.dense is None:
            log.warning("%s was pruned again after the host left its block; its dense weights are gone, "
                        "so the host's weights stay", ls.name)
            ls.seen_zeros = _zeros(weight)
            return
        dense = (dense if dense is not None else ls.dense).to(weight.device)
        host = weight.detach().clone()
        # Every zero is pruned, the dense weight's own zeros too (GGUF-dequantized weights have many): the
        # host's zero pattern is kept exactly, and no zero the host counts in its sparsity is revived.
        pruned = host == 0 if pruned is None else pruned.to(device=weight.device, dtype=torch.bool)
        if self.selector is not None:
            pruned = reselect(self.selector, dense, hessian, pruned)
        answer = self.pm.hook.optima_mask_emitted(name=ls.name, module=ls.module, pruned=pruned, hessian=hessian,
                                                  dense_weight=dense)
        stats = self.stats_source.pop_stats(ls.name) if self.stats_source is not None else {}
        mask_only = dense.masked_fill(pruned, 0)
        if answer is None:
            new = mask_only if self.selector is not None else host
        else:
            new = answer.to(device=weight.device, dtype=weight.dtype).masked_fill(pruned, 0)
        mask_objective = reconstruction_error(dense, mask_only, hessian)
        # Mask-only hosts (Wanda, TRIM, magnitude) left exactly the mask-only weights: one GEMM less.
        same = host.dtype == mask_only.dtype and torch.equal(host, mask_only)
        host_objective = mask_objective if same else reconstruction_error(dense, host, hessian)
        objective = reconstruction_error(dense, new, hessian)
        accepted = True
        if self.selector is None and objective > host_objective:
            log.warning("%s: the plugin's weights are worse than the host's (%.4g > %.4g); keeping the host's",
                        ls.name, objective, host_objective)
            new, objective, accepted = host, host_objective, False
        with torch.no_grad():
            weight.data.copy_(new)
        ls.seen_zeros = _zeros(weight)
        ls.handled = True
        if mask_objective > 0:
            error_ratio = objective / mask_objective
        else:
            error_ratio = 0.0 if objective == 0 else 1.0
        result = LayerResult(
            name=ls.name, block=st.index, shape=list(weight.shape), ratio=float(pruned.float().mean()),
            sparsity=float((weight == 0).float().mean()), error_ratio=error_ratio, objective=objective,
            mask_objective=mask_objective, accepted=accepted, seconds=time.perf_counter() - t0, update=stats,
        )
        self.pm.hook.optima_layer_done(result=result)
        self.layers.append(dict(result.to_dict(), host_objective=host_objective))
        log.debug("%s: %.1f%% pruned, error ratio %.4f (host %.4f)", ls.name, 100 * result.ratio, error_ratio,
                  host_objective / mask_objective if mask_objective > 0 else float("nan"))

    # -- the seam's own statistics pass ---------------------------------------

    def _calibration(self) -> Tensor:
        if self._tokens is None:
            from transformers import AutoTokenizer

            model = self.model
            limit = getattr(model.config, "max_position_embeddings", None) or 2048
            seqlen = self.settings.seqlen or getattr(model, "seqlen", None) or min(2048, limit)
            tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
            self._tokens = get_calibration(self.settings.calibration, tokenizer, self.settings.nsamples, seqlen,
                                           self.settings.seed)
            log.info("optima-host: own statistics pass on %d windows of %d tokens from %s",
                     self._tokens.shape[0], seqlen, self.settings.calibration)
        return self._tokens

    def _own_pass(self, pending: dict[int, list[LinearState]]) -> None:
        """Capture block inputs, then for each block up to the last pending one: Hessians of the
        pending linears with their dense weights, emit, and propagate the block's outputs."""
        t0 = time.perf_counter()
        device = resolve_device(self.settings.device)
        tokens = self._calibration()
        inputs, kwargs = capture_block_inputs(self.adapter, tokens, device=device, batch_size=1,
                                              storage_device=device)
        last = max(pending)
        with torch.no_grad():
            for st in self.blocks[: last + 1]:
                home = next(st.block.parameters()).device
                st.block.to(device)
                todo = pending.get(st.index, [])
                if todo:
                    hessians = self._dense_hessians(st, todo, inputs, kwargs[st.index])
                    for ls in todo:
                        self._emit(st, ls, hessians[ls.owner])
                if st.index < last:
                    for j in range(inputs.shape[0]):
                        inputs[j : j + 1] = run_block(st.block, inputs[j : j + 1], kwargs[st.index])
                st.block.to(home)
        self.own_passes.append({"blocks": sorted(pending), "seconds": time.perf_counter() - t0})
        log.info("optima-host: own statistics pass for %d block(s) in %.1f s", len(pending),
                 time.perf_counter() - t0)

    def _dense_hessians(self, st: BlockState, todo: list[LinearState], inputs: Tensor, kwargs: dict) -> dict:
        """Hessians of ``todo``'s inputs with their dense weights restored for the pass (host weights put back)."""
        saved = {}
        for ls in todo:
            if ls.dense is not None:
                saved[ls.rel] = ls.module.weight.detach().clone()
                ls.module.weight.data.copy_(ls.dense.to(ls.module.weight.device))
        owners = sorted({ls.owner for ls in todo})
        accs, handles = attach([st.linears[o].module for o in owners], self.settings.hessian_dtype)
        try:
            for j in range(inputs.shape[0]):
                run_block(st.block, inputs[j : j + 1], kwargs)
        finally:
            for h in handles:
                h.remove()
            for rel, weight in saved.items():
                st.linears[rel].module.weight.data.copy_(weight)
        return {o: acc.hessian for o, acc in zip(owners, accs)}

    # -- the end ---------------------------------------------------------------

    def finish(self, error: Optional[BaseException] = None) -> dict:
        """Warn about masks never handled, write and return the report.

        ``error``: what ended the host early (None: it completed); the report then says
        ``"completed": false``, the error and the block the host was pruning (``failed_block``).
        """
        left = [ls.name for st in self.blocks for ls in self._changed(st)]
        if error is not None:
            log.error("optima-host: the host stopped early (%s); the report lists the %d linear(s) updated "
                      "before that", _describe(error), len(self.layers))
        elif left:
            log.warning("optima-host: %d linear(s) were pruned after the host's last forward and were not "
                        "updated (e.g. %s); the host saved or evaluated nothing after pruning them",
                        len(left), left[0])
        er = [x["error_ratio"] for x in self.layers if x["error_ratio"] is not None]
        host = [x["host_objective"] / x["mask_objective"] for x in self.layers if x["mask_objective"]]
        report = {
            "completed": error is None,
            "error": None if error is None else _describe(error),
            "failed_block": None if error is None else self.in_block,
            "layers": self.layers,
            "own_passes": self.own_passes,
            "summary": {
                "layers": len(self.layers),
                "mean_error_ratio": sum(er) / len(er) if er else None,
                "mean_host_error_ratio": sum(host) / len(host) if host else None,
                "not_updated": left,
            },
        }
        if self.layers:
            log.info("optima-host: %d linears updated, mean error ratio %.4f (host's weights: %.4f)",
                     len(self.layers), report["summary"]["mean_error_ratio"] or float("nan"),
                     report["summary"]["mean_host_error_ratio"] or float("nan"))
        if self.settings.report:
            write_json(self.settings.report, report)
        return report


def _describe(error: BaseException) -> str:
    """``"<ExceptionType>: <message>"`` (``SystemExit``: its code)."""
    message = error.code if isinstance(error, SystemExit) else error
    return f"{type(error).__name__}: {message}"
