"""Never lose data or a long run: checks before the work, resume, numerical faults, determinism, OOM back-off."""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import signal

import numpy as np
import pytest
import torch

from optima_plugin import cli, engine, hookimpl, pipeline, prune
from optima_plugin.checkpoint import RunInterrupted
from optima_plugin.engine import NonFiniteError
from optima_plugin.selectors.base import Selection
from optima_plugin.testing import tiny_model, tiny_tokenizer
from conftest import with_plugin

FAST = dict(nsamples=4, seqlen=32, calibration_dataset="pydoc", progress=False)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    assert diff == 0.0, f"max abs weight difference {diff}"


class _Hook:
    """A plugin calling ``action(index)`` when a block is done (to interrupt or crash a run)."""

    def __init__(self, action):
        self.action = action

    @hookimpl
    def optima_block_done(self, index, num_blocks, seconds):
        self.action(index)


# -- fail before the work -----------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--tol", "-1"], r"--tol must be in \(0, 1\)"),
        (["--max_iter", "-3"], "--max_iter must be a positive integer"),
        (["--eval_ppl", "pydoc", "--eval_max_windows", "0"], "--eval_max_windows must be a positive integer"),
        (["--eval_ppl", "pydoc", "--eval_max_windows", "-1"], "--eval_max_windows must be a positive integer"),
        (["--damp", "nan"], "--damp must be a finite number"),
        (["--calibration_dataset", ""], "--calibration_dataset is empty"),
        (["--eval_ppl", "nosuch", "--no_dense_eval"], "--eval_ppl 'nosuch' is neither one of pydoc"),
        (["--report", "/proc/r.json"], "--report /proc/r.json"),
        (["--plot", "/proc/p.png"], "--plot /proc/p.png"),
        (["--save_model", "/proc/x"], "--save_model"),
        (["--load_layer_ratio", "missing.npy"], "--load_layer_ratio missing.npy: no such file"),
        (["--tasks_dir", "no/such/dir"], "--tasks_dir no/such/dir: no such directory"),
        (["--save_model", "."], "--save_model"),
    ],
)
def test_bad_options_fail_before_the_model_loads(argv, match, tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    monkeypatch.setattr(cli, "_load", lambda *a: pytest.fail("the model was loaded before the options were checked"))
    rc = cli.main(["--model", str(tiny_dir), "--seqlen", "32", "--nsamples", "2", "--quiet"] + argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("optima-prune: error:"), err
    assert __import__("re").search(match, err), err
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_calibration_folder_without_text_is_refused(tmp_path, tokenizer):
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(ValueError, match="no .txt, .json or .jsonl file"):
        prune(tiny_model("llama"), tokenizer, **dict(FAST, calibration_dataset=str(tmp_path)))


def test_ratio_file_of_densities_fails_before_calibration(tmp_path, tokenizer, monkeypatch):
    densities = tmp_path / "owl.npy"
    np.save(densities, np.array([0.25, 0.3, 0.35]))  # densities for a 0.7 target: mean 0.30
    monkeypatch.setattr(engine, "get_calibration", lambda *a, **k: pytest.fail("calibrated before the check"))
    with pytest.raises(ValueError, match=r"mean sparsity .* is 0\.3000 but --sparsity_ratio is 0\.7.*densities"):
        prune(tiny_model("llama"), tokenizer, sparsity_ratio=0.7, load_layer_ratio=str(densities), **FAST)


def test_ratio_file_within_tolerance_is_used(tmp_path, tokenizer):
    path = tmp_path / "r.npy"
    np.save(path, np.array([0.695, 0.70, 0.705]))
    report = prune(tiny_model("llama"), tokenizer, sparsity_ratio=0.7, load_layer_ratio=str(path),
                   weight_update="none", **FAST)
    assert report["sparsity"] == pytest.approx(0.7, abs=0.01)


def test_c4_without_long_documents_stops(tmp_path, tokenizer, monkeypatch):
    import gzip

    from optima_plugin import data

    with gzip.open(tmp_path / "c4-train.00000-of-01024.json.gz", "wt") as f:
        f.write("\n".join(json.dumps({"text": f"short doc {i}"}) for i in range(20)))
    monkeypatch.setenv("OPTIMA_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "C4_MAX_MISSES", 50)
    with pytest.raises(ValueError, match="not longer than --seqlen 32.*smaller --seqlen"):
        data.get_calibration("c4", tokenizer, 2, 32)


# -- numerical faults -----------------------------------------------------------------------


@pytest.mark.parametrize("method, update", [("wanda", "none"), ("wanda", "optima"), ("sparsegpt", "native"),
                                            ("magnitude", "none")])
def test_nan_weight_in_block_1_is_named_and_nothing_written(method, update, tmp_path, tokenizer):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    report = tmp_path / "report.json"
    with pytest.raises(NonFiniteError, match=r"model\.layers\.1\.mlp\.up_proj: its weights hold 1 NaN"):
        prune(model, tokenizer, prune_method=method, weight_update=update, report=str(report), **FAST)
    assert not report.exists()


def test_nan_activation_names_the_block(tmp_path, tokenizer):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight[0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"model\.layers\.1\.mlp\.gate_proj: its input Hessian"):
        prune(model, tokenizer, weight_update="none", report=str(tmp_path / "r.json"), **FAST)
    assert not (tmp_path / "r.json").exists()


def test_nan_in_embeddings_is_named(tokenizer):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[:] = float("nan")
    with pytest.raises(NonFiniteError, match="embedding outputs"):
        prune(model, tokenizer, weight_update="none", **FAST)


def test_nan_weight_exits_2_with_one_line(tiny_dir, capsys):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight[0, 0] = float("inf")
    model.save_pretrained(tiny_dir)
    rc = cli.main(["--model", str(tiny_dir), "--seqlen", "32", "--nsamples", "2", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "model.layers.2.self_attn.o_proj" in err, err


def test_nonconverged_layers_are_counted_and_shown(tokenizer, capsys):
    report = prune(tiny_model("llama"), tokenizer, solver="pcg", max_iter=1, tol=1e-9, sparsity_ratio=0.7, **FAST)
    summary = report["summary"]
    flags = [x["update"]["converged"] for x in report["layers"]]
    assert summary["nonconverged"] == flags.count(False) > 0
    assert summary["nonconverged_layers"][0] == next(x["name"] for x in report["layers"]
                                                     if not x["update"]["converged"])
    cli.print_summary(report)
    assert f"{summary['nonconverged']} of {summary['layers']} layers did not converge" in capsys.readouterr().out


def test_solver_log_lines_name_the_layer(tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="optima_plugin"):
        prune(tiny_model("llama"), tokenizer, solver="pcg", max_iter=1, tol=1e-9, **FAST)
    lines = [r.getMessage() for r in caplog.records if "did not converge" in r.getMessage()]
    assert lines and all(line.startswith("model.layers.") for line in lines), lines[:2]


def test_escalated_damping_of_the_update_is_in_the_report(tokenizer):
    """2 x 32 tokens < down_proj's 128 inputs: its Hessian is singular and damp 0 fails Cholesky (unshrunk: a
    shrunk H keeps a share of its positive diagonal and is not singular)."""
    report = prune(tiny_model("llama"), tokenizer, **dict(FAST, nsamples=2, damp=0.0, hessian_shrink=0.0))
    escalated = [x["name"] for x in report["layers"] if x["update"]["damp_escalated"]]
    assert escalated and all(x["update"]["damp"] > 0 for x in report["layers"] if x["name"] in escalated)
    assert {x["name"] for x in report["layers"] if x["name"].endswith("down_proj")} <= set(escalated)
    assert report["summary"]["damp_escalated_layers"] == escalated


@pytest.mark.parametrize("prune_fn", ["sparsegpt_prune", "thanos_prune"])
def test_selectors_report_the_damping_they_used(prune_fn):
    from optima_plugin.selectors import sparsegpt, thanos
    from optima_plugin.sparsity import Pattern

    fn = getattr(sparsegpt, prune_fn, None) or getattr(thanos, prune_fn)
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))  # 16 tokens, 32 inputs: rank 16
    weight = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
    selection = fn(weight, x.T @ x / 16, 0.5, Pattern(), damp=0.0)
    assert selection.stats["damp_escalated"] and selection.stats["damp"] > 0
    assert fn(weight, x.T @ x / 16, 0.5, Pattern(), damp=0.01).stats == {"damp": 0.01, "damp_escalated": False}


class _EscalatingSelector:
    """Magnitude masks, reporting an escalated damping for the layers of block 1."""

    name = "escalating_for_test"
    needs_hessian = False

    def select(self, weight, hessian, ratio, pattern):
        pruned = weight.abs() < weight.abs().median(dim=1, keepdim=True).values
        return Selection(pruned, stats={"damp": 0.1, "damp_escalated": weight.shape[1] == 128})


class _EscalatingPlugin:
    @hookimpl
    def optima_selectors(self):
        return [_EscalatingSelector()]


def test_escalated_damping_of_the_selector_is_in_the_report(tokenizer):
    report = with_plugin(_EscalatingPlugin(), lambda: prune(
        tiny_model("llama"), tokenizer, prune_method="escalating_for_test", weight_update="none", **FAST))
    assert report["summary"]["damp_escalated_layers"] == [x["name"] for x in report["layers"]
                                                          if x["name"].endswith("down_proj")]
    assert all(x["selection"]["damp"] == 0.1 for x in report["layers"])


def test_report_is_standard_json(tmp_path, tokenizer):
    path = tmp_path / "deep" / "report.json"
    prune(tiny_model("llama"), tokenizer, weight_update="none", report=str(path), **FAST)

    def reject(token):
        raise ValueError(f"non-standard JSON token {token}")

    data = json.loads(path.read_text(), parse_constant=reject)
    assert data["completed"] is True and data["summary"]["layers"] == 21


# -- resume --------------------------------------------------------------------------------


def test_interrupted_then_resumed_is_bit_identical(tmp_path, tokenizer):
    base = tiny_model("llama")
    options = dict(FAST, prune_method="wanda", sparsity_ratio=0.6, allocation="owl")
    reference = copy.deepcopy(base)
    prune(reference, tokenizer, **options)

    ckpt = tmp_path / "ckpt"
    first = copy.deepcopy(base)
    ctrl_c = _Hook(lambda i: os.kill(os.getpid(), signal.SIGINT) if i == 0 else None)
    with pytest.raises(RunInterrupted, match=r"after block 0 of 3.*run the same command again to resume"):
        with_plugin(ctrl_c, lambda: prune(first, tokenizer, checkpoint_dir=str(ckpt), **options))
    state = json.loads((ckpt / "state.json").read_text())
    assert state["next_block"] == 1

    resumed = copy.deepcopy(base)  # a fresh process loads the dense model again
    report = prune(resumed, tokenizer, checkpoint_dir=str(ckpt), **options)
    assert report["resumed_from_block"] == 1
    assert len(report["layers"]) == 21 and len(report["timings"]["block_seconds"]) == 3
    _assert_identical(_weights(resumed), _weights(reference))
    assert ckpt.is_dir()  # an explicit --checkpoint_dir is kept


def test_crash_in_block_2_resumes_there(tmp_path, tokenizer):
    base = tiny_model("llama")
    reference = copy.deepcopy(base)
    prune(reference, tokenizer, sparsity_type="2:4", **FAST)

    def crash(i):
        if i == 1:
            raise RuntimeError("power cut")

    ckpt = tmp_path / "ckpt"
    with pytest.raises(RuntimeError, match="power cut"):
        with_plugin(_Hook(crash), lambda: prune(copy.deepcopy(base), tokenizer, sparsity_type="2:4",
                                                 checkpoint_dir=str(ckpt), **FAST))
    resumed = copy.deepcopy(base)
    assert prune(resumed, tokenizer, sparsity_type="2:4", checkpoint_dir=str(ckpt), **FAST)["resumed_from_block"] == 2
    _assert_identical(_weights(resumed), _weights(reference))


def test_checkpoint_of_other_options_is_refused(tmp_path, tokenizer):
    ckpt = tmp_path / "ckpt"
    prune(tiny_model("llama"), tokenizer, weight_update="none", checkpoint_dir=str(ckpt), **FAST)
    with pytest.raises(ValueError, match="differs in sparsity_ratio"):
        prune(tiny_model("llama"), tokenizer, weight_update="none", sparsity_ratio=0.6, checkpoint_dir=str(ckpt),
              **FAST)


@pytest.mark.parametrize("ckpt", ["out", "out/ckpt"])
def test_checkpoint_inside_the_saved_model_is_refused(ckpt, tmp_path, tokenizer):
    with pytest.raises(ValueError, match="overlap; give them separate folders"):
        prune(tiny_model("llama"), tokenizer, save_model=str(tmp_path / "out"),
              checkpoint_dir=str(tmp_path / ckpt), **FAST)


def test_checkpoint_dir_with_foreign_files_is_refused(tmp_path, tokenizer):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "thesis.tex").write_text("mine")
    with pytest.raises(ValueError, match="holds files this tool did not write"):
        prune(tiny_model("llama"), tokenizer, checkpoint_dir=str(tmp_path / "ckpt"), **FAST)
    assert (tmp_path / "ckpt" / "thesis.tex").read_text() == "mine"


def test_save_failure_keeps_the_pruned_model_in_the_checkpoint(tmp_path, tokenizer, monkeypatch):
    from optima_plugin import api

    base = tiny_model("llama")
    out = tmp_path / "pruned"
    real_save = api.save_model

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(api, "save_model", broken_save)
    first = copy.deepcopy(base)
    with pytest.raises(OSError, match="disk full"):
        prune(first, tokenizer, save_model=str(out), **FAST)
    ckpt = tmp_path / "pruned.checkpoint"
    assert json.loads((ckpt / "state.json").read_text())["next_block"] == 3

    monkeypatch.setattr(api, "save_model", real_save)
    again = copy.deepcopy(base)

    def no_pruning(*a, **k):
        raise AssertionError("a finished checkpoint must not prune again")

    monkeypatch.setattr(engine, "_prune_linear", no_pruning)
    report = prune(again, tokenizer, save_model=str(out), **FAST)
    assert report["resumed_from_block"] == 3
    _assert_identical(_weights(again), _weights(first))
    assert (out / "model.safetensors").exists()
    assert not ckpt.exists()  # the default checkpoint is removed once everything succeeded


def test_cli_ctrl_c_without_checkpoint_says_nothing_saved(tiny_dir, capsys, monkeypatch):
    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "capture_block_inputs", interrupt)
    rc = cli.main(["--model", str(tiny_dir), "--seqlen", "32", "--nsamples", "2", "--quiet"])
    assert rc == 130 and "nothing was saved" in capsys.readouterr().err


# -- determinism ------------------------------------------------------------------------------


class _RandomSelector:
    """Prunes a random half of each row: its masks depend on every global random generator."""

    name = "random_for_test"
    needs_hessian = False

    def select(self, weight, hessian, ratio, pattern):
        score = torch.rand(weight.shape) + random.random() + float(np.random.rand())
        return Selection(score < score.median(dim=1, keepdim=True).values)


class _RandomPlugin:
    @hookimpl
    def optima_selectors(self):
        return [_RandomSelector()]


def test_same_seed_same_weights_whatever_the_global_random_state(tokenizer):
    base = tiny_model("llama")

    def run(seed, disturb):
        torch.manual_seed(disturb)
        random.seed(disturb)
        np.random.seed(disturb)
        model = copy.deepcopy(base)
        prune(model, tokenizer, prune_method="random_for_test", seed=seed, **FAST)
        return _weights(model)

    a, b, c = with_plugin(_RandomPlugin(), lambda: (run(0, 1), run(0, 2), run(1, 1)))
    _assert_identical(a, b)
    assert any(not torch.equal(a[k], c[k]) for k in a)  # the seed does reach the selector


def test_same_command_twice_is_bit_identical(tokenizer):
    base = tiny_model("llama")
    runs = []
    for _ in range(2):
        model = copy.deepcopy(base)
        prune(model, tokenizer, prune_method="sparsegpt", sparsity_ratio=0.6, allocation="owl", use_trim=True,
              **FAST)
        runs.append(_weights(model))
    _assert_identical(*runs)


# -- out of memory ------------------------------------------------------------------------------


def test_out_of_memory_halves_the_batch(tokenizer, monkeypatch):
    base = tiny_model("llama")
    single = copy.deepcopy(base)
    prune(single, tokenizer, batch_size=1, **FAST)

    real = pipeline.run_block

    def small_device(block, hidden, kwargs):
        if hidden.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(block, hidden, kwargs)

    monkeypatch.setattr(pipeline, "run_block", small_device)
    model = copy.deepcopy(base)
    report = prune(model, tokenizer, batch_size=4, **FAST)
    passes = {(x["pass"], x["batch"]) for x in report["oom_backoff"]}
    assert passes == {("hessian", 2), ("hessian", 1), ("propagate", 2), ("propagate", 1)}
    a, b = _weights(model), _weights(single)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_out_of_memory_at_batch_one_explains(tokenizer, monkeypatch):
    def no_memory(block, hidden, kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(pipeline, "run_block", no_memory)
    with pytest.raises(torch.OutOfMemoryError, match="even with one calibration window"):
        prune(tiny_model("llama"), tokenizer, batch_size=2, **FAST)
