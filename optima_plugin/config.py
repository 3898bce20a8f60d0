"""PruneConfig: every option of a pruning run (a leaf: it imports nothing of the package but options and sparsity).

The field names are the CLI's flag names (the hosts' names where they exist). The
options of plugins (OWL's ``Lamda``, TRIM's ``qmetric``, a third party's) are not
fields: plugins declare them through the ``optima_addoption`` hook
(:mod:`optima_plugin.options`), their values live in ``plugin_options`` and are read
with :meth:`PruneConfig.option`.

A config is checked and completed once, by :func:`optima_plugin.validate.resolve`, which returns a
new frozen config marked resolved (derived values such as the default checkpoint folder are set
with :func:`dataclasses.replace`, never in place).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from .sparsity import Pattern, parse_pattern

PLOT_FORMATS = (".png", ".pdf", ".svg")


def _flag(default: Any, help: str, **argparse: Any) -> Any:
    """A field that is an ``optima-prune`` flag: its help and how to parse it, as the field's metadata.

    ``default`` ``list``: an empty list. Metadata keys besides ``help``: ``parse`` (a parser's name, for a field
    whose default does not tell its type), ``metavar``, ``nargs`` and ``negatable`` (``--x`` / ``--no-x``).
    """
    value = {"default_factory": list} if default is list else {"default": default}
    return field(**value, metadata={"help": help, **argparse})


@dataclass(frozen=True)
class PruneConfig:
    """Every core option of a run; the fields with a ``help`` in their metadata are ``optima-prune``'s flags."""

    prune_method: str = _flag("wanda", help="mask selector: magnitude, wanda, sparsegpt, thanos, or a plugin's")
    sparsity_ratio: float = _flag(0.5, help="the mean sparsity to prune to (a fraction in [0, 1))")
    sparsity_type: str = _flag("unstructured", help="unstructured or N:M (e.g. 2:4)")
    weight_update: str = _flag("optima", help="none, native (the selector's own) or optima")
    solver: str = _flag("pcg", help="OPTIMA solver: pcg, direct, pdhg, adam")
    allocation: str = _flag(
        "uniform", help="sparsity allocation across layers: uniform, owl, alphapruning, or a plugin's (--prune_method "
        "wanda_owl / wanda_alpha / magnitude_owl / magnitude_alpha set both)")
    use_trim: bool = _flag(False, help="TRIM: per-row ratios around each layer's ratio (unstructured only)")
    input_recalc: bool = _flag(
        False, help="recompute each input group's Hessian after the block's earlier linears are pruned")
    objective: str = _flag(
        "pruned",
        help="what the optima update matches: pruned (each layer's outputs on the pruned model's inputs) or dense "
        "(the dense model's outputs: one more block pass on the dense inputs, kept beside the pruned ones)")
    reconstruct: str = _flag(
        "none", help="after each block's per-layer work, Adam steps on the kept weights (masks fixed) so that each "
        "unit's outputs on the pruned inputs match the dense model's: none, layer (each pruned linear), submodule "
        "(attention and MLP separately) or block; early stopping on held-out calibration windows "
        "(see docs/local_reconstruction.md)")
    reconstruct_steps: int = _flag(100, help="--reconstruct: Adam steps per unit at most (%(default)s)")
    reconstruct_lr: float = _flag(1e-4, help="--reconstruct: Adam learning rate (%(default)s)")
    reconstruct_schedule: str = _flag("cosine", help="--reconstruct: learning-rate schedule, cosine or constant")
    reconstruct_batch: int = _flag(4, help="--reconstruct: calibration windows per step (%(default)s)")
    save_layer_ratio: Optional[str] = _flag(None, help="write the layer ratios to FILE (.json or .npy)", metavar="FILE")
    load_layer_ratio: Optional[str] = _flag(
        None, help="read the layer ratios from FILE (.json or .npy) instead of allocating", metavar="FILE")
    nsamples: int = _flag(32, help="calibration windows")
    seqlen: int = _flag(512, help="tokens per window (calibration and perplexity)")
    seed: int = _flag(0, help="random seed (calibration windows, solvers)")
    calibration_dataset: str = _flag(
        "pydoc",
        help="pydoc, sherlock, c4, wikitext2 or a local text/JSONL path; several comma-separated, each optionally "
        "weighted NAME:W (e.g. pydoc:3,sherlock:1; equal shares by default)")
    sink_tokens: str = _flag(
        "keep", help="attention-sink tokens in the Hessians (the first --sink_positions of each window and tokens with "
        "squared norm above --sink_factor x the window's median): keep, exclude, or cap them at that norm; "
        "the report gives per layer the fraction of tokens and of trace(H) they hold")
    sink_positions: int = _flag(1, help="leading positions of each window taken as sinks")
    sink_factor: float = _flag(
        100.0, help="a token is a sink when its squared norm exceeds this many times its window's median")
    hessian_shrink: float | str = _flag(
        "auto",
        help="scale the correlations between inputs (the off-diagonal of H) by 1 - this before selection, update "
        "and compression: trusts the calibration text's input correlations less (0 = off); auto (default): "
        "with --weight_update optima {DEFAULT_HESSIAN_SHRINK} for layers pruned to at most "
        "{SHRINK_FULL_UNTIL_PCT:.0f}%%, none from {SHRINK_NONE_FROM_PCT:.0f}%%, linear in between; "
        "0 with other updates or --damp auto", parse="shrink")
    skip_attention: bool = _flag(False, help="prune MLP linears only")
    double_precision: bool = _flag(False, help="solve in float64")
    damp: float | str = _flag(
        0.01, help="relative Hessian damping, or auto: per layer the best of 1e-3..10 on held-out calibration windows "
        "(SparseGPT/Thanos updates, GPTQ and low rank then use 0.01)", parse="damp")
    tol: Optional[float] = _flag(None, help="solver tolerance (solver default if unset)", parse="float")
    max_iter: Optional[int] = _flag(None, help="solver iteration cap", parse="int")
    refine_mask: str = _flag(
        "none",
        help="after the exact solve, change which weights are pruned (same pattern and per-row counts), keeping a "
        "row's change only where its objective drops: swap (certified pair swaps) or admm (ALPS-style); needs "
        "--weight_update optima")
    refine_iters: int = _flag(20, help="--refine_mask iterations (%(default)s)")
    device: str = _flag("auto", help="auto, cuda or cpu")
    offload: Optional[bool] = _flag(
        None, help="keep the model on CPU and onload one block at a time (default: on with a GPU)", negatable=True)
    batch_size: int = _flag(1, help="calibration windows per forward")
    eval_ppl: list = _flag(
        list, help="comma-separated datasets for perplexity (e.g. pydoc,sherlock; also c4, wikitext2, a local path)")
    eval_dense: bool = False  # evaluate the dense model too (the CLI: unless --no_dense_eval)
    eval_max_windows: Optional[int] = _flag(None, help="cap on perplexity windows", parse="int")
    eval_zero_shot: list = _flag(
        list,
        help="comma-separated lm-eval tasks for zero-shot accuracy (bare flag: %(const)s)", metavar="TASKS", nargs="?")
    tasks_dir: Optional[str] = _flag(
        None, help="directory of local lm-eval task YAMLs and their data (offline; see examples/tasks)")
    eval_batch_size: int = _flag(1, help="sequences per forward when evaluating")
    cache: bool = True  # dense perplexities read from / written to the cache folder (the CLI: unless --no_cache)
    eval_limit: Optional[float] = _flag(
        None,
        help="at most this many examples per zero-shot task (a fraction if < 1); for quick runs",
        parse="count_or_fraction")
    num_fewshot: int = _flag(0, help="few-shot examples per zero-shot question")
    plot: Optional[str] = _flag(
        None, help="per-layer figure (.png, .pdf, .svg): reconstruction error before/after the update, sparsity")
    save_model: Optional[str] = _flag(None, help="directory to save the pruned model and tokenizer")
    save_format: str = _flag(
        "hf", help="hf: save_pretrained's safetensors; compressed-tensors: quantized linears as packed integers and "
        "scales, with sparsity metadata, as vLLM loads (needs: pip install compressed-tensors)")
    overwrite: bool = _flag(False, help="replace a non-empty --save_model directory")
    report: Optional[str] = _flag(None, help="write the JSON report to this file")
    checkpoint_dir: Optional[str] = _flag(
        None,
        help="record every pruned block here; the same command started again resumes at the first unfinished block "
        "(default with --save_model: SAVE_MODEL.checkpoint, removed after success)", metavar="DIR")
    checkpoint: bool = True  # the default checkpoint beside --save_model (the CLI: unless --no_checkpoint)
    stream: bool = _flag(
        False, help="read one block at a time from the checkpoint's safetensors and write each pruned block to "
        "--save_model at once, for models larger than RAM (default: on when the model is larger than the "
        "available RAM; a GGUF file is converted to safetensors once)", negatable=True)
    model_path: Optional[str] = None  # --model: directory or hub id (never overwritten; the checkpoint's identity)
    save_masks: Optional[str] = _flag(
        None,
        help="write every pruned linear's mask (True = pruned) to FILE (safetensors, bits packed); --prune_method "
        "file --mask_checkpoint FILE reuses it", metavar="FILE")
    plugin_options: dict = field(default_factory=dict)  # {name: value} of plugin-declared options (see option())

    def option(self, name: str) -> Any:
        """The value of option ``name``: a plugin-declared one or a core field.

        A resolved config holds every declared option (its default when not given). ``LookupError``
        naming the known options for any other name.
        """
        if name in self.plugin_options:
            return self.plugin_options[name]
        if name in _core_names():
            return getattr(self, name)
        raise LookupError(f"no option {name!r}: not a core option and no plugin declares it (declared: "
                          f"{', '.join(sorted(self.plugin_options)) or 'none'})")

    @property
    def resolved(self) -> bool:
        """Whether :func:`optima_plugin.validate.resolve` checked and completed this config."""
        return bool(self.__dict__.get("_resolved", False))

    @property
    def pattern(self) -> Pattern:
        return parse_pattern(self.sparsity_type)

    @property
    def row_allocation(self) -> Optional[str]:
        """The row allocator's registry name (``trim`` with ``--use_trim``), or None."""
        return "trim" if self.use_trim else None

    def to_dict(self) -> dict:
        """Every option by name, the plugins' among them (the report's ``options``, the checkpoint's identity)."""
        out = dataclasses.asdict(self)
        plugin = out.pop("plugin_options")
        return {**out, **plugin}


def _core_names() -> set[str]:
    """The core option names: :class:`PruneConfig`'s fields but ``plugin_options``."""
    return {f.name for f in dataclasses.fields(PruneConfig)} - {"plugin_options"}
