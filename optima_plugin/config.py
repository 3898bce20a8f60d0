"""PruneConfig: every option of a pruning run, validated in one place.

The field names are the CLI's flag names (the hosts' names where they exist). The
options of plugins (OWL's ``Lamda``, TRIM's ``qmetric``, a third party's) are not
fields: plugins declare them through the ``optima_addoption`` hook
(:mod:`optima_plugin.options`), their values live in ``plugin_options`` and are read
with :meth:`PruneConfig.option`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .options import OptionParser
from .plugins import collect_options
from .sparsity import Pattern, parse_pattern

PLOT_FORMATS = (".png", ".pdf", ".svg")
SAVE_FORMATS = ("hf", "compressed-tensors")

#: The hosts' (TRIM/OWL/AlphaPruning) combined method names: selector + allocation.
HOST_METHODS = {
    "wanda_owl": ("wanda", "owl"),
    "wanda_alpha": ("wanda", "alphapruning"),
    "magnitude_owl": ("magnitude", "owl"),
    "magnitude_alpha": ("magnitude", "alphapruning"),
}


@dataclass
class PruneConfig:
    prune_method: str = "wanda"
    sparsity_ratio: float = 0.5
    sparsity_type: str = "unstructured"
    weight_update: str = "optima"
    solver: str = "pcg"
    allocation: str = "uniform"
    use_trim: bool = False
    input_recalc: bool = False
    objective: str = "pruned"  # pruned: match each layer's outputs on the pruned path; dense: the dense model's
    save_layer_ratio: Optional[str] = None
    load_layer_ratio: Optional[str] = None
    nsamples: int = 32
    seqlen: int = 512
    seed: int = 0
    calibration_dataset: str = "pydoc"
    sink_tokens: str = "keep"  # attention-sink tokens in the Hessians: keep, exclude or cap (optima_plugin.hessian)
    sink_positions: int = 1
    sink_factor: float = 100.0
    # off-diagonal of H (and G) scaled by 1 - this (optima_plugin.hessian.shrink_to_diagonal); auto: per layer
    # from its sparsity with the OPTIMA update (hessian.default_hessian_shrink), 0 otherwise
    hessian_shrink: float | str = "auto"
    skip_attention: bool = False
    double_precision: bool = False
    damp: float | str = 0.01  # or "auto": chosen per layer on held-out windows (optima_plugin.damping)
    tol: Optional[float] = None
    max_iter: Optional[int] = None
    refine_mask: str = "none"  # none, swap or admm: change which weights are pruned after the solve (refine.py)
    refine_iters: int = 20
    device: str = "auto"
    offload: Optional[bool] = None
    batch_size: int = 1
    eval_ppl: list = field(default_factory=list)
    eval_dense: bool = False
    eval_max_windows: Optional[int] = None
    eval_zero_shot: list = field(default_factory=list)
    tasks_dir: Optional[str] = None
    eval_batch_size: int = 1
    cache: bool = True  # dense perplexities read from / written to the cache folder (optima_plugin.evaluation.cache)
    eval_limit: Optional[float] = None
    num_fewshot: int = 0
    plot: Optional[str] = None
    save_model: Optional[str] = None
    save_format: str = "hf"  # hf (save_pretrained) or compressed-tensors (optima_plugin.export)
    overwrite: bool = False
    report: Optional[str] = None
    checkpoint_dir: Optional[str] = None
    checkpoint: bool = True
    stream: bool = False  # blocks read from disk and written to --save_model one at a time (optima_plugin.streaming)
    model_path: Optional[str] = None  # --model: directory or hub id (never overwritten; part of the checkpoint's identity)
    save_masks: Optional[str] = None
    plugin_options: dict = field(default_factory=dict)  # {name: value} of plugin-declared options (see option())

    @classmethod
    def declared_options(cls) -> OptionParser:
        """The plugin-declared options (``optima_addoption``); a plugin may not reuse a field's name."""
        return collect_options(reserved=_core_names())

    def option(self, name: str) -> Any:
        """The value of option ``name``: a plugin-declared one (its default when not set) or a core field.

        ``LookupError`` naming the declared options for any other name.
        """
        if name in self.plugin_options:
            return self.plugin_options[name]
        if name in _core_names():
            return getattr(self, name)
        declared = self.declared_options().options
        if name not in declared:
            raise LookupError(f"no option {name!r}: not a core option and no plugin declares it (declared: "
                              f"{', '.join(sorted(declared)) or 'none'})")
        return declared[name].default

    @property
    def pattern(self) -> Pattern:
        return parse_pattern(self.sparsity_type)

    def validate(self) -> "PruneConfig":
        """Raise ``ValueError`` with a flag-named message for bad values, inputs or outputs; return self.

        Cheap (no model, no tokenizing): every option, input path, dataset name and
        output path is checked here, before any expensive work.
        """
        if not 0.0 <= self.sparsity_ratio < 1.0:
            raise ValueError(f"--sparsity_ratio must be in [0, 1), got {self.sparsity_ratio}")
        self.pattern  # parses and checks N:M
        for name in ("nsamples", "seqlen", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be a positive integer, got {getattr(self, name)}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        self._validate_damp()
        if self.tol is not None and not 0.0 < self.tol < 1.0:
            raise ValueError(f"--tol must be in (0, 1) (a relative tolerance), got {self.tol}")
        for name in ("max_iter", "eval_max_windows"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be a positive integer, got {value}")
        if isinstance(self.eval_ppl, str):
            self.eval_ppl = [s for s in self.eval_ppl.split(",") if s]
        from .hessian import check_sink_options

        check_sink_options(self.sink_tokens, self.sink_positions, self.sink_factor, self.seqlen)
        self._validate_refine()
        self._validate_shrink()
        self._validate_allocation()
        self._validate_names()
        self._validate_objective()
        if self.nsamples % self.batch_size:
            raise ValueError(f"--nsamples {self.nsamples} must be a multiple of --batch_size {self.batch_size}")
        if isinstance(self.eval_zero_shot, str):
            self.eval_zero_shot = [s.strip() for s in self.eval_zero_shot.split(",") if s.strip()]
        if self.eval_batch_size < 1:
            raise ValueError(f"--eval_batch_size must be a positive integer, got {self.eval_batch_size}")
        if self.num_fewshot < 0:
            raise ValueError(f"--num_fewshot must be >= 0, got {self.num_fewshot}")
        if self.eval_limit is not None and self.eval_limit <= 0:
            raise ValueError(f"--eval_limit must be positive (a count, or a fraction below 1), got {self.eval_limit}")
        if self.stream and not self.save_model:
            raise ValueError("--stream (on by itself when the model is larger than the available RAM) writes each "
                             "pruned block to the output as soon as it is done: give --save_model DIR "
                             "(or --no-stream to load the model whole)")
        if self.stream and self.eval_zero_shot:
            raise ValueError("--eval_zero_shot runs lm-eval on a model in memory, which --stream does not hold: "
                             "evaluate the saved folder afterwards (lm_eval --model hf --model_args "
                             "pretrained=SAVE_MODEL ...) or drop --stream")
        self._validate_save_format()
        if self.plot and not self.plot.lower().endswith(PLOT_FORMATS):
            raise ValueError(f"--plot {self.plot}: the file name must end with one of {', '.join(PLOT_FORMATS)}")
        self._validate_paths()
        return self

    def _validate_objective(self) -> None:
        """``--objective``: a known name; ``dense`` needs the optima update and no ``--input_recalc``."""
        from .objective import OBJECTIVES

        if self.objective not in OBJECTIVES:
            raise ValueError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.objective == "pruned":
            return
        if self.weight_update != "optima":
            raise ValueError(f"--objective dense changes the target of the weight update, which --weight_update "
                             f"{self.weight_update} does not solve for (it would change nothing): use "
                             "--weight_update optima, or drop --objective dense")
        if self.input_recalc:
            raise ValueError("--objective dense needs the dense model's inputs of each linear, taken while its "
                             "block is still dense; --input_recalc recomputes them from a partly pruned block: "
                             "drop one of them")
        if isinstance(self.damp, str):
            raise ValueError(f"--damp {self.damp} chooses each layer's damp on held-out windows of the pruned-path "
                             "Hessian alone; --objective dense needs one damp for its target rows: give --damp a "
                             "number with --objective dense, or drop --objective dense")
        if self.sink_tokens != "keep":
            raise ValueError(f"--sink_tokens {self.sink_tokens} is not applied to the paired dense/pruned statistics "
                             "of --objective dense (the cross term would mix filtered and unfiltered tokens): "
                             "use --sink_tokens keep with --objective dense, or drop --objective dense")

    def _validate_refine(self) -> None:
        """``--refine_mask``: a known method, a non-negative ``--refine_iters``, and the exact update it needs."""
        from .refine import METHODS

        if self.refine_mask not in METHODS:
            raise ValueError(f"--refine_mask must be one of {', '.join(METHODS)}, got {self.refine_mask!r}")
        if isinstance(self.refine_iters, bool) or not isinstance(self.refine_iters, int) or self.refine_iters < 0:
            raise ValueError(f"--refine_iters must be an integer >= 0, got {self.refine_iters!r}")
        if self.refine_mask != "none" and self.weight_update != "optima":
            raise ValueError(f"--refine_mask {self.refine_mask} re-solves the weights exactly for every mask it tries "
                             f"(it needs the Hessian): use --weight_update optima instead of "
                             f"--weight_update {self.weight_update}, or drop --refine_mask")

    def _validate_damp(self) -> None:
        """``--damp``: a finite number >= 0, or ``auto`` (which holds out calibration windows: two or more)."""
        from .damping import HOLDOUT_EVERY, check_damp, is_auto

        check_damp(self.damp, "--damp")
        if is_auto(self.damp) and self.nsamples < 2:
            raise ValueError(f"--damp auto holds out one calibration window in {HOLDOUT_EVERY} to choose each layer's "
                             f"damp and fits on the others: it needs --nsamples 2 or more (got {self.nsamples}), "
                             "or give --damp a number")

    def _validate_shrink(self) -> None:
        """``--hessian_shrink``: ``auto`` or a number in [0, 1) (see :func:`optima_plugin.hessian.resolve_shrink`)."""
        from .hessian import parse_shrink, resolve_shrink

        given = parse_shrink(self.hessian_shrink)
        if given != "auto" and given and isinstance(self.damp, str):
            raise ValueError(f"--hessian_shrink {given} with --damp {self.damp}: the damp is chosen on "
                             "unshrunk held-out Hessians; give --damp a number with --hessian_shrink, or drop one")
        self.hessian_shrink = resolve_shrink(given, self.weight_update, self.damp)

    def _validate_save_format(self) -> None:
        """``--save_format``: a known name; compressed-tensors needs --save_model, no --stream and the library."""
        if self.save_format not in SAVE_FORMATS:
            raise ValueError(f"--save_format must be one of {', '.join(SAVE_FORMATS)}, got {self.save_format!r}")
        if self.save_format == "hf":
            return
        if not self.save_model:
            raise ValueError(f"--save_format {self.save_format} describes the saved model: give --save_model DIR")
        if self.stream:
            raise ValueError(f"--save_format {self.save_format} packs the whole pruned model in memory, which --stream "
                             "(on by itself when the model is larger than the available RAM) does not hold: "
                             "give --no-stream, or save with --save_format hf")
        opt = self.plugin_options.get
        if opt("scale_important_weights"):
            raise ValueError(f"--scale_important_weights divides each input column of a weight by its own scale, which "
                             f"--save_format {self.save_format} cannot store: drop one of them")
        if opt("lora_rank"):
            raise ValueError(f"--lora_rank adds adapters that --save_format {self.save_format} cannot store (separate) "
                             "or that make the weights dense floats again (merged): drop --lora_rank, or save with "
                             "--save_format hf")
        from .export import require_compressed_tensors

        try:
            require_compressed_tensors()
        except ImportError as e:
            raise ValueError(str(e)) from None

    def _validate_paths(self) -> None:
        """Datasets and input files exist; every output can be written; the checkpoint folder is usable."""
        from .checkpoint import check_checkpoint_dir, default_checkpoint_dir
        from .data import check_calibration, check_dataset
        from .files import check_output_file, check_save_target, recover_interrupted_save

        check_calibration(self.calibration_dataset, self.nsamples, "--calibration_dataset")
        for ds in self.eval_ppl:
            check_dataset(ds, "--eval_ppl")
        if self.load_layer_ratio and not Path(self.load_layer_ratio).is_file():
            raise ValueError(f"--load_layer_ratio {self.load_layer_ratio}: no such file")
        if self.tasks_dir and not Path(self.tasks_dir).is_dir():
            raise ValueError(f"--tasks_dir {self.tasks_dir}: no such directory")
        for flag in ("report", "plot", "save_layer_ratio", "save_masks"):
            if getattr(self, flag):
                check_output_file(getattr(self, flag), f"--{flag}")
        protected = [self.model_path] if self.model_path and Path(self.model_path).exists() else []
        if self.save_model:
            recover_interrupted_save(self.save_model)  # a killed save's leftovers: put back or removed
            check_save_target(self.save_model, overwrite=self.overwrite, protected=protected)
        if self.checkpoint_dir is None and self.save_model and self.checkpoint:
            self.checkpoint_dir = default_checkpoint_dir(self.save_model)
        if self.checkpoint_dir:
            check_checkpoint_dir(self.checkpoint_dir, protected=protected)
            if self.save_model:
                ckpt, save = Path(self.checkpoint_dir).resolve(), Path(self.save_model).resolve()
                if ckpt == save or save in ckpt.parents or ckpt in save.parents:
                    raise ValueError(f"--checkpoint_dir {self.checkpoint_dir} and --save_model {self.save_model} "
                                     "overlap; give them separate folders")
        self.check_paths_distinct()

    def check_paths_distinct(self) -> None:
        """``ValueError`` when an output overlaps an input or another output (see
        :func:`~optima_plugin.files.check_distinct`).

        Outputs: ``--report``, ``--plot``, ``--save_layer_ratio``, ``--save_masks``, ``--save_model`` and the
        checkpoint folder (read to resume, but replaced and deleted by the tool: an output). Inputs: the
        ``--model`` folder (its GGUF file inside), local calibration and evaluation texts, ``--load_layer_ratio``,
        ``--mask_checkpoint`` and ``--tasks_dir``, where they exist.
        """
        from .data import BUILTIN, parse_calibration
        from .files import check_distinct

        outputs = [(f"--{name}", getattr(self, name)) for name in
                   ("report", "plot", "save_layer_ratio", "save_masks", "save_model", "checkpoint_dir")
                   if getattr(self, name)]
        texts = [source for source, _ in parse_calibration(self.calibration_dataset)]
        inputs = [("--model", self.model_path)]
        inputs += [("--calibration_dataset", source) for source in texts if source not in BUILTIN]
        inputs += [("--eval_ppl", source) for source in self.eval_ppl if source not in BUILTIN]
        inputs += [("--load_layer_ratio", self.load_layer_ratio), ("--tasks_dir", self.tasks_dir),
                   ("--mask_checkpoint", self.plugin_options.get("mask_checkpoint"))]
        check_distinct(outputs, [(flag, str(path)) for flag, path in inputs if path and Path(path).exists()])

    @property
    def checkpoint_is_default(self) -> bool:
        """Whether the checkpoint folder is the default one beside ``--save_model`` (removed after success)."""
        from .checkpoint import default_checkpoint_dir

        return bool(self.save_model and self.checkpoint_dir == default_checkpoint_dir(self.save_model))

    @property
    def row_allocation(self) -> Optional[str]:
        """The row allocator's registry name (``trim`` with ``--use_trim``), or None."""
        return "trim" if self.use_trim else None

    def _validate_allocation(self) -> None:
        """Host method aliases (``wanda_owl`` = wanda + OWL, ...), the allocation and plugin options."""
        from .allocators.ratio_file import check_suffix

        if self.prune_method in HOST_METHODS:
            selector, allocation = HOST_METHODS[self.prune_method]
            if self.allocation not in ("uniform", allocation):
                raise ValueError(f"--prune_method {self.prune_method} means --allocation {allocation}; "
                                 f"drop --allocation {self.allocation} or use --prune_method {selector}")
            self.prune_method, self.allocation = selector, allocation
        if self.pattern.structured and (self.use_trim or self.allocation != "uniform" or self.load_layer_ratio):
            what = "--use_trim" if self.use_trim else (
                f"--allocation {self.allocation}" if self.allocation != "uniform" else "--load_layer_ratio")
            raise ValueError(f"{what} gives layers or rows different sparsities, but --sparsity_type "
                             f"{self.sparsity_type} fixes every row at {self.pattern.ratio:g}; use unstructured")
        # the plugins' options (OWL, AlphaPruning, TRIM, third parties): completed with defaults, validated
        self.plugin_options = self.declared_options().resolve(self.plugin_options)
        from .compress import validate as validate_compression

        validate_compression(self)
        if self.plugin_options.get("mask_checkpoint") and self.prune_method != "file":
            raise ValueError(f"--mask_checkpoint is read by --prune_method file, not {self.prune_method}: add "
                             "--prune_method file to use its masks, or drop --mask_checkpoint")
        for flag in ("save_layer_ratio", "load_layer_ratio"):
            if getattr(self, flag):
                check_suffix(getattr(self, flag), f"--{flag}")

    def _validate_names(self) -> None:
        """The selector, updater, allocators and solver are registered (after the host aliases)."""
        from .plugins import lookup
        from .solvers import get_solver

        lookup("selectors", self.prune_method, "--prune_method")
        lookup("updaters", self.weight_update, "--weight_update")
        lookup("allocators", self.allocation, "--allocation")
        if self.row_allocation:
            lookup("row_allocators", self.row_allocation, "--use_trim")
        get_solver(self.solver)

    def to_dict(self) -> dict:
        """Every option by name, the plugins' among them (the report's ``options``, the checkpoint's identity)."""
        out = dataclasses.asdict(self)
        plugin = out.pop("plugin_options")
        return {**out, **self.declared_options().defaults(), **plugin}

    @classmethod
    def from_options(cls, **options) -> "PruneConfig":
        """Build from keyword options, core and plugin-declared alike, and validate.

        Unknown names raise ``TypeError`` listing the known ones (the plugins' included).
        """
        declared = cls.declared_options().options
        known = _core_names() | set(declared)
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        plugin = {name: options.pop(name) for name in list(options) if name in declared}
        return cls(**options, plugin_options=plugin).validate()


def _core_names() -> set[str]:
    """The core option names: :class:`PruneConfig`'s fields but ``plugin_options``."""
    return {f.name for f in dataclasses.fields(PruneConfig)} - {"plugin_options"}
