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
from typing import Iterator, Optional

import numpy as np
import torch
from torch import Tensor, nn

from .allocators import AllocationContext, resolve_layer_ratios, row_summary
from .checkpoint import Checkpoint, blocks_done, RunInterrupted, WriteFailed, run_identity, stop_after_block
from .compress import Compression
from .config import PruneConfig
from .damping import HOLDOUT_EVERY, is_auto, layer_inputs
from .data import get_calibration
from .distributed import SyncedSelector, current as current_job
from .hessian import SinkTokens, layer_shrink, shrink_to_diagonal
from .models import ModelAdapter, block_linears, get_adapter, input_groups, is_attention
from .objective import DenseTerms, dense_objective, dense_target
from .pipeline import BlockPipeline, NonFiniteError, check_finite  # noqa: F401 (NonFiniteError: re-exported)
from .plugins import get_plugin_manager, lookup
from .solvers.problem import reconstruction_error
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
    """
    from .observers import ProgressObserver, ReportObserver

    config = resolve(config)  # a resolved config is returned as it is; the lookups below cannot fail
    seed_everything(config.seed)
    pattern = config.pattern
    selector = lookup("selectors", config.prune_method, "--prune_method")
    updater = lookup("updaters", config.weight_update, "--weight_update")
    allocator = lookup("allocators", config.allocation, "--allocation")
    row_allocator = lookup("row_allocators", config.row_allocation, "--use_trim") if config.row_allocation else None
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
    for name, lin in linears.items():
        pattern.check_columns(lin.in_features, name)
    if hasattr(selector, "prepare"):  # e.g. ``file``: its masks matched to the linears before any calibration
        selector.prepare(config, linears, blocks_path(adapter))
    checkpoint = Checkpoint(config.checkpoint_dir, run_identity(config.to_dict(), model, stream), dist) \
        if config.checkpoint_dir else None
    resume = checkpoint.load() if checkpoint else None
    start = resume.next_block if resume else 0
    num_blocks = len(adapter.blocks)
    if checkpoint is not None and resume is None:
        checkpoint.begin(num_blocks)  # state.json first: the folder is known as this tool's from now on
    if resume and stream is not None:
        lost = [j for j in range(start) if not stream.has_block(j)]
        if lost:
            raise ValueError(f"--checkpoint_dir {config.checkpoint_dir} lacks the shards of blocks {lost[:5]}; "
                             "delete that folder to start over")
    if resume:
        if stream is None:
            checkpoint.restore(adapter.blocks, start)
        log.info("resuming from %s: blocks 0..%d of %d are pruned already", config.checkpoint_dir, start - 1,
                 num_blocks)
    for name, lin in linears.items():  # every weight, before calibration (streamed: each block at its turn)
        if not lin.weight.is_meta:
            check_finite(lin.weight.detach(), f"{name}: its weights")
    warn_small_calibration(linears, config.nsamples, config.seqlen, config.weight_update)

    pm = get_plugin_manager()
    observers = [ProgressObserver(disable=not progress), ReportObserver()]
    if resume:
        observers[1].layers, observers[1].block_seconds = list(resume.layers), list(resume.block_seconds)
    for obs in observers:
        pm.register(obs)
    oom_backoff = list(resume.oom_backoff) if resume else []
    try:
        t_start = time.perf_counter()
        ratios = _layer_ratios(resume, pattern, linears, allocator, model, adapter, config, None, device, offload,
                               progress, stream)
        tokens = get_calibration(config.calibration_dataset, tokenizer, config.nsamples, config.seqlen, config.seed)
        if not offload:
            model.to(device)
        t_alloc = time.perf_counter()
        if ratios is None:
            ratios = _layer_ratios(None, pattern, linears, allocator, model, adapter, config, tokens, device,
                                   offload, progress, stream)
        t_alloc = time.perf_counter() - t_alloc
        pipe = BlockPipeline(adapter, device=device, batch_size=config.batch_size,
                             storage=torch.device("cpu") if offload else device,
                             offload="cpu" if offload else None, oom_backoff=oom_backoff, stream=stream,
                             dist=dist, track_dense=config.objective == "dense",
                             sink=SinkTokens.from_config(config))
        inputs = pipe.capture(tokens)
        if resume and start < num_blocks:
            checkpoint.check_inputs(start)  # under torchrun: every rank's share, or an error on every rank
            pipe.inputs = inputs = checkpoint.inputs(start).to(device=pipe.storage, dtype=inputs.dtype)
            if pipe.track_dense:
                pipe.dense_inputs = checkpoint.dense_inputs(start).to(device=pipe.storage, dtype=inputs.dtype)
                check_finite(pipe.dense_inputs, f"the checkpoint's dense-model inputs of block {start}")
        check_finite(inputs, "the inputs of block 0 (the embedding outputs)" if start == 0
                     else f"the checkpoint's inputs of block {start}")
        t_capture = time.perf_counter() - t_start - t_alloc
        hdtype = torch.float64 if config.double_precision else torch.float32
        options = UpdateOptions(config.solver, config.damp, config.tol, config.max_iter, config.double_precision,
                                split=dist)
        compression = Compression.from_config(config, lookup)
        holdout = HOLDOUT_EVERY if is_auto(config.damp) else None  # --damp auto: fit and held-out Hessians
        prefix = blocks_path(adapter)
        pm.hook.optima_run_started(config=config, num_blocks=num_blocks)
        observers[0].skip(start)
        with stop_after_block(enabled=checkpoint is not None) as stop:
            for i in range(start, num_blocks):
                block = adapter.blocks[i]
                t_block = time.perf_counter()
                seed_everything(config.seed + i)  # each block's randomness independent of the blocks before it
                pm.hook.optima_block_started(index=i, num_blocks=num_blocks)
                with pipe.onloaded(i) as block:
                    names = {rel: f"{prefix}.{i}.{rel}" for rel in block_linears(block)}
                    todo = {rel: block_linears(block)[rel] for rel, full in names.items() if full in linears}
                    if stream is not None:
                        for rel, lin in todo.items():
                            check_finite(lin.weight.detach(), f"{names[rel]}: its weights")
                    groups = input_groups(block)
                    terms, hessians = {}, {}
                    # --objective dense: each input group's H, G and ‖wX_d‖² after the groups before it are pruned,
                    # against a dense copy of the block (which then advances the dense inputs)
                    dense_block = copy.deepcopy(block) if pipe.track_dense else None
                    if dense_block is None and not config.input_recalc:
                        hessians = pipe.hessians(i, block, todo, groups, hdtype, names, holdout)
                    for rel, lin in todo.items():
                        if rel not in hessians:  # this input group's statistics, after those before it
                            group = {g: todo[g] for g in next(g for g in groups if rel in g) if g in todo}
                            if dense_block is not None:
                                terms = pipe.dense_statistics(i, block, dense_block, group, groups, hdtype, names)
                                hessians = {r: t.hessian for r, t in terms.items()}
                            else:
                                hessians = pipe.hessians(i, block, group, groups, hdtype, names, holdout)
                        true_hessian, layer_options = layer_inputs(hessians[rel], options)
                        true_terms = terms.get(rel)  # the report's headline figures are on these, unshrunk
                        shrink = layer_shrink(config.hessian_shrink, ratios[names[rel]])
                        hessian = shrink_to_diagonal(true_hessian, shrink)  # what selection and update solve with
                        solved_terms = true_terms
                        if true_terms is not None and shrink:
                            solved_terms = replace(true_terms, hessian=hessian,
                                                   cross=shrink_to_diagonal(true_terms.cross, shrink))
                        with _named_solver_logs(names[rel]):
                            result = _prune_linear(names[rel], i, lin, hessian, ratios[names[rel]], pattern,
                                                   selector, updater, layer_options, row_allocator, config,
                                                   compression, solved_terms,
                                                   true_hessian=true_hessian if shrink else None,
                                                   true_terms=true_terms if shrink else None)
                        result.hessian_stats = pipe.hessian_stats.get(rel)
                        result.update["hessian_shrink"] = shrink
                        pm.hook.optima_layer_done(result=result)
                    del hessians, terms
                    if dense_block is not None:
                        pipe.propagate(i, dense_block, dense=True)
                        check_finite(pipe.dense_inputs, f"the dense model's outputs of block {i}")
                        del dense_block
                    pipe.propagate(i, block)
                    check_finite(pipe.inputs, f"the outputs of block {i} ({prefix}.{i})")
                    if stream is not None and (dist is None or dist.is_main()):
                        stream.write_block(i, block)
                seconds = time.perf_counter() - t_block
                if checkpoint is not None:
                    checkpoint.save(i, None if stream is not None else block,  # streamed: the shard is the record
                                    pipe.inputs if i + 1 < num_blocks else None, num_blocks=num_blocks,
                                    ratios=ratios, layers=observers[1].layers,
                                    block_seconds=observers[1].block_seconds + [seconds], oom_backoff=oom_backoff,
                                    next_dense=pipe.dense_inputs if i + 1 < num_blocks else None)
                pm.hook.optima_block_done(index=i, num_blocks=num_blocks, seconds=seconds)
                requested = stop.requested
                if dist is not None and checkpoint is not None:  # the ranks stop after the same block
                    requested = bool(dist.max_int(int(requested)))
                if requested and i + 1 < num_blocks:
                    raise RunInterrupted(f"interrupted after block {i} of {num_blocks}: blocks 0..{i} are saved in "
                                         f"{config.checkpoint_dir}; run the same command again to resume")
        report = {
            "completed": True,
            "sparsity": _sparsity(observers[1].layers),
            "summary": summarize(observers[1].layers),
            "options": config.to_dict(),
            "device": str(device),
            "offload": offload,
            "stream": stream is not None,
            "layers": observers[1].layers,
            "allocation": {"method": config.allocation, "rows": config.row_allocation,
                           "loaded_from": config.load_layer_ratio},
            "resumed_from_block": start if resume else None,
            "oom_backoff": oom_backoff,
            "timings": {
                "capture_seconds": t_capture,
                "allocation_seconds": t_alloc,
                "block_seconds": observers[1].block_seconds,
                "prune_seconds": time.perf_counter() - t_start,
            },
        }
        if dist is not None:
            report["distributed"] = distributed_summary(dist, report["timings"], pipe.inputs.shape[0])
        pm.hook.optima_run_done(report=report)
        return report
    except Exception as e:
        if checkpoint is not None and blocks_done(checkpoint.dir) and (dist is None or dist.is_main()) \
                and not isinstance(e, WriteFailed):  # a WriteFailed says which blocks are kept
            log.error("the finished blocks are saved in %s; fix the problem and run the same command to resume",
                      config.checkpoint_dir)
        raise
    finally:
        for obs in observers:
            pm.unregister(obs)


def _layer_ratios(resume, pattern, linears, allocator, model, adapter, config, tokens, device, offload,
                  progress, stream=None) -> Optional[dict]:
    """Each linear's ratio: from the checkpoint, the N:M pattern, a ratio file, or the allocator.

    Without ``tokens`` only what needs no calibration is resolved (so a bad ratio
    file fails before calibration); None means: call again with the tokens.
    """
    if resume is not None:
        return resume.ratios
    if pattern.structured:
        return {name: pattern.ratio for name in linears}
    if tokens is None and not config.load_layer_ratio:
        return None
    context = AllocationContext(model, adapter, config.sparsity_ratio, linears, config=config, tokens=tokens,
                                device=device, offload=offload, progress=progress, stream=stream,
                                dist=current_job())
    return resolve_layer_ratios(allocator, context)


def distributed_summary(dist, timings: dict, windows: int) -> dict:
    """The report's ``distributed`` entry: world size, backend, and each rank's windows and times (gathered)."""
    mine = {"rank": dist.rank, "windows": windows, "prune_seconds": timings["prune_seconds"],
            "block_seconds_total": sum(timings["block_seconds"])}
    return {"world_size": dist.world_size, "backend": dist.backend, "ranks": dist.gather_object(mine)}


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


def error_ratio(objective: float, mask_objective: float) -> float:
    """``objective / mask_objective``; 0 or 1 when the mask alone loses nothing (0 when the update neither)."""
    return objective / mask_objective if mask_objective > 0 else (0.0 if objective == 0 else 1.0)


def _prune_linear(name, block_index, lin, hessian, ratio, pattern, selector, updater, options,
                  row_allocator=None, config=None, compression: Optional[Compression] = None,
                  dense_terms: Optional[DenseTerms] = None, *, true_hessian: Optional[Tensor] = None,
                  true_terms: Optional[DenseTerms] = None) -> LayerResult:
    """Select, update, keep the better of update and mask only, write the weights, compress.

    ``hessian`` (and ``dense_terms``) are what the selector, row allocator, updater and compression solve
    with: under ``--hessian_shrink`` the shrunk statistics. ``true_hessian`` / ``true_terms``: the unshrunk
    calibration statistics (None: nothing was shrunk, the same as ``hessian`` / ``dense_terms``). The
    headline ``objective``, ``mask_objective`` and ``error_ratio`` (and the keep-the-better check) are
    measured on the true statistics; ``solved_*`` are the same figures of the problem the updater solved
    (equal to the headline ones when nothing was shrunk, computed once).

    ``dense_terms`` (``--objective dense``): the updater solves for the target rows ``T`` of
    :func:`~optima_plugin.objective.dense_target`; the headline objectives are the dense objective
    :func:`~optima_plugin.objective.dense_objective` ``‖W X_d − Ŵ X_p‖²/N`` of the update and of the mask-only
    dense weights on the true statistics, and under a shrink the solved ones are the solver's own objective,
    ``Σ_rows (ŵ − t)ᵀ H (ŵ − t)`` with the shrunk ``H``.
    """
    t0 = time.perf_counter()
    dense = lin.weight.detach()
    work = dense.float() if dense.dtype not in (torch.float32, torch.float64) else dense
    rows = None
    if row_allocator is not None:  # per-row ratios around the layer's ratio (TRIM)
        allocation = row_allocator.row_ratios(work, hessian, ratio, selector, config)
        ratio = allocation.ratios
        rows = dict(row_summary(ratio), **allocation.stats)
    named = {"name": name} if getattr(selector, "needs_name", False) else {}
    selection = selector.select(work, hessian, ratio, pattern, **named)
    target = None
    if dense_terms is None:
        upd = updater.update(dense, selection, hessian, options)
    else:  # the same problem with the target rows T (float32/64) in place of the dense weights
        target, target_damp = dense_target(work, hessian, dense_terms.cross, options.damp)
        upd = updater.update(target, selection, hessian, replace(options, damp=target_damp))
        upd.mask_objective = None  # that is ‖T∘mask − T‖, not the mask-only dense weights' figure
        upd.stats.update(objective_kind="dense", target_damp=target_damp,
                         dense_energy=float(dense_terms.energy.double().sum()))
        upd.target = target  # --refine_mask refines towards T too
        if "damp_escalated" in upd.stats:
            upd.stats["damp_escalated"] = bool(upd.stats["damp_escalated"] or target_damp != options.damp)
    mask_only = dense.masked_fill(selection.pruned, 0)  # the selector's mask: mask_objective stays its figure
    refined, selected = None, selection
    if config is not None and config.refine_mask != "none" and hessian is not None:
        selection, upd, refined = _refine(selection, upd, dense, hessian, pattern, options, config)
    new = upd.weight.to(dense.dtype)
    check_finite(new, f"{name}: the weights of the {updater.name} update")
    accepted = True
    shrunk = true_hessian is not None or true_terms is not None
    objective = mask_objective = ratio_true = None
    solved = solved_mask = ratio_solved = None
    if dense_terms is not None:
        truth = true_terms if true_terms is not None else dense_terms
        mask_objective, objective = (dense_objective(dense, w, truth) for w in (mask_only, new))
        if shrunk:  # the solver's objective: the distance to T under the shrunk H (a squared norm)
            solved_mask = reconstruction_error(target, mask_only, hessian)
            solved = upd.objective if upd.objective is not None else reconstruction_error(target, new, hessian)
    elif hessian is not None:  # the updater's own figures when it measured them (one r x d x d product each)
        solved_mask = upd.mask_objective if upd.mask_objective is not None else \
            reconstruction_error(dense, mask_only, hessian)
        solved = upd.objective if upd.objective is not None else reconstruction_error(dense, new, hessian)
        if shrunk:
            mask_objective, objective = (reconstruction_error(dense, w, true_hessian) for w in (mask_only, new))
        else:
            mask_objective, objective = solved_mask, solved
    if not shrunk:
        solved, solved_mask = objective, mask_objective
    if objective is not None:
        if objective > mask_objective:  # keep the better of before/after, on the true statistics
            log.warning("%s: update is worse than the mask alone (%.4g > %.4g); keeping the mask only",
                        name, objective, mask_objective)
            new, objective, accepted, selection = mask_only, mask_objective, False, selected
            solved = solved_mask
        ratio_true, ratio_solved = error_ratio(objective, mask_objective), error_ratio(solved, solved_mask)
    original = dense.clone() if compression is not None else None  # ``dense`` is the parameter, written next
    with torch.no_grad():
        lin.weight.copy_(new.masked_fill(selection.pruned, 0))
    sparsity = float((lin.weight == 0).float().mean())  # of the pruned weights (a merged adapter fills them)
    figures = compression.apply(name, lin, original, selection.pruned, hessian, true_hessian=true_hessian) \
        if compression is not None else None
    return LayerResult(
        name=name, block=block_index, shape=list(dense.shape),
        ratio=float(ratio) if not torch.is_tensor(ratio) else float(ratio.double().mean()),
        sparsity=sparsity, error_ratio=ratio_true,
        objective=objective, mask_objective=mask_objective, accepted=accepted,
        seconds=time.perf_counter() - t0, update=upd.stats, rows=rows, selection=selection.stats,
        compression=figures, refine=refined,
        solved_objective=solved, solved_mask_objective=solved_mask, solved_error_ratio=ratio_solved,
    )


def _refine(selection, upd, dense, hessian, pattern, options: UpdateOptions, config: PruneConfig):
    """``--refine_mask``: the refined ``(selection, update, stats)`` (:func:`optima_plugin.refine.refine_mask`).

    The target is the dense weights (or ``upd.target`` when an updater provides one). Under torchrun every rank
    refines the same gathered weights with the same arguments, and rank 0's mask and weights are broadcast so
    that all ranks surely end equal.
    """
    from dataclasses import replace as dc_replace

    from .refine import refine_mask

    damp = upd.stats.get("damp", options.damp)
    if damp is None or is_auto(damp):  # --damp auto chose the mask alone for this layer: nothing fitted to refine
        return selection, upd, None
    target = getattr(upd, "target", None)
    target = dense if target is None else target
    ref = refine_mask(config.refine_mask, target, upd.weight, selection.pruned, hessian, pattern=pattern,
                      iterations=config.refine_iters, solver=options.solver,
                      damp=damp, tol=options.tol, max_iter=options.max_iter,
                      double_precision=options.double_precision)
    pruned, weight = ref.pruned, ref.weight
    split = options.split
    if split is not None and split.world_size > 1:
        pruned, weight = split.broadcast(pruned), split.broadcast(weight)
    objective = ref.objective if upd.objective is not None else None
    return (dc_replace(selection, pruned=pruned), dc_replace(upd, weight=weight, objective=objective),
            ref.stats())


def _sparsity(layers: list) -> float:
    """Zero fraction over the pruned linears, from the report's rows (each counted when it was pruned)."""
    zeros = total = 0
    for x in layers:
        numel = int(np.prod(x["shape"]))
        zeros += round(x["sparsity"] * numel)
        total += numel
    return zeros / total if total else 0.0
