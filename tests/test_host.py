"""optima-host: unmodified host loops (tests/hosts) get OPTIMA weights for their own masks.

The host fixtures mirror Wanda (LLaMA and OPT paths; wanda, magnitude, sparsegpt) and
TRIM (``--device cpu --use_trim --input_recalc``). Each runs through ``optima-host`` (the
launcher's ``main`` in this process; the console script in a subprocess for the custom
selector) on a tiny random model, offline (``--host_data pydoc``) and on the CPU
(the CUDA shim), once with ``--weight_update none`` (the host's own run: shims and data
routing only) and once with ``--weight_update optima``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from optima_plugin import hookimpl, reconstruct
from optima_plugin.hessian import HessianAccumulator
from optima_plugin.host import HostOptions, emit_mask, install
from optima_plugin.host.data import route_hub_datasets, split_text
from optima_plugin.host.launcher import main as host_main, split_argv
from optima_plugin.host.selection import host_ratio, infer_pattern, reselect
from optima_plugin.host.shims import CudaOnCpu, cpu_device_map, pin_seqlen
from optima_plugin.plugins import get_plugin_manager, lookup
from optima_plugin.solvers.problem import reconstruction_error
from optima_plugin.sparsity import Pattern, row_mask
from optima_plugin.testing import tiny_model, tiny_tokenizer

from conftest import activation_hessian, random_weight

HOSTS = Path(__file__).parent / "hosts"
SEQLEN = 64
COMMON = ["--host_data", "pydoc", "--host_seqlen", str(SEQLEN)]


def default_shrunk(h: torch.Tensor) -> torch.Tensor:
    """``H`` as the seam uses it by default with ``--weight_update optima``: off-diagonal scaled by 0.7."""
    return 0.7 * h + 0.3 * torch.diag(torch.diagonal(h))
BLOCK0 = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")  # fed by the block input


# -- running the host fixtures ------------------------------------------------


def _console_script() -> list[str]:
    script = Path(sys.executable).with_name("optima-host")
    return [str(script)] if script.exists() else [sys.executable, "-m", "optima_plugin.host.launcher"]


def _forget_host_modules() -> None:
    """Drop the host's own modules (Wanda's ``lib``) so that the next in-process run imports them afresh."""
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", None) or "").startswith(str(HOSTS)):
            del sys.modules[name]


def run_host(host: str, args: list[str], out: Path, save: bool = True, console: bool = False) -> dict:
    """Run ``tests/hosts/<host>/main.py`` through optima-host: in this process (the launcher's ``main``),
    or with ``console`` through the console script in a subprocess. Returns its stdout and, with
    ``save``, its masks, final weights and the plugin's report."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"masks": out / "masks.pt", "weights": out / "weights.pt", "report": out / "report.json"}
    saving = ["--save_masks", str(files["masks"]), "--save_weights", str(files["weights"]),
              "--optima_report", str(files["report"])] if save else []
    argv = [str(HOSTS / host / "main.py"), *args, *saving]
    if console:
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
        proc = subprocess.run(_console_script() + argv, env=env, capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
        stdout = proc.stdout
    else:
        buffer = io.StringIO()
        try:
            with contextlib.redirect_stdout(buffer):
                assert host_main(argv) == 0
        finally:
            _forget_host_modules()
        stdout = buffer.getvalue()
    run = {"stdout": stdout}
    if save:
        run.update(masks=torch.load(files["masks"]), weights=torch.load(files["weights"]))
        run["report"] = json.loads(files["report"].read_text()) if files["report"].exists() else None
    return run


def run_pair(host: str, args: list[str], out: Path) -> dict:
    """The host's own run (``--weight_update none``) and the OPTIMA run, same arguments."""
    return {wu: run_host(host, args + COMMON + ["--weight_update", wu], out / wu) for wu in ("none", "optima")}


def perplexity(stdout: str, label: str) -> float:
    """The number the host printed after ``label`` (its own perplexity line)."""
    found = re.findall(re.escape(label) + r"\s*([0-9.]+)", stdout)
    assert found, f"no {label!r} line in the host's output:\n{stdout[-2000:]}"
    return float(found[-1])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny Llama and OPT saved as local model directories."""
    root = tmp_path_factory.mktemp("models")
    for arch in ("llama", "opt"):
        tiny_model(arch).save_pretrained(root / arch)
        tiny_tokenizer().save_pretrained(root / arch)
    return root


def dense_linears(model_dir: Path, dtype: torch.dtype = torch.float16) -> dict:
    """``{full name: dense weight}`` of the decoder linears, in the hosts' float16 unless told."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    return {name: m.weight.detach().clone() for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and ".layers." in name}


def host_calibration(model_dir: Path, nsamples: int) -> torch.Tensor:
    """The fixtures' calibration windows (their ``get_c4`` on ``--host_data pydoc``), ``(nsamples, SEQLEN)``."""
    from transformers import AutoTokenizer

    undo = route_hub_datasets("pydoc")
    try:  # loaded after routing: the fixture binds datasets.load_dataset at import, as the hosts do
        spec = importlib.util.spec_from_file_location("wanda_host_data", HOSTS / "wanda" / "lib" / "data.py")
        data = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(data)
        loader, _ = data.get_c4(nsamples, 0, SEQLEN, AutoTokenizer.from_pretrained(model_dir))
    finally:
        undo()
    return torch.cat([inp for inp, _ in loader])


def layer_errors(model_dir: Path, weights: dict, tokens: torch.Tensor, names: list[str]) -> dict:
    """``Σ_rows (ŵ - w)ᵀ H (ŵ - w)`` of ``weights[name]`` against the dense weights, ``H`` from the
    dense float32 model's inputs to that linear on ``tokens`` (independent of the plugin)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    modules = dict(model.named_modules())
    accs = {name: HessianAccumulator() for name in names}
    handles = [modules[name].register_forward_hook(accs[name].hook) for name in names]
    with torch.no_grad():
        model(tokens)
    for h in handles:
        h.remove()
    return {name: reconstruction_error(modules[name].weight.detach(), weights[name].float(), accs[name].hessian)
            for name in names}


def assert_masks_kept(run: dict) -> None:
    """The final zeros are exactly the host's own masks: pruned entries zero, no kept entry zeroed."""
    assert set(run["masks"]) == set(run["weights"])
    for name, mask in run["masks"].items():
        assert torch.equal(run["weights"][name] == 0, mask), name


def check_against_host(pair: dict, model_dir: Path, *, label: str, same_masks: list[str], in_sample: list[str],
                       nsamples: int, layers: int, host_updates: bool = False, beat: float = 0.95) -> None:
    """What ``optima-host --weight_update optima`` must give compared with the host's own run.

    Args:
        pair: :func:`run_pair`'s runs.
        label: the host's perplexity printout.
        same_masks: layers whose mask must equal the host's own run's (their inputs do not depend on
            the plugin: block 0's first pass, or every layer for magnitude).
        in_sample: layers whose reconstruction error on the host's calibration windows, ``H`` from the
            dense model, must be lower than the host's (block 0: the plugin's ``H`` is that one).
        nsamples: the host's calibration windows.
        layers: linears the plugin must have updated.
        host_updates: the host changes the kept weights itself (SparseGPT).
        beat: each layer's objective (on the plugin's ``H``, and on the dense ``H`` for ``in_sample``)
            is below ``beat`` times the host's.
    """
    host, ours = pair["none"], pair["optima"]
    for run in (host, ours):
        assert perplexity(run["stdout"], label) > 1
        assert_masks_kept(run)  # pruned entries exactly zero, the host's mask and nothing else
        assert {w.dtype for w in run["weights"].values()} == {torch.float16}  # the host's dtype
    assert host["report"] is None  # --weight_update none: shims and data only
    for name in same_masks:
        assert torch.equal(ours["masks"][name], host["masks"][name]), name
    dense = dense_linears(model_dir)
    for name, mask in ours["masks"].items():
        kept = ~mask
        if not host_updates:
            assert torch.equal(host["weights"][name][~host["masks"][name]], dense[name][~host["masks"][name]]), name
        reference = host["weights"][name] if name in same_masks else dense[name]
        changed = (ours["weights"][name][kept] != reference[kept]).float().mean()
        assert changed > 0.9, (name, float(changed))  # kept weights changed
    report = ours["report"]
    assert len(report["layers"]) == layers and not report["summary"]["not_updated"]
    for layer in report["layers"]:
        assert layer["objective"] < beat * layer["host_objective"], layer
        assert layer["error_ratio"] < 1.0, layer
    tokens = host_calibration(model_dir, nsamples)
    host_err = layer_errors(model_dir, host["weights"], tokens, in_sample)
    ours_err = layer_errors(model_dir, ours["weights"], tokens, in_sample)
    for name in in_sample:
        assert ours_err[name] < beat * host_err[name], (name, ours_err[name], host_err[name])


def block(prefix: str, index: int, names) -> list[str]:
    return [f"{prefix}.{index}.{n}" for n in names]


LLAMA = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
         "mlp.up_proj", "mlp.down_proj")
OPT = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2")


# -- the hosts ----------------------------------------------------------------


@pytest.fixture(scope="module")
def wanda_llama(models, tmp_path_factory):
    args = ["--model", str(models / "llama"), "--prune_method", "wanda", "--sparsity_ratio", "0.5",
            "--sparsity_type", "unstructured", "--nsamples", "12", "--eval_windows", "2"]
    return run_pair("wanda", args, tmp_path_factory.mktemp("wanda_llama"))


def test_wanda_llama(wanda_llama, models):
    b0 = block("model.layers", 0, LLAMA)
    check_against_host(wanda_llama, models / "llama", label="wikitext perplexity", same_masks=b0, in_sample=b0,
                       nsamples=12, layers=21)
    for layer in wanda_llama["optima"]["report"]["layers"]:  # Wanda's weights are its mask on the dense weights
        assert layer["host_objective"] == pytest.approx(layer["mask_objective"], rel=1e-4)
    assert wanda_llama["optima"]["report"]["own_passes"] == []  # the host's first pass gave every Hessian


def test_wanda_llama_block0_error_on_fresh_data(wanda_llama, models):
    """Held-out text: block 0's error is lower too (768 calibration tokens; with 256, down_proj overfits)."""
    from optima_plugin.data import get_calibration

    names = block("model.layers", 0, LLAMA)
    tokens = get_calibration("pydoc", tiny_tokenizer(), 8, SEQLEN, seed=123)
    host = layer_errors(models / "llama", wanda_llama["none"]["weights"], tokens, names)
    ours = layer_errors(models / "llama", wanda_llama["optima"]["weights"], tokens, names)
    for name in names:
        assert ours[name] < 0.9 * host[name], (name, ours[name], host[name])


def test_wanda_opt_2of4(models, tmp_path):
    args = ["--model", str(models / "opt"), "--prune_method", "wanda", "--sparsity_ratio", "0.5",
            "--sparsity_type", "2:4", "--nsamples", "8", "--eval_windows", "2", "--solver", "direct"]
    pair = run_pair("wanda", args, tmp_path)
    b0 = block("model.decoder.layers", 0, OPT)
    check_against_host(pair, models / "opt", label="wikitext perplexity", same_masks=b0, in_sample=b0,
                       nsamples=8, layers=18)
    for name, w in pair["optima"]["weights"].items():
        assert bool(((w == 0).reshape(w.shape[0], -1, 4).sum(-1) == 2).all()), name
    assert {layer["update"]["solver"] for layer in pair["optima"]["report"]["layers"]} == {"direct"}


def test_wanda_sparsegpt_host_updates_weights(models, tmp_path):
    """SparseGPT updates the kept weights itself: OPTIMA's exact optimum for its mask is better still (on the
    calibration H itself: --hessian_shrink 0; shrunk, the optimum is that of another H)."""
    args = ["--model", str(models / "llama"), "--prune_method", "sparsegpt", "--sparsity_ratio", "0.5",
            "--sparsity_type", "unstructured", "--nsamples", "8", "--eval_windows", "2", "--hessian_shrink", "0"]
    pair = run_pair("wanda", args, tmp_path)
    b0 = block("model.layers", 0, LLAMA)
    check_against_host(pair, models / "llama", label="wikitext perplexity", same_masks=b0, in_sample=b0,
                       nsamples=8, layers=21, host_updates=True, beat=0.999)
    dense = dense_linears(models / "llama")
    for name in b0:  # the host's own update moved its kept weights
        kept = ~pair["none"]["masks"][name]
        assert (pair["none"]["weights"][name][kept] != dense[name][kept]).float().mean() > 0.9, name
    report = pair["optima"]["report"]["layers"]
    assert all(layer["host_objective"] < layer["mask_objective"] for layer in report)


def test_trim_device_cpu_row_ratios(models, tmp_path):
    args = ["--model", str(models / "llama"), "--use_trim", "--input_recalc", "--sparsity_ratio", "0.6",
            "--nsamples_calibration", "8", "--device", "cpu"]
    pair = run_pair("trim", args, tmp_path)
    # Block 0's q/k/v come from the dense first pass; the later masks follow re-runs with updated weights.
    b0 = block("model.layers", 0, BLOCK0)
    check_against_host(pair, models / "llama", label="Perplexity on wikitext", same_masks=b0, in_sample=b0,
                       nsamples=8, layers=21)
    row_counts = [mask.sum(1).float() for mask in pair["optima"]["masks"].values()]
    assert max(float(c.std()) for c in row_counts) > 0.5  # TRIM: rows lose different shares
    assert pair["optima"]["report"]["own_passes"] == []  # the host's own passes gave every Hessian
    assert ": device cpu" in pair["optima"]["stdout"]  # the host's hf_device_map printout (the shim's map)


def test_magnitude_gets_an_own_statistics_pass(models, tmp_path):
    args = ["--model", str(models / "llama"), "--prune_method", "magnitude", "--sparsity_ratio", "0.5",
            "--sparsity_type", "unstructured", "--nsamples", "8", "--eval_windows", "2", "--optima_nsamples", "8"]
    pair = run_pair("wanda", args, tmp_path)
    everything = list(pair["none"]["masks"])  # magnitude masks depend on the weights only
    check_against_host(pair, models / "llama", label="wikitext perplexity", same_masks=everything,
                       in_sample=block("model.layers", 0, LLAMA), nsamples=8, layers=21)
    assert [p["blocks"] for p in pair["optima"]["report"]["own_passes"]] == [[0, 1, 2]]
    # The dense weights came from the checkpoint's safetensors, one block at a time.
    assert 0 < pair["optima"]["report"]["summary"]["dense_peak_bytes"] <= max(block_bytes(models / "llama"))


# -- what the seam holds ----------------------------------------------------------


def block_bytes(model_dir: Path, dtype: torch.dtype = torch.float16) -> list[int]:
    """Bytes of each block's decoder linears, in the hosts' float16 unless told."""
    sizes: dict[int, int] = {}
    for name, w in dense_linears(model_dir, dtype).items():
        index = int(name.split(".layers.")[1].split(".")[0])
        sizes[index] = sizes.get(index, 0) + w.numel() * w.element_size()
    return [sizes[i] for i in sorted(sizes)]


def test_seam_holds_one_block_of_dense_weights(wanda_llama, models):
    """Wanda's loop: the seam copies a block's linears at the host's first call of it and frees them when the
    host moves on; at no time does it hold more than one block's (at load: none; the old seam: every block)."""
    sizes = block_bytes(models / "llama")
    assert len(sizes) == 3
    peak = wanda_llama["optima"]["report"]["summary"]["dense_peak_bytes"]
    assert peak == max(sizes) and peak * len(sizes) == sum(sizes)


def test_seam_gives_freed_heap_back_after_each_block(models, tmp_path, monkeypatch):
    """The real Wanda loop (SmolLM2-135M) left glibc's heap 1.1 GB above the host alone's, all of it freed
    memory: the seam hands it back (``malloc_trim``) once per block it is done with, and the run's results
    do not depend on it."""
    from optima_plugin.host import seam as seam_module

    calls = []
    real = seam_module.release_freed_memory
    monkeypatch.setattr(seam_module, "release_freed_memory", lambda: calls.append(1) or real())
    args = ["--model", str(models / "llama"), "--prune_method", "wanda", "--sparsity_ratio", "0.5",
            "--sparsity_type", "unstructured", "--nsamples", "2", "--eval_windows", "1"]
    run = run_host("wanda", args + COMMON + ["--weight_update", "optima"], tmp_path)
    assert len(run["report"]["layers"]) == 21
    assert len(calls) >= 3  # at least once per block (3 blocks): after its masks, and when the host leaves it
    assert isinstance(real(), bool)  # True on glibc; False elsewhere, never an error


def test_magnitude_without_safetensors_keeps_the_host_weights(models, tmp_path, capsys):
    """No checkpoint on disk to read dense weights from (a .bin model here; GGUF, a hub id not cached): masks
    applied before the host calls their block keep the host's weights, and the log says so."""
    from transformers import AutoModelForCausalLM

    from safetensors.torch import load_file

    AutoModelForCausalLM.from_pretrained(models / "llama").save_pretrained(tmp_path / "bin")
    tiny_tokenizer().save_pretrained(tmp_path / "bin")
    torch.save(load_file(tmp_path / "bin" / "model.safetensors"), tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "bin" / "model.safetensors").unlink()
    assert not list((tmp_path / "bin").glob("*.safetensors"))
    args = ["--model", str(tmp_path / "bin"), "--prune_method", "magnitude", "--sparsity_ratio", "0.5",
            "--sparsity_type", "unstructured", "--nsamples", "2", "--eval_windows", "1", "--optima_nsamples", "2"]
    run = run_host("wanda", args + COMMON + ["--weight_update", "optima"], tmp_path / "run")
    log = capsys.readouterr().err  # the launcher's log lines
    assert "no local safetensors" in log and "21 linear(s) were pruned before the host called" in log
    assert run["report"]["layers"] == [] and run["report"]["own_passes"] == []
    assert run["report"]["summary"]["dense_peak_bytes"] == 0
    dense = dense_linears(tmp_path / "bin")
    for name, mask in run["masks"].items():  # the host's own weights: its mask on the dense weights
        assert torch.equal(run["weights"][name], dense[name].masked_fill(mask, 0)), name


@pytest.fixture
def zeros_model(models, tmp_path):
    """The tiny Llama with zeros of its own in block 0's k_proj (columns 0-3), as GGUF-dequantized weights have."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(models / "llama")
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight[:, :4] = 0
    model.save_pretrained(tmp_path / "zeros")
    tiny_tokenizer().save_pretrained(tmp_path / "zeros")
    return tmp_path / "zeros"


def _first_pass(inst, model):
    """Wanda's first pass on block 0 (4 windows): the seam's copy of the block, its Hessians; returns
    the block, its k_proj, k_proj's dense weight, its Hessian and the windows."""
    block0 = model.model.layers[0]
    hidden = [torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    with torch.no_grad():
        for x in hidden:
            block0(x)
    k = block0.self_attn.k_proj
    state = inst.seam.blocks[0].linears["self_attn.k_proj"]
    assert inst.seam.dense_bytes() == sum(ls.module.weight.numel() * 4 for ls in inst.seam.blocks[0].linears.values())
    return block0, k, k.weight.detach().clone(), inst.seam.blocks[0].accs[state.owner].hessian.clone(), hidden


def test_mask_with_unchanged_zero_count_is_handled(zeros_model):
    """The host updates weights and masks so that the number of zeros stays the same (the dense zeros become
    nonzero, as many other entries become zero): still a new mask, found against the dense weights."""
    from transformers import AutoModelForCausalLM

    with install(HostOptions(solver="direct")) as inst:
        model = AutoModelForCausalLM.from_pretrained(zeros_model)
        block0, k, dense, hessian, hidden = _first_pass(inst, model)
        assert bool((dense[:, :4] == 0).all())
        with torch.no_grad():
            k.weight[:, :4] = 0.01  # an update revives the dense zeros ...
            k.weight[:, 4:8] = 0  # ... and the mask zeroes as many others, row by row
        assert torch.equal((k.weight == 0).sum(1), (dense == 0).sum(1))
        with torch.no_grad():
            block0(hidden[0])  # the host's second pass
        assert [x["name"] for x in inst.seam.layers] == ["model.layers.0.self_attn.k_proj"]
        pruned = torch.zeros_like(dense, dtype=torch.bool)
        pruned[:, 4:8] = True
        assert torch.equal(k.weight == 0, pruned)
        assert torch.allclose(k.weight, reconstruct(dense, pruned, default_shrunk(hessian), solver="direct").weight, atol=1e-6)
        with torch.no_grad():
            block0(hidden[1])  # the seam's own answer is not a new mask
        assert len(inst.seam.layers) == 1


def test_mask_over_dense_zeros_is_handled(zeros_model):
    """The host's mask covers entries that were zero already: they count as pruned (the host's zero pattern
    is kept); a mask of dense zeros only leaves the weight as it was, and the dense weight is its optimum."""
    from transformers import AutoModelForCausalLM

    with install(HostOptions(solver="direct")) as inst:
        model = AutoModelForCausalLM.from_pretrained(zeros_model)
        block0, k, dense, hessian, hidden = _first_pass(inst, model)
        v = block0.self_attn.v_proj
        with torch.no_grad():
            k.weight[:, :4] = 0  # dense zeros only: the weight is unchanged
            block0(hidden[0])
        assert inst.seam.layers == [] and torch.equal(k.weight, dense)
        hessian = inst.seam.blocks[0].accs["self_attn.q_proj"].hessian.clone()  # that call's window added
        pruned = torch.zeros_like(dense, dtype=torch.bool)
        pruned[:, :8] = True  # four dense zeros, four new ones
        with torch.no_grad():
            k.weight[pruned] = 0
            block0(hidden[1])
        assert [x["name"] for x in inst.seam.layers] == ["model.layers.0.self_attn.k_proj"]
        assert torch.equal(k.weight == 0, pruned)
        assert torch.allclose(k.weight, reconstruct(dense, pruned, default_shrunk(hessian), solver="direct").weight, atol=1e-6)
        assert torch.equal(v.weight, inst.seam.blocks[0].linears["self_attn.v_proj"].dense)  # v: not masked
        model.model.layers[1](hidden[0])  # the host moves on: block 0's copies are freed, block 1's taken
        assert all(ls.dense is None for ls in inst.seam.blocks[0].linears.values())
        assert inst.seam.dense_bytes() == sum(ls.module.weight.numel() * 4
                                              for ls in inst.seam.blocks[1].linears.values())


# -- custom selectors from another package -------------------------------------


def _example_selector():
    pytest.importorskip("optima_example_selector",
                        reason="examples/custom_selector is not installed (CI installs it: "
                        "pip install -e examples/custom_selector)")
    from optima_plugin.plugins import registry

    assert "row_magnitude" in registry("selectors"), "the example package is installed but not registered"


def row_magnitude_mask(weight: torch.Tensor, ratio: float) -> torch.Tensor:
    return row_mask(weight.abs().float(), ratio)


def test_custom_selector_through_optima_host(models, tmp_path):
    _example_selector()
    run = run_host("wanda", ["--model", str(models / "llama"), "--prune_method", "wanda", "--sparsity_ratio", "0.5",
                             "--sparsity_type", "unstructured", "--nsamples", "4", "--eval_windows", "2",
                             "--mask_selector", "row_magnitude", *COMMON], tmp_path, console=True)
    dense = dense_linears(models / "llama")
    for name, w in run["weights"].items():
        ours = w == 0
        assert torch.equal(ours, row_magnitude_mask(dense[name], 0.5)), name
        assert not torch.equal(ours, run["masks"][name]), name  # not the host's Wanda mask
        assert torch.equal(ours.sum(1), run["masks"][name].sum(1)), name  # the host's per-row counts
        assert (w[~ours] != dense[name][~ours]).float().mean() > 0.9, name  # OPTIMA weights
    assert len(run["report"]["layers"]) == 21
    assert all(layer["error_ratio"] < 1 for layer in run["report"]["layers"])


def test_custom_selector_through_optima_prune(models, tmp_path):
    _example_selector()
    from transformers import AutoModelForCausalLM

    from optima_plugin import cli

    out = tmp_path / "pruned"
    assert cli.main(["--model", str(models / "llama"), "--prune_method", "row_magnitude", "--sparsity_ratio", "0.5",
                     "--nsamples", "2", "--seqlen", "32", "--save_model", str(out), "--quiet"]) == 0
    dense = dense_linears(models / "llama", torch.float32)
    pruned = dict(AutoModelForCausalLM.from_pretrained(out).named_modules())
    for name, weight in dense.items():
        assert torch.equal(pruned[name].weight == 0, row_magnitude_mask(weight, 0.5)), name


# -- the pieces, in process ---------------------------------------------------


def test_split_argv_removes_plugin_flags_anywhere():
    ns, script, host = split_argv(["--solver", "direct", "main.py", "--model", "m", "--weight_update=optima",
                                   "--nsamples", "8", "--host_data", "pydoc", "--save", "out/"])
    assert script == "main.py"
    assert host == ["--model", "m", "--nsamples", "8", "--save", "out/"]
    assert (ns.solver, ns.weight_update, ns.host_data) == ("direct", "optima", "pydoc")
    with pytest.raises(ValueError, match="no host script"):
        split_argv(["--solver", "pcg"])


@pytest.mark.parametrize("argv, match", [
    (["nope.py"], "host script nope.py not found"),
    ([__file__, "--weight_update", "nope"], "unknown --weight_update 'nope'; known: native, none, optima"),
    ([__file__, "--mask_selector", "nope"], "unknown --mask_selector 'nope'"),
    ([__file__, "--solver", "nope"], "known solvers"),
    ([__file__, "--host_data", "/does/not/exist"], "--host_data /does/not/exist: neither pydoc nor sherlock nor"),
    ([__file__, "--host_data", __file__], "expected a text file (.txt, .json, .jsonl), got .py"),
    ([__file__, "--tol", "0"], "--tol must be in (0, 1) (a relative tolerance), got 0.0"),
    ([__file__, "--tol=-1e-3"], "--tol must be in (0, 1) (a relative tolerance), got -0.001"),
    ([__file__, "--tol", "nan"], "--tol must be in (0, 1) (a relative tolerance), got nan"),
    ([__file__, "--tol", "inf"], "--tol must be in (0, 1) (a relative tolerance), got inf"),
    ([__file__, "--tol", "1"], "--tol must be in (0, 1) (a relative tolerance), got 1.0"),  # optima-prune's rule
    ([__file__, "--max_iter", "0"], "--max_iter must be a positive integer, got 0"),  # optima-prune's rule
    ([__file__, "--damp", "nan"], "--damp must be a finite number >= 0 or 'auto', got nan"),  # optima-prune's rule
    ([__file__, "--damp", "inf"], "--damp must be a finite number >= 0 or 'auto', got inf"),
    ([__file__, "--damp=-0.1"], "--damp must be a finite number >= 0"),
    ([__file__, "--optima_report", str(Path(__file__).parent)], "--optima_report"),  # a folder
    ([__file__, "--optima_report", __file__ + "/r.json"], "--optima_report"),  # under a file
])
def test_launcher_bad_input_one_line(argv, match, capsys):
    assert host_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("optima-host: error:") and match in err, err


def test_host_data_routes_c4_and_wikitext():
    import datasets

    calibration, evaluation = split_text("pydoc")
    undo = route_hub_datasets("pydoc")
    try:
        train = datasets.load_dataset("allenai/c4", "allenai--c4", data_files={"train": "x.json.gz"}, split="train")
        test = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
        both = datasets.load_dataset("allenai/c4", data_files={"train": "a", "validation": "b"})
    finally:
        undo()
    assert train.column_names == ["text"] and "\n\n".join(train["text"]) == calibration
    assert len(train) == 3 and min(len(doc) for doc in train["text"]) >= 100_000
    assert test["text"] == [evaluation] and both["validation"]["text"] == [evaluation]
    assert 0.79 < len(calibration) / (len(calibration) + len(evaluation)) < 0.81
    assert datasets.load_dataset.__module__.startswith("datasets")  # undone


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA shim is for machines without a GPU")
def test_cuda_on_cpu_mode():
    with CudaOnCpu():
        a = torch.zeros(3, device="cuda")
        b = torch.arange(3, device=torch.device("cuda:0"))
        lin = nn.Linear(2, 2).to("cuda").cuda()
        c = a.cuda().to("cuda", torch.float16)
    assert {t.device.type for t in (a, b, c, lin.weight)} == {"cpu"} and c.dtype == torch.float16
    assert cpu_device_map("cuda") == "cpu" and cpu_device_map(0) == "cpu" and cpu_device_map("auto") == "auto"
    assert cpu_device_map({"model": "cuda:1", "lm_head": "cpu"}) == {"model": "cpu", "lm_head": "cpu"}
    with pytest.raises((RuntimeError, AssertionError)):
        torch.zeros(1, device="cuda")  # the mode is gone


def test_pin_seqlen_ignores_host_assignment():
    model = tiny_model("opt")
    name = type(model).__name__
    pin_seqlen(model, 64)
    model.seqlen = model.config.max_position_embeddings
    assert model.seqlen == 64 and type(model).__name__ == name and isinstance(model, nn.Module)


def test_reselect_keeps_host_counts_and_pattern():
    w = random_weight(16, 32)
    h = activation_hessian(32).float()
    rows = torch.zeros(16, 32, dtype=torch.bool)
    for i in range(16):
        rows[i, : 4 + i] = True  # per-row counts 4..19
    assert torch.equal(host_ratio(rows), torch.arange(4, 20, dtype=torch.float64) / 32)
    magnitude = lookup("selectors", "magnitude", "--prune_method")
    picked = reselect(magnitude, w, h, rows)
    assert torch.equal(picked.sum(1), rows.sum(1)) and not torch.equal(picked, rows)
    nm = torch.zeros(16, 32, dtype=torch.bool).reshape(16, 8, 4)
    nm[..., :2] = True
    assert infer_pattern(nm.reshape(16, 32)) == Pattern(2, 4)
    assert infer_pattern(rows) == Pattern()
    picked = reselect(lookup("selectors", "wanda", "--prune_method"), w, h, nm.reshape(16, 32))
    assert bool((picked.reshape(16, 8, 4).sum(-1) == 2).all())


def _layer_problem():
    w = random_weight(24, 32)
    h = activation_hessian(32).float()
    pruned = row_mask(w.abs(), 0.5)
    lin = nn.Linear(32, 24, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w.masked_fill(pruned, 0))
    return w, h, pruned, lin


def test_emit_mask_explicit_call():
    """The one call a host author adds after ``weight[W_mask] = 0``: the OPTIMA plugin answers it."""
    w, h, pruned, lin = _layer_problem()
    assert emit_mask("layer", lin, pruned, hessian=h, dense_weight=w) is None  # no plugin answers: unchanged
    assert torch.equal(lin.weight, w.masked_fill(pruned, 0))
    with install(HostOptions(solver="direct")):
        with pytest.raises(ValueError, match="pass dense_weight="):
            emit_mask("layer", lin, pruned, hessian=h)
        assert emit_mask("layer", lin, pruned, hessian=h, dense_weight=w) is lin.weight
    expected = reconstruct(w, pruned, default_shrunk(h), solver="direct").weight
    assert torch.allclose(lin.weight, expected, atol=1e-6)
    assert bool((lin.weight[pruned] == 0).all()) and bool((lin.weight[~pruned] != w[~pruned]).any())


def test_mask_emitted_hook_any_implementation():
    """``optima_mask_emitted`` is the seam: any registered implementation answers, in the layer's dtype."""
    w, h, pruned, lin = _layer_problem()
    lin.half()
    seen = {}

    class Doubler:
        @hookimpl
        def optima_mask_emitted(self, name, module, pruned, hessian, dense_weight):
            seen.update(name=name, module=module, hessian=hessian)
            return 2 * dense_weight  # pruned entries are zeroed by the caller

    pm = get_plugin_manager()
    pm.register(Doubler(), name="doubler")
    try:
        emit_mask("blocks.0.fc", lin, pruned, hessian=h, dense_weight=w)
    finally:
        pm.unregister(name="doubler")
    assert seen["name"] == "blocks.0.fc" and seen["module"] is lin and seen["hessian"] is h
    assert lin.weight.dtype == torch.float16
    assert torch.equal(lin.weight, (2 * w).masked_fill(pruned, 0).half())


def test_seam_in_process_explicit_emit_and_shims(models):
    """A host loop inline: the seam's Hessian for an explicit emit, no double handling, tuple outputs."""
    from transformers import AutoModelForCausalLM, PreTrainedModel

    loader = PreTrainedModel.__dict__["from_pretrained"]
    with install(HostOptions(solver="direct")) as inst:
        model = AutoModelForCausalLM.from_pretrained(models / "llama")
        block0 = model.model.layers[0]
        hidden = [torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(i)) for i in range(4)]
        with torch.no_grad():
            outs = [block0(x) for x in hidden]  # no position_embeddings: the shim computes them
        assert all(isinstance(o, tuple) and o[0].shape == (1, 16, 64) for o in outs)
        q = block0.self_attn.q_proj
        dense = q.weight.detach().clone()
        mask = row_mask(dense.abs(), 0.5)
        hessian = inst.seam.blocks[0].accs["self_attn.q_proj"].hessian.clone()
        q.weight.data[mask] = 0
        emit_mask("q", q, mask)
        assert torch.allclose(q.weight, reconstruct(dense, mask, default_shrunk(hessian), solver="direct").weight, atol=1e-6)
        with torch.no_grad():
            block0(hidden[0])
            logits = model(torch.randint(0, 512, (1, 16))).logits  # inside a model forward: tensors flow
        assert logits.shape == (1, 16, 512)
        assert [x["name"] for x in inst.seam.layers] == ["model.layers.0.self_attn.q_proj"]
        assert inst.seam.dense_bytes() == 0  # the model forward left block 0: its dense copy is freed
        with torch.no_grad():
            block0(hidden[0])  # the host comes back to it: a fresh copy of what is still dense
        # A dense weight with zeros of its own (GGUF-dequantized models): the host's zero pattern is kept.
        state = inst.seam.blocks[0].linears["self_attn.k_proj"]
        k = block0.self_attn.k_proj
        state.dense[:, :5] = 0
        k.weight.data[:, :5] = 0
        state.seen()  # as if loaded so
        with torch.no_grad():
            block0(hidden[0])  # no new mask yet: nothing happens
        assert len(inst.seam.layers) == 1
        scores = state.dense.abs().clone()
        scores[:, :5] = float("inf")
        mask = row_mask(scores, 0.25)  # never the zero columns: the host keeps them
        assert not bool(mask[:, :5].any())
        k.weight.data[mask] = 0
        zeros = k.weight == 0
        with torch.no_grad():
            block0(hidden[0])
        assert len(inst.seam.layers) == 2 and torch.equal(k.weight == 0, zeros)
    assert PreTrainedModel.__dict__["from_pretrained"] is loader  # uninstalled


def test_native_keeps_the_host_weights_without_a_seam():
    with install(HostOptions(weight_update="native")) as inst:
        assert inst.seam is None and inst.plugin is None
    with install(HostOptions(weight_update="none", mask_selector="magnitude")) as inst:
        assert inst.seam is not None and inst.plugin is None  # the selector's mask, mask-only weights


# -- SmolLM2-135M through the Wanda-style host ----------------------------------


@pytest.mark.slow
def test_smollm2_wanda_host_perplexity(tmp_path):
    """The host's own perplexity printout on SmolLM2-135M, with and without ``--weight_update optima``
    (8 x 256 calibration tokens, 4 evaluation windows of 256: short, so a loose bound)."""
    from optima_plugin.loading import default_model, load_model, save_model

    directory, gguf = default_model()
    model, tokenizer = load_model(directory, gguf_file=gguf)
    save_model(model, tokenizer, str(tmp_path / "smollm2"))  # the hosts load a model folder
    del model
    args = ["--model", str(tmp_path / "smollm2"), "--prune_method", "wanda", "--sparsity_ratio", "0.5",
            "--sparsity_type", "unstructured", "--nsamples", "8", "--eval_windows", "4", "--host_data", "pydoc",
            "--host_seqlen", "256", "--host_dtype", "float32", "--tol", "1e-2", "--optima_quiet"]
    report = tmp_path / "report.json"
    ppl = {wu: perplexity(run_host("wanda", args + ["--weight_update", wu] + (["--optima_report", str(report)]
                                                                              if wu == "optima" else []),
                                   tmp_path / wu, save=False)["stdout"], "wikitext perplexity")
           for wu in ("none", "optima")}
    assert 15 < ppl["none"] < 60, ppl  # 50% Wanda on SmolLM2 (dense: about 13 on this text)
    assert ppl["optima"] < 0.85 * ppl["none"], ppl
    # The seam held one block's linears at most (13.5 MiB in float32), not the model's (405 MiB).
    sizes = block_bytes(tmp_path / "smollm2", torch.float32)
    peak = json.loads(report.read_text())["summary"]["dense_peak_bytes"]
    print(f"SmolLM2 dense peak {peak} bytes; one block {max(sizes)}; every block {sum(sizes)}")
    assert peak == max(sizes) and 29 * peak < sum(sizes)


def test_explicit_emit_reads_dense_weights_from_the_checkpoint(models):
    """``emit_mask`` for a block the host never called: the dense weights come from the model folder's
    safetensors (the seam copied nothing at load) and are freed right after."""
    from transformers import AutoModelForCausalLM

    with install(HostOptions(solver="direct")) as inst:
        model = AutoModelForCausalLM.from_pretrained(models / "llama")
        assert inst.seam.dense_bytes() == 0 and inst.seam.checkpoint is not None  # nothing copied at load
        q = model.model.layers[1].self_attn.q_proj
        dense = q.weight.detach().clone()
        mask = row_mask(dense.abs(), 0.5)
        hessian = activation_hessian(64, seed=3)
        q.weight.data[mask] = 0
        emit_mask("q", q, mask, hessian=hessian)
        assert torch.allclose(q.weight, reconstruct(dense, mask, default_shrunk(hessian), solver="direct").weight, atol=1e-6)
        assert inst.seam.dense_bytes() == 0 and inst.seam.peak_dense_bytes == dense.numel() * 4


def test_host_cast_after_load_is_not_a_mask(models):
    """A host that casts the model after loading it (``model.half()``): the cast is no mask; the seam copies
    the block in the new dtype at the host's first call, and the mask applied after that is handled."""
    from transformers import AutoModelForCausalLM

    with install(HostOptions(solver="direct")) as inst:
        model = AutoModelForCausalLM.from_pretrained(models / "llama", dtype=torch.float32)
        model.to(torch.bfloat16)
        block0 = model.model.layers[0]
        hidden = [torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(i)).bfloat16() for i in range(2)]
        with torch.no_grad():
            for x in hidden:
                block0(x)
        assert inst.seam.layers == []
        state = inst.seam.blocks[0].linears["self_attn.o_proj"]
        o = block0.self_attn.o_proj
        assert state.dense.dtype == torch.bfloat16 and torch.equal(state.dense, o.weight)
        mask = row_mask(o.weight.detach().abs().float(), 0.5)
        with torch.no_grad():
            o.weight[mask] = 0
            block0(hidden[0])
        assert [x["name"] for x in inst.seam.layers] == ["model.layers.0.self_attn.o_proj"]
        assert torch.equal(o.weight == 0, mask) and o.weight.dtype == torch.bfloat16


