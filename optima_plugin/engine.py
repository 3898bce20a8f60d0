"""Block-by-block sequential pruning of a decoder-only model.

    capture block-0 inputs and every block's call kwargs
    for each block:
        onload to the device
        pass 1: forward hooks stream one Hessian per distinct input
                (--objective dense: also the dense inputs' cross term; see optima_plugin.objective)
        per linear: allocate ratio → select mask → update weights → keep the better
        pass 2: recompute the block's outputs with the pruned block (next inputs)
        offload

The loop itself (capture, onload, hooked statistics pass, propagate, offload,
out-of-memory back-off) is :class:`~optima_plugin.pipeline.BlockPipeline`; the
engine adds the per-linear work, checkpoints, Ctrl-C and the report. With a
:class:`~optima_plugin.streaming.StreamedModel` the blocks are read from disk at
onload and each pruned block is written out as a shard before it is freed.

The engine knows no selector, allocator, updater or solver by name: it looks
them up in the plugin registries and announces its progress through the event
hooks (see :mod:`optima_plugin.hookspecs`).
"""

from __future__ import annotations

import copy
import logging
import random
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch import Tensor, nn

from .acceptance import error_ratio, keep_better
from .allocators import AllocationContext, resolve_layer_ratios, row_summary
from .checkpoint import Checkpoint, blocks_done, RunInterrupted, WriteFailed, run_identity, stop_after_block
from .compress import Compression
from .config import PruneConfig
from .damping import HOLDOUT_EVERY, is_auto, layer_inputs
from .data import get_calibration
from .distributed import SyncedSelector, current as current_job
from .hessian import SinkTokens, layer_shrink, shrink_to_diagonal
from .local_reconstruction import Settings as ReconstructSettings, check_model as check_reconstruct, \
    reconstruct_block
from .models import ModelAdapter, block_linears, get_adapter, input_groups, is_attention
from .objective import DenseTerms, dense_objective, dense_target
from .pipeline import BlockPipeline, NonFiniteError, check_finite  # noqa: F401 (NonFiniteError: re-exported)
from .plugins import get_plugin_manager, lookup
from .solvers.problem import reconstruction_error
from .timing import Phases, timed
from .updaters import UpdateOptions
from .validate import resolve

log = logging.getLogger(__name__)


@dataclass
class LayerResult:
    """What happened to one linear layer (one row of the report's ``layers``)."""

    name: str
    block: int
    shape: list
    ratio: float
    sparsity: float
    error_ratio: Optional[float]
    objective: Optional[float]
    mask_objective: Optional[float]
    accepted: bool
    seconds: float
    update: dict = field(default_factory=dict)
    rows: Optional[dict] = None  # per-row ratio summary (min/max/mean/std) and row allocator stats
    selection: dict = field(default_factory=dict)  # the selector's figures (SparseGPT/Thanos: damp used)
    compression: Optional[dict] = None  # quantization / low-rank figures (optima_plugin.compress)
    hessian_stats: Optional[dict] = None  # attention-sink tokens of its input (optima_plugin.hessian)
    refine: Optional[dict] = None  # --refine_mask: objective before/after, rows changed, swaps (optima_plugin.refine)
    # the figures of the problem the solver solved (--hessian_shrink: the shrunk H; --objective dense with a shrink:
    # the distance to its target rows under that H); the headline ones above are on the true, unshrunk statistics
    solved_objective: Optional[float] = None
    solved_mask_objective: Optional[float] = None
    solved_error_ratio: Optional[float] = None

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_device(name: str) -> torch.device:
    """``auto`` → ``cuda`` when a GPU is present, else ``cpu``; ``cuda`` without a GPU fails."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return torch.device(name)


def blocks_path(adapter: ModelAdapter) -> str:
    """The dotted name of the decoder block list inside the model (e.g. ``model.layers``)."""
    for name, module in adapter.model.named_modules():
        if module is adapter.blocks:
            return name
    raise ValueError("the adapter's block list is not a submodule of its model")


def prunable_linears(adapter: ModelAdapter, skip_attention: bool) -> dict[str, nn.Linear]:
    """``{full name: linear}`` of every linear the run prunes, in block order."""
    prefix = blocks_path(adapter)
    out = {}
    for i, block in enumerate(adapter.blocks):
        for rel, lin in block_linears(block).items():
            if skip_attention and is_attention(rel):
                continue
            out[f"{prefix}.{i}.{rel}"] = lin
    return out


def check_seqlen(model: nn.Module, seqlen: int) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and seqlen > limit:
        raise ValueError(f"--seqlen {seqlen} is beyond the model's context of {limit} tokens")


def warn_small_calibration(linears: dict[str, nn.Linear], nsamples: int, seqlen: int, weight_update: str) -> None:
    """Warn when fewer calibration tokens than a layer's input width make its Hessian singular.

    With ``nsamples * seqlen < in_features`` the update can fit the calibration
    tokens exactly and overfit them (higher perplexity than the mask alone).
    """
    if weight_update == "none":
        return
    widest = max((lin.in_features for lin in linears.values()), default=0)
    if nsamples * seqlen < widest:
        log.warning("%d calibration tokens (--nsamples %d x --seqlen %d) are fewer than the widest layer input (%d): "
                    "its Hessian is singular and the %s update may overfit; use at least %d tokens",
                    nsamples * seqlen, nsamples, seqlen, widest, weight_update, widest)


#: loggers whose lines about one layer (damping escalated, not converged, ...) do not know its name
_SOLVER_LOGGERS = ("optima_plugin.solvers.reconstruct", "optima_plugin.solvers.problem", "optima_plugin.damping")


@contextmanager
def _named_solver_logs(name: str) -> Iterator[None]:
    """While a layer is pruned, the solvers' log lines start with its name."""

    def tag(record: logging.LogRecord) -> bool:
        record.msg = f"{name}: {record.msg}"
        return True

    loggers = [logging.getLogger(n) for n in _SOLVER_LOGGERS]
    for lg in loggers:
        lg.addFilter(tag)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(tag)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's random generators (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class LinearWork:
    """What each linear's select → update → refine → compress needs (the run's; ``options`` per layer)."""

    selector: Any
    updater: Any
    options: UpdateOptions
    pattern: Any
    compression: Optional[Compression] = None
    config: Optional[PruneConfig] = None
    row_allocator: Any = None


