"""The one block pipeline: hooks in one place, out-of-memory back-off, the same inputs for every user."""

from __future__ import annotations

import pytest
import torch
from conftest import one_window_at_a_time

from optima_plugin import pipeline
from optima_plugin.data import get_calibration
from optima_plugin.hessian import HessianAccumulator
from optima_plugin.models import block_linears, get_adapter, input_groups
from optima_plugin.pipeline import BlockPipeline, hooked
from optima_plugin.testing import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def tokens():
    return get_calibration("pydoc", tiny_tokenizer(), 4, 32, 0)


def _pipe(model, tokens, batch_size=2):
    pipe = BlockPipeline(get_adapter(model), device=torch.device("cpu"), batch_size=batch_size)
    pipe.capture(tokens)
    return pipe


def _hooks(block) -> int:
    return sum(len(m._forward_hooks) for m in block.modules())


def test_hooks_are_removed_even_when_the_pass_fails():
    lin = torch.nn.Linear(4, 4)
    with pytest.raises(RuntimeError, match="boom"):
        with hooked({"a": lin}, lambda: HessianAccumulator()):
            assert len(lin._forward_hooks) == 1
            raise RuntimeError("boom")
    assert len(lin._forward_hooks) == 0


def test_hessians_count_every_token_once_after_an_out_of_memory_restart(tokens, monkeypatch):
    model = tiny_model("llama")
    pipe = _pipe(model, tokens)
    real = pipeline.run_block

    small_device = one_window_at_a_time(real)

    with pipe.onloaded(0) as block:
        todo = block_linears(block)
        want = pipe.hessians(0, block, todo, input_groups(block), torch.float64)
        monkeypatch.setattr(pipeline, "run_block", small_device)
        got = pipe.statistics(0, block, {"q": todo["self_attn.q_proj"]}, lambda: HessianAccumulator(torch.float64))
    assert _hooks(block) == 0
    assert got["q"].tokens == tokens.numel()
    assert pipe.oom_backoff == [{"block": 0, "pass": "hessian", "batch": 1}]
    torch.testing.assert_close(got["q"].hessian, want["self_attn.q_proj"])
    assert want["self_attn.q_proj"] is want["self_attn.k_proj"]  # one Hessian per distinct input


def test_statistics_with_outputs_equals_statistics_then_propagate(tokens):
    model = tiny_model("llama")
    one, two = _pipe(model, tokens), _pipe(model, tokens)
    for i in range(2):
        with one.onloaded(i) as block:
            a = one.statistics(i, block, block_linears(block), HessianAccumulator, outputs=True)
        with two.onloaded(i) as block:
            b = two.statistics(i, block, block_linears(block), HessianAccumulator)
            two.propagate(i, block)
        assert all(torch.equal(a[k].hessian, b[k].hessian) for k in a)
    assert torch.equal(one.inputs, two.inputs)


def test_a_failing_block_is_still_offloaded(tokens):
    model = tiny_model("llama")
    pipe = BlockPipeline(get_adapter(model), device=torch.device("cpu"), offload="cpu")
    block = pipe.adapter.blocks[1]
    moves = []
    real_to = block.to
    block.to = lambda *args, **kwargs: (moves.append(args[0] if args else kwargs), real_to(*args, **kwargs))[1]
    with pytest.raises(RuntimeError, match="solver crashed"):
        with pipe.onloaded(1):
            raise RuntimeError("solver crashed")
    assert moves == [torch.device("cpu"), "cpu"]  # onloaded, then offloaded despite the failure


def test_run_owns_the_loop_in_order_and_matches_the_models_own_hidden_states(tokens):
    model = tiny_model("llama")
    pipe = _pipe(model, tokens)
    events = []
    pipe.run(range(2), lambda i, block: events.append(("work", i, _hooks(block))),
             before=lambda i: events.append(("before", i)), after=lambda i, block: events.append(("after", i)),
             done=lambda i: events.append(("done", i)))
    assert events == [("before", 0), ("work", 0, 0), ("after", 0), ("done", 0),
                      ("before", 1), ("work", 1, 0), ("after", 1), ("done", 1)]
    with torch.no_grad():  # the oracle: the model's own forward, hidden state after block 1
        want = model(input_ids=tokens, output_hidden_states=True, use_cache=False).hidden_states[2]
    torch.testing.assert_close(pipe.inputs, want, rtol=1e-5, atol=1e-5)  # float32, batched differently


def test_statistics_all_reduce_the_accumulators_that_can(tokens):
    class Dist:  # a job of two ranks with the same windows: every sum doubles
        def sum_(self, t):
            return t * 2

    class Norms:
        def __init__(self):
            self.sum, self.tokens = None, 0

        def hook(self, module, inputs, output):
            s = inputs[0].detach().double().pow(2).reshape(-1, inputs[0].shape[-1]).sum(0)
            self.sum, self.tokens = (s if self.sum is None else self.sum + s), self.tokens + inputs[0].shape[:-1].numel()

        def all_reduce(self, dist, d):
            self.sum, self.tokens = dist.sum_(self.sum), self.tokens * 2

    model = tiny_model("llama")
    pipe = _pipe(model, tokens)
    pipe.dist = Dist()
    with pipe.onloaded(0) as block:
        q = block_linears(block)["self_attn.q_proj"]
        got = pipe.statistics(0, block, {"q": q}, Norms)["q"]
        pipe.dist = None
        one = pipe.statistics(0, block, {"q": q}, Norms)["q"]
    assert got.tokens == 2 * one.tokens == 2 * tokens.numel()
    torch.testing.assert_close(got.sum, 2 * one.sum)
