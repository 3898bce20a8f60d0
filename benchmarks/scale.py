"""Scale benchmark: one random-initialised decoder block with the real shapes of Llama-3.1-8B / 70B.

Per block it measures the phases of a prune, on this device, and projects the whole model
(× the number of blocks) for ``wanda+none``, ``wanda+optima`` and ``sparsegpt+native``:

* ``forward``: the block over the calibration tokens, no hooks (the propagate pass costs the same);
* ``hessian``: the same pass with the Hessian hooks, minus ``forward``, plus (under torchrun)
  the all-reduce of the Hessians;
* per linear: ``select`` (Wanda), ``inverse`` (Cholesky inverse of the damped ``H``, once per
  distinct input), ``solve`` (OPTIMA's PCG with that inverse), ``gather`` (under torchrun, the
  all-gather of the solved rows), ``sparsegpt`` (SparseGPT's own selection and update), and
  ``gemm`` (one ``r x d`` by ``d x d`` product), in which the solve is also expressed
  (``solve / gemm``: GEMM-equivalents).

``--rows`` solves (and runs SparseGPT on) only that many rows per linear and scales the time by
``rows of the linear / --rows`` (rows are independent problems sharing ``H``; the inverse is
timed in full): the CPU cannot afford every row of a 14336-wide layer. Such scaled figures are
marked ``*``; SparseGPT's own ``d x d`` factorisation is scaled with its rows, so its ``*`` figure
is an upper bound. Random weights and Gaussian inputs: iteration counts of real layers differ.

    python benchmarks/scale.py --model 8b --tokens 2048 --rows 128               # CPU, a few minutes
    python benchmarks/scale.py --model 70b --device cuda                         # 128 x 2048 tokens
    torchrun --nproc_per_node 8 benchmarks/scale.py --model 70b --device cuda    # tokens and rows split
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from optima_plugin import distributed
from optima_plugin.hessian import HessianAccumulator
from optima_plugin.pipeline import hooked, input_owners
from optima_plugin.selectors.sparsegpt import SparseGPTSelector
from optima_plugin.selectors.wanda import WandaSelector
from optima_plugin.solvers.base import get_solver
from optima_plugin.solvers.problem import prepare
from optima_plugin.sparsity import parse_pattern

SHAPES = {  # hidden, intermediate, heads, kv heads, blocks
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, blocks=32),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8, blocks=80),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, blocks=2),
}  # tiny: a check that the script runs
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
GROUPS = [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")]


def build_block(shape: dict, device: torch.device, dtype: torch.dtype):
    """A LlamaDecoderLayer of ``shape``, weights N(0, 0.02), and its rotary embedding."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    spec = {k: v for k, v in shape.items() if k != "blocks"}
    config = LlamaConfig(**spec, max_position_embeddings=131072, rope_theta=500000.0)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        block = LlamaDecoderLayer(config, layer_idx=0).to(dtype)
        rotary = LlamaRotaryEmbedding(config)
    for p in block.parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.02)
    return block.eval(), rotary


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def measure(args, job) -> dict:
    device = job.device if job is not None and args.device.startswith("cuda") else torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    shape = SHAPES[args.model]
    torch.manual_seed(0)
    block, rotary = build_block(shape, device, dtype)
    windows = args.tokens // args.seqlen
    mine = job.span(windows) if job is not None else slice(0, windows)
    n_windows = mine.stop - mine.start
    x = torch.empty(n_windows, args.seqlen, shape["hidden_size"], device=device, dtype=dtype)
    for j, window in enumerate(range(mine.start, mine.stop)):  # window w's inputs, whichever rank has it
        g = torch.Generator(device).manual_seed(1 + window)
        x[j] = torch.randn(args.seqlen, shape["hidden_size"], generator=g, device=device).to(dtype)
    pos = torch.arange(args.seqlen, device=device).unsqueeze(0)
    emb = rotary(x[:1], pos)
    linears = {name: block.get_submodule(name) for name in LINEARS}

    def run():
        with torch.no_grad():
            for i in range(n_windows):
                block(x[i : i + 1], position_embeddings=emb, position_ids=pos)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    run()  # warm-up
    _, t_forward = timed(run, device)
    owners = input_owners(linears, GROUPS)
    hooked_on = {o: linears[o] for o in sorted(set(owners.values()))}

    def stats():
        with hooked(hooked_on, lambda: HessianAccumulator(torch.float32)) as accs:
            run()
        return accs

    accs, t_stats = timed(stats, device)
    t_reduce = 0.0
    if job is not None:
        def reduce():
            for acc in accs.values():
                acc.hessian, acc.tokens = job.mean(acc.hessian, acc.tokens)
        _, t_reduce = timed(reduce, device)
    hessians = {name: accs[owners[name]].hessian for name in linears}
    solve = get_solver("pcg")
    rows_out: list[dict] = []
    inverses: dict = {}
    last_user = {owners[name]: name for name in linears}  # the last linear reading each input's H
    for name, lin in linears.items():
        w = lin.weight.detach().float()
        r, d = w.shape
        h = hessians.pop(name)
        sel, t_select = timed(lambda: WandaSelector().select(w, h, args.sparsity, parse_pattern("unstructured")),
                              device)
        my_rows = job.span(r) if job is not None else slice(0, r)
        k = min(args.rows or r, my_rows.stop - my_rows.start)
        scale = (my_rows.stop - my_rows.start) / k
        sample = slice(my_rows.start, my_rows.start + k)
        # SparseGPT first, before OPTIMA's damped copy and inverse exist: at 70B shapes down_proj's H is
        # 3.3 GB, and SparseGPT's own factors next to OPTIMA's do not fit a 24 GiB machine
        _, t_sgpt = timed(lambda: SparseGPTSelector().select(w[sample], h, args.sparsity,
                                                             parse_pattern("unstructured")), device)
        problem = prepare(w, sel.pruned, h, damp=0.01, double_precision=False)
        owner = owners[name]
        if owner in inverses:  # q/k/v and gate/up share one input: one inverse
            problem.cache["inverse"], t_inverse = inverses[owner], 0.0
        else:
            inv, t_inverse = timed(problem.inverse, device)
            inverses[owner] = inv
        part = problem.rows(sample)
        out, t_solve = timed(lambda: solve(part), device)
        t_gather = 0.0
        if job is not None:
            full = torch.zeros(my_rows.stop - my_rows.start, d, device=device)
            _, t_gather = timed(lambda: job.gather_rows(full, r), device)
        _, t_gemm = timed(lambda: part.weight @ problem.damped, device)
        rows_out.append({"linear": name, "shape": [r, d], "rows_solved": k, "scaled": scale != 1.0,
                         "select": t_select, "inverse": t_inverse, "solve": t_solve * scale,
                         "gather": t_gather, "gemm": t_gemm * scale, "sparsegpt": t_sgpt * scale,
                         "gemm_equivalents": t_solve / t_gemm if t_gemm > 0 else None,
                         "iterations": out.iterations})
        del problem, part, out, sel, h
        if last_user[owner] == name:  # no later linear shares this input: free its inverse
            inverses.pop(owner)
            accs.pop(owner)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"forward": t_forward, "hessian": t_stats - t_forward + t_reduce, "reduce": t_reduce,
            "linears": rows_out, "peak_gib": peak, "windows": n_windows}


