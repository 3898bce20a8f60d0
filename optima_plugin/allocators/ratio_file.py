"""Saving and loading layer ratios (``--save_layer_ratio`` / ``--load_layer_ratio``).

Two formats, by suffix:

* ``.json``: ``{"allocation": ..., "target": ..., "ratios": {linear full name: ratio}}``
  (a plain ``{name: ratio}`` object is accepted too);
* ``.npy``: a 1-D float array, one ratio per pruned linear in block order, or
  one per decoder block (repeated over the block's linears). The OWL
  reference's ``.npy`` files hold block *densities*: load ``1 - array``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from ..files import atomic_path, atomic_write_text
from .base import AllocationContext, linears_by_block

log = logging.getLogger(__name__)

SUFFIXES = (".json", ".npy")


def check_suffix(path: str, flag: str) -> None:
    """``ValueError`` unless ``path`` ends in ``.json`` or ``.npy``."""
    if Path(path).suffix.lower() not in SUFFIXES:
        raise ValueError(f"{flag} {path}: use a .json or .npy file name")


def save_layer_ratios(path: str, ratios: dict, *, allocation: str, target: float) -> None:
    """Write ``{linear full name: ratio}`` (in block order) to ``path`` (.json or .npy), atomically.

    Parent folders are created.
    """
    check_suffix(path, "--save_layer_ratio")
    out = Path(path)
    if out.suffix.lower() == ".npy":
        with atomic_path(out) as tmp, open(tmp, "wb") as f:  # a handle: np.save adds no second .npy
            np.save(f, np.asarray(list(ratios.values()), dtype=np.float64))
    else:
        atomic_write_text(out, json.dumps({"allocation": allocation, "target": target, "ratios": ratios}, indent=1))
    log.info("layer ratios written to %s", out)


def load_layer_ratios(path: str, context: AllocationContext) -> dict:
    """``{linear full name: ratio}`` for every linear of ``context`` from ``path``.

    ``ValueError`` when the file does not match the model's pruned linears.
    """
    check_suffix(path, "--load_layer_ratio")
    src = Path(path)
    if not src.is_file():
        raise FileNotFoundError(f"--load_layer_ratio {path}: no such file")
    names = list(context.linears)
    if src.suffix.lower() == ".npy":
        try:
            values = np.load(src).astype(np.float64).reshape(-1)
        except (ValueError, TypeError, OSError, EOFError) as err:  # empty, pickled, not numbers
            raise ValueError(f"--load_layer_ratio {path}: not a .npy array of numbers ({type(err).__name__}: "
                             f"{err})") from None
        blocks = [g for g in linears_by_block(context) if g]
        if values.size == len(names):
            return dict(zip(names, values.tolist()))
        if values.size == len(blocks):
            return {name: float(v) for v, group in zip(values, blocks) for name in group}
        raise ValueError(f"--load_layer_ratio {path} holds {values.size} ratios; expected {len(names)} "
                         f"(one per pruned linear) or {len(blocks)} (one per block)")
    try:
        data = json.loads(src.read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:  # empty, not JSON, not UTF-8
        raise ValueError(f"--load_layer_ratio {path}: not a JSON file ({type(err).__name__}: {err})") from None
    ratios = data.get("ratios", data) if isinstance(data, dict) else None
    if not isinstance(ratios, dict):
        raise ValueError(f"--load_layer_ratio {path}: expected a JSON object of {{linear name: ratio}}")
    missing = [n for n in names if n not in ratios]
    extra = [n for n in ratios if n not in context.linears]
    if missing or extra:
        raise ValueError(f"--load_layer_ratio {path} does not match the model's pruned linears: "
                         f"{len(missing)} missing (e.g. {missing[:1]}), {len(extra)} unknown (e.g. {extra[:1]}); "
                         "was it saved for another model or --skip_attention setting?")
    return {n: float(ratios[n]) for n in names}