@dataclass
class LayerStats:
    """One linear's ratio and calibration statistics.

    ``hessian`` (and ``dense_terms``) are what the selector, row allocator, updater and compression solve
    with: under ``--hessian_shrink`` the shrunk statistics. ``true_hessian`` / ``true_terms``: the unshrunk
    ones (None: nothing was shrunk, the same as ``hessian`` / ``dense_terms``)."""

    hessian: Optional[Tensor]
    ratio: Any
    dense_terms: Optional[DenseTerms] = None
    true_hessian: Optional[Tensor] = None
    true_terms: Optional[DenseTerms] = None


@dataclass
class _Run:
    """One :func:`prune_model` call's state, shared by its stages."""

    config: PruneConfig
    model: nn.Module
    adapter: ModelAdapter
    linears: dict
    device: torch.device
    offload: bool
    stream: Any
    dist: Any
    work: LinearWork
    allocator: Any
    progress: bool
    checkpoint: Optional[Checkpoint] = None
    resume: Any = None
    start: int = 0
    ratios: Optional[dict] = None
    oom_backoff: list = field(default_factory=list)
    pm: Any = None
    report: Any = None  # the ReportObserver: the report's layers and block seconds
    phases: Phases = field(default_factory=Phases)  # the report's timings.phases
    shown: Any = None  # the ProgressObserver
    reconstruction: list = field(default_factory=list)  # the report's reconstruction: one entry per block

    @property
    def num_blocks(self) -> int:
        return len(self.adapter.blocks)

    @property
    def prefix(self) -> str:
        return blocks_path(self.adapter)


@dataclass
class _Block:
    """The block being pruned: ``todo`` its linears to prune (``{rel: linear}``), ``names`` their full names,
    ``dense`` its dense copy (``--objective dense``: the statistics' dense path), ``reference`` the dense copy
    ``--reconstruct`` matches and the dense inputs advance with (the same object under both)."""

    index: int
    module: nn.Module
    names: dict
    todo: dict
    groups: list
    dense: Optional[nn.Module] = None
    reference: Optional[nn.Module] = None


