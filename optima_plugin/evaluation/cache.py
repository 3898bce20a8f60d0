"""The dense perplexity cache: a model's perplexity on evaluation windows, kept between runs.

Every run measures the dense model before pruning it; the same weights on the same
windows give the same figure each time, so it is kept in ``<cache_dir()>/ppl/<key>.json``
(:func:`~optima_plugin.streaming.cache_dir`: ``$OPTIMA_CACHE_DIR``, ``$XDG_CACHE_HOME/optima_plugin``
or ``~/.cache/optima_plugin``), one small JSON file per key, written atomically.

The key is a sha256 over what decides the figure: a fingerprint of the weights (every
parameter and buffer's name, shape, dtype, a strided sample of its values and its
float64 sum; for a streamed model, its files' safetensors headers, sizes, modification
times and a sample of their bytes), the model's class, config, attention implementation
and dtype; the tokenizer's class and size; the dataset name, ``seqlen``, ``max_windows``
and the windows' token ids; the evaluation batch size, device type, package and torch
versions. A cache file is untrusted input: an unreadable, corrupt or foreign entry is
ignored (measured again and rewritten); a folder that cannot be written costs a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from itertools import chain
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from ..data import get_eval_tokens
from ..files import write_json
from ..streaming import StreamedModel, cache_dir
from ..version import __version__
from .perplexity import _windows, measure

log = logging.getLogger(__name__)

SCHEMA = 1
SAMPLE = 1024  # values sampled per tensor (on top of its float64 sum)
FILE_SAMPLES = 16  # byte samples per tensor of a streamed model's files


def cache_folder() -> Path:
    """Where the dense perplexities are kept: ``<cache_dir()>/ppl``."""
    return cache_dir() / "ppl"


def _tensor_digest(h, name: str, tensor: torch.Tensor) -> None:
    """Feed ``name``, shape, dtype, a strided sample of the values and their float64 sum into ``h``."""
    h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
    flat = tensor.detach().reshape(-1)
    if flat.numel():
        step = max(1, flat.numel() // SAMPLE)
        h.update(flat[::step][:SAMPLE].to("cpu", torch.float64).numpy().tobytes())
        h.update(repr(float(torch.sum(flat, dtype=torch.float64))).encode())


def _file_digest(h, path: Path) -> None:
    """Feed a safetensors file's header, size, modification time and a sample of each tensor's bytes into ``h``."""
    st = path.stat()
    h.update(f"{path.name}|{st.st_size}|{st.st_mtime_ns}|".encode())
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = f.read(size)
        h.update(header)
        for name, meta in sorted(json.loads(header).items()):
            if name == "__metadata__":
                continue
            begin, end = meta["data_offsets"]
            for k in range(FILE_SAMPLES):
                f.seek(8 + size + begin + (end - begin) * k // FILE_SAMPLES)
                h.update(f.read(8))


def weights_fingerprint(model) -> str:
    """sha256 of a model's weights (see the module docstring); one pass over them, or over a streamed
    model's file headers and samples."""
    h = hashlib.sha256()
    stream = model if isinstance(model, StreamedModel) else None
    module = _module(model)
    h.update(f"{type(module).__name__}|{getattr(module, 'dtype', '')}|streamed={stream is not None}|".encode())
    config = getattr(module, "config", None)
    if config is not None:
        h.update(config.to_json_string().encode())
        h.update(str(getattr(config, "_attn_implementation", None)).encode())
    for name, tensor in chain(module.named_parameters(), module.named_buffers()):
        if not tensor.is_meta:  # a streamed model's blocks: from their files below
            _tensor_digest(h, name, tensor)
    if stream is not None:
        h.update(json.dumps(sorted((k, Path(p).name, key) for k, (p, key) in stream.sources.items())).encode())
        for path in sorted({Path(p) for p, _ in stream.sources.values()}):
            _file_digest(h, path)
    return h.hexdigest()


