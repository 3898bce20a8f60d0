"""Perplexity table on SmolLM2-135M for the sparsity allocations, with and without OPTIMA.

Calibration: 32 windows of 512 tokens from the first 80% of the pydoc text;
evaluation: the held-out last 20% in 512-token windows. Wanda masks,
unstructured, at 60% and 70%: uniform, OWL, AlphaPruning, TRIM and OWL+TRIM
layer/row ratios, each with ``--weight_update none`` and ``optima``. Prints one
row per run (perplexity, realised sparsity, layer-ratio range, mean TRIM row
std, mean error_ratio, allocation and prune seconds) and the dense perplexity once.

    python benchmarks/allocation_table.py --json out.json           # full table (~1.5 h on 2 cores)
    python benchmarks/allocation_table.py --ratios 0.7 --allocations uniform trim --updates none
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

from optima_plugin import eval_ppl, prune
from optima_plugin.loading import default_model, load_model

ALLOCATIONS = {
    "uniform": dict(allocation="uniform"),
    "owl": dict(allocation="owl"),
    "alphapruning": dict(allocation="alphapruning"),
    "trim": dict(allocation="uniform", use_trim=True),
    "owl+trim": dict(allocation="owl", use_trim=True),
}


def _row(report: dict) -> dict:
    layers = report["layers"]
    ratios = [x["ratio"] for x in layers]
    errs = [x["error_ratio"] for x in layers if x["error_ratio"] is not None]
    stds = [x["rows"]["std"] for x in layers if x.get("rows")]
    return dict(
        ppl=report["ppl"]["pruned"]["pydoc"], sparsity=report["sparsity"],
        ratio_min=min(ratios), ratio_max=max(ratios),
        row_std=sum(stds) / len(stds) if stds else 0.0,
        error_ratio=sum(errs) / len(errs) if errs else None,
        allocation_seconds=report["timings"]["allocation_seconds"],
        prune_seconds=report["timings"]["total_prune_seconds"],
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", nargs="*", type=float, default=[0.6, 0.7])
    ap.add_argument("--allocations", nargs="*", default=list(ALLOCATIONS), choices=list(ALLOCATIONS))
    ap.add_argument("--updates", nargs="*", default=["none", "optima"])
    ap.add_argument("--method", default="wanda")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval_max_windows", type=int, default=None)
    ap.add_argument("--json", help="write the rows as JSON to this file (rewritten after every row)")
    args = ap.parse_args(argv)

    directory, gguf = default_model()
    dense, tok = load_model(directory, gguf_file=gguf)
    dense_ppl = eval_ppl(dense, tok, "pydoc", args.seqlen, max_windows=args.eval_max_windows, progress=False)
    print(f"dense perplexity (pydoc held-out): {dense_ppl:.3f}", flush=True)
    print(f"{'ratio':>5} {'allocation':13} {'update':7} {'ppl':>9} {'sparsity':>8} {'layer ratios':>13} "
          f"{'row std':>7} {'err_ratio':>9} {'alloc s':>7} {'prune s':>8}", flush=True)
    rows = []
    for ratio in args.ratios:
        for alloc in args.allocations:
            for update in args.updates:
                model = copy.deepcopy(dense)
                report = prune(model, tok, prune_method=args.method, sparsity_ratio=ratio, weight_update=update,
                               nsamples=args.nsamples, seqlen=args.seqlen, eval_ppl=["pydoc"],
                               eval_max_windows=args.eval_max_windows, progress=False, **ALLOCATIONS[alloc])
                row = dict(ratio=ratio, allocation=alloc, method=args.method, update=update, **_row(report))
                rows.append(row)
                err = f"{row['error_ratio']:9.4f}" if row["error_ratio"] is not None else f"{'-':>9}"
                print(f"{ratio:5.2f} {alloc:13} {update:7} {row['ppl']:9.3f} {row['sparsity']:8.4f} "
                      f"{row['ratio_min']:6.3f}-{row['ratio_max']:.3f} {row['row_std']:7.4f} {err} "
                      f"{row['allocation_seconds']:7.1f} {row['prune_seconds']:8.1f}", flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps(dict(dense_ppl=dense_ppl, rows=rows), indent=1))
                del model


if __name__ == "__main__":
    main()
