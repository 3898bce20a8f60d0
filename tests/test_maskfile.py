"""Masks from files: ``--save_masks`` and ``--prune_method file --mask_checkpoint`` (ours, TRIM's, MaskLLM-style).

The strongest check: a run whose masks come from the file written by a Wanda run is bit-identical
to that Wanda run (same calibration, same masks, same exact update), so the file selector changes
nothing but where the masks come from. TRIM's layout is written here the way TRIM's
``lib/mask_utils.save_model_pruning_masks`` writes it (``numpy.packbits`` of ``weight == 0`` per
linear, keys ``layer{i}_{name}``), independently of our reader.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from optima_plugin import cli, prune, prune_and_quantize
from optima_plugin.maskfile import open_masks, pack, unpack
from optima_plugin.testing import tiny_model, tiny_tokenizer

FAST = dict(nsamples=4, seqlen=64, calibration_dataset="pydoc", progress=False)


@pytest.fixture(scope="module")
def wanda_run(tmp_path_factory):
    """A Wanda + OPTIMA run on the tiny Llama that saves its masks: (pruned model, masks file, report)."""
    out = tmp_path_factory.mktemp("wanda")
    model = tiny_model("llama")
    report = prune(model, tiny_tokenizer(), prune_method="wanda", weight_update="optima",
                   save_masks=str(out / "masks.safetensors"), **FAST)
    return model, out / "masks.safetensors", report


def _linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}


def trim_file(model, path):
    """TRIM's ``--save_masks`` layout, written as TRIM writes it."""
    all_masks, info = {}, {}
    for i, layer in enumerate(model.model.layers):
        info[str(i)] = {}
        for name, module in layer.named_modules():
            if isinstance(module, torch.nn.Linear):
                mask = module.weight.data == 0
                key = f"layer{i}_{name}"
                all_masks[key] = torch.from_numpy(np.packbits(mask.cpu().numpy()))
                info[str(i)][name] = {"shape": list(mask.shape), "mask_key": key, "is_packed": True}
    torch.save({"metadata": {"model_type": type(model).__name__, "layer_info": info}, "masks": all_masks}, path)


