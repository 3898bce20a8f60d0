"""SmolLM2-135M pruned, quantized and given low-rank adapters: perplexity and prune time per stage.

One run: dense; 2:4 Wanda + OPTIMA; then the same with 4-bit weights (absmax, slim, gptq);
then gptq + adapters of rank 0.1 · min(shape), the SLiM reference's (slim) against the exact
one under the layer Hessian (kept separate, so the weights stay 2:4 and 4-bit). Calibration:
``--nsamples`` x ``--seqlen`` tokens of pydoc; perplexity on the held-out last 20% of pydoc
and of the Sherlock Holmes text (another domain). Each row also gives the mean relative
output error ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` over the layers after its last stage.

    OMP_NUM_THREADS=1 python benchmarks/compression_table.py --json compression.json
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

from optima_plugin import eval_ppl, prune
from optima_plugin.loading import default_model, load_model

QUANT = dict(quantize_weight=True, bitwidth=4)
ROWS = [
    ("2:4 wanda + optima", {}),
    ("  + 4-bit absmax", dict(QUANT, quantizer="absmax")),
    ("  + 4-bit slim", dict(QUANT, quantizer="slim")),
    ("  + 4-bit gptq", dict(QUANT, quantizer="gptq")),
    ("  + 4-bit gptq + low-rank 0.1 slim", dict(QUANT, quantizer="gptq", lora_rank=0.1, lowrank="slim",
                                                 separate_lora=True)),
    ("  + 4-bit gptq + low-rank 0.1 exact", dict(QUANT, quantizer="gptq", lora_rank=0.1, lowrank="exact",
                                                  separate_lora=True)),
]


def last_stage_error(report: dict) -> float:
    """Mean over layers of the relative output error after the last stage the row ran."""
    vals = []
    for x in report["layers"]:
        rel = (x.get("compression") or {}).get("relative_error")
        vals.append(list(rel.values())[-1] if rel else None)
    vals = [v for v in vals if v is not None]
    return sum(vals) / len(vals) if vals else float("nan")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hessian_shrink", type=float, default=0.0, help="--hessian_shrink of the OPTIMA rows "
                    "(0: as the table in docs/ was measured; the package's default is 0.3)")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--group_size", type=int, default=64, help="input columns per scale (0: per row)")
    ap.add_argument("--eval", default="pydoc,sherlock")
    ap.add_argument("--eval_max_windows", type=int, default=None)
    ap.add_argument("--json", help="write the rows here (rewritten after each row)")
    args = ap.parse_args(argv)
    datasets = args.eval.split(",")
    directory, gguf = default_model()
    dense, tok = load_model(directory, gguf_file=gguf)

    def ppls(model) -> dict:
        return {ds: eval_ppl(model, tok, ds, args.seqlen, max_windows=args.eval_max_windows, progress=False)
                for ds in datasets}

    out = {"options": vars(args), "rows": []}
    header = " ".join(f"{'ppl ' + ds:>14}" for ds in datasets)
    print(f"calibration {args.nsamples} x {args.seqlen} pydoc tokens; 4-bit groups of {args.group_size or 'a row'}")
    print(f"{'configuration':38} {header} {'rel. error':>10} {'prune s':>8}")
    row = {"name": "dense", "ppl": ppls(dense)}
    out["rows"].append(row)
    print(f"{'dense':38} " + " ".join(f"{row['ppl'][ds]:14.3f}" for ds in datasets), flush=True)
    for name, extra in ROWS:
        model = copy.deepcopy(dense)
        if extra.get("quantize_weight"):
            extra = dict(extra, group_size=args.group_size)
        report = prune(model, tok, prune_method="wanda", sparsity_type="2:4", weight_update="optima",
                       nsamples=args.nsamples, seqlen=args.seqlen, calibration_dataset="pydoc", progress=False,
                       hessian_shrink=args.hessian_shrink, **extra)
        row = {"name": name.strip(), "options": extra, "ppl": ppls(model),
               "relative_error": last_stage_error(report) if extra else None,
               "prune_seconds": report["timings"]["total_prune_seconds"], "sparsity": report["sparsity"]}
        out["rows"].append(row)
        err = f"{row['relative_error']:10.4f}" if row["relative_error"] is not None else f"{'':10}"
        print(f"{name:38} " + " ".join(f"{row['ppl'][ds]:14.3f}" for ds in datasets)
              + f" {err} {row['prune_seconds']:8.1f}", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1))
        del model


if __name__ == "__main__":
    main()
