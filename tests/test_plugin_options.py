"""Plugin-owned options (``optima_addoption``), registry precedence, entry-point loading, --disable_plugin."""

from __future__ import annotations

import importlib.metadata
import json
import sys
import types
from importlib.metadata import EntryPoint

import pytest

from optima_plugin import cli, hookimpl, plugins
from optima_plugin.config import PruneConfig
from optima_plugin.validate import resolve
from optima_plugin.host import launcher
from optima_plugin.plugins import get_plugin_manager, registry
from optima_plugin.selectors import BUILTIN_SELECTORS
from optima_plugin.allocators import BUILTIN_ALLOCATORS

QUICK = ["--nsamples", "2", "--seqlen", "32", "--quiet"]
BUILTIN_OPTIONS = {"Lamda", "Hyper_m", "epsilon", "mapping_type", "qmetric", "qmetric_dimwise", "iterations",
                   "forbid_neg_lr"}


class AlphaPlugin:
    """A third-party plugin with one option, which it reads from the config when a run starts."""

    def __init__(self) -> None:
        self.seen: list = []

    @hookimpl
    def optima_addoption(self, parser):
        parser.getgroup("alpha_plugin", "alpha_plugin (a test plugin)").addoption(
            "my_alpha", type=float, default=0.5, help="the test plugin's alpha knob",
            check=lambda v: 0 < v < 1, requirement="must be in (0, 1)")

    @hookimpl
    def optima_run_started(self, config, num_blocks):
        self.seen.append(config.option("my_alpha"))


@pytest.fixture
def fresh_pm(monkeypatch):
    """A new process-wide plugin manager for the test; the previous one is restored afterwards."""
    monkeypatch.setattr(plugins, "_manager", None)
    yield


@pytest.fixture
def alpha_plugin(fresh_pm):
    plugin = AlphaPlugin()
    get_plugin_manager().register(plugin, name="alpha_plugin")
    return plugin


# -- options --------------------------------------------------------------------------------


