"""A checkpoint is trusted only when it should be: the weights it was made from, one run at a time, removals
and writes cut short at any moment, damaged files and failed writes as one line (issue 24, items 8-11)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM

from optima_plugin import checkpoint as checkpoint_module
from optima_plugin import cli, hookimpl, prune
from optima_plugin.checkpoint import Checkpoint, RunInterrupted
from optima_plugin.streaming import open_streamed
from optima_plugin.testing import tiny_model, tiny_tokenizer
from conftest import with_plugin

FAST = dict(nsamples=4, seqlen=32, calibration_dataset="pydoc", device="cpu", progress=False)
ARGV = ["--seqlen", "32", "--nsamples", "4", "--calibration_dataset", "pydoc", "--device", "cpu", "--quiet"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


class _AtBlock:
    """A plugin calling ``action()`` once block ``at`` is done (to interrupt, crash or race a run)."""

    def __init__(self, at, action):
        self.at, self.action = at, action

    @hookimpl
    def optima_block_done(self, index, num_blocks, seconds):
        if index == self.at:
            self.action()


def _crash():
    raise RuntimeError("power cut")


def _ctrl_c():
    os.kill(os.getpid(), __import__("signal").SIGINT)


def _fine_tune(model) -> None:
    """Change the weights of block 2 only (not the embeddings): what a fine-tune saved in place does."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        w = model.model.layers[2].mlp.down_proj.weight
        w.add_(1e-3 * torch.randn(w.shape, generator=g))


def _no_load(*a, **k):
    pytest.fail("the model was loaded before the checkpoint was checked")


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("optima-prune: error:"), err
    return err


# -- item 8: the weights are part of the run's identity ----------------------------------------------------


def test_checkpoint_of_weights_changed_in_memory_is_refused(tmp_path, tokenizer):
    ckpt = tmp_path / "ckpt"
    base = tiny_model("llama")
    with pytest.raises(RunInterrupted):
        with_plugin(_AtBlock(0, _ctrl_c), lambda: prune(copy.deepcopy(base), tokenizer, checkpoint_dir=str(ckpt),
                                                         **FAST))
    tuned = copy.deepcopy(base)
    _fine_tune(tuned)
    with pytest.raises(ValueError, match="differs in model_fingerprint"):
        prune(tuned, tokenizer, checkpoint_dir=str(ckpt), **FAST)
    assert prune(copy.deepcopy(base), tokenizer, checkpoint_dir=str(ckpt), **FAST)["resumed_from_block"] == 1


def test_checkpoint_of_weights_changed_at_the_same_path_is_refused_by_the_cli(tiny_dir, tmp_path, capsys):
    """The issue's repro: prune a folder, stop after block 0, save a fine-tune into the same folder, rerun."""
    ckpt = tmp_path / "ckpt"
    argv = ["--model", str(tiny_dir), "--checkpoint_dir", str(ckpt)] + ARGV
    assert with_plugin(_AtBlock(0, _ctrl_c), lambda: cli.main(argv)) == 130
    assert json.loads((ckpt / "state.json").read_text())["next_block"] == 1
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    _fine_tune(model)
    model.save_pretrained(tiny_dir)
    capsys.readouterr()
    assert cli.main(argv) == 2
    assert "differs in model_fingerprint" in _one_line_error(capsys)


def test_streamed_checkpoint_of_changed_files_is_refused(tmp_path, tokenizer):
    source = tmp_path / "src"
    base = tiny_model("llama")
    base.save_pretrained(source)
    tokenizer.save_pretrained(source)
    options = dict(FAST, save_model=str(tmp_path / "out"))
    with pytest.raises(RuntimeError, match="power cut"):
        with_plugin(_AtBlock(0, _crash), lambda: prune(open_streamed(str(source))[0], tokenizer, **options))
    _fine_tune(base)
    base.save_pretrained(source)
    with pytest.raises(ValueError, match="differs in model_fingerprint"):
        prune(open_streamed(str(source))[0], tokenizer, **options)


def test_fingerprint_reads_every_weight_of_an_in_memory_model():
    """One changed entry anywhere (here the last one of the last block) changes the fingerprint."""
    a = tiny_model("llama")
    b = copy.deepcopy(a)
    with torch.no_grad():
        b.model.layers[2].mlp.down_proj.weight[-1, -1] += 1.0
    assert checkpoint_module.weights_fingerprint(a) == checkpoint_module.weights_fingerprint(copy.deepcopy(a))
    assert checkpoint_module.weights_fingerprint(a) != checkpoint_module.weights_fingerprint(b)