def entry_key(fingerprint: str, tokenizer, dataset: str, windows: torch.Tensor, *, seqlen: int,
              max_windows: Optional[int], batch_size: int, device_type: str) -> str:
    """The cache key of one dense perplexity: sha256 over the weights' ``fingerprint``, the tokenizer,
    the windows and the settings that can change the last digits."""
    ids = hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
    parts = {
        "schema": SCHEMA, "weights": fingerprint,
        "tokenizer": [type(tokenizer).__name__, len(tokenizer)],
        "dataset": dataset, "seqlen": seqlen, "max_windows": max_windows, "windows": list(windows.shape),
        "token_ids": ids, "batch_size": batch_size, "device": device_type,
        "optima_plugin": __version__, "torch": torch.__version__,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def read_entry(path: Path, key: str) -> Optional[float]:
    """The perplexity the entry at ``path`` holds for ``key``; None when it is missing, unreadable,
    corrupt, of another schema or key, or not a perplexity (a finite number >= 1)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or data.get("key") != key:
        return None
    value = data.get("ppl")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 1:
        return None
    return float(value)


def write_entry(path: Path, key: str, value: float, about: dict) -> bool:
    """Write the entry atomically; a warning (not an error) when it cannot be written. Whether it was."""
    try:
        write_json(path, {"schema": SCHEMA, "key": key, "ppl": value, **about})
    except OSError as e:
        log.warning("cannot write the perplexity cache %s (%s): the dense figure will be measured again next "
                    "time (--no_cache skips the cache)", path, e)
        return False
    return True


def perplexities(model, tokenizer, datasets: Sequence[str], seqlen: int, *, max_windows: Optional[int] = None,
                 batch_size: int = 1, device=None, progress: bool = True, use_cache: bool = True,
                 tokens: Optional[dict] = None) -> tuple[dict, dict]:
    """``({dataset: perplexity}, {dataset: "cache" | "computed"})`` of ``model`` (a causal LM or a
    :class:`~optima_plugin.streaming.StreamedModel`), as :func:`~optima_plugin.evaluation.eval_ppl`
    measures them, each read from the cache when an entry for the same weights and windows is there;
    measured ones are written to it. ``use_cache=False``: the cache is neither read nor written. ``tokens``:
    ``{dataset: (1, N) token ids}`` already read (else each dataset is read and tokenized here)."""
    values: dict = {}
    sources: dict = {}
    fingerprint = None
    device_type = torch.device(device).type if device else _device_type(model)
    for ds in datasets:
        ids = tokens[ds] if tokens is not None else get_eval_tokens(ds, tokenizer, seqlen)
        path = key = None
        if use_cache:
            fingerprint = fingerprint or weights_fingerprint(model)
            key = entry_key(fingerprint, tokenizer, ds, _windows(ids, seqlen, max_windows), seqlen=seqlen,
                            max_windows=max_windows, batch_size=batch_size, device_type=device_type)
            path = cache_folder() / f"{key}.json"
            cached = read_entry(path, key)
            if cached is not None:
                log.info("dense perplexity on %s: %.4f from the cache (%s)", ds, cached, path)
                values[ds], sources[ds] = cached, "cache"
                continue
        values[ds] = measure(model, ids, seqlen, max_windows=max_windows, batch_size=batch_size, device=device,
                             progress=progress)
        sources[ds] = "computed"
        if path is not None and math.isfinite(values[ds]):  # a diverged model's inf/nan: not kept
            write_entry(path, key, values[ds], {"dataset": ds, "seqlen": seqlen, "max_windows": max_windows,
                                                "batch_size": batch_size, "device": device_type,
                                                "model": type(_module(model)).__name__,
                                                "name_or_path": str(getattr(_module(model), "name_or_path", ""))})
    return values, sources


def _module(model) -> nn.Module:
    """The ``nn.Module`` of a model: itself, or a streamed model's skeleton."""
    return model.model if isinstance(model, StreamedModel) else model


def _device_type(model) -> str:
    """Where an in-memory model's weights are (a streamed model is evaluated on CPU unless told)."""
    if isinstance(model, StreamedModel):
        return "cpu"
    return next(model.parameters()).device.type


__all__ = ["cache_folder", "entry_key", "perplexities", "read_entry", "weights_fingerprint", "write_entry"]
