"""Side by side with llm-compressor on the same SmolLM2-135M, the same calibration windows, runs alternating.

Engines (each in its own subprocess, llm-compressor with its own venv's python):

* ``llmc-sparsegpt``: llm-compressor's ``oneshot`` with ``SparseGPTModifier`` (its sequential pipeline);
* ``sparsegpt``: ours, SparseGPT with its own update (``--weight_update native``);
* ``sparsegpt+optima``: ours, SparseGPT's mask, the OPTIMA update (warm-started from SparseGPT's);
* ``sparsegpt+optima-cold``: the same, not warm-started (the solver starts from the mask and factorises ``Hd``
  again, as before the warm start): the before/after of the warm start on the same windows;
* ``wanda``: ours, Wanda mask only (``--weight_update none``);
* ``wanda+optima``: ours, Wanda's mask, the OPTIMA update.

Every engine prunes the 7 linears of each of the 30 blocks (not ``lm_head``) on the same ``nsamples x seqlen``
pydoc windows (drawn once here, seed 0, and handed to llm-compressor as token ids; ours draws them itself and
checks they are the same). Each run reports the CPU seconds of its process around the prune call (process time:
a loaded machine stretches wall time, much less CPU time) and the wall seconds. Ratios use CPU seconds, median
over ``--repeats`` alternating rounds: SparseGPT+OPTIMA / llm-compressor's SparseGPT (target <= 1.0), and
Wanda+OPTIMA / Wanda (target <= 1.2).

    python3 -m venv /work/venv-llmc && . /work/venv-llmc/bin/activate && pip install torch==2.13.0 llmcompressor
    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/vs_llmcompressor.py --pattern 2:4 --llmc_python /work/venv-llmc/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENGINES = ("llmc-sparsegpt", "sparsegpt", "sparsegpt+optima", "sparsegpt+optima-cold", "wanda", "wanda+optima")
OURS = {"sparsegpt": ("sparsegpt", "native"), "sparsegpt+optima": ("sparsegpt", "optima"),
        "sparsegpt+optima-cold": ("sparsegpt", "optima"),
        "wanda": ("wanda", "none"), "wanda+optima": ("wanda", "optima")}


def _pattern_args(pattern: str) -> dict:
    """Ours: ``sparsity_type``/``sparsity_ratio``; llm-compressor: ``mask_structure``/``sparsity``."""
    if ":" in pattern:
        n, m = (int(x) for x in pattern.split(":"))
        return dict(sparsity_type=pattern, sparsity_ratio=n / m, mask_structure=pattern)
    ratio = float(pattern)
    return dict(sparsity_type="unstructured", sparsity_ratio=ratio, mask_structure="0:0")


def prepare(workdir: Path, nsamples: int, seqlen: int) -> tuple[Path, Path]:
    """The model as a plain HF folder (both engines load it) and the windows (``.pt``), made once."""
    import torch

    from optima_plugin.data import get_calibration
    from optima_plugin.loading import default_model, load_model

    model_dir, windows = workdir / "smollm2-hf", workdir / f"windows-{nsamples}x{seqlen}.pt"
    if not (model_dir / "config.json").exists() or not windows.exists():
        directory, gguf = default_model()
        model, tok = load_model(directory, gguf_file=gguf)
        model.save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        torch.save(get_calibration("pydoc", tok, nsamples, seqlen, 0), windows)
    return model_dir, windows


def worker_ours(engine: str, model_dir: str, windows: str, pattern: str) -> dict:
    """One prune with ours; CPU and wall seconds of the ``prune`` call."""
    import torch

    from optima_plugin import prune
    from optima_plugin.data import get_calibration
    from optima_plugin.loading import load_model

    tokens = torch.load(windows)
    model, tok = load_model(model_dir)
    nsamples, seqlen = tokens.shape
    if not torch.equal(get_calibration("pydoc", tok, nsamples, seqlen, 0), tokens):
        raise SystemExit("ours would calibrate on other windows than llm-compressor")
    method, update = OURS[engine]
    if engine.endswith("-cold"):  # no warm start: neither the selector's weights nor its inverse
        import optima_plugin.updaters as updaters

        updaters.warm_start = lambda selection: None
    p = _pattern_args(pattern)
    cpu, wall = time.process_time(), time.perf_counter()
    report = prune(model, tok, prune_method=method, weight_update=update, sparsity_type=p["sparsity_type"],
                   sparsity_ratio=p["sparsity_ratio"], nsamples=nsamples, seqlen=seqlen, seed=0,
                   calibration_dataset="pydoc", device="cpu", progress=False)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    t = report["timings"]
    return dict(cpu=cpu, wall=wall, solver_iterations=t.get("solver_iterations"), phases=t.get("phases"),
                sparsity=report.get("summary", {}).get("sparsity", report.get("sparsity")))


def worker_llmc(model_dir: str, windows: str, pattern: str) -> dict:
    """One prune with llm-compressor's SparseGPT; CPU and wall seconds of the ``oneshot`` call."""
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokens = torch.load(windows)
    nsamples, seqlen = tokens.shape
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    data = Dataset.from_dict({"input_ids": tokens.tolist(), "attention_mask": torch.ones_like(tokens).tolist()})
    p = _pattern_args(pattern)
    recipe = SparseGPTModifier(sparsity=p["sparsity_ratio"], mask_structure=p["mask_structure"], targets=["Linear"],
                               ignore=["re:.*lm_head"], block_size=128, dampening_frac=0.01)
    cpu, wall = time.process_time(), time.perf_counter()
    oneshot(model=model, tokenizer=tok, dataset=data, recipe=recipe, num_calibration_samples=nsamples,
            max_seq_length=seqlen, shuffle_calibration_samples=False, pipeline="sequential")
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    zeros = sum(int((m.weight == 0).sum()) for m in linears)
    return dict(cpu=cpu, wall=wall, sparsity=zeros / sum(m.weight.numel() for m in linears))


