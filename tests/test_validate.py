"""One validation per run (issue 25): ``validate.resolve`` returns a resolved, frozen config; the CLI, the API
and the engine go through it once; optima-host's shared options go through it too."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from optima_plugin import cli, hookimpl, plugins
from optima_plugin.config import PruneConfig
from optima_plugin.host.install import HostOptions
from optima_plugin.plugins import get_plugin_manager
from optima_plugin.validate import resolve


class CountingPlugin:
    """A third party's ``optima_validate``: counts its calls, sees the built-ins' derived values."""

    def __init__(self) -> None:
        self.seen: list = []

    @hookimpl
    def optima_validate(self, config):
        self.seen.append((config.prune_method, config.allocation))


@pytest.fixture
def counting(monkeypatch):
    monkeypatch.setattr(plugins, "_manager", None)  # a fresh manager, the previous one restored afterwards
    plugin = CountingPlugin()
    get_plugin_manager().register(plugin, name="counting")
    return plugin


def test_cli_run_validates_once(counting, tiny_dir, tmp_path):
    """A whole CLI prune (CLI, API and engine) checks its options once, not once per layer it passes."""
    argv = ["--model", str(tiny_dir), "--nsamples", "2", "--seqlen", "32", "--quiet",
            "--report", str(tmp_path / "r.json")]
    assert cli.main(argv) == 0
    assert counting.seen == [("wanda", "uniform")]


def test_resolve_returns_a_new_frozen_config(counting, tmp_path):
    """Derived values (host alias, default checkpoint folder) are set on a copy; the given config is untouched."""
    save = tmp_path / "out"
    given = PruneConfig(prune_method="wanda_owl", save_model=str(save), eval_ppl="pydoc,sherlock")
    out = resolve(given)
    assert (given.prune_method, given.allocation, given.checkpoint_dir, given.eval_ppl) == (
        "wanda_owl", "uniform", None, "pydoc,sherlock")
    assert (out.prune_method, out.allocation, out.eval_ppl) == ("wanda", "owl", ["pydoc", "sherlock"])
    assert out.checkpoint_dir == str(save.resolve().parent / "out.checkpoint")  # <save_model>.checkpoint beside it
    assert counting.seen == [("wanda", "owl")]  # a plugin's check runs after the built-ins' derivations
    assert out.resolved and not given.resolved and resolve(out) is out
    with pytest.raises(dataclasses.FrozenInstanceError):
        out.sparsity_ratio = 0.9
    assert not dataclasses.replace(out, seed=1).resolved  # a changed copy must be resolved again


@pytest.mark.parametrize("tol", [1.0, 1.5])
def test_host_tol_follows_the_config_rule(tol):
    """--tol is a relative tolerance in (0, 1) for optima-prune and optima-host alike."""
    with pytest.raises(ValueError, match=r"--tol must be in \(0, 1\)"):
        resolve(tol=tol)
    with pytest.raises(ValueError, match=r"--tol must be in \(0, 1\)"):
        HostOptions(tol=tol).validate()


def test_host_options_go_through_resolve(counting):
    """optima-host's options pass the same entry as optima-prune's: every plugin's optima_validate sees them, and
    validate() returns a new HostOptions (the given one untouched)."""
    given = HostOptions(weight_update="none", solver="direct")
    out = given.validate()
    assert len(counting.seen) == 1  # resolve ran once, with the plugins' hooks
    assert (given.hessian_shrink, out.hessian_shrink) == ("auto", 0.0)  # resolved on a copy
    assert out is not given and out.solver == "direct"
    with pytest.raises(ValueError, match="--damp must be a number for optima-host"):
        HostOptions(damp="auto").validate()
    with pytest.raises(ValueError, match="--max_iter must be a positive integer"):  # optima-prune's rule
        HostOptions(max_iter=0).validate()


def test_no_evaluation_may_be_given_as_none():
    """``eval_ppl=None`` / ``eval_zero_shot=None`` (the Python API's natural "none") mean no evaluation."""
    out = resolve(eval_ppl=None, eval_zero_shot=None)
    assert out.eval_ppl == [] and out.eval_zero_shot == []
