"""Zero-shot accuracy with lm-eval (offline, on a local task) and the per-layer plot."""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from optima_plugin import cli, eval_zero_shot
from optima_plugin.evaluation.zero_shot import DEFAULT_TASKS, check_tasks, task_manager
from optima_plugin.testing import tiny_model, tiny_tokenizer

TASKS = Path(__file__).parent.parent / "examples" / "tasks"  # the local task users copy



def _questions():
    return [json.loads(line) for line in (TASKS / "python_facts.jsonl").read_text().splitlines() if line.strip()]


@torch.no_grad()
def _expected_accuracy(model, tok) -> tuple:
    """acc and acc_norm scored by hand: sum log p(" choice" | "Question: ...\\nAnswer:"), argmax."""
    acc = acc_norm = 0
    for q in _questions():
        context = f"Question: {q['question']}\nAnswer:"
        scores = []
        for choice in q["choices"]:
            whole = tok.encode(context + " " + choice)
            n_ctx = len(tok.encode(context))
            logp = model(torch.tensor([whole[:-1]])).logits[0].float().log_softmax(-1)
            scores.append(sum(float(logp[i - 1, whole[i]]) for i in range(n_ctx, len(whole))))
        lengths = [len(c) for c in q["choices"]]
        acc += max(range(len(scores)), key=lambda i: scores[i]) == q["answer"]
        acc_norm += max(range(len(scores)), key=lambda i: scores[i] / lengths[i]) == q["answer"]
    n = len(_questions())
    return acc / n, acc_norm / n


def test_local_task_offline_matches_hand_scoring(tmp_path, monkeypatch):
    """The task directory is moved and the CWD changed: data are found next to the YAML, not the CWD."""
    moved = tmp_path / "somewhere" / "tasks"
    shutil.copytree(TASKS, moved)
    monkeypatch.chdir(tmp_path)
    model, tok = tiny_model("llama"), tiny_tokenizer()
    tok_before = tok.get_vocab(), tok.pad_token
    out = eval_zero_shot(model, tok, "python_facts", tasks_dir=str(moved), batch_size=3, progress=False)
    row = out["tasks"]["python_facts"]
    assert row["samples"] == len(_questions()) == 20
    acc, acc_norm = _expected_accuracy(model, tok)
    assert row["acc"] == pytest.approx(acc)
    assert row["acc_norm"] == pytest.approx(acc_norm)
    assert 0 < row["acc_stderr"] < 0.2
    assert out["average"] == row["acc"]
    assert (tok.get_vocab(), tok.pad_token) == tok_before
    assert not model.training


