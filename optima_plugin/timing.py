"""Per-phase wall time of a run: one :class:`Phases` per run, ``with phases.phase("update"): ...``.

A phase entered inside another pauses the outer one (self time), so the phases never count a second twice
and their sum is at most the wall time they cover. Host-side clock only (``time.perf_counter``): on CUDA the
asynchronous kernels are counted in the phase that waits for them. Reading the clock changes no result.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator, Optional


class Phases:
    """Seconds per phase name, accumulated over every ``phase(name)`` block (nested ones excluded)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._stack: list[str] = []
        self._since = 0.0  # when the innermost open phase last resumed

    def _charge(self, now: float) -> None:
        if self._stack:
            name = self._stack[-1]
            self.seconds[name] = self.seconds.get(name, 0.0) + (now - self._since)
        self._since = now

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the body as ``name`` (the enclosing phase, if any, is paused meanwhile)."""
        self._charge(time.perf_counter())
        self._stack.append(name)
        self.seconds.setdefault(name, 0.0)
        try:
            yield
        finally:
            self._charge(time.perf_counter())
            self._stack.pop()

    def to_dict(self) -> dict[str, float]:
        """``{name: seconds}``, JSON-ready."""
        return dict(self.seconds)


@contextmanager
def timed(phases: Optional[Phases], name: str) -> Iterator[None]:
    """``phases.phase(name)``, or nothing when ``phases`` is None."""
    if phases is None:
        yield
    else:
        with phases.phase(name):
            yield


def summary_line(phases: dict) -> str:
    """``"time: update 3.1 s (52%), statistics 1.2 s (20%), ..."``: the phases by share of their sum."""
    total = sum(phases.values())
    parts = [f"{name} {s:.1f} s ({100 * s / total if total > 0 else 0.0:.0f}%)"
             for name, s in sorted(phases.items(), key=lambda kv: -kv[1])]
    return "time: " + ", ".join(parts)