def test_whole_model_forward_leaves_the_block(models):
    """Wanda's last block: nothing but the host's evaluation (a whole-model forward) follows it. The seam
    handles its masks, frees its dense copy and Hessians at that forward (not at the end of the run); a host
    that comes back to the block (TRIM re-runs it) gets a fresh copy of what is still dense."""
    from transformers import AutoModelForCausalLM

    with install(HostOptions(solver="direct")) as inst:
        model = AutoModelForCausalLM.from_pretrained(models / "llama")
        n = len(model.model.layers)
        last = model.model.layers[-1]
        st = inst.seam.blocks[-1]
        hidden = [torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(i)) for i in range(4)]
        with torch.no_grad():
            for x in hidden:
                last(x)
        q = last.self_attn.q_proj
        dense = q.weight.detach().clone()
        hessian = st.accs[st.linears["self_attn.q_proj"].owner].hessian.clone()
        mask = row_mask(dense.abs(), 0.5)
        q.weight.data[mask] = 0
        assert inst.seam.dense_bytes() == inst.seam.block_bytes(st)
        with torch.no_grad():
            model(torch.randint(0, 512, (1, 16)))
        assert [x["name"] for x in inst.seam.layers] == [f"model.layers.{n - 1}.self_attn.q_proj"]
        assert torch.allclose(q.weight, reconstruct(dense, mask, default_shrunk(hessian), solver="direct").weight, atol=1e-6)
        assert inst.seam.dense_bytes() == 0 and st.accs == {}
        with torch.no_grad():
            last(hidden[0])  # the host comes back: every linear but the handled q_proj is copied again
        assert inst.seam.dense_bytes() == inst.seam.block_bytes(st) - dense.numel() * 4
        k = last.self_attn.k_proj
        k_dense = k.weight.detach().clone()
        k_hessian = st.accs[st.linears["self_attn.k_proj"].owner].hessian.clone()  # hidden[0] only
        k_mask = row_mask(k_dense.abs(), 0.5)
        k.weight.data[k_mask] = 0
        with torch.no_grad():
            last(hidden[1])
        assert [x["name"] for x in inst.seam.layers][1:] == [f"model.layers.{n - 1}.self_attn.k_proj"]
        assert torch.allclose(k.weight, reconstruct(k_dense, k_mask, default_shrunk(k_hessian), solver="direct").weight, atol=1e-6)


