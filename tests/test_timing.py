"""Per-phase timings (issue 27 item 1): the timer's arithmetic, the report's phases and the CLI line."""

from __future__ import annotations

import json
import re

import pytest

from optima_plugin import cli, prune
from optima_plugin import timing
from optima_plugin.testing import tiny_model, tiny_tokenizer
from optima_plugin.timing import Phases, summary_line

FAST = dict(nsamples=4, seqlen=64, calibration_dataset="pydoc")
# what prune_seconds covers; evaluation and save are timed by prune() after it
PRUNE_PHASES = {"calibration", "allocation", "capture", "statistics", "hessian", "selection", "update",
                "refinement", "objectives", "compression", "propagation", "checkpoint"}


def test_nested_phase_pauses_the_outer_one(monkeypatch):
    clock = iter([0.0, 1.0, 3.0, 6.0, 10.0, 15.0])  # enter a, enter b, leave b, leave a, enter a, leave a
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    phases = Phases()
    with phases.phase("a"):
        with phases.phase("b"):
            pass
    with phases.phase("a"):
        pass
    # a: 0..1 and 3..6 and 10..15 = 1 + 3 + 5; b: 1..3 = 2; their sum 11 = the wall time inside phases
    assert phases.to_dict() == {"a": 9.0, "b": 2.0}


def test_summary_line_sorted_by_share():
    line = summary_line({"capture": 1.0, "update": 3.0})
    assert line == "time: update 3.0 s (75%), capture 1.0 s (25%)"


def test_tiny_prune_reports_every_phase(tmp_path):
    report = prune(tiny_model("llama"), tiny_tokenizer(), sparsity_ratio=0.5, refine_mask="swap", refine_iters=2,
                   quantize_weight=True, bitwidth=4, group_size=16, checkpoint_dir=str(tmp_path / "ckpt"),
                   save_model=str(tmp_path / "out"), eval_ppl="pydoc", eval_max_windows=2, progress=False, **FAST)
    t = report["timings"]
    phases = t["phases"]
    assert set(phases) == PRUNE_PHASES | {"evaluation", "save"}
    assert all(s >= 0 for s in phases.values())
    assert phases["save"] > 0 and phases["evaluation"] > 0
    inside = sum(s for name, s in phases.items() if name in PRUNE_PHASES)
    # the phases are disjoint intervals (a nested one pauses its parent) inside prune_seconds' interval:
    # their sum cannot exceed it (1 ms for float rounding); they cover the block loop's work, so all that is
    # left out is bookkeeping between phases (finiteness checks, observers, copies): well under half
    assert inside <= t["prune_seconds"] + 1e-3
    assert inside >= 0.5 * t["prune_seconds"]
    assert t["solver_iterations"] == sum(x["update"]["iterations"] for x in report["layers"])
    assert t["solver_iterations"] > 0  # PCG ran on every layer


def test_cli_prints_the_time_line(tiny_dir, tmp_path, capsys):
    report = tmp_path / "report.json"
    argv = ["--model", str(tiny_dir), "--nsamples", "2", "--seqlen", "32", "--report", str(report), "--quiet"]
    assert cli.main(argv) == 0
    phases = json.loads(report.read_text())["timings"]["phases"]
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("time: "))
    parts = re.findall(r"(\w+) ([\d.]+) s \((\d+)%\)", line)
    assert [name for name, _, _ in parts] == sorted(phases, key=lambda n: -phases[n])
    total = sum(phases.values())
    for name, seconds, share in parts:
        assert float(seconds) == pytest.approx(phases[name], abs=0.05)  # printed with one decimal
        assert int(share) == pytest.approx(100 * phases[name] / total, abs=0.5)  # printed rounded
