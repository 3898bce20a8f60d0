"""``--stream`` under a memory cap: a model twice as large as the memory the prune is allowed is pruned,
and its blocks equal the in-memory prune of a smaller twin (the same model's first blocks).

The cap is on the whole process's peak resident memory (the kernel's high-water mark, ``VmHWM``:
anonymous and file-backed pages, no transient missed) above what the process holds once its
libraries are imported (python, torch, transformers: ~280 MB that no model changes). A sampler kills
the process as soon as it goes above the cap. A cgroup ``memory.max`` would be the same test without
the sampler, but is seldom writable where tests run; ``RLIMIT_AS`` counts torch's virtual reservations.

The allowance is measured, not copied from a run: the streamed prune of the twin (2 blocks) gives the
peak one block needs (its weights, Hessians, the selection's work, the calibration activations, the
embeddings and head); the deep model (14 blocks, the same first 2) may use that plus :data:`MARGIN`,
and its checkpoint is at least twice that. Had each block left even a tenth of its weights behind,
the 12 extra blocks would have gone past it; before glibc's mmap threshold was fixed for streamed runs
(:func:`~optima_plugin.memory.fix_mmap_threshold`) the per-block peak varied with the heap's layout and
the deep model was killed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig

from optima_plugin import prune
from optima_plugin.testing import tiny_tokenizer

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc")

HIDDEN, MLP = 1024, 1024
BLOCK_BYTES = 4 * (4 * HIDDEN * HIDDEN + 3 * HIDDEN * MLP + 2 * HIDDEN)  # float32: 29 MB
TWIN, DEEP = 2, 14
#: what may legitimately grow with depth (the report's per-layer entries and the output index: ~1 KB per
#: linear, 7 per block) and the noise of two processes' library pages, far below the 12 extra blocks' 352 MB
MARGIN = BLOCK_BYTES // 2
IN_MEMORY = dict(prune_method="wanda", weight_update="none", nsamples=2, seqlen=64, calibration_dataset="pydoc",
                 device="cpu", progress=False)
ARGS = [*(a for k, v in IN_MEMORY.items() if k != "progress" for a in (f"--{k}", str(v))), "--no_dense_eval",
        "--no_checkpoint", "--quiet"]

#: the CLI, reporting on its first line once its libraries are imported (the baseline of the cap)
WRAPPER = """
import os, sys
import optima_plugin.api, optima_plugin.cli, optima_plugin.pipeline, optima_plugin.streaming
from transformers import LlamaForCausalLM
print("imported", flush=True)
os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
sys.exit(optima_plugin.cli.main(sys.argv[1:]))
"""


def _status(pid: int, field: str) -> int:
    """``field`` of ``/proc/pid/status`` in bytes (0 once the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _run_capped(argv: list, allowance: float = float("inf")) -> tuple[int, int]:
    """Run the CLI; kill it once its peak RSS is ``allowance`` bytes above its RSS after the imports.
    ``(exit code, peak RSS above that baseline)``; the exit code is -9 when it was killed."""
    proc = subprocess.Popen([sys.executable, "-c", WRAPPER, *argv], stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"imported"
    base = _status(proc.pid, "VmRSS")
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], _status(proc.pid, "VmHWM") - base)
            if peak[0] > allowance:
                proc.kill()
                return
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = proc.wait(timeout=600)
    sampler.join()
    return code, peak[0]


def _save(model, path: Path) -> Path:
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.mark.slow
def test_streamed_prune_of_a_model_twice_the_memory_allowed_finishes_and_matches_its_twin(tmp_path):
    config = LlamaConfig(vocab_size=512, hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=DEEP,
                         num_attention_heads=HIDDEN // 64, num_key_value_heads=HIDDEN // 64,
                         max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    deep = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    deep_dir = _save(deep, tmp_path / "deep")
    deep.model.layers = deep.model.layers[:TWIN]  # the twin: the same embeddings, first blocks, norm and head
    deep.config.num_hidden_layers = TWIN
    twin_dir = _save(deep, tmp_path / "twin")
    del deep

    code, needed = _run_capped(["--model", str(twin_dir), "--stream", "--save_model", str(tmp_path / "t"), *ARGS])
    assert code == 0
    allowance = needed + MARGIN
    checkpoint = sum(f.stat().st_size for f in deep_dir.glob("*.safetensors"))
    assert checkpoint >= 2 * allowance, (checkpoint, allowance)  # the model is larger than the memory allowed

    code, _ = _run_capped(["--model", str(deep_dir), "--stream", "--save_model", str(tmp_path / "deep-out"),
                              *ARGS], allowance)
    assert code == 0, f"killed above {allowance / 2**20:.0f} MiB (twin: {needed / 2**20:.0f} MiB)"

    twin = AutoModelForCausalLM.from_pretrained(twin_dir, dtype=torch.float32).eval()  # in memory, in this process
    prune(twin, tiny_tokenizer(), **IN_MEMORY)
    twin = twin.state_dict()
    out = {}
    for f in (tmp_path / "deep-out").glob("*.safetensors"):
        out.update(load_file(f))
    # a block's pruned weights depend on the blocks before it only: the twin's are the deep model's first ones
    assert twin.keys() <= out.keys()
    assert all(torch.equal(out[k], twin[k]) for k in twin), [k for k in twin if not torch.equal(out[k], twin[k])]
    dense = load_file(deep_dir / "model.safetensors")
    assert out.keys() == dense.keys()
    last = f"model.layers.{DEEP - 1}.mlp.down_proj.weight"  # the deep model's last block is pruned too
    assert (out[last] == 0).float().mean().item() == 0.5 and (dense[last] == 0).float().mean().item() < 0.01


def test_the_checkpoint_fingerprint_keeps_nothing_of_the_files_resident(tmp_path):
    """The fingerprint reads 8 rows of each block tensor (:data:`~optima_plugin.checkpoint.SAMPLE_ROWS`); read
    through a memory map, each row faulted in the read-ahead around it and all of it stayed resident while
    the file was open (~20 MB per block of a 1024-wide Llama at start-up, growing with depth)."""
    from optima_plugin.checkpoint import SAMPLE_ROWS, weights_fingerprint
    from optima_plugin.streaming import open_streamed

    blocks = 4
    config = LlamaConfig(vocab_size=512, hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=blocks,
                         num_attention_heads=HIDDEN // 64, num_key_value_heads=HIDDEN // 64,
                         max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    source = _save(AutoModelForCausalLM.from_config(config, dtype=torch.float32), tmp_path / "src")
    stream, _ = open_streamed(str(source))
    first = weights_fingerprint(stream.model, stream)  # touches the embeddings and head (resident from then on)
    # what the fingerprint must read: SAMPLE_ROWS rows of each of a block's 7 matrices (at most 1024 float32
    # each), its two norms; 4 blocks: 0.26 MB. Twice that plus 1 MiB for the hash's and Python's own buffers.
    needed = blocks * (7 * SAMPLE_ROWS * max(HIDDEN, MLP) * 4 + 2 * HIDDEN * 4)
    base = _status(os.getpid(), "VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # the high-water mark starts again from here
    except OSError:
        pytest.skip("cannot reset this process's peak RSS (/proc/self/clear_refs)")
    assert weights_fingerprint(stream.model, stream) == first
    grew = _status(os.getpid(), "VmHWM") - base
    assert grew <= 2 * needed + 2**20, f"{grew / 2**20:.1f} MiB"