def test_fingerprint_against_bit_sums_and_without_copies():
    """``fingerprint``: each row's bit patterns summed modulo 2**32 (checked against NumPy's int64 sums of the
    same bits), sees one zeroed entry (``-0.0`` too), and allocates no copy of the weight: at every block call
    the old int64 sum cast the whole weight first (2x an fp32 weight's bytes). ``row_zeros`` likewise."""
    import numpy as np
    from torch.profiler import ProfilerActivity, profile

    from optima_plugin.host.seam import fingerprint, row_zeros

    g = torch.Generator().manual_seed(0)
    base = torch.randn(96, 4096, generator=g) * 100
    base[base.abs() < 1] = 0
    for dtype, bits in [(torch.float32, np.int32), (torch.bfloat16, np.int16), (torch.float16, np.int16)]:
        w = base.to(dtype)
        raw = w.view(torch.int32 if bits is np.int32 else torch.int16).numpy().astype(np.int64).sum(axis=1)
        wrapped = (raw + 2**31) % 2**32 - 2**31
        assert np.array_equal(fingerprint(w).numpy().astype(np.int64), wrapped), dtype
        assert np.array_equal(row_zeros(w).numpy(), (w.float().numpy() == 0).sum(axis=1)), dtype
        for value in (0.0, -0.0):
            changed = w.clone()
            row, col = 5, int((changed[5] != 0).nonzero()[0])
            changed[row, col] = value
            differs = fingerprint(changed) != fingerprint(w)
            assert differs.tolist() == [i == row for i in range(w.shape[0])], (dtype, value)
    w64 = base.double()
    assert np.array_equal(fingerprint(w64).numpy(), w64.view(torch.int64).numpy().sum(axis=1))  # 8 bytes: int64

    weight = torch.randn(1536, 4608, generator=g)  # 28 MB of fp32
    for fn in (fingerprint, row_zeros):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn(weight)
        largest = max(e.cpu_memory_usage for e in prof.events())
        # the weight's bytes / 4 would be one int8 copy; a 1-MB slice's bool + int32 sums stay ~1 MB
        assert largest < weight.numel() * 4 // 4, (fn.__name__, largest)


