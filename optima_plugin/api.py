"""The Python API: ``prune`` (the CLI's job as a function) and the seed-compatible
``prune_and_quantize``."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from torch import Tensor, nn

from .checkpoint import Checkpoint, WriteFailed, is_default_checkpoint, write_failure
from .config import PruneConfig
from .data import get_eval_tokens
from .distributed import check_options, setup as join_job
from .engine import prune_model, resolve_device
from .evaluation import eval_ppl, eval_zero_shot
from .evaluation.cache import perplexities
from .evaluation.zero_shot import check_tasks
from .export import check_group_widths, linear_widths
from .files import write_json
from .loading import save_model
from .lock import exclusive_run
from .maskfile import save_masks
from .memory import PeakMemory
from .sparsity import check_sparsity
from .streaming import StreamedModel
from .timing import Phases
from .validate import resolve

log = logging.getLogger(__name__)


def prune(model: nn.Module | StreamedModel, tokenizer, *, progress: bool = True,
          config: Optional[PruneConfig] = None, **options) -> dict:
    """Prune ``model`` in place; evaluate, save and write the report as the options say.

    ``options`` are :class:`PruneConfig`'s fields and the options plugins declare (OWL's
    ``Lamda``, TRIM's ``qmetric``, a third party's: the CLI's flag names), e.g.
    ``prune(model, tok, prune_method="wanda", sparsity_ratio=0.5, weight_update="optima")``.
    Every option and path is checked before any work, once (:func:`optima_plugin.validate.resolve`;
    ``config``: a config resolved already, e.g. by the CLI, the options then add to it). With a checkpoint folder
    (``checkpoint_dir``, by default ``<save_model>.checkpoint``) the prune resumes
    where an earlier run of the same options stopped, and a failure while
    evaluating or saving leaves the pruned blocks there; the default folder is
    removed once everything succeeded. The checkpoint and ``save_model`` folders are locked
    for the call (:mod:`optima_plugin.lock`): another run on them raises
    :class:`~optima_plugin.lock.RunLocked`. A failed write of an output or a checkpoint file
    raises :class:`~optima_plugin.checkpoint.WriteFailed` (an ``OSError``) naming it. Returns
    the report dict (also written to ``report`` when given).

    ``model`` may be a :class:`~optima_plugin.streaming.StreamedModel`
    (:func:`~optima_plugin.streaming.open_streamed`): its blocks are read from disk one at
    a time and written to ``save_model`` (required) as they are pruned; perplexity is
    measured block by block.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) every rank calls this with the same arguments: the ranks
    prune together (:mod:`optima_plugin.distributed`); only rank 0 shows progress, evaluates, saves
    and writes the report, the others wait for it and return their own report (without ``ppl``).
    """
    given = {**config.to_dict(), **options} if config is not None else options
    job = join_job(given.get("device"))
    if job is not None:
        check_options(given, job)
        progress = progress and job.is_main()
    stream = model if isinstance(model, StreamedModel) else None
    if stream is not None:
        if not given.get("stream"):
            options["stream"] = True
        model = stream.model
    elif given.get("stream"):
        raise ValueError("stream=True needs the model opened for streaming: "
                         "prune(optima_plugin.streaming.open_streamed(path)[0], tokenizer, ...)")
    if given.get("model_path") is None and Path(str(getattr(model, "name_or_path", "") or "")).is_dir():
        options["model_path"] = str(model.name_or_path)
    config = resolve(config, **options)  # once: a resolved config without other options is taken as it is
    if config.plot:
        from .plot import require_matplotlib

        require_matplotlib()
    if config.eval_zero_shot and not config.eval_dense:
        check_tasks(config.eval_zero_shot, config.tasks_dir)  # fail before the prune, not after it
    with exclusive_run(config, job.rank if job is not None else None):  # one run at a time on these folders
        return _run(model, stream, tokenizer, config, job, progress)


def _run(model: nn.Module, stream: Optional[StreamedModel], tokenizer, config: PruneConfig, job,
         progress: bool) -> dict:
    """:func:`prune`'s work once its options are checked and its folders locked."""
    main = job is None or job.is_main()
    if config.save_format == "compressed-tensors":  # --group_size against the layer shapes
        check_group_widths(config, linear_widths(model, config.skip_attention))
    eval_tokens = _eval_tokens(tokenizer, config) if main else {}  # every --eval_ppl text, before the prune
    ppl: dict = {}
    zero_shot: dict = {}
    evaluated = stream if stream is not None else model
    phases = Phases()  # evaluation and save (the prune's own phases are prune_model's)
    if main and config.eval_dense and config.eval_ppl:
        with phases.phase("evaluation"):
            ppl["dense"], ppl["dense_source"] = _evaluate(evaluated, tokenizer, eval_tokens, config, progress,
                                                          dense=True)
    if main and config.eval_dense and config.eval_zero_shot:
        with phases.phase("evaluation"):
            zero_shot["dense"] = _zero_shot(model, tokenizer, config, progress)
    if job is not None:
        job.wait_for_main()  # rank 0's dense evaluation, without the collective timeout
    with _staging(stream, config):
        t0 = time.perf_counter()
        with PeakMemory() as mem:
            report = prune_model(model, tokenizer, config, progress=progress, stream=stream)
        report["timings"]["total_prune_seconds"] = time.perf_counter() - t0
        report["memory"] = mem.to_dict()
        if not main:
            job.wait_for_main()  # rank 0 evaluates, saves and reports
            return report
        try:
            if config.eval_ppl:
                evaluated = stream.pruned() if stream is not None else model
                with phases.phase("evaluation"):
                    ppl["pruned"] = _evaluate(evaluated, tokenizer, eval_tokens, config, progress)
                report["ppl"] = ppl
            if config.eval_zero_shot:
                with phases.phase("evaluation"):
                    zero_shot["pruned"] = _zero_shot(model, tokenizer, config, progress)
                report["zero_shot"] = zero_shot
            if config.save_model or config.save_masks:
                with phases.phase("save"):
                    _save(model, stream, tokenizer, config, report)
            # after prune_seconds: the run's evaluation and saving (the report's own writing not included)
            report["timings"]["phases"] = {**report["timings"].get("phases", {}), **phases.to_dict()}
            if config.report:
                with _writing("--report", config.report, config):
                    write_json(config.report, report)
            if config.plot:
                from .plot import plot_report

                with _writing("--plot", config.plot, config):
                    plot_report(report, config.plot)
        except BaseException as e:
            if config.checkpoint_dir and not isinstance(e, WriteFailed):  # a WriteFailed says it itself
                log.error("the pruned model is kept in %s: run the same command again to evaluate and save it "
                          "without pruning again", config.checkpoint_dir)
            raise
    if job is not None:
        job.wait_for_main()  # the other ranks may exit now (they are done with the checkpoint)
    if config.checkpoint_dir and is_default_checkpoint(config):
        Checkpoint(config.checkpoint_dir, {}).remove()
    elif config.checkpoint_dir:
        log.info("checkpoint kept in %s (the same command reuses it; delete it when done)", config.checkpoint_dir)
    return report


