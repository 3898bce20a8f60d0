"""The one entry that checks a run's options: :func:`resolve` returns a resolved, frozen config.

The core checks (ranges of the core fields, evaluation, streaming, outputs) live here; every feature
checks its own options beside its code through the ``optima_validate`` hook (the built-ins register
theirs like any plugin, :mod:`optima_plugin.builtin`). The CLI, the Python API, the engine and
``optima-host`` all go through here, once per run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

from .config import PLOT_FORMATS, PruneConfig
from .data import BUILTIN, parse_calibration
from .files import check_distinct, check_output_file
from .options import OptionParser
from .plugins import collect_options, get_plugin_manager, lookup
from .solvers import get_solver


def core_names() -> set[str]:
    """The core option names: :class:`PruneConfig`'s fields but ``plugin_options``."""
    return {f.name for f in dataclasses.fields(PruneConfig)} - {"plugin_options"}


def declared_options() -> OptionParser:
    """The plugin-declared options (``optima_addoption``); a plugin may not reuse a core field's name."""
    return collect_options(reserved=core_names())


def check_tol(tol: Optional[float], flag: str = "--tol") -> None:
    """``--tol``: None or a relative tolerance in (0, 1) (the rule of ``optima-prune`` and ``optima-host``)."""
    if tol is not None and not 0.0 < tol < 1.0:
        raise ValueError(f"{flag} must be in (0, 1) (a relative tolerance), got {tol}")


def resolve(config: Optional[PruneConfig] = None, **options: Any) -> PruneConfig:
    """Check every option, input and output path of a run (cheap: no model, no tokenizing) and return
    the resolved, frozen config; ``config`` (or the defaults) with ``options`` (core and plugin-declared).

    ``TypeError`` for an unknown keyword (listing the known ones), ``ValueError`` with a flag-named
    message for a bad value. A config that is resolved already is returned as it is.
    """
    if config is not None and config.resolved and not options:
        return config
    declared = declared_options()
    known = core_names() | set(declared.options)
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    plugin = {name: options.pop(name) for name in list(options) if name in declared.options}
    base = config or PruneConfig()
    config = dataclasses.replace(base, **options, plugin_options={**base.plugin_options, **plugin})
    config = _check_core(config)
    config = dataclasses.replace(config, plugin_options=declared.resolve(config.plugin_options))
    for impl in reversed(get_plugin_manager().hook.optima_validate.get_hookimpls()):  # pluggy's call order
        derived = impl.function(config=config)
        if derived:
            config = dataclasses.replace(config, **derived)
    _check_names(config)
    _check_outputs(config)
    object.__setattr__(config, "_resolved", True)  # see PruneConfig.resolved; a replace() copy is not resolved
    return config


def _check_core(config: PruneConfig) -> PruneConfig:
    """The core fields' ranges and combinations; returns the config with list options split."""
    if not 0.0 <= config.sparsity_ratio < 1.0:
        raise ValueError(f"--sparsity_ratio must be in [0, 1), got {config.sparsity_ratio}")
    config.pattern  # parses and checks N:M
    for name in ("nsamples", "seqlen", "batch_size"):
        if getattr(config, name) < 1:
            raise ValueError(f"--{name} must be a positive integer, got {getattr(config, name)}")
    if config.device not in ("auto", "cpu", "cuda") and not config.device.startswith("cuda:"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {config.device!r}")
    check_tol(config.tol)
    for name in ("max_iter", "eval_max_windows"):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be a positive integer, got {value}")
    if config.nsamples % config.batch_size:
        raise ValueError(f"--nsamples {config.nsamples} must be a multiple of --batch_size {config.batch_size}")
    lists = {name: [] for name in ("eval_ppl", "eval_zero_shot") if getattr(config, name) is None}  # None: none
    if isinstance(config.eval_ppl, str):
        lists["eval_ppl"] = [s for s in config.eval_ppl.split(",") if s]
    if isinstance(config.eval_zero_shot, str):
        lists["eval_zero_shot"] = [s.strip() for s in config.eval_zero_shot.split(",") if s.strip()]
    config = dataclasses.replace(config, **lists) if lists else config
    if config.eval_batch_size < 1:
        raise ValueError(f"--eval_batch_size must be a positive integer, got {config.eval_batch_size}")
    if config.num_fewshot < 0:
        raise ValueError(f"--num_fewshot must be >= 0, got {config.num_fewshot}")
    if config.eval_limit is not None and config.eval_limit <= 0:
        raise ValueError(f"--eval_limit must be positive (a count, or a fraction below 1), got {config.eval_limit}")
    if config.stream and not config.save_model:
        raise ValueError("--stream (on by itself when the model is larger than the available RAM) writes each "
                         "pruned block to the output as soon as it is done: give --save_model DIR "
                         "(or --no-stream to load the model whole)")
    if config.stream and config.eval_zero_shot:
        raise ValueError("--eval_zero_shot runs lm-eval on a model in memory, which --stream does not hold: "
                         "evaluate the saved folder afterwards (lm_eval --model hf --model_args "
                         "pretrained=SAVE_MODEL ...) or drop --stream")
    if config.plot and not config.plot.lower().endswith(PLOT_FORMATS):
        raise ValueError(f"--plot {config.plot}: the file name must end with one of {', '.join(PLOT_FORMATS)}")
    if config.tasks_dir and not Path(config.tasks_dir).is_dir():
        raise ValueError(f"--tasks_dir {config.tasks_dir}: no such directory")
    return config


def _check_names(config: PruneConfig) -> None:
    """The selector, updater, allocators, quantizer and solver are registered (after the host aliases)."""
    lookup("selectors", config.prune_method, "--prune_method")
    lookup("updaters", config.weight_update, "--weight_update")
    lookup("allocators", config.allocation, "--allocation")
    if config.row_allocation:
        lookup("row_allocators", config.row_allocation, "--use_trim")
    if config.plugin_options.get("quantize_weight"):
        lookup("quantizers", config.plugin_options["quantizer"], "--quantizer")
    get_solver(config.solver)


def _check_outputs(config: PruneConfig) -> None:
    """Every output file can be written; no output overlaps an input or another output (see
    :func:`~optima_plugin.files.check_distinct`).

    Outputs: ``--report``, ``--plot``, ``--save_layer_ratio``, ``--save_masks``, ``--save_model`` and the
    checkpoint folder (read to resume, but replaced and deleted by the tool: an output). Inputs: the
    ``--model`` folder (its GGUF file inside), local calibration and evaluation texts, ``--load_layer_ratio``,
    ``--mask_checkpoint`` and ``--tasks_dir``, where they exist.
    """
    for flag in ("report", "plot", "save_layer_ratio", "save_masks"):
        if getattr(config, flag):
            check_output_file(getattr(config, flag), f"--{flag}")
    outputs = [(f"--{name}", getattr(config, name)) for name in
               ("report", "plot", "save_layer_ratio", "save_masks", "save_model", "checkpoint_dir")
               if getattr(config, name)]
    texts = [source for source, _ in parse_calibration(config.calibration_dataset)]
    inputs = [("--model", config.model_path)]
    inputs += [("--calibration_dataset", source) for source in texts if source not in BUILTIN]
    inputs += [("--eval_ppl", source) for source in config.eval_ppl if source not in BUILTIN]
    inputs += [("--load_layer_ratio", config.load_layer_ratio), ("--tasks_dir", config.tasks_dir),
               ("--mask_checkpoint", config.plugin_options.get("mask_checkpoint"))]
    check_distinct(outputs, [(flag, str(path)) for flag, path in inputs if path and Path(path).exists()])