def test_seam_attach_gives_freed_heap_back_after_each_block(monkeypatch):
    """Fingerprinting a model at load leaves each weight's temporaries as freed heap that glibc keeps (on the
    real SmolLM2-135M: 1.1 GB resident before the host's first block, above the host alone's): the seam hands
    it back after each block's fingerprints, not once at the end (that would be the peak)."""
    from optima_plugin.host import seam as seam_module
    from optima_plugin.host.seam import HostSeam, SeamSettings
    from optima_plugin.host.shims import CallDepth

    model = tiny_model("llama")
    seam = HostSeam(SeamSettings(), CallDepth())
    trims = []
    monkeypatch.setattr(seam_module, "release_freed_memory", lambda: trims.append(len(seam.blocks)) or True)
    assert seam.attach(model)
    n = len(seam.blocks)
    assert n >= 2 and trims == list(range(1, n + 1))  # once per block, right after its fingerprints
    seam.detach()


def test_host_data_serves_the_sherlock_text():
    """``--host_data sherlock``: the book (not Python's docs) behind the hosts' loaders, split 80/20 like pydoc."""
    import datasets

    from optima_plugin.data import sherlock_text

    calibration, evaluation = split_text("sherlock")
    assert calibration + evaluation == sherlock_text() and "Sherlock Holmes" in calibration
    undo = route_hub_datasets("sherlock")
    try:
        train = datasets.load_dataset("allenai/c4", "allenai--c4", data_files={"train": "x.json.gz"}, split="train")
    finally:
        undo()
    assert "\n\n".join(train["text"]) == calibration
    HostOptions(host_data="sherlock").validate()  # a built-in name, no path needed
    with pytest.raises(ValueError, match="neither pydoc nor sherlock nor an existing file"):
        HostOptions(host_data="no-such-text").validate()