def _save(model: nn.Module, stream: Optional[StreamedModel], tokenizer, config: PruneConfig, report: dict) -> None:
    """``--save_model`` and ``--save_masks``: write them, and record where in ``report``."""
    if config.save_model:
        protected = [config.model_path] if config.model_path else []
        with _writing("--save_model", config.save_model, config):
            if stream is not None:
                stream.save(config.save_model, tokenizer, overwrite=config.overwrite,
                            protected=protected + [str(stream.directory)])
            elif config.save_format == "compressed-tensors":
                from .export import save_compressed

                save_compressed(model, tokenizer, config.save_model, overwrite=config.overwrite,
                                protected=protected,
                                pruned=[x["name"] for x in report["layers"] if x.get("sparsity", 0) > 0])
            else:
                save_model(model, tokenizer, config.save_model, overwrite=config.overwrite,
                           protected=protected)
        report["saved_to"] = str(config.save_model)
    if config.save_masks:
        with _writing("--save_masks", config.save_masks, config):
            count = save_masks(_pruned_masks(model, stream, report["layers"]), config.save_masks)
        report["masks_saved_to"] = str(config.save_masks)
        log.info("%d masks (True = pruned) written to %s", count, config.save_masks)


def _pruned_masks(model: nn.Module, stream: Optional[StreamedModel], layers: list) -> Iterator[tuple[str, Tensor]]:
    """``(name, weight == 0)`` of each pruned linear in the report's ``layers``, one at a time; a streamed
    model's from its pruned shards."""
    if stream is None:
        modules = dict(model.named_modules())
        for x in layers:
            yield x["name"], modules[x["name"]].weight.detach() == 0
        return
    pruned = stream.pruned()
    for x in layers:
        yield x["name"], pruned.tensor(x["name"] + ".weight") == 0


@contextmanager
def _writing(flag: str, path: str, config: PruneConfig) -> Iterator[None]:
    """Turn a failed write of an output (disk full, file size limit) into one line (:class:`WriteFailed`)
    naming it, what to do and where the pruned model is kept."""
    try:
        yield
    except Exception as e:
        why = write_failure(e)
        if why is None:
            raise
        kept = (f"the pruned model is kept in {config.checkpoint_dir}: run the same command again (it does not "
                "prune again)") if config.checkpoint_dir else \
            "the pruned model was not kept (no checkpoint folder): run again"
        raise WriteFailed(f"{flag} {path}: writing failed ({why}); free space or check the folder; {kept}") from e


