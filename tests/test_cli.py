"""optima-prune: bad input exits 2 with one clear line; a run writes its report and model."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from optima_plugin import cli



@pytest.mark.parametrize(
    "argv, match",
    [
        (["--sparsity_ratio", "1.5"], r"--sparsity_ratio must be in \[0, 1\)"),
        (["--sparsity_type", "3:2"], "0 < N < M"),
        (["--prune_method", "nope"], r"known: file, magnitude, (.*, )?sparsegpt, thanos, wanda"),
        (["--solver", "nope"], "known solvers"),
        (["--model", "/does/not/exist"], "no such directory"),
        (["--sparsity_type", "2:5"], "does not divide"),
        (["--seqlen", "100000"], "beyond the model's context"),
        (["--lora_rank", "0.1", "--prune_lora"], "--sparsity_type 2:4 or drop --prune_lora"),
        (["--quantizer", "slim"], "add --quantize_weight"),
        (["--sink_tokens", "exclude", "--sink_factor", "0.5"], "--sink_factor must be a finite number >= 1"),
        (["--calibration_dataset", "pydoc,sherlock:x"], r"--calibration_dataset 'sherlock:x': the weight"),
        (["--calibration_dataset", "pydoc,sherlock,c4"], "names 3 sources but --nsamples is 2"),
    ],
)
def test_bad_input_one_line(argv, match, tiny_dir, capsys):
    if "--model" not in argv:
        argv = ["--model", str(tiny_dir)] + argv
    if "--seqlen" not in argv:
        argv += ["--seqlen", "32"]
    rc = cli.main(argv + ["--nsamples", "2", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("optima-prune: error:")
    assert re.search(match, err), err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu(tiny_dir, capsys):
    assert cli.main(["--model", str(tiny_dir), "--device", "cuda", "--quiet"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_run_saves_and_reports(tiny_dir, tmp_path):
    out, report = tmp_path / "pruned", tmp_path / "report.json"
    argv = ["--model", str(tiny_dir), "--nsamples", "2", "--seqlen", "32", "--sparsity_type", "2:4",
            "--eval_ppl", "pydoc", "--eval_max_windows", "2", "--save_model", str(out), "--report", str(report),
            "--quiet"]
    assert cli.main(argv) == 0
    data = json.loads(report.read_text())
    assert data["sparsity"] == pytest.approx(0.5)
    assert set(data["ppl"]) == {"dense", "dense_source", "pruned"}  # dense_source: issue 27 item 4
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    lin = reloaded.model.layers[0].mlp.down_proj.weight
    assert bool(((lin == 0).reshape(lin.shape[0], -1, 4).sum(-1) >= 2).all())
    # an existing non-empty directory is refused without --overwrite
    assert cli.main(argv) == 2
    assert cli.main(argv + ["--overwrite"]) == 0


def test_console_script_runs_as_module(tiny_dir):
    proc = subprocess.run([sys.executable, "-m", "optima_plugin.cli", "--model", str(tiny_dir),
                           "--sparsity_ratio", "2"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "--sparsity_ratio must be in [0, 1)" in proc.stderr


def test_eval_ppl_on_two_domains_reports_and_prints_both(tiny_dir, tmp_path, capsys):
    report = tmp_path / "report.json"
    argv = ["--model", str(tiny_dir), "--nsamples", "2", "--seqlen", "32", "--eval_ppl", "pydoc,sherlock",
            "--eval_max_windows", "2", "--report", str(report), "--quiet"]
    assert cli.main(argv) == 0
    ppl = json.loads(report.read_text())["ppl"]
    assert set(ppl) == {"dense", "dense_source", "pruned"}  # dense_source: issue 27 item 4
    for stage in ("dense", "pruned"):
        assert set(ppl[stage]) == {"pydoc", "sherlock"}
        assert all(1 < v < float("inf") for v in ppl[stage].values())
    assert ppl["dense"]["pydoc"] != ppl["dense"]["sherlock"]  # two different texts
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("perplexity"))
    assert header.split() == ["perplexity", "dense", "pruned"]
    for ds in ("pydoc", "sherlock"):
        row = next(line for line in out.splitlines() if line.split()[:1] == [ds])
        assert [float(x) for x in row.split()[1:]] == pytest.approx([ppl["dense"][ds], ppl["pruned"][ds]], rel=1e-3)


def test_quantized_run_with_separate_adapters_from_the_command_line(tiny_dir, tmp_path, capsys):
    out, report = tmp_path / "q", tmp_path / "report.json"
    argv = ["--model", str(tiny_dir), "--nsamples", "2", "--seqlen", "32", "--sparsity_type", "2:4",
            "--quantize_weight", "--bitwidth", "4", "--quantizer", "gptq", "--group_size", "16", "--act_order",
            "--lora_rank", "0.1", "--separate_lora", "--save_model", str(out), "--report", str(report)]
    assert cli.main(argv) == 0
    assert "relative output error" in capsys.readouterr().out
    layers = json.loads(report.read_text())["layers"]
    assert all(set(x["compression"]["relative_error"]) == {"pruned", "quantized", "lowrank"} for x in layers)
    assert all(x["compression"]["quantizer"] == {"name": "gptq", "bits": 4, "group_size": 16, "damp": 0.01,
                                                 "act_order": True} for x in layers)
    assert (out / "lowrank_adapters.safetensors").is_file()
