"""The hook specifications of optima_plugin (pluggy project name ``optima``).

Two kinds of hooks:

* registries: plugins contribute named mask selectors, sparsity allocators,
  weight updaters and quantizers; the engine looks them up by name;
* events: the engine (or a host's pruning loop) announces what it does, and
  observers (progress bar, report, host integration) react.

A plugin implements only the hooks it needs, pytest-style::

    from optima_plugin import hookimpl

    class MySelectorPlugin:
        @hookimpl
        def optima_selectors(self):
            return [MySelector()]

and registers itself through the ``optima_plugin`` entry-point group; the entry point
must name a module or an instance (a class is instantiated, for compatibility).
A plugin declares its own flags with ``optima_addoption`` (see :mod:`optima_plugin.options`).
"""

from __future__ import annotations

from typing import Any, Optional

import pluggy
from torch import Tensor, nn

from .options import OptionParser

PROJECT = "optima"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# -- options ------------------------------------------------------------------


@hookspec
def optima_addoption(parser: OptionParser) -> None:
    """Declare the plugin's options on ``parser`` (an :class:`~optima_plugin.options.OptionParser`),
    in a group named after the plugin: ``parser.getgroup("owl").addoption("Lamda", type=float, ...)``.

    The options become flags of ``optima-prune`` and ``optima-host`` and keywords of the Python
    API; their values are validated once, before any work, and read with ``config.option(name)``.
    """


@hookspec
def optima_validate(config: Any) -> Optional[dict]:
    """Check the plugin's options in ``config`` (a :class:`~optima_plugin.config.PruneConfig`, frozen) before
    any work: raise ``ValueError`` with a one-line, flag-named message for a bad value or combination.

    Return ``{field: value}`` of derived values (applied with :func:`dataclasses.replace`; the
    implementations after see them), or None. Called once per run, by :func:`optima_plugin.validate.resolve`.
    """


# -- registries ---------------------------------------------------------------


@hookspec
def optima_selectors() -> list:
    """Return mask selectors (objects with ``name``, ``needs_hessian``, ``select``)."""


@hookspec
def optima_allocators() -> list:
    """Return sparsity allocators (objects with ``name`` and ``layer_ratios``)."""


@hookspec
def optima_row_allocators() -> list:
    """Return row allocators (objects with ``name`` and ``row_ratios``; ``--use_trim`` uses ``trim``)."""


@hookspec
def optima_updaters() -> list:
    """Return weight updaters (objects with ``name`` and ``update``)."""


@hookspec
def optima_quantizers() -> list:
    """Return quantizers (objects with ``name``, ``needs_hessian`` and ``quantize``; see :mod:`optima_plugin.quantizers`)."""


# -- events -------------------------------------------------------------------


@hookspec
def optima_run_started(config: Any, num_blocks: int) -> None:
    """Pruning of a model starts; ``config`` is the run's :class:`PruneConfig`."""


@hookspec
def optima_block_started(index: int, num_blocks: int) -> None:
    """Decoder block ``index`` is about to be pruned."""


@hookspec
def optima_layer_done(result: Any) -> None:
    """One linear layer was pruned and updated; ``result`` is a :class:`LayerResult`."""


@hookspec
def optima_block_done(index: int, num_blocks: int, seconds: float) -> None:
    """Decoder block ``index`` is pruned and its outputs recomputed."""


@hookspec
def optima_run_done(report: dict) -> None:
    """Pruning finished; ``report`` is the JSON-ready run report."""


# -- host side ----------------------------------------------------------------


@hookspec(firstresult=True)
def optima_mask_emitted(
    name: str, module: nn.Module, pruned: Tensor, hessian: Optional[Tensor], dense_weight: Tensor
) -> Optional[Tensor]:
    """A host's mask generator has applied ``pruned`` (bool ``r x d``, True = pruned) to
    ``module.weight``. An implementation may return replacement weights (same shape,
    pruned entries 0) computed from ``dense_weight`` and the layer's input Hessian
    (``d x d`` mean of ``x xᵀ``); the first non-None answer is written to the module."""
