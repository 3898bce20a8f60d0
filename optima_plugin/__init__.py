"""optima_plugin: exact, fast OPTIMA weight reconstruction for one-shot LLM pruning."""

from .solvers import Reconstruction, reconstruct

__version__ = "0.1.0"

__all__ = ["Reconstruction", "reconstruct", "__version__"]
