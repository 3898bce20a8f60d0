# The loop structure of flobk/TRIM main.py + lib/prune.py + lib/trim.py (fixture for tests/test_host.py;
# see tests/hosts/README.md): --device cpu keeps the model on CPU and moves each block to 'cuda' and back.
import argparse

import numpy as np
import torch
import torch.nn as nn
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer


def find_layers(module, layers=[nn.Linear], name=''):
    if type(module) in layers:
        return {name: module}
    res = {}
    for name1, child in module.named_children():
        res.update(find_layers(child, layers=layers, name=name + '.' + name1 if name != '' else name1))
    return res


class WrappedGPT:
    def __init__(self, layer, gather_inputs=False):
        self.layer = layer
        self.scaler_row = torch.zeros((layer.weight.shape[1]), device=layer.weight.device)
        self.nsamples = 0
        self.gather_inputs = gather_inputs
        self.input_vectors = [] if gather_inputs else None

    def add_batch(self, inp, out):
        if len(inp.shape) == 2:
            inp = inp.unsqueeze(0)
        tmp = inp.shape[0]
        inp = inp.reshape((-1, inp.shape[-1])).t()
        self.scaler_row *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        inp = inp.type(torch.float32)
        self.scaler_row += torch.norm(inp, p=2, dim=1) ** 2 / self.nsamples
        if self.gather_inputs:
            self.input_vectors.append(inp[:, -1].detach().cpu())  # the last token of each window, as TRIM


def get_c4(nsamples, seed, seqlen, tokenizer):
    import random
    traindata = load_dataset('allenai/c4', 'allenai--c4', data_files={'train': 'en/c4-train.00000-of-01024.json.gz'}, split='train')
    random.seed(seed)
    loader = []
    for _ in range(nsamples):
        while True:
            trainenc = tokenizer(traindata[random.randint(0, len(traindata) - 1)]['text'], return_tensors='pt')
            if trainenc.input_ids.shape[1] > seqlen:
                break
        i = random.randint(0, trainenc.input_ids.shape[1] - seqlen - 1)
        loader.append((trainenc.input_ids[:, i:i + seqlen], None))
    return loader


def prepare_calibration_input(model, nsamples, dataloader, device):
    model.config.use_cache = False
    layers = model.model.layers
    if "model.embed_tokens" in model.hf_device_map:
        device = model.hf_device_map["model.embed_tokens"]
    dtype = next(iter(model.parameters())).dtype
    inps = torch.zeros((nsamples, model.seqlen, model.config.hidden_size), dtype=dtype, device=device)
    cache = {'i': 0, 'attention_mask': None, "position_ids": None}

    class Catcher(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, inp, **kwargs):
            inps[cache['i']] = inp
            cache['i'] += 1
            cache['attention_mask'] = kwargs['attention_mask']
            cache['position_ids'] = kwargs['position_ids']
            raise ValueError

    layers[0] = Catcher(layers[0])
    for batch in dataloader:
        try:
            model(batch[0].to(device))
        except ValueError:
            pass
    layers[0] = layers[0].module
    inps = inps.cpu()
    return inps, torch.zeros_like(inps), cache['attention_mask'], cache['position_ids']


def prune_matrix(W, sorted_idx, sparsities, device):
    batch_size, width = W.shape
    mask = torch.ones_like(W, dtype=torch.bool)
    num_prune = (width * sparsities).long()
    row_indices = torch.arange(batch_size, device=device).unsqueeze(1).expand(-1, width)
    prune_indices = torch.arange(width, device=device).unsqueeze(0).expand(batch_size, -1)
    mask[row_indices, sorted_idx] = ~(prune_indices < num_prune.unsqueeze(1))
    return W * mask


def row_wise_sparsities(target, W, inputs, sorted_idx, device, iterations=5, learning_rate=0.04):
    """TRIM's iterative update, one learning rate: rows with a better output cosine get more sparsity."""
    dense = W @ inputs
    x = torch.ones(W.shape[0], device=device) * target
    best_x, best = x.clone(), -1.0
    for _ in range(iterations):
        pruned = prune_matrix(W, sorted_idx, x, device) @ inputs
        cos = nn.functional.cosine_similarity(dense, pruned, dim=1)
        flat = nn.functional.cosine_similarity(dense.flatten(), pruned.flatten(), dim=0).item()
        if flat > best:
            best, best_x = flat, x.clone()
        x_d = (cos - cos.min()) / (cos.max() - cos.min() + 1e-6) * learning_rate * 2
        x = (x + x_d - x_d.mean()).clamp(0, 0.95)
        x = x - x.mean() + target
    return best_x