# -- item 9: one run at a time -----------------------------------------------------------------------------


def _cli_subprocess(argv: list, *, prelude: str = "", timeout: float = 300) -> subprocess.CompletedProcess:
    code = textwrap.dedent(f"""
        import sys
        {prelude}
        from optima_plugin.cli import main
        sys.exit(main({argv!r}))
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)


def test_second_run_on_the_same_save_model_refuses_at_once_naming_the_first(tiny_dir, tmp_path, tokenizer):
    out = tmp_path / "out"
    seen = {}

    def second_run():
        seen["run"] = _cli_subprocess(["--model", str(tiny_dir), "--save_model", str(out)] + ARGV)

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    first = with_plugin(_AtBlock(0, second_run),
                         lambda: prune(model, tokenizer, save_model=str(out), model_path=str(tiny_dir), **FAST))
    run = seen["run"]
    assert run.returncode == 2, run.stderr[-2000:]
    err = run.stderr.strip().splitlines()
    assert len(err) == 1 and f"is in use by another optima-prune run (PID {os.getpid()} " in err[0], err
    assert first["saved_to"] == str(out) and (out / "model.safetensors").is_file()  # the first run went on
    assert not (tmp_path / "out.checkpoint").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tiny"]  # the lock files are gone


def test_lock_left_by_a_killed_run_is_taken_over(tmp_path, tokenizer):
    from optima_plugin.lock import lock_path

    out = tmp_path / "out"
    stale = lock_path(str(tmp_path / "out.checkpoint"))
    stale.write_text('{"pid": 999999999, "host": "gone", "started": "yesterday"}')  # its flock died with it
    prune(tiny_model("llama"), tokenizer, save_model=str(out), **FAST)
    assert (out / "model.safetensors").is_file() and not stale.exists()


def test_lock_is_held_across_processes_and_names_the_holder(tmp_path):
    from optima_plugin.lock import RunLocked, locked

    folder = str(tmp_path / "ckpt")
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from optima_plugin.lock import locked
        with locked({folder!r}, "--checkpoint_dir"):
            print("held", flush=True)
            sys.stdin.read()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLocked, match=rf"--checkpoint_dir {folder} is in use by .*PID {holder.pid} "):
            with locked(folder, "--checkpoint_dir"):
                pass
    finally:
        holder.communicate("", timeout=60)
    with locked(folder, "--checkpoint_dir"):  # free once the holder ended
        pass


# -- item 10: cut short at any moment ----------------------------------------------------------------------


def _interrupted_checkpoint(tmp_path, tokenizer, at: int = 1) -> Path:
    """A default checkpoint beside ``tmp_path/out`` of a run that crashed after block ``at``."""
    with pytest.raises(RuntimeError, match="power cut"):
        with_plugin(_AtBlock(at, _crash), lambda: prune(tiny_model("llama"), tokenizer,
                                                         save_model=str(tmp_path / "out"), **FAST))
    ckpt = tmp_path / "out.checkpoint"
    assert json.loads((ckpt / "state.json").read_text())["next_block"] == at + 1
    return ckpt


def test_removal_killed_after_a_successful_save_leaves_nothing_to_resume(tmp_path, tokenizer, monkeypatch):
    """A kill while the default checkpoint is deleted (after the first file went) must not leave a state
    naming deleted blocks: a rerun (--overwrite, the model is saved) prunes and saves again."""
    out = tmp_path / "out"
    real_unlink = Path.unlink
    calls = []

    class Killed(BaseException):
        pass

    def unlink_then_die(self, missing_ok=False):
        if self.parent.name == "out.checkpoint":  # (patched in only while the checkpoint is removed)
            calls.append(self.name)
            if len(calls) == 2:
                raise Killed  # SIGKILL between two deletions
        return real_unlink(self, missing_ok=missing_ok)

    real_remove = Checkpoint.remove

    def remove(self):
        monkeypatch.setattr(Path, "unlink", unlink_then_die)
        real_remove(self)

    with monkeypatch.context() as m:
        m.setattr(Checkpoint, "remove", remove)
        with pytest.raises(Killed):
            prune(tiny_model("llama"), tokenizer, save_model=str(out), **FAST)
    monkeypatch.setattr(Path, "unlink", real_unlink)
    assert (out / "model.safetensors").is_file() and len(calls) == 2
    ckpt = tmp_path / "out.checkpoint"
    # the state was first rewritten to name no pruned block, and is deleted last: nothing to resume
    assert json.loads((ckpt / "state.json").read_text())["next_block"] == 0
    report = prune(tiny_model("llama"), tokenizer, save_model=str(out), overwrite=True, **FAST)
    assert report["resumed_from_block"] is None and not ckpt.exists()


def test_orphan_of_a_killed_block_write_is_removed(tmp_path, tokenizer):
    """A run killed while writing a block file leaves ``.block_*.tmp``: the next run removes it, and the
    default checkpoint is then removed whole (else a later --overwrite run refuses the folder)."""
    ckpt = _interrupted_checkpoint(tmp_path, tokenizer)
    orphan = ckpt / ".block_00002.safetensors.k3j_x9ab.tmp.safetensors"
    orphan.write_bytes(b"\0" * 100)
    report = prune(tiny_model("llama"), tokenizer, save_model=str(tmp_path / "out"), **FAST)
    assert report["resumed_from_block"] == 2
    assert not ckpt.exists()
    prune(tiny_model("llama"), tokenizer, save_model=str(tmp_path / "out"), overwrite=True, **FAST)


def test_folder_of_a_run_killed_in_its_first_block_write_is_reused(tmp_path, tokenizer):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / ".block_00000.safetensors.a1b2c3d4.tmp.safetensors").write_bytes(b"\0" * 100)
    report = prune(tiny_model("llama"), tokenizer, checkpoint_dir=str(ckpt), **FAST)
    assert report["resumed_from_block"] is None
    assert sorted(p.name for p in ckpt.iterdir()) == ["block_00000.safetensors", "block_00001.safetensors",
                                                     "block_00002.safetensors", "state.json"]


def test_folder_of_files_named_like_ours_without_state_is_never_cleared(tmp_path, tokenizer):
    """Only a folder whose state.json says it is this tool's is ever cleared: a user's folder of files that merely
    look like ours (HF shards named model-00001-of-00002.safetensors) is refused and left as it was."""
    folder = tmp_path / "shards"
    folder.mkdir()
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "block_00000.safetensors"):
        (folder / name).write_bytes(b"user data")
    with pytest.raises(ValueError, match="did not write"):
        prune(tiny_model("llama"), tokenizer, checkpoint_dir=str(folder), **FAST)
    assert sorted(p.name for p in folder.iterdir()) == ["block_00000.safetensors", "model-00001-of-00002.safetensors",
                                                       "model-00002-of-00002.safetensors"]
    assert all(p.read_bytes() == b"user data" for p in folder.iterdir())


def test_state_is_written_before_any_block_file(tmp_path, tokenizer):
    """The folder is marked as this tool's (state.json, no block pruned) before the first block is written."""
    ckpt = tmp_path / "ckpt"
    seen = []

    class First:
        @hookimpl
        def optima_block_started(self, index, num_blocks):
            if index == 0:
                seen.append(sorted(p.name for p in ckpt.iterdir()))
                seen.append(json.loads((ckpt / "state.json").read_text())["next_block"])

    with_plugin(First(), lambda: prune(tiny_model("llama"), tokenizer, checkpoint_dir=str(ckpt), **FAST))
    assert seen == [["state.json"], 0]


def test_state_naming_a_missing_block_fails_before_the_model_loads(tiny_dir, tmp_path, tokenizer, capsys,
                                                                   monkeypatch):
    ckpt = _interrupted_checkpoint(tmp_path, tokenizer)
    (ckpt / "block_00001.safetensors").unlink()
    monkeypatch.setattr(cli, "_load", _no_load)
    capsys.readouterr()
    assert cli.main(["--model", str(tiny_dir), "--save_model", str(tmp_path / "out")] + ARGV) == 2
    err = _one_line_error(capsys)
    assert "block_00001.safetensors is missing" in err and "delete that folder" in err, err


# -- item 11: damaged files and failed writes: one line --------------------------------------------------


def test_truncated_block_file_is_one_line_before_the_model_loads(tiny_dir, tmp_path, tokenizer, capsys,
                                                                 monkeypatch):
    ckpt = _interrupted_checkpoint(tmp_path, tokenizer)
    block = ckpt / "block_00001.safetensors"
    block.write_bytes(block.read_bytes()[:-1000])
    monkeypatch.setattr(cli, "_load", _no_load)
    capsys.readouterr()
    assert cli.main(["--model", str(tiny_dir), "--save_model", str(tmp_path / "out")] + ARGV) == 2
    err = _one_line_error(capsys)
    assert "block_00001.safetensors is damaged or truncated" in err and str(ckpt) in err, err


def test_truncated_inputs_file_is_named(tmp_path, tokenizer):
    ckpt = _interrupted_checkpoint(tmp_path, tokenizer)
    inputs = ckpt / "inputs_00002.safetensors"
    inputs.write_bytes(inputs.read_bytes()[:20])
    with pytest.raises(ValueError, match="inputs_00002.safetensors is damaged or truncated"):
        prune(tiny_model("llama"), tokenizer, save_model=str(tmp_path / "out"), **FAST)


@pytest.mark.parametrize("edit, match", [
    (lambda s: s.pop("layers"), "state.json is damaged \\(no 'layers'\\)"),
    (lambda s: s.update(next_block="2"), "'next_block' is not a number"),
    (lambda s: s.update(next_block=9), "next_block 9 is not within 0..num_blocks 3"),
    (lambda s: s.update(ratios=[0.5]), "'ratios' is not a dict"),
    (lambda s: s.update(world_size=0), "'world_size' is not a positive number"),
])
def test_damaged_state_is_one_line_before_the_model_loads(edit, match, tiny_dir, tmp_path, tokenizer, capsys,
                                                          monkeypatch):
    ckpt = _interrupted_checkpoint(tmp_path, tokenizer)
    state = json.loads((ckpt / "state.json").read_text())
    edit(state)
    (ckpt / "state.json").write_text(json.dumps(state))
    monkeypatch.setattr(cli, "_load", _no_load)
    capsys.readouterr()
    assert cli.main(["--model", str(tiny_dir), "--save_model", str(tmp_path / "out")] + ARGV) == 2
    err = _one_line_error(capsys)
    assert __import__("re").search(match, err) and "delete that folder" in err, err


def test_checkpoint_write_failure_is_one_line_and_keeps_the_finished_blocks(tiny_dir, tmp_path, capsys,
                                                                            monkeypatch):
    real = checkpoint_module.save_file

    def disk_full_at_block_2(tensors, path, *a, **k):
        if ".block_00002.safetensors." in path:
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                  'message: "No space left on device" })')
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(checkpoint_module, "save_file", disk_full_at_block_2)
    ckpt = tmp_path / "out.checkpoint"
    assert cli.main(["--model", str(tiny_dir), "--save_model", str(tmp_path / "out")] + ARGV) == 2
    err = _one_line_error(capsys)
    assert f"--checkpoint_dir {ckpt}: writing block_00002.safetensors failed" in err, err
    assert "No space left on device" in err and "free space" in err and "blocks 0..1 are kept there" in err, err
    assert json.loads((ckpt / "state.json").read_text())["next_block"] == 2
    assert not [p for p in ckpt.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_final_save_over_the_file_size_limit_is_one_line_and_the_rerun_saves(tiny_dir, tmp_path):
    """``ulimit -f``: writes past the limit fail with EFBIG (SIGXFSZ ignored, as a shell's ulimit with
    ``trap '' XFSZ``). The limit lets every checkpoint file through (one block, at most ~150 KB) but not the
    whole model (~700 KB in one file)."""
    out, ckpt = tmp_path / "out", tmp_path / "out.checkpoint"
    block_bytes = sum(p.numel() * 4 for p in tiny_model("llama").model.layers[0].parameters())
    model_bytes = sum(p.numel() * 4 for p in tiny_model("llama").parameters())
    limit = 2 * block_bytes
    assert block_bytes + 10_000 < limit < model_bytes  # the inputs file: 4 x 32 x 64 floats = 32 KB
    prelude = ("import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
               f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))")
    argv = ["--model", str(tiny_dir), "--save_model", str(out), "--report", str(tmp_path / "r.json")] + ARGV
    run = _cli_subprocess(argv, prelude=prelude)
    assert run.returncode == 2, run.stderr[-3000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith(f"optima-prune: error: --save_model {out}: writing failed (") and "free space" in last
    assert f"the pruned model is kept in {ckpt}" in last, last
    assert json.loads((ckpt / "state.json").read_text())["next_block"] == 3
    assert not out.exists()
    rerun = _cli_subprocess(argv)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert json.loads((tmp_path / "r.json").read_text())["resumed_from_block"] == 3  # not pruned again
    assert (out / "model.safetensors").is_file() and not ckpt.exists()


def test_a_planted_lock_link_is_refused_and_its_target_kept(tmp_path, tokenizer):
    """The lock file is opened without following links: a link planted at its name never truncates its target."""
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (tmp_path / ".out.optima-lock").symlink_to(victim)
    with pytest.raises(ValueError, match="cannot create its lock file"):
        prune(tiny_model("llama"), tokenizer, save_model=str(tmp_path / "out"), **FAST)
    assert victim.read_text() == "keep me"