def project(m: dict, blocks: int) -> dict:
    """Seconds for the whole model per method: × blocks of (statistics pass + per-linear work + propagate)."""
    lin = m["linears"]
    select = sum(x["select"] for x in lin)
    base = m["forward"] + m["hessian"] + m["forward"]  # statistics pass (forward + hooks) and propagate
    return {
        "wanda+none": blocks * (base + select),
        "wanda+optima": blocks * (base + select + sum(x["inverse"] + x["solve"] + x["gather"] for x in lin)),
        "sparsegpt+native": blocks * (base + sum(x["sparsegpt"] for x in lin)),
    }


def shares(m: dict) -> dict:
    """One ``wanda+optima`` block's seconds per phase (as the report's ``timings.phases`` names them) and
    their shares of the block's total: ``{phase: (seconds, share)}``."""
    lin = m["linears"]
    phases = {"statistics": m["forward"], "hessian": m["hessian"] - m["reduce"], "allreduce": m["reduce"],
              "selection": sum(x["select"] for x in lin), "update": sum(x["inverse"] + x["solve"] for x in lin),
              "gather": sum(x["gather"] for x in lin), "propagation": m["forward"]}
    total = sum(phases.values()) or 1.0
    return {k: (v, v / total) for k, v in phases.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(SHAPES), default="8b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    p.add_argument("--tokens", type=int, default=None, help="calibration tokens (GPU: 128 x 2048; CPU: 2048)")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--rows", type=int, default=None, help="rows solved per linear, time scaled (CPU: 128)")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--json", help="write the measurements here")
    args = p.parse_args()
    gpu = args.device.startswith("cuda")
    args.tokens = args.tokens or (128 * 2048 if gpu else 2048)
    args.rows = args.rows if args.rows is not None else (None if gpu else 128)
    if args.tokens % args.seqlen:
        p.error("--tokens must be a multiple of --seqlen")
    job = distributed.setup(args.device)
    m = measure(args, job)
    ranks = job.gather_object(m) if job is not None else [m]
    if job is not None and not job.is_main():
        distributed.teardown()
        return
    worst = max(ranks, key=lambda r: r["forward"] + r["hessian"] + sum(x["solve"] for x in r["linears"]))
    blocks = SHAPES[args.model]["blocks"]
    world = job.world_size if job is not None else 1
    print(f"Llama-3.1-{args.model.upper()} block, {args.tokens} tokens ({args.tokens // args.seqlen} x {args.seqlen}), "
          f"{args.device} {args.dtype}, world size {world}, threads {torch.get_num_threads()}; slowest rank shown")
    print(f"forward {worst['forward']:.2f} s, hessian {worst['hessian']:.2f} s (all-reduce {worst['reduce']:.2f} s), "
          f"peak {worst['peak_gib']:.2f} GiB" if worst["peak_gib"] is not None else
          f"forward {worst['forward']:.2f} s, hessian {worst['hessian']:.2f} s (all-reduce {worst['reduce']:.2f} s)")
    print(f"{'linear':18} {'r x d':>13} {'select':>7} {'inverse':>8} {'solve':>8} {'gather':>7} {'GEMM-eq':>8} "
          f"{'iters':>5} {'sparsegpt':>10}")
    for x in worst["linears"]:
        star = "*" if x["scaled"] else " "
        print(f"{x['linear']:18} {x['shape'][0]:>6}x{x['shape'][1]:<6} {x['select']:7.2f} {x['inverse']:8.2f} "
              f"{x['solve']:7.2f}{star} {x['gather']:7.2f} {x['gemm_equivalents']:8.1f} {x['iterations']:>5} "
              f"{x['sparsegpt']:9.2f}{star}")
    print("wanda+optima per block, by phase: " + ", ".join(f"{k} {v:.2f} s ({share:.0%})"
                                                         for k, (v, share) in shares(worst).items()))
    proj = project(worst, blocks)
    print(f"projection for {blocks} blocks: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in proj.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "world_size": world, "ranks": ranks, "projection_seconds": proj}, f,
                      indent=1)
    distributed.teardown()


if __name__ == "__main__":
    main()
