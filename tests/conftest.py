"""Shared fixtures: random layer problems that look like real activations."""

from __future__ import annotations

import pytest
import torch

from optima_plugin.testing import tiny_model, tiny_tokenizer


def activation_hessian(d: int, *, tokens: int = 4096, dead: int = 2, seed: int = 0) -> torch.Tensor:
    """``d x d`` float64 ``mean x xᵀ`` of synthetic activations.

    Heavy-tailed per-column scales (a few outlier features), correlated inputs
    (a low-rank shared component) and ``dead`` inputs that are always zero.
    """
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(tokens, d, generator=g, dtype=torch.float64)
    shared = torch.randn(tokens, max(1, d // 8), generator=g, dtype=torch.float64)
    mix = torch.randn(max(1, d // 8), d, generator=g, dtype=torch.float64) / (d // 8) ** 0.5
    x = base + 2.0 * shared @ mix
    scales = torch.exp(1.5 * torch.randn(d, generator=g, dtype=torch.float64))  # log-normal
    x = x * scales
    if dead:
        x[:, torch.randperm(d, generator=g)[:dead]] = 0.0
    return x.T @ x / tokens


def one_window_at_a_time(run_block):
    """``run_block`` that raises ``torch.OutOfMemoryError`` for more than one window per forward (to inject
    the out-of-memory back-off of :mod:`optima_plugin.pipeline`)."""

    def small_device(block, hidden, kwargs):
        if hidden.shape[0] > 1:
            raise torch.OutOfMemoryError("injected")
        return run_block(block, hidden, kwargs)

    return small_device


def with_plugin(plugin, fn):
    """``fn()`` with ``plugin`` registered on the plugin manager (unregistered afterwards, whatever happens)."""
    from optima_plugin.plugins import get_plugin_manager

    pm = get_plugin_manager()
    pm.register(plugin)
    try:
        return fn()
    finally:
        pm.unregister(plugin)


def random_weight(r: int, d: int, *, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(r, d, generator=g) / d**0.5


@pytest.fixture(autouse=True)
def _ppl_cache_in_tmp(tmp_path_factory, monkeypatch):
    """Every test's dense perplexity cache in a fresh temporary folder (never the user's ~/.cache)."""
    folder = tmp_path_factory.mktemp("ppl-cache")
    monkeypatch.setattr("optima_plugin.evaluation.cache.cache_folder", lambda: folder)


@pytest.fixture
def tiny_dir(tmp_path):
    """A tiny Llama saved as a local model directory."""
    path = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
