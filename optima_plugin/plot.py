"""Per-layer figures of a pruning report: reconstruction error before/after the update, sparsity.

Everything comes from the report's ``layers`` list, so a saved report can be redrawn::

    python -m optima_plugin.plot report.json layers.png

matplotlib is the ``plot`` extra (``pip install optima_plugin[plot]``); figures are
drawn with the Agg canvas, without pyplot, so no display or global backend is touched.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

from .files import atomic_path

log = logging.getLogger(__name__)


def require_matplotlib():
    """The ``matplotlib`` module, or ``ImportError`` saying how to install it."""
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
    except ImportError as e:
        raise ImportError("--plot needs matplotlib: pip install 'optima_plugin[plot]'") from e
    return matplotlib


def layer_kind(name: str) -> str:
    """``model.layers.3.mlp.down_proj`` → ``mlp.down_proj``."""
    return re.sub(r"^.*?\.\d+\.", "", name)


def _series(layers: list) -> dict:
    """Per layer kind, in first-seen order: lists of block, mask objective, objective, error ratio, sparsity."""
    kinds: dict = {}
    fields = ("block", "mask", "updated", "error_ratio", "sparsity")
    for layer in layers:
        s = kinds.setdefault(layer_kind(layer["name"]), {k: [] for k in fields})
        s["block"].append(layer["block"])
        s["mask"].append(_num(layer.get("mask_objective")))
        s["updated"].append(_num(layer.get("objective")))
        s["error_ratio"].append(_num(layer.get("error_ratio")))
        s["sparsity"].append(layer["sparsity"])
    return kinds


def _num(x) -> float:
    return math.nan if x is None else float(x)


def _title(report: dict) -> str:
    opts = report.get("options", {})
    method = f"{opts.get('prune_method', '?')} + {opts.get('weight_update', '?')}"
    if opts.get("weight_update") == "optima":
        method += f" ({opts.get('solver', '?')})"
    ratios = [x["error_ratio"] for x in report["layers"] if x.get("error_ratio") is not None]
    title = (f"{method}, {opts.get('sparsity_type', '?')} {opts.get('sparsity_ratio', math.nan):.0%}: "
             f"overall sparsity {report.get('sparsity', math.nan):.3f}")
    if ratios:
        title += f", mean error ratio {sum(ratios) / len(ratios):.3f}"
    return title


def plot_report(report: dict, path: str) -> str:
    """Draw ``report``'s per-layer figures (see :func:`report_figure`) into ``path`` (.png, .pdf, .svg).

    Written atomically (parent folders created): an interrupted run leaves no half-written image.
    """
    fig = report_figure(report)
    fmt = Path(path).suffix[1:].lower() or require_matplotlib().rcParams["savefig.format"]
    with atomic_path(path) as tmp:  # a temporary sibling, renamed into place when complete
        fig.savefig(tmp, dpi=110, format=fmt)
    log.info("per-layer plot written to %s", path)
    return path


def report_figure(report: dict):
    """A matplotlib ``Figure`` (Agg canvas) of ``report["layers"]``.

    Three panels over the decoder blocks, one line per layer kind (q/k/v/o, gate/up/down):
    the reconstruction objective ``Σ (ŵ-w)ᵀH(ŵ-w)`` of the mask alone (dashed) and after the
    weight update (solid), on a log scale; their ratio, the error ratio (1 = no compensation);
    and the achieved sparsity with the allocated target (grey).
    """
    layers = report.get("layers") or []
    if not layers:
        raise ValueError("the report has no layers to plot (was anything pruned?)")
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    kinds = _series(layers)
    fig = Figure(figsize=(11, 10.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax_obj, ax_ratio, ax_sp = fig.subplots(3, 1, sharex=True)
    has_objective = any(not math.isnan(v) for s in kinds.values() for v in s["mask"])
    handles = []
    for i, (kind, s) in enumerate(kinds.items()):
        c = f"C{i % 10}"
        if has_objective:
            ax_obj.plot(s["block"], s["mask"], ls="--", lw=1, color=c, alpha=0.7)
            ax_obj.plot(s["block"], s["updated"], ls="-", lw=1.5, marker=".", color=c)
            ax_ratio.plot(s["block"], s["error_ratio"], lw=1.5, marker=".", color=c)
        handles += ax_sp.plot(s["block"], s["sparsity"], lw=1.5, marker=".", color=c, label=kind)
    targets: dict = {}
    for layer in layers:
        targets.setdefault(layer["block"], []).append(layer.get("ratio", math.nan))
    blocks = sorted(targets)
    handles += ax_sp.plot(blocks, [sum(targets[b]) / len(targets[b]) for b in blocks], color="0.5", lw=5,
                          alpha=0.35, zorder=0, label="target sparsity (block mean)")

    if has_objective:
        handles += [Line2D([], [], color="k", ls="--", lw=1, label="mask only"),
                    Line2D([], [], color="k", ls="-", lw=1.5, label="after the update")]
        ax_obj.set_yscale("log")
        ax_obj.set_ylabel("objective Σ (ŵ-w)ᵀH(ŵ-w)")
        ax_obj.set_title("Reconstruction error per layer: mask only (dashed) and after the weight update (solid)")
        ax_ratio.axhline(1.0, color="k", lw=1, ls=":")
        ax_ratio.text(0.005, 1.0, " mask only = 1", transform=ax_ratio.get_yaxis_transform(), va="bottom",
                      fontsize=8)
        ax_ratio.set_ylim(0, 1.1)
        ax_ratio.set_ylabel("error ratio (after / mask only)")
        ax_ratio.set_title("Error ratio: the fraction of the mask's reconstruction error left after the update")
    else:
        for ax in (ax_obj, ax_ratio):
            ax.text(0.5, 0.5, "no reconstruction objective in this report\n(the selector and update used no Hessian)",
                    ha="center", va="center", transform=ax.transAxes)
            ax.set_yticks([])
    ax_sp.set_ylim(0, 1)
    ax_sp.set_ylabel("sparsity")
    ax_sp.set_xlabel("decoder block")
    ax_sp.set_title("Sparsity per layer (zero fraction of its weight)")
    ax_sp.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (ax_obj, ax_ratio, ax_sp):
        ax.grid(True, alpha=0.3)
    fig.legend(handles=handles, loc="outside lower center", ncol=5, fontsize=8)
    fig.suptitle(_title(report))
    return fig


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m optima_plugin.plot",
                                description="Redraw the per-layer figures of an optima-prune --report JSON.")
    p.add_argument("report", help="report JSON written by optima-prune --report")
    p.add_argument("out", help="image file (.png, .pdf or .svg)")
    args = p.parse_args(argv)
    try:
        report = json.loads(Path(args.report).read_text())
        plot_report(report, args.out)
    except KeyError as e:
        print(f"optima_plugin.plot: error: {args.report} is not an optima-prune report (no {e} in a layer)",
              file=sys.stderr)
        return 2
    except (OSError, ValueError, ImportError) as e:
        print(f"optima_plugin.plot: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
