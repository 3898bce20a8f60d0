"""optima_plugin: exact, fast OPTIMA weight reconstruction for one-shot LLM pruning.

Public API:

* :func:`reconstruct` — re-solve a layer's kept weights for a fixed mask;
* :func:`prune` — prune a Hugging Face model block by block (the CLI's job);
* :func:`prune_and_quantize` — the OPTIMA reference's seed-compatible entry point;
* :func:`check_sparsity`, :func:`eval_ppl`, :func:`eval_zero_shot` (lm-eval accuracy);
* :data:`hookimpl` — the marker for plugins (see :mod:`optima_plugin.hookspecs`).
"""

from .api import prune, prune_and_quantize
from .evaluation import eval_ppl, eval_zero_shot
from .hookspecs import hookimpl
from .solvers import Reconstruction, reconstruct
from .sparsity import Pattern, check_sparsity
from .version import __version__

__all__ = [
    "Pattern",
    "Reconstruction",
    "__version__",
    "check_sparsity",
    "eval_ppl",
    "eval_zero_shot",
    "hookimpl",
    "prune",
    "prune_and_quantize",
    "reconstruct",
]
