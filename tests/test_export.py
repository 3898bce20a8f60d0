"""--save_format compressed-tensors: round trips through transformers, sizes, errors, validation."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch
from torch import nn

from optima_plugin.config import PruneConfig
from optima_plugin.validate import resolve
from optima_plugin.quantizers import QUANT_ATTR, QuantState
from optima_plugin.testing import tiny_model, tiny_tokenizer

pytest.importorskip("compressed_tensors")

from optima_plugin.export import is_two_four, save_compressed  # noqa: E402


def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}


def prune_two_four(model: nn.Module) -> list[str]:
    """Zero the 2 smallest of every 4 consecutive inputs of each block linear; return their names."""
    for lin in block_linears(model).values():
        r, d = lin.weight.shape
        w = lin.weight.data.reshape(r, d // 4, 4)
        w.scatter_(-1, w.abs().argsort(-1)[..., :2], 0.0)
    return list(block_linears(model))


def prune_unstructured(model: nn.Module, ratio: float = 0.5) -> list[str]:
    """Zero the ``ratio`` smallest-magnitude weights of each block linear (per layer)."""
    for lin in block_linears(model).values():
        w = lin.weight.data
        w[w.abs() <= w.abs().flatten().kthvalue(int(ratio * w.numel())).values] = 0.0
    return list(block_linears(model))


def absmax_quantize(model: nn.Module, bits: int, group_size: Optional[int],
                    scale_dtype: torch.dtype = torch.float32, only: str = "") -> None:
    """Independent symmetric absmax fake quantization of every block linear (whose name holds ``only``),
    with its QuantState.

    ``scale = max|w| / (2^(b-1) - 1)`` per row (``group_size`` None) or per group of inputs, rounded
    to ``scale_dtype`` (kept float32); ``w <- scale * round(w / scale)`` computed in float32, then
    rounded to the weight's dtype (zeros stay zero).
    """
    for name, lin in block_linears(model).items():
        if only not in name:
            continue
        w = lin.weight.data.float()
        r, d = w.shape
        g = group_size or d
        grouped = w.reshape(r, d // g, g)
        scale = (grouped.abs().amax(-1) / (2 ** (bits - 1) - 1)).to(scale_dtype).float()
        q = torch.where(scale[..., None] > 0, grouped / scale[..., None], 0.0).round()
        q = q.clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        lin.weight.data = (q * scale[..., None]).reshape(r, d).to(lin.weight.dtype)
        setattr(lin, QUANT_ATTR, QuantState(bits=bits, group_size=g, scale=scale))


def tokens() -> torch.Tensor:
    return torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(3))


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens()).logits


def load(directory: Path):
    """The folder through transformers; one forward unpacks a compressed-tensors model's weights."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        model(tokens()[:, :2])
    return model


def folder_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())


