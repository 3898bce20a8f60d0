"""optima-host reliability: a failed install leaves nothing patched, a crashed host gets an honest report.

* ``install()`` is transactional: a step that raises undoes every step already done.
* ``--host_data`` without text fails in validation (exit 2, one line), before anything is patched.
* A host that raises keeps its exception (same object, same traceback) and the report says
  ``"completed": false`` with the error and the block the host was pruning.
"""

from __future__ import annotations

import importlib
import json
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

from optima_plugin.host import HostOptions, install
from optima_plugin.host.launcher import main as host_main, run_script
from optima_plugin.plugins import get_plugin_manager

host_data = importlib.import_module("optima_plugin.host.data")
host_install = importlib.import_module("optima_plugin.host.install")  # the package's `install` is the function


class HostCrash(ValueError):
    """The host's own error (a ValueError: the launcher must not mistake it for bad input)."""


def process_state() -> dict:
    """Everything ``install()`` may patch, as identities."""
    import datasets
    import huggingface_hub
    from transformers import PreTrainedModel

    return {
        "from_pretrained": PreTrainedModel.__dict__["from_pretrained"],
        "save_pretrained": PreTrainedModel.__dict__["save_pretrained"],
        "synchronize": torch.cuda.synchronize,
        "empty_cache": torch.cuda.empty_cache,
        "load_dataset": datasets.load_dataset,
        "Repository": getattr(huggingface_hub, "Repository", None),
        "plugins": {id(p) for p in get_plugin_manager().get_plugins()},
        "optima-host": get_plugin_manager().get_plugin("optima-host"),
        "modes": list(torch.overrides._get_current_function_mode_stack()),
        "active": host_install._active,
    }


def assert_cuda_raises_on_cpu() -> None:
    if not torch.cuda.is_available():
        with pytest.raises((RuntimeError, AssertionError)):
            torch.zeros(1, device="cuda")  # no CudaOnCpu mode left behind


# -- transactional install ------------------------------------------------------


STEPS = [
    (host_data, "route_hub_datasets"),  # the last step
    (host_install, "removed_imports"),
    (host_install, "quiet_cuda_calls"),
    (host_install, "patch_from_pretrained"),
    (host_install, "_flush_before_save"),
]


@pytest.mark.parametrize("module, step", STEPS, ids=[step for _, step in STEPS])
def test_failed_install_undoes_every_step(module, step, monkeypatch):
    if step == "quiet_cuda_calls" and torch.cuda.is_available():
        pytest.skip("the CUDA shim (and this step) is off on a machine with a GPU")
    before = process_state()
    assert before["active"] is None and before["optima-host"] is None

    def broken(*args, **kwargs):
        raise OSError(f"{step} failed")

    monkeypatch.setattr(module, step, broken)
    with pytest.raises(OSError, match=f"{step} failed"):
        install(HostOptions(host_data="pydoc"))
    assert process_state() == before
    assert_cuda_raises_on_cpu()
    monkeypatch.undo()
    with install(HostOptions(host_data="pydoc")) as inst:  # a second install works
        assert host_install._active is inst and get_plugin_manager().get_plugin("optima-host") is inst.plugin
        assert process_state() != before
    assert process_state() == before


def test_failed_install_reraises_even_if_an_undo_fails(monkeypatch):
    """An undo that fails too is logged; the install's own error is the one raised, the rest still undone."""
    before = process_state()
    real = host_install.patch_from_pretrained

    def patch_with_broken_undo(load):
        undo = real(load)

        def broken_undo():
            undo()
            raise RuntimeError("undo failed")

        return broken_undo

    monkeypatch.setattr(host_install, "patch_from_pretrained", patch_with_broken_undo)
    monkeypatch.setattr(host_data, "route_hub_datasets", lambda source: (_ for _ in ()).throw(OSError("data")))
    with pytest.raises(OSError, match="data"):
        install(HostOptions(host_data="pydoc"))
    assert process_state() == before


