"""Resumable runs: after each pruned block, its weights and the next block's inputs go to disk.

    DIR/state.json               marker, the run's identity, layer ratios, report rows, next block
    DIR/block_00012.safetensors  block 12's pruned parameters and buffers
    DIR/inputs_00013.safetensors the inputs of block 13 (removed once block 13 is checkpointed);
                                 with --objective dense also the dense model's (key ``dense``)
    DIR/model-00013-of-00031.safetensors  a streamed run's output shard of block 12, instead of block_00012
    DIR/inputs_00013.rank001-of-008.safetensors  under torchrun: rank 1's share of block 13's inputs

Under torchrun (:mod:`optima_plugin.distributed`) every rank writes its own share of the next
block's inputs; rank 0 alone writes the block (or shard) and, once every rank's inputs are on
disk, ``state.json``; only then does each rank remove its previous inputs file. The folder must
be one every rank sees (a shared filesystem across nodes), and a job resumes only with the same
number of ranks (``state.json``'s ``world_size``, checked before any work).

Every file is written to a temporary sibling and renamed, and ``state.json`` last, so
a crash at any moment leaves a consistent checkpoint. Started again with the same
options, a run loads the finished blocks, takes the saved inputs and goes on at the
first unfinished block; since inputs are stored exactly (the model's dtype) and each
block's random state is re-seeded, the result is bit-identical to an uninterrupted
run on CPU. Only files of these names are ever removed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .files import atomic_path, check_output_file, write_json

log = logging.getLogger(__name__)

MARKER = "optima_plugin checkpoint"
STATE = "state.json"
#: key prefix of the compression state (quantization scales, separate adapters) in a block's file
EXTRA = "optima:"
_OURS = re.compile(r"^(state\.json|block_\d{5}\.safetensors|inputs_\d{5}(\.rank\d{3,}-of-\d{3,})?\.safetensors"
                   r"|model-\d{5}-of-\d{5}\.safetensors)$")

#: PruneConfig fields that do not change the pruned weights (outputs, evaluation, where it runs).
NOT_IDENTITY = {"eval_ppl", "eval_dense", "eval_max_windows", "eval_zero_shot", "tasks_dir", "eval_batch_size",
                "eval_limit", "num_fewshot", "plot", "save_model", "overwrite", "report", "checkpoint_dir",
                "checkpoint", "save_layer_ratio", "save_masks", "device", "offload", "save_format",
                "cache"}


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped the run after a finished (and checkpointed) block; the message says how to resume."""


def default_checkpoint_dir(save_model: str) -> str:
    """``<save_model>.checkpoint`` beside the ``--save_model`` folder (absolute)."""
    target = Path(save_model).resolve()
    return str(target.parent / f"{target.name}.checkpoint")


def _is_ours(directory: Path) -> bool:
    try:
        return json.loads((directory / STATE).read_text()).get("marker") == MARKER
    except (OSError, ValueError, AttributeError):
        return False


def _world_size() -> int:
    """The number of processes of this run: the torchrun job's, else ``WORLD_SIZE`` (1 when unset)."""
    from .distributed import current

    job = current()
    return job.world_size if job is not None else int(os.environ.get("WORLD_SIZE", "1") or 1)


def check_world_size(directory: str, world_size: Optional[int] = None) -> None:
    """``ValueError`` when ``directory``'s checkpoint was written by another number of processes.

    ``world_size``: this run's (default: the torchrun job's, 1 for a single process). A checkpoint
    without ``world_size`` (older ones) was written by a single process.
    """
    world_size = _world_size() if world_size is None else world_size
    try:
        state = json.loads((Path(directory) / STATE).read_text())
    except (OSError, ValueError):
        return
    if not isinstance(state, dict) or state.get("marker") != MARKER:
        return
    saved = int(state.get("world_size", 1))
    if saved != world_size:
        def procs(n: int) -> str:
            return "a single process" if n == 1 else f"{n} torchrun processes"

        raise ValueError(f"--checkpoint_dir {directory} was written by {procs(saved)} (world size {saved}) and this "
                         f"run has {procs(world_size)} (world size {world_size}); each process saved its own share "
                         f"of the block inputs: rerun with the same --nproc_per_node/--nnodes (world size {saved}), "
                         "or use another --checkpoint_dir")