def prune_wanda(args, model, tokenizer, device, masks):
    dataloader = get_c4(args.nsamples_calibration, args.seed, model.seqlen, tokenizer)
    with torch.no_grad():
        inps, outs, attention_mask, position_ids = prepare_calibration_input(model, args.nsamples_calibration, dataloader, device)
    position_embeddings = model.model.rotary_emb(inps[0].unsqueeze(0), position_ids)
    layers = model.model.layers
    for i in range(len(layers)):
        layer = layers[i]
        subset = find_layers(layer)
        dev = 'cuda'
        if device == 'cpu':
            layer = layers[i].to(dev)
        position_embeddings = (position_embeddings[0].to(dev), position_embeddings[1].to(dev))
        wrapped_layers = {name: WrappedGPT(subset[name], gather_inputs=args.use_trim) for name in subset}

        def add_batch(name):
            def tmp(_, inp, out):
                wrapped_layers[name].add_batch(inp[0].data, out.data)
            return tmp

        def run_block():
            for j in range(args.nsamples_calibration):
                with torch.no_grad():
                    inp_gpu = inps[j].unsqueeze(0).to(dev)
                    out = layer(inp_gpu, attention_mask=attention_mask, position_embeddings=position_embeddings)[0]
                    outs[j] = out.detach().cpu()

        handles = [subset[name].register_forward_hook(add_batch(name)) for name in wrapped_layers]
        run_block()
        for h in handles:
            h.remove()
        for name in subset:
            W_metric = torch.abs(subset[name].weight.data) * torch.sqrt(wrapped_layers[name].scaler_row.reshape((1, -1)))
            sorted_idx = torch.sort(W_metric, dim=-1, stable=True)[1]
            if args.use_trim:
                if args.input_recalc and name in ["self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"]:
                    wrapped_layers[name].input_vectors = []
                    handles = [subset[name].register_forward_hook(add_batch(name))]
                    if name == "mlp.gate_proj":
                        wrapped_layers["mlp.up_proj"].input_vectors = []
                        handles.append(subset["mlp.up_proj"].register_forward_hook(add_batch("mlp.up_proj")))
                    run_block()
                    for h in handles:
                        h.remove()
                W = subset[name].weight.data.float().clone()
                inputs = torch.stack(wrapped_layers[name].input_vectors).to(dev).T.float()
                sparsity_list = row_wise_sparsities(args.sparsity_ratio, W, inputs, sorted_idx, dev)
                W_mask = ~prune_matrix(torch.ones_like(W_metric), sorted_idx, sparsity_list, dev).bool()
            else:
                W_mask = torch.zeros_like(W_metric, dtype=torch.bool)
                W_mask.scatter_(1, sorted_idx[:, :int(W_metric.shape[1] * args.sparsity_ratio)], True)
            masks[f"model.layers.{i}.{name}"] = W_mask.cpu()
            subset[name].weight.data[W_mask] = 0
            torch.cuda.empty_cache()
        run_block()
        inps, outs = outs, inps
        if device == 'cpu':
            layer = layer.to('cpu')


def eval_ppl(model, tokenizer, device, max_windows):
    testdata = load_dataset('wikitext', 'wikitext-2-raw-v1', split='test')
    ids = tokenizer("\n\n".join(testdata['text']), return_tensors='pt').input_ids
    n = min(ids.numel() // model.seqlen, max_windows)
    nlls = []
    with torch.no_grad():
        for i in range(n):
            inputs = ids[:, i * model.seqlen:(i + 1) * model.seqlen].to(device)
            logits = model(inputs).logits[:, :-1].float()
            nlls.append(nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), inputs[:, 1:].reshape(-1)))
    return torch.exp(torch.stack(nlls).mean()).item()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--model', type=str)
    parser.add_argument("--prune_method", type=str, default="wanda")
    parser.add_argument('--use_trim', action="store_true")
    parser.add_argument('--input_recalc', action="store_true")
    parser.add_argument('--sparsity_ratio', type=float, default=0)
    parser.add_argument('--nsamples_calibration', type=int, default=256)
    parser.add_argument('--device', type=str, default="cuda")
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--eval_windows', type=int, default=8)
    parser.add_argument('--save_masks', type=str, default=None)
    parser.add_argument('--save_weights', type=str, default=None)
    args = parser.parse_args()
    np.random.seed(args.seed)
    torch.random.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float16, low_cpu_mem_usage=True,
                                                 device_map=args.device)
    model.seqlen = 2048
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    for name, device in model.hf_device_map.items():
        print(f"{name}: device {device}")
    masks = {}
    prune_wanda(args, model, tokenizer, args.device, masks)
    print(args.prune_method, f" Perplexity on wikitext {eval_ppl(model, tokenizer, device, args.eval_windows)}")
    if args.save_masks:
        torch.save(masks, args.save_masks)
    if args.save_weights:
        torch.save({f"model.layers.{i}.{n}": m.weight.data.cpu().clone() for i, block in enumerate(model.model.layers)
                    for n, m in find_layers(block).items()}, args.save_weights)


if __name__ == '__main__':
    main()