@pytest.mark.parametrize("content", [{}, {"notes.csv": "a,b\n", "sub/readme.md": "# x\n"}], ids=["empty", "no_text"])
def test_host_data_folder_without_text_fails_before_patching(content, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    for name, text in content.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    with pytest.raises(ValueError, match=r"--host_data .*: the folder holds no text files \(.txt, .json, .jsonl\)"):
        HostOptions(host_data=str(folder)).validate()

    def never(*args, **kwargs):
        raise AssertionError("install() patched something before validating")

    monkeypatch.setattr(host_install, "patch_from_pretrained", never)
    before = process_state()
    assert host_main([__file__, "--host_data", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("optima-host: error: --host_data"), err
    assert process_state() == before


def test_host_data_unreadable_text_exit_2_nothing_left_patched(tmp_path, capsys):
    """A .jsonl without a 'text' field passes the cheap check and fails inside install(): exit 2, all undone."""
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "records.jsonl").write_text('{"content": "no text field"}\n')
    before = process_state()
    assert host_main([__file__, "--host_data", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1].startswith("optima-host: error: no text found in"), err
    assert process_state() == before
    assert_cuda_raises_on_cpu()


# -- a host that crashes --------------------------------------------------------


CRASHING_HOST = """
import sys

import torch
from transformers import AutoModelForCausalLM

import crash_box

model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
with torch.no_grad():
    for layer in model.model.layers[:crash_box.blocks]:
        layer(torch.randn(1, 8, 64))
if crash_box.exit is not None:
    sys.exit(crash_box.exit)
if crash_box.error is not None:
    raise crash_box.error  # HOST RAISES HERE
"""


@pytest.fixture
def crash_box(monkeypatch):
    """The module the crashing host imports: what it raises or exits with, and how many blocks it runs."""
    box = types.ModuleType("crash_box")
    box.error, box.exit, box.blocks = HostCrash("host failed in block 1"), None, 2
    monkeypatch.setitem(sys.modules, "crash_box", box)
    return box


@pytest.fixture
def host_script(tmp_path) -> Path:
    path = tmp_path / "host" / "main.py"
    path.parent.mkdir()
    path.write_text(textwrap.dedent(CRASHING_HOST))
    return path


def test_host_exception_propagates_unchanged_and_report_says_so(tiny_dir, host_script, crash_box, tmp_path):
    report = tmp_path / "out" / "report.json"
    before = process_state()
    with pytest.raises(HostCrash) as info:
        run_script(host_script, [str(tiny_dir)], HostOptions(report=str(report)))
    assert info.value is crash_box.error  # the same object
    last = info.traceback[-1]
    assert Path(str(last.path)) == host_script and "HOST RAISES HERE" in str(last.statement)  # its traceback
    data = json.loads(report.read_text())
    assert data["completed"] is False
    assert data["error"] == "HostCrash: host failed in block 1"
    assert data["failed_block"] == 1
    assert process_state() == before  # uninstalled


def test_host_exception_through_main_is_not_bad_input(tiny_dir, host_script, crash_box, tmp_path, capsys):
    report = tmp_path / "report.json"
    with pytest.raises(HostCrash) as info:
        host_main([str(host_script), str(tiny_dir), "--optima_report", str(report)])
    assert info.value is crash_box.error
    assert "optima-host: error:" not in capsys.readouterr().err
    assert json.loads(report.read_text())["completed"] is False


def test_report_write_failure_does_not_hide_the_host_exception(tiny_dir, host_script, crash_box, tmp_path,
                                                               monkeypatch):
    import optima_plugin.host.seam as seam

    def broken_write(path, data):
        raise OSError("disk full")

    monkeypatch.setattr(seam, "write_json", broken_write)
    before = process_state()
    with pytest.raises(HostCrash) as info:
        run_script(host_script, [str(tiny_dir)], HostOptions(report=str(tmp_path / "r.json")))
    assert info.value is crash_box.error
    assert process_state() == before
    crash_box.error = None  # a host that completes: the report failure is the error now
    with pytest.raises(OSError, match="disk full"):
        run_script(host_script, [str(tiny_dir)], HostOptions(report=str(tmp_path / "r.json")))
    assert process_state() == before


@pytest.mark.parametrize("exit_, code, completed, error", [
    (3, 3, False, "SystemExit: 3"),
    ("fatal: no data", 1, False, "SystemExit: fatal: no data"),
    (0, 0, True, None),
    (None, 0, True, None),  # no sys.exit: the script ends
])
def test_host_exit_codes_in_report(exit_, code, completed, error, tiny_dir, host_script, crash_box, tmp_path):
    crash_box.error, crash_box.exit, crash_box.blocks = None, exit_, 3
    report = tmp_path / "report.json"
    assert host_main([str(host_script), str(tiny_dir), "--optima_report", str(report)]) == code
    data = json.loads(report.read_text())
    assert (data["completed"], data["error"]) == (completed, error)
    assert data["failed_block"] == (None if completed else 2)


def test_crash_before_any_block_has_no_failed_block(tiny_dir, host_script, crash_box, tmp_path):
    crash_box.blocks = 0
    report = tmp_path / "report.json"
    with pytest.raises(HostCrash):
        run_script(host_script, [str(tiny_dir)], HostOptions(report=str(report)))
    data = json.loads(report.read_text())
    assert (data["completed"], data["failed_block"]) == (False, None)