def check_checkpoint_dir(directory: str, protected: Sequence[str] = ()) -> None:
    """``ValueError`` unless ``directory`` is new, empty, or a checkpoint this tool wrote (by as many
    processes as this run has), and writable."""
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--checkpoint_dir {directory} is a file; name a folder")
    for other in protected:
        if path.resolve() == Path(other).resolve():
            raise ValueError(f"--checkpoint_dir {directory} is the --model folder; choose another folder")
    if path.is_dir() and any(path.iterdir()) and not _is_ours(path):
        raise ValueError(f"--checkpoint_dir {directory} holds files this tool did not write; "
                         "choose a new or empty folder")
    check_world_size(directory)
    check_output_file(path / STATE, "--checkpoint_dir")


def run_identity(options: dict, model: nn.Module) -> dict:
    """What must match for a checkpoint to be resumed: the pruning options and the dense model.

    The model is identified by class, dtype, shape of its config and a sample of its
    input embedding (never pruned), so a checkpoint is not applied to another model.
    """
    ident = {k: v for k, v in options.items() if k not in NOT_IDENTITY}
    emb = model.get_input_embeddings().weight.detach()
    sample = emb.flatten()[:: max(1, emb.numel() // 4096)].float().cpu().numpy().tobytes()
    ident["model_fingerprint"] = {
        "class": type(model).__name__, "dtype": str(emb.dtype),
        "layers": getattr(model.config, "num_hidden_layers", None),
        "hidden": getattr(model.config, "hidden_size", None),
        "embedding_sample_sha1": hashlib.sha1(sample).hexdigest(),
    }
    return json.loads(json.dumps(ident, default=str))


@dataclass
class Resume:
    """What a checkpoint holds: the next block to prune and the state to continue from."""

    next_block: int
    ratios: dict
    layers: list
    block_seconds: list
    oom_backoff: list


class Checkpoint:
    """A checkpoint folder for one run (see the module docstring).

    ``dist``: under torchrun the job's :class:`~optima_plugin.distributed.Distributed` (its ``rank``,
    ``world_size``, ``is_main``, ``wait_for_main`` and ``all_true`` are used); None for a single process.
    """

    def __init__(self, directory: str, identity: dict, dist=None) -> None:
        self.dir = Path(directory)
        self.identity = identity
        self.dist = dist if dist is not None and dist.world_size > 1 else None

    @property
    def world_size(self) -> int:
        return 1 if self.dist is None else self.dist.world_size

    def _block(self, i: int) -> Path:
        return self.dir / f"block_{i:05d}.safetensors"

    def _inputs(self, i: int) -> Path:
        """This process's inputs file of block ``i`` (under torchrun: its rank's share)."""
        if self.dist is None:
            return self.dir / f"inputs_{i:05d}.safetensors"
        return self.dir / f"inputs_{i:05d}.rank{self.dist.rank:03d}-of-{self.dist.world_size:03d}.safetensors"

    def load(self) -> Optional[Resume]:
        """The saved state, None when there is none; ``ValueError`` when it belongs to another run, or (on
        every rank under torchrun) when the ranks do not see the same state."""
        resume = self._load()
        if self.dist is not None:
            seen = self.dist.gather_object(resume.next_block if resume is not None else None)
            if len(set(seen)) > 1:
                raise ValueError(f"--checkpoint_dir {self.dir}: the ranks see different checkpoints (next block per "
                                 f"rank, None = no checkpoint: {seen}); the folder must be on a filesystem every "
                                 "rank sees (shared across nodes)")
        return resume

    def _load(self) -> Optional[Resume]:
        if not (self.dir / STATE).is_file():
            return None
        state = json.loads((self.dir / STATE).read_text())
        if state.get("marker") != MARKER:
            raise ValueError(f"--checkpoint_dir {self.dir}: {STATE} was not written by this tool")
        check_world_size(str(self.dir), self.world_size)
        saved = state["identity"]
        if saved != self.identity:
            keys = sorted(k for k in set(saved) | set(self.identity) if saved.get(k) != self.identity.get(k))
            raise ValueError(f"--checkpoint_dir {self.dir} holds a run with other options or another model "
                             f"(differs in {', '.join(keys)}); use the same command, another --checkpoint_dir, "
                             "or delete that folder")
        return Resume(state["next_block"], state["ratios"], state["layers"], state["block_seconds"],
                      state.get("oom_backoff", []))

    def restore(self, blocks: Sequence[nn.Module], upto: int) -> None:
        """Load the saved parameters of blocks ``0 .. upto-1`` into ``blocks`` (in place, exact)."""
        from .compress import restore_extras

        for i in range(upto):
            tensors = load_file(str(self._block(i)))
            extras = {k[len(EXTRA):]: tensors.pop(k) for k in list(tensors) if k.startswith(EXTRA)}
            with torch.no_grad():
                blocks[i].load_state_dict(tensors, strict=True)
            restore_extras(blocks[i], extras)

    def check_inputs(self, i: int) -> None:
        """``ValueError`` (on every rank under torchrun) unless every process's inputs file of block ``i`` is here."""
        mine = self._inputs(i).is_file()
        if (mine if self.dist is None else self.dist.all_true(mine)):
            return
        if self.dist is None:
            raise ValueError(f"--checkpoint_dir {self.dir} lacks {self._inputs(i).name} (the inputs of block {i}); "
                             "delete that folder to start over")
        which = f"rank {self.dist.rank}'s {self._inputs(i).name}" if not mine else "another rank's inputs file"
        raise ValueError(f"--checkpoint_dir {self.dir} lacks {which} (block {i}): the folder must be on a filesystem "
                         "every rank sees (shared across nodes); delete that folder to start over")

    def inputs(self, i: int) -> Tensor:
        """The saved inputs of block ``i`` ``(n, seqlen, hidden)``, in the dtype they were saved in (CPU);
        under torchrun this rank's share."""
        return load_file(str(self._inputs(i)))["inputs"]

    def dense_inputs(self, i: int) -> Tensor:
        """The saved dense-model inputs of block ``i`` (``--objective dense``), as :meth:`inputs`."""
        saved = load_file(str(self._inputs(i)))
        if "dense" not in saved:
            raise ValueError(f"--checkpoint_dir {self.dir}: {self._inputs(i).name} holds no dense-model inputs; "
                             "delete that folder to start over")
        return saved["dense"]

    def save(self, i: int, block: Optional[nn.Module], next_inputs: Optional[Tensor], *, num_blocks: int,
             ratios: dict, layers: list, block_seconds: list, oom_backoff: list,
             next_dense: Optional[Tensor] = None) -> None:
        """Record that block ``i`` is pruned: its tensors, block ``i+1``'s inputs, then the state.

        ``block`` None: a streamed run, whose output shard of block ``i`` is already in this folder.
        ``next_dense``: block ``i+1``'s dense-model inputs (``--objective dense``), saved beside its inputs.
        Under torchrun every rank calls this: each saves its share of the inputs, rank 0 the block and, after
        every rank's inputs are written, the state; each rank removes its previous inputs after that.
        """
        main = self.dist is None or self.dist.is_main()
        self.dir.mkdir(parents=True, exist_ok=True)
        if block is not None and main:
            from .compress import block_extras

            tensors = {k: v.detach().to("cpu").contiguous() for k, v in block.state_dict().items()}
            tensors.update({EXTRA + k: v for k, v in block_extras(block).items()})  # quantization, adapters
            with atomic_path(self._block(i)) as tmp:
                save_file(tensors, str(tmp))
        if next_inputs is not None:
            with atomic_path(self._inputs(i + 1)) as tmp:
                saved = {"inputs": next_inputs}
                if next_dense is not None:
                    saved["dense"] = next_dense
                save_file({k: v.detach().to("cpu").contiguous() for k, v in saved.items()}, str(tmp))
        if self.dist is not None:
            self.dist.wait_for_main()  # every rank's inputs of block i+1 are on disk
        if main:
            write_json(self.dir / STATE, {
                "marker": MARKER, "identity": self.identity, "next_block": i + 1, "num_blocks": num_blocks,
                "world_size": self.world_size, "ratios": ratios, "layers": layers, "block_seconds": block_seconds,
                "oom_backoff": oom_backoff,
            })
        if self.dist is not None:
            self.dist.wait_for_main()  # state.json names block i+1: no rank needs its inputs of block i any more
        self._inputs(i).unlink(missing_ok=True)

    def remove(self) -> None:
        """Delete the files this tool wrote here, then the folder if nothing else is left in it."""
        if not self.dir.is_dir() or not _is_ours(self.dir):
            return
        for f in self.dir.iterdir():
            if f.is_file() and _OURS.match(f.name):
                f.unlink(missing_ok=True)
        try:
            self.dir.rmdir()
        except OSError:
            log.info("checkpoint files removed; %s holds other files and was kept", self.dir)


@contextmanager
def stop_after_block(enabled: bool) -> Iterator["_StopRequest"]:
    """While active, a first Ctrl-C only asks the run to stop after the current block; a second stops at once.

    Does nothing when not ``enabled`` (no checkpoint: nothing to resume from) or off the main thread.
    """
    request = _StopRequest()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum, frame):
        if request.requested:
            raise KeyboardInterrupt
        request.requested = True
        log.warning("Ctrl-C: stopping after the current block (press Ctrl-C again to stop at once)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield request
    finally:
        signal.signal(signal.SIGINT, previous)


@dataclass
class _StopRequest:
    requested: bool = False
