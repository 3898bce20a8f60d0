"""Writing without losing data: model directories, atomic files, output-path checks.

Each save test would fail on the old ``save_model`` (which deleted any folder with
``--overwrite`` and built its temporary folder inside ``.``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from optima_plugin import files
from optima_plugin.allocators.ratio_file import save_layer_ratios
from optima_plugin.files import (SAVE_MARKER, atomic_write_text, check_output_file, check_save_target,
                                 write_json)
from optima_plugin.loading import save_model
from optima_plugin.testing import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama"), tiny_tokenizer()


def tree(root: Path) -> dict:
    """``{relative path: bytes}`` of every file under ``root`` (directories as None)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def weights(directory: Path) -> dict:
    return load_file(directory / "model.safetensors")


def user_folder(root: Path) -> Path:
    """``root/work`` holding ``notes.txt`` and ``out/thesis/ch1.tex`` (nothing the tool wrote)."""
    (root / "work" / "out" / "thesis").mkdir(parents=True)
    (root / "work" / "out" / "thesis" / "ch1.tex").write_text("\\chapter{One}")
    (root / "work" / "notes.txt").write_text("keep me")
    return root / "work"


# --- refusals: nothing is deleted -----------------------------------------------------------------


def test_overwrite_refuses_a_folder_the_tool_did_not_save(lm, tmp_path):
    work = user_folder(tmp_path)
    before = tree(tmp_path)
    with pytest.raises(ValueError, match=r"--save_model .*--overwrite only replaces a folder optima-prune saved"):
        save_model(*lm, str(work / "out"), overwrite=True)
    assert tree(tmp_path) == before


def test_overwrite_refuses_a_saved_folder_holding_foreign_files(lm, tmp_path):
    out = tmp_path / "out"
    save_model(*lm, str(out))
    (out / "thesis.tex").write_text("mine")
    before = tree(tmp_path)
    with pytest.raises(ValueError, match="did not write.*thesis.tex"):
        save_model(*lm, str(out), overwrite=True)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("spelling", [".", "./", "sub/..", "CWD"])
def test_refuses_the_current_directory(lm, tmp_path, monkeypatch, overwrite, spelling):
    cwd = user_folder(tmp_path)
    monkeypatch.chdir(cwd)
    before = tree(tmp_path)
    with pytest.raises(ValueError, match="--save_model .* current directory"):
        save_model(*lm, str(cwd) if spelling == "CWD" else spelling, overwrite=overwrite)
    assert tree(tmp_path) == before


def test_refuses_an_empty_current_directory(lm, tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path / "empty")
    with pytest.raises(ValueError, match="current directory"):
        save_model(*lm, ".")
    assert tree(tmp_path) == {"empty": None}


@pytest.mark.parametrize("spelling", ["..", "../..", "PARENT"])
def test_refuses_a_parent_of_the_current_directory(lm, tmp_path, monkeypatch, spelling):
    work = user_folder(tmp_path)
    monkeypatch.chdir(work / "out" / "thesis")
    before = tree(tmp_path)
    with pytest.raises(ValueError, match="current directory or one of its parents"):
        save_model(*lm, str(work) if spelling == "PARENT" else spelling, overwrite=True)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("spelling", ["~", "HOME", "PARENT"])
def test_refuses_home(lm, tmp_path, monkeypatch, spelling):
    home = user_folder(tmp_path)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: home))
    before = tree(tmp_path)
    target = {"~": "~", "HOME": str(home), "PARENT": str(tmp_path)}[spelling]
    with pytest.raises(ValueError, match="home directory"):
        save_model(*lm, target, overwrite=True)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("which", ["model", "parent"])
def test_refuses_the_model_directory(lm, tmp_path, which):
    model_dir = tmp_path / "models" / "llama"
    lm[0].save_pretrained(model_dir)
    (tmp_path / "models" / SAVE_MARKER).write_text("{}")  # even a marker-looking file does not help
    before = tree(tmp_path)
    target = model_dir if which == "model" else model_dir.parent
    with pytest.raises(ValueError, match="model directory"):
        save_model(*lm, str(target), overwrite=True, protected=[str(model_dir)])
    assert tree(tmp_path) == before


