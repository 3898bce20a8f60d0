"""Peak memory of a real pruning host alone vs the same host with OPTIMA (``optima-host``).

Runs the host's own, unmodified ``main.py`` twice through ``optima-host`` (this checkout's
``optima_plugin``): ``--weight_update none`` (the host's weights, under the same shims) and
``--weight_update optima``. Each run is a subprocess whose process tree's RSS is sampled every
20 ms (psutil). Prints, side by side: the host's own perplexity printout, peak RSS, wall time,
the extra RSS of OPTIMA over the host alone, and the bound that extra should stay under: one
block's dense linear weights (the seam's copy, in the model's dtype) plus that block's Hessians
(float32, one per distinct input: q/k/v share, gate/up share), computed from the model's config.

Hosts are fetched, never committed (CPU, a local model folder, pydoc text instead of the hub)::

    git clone https://github.com/locuslab/wanda /tmp/hosts/wanda
    git clone https://github.com/flobk/TRIM /tmp/hosts/TRIM
    python benchmarks/host_memory.py --host wanda --host_dir /tmp/hosts/wanda --model /tmp/smollm2-hf --nsamples 32
    python benchmarks/host_memory.py --host trim --host_dir /tmp/hosts/TRIM --model /tmp/smollm2-hf --nsamples 32

wanda: ``main.py --prune_method wanda --sparsity_ratio 0.5 --sparsity_type unstructured``;
trim: ``main.py --prune_method wanda --use_trim --sparsity_ratio 0.6 --sparsity_type unstructured --device cpu
--task wikitext``;
both with ``--host_data pydoc --host_seqlen 512 --host_dtype float32``. The two runs go in
parallel, one thread each (``--sequential`` to run one after the other); logs and the OPTIMA
report (``summary.dense_peak_bytes``) go to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
MiB = 2 ** 20
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
BLOCK = re.compile(r"pruning layer (\d+)")
PPL_START = re.compile(r"evaluat|nsamples \d+|wikitext", re.IGNORECASE)
PPL = re.compile(r"perplexity(?: on wikitext)?\s+([-+0-9.eE]+|nan|inf)", re.IGNORECASE)


def host_args(host: str, model: str, nsamples: int, out: Path, update: str, dtype: str, seqlen: int) -> list[str]:
    """The host's command line (after ``optima-host``) for one run."""
    common = ["--host_data", "pydoc", "--host_seqlen", str(seqlen), "--host_dtype", dtype,
              "--weight_update", update, "--optima_report", str(out / f"{host}_{update}.json")]
    if host == "wanda":
        return ["main.py", "--model", model, "--prune_method", "wanda", "--sparsity_ratio", "0.5",
                "--sparsity_type", "unstructured", "--nsamples", str(nsamples),
                "--save", str(out / f"{host}_{update}"), *common]
    return ["main.py", "--model", model, "--prune_method", "wanda", "--use_trim", "--sparsity_ratio", "0.6",
            "--sparsity_type", "unstructured", "--nsamples_calibration", str(nsamples),
            "--device", "cpu", "--task", "wikitext", *common]


