"""End-to-end prune time of each selector/update on a mid-size random Llama (no download).

Prints, in one run, time, mean layer error_ratio, CUDA peak memory and sparsity for
wanda+none, wanda+optima, sparsegpt+native, sparsegpt+optima, thanos+native, and
each time as a ratio to wanda+none.

    python benchmarks/engine_speed.py --device cuda                 # hidden 2048, 8 blocks
    python benchmarks/engine_speed.py --device cpu --hidden 512 --layers 4 --nsamples 8
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from optima_plugin import prune
from optima_plugin.testing import VOCAB, tiny_tokenizer

RUNS = [("wanda", "none"), ("wanda", "optima"), ("sparsegpt", "native"), ("sparsegpt", "optima"),
        ("thanos", "native")]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    args = ap.parse_args(argv)
    cfg = AutoConfig.for_model("llama", vocab_size=VOCAB, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                               num_hidden_layers=args.layers, num_attention_heads=args.hidden // 128,
                               num_key_value_heads=max(1, args.hidden // 512), max_position_embeddings=4096)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(cfg).eval()
    tok = tiny_tokenizer()
    first = None
    print(f"{'method':10} {'update':7} {'time s':>8} {'x wanda':>8} {'err_ratio':>9} {'cuda MB':>8} {'sparsity':>8}")
    for method, update in RUNS:
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        r = prune(model, tok, prune_method=method, weight_update=update, nsamples=args.nsamples,
                  seqlen=args.seqlen, device=args.device, progress=False)
        dt = time.perf_counter() - t0
        first = first or dt
        er = sum(x["error_ratio"] for x in r["layers"]) / len(r["layers"])
        cuda = r["memory"]["cuda_peak_mb"]
        print(f"{method:10} {update:7} {dt:8.1f} {dt / first:8.2f} {er:9.4f} "
              f"{cuda if cuda is not None else float('nan'):8.0f} {r['sparsity']:8.3f}", flush=True)


if __name__ == "__main__":
    main()
