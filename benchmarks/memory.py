"""Peak memory of a prune: the whole model in memory vs ``--stream``, as the depth of the model grows.

Models: SmolLM2-135M (the embedded GGUF, converted once to a float32 safetensors folder) and
random-initialised Llamas of SmolLM2's shape with ``--depths`` times its 30 blocks (2x, 4x
by default). Each prune is its own ``optima-prune`` process (load, prune, save), and its peak
resident memory is the kernel's high-water mark for that process (``wait4``'s ``ru_maxrss``:
exact, no sampling), with CUDA's own peak from the report when a GPU is used::

    OMP_NUM_THREADS=1 python benchmarks/memory.py                     # 1x, 2x, 4x SmolLM2's depth
    OMP_NUM_THREADS=1 python benchmarks/memory.py --depths 1,2 --nsamples 4 --seqlen 128
    OMP_NUM_THREADS=1 python benchmarks/memory.py --wide --depths 1,4,16 --nsamples 4 --seqlen 128 --weight_update none

``--wide``: random Llamas of hidden 1024 / MLP 4096 (67 MB per block in float32, a tiny vocabulary)
with ``--depths`` blocks. Besides the peak RSS, a sampler reads ``/proc/PID/status`` every 10 ms
for the peak anonymous memory (``RssAnon``: what the process allocated, without the file pages it
maps: libraries, memory-mapped safetensors).

Streamed, the process holds the embeddings and head, one block, its Hessians and the
calibration activations, so its peak stays flat as the model gets deeper; in memory it grows
with the model. The host side (``optima-host`` vs the host alone) is ``benchmarks/host_memory.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SMOLLM2_BLOCKS = 30


def smollm2_folder(cache: Path) -> Path:
    """The embedded SmolLM2-135M as a float32 safetensors folder (converted once, reused)."""
    os.environ.setdefault("OPTIMA_CACHE_DIR", str(cache))
    from optima_plugin.loading import default_model
    from optima_plugin.streaming import gguf_to_safetensors

    directory, gguf = default_model()
    return gguf_to_safetensors(directory, gguf, torch.float32)


def deeper_llama(smollm2: Path, factor: int, target: Path) -> Path:
    """A random-initialised Llama with SmolLM2's shapes and ``factor`` times its blocks (saved once)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (target / "config.json").is_file():
        return target
    config = AutoConfig.from_pretrained(smollm2)
    config.num_hidden_layers = SMOLLM2_BLOCKS * factor
    torch.manual_seed(factor)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(smollm2).save_pretrained(target)
    return target


def wide_llama(blocks: int, target: Path) -> Path:
    """A random-initialised Llama, hidden 1024, MLP 4096 (67 MB per block, float32), vocabulary 512 (saved once)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from optima_plugin.testing import tiny_tokenizer

    if (target / "config.json").is_file():
        return target
    config = LlamaConfig(vocab_size=512, hidden_size=1024, intermediate_size=4096, num_hidden_layers=blocks,
                         num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=512,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(target)
    tiny_tokenizer().save_pretrained(target)
    return target


def _anon_mib(pid: int) -> float:
    """``RssAnon`` of ``pid`` in MiB (0 where there is none)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) / 1024 for line in f if line.startswith("RssAnon:")), 0.0)
    except OSError:
        return 0.0


def peak_of(argv: list) -> tuple[float, float, int, float]:
    """``(peak RSS in MiB, wall seconds, exit code, peak anonymous RSS in MiB)`` of one ``optima-prune`` process
    (the anonymous peak sampled every 10 ms)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "optima_plugin.cli", *argv, "--quiet"], stdout=subprocess.DEVNULL)
    anon = 0.0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        anon = max(anon, _anon_mib(proc.pid))
        time.sleep(0.01)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss / 1024, time.perf_counter() - t0, proc.returncode, anon


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depths", default="1,2,4", help="multiples of SmolLM2's 30 blocks (1 = SmolLM2 itself); "
                   "with --wide, blocks")
    p.add_argument("--wide", action="store_true", help="random Llamas of hidden 1024 / MLP 4096 instead")
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--weight_update", default="optima")
    p.add_argument("--workdir", help="where the models and outputs go (default: a temporary folder)")
    args = p.parse_args()
    depths = [int(d) for d in args.depths.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        smollm2 = None if args.wide else smollm2_folder(work / "cache")
        rows = []
        for depth in depths:
            if args.wide:
                model, name = wide_llama(depth, work / f"wide-{depth}"), f"Llama 1024/4096 x{depth}"
            else:
                model = smollm2 if depth == 1 else deeper_llama(smollm2, depth, work / f"llama-{depth}x")
                name = "SmolLM2-135M" if depth == 1 else f"random Llama {depth}x"
            size = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 2**20
            common = ["--model", str(model), "--prune_method", "wanda", "--weight_update", args.weight_update,
                      "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--no_checkpoint",
                      "--overwrite"]
            result = {}
            for mode in ("--no-stream", "--stream"):
                report = work / f"report-{depth}{mode}.json"
                peak, wall, rc, anon = peak_of(common + [mode, "--save_model", str(work / f"out-{depth}{mode}"),
                                                         "--report", str(report)])
                if rc != 0:
                    raise SystemExit(f"optima-prune {mode} on {name} exited with {rc}")
                cuda = json.loads(report.read_text())["memory"].get("cuda_peak_mb")
                result[mode] = (peak, wall, cuda, anon)
            rows.append((name, depth if args.wide else depth * SMOLLM2_BLOCKS, size, result))
            print(f"done: {name}", file=sys.stderr)
    print(f"\nwanda + {args.weight_update}, 50%, {args.nsamples} x {args.seqlen} calibration tokens; "
          "peak RSS of the whole process (load, prune, save); anonymous peak in brackets")
    print(f"{'model':22} {'blocks':>6} {'fp32 MiB':>9} {'in memory MiB':>16} {'streamed MiB':>14} "
          f"{'streamed/in-mem':>15} {'time ratio':>10}")
    first = rows[0][3]["--stream"][0]
    for name, blocks, size, r in rows:
        (mem, t_mem, _, a_mem), (st, t_st, _, a_st) = r["--no-stream"], r["--stream"]
        print(f"{name:22} {blocks:6d} {size:9.0f} {mem:7.0f} ({a_mem:6.0f}) {st:6.0f} ({a_st:5.0f}) "
              f"{st / mem:15.2f} {t_st / t_mem:10.2f}")
    last = rows[-1][3]["--stream"][0]
    print(f"streamed peak, deepest vs shallowest model: {last / first:.3f}x "
          f"(in memory: {rows[-1][3]['--no-stream'][0] / rows[0][3]['--no-stream'][0]:.3f}x)")
    cuda = [r["--stream"][2] for *_, r in rows]
    if any(c is not None for c in cuda):
        print("CUDA peak MiB (streamed):", ", ".join(f"{c:.0f}" for c in cuda if c is not None))


if __name__ == "__main__":
    main()