def test_plugin_flag_in_help(alpha_plugin, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert "alpha_plugin (a test plugin):" in out and "--my_alpha" in out and "alpha knob" in out
    assert "OWL (--allocation owl):" in out and "--Lamda" in out  # the built-ins' groups


def test_plugin_flag_reaches_plugin_and_report(alpha_plugin, tiny_dir, tmp_path):
    report = tmp_path / "report.json"
    assert cli.main(["--model", str(tiny_dir), "--my_alpha", "0.25", "--report", str(report)] + QUICK) == 0
    assert alpha_plugin.seen == [0.25]
    options = json.loads(report.read_text())["options"]
    assert options["my_alpha"] == 0.25
    assert BUILTIN_OPTIONS <= set(options) and "plugin_options" not in options  # the keys as before
    assert options["Lamda"] == 0.08 and options["qmetric"] == "cosim_flat"


def test_plugin_flag_default_and_python_api(alpha_plugin):
    from optima_plugin import prune
    from optima_plugin.testing import tiny_model, tiny_tokenizer

    report = prune(tiny_model("llama"), tiny_tokenizer(), progress=False, nsamples=2, seqlen=32,
                   weight_update="none", my_alpha=0.75)
    assert alpha_plugin.seen == [0.75] and report["options"]["my_alpha"] == 0.75
    assert resolve(PruneConfig()).option("my_alpha") == 0.5  # the declared default


def test_bad_plugin_value_one_line(alpha_plugin, tiny_dir, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_load", lambda *a: pytest.fail("the model was loaded before validation"))
    assert cli.main(["--model", str(tiny_dir), "--my_alpha", "2"] + QUICK) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["optima-prune: error: --my_alpha must be in (0, 1), got 2.0"]
    assert alpha_plugin.seen == []


def test_plugin_flag_on_optima_host(alpha_plugin, tmp_path, capsys):
    help_text = launcher.build_parser().format_help()
    assert "--my_alpha" in help_text and "--disable_plugin" in help_text
    assert "--Lamda" not in help_text  # the built-in allocators' flags stay the host's own
    ns, script, host_args = launcher.split_argv(["main.py", "--model", "m", "--my_alpha", "0.3", "--Lamda", "0.1"])
    assert (script, host_args) == ("main.py", ["--model", "m", "--Lamda", "0.1"])
    options = launcher.host_options(ns)
    assert options.plugin_options == {"my_alpha": 0.3} and options.option("my_alpha") == 0.3
    (tmp_path / "main.py").write_text("raise SystemExit('the host ran')\n")
    assert launcher.main([str(tmp_path / "main.py"), "--my_alpha", "1.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["optima-host: error: --my_alpha must be in (0, 1), got 1.5"]


def test_from_options_lists_plugin_options(alpha_plugin):
    with pytest.raises(TypeError) as err:
        resolve(my_alhpa=0.3)
    known = str(err.value).split("known: ")[1].split(", ")
    assert {"my_alpha", "sparsity_ratio"} | BUILTIN_OPTIONS <= set(known)
    config = resolve(my_alpha=0.3, Lamda=0.1)
    assert (config.option("my_alpha"), config.option("Lamda"), config.option("sparsity_ratio")) == (0.3, 0.1, 0.5)
    with pytest.raises(LookupError, match="no option 'my_alhpa'.*my_alpha"):
        config.option("my_alhpa")


def test_plugin_options_are_part_of_the_run_identity(alpha_plugin):
    a, b = resolve(Lamda=0.1).to_dict(), resolve(Lamda=0.2).to_dict()
    assert a["Lamda"] == 0.1 and b["Lamda"] == 0.2 and a["my_alpha"] == 0.5
    assert {k: v for k, v in a.items() if k != "Lamda"} == {k: v for k, v in b.items() if k != "Lamda"}


def test_plugin_may_not_take_a_core_name(fresh_pm):
    class Clash:
        @hookimpl
        def optima_addoption(self, parser):
            parser.getgroup("clash").addoption("sparsity_ratio", type=float, default=0.1)

    get_plugin_manager().register(Clash(), name="clash")
    with pytest.raises(ValueError, match="--sparsity_ratio .*clashes with a core option"):
        resolve()


# -- registries -----------------------------------------------------------------------------


def test_builtin_wins_a_name_clash(fresh_pm):
    class Impostor:
        name = "wanda"

    class Extra:
        name = "extra_selector"

    class OwlImpostor:
        name = "owl"

    class Shadowing:
        @hookimpl
        def optima_selectors(self):
            return [Impostor(), Extra()]

        @hookimpl
        def optima_allocators(self):
            return [OwlImpostor()]

    get_plugin_manager().register(Shadowing(), name="shadowing")  # registered last: called first without tryfirst
    selectors = registry("selectors")
    assert selectors["wanda"] is next(s for s in BUILTIN_SELECTORS if s.name == "wanda")
    assert isinstance(selectors["extra_selector"], Extra)
    assert registry("allocators")["owl"] is next(a for a in BUILTIN_ALLOCATORS if a.name == "owl")


# -- entry points ---------------------------------------------------------------------------


class _Dist:
    """A fake installed distribution: a name and entry points."""

    def __init__(self, name: str, entry_points: list) -> None:
        self.metadata = {"name": name}
        self.entry_points = entry_points


class _SelectorPlugin:
    """Contributes a selector named after the plugin."""

    def __init__(self, name: str = "good_selector") -> None:
        self.selector = types.SimpleNamespace(name=name)

    @hookimpl
    def optima_selectors(self):
        return [self.selector]


class _ClassPlugin:
    """An entry point naming a class (its hook takes ``self``)."""

    @hookimpl
    def optima_selectors(self):
        return [types.SimpleNamespace(name="class_selector")]


@pytest.fixture
def fake_entry_points(fresh_pm, monkeypatch):
    """Installed: ``broken`` (its module does not import), ``good`` (an instance, imported lazily:
    the returned list counts its loads) and ``classy`` (a class)."""
    loads: list = []
    module = types.ModuleType("optima_fake_plugin")

    def lazy(name):
        if name == "plugin":
            loads.append(name)
            return _SelectorPlugin()
        raise AttributeError(name)

    module.__getattr__ = lazy
    module.ClassPlugin = _ClassPlugin
    monkeypatch.setitem(sys.modules, "optima_fake_plugin", module)
    group = plugins.ENTRY_POINT_GROUP
    dists = [_Dist("broken-pkg", [EntryPoint("broken", "optima_no_such_module_xyz.plugin:plugin", group)]),
             _Dist("good-pkg", [EntryPoint("good", "optima_fake_plugin:plugin", group),
                                EntryPoint("classy", "optima_fake_plugin:ClassPlugin", group),
                                EntryPoint("unrelated", "optima_no_such_module_xyz:x", "console_scripts")])]
    monkeypatch.setattr(importlib.metadata, "distributions", lambda: list(dists))
    return loads


def test_broken_entry_point_is_one_log_line_and_the_rest_load(fake_entry_points, caplog):
    caplog.set_level("INFO", logger="optima_plugin.plugins")
    pm = get_plugin_manager()
    failures = [r for r in caplog.records if "not loaded" in r.getMessage()]
    assert len(failures) == 1 and failures[0].levelname == "WARNING" and failures[0].exc_info is None
    line = failures[0].getMessage()
    assert "\n" not in line and "broken" in line and "broken-pkg" in line and "ModuleNotFoundError" in line
    assert pm.has_plugin("good") and not pm.has_plugin("broken")
    selectors = registry("selectors")
    assert {"good_selector", "class_selector", "wanda"} <= set(selectors)
    assert fake_entry_points == ["plugin"]
    assert isinstance(pm.get_plugin("classy"), _ClassPlugin)  # a class entry point is instantiated


def test_disable_plugin_on_optima_prune(fake_entry_points, capsys):
    with pytest.raises(SystemExit):
        cli.main(["--disable_plugin", "good", "--disable_plugin", "broken", "--help"])
    assert fake_entry_points == []  # never imported
    pm = get_plugin_manager()
    assert pm.is_blocked("good") and pm.is_blocked("broken")
    assert "good_selector" not in registry("selectors") and "class_selector" in registry("selectors")
    assert "--disable_plugin" in capsys.readouterr().out


def test_disable_plugin_on_optima_host(fake_entry_points, tmp_path, capsys):
    assert launcher.main(["--disable_plugin", "good", str(tmp_path / "missing.py")]) == 2
    assert "missing.py not found" in capsys.readouterr().err
    assert fake_entry_points == [] and get_plugin_manager().is_blocked("good")
    assert "good_selector" not in registry("selectors")


def test_disable_after_creation_unregisters(fake_entry_points):
    assert "good_selector" in registry("selectors")
    get_plugin_manager(disabled=["good"])
    assert "good_selector" not in registry("selectors")


def test_checkpoint_of_another_plugin_option_is_refused(tmp_path):
    from optima_plugin import prune
    from optima_plugin.testing import tiny_model, tiny_tokenizer

    ckpt, tok = tmp_path / "ckpt", tiny_tokenizer()
    quick = dict(nsamples=2, seqlen=32, weight_update="none", progress=False, checkpoint_dir=str(ckpt))
    prune(tiny_model("llama"), tok, Lamda=0.1, **quick)
    with pytest.raises(ValueError, match="differs in Lamda"):
        prune(tiny_model("llama"), tok, Lamda=0.2, **quick)