def prune_model(model: nn.Module, tokenizer, config: PruneConfig, *, progress: bool = True,
                stream=None) -> dict:
    """Prune ``model`` in place as ``config`` says; return the JSON-ready report.

    ``stream``: a :class:`~optima_plugin.streaming.StreamedModel` whose skeleton is
    ``model``: each block is read from disk at its turn, and its pruned tensors are
    written to ``stream.staging`` instead of staying in memory.

    The report holds ``sparsity`` (zero fraction over the pruned linears),
    ``layers`` (one :class:`LayerResult` dict each), ``summary`` (counts of layers
    whose solver did not converge or whose update was rejected), ``options`` and
    ``timings``. With ``config.checkpoint_dir`` every finished block is recorded
    there and a run started again resumes at the first unfinished block; Ctrl-C
    then stops after the current block (:class:`~optima_plugin.checkpoint.RunInterrupted`).

    Stages: :func:`_prepare` → :func:`_allocate` → :func:`_capture` → :func:`_prune_blocks` (per block:
    statistics → per linear :func:`_prune_linear`: select → update → refine → compress → record →
    checkpoint) → :func:`_report`.
    """
    from .observers import ProgressObserver, ReportObserver

    run = _prepare(model, config, progress, stream)
    run.pm, run.shown, run.report = get_plugin_manager(), ProgressObserver(disable=not progress), ReportObserver()
    if run.resume:
        run.report.layers, run.report.block_seconds = list(run.resume.layers), list(run.resume.block_seconds)
        run.reconstruction = list(run.resume.reconstruction)
    for obs in (run.shown, run.report):
        run.pm.register(obs)
    try:
        t_start = time.perf_counter()
        tokens, t_alloc = _allocate(run, tokenizer)
        pipe = _capture(run, tokens)
        t_capture = time.perf_counter() - t_start - t_alloc
        _prune_blocks(run, pipe)
        report = _report(run, pipe, {"capture_seconds": t_capture, "allocation_seconds": t_alloc,
                                     "block_seconds": run.report.block_seconds,
                                     "prune_seconds": time.perf_counter() - t_start,
                                     "phases": run.phases.to_dict(),
                                     "solver_iterations": _solver_iterations(run.report.layers)})
        run.pm.hook.optima_run_done(report=report)
        return report
    except Exception as e:
        if run.checkpoint is not None and blocks_done(run.checkpoint.dir) and (run.dist is None or run.dist.is_main()) \
                and not isinstance(e, WriteFailed):  # a WriteFailed says which blocks are kept
            log.error("the finished blocks are saved in %s; fix the problem and run the same command to resume",
                      run.checkpoint.dir)
        raise
    finally:
        for obs in (run.shown, run.report):
            run.pm.unregister(obs)


def _prepare(model: nn.Module, config: PruneConfig, progress: bool, stream) -> _Run:
    """Validate, seed, look the plugins up, find the linears, open the checkpoint: all before calibration."""
    config = resolve(config)  # a resolved config is returned as it is; the lookups below cannot fail
    seed_everything(config.seed)
    selector = lookup("selectors", config.prune_method, "--prune_method")
    device = resolve_device(config.device)
    dist = current_job()  # under torchrun: this rank's share of the windows, its rows of every solve
    if dist is not None:
        selector = SyncedSelector(selector, dist)
        if device.type == "cuda":  # rank r on its node's GPU LOCAL_RANK
            device = torch.device("cuda", dist.local_rank)
    offload = True if stream is not None else (config.offload if config.offload is not None
                                                else device.type == "cuda")
    adapter = get_adapter(model)
    check_seqlen(model, config.seqlen)
    linears = prunable_linears(adapter, config.skip_attention)
    check_reconstruct(config.reconstruct, adapter.blocks[0])
    for name, lin in linears.items():
        config.pattern.check_columns(lin.in_features, name)
    if hasattr(selector, "prepare"):  # e.g. ``file``: its masks matched to the linears before any calibration
        selector.prepare(config, linears, blocks_path(adapter))
    work = LinearWork(selector, lookup("updaters", config.weight_update, "--weight_update"),
                      UpdateOptions(config.solver, config.damp, config.tol, config.max_iter,
                                    config.double_precision, split=dist),
                      config.pattern, Compression.from_config(config, lookup), config,
                      lookup("row_allocators", config.row_allocation, "--use_trim") if config.row_allocation else None)
    run = _Run(config, model, adapter, linears, device, offload, stream, dist, work,
               lookup("allocators", config.allocation, "--allocation"), progress)
    _open_checkpoint(run)
    for name, lin in linears.items():  # every weight, before calibration (streamed: each block at its turn)
        if not lin.weight.is_meta:
            check_finite(lin.weight.detach(), f"{name}: its weights")
    warn_small_calibration(linears, config.nsamples, config.seqlen, config.weight_update)
    return run


def _open_checkpoint(run: _Run) -> None:
    """``--checkpoint_dir``: begin it, or resume from it (restore the finished blocks)."""
    config, stream = run.config, run.stream
    if not config.checkpoint_dir:
        return
    run.checkpoint = Checkpoint(config.checkpoint_dir, run_identity(config.to_dict(), run.model, stream), run.dist)
    run.resume = run.checkpoint.load()
    if run.resume is None:
        run.checkpoint.begin(run.num_blocks)  # state.json first: the folder is known as this tool's from now on
        return
    run.start, run.oom_backoff = run.resume.next_block, list(run.resume.oom_backoff)
    if stream is not None:
        lost = [j for j in range(run.start) if not stream.has_block(j)]
        if lost:
            raise ValueError(f"--checkpoint_dir {config.checkpoint_dir} lacks the shards of blocks {lost[:5]}; "
                             "delete that folder to start over")
    else:
        run.checkpoint.restore(run.adapter.blocks, run.start)
    log.info("resuming from %s: blocks 0..%d of %d are pruned already", config.checkpoint_dir, run.start - 1,
             run.num_blocks)