def test_weights_are_the_in_memory_ones():
    """Zeroing the model's weights in memory changes the result (no reload from disk)."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.lm_head.weight.zero_()  # uniform next-token distribution: every choice scores by its length
    a = eval_zero_shot(model, tok, ["python_facts"], tasks_dir=str(TASKS), limit=10, progress=False)
    b = eval_zero_shot(broken, tok, ["python_facts"], tasks_dir=str(TASKS), limit=10, progress=False)
    assert a["tasks"]["python_facts"]["samples"] == 10
    assert b["tasks"]["python_facts"]["acc"] == pytest.approx(_uniform_accuracy(tok, 10))
    assert a["tasks"]["python_facts"]["acc"] != b["tasks"]["python_facts"]["acc"]


def _uniform_accuracy(tok, n: int) -> float:
    """With uniform next-token probabilities the choice with the fewest tokens wins (first on ties)."""
    hits = 0
    for q in _questions()[:n]:
        context = f"Question: {q['question']}\nAnswer:"
        lengths = [len(tok.encode(context + " " + c)) - len(tok.encode(context)) for c in q["choices"]]
        hits += lengths.index(min(lengths)) == q["answer"]
    return hits / n


def test_unknown_task_names_close_matches():
    with pytest.raises(ValueError) as info:
        task_manager(["python_facts", "arc_eazy"], tasks_dir=str(TASKS))
    msg = str(info.value)
    assert "unknown zero-shot task 'arc_eazy'" in msg and "close matches: arc_easy" in msg, msg
    assert "lm-eval ls tasks" in msg and f"in --tasks_dir {TASKS.resolve()}: python_facts" in msg
    assert "\n" not in msg
    # a name only in --tasks_dir, without it
    with pytest.raises(ValueError, match="unknown zero-shot task 'python_facts'.*--tasks_dir DIR"):
        task_manager(["python_facts"])
    with pytest.raises(FileNotFoundError, match="--tasks_dir /does/not/exist: no such directory"):
        task_manager(["python_facts"], tasks_dir="/does/not/exist")


def test_task_needing_a_download_offline_is_one_oserror(tmp_path, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "needs_hub.yaml").write_text(
        "task: needs_hub\ndataset_path: optima-plugin-tests/no-such-dataset\noutput_type: multiple_choice\n"
        "test_split: test\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: answer\n")
    with pytest.raises(OSError) as info:
        check_tasks(["needs_hub"], str(tmp_path))
    msg = str(info.value)
    assert msg.startswith("zero-shot task 'needs_hub': its data could not be loaded") and "--tasks_dir DIR" in msg
    assert "\n" not in msg


def test_cli_needs_hub_offline_exits_2_before_pruning(tmp_path, tiny_dir, monkeypatch, capsys):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "needs_hub.yaml").write_text(
        "task: needs_hub\ndataset_path: optima-plugin-tests/no-such-dataset\noutput_type: multiple_choice\n"
        "test_split: test\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: answer\n")
    report = tmp_path / "r.json"
    rc = cli.main(["--model", str(tiny_dir), "--nsamples", "2", "--seqlen", "32", "--quiet", "--no_dense_eval",
                   "--eval_zero_shot", "needs_hub", "--tasks_dir", str(tmp_path / "tasks"), "--report", str(report)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert [line for line in err if line.startswith("optima-prune: error:")] == err[-1:], err
    assert "--tasks_dir DIR" in err[-1]
    assert not report.exists()


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--eval_limit", "0"], "--eval_limit must be positive"),
        (["--num_fewshot", "-1"], "--num_fewshot must be >= 0"),
        (["--eval_batch_size", "0"], "--eval_batch_size must be a positive integer"),
        (["--plot", "out.gif"], r"--plot out.gif: the file name must end with one of \.png"),
        (["--eval_zero_shot", "python_fact"], "unknown zero-shot task 'python_fact'; close matches: python_facts"),
        (["--tasks_dir", "/nope"], "--tasks_dir /nope: no such directory"),
    ],
)
def test_cli_bad_zero_shot_input_one_line(argv, match, tiny_dir, capsys):
    base = ["--model", str(tiny_dir), "--nsamples", "2", "--seqlen", "32", "--quiet"]
    if "--eval_zero_shot" not in argv:
        argv = argv + ["--eval_zero_shot", "python_facts"]
    if "--tasks_dir" not in argv:
        argv = argv + ["--tasks_dir", str(TASKS)]
    rc = cli.main(base + argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("optima-prune: error:"), err
    assert re.search(match, err), err


def test_bare_flag_is_the_paper_task_list():
    args = cli.build_parser().parse_args(["--eval_zero_shot", "--tasks_dir", "x"])
    assert args.eval_zero_shot.split(",") == list(DEFAULT_TASKS)
    assert DEFAULT_TASKS == ("mmlu", "piqa", "arc_easy", "arc_challenge", "winogrande", "openbookqa")
    assert cli.build_parser().parse_args([]).eval_zero_shot == ""
    assert cli.build_parser().parse_args(["--eval_limit", "8"]).eval_limit == 8
    assert cli.build_parser().parse_args(["--eval_limit", "0.25"]).eval_limit == 0.25


def test_cli_dense_and_pruned_table_report_and_plot(tiny_dir, tmp_path, capsys):
    report, png = tmp_path / "r.json", tmp_path / "plots" / "layers.png"
    rc = cli.main(["--model", str(tiny_dir), "--nsamples", "2", "--seqlen", "32", "--quiet",
                   "--eval_zero_shot", "python_facts", "--tasks_dir", str(TASKS), "--eval_limit", "8",
                   "--eval_batch_size", "4", "--plot", str(png), "--report", str(report)])
    out = capsys.readouterr().out
    assert rc == 0
    data = json.loads(report.read_text())
    zs = data["zero_shot"]
    assert set(zs) == {"dense", "pruned"}
    for stage in ("dense", "pruned"):
        row = zs[stage]["tasks"]["python_facts"]
        assert row["samples"] == 8 and 0 <= row["acc"] <= 1 and 0 <= row["acc_norm"] <= 1
        assert zs[stage]["average"] == row["acc"] and zs[stage]["limit"] == 8
    assert "ppl" not in data
    lines = out[out.index("zero-shot accuracy"):].splitlines()
    assert lines[0] == "zero-shot accuracy (0-shot, limit 8)"
    assert lines[1].split() == ["task", "n", "dense", "acc", "acc_norm", "pruned", "acc", "acc_norm"]
    d, p = zs["dense"]["tasks"]["python_facts"], zs["pruned"]["tasks"]["python_facts"]
    assert lines[2].split() == ["python_facts", "8"] + [f"{v:.4f}" for v in (d["acc"], d["acc_norm"], p["acc"],
                                                                            p["acc_norm"])]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the report alone redraws it
    from optima_plugin import plot

    assert plot.main([str(report), str(tmp_path / "again.svg")]) == 0
    assert (tmp_path / "again.svg").read_text().lstrip().startswith("<?xml")
    assert plot.main([str(tmp_path / "missing.json"), str(tmp_path / "x.png")]) == 2


def test_no_dense_eval_gives_pruned_only(tiny_dir, tmp_path):
    report = tmp_path / "r.json"
    assert cli.main(["--model", str(tiny_dir), "--nsamples", "2", "--seqlen", "32", "--quiet", "--no_dense_eval",
                     "--eval_zero_shot", "python_facts", "--tasks_dir", str(TASKS), "--eval_limit", "4",
                     "--report", str(report)]) == 0
    assert set(json.loads(report.read_text())["zero_shot"]) == {"pruned"}


def _report():
    layers = []
    for block in range(3):
        for j, kind in enumerate(("self_attn.q_proj", "mlp.down_proj")):
            mask = 10.0 ** (block + j)
            layers.append(dict(name=f"model.layers.{block}.{kind}", block=block, ratio=0.5 + 0.1 * j,
                               sparsity=0.5 + 0.1 * j, mask_objective=mask, objective=mask * (0.3 + 0.1 * block),
                               error_ratio=0.3 + 0.1 * block))
    return {"layers": layers, "sparsity": 0.55, "options": dict(prune_method="wanda", weight_update="optima",
                                                                solver="pcg", sparsity_type="unstructured",
                                                                sparsity_ratio=0.5)}


def test_figure_draws_the_report_values():
    from optima_plugin.plot import report_figure

    report = _report()
    fig = report_figure(report)
    ax_obj, ax_ratio, ax_sp = fig.axes[:3]
    assert ax_obj.get_yscale() == "log"
    # per kind: dashed mask-only then solid updated objective
    mask_q, upd_q = ax_obj.lines[0], ax_obj.lines[1]
    assert list(mask_q.get_ydata()) == [1.0, 10.0, 100.0] and mask_q.get_linestyle() == "--"
    assert list(upd_q.get_ydata()) == pytest.approx([0.3, 4.0, 50.0])
    assert list(ax_ratio.lines[1].get_ydata()) == pytest.approx([0.3, 0.4, 0.5])
    assert list(ax_sp.lines[1].get_ydata()) == pytest.approx([0.6, 0.6, 0.6])
    assert list(ax_sp.lines[2].get_ydata()) == pytest.approx([0.55, 0.55, 0.55])  # target, block mean


def test_missing_matplotlib_says_how_to_install(tiny_dir, monkeypatch, capsys):
    import sys

    from optima_plugin.plot import report_figure

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install 'optima_plugin\[plot\]'"):
        report_figure(_report())
    assert cli.main(["--model", str(tiny_dir), "--plot", "x.png", "--quiet"]) == 2
    assert "pip install 'optima_plugin[plot]'" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_before_and_after_wanda_optima():
    """SmolLM2-135M on the local task: well above chance (0.25) dense; the pruned model is the one evaluated."""
    from optima_plugin import prune
    from optima_plugin.loading import default_model, load_model

    directory, gguf = default_model()
    model, tok = load_model(directory, gguf_file=gguf)
    dense = eval_zero_shot(model, tok, "python_facts", tasks_dir=str(TASKS), batch_size=8, progress=False)
    report = prune(model, tok, prune_method="wanda", sparsity_ratio=0.5, weight_update="optima",
                   nsamples=8, seqlen=256, progress=False)
    assert report["sparsity"] == pytest.approx(0.5, abs=1e-3)
    pruned = eval_zero_shot(model, tok, "python_facts", tasks_dir=str(TASKS), batch_size=8, progress=False)
    d, p = dense["tasks"]["python_facts"], pruned["tasks"]["python_facts"]
    assert d["samples"] == p["samples"] == 20
    assert d["acc"] >= 0.45, d  # 0.55 measured; chance is 0.25
    assert p["acc"] >= 0.3, p
    assert (d["acc"], d["acc_norm"]) != (p["acc"], p["acc_norm"])


def test_summary_keeps_top_level_groups_and_averages_acc():
    from optima_plugin.evaluation.zero_shot import summarize

    out = {
        "results": {
            "mmlu": {"acc,none": 0.4, "acc_stderr,none": 0.01},
            "mmlu_stem": {"acc,none": 0.3, "acc_stderr,none": 0.02},
            "mmlu_algebra": {"acc,none": 0.3, "acc_stderr,none": "N/A"},
            "mmlu_art": {"acc,none": 0.5},
            "piqa": {"acc,none": 0.7, "acc_norm,none": 0.72, "acc_stderr,none": 0.01, "acc_norm_stderr,none": 0.01},
            "gsm8k": {"exact_match,strict-match": 0.1},
        },
        "group_subtasks": {"mmlu": ["mmlu_stem", "mmlu_art"], "mmlu_stem": ["mmlu_algebra"]},
        "n-samples": {"mmlu_algebra": {"effective": 100}, "mmlu_art": {"effective": 50}, "piqa": {"effective": 30},
                      "gsm8k": {"effective": 5}},
    }
    s = summarize(out, num_fewshot=0, limit=None)
    assert list(s["tasks"]) == ["mmlu", "piqa", "gsm8k"]
    assert s["tasks"]["mmlu"] == {"acc": 0.4, "acc_stderr": 0.01, "samples": 150}
    assert s["tasks"]["piqa"]["acc_norm"] == 0.72 and s["tasks"]["gsm8k"] == {"samples": 5}
    assert s["average"] == pytest.approx((0.4 + 0.7) / 2)
