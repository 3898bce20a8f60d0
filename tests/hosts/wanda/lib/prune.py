# The loop structure of locuslab/wanda lib/prune.py (LLaMA path) and lib/prune_opt.py (OPT path).
import torch
import torch.nn as nn

from .data import get_c4
from .sparsegpt import SparseGPT


def find_layers(module, layers=[nn.Linear], name=''):
    if type(module) in layers:
        return {name: module}
    res = {}
    for name1, child in module.named_children():
        res.update(find_layers(child, layers=layers, name=name + '.' + name1 if name != '' else name1))
    return res


def decoder_layers(model):
    return model.model.decoder.layers if "OPT" in model.__class__.__name__ else model.model.layers


def prefix(model):
    return "model.decoder.layers" if "OPT" in model.__class__.__name__ else "model.layers"


class WrappedGPT:
    def __init__(self, layer):
        self.layer = layer
        self.dev = self.layer.weight.device
        self.columns = layer.weight.data.shape[1]
        self.scaler_row = torch.zeros((self.columns), device=self.dev)
        self.nsamples = 0

    def add_batch(self, inp, out):
        if len(inp.shape) == 2:
            inp = inp.unsqueeze(0)
        tmp = inp.shape[0]
        if len(inp.shape) == 3:
            inp = inp.reshape((-1, inp.shape[-1]))
        inp = inp.t()
        self.scaler_row *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        inp = inp.type(torch.float32)
        self.scaler_row += torch.norm(inp, p=2, dim=1) ** 2 / self.nsamples


def prepare_calibration_input(model, dataloader, device, nsamples):
    use_cache = model.config.use_cache
    model.config.use_cache = False
    layers = decoder_layers(model)
    if "model.embed_tokens" in model.hf_device_map:
        device = model.hf_device_map["model.embed_tokens"]
    dtype = next(iter(model.parameters())).dtype
    inps = torch.zeros((nsamples, model.seqlen, model.config.hidden_size), dtype=dtype, device=device)
    cache = {'i': 0, 'attention_mask': None, "position_ids": None}

    class Catcher(nn.Module):  # records attention_mask and position_ids only, as Wanda does
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, inp, **kwargs):
            inps[cache['i']] = inp
            cache['i'] += 1
            cache['attention_mask'] = kwargs['attention_mask']
            cache['position_ids'] = kwargs.get('position_ids')
            raise ValueError

    layers[0] = Catcher(layers[0])
    for batch in dataloader:
        try:
            model(batch[0].to(device))
        except ValueError:
            pass
    layers[0] = layers[0].module
    outs = torch.zeros_like(inps)
    model.config.use_cache = use_cache
    return inps, outs, cache['attention_mask'], cache['position_ids']


def _call(model, layer, inp, attention_mask, position_ids):
    if "OPT" in model.__class__.__name__:
        return layer(inp, attention_mask=attention_mask)[0]
    return layer(inp, attention_mask=attention_mask, position_ids=position_ids)[0]


def prune_wanda(args, model, tokenizer, device=torch.device("cuda:0"), prune_n=0, prune_m=0, masks=None):
    dataloader, _ = get_c4(args.nsamples, args.seed, model.seqlen, tokenizer)
    with torch.no_grad():
        inps, outs, attention_mask, position_ids = prepare_calibration_input(model, dataloader, device, args.nsamples)
    layers = decoder_layers(model)
    for i in range(len(layers)):
        layer = layers[i]
        subset = find_layers(layer)
        wrapped_layers = {name: WrappedGPT(subset[name]) for name in subset}

        def add_batch(name):
            def tmp(_, inp, out):
                wrapped_layers[name].add_batch(inp[0].data, out.data)
            return tmp

        handles = [subset[name].register_forward_hook(add_batch(name)) for name in wrapped_layers]
        for j in range(args.nsamples):
            with torch.no_grad():
                outs[j] = _call(model, layer, inps[j].unsqueeze(0), attention_mask, position_ids)
        for h in handles:
            h.remove()
        for name in subset:
            W_metric = torch.abs(subset[name].weight.data) * torch.sqrt(wrapped_layers[name].scaler_row.reshape((1, -1)))
            W_mask = (torch.zeros_like(W_metric) == 1)
            if prune_n != 0:
                for ii in range(W_metric.shape[1]):
                    if ii % prune_m == 0:
                        tmp = W_metric[:, ii:(ii + prune_m)].float()
                        W_mask.scatter_(1, ii + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)
            else:
                sort_res = torch.sort(W_metric, dim=-1, stable=True)
                indices = sort_res[1][:, :int(W_metric.shape[1] * args.sparsity_ratio)]
                W_mask.scatter_(1, indices, True)
            if masks is not None:
                masks[f"{prefix(model)}.{i}.{name}"] = W_mask.cpu()
            subset[name].weight.data[W_mask] = 0
        for j in range(args.nsamples):
            with torch.no_grad():
                outs[j] = _call(model, layer, inps[j].unsqueeze(0), attention_mask, position_ids)
        inps, outs = outs, inps
    torch.cuda.empty_cache()


def prune_magnitude(args, model, tokenizer, device=torch.device("cuda:0"), prune_n=0, prune_m=0, masks=None):
    layers = decoder_layers(model)
    for i in range(len(layers)):
        subset = find_layers(layers[i])
        for name in subset:
            W = subset[name].weight.data
            W_metric = torch.abs(W)
            thresh = torch.sort(W_metric.flatten().cuda())[0][int(W.numel() * args.sparsity_ratio)].cpu()
            W_mask = (W_metric <= thresh)
            if masks is not None:
                masks[f"{prefix(model)}.{i}.{name}"] = W_mask.cpu()
            W[W_mask] = 0


@torch.no_grad()
def prune_sparsegpt(args, model, tokenizer, dev, prune_n=0, prune_m=0, masks=None):
    dataloader, _ = get_c4(args.nsamples, args.seed, model.seqlen, tokenizer)
    inps, outs, attention_mask, position_ids = prepare_calibration_input(model, dataloader, dev, args.nsamples)
    layers = decoder_layers(model)
    for i in range(len(layers)):
        layer = layers[i]
        subset = find_layers(layer)
        gpts = {name: SparseGPT(subset[name]) for name in subset}

        def add_batch(name):
            def tmp(_, inp, out):
                gpts[name].add_batch(inp[0].data, out.data)
            return tmp

        handles = [subset[name].register_forward_hook(add_batch(name)) for name in gpts]
        for j in range(args.nsamples):
            outs[j] = _call(model, layer, inps[j].unsqueeze(0), attention_mask, position_ids)
        for h in handles:
            h.remove()
        for name in gpts:
            W_mask = gpts[name].fasterprune(args.sparsity_ratio, prune_n=prune_n, prune_m=prune_m, percdamp=0.01,
                                            blocksize=128)
            gpts[name].free()
            if masks is not None:
                masks[f"{prefix(model)}.{i}.{name}"] = W_mask.cpu()
        for j in range(args.nsamples):
            outs[j] = _call(model, layer, inps[j].unsqueeze(0), attention_mask, position_ids)
        layers[i] = layer
        torch.cuda.empty_cache()
        inps, outs = outs, inps
