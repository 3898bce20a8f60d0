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
options and the same weights (:func:`run_identity`), a run loads the finished blocks, takes
the saved inputs and goes on at the first unfinished block; since inputs are stored exactly
(the model's dtype) and each block's random state is re-seeded, the result is bit-identical
to an uninterrupted run on CPU. ``state.json`` is checked field by field, and the files it
names for presence and complete headers, before the model loads. :meth:`Checkpoint.remove`
deletes ``state.json`` first: a folder without it (a removal or a first block cut short)
holds nothing to resume, and the next run clears it. One run at a time holds the folder
(:mod:`optima_plugin.lock`). Only files of these names, and the temporary files of the
tool's own writes (``.block_00012.safetensors.<random>.tmp.safetensors``), are ever removed.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .files import atomic_path, check_output_file, check_save_target, recover_interrupted_save, write_json

log = logging.getLogger(__name__)

MARKER = "optima_plugin checkpoint"
STATE = "state.json"
#: key prefix of the compression state (quantization scales, separate adapters) in a block's file
EXTRA = "optima:"
_NAMES = (r"(state\.json|block_\d{5}\.safetensors|inputs_\d{5}(\.rank\d{3,}-of-\d{3,})?\.safetensors"
          r"|model-\d{5}-of-\d{5}\.safetensors)")
_OURS = re.compile(f"^{_NAMES}$")
#: a temporary file of :func:`~optima_plugin.files.atomic_path` writing one of ours (left by a killed run)
_OUR_TMP = re.compile(rf"^\.{_NAMES}\.[A-Za-z0-9_]+\.tmp\.(json|safetensors)$")

#: PruneConfig fields that do not change the pruned weights (outputs, evaluation, where it runs).
NOT_IDENTITY = {"eval_ppl", "eval_dense", "eval_max_windows", "eval_zero_shot", "tasks_dir", "eval_batch_size",
                "eval_limit", "num_fewshot", "plot", "save_model", "overwrite", "report", "checkpoint_dir",
                "checkpoint", "save_layer_ratio", "save_masks", "device", "offload", "save_format",
                "cache"}


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped the run after a finished (and checkpointed) block; the message says how to resume."""


class WriteFailed(OSError):
    """Writing a checkpoint file or an output failed (disk full, file size limit, ...); the message names the
    file, what to do and where the finished work is kept."""


def write_failure(error: BaseException) -> Optional[str]:
    """Why a write failed, when ``error`` is a failed write (an ``OSError`` other than a path problem, or
    safetensors' ``SafetensorError``); else None."""
    if isinstance(error, SafetensorError):
        return str(error)
    if isinstance(error, OSError) and not isinstance(error, (FileExistsError, WriteFailed)):
        return error.strerror or str(error)
    return None


def _ours_name(name: str) -> bool:
    """A file name this tool writes into a checkpoint folder, or a temporary one of its writes."""
    return bool(_OURS.match(name) or _OUR_TMP.match(name))


def default_checkpoint_dir(save_model: str) -> str:
    """``<save_model>.checkpoint`` beside the ``--save_model`` folder (absolute)."""
    target = Path(save_model).resolve()
    return str(target.parent / f"{target.name}.checkpoint")


def _is_ours(directory: Path) -> bool:
    """A checkpoint folder of this tool: its ``state.json`` says so (written before any other file, see
    :meth:`Checkpoint.begin`), or it holds nothing but temporary files of the tool's own writes (a run killed
    while writing its first ``state.json``)."""
    if (directory / STATE).exists():
        try:
            return json.loads((directory / STATE).read_text()).get("marker") == MARKER
        except (OSError, ValueError, AttributeError):
            return False
    try:
        return all(e.is_file() and not e.is_symlink() and _OUR_TMP.match(e.name) for e in directory.iterdir())
    except OSError:
        return False


def blocks_done(directory: str | os.PathLike) -> int:
    """How many blocks ``directory``'s checkpoint holds pruned (0 when none, or no checkpoint of this tool)."""
    try:
        state = read_state(directory)
    except ValueError:
        return 0
    return state["next_block"] if state is not None else 0


def _check_schema(state: dict) -> Optional[str]:
    """What is wrong with a ``state.json`` of this tool (its fields and their types), None when nothing."""
    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def is_num(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    fields = {"identity": dict, "next_block": int, "num_blocks": int, "ratios": dict, "layers": list,
              "block_seconds": list}
    for key, kind in fields.items():
        if key not in state:
            return f"no {key!r}"
        if not (is_int(state[key]) if kind is int else isinstance(state[key], kind)):
            return f"{key!r} is not a {'number' if kind is int else kind.__name__}"
    if not 0 <= state["next_block"] <= state["num_blocks"]:
        return f"next_block {state['next_block']} is not within 0..num_blocks {state['num_blocks']}"
    if not (is_int(state.get("world_size", 1)) and state.get("world_size", 1) >= 1):
        return "'world_size' is not a positive number"
    if not isinstance(state.get("oom_backoff", []), list):
        return "'oom_backoff' is not a list"
    if not all(isinstance(k, str) and is_num(v) for k, v in state["ratios"].items()):
        return "'ratios' is not a map of layer names to numbers"
    if not all(isinstance(x, dict) and isinstance(x.get("name"), str) for x in state["layers"]):
        return "'layers' holds an entry without a name"
    if not all(is_num(x) for x in state["block_seconds"]):
        return "'block_seconds' holds a value that is not a number"
    return None


def read_state(directory: str | os.PathLike) -> Optional[dict]:
    """``directory``'s ``state.json`` when this tool wrote it, checked field by field; None when there is none
    or another program wrote it; ``ValueError`` (one line, naming the file) when it is damaged."""
    path = Path(directory) / STATE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        others = [p for p in Path(directory).iterdir() if p.name != STATE]
        if others and all(_ours_name(p.name) for p in others):  # the rest is ours: a damaged checkpoint
            raise ValueError(f"--checkpoint_dir {directory}: {path} is not readable JSON ({e}); delete that "
                             "folder to start over") from None
        return None
    if not isinstance(state, dict) or state.get("marker") != MARKER:
        return None
    wrong = _check_schema(state)
    if wrong:
        raise ValueError(f"--checkpoint_dir {directory}: {path} is damaged ({wrong}); delete that folder to "
                         "start over")
    return state


def _check_header(path: Path, directory) -> None:
    """``ValueError`` naming ``path`` unless it is a complete safetensors file (its header, and data to its end)."""
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (OSError, SafetensorError) as e:
        raise ValueError(f"--checkpoint_dir {directory}: {path.name} is damaged or truncated ({e}); delete that "
                         "folder to start over") from None


def check_checkpoint_files(directory: str) -> None:
    """``ValueError`` (one line) unless every file ``directory``'s ``state.json`` names is there and complete:
    the finished blocks (or streamed shards) and the next block's inputs. Call it with the folder locked."""
    state = read_state(directory)
    if state is None or state["next_block"] == 0:  # no block recorded: nothing to check, cleared at the start
        return
    folder, done, total = Path(directory), state["next_block"], state["num_blocks"]
    for i in range(done):
        records = [folder / f"block_{i:05d}.safetensors", folder / f"model-{i + 1:05d}-of-{total + 1:05d}.safetensors"]
        found = next((p for p in records if p.is_file()), None)
        if found is None:
            raise ValueError(f"--checkpoint_dir {directory}: {STATE} says blocks 0..{done - 1} are pruned but "
                             f"{records[0].name} is missing; delete that folder to start over")
        _check_header(found, directory)
    if done < total:
        world = state.get("world_size", 1)
        names = [f"inputs_{done:05d}.safetensors"] if world == 1 else \
            [f"inputs_{done:05d}.rank{r:03d}-of-{world:03d}.safetensors" for r in range(world)]
        for name in names:
            if not (folder / name).is_file():
                raise ValueError(f"--checkpoint_dir {directory} lacks {name} (the inputs of block {done}); delete "
                                 "that folder to start over")
            _check_header(folder / name, directory)


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
    state = read_state(directory)
    if state is None:
        return
    saved = state.get("world_size", 1)
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
    if path.is_dir():
        read_state(directory)  # a damaged state.json: say so, not "files this tool did not write"
    if path.is_dir() and any(path.iterdir()) and not _is_ours(path):
        raise ValueError(f"--checkpoint_dir {directory} holds files this tool did not write; "
                         "choose a new or empty folder")
    check_world_size(directory)
    check_output_file(path / STATE, "--checkpoint_dir")


def run_identity(options: dict, model: nn.Module, stream=None) -> dict:
    """What must match for a checkpoint to be resumed: the pruning options and the dense model.

    The model is identified by class, dtype, shape of its config and a fingerprint of its
    weights (:func:`weights_fingerprint`), so a checkpoint is applied neither to another model
    nor to the same path after its weights changed. Call it before any block is restored.
    ``stream``: the :class:`~optima_plugin.streaming.StreamedModel` whose skeleton is ``model``.
    """
    ident = {k: v for k, v in options.items() if k not in NOT_IDENTITY}
    emb = model.get_input_embeddings().weight.detach()
    ident["model_fingerprint"] = {
        "class": type(model).__name__, "dtype": str(emb.dtype),
        "layers": getattr(model.config, "num_hidden_layers", None),
        "hidden": getattr(model.config, "hidden_size", None),
        "weights_sha1": weights_fingerprint(model, stream),
    }
    return json.loads(json.dumps(ident, default=str))


#: rows of each on-disk tensor of a streamed model that its fingerprint reads
SAMPLE_ROWS = 8


def weights_fingerprint(model: nn.Module, stream=None) -> str:
    """SHA-1 of every state-dict tensor of ``model``: its name, dtype, shape and bytes.

    A streamed model's blocks stay on disk (reading them all would be a second pass over the
    model): for each of their tensors the name, dtype, shape and :data:`SAMPLE_ROWS` rows spread
    over it (all of a 1-D tensor) are hashed, which any fine-tune or new revision changes.
    """
    digest = hashlib.sha1()

    def add(name: str, dtype: str, shape, data: Optional[Tensor]) -> None:
        digest.update(f"{name}|{dtype}|{list(shape)}|".encode())
        if data is not None:
            flat = data.detach().reshape(-1).to("cpu").contiguous()
            digest.update(memoryview(flat.view(torch.uint8).numpy()))

    on_disk: dict = {}
    for name, tensor in model.state_dict().items():
        if tensor.is_meta and stream is not None and name in stream.sources:
            path, key = stream.sources[name]
            on_disk.setdefault(path, []).append((name, key))
        else:
            add(name, str(tensor.dtype), tensor.shape, None if tensor.is_meta else tensor)
    for path, items in on_disk.items():
        with safe_open(str(path), framework="pt") as f:
            for name, key in items:
                piece = f.get_slice(key)
                shape = piece.get_shape()
                if len(shape) <= 1 or shape[0] <= SAMPLE_ROWS:
                    add(name, piece.get_dtype(), shape, f.get_tensor(key))
                    continue
                rows = sorted({round(j * (shape[0] - 1) / (SAMPLE_ROWS - 1)) for j in range(SAMPLE_ROWS)})
                add(name, piece.get_dtype(), shape, torch.cat([piece[r:r + 1].reshape(-1) for r in rows]))
    return digest.hexdigest()


@dataclass
class Resume:
    """What a checkpoint holds: the next block to prune and the state to continue from."""

    next_block: int
    ratios: dict
    layers: list
    block_seconds: list
    oom_backoff: list
    reconstruction: list = field(default_factory=list)  # the report's --reconstruct entries of those blocks


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
        main = self.dist is None or self.dist.is_main()
        if main:  # under the run's lock, before any rank writes: what a killed run left half-written
            self._remove_orphans()
        state = read_state(self.dir)
        if state is None and (self.dir / STATE).is_file():
            raise ValueError(f"--checkpoint_dir {self.dir}: {STATE} was not written by this tool")
        if state is None or state["next_block"] == 0:
            # nothing to resume from: a run stopped in its first block, or a finished one whose removal was cut
            if main:
                self._remove_ours()
            return None
        check_world_size(str(self.dir), self.world_size)
        saved = state["identity"]
        if saved != self.identity:
            keys = sorted(k for k in set(saved) | set(self.identity) if saved.get(k) != self.identity.get(k))
            raise ValueError(f"--checkpoint_dir {self.dir} holds a run with other options or another model "
                             f"(differs in {', '.join(keys)}); use the same command, another --checkpoint_dir, "
                             "or delete that folder")
        return Resume(state["next_block"], state["ratios"], state["layers"], state["block_seconds"],
                      state.get("oom_backoff", []), state.get("reconstruction", []))

    def restore(self, blocks: Sequence[nn.Module], upto: int) -> None:
        """Load the saved parameters of blocks ``0 .. upto-1`` into ``blocks`` (in place, exact)."""
        from .compress import restore_extras

        for i in range(upto):
            tensors = self._read(self._block(i))
            extras = {k[len(EXTRA):]: tensors.pop(k) for k in list(tensors) if k.startswith(EXTRA)}
            try:
                with torch.no_grad():
                    blocks[i].load_state_dict(tensors, strict=True)
            except RuntimeError as e:
                raise ValueError(f"--checkpoint_dir {self.dir}: {self._block(i).name} does not hold block {i}'s "
                                 f"tensors ({str(e).splitlines()[0]}); delete that folder to start over") from None
            restore_extras(blocks[i], extras)

    def _read(self, path: Path) -> dict:
        """The tensors of ``path``; ``ValueError`` (one line, naming it) when it is missing, truncated or damaged."""
        try:
            return load_file(str(path))
        except (OSError, SafetensorError) as e:
            raise ValueError(f"--checkpoint_dir {self.dir}: {path.name} is missing, damaged or truncated ({e}); "
                             "delete that folder to start over") from None

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
        saved = self._read(self._inputs(i))
        if "inputs" not in saved:
            raise ValueError(f"--checkpoint_dir {self.dir}: {self._inputs(i).name} holds no inputs; delete that "
                             "folder to start over")
        return saved["inputs"]

    def dense_inputs(self, i: int) -> Tensor:
        """The saved dense-model inputs of block ``i`` (``--objective dense``), as :meth:`inputs`."""
        saved = self._read(self._inputs(i))
        if "dense" not in saved:
            raise ValueError(f"--checkpoint_dir {self.dir}: {self._inputs(i).name} holds no dense-model inputs; "
                             "delete that folder to start over")
        return saved["dense"]

    def save(self, i: int, block: Optional[nn.Module], next_inputs: Optional[Tensor], *, num_blocks: int,
             ratios: dict, layers: list, block_seconds: list, oom_backoff: list,
             next_dense: Optional[Tensor] = None, reconstruction: Optional[list] = None) -> None:
        """Record that block ``i`` is pruned: its tensors, block ``i+1``'s inputs, then the state.

        ``block`` None: a streamed run, whose output shard of block ``i`` is already in this folder.
        ``next_dense``: block ``i+1``'s dense-model inputs (``--objective dense``), saved beside its inputs.
        ``reconstruction``: the report's ``--reconstruct`` entries of blocks ``0..i``.
        Under torchrun every rank calls this: each saves its share of the inputs, rank 0 the block and, after
        every rank's inputs are written, the state; each rank removes its previous inputs after that.
        """
        main = self.dist is None or self.dist.is_main()
        with self._writing(self.dir, i):
            self.dir.mkdir(parents=True, exist_ok=True)
        if block is not None and main:
            from .compress import block_extras

            tensors = {k: v.detach().to("cpu").contiguous() for k, v in block.state_dict().items()}
            tensors.update({EXTRA + k: v for k, v in block_extras(block).items()})  # quantization, adapters
            with self._writing(self._block(i), i), atomic_path(self._block(i)) as tmp:
                save_file(tensors, str(tmp))
        if next_inputs is not None:
            with self._writing(self._inputs(i + 1), i), atomic_path(self._inputs(i + 1)) as tmp:
                saved = {"inputs": next_inputs}
                if next_dense is not None:
                    saved["dense"] = next_dense
                save_file({k: v.detach().to("cpu").contiguous() for k, v in saved.items()}, str(tmp))
        if self.dist is not None:
            self.dist.wait_for_main()  # every rank's inputs of block i+1 are on disk
        if main:
            self._write_state(i, next_block=i + 1, num_blocks=num_blocks, ratios=ratios, layers=layers,
                              block_seconds=block_seconds, oom_backoff=oom_backoff, reconstruction=reconstruction)
        if self.dist is not None:
            self.dist.wait_for_main()  # state.json names block i+1: no rank needs its inputs of block i any more
        self._inputs(i).unlink(missing_ok=True)

    def begin(self, num_blocks: int) -> None:
        """Mark the folder as this run's checkpoint, with no block pruned yet, before any other file is written
        (so a folder of this tool always holds its ``state.json``). Under torchrun rank 0 writes it."""
        if self.dist is None or self.dist.is_main():
            with self._writing(self.dir, 0):
                self.dir.mkdir(parents=True, exist_ok=True)
            self._write_state(0, next_block=0, num_blocks=num_blocks, ratios={}, layers=[], block_seconds=[],
                              oom_backoff=[])
        if self.dist is not None:
            self.dist.wait_for_main()

    def _write_state(self, i: int, *, next_block: int, num_blocks: int, ratios: dict, layers: list,
                     block_seconds: list, oom_backoff: list, reconstruction: Optional[list] = None) -> None:
        with self._writing(self.dir / STATE, i):
            write_json(self.dir / STATE, {
                "marker": MARKER, "identity": self.identity, "next_block": next_block, "num_blocks": num_blocks,
                "world_size": self.world_size, "ratios": ratios, "layers": layers, "block_seconds": block_seconds,
                "oom_backoff": oom_backoff, "reconstruction": reconstruction or [],
            })

    @contextmanager
    def _writing(self, path: Path, i: int) -> Iterator[None]:
        """Turn a failed write of ``path`` while recording block ``i`` into one line: which file, what to do,
        which blocks are kept (:class:`WriteFailed`)."""
        try:
            yield
        except (OSError, SafetensorError) as e:
            why = write_failure(e)
            if why is None:
                raise
            kept = f"blocks 0..{i - 1} are kept there" if i > 0 and blocks_done(self.dir) else \
                "no block was recorded yet"
            raise WriteFailed(f"--checkpoint_dir {self.dir}: writing {path.name} failed ({why}); free space or "
                              f"check the folder, then run the same command again ({kept})") from e

    def _remove_orphans(self) -> None:
        """Delete the temporary files of this tool's writes that a killed run left here."""
        if self.dir.is_dir():
            for f in self.dir.iterdir():
                if f.is_file() and _OUR_TMP.match(f.name):
                    f.unlink(missing_ok=True)

    def _remove_ours(self) -> None:
        """Delete every file of this tool's names here, ``state.json`` last."""
        if not self.dir.is_dir():
            return
        for f in self.dir.iterdir():
            if f.is_file() and not f.is_symlink() and _ours_name(f.name) and f.name != STATE:
                f.unlink(missing_ok=True)
        (self.dir / STATE).unlink(missing_ok=True)

    def remove(self) -> None:
        """Delete the files this tool wrote here, then the folder if nothing else is left in it.

        ``state.json`` is first rewritten to say that no block is pruned, so a removal cut short (a kill) leaves
        a checkpoint with nothing to resume, which the next run clears; it is deleted last."""
        if not self.dir.is_dir() or not _is_ours(self.dir):
            return
        if (self.dir / STATE).is_file():
            state = read_state(self.dir) or {}
            write_json(self.dir / STATE, {
                "marker": MARKER, "identity": state.get("identity", {}), "next_block": 0,
                "num_blocks": state.get("num_blocks", 0), "world_size": state.get("world_size", 1), "ratios": {},
                "layers": [], "block_seconds": [], "oom_backoff": []})
        self._remove_ours()
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


def is_default_checkpoint(config) -> bool:
    """Whether a config's checkpoint folder is the default one beside ``--save_model`` (removed after success)."""
    return bool(config.save_model and config.checkpoint_dir == default_checkpoint_dir(config.save_model))


def validate_config(config) -> dict:
    """``--save_model`` can be written and the checkpoint folder is usable and apart from it; returns the
    default checkpoint folder (beside ``--save_model``) when none is given."""
    protected = [config.model_path] if config.model_path and Path(config.model_path).exists() else []
    if config.save_model:
        recover_interrupted_save(config.save_model)  # a killed save's leftovers: put back or removed
        check_save_target(config.save_model, overwrite=config.overwrite, protected=protected)
    directory = config.checkpoint_dir
    if directory is None and config.save_model and config.checkpoint:
        directory = default_checkpoint_dir(config.save_model)
    if directory:
        check_checkpoint_dir(directory, protected=protected)
        if config.save_model:
            ckpt, save = Path(directory).resolve(), Path(config.save_model).resolve()
            if ckpt == save or save in ckpt.parents or ckpt in save.parents:
                raise ValueError(f"--checkpoint_dir {directory} and --save_model {config.save_model} "
                                 "overlap; give them separate folders")
    return {"checkpoint_dir": directory}
