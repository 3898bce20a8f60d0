"""The ``wanda++`` selector: Wanda++'s regional gradient score (arXiv 2503.04992) on tiny models.

The oracle recomputes every mask in float64 with its own autograd: per block, on the block's inputs
(the windows through the embedding and the blocks before it, already masked by the oracle), the gradient
of ``‖block(X_n)‖₂`` per window w.r.t. each linear's weight, ``G = sqrt(mean_n g_n²)``, the input column
norms ``‖X_j‖₂`` over all tokens from forward hooks, ``S = (α·G + ‖X_j‖₂)·|W|`` and the lowest scores per
row (or per group of M) by its own sort.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import with_plugin
from optima_plugin import cli, hookimpl, prune
from optima_plugin.data import get_calibration
from optima_plugin.streaming import open_streamed
from optima_plugin.testing import tiny_model, tiny_tokenizer
from optima_plugin.validate import resolve

FAST = dict(nsamples=4, seqlen=32, calibration_dataset="pydoc", seed=0, eval_ppl=None, progress=False)
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _oracle_mask(score: torch.Tensor, ratio: float, pattern) -> torch.Tensor:
    """True = pruned: the lowest ``floor(ratio·d)`` of each row, or ``n`` of each group of ``m`` (own sort)."""
    r, d = score.shape
    if pattern is not None:
        n, m = pattern
        order = score.reshape(r, d // m, m).argsort(dim=2)
        mask = torch.zeros(r, d // m, m, dtype=torch.bool)
        for k in range(n):
            mask.scatter_(2, order[:, :, k : k + 1], True)
        return mask.reshape(r, d)
    order = score.argsort(dim=1)
    mask = torch.zeros(r, d, dtype=torch.bool)
    mask.scatter_(1, order[:, : int(ratio * d)], True)
    return mask


def oracle_masks(tokenizer, alpha: float, ratio: float, pattern=None) -> dict:
    """``{(block, linear): mask}`` of the whole sequential prune, in float64 (mask only, no update)."""
    model = tiny_model("llama").double()
    windows = get_calibration(FAST["calibration_dataset"], tokenizer, FAST["nsamples"], FAST["seqlen"], FAST["seed"])
    masks = {}
    for b, block in enumerate(model.model.layers):
        lins = {rel: block.get_submodule(rel) for rel in LINEARS}
        weights = [lin.weight for lin in lins.values()]
        sq = {rel: torch.zeros_like(lin.weight) for rel, lin in lins.items()}
        norms = {rel: torch.zeros(lin.in_features, dtype=torch.float64) for rel, lin in lins.items()}
        out = {}
        handles = [block.register_forward_hook(lambda m, i, o: out.update(y=o[0] if isinstance(o, tuple) else o))]
        def column_norms(rel):
            def hook(module, inputs, output) -> None:
                x = inputs[0].detach()
                norms[rel] += x.reshape(-1, x.shape[-1]).square().sum(0)
            return hook

        handles += [lin.register_forward_hook(column_norms(rel)) for rel, lin in lins.items()]
        for n in range(windows.shape[0]):
            model(windows[n : n + 1])
            grads = torch.autograd.grad(out["y"].norm(), weights)
            for rel, g in zip(lins, grads):
                sq[rel] += g.square()
        for h in handles:
            h.remove()
        with torch.no_grad():
            for rel, lin in lins.items():
                g = (sq[rel] / windows.shape[0]).sqrt()
                score = (alpha * g + norms[rel].sqrt()) * lin.weight.abs()  # ‖X_j‖₂ over all T tokens
                masks[b, rel] = _oracle_mask(score, ratio, pattern)
                lin.weight[masks[b, rel]] = 0  # the next block's inputs are the pruned model's
    return masks


def _pruned(model) -> dict:
    return {(b, rel): block.get_submodule(rel).weight.detach() == 0
            for b, block in enumerate(model.model.layers) for rel in LINEARS}


@pytest.mark.parametrize("sparsity_type, ratio, pattern", [("unstructured", 0.5, None), ("2:4", 0.5, (2, 4))])
def test_masks_equal_the_float64_oracle(tokenizer, sparsity_type, ratio, pattern):
    model = tiny_model("llama")
    prune(model, tokenizer, prune_method="wanda++", sparsity_ratio=ratio, sparsity_type=sparsity_type,
          weight_update="none", **FAST)
    got, want = _pruned(model), oracle_masks(tokenizer, 100.0, ratio, pattern)
    for key in want:
        assert torch.equal(got[key], want[key]), f"block {key[0]} {key[1]}: {int((got[key] != want[key]).sum())} differ"
    # the gradient term matters: Wanda's masks (the same oracle at α = 0) differ
    wanda = oracle_masks(tokenizer, 0.0, ratio, pattern)
    changed = sum(int((want[k] != wanda[k]).sum()) for k in want) / sum(m.numel() for m in want.values())
    assert changed > 0  # not vacuous (measured: about 4% of the entries)
    if pattern is not None:  # every group of 4 inputs keeps exactly 2
        for key, mask in got.items():
            assert bool((mask.reshape(mask.shape[0], -1, 4).sum(2) == 2).all()), key


@pytest.mark.parametrize("weight_update", ["none", "optima"])
def test_alpha_zero_is_exactly_wanda(tokenizer, weight_update):
    a, b = tiny_model("llama"), tiny_model("llama")
    prune(a, tokenizer, prune_method="wanda", sparsity_ratio=0.6, weight_update=weight_update, **FAST)
    prune(b, tokenizer, prune_method="wanda++", rgs_alpha=0.0, sparsity_ratio=0.6, weight_update=weight_update, **FAST)
    for (key, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), key


def test_optima_update_end_to_end_keeps_the_masks(tokenizer):
    """With ``--weight_update optima`` the masks are the selector's (the update only refits kept weights)."""
    masked, updated = tiny_model("llama"), tiny_model("llama")
    prune(masked, tokenizer, prune_method="wanda++", sparsity_type="2:4", weight_update="none", **FAST)
    report = prune(updated, tokenizer, prune_method="wanda++", sparsity_type="2:4", weight_update="optima", **FAST)
    assert report["sparsity"] == pytest.approx(0.5)
    assert report["options"]["rgs_alpha"] == 100.0
    assert report["timings"]["phases"]["selection"] > 0
    first = {k: v for k, v in _pruned(masked).items() if k[0] == 0}  # block 0: the same inputs in both runs
    for key, mask in first.items():
        assert torch.equal(_pruned(updated)[key], mask), key
    assert all(x["accepted"] for x in report["layers"])
    assert sum(x["objective"] for x in report["layers"]) < sum(x["mask_objective"] for x in report["layers"])


