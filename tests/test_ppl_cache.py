"""The dense perplexity cache (optima_plugin.evaluation.cache): hits, misses, untrusted files, --no_cache."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from optima_plugin import prune
from optima_plugin.cli import main
from optima_plugin.data import get_eval_tokens
from optima_plugin.evaluation import cache as ppl_cache
from optima_plugin.evaluation.cache import perplexities
from optima_plugin.streaming import cache_dir
from optima_plugin.testing import tiny_model, tiny_tokenizer

REAL_FOLDER = ppl_cache.cache_folder  # before conftest's autouse fixture replaces it
SEQLEN = 32
WINDOWS = 3


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """The cache folder of this test (a known path the test can look into)."""
    path = tmp_path / "ppl"
    monkeypatch.setattr(ppl_cache, "cache_folder", lambda: path)
    return path


def count_forwards(model) -> list:
    """A list that grows by one per forward of ``model`` (the dense evaluation's forwards)."""
    calls: list = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls


def measure(model, dataset="pydoc", seqlen=SEQLEN, max_windows=WINDOWS, batch_size=1):
    return perplexities(model, tiny_tokenizer(), [dataset], seqlen, max_windows=max_windows,
                              batch_size=batch_size, progress=False)


def reference_ppl(model, dataset: str, seqlen: int, windows: int) -> float:
    """float64 perplexity from the logits, one window at a time (independent of the package's loss)."""
    ids = get_eval_tokens(dataset, tiny_tokenizer(), seqlen)[0, : windows * seqlen].view(windows, seqlen)
    total, count = 0.0, 0
    with torch.no_grad():
        for row in ids:
            logp = torch.log_softmax(model(input_ids=row[None]).logits[0].double(), dim=-1)
            total -= logp[torch.arange(seqlen - 1), row[1:]].sum().item()
            count += seqlen - 1
    return math.exp(total / count)


def test_a_second_run_reads_the_cache_without_a_forward(folder):
    model = tiny_model("llama")
    calls = count_forwards(model)
    first, source = measure(model)
    assert source == {"pydoc": "computed"} and len(calls) == WINDOWS
    assert first["pydoc"] == pytest.approx(reference_ppl(model, "pydoc", SEQLEN, WINDOWS), rel=1e-5)  # float32 noise
    assert len(list(folder.glob("*.json"))) == 1
    again = tiny_model("llama")  # the same weights, another object: the key is the weights, not the object
    calls = count_forwards(again)
    second, source = measure(again)
    assert source == {"pydoc": "cache"} and calls == []
    assert second == first


@pytest.mark.parametrize("change", ["weight", "dtype", "seqlen", "max_windows", "dataset", "batch_size"])
def test_any_change_to_the_weights_or_windows_misses(folder, change):
    model = tiny_model("llama")
    measure(model)
    kwargs: dict = {}
    if change == "weight":  # one element off the sampled stride: only the float64 sum sees it
        with torch.no_grad():
            model.model.layers[1].mlp.down_proj.weight[0, 1] += 1e-3
    elif change == "dtype":
        model = model.to(torch.bfloat16)
    else:
        kwargs = {"seqlen": 16, "max_windows": 2, "dataset": "sherlock", "batch_size": 3}
        kwargs = {change: kwargs[change]}
    calls = count_forwards(model)
    _, source = measure(model, **kwargs)
    assert list(source.values()) == ["computed"] and calls
    assert len(list(folder.glob("*.json"))) == 2


@pytest.mark.parametrize("content", [b"\x00garbage{", b"", b"[]", b"{}", b'{"schema": 1, "key": "KEY", "ppl": "12"}',
                                     b'{"schema": 1, "key": "KEY", "ppl": 0.5}',
                                     b'{"schema": 1, "key": "KEY", "ppl": NaN}',
                                     b'{"schema": 1, "key": "KEY", "ppl": true}',
                                     b'{"schema": 1, "key": "another", "ppl": 3.0}',
                                     b'{"schema": 99, "key": "KEY", "ppl": 3.0}'])
def test_a_corrupt_or_foreign_entry_is_measured_again_and_rewritten(folder, content):
    model = tiny_model("llama")
    first, _ = measure(model)
    (entry,) = folder.glob("*.json")
    entry.write_bytes(content.replace(b"KEY", entry.stem.encode()))
    calls = count_forwards(model)
    again, source = measure(model)
    assert source == {"pydoc": "computed"} and len(calls) == WINDOWS and again == first
    assert json.loads(entry.read_text())["ppl"] == first["pydoc"]  # rewritten
    assert measure(model)[1] == {"pydoc": "cache"}


def test_a_planted_entry_is_what_a_hit_returns(folder):
    """The value comes from the file (so the --no_cache test below can tell a read from a measurement)."""
    model = tiny_model("llama")
    measure(model)
    (entry,) = folder.glob("*.json")
    entry.write_text(json.dumps({**json.loads(entry.read_text()), "ppl": 1234.5}))
    assert measure(model) == ({"pydoc": 1234.5}, {"pydoc": "cache"})


def test_an_unwritable_cache_folder_only_warns(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(ppl_cache, "cache_folder", lambda: blocker / "ppl")
    with caplog.at_level(logging.WARNING, logger="optima_plugin"):
        values, source = measure(tiny_model("llama"))
    assert source == {"pydoc": "computed"} and values["pydoc"] > 1
    assert "cannot write the perplexity cache" in caplog.text
    assert blocker.read_text() == "not a folder"


def snapshot(folder):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*")} if folder.exists() else {}


def test_no_cache_neither_reads_nor_writes(folder, tmp_path):
    tok = tiny_tokenizer()
    options = dict(nsamples=2, seqlen=SEQLEN, eval_ppl=["pydoc"], eval_dense=True, eval_max_windows=WINDOWS,
                   calibration_dataset="pydoc", device="cpu", progress=False)
    report = prune(tiny_model("llama"), tok, cache=False, **options)
    assert report["ppl"]["dense_source"] == {"pydoc": "computed"}
    assert snapshot(folder) == {}  # nothing written
    prune(tiny_model("llama"), tok, **options)  # fills the cache
    (entry,) = folder.glob("*.json")
    entry.write_text(json.dumps({**json.loads(entry.read_text()), "ppl": 1234.5}))
    assert prune(tiny_model("llama"), tok, **options)["ppl"]["dense"] == {"pydoc": 1234.5}  # read when allowed
    before = snapshot(folder)
    report = prune(tiny_model("llama"), tok, cache=False, **options)
    assert report["ppl"]["dense"]["pydoc"] != 1234.5 and report["ppl"]["dense_source"] == {"pydoc": "computed"}
    assert snapshot(folder) == before


def test_the_report_says_where_each_dense_figure_came_from(folder, tiny_dir, tmp_path, capsys):
    argv = ["--model", str(tiny_dir), "--nsamples", "2", "--seqlen", str(SEQLEN), "--eval_ppl", "pydoc,sherlock",
            "--eval_max_windows", "2", "--quiet"]
    assert main(argv + ["--report", str(tmp_path / "r1.json")]) == 0
    assert "from the perplexity cache" not in capsys.readouterr().out
    first = json.loads((tmp_path / "r1.json").read_text())["ppl"]
    assert first["dense_source"] == {"pydoc": "computed", "sherlock": "computed"}
    assert main(argv + ["--report", str(tmp_path / "r2.json")]) == 0
    out = capsys.readouterr().out
    second = json.loads((tmp_path / "r2.json").read_text())["ppl"]
    assert second["dense_source"] == {"pydoc": "cache", "sherlock": "cache"}
    assert second["dense"] == first["dense"]
    assert f"dense pydoc, sherlock: from the perplexity cache ({folder}" in out
    assert main(argv + ["--no_cache", "--report", str(tmp_path / "r3.json")]) == 0
    third = json.loads((tmp_path / "r3.json").read_text())["ppl"]
    assert third["dense_source"] == {"pydoc": "computed", "sherlock": "computed"}


def test_the_cache_folder_follows_optima_cache_dir_then_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.setattr(ppl_cache, "cache_folder", REAL_FOLDER)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("OPTIMA_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir() == tmp_path / "home" / ".cache" / "optima_plugin"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")  # the XDG spec: relative paths are invalid
    assert cache_dir() == tmp_path / "home" / ".cache" / "optima_plugin"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    measure(tiny_model("llama"))
    assert len(list((tmp_path / "xdg" / "optima_plugin" / "ppl").glob("*.json"))) == 1
    monkeypatch.setenv("OPTIMA_CACHE_DIR", str(tmp_path / "mine"))
    measure(tiny_model("llama"))
    assert len(list((tmp_path / "mine" / "ppl").glob("*.json"))) == 1
    assert not (tmp_path / "home").exists()


def test_batched_evaluation_gives_the_same_perplexity(folder):
    """Several windows per forward: the same figure up to float32 noise (the loss is a sum over windows)."""
    model = tiny_model("llama")
    expected = reference_ppl(model, "pydoc", SEQLEN, 5)
    for batch_size in (1, 2, 5):
        values, _ = measure(model, max_windows=5, batch_size=batch_size)
        assert values["pydoc"] == pytest.approx(expected, rel=1e-5)


def test_a_streamed_model_is_cached_by_its_files(folder, tiny_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from optima_plugin.streaming import open_streamed

    stream, tok = open_streamed(str(tiny_dir))
    first, source = perplexities(stream, tok, ["pydoc"], SEQLEN, max_windows=2, progress=False)
    assert source == {"pydoc": "computed"}
    second, source = perplexities(stream, tok, ["pydoc"], SEQLEN, max_windows=2, progress=False)
    assert source == {"pydoc": "cache"} and second == first
    (weights,) = tiny_dir.glob("*.safetensors")
    tensors = load_file(str(weights))
    tensors["model.layers.1.mlp.down_proj.weight"][0, 1] += 1e-3  # a block's weight: only on disk
    save_file(tensors, str(weights), metadata={"format": "pt"})
    stream, tok = open_streamed(str(tiny_dir))
    third, source = perplexities(stream, tok, ["pydoc"], SEQLEN, max_windows=2, progress=False)
    assert source == {"pydoc": "computed"}
