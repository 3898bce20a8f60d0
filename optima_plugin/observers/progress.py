"""A tqdm progress bar over decoder blocks."""

from __future__ import annotations

from tqdm.auto import tqdm

from ..hookspecs import hookimpl


class ProgressObserver:
    def __init__(self, disable: bool = False) -> None:
        self.disable = disable
        self.bar = None
        self.errors: list[float] = []

    @hookimpl
    def optima_run_started(self, config, num_blocks):
        self.bar = tqdm(total=num_blocks, desc="pruning blocks", unit="block", disable=self.disable)

    def skip(self, blocks: int) -> None:
        """Count ``blocks`` already done (a resumed run) on the bar."""
        if self.bar is not None and blocks:
            self.bar.update(blocks)

    @hookimpl
    def optima_layer_done(self, result):
        if result.error_ratio is not None:
            self.errors.append(result.error_ratio)

    @hookimpl
    def optima_block_done(self, index, num_blocks, seconds):
        if self.bar is not None:
            if self.errors:
                self.bar.set_postfix(error_ratio=f"{sum(self.errors) / len(self.errors):.3f}")
            self.bar.update(1)

    @hookimpl
    def optima_run_done(self, report):
        if self.bar is not None:
            self.bar.close()
