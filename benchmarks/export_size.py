"""Saved size of SmolLM2-135M, hf vs ``--save_format compressed-tensors``, and the round trip's logits.

Every decoder linear is fake-quantized with a plain symmetric absmax (``--bits``, one scale per
``--group_size`` inputs; optionally 2:4-pruned by magnitude first), then the model is saved both
ways (``save_model``: float32 safetensors as loaded; ``save_compressed``) and the folders' bytes
are summed. The compressed folder is loaded back through transformers and its logits on 2 x 64
pydoc tokens compared with the model in memory::

    OMP_NUM_THREADS=1 python benchmarks/export_size.py                    # 4-bit, group 32
    OMP_NUM_THREADS=1 python benchmarks/export_size.py --two_four         # 2:4 first
    OMP_NUM_THREADS=1 python benchmarks/export_size.py --bits 8 --group_size 0   # 8-bit, per channel
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch import nn

from optima_plugin.export import save_compressed
from optima_plugin.loading import default_model, load_model, save_model
from optima_plugin.quantizers import QUANT_ATTR, QuantState


def folder_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group_size", type=int, default=32, help="inputs per scale (0: one scale per row)")
    p.add_argument("--two_four", action="store_true", help="2:4-prune every decoder linear by magnitude first")
    args = p.parse_args()

    model, tokenizer = load_model(*default_model())
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}
    for lin in linears.values():
        w = lin.weight.data
        r, d = w.shape
        if args.two_four:
            w4 = w.reshape(r, d // 4, 4)
            w4.scatter_(-1, w4.abs().argsort(-1)[..., :2], 0.0)
        group_size = args.group_size or d
        g = w.reshape(r, d // group_size, group_size)
        scale = g.abs().amax(-1) / (2 ** (args.bits - 1) - 1)
        q = torch.where(scale[..., None] > 0, g / scale[..., None], 0.0).round()
        q = q.clamp(-(2 ** (args.bits - 1)), 2 ** (args.bits - 1) - 1)
        lin.weight.data = (q * scale[..., None]).reshape(r, d)
        setattr(lin, QUANT_ATTR, QuantState(bits=args.bits, group_size=group_size, scale=scale))

    from pydoc_data.topics import topics

    ids = tokenizer(topics["assert"] + topics["for"], return_tensors="pt").input_ids[:, :128].reshape(2, 64)
    with torch.no_grad():
        expected = model(ids).logits
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        hf, ct = Path(tmp) / "hf", Path(tmp) / "ct"
        save_model(model, tokenizer, str(hf))
        save_compressed(model, tokenizer, str(ct), pruned=list(linears) if args.two_four else None)
        sizes = {"hf": folder_bytes(hf), "compressed-tensors": folder_bytes(ct)}
        from transformers import AutoModelForCausalLM

        reloaded = AutoModelForCausalLM.from_pretrained(ct).eval()
        with torch.no_grad():
            got = reloaded(ids).logits
    label = f"{args.bits}-bit absmax, " + (f"group {args.group_size}" if args.group_size else "per channel") + (", 2:4" if args.two_four else "")
    print(f"SmolLM2-135M, {len(linears)} decoder linears, {label}")
    for name, size in sizes.items():
        print(f"  {name:20s} {size:>12,d} bytes  ({size / 2**20:7.1f} MiB)")
    print(f"  ratio {sizes['compressed-tensors'] / sizes['hf']:.3f}; reloaded logits max |diff| "
          f"{(got - expected).abs().max().item():.3g}")


if __name__ == "__main__":
    main()
