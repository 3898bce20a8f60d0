"""Why does the exact update lose on another domain? Per-layer evidence on SmolLM2-135M.

Prunes SmolLM2 (``--prune_method`` at ``--sparsity_type``/``--sparsity_ratio``, calibrated on 32 x 512
windows of ``--calibration_dataset``), then runs the pruned model over three token sets with a forward
hook on every linear, accumulating its input Hessian on each: the calibration windows themselves,
the held-out end of the calibration text, and the held-out end of the other domain. Per linear it
re-solves the layer (mask of the run kept) from the calibration Hessian for every ``--damps`` value
(``--sinks keep,exclude``: also without the first position of each window, the "attention sink"),
and with ``H + s·diag(H)`` (``--diag_shrink``: correlations shrunk towards the diagonal), and
prints, per block and in total, the layer objective of each solution relative to the mask alone
(``Σ (ŵ-w)ᵀ H (ŵ-w) / Σ (w∘keep-w)ᵀ H (w∘keep-w)``, below 1 = the update helps) measured on each
token set, plus the share of ``trace H`` held by the first position::

    OMP_NUM_THREADS=1 python benchmarks/transfer_diagnosis.py --json /tmp/diagnosis.json

The layer-local objective is measured on the pruned model's own inputs (the sequential pipeline's),
so it is what the update optimises, evaluated on text it was not fitted to.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import torch

from optima_plugin import prune
from optima_plugin.data import get_calibration, get_eval_tokens
from optima_plugin.engine import blocks_path, prunable_linears
from optima_plugin.loading import default_model, load_model
from optima_plugin.models import get_adapter
from optima_plugin.solvers import reconstruct
from optima_plugin.solvers.problem import objective_per_row


class Stats:
    """Per linear: ``H`` over all tokens and over the tokens after the first position of each window."""

    def __init__(self) -> None:
        self.all = self.rest = None
        self.n_all = self.n_rest = 0
        self.first_trace = 0.0
        self.total_trace = 0.0

    def hook(self, module, inputs, output) -> None:
        x = inputs[0].detach().float()  # (batch, seqlen, d)
        flat, rest = x.reshape(-1, x.shape[-1]), x[:, 1:].reshape(-1, x.shape[-1])
        if self.all is None:
            d = x.shape[-1]
            self.all, self.rest = torch.zeros(d, d), torch.zeros(d, d)
        self.all += flat.T @ flat
        self.rest += rest.T @ rest
        self.n_all += flat.shape[0]
        self.n_rest += rest.shape[0]
        self.first_trace += float((x[:, 0] ** 2).sum())
        self.total_trace += float((x ** 2).sum())

    def hessian(self, sink: str) -> torch.Tensor:
        return self.all / self.n_all if sink == "keep" else self.rest / self.n_rest


def collect(model, linears: dict, windows: torch.Tensor) -> dict:
    """``{name: Stats}`` over ``windows`` (``(n, seqlen)``), one window per forward."""
    stats = {name: Stats() for name in linears}
    handles = [lin.register_forward_hook(stats[name].hook) for name, lin in linears.items()]
    try:
        with torch.no_grad():
            for w in windows:
                model(w.unsqueeze(0))
    finally:
        for h in handles:
            h.remove()
    return stats


def eval_windows(tokens: torch.Tensor, seqlen: int, count: int) -> torch.Tensor:
    n = min(count, tokens.shape[1] // seqlen)
    return tokens[0, : n * seqlen].reshape(n, seqlen)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prune_method", default="wanda")
    ap.add_argument("--sparsity_type", default="unstructured")
    ap.add_argument("--sparsity_ratio", type=float, default=0.5)
    ap.add_argument("--calibration_dataset", default="pydoc")
    ap.add_argument("--other", default="sherlock", help="the other domain (pydoc, sherlock or a local text path)")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval_windows", type=int, default=16, help="held-out windows per domain (16)")
    ap.add_argument("--damps", default="0.1,1", help="relative damps to re-solve with besides the run's (0.1,1)")
    ap.add_argument("--sinks", default="keep", help="keep and/or exclude the first position from H (keep)")
    ap.add_argument("--diag_shrink", default="0.1",
                    help="also re-solve with H + s·diag(H) (correlations shrunk towards the diagonal) (0.1)")
    ap.add_argument("--json", help="write every per-layer figure here")
    args = ap.parse_args(argv)
    damps = [float(x) for x in args.damps.split(",") if x]
    shrinks = [float(x) for x in args.diag_shrink.split(",") if x]

    directory, gguf = default_model()
    model, tok = load_model(directory, gguf_file=gguf)
    dense = {name: lin.weight.detach().clone()
             for name, lin in prunable_linears(get_adapter(model), False).items()}
    t0 = time.perf_counter()
    report = prune(model, tok, prune_method=args.prune_method, sparsity_ratio=args.sparsity_ratio,
                   sparsity_type=args.sparsity_type, weight_update="optima", nsamples=args.nsamples,
                   seqlen=args.seqlen, calibration_dataset=args.calibration_dataset, device="cpu",
                   hessian_shrink=0.0)  # the exact fit whose transfer is diagnosed
    print(f"pruned in {time.perf_counter() - t0:.0f} s (mean calibration error ratio "
          f"{report['summary']['mean_error_ratio']:.4f})", flush=True)
    adapter = get_adapter(model)
    linears = prunable_linears(adapter, False)
    prefix = blocks_path(adapter)
    sets = {
        "calibration": get_calibration(args.calibration_dataset, tok, args.nsamples, args.seqlen, 0),
        "held-out": eval_windows(get_eval_tokens(args.calibration_dataset, tok), args.seqlen, args.eval_windows),
        "other": eval_windows(get_eval_tokens(args.other, tok), args.seqlen, args.eval_windows),
    }
    stats = {}
    for key, windows in sets.items():
        t = time.perf_counter()
        stats[key] = collect(model, linears, windows)
        print(f"statistics on {key} ({windows.shape[0]} windows): {time.perf_counter() - t:.0f} s", flush=True)

    variants = [(sink, damp) for sink in args.sinks.split(",") for damp in damps]
    rows = []
    for name, lin in linears.items():
        w = dense[name]
        pruned = lin.weight.detach() == 0
        mask_only = w.masked_fill(pruned, 0)
        row = {"name": name, "block": int(name[len(prefix) + 1:].split(".")[0]),
               "first_position_trace_share": {k: s[name].first_trace / s[name].total_trace for k, s in stats.items()}}

        def ratio(new: torch.Tensor, key: str) -> float:
            h = stats[key][name].hessian("keep")
            return float(objective_per_row(h, new - w).sum() / objective_per_row(h, mask_only - w).sum())

        row["run"] = {key: ratio(lin.weight.detach(), key) for key in sets}
        for sink, damp in variants:
            sol = reconstruct(w, pruned, stats["calibration"][name].hessian(sink), solver="pcg", damp=damp).weight
            row[f"{sink}@{damp:g}"] = {key: ratio(sol, key) for key in sets}
        for shrink in shrinks:
            h = stats["calibration"][name].hessian("keep")
            sol = reconstruct(w, pruned, h + shrink * torch.diag(h.diagonal()), solver="pcg", damp=0.01).weight
            row[f"diag+{shrink:g}"] = {key: ratio(sol, key) for key in sets}
        rows.append(row)
        print(name, json.dumps({k: v for k, v in row.items() if k not in ("name", "block")}), flush=True)

    print("\nmean over layers of objective(update) / objective(mask only) (below 1: the update helps)")
    cols = ["run"] + [f"{s}@{d:g}" for s, d in variants] + [f"diag+{x:g}" for x in shrinks]
    print("| solution | " + " | ".join(sets) + " | layers worse than mask on other |")
    print("|---" * (len(sets) + 2) + "|")
    for c in cols:
        means = [sum(r[c][k] for r in rows) / len(rows) for k in sets]
        worse = sum(r[c]["other"] > 1 for r in rows)
        print(f"| {c} | " + " | ".join(f"{m:.3f}" for m in means) + f" | {worse} of {len(rows)} |")
    by_kind = defaultdict(list)
    for r in rows:
        by_kind[r["name"].split(".")[-1]].append(r)
    print("\nper projection, the run's solution (calibration / held-out / other) and first-position trace share")
    for kind, rs in by_kind.items():
        m = [sum(r["run"][k] for r in rs) / len(rs) for k in sets]
        share = max(r["first_position_trace_share"]["calibration"] for r in rs)
        print(f"{kind:10s} " + " / ".join(f"{x:.3f}" for x in m) + f"   max first-position share {share:.3f}")
    print("\nper block, the run's solution on the other domain (objective ratio) and the worst projection")
    for b in sorted({r["block"] for r in rows}):
        rs = [r for r in rows if r["block"] == b]
        worst = max(rs, key=lambda r: r["run"]["other"])
        print(f"block {b:2d}: mean {sum(r['run']['other'] for r in rs) / len(rs):.3f}, worst "
              f"{worst['name'].split('.')[-1]} {worst['run']['other']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "layers": rows}, f, indent=1)


if __name__ == "__main__":
    main()
