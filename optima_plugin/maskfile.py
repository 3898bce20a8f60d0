"""Pruning masks on disk: written by ``--save_masks``, read back by ``--prune_method file``.

Three layouts are read (mask True = pruned in memory, whatever the file's convention):

* **ours** (``--save_masks``): a safetensors file, one uint8 tensor per pruned linear named
  by its full module name (``model.layers.0.self_attn.q_proj``), the mask's bits packed
  row-major (``numpy.packbits``, 1 = pruned); the metadata holds ``format: optima-masks``
  and each mask's shape (``shapes``: JSON by name).
* **TRIM's** ``--save_masks``: ``torch.save({"metadata": {..., "layer_info": {block:
  {linear: {"shape", "mask_key"}}}}, "masks": {mask_key: packed uint8}})``, 1 = pruned
  (TRIM saves ``weight == 0``); ``block``/``linear`` are the block index and the linear's
  name inside the block.
* **plain** (MaskLLM-style): a safetensors or ``torch.save`` file of boolean or 0/1
  tensors by name (the module name, optionally ending in ``.weight``, ``.mask`` or
  ``.weight_mask``, with or without a leading ``model.``). A plain file does not say what
  1 means: ``--mask_convention kept`` (MaskLLM: the mask multiplies the weight) or
  ``pruned``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)

FORMAT = "optima-masks"
CONVENTIONS = ("pruned", "kept")
_SUFFIXES = ("", ".weight", ".mask", ".weight_mask")


def pack(mask: Tensor) -> Tensor:
    """Bool ``mask`` (any shape) -> flat uint8 tensor of its bits, row-major, 1 = True (``numpy.packbits``)."""
    return torch.from_numpy(np.packbits(mask.detach().to("cpu", torch.bool).numpy().reshape(-1)))


def unpack(packed: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Inverse of :func:`pack`: a bool tensor of ``shape``."""
    n = int(np.prod(shape))
    bits = np.unpackbits(packed.to("cpu", torch.uint8).numpy().reshape(-1))
    if bits.size < n or bits.size - n >= 8:
        raise ValueError(f"{bits.size} packed bits do not hold a mask of shape {list(shape)}")
    return torch.from_numpy(bits[:n].reshape(shape).astype(bool))


def save_masks(masks: Iterable[tuple[str, Tensor]], path: str | Path) -> int:
    """Write ``(linear name, bool mask (True = pruned))`` pairs to ``path`` in our layout, atomically; return
    the number of masks. Each mask is packed as it comes (1 bit per weight held, not 1 byte)."""
    from safetensors.torch import save_file

    from .files import atomic_path

    shapes, tensors = {}, {}
    for name, mask in masks:
        shapes[name], tensors[name] = list(mask.shape), pack(mask)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "convention": "pruned",
                                               "shapes": json.dumps(shapes)})
    return len(tensors)


@dataclass
class MaskFile:
    """The masks of one file, by name, read lazily (True = pruned).

    Attributes:
        path: the file.
        layout: ``ours``, ``trim`` or ``plain``.
        shapes: each mask's shape by the file's own key.
    """

    path: Path
    layout: str
    shapes: dict[str, tuple[int, ...]]
    _tensors: Optional[dict] = None  # torch.save files: the tensors by key, loaded at open (TRIM's: packed masks)
    _trim_info: Optional[dict] = None  # TRIM's layout: "<block>/<linear>" -> its metadata (shape, mask_key)
    _kept: bool = False  # plain files with --mask_convention kept: 1 = kept

    def keys(self) -> list[str]:
        return list(self.shapes)

    def find(self, name: str, block_prefix: str) -> Optional[str]:
        """The file's key for the linear ``name`` (``<block_prefix>.<i>.<rel>``), or None."""
        if self.layout == "trim":
            rest = name[len(block_prefix) + 1:] if name.startswith(block_prefix + ".") else None
            if rest is None:
                return None
            index, _, rel = rest.partition(".")
            key = f"{index}/{rel}"
            return key if key in self.shapes else None
        bare = name[len("model."):] if name.startswith("model.") else name
        for base in (name, bare, "model." + bare):
            for suffix in _SUFFIXES:
                if base + suffix in self.shapes:
                    return base + suffix
        return None

    def mask(self, key: str) -> Tensor:
        """The bool mask (True = pruned) stored under ``key``; ``ValueError`` naming the file and ``key`` for
        a packed mask that is not uint8 or not of its shape, or a plain one of values other than 0/1."""
        if self.layout == "trim":
            return self._unpacked(key, self._tensors[self._trim_info[key]["mask_key"]])
        if self._tensors is not None:
            value = self._tensors[key]
        else:
            from safetensors import safe_open

            with safe_open(str(self.path), framework="pt", device="cpu") as f:
                value = f.get_tensor(key)
        if self.layout == "ours":
            return self._unpacked(key, value)
        if value.dtype != torch.bool:
            if not bool(((value == 0) | (value == 1)).all()):
                bad = value[(value != 0) & (value != 1)].flatten()[0].item()
                raise ValueError(f"--mask_checkpoint {self.path}: {key} holds values other than 0 and 1 "
                                 f"(e.g. {bad}); a mask must be boolean or 0/1")
            value = value != 0
        return ~value if self._kept else value

    def _unpacked(self, key: str, packed: Tensor) -> Tensor:
        if packed.dtype != torch.uint8:
            raise ValueError(f"--mask_checkpoint {self.path}: {key} is {str(packed.dtype).removeprefix('torch.')}, "
                             "not the uint8 bits of a packed mask")
        try:
            return unpack(packed, self.shapes[key])
        except ValueError as err:
            raise ValueError(f"--mask_checkpoint {self.path}: {key}: {err}") from None