def run_one(engine: str, model_dir: Path, windows: Path, pattern: str, llmc_python: str) -> dict:
    python = llmc_python if engine.startswith("llmc") else sys.executable
    env = dict(os.environ)
    if engine.startswith("llmc"):
        env.pop("PYTHONPATH", None)  # llm-compressor's venv only
    cmd = [python, str(Path(__file__).resolve()), "--worker", engine, "--model_dir", str(model_dir),
           "--windows", str(windows), "--pattern", pattern]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{engine} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pattern", action="append", help="0.5, 0.7 or 2:4 (repeatable; default all three)")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=1, help="alternating rounds of every engine")
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--llmc_python", default="/work/venv-llmc/bin/python")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "optima-vs-llmc"))
    ap.add_argument("--json", default=None, help="also write every run's figures here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model_dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--windows", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        res = worker_llmc(args.model_dir, args.windows, args.pattern[0]) if args.worker.startswith("llmc") \
            else worker_ours(args.worker, args.model_dir, args.windows, args.pattern[0])
        print(json.dumps(res))
        return
    engines = [e for e in args.engines.split(",") if e]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        raise SystemExit(f"--engines: unknown {unknown}; known: {', '.join(ENGINES)}")
    if "llmc-sparsegpt" in engines and not Path(args.llmc_python).exists():
        raise SystemExit(f"--llmc_python {args.llmc_python} not found: make llm-compressor's venv (see the docstring)")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir, windows = prepare(workdir, args.nsamples, args.seqlen)
    runs: dict = {}
    print(f"SmolLM2-135M, {args.nsamples} x {args.seqlen} pydoc windows, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}; CPU s / wall s per run", flush=True)
    for pattern in args.pattern or ["0.5", "0.7", "2:4"]:
        for rnd in range(args.repeats):
            for engine in engines:
                res = run_one(engine, model_dir, windows, pattern, args.llmc_python)
                runs.setdefault(pattern, {}).setdefault(engine, []).append(res)
                extra = f", {res['solver_iterations']} solver iterations" if res.get("solver_iterations") else ""
                print(f"  {pattern:>4} round {rnd + 1} {engine:17} {res['cpu']:7.1f} CPU s {res['wall']:7.1f} wall s"
                      f"{extra}", flush=True)
        cpu = {e: statistics.median(r["cpu"] for r in rs) for e, rs in runs[pattern].items()}
        wall = {e: statistics.median(r["wall"] for r in rs) for e, rs in runs[pattern].items()}
        print(f"| {pattern} | " + " | ".join(f"{e} {cpu[e]:.0f} s ({wall[e]:.0f} s wall)" for e in engines) + " |")
        if "sparsegpt+optima" in cpu and "llmc-sparsegpt" in cpu:
            print(f"  SparseGPT+OPTIMA / llm-compressor SparseGPT: {cpu['sparsegpt+optima'] / cpu['llmc-sparsegpt']:.2f}"
                  " (target <= 1.0)")
        if "wanda+optima" in cpu and "wanda" in cpu:
            print(f"  Wanda+OPTIMA / Wanda: {cpu['wanda+optima'] / cpu['wanda']:.2f} (target <= 1.2)", flush=True)
        if args.json:  # after every pattern: a long run interrupted keeps what it measured
            Path(args.json).write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
