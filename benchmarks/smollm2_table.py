"""Perplexity table on SmolLM2-135M: every selector, with its own update and with OPTIMA.

Calibration: 32 windows of 512 tokens from the first 80% of the pydoc text;
evaluation: the held-out last 20% in 512-token windows. Prints one row per
(pattern, selector, update) with perplexity, mean layer error_ratio, prune time
and peak memory, plus the time and memory of ``wanda + optima`` as a ratio to
``wanda + none`` from the same run.

    python benchmarks/smollm2_table.py                                  # full table (~1 h on 2 cores: run patterns in parallel, one thread each)
    python benchmarks/smollm2_table.py --patterns unstructured --methods wanda --json out.json
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patterns", nargs="*", default=list(PATTERNS))
    ap.add_argument("--methods", nargs="*", default=METHODS)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval_max_windows", type=int, default=None)
    ap.add_argument("--json", help="write the rows as JSON to this file (rewritten after every row)")
    args = ap.parse_args(argv)

    directory, gguf = default_model()
    dense, tok = load_model(directory, gguf_file=gguf)
    dense_ppl = eval_ppl(dense, tok, "pydoc", args.seqlen, max_windows=args.eval_max_windows, progress=False)
    print(f"dense perplexity (pydoc held-out): {dense_ppl:.3f}", flush=True)
    print(f"{'pattern':8} {'method':10} {'update':7} {'ppl':>9} {'err_ratio':>9} {'prune s':>8} {'peak MB':>8}")
    rows = []
    for pat in args.patterns:
        sparsity_type, ratio = PATTERNS[pat]
        for method in args.methods:
            for update in ("none" if method in ("magnitude", "wanda") else "native", "optima"):
                model = copy.deepcopy(dense)
                report = prune(model, tok, prune_method=method, sparsity_ratio=ratio, sparsity_type=sparsity_type,
                               weight_update=update, nsamples=args.nsamples, seqlen=args.seqlen, progress=False)
                ppl = eval_ppl(model, tok, "pydoc", args.seqlen, max_windows=args.eval_max_windows, progress=False)
                errs = [x["error_ratio"] for x in report["layers"]]
                row = dict(pattern=pat, method=method, update=update, ppl=ppl, error_ratio=sum(errs) / len(errs),
                           prune_seconds=report["timings"]["total_prune_seconds"],
                           peak_rss_increase_mb=report["memory"]["rss_increase_mb"])
                rows.append(row)
                print(f"{pat:8} {method:10} {update:7} {ppl:9.3f} {row['error_ratio']:9.4f} "
                      f"{row['prune_seconds']:8.1f} {row['peak_rss_increase_mb']:8.0f}", flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps(dict(dense_ppl=dense_ppl, rows=rows), indent=1))
                del model
    for pat in args.patterns:
        base = next((r for r in rows if r["pattern"] == pat and r["method"] == "wanda" and r["update"] == "none"), None)
        opt = next((r for r in rows if r["pattern"] == pat and r["method"] == "wanda" and r["update"] == "optima"), None)
        if base and opt:
            print(f"{pat}: wanda+optima / wanda+none: time x{opt['prune_seconds'] / base['prune_seconds']:.2f}, "
                  f"peak memory increase x{opt['peak_rss_increase_mb'] / max(base['peak_rss_increase_mb'], 1):.2f}, "
                  f"ppl {opt['ppl']:.2f} vs {base['ppl']:.2f}")


if __name__ == "__main__":
    main()
