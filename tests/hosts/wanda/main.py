# The shape of locuslab/wanda main.py (fixture for tests/test_host.py; see tests/hosts/README.md).
import argparse

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lib.eval import eval_ppl
from lib.prune import find_layers, prune_magnitude, prune_sparsegpt, prune_wanda


def get_llm(model_name):
    model = AutoModelForCausalLM.from_pretrained(model_name, torch_dtype=torch.float16, low_cpu_mem_usage=True,
                                                 device_map="auto")
    model.seqlen = model.config.max_position_embeddings
    return model


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--model', type=str)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--nsamples', type=int, default=128)
    parser.add_argument('--sparsity_ratio', type=float, default=0)
    parser.add_argument("--sparsity_type", type=str, choices=["unstructured", "4:8", "2:4"])
    parser.add_argument("--prune_method", type=str, choices=["magnitude", "wanda", "sparsegpt"])
    parser.add_argument('--eval_windows', type=int, default=None)
    parser.add_argument('--save_masks', type=str, default=None)
    parser.add_argument('--save_weights', type=str, default=None)
    args = parser.parse_args()
    np.random.seed(args.seed)
    torch.random.manual_seed(args.seed)
    prune_n, prune_m = 0, 0
    if args.sparsity_type != "unstructured":
        prune_n, prune_m = map(int, args.sparsity_type.split(":"))
    model = get_llm(args.model)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model, use_fast=False)
    device = torch.device("cuda:0")
    masks = {}
    if args.prune_method == "wanda":
        prune_wanda(args, model, tokenizer, device, prune_n=prune_n, prune_m=prune_m, masks=masks)
    elif args.prune_method == "magnitude":
        prune_magnitude(args, model, tokenizer, device, prune_n=prune_n, prune_m=prune_m, masks=masks)
    elif args.prune_method == "sparsegpt":
        prune_sparsegpt(args, model, tokenizer, device, prune_n=prune_n, prune_m=prune_m, masks=masks)
    ppl_test = eval_ppl(model, tokenizer, device, max_windows=args.eval_windows)
    print(f"wikitext perplexity {ppl_test}")
    if args.save_masks:
        torch.save(masks, args.save_masks)
    if args.save_weights:
        blocks = model.model.decoder.layers if "OPT" in model.__class__.__name__ else model.model.layers
        prefix = "model.decoder.layers" if "OPT" in model.__class__.__name__ else "model.layers"
        torch.save({f"{prefix}.{i}.{n}": m.weight.data.cpu().clone()
                    for i, block in enumerate(blocks) for n, m in find_layers(block).items()}, args.save_weights)


if __name__ == '__main__':
    main()
