"""Model adapters: where a decoder-only model keeps its blocks and linears.

Supported: Llama (3.x), Qwen2/2.5, Mistral, Gemma 2, Gemma 3 (text and the
language model of the multimodal class), OPT.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

# (path to the base model that runs embeddings → blocks → final norm, attribute of its blocks)
_BASES = ("model.language_model", "model.decoder", "model")

#: Linears that read the same input tensor, by their last name component.
_SHARED_INPUTS = ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"})


@dataclass
class ModelAdapter:
    """Where things are in one model.

    Attributes:
        model: the causal LM.
        blocks: its decoder layers.
        base: the module running embeddings → blocks → final norm (no LM head).
        arch: ``config.model_type``.
    """

    model: nn.Module
    blocks: nn.ModuleList
    base: nn.Module
    arch: str


def get_adapter(model: nn.Module) -> ModelAdapter:
    """Find the decoder blocks of ``model``; ``ValueError`` naming what was looked for."""
    for path in _BASES:
        try:
            base = model.get_submodule(path)
        except AttributeError:
            continue
        blocks = getattr(base, "layers", None)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            arch = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
            return ModelAdapter(model=model, blocks=blocks, base=base, arch=arch)
    looked = " or ".join(f"{p}.layers" for p in _BASES)
    raise ValueError(
        f"unsupported architecture {type(model).__name__}: expected its decoder blocks at {looked} "
        "(supported: Llama, Qwen2, Mistral, Gemma2, Gemma3, OPT)"
    )


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """The block's linear layers by name relative to the block (e.g. ``self_attn.q_proj``)."""
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


def input_groups(block: nn.Module) -> list[list[str]]:
    """Linears of the block that read the same input, as lists of relative names.

    Siblings named q/k/v_proj share one group, as do gate/up_proj; every other
    linear is alone. Grouping only saves work: a linear alone is always correct.
    """
    groups: dict[tuple, list[str]] = {}
    for name in block_linears(block):
        parent, _, leaf = name.rpartition(".")
        key: tuple = (name,)
        for i, shared in enumerate(_SHARED_INPUTS):
            if leaf in shared:
                key = (parent, i)
        groups.setdefault(key, []).append(name)
    return list(groups.values())


def is_attention(name: str) -> bool:
    """Whether a linear (relative or full name) belongs to the attention sub-block."""
    return "attn" in name or "attention" in name