def open_masks(path: str | Path, convention: Optional[str] = None) -> MaskFile:
    """Open a mask file (see the module docstring for the layouts); ``ValueError`` saying what is wrong.

    ``convention``: for plain files, ``pruned`` (1 = pruned) or ``kept`` (1 = kept, MaskLLM's);
    ignored (and checked) for ours and TRIM's, which say it themselves."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--mask_checkpoint {path}: no such file")
    if convention is not None and convention not in CONVENTIONS:
        raise ValueError(f"--mask_convention must be one of {', '.join(CONVENTIONS)}, got {convention!r}")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta, keys = f.metadata() or {}, list(f.keys())
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
        safetensors = True
    except Exception:  # not safetensors: a torch.save file
        safetensors = False
    if safetensors and meta.get("format") == FORMAT:
        _self_describing(path, convention, "our --save_masks")
        try:
            stored = json.loads(meta.get("shapes", ""))
            return MaskFile(path, "ours", {k: tuple(int(n) for n in stored[k]) for k in keys})
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"--mask_checkpoint {path}: its 'shapes' metadata does not give every mask's shape "
                             f"({type(err).__name__}: {err}); write the file again with --save_masks") from None
    if safetensors:
        return _plain(path, shapes, None, convention)
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"--mask_checkpoint {path}: neither a safetensors file nor a torch.save file of tensors "
                         f"({type(err).__name__}: {err})") from err
    if isinstance(data, dict) and "metadata" in data and "masks" in data:
        _self_describing(path, convention, "TRIM's --save_masks")
        index, shapes = {}, {}
        for block, linears in data["metadata"].get("layer_info", {}).items():
            for rel, info in linears.items():
                index[f"{block}/{rel}"] = info
                shapes[f"{block}/{rel}"] = tuple(info["shape"])
        return MaskFile(path, "trim", shapes, _tensors=data["masks"], _trim_info=index)
    if isinstance(data, dict) and "state_dict" in data and isinstance(data["state_dict"], dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(torch.is_tensor(v) for v in data.values()):
        raise ValueError(f"--mask_checkpoint {path}: expected a dict of mask tensors by layer name, "
                         f"got {type(data).__name__}")
    return _plain(path, {k: tuple(v.shape) for k, v in data.items()}, data, convention)


def _self_describing(path: Path, convention: Optional[str], what: str) -> None:
    if convention == "kept":
        raise ValueError(f"--mask_checkpoint {path} was written by {what} (True = pruned); "
                         "drop --mask_convention kept")


def _plain(path: Path, shapes: dict, tensors: Optional[dict], convention: Optional[str]) -> MaskFile:
    if convention is None:
        raise ValueError(f"--mask_checkpoint {path} holds plain tensors by name, which do not say what 1 means: "
                         "add --mask_convention kept (1 keeps the weight, as MaskLLM's masks) or "
                         "--mask_convention pruned (1 prunes it)")
    return MaskFile(path, "plain", shapes, _tensors=tensors, _kept=convention == "kept")
