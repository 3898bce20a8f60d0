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
SAVE_FORMATS = ("hf", "compressed-tensors")

#: The hosts' (TRIM/OWL/AlphaPruning) combined method names: selector + allocation.
HOST_METHODS = {
    "wanda_owl": ("wanda", "owl"),
    "wanda_alpha": ("wanda", "alphapruning"),
    "magnitude_owl": ("magnitude", "owl"),
    "magnitude_alpha": ("magnitude", "alphapruning"),
}


@dataclass(frozen=True)
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