def test_refuses_the_filesystem_root_and_a_file(tmp_path):
    with pytest.raises(ValueError, match="filesystem root"):
        check_save_target("/", overwrite=True)
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        check_save_target(str(tmp_path / "f"), overwrite=True)


def test_non_empty_without_overwrite_says_what_to_do(lm, tmp_path):
    out = tmp_path / "out"
    save_model(*lm, str(out))
    with pytest.raises(FileExistsError, match="pass --overwrite to replace it"):
        check_save_target(str(out), overwrite=False)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_refuses_a_location_where_nothing_can_be_created():
    # As root os.access says yes for /proc, so only the probe catches it.
    with pytest.raises(ValueError, match="--save_model /proc/optima_x: cannot create"):
        check_save_target("/proc/optima_x", overwrite=False)


# --- saving ---------------------------------------------------------------------------------------


def test_overwrite_replaces_a_saved_folder_and_nothing_else(lm, tmp_path):
    model, tok = lm
    out = tmp_path / "out"
    (tmp_path / "sibling.txt").write_text("keep")
    save_model(model, tok, str(out))
    # an earlier save that wrote one more file (listed in its marker): it goes too
    (out / "old_shard.safetensors").write_text("old")
    marker = json.loads((out / SAVE_MARKER).read_text())
    marker["files"].append("old_shard.safetensors")
    (out / SAVE_MARKER).write_text(json.dumps(marker))

    other = tiny_model("llama", seed=1)
    assert save_model(other, tok, str(out), overwrite=True) == out.resolve()
    assert not (out / "old_shard.safetensors").exists()
    saved = weights(out)
    assert all(saved[k].equal(v) for k, v in other.state_dict().items() if k in saved)
    marker = json.loads((out / SAVE_MARKER).read_text())
    assert marker["tool"] == "optima-prune" and "version" in marker and "saved_at" in marker
    assert set(marker["files"]) == {p.name for p in out.iterdir()} - {SAVE_MARKER}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "sibling.txt"]  # no temporary folders
    assert (tmp_path / "sibling.txt").read_text() == "keep"


def test_an_empty_existing_directory_is_accepted(lm, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    save_model(*lm, str(out))
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert (out / SAVE_MARKER).is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_new_nested_directory_is_created(lm, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_model(*lm, "a/b/out")
    assert (tmp_path / "a" / "b" / "out" / SAVE_MARKER).is_file()
    assert [p.name for p in (tmp_path / "a" / "b").iterdir()] == ["out"]


@pytest.mark.parametrize("failure", ["save_pretrained", "tokenizer", "final rename", "interrupt"])
def test_a_failed_save_keeps_the_old_directory(lm, tmp_path, monkeypatch, failure):
    model, tok = lm
    out = tmp_path / "out"
    save_model(model, tok, str(out))
    before = tree(tmp_path)
    other = tiny_model("llama", seed=1)
    if failure == "save_pretrained":
        def broken(directory, **kwargs):
            Path(directory, "model.safetensors").write_bytes(b"partial")
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(other, "save_pretrained", broken)
    elif failure == "tokenizer":
        def broken_tokenizer(*args, **kwargs):
            raise OSError("disk full")
        monkeypatch.setattr(tok, "save_pretrained", broken_tokenizer)  # undone after the test
    else:  # the new directory cannot be moved into place (after the old one was moved aside)
        rename = os.rename
        error = KeyboardInterrupt() if failure == "interrupt" else OSError(16, "Device or resource busy")

        def broken_rename(src, dst):
            if Path(dst) == out and Path(src).name.startswith(".out."):
                raise error
            return rename(src, dst)
        monkeypatch.setattr(os, "rename", broken_rename)
    with pytest.raises((OSError, KeyboardInterrupt)):
        save_model(other, tok, str(out), overwrite=True)
    assert tree(tmp_path) == before  # the old model, byte for byte, and no temporary folders


# --- files ----------------------------------------------------------------------------------------


def test_atomic_write_text_failure_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    path.write_text("old")
    write_text = Path.write_text

    def half_then_fail(self, text, *args, **kwargs):
        write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(Path, "write_text", half_then_fail)
    with pytest.raises(OSError):
        atomic_write_text(path, '{"new": "report"}')
    monkeypatch.undo()
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_atomic_write_keeps_normal_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "new.txt", "x")
    finally:
        os.umask(mask)
    assert (tmp_path / "new.txt").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0o600
    (tmp_path / "old.txt").write_text("x")
    os.chmod(tmp_path / "old.txt", 0o640)
    atomic_write_text(tmp_path / "old.txt", "y")
    assert (tmp_path / "old.txt").stat().st_mode & 0o777 == 0o640


def test_write_json_is_standard_json(tmp_path):
    path = write_json(tmp_path / "sub" / "r.json", {"ppl": float("nan"), "xs": [1.0, float("inf")], "n": 3})

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    assert json.loads(path.read_text(), parse_constant=refuse) == {"ppl": None, "xs": [1.0, None], "n": 3}


def test_check_output_file(tmp_path):
    with pytest.raises(ValueError, match="--report .*directory"):
        check_output_file(tmp_path, "--report")
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="--report .*cannot create files"):
        check_output_file(tmp_path / "f" / "r.json", "--report")
    check_output_file(tmp_path / "new" / "deeper" / "r.json", "--report")  # created at write time
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]  # the probe is gone


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_check_output_file_probes_the_folder():
    # As root os.access(/proc, W_OK) is True; the probe file shows /proc refuses new files.
    with pytest.raises(ValueError, match="--report /proc/x: cannot create files in /proc"):
        check_output_file("/proc/x", "--report")


