"""The host seam: emit the masks of an unmodified host's pruning loop, write back the answers.

Every host (Wanda, SparseGPT, TRIM, OWL, AlphaPruning) prunes one decoder block at
a time with the same loop::

    pass 1: run the block on its calibration inputs, forward hooks on its linears
    prune:  weight[W_mask] = 0           (per linear; TRIM may re-run the block in between)
    pass 2: run the block again; the outputs are the next block's inputs

:class:`HostSeam` watches that loop from outside, through hooks only:

* it holds dense weights for at most one block: at the host's first call of a block (its
  forward pre-hook, before the host can have applied that block's masks) it copies the
  block's still-dense linears to the CPU, and drops the copies once the host has left the
  block (its next block, the seam's own pass, the end). A linear pruned before the host ever
  calls its block (the magnitude paths) gets its dense weights from the checkpoint on disk
  (the model's safetensors, memory-mapped, by parameter name; :class:`CheckpointWeights`),
  one block at a time; without local safetensors (GGUF, a hub id not in the cache) such a
  linear keeps the host's weights (logged once at load);
* while the host calls a block directly (not inside a whole-model forward), forward
  hooks on the block's linears stream one Hessian ``H = mean x xᵀ`` per distinct
  input, for the linears that are still dense;
* when the block is called again and a linear's weight differs from what the seam last
  knew (the dense weight, or the seam's own answer): per-row checksums of the weight's bit
  patterns (:func:`fingerprint`, exact integer sums; not a zero count, so a mask that
  leaves the number of zeros unchanged is seen too), the host has applied its
  mask: ``pruned = weight == 0`` (new zeros, and the dense weight's own zeros, which the
  host counts as pruned too: its zero pattern is kept exactly). The seam emits it
  through the ``optima_mask_emitted`` hook (the OPTIMA plugin answers with the exact
  reconstruction from the dense weights) and writes the answer into the weight, in
  its dtype and device, pruned entries exactly zero, before the block runs;
* a mask found with no Hessian for it (the hosts' magnitude paths never run a
  statistics pass, or the host left the block without re-running it) is handled by
  the seam's own pass at the next whole-model forward: it captures the block
  inputs itself from calibration tokens, runs each such block with its dense
  weights to stream the Hessians, emits, and propagates the updated block's outputs.

A linear's mask is therefore handled before the host (or its evaluation) uses the
pruned weights. The results are reported like the engine's
(:class:`~optima_plugin.engine.LayerResult` through ``optima_layer_done``), plus
``host_objective``: the reconstruction objective of the host's own weights (on the unshrunk ``H``,
as ``objective``; ``solved_*``: on the ``H`` shrunk by ``--hessian_shrink``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ..data import get_calibration
from ..acceptance import error_ratio, keep_better
from ..engine import LayerResult, blocks_path, resolve_device
from ..files import write_json
from ..hessian import HessianAccumulator, layer_shrink, shrink_to_diagonal
from ..models import ModelAdapter, block_linears, get_adapter, input_groups
from ..memory import release_freed_memory
from ..pipeline import BlockPipeline, Hooks
from ..plugins import get_plugin_manager, lookup
from ..solvers.problem import reconstruction_error
from .selection import reselect
from .shims import CallDepth

log = logging.getLogger(__name__)


@dataclass
class SeamSettings:
    """How the seam works.

    Attributes:
        hessian_dtype: accumulation dtype of the streamed Hessians.
        mask_selector: a registered selector that replaces the host's masks (at the host's per-row counts).
        calibration: the seam's own pass: calibration source (``c4``, ``wikitext2``, ``pydoc``, a path).
        nsamples, seqlen, seed: its windows (seqlen None: the host's ``model.seqlen``, else ≤ 2048).
        device: where its own pass runs (``auto``: the GPU if there is one).
        report: JSON file for the per-layer results, written by :meth:`HostSeam.finish`.
        hessian_shrink: each layer's ``H`` has its off-diagonal scaled by ``1 - hessian_shrink`` (``auto``:
            :func:`optima_plugin.hessian.default_hessian_shrink` of the mask's sparsity) before anything
            reads it (a ``--mask_selector``, the update, the objectives and the acceptance test), as in
            ``optima-prune``.
    """

    hessian_dtype: torch.dtype = torch.float32
    mask_selector: Optional[str] = None
    calibration: str = "c4"
    nsamples: int = 128
    seqlen: Optional[int] = None
    seed: int = 0
    device: str = "auto"
    report: Optional[str] = None
    hessian_shrink: "float | str" = 0.0


_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _rows(weight: Tensor) -> Tensor:
    w = weight.detach()
    return w.reshape(w.shape[0], -1) if w.dim() != 2 else w


def fingerprint(weight: Tensor) -> Tensor:
    """Per-row checksums of ``weight``, ``(rows,)`` int32 on the CPU: the sum of each row's bit patterns as
    integers, modulo 2³² (the sum wraps). Exact for one change: a changed entry changes its row's bit pattern
    by a nonzero amount smaller than 2³² in magnitude (zeroing one too, ``-0.0`` included), so its row's sum
    changes unless other changes in the same row cancel it to the bit. One reduction, done at every block
    call, with no temporary copy of the weight (summing into int64 would cast the whole weight first: 2× an
    fp32 weight, 4× an fp16 one, at every call)."""
    w = _rows(weight)
    bits = w.view(_BITS[w.element_size()])
    return bits.sum(dim=1, dtype=torch.int64 if w.element_size() == 8 else torch.int32).cpu()


#: elements per slice of rows when counting zeros: the comparison's bool and int32 temporaries stay ~5 MB
_ZERO_SLICE = 1 << 20


def row_zeros(weight: Tensor) -> Tensor:
    """Zeros per row of ``weight`` (``(rows,)`` int32 on the CPU): compared only when the host cast the model.
    Counted a slice of rows at a time (a bool mask and its int32 sum of the whole weight would be 5× an fp32
    weight's bytes)."""
    w = _rows(weight)
    step = max(1, _ZERO_SLICE // max(1, w.shape[1]))
    return torch.cat([rows.eq(0).sum(dim=1, dtype=torch.int32) for rows in w.split(step)]).cpu()


@dataclass
class LinearState:
    """One decoder linear as the seam sees it."""

    name: str
    rel: str
    module: nn.Linear
    owner: str  # the member of its input group whose forward hook streams the shared Hessian
    ref: Tensor  # fingerprint of the weight as the seam last knew it (at load: the dense weight's)
    ref_zeros: Tensor  # its zeros per row
    ref_dtype: torch.dtype
    dense: Optional[Tensor] = None  # CPU dense weight, held only while the seam works on its block
    handled: bool = False

    def changed(self) -> bool:
        """Whether the weight differs from what the seam last knew (the dense weight, or its own answer)."""
        weight = self.module.weight
        if weight.dtype != self.ref_dtype:  # the host cast the model: compare the zeros, then follow the cast
            if not torch.equal(row_zeros(weight), self.ref_zeros):
                return True
            self.seen()
            return False
        return not torch.equal(fingerprint(weight), self.ref)

    def seen(self) -> None:
        """The weight as it is now is known (after the seam's write, or a change that needs no update)."""
        weight = self.module.weight
        self.ref, self.ref_zeros, self.ref_dtype = fingerprint(weight), row_zeros(weight), weight.dtype


@dataclass
class BlockState:
    index: int
    block: nn.Module
    linears: dict[str, LinearState]
    accs: dict[str, HessianAccumulator] = field(default_factory=dict)
    collect: set = field(default_factory=set)


class CheckpointWeights:
    """Dense weights read from a model's safetensors files, memory-mapped, by parameter name.

    A tensor is read only when asked for (``safe_open``: the file is mapped, nothing is
    loaded up front) and returned as a fresh CPU tensor in the checkpoint's dtype.
    """

    def __init__(self, files: list[Path]) -> None:
        from safetensors import safe_open

        self.files = files
        self.index: dict[str, Path] = {}
        for path in files:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    self.index.setdefault(key, path)

    @classmethod
    def of(cls, model: nn.Module) -> Optional["CheckpointWeights"]:
        """The checkpoint of ``model`` (its ``name_or_path``: a directory, or a hub id in the local cache)."""
        source = str(getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path",
                                                                        "") or "")
        if not source:
            return None
        folder = Path(source)
        if not folder.is_dir():
            try:
                from huggingface_hub import snapshot_download

                folder = Path(snapshot_download(source, local_files_only=True, allow_patterns=["*.safetensors"]))
            except Exception:  # not a hub id, or not in the cache: no checkpoint to read
                return None
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            return None
        try:
            return cls(files)
        except Exception as err:  # an unreadable file: as if there were none
            log.warning("optima-host: cannot read the safetensors in %s (%s)", folder, err)
            return None

    def get(self, name: str) -> Optional[Tensor]:
        """The tensor saved as ``name`` (or as ``name`` without leading prefixes, or with ``model.``), or None."""
        from safetensors import safe_open

        parts = name.split(".")
        for key in [name, "model." + name] + [".".join(parts[j:]) for j in range(1, len(parts) - 1)]:
            if key in self.index:
                with safe_open(str(self.index[key]), framework="pt", device="cpu") as f:
                    return f.get_tensor(key)
        return None


class DenseWeights:
    """The dense weights the seam holds: at most one block's, from a copy or the checkpoint on disk.

    Args:
        blocks: the seam's blocks (their :attr:`LinearState.dense` are the held weights).
    """

    def __init__(self, blocks: list[BlockState]) -> None:
        self.blocks = blocks
        #: where dense weights come from for a block the seam has no snapshot of (None: nowhere)
        self.checkpoint: Optional[CheckpointWeights] = None
        #: the most bytes of dense weights held at once (see :meth:`held_bytes`)
        self.peak_bytes = 0

    @staticmethod
    def block_bytes(st: BlockState) -> int:
        """Bytes of ``st``'s linears' weights (one block's dense copy, at most)."""
        return sum(ls.module.weight.numel() * ls.module.weight.element_size() for ls in st.linears.values())

    def held_bytes(self) -> int:
        """Bytes of dense weights held now."""
        return sum(ls.dense.numel() * ls.dense.element_size() for st in self.blocks for ls in st.linears.values()
                   if ls.dense is not None)

    def hold(self, ls: LinearState, dense: Tensor) -> Tensor:
        """Hold ``dense`` as ``ls``'s dense weight (the peak follows)."""
        ls.dense = dense
        self.peak_bytes = max(self.peak_bytes, self.held_bytes())
        return dense

    def copy(self, st: BlockState) -> None:
        """The host's first call of ``st``: copy its linears that are still dense (before any mask of it)."""
        for ls in st.linears.values():
            if ls.dense is None and not ls.handled and not ls.changed():
                self.hold(ls, ls.module.weight.detach().to("cpu", copy=True))

    @staticmethod
    def drop(st: BlockState) -> None:
        """Let ``st``'s dense weights go."""
        for ls in st.linears.values():
            ls.dense = None

    def get(self, ls: LinearState) -> Optional[Tensor]:
        """``ls``'s dense weight: the block's copy, else the checkpoint's (held with its block), else None."""
        if ls.dense is not None:
            return ls.dense
        if self.checkpoint is None:
            return None
        saved = self.checkpoint.get(ls.name + ".weight")
        weight = ls.module.weight
        if saved is None or tuple(saved.shape) != tuple(weight.shape):
            log.warning("%s: no tensor of shape %s in the checkpoint %s", ls.name, list(weight.shape),
                        self.checkpoint.files[0].parent)
            return None
        saved = saved.to(weight.dtype)
        if not ls.handled and ls.ref_dtype == weight.dtype and not torch.equal(fingerprint(saved), ls.ref):
            log.warning("%s: the checkpoint's weights are not the ones loaded; its dense weights are unknown",
                        ls.name)
            return None
        return self.hold(ls, saved)


class LinearSolve:
    """The per-linear solve: a linear's mask and Hessian in; the plugin's answer (or the host's weights, when
    better) written into the weight, the layer reported (``optima_layer_done``, :attr:`layers`).

    Args:
        settings: :class:`SeamSettings` (its ``hessian_shrink``).
        selector: a ``--mask_selector`` that replaces the host's masks, or None.
        dense_weights: where the dense weights come from.
        stats_source: see :class:`HostSeam`.
    """

    def __init__(self, settings: SeamSettings, selector, dense_weights: DenseWeights, stats_source=None) -> None:
        self.settings = settings
        self.selector = selector
        self.dense_weights = dense_weights
        self.stats_source = stats_source
        self.pm = get_plugin_manager()
        #: the report's rows, one per linear answered
        self.layers: list[dict] = []

    def __call__(self, st: BlockState, ls: LinearState, hessian: Tensor, pruned: Optional[Tensor] = None,
                 dense: Optional[Tensor] = None) -> None:
        """Answer ``ls``'s mask (``pruned``; None: the weight's zeros) with ``hessian``: write the kept weights,
        report the layer."""
        t0 = time.perf_counter()
        weight = ls.module.weight
        dense = dense if dense is not None else self.dense_weights.get(ls)
        if dense is None:
            log.warning("%s was pruned with no dense weights to start from (none copied before its mask, none "
                        "in a checkpoint on disk), so the host's weights stay", ls.name)
            ls.seen()
            return
        dense = dense.to(weight.device)
        host = weight.detach().clone()
        # Every zero is pruned, the dense weight's own zeros too (GGUF-dequantized weights have many): the
        # host's zero pattern is kept exactly, and no zero the host counts in its sparsity is revived.
        pruned = host == 0 if pruned is None else pruned.to(device=weight.device, dtype=torch.bool)
        shrink = layer_shrink(self.settings.hessian_shrink, float(pruned.float().mean()))
        true_hessian = hessian  # the report's headline figures (and the keep-the-better check) are on it
        hessian = shrink_to_diagonal(hessian, shrink)  # what selection and update read (--hessian_shrink)
        if self.selector is not None:
            pruned = reselect(self.selector, dense, hessian, pruned)
        answer = self.pm.hook.optima_mask_emitted(name=ls.name, module=ls.module, pruned=pruned, hessian=hessian,
                                                  dense_weight=dense)
        stats = self.stats_source.pop_stats(ls.name) if self.stats_source is not None else {}
        mask_only = dense.masked_fill(pruned, 0)
        if answer is None:
            new = mask_only if self.selector is not None else host
        else:
            new = answer.to(device=weight.device, dtype=weight.dtype).masked_fill(pruned, 0)
        mask_objective = reconstruction_error(dense, mask_only, true_hessian)
        # Mask-only hosts (Wanda, TRIM, magnitude) left exactly the mask-only weights: one GEMM less.
        same = host.dtype == mask_only.dtype and torch.equal(host, mask_only)
        host_objective = mask_objective if same else reconstruction_error(dense, host, true_hessian)
        objective = reconstruction_error(dense, new, true_hessian)
        # a --mask_selector's weights are kept: the host's weights are of another mask
        kept = keep_better(objective, mask_objective, baseline=host_objective if self.selector is None else None)
        if not kept.accepted:
            log.warning("%s: the plugin's weights are worse than the host's (%.4g > %.4g); keeping the host's",
                        ls.name, objective, host_objective)
            new = host
        objective, accepted, ratio = kept.objective, kept.accepted, kept.error_ratio
        solved_mask, solved = mask_objective, objective  # on the shrunk H the update solved with, if any
        if shrink:
            solved_mask, solved = (reconstruction_error(dense, w, hessian) for w in (mask_only, new))
        with torch.no_grad():
            weight.data.copy_(new)
        ls.seen()
        ls.handled = True
        result = LayerResult(
            name=ls.name, block=st.index, shape=list(weight.shape), ratio=float(pruned.float().mean()),
            sparsity=float((weight == 0).float().mean()), error_ratio=ratio, objective=objective,
            mask_objective=mask_objective, accepted=accepted, seconds=time.perf_counter() - t0, update=stats,
            solved_objective=solved, solved_mask_objective=solved_mask,
            solved_error_ratio=error_ratio(solved, solved_mask),
        )
        self.pm.hook.optima_layer_done(result=result)
        self.layers.append(dict(result.to_dict(), host_objective=host_objective))
        log.debug("%s: %.1f%% pruned, error ratio %.4f (host %.4f)", ls.name, 100 * result.ratio, ratio,
                  host_objective / mask_objective if mask_objective > 0 else float("nan"))


class Phase(Enum):
    """Where the seam is; :class:`HostSeam`'s docstring has the transitions."""

    DETACHED = "detached"  # no model watched
    OUTSIDE = "outside"  # watching; the host's loop is in no block (loading, a whole-model forward)
    IN_BLOCK = "in block"  # the host's loop is in block ``HostSeam.block``: its dense copy held, its Hessians stream
    WORKING = "working"  # the seam itself runs (handles masks, its own pass, an emit): hooks are ignored


class Event(Enum):
    """What moves the seam."""

    ATTACH = "attach"  # a supported model was loaded
    BLOCK_CALL = "block call"  # the host calls a block directly (not inside a whole-model forward)
    MODEL_CALL = "model call"  # a whole-model forward starts, or an explicit flush (a save, the end)
    EMIT = "emit"  # the host's explicit ``emit_mask``
    DETACH = "detach"  # the seam lets the model go


#: ``(phase, event) → phase after`` (:data:`STAY`: the phase it was in); a pair in neither this nor
#: :data:`REFUSED` is ignored. Each event's action is the method :meth:`HostSeam._on` is given.
STAY = None
TRANSITIONS: dict[tuple[Phase, Event], Optional[Phase]] = {
    **{(phase, Event.ATTACH): Phase.OUTSIDE for phase in Phase},
    **{(phase, Event.DETACH): Phase.DETACHED for phase in Phase},
    (Phase.OUTSIDE, Event.BLOCK_CALL): Phase.IN_BLOCK,
    (Phase.IN_BLOCK, Event.BLOCK_CALL): Phase.IN_BLOCK,
    (Phase.OUTSIDE, Event.MODEL_CALL): Phase.OUTSIDE,
    (Phase.IN_BLOCK, Event.MODEL_CALL): Phase.OUTSIDE,
    (Phase.DETACHED, Event.EMIT): STAY,
    (Phase.OUTSIDE, Event.EMIT): STAY,
    (Phase.IN_BLOCK, Event.EMIT): STAY,
}
#: pairs that raise: the host's ``emit_mask`` from inside the seam's own work
REFUSED = {(Phase.WORKING, Event.EMIT)}


class HostSeam:
    """Watches a host's block loop and emits its masks (see the module docstring).

    The seam is a state machine: :attr:`phase` (a :class:`Phase`) changes only in :meth:`_on`, by this table
    (:data:`TRANSITIONS`; ``WORKING`` while the action runs, then the phase after; an event not listed is
    ignored), and :attr:`block` (the block of the host's loop, None outside it) only in the actions named here:

    ===========  ==========  ===============================================================  ==========
    phase        event       action                                                           phase after
    ===========  ==========  ===============================================================  ==========
    any          ATTACH      (a second model: DETACH first) fingerprint the linears, hook      OUTSIDE
    OUTSIDE      BLOCK_CALL  block := i; copy block i's dense linears; handle its changed      IN_BLOCK
                             linears; collect its Hessians
    IN_BLOCK j   BLOCK_CALL  block := i; i ≠ j: leave j (handle what is left, free its          IN_BLOCK
                             statistics and dense copy), enter i; handle, collect
    OUTSIDE      MODEL_CALL  block := None; own pass for every changed linear                  OUTSIDE
    IN_BLOCK j   MODEL_CALL  block := None; leave j; own pass for every changed linear         OUTSIDE
    not WORKING  EMIT        emit that linear's mask now (own pass without Hessians)           the same
    WORKING      EMIT        RuntimeError (``emit_mask`` from inside the seam's own work)      WORKING
    WORKING      BLOCK_CALL  ignored (the seam's own pass runs the blocks)                     WORKING
                 MODEL_CALL
    DETACHED     BLOCK_CALL  ignored                                                           DETACHED
                 MODEL_CALL
    any          DETACH      remove the hooks, forget the model                                DETACHED
    ===========  ==========  ===============================================================  ==========

    A block call inside a whole-model forward is no event (its hook returns at once); the Hessian collectors
    add only outside ``WORKING``. An exception in an action leaves the phase it was going to (``block`` says
    which block the host was in: the report's ``failed_block``).

    Args:
        settings: :class:`SeamSettings`.
        calls: the process's :class:`~optima_plugin.host.shims.CallDepth` (tells
            host block calls from whole-model forwards); the seam registers on it.
        stats_source: optional object with ``pop_stats(name) -> dict`` (the
            answering plugin's solver statistics, for the report).
    """

    def __init__(self, settings: SeamSettings, calls: CallDepth, stats_source=None) -> None:
        self.settings = settings
        self.calls = calls
        selector = lookup("selectors", settings.mask_selector, "--mask_selector") if settings.mask_selector else None
        self.model: Optional[nn.Module] = None
        self.adapter: Optional[ModelAdapter] = None
        self.blocks: list[BlockState] = []
        self.own_passes: list[dict] = []
        #: the seam's state (see the class docstring): changed only by :meth:`_on`
        self.phase = Phase.DETACHED
        #: the block of the host's loop running now (None outside it: loading, a whole-model forward)
        self.block: Optional[int] = None
        self._hooks = Hooks()  # registered through the pipeline's API (optima_plugin.pipeline)
        self._tokens: Optional[Tensor] = None
        #: the dense weights held (at most one block's)
        self.dense_weights = DenseWeights(self.blocks)
        #: the per-linear solve (its ``layers``: the report's rows)
        self.solve = LinearSolve(settings, selector, self.dense_weights, stats_source)
        self.layers = self.solve.layers
        calls.entered.append(self._model_called)

    # -- attaching -------------------------------------------------------------

    def attach(self, model: nn.Module) -> bool:
        """Fingerprint ``model``'s decoder linears and hook its blocks; False (and a warning) if unsupported.

        No dense weights are copied here: see the module docstring for when the seam holds them."""
        try:
            adapter = get_adapter(model)
        except ValueError as err:
            log.warning("optima-host leaves %s alone: %s", type(model).__name__, err)
            return False
        if self.adapter is not None:
            log.warning("a second model was loaded; the plugin follows the newest one")
            self.detach()
        self._on(Event.ATTACH, lambda: self._watch(model, adapter))
        return True

    def _watch(self, model: nn.Module, adapter: ModelAdapter) -> None:
        """Fingerprint ``model``'s decoder linears and hook its blocks (the ``ATTACH`` action)."""
        self.model, self.adapter = model, adapter
        prefix = blocks_path(adapter)
        for i, block in enumerate(adapter.blocks):
            linears = block_linears(block)
            owners = {rel: group[0] for group in input_groups(block) for rel in group}
            states = {
                rel: LinearState(name=f"{prefix}.{i}.{rel}", rel=rel, module=lin, owner=owners[rel],
                                 ref=fingerprint(lin.weight), ref_zeros=row_zeros(lin.weight),
                                 ref_dtype=lin.weight.dtype)
                for rel, lin in linears.items()
            }
            st = BlockState(index=i, block=block, linears=states)
            self.blocks.append(st)
            self._hooks.pre_forward(block, self._block_hook(i))
            for owner in sorted(set(owners.values())):
                self._hooks.forward(linears[owner], self._collector(st, owner))
            # The fingerprints' temporaries (an int64 copy of each weight, a bool one for the zeros) are freed at
            # once, but the small per-row results kept here land in their holes and glibc can reuse none of
            # them: on SmolLM2-135M the load left 1.1 GB of freed heap resident before the host's first block.
            release_freed_memory()
        n = sum(len(st.linears) for st in self.blocks)
        mb = max(self.block_bytes(st) for st in self.blocks) / 2**20 if self.blocks else 0.0
        self.dense_weights.checkpoint = CheckpointWeights.of(model)
        log.info("optima-host: watching %d linears in %d blocks of %s (dense weights: one block at a time, "
                 "at most %.1f MB on CPU)", n, len(self.blocks), type(model).__name__, mb)
        if self.dense_weights.checkpoint is None:
            log.info("optima-host: no local safetensors for %r: dense weights come only from a one-block copy "
                     "(%.1f MB on CPU) taken at the host's first call of each block; a linear pruned before "
                     "the host calls its block (magnitude paths) keeps the host's weights",
                     getattr(model, "name_or_path", ""), mb)

    # -- the state machine -----------------------------------------------------

    def _on(self, event: Event, action: Callable[[], None]) -> None:
        """The one transition (the class docstring's table, :data:`TRANSITIONS`): ``action`` runs in
        ``WORKING``, then the seam is in the phase after (also when ``action`` raised)."""
        key = (self.phase, event)
        if key in REFUSED:
            raise RuntimeError("emit_mask was called from inside the seam's own pass")
        if key not in TRANSITIONS:
            return  # ignored
        after = TRANSITIONS[key]
        after = self.phase if after is STAY else after
        self.phase = Phase.WORKING
        try:
            action()
        finally:
            self.phase = after

    # -- dense weights (:class:`DenseWeights`) ------------------------------------

    block_bytes = staticmethod(DenseWeights.block_bytes)

    @property
    def checkpoint(self) -> Optional[CheckpointWeights]:
        """Where dense weights come from for a block the seam has no snapshot of (None: nowhere)."""
        return self.dense_weights.checkpoint

    @property
    def peak_dense_bytes(self) -> int:
        """The most bytes of dense weights the seam held at once."""
        return self.dense_weights.peak_bytes

    def dense_bytes(self) -> int:
        """Bytes of dense weights the seam holds now."""
        return self.dense_weights.held_bytes()

    def detach(self) -> None:
        """Remove the seam's hooks and forget the model."""
        self._on(Event.DETACH, self._unwatch)

    def _unwatch(self) -> None:
        self._hooks.remove()
        self.blocks.clear()
        self.dense_weights.checkpoint = None
        self.model = self.adapter = None
        self.block = None

    def find(self, module: nn.Module) -> Optional[tuple[BlockState, LinearState]]:
        """The block and linear state of a watched linear ``module``, or None."""
        for st in self.blocks:
            for ls in st.linears.values():
                if ls.module is module:
                    return st, ls
        return None

    # -- hooks -----------------------------------------------------------------

    def _block_hook(self, index: int):
        def pre(module, args):
            if self.calls.standalone:  # not inside a whole-model forward
                self._on(Event.BLOCK_CALL, lambda: self._block_called(index))

        return pre

    def _collector(self, st: BlockState, owner: str):
        def hook(module, args, output):
            if owner in st.collect and self.calls.standalone and self.phase is not Phase.WORKING:
                st.accs[owner].add(args[0])

        return hook

    def _block_called(self, index: int) -> None:
        """A block forward (the ``BLOCK_CALL`` action): handle the masks applied since the block last ran, then
        collect."""
        previous, self.block = self.block, index
        if previous is not None and previous != index:
            self._leave(self.blocks[previous])
        st = self.blocks[index]
        if previous != index:
            self.dense_weights.copy(st)
        changed = self._changed(st)
        if changed:
            self._handle(st, changed)
        self._collect(st, reset=bool(changed))

    def _model_called(self, module: Optional[nn.Module]) -> None:
        """A whole-model forward starts: no mask may stay unhandled while the model runs."""
        self._on(Event.MODEL_CALL, self._flush)

    def flush(self) -> None:
        """Handle every mask applied and not yet emitted (before a save, at the end)."""
        self._model_called(None)

    # -- bookkeeping -----------------------------------------------------------

    def _changed(self, st: BlockState) -> list[LinearState]:
        return [ls for ls in st.linears.values() if ls.changed()]

    def _collect(self, st: BlockState, reset: bool) -> None:
        owners = {ls.owner for ls in st.linears.values() if not ls.handled}
        for owner in owners:
            if reset or owner not in st.accs:
                st.accs[owner] = HessianAccumulator(self.settings.hessian_dtype)
        st.collect = owners

    def _leave(self, st: BlockState) -> None:
        """The host moved on from ``st``: handle what is left, free the block's statistics and dense weights."""
        changed = self._changed(st)
        if changed:
            self._handle(st, changed)
        st.accs.clear()
        st.collect = set()
        self.dense_weights.drop(st)
        release_freed_memory()

    def _hessian(self, st: BlockState, ls: LinearState) -> Optional[Tensor]:
        acc = st.accs.get(ls.owner)
        return acc.hessian if acc is not None and acc.tokens > 0 else None

    def _handle(self, st: BlockState, changed: list[LinearState]) -> None:
        missing = []
        for ls in changed:
            hessian = self._hessian(st, ls)
            if hessian is None:
                missing.append(ls)
            else:
                self.solve(st, ls, hessian)
        if missing:
            self._own_pass({st.index: missing})
        release_freed_memory()

    def _flush(self) -> None:
        """The ``MODEL_CALL`` action."""
        # A whole-model forward leaves the host's block loop (its evaluation, a save, the next stage): the block
        # the host was in is handled with its Hessians and its dense copy freed now, not held until the next block
        # call that may never come. A host that comes back to it gets a fresh copy of what is still dense.
        previous, self.block = self.block, None
        if previous is not None:
            self._leave(self.blocks[previous])
        pending = {st.index: ch for st in self.blocks if (ch := self._changed(st))}
        if not pending:
            return
        # Masks applied without the host's statistics pass (magnitude paths): one sequential own pass,
        # one block's dense weights at a time.
        if self.dense_weights.checkpoint is None:  # nowhere to read their dense weights from: the host's weights stay
            lost = [ls for ch in pending.values() for ls in ch if ls.dense is None]
            if lost:
                log.warning("optima-host: %d linear(s) were pruned before the host called their block and no "
                            "checkpoint on disk has their dense weights (e.g. %s); they keep the host's weights",
                            len(lost), lost[0].name)
            for ls in lost:
                ls.seen()
            pending = {i: keep for i, ch in pending.items() if (keep := [ls for ls in ch if ls.dense is not None])}
        if pending:
            self._own_pass(pending)

    # -- emitting --------------------------------------------------------------

    def emit(self, st: BlockState, ls: LinearState, hessian: Optional[Tensor] = None,
             pruned: Optional[Tensor] = None, dense: Optional[Tensor] = None) -> None:
        """Emit ``ls``'s mask now (the explicit ``emit_mask`` call); statistics from the seam when not given."""
        def action() -> None:
            stats = hessian if hessian is not None else self._hessian(st, ls)
            if stats is None:
                self._own_pass({st.index: [ls]})
            else:
                self.solve(st, ls, stats, pruned=pruned, dense=dense)
            if st.index != self.block:  # read from the checkpoint for a block the host is not in: freed now
                self.dense_weights.drop(st)

        self._on(Event.EMIT, action)

    # -- the seam's own statistics pass ---------------------------------------

    def _calibration(self) -> Tensor:
        if self._tokens is None:
            from transformers import AutoTokenizer

            model = self.model
            limit = getattr(model.config, "max_position_embeddings", None) or 2048
            seqlen = self.settings.seqlen or getattr(model, "seqlen", None) or min(2048, limit)
            tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
            self._tokens = get_calibration(self.settings.calibration, tokenizer, self.settings.nsamples, seqlen,
                                           self.settings.seed)
            log.info("optima-host: own statistics pass on %d windows of %d tokens from %s",
                     self._tokens.shape[0], seqlen, self.settings.calibration)
        return self._tokens

    def _own_pass(self, pending: dict[int, list[LinearState]]) -> None:
        """Capture block inputs, then for each block up to the last pending one: Hessians of the
        pending linears with their dense weights, emit, and propagate the block's outputs."""
        t0 = time.perf_counter()
        pipe = BlockPipeline(self.adapter, device=resolve_device(self.settings.device), batch_size=1)
        pipe.capture(self._calibration())
        last = max(pending)

        def on_block(index: int, block: nn.Module) -> None:
            st, todo = self.blocks[index], pending.get(index, [])
            if todo:
                hessians = self._dense_hessians(pipe, st, todo)
                for ls in todo:
                    self.solve(st, ls, hessians[ls.owner])
                if st.index != self.block:
                    self.dense_weights.drop(st)  # one block's dense weights at a time

        with torch.no_grad():
            pipe.run(range(last + 1), on_block, propagate=lambda index: index < last)
        self.own_passes.append({"blocks": sorted(pending), "seconds": time.perf_counter() - t0})
        log.info("optima-host: own statistics pass for %d block(s) in %.1f s", len(pending),
                 time.perf_counter() - t0)

    def _dense_hessians(self, pipe: BlockPipeline, st: BlockState, todo: list[LinearState]) -> dict:
        """Hessians of ``todo``'s inputs with their dense weights restored for the pass (host weights put back)."""
        saved = {}
        for ls in todo:
            dense = self.dense_weights.get(ls)
            if dense is not None:
                saved[ls.rel] = ls.module.weight.detach().clone()
                ls.module.weight.data.copy_(dense.to(ls.module.weight.device))
        owners = {o: st.linears[o].module for o in sorted({ls.owner for ls in todo})}
        dtype = self.settings.hessian_dtype
        try:
            accs = pipe.statistics(st.index, st.block, owners, lambda: HessianAccumulator(dtype))
        finally:
            for rel, weight in saved.items():
                st.linears[rel].module.weight.data.copy_(weight)
        return {o: acc.hessian for o, acc in accs.items()}

    # -- the end ---------------------------------------------------------------

    def finish(self, error: Optional[BaseException] = None) -> dict:
        """Warn about masks never handled, write and return the report.

        ``error``: what ended the host early (None: it completed); the report then says
        ``"completed": false``, the error and the block the host was pruning (``failed_block``).
        """
        left = [ls.name for st in self.blocks for ls in self._changed(st)]
        for st in self.blocks:
            self.dense_weights.drop(st)
        if error is not None:
            log.error("optima-host: the host stopped early (%s); the report lists the %d linear(s) updated "
                      "before that", _describe(error), len(self.layers))
        elif left:
            log.warning("optima-host: %d linear(s) were pruned after the host's last forward and were not "
                        "updated (e.g. %s); the host saved or evaluated nothing after pruning them",
                        len(left), left[0])
        er = [x["error_ratio"] for x in self.layers if x["error_ratio"] is not None]
        solved = [x["solved_error_ratio"] for x in self.layers if x.get("solved_error_ratio") is not None]
        host = [x["host_objective"] / x["mask_objective"] for x in self.layers if x["mask_objective"]]
        report = {
            "completed": error is None,
            "error": None if error is None else _describe(error),
            "failed_block": None if error is None else self.block,
            "layers": self.layers,
            "own_passes": self.own_passes,
            "summary": {
                "layers": len(self.layers),
                "mean_error_ratio": sum(er) / len(er) if er else None,
                "mean_solved_error_ratio": sum(solved) / len(solved) if solved else None,
                "mean_host_error_ratio": sum(host) / len(host) if host else None,
                "not_updated": left,
                "dense_peak_bytes": self.peak_dense_bytes,
            },
        }
        if self.layers:
            log.info("optima-host: %d linears updated, mean error ratio %.4f (host's weights: %.4f)",
                     len(self.layers), report["summary"]["mean_error_ratio"] or float("nan"),
                     report["summary"]["mean_host_error_ratio"] or float("nan"))
        if self.settings.report:
            write_json(self.settings.report, report)
        return report


def _describe(error: BaseException) -> str:
    """``"<ExceptionType>: <message>"`` (``SystemExit``: its code)."""
    message = error.code if isinstance(error, SystemExit) else error
    return f"{type(error).__name__}: {message}"
