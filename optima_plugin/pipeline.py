"""One block pipeline: the loop every calibration pass of a decoder-only model shares.

    pipe = BlockPipeline(adapter, device=..., batch_size=..., storage=..., offload=...)
    pipe.capture(tokens)                      # block-0 inputs, every block's call kwargs

    def on_block(i, block):                   # the caller's work on onloaded block i
        stats = pipe.statistics(i, block, {key: module}, make)   # forward hooks, one pass (all-reduced)
        ...per-linear work...

    pipe.run(range(start, stop), on_block)    # per block: onload, on_block, propagate, offload

Users: the engine (:func:`~optima_plugin.engine.prune_model`), the OWL statistics pass
(:mod:`optima_plugin.allocators.statistics`), the host seam's own pass
(:meth:`optima_plugin.host.seam.HostSeam._own_pass`) and the block-by-block perplexity of a
streamed model (:func:`~optima_plugin.evaluation.perplexity.perplexity_streamed`). Forward
hooks are registered and removed here only (:func:`hooked`, :func:`registered`); out of memory halves the windows per forward
(down to one) and is recorded in ``oom_backoff``. The pipeline knows no plugin.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional

import torch
from torch import Tensor, nn

from .capture import batch_kwargs, capture_block_inputs, run_block
from .hessian import HessianAccumulator, SinkTokens
from .models import ModelAdapter
from .objective import CrossAccumulator, DenseTerms, OutputEnergy, Phase
from .timing import Phases, timed

log = logging.getLogger(__name__)


class NonFiniteError(ValueError):
    """NaN or Inf in weights, Hessians or block outputs; the message names the layer."""


def check_finite(tensor: Tensor, what: str) -> None:
    """``NonFiniteError`` naming ``what`` when ``tensor`` holds NaN or Inf."""
    bad = ~torch.isfinite(tensor)
    if bool(bad.any()):
        nan = int(torch.isnan(tensor).sum())
        raise NonFiniteError(f"{what} hold{'s' if not what.endswith('s') else ''} {nan} NaN and "
                             f"{int(bad.sum()) - nan} infinite value(s); check the model's weights and dtype "
                             "(float16 overflows where bfloat16 does not)")


@contextmanager
def hooked(modules: dict, make: Callable[[], object], twins: Optional[dict] = None,
           phases: Optional[Phases] = None) -> Iterator[dict]:
    """One accumulator ``make()`` per module (its ``hook`` a forward hook), removed on exit: ``{key: acc}``.

    ``twins``: ``{key: another module}`` whose forward calls the same accumulator's hook too (the dense
    copy of a block under ``--objective dense``). ``phases``: the hooks' time is its ``hessian`` phase."""
    accs, handles = {}, []
    try:
        for key, module in modules.items():
            accs[key] = make()
            hook = accs[key].hook if phases is None else _timed_hook(accs[key].hook, phases)
            handles.append(module.register_forward_hook(hook))
            if twins is not None:
                handles.append(twins[key].register_forward_hook(hook))
        yield accs
    finally:
        for h in handles:
            h.remove()


def _timed_hook(hook: Callable, phases: Phases) -> Callable:
    """``hook`` with its time counted as the ``hessian`` phase (statistics accumulation)."""
    def timed_hook(module, inputs, output):
        with phases.phase("hessian"):
            return hook(module, inputs, output)
    return timed_hook


class Hooks:
    """Forward (pre-)hooks kept for a lifetime longer than one pass (the host seam's), removed by :meth:`remove`."""

    def __init__(self) -> None:
        self._handles: list = []

    def forward(self, module: nn.Module, hook: Callable) -> None:
        """``hook(module, inputs, output)`` after each forward of ``module``."""
        self._handles.append(module.register_forward_hook(hook))

    def pre_forward(self, module: nn.Module, hook: Callable) -> None:
        """``hook(module, inputs)`` before each forward of ``module``."""
        self._handles.append(module.register_forward_pre_hook(hook))

    def remove(self) -> None:
        """Remove every hook added so far."""
        for h in self._handles:
            h.remove()
        self._handles.clear()