def _allocate(run: _Run, tokenizer) -> tuple[Tensor, float]:
    """Each linear's ratio (a ratio file before calibration); the calibration tokens and the seconds spent."""
    config = run.config
    with run.phases.phase("calibration"):  # a ratio file, the calibration windows, the model to the device
        run.ratios = _layer_ratios(run, None)
        tokens = get_calibration(config.calibration_dataset, tokenizer, config.nsamples, config.seqlen, config.seed)
        if not run.offload:
            run.model.to(run.device)
    t_alloc = time.perf_counter()
    if run.ratios is None:
        with run.phases.phase("allocation"):
            run.ratios = _layer_ratios(run, tokens)
    return tokens, time.perf_counter() - t_alloc


def _capture(run: _Run, tokens: Tensor) -> BlockPipeline:
    """The pipeline with the first block's inputs: captured, or the checkpoint's when resuming."""
    config, start, checkpoint = run.config, run.start, run.checkpoint
    pipe = BlockPipeline(run.adapter, device=run.device, batch_size=config.batch_size,
                         storage=torch.device("cpu") if run.offload else run.device,
                         offload="cpu" if run.offload else None, oom_backoff=run.oom_backoff, stream=run.stream,
                         dist=run.dist, track_dense=config.objective == "dense" or config.reconstruct != "none",
                         sink=SinkTokens.from_config(config), phases=run.phases)
    with run.phases.phase("capture"):
        inputs = pipe.capture(tokens)
    if run.resume and start < run.num_blocks:
        with run.phases.phase("checkpoint"):  # the checkpoint's inputs of the first unfinished block
            checkpoint.check_inputs(start)  # under torchrun: every rank's share, or an error on every rank
            pipe.inputs = inputs = checkpoint.inputs(start).to(device=pipe.storage, dtype=inputs.dtype)
            if pipe.track_dense:
                pipe.dense_inputs = checkpoint.dense_inputs(start).to(device=pipe.storage, dtype=inputs.dtype)
                check_finite(pipe.dense_inputs, f"the checkpoint's dense-model inputs of block {start}")
    check_finite(inputs, "the inputs of block 0 (the embedding outputs)" if start == 0
                 else f"the checkpoint's inputs of block {start}")
    return pipe


def _prune_blocks(run: _Run, pipe: BlockPipeline) -> None:
    """The pipeline's loop from the first unfinished block: prune each, write it out, checkpoint it."""
    config, num_blocks, prefix = run.config, run.num_blocks, run.prefix
    run.pm.hook.optima_run_started(config=config, num_blocks=num_blocks)
    run.shown.skip(run.start)
    started = {}

    def before(i: int) -> None:
        started[i] = time.perf_counter()
        seed_everything(config.seed + i)  # each block's randomness independent of the blocks before it
        run.pm.hook.optima_block_started(index=i, num_blocks=num_blocks)

    def after(i: int, block: nn.Module) -> None:
        check_finite(pipe.inputs, f"the outputs of block {i} ({prefix}.{i})")
        if run.stream is not None and (run.dist is None or run.dist.is_main()):
            with run.phases.phase("stream"):
                run.stream.write_block(i, block)

    with stop_after_block(enabled=run.checkpoint is not None) as stop:
        pipe.run(range(run.start, num_blocks), lambda i, block: _prune_block(run, pipe, i, block), before=before,
                 after=after, done=lambda i: _block_done(run, pipe, i, time.perf_counter() - started[i], stop))


def _block_done(run: _Run, pipe: BlockPipeline, i: int, seconds: float, stop) -> None:
    """Checkpoint block ``i`` (offloaded), announce it, and stop here when Ctrl-C asked for it."""
    num_blocks, checkpoint = run.num_blocks, run.checkpoint
    if checkpoint is not None:
        with run.phases.phase("checkpoint"):
            checkpoint.save(i, None if run.stream is not None else run.adapter.blocks[i],  # streamed: the shard
                            pipe.inputs if i + 1 < num_blocks else None, num_blocks=num_blocks,
                            ratios=run.ratios, layers=run.report.layers,
                            block_seconds=run.report.block_seconds + [seconds], oom_backoff=run.oom_backoff,
                            next_dense=pipe.dense_inputs if i + 1 < num_blocks else None,
                            reconstruction=run.reconstruction)
    run.pm.hook.optima_block_done(index=i, num_blocks=num_blocks, seconds=seconds)
    requested = stop.requested
    if run.dist is not None and checkpoint is not None:  # the ranks stop after the same block
        requested = bool(run.dist.max_int(int(requested)))
    if requested and i + 1 < num_blocks:
        raise RunInterrupted(f"interrupted after block {i} of {num_blocks}: blocks 0..{i} are saved in "
                             f"{run.config.checkpoint_dir}; run the same command again to resume")