@contextmanager
def _staging(stream: Optional[StreamedModel], config: PruneConfig) -> Iterator[None]:
    """Where a streamed run writes its pruned blocks: the checkpoint folder (kept for resuming), else a
    temporary folder beside ``--save_model``, removed at the end whatever happens."""
    if stream is None:
        yield
        return
    if config.checkpoint_dir:
        stream.staging = Path(config.checkpoint_dir)
        yield
        return
    target = Path(config.save_model).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    stream.staging = Path(tempfile.mkdtemp(prefix=f".{target.name[:80]}.optima-stream.", dir=target.parent))
    try:
        yield
    finally:
        shutil.rmtree(stream.staging, ignore_errors=True)  # created above: all ours


def _eval_tokens(tokenizer, config: PruneConfig) -> dict:
    """``{--eval_ppl source: (1, N) tokens}``: every evaluation text read, decoded, tokenized and checked to
    fill a window (``ValueError`` naming the file and the flag), once, before the prune."""
    return {ds: get_eval_tokens(ds, tokenizer, config.seqlen, "--eval_ppl") for ds in config.eval_ppl}


def _evaluate(model, tokenizer, tokens: dict, config: PruneConfig, progress: bool = True, dense: bool = False):
    """``{dataset: perplexity}`` on ``tokens`` (:func:`_eval_tokens`); ``dense``: ``(that, {dataset: "cache" |
    "computed"})``, the dense figures read from the perplexity cache where it has them (unless ``config.cache``
    is off)."""
    # Runs where the model's weights are (on CPU after an offloaded prune); a streamed model block by block.
    device = resolve_device(config.device) if isinstance(model, StreamedModel) else None
    values, sources = perplexities(model, tokenizer, config.eval_ppl, config.seqlen,
                                   max_windows=config.eval_max_windows, batch_size=config.eval_batch_size,
                                   device=device, progress=progress, use_cache=dense and config.cache,
                                   tokens=tokens)
    return (values, sources) if dense else values


def _zero_shot(model, tokenizer, config: PruneConfig, progress: bool) -> dict:
    # Like perplexity: on the in-memory model, where its weights are.
    return eval_zero_shot(model, tokenizer, config.eval_zero_shot, tasks_dir=config.tasks_dir,
                          batch_size=config.eval_batch_size, limit=config.eval_limit,
                          num_fewshot=config.num_fewshot, progress=progress)