@contextmanager
def onloaded_block(adapter: ModelAdapter, index: int, device: Optional[torch.device | str], *, stream=None,
                   offload: Optional[torch.device | str] = None) -> Iterator[nn.Module]:
    """Block ``index`` on ``device`` for the body, then offloaded (or put back where it was); ``device`` None:
    left where it is. Streamed: read from disk (to ``device``, default CPU), then freed."""
    if stream is not None:
        block = stream.load_block(index, device if device is not None else "cpu")
        try:
            yield block
        finally:
            stream.release_block(index)
        return
    block = adapter.blocks[index]
    if device is None:
        yield block
        return
    home = next(block.parameters()).device
    block.to(device)
    try:
        yield block
    finally:  # also after a failure, so a caller that goes on finds the block where it was
        block.to(offload if offload is not None else home)


def halve(batch: int, what: str, device: torch.device) -> int:
    """The batch after an out-of-memory error in ``what``; re-raises at batch 1."""
    if batch == 1:
        raise torch.OutOfMemoryError(f"out of memory in {what} even with one calibration window per forward; "
                                     "use --offload, a shorter --seqlen or a larger device")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    log.warning("out of memory in %s with %d windows per forward; retrying with %d", what, batch, batch // 2)
    return batch // 2


def input_owners(todo, groups) -> dict:
    """``{linear: the linear whose forward hook sees its input}``: one per distinct input (q/k/v share one)."""
    owners = {}
    for group in groups:
        members = [g for g in group if g in todo]
        for g in members:
            owners[g] = members[0]
    for rel in todo:
        owners.setdefault(rel, rel)
    return owners


class BlockPipeline:
    """Capture → per block: onload, statistics pass (hooks), caller's work, propagate, offload.

    Args:
        device: where the blocks run.
        batch_size: calibration windows per forward (the captured kwargs are for this many).
        storage: where the ``(n, seqlen, hidden)`` block inputs are kept.
        offload: where a block goes after its turn; None: back where it was.
        oom_backoff: list the out-of-memory back-offs are appended to (``{block, pass, batch}``).
        stream: a :class:`~optima_plugin.streaming.StreamedModel` whose blocks are read from
            disk at onload and freed (back to the meta device) at offload; ``offload`` is unused.
        dist: under torchrun, the job's :class:`~optima_plugin.distributed.Distributed`: this rank
            captures and propagates only its share of the windows, and :meth:`hessians` are
            all-reduced (token-weighted), as are :meth:`statistics`' accumulators that have an ``all_reduce``.
        track_dense: also carry the dense model's block inputs (``dense_inputs``, beside ``inputs`` on
            ``storage``) for ``--objective dense``: :meth:`dense_statistics` advances them.
        sink: how :meth:`hessians` treat attention-sink tokens (:class:`~optima_plugin.hessian.SinkTokens`);
            None: as always (no flagging, no figures). The figures of the last :meth:`hessians` call
            are in ``hessian_stats`` (``{rel: dict}``).
        phases: a :class:`~optima_plugin.timing.Phases` its passes are timed in (``statistics`` forwards,
            ``hessian`` accumulation in the hooks, ``allreduce``, ``propagation``); None: not timed.
    """

    def __init__(self, adapter: ModelAdapter, *, device: torch.device, batch_size: int = 1,
                 storage: Optional[torch.device] = None, offload: Optional[torch.device | str] = None,
                 oom_backoff: Optional[list] = None, stream=None, dist=None, track_dense: bool = False,
                 sink: Optional[SinkTokens] = None, phases: Optional[Phases] = None) -> None:
        self.adapter = adapter
        self.phases = phases
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.storage = torch.device(storage) if storage is not None else self.device
        self.offload = offload
        self.oom_backoff = oom_backoff if oom_backoff is not None else []
        self.stream = stream
        self.dist = dist
        self.sink = sink
        self.hessian_stats: dict = {}
        self.inputs: Optional[Tensor] = None
        self.track_dense = track_dense
        self.dense_inputs: Optional[Tensor] = None  # the dense model's inputs of the current block
        self.kwargs: list = []
        self.first_window = 0  # global index of this process's first calibration window (torchrun: its share's)

    def capture(self, tokens: Tensor) -> Tensor:
        """Block-0 inputs of ``tokens`` (under torchrun: of this rank's share) and every block's call kwargs
        (one dense pass); returns the inputs."""
        if self.dist is not None:
            self.first_window = self.dist.span(tokens.shape[0]).start
            tokens = self.dist.share(tokens)
        self.inputs, self.kwargs = capture_block_inputs(self.adapter, tokens, device=self.device,
                                                        batch_size=self.batch_size, storage_device=self.storage)
        if self.track_dense:  # identical at block 0
            self.dense_inputs = self.inputs.clone()
        return self.inputs

    @contextmanager
    def onloaded(self, index: int) -> Iterator[nn.Module]:
        """Block ``index`` on the device for the body, then offloaded (or put back where it was);
        streamed: read from disk, then freed (:func:`onloaded_block`)."""
        with onloaded_block(self.adapter, index, self.device, stream=self.stream,
                            offload=None if self.stream is not None else self.offload) as block:
            yield block

    def run(self, blocks: Iterable[int], on_block: Callable[[int, nn.Module], None], *,
            propagate: bool | Callable[[int], bool] = True, before: Optional[Callable[[int], None]] = None,
            after: Optional[Callable[[int, nn.Module], None]] = None,
            done: Optional[Callable[[int], None]] = None) -> None:
        """The block loop: per index of ``blocks``, ``before(index)``, onload, ``on_block(index, block)``,
        propagate, ``after(index, block)`` (still onloaded: e.g. write the block out), offload, ``done(index)``.

        ``propagate``: False when ``on_block`` advances the inputs itself (an ``outputs=True``
        :meth:`statistics` pass), or ``propagate(index)`` to decide per block."""
        for index in blocks:
            if before is not None:
                before(index)
            with self.onloaded(index) as block:
                on_block(index, block)
                if propagate(index) if callable(propagate) else propagate:
                    self.propagate(index, block)
                if after is not None:
                    after(index, block)
            if done is not None:
                done(index)

    def _chunks(self, block: nn.Module, index: int, batch: int, before: Callable[[int, int], None] = lambda s, n: None):
        """``(start, outputs)`` per forward of ``batch`` windows; ``before(start, count)`` is called ahead of each."""
        for start in range(0, self.inputs.shape[0], batch):
            chunk = self.inputs[start : start + batch]
            before(start, chunk.shape[0])
            yield start, self._run(block, index, chunk)

    def _run(self, block: nn.Module, index: int, chunk: Tensor) -> Tensor:
        chunk = chunk.to(self.device)
        return run_block(block, chunk, batch_kwargs(self.kwargs[index], self.batch_size, chunk.shape[0]))

    def statistics(self, index: int, block: nn.Module, modules: dict, make: Callable[[], object],
                   *, outputs: bool = False) -> dict:
        """One pass of block ``index`` over all windows with an accumulator on each module: ``{key: acc}``.

        Out of memory starts the pass over with fresh accumulators and half the batch. An accumulator
        with a ``chunk(start, count)`` method is told before each forward which of this process's
        windows it holds (``start .. start + count - 1``, in order; e.g. the held-out split of
        :class:`~optima_plugin.damping.HeldOutAccumulator`).
        ``outputs``: the same pass also replaces the inputs by the block's outputs (a dense
        pass whose statistics do not change the block); it cannot start over, so no back-off.
        Under torchrun an accumulator with an ``all_reduce(dist, in_features)`` method is then all-reduced over
        the ranks (each rank passed its share of the windows).
        """
        with timed(self.phases, "statistics"):
            return self._statistics(index, block, modules, make, outputs)

    def _statistics(self, index: int, block: nn.Module, modules: dict, make: Callable[[], object],
                    outputs: bool) -> dict:
        batch = self.batch_size
        with torch.no_grad():
            while True:
                try:
                    with hooked(modules, make, phases=self.phases) as accs:
                        told = [acc.chunk for acc in accs.values() if hasattr(acc, "chunk")]

                        def before(start: int, count: int) -> None:
                            for chunk in told:
                                chunk(start, count)

                        for start, out in self._chunks(block, index, batch, before):
                            if outputs:
                                self.inputs[start : start + batch] = out.to(self.inputs.device, self.inputs.dtype)
                    break
                except torch.OutOfMemoryError:
                    if outputs:
                        raise
                    accs = None
                    batch = halve(batch, f"the statistics pass of block {index}", self.device)
                    self.oom_backoff.append({"block": index, "pass": "hessian", "batch": batch})
        if self.dist is not None:
            with timed(self.phases, "allreduce"):
                for key, acc in accs.items():
                    if hasattr(acc, "all_reduce"):
                        acc.all_reduce(self.dist, modules[key].in_features)
        return accs

    def hessians(self, index: int, block: nn.Module, todo: dict, groups, dtype: torch.dtype,
                 names: Optional[dict] = None, holdout: Optional[int] = None) -> dict:
        """``{rel: H}``: one streamed Hessian per distinct input of the linears in ``todo``; non-finite ones
        stop the run naming the layer (``names[rel]``). With ``sink``, ``hessian_stats`` becomes ``{rel: the
        sink figures of its input}`` (summed over the ranks).

        ``holdout``: every ``holdout``-th calibration window (global indices 0, k, 2k, ...) is held out:
        the values are :class:`~optima_plugin.damping.HeldOutHessian` (fit and held-out Hessians, for
        ``--damp auto``) instead of tensors."""
        owners = input_owners(todo, groups)
        hooked_on = {rel: todo[rel] for rel in sorted(set(owners.values()))}
        if holdout is not None:
            return self._held_out_hessians(index, block, todo, owners, hooked_on, dtype, names or {}, holdout)
        accs = self.statistics(index, block, hooked_on, lambda: HessianAccumulator(dtype, self.sink))
        if self.dist is not None:  # H = Σ n_r H_r / Σ n_r: the same on every rank
            with timed(self.phases, "allreduce"):
                for rel, acc in accs.items():
                    d = hooked_on[rel].in_features
                    acc.hessian, acc.tokens = self.dist.mean(acc.hessian, acc.tokens, (d, d), dtype)
                    if acc.sink_counts is not None:
                        self.dist.sum_(acc.sink_counts)
        self.hessian_stats = {rel: accs[owners[rel]].sink_stats() for rel in todo} if self.sink is not None else {}
        for rel in todo:
            if accs[owners[rel]].hessian is None:
                raise ValueError(f"{(names or {}).get(rel, rel)}: no calibration token is left for its input Hessian "
                                 "(--sink_tokens exclude flagged them all); use --sink_tokens cap, fewer "
                                 "--sink_positions, a larger --sink_factor or a longer --seqlen")
            check_finite(accs[owners[rel]].hessian, f"{(names or {}).get(rel, rel)}: its input Hessian")
        return {rel: accs[owners[rel]].hessian for rel in todo}

    def dense_statistics(self, index: int, block: nn.Module, dense_block: nn.Module, todo: dict, groups,
                         dtype: torch.dtype, names: Optional[dict] = None) -> dict[str, DenseTerms]:
        """``{rel: DenseTerms}`` of the linears in ``todo`` (``--objective dense``).

        ``dense_block``: a dense copy of block ``index``; ``block`` may be partly pruned already (the linears
        of earlier input groups): each linear's ``x_p`` must be what it sees once the linears before it are
        pruned, or a later linear corrects again an error an earlier one has corrected already. Per chunk of
        windows ``dense_block`` runs on the dense inputs (hooks keep each linear's ``x_d`` and its output
        energy), then ``block`` on the pruned-path inputs of the same windows (hooks pair ``x_p`` with
        ``x_d``: ``H`` and ``G``). Under torchrun all are all-reduced token-weighted. Out of memory starts over
        with half the batch; non-finite terms name the layer. The dense inputs advance in :meth:`propagate`.
        """
        if self.dense_inputs is None:
            raise RuntimeError("dense_statistics needs a pipeline built with track_dense=True and captured")
        owners = input_owners(todo, groups)
        hooked_on = {rel: todo[rel] for rel in sorted(set(owners.values()))}
        twins = {rel: dense_block.get_submodule(_path(block, lin)) for rel, lin in todo.items()}
        with timed(self.phases, "statistics"):
            pairs, energies = self._dense_pass(index, block, dense_block, hooked_on, twins, todo, dtype)
        if self.dist is not None:
            with timed(self.phases, "allreduce"):
                for rel, acc in pairs.items():
                    acc.all_reduce(self.dist, hooked_on[rel].in_features)
                for rel, acc in energies.items():
                    acc.all_reduce(self.dist, todo[rel].out_features)
        out = {}
        for rel in todo:
            pair, name = pairs[owners[rel]], (names or {}).get(rel, rel)
            check_finite(pair.hessian, f"{name}: its input Hessian")
            check_finite(pair.cross, f"{name}: its dense/pruned input cross term")
            check_finite(energies[rel].energy, f"{name}: its dense output energy")
            out[rel] = DenseTerms(pair.hessian, pair.cross, energies[rel].energy, pair.tokens)
        return out

    def _dense_pass(self, index, block, dense_block, hooked_on, twins, todo, dtype) -> tuple[dict, dict]:
        """The forwards of :meth:`dense_statistics`: ``(pairs, energies)`` accumulators."""
        batch = self.batch_size
        with torch.no_grad():
            while True:
                phase = Phase()
                try:
                    with hooked(hooked_on, lambda: CrossAccumulator(dtype, phase), twins, self.phases) as pairs, \
                            hooked({rel: twins[rel] for rel in todo}, lambda: OutputEnergy(dtype, phase),
                                   phases=self.phases) as energies:
                        for start in range(0, self.inputs.shape[0], batch):
                            phase.dense = True
                            self._run(dense_block, index, self.dense_inputs[start : start + batch])
                            phase.dense = False
                            self._run(block, index, self.inputs[start : start + batch])
                    break
                except torch.OutOfMemoryError:
                    pairs = energies = None
                    batch = halve(batch, f"the dense-objective statistics pass of block {index}", self.device)
                    self.oom_backoff.append({"block": index, "pass": "dense_statistics", "batch": batch})
        return pairs, energies

    def _held_out_hessians(self, index, block, todo, owners, hooked_on, dtype, names, every) -> dict:
        """:meth:`hessians` split into fit and held-out windows (each half all-reduced under torchrun)."""
        from .damping import HeldOutAccumulator

        accs = self.statistics(index, block, hooked_on, lambda: HeldOutAccumulator(dtype, every, self.first_window,
                                                                                        self.sink))
        held = {}
        with timed(self.phases, "hessian"):  # the fit and held-out Hessians (all-reduced under torchrun)
            for rel, acc in accs.items():
                d = hooked_on[rel].in_features
                held[rel] = acc.result((d, d), self.dist)
        for rel in todo:
            h = held[owners[rel]]
            check_finite(h.fit, f"{names.get(rel, rel)}: its input Hessian (fit windows)")
            check_finite(h.val, f"{names.get(rel, rel)}: its input Hessian (held-out windows)")
        return {rel: held[owners[rel]] for rel in todo}

    def propagate(self, index: int, block: nn.Module, *, dense: bool = False) -> None:
        """Replace the inputs in place by block ``index``'s outputs (halving the batch on out-of-memory);
        ``dense``: the dense model's inputs (``--objective dense``; ``block`` is then the dense copy)."""
        with timed(self.phases, "propagation"):
            self._propagate(index, block, dense)

    def _propagate(self, index: int, block: nn.Module, dense: bool) -> None:
        inputs, kwargs = (self.dense_inputs if dense else self.inputs), self.kwargs[index]
        start, batch = 0, self.batch_size
        with torch.no_grad():
            while start < inputs.shape[0]:
                try:
                    chunk = inputs[start : start + batch].to(self.device)
                    out = run_block(block, chunk, batch_kwargs(kwargs, self.batch_size, chunk.shape[0]))
                except torch.OutOfMemoryError:
                    batch = halve(batch, f"the output pass of block {index}", self.device)
                    self.oom_backoff.append({"block": index, "pass": "propagate", "batch": batch})
                    continue
                inputs[start : start + batch] = out.to(inputs.device, inputs.dtype)
                start += batch


    def unit_io(self, index: int, block: nn.Module, unit: nn.Module, inputs: Tensor, *,
                output: bool = False) -> "UnitIO":
        """Block ``index`` run over ``inputs`` (this process's windows, chunks of ``batch_size``) up to ``unit``,
        a submodule of ``block`` (or ``block`` itself): the tensor ``unit`` is called with, per window, or with
        ``output`` what it returns (its first element when a tuple), concatenated on ``storage`` (no gradient).

        The rest of the block is not run: a hook stops each forward once ``unit`` has been seen. The kwargs
        ``unit`` was called with on the first chunk ride along (see :class:`UnitIO`)."""
        seen: list = []
        first: dict = {}

        def pre(module, args, kwargs):
            if not first:
                first.update(kwargs=dict(kwargs), keyword=not args, count=None)
            x = args[0] if args else kwargs["hidden_states"]
            seen.append(x.detach().to(self.storage))
            raise _UnitSeen

        def post(module, args, out):
            seen.append((out[0] if isinstance(out, (tuple, list)) else out).detach().to(self.storage))
            raise _UnitSeen

        handle = unit.register_forward_hook(post) if output else \
            unit.register_forward_pre_hook(pre, with_kwargs=True)
        try:
            with torch.no_grad():
                for start in range(0, inputs.shape[0], self.batch_size):
                    chunk = inputs[start : start + self.batch_size].to(self.device)
                    try:
                        run_block(block, chunk, batch_kwargs(self.kwargs[index], self.batch_size, chunk.shape[0]))
                    except _UnitSeen:
                        pass
                    if "count" in first and first["count"] is None:
                        first["count"] = chunk.shape[0]
        finally:
            handle.remove()
        if len(seen) != -(-inputs.shape[0] // self.batch_size):
            raise RuntimeError(f"block {index}: the unit was called {len(seen)} times over the windows' forwards; "
                               "expected once per forward")
        kwargs = {k: v for k, v in first.get("kwargs", {}).items() if k != "hidden_states"}
        return UnitIO(torch.cat(seen), kwargs, bool(first.get("keyword", False)), first.get("count") or 0)


class _UnitSeen(Exception):
    """Raised by :meth:`BlockPipeline.unit_io`'s hook: the rest of the block's forward is not needed."""


@dataclass
class UnitIO:
    """What :meth:`BlockPipeline.unit_io` captured: ``tensor`` ``(n, ...)`` per window; ``kwargs`` the unit's
    keyword arguments on the first forward of ``count`` windows (cut with :func:`batch_kwargs` for fewer);
    ``keyword``: whether the tensor was passed as ``hidden_states=`` rather than positionally."""

    tensor: Tensor
    kwargs: dict
    keyword: bool
    count: int


def _path(block: nn.Module, module: nn.Module) -> str:
    """The dotted name of ``module`` inside ``block``."""
    return next(name for name, m in block.named_modules() if m is module)
