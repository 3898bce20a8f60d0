"""Tiny random models and an offline tokenizer, for tests and examples."""

from __future__ import annotations

from functools import lru_cache

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

VOCAB = 512

_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
               num_attention_heads=4, max_position_embeddings=512, tie_word_embeddings=False)

CONFIGS = {
    "llama": dict(model_type="llama", num_key_value_heads=2, **_COMMON),
    "qwen2": dict(model_type="qwen2", num_key_value_heads=2, **_COMMON),
    "mistral": dict(model_type="mistral", num_key_value_heads=2, sliding_window=None, **_COMMON),
    # Gemma: sliding-window and full-attention layers alternate; the window (16) is
    # shorter than the tests' sequences, so reusing block 0's mask would be wrong.
    "gemma2": dict(model_type="gemma2", num_key_value_heads=2, head_dim=16, sliding_window=16,
                   layer_types=["sliding_attention", "full_attention", "sliding_attention"], **_COMMON),
    "gemma3": dict(model_type="gemma3_text", num_key_value_heads=2, head_dim=16, sliding_window=16,
                   layer_types=["sliding_attention", "full_attention", "sliding_attention"], **_COMMON),
    "opt": dict(model_type="opt", vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=3,
                num_attention_heads=4, max_position_embeddings=512, word_embed_proj_dim=64,
                tie_word_embeddings=False),
}


def tiny_model(arch: str, *, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A tiny randomly initialised causal LM of ``arch`` (see :data:`CONFIGS`), in eval mode."""
    if arch not in CONFIGS:
        raise ValueError(f"unknown tiny architecture {arch!r}; known: {', '.join(CONFIGS)}")
    spec = dict(CONFIGS[arch])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    model.config.use_cache = False
    return model.eval()


@lru_cache(maxsize=1)
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with :data:`VOCAB` tokens, trained offline on pydoc text."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = [topics[k] for k in sorted(topics)][:200]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
