"""Built-in mask selectors (mask True = pruned); see ``base.py`` for the interface."""

from .base import MaskSelector, Selection
from .file import FileSelector
from .magnitude import MagnitudeSelector
from .sparsegpt import SparseGPTSelector
from .thanos import ThanosSelector
from .wanda import WandaSelector

BUILTIN_SELECTORS = [MagnitudeSelector(), WandaSelector(), SparseGPTSelector(), ThanosSelector(), FileSelector()]

__all__ = ["BUILTIN_SELECTORS", "FileSelector", "MagnitudeSelector", "MaskSelector", "SparseGPTSelector", "Selection",
           "ThanosSelector", "WandaSelector"]