def _prune_block(run: _Run, pipe: BlockPipeline, i: int, module: nn.Module) -> None:
    """Block ``i``: its statistics, then per linear select → update → refine → compress → record; then
    ``--reconstruct`` (:mod:`optima_plugin.local_reconstruction`); the dense copy's outputs advance the dense
    inputs (``--objective dense``, ``--reconstruct``)."""
    names = {rel: f"{run.prefix}.{i}.{rel}" for rel in block_linears(module)}
    todo = {rel: block_linears(module)[rel] for rel, full in names.items() if full in run.linears}
    if run.stream is not None:
        for rel, lin in todo.items():
            check_finite(lin.weight.detach(), f"{names[rel]}: its weights")
    # --objective dense: each input group's H, G and ‖wX_d‖² after the groups before it are pruned,
    # against a dense copy of the block (which then advances the dense inputs)
    reference = copy.deepcopy(module) if pipe.track_dense else None
    block = _Block(i, module, names, todo, input_groups(module),
                   reference if run.config.objective == "dense" else None, reference)
    terms, hessians = {}, {}
    if block.dense is None and not run.config.input_recalc:
        hessians = pipe.hessians(i, module, todo, block.groups, _hdtype(run), names, _holdout(run))
    for rel, lin in todo.items():
        if rel not in hessians:  # this input group's statistics, after those before it
            terms, hessians = _group_statistics(run, pipe, block, rel)
        _prune_one(run, pipe, block, rel, hessians[rel], terms.get(rel))
    del hessians, terms
    if run.config.reconstruct != "none":  # before the dense inputs advance: it matches the dense copy on them
        with run.phases.phase("reconstruct"):
            run.reconstruction.append(reconstruct_block(pipe, i, module, block.reference, todo,
                                                        ReconstructSettings.from_config(run.config)))
    if block.reference is not None:
        pipe.propagate(i, block.reference, dense=True)
        check_finite(pipe.dense_inputs, f"the dense model's outputs of block {i}")


def _hdtype(run: _Run) -> torch.dtype:
    return torch.float64 if run.config.double_precision else torch.float32


def _holdout(run: _Run) -> Optional[int]:
    """--damp auto: every how many windows one is held out (fit and held-out Hessians)."""
    return HOLDOUT_EVERY if is_auto(run.config.damp) else None


def _group_statistics(run: _Run, pipe: BlockPipeline, block: _Block, rel: str) -> tuple[dict, dict]:
    """``(terms, hessians)`` of the input group of ``rel`` (``--input_recalc`` / ``--objective dense``)."""
    todo, groups = block.todo, block.groups
    group = {g: todo[g] for g in next(g for g in groups if rel in g) if g in todo}
    if block.dense is not None:
        terms = pipe.dense_statistics(block.index, block.module, block.dense, group, groups, _hdtype(run),
                                      block.names)
        return terms, {r: t.hessian for r, t in terms.items()}
    return {}, pipe.hessians(block.index, block.module, group, groups, _hdtype(run), block.names, _holdout(run))


def _prune_one(run: _Run, pipe: BlockPipeline, block: _Block, rel: str, hessian, true_terms) -> None:
    """Shrink the statistics as ``--hessian_shrink`` says, prune linear ``rel``, record it."""
    name = block.names[rel]
    true_hessian, layer_options = layer_inputs(hessian, run.work.options)
    # the report's headline figures are on true_hessian / true_terms, unshrunk
    shrink = layer_shrink(run.config.hessian_shrink, run.ratios[name])
    solved = shrink_to_diagonal(true_hessian, shrink)  # what selection and update solve with
    solved_terms = true_terms
    if true_terms is not None and shrink:
        solved_terms = replace(true_terms, hessian=solved, cross=shrink_to_diagonal(true_terms.cross, shrink))
    stats = LayerStats(solved, run.ratios[name], solved_terms, true_hessian if shrink else None,
                       true_terms if shrink else None)
    with _named_solver_logs(name):
        result = _prune_linear(name, block.index, block.todo[rel], stats, replace(run.work, options=layer_options),
                               run.phases)
    result.hessian_stats = pipe.hessian_stats.get(rel)
    result.update["hessian_shrink"] = shrink
    run.pm.hook.optima_layer_done(result=result)


