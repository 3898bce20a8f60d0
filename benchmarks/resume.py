"""Interrupted + resumed run vs an uninterrupted one, as a user would do it: ``optima-prune`` processes.

0. ``optima-prune ... --save_model N --no_checkpoint`` runs to the end (the cost of checkpoints);
1. ``optima-prune ... --save_model A`` runs to the end;
2. the same command with ``--save_model B`` gets Ctrl-C (SIGINT) once ``--interrupt_after`` blocks
   are checkpointed, and stops after the block it is on;
3. the same command again resumes from ``B.checkpoint`` and saves ``B``.

Prints the wall times side by side and the max abs difference between A's and B's weights
(0 on CPU: the resumed run is bit-identical)::

    OMP_NUM_THREADS=1 python benchmarks/resume.py                       # SmolLM2-135M, the demo's settings
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file


def run(argv: list, interrupt_after: int = 0, checkpoint: Path = None) -> tuple[float, int]:
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "optima_plugin.cli", *argv, "--quiet"])
    sent = False
    while proc.poll() is None:
        time.sleep(0.5)
        state = checkpoint / "state.json" if checkpoint else None
        if interrupt_after and not sent and state is not None and state.exists():
            if json.loads(state.read_text())["next_block"] >= interrupt_after:
                proc.send_signal(signal.SIGINT)
                sent = True
    return time.perf_counter() - t0, proc.returncode


def max_abs_diff(a: Path, b: Path) -> float:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    return max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--interrupt_after", type=int, default=15, help="send Ctrl-C once this many blocks are done")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more optima-prune arguments")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        common = ["--prune_method", "wanda", "--weight_update", "optima", "--sparsity_ratio", "0.5", *args.extra]
        t_bare, rc = run(common + ["--save_model", str(out / "N"), "--no_checkpoint"])
        assert rc == 0, rc
        t_plain, rc = run(common + ["--save_model", str(out / "A")])
        assert rc == 0, rc
        ckpt = out / "B.checkpoint"
        t_cut, rc_cut = run(common + ["--save_model", str(out / "B")], args.interrupt_after, ckpt)
        done = json.loads((ckpt / "state.json").read_text())["next_block"]
        t_resume, rc = run(common + ["--save_model", str(out / "B")])
        assert rc == 0, rc
        diff = max_abs_diff(out / "A", out / "B")
        print(f"uninterrupted, no checkpoint {t_bare:8.1f} s")
        print(f"uninterrupted run            {t_plain:8.1f} s  (checkpoint cost: {t_plain / t_bare:.3f}x)")
        print(f"interrupted (exit {rc_cut}) after {done} blocks {t_cut:8.1f} s")
        print(f"resumed run                  {t_resume:8.1f} s")
        print(f"interrupted + resumed / uninterrupted: {(t_cut + t_resume) / t_plain:.3f}")
        print(f"max abs weight difference: {diff:g}  (checkpoint removed: {not ckpt.exists()}; "
              f"without checkpoints: {max_abs_diff(out / 'A', out / 'N'):g})")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
