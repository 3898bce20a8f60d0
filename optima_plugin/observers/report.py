"""Collects per-layer results into the run report."""

from __future__ import annotations

from ..hookspecs import hookimpl


class ReportObserver:
    def __init__(self) -> None:
        self.layers: list[dict] = []
        self.block_seconds: list[float] = []

    @hookimpl
    def optima_layer_done(self, result):
        self.layers.append(result.to_dict())

    @hookimpl
    def optima_block_done(self, index, num_blocks, seconds):
        self.block_seconds.append(seconds)