@pytest.mark.parametrize("suffix", [".json", ".npy"])
def test_save_layer_ratios_is_atomic(tmp_path, monkeypatch, suffix):
    path = tmp_path / "sub" / f"ratios{suffix}"
    ratios = {"model.layers.0.mlp.down_proj": 0.4, "model.layers.1.mlp.down_proj": 0.6}
    save_layer_ratios(str(path), ratios, allocation="owl", target=0.5)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no second .npy, no temporary file
    before = path.read_bytes()
    if suffix == ".npy":
        assert np.load(path).tolist() == [0.4, 0.6]
        monkeypatch.setattr(np, "save", lambda f, a: (f.write(b"partial"), 1 / 0))
    else:
        assert json.loads(path.read_text())["ratios"] == ratios
        write_text = Path.write_text
        monkeypatch.setattr(Path, "write_text", lambda self, text, **k: (write_text(self, text[:9], **k), 1 / 0))
    with pytest.raises(ZeroDivisionError):
        save_layer_ratios(str(path), {k: 0.9 for k in ratios}, allocation="owl", target=0.5)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_plot_report_is_atomic(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from optima_plugin import plot

    layers = [{"name": f"model.layers.{b}.mlp.down_proj", "block": b, "sparsity": 0.5, "ratio": 0.5,
               "mask_objective": 2.0, "objective": 1.0, "error_ratio": 0.5} for b in range(3)]
    report = {"layers": layers, "sparsity": 0.5, "options": {}}
    for name in ("fig.png", "fig.svg", "fig"):
        path = tmp_path / "plots" / name
        plot.plot_report(report, str(path))
        head = path.read_bytes()[:64]
        assert head.startswith(b"\x89PNG") if name != "fig.svg" else b"<?xml" in head or b"<svg" in head
    before = (tmp_path / "plots" / "fig.png").read_bytes()
    monkeypatch.setattr(plot, "report_figure", lambda r: _BrokenFigure())
    with pytest.raises(OSError):
        plot.plot_report(report, str(tmp_path / "plots" / "fig.png"))
    assert (tmp_path / "plots" / "fig.png").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["fig", "fig.png", "fig.svg"]


class _BrokenFigure:
    def savefig(self, path, **kwargs):
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")


def test_marker_is_written_by_the_tool_only(tmp_path):
    assert files.read_save_marker(tmp_path) is None
    (tmp_path / "a.bin").write_bytes(b"")
    files.write_save_marker(tmp_path)
    marker = files.read_save_marker(tmp_path)
    assert marker is not None and marker["files"] == ["a.bin"]