def _report(run: _Run, pipe: BlockPipeline, timings: dict) -> dict:
    """The JSON-ready report of a completed run."""
    config, layers = run.config, run.report.layers
    report = {
        "completed": True,
        "sparsity": _sparsity(layers),
        "summary": summarize(layers),
        "options": config.to_dict(),
        "device": str(run.device),
        "offload": run.offload,
        "stream": run.stream is not None,
        "layers": layers,
        "allocation": {"method": config.allocation, "rows": config.row_allocation,
                       "loaded_from": config.load_layer_ratio},
        "resumed_from_block": run.start if run.resume else None,
        "oom_backoff": run.oom_backoff,
        "timings": timings,
    }
    if config.reconstruct != "none":
        report["reconstruction"] = run.reconstruction
    if run.dist is not None:
        report["distributed"] = distributed_summary(run.dist, report["timings"], pipe.inputs.shape[0])
    return report


def _layer_ratios(run: _Run, tokens: Optional[Tensor]) -> Optional[dict]:
    """Each linear's ratio: from the checkpoint, the N:M pattern, a ratio file, or the allocator.

    Without ``tokens`` only what needs no calibration is resolved (so a bad ratio
    file fails before calibration); None means: call again with the tokens.
    """
    config, pattern = run.config, run.config.pattern
    if run.resume is not None:
        return run.resume.ratios
    if pattern.structured:
        return {name: pattern.ratio for name in run.linears}
    if tokens is None and not config.load_layer_ratio:
        return None
    context = AllocationContext(run.model, run.adapter, config.sparsity_ratio, run.linears, config=config,
                                tokens=tokens, device=run.device, offload=run.offload, progress=run.progress,
                                stream=run.stream, dist=current_job())
    return resolve_layer_ratios(run.allocator, context)



def distributed_summary(dist, timings: dict, windows: int) -> dict:
    """The report's ``distributed`` entry: world size, backend, and each rank's windows and times (gathered)."""
    mine = {"rank": dist.rank, "windows": windows, "prune_seconds": timings["prune_seconds"],
            "block_seconds_total": sum(timings["block_seconds"])}
    return {"world_size": dist.world_size, "backend": dist.backend, "ranks": dist.gather_object(mine)}


def _solver_iterations(layers: list) -> int:
    """The update solvers' iterations summed over the report's layers (PCG's, or the chosen solver's)."""
    return sum(int(x.get("update", {}).get("iterations") or 0) for x in layers)


def summarize(layers: list) -> dict:
    """Counts over the report's layers: solver non-convergence, rejected updates, damping escalated
    (by the update's solver or by the selector's own factorisation)."""
    nonconverged = [x["name"] for x in layers if x.get("update", {}).get("converged") is False]
    rejected = [x["name"] for x in layers if not x.get("accepted", True)]
    damped = [x["name"] for x in layers
              if x.get("update", {}).get("damp_escalated") or x.get("selection", {}).get("damp_escalated")]
    ratios = [x["error_ratio"] for x in layers if x.get("error_ratio") is not None]
    solved = [x["solved_error_ratio"] for x in layers if x.get("solved_error_ratio") is not None]
    return {"layers": len(layers), "nonconverged": len(nonconverged), "nonconverged_layers": nonconverged,
            "rejected_updates": len(rejected), "rejected_layers": rejected,
            "damp_escalated": len(damped), "damp_escalated_layers": damped,
            "mean_error_ratio": sum(ratios) / len(ratios) if ratios else None,
            "mean_solved_error_ratio": sum(solved) / len(solved) if solved else None}


