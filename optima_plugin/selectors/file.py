"""Masks read from a file (``--prune_method file --mask_checkpoint PATH``): TRIM's, our own
``--save_masks``, or a MaskLLM-style file of 0/1 tensors by layer name (see :mod:`optima_plugin.maskfile`).

The file's masks replace selection: ``--sparsity_ratio`` is not used, and the weight
update (``--weight_update optima``) re-solves the kept weights exactly as for any selector.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from torch import Tensor, nn

from ..maskfile import CONVENTIONS, MaskFile, open_masks
from ..options import OptionParser
from ..sparsity import Pattern
from .base import Ratio, Selection

log = logging.getLogger(__name__)


def addoption(parser: OptionParser) -> None:
    """``--mask_checkpoint`` and ``--mask_convention``."""
    group = parser.getgroup("file", "masks from a file (--prune_method file)")
    group.addoption("mask_checkpoint", default=None, help="mask file: TRIM's or our --save_masks, or 0/1 tensors "
                    "by layer name (MaskLLM)", check=lambda v: v is None or Path(v).is_file(),
                    requirement="must be an existing file")
    group.addoption("mask_convention", default=None, help="for files of plain 0/1 tensors: kept (1 keeps the "
                    "weight, MaskLLM) or pruned (1 prunes it)", check=lambda v: v is None or v in CONVENTIONS,
                    requirement=f"must be one of {', '.join(CONVENTIONS)}")


class FileSelector:
    """Selector ``file``: each linear's mask is the file's (True = pruned), checked against its shape and pattern."""

    name = "file"
    needs_hessian = False
    needs_name = True
    ignores_ratio = True  # its masks prune even at --sparsity_ratio 0

    def __init__(self) -> None:
        self.masks: Optional[MaskFile] = None
        self.keys: dict[str, str] = {}

    def prepare(self, config, linears: dict[str, nn.Linear], prefix: str) -> None:
        """Open ``--mask_checkpoint`` and match every linear to a mask of its shape (before calibration).

        ``linears``: the linears to prune by full name; ``prefix``: the blocks' path (``model.layers``).
        Every matched mask is read and checked (0/1 values, packed size, the ``--sparsity_type`` pattern).
        ``ValueError`` naming the missing linears, the wrong shapes, a bad mask, or what the file lacks."""
        path = config.option("mask_checkpoint")
        if not path:
            raise ValueError("--prune_method file reads its masks from --mask_checkpoint PATH; give the file")
        if config.use_trim or config.allocation != "uniform" or config.load_layer_ratio:
            raise ValueError("--prune_method file takes every mask from --mask_checkpoint: drop --use_trim, "
                             "--allocation and --load_layer_ratio (they choose ratios the file already fixes)")
        masks = open_masks(path, config.option("mask_convention"))
        keys, missing, wrong = {}, [], []
        for name, lin in linears.items():
            key = masks.find(name, prefix)
            if key is None:
                missing.append(name)
            elif tuple(masks.shapes[key]) != tuple(lin.weight.shape):
                wrong.append(f"{name}: {list(masks.shapes[key])} in the file, {list(lin.weight.shape)} in the model")
            else:
                keys[name] = key
        if missing:
            sample = ", ".join(masks.keys()[:3]) or "none"
            raise ValueError(f"--mask_checkpoint {path} has no mask for {len(missing)} of {len(linears)} linears "
                             f"(e.g. {', '.join(missing[:3])}); its keys look like: {sample}. Prune only the "
                             "linears it has (e.g. --skip_attention) or give the mask file of this model")
        if wrong:
            raise ValueError(f"--mask_checkpoint {path}: {len(wrong)} mask(s) do not match their weight's shape "
                             f"({'; '.join(wrong[:3])}); give the mask file of this model")
        pattern = config.pattern
        for name, key in keys.items():  # every mask read and checked now, not when its block comes
            _check_pattern(name, masks.mask(key), pattern)
        unused = len(masks.shapes) - len(set(keys.values()))
        log.info("masks from %s (%s layout) for %d linears%s; --sparsity_ratio is not used", path, masks.layout,
                 len(keys), f", {unused} other mask(s) in the file not used" if unused else "")
        self.masks, self.keys = masks, keys

    def select(self, weight: Tensor, hessian: Optional[Tensor], ratio: Ratio, pattern: Pattern, *,
               name: Optional[str] = None) -> Selection:
        if self.masks is None or name not in self.keys:
            raise RuntimeError(f"--prune_method file has no mask for {name!r}: prepare() was not called with it")
        pruned = self.masks.mask(self.keys[name]).to(weight.device)
        _check_pattern(name, pruned, pattern)
        return Selection(pruned, stats={"pruned": float(pruned.float().mean())})


def _check_pattern(name: str, pruned: Tensor, pattern: Pattern) -> None:
    """``ValueError`` when ``--sparsity_type`` is N:M and a group of M of ``pruned`` prunes fewer than N."""
    if not pattern.structured:
        return
    r, d = pruned.shape
    groups = pruned.reshape(r, d // pattern.m, pattern.m).sum(-1)
    if bool((groups < pattern.n).any()):
        raise ValueError(f"{name}: the mask from --mask_checkpoint is not {pattern} (a group of "
                         f"{pattern.m} prunes fewer than {pattern.n}); drop --sparsity_type "
                         f"{pattern} or give {pattern} masks")


def validate_config(config) -> None:
    """``--mask_checkpoint`` is read by ``--prune_method file`` only."""
    if config.plugin_options.get("mask_checkpoint") and config.prune_method != "file":
        raise ValueError(f"--mask_checkpoint is read by --prune_method file, not {config.prune_method}: add "
                         "--prune_method file to use its masks, or drop --mask_checkpoint")