def prune_and_quantize(
    model: nn.Module,
    tokenizer,
    bitwidth: int = 8,
    slim_quant: bool = False,
    weight_tiled_quantization: bool = False,
    weight_tile_size: int = 256,
    prune_method: str = "wanda",
    sparsity_ratio: float = 0.5,
    sparsity_type: str = "unstructured",
    quantize_weight: bool = False,
    nsamples: int = 128,
    shift_zero_metrics: bool = True,
    lora_rank: float = 0.0,
    slim_lora: bool = True,
    prune_lora: bool = False,
    quantize_lora: bool = False,
    lora_tile_size: int = 256,
    separate_lora: bool = True,
    seed: int = 0,
    joint_pq_mixing_factor: float = 2.1,
    calibration_dataset: str = "c4",
    pad_lora: bool = False,
    scale_important_weights: bool = False,
    mask_checkpoint: Optional[str] = None,
    update_weights: bool = False,
    use_qp_solver: bool = True,
    double_precision: bool = False,
    skip_attention: bool = False,
    seqlen: int = 2048,
    **options,
) -> dict:
    """Seed-compatible entry point (the OPTIMA reference's ``optima.prune.prune_and_quantize``).

    ``update_weights=True`` applies the OPTIMA update (``use_qp_solver=True``: the
    exact ``pcg`` solver; ``False``: the paper's Adam fallback); ``False`` keeps the
    selector's own update. ``prune_method="maskllm"`` with ``mask_checkpoint=PATH``
    reads the masks of a MaskLLM-style file (1 = kept; selector ``file``, see
    :mod:`optima_plugin.maskfile`).

    ``quantize_weight=True`` quantizes to ``bitwidth`` bits after the update: SLiM-Quant with
    ``slim_quant=True``, else OPTQ (``gptq``) after ``sparsegpt`` and AbsMax after the others, as
    the reference does (``quantizer=`` picks any); ``weight_tiled_quantization`` uses groups of
    ``weight_tile_size`` columns. ``lora_rank > 0`` adds adapters: the reference's diag-scaled SVD
    with ``slim_lora=True``, the exact optimum under the layer Hessian with ``slim_lora=False``;
    ``separate_lora``, ``quantize_lora``, ``prune_lora``, ``lora_tile_size``, ``pad_lora`` as in the
    reference. ``shift_zero_metrics`` and ``joint_pq_mixing_factor`` belong to the reference's Wanda
    variant and JSQ method, which this package does not have (accepted, without effect);
    ``scale_important_weights`` scales the most activated input columns before quantizing
    (AWQ-style, :mod:`optima_plugin.quantizers.scaling`).

    A :func:`prune` keyword that a parameter here also sets must agree with it, defaults included
    (``lowrank`` with ``slim_lora``, ``group_size`` with ``weight_tiled_quantization``, ``quantizer``
    with ``slim_quant=True``, ``mask_convention`` with ``prune_method="maskllm"``, ``weight_update``
    with ``update_weights``, ``solver`` with ``use_qp_solver``): ``ValueError`` naming both otherwise.
    """
    if not quantize_weight and (slim_quant or weight_tiled_quantization or scale_important_weights):
        raise ValueError("slim_quant / weight_tiled_quantization / scale_important_weights choose how weights are "
                         "quantized: "
                         "add quantize_weight=True, or drop them")
    if quantize_weight:
        if slim_quant:
            _seed_option(options, "quantizer", "slim", "slim_quant=True")
        options.setdefault("quantizer", "gptq" if prune_method == "sparsegpt" else "absmax")
        tiles = (f"weight_tiled_quantization=True, weight_tile_size={weight_tile_size}" if weight_tiled_quantization
                 else "weight_tiled_quantization=False")
        _seed_option(options, "group_size", weight_tile_size if weight_tiled_quantization else 0, tiles)
        options.update(quantize_weight=True, scale_important_weights=scale_important_weights)
    if lora_rank:
        _seed_option(options, "lowrank", "slim" if slim_lora else "exact", f"slim_lora={slim_lora}")
        options.update(lora_rank=lora_rank, separate_lora=separate_lora, quantize_lora=quantize_lora,
                       prune_lora=prune_lora, lora_tile_size=lora_tile_size, pad_lora=pad_lora)
    elif prune_lora or quantize_lora or pad_lora:
        raise ValueError("prune_lora / quantize_lora / pad_lora shape the low-rank adapters: set lora_rank > 0, "
                         "or drop them")
    if quantize_weight or (lora_rank and quantize_lora):
        options["bitwidth"] = bitwidth
    if joint_pq_mixing_factor != 2.1 or not shift_zero_metrics:
        log.warning("joint_pq_mixing_factor and shift_zero_metrics belong to the reference's JSQ method and Wanda "
                    "variant, which optima_plugin does not have: they have no effect here")
    if prune_method == "maskllm" or mask_checkpoint:  # the reference: MaskLLM masks, 1 = kept
        if prune_method not in ("maskllm", "file"):
            raise ValueError(f"mask_checkpoint is read by prune_method='maskllm' (or 'file'), not {prune_method!r}")
        if not mask_checkpoint:
            raise ValueError("prune_method='maskllm' reads its masks from mask_checkpoint=PATH; give the file")
        if prune_method == "maskllm":
            _seed_option(options, "mask_convention", "kept", "prune_method='maskllm'")
        options.setdefault("mask_convention", None)
        prune_method, options["mask_checkpoint"] = "file", mask_checkpoint
    _seed_option(options, "weight_update", "optima" if update_weights else "native", f"update_weights={update_weights}")
    _seed_option(options, "solver", "pcg" if use_qp_solver else "adam", f"use_qp_solver={use_qp_solver}")
    return prune(
        model, tokenizer, prune_method=prune_method, sparsity_ratio=sparsity_ratio,
        sparsity_type=sparsity_type, nsamples=nsamples, seed=seed, seqlen=seqlen,
        calibration_dataset=calibration_dataset, skip_attention=skip_attention,
        double_precision=double_precision, **options,
    )


def _seed_option(options: dict, name: str, value, given: str) -> None:
    """Set ``options[name]`` to ``value``, what the seed keyword(s) ``given`` mean; ``ValueError`` naming both
    when the caller passed ``name=`` with another value (an explicit keyword is never silently overridden)."""
    if name in options and options[name] != value:
        raise ValueError(f"{name}={options[name]!r} conflicts with {given} (which means {name}={value!r}): "
                         f"drop {name}= or change {given.split('=')[0]}")
    options[name] = value


__all__ = ["check_sparsity", "eval_ppl", "eval_zero_shot", "prune", "prune_and_quantize"]