def test_cli_runs_wanda_pp(tiny_dir, tmp_path):
    report = tmp_path / "report.json"
    argv = ["--model", str(tiny_dir), "--nsamples", "2", "--seqlen", "32", "--prune_method", "wanda++",
            "--rgs_alpha", "10", "--sparsity_ratio", "0.5", "--weight_update", "optima", "--eval_ppl", "pydoc",
            "--eval_max_windows", "2", "--report", str(report), "--quiet"]
    assert cli.main(argv) == 0
    data = json.loads(report.read_text())
    assert data["sparsity"] == pytest.approx(0.5)
    assert data["options"]["prune_method"] == "wanda++" and data["options"]["rgs_alpha"] == 10.0


@pytest.mark.parametrize("argv, match", [
    (["--rgs_alpha", "-1"], "--rgs_alpha must be a finite number >= 0, got -1.0"),
    (["--rgs_alpha", "nan"], "--rgs_alpha must be a finite number >= 0"),
    (["--prune_method", "wanda++", "--use_trim"], "--prune_method wanda++ scores with each block's gradients"),
])
def test_bad_options_one_line(tiny_dir, argv, match, capsys):
    assert cli.main(["--model", str(tiny_dir), "--quiet", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert match in err, err


def test_host_refuses_wanda_pp():
    from optima_plugin.host.install import HostOptions

    with pytest.raises(ValueError, match="--mask_selector wanda\\+\\+ needs each decoder block's own pass"):
        HostOptions(mask_selector="wanda++").validate()


def test_gradient_pass_restores_requires_grad_and_frees_nothing_it_does_not_own(tokenizer):
    model = tiny_model("llama")
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    model.model.norm.weight.requires_grad_(False)
    flags["model.norm.weight"] = False
    prune(model, tokenizer, prune_method="wanda++", sparsity_ratio=0.5, weight_update="none", **FAST)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


def test_resolve_declares_the_paper_default():
    assert resolve(prune_method="wanda++").option("rgs_alpha") == 100.0


def test_two_ranks_match_one_process(tmp_path, tokenizer):
    """Under torchrun each rank sums its windows' squared gradients; the all-reduced G gives the same masks."""
    from test_distributed import COMMON, RUN_CASES, torchrun

    cases = {"wandapp": dict(COMMON, prune_method="wanda++", sparsity_ratio=0.5, weight_update="optima")}
    script = tmp_path / "run_cases.py"
    script.write_text(RUN_CASES)
    proc = torchrun(script, [json.dumps(cases), str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    model = tiny_model("llama")
    prune(model, tokenizer, progress=False, **cases["wandapp"])
    ranked = torch.load(tmp_path / "wandapp.pt", weights_only=False)
    assert ranked["report"]["distributed"]["world_size"] == 2
    for key, dense in model.state_dict().items():
        other = ranked["state"][key]
        assert torch.equal(dense == 0, other == 0), f"the masks of {key} differ"
        scale = dense.abs().max().clamp_min(1e-12)
        assert float((dense - other).abs().max() / scale) <= 1e-5, key  # test_distributed's bound (float64 solves)


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "gemma2", "gemma3", "opt"])
def test_every_architecture(arch, tokenizer):
    model = tiny_model(arch)
    report = prune(model, tokenizer, prune_method="wanda++", sparsity_type="2:4", weight_update="optima", **FAST)
    assert report["sparsity"] == pytest.approx(0.5) and len(report["layers"]) > 0
    assert all(p.grad is None for p in model.parameters())


def test_streamed_and_dense_objective_equal_in_memory(tmp_path, tokenizer):
    """``--stream`` (each block read at its turn) prunes bit for bit as in memory, ``--objective dense`` too."""
    source = tmp_path / "src"
    tiny_model("qwen2").save_pretrained(source, max_shard_size="100KB")
    tokenizer.save_pretrained(source)
    options = dict(FAST, prune_method="wanda++", sparsity_ratio=0.5, weight_update="optima", objective="dense",
                   device="cpu")
    in_memory = tiny_model("qwen2")
    prune(in_memory, tokenizer, **options)
    prune(open_streamed(str(source))[0], tokenizer, save_model=str(tmp_path / "out"), **options)
    saved = {}
    for f in sorted((tmp_path / "out").glob("*.safetensors")):
        saved.update(load_file(str(f)))
    state = in_memory.state_dict()
    assert saved.keys() == state.keys()
    differ = [k for k in saved if not torch.equal(saved[k], state[k])]
    assert not differ, differ[:3]


class _Crash:
    """Fails the run once block ``at`` is checkpointed."""

    def __init__(self, at: int) -> None:
        self.at = at

    @hookimpl
    def optima_block_done(self, index, num_blocks, seconds):
        if index == self.at:
            raise RuntimeError("power cut")


def test_resume_after_a_crash_equals_the_uninterrupted_run(tmp_path, tokenizer):
    """Each block's gradients are recomputed at its turn: a resumed run prunes as the uninterrupted one."""
    options = dict(FAST, prune_method="wanda++", sparsity_ratio=0.5, weight_update="optima")
    reference = tiny_model("llama")
    prune(reference, tokenizer, **options)
    ckpt, resumed = tmp_path / "ckpt", tiny_model("llama")
    with pytest.raises(RuntimeError, match="power cut"):
        with_plugin(_Crash(0), lambda: prune(tiny_model("llama"), tokenizer, checkpoint_dir=str(ckpt), **options))
    report = prune(resumed, tokenizer, checkpoint_dir=str(ckpt), **options)
    assert report["resumed_from_block"] == 1
    for (key, x), y in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(x, y), key


def test_prepare_block_seam_for_any_selector(tokenizer):
    """A plugin selector with ``prepare_block`` gets each dense block before its linears are selected, the
    block's outputs for every window, and its data back per linear in ``select(..., block_data=)``."""
    from optima_plugin.selectors.wanda import WandaSelector

    calls = []

    class Probe(WandaSelector):
        name = "probe"

        def prepare_block(self, context):
            dense = all(bool((lin.weight != 0).all()) for lin in context.linears.values())
            outs = list(context.forward(2))
            calls.append(("block", context.index, dense, [tuple(o.shape) for o in outs], context.dist))
            return {name: (context.index, name) for name in context.linears}

        def select(self, weight, hessian, ratio, pattern, *, block_data=None):
            calls.append(("select", block_data))
            return super().select(weight, hessian, ratio, pattern)

    class Plugin:
        @hookimpl
        def optima_selectors(self):
            return [Probe()]

    with_plugin(Plugin(), lambda: prune(tiny_model("llama"), tokenizer, prune_method="probe", sparsity_ratio=0.5,
                                        weight_update="none", **FAST))
    blocks = [c for c in calls if c[0] == "block"]
    assert [c[1] for c in blocks] == [0, 1, 2] and all(c[2] for c in blocks)
    assert all(c[3] == [(2, 32, 64), (2, 32, 64)] and c[4] is None for c in blocks)  # 4 windows, 2 per forward
    for b in range(3):
        start = calls.index(blocks[b])
        selects = calls[start + 1 : start + 1 + len(LINEARS)]
        assert sorted(c[1][1] for c in selects) == sorted(f"model.layers.{b}.{rel}" for rel in LINEARS)
        assert all(c[0] == "select" and c[1][0] == b for c in selects)


def test_scores_and_masks_stay_on_the_layer_device():
    """The score and Wanda's mask code make no CPU tensor meet a GPU one (:mod:`devicecheck`)."""
    from devicecheck import DeviceCheck, FakeCuda, fake
    from optima_plugin.selectors.wandapp import RegionalGradient, WandaPlusPlusSelector
    from optima_plugin.sparsity import parse_pattern

    w, x = torch.randn(8, 16), torch.randn(64, 16)
    with DeviceCheck() as check:
        data = RegionalGradient(fake(torch.rand(8, 16)), 64, 100.0)
        for pattern in (parse_pattern("unstructured"), parse_pattern("2:4")):
            selection = WandaPlusPlusSelector().select(fake(w), fake(x.T @ x / 64), 0.5, pattern, block_data=data)
            assert isinstance(selection.pruned, FakeCuda)
    assert not check.mixed, "\n".join(check.mixed[:3])
