"""Evaluation: perplexity, and zero-shot accuracy with lm-eval."""

from .perplexity import eval_ppl, perplexity_of_tokens
from .zero_shot import DEFAULT_TASKS, eval_zero_shot

__all__ = ["DEFAULT_TASKS", "eval_ppl", "eval_zero_shot", "perplexity_of_tokens"]
