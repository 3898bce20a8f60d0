"""Install the plugin into a host's process: options, shims, the seam, the answering plugin.

``optima-host`` calls :func:`install` before running the host's ``main.py``; a host
author may call it at the top of their own script instead::

    from optima_plugin.host import install
    install(weight_update="optima", solver="pcg")
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..data import BUILTIN, BUILTIN_TEXTS
from ..files import check_distinct, check_output_file
from ..models import get_adapter
from ..plugins import collect_options, get_plugin_manager, registry
from ..validate import resolve
from ..updaters import UpdateOptions
from .plugin import OptimaMaskPlugin
from .seam import HostSeam, SeamSettings
from .shims import (SHIMS, CallDepth, CudaOnCpu, LoadOptions, add_position_embeddings, leave_mode,
                    patch_from_pretrained, quiet_cuda_calls, removed_imports, tuple_outputs)

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: ``--weight_update`` values that leave the host's own weights (its mask only, or SparseGPT's update).
HOST_WEIGHTS = ("none", "native")
#: File suffixes ``--host_data PATH`` reads text from (see :func:`optima_plugin.data._local_texts`).
TEXT_SUFFIXES = (".txt", ".json", ".jsonl")

_active: Optional["Installation"] = None


@dataclass
class HostOptions:
    """Every option of the plugin inside a host process (``optima-host``'s flags).

    Attributes:
        weight_update: the updater answering the host's masks (``optima``; ``none`` and ``native``
            keep the host's own weights).
        solver, damp, tol, max_iter, double_precision: OPTIMA solver settings.
        hessian_shrink: the off-diagonal of each ``H`` scaled by ``1 - hessian_shrink`` before the seam
            uses it (``auto``: see :func:`~optima_plugin.hessian.resolve_shrink`); the host's masks are its own.
        mask_selector: a registered selector replacing the host's masks, at the host's per-row counts.
        host_data: ``pydoc``, ``sherlock`` or a local text path for the host's C4 / WikiText-2 loaders.
        host_seqlen: pin ``model.seqlen`` (the host's window length) to this.
        host_dtype: load the model in this dtype instead of the host's.
        no_shim: names of compatibility shims to leave off (see :mod:`optima_plugin.host.shims`).
        calibration, nsamples, seqlen, seed, device: the seam's own statistics pass (magnitude paths);
            calibration defaults to ``host_data`` if given, else ``c4``.
        report: JSON file for the per-layer results.
        reconstruct: ``--reconstruct`` of ``optima-prune``; only ``none`` here (see :meth:`validate`).
        plugin_options: ``{name: value}`` of the options third-party plugins declare
            (``optima_addoption``; the built-in allocators' are the host's own flags); read with
            :meth:`option` (during a run: ``active_options().option(name)``).
    """

    weight_update: str = "optima"
    solver: str = "pcg"
    damp: float = 0.01
    tol: Optional[float] = None
    max_iter: Optional[int] = None
    double_precision: bool = False
    hessian_shrink: "float | str" = "auto"
    mask_selector: Optional[str] = None
    host_data: Optional[str] = None
    host_seqlen: Optional[int] = None
    host_dtype: Optional[str] = None
    no_shim: tuple = ()
    calibration: Optional[str] = None
    nsamples: int = 128
    seqlen: Optional[int] = None
    seed: int = 0
    device: str = "auto"
    report: Optional[str] = None
    reconstruct: str = "none"
    plugin_options: dict = field(default_factory=dict)

    def option(self, name: str) -> Any:
        """The value of the plugin-declared option ``name`` (its default when not set);
        ``LookupError`` when no plugin declares it."""
        if name in self.plugin_options:
            return self.plugin_options[name]
        declared = collect_options(builtin=False).options
        if name not in declared:
            raise LookupError(f"no plugin declares the option {name!r} (declared: "
                              f"{', '.join(sorted(declared)) or 'none'})")
        return declared[name].default

    def validate(self) -> "HostOptions":
        """The options checked (``ValueError`` naming the flag for a bad value) and resolved, as a new
        :class:`HostOptions`.

        The options the host shares with ``optima-prune`` (``--weight_update``, ``--solver``, ``--damp``,
        ``--tol``, ``--max_iter``, ``--hessian_shrink``, ``--device``, the third-party plugins' options) go
        through :func:`optima_plugin.validate.resolve`, the one entry every run's options pass, so they follow
        the same rules and every plugin's ``optima_validate`` sees them; the host's own flags are checked here.
        """
        if self.reconstruct != "none":
            raise ValueError(f"--reconstruct {self.reconstruct} is not available in optima-host: the host's loop "
                             "hands the plugin one linear at a time and never the dense model's block outputs it "
                             "matches; run optima-prune --reconstruct instead")
        if not isinstance(self.damp, (int, float)) or isinstance(self.damp, bool):
            raise ValueError(f"--damp must be a number for optima-host (auto needs optima-prune's held-out "
                             f"calibration windows), got {self.damp!r}")
        shared = resolve(weight_update=self.weight_update, solver=self.solver, damp=self.damp, tol=self.tol,
                         max_iter=self.max_iter, double_precision=self.double_precision,
                         hessian_shrink=self.hessian_shrink, device=self.device, **self.plugin_options)
        for kind, name, flag in (("selectors", self.mask_selector, "--mask_selector"),):
            known = registry(kind)
            if name is not None and name not in known:
                raise ValueError(f"unknown {flag} {name!r}; known: {', '.join(sorted(known))}")
        if self.mask_selector is not None and hasattr(registry("selectors")[self.mask_selector], "prepare"):
            raise ValueError(f"--mask_selector {self.mask_selector} needs a whole run's setup (e.g. its mask file "
                             f"matched to the model), which a host's loop does not give it; run optima-prune "
                             f"--prune_method {self.mask_selector} instead")
        if self.mask_selector is not None and hasattr(registry("selectors")[self.mask_selector], "prepare_block"):
            raise ValueError(f"--mask_selector {self.mask_selector} needs each decoder block's own pass before its "
                             f"linears are pruned, which a host's loop does not give it; run optima-prune "
                             f"--prune_method {self.mask_selector} instead")
        unknown = sorted(set(self.no_shim) - set(SHIMS))
        if unknown:
            raise ValueError(f"unknown --no_shim {', '.join(unknown)}; known: {', '.join(SHIMS)}")
        if self.host_data is not None and self.host_data not in BUILTIN_TEXTS:
            _check_host_data(Path(self.host_data))
        if self.host_dtype is not None and self.host_dtype not in DTYPES:
            raise ValueError(f"--host_dtype must be one of {', '.join(DTYPES)}, got {self.host_dtype!r}")
        for name in ("host_seqlen", "seqlen"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be at least 1, got {value}")
        if self.nsamples < 1:
            raise ValueError(f"--optima_nsamples must be at least 1, got {self.nsamples}")
        if self.report is not None:
            check_output_file(self.report, "--optima_report")
            texts = [(flag, path) for flag, path in (("--host_data", self.host_data),
                                                     ("--optima_calibration", self.calibration))
                     if path and path not in BUILTIN and Path(path).exists()]
            check_distinct([("--optima_report", self.report)], texts)
        return dataclasses.replace(self, hessian_shrink=shared.hessian_shrink,
                                   plugin_options=collect_options(builtin=False).resolve(self.plugin_options))

    @property
    def updates(self) -> bool:
        """Whether an updater answers the host's masks (``none`` and ``native`` keep the host's own weights)."""
        return self.weight_update not in HOST_WEIGHTS

    @property
    def active(self) -> bool:
        """Whether the seam has anything to do (an update or a replacement selector)."""
        return self.updates or self.mask_selector is not None


def _check_host_data(path: Path) -> None:
    """``ValueError`` unless ``path`` is a text file, or a folder holding one (suffixes only: cheap)."""
    flag = f"--host_data {path}"
    if not path.exists():
        raise ValueError(f"{flag}: neither {' nor '.join(BUILTIN_TEXTS)} nor an existing file or folder")
    wanted = ", ".join(TEXT_SUFFIXES)
    if path.is_dir():
        if not any(p.is_file() and p.suffix in TEXT_SUFFIXES for p in path.rglob("*")):
            raise ValueError(f"{flag}: the folder holds no text files ({wanted}); point it at a folder of text, "
                             "or use 'pydoc'")
    elif path.suffix not in TEXT_SUFFIXES:
        raise ValueError(f"{flag}: expected a text file ({wanted}), got {path.suffix or 'no suffix'}")


class Installation:
    """What :func:`install` changed in the process; :meth:`uninstall` undoes it."""

    def __init__(self, options: HostOptions) -> None:
        self.options = options
        self.calls = CallDepth()
        self.plugin: Optional[OptimaMaskPlugin] = None
        self.seam: Optional[HostSeam] = None
        self._undo: list[Callable[[], None]] = []
        self._handles: list = []

    def attach(self, model: nn.Module) -> None:
        """Hook a model the host built itself (models from ``from_pretrained`` are attached on load)."""
        try:
            adapter = get_adapter(model)
        except ValueError as err:
            log.warning("optima-host leaves %s alone: %s", type(model).__name__, err)
            return
        tops = [model] if adapter.base is model else [model, adapter.base]
        self._handles += self.calls.attach(tops)
        if "position_embeddings" not in self.options.no_shim:
            self._handles += add_position_embeddings(adapter)
        if "tuple_outputs" not in self.options.no_shim:
            self._handles += tuple_outputs(adapter, self.calls)
        if self.seam is not None:
            self.seam.attach(model)

    def finish(self, error: Optional[BaseException] = None) -> dict:
        """The seam's report (also written to ``--optima_report``); empty without a seam.

        ``error``: what ended the host early (its exception, or a ``SystemExit`` with a non-zero
        code); the report then says ``"completed": false`` and names it.
        """
        return self.seam.finish(error) if self.seam is not None else {}

    def uninstall(self) -> None:
        """Undo every patch and remove every hook (reverse order).

        Every step is undone even if one fails; the first failure is raised afterwards.
        """
        global _active
        errors: list[BaseException] = []

        def attempt(step: Callable[[], None]) -> None:
            try:
                step()
            except Exception as err:  # keep undoing the rest
                log.error("optima-host: undoing a patch failed: %s: %s", type(err).__name__, err)
                errors.append(err)

        for h in self._handles:
            attempt(h.remove)
        self._handles.clear()
        if self.seam is not None:
            attempt(self.seam.detach)
        while self._undo:
            attempt(self._undo.pop())
        if _active is self:
            _active = None
        if errors:
            raise errors[0]

    def __enter__(self) -> "Installation":
        return self

    def __exit__(self, *exc) -> None:
        self.uninstall()


def active_seam() -> Optional[HostSeam]:
    """The seam of the current installation, or None."""
    return _active.seam if _active is not None else None


def active_options() -> Optional[HostOptions]:
    """The options of the current installation (a plugin reads its own with ``.option(name)``), or None."""
    return _active.options if _active is not None else None


def install(options: Optional[HostOptions] = None, **overrides) -> Installation:
    """Install the plugin into this process; return the :class:`Installation`.

    ``options`` (or :class:`HostOptions` fields as keywords) say what to do:
    register the plugin answering ``optima_mask_emitted``, put in the shims, route
    the hub datasets, and watch every model loaded with ``from_pretrained`` through
    the seam. Only one installation is active at a time. Options are validated before
    anything is patched; if a step fails, every step already done is undone (reverse
    order) and the error is re-raised, leaving the process as it was.
    """
    global _active
    if _active is not None:
        raise RuntimeError("optima_plugin.host is already installed in this process; uninstall() it first")
    from ..distributed import launched

    if launched():  # the host's own loop is one process: every rank would redo the whole job
        raise ValueError("the host seam does not run under torchrun (WORLD_SIZE > 1): the hosts prune in one "
                         "process; run the host without torchrun, or prune on many ranks with "
                         "`torchrun ... -m optima_plugin.cli`")
    options = dataclasses.replace(options or HostOptions(), **overrides).validate()
    inst = Installation(options)
    try:
        _install_steps(inst)
    except BaseException:
        try:  # transactional: undo every step already done, then re-raise the failure
            inst.uninstall()
        except Exception:
            log.exception("optima-host: could not undo every patch after a failed install")
        raise
    _active = inst
    return inst


def _install_steps(inst: Installation) -> None:
    """Each step of :func:`install`; each change is recorded in ``inst`` (its undo) as soon as it is made."""
    options = inst.options
    pm = get_plugin_manager()
    if options.updates:
        inst.plugin = OptimaMaskPlugin(options.weight_update, UpdateOptions(
            options.solver, options.damp, options.tol, options.max_iter, options.double_precision))
        pm.register(inst.plugin, name="optima-host")
        plugin = inst.plugin
        inst._undo.append(lambda: pm.unregister(plugin))
    if options.active:
        inst.seam = HostSeam(SeamSettings(
            hessian_dtype=torch.float64 if options.double_precision else torch.float32,
            mask_selector=options.mask_selector, calibration=options.calibration or options.host_data or "c4",
            nsamples=options.nsamples, seqlen=options.seqlen, seed=options.seed, device=options.device,
            report=options.report, hessian_shrink=options.hessian_shrink), inst.calls, stats_source=inst.plugin)
        inst._undo.append(_flush_before_save(inst.seam))
    cpu_only = "cuda_on_cpu" not in options.no_shim and not torch.cuda.is_available()
    load = LoadOptions(cpu_only=cpu_only, dtype=DTYPES.get(options.host_dtype),
                       seqlen=options.host_seqlen, device_map="hf_device_map" not in options.no_shim,
                       loaded=[inst.attach])
    inst._undo.append(patch_from_pretrained(load))
    if cpu_only:
        mode = CudaOnCpu()
        mode.__enter__()
        inst._undo.append(lambda: leave_mode(mode))  # not __exit__: that pops whatever mode is on top
        inst._undo.append(quiet_cuda_calls())
        log.info("optima-host: no CUDA GPU; the host's CUDA device runs on the CPU")
    if "removed_imports" not in options.no_shim:
        inst._undo.append(removed_imports())
    if options.host_data:
        from .data import route_hub_datasets

        inst._undo.append(route_hub_datasets(options.host_data))


def _flush_before_save(seam: HostSeam) -> Callable[[], None]:
    """Make ``PreTrainedModel.save_pretrained`` handle pending masks first; return the undo function."""
    from transformers import PreTrainedModel

    original = PreTrainedModel.save_pretrained

    @functools.wraps(original)
    def save_pretrained(self, *args, **kwargs):
        seam.flush()
        return original(self, *args, **kwargs)

    PreTrainedModel.save_pretrained = save_pretrained

    def undo() -> None:
        PreTrainedModel.save_pretrained = original

    return undo
