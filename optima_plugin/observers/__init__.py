"""Observers: plugins that implement the event hooks (progress bar, report)."""

from .progress import ProgressObserver
from .report import ReportObserver

__all__ = ["ProgressObserver", "ReportObserver"]
