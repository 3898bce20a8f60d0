"""Perplexity table on SmolLM2-135M for the sparsity allocations, with and without OPTIMA.

Calibration: 32 windows of 512 tokens from the first 80% of ``--calibration_dataset``
(``pydoc`` by default); evaluation, side by side: the held-out last 20% of the
calibration text and of every other ``--eval`` dataset (default ``pydoc,sherlock``),
in 512-token windows. Wanda masks, unstructured, at 60% and 70%: uniform, OWL,
AlphaPruning, TRIM and OWL+TRIM layer/row ratios, each with ``--weight_update none``
and ``optima``. Prints one row per run (perplexity on each dataset, realised sparsity,
layer-ratio range, mean TRIM row std, mean error_ratio, allocation and prune seconds)
and the dense perplexities once.

    python benchmarks/allocation_table.py --json out.json           # full table (~1.5 h on 2 cores)
    python benchmarks/allocation_table.py --ratios 0.7 --allocations uniform trim --updates none
    python benchmarks/allocation_table.py --calibration_dataset sherlock
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


def _row(report: dict, datasets: list) -> dict:
    layers = report["layers"]
    ratios = [x["ratio"] for x in layers]
    errs = [x["error_ratio"] for x in layers if x["error_ratio"] is not None]
    stds = [x["rows"]["std"] for x in layers if x.get("rows")]
    return dict(
        ppl={ds: report["ppl"]["pruned"][ds] for ds in datasets}, sparsity=report["sparsity"],
        ratio_min=min(ratios), ratio_max=max(ratios),
        row_std=sum(stds) / len(stds) if stds else 0.0,
        error_ratio=sum(errs) / len(errs) if errs else None,
        allocation_seconds=report["timings"]["allocation_seconds"],
        prune_seconds=report["timings"]["total_prune_seconds"],
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hessian_shrink", type=float, default=0.0, help="--hessian_shrink of the OPTIMA rows "
                    "(0: as the table in docs/ was measured; the package's default is 0.3)")
    ap.add_argument("--ratios", nargs="*", type=float, default=[0.6, 0.7])
    ap.add_argument("--allocations", nargs="*", default=list(ALLOCATIONS), choices=list(ALLOCATIONS))
    ap.add_argument("--updates", nargs="*", default=["none", "optima"])
    ap.add_argument("--method", default="wanda")
    ap.add_argument("--calibration_dataset", default="pydoc", help="pydoc, sherlock or a local text path (pydoc)")
    ap.add_argument("--eval", default="pydoc,sherlock",
                    help="comma-separated perplexity datasets besides the calibration one (pydoc,sherlock)")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval_max_windows", type=int, default=None)
    ap.add_argument("--json", help="write the rows as JSON to this file (rewritten after every row)")
    args = ap.parse_args(argv)
    datasets = list(dict.fromkeys([args.calibration_dataset] + [s for s in args.eval.split(",") if s]))

    directory, gguf = default_model()
    dense, tok = load_model(directory, gguf_file=gguf)
    dense_ppl = {ds: eval_ppl(dense, tok, ds, args.seqlen, max_windows=args.eval_max_windows, progress=False)
                 for ds in datasets}
    print(f"calibration: {args.nsamples} x {args.seqlen} tokens of {args.calibration_dataset}; perplexity on the "
          f"held-out last 20% of " + ", ".join(datasets), flush=True)
    print("dense perplexity: " + ", ".join(f"{ds} {v:.3f}" for ds, v in dense_ppl.items()), flush=True)
    cols = " ".join(f"{'ppl ' + ds[:10]:>14}" for ds in datasets)
    print(f"{'ratio':>5} {'allocation':13} {'update':7} {cols} {'sparsity':>8} {'layer ratios':>13} "
          f"{'row std':>7} {'err_ratio':>9} {'alloc s':>7} {'prune s':>8}", flush=True)
    meta = dict(calibration_dataset=args.calibration_dataset, nsamples=args.nsamples, seqlen=args.seqlen,
                eval_max_windows=args.eval_max_windows, datasets=datasets)
    rows = []
    for ratio in args.ratios:
        for alloc in args.allocations:
            for update in args.updates:
                model = copy.deepcopy(dense)
                report = prune(model, tok, prune_method=args.method, sparsity_ratio=ratio, weight_update=update,
                               nsamples=args.nsamples, seqlen=args.seqlen, eval_ppl=datasets,
                               calibration_dataset=args.calibration_dataset, eval_max_windows=args.eval_max_windows,
                               progress=False, hessian_shrink=args.hessian_shrink, **ALLOCATIONS[alloc])
                row = dict(ratio=ratio, allocation=alloc, method=args.method, update=update, **_row(report, datasets))
                rows.append(row)
                err = f"{row['error_ratio']:9.4f}" if row["error_ratio"] is not None else f"{'-':>9}"
                vals = " ".join(f"{row['ppl'][ds]:14.3f}" for ds in datasets)
                print(f"{ratio:5.2f} {alloc:13} {update:7} {vals} {row['sparsity']:8.4f} "
                      f"{row['ratio_min']:6.3f}-{row['ratio_max']:.3f} {row['row_std']:7.4f} {err} "
                      f"{row['allocation_seconds']:7.1f} {row['prune_seconds']:8.1f}", flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps(dict(meta, dense_ppl=dense_ppl, rows=rows), indent=1))
                del model


if __name__ == "__main__":
    main()
