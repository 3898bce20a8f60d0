"""Evaluation: perplexity (and zero-shot accuracy with lm-eval, later)."""

from .perplexity import eval_ppl, perplexity_of_tokens

__all__ = ["eval_ppl", "perplexity_of_tokens"]