CASES = {  # name: (bits, group size (None: per channel), pruning)
    "int8-channel": (8, None, None),
    "int4-group32": (4, 32, None),
    "int4-group32-2of4": (4, 32, "2:4"),
    "int8-channel-2of4": (8, None, "2:4"),
    "int4-channel-unstructured": (4, None, "unstructured"),
    "pruned-2of4-not-quantized": (None, None, "2:4"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_through_transformers_gives_identical_logits(case, tmp_path):
    """The integers and float32 scales decode to the very float32 weights in memory (both are the one
    float32 rounding of ``q * scale``), so the reloaded weights and logits are bit-identical: tolerance 0."""
    bits, group_size, pruning = CASES[case]
    model = tiny_model("llama")
    pruned = {"2:4": prune_two_four, "unstructured": prune_unstructured}[pruning](model) if pruning else []
    if bits:
        absmax_quantize(model, bits, group_size)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = logits(model)

    save_compressed(model, tiny_tokenizer(), str(tmp_path / "out"), pruned=pruned)

    after = model.state_dict()  # the model in memory is left as it was
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    if bits:
        (group,) = config["config_groups"].values()
        assert group["format"] == config["format"] == "pack-quantized"
        assert group["targets"] == ["Linear"] and config["ignore"] == ["lm_head"]
        assert group["weights"]["num_bits"] == bits and group["weights"]["symmetric"] is True
        assert group["weights"]["strategy"] == ("group" if group_size else "channel")
        assert group["weights"]["group_size"] == group_size
        assert config["quantization_status"] == "compressed"
    else:
        assert "config_groups" not in config
    sparsity = config["sparsity_config"]
    if pruning:
        assert sparsity["format"] == "dense" and sparsity["targets"] == pruned
        assert sparsity["sparsity_structure"] == pruning
        assert sparsity["global_sparsity"] >= 0.5
    else:
        assert sparsity == {}

    from safetensors import safe_open

    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        name = "model.layers.1.mlp.down_proj"
        if bits:
            assert {f"{name}.weight_packed", f"{name}.weight_scale", f"{name}.weight_shape"} <= keys
            assert f"{name}.weight" not in keys
            assert f.get_tensor(f"{name}.weight_packed").dtype == torch.int32
            scale = getattr(dict(model.named_modules())[name], QUANT_ATTR).scale
            assert torch.equal(f.get_tensor(f"{name}.weight_scale"), scale)
        else:
            assert f"{name}.weight" in keys

    reloaded = load(tmp_path / "out")
    got = logits(reloaded)
    for name, lin in block_linears(model).items():
        assert torch.equal(dict(reloaded.named_modules())[name].weight, lin.weight), name
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_mixed_schemes_and_unquantized_linears(tmp_path):
    """8-bit per-channel attention and 4-bit group-32 MLP: one config group each, naming its linears;
    MLP-only quantization: one group targeting Linear, the attention linears and the head ignored."""
    model = tiny_model("llama")
    attention = {n: m for n, m in block_linears(model).items() if ".self_attn." in n}
    mlp = {n: m for n, m in block_linears(model).items() if ".mlp." in n}
    absmax_quantize(model, 8, None, only=".self_attn.")
    absmax_quantize(model, 4, 32, only=".mlp.")
    expected = logits(model)
    save_compressed(model, tiny_tokenizer(), str(tmp_path / "mixed"))
    config = json.loads((tmp_path / "mixed" / "config.json").read_text())["quantization_config"]
    groups = sorted(config["config_groups"].values(), key=lambda g: g["weights"]["num_bits"])
    assert [g["weights"]["num_bits"] for g in groups] == [4, 8]
    assert groups[0]["targets"] == list(mlp) and groups[1]["targets"] == list(attention)
    assert groups[1]["weights"]["strategy"] == "channel" and groups[0]["weights"]["group_size"] == 32
    torch.testing.assert_close(logits(load(tmp_path / "mixed")), expected, rtol=0, atol=0)

    model = tiny_model("llama")
    absmax_quantize(model, 4, 32, only=".mlp.")
    expected = logits(model)
    save_compressed(model, tiny_tokenizer(), str(tmp_path / "mlp"))
    config = json.loads((tmp_path / "mlp" / "config.json").read_text())["quantization_config"]
    (group,) = config["config_groups"].values()
    assert group["targets"] == ["Linear"] and config["ignore"] == list(attention) + ["lm_head"]
    torch.testing.assert_close(logits(load(tmp_path / "mlp")), expected, rtol=0, atol=0)


def test_dequantize_on_load_gives_identical_logits(tmp_path):
    """transformers' other route (``dequantize=True``: decompressed while loading) agrees too."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model = tiny_model("llama")
    pruned = prune_two_four(model)
    absmax_quantize(model, 4, 32)
    save_compressed(model, tiny_tokenizer(), str(tmp_path / "out"), pruned=pruned)
    reloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=0, atol=0)


def test_bfloat16_model_with_bfloat16_scales_round_trips_exactly(tmp_path):
    """Scales representable in bfloat16 (as transformers and vLLM hold them): the reloaded weights are the
    ones in memory, and the logits those of the same model saved and reloaded as hf (a model cast with
    ``.to(bfloat16)`` also rounds its rotary buffer, which ``from_pretrained`` keeps in float32)."""
    from optima_plugin.loading import save_model

    model = tiny_model("llama", dtype=torch.bfloat16)
    prune_two_four(model)
    absmax_quantize(model, 4, 32, scale_dtype=torch.bfloat16)
    save_model(model, tiny_tokenizer(), str(tmp_path / "hf"))
    save_compressed(model, tiny_tokenizer(), str(tmp_path / "ct"))
    reloaded = load(tmp_path / "ct")
    assert reloaded.dtype == torch.bfloat16
    for name, lin in block_linears(model).items():
        assert torch.equal(dict(reloaded.named_modules())[name].weight, lin.weight), name
    torch.testing.assert_close(logits(reloaded), logits(load(tmp_path / "hf")), rtol=0, atol=0)


def test_bfloat16_model_with_float32_scales_warns_and_loads_what_a_server_computes(tmp_path, caplog):
    """float32 scales of a bfloat16 model are saved in bfloat16 (transformers and vLLM cast them anyway):
    a warning gives the largest difference, and the reloaded weights are ``bf16(q * bf16(scale))``."""
    model = tiny_model("llama", dtype=torch.bfloat16)
    absmax_quantize(model, 4, 32)
    with caplog.at_level("WARNING", logger="optima_plugin.export"):
        save_compressed(model, tiny_tokenizer(), str(tmp_path / "ct"))
    assert "21 quantized linears will load with weights that differ" in caplog.text
    assert "representable in bfloat16" in caplog.text
    reloaded = dict(load(tmp_path / "ct").named_modules())
    for name, lin in block_linears(model).items():
        state = getattr(lin, QUANT_ATTR)
        server = state.scale.to(torch.bfloat16).float().repeat_interleave(32, dim=1)
        expected = (state.integers(lin.weight).float() * server).to(torch.bfloat16)
        assert torch.equal(reloaded[name].weight, expected), name


def test_int4_folder_is_smaller_than_the_hf_save(tmp_path):
    """4-bit packed linears take 1/8 of their float32 bytes (+ one float32 scale per 32 weights); embeddings,
    head and tokenizer are the same in both: measured about 0.47 of the hf folder for the tiny Llama."""
    from optima_plugin.loading import save_model

    model = tiny_model("llama")
    absmax_quantize(model, 4, 32)
    save_model(model, tiny_tokenizer(), str(tmp_path / "hf"))
    save_compressed(model, tiny_tokenizer(), str(tmp_path / "ct"))
    hf, ct = folder_bytes(tmp_path / "hf"), folder_bytes(tmp_path / "ct")
    linears = sum(lin.weight.numel() for lin in block_linears(model).values())
    saved = linears * 4 - (linears // 2 + linears // 32 * 4)  # float32 weights minus packed ints and scales
    assert hf - ct == pytest.approx(saved, rel=0.02)
    assert ct < 0.55 * hf


def test_two_four_detection():
    w = torch.tensor([[0.0, 1.0, 0.0, 2.0, 3.0, 0.0, 0.0, 4.0]])
    assert is_two_four(w)
    w[0, 4:] = torch.tensor([3.0, 5.0, 0.0, 4.0])
    assert not is_two_four(w)
    assert not is_two_four(torch.zeros(2, 6))  # inputs not a multiple of 4


def test_weight_changed_after_quantization_is_refused(tmp_path):
    model = tiny_model("llama")
    absmax_quantize(model, 4, 32)
    model.model.layers[2].mlp.up_proj.weight.data[3, 5] += 1e-3
    with pytest.raises(ValueError, match=r"model\.layers\.2\.mlp\.up_proj: its weight is not scale \* integer"):
        save_compressed(model, tiny_tokenizer(), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_group_size_must_divide_the_inputs(tmp_path):
    model = tiny_model("llama")
    lin = model.model.layers[0].self_attn.q_proj  # 64 inputs
    setattr(lin, QUANT_ATTR, QuantState(bits=4, group_size=48, scale=torch.ones(64, 2)))
    with pytest.raises(ValueError, match="group size 48 does not divide its 64 inputs"):
        save_compressed(model, tiny_tokenizer(), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_replaces_only_a_folder_it_saved(tmp_path):
    model = tiny_model("llama")
    absmax_quantize(model, 8, None)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="only replaces a folder optima-prune saved"):
        save_compressed(model, tiny_tokenizer(), str(foreign), overwrite=True)
    assert (foreign / "notes.txt").read_text() == "mine"
    out = tmp_path / "out"
    save_compressed(model, tiny_tokenizer(), str(out))
    save_compressed(model, tiny_tokenizer(), str(out), overwrite=True)
    assert (out / ".optima_saved.json").exists() and (out / "model.safetensors").exists()


@pytest.fixture
def no_library(monkeypatch):
    """Make ``import compressed_tensors`` fail as when the library is not installed."""
    for name in [n for n in sys.modules if n == "compressed_tensors" or n.startswith("compressed_tensors.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "compressed_tensors", None)


def test_missing_library_says_what_to_install(no_library, tmp_path):
    model = tiny_model("llama")
    with pytest.raises(ImportError, match=r"pip install compressed-tensors .*optima_plugin\[export\]"):
        save_compressed(model, tiny_tokenizer(), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=r"needs the compressed-tensors library: pip install compressed-tensors"):
        resolve(PruneConfig(save_model=str(tmp_path / "out"), save_format="compressed-tensors"))
    resolve(PruneConfig(save_model=str(tmp_path / "out")))  # hf needs nothing more


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(save_format="gguf"), r"--save_format must be one of hf, compressed-tensors, got 'gguf'"),
        (dict(save_format="compressed-tensors"), r"--save_format compressed-tensors .*give --save_model DIR"),
        (dict(save_format="compressed-tensors", save_model="OUT", stream=True), r"give --no-stream, or save with "
         r"--save_format hf"),
        (dict(save_format="compressed-tensors", save_model="OUT", quantize_weight=True, scale_important_weights=True),
         r"--scale_important_weights divides each input column .* cannot store: drop one of them"),
        (dict(save_format="compressed-tensors", save_model="OUT", lora_rank=0.1),
         r"--lora_rank adds adapters .*drop --lora_rank, or save with --save_format hf"),
        (dict(save_format="compressed-tensors", save_model="OUT", lora_rank=0.1, separate_lora=True),
         r"--lora_rank adds adapters"),
    ],
)
def test_config_rejects_bad_combinations(options, match, tmp_path):
    if "save_model" in options:
        options["save_model"] = str(tmp_path / "out")
    with pytest.raises(ValueError, match=match):
        resolve(**options)


def test_cli_rejects_before_loading_the_model(tiny_dir, tmp_path, capsys):
    from optima_plugin import cli

    argv = ["--model", str(tiny_dir), "--nsamples", "2", "--seqlen", "32", "--quiet",
            "--save_format", "compressed-tensors"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "give --save_model DIR" in err
    assert cli.main(argv + ["--save_model", str(tmp_path / "out"), "--stream"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--no-stream" in err
    assert not (tmp_path / "out").exists()


def test_cli_prune_saves_compressed_tensors(tiny_dir, tmp_path):
    """A whole 2:4 run: the folder loads back through transformers with the pruned weights,
    and records the 2:4 structure of the pruned linears."""
    from optima_plugin import cli

    out = tmp_path / "out"
    argv = ["--model", str(tiny_dir), "--nsamples", "2", "--seqlen", "32", "--sparsity_type", "2:4", "--quiet",
            "--save_model", str(out), "--save_format", "compressed-tensors", "--no-stream"]
    assert cli.main(argv) == 0
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["sparsity_config"]["sparsity_structure"] == "2:4"
    assert len(config["sparsity_config"]["targets"]) == len(block_linears(tiny_model("llama")))
    reloaded = load(out)
    for lin in block_linears(reloaded).values():
        assert is_two_four(lin.weight)


@pytest.mark.parametrize("quantizer, bits, group_size, sparsity_type", [
    ("gptq", 4, 32, "2:4"),
    ("absmax", 8, 0, "unstructured"),
])
def test_prune_quantize_and_save_compressed(quantizer, bits, group_size, sparsity_type, tmp_path):
    """The package's own quantizers through ``prune(..., save_format="compressed-tensors")``: the folder
    reloads with the in-memory model's logits, and records the run's quantization and sparsity."""
    from optima_plugin.api import prune

    model = tiny_model("llama")
    report = prune(model, tiny_tokenizer(), prune_method="wanda", sparsity_type=sparsity_type,
                   quantize_weight=True, quantizer=quantizer, bitwidth=bits, group_size=group_size,
                   nsamples=4, seqlen=64, progress=False, save_model=str(tmp_path / "out"),
                   save_format="compressed-tensors")
    assert report["saved_to"] == str(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    (group,) = config["config_groups"].values()
    assert group["weights"]["num_bits"] == bits
    assert group["weights"]["strategy"] == ("group" if group_size else "channel")
    assert config["sparsity_config"]["sparsity_structure"] == sparsity_type
    assert config["sparsity_config"]["targets"] == [x["name"] for x in report["layers"]]
    torch.testing.assert_close(logits(load(tmp_path / "out")), logits(model), rtol=0, atol=0)


def test_input_scales_and_separate_adapters_are_refused(tmp_path):
    from optima_plugin.lowrank import attach

    model = tiny_model("llama")
    absmax_quantize(model, 4, 32)
    lin = model.model.layers[1].mlp.gate_proj
    getattr(lin, QUANT_ATTR).input_scale = torch.ones(lin.in_features)
    with pytest.raises(ValueError, match=r"gate_proj: quantized with --scale_important_weights"):
        save_compressed(model, tiny_tokenizer(), str(tmp_path / "out"))
    getattr(lin, QUANT_ATTR).input_scale = None
    attach(lin, torch.zeros(lin.out_features, 2), torch.zeros(2, lin.in_features))
    with pytest.raises(ValueError, match=r"1 linears carry separate low-rank adapters .*drop --separate_lora"):
        save_compressed(model, tiny_tokenizer(), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
