"""Peak memory of a piece of work: process RSS sampled in a thread, and CUDA's own peak."""

from __future__ import annotations

import threading
from typing import Optional

import psutil
import torch


class PeakMemory:
    """Context manager measuring peak resident memory (and CUDA memory) inside it.

    After exit: ``peak_rss_mb``, ``rss_increase_mb`` (peak minus the RSS at entry)
    and ``cuda_peak_mb`` (None without a GPU).
    """

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.peak_rss_mb = self.rss_increase_mb = 0.0
        self.cuda_peak_mb: Optional[float] = None
        self._stop = threading.Event()

    def __enter__(self) -> "PeakMemory":
        self._proc = psutil.Process()
        self._start = self._peak = self._proc.memory_info().rss
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, self._proc.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._proc.memory_info().rss)
        self.peak_rss_mb = self._peak / 2**20
        self.rss_increase_mb = (self._peak - self._start) / 2**20
        if torch.cuda.is_available():
            self.cuda_peak_mb = torch.cuda.max_memory_allocated() / 2**20

    def to_dict(self) -> dict:
        return {"peak_rss_mb": self.peak_rss_mb, "rss_increase_mb": self.rss_increase_mb,
                "cuda_peak_mb": self.cuda_peak_mb}
