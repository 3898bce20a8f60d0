"""Perplexity table on SmolLM2-135M: every selector, with its own update and with OPTIMA.

Calibration: 32 windows of 512 tokens from the first 80% of ``--calibration_dataset``
(``pydoc`` by default; ``sherlock`` or a local path); evaluation, side by side: the
held-out last 20% of the calibration text and of every other ``--eval`` dataset
(default ``pydoc,sherlock``: Python's docs and a Sherlock Holmes book, two unlike
domains), in 512-token windows. Prints one row per (pattern, selector, update) with
the perplexity on each dataset, mean layer error_ratio, prune time and peak memory,
plus the time and memory of ``wanda + optima`` as a ratio to ``wanda + none`` from
the same run.

    OMP_NUM_THREADS=1 python benchmarks/smollm2_table.py                # full table (~2 h on one core)
    python benchmarks/smollm2_table.py --patterns 50% --methods wanda --json out.json
    python benchmarks/smollm2_table.py --calibration_dataset sherlock  # calibrated on the other domain
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

from optima_plugin import eval_ppl, prune
from optima_plugin.loading import default_model, load_model

PATTERNS = {"50%": ("unstructured", 0.5), "2:4": ("2:4", 0.5), "70%": ("unstructured", 0.7)}
METHODS = ["magnitude", "wanda", "sparsegpt", "thanos"]


def eval_datasets(calibration: str, extra: str) -> list:
    """The calibration dataset first (its held-out part), then the other evaluation datasets."""
    names = [calibration] + [s for s in extra.split(",") if s]
    return list(dict.fromkeys(names))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hessian_shrink", type=float, default=0.0, help="--hessian_shrink of the OPTIMA rows "
                    "(0: as the table in docs/ was measured; the package's default is 0.3)")
    ap.add_argument("--patterns", nargs="*", default=list(PATTERNS), choices=list(PATTERNS))
    ap.add_argument("--methods", nargs="*", default=METHODS)
    ap.add_argument("--calibration_dataset", default="pydoc", help="pydoc, sherlock or a local text path (pydoc)")
    ap.add_argument("--eval", default="pydoc,sherlock",
                    help="comma-separated perplexity datasets besides the calibration one (pydoc,sherlock)")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval_max_windows", type=int, default=None)
    ap.add_argument("--json", help="write the rows as JSON to this file (rewritten after every row)")
    args = ap.parse_args(argv)
    datasets = eval_datasets(args.calibration_dataset, args.eval)

    def ppls(model) -> dict:
        return {ds: eval_ppl(model, tok, ds, args.seqlen, max_windows=args.eval_max_windows, progress=False)
                for ds in datasets}

    directory, gguf = default_model()
    dense, tok = load_model(directory, gguf_file=gguf)
    dense_ppl = ppls(dense)
    print(f"calibration: {args.nsamples} x {args.seqlen} tokens of {args.calibration_dataset}; perplexity on the "
          f"held-out last 20% of " + ", ".join(datasets), flush=True)
    print("dense perplexity: " + ", ".join(f"{ds} {v:.3f}" for ds, v in dense_ppl.items()), flush=True)
    cols = " ".join(f"{'ppl ' + ds[:10]:>14}" for ds in datasets)
    print(f"{'pattern':8} {'method':10} {'update':7} {cols} {'err_ratio':>9} {'prune s':>8} {'peak MB':>8}")
    rows = []
    meta = dict(calibration_dataset=args.calibration_dataset, nsamples=args.nsamples, seqlen=args.seqlen,
                eval_max_windows=args.eval_max_windows, datasets=datasets)
    for pat in args.patterns:
        sparsity_type, ratio = PATTERNS[pat]
        for method in args.methods:
            for update in ("none" if method in ("magnitude", "wanda") else "native", "optima"):
                model = copy.deepcopy(dense)
                report = prune(model, tok, prune_method=method, sparsity_ratio=ratio, sparsity_type=sparsity_type,
                               weight_update=update, nsamples=args.nsamples, seqlen=args.seqlen,
                               calibration_dataset=args.calibration_dataset, progress=False,
                               hessian_shrink=args.hessian_shrink)
                ppl = ppls(model)
                errs = [x["error_ratio"] for x in report["layers"]]
                row = dict(pattern=pat, method=method, update=update, ppl=ppl, error_ratio=sum(errs) / len(errs),
                           prune_seconds=report["timings"]["total_prune_seconds"],
                           peak_rss_increase_mb=report["memory"]["rss_increase_mb"])
                rows.append(row)
                vals = " ".join(f"{ppl[ds]:14.3f}" for ds in datasets)
                print(f"{pat:8} {method:10} {update:7} {vals} {row['error_ratio']:9.4f} "
                      f"{row['prune_seconds']:8.1f} {row['peak_rss_increase_mb']:8.0f}", flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps(dict(meta, dense_ppl=dense_ppl, rows=rows), indent=1))
                del model
    for pat in args.patterns:
        base = next((r for r in rows if r["pattern"] == pat and r["method"] == "wanda" and r["update"] == "none"), None)
        opt = next((r for r in rows if r["pattern"] == pat and r["method"] == "wanda" and r["update"] == "optima"), None)
        if base and opt:
            print(f"{pat}: wanda+optima / wanda+none: time x{opt['prune_seconds'] / base['prune_seconds']:.2f}, "
                  f"peak memory increase x{opt['peak_rss_increase_mb'] / max(base['peak_rss_increase_mb'], 1):.2f}, "
                  + ", ".join(f"ppl {ds} {opt['ppl'][ds]:.2f} vs {base['ppl'][ds]:.2f}" for ds in datasets))


if __name__ == "__main__":
    main()
