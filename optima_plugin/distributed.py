"""One prune on many processes under ``torchrun``: data-parallel calibration, row-parallel solves.

    torchrun --nproc_per_node 8 -m optima_plugin.cli --model ... --weight_update optima

Every rank runs the same block loop (:mod:`optima_plugin.engine`) on its own share of the
calibration windows (:meth:`Distributed.share`: contiguous, in order, sizes differing by at
most one). Statistics that are means over tokens are combined token-weighted
(:meth:`Distributed.mean`): ``H = Σ_r n_r H_r / Σ_r n_r``, the single-process Hessian up to
the order of the float sums, bitwise the same on every rank. Everything computed from ``H``
and the (identical) weights then is the same on every rank: selection, TRIM's row ratios,
the acceptance test. The masks are nevertheless broadcast from rank 0 (:meth:`broadcast`), so
the ranks agree even where a device kernel is not deterministic. An OPTIMA solve is split
by rows (:meth:`rows`): each rank solves an equal slice of the rows of every linear (the rows
share ``H``), and the slices are all-gathered (:meth:`gather_rows`), so every rank writes the
same pruned block before propagating its share of the windows.

Without ``torchrun`` (``WORLD_SIZE`` unset or 1) :func:`setup` returns None and nothing here
runs: no process group, no overhead.

Backends: NCCL when the ranks run on GPUs (rank ``r`` on ``cuda:LOCAL_RANK``), Gloo on CPUs.
A collective that waits longer than the timeout (``OPTIMA_DIST_TIMEOUT`` seconds, default
600) fails instead of hanging; rank 0's evaluation and saving, which the other ranks wait
for, are waited on without that limit (a Gloo group of its own).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist

from .config import PruneConfig
from torch import Tensor

log = logging.getLogger(__name__)

#: environment variable: seconds a collective may wait before the job fails
TIMEOUT_ENV = "OPTIMA_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0
#: how long the other ranks wait for rank 0's evaluation and saving
WAIT_FOR_MAIN = timedelta(days=7)

_current: Optional["Distributed"] = None


def launched() -> bool:
    """Whether this process is one of several started by ``torchrun`` (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def timeout_from_env() -> timedelta:
    """The collective timeout: ``OPTIMA_DIST_TIMEOUT`` seconds (a positive number), else 600 s."""
    text = os.environ.get(TIMEOUT_ENV)
    if text is None:
        return timedelta(seconds=DEFAULT_TIMEOUT_S)
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"{TIMEOUT_ENV}={text!r} must be a positive number of seconds")
    return timedelta(seconds=seconds)


@dataclass
class Distributed:
    """This process's place in a torchrun job and the collectives the prune uses.

    Attributes:
        rank, world_size, local_rank: as torchrun sets them.
        device: where this rank computes (``cuda:LOCAL_RANK`` with NCCL, else ``cpu``).
        backend: ``nccl`` or ``gloo``.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    _wait_group: Any = None

    def is_main(self) -> bool:
        """Rank 0: the one that logs, shows progress, evaluates, saves and reports."""
        return self.rank == 0

    def span(self, n: int, rank: Optional[int] = None) -> slice:
        """Rank ``rank``'s (default: this rank's) contiguous share of ``n`` items; sizes differ by at most one."""
        r = self.rank if rank is None else rank
        return slice(r * n // self.world_size, (r + 1) * n // self.world_size)

    def share(self, tokens: Tensor) -> Tensor:
        """This rank's calibration windows: its :meth:`span` of the rows of ``tokens`` (``n x seqlen``)."""
        n = tokens.shape[0]
        if n < self.world_size:
            raise ValueError(f"--nsamples {n} is fewer than the {self.world_size} ranks: every rank needs at least "
                             f"one calibration window; use --nsamples {self.world_size} or more, or fewer ranks")
        return tokens[self.span(n)]

    def rows(self, r: int) -> slice:
        """This rank's rows of an ``r``-row solve."""
        return self.span(r)

    # -- collectives ---------------------------------------------------------------------------------------

    def _on_comm(self, t: Tensor) -> Tensor:
        return t.to(self.device) if self.backend == "nccl" else t.cpu()

    def sum_(self, t: Tensor) -> Tensor:
        """All-reduce ``t`` (sum) in place; returns it."""
        c = self._on_comm(t.contiguous())
        dist.all_reduce(c)
        if c is not t:
            t.copy_(c)
        return t

    def mean(self, mean: Optional[Tensor], count: int, shape: Optional[tuple] = None,
             dtype: torch.dtype = torch.float32) -> tuple[Tensor, int]:
        """Token-weighted mean over the ranks of per-rank means: ``(Σ n_r m_r / Σ n_r, Σ n_r)``.

        A rank that saw no tokens passes ``mean=None`` with ``shape`` and ``dtype``. The result is on
        ``mean``'s device (CPU for ``None``) and bitwise the same on every rank.
        """
        if mean is None:
            if shape is None:
                raise ValueError("Distributed.mean needs the shape of a mean this rank did not see")
            mean = torch.zeros(shape, dtype=dtype)
        total = self.sum_(torch.tensor([float(count)], dtype=torch.float64))
        n = int(total.item())
        weighted = self.sum_(mean * count)
        return (weighted / n if n > 0 else weighted), n

    def broadcast(self, t: Tensor, src: int = 0) -> Tensor:
        """``t`` as rank ``src`` holds it (a new tensor on ``t``'s device, ``t``'s dtype)."""
        c = self._on_comm(t.contiguous().clone() if t.dtype != torch.bool else t.to(torch.uint8))
        dist.broadcast(c, src)
        return c.to(device=t.device, dtype=t.dtype)

    def gather_rows(self, part: Tensor, r: int) -> Tensor:
        """The ``r x ...`` tensor whose :meth:`rows` slice on each rank is that rank's ``part``."""
        spans = [self.span(r, q) for q in range(self.world_size)]
        most = max(s.stop - s.start for s in spans)
        padded = torch.zeros((most,) + tuple(part.shape[1:]), dtype=part.dtype, device=self.device
                             if self.backend == "nccl" else torch.device("cpu"))
        padded[: part.shape[0]] = part.to(padded.device)
        pieces = [torch.empty_like(padded) for _ in spans]
        dist.all_gather(pieces, padded)
        out = torch.cat([p[: s.stop - s.start] for p, s in zip(pieces, spans)])
        return out.to(part.device)

    def max_int(self, value: int) -> int:
        """The largest ``value`` over the ranks."""
        t = torch.tensor([value], dtype=torch.int64)
        c = self._on_comm(t)
        dist.all_reduce(c, op=dist.ReduceOp.MAX)
        return int(c.item())

    def all_true(self, value: bool) -> bool:
        """Whether ``value`` holds on every rank."""
        t = self._on_comm(torch.tensor([int(bool(value))], dtype=torch.int64))
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def gather_object(self, obj: Any) -> list:
        """``[obj of rank 0, obj of rank 1, ...]`` on every rank (small picklable objects only)."""
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def wait_for_main(self) -> None:
        """Meet the other ranks; no time limit (rank 0 may be evaluating or saving meanwhile)."""
        dist.barrier(group=self._wait_group)


