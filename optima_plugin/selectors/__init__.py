"""Built-in mask selectors (mask True = pruned); see ``base.py`` for the interface."""

from .base import BlockCalibration, MaskSelector, Selection
from .file import FileSelector
from .magnitude import MagnitudeSelector
from .sparsegpt import SparseGPTSelector
from .thanos import ThanosSelector
from .wanda import WandaSelector
from .wandapp import WandaPlusPlusSelector

BUILTIN_SELECTORS = [MagnitudeSelector(), WandaSelector(), SparseGPTSelector(), ThanosSelector(), FileSelector(),
                     WandaPlusPlusSelector()]

__all__ = ["BUILTIN_SELECTORS", "BlockCalibration", "FileSelector", "MagnitudeSelector", "MaskSelector",
           "SparseGPTSelector", "Selection", "ThanosSelector", "WandaPlusPlusSelector", "WandaSelector"]
