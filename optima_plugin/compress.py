"""The compression stage of a linear after its weight update: quantization, then low-rank adapters.

Runs inside the block loop (:func:`~optima_plugin.engine.prune_model`), so the later blocks
calibrate on the outputs of the compressed block. For one linear with dense weights ``W``,
pruned and updated weights ``Ŵ_p`` and mask ``pruned`` (True = pruned):

1. ``--quantize_weight``: the quantizer (``--quantizer``) turns ``Ŵ_p`` into ``Ŵ_q`` (pruned
   entries stay 0) and the linear carries its :class:`~optima_plugin.quantizers.QuantState`;
2. ``--lora_rank k``: an adapter ``L R`` is fitted to ``E = W - Ŵ_q`` (:mod:`optima_plugin.lowrank`),
   merged into the weight or kept separate (``--separate_lora``).

The report's ``compression`` of each layer gives the relative output error
``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` after pruning, after quantization and after the adapter
(``relative_error``, on the true, unshrunk calibration ``H``; under ``--hessian_shrink`` the same on
the shrunk ``H`` the quantizer and adapter fitted with beside it, ``solved_relative_error``).
With ``--objective dense`` these stay the pruned-path figures (``H`` of the pruned model's
inputs, dense weights ``W`` as reference): the stage fits ``W`` on the pruned path, not the dense
model's outputs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from . import lowrank
from .damping import fixed_damp
from .options import declared_defaults
from .quantizers import QUANT_ATTR, QuantOptions, QuantState, quant_state, quantize_scaled
from .quantizers import addoption as quantization_options
from .solvers.problem import objective_per_row

#: the options of the stage that only matter with --quantize_weight (flag: what it needs)
log = logging.getLogger(__name__)

_QUANT_ONLY = ("quantizer", "group_size", "act_order", "scale_important_weights")
_LORA_ONLY = ("lowrank", "separate_lora", "quantize_lora", "prune_lora", "pad_lora", "lora_tile_size")


@dataclass
class Compression:
    """The stage's settings, read once from the run's config (:meth:`from_config`)."""

    quantizer: Any = None  # a registered quantizer, or None
    quant: Optional[QuantOptions] = None
    lora_rank: float = 0.0
    lowrank: str = "exact"
    separate: bool = False
    quantize_lora: bool = False
    prune_lora: bool = False
    pad_lora: bool = False
    tile: int = 256
    damp: float = 0.01
    scale_important: bool = False

    @classmethod
    def from_config(cls, config, lookup: Callable[[str, str, str], Any]) -> Optional["Compression"]:
        """The stage for ``config`` (a resolved :class:`~optima_plugin.config.PruneConfig`), or None when off;
        ``lookup`` is :func:`optima_plugin.plugins.lookup` (the quantizer by name)."""

        opt = config.option
        damp = fixed_damp(config.damp)  # --damp auto chooses the OPTIMA update's damp only
        quantize, rank = opt("quantize_weight"), opt("lora_rank")
        if not quantize and not rank:
            return None
        return cls(
            quantizer=lookup("quantizers", opt("quantizer"), "--quantizer") if quantize else None,
            quant=QuantOptions(opt("bitwidth"), opt("group_size"), opt("act_order"), damp),
            lora_rank=rank, lowrank=opt("lowrank"), separate=opt("separate_lora"),
            quantize_lora=opt("quantize_lora"), prune_lora=opt("prune_lora"), pad_lora=opt("pad_lora"),
            tile=opt("lora_tile_size"), damp=damp, scale_important=opt("scale_important_weights"))

    def apply(self, name: str, linear: nn.Linear, dense: Tensor, pruned: Tensor, hessian: Optional[Tensor],
              true_hessian: Optional[Tensor] = None) -> dict:
        """Quantize and/or fit the adapter of ``linear`` (its weight: the pruned, updated ``r x d``); ``dense``:
        its weights before pruning. Writes the linear; returns the report's ``compression`` entry.

        ``hessian``: what quantizer and adapter fit with (shrunk under ``--hessian_shrink``); ``true_hessian``:
        the unshrunk one (None: nothing was shrunk). ``relative_error`` is measured on the true ``H``, and
        ``solved_relative_error`` on ``hessian`` when a shrink was applied."""
        weight = linear.weight.detach()
        out: dict = {}
        errors = _Errors(hessian, dense, true_hessian)
        errors.add("pruned", weight)
        if self.quantizer is not None:
            result = quantize_scaled(self.quantizer, weight, pruned, hessian, self.quant) if self.scale_important \
                else self.quantizer.quantize(weight, pruned, hessian, self.quant)
            if bool(result.weight.masked_select(pruned).any()):
                raise ValueError(f"{name}: quantizer {self.quantizer.name} gave pruned weights nonzero values")
            with torch.no_grad():
                weight.copy_(result.weight)
            setattr(linear, QUANT_ATTR, result.state)
            out["quantizer"] = {"name": self.quantizer.name, "bits": result.state.bits,
                                "group_size": result.state.group_size, **result.stats}
            errors.add("quantized", weight)
        if self.lora_rank:
            if hessian is None:
                raise ValueError(f"{name}: low-rank adapters need the layer's Hessian")
            error = dense.float() - weight.float()
            adapter, stats = lowrank.fit(error, hessian, fraction=self.lora_rank, method=self.lowrank,
                                         damp=self.damp, prune=self.prune_lora,
                                         quantize_bits=self.quant.bits if self.quantize_lora else None,
                                         tile=self.tile, pad=self.pad_lora)
            if self.separate:
                lowrank.attach(linear, adapter.left, adapter.right)
            else:
                with torch.no_grad():
                    weight.copy_((weight.float() + adapter.product()).to(weight.dtype))
                if hasattr(linear, QUANT_ATTR):  # merged: the weight is no longer on the integer grid
                    delattr(linear, QUANT_ATTR)
            out["lowrank"] = {**stats, "separate": self.separate}
            errors.add("lowrank", weight.float() + adapter.product() if self.separate else weight)
        out["relative_error"] = errors.true
        if errors.solved is not None:
            out["solved_relative_error"] = errors.solved
        return out


class _Errors:
    """The relative output errors ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` of each stage on the true ``H`` and, under a
    shrink, on the shrunk ``H`` (none without a Hessian)."""

    def __init__(self, hessian: Optional[Tensor], dense: Tensor, true_hessian: Optional[Tensor]) -> None:
        self.dense = dense
        self.true: dict = {}
        self.solved: Optional[dict] = {} if hessian is not None and true_hessian is not None else None
        self._true_h = true_hessian if true_hessian is not None else hessian
        self._solved_h = hessian if self.solved is not None else None
        zero = torch.zeros_like(dense)
        self._energy = _objective(self._true_h, dense, zero) if self._true_h is not None else None
        self._solved_energy = _objective(hessian, dense, zero) if self._solved_h is not None else None

    def add(self, stage: str, weight: Tensor) -> None:
        if self._true_h is not None:
            self.true[stage] = _ratio(_objective(self._true_h, self.dense, weight), self._energy)
        if self._solved_h is not None:
            self.solved[stage] = _ratio(_objective(self._solved_h, self.dense, weight), self._solved_energy)


def _objective(hessian: Tensor, dense: Tensor, new: Tensor) -> float:
    h = hessian.float()
    return float(objective_per_row(h, new.float().to(h.device) - dense.float().to(h.device)).sum())


def _ratio(value: float, energy: float) -> float:
    return value / energy if energy > 0 else 0.0


def validate(config) -> None:
    """One-line ``ValueError`` for a combination of the stage's options that cannot work (before any work)."""
    opt = config.option
    quantize, rank = opt("quantize_weight"), opt("lora_rank")
    defaults = declared_defaults(quantization_options, lowrank.addoption)
    if not quantize:  # the --quantizer name is checked with the other registry names (optima_plugin.validate)
        given = [f"--{k}" for k in _QUANT_ONLY if opt(k) != defaults[k]]
        if given:
            raise ValueError(f"{', '.join(given)} set(s) how weights are quantized: add --quantize_weight, "
                             "or drop it")
        if opt("bitwidth") != defaults["bitwidth"] and not opt("quantize_lora"):
            raise ValueError("--bitwidth is used by --quantize_weight or --quantize_lora: add one, or drop --bitwidth")
    if not rank:
        given = [f"--{k}" for k in _LORA_ONLY if opt(k) != defaults[k]]
        if given:
            raise ValueError(f"{', '.join(given)} shape(s) the low-rank adapters: add --lora_rank (e.g. 0.1), "
                             "or drop it")
    if rank and not opt("separate_lora"):
        log.warning(
            "--lora_rank without --separate_lora merges L R into the weights, which are dense again afterwards "
            "(the report's sparsity is that of the pruned weights before the merge)")
    if opt("prune_lora") and config.sparsity_type != "2:4":
        raise ValueError(f"--prune_lora 2:4-prunes the adapters of a 2:4 model; --sparsity_type is "
                         f"{config.sparsity_type}: use --sparsity_type 2:4 or drop --prune_lora")
    if rank and not opt("separate_lora") and config.save_masks:
        raise ValueError("--save_masks reads the masks back from the zeros of the weights, which merged adapters "
                         "fill: add --separate_lora, or drop --save_masks")
    if opt("separate_lora") and config.stream:
        raise ValueError("--separate_lora keeps adapters in memory beside each linear, which --stream does not "
                         "hold: merge them (drop --separate_lora) or drop --stream")


# -- checkpoint records -------------------------------------------------------


def block_extras(block: nn.Module) -> dict[str, Tensor]:
    """The compression state of a block's linears as tensors (for the checkpoint): quantization scales and
    ``[bits, group_size]``, separate adapters. Keys are relative to the block."""
    out = {}
    for rel, module in block.named_modules():
        state = quant_state(module)
        if state is not None:
            out[f"{rel}.{QUANT_ATTR}.scale"] = state.scale.detach().to("cpu").contiguous()
            out[f"{rel}.{QUANT_ATTR}.meta"] = torch.tensor([state.bits, state.group_size])
            if state.input_scale is not None:
                out[f"{rel}.{QUANT_ATTR}.input_scale"] = state.input_scale.detach().to("cpu").contiguous()
        adapter = getattr(module, lowrank.ADAPTER_ATTR, None)
        if isinstance(adapter, lowrank.LowRankAdapter):
            out[f"{rel}.{lowrank.ADAPTER_ATTR}.left"] = adapter.left.detach().to("cpu").contiguous()
            out[f"{rel}.{lowrank.ADAPTER_ATTR}.right"] = adapter.right.detach().to("cpu").contiguous()
    return out


def restore_extras(block: nn.Module, tensors: dict[str, Tensor]) -> None:
    """Put back what :func:`block_extras` recorded."""
    modules = dict(block.named_modules())
    for key, value in tensors.items():
        if key.endswith(f".{QUANT_ATTR}.meta"):
            rel = key[: -len(f".{QUANT_ATTR}.meta")]
            bits, group = (int(v) for v in value.tolist())
            setattr(modules[rel], QUANT_ATTR, QuantState(bits, group, tensors[f"{rel}.{QUANT_ATTR}.scale"],
                                                         tensors.get(f"{rel}.{QUANT_ATTR}.input_scale")))
        elif key.endswith(f".{lowrank.ADAPTER_ATTR}.left"):
            rel = key[: -len(f".{lowrank.ADAPTER_ATTR}.left")]
            lowrank.attach(modules[rel], value, tensors[f"{rel}.{lowrank.ADAPTER_ATTR}.right"])