# -- the seam's state machine (issue 25 item 5) ---------------------------------


def test_seam_phases_follow_the_table(models):
    """The seam's phase and block change only as its table says: load → OUTSIDE, a host block call → IN_BLOCK
    of that block, a whole-model forward → OUTSIDE (the block's copies freed), the plugin's answer runs in
    WORKING (where an ``emit_mask`` is refused and the seam's own block calls are no events), detach → DETACHED."""
    from transformers import AutoModelForCausalLM

    from optima_plugin.host.seam import REFUSED, TRANSITIONS, Event, Phase

    assert {key for key in REFUSED} == {(Phase.WORKING, Event.EMIT)}
    assert not any(phase is Phase.WORKING for phase in TRANSITIONS.values())  # WORKING only while an action runs
    seen = []

    class Watcher:
        @hookimpl
        def optima_mask_emitted(self, name, module, pruned, hessian, dense_weight):
            seam = inst.seam
            seen.append((seam.phase, seam.block))
            with pytest.raises(RuntimeError, match="inside the seam's own pass"):
                seam.emit(*seam.find(module))
            return None

    pm = get_plugin_manager()
    with install(HostOptions(solver="direct")) as inst:
        assert (inst.seam.phase, inst.seam.block) == (Phase.DETACHED, None)
        model = AutoModelForCausalLM.from_pretrained(models / "llama")
        assert (inst.seam.phase, inst.seam.block) == (Phase.OUTSIDE, None)
        blocks = model.model.layers
        x = torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            blocks[0](x)
            assert (inst.seam.phase, inst.seam.block) == (Phase.IN_BLOCK, 0)
            blocks[1](x)
            assert (inst.seam.phase, inst.seam.block) == (Phase.IN_BLOCK, 1)
            assert all(ls.dense is None for ls in inst.seam.blocks[0].linears.values())
            blocks[1].self_attn.q_proj.weight[:, :8] = 0  # the host's mask, answered at the next forward
            pm.register(Watcher(), name="phase-watcher")
            try:
                model(torch.randint(0, 512, (1, 16)))
            finally:
                pm.unregister(name="phase-watcher")
        assert seen == [(Phase.WORKING, None)]  # block := None before the block left is handled
        assert (inst.seam.phase, inst.seam.block) == (Phase.OUTSIDE, None) and inst.seam.dense_bytes() == 0
    assert (inst.seam.phase, inst.seam.block) == (Phase.DETACHED, None)