def test_pack_roundtrip_against_numpy():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(7, 13, generator=g) < 0.5  # 91 bits: the last byte is partly padding
    packed = pack(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == 12
    assert np.array_equal(packed.numpy(), np.packbits(mask.numpy()))
    assert torch.equal(unpack(packed, (7, 13)), mask)
    with pytest.raises(ValueError, match="do not hold"):
        unpack(packed, (7, 15))


def test_save_masks_writes_the_pruned_zeros(wanda_run):
    model, path, report = wanda_run
    masks = open_masks(path)
    assert masks.layout == "ours" and report["masks_saved_to"] == str(path)
    linears = _linears(model)
    assert sorted(masks.keys()) == sorted(x["name"] for x in report["layers"]) == sorted(linears)
    for name, lin in linears.items():
        assert torch.equal(masks.mask(name), lin.weight == 0), name


@pytest.mark.parametrize("layout", ["ours", "trim", "maskllm"])
def test_masks_from_a_file_reproduce_the_run_exactly(wanda_run, tmp_path, layout):
    """Masks from any layout + OPTIMA = the Wanda + OPTIMA run, bit for bit; the report records the masks."""
    pruned, path, _ = wanda_run
    options = {}
    if layout == "trim":
        path = tmp_path / "trim_masks.pt"
        trim_file(pruned, path)
    elif layout == "maskllm":  # 1 = kept, float 0/1, keys with ".mask" and without the leading "model."
        path = tmp_path / "maskllm.safetensors"
        save_file({n[len("model."):] + ".mask": (lin.weight != 0).float().contiguous()
                   for n, lin in _linears(pruned).items()}, str(path))
        options["mask_convention"] = "kept"
    model = tiny_model("llama")
    report = prune(model, tiny_tokenizer(), prune_method="file", mask_checkpoint=str(path),
                   weight_update="optima", **options, **FAST)
    for name, lin in _linears(model).items():
        assert torch.equal(lin.weight, _linears(pruned)[name].weight), name
    assert all(x["selection"]["pruned"] == pytest.approx(0.5, abs=0.05) for x in report["layers"])


def test_maskllm_through_prune_and_quantize(wanda_run, tmp_path):
    """The reference's ``prune_method='maskllm', mask_checkpoint=...`` (1 = kept): the masks are applied."""
    pruned, _, _ = wanda_run
    path = tmp_path / "maskllm.pt"
    torch.save({n + ".mask": (lin.weight != 0) for n, lin in _linears(pruned).items()}, path)
    model = tiny_model("llama")
    prune_and_quantize(model, tiny_tokenizer(), prune_method="maskllm", mask_checkpoint=str(path),
                       update_weights=True, nsamples=4, seqlen=64, calibration_dataset="pydoc", progress=False)
    for name, lin in _linears(model).items():
        assert torch.equal(lin.weight == 0, _linears(pruned)[name].weight == 0), name
    with pytest.raises(ValueError, match="prune_method='maskllm'"):
        prune_and_quantize(model, tiny_tokenizer(), prune_method="wanda", mask_checkpoint=str(path))


def _plain(tmp_path, tensors):
    path = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def test_bad_mask_files_are_refused_before_calibration(wanda_run, tmp_path, monkeypatch):
    """Missing layers, wrong shapes, values other than 0/1, no convention, the wrong N:M: each refused with a
    message naming the problem, and (all but the values, read per layer) before any calibration."""
    from optima_plugin import engine

    pruned, ours, _ = wanda_run
    dense = {n: lin.weight.detach() != 0 for n, lin in _linears(pruned).items()}
    tok = tiny_tokenizer()
    calibrated = []
    real = engine.get_calibration
    monkeypatch.setattr(engine, "get_calibration", lambda *a, **k: calibrated.append(1) or real(*a, **k))

    def refused(match, **options):
        with pytest.raises(ValueError, match=match):
            prune(tiny_model("llama"), tok, prune_method="file", **FAST, **options)

    refused("give the file")
    missing = {k: v for k, v in dense.items() if "mlp.down_proj" not in k}
    refused(r"no mask for 3 of 21 linears \(e\.g\. model\.layers\.0\.mlp\.down_proj",
            mask_checkpoint=str(_plain(tmp_path, missing)), mask_convention="pruned")
    wrong = dict(dense, **{"model.layers.1.self_attn.q_proj": torch.ones(8, 64, dtype=torch.bool)})
    refused(r"model\.layers\.1\.self_attn\.q_proj: \[8, 64\] in the file",
            mask_checkpoint=str(_plain(tmp_path, wrong)), mask_convention="pruned")
    refused("add --mask_convention kept", mask_checkpoint=str(_plain(tmp_path, dense)))
    refused("drop --mask_convention kept", mask_checkpoint=str(ours), mask_convention="kept")
    refused("drop --use_trim", mask_checkpoint=str(ours), use_trim=True)
    refused("must be an existing file", mask_checkpoint=str(tmp_path / "nope.pt"))
    with pytest.raises(ValueError, match="add --prune_method file"):  # a file given to another selector
        prune(tiny_model("llama"), tok, prune_method="wanda", mask_checkpoint=str(ours), **FAST)
    assert calibrated == []
    halves = {k: v.float() * 0.5 for k, v in dense.items()}
    refused(r"holds values other than 0 and 1 \(e\.g\. 0\.5\)", mask_checkpoint=str(_plain(tmp_path, halves)),
            mask_convention="kept")
    refused("is not 2:4", mask_checkpoint=str(ours), sparsity_type="2:4")  # unstructured masks


def test_cli_save_masks_then_file(tmp_path):
    """``optima-prune --save_masks`` then ``--prune_method file --mask_checkpoint``: same weights saved."""
    from transformers import AutoModelForCausalLM

    tiny_model("llama").save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    # SparseGPT's own weights warm-start the OPTIMA solve of the first run, the file selector's mask-only weights the
    # second's: the same strictly convex problem (damped H) from two starts. Solved in float64 to tol 1e-12 both
    # reach its unique optimum far below float32 rounding, so the saved weights agree to a few float32 ulps.
    common = ["--model", str(tmp_path / "m"), "--nsamples", "4", "--seqlen", "64", "--quiet", "--no_checkpoint",
              "--double_precision", "--tol", "1e-12"]
    assert cli.main(common + ["--prune_method", "sparsegpt", "--sparsity_type", "2:4", "--save_masks",
                              str(tmp_path / "masks.safetensors"), "--save_model", str(tmp_path / "a")]) == 0
    assert cli.main(common + ["--prune_method", "file", "--mask_checkpoint", str(tmp_path / "masks.safetensors"),
                              "--sparsity_type", "2:4", "--save_model", str(tmp_path / "b"),
                              "--report", str(tmp_path / "b.json")]) == 0
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "b")
    for (name, wa), (_, wb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(wa == 0, wb == 0), name  # the same masks, exactly
        torch.testing.assert_close(wa, wb, rtol=1e-5, atol=1e-7, msg=name)
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["options"]["mask_checkpoint"] == str(tmp_path / "masks.safetensors")


def test_file_selector_is_refused_by_the_host():
    from optima_plugin.host import HostOptions

    with pytest.raises(ValueError, match="run optima-prune --prune_method file"):
        HostOptions(mask_selector="file").validate()


def test_masks_from_a_file_streamed(wanda_run, tmp_path):
    """``--stream`` with ``--prune_method file``: matched from the skeleton's shapes, applied block by block."""
    from safetensors.torch import load_file

    from optima_plugin.streaming import open_streamed

    pruned, path, _ = wanda_run
    tiny_model("llama").save_pretrained(tmp_path / "src")
    tiny_tokenizer().save_pretrained(tmp_path / "src")
    stream, _ = open_streamed(str(tmp_path / "src"))
    prune(stream, tiny_tokenizer(), prune_method="file", mask_checkpoint=str(path), weight_update="optima",
          save_model=str(tmp_path / "out"), **FAST)
    saved = {}
    for f in (tmp_path / "out").glob("*.safetensors"):
        saved.update(load_file(str(f)))
    for name, lin in _linears(pruned).items():
        assert torch.equal(saved[name + ".weight"], lin.weight), name