def _prune_linear(name: str, block_index: int, lin: nn.Linear, stats: LayerStats, work: LinearWork,
                  phases: Optional[Phases] = None) -> LayerResult:
    """Select, update, refine, keep the better of update and mask only, write the weights, compress.

    The headline ``objective``, ``mask_objective`` and ``error_ratio`` (and the keep-the-better check) are
    measured on the true statistics (:class:`LayerStats`); ``solved_*`` are the same figures of the problem
    the updater solved (equal to the headline ones when nothing was shrunk, computed once).

    ``stats.dense_terms`` (``--objective dense``): the updater solves for the target rows ``T`` of
    :func:`~optima_plugin.objective.dense_target`; the headline objectives are the dense objective
    :func:`~optima_plugin.objective.dense_objective` ``‖W X_d − Ŵ X_p‖²/N`` of the update and of the mask-only
    dense weights on the true statistics, and under a shrink the solved ones are the solver's own objective,
    ``Σ_rows (ŵ − t)ᵀ H (ŵ − t)`` with the shrunk ``H``.

    ``phases``: the run's timer (``selection``, ``update``, ``refinement``, ``objectives``, ``compression``).
    """
    t0 = time.perf_counter()
    dense, hessian, config = lin.weight.detach(), stats.hessian, work.config
    if _nothing_to_prune(stats, work):
        with timed(phases, "compression"):
            return _compress_only(name, block_index, lin, stats, work, t0)
    with timed(phases, "selection"):
        ratio, rows = _row_ratios(dense, stats, work)
        named = {"name": name} if getattr(work.selector, "needs_name", False) else {}
        selection = work.selector.select(_working(dense), hessian, ratio, work.pattern, **named)
    with timed(phases, "update"):
        upd, target = _update(dense, selection, stats, work)
    mask_only = dense.masked_fill(selection.pruned, 0)  # the selector's mask: mask_objective stays its figure
    refined, selected = None, selection
    if config is not None and config.refine_mask != "none" and hessian is not None:
        with timed(phases, "refinement"):
            selection, upd, refined = _refine(selection, upd, dense, hessian, work)
    new = upd.weight.to(dense.dtype)
    check_finite(new, f"{name}: the weights of the {work.updater.name} update")
    accepted, ratio_true, ratio_solved = True, None, None
    with timed(phases, "objectives"):
        objective, mask_objective, solved, solved_mask = _objectives(dense, new, mask_only, target, upd, stats)
    if objective is not None:
        kept = keep_better(objective, mask_objective, baseline=mask_objective)  # on the true statistics
        if not kept.accepted:
            log.warning("%s: update is worse than the mask alone (%.4g > %.4g); keeping the mask only",
                        name, objective, mask_objective)
            new, accepted, selection, solved = mask_only, False, selected, solved_mask
        objective, ratio_true, ratio_solved = kept.objective, kept.error_ratio, error_ratio(solved, solved_mask)
    compression = work.compression
    original = dense.clone() if compression is not None else None  # ``dense`` is the parameter, written next
    with torch.no_grad():
        lin.weight.copy_(new.masked_fill(selection.pruned, 0))
    sparsity = float((lin.weight == 0).float().mean())  # of the pruned weights (a merged adapter fills them)
    figures = None
    if compression is not None:
        with timed(phases, "compression"):
            figures = compression.apply(name, lin, original, selection.pruned, hessian, true_hessian=stats.true_hessian)
    return LayerResult(
        name=name, block=block_index, shape=list(dense.shape),
        ratio=float(ratio) if not torch.is_tensor(ratio) else float(ratio.double().mean()),
        sparsity=sparsity, error_ratio=ratio_true,
        objective=objective, mask_objective=mask_objective, accepted=accepted,
        seconds=time.perf_counter() - t0, update=upd.stats, rows=rows, selection=selection.stats,
        compression=figures, refine=refined,
        solved_objective=solved, solved_mask_objective=solved_mask, solved_error_ratio=ratio_solved,
    )


def _nothing_to_prune(stats: LayerStats, work: LinearWork) -> bool:
    """Whether the layer keeps every weight: ratio 0 with an unstructured pattern, no row allocator, the
    selector reads the ratio (not ``file``), and the least-squares objective (``--objective dense`` may still
    update the weights towards the dense model's outputs)."""
    return (not torch.is_tensor(stats.ratio) and float(stats.ratio) == 0.0 and not work.pattern.structured
            and work.row_allocator is None and stats.dense_terms is None
            and not getattr(work.selector, "ignores_ratio", False))


def _compress_only(name: str, block_index: int, lin: nn.Linear, stats: LayerStats, work: LinearWork,
                   t0: float) -> LayerResult:
    """A layer with nothing to prune: no selection, no update (its weights stay, its mask is all False, its
    objectives 0, or None without statistics); then the compression stage as for a pruned layer."""
    dense = lin.weight.detach()
    pruned = torch.zeros(dense.shape, dtype=torch.bool, device=dense.device)
    zero = 0.0 if stats.hessian is not None else None
    sparsity = float((dense == 0).float().mean())  # before compression, as for a pruned layer
    compression = work.compression
    figures = compression.apply(name, lin, dense.clone(), pruned, stats.hessian, true_hessian=stats.true_hessian) \
        if compression is not None else None
    return LayerResult(
        name=name, block=block_index, shape=list(dense.shape), ratio=0.0, sparsity=sparsity,
        error_ratio=None if zero is None else error_ratio(zero, zero), objective=zero, mask_objective=zero,
        accepted=True, seconds=time.perf_counter() - t0, update={}, compression=figures,
        solved_objective=zero, solved_mask_objective=zero,
        solved_error_ratio=None if zero is None else error_ratio(zero, zero))


def _working(dense: Tensor) -> Tensor:
    """The weights the selector and row allocator read: float32/64 (a float16/bfloat16 layer as float32)."""
    return dense.float() if dense.dtype not in (torch.float32, torch.float64) else dense


