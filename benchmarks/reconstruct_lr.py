"""Held-out --reconstruct loss on SmolLM2-135M's first blocks for a few --reconstruct_lr values (docs/local_reconstruction.md).

    OMP_NUM_THREADS=1 python benchmarks/reconstruct_lr.py MODE PATTERN BLOCKS LR [LR ...]
    e.g. python benchmarks/reconstruct_lr.py submodule 0.7 2 1e-4 3e-4 1e-3 3e-3   (PATTERN: a ratio or 2:4)

Wanda + OPTIMA, 16 x 256 pydoc windows (4 held out); one JSON line per lr: per unit (block, unit, steps,
best_step, fit loss before, after, held-out loss before, after). The run stops after BLOCKS blocks.
"""
import copy
import json
import sys
import time

import optima_plugin.engine as engine
from optima_plugin import hookimpl, prune
from optima_plugin.loading import default_model, load_model
from optima_plugin.plugins import get_plugin_manager



class _Recorder:
    """Wraps the engine's ``reconstruct_block``: keeps each block's report entry."""

    def __init__(self) -> None:
        self.entries: list = []
        self.real = engine.reconstruct_block

    def __call__(self, *args, **kwargs):
        entry = self.real(*args, **kwargs)
        self.entries.append(entry)
        return entry


class _StopAfter:
    """Ends the run (KeyboardInterrupt) once ``blocks`` blocks are done."""

    def __init__(self, blocks: int) -> None:
        self.blocks = blocks

    @hookimpl
    def optima_block_done(self, index, num_blocks, seconds):
        if index == self.blocks - 1:
            raise KeyboardInterrupt("enough blocks")


def main(mode: str, pattern: str, blocks: int, lrs: list[float]) -> None:
    recorder = _Recorder()
    engine.reconstruct_block = recorder
    get_plugin_manager().register(_StopAfter(blocks))
    directory, gguf = default_model()
    model, tok = load_model(directory, gguf_file=gguf)
    shape = dict(sparsity_type="2:4") if pattern == "2:4" else dict(sparsity_ratio=float(pattern))
    for lr in lrs:
        recorder.entries.clear()
        t = time.time()
        try:
            prune(copy.deepcopy(model), tok, prune_method="wanda", nsamples=16, seqlen=256, device="cpu",
                  reconstruct=mode, reconstruct_lr=lr, progress=False, **shape)
        except KeyboardInterrupt:
            pass
        units = [(e["block"], u["unit"], u["steps"], u["best_step"]) +
                 tuple(round(u[k], 4) for k in ("loss_fit_before", "loss_fit_after", "loss_heldout_before",
                                                "loss_heldout_after"))
                 for e in recorder.entries for u in e["units"]]
        print(json.dumps({"mode": mode, "pattern": pattern, "lr": lr, "seconds": round(time.time() - t, 1),
                          "units": units}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), [float(x) for x in sys.argv[4:]])
