"""Side-by-side benchmark of every reconstruction solver on one layer at a time.

For each layer it prints, per solver: solve time (``Reconstruction.seconds``,
the solver alone, without the figures every solver shares), iterations, error_ratio, the
relative objective gap to the exact (``direct``) optimum, and the time as a
ratio to SparseGPT's update on the same rows. Layers: synthetic ones with
heavy-tailed correlated activations (d = 1024, 4096) and, unless ``--no-real``,
real SmolLM2-135M layer Hessians from pydoc calibration text.

Slow solvers (``direct``, ``pdhg``) run on a random subset of rows on big
layers (``--subset``); rows are independent, so gaps and time ratios are
measured on the same rows for every solver in that comparison.

    python benchmarks/solvers.py                      # everything (~10 min on 2 cores)
    python benchmarks/solvers.py --sizes 1024 --no-real --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import activation_hessian, random_weight  # noqa: E402

from optima_plugin import reconstruct  # noqa: E402
from optima_plugin.sparsity import row_mask  # noqa: E402

SOLVERS = ["sparsegpt", "pcg", "direct", "pdhg", "adam"]
SUBSET_SOLVERS = {"direct", "pdhg"}


def wanda_mask(weight: torch.Tensor, hessian: torch.Tensor, ratio: float) -> torch.Tensor:
    return row_mask(weight.abs() * hessian.diagonal().clamp_min(0).sqrt(), ratio)


def bench_layer(name, weight, hessian, ratio, solvers, subset):
    """Run every solver on one layer; return rows of results."""
    pruned = wanda_mask(weight, hessian, ratio)
    r = weight.shape[0]
    rows = torch.randperm(r, generator=torch.Generator().manual_seed(0))[: min(subset, r)]
    full, part = {}, {}
    for solver in solvers:
        on_subset = solver in SUBSET_SOLVERS and subset < r
        w, m = (weight[rows], pruned[rows]) if on_subset else (weight, pruned)
        (part if on_subset else full)[solver] = reconstruct(w, m, hessian, solver=solver)
    if part:  # SparseGPT on the same subset rows, for like-for-like time ratios
        part.setdefault("sparsegpt", reconstruct(weight[rows], pruned[rows], hessian, solver="sparsegpt"))

    def subset_objective(res):
        if res.weight.shape[0] == len(rows):
            return res.objective
        d = res.weight[rows].double() - weight[rows].double()
        return float(((d @ hessian.double()) * d).sum())

    exact = part.get("direct") or full.get("direct")
    best = subset_objective(exact) if exact is not None else float("nan")
    results = []
    for solver in solvers:
        res = full.get(solver) or part[solver]
        base = (full if solver in full else part)["sparsegpt"]
        results.append(dict(
            layer=name, shape=list(weight.shape), solver=solver, rows=res.weight.shape[0],
            seconds=res.seconds, iterations=res.iterations, error_ratio=res.error_ratio,
            gap_to_direct=(subset_objective(res) - best) / best, time_vs_sparsegpt=res.seconds / base.seconds,
            converged=res.converged))
    return results


def real_layers(max_layers: int):
    """(name, weight, hessian) for a few SmolLM2-135M linears, Hessians from pydoc text."""
    from optima_plugin.data import get_calibration
    from optima_plugin.loading import default_model, load_model

    directory, gguf = default_model()
    model, tokenizer = load_model(directory, gguf_file=gguf)
    tokens = get_calibration("pydoc", tokenizer, nsamples=32, seqlen=512, seed=0)
    blocks = model.model.layers
    picks = [0, len(blocks) // 2, len(blocks) - 1][:max_layers]
    names = ["self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"]
    sums, counts, hooks = {}, {}, []
    for b in picks:
        for n in names:
            mod = blocks[b].get_submodule(n)
            key = f"layers.{b}.{n}"

            def hook(module, inputs, output, key=key):
                x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
                sums[key] = sums.get(key, 0) + x.T @ x
                counts[key] = counts.get(key, 0) + x.shape[0]

            hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        for i in range(0, len(tokens), 4):
            model.model(tokens[i : i + 4])
    for h in hooks:
        h.remove()
    for b in picks:
        for n in names:
            key = f"layers.{b}.{n}"
            w = blocks[b].get_submodule(n).weight.detach().float()
            yield f"smollm2.{key}", w, (sums[key] / counts[key]).float()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[1024, 4096])
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--solvers", nargs="*", default=SOLVERS)
    ap.add_argument("--subset", type=int, default=256, help="rows for direct/pdhg on big layers")
    ap.add_argument("--no-real", action="store_true", help="skip the SmolLM2 layers")
    ap.add_argument("--real-layers", type=int, default=3, help="blocks of SmolLM2 to sample")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--json", help="also write the rows as JSON to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    layers = [(f"synthetic.d{d}", random_weight(d, d).float(), activation_hessian(d, tokens=2 * d).float())
              for d in args.sizes]
    rows = []
    header = f"{'layer':38} {'solver':9} {'rows':>5} {'time s':>8} {'x sgpt':>7} {'iters':>6} {'err_ratio':>9} {'gap':>9}"
    print(header)
    print("-" * len(header))

    def run(name, w, h):
        w, h = w.to(args.device), h.to(args.device)
        for row in bench_layer(name, w, h, args.ratio, args.solvers, args.subset):
            rows.append(row)
            print(f"{row['layer']:38} {row['solver']:9} {row['rows']:5d} {row['seconds']:8.3f} "
                  f"{row['time_vs_sparsegpt']:7.2f} {row['iterations']:6d} {row['error_ratio']:9.4f} "
                  f"{row['gap_to_direct']:9.1e}", flush=True)

    for name, w, h in layers:
        run(name, w, h)
    if not args.no_real:
        for name, w, h in real_layers(args.real_layers):
            run(name, w, h)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