def _row_ratios(dense: Tensor, stats: LayerStats, work: LinearWork) -> tuple:
    """``(ratio, rows)``: with a row allocator (TRIM) per-row ratios around the layer's and their summary."""
    if work.row_allocator is None:
        return stats.ratio, None
    allocation = work.row_allocator.row_ratios(_working(dense), stats.hessian, stats.ratio, work.selector,
                                               work.config)
    return allocation.ratios, dict(row_summary(allocation.ratios), **allocation.stats)


def _update(dense: Tensor, selection, stats: LayerStats, work: LinearWork) -> tuple:
    """``(update, target)``: the updater's weights for ``selection``; ``--objective dense``: towards the target
    rows ``T`` (float32/64) in place of the dense weights (``target`` None otherwise)."""
    hessian, options, terms = stats.hessian, work.options, stats.dense_terms
    if terms is None:
        return work.updater.update(dense, selection, hessian, options), None
    target, target_damp = dense_target(_working(dense), hessian, terms.cross, options.damp)
    upd = work.updater.update(target, selection, hessian, replace(options, damp=target_damp))
    upd.mask_objective = None  # that is ‖T∘mask − T‖, not the mask-only dense weights' figure
    upd.stats.update(objective_kind="dense", target_damp=target_damp, dense_energy=float(terms.energy.double().sum()))
    upd.target = target  # --refine_mask refines towards T too
    if "damp_escalated" in upd.stats:
        upd.stats["damp_escalated"] = bool(upd.stats["damp_escalated"] or target_damp != options.damp)
    return upd, target


def _objectives(dense: Tensor, new: Tensor, mask_only: Tensor, target, upd, stats: LayerStats) -> tuple:
    """``(objective, mask_objective, solved, solved_mask)`` of the update and the mask alone: the headline
    ones on the true statistics, the solved ones on what the updater solved (None without statistics)."""
    hessian, terms = stats.hessian, stats.dense_terms
    shrunk = stats.true_hessian is not None or stats.true_terms is not None
    objective = mask_objective = solved = solved_mask = None
    if terms is not None:
        truth = stats.true_terms if stats.true_terms is not None else terms
        mask_objective, objective = (dense_objective(dense, w, truth) for w in (mask_only, new))
        if shrunk:  # the solver's objective: the distance to T under the shrunk H (a squared norm)
            solved_mask = reconstruction_error(target, mask_only, hessian)
            solved = upd.objective if upd.objective is not None else reconstruction_error(target, new, hessian)
    elif hessian is not None:  # the updater's own figures when it measured them (one r x d x d product each)
        solved_mask = upd.mask_objective if upd.mask_objective is not None else \
            reconstruction_error(dense, mask_only, hessian)
        solved = upd.objective if upd.objective is not None else reconstruction_error(dense, new, hessian)
        if shrunk:
            mask_objective, objective = (reconstruction_error(dense, w, stats.true_hessian) for w in (mask_only, new))
        else:
            mask_objective, objective = solved_mask, solved
    if not shrunk:
        solved, solved_mask = objective, mask_objective
    return objective, mask_objective, solved, solved_mask


def _refine(selection, upd, dense: Tensor, hessian: Tensor, work: LinearWork) -> tuple:
    """``--refine_mask``: the refined ``(selection, update, stats)`` (:func:`optima_plugin.refine.refine_mask`).

    The target is the dense weights (or ``upd.target`` when an updater provides one). Under torchrun every rank
    refines the same gathered weights with the same arguments, and rank 0's mask and weights are broadcast so
    that all ranks surely end equal.
    """
    from .refine import refine_mask

    options, config = work.options, work.config
    damp = upd.stats.get("damp", options.damp)
    if damp is None or is_auto(damp):  # --damp auto chose the mask alone for this layer: nothing fitted to refine
        return selection, upd, None
    target = getattr(upd, "target", None)
    target = dense if target is None else target
    ref = refine_mask(config.refine_mask, target, upd.weight, selection.pruned, hessian, pattern=work.pattern,
                      iterations=config.refine_iters, solver=options.solver,
                      damp=damp, tol=options.tol, max_iter=options.max_iter,
                      double_precision=options.double_precision)
    pruned, weight = ref.pruned, ref.weight
    split = options.split
    if split is not None and split.world_size > 1:
        pruned, weight = split.broadcast(pruned), split.broadcast(weight)
    objective = ref.objective if upd.objective is not None else None
    return (replace(selection, pruned=pruned), replace(upd, weight=weight, objective=objective), ref.stats())

def _sparsity(layers: list) -> float:
    """Zero fraction over the pruned linears, from the report's rows (each counted when it was pruned)."""
    zeros = total = 0
    for x in layers:
        numel = int(np.prod(x["shape"]))
        zeros += round(x["sparsity"] * numel)
        total += numel
    return zeros / total if total else 0.0