def tree_rss(proc: psutil.Process) -> int:
    """RSS of a process and all its descendants (bytes)."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def anon_bytes(proc: psutil.Process) -> int:
    """Anonymous (not file-backed) resident bytes of ``proc`` (Linux smaps_rollup; 0 elsewhere)."""
    try:
        for line in open(f"/proc/{proc.pid}/smaps_rollup"):
            if line.startswith("Anonymous:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run(cmd: list[str], cwd: str, log: Path, threads: int) -> dict:
    """Run ``cmd``; peak RSS of its process tree (20 ms samples), wall time, the host's ppl line."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    t0 = time.perf_counter()
    phases: dict[str, int] = {}  # highest RSS while the host's last "pruning layer N" line said block N
    phases_anon: dict[str, int] = {}  # highest anonymous RSS of the main process in the same phases
    phase, read = "load", 0
    with open(log, "w") as fh:
        proc = psutil.Popen(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        peak, at, anon = 0, 0, 0
        while proc.poll() is None:
            try:
                rss = tree_rss(proc)
            except psutil.Error:
                rss = 0
            size = log.stat().st_size
            if size > read:
                with open(log, errors="replace") as lf:
                    lf.seek(read)
                    new = lf.read()
                read = size
                blocks = BLOCK.findall(new)
                if blocks:
                    phase = f"block {int(blocks[-1]):02d}"
                elif phase.startswith("block") and PPL_START.search(new):
                    phase = "evaluation"
            phases[phase] = max(phases.get(phase, 0), rss)
            phases_anon[phase] = max(phases_anon.get(phase, 0), anon_bytes(proc))
            if rss > peak:
                peak, at = rss, size  # how far the host's output had got at the peak
                anon = anon_bytes(proc)  # the rest: file-backed pages (libraries, the mapped checkpoint)
            time.sleep(0.02)
    wall = time.perf_counter() - t0
    text = log.read_text(errors="replace")
    found = PPL.findall(text)
    before = [ln for ln in text[:at].splitlines() if ln.strip()]
    return {"rc": proc.returncode, "peak": peak, "anon": anon, "wall": wall, "phases": phases, "phases_anon": phases_anon,
            "ppl": float(found[-1]) if found else None, "peak_after": before[-1].strip()[:90] if before else ""}


def block_bound(model: str, dtype: str) -> tuple[float, float]:
    """(one block's dense linear weights, that block's float32 Hessians), in MiB, from config.json."""
    cfg = json.loads((Path(model) / "config.json").read_text())
    d, f = cfg["hidden_size"], cfg["intermediate_size"]
    heads = cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or d // heads
    kv = cfg.get("num_key_value_heads") or heads
    # q, k, v, o, gate, up, down: (out, in)
    shapes = [(heads * hd, d), (kv * hd, d), (kv * hd, d), (d, heads * hd), (f, d), (f, d), (d, f)]
    weights = sum(o * i for o, i in shapes) * DTYPE_BYTES[dtype]
    hessians = (d * d + (heads * hd) ** 2 + d * d + f * f) * 4   # qkv, o, gate/up, down
    return weights / MiB, hessians / MiB


def solve_peak(model: str) -> float:
    """Peak memory (MiB above the start, Linux ``VmHWM``) of one OPTIMA solve of the model's largest linear
    (``down_proj``: hidden x intermediate, 50% Wanda-like mask, float32, pcg) on a random activation Hessian:
    the update's own working memory, which host+optima needs during a block on top of what the seam holds."""
    import torch

    from optima_plugin import reconstruct
    from optima_plugin.sparsity import row_mask

    cfg = json.loads((Path(model) / "config.json").read_text())
    r, d = cfg["hidden_size"], cfg["intermediate_size"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4 * d, d, generator=g) * torch.rand(d, generator=g)
    hessian = x.T @ x / x.shape[0]
    weight = torch.randn(r, d, generator=g)
    pruned = row_mask(weight.abs() * hessian.diagonal().sqrt(), 0.5)
    del x

    def hwm() -> int:
        return int(next(ln for ln in open("/proc/self/status") if ln.startswith("VmHWM")).split()[1]) * 1024

    def rss() -> int:
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # VmHWM := current RSS
    except OSError:
        return float("nan")
    start = rss()
    reconstruct(weight, pruned, hessian, solver="pcg")
    return (hwm() - start) / MiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", choices=["wanda", "trim"], required=True)
    ap.add_argument("--host_dir", required=True, help="a checkout of the host (its main.py)")
    ap.add_argument("--model", required=True, help="a local model folder (config.json, *.safetensors)")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPE_BYTES))
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    ap.add_argument("--sequential", action="store_true", help="one run after the other (default: in parallel)")
    ap.add_argument("--out", default="/tmp/host_memory", help="logs and reports")
    a = ap.parse_args()
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model = str(Path(a.model).resolve())

    res: dict[str, dict] = {}

    def one(update: str) -> None:
        cmd = [sys.executable, "-m", "optima_plugin.host.launcher",
               *host_args(a.host, model, a.nsamples, out, update, a.dtype, a.seqlen)]
        print(f"[{update}] (cd {a.host_dir} && optima-host {' '.join(cmd[3:])})", flush=True)
        res[update] = run(cmd, a.host_dir, out / f"{a.host}_{update}.log", a.threads)

    if a.sequential:
        for u in ("none", "optima"):
            one(u)
    else:
        ts = [threading.Thread(target=one, args=(u,)) for u in ("none", "optima")]
        [t.start() for t in ts]
        [t.join() for t in ts]

    w, h = block_bound(model, a.dtype)
    report = out / f"{a.host}_optima.json"
    dense = json.loads(report.read_text())["summary"]["dense_peak_bytes"] / MiB if report.exists() else float("nan")
    n, o = res["none"], res["optima"]
    fmt = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    print(f"\n{a.host} {Path(a.host_dir).name}/main.py, {model}, {a.dtype}, nsamples {a.nsamples}, "
          f"seqlen {a.seqlen}, {a.threads} thread(s) per run{'' if a.sequential else ', runs in parallel'}")
    print(f"{'run':<8} {'rc':>3} {'host ppl':>10} {'peak RSS MiB':>13} {'anon at peak':>13} {'wall s':>8}")
    for name, r in (("none", n), ("optima", o)):
        print(f"{name:<8} {r['rc']:>3} {fmt(r['ppl']):>10} {r['peak'] / MiB:>13.1f} {r['anon'] / MiB:>13.1f} "
              f"{r['wall']:>8.1f}")
    for name, r in (("none", n), ("optima", o)):
        print(f"peak of {name} after the host printed: {r['peak_after']}")
    # RSS counts the checkpoint's pages mapped by safetensors (clean, file-backed, reclaimable): the seam's
    # load-time fingerprints touch every weight's pages at once, the host alone touches them block by block,
    # so RSS differs by up to the model's size early in the run for no memory used. Anonymous RSS does not.
    print("highest RSS / anonymous RSS per phase of the host's loop (MiB; block N: from its 'pruning layer N' "
          "line to the next)")
    print(f"{'phase':<11} {'none':>8} {'optima':>8} {'extra':>8}   {'anon none':>9} {'optima':>8} {'extra':>8}")
    shared = [k for k in sorted(n["phases"]) if k in o["phases"]]
    extras = []
    for k in shared:
        e = (o["phases"][k] - n["phases"][k]) / MiB
        ea = (o["phases_anon"][k] - n["phases_anon"][k]) / MiB
        extras.append(ea) if k.startswith("block") else None
        print(f"{k:<11} {n['phases'][k] / MiB:>8.1f} {o['phases'][k] / MiB:>8.1f} {e:>+8.1f}   "
              f"{n['phases_anon'][k] / MiB:>9.1f} {o['phases_anon'][k] / MiB:>8.1f} {ea:>+8.1f}")
    if extras:
        extras.sort()
        print(f"anonymous extra over the blocks' phases: median {extras[len(extras) // 2]:+.1f} MiB, "
              f"max {extras[-1]:+.1f} MiB ({len(extras)} blocks)")
    extra = (o["peak"] - n["peak"]) / MiB
    print(f"extra RSS (optima - none): {extra:.1f} MiB (anonymous: {(o['anon'] - n['anon']) / MiB:.1f} MiB); "
          f"bound: one block's dense linears {w:.1f} MiB + its Hessians {h:.1f} MiB = {w + h:.1f} MiB "
          f"-> {'within' if extra <= w + h else 'OVER'}")
    print(f"seam's dense_peak_bytes: {dense:.1f} MiB; time ratio optima/none: {o['wall'] / n['wall']:.2f}")
    print(f"one solve of the largest linear alone (its working memory): {solve_peak(model):.1f} MiB")
    sys.exit(0 if n["rc"] == 0 and o["rc"] == 0 else 1)


if __name__ == "__main__":
    main()
