"""``optima-host``: run a host codebase's own ``main.py`` with the OPTIMA plugin installed.

    cd wanda && optima-host main.py --model ... --prune_method wanda --sparsity_ratio 0.5 \\
        --sparsity_type unstructured --save out/ --weight_update optima --solver pcg

The plugin's flags (below) may stand anywhere after the script; they are removed
from ``sys.argv`` before the host parses it. The host script then runs unmodified
as ``__main__`` (``runpy.run_path``) with its own folder first on ``sys.path``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import runpy
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..plugins import add_disable_flag, collect_options, disabled_plugins, get_plugin_manager
from .install import DTYPES, HostOptions, Installation, install
from .shims import SHIMS

log = logging.getLogger("optima_plugin")

USAGE = "optima-host SCRIPT.py [the host's arguments] [plugin options]"


def build_parser() -> argparse.ArgumentParser:
    """The plugin's flags, then one group per plugin with the flags it declares (``optima_addoption``).

    Plugins are those of the process-wide manager: :func:`main` applies ``--disable_plugin``
    before calling this.
    """
    d = HostOptions()
    p = argparse.ArgumentParser(
        prog="optima-host", usage=USAGE, add_help=False, allow_abbrev=False,
        description="Run a pruning host's own script (Wanda, TRIM, OWL, AlphaPruning main.py) with OPTIMA "
        "weight reconstruction for the host's masks. Plugin options:",
    )
    a = p.add_argument
    a("--weight_update", default=d.weight_update,
      help="updater for the host's masks: optima (default), native/none (keep the host's weights), or a plugin's")
    a("--solver", default=d.solver, help="OPTIMA solver: pcg, direct, pdhg, adam (%(default)s)")
    a("--damp", type=float, default=d.damp, help="relative Hessian damping (%(default)s)")
    a("--hessian_shrink", default="auto", help="scale the correlations between inputs (off-diagonal of H) by 1 - "
      "this before the seam uses it (update, objectives, acceptance); auto (default): as optima-prune, from each "
      "mask's sparsity with --weight_update optima, else 0")
    a("--tol", type=float, default=None, help="solver tolerance (solver default if unset)")
    a("--max_iter", type=int, default=None, help="solver iteration cap")
    a("--double_precision", action="store_true", help="Hessians and solves in float64")
    a("--mask_selector", help="a registered mask selector (built-in or an installed plugin's) that replaces the "
      "host's masks, keeping the host's number of pruned weights per row")
    a("--host_data", metavar="pydoc|sherlock|PATH", help="serve the host's C4 / WikiText-2 loaders from local text: "
      "calibration from the first 80%%, evaluation from the last 20%%")
    a("--host_seqlen", type=int, help="pin the host's model.seqlen (its window length) to this")
    a("--host_dtype", choices=sorted(DTYPES), help="load the model in this dtype instead of the host's")
    a("--no_shim", action="append", default=[], choices=SHIMS, help="leave this compatibility shim off (repeatable)")
    a("--optima_calibration", help="calibration for the plugin's own statistics pass, used when the host prunes "
      "without one (magnitude): c4, wikitext2, pydoc or a path (default: --host_data, else c4)")
    a("--optima_nsamples", type=int, default=d.nsamples, help="windows of that pass (%(default)s)")
    a("--optima_seqlen", type=int, help="tokens per window of that pass (default: the host's model.seqlen)")
    a("--optima_seed", type=int, default=d.seed, help="seed of that pass's windows (%(default)s)")
    a("--optima_device", default=d.device, help="where that pass runs: auto, cuda, cpu (%(default)s)")
    a("--optima_report", metavar="FILE", help="write the per-layer results (JSON) to FILE")
    a("--reconstruct", default=d.reconstruct, help="optima-prune's local reconstruction: not available here "
      "(the host's loop gives no dense block outputs); only none")
    a("--optima_quiet", action="store_true", help="no info logs from the plugin")
    add_disable_flag(p)
    collect_options(builtin=False).add_to_argparse(p)
    return p


def split_argv(argv: Sequence[str]) -> tuple[argparse.Namespace, str, list[str]]:
    """``(plugin options, host script, host arguments)`` from the launcher's ``argv``.

    ``ValueError`` when no script comes first among the arguments that are not the plugin's.
    """
    options, rest = build_parser().parse_known_args(list(argv))
    if not rest or rest[0].startswith("-"):
        raise ValueError(f"no host script: usage: {USAGE}")
    return options, rest[0], rest[1:]


def host_options(ns: argparse.Namespace) -> HostOptions:
    """The :class:`HostOptions` of parsed plugin flags."""
    return HostOptions(
        weight_update=ns.weight_update, solver=ns.solver, damp=ns.damp, tol=ns.tol, max_iter=ns.max_iter,
        hessian_shrink=ns.hessian_shrink,
        double_precision=ns.double_precision, mask_selector=ns.mask_selector, host_data=ns.host_data,
        host_seqlen=ns.host_seqlen, host_dtype=ns.host_dtype, no_shim=tuple(ns.no_shim),
        calibration=ns.optima_calibration, nsamples=ns.optima_nsamples, seqlen=ns.optima_seqlen,
        seed=ns.optima_seed, device=ns.optima_device, report=ns.optima_report, reconstruct=ns.reconstruct,
        plugin_options=collect_options(builtin=False).values(ns),
    ).validate()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The ``optima-host`` console script: the host's exit code, 2 (and one line) for bad input.

    Bad input (flags, paths, ``--host_data`` without text) is reported before the host runs;
    an exception of the host itself propagates unchanged.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    get_plugin_manager(disabled=disabled_plugins(argv))  # before any entry point loads
    if not argv or argv[0] in ("-h", "--help"):
        build_parser().print_help()
        return 0
    try:
        ns, script, host_args = split_argv(argv)
        path = Path(script)
        if not path.is_file():
            raise ValueError(f"host script {script} not found (run optima-host from inside the host's checkout)")
        options = host_options(ns)
    except ValueError as err:
        return _bad_input(err)
    with _plugin_logging(logging.WARNING if ns.optima_quiet else logging.INFO):
        try:  # install() undoes its own steps when one fails
            installation = install(options)
        except (ValueError, OSError) as err:  # e.g. --host_data files without usable text
            return _bad_input(err)
        return run_installed(installation, path, host_args)


def _bad_input(err: Exception) -> int:
    message = " ".join(str(err).split()) or type(err).__name__
    print(f"optima-host: error: {message}", file=sys.stderr)
    return 2


def run_script(path: Path, host_args: list[str], options: HostOptions) -> int:
    """Install the plugin, run ``path`` as ``__main__`` with ``host_args``, undo everything; the exit code."""
    return run_installed(install(options), path, host_args)


def run_installed(installation: Installation, path: Path, host_args: list[str]) -> int:
    """Run ``path`` as ``__main__`` with ``host_args`` under ``installation``, then write the report
    and uninstall; the host's exit code.

    An exception of the host propagates unchanged (same object, same traceback); the report then
    says ``"completed": false``. A failure while writing the report or uninstalling is logged and
    does not hide it.
    """
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [str(path)] + host_args
    sys.path.insert(0, str(path.resolve().parent))
    code = 0
    error: Optional[BaseException] = None
    try:
        runpy.run_path(str(path), run_name="__main__")
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        if not isinstance(exit_.code, (int, type(None))):
            print(exit_.code, file=sys.stderr)
        if code != 0:
            error = exit_
    except BaseException as err:
        error = err
        raise
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
        _finish(installation, error)
    return code


def _finish(installation: Installation, error: Optional[BaseException]) -> None:
    """Write the report and uninstall; with a host ``error``, failures here are logged, not raised."""
    try:
        try:
            installation.finish(error)
        finally:
            installation.uninstall()
    except Exception as err:
        if error is None:
            raise
        log.error("optima-host: after the host failed, writing the report or uninstalling failed too: %s: %s",
                  type(err).__name__, err)


@contextlib.contextmanager
def _plugin_logging(level: int):
    """The plugin's log lines on stderr at ``level`` while the host runs (restored afterwards)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    saved = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(saved[0])
        log.propagate = saved[1]


if __name__ == "__main__":
    sys.exit(main())
