"""Disk-to-disk streaming (``--stream``): the same pruned model as in memory, one block in memory at a time."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from optima_plugin import cli, hookimpl, prune
from optima_plugin.plugins import get_plugin_manager
from optima_plugin.maskfile import open_masks
from optima_plugin.streaming import (INDEX, StreamedModel, checkpoint_bytes, open_streamed, shard_name,
                                     stream_needed)
from optima_plugin.testing import CONFIGS, tiny_model, tiny_tokenizer

FAST = dict(nsamples=4, seqlen=32, calibration_dataset="pydoc", device="cpu", progress=False)
EVAL = dict(eval_ppl="pydoc", eval_dense=True, eval_max_windows=3)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _save_source(path: Path, model, tokenizer) -> Path:
    """``model`` saved in several shards with an index, as large hub checkpoints are."""
    model.save_pretrained(path, max_shard_size="100KB")
    tokenizer.save_pretrained(path)
    assert (path / INDEX).is_file()
    return path


def _tensors(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _in_memory(source: Path):
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    model.config.use_cache = False
    return model.eval()


def _tied_llama():
    spec = dict(CONFIGS["llama"], tie_word_embeddings=True)
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("arch, options", [
    ("llama", dict(prune_method="wanda", weight_update="optima")),
    ("gemma3", dict(prune_method="sparsegpt", weight_update="optima", sparsity_type="2:4")),
    ("opt", dict(prune_method="wanda", weight_update="optima", allocation="owl", use_trim=True)),
    ("qwen2", dict(prune_method="thanos", weight_update="native", allocation="alphapruning", input_recalc=True)),
    ("tied-llama", dict(prune_method="magnitude", weight_update="optima")),
    ("mistral", dict(prune_method="wanda", weight_update="optima", objective="dense")),
])
def test_streamed_prune_is_bit_identical_to_in_memory(arch, options, tmp_path, tokenizer):
    model = _tied_llama() if arch == "tied-llama" else tiny_model(arch)
    source = _save_source(tmp_path / "src", model, tokenizer)
    in_memory = prune(_in_memory(source), tokenizer, save_model=str(tmp_path / "mem"), **FAST, **EVAL, **options,
                      save_masks=str(tmp_path / "mem.masks"))
    stream, _ = open_streamed(str(source))
    streamed = prune(stream, tokenizer, save_model=str(tmp_path / "str"), **FAST, **EVAL, **options,
                     save_masks=str(tmp_path / "str.masks"))

    assert streamed["stream"] and not in_memory["stream"]
    assert streamed["ppl"] == in_memory["ppl"]  # block-by-block evaluation: the same floats
    assert streamed["sparsity"] == in_memory["sparsity"]
    a, b = _tensors(tmp_path / "mem"), _tensors(tmp_path / "str")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    saved = tmp_path / "str"
    blocks = len(model.model.decoder.layers if arch == "opt" else model.model.layers)
    assert sorted(p.name for p in saved.glob("*.safetensors")) == [shard_name(i, blocks + 1) for i in range(blocks + 1)]
    index = json.loads((saved / INDEX).read_text())
    assert set(index["weight_map"]) == set(b)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in b.values())
    reloaded = AutoModelForCausalLM.from_pretrained(saved).eval()  # the shards and index HF expects
    ids = torch.randint(0, 500, (1, 24))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, _in_memory(tmp_path / "mem")(ids).logits)
    assert not any(p.name.startswith(".str.optima") for p in tmp_path.iterdir())  # staging removed
    masks = open_masks(tmp_path / "str.masks")  # --save_masks: read from the pruned shards, the same masks
    assert sorted(masks.keys()) == sorted(open_masks(tmp_path / "mem.masks").keys())
    assert all(torch.equal(masks.mask(k), b[k + ".weight"] == 0) for k in masks.keys())


def test_at_most_one_block_is_in_memory(tmp_path, tokenizer, monkeypatch):
    source = _save_source(tmp_path / "src", tiny_model("llama"), tokenizer)
    stream, _ = open_streamed(str(source))
    blocks = stream.adapter.blocks
    assert all(p.is_meta for p in blocks.parameters())  # nothing of the blocks is read at open
    seen = []
    load = StreamedModel.load_block

    def counting(self, index, device):
        block = load(self, index, device)
        seen.append(sum(not next(b.parameters()).is_meta for b in blocks))
        return block

    monkeypatch.setattr(StreamedModel, "load_block", counting)
    prune(stream, tokenizer, save_model=str(tmp_path / "out"), allocation="owl", **FAST, **EVAL)
    # OWL's statistics pass and its weight scores, the prune and two evaluations each read every block once
    assert len(seen) == 5 * len(blocks) and max(seen) == 1
    assert all(p.is_meta for p in blocks.parameters())


def test_each_released_block_hands_the_freed_heap_back(tmp_path, tokenizer, monkeypatch):
    """glibc keeps freed heap between blocks (a streamed prune's memory grew ~3 MB per block):
    every block released is followed by one ``malloc_trim``."""
    import optima_plugin.streaming as streaming

    source = _save_source(tmp_path / "src", tiny_model("llama"), tokenizer)
    stream, _ = open_streamed(str(source))
    events = []
    release = StreamedModel.release_block
    monkeypatch.setattr(StreamedModel, "release_block", lambda self, i: events.append(("release", i)) or
                        release(self, i))
    monkeypatch.setattr(streaming, "release_freed_memory", lambda: events.append(("trim",)) or True)
    prune(stream, tokenizer, save_model=str(tmp_path / "out"), weight_update="none", **FAST)
    assert events == [e for i in range(3) for e in (("release", i), ("trim",))]


class _Crash:
    def __init__(self, at: int) -> None:
        self.at = at

    @hookimpl
    def optima_block_done(self, index, num_blocks, seconds):
        if index == self.at:
            raise RuntimeError("power cut")


def test_streamed_run_resumes_from_its_checkpoint(tmp_path, tokenizer):
    source = _save_source(tmp_path / "src", tiny_model("llama"), tokenizer)
    reference = prune(open_streamed(str(source))[0], tokenizer, save_model=str(tmp_path / "ref"), **FAST)
    target, ckpt = tmp_path / "out", tmp_path / "out.checkpoint"
    pm = get_plugin_manager()
    crash = _Crash(1)
    pm.register(crash)
    try:
        with pytest.raises(RuntimeError, match="power cut"):
            prune(open_streamed(str(source))[0], tokenizer, save_model=str(target), **FAST)
    finally:
        pm.unregister(crash)
    assert not target.exists()
    assert sorted(p.name for p in ckpt.glob("model-*")) == [shard_name(0, 4), shard_name(1, 4)]
    assert not list(ckpt.glob("block_*"))  # the shards are the record: the blocks are not written twice
    report = prune(open_streamed(str(source))[0], tokenizer, save_model=str(target), **FAST)
    assert report["resumed_from_block"] == 2 and len(report["layers"]) == len(reference["layers"])
    a, b = _tensors(tmp_path / "ref"), _tensors(target)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not ckpt.exists()  # the default checkpoint is removed after success


def test_explicit_checkpoint_keeps_its_shards_linked_not_copied(tmp_path, tokenizer):
    source = _save_source(tmp_path / "src", tiny_model("llama"), tokenizer)
    ckpt = tmp_path / "ckpt"
    prune(open_streamed(str(source))[0], tokenizer, save_model=str(tmp_path / "out"), checkpoint_dir=str(ckpt),
          **FAST)
    name = shard_name(0, 4)
    assert os.path.samefile(ckpt / name, tmp_path / "out" / name)  # one file on disk, two names


def test_failure_without_checkpoint_leaves_nothing_behind(tmp_path, tokenizer):
    source = _save_source(tmp_path / "src", tiny_model("llama"), tokenizer)
    before = set(tmp_path.iterdir())
    pm = get_plugin_manager()
    crash = _Crash(1)
    pm.register(crash)
    try:
        with pytest.raises(RuntimeError, match="power cut"):
            prune(open_streamed(str(source))[0], tokenizer, save_model=str(tmp_path / "out"), checkpoint=False,
                  **FAST)
    finally:
        pm.unregister(crash)
    assert set(tmp_path.iterdir()) == before


def test_stream_needs_save_model_and_no_zero_shot(tmp_path, tokenizer):
    source = _save_source(tmp_path / "src", tiny_model("llama"), tokenizer)
    stream, _ = open_streamed(str(source))
    with pytest.raises(ValueError, match="--stream .* give --save_model DIR"):
        prune(stream, tokenizer, **FAST)
    with pytest.raises(ValueError, match="--eval_zero_shot runs lm-eval on a model in memory"):
        prune(stream, tokenizer, save_model=str(tmp_path / "o"), eval_zero_shot="python_facts", **FAST)
    with pytest.raises(ValueError, match="open_streamed"):
        prune(tiny_model("llama"), tokenizer, stream=True, save_model=str(tmp_path / "o"), **FAST)


def test_incomplete_checkpoint_is_refused_naming_a_tensor(tmp_path, tokenizer):
    source = tmp_path / "src"
    tiny_model("llama").save_pretrained(source)  # one file
    tensors = load_file(str(source / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    from safetensors.torch import save_file

    save_file(tensors, str(source / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(source)
    with pytest.raises(ValueError, match=r"lacks 1 tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
        open_streamed(str(source))
    empty = tmp_path / "empty"
    empty.mkdir()
    AutoConfig.for_model("llama").save_pretrained(empty)
    with pytest.raises(FileNotFoundError, match="holds no \\*.safetensors"):
        open_streamed(str(empty))


def test_size_in_memory_and_the_automatic_choice(tmp_path, tokenizer):
    model = tiny_model("llama").to(torch.bfloat16)
    source = _save_source(tmp_path / "src", model, tokenizer)
    params = sum(t.numel() for t in model.state_dict().values())
    assert checkpoint_bytes(source, torch.float32) == 4 * params  # stored in bfloat16, loaded in float32
    assert checkpoint_bytes(source, torch.bfloat16) == 2 * params
    assert stream_needed(source, torch.float32, available=4 * params - 1)
    assert not stream_needed(source, torch.float32, available=4 * params)
    assert not stream_needed(tmp_path / "no-such-folder", torch.float32, available=0)


def test_cli_stream_and_its_automatic_choice(tmp_path, tokenizer, monkeypatch, capsys):
    source = _save_source(tmp_path / "src", tiny_model("llama"), tokenizer)
    base = ["--model", str(source), "--nsamples", "4", "--seqlen", "32", "--device", "cpu", "--quiet"]
    assert cli.main(base + ["--stream", "--save_model", str(tmp_path / "out"), "--report", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["stream"] is True
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out") is not None
    import optima_plugin.streaming as streaming

    monkeypatch.setattr(streaming, "checkpoint_bytes", lambda directory, dtype: 10**15)  # "larger than RAM"
    assert cli.main(base) == 2  # chosen by itself, then refused without an output folder
    assert "--stream (on by itself when the model is larger than the available RAM)" in capsys.readouterr().err
    assert cli.main(base + ["--no-stream", "--weight_update", "none"]) == 0  # the user's choice wins
