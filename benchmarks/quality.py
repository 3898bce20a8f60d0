"""Quality that transfers: SmolLM2-135M perplexity on two domains and prune time, per option.

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

Rows are appended to ``--json`` as they finish; a run given the same ``--json`` again skips the rows
it holds (long runs can be split or resumed). Calibration: ``--nsamples`` x ``--seqlen`` windows
(32 x 512) of the first 80% of the calibration text; evaluation: at most ``--eval_max_windows``
windows of 512 tokens of the held-out last 20% of each text (16 by default; ``0``: all of them)::

    OMP_NUM_THREADS=1 python benchmarks/quality.py --json quality.json
    OMP_NUM_THREADS=1 python benchmarks/quality.py --patterns 50% --methods wanda --calibrations pydoc \\
        --variants own optima damp_auto sink dense swap --json quality.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

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
}
TEXTS = ("pydoc", "sherlock")


def own_update(method: str) -> str:
    return "none" if method in ("magnitude", "wanda") else "native"


def options(variant: str, method: str, calibration: str) -> dict:
    """The prune options of ``variant`` (the selector's own update when it names none)."""
    other = next(t for t in TEXTS if t != calibration) if calibration in TEXTS else "pydoc"
    opts = {"weight_update": own_update(method), "calibration_dataset": calibration}
    for key, value in VARIANTS[variant].items():
        opts[key] = value.format(calibration=calibration, other=other) if isinstance(value, str) else value
    return opts


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calibrations", nargs="*", default=list(TEXTS))
    ap.add_argument("--patterns", nargs="*", default=list(PATTERNS), choices=list(PATTERNS))
    ap.add_argument("--methods", nargs="*", default=["wanda", "sparsegpt"])
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval_max_windows", type=int, default=16)
    ap.add_argument("--json", help="rows are appended here as they finish; rows already there are skipped")
    args = ap.parse_args(argv)
    windows = args.eval_max_windows or None

    directory, gguf = default_model()
    dense, tok = load_model(directory, gguf_file=gguf)

    def ppls(model) -> dict:
        return {t: eval_ppl(model, tok, t, args.seqlen, max_windows=windows, progress=False) for t in TEXTS}

    path = Path(args.json) if args.json else None
    saved = json.loads(path.read_text()) if path is not None and path.exists() else {}
    rows = saved.get("rows", [])
    dense_ppl = saved.get("dense_ppl") or ppls(dense)
    print(f"calibration {args.nsamples} x {args.seqlen}; perplexity on at most {windows or 'all'} windows of "
          f"{args.seqlen} of each text's held-out last 20%; dense: "
          + ", ".join(f"{t} {v:.3f}" for t, v in dense_ppl.items()), flush=True)
    header = f"{'calib':9} {'pattern':7} {'method':10} {'variant':10} {'ppl pydoc':>10} {'ppl sherlock':>12} " \
             f"{'prune s':>8} {'vs own: pydoc':>13} {'sherlock':>9} {'time':>6}"
    print(header, flush=True)

    def show(row: dict) -> None:
        own = next((r for r in rows if r["variant"] == "own" and all(r[k] == row[k] for k in
                                                                      ("calibration", "pattern", "method"))), None)
        rel = (" ".join(f"{row['ppl'][t] / own['ppl'][t]:>{w}.3f}" for t, w in zip(TEXTS, (13, 9)))
               + f" {row['prune_seconds'] / own['prune_seconds']:6.2f}") if own else ""
        print(f"{row['calibration']:9} {row['pattern']:7} {row['method']:10} {row['variant']:10} "
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
                               mean_error_ratio=report["summary"]["mean_error_ratio"])
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