def check_options(options: dict, job: Distributed) -> None:
    """Refuse what a torchrun prune does not support, before any work.

    ``options``: :func:`optima_plugin.api.prune`'s keyword options. A checkpoint (``--checkpoint_dir``, or the
    default one beside ``--save_model``) works as in one process: each rank saves its share of the inputs
    (:mod:`optima_plugin.checkpoint`), and a job resumes with the same number of ranks only.
    """
    nsamples = options.get("nsamples", PruneConfig.nsamples)
    if nsamples < job.world_size:
        raise ValueError(f"--nsamples {nsamples} is fewer than the {job.world_size} ranks: every rank needs at "
                         f"least one calibration window; use --nsamples {job.world_size} or more, or fewer ranks")


class SyncedSelector:
    """A mask selector whose answers are rank 0's on every rank: its mask and, for selectors with their
    own update (SparseGPT, Thanos), its weights are broadcast from rank 0. Every other attribute
    (``name``, ``score``, ``prepare``, ...) is the wrapped selector's.

    Every rank still runs the selection (on the same ``H`` it gives the same answer on CPU); the
    broadcast makes the ranks agree where a device kernel is not bitwise deterministic.
    """

    def __init__(self, selector, dist: Distributed) -> None:
        self._selector = selector
        self._dist = dist

    def __getattr__(self, name: str):
        return getattr(self._selector, name)

    def select(self, weight: Tensor, hessian: Optional[Tensor], ratio, pattern, **kwargs):
        """The wrapped selector's :class:`~optima_plugin.selectors.base.Selection`, rank 0's tensors."""
        selection = self._selector.select(weight, hessian, ratio, pattern, **kwargs)
        own = self._dist.gather_object(selection.weight is not None)
        if len(set(own)) > 1:
            raise RuntimeError(f"--prune_method {getattr(self._selector, 'name', '?')}: the ranks disagree on "
                               "whether the selector updates the weights; a selector must answer the same "
                               "on every rank")
        pruned = self._dist.broadcast(selection.pruned)
        weight = self._dist.broadcast(selection.weight) if selection.weight is not None else None
        return replace(selection, pruned=pruned, weight=weight)


def setup(device: Optional[str] = None) -> Optional[Distributed]:
    """Join the torchrun job (once per process); None when not started by torchrun.

    ``device``: the prune's ``--device`` (``auto``/``cpu``/``cuda``): NCCL on ``cuda:LOCAL_RANK`` when it
    resolves to a GPU, else Gloo on the CPU. A process group the caller initialised already is used as is.
    """
    global _current
    if _current is not None:
        return _current
    if not launched() and not (dist.is_available() and dist.is_initialized()):
        return None
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed; run without torchrun")
    timeout = timeout_from_env()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and (device or "auto") != "cpu"
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout)
    backend = dist.get_backend()
    dev = torch.device(f"cuda:{local_rank}") if backend == "nccl" else torch.device("cpu")
    waiter = dist.new_group(backend="gloo", timeout=WAIT_FOR_MAIN)
    _current = Distributed(dist.get_rank(), dist.get_world_size(), local_rank, dev, backend, waiter)
    return _current


def current() -> Optional[Distributed]:
    """The job joined by :func:`setup`, or None (a single process)."""
    return _current


def teardown() -> None:
    """Leave the job (destroy the process group) if :func:`setup` joined one."""
    global _current
    if _current is not None and dist.is_initialized():
        dist.destroy_process_group()
    _current = None
