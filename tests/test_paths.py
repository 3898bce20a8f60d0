"""Outputs never destroy anything (issue 24 items 4, 5, 6, 10 and 16).

A marker lists only plain names inside its own folder; every output path is distinct from
every input and every other output; no device, FIFO or ``/proc`` file is renamed over; what a
killed save left is put back or cleaned up; saved folders follow the umask. The CLI cases
replace the model load by a failure: each refusal must come before it (exit 2, one line).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from optima_plugin import cli, files
from optima_plugin.files import SAVE_MARKER, atomic_path, atomic_write_text, check_output_file, write_save_marker
from optima_plugin.loading import save_model
from optima_plugin.testing import tiny_model, tiny_tokenizer

QUICK = ["--seqlen", "32", "--nsamples", "2", "--quiet"]


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama"), tiny_tokenizer()


def tree(root: Path) -> dict:
    """``{relative path: bytes, or the link's target, or None for a folder}`` of everything under ``root``."""
    out = {}
    for p in sorted(root.rglob("*")):
        key = str(p.relative_to(root))
        out[key] = ("->", os.readlink(p)) if p.is_symlink() else p.read_bytes() if p.is_file() else None
    return out


def refused_before_load(argv: list, monkeypatch, capsys) -> str:
    """Run the CLI with ``argv``; assert exit 2 with one line before any model load; return that line."""
    monkeypatch.setattr(cli, "_load", lambda *a: pytest.fail("the model was loaded before the paths were checked"))
    rc = cli.main(argv + QUICK)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("optima-prune: error:"), err
    return err


class _Loaded(Exception):
    """Raised instead of loading the model: the paths were accepted."""


def accepted(argv: list, monkeypatch) -> None:
    """Assert the CLI accepts ``argv``'s paths (it reaches the model load)."""
    def load(*a):
        raise _Loaded

    monkeypatch.setattr(cli, "_load", load)
    with pytest.raises(_Loaded):
        cli.main(argv + QUICK)


# --- item 4: a planted marker never deletes outside its folder ------------------------------------


def _victim(root: Path) -> Path:
    (root / "victim" / "deep").mkdir(parents=True)
    (root / "victim" / "deep" / "thesis.tex").write_text("\\chapter{One}")
    return root / "victim"


@pytest.mark.parametrize("listed", ["ABS", "../victim", "sub/../../victim"])
def test_planted_marker_naming_a_path_outside_refuses_overwrite(listed, tiny_dir, tmp_path, monkeypatch, capsys):
    victim = _victim(tmp_path)
    d = tmp_path / "d"
    d.mkdir()
    (d / "config.json").write_text("{}")
    name = str(victim) if listed == "ABS" else listed
    (d / SAVE_MARKER).write_text(json.dumps({"tool": "optima-prune", "files": ["config.json", name]}))
    before = tree(tmp_path)
    err = refused_before_load(["--model", str(tiny_dir), "--save_model", str(d), "--overwrite"], monkeypatch, capsys)
    assert f"--save_model {d}: its {SAVE_MARKER} lists {name!r}" in err, err
    assert tree(tmp_path) == before


def test_removing_a_saved_folder_deletes_only_its_own_files(tmp_path):
    """The last line of defence (the marker may change after the check): only plain names of regular files
    or of subfolders of files inside the folder are deleted, never a link's target or a path outside."""
    victim = _victim(tmp_path)
    (tmp_path / "other.txt").write_text("keep")
    old = tmp_path / "old"
    (old / "shards").mkdir(parents=True)
    (old / "a.bin").write_bytes(b"ours")
    (old / "shards" / "s0.bin").write_bytes(b"ours")
    (old / "link").symlink_to(victim)
    listed = ["a.bin", "shards", "link", "../victim", str(tmp_path / "other.txt"), "missing.bin"]
    (old / SAVE_MARKER).write_text(json.dumps({"tool": "optima-prune", "files": listed}))
    before = {k: v for k, v in tree(tmp_path).items() if not k.startswith("old")}
    left = files.remove_saved_directory(old)
    assert {k: v for k, v in tree(tmp_path).items() if not k.startswith("old")} == before
    assert left == ["link"]
    assert sorted(p.name for p in old.iterdir()) == ["link"]


def test_a_marker_with_non_text_names_is_no_marker(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"")
    (tmp_path / SAVE_MARKER).write_text(json.dumps({"tool": "optima-prune", "files": ["a.bin", ["x"]]}))
    assert files.read_save_marker(tmp_path) is None
    with pytest.raises(ValueError, match="only replaces a folder optima-prune saved"):
        files.check_save_target(str(tmp_path), overwrite=True)


# --- items 5 and 16: every output distinct from every input and every other output ------------------


@pytest.fixture
def paths(lm, tiny_dir, tmp_path):
    """``{name: path}``: the model folder, a calibration text, a text folder, a ratio file, a mask file, a
    hard link of the text, a link to the model's config, a folder the tool saved."""
    save_model(*lm, str(tmp_path / "saved"))
    (tmp_path / "saved" / "notes.txt").write_text("A text saved with the model. " * 400)
    write_save_marker(tmp_path / "saved")  # as if the tool had written it: only the overlap is refused
    (tmp_path / "calib.txt").write_text("Some calibration text. " * 400)
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("Some other text. " * 400)
    (tmp_path / "ratios.json").write_text("{}")
    (tmp_path / "masks.safetensors").write_bytes(b"")
    os.link(tmp_path / "calib.txt", tmp_path / "hardlink.txt")
    (tmp_path / "config_link.json").symlink_to(tiny_dir / "config.json")
    return {"model": tiny_dir, "calib": tmp_path / "calib.txt", "texts": tmp_path / "texts",
            "ratios": tmp_path / "ratios.json", "masks": tmp_path / "masks.safetensors",
            "hardlink": tmp_path / "hardlink.txt", "config_link": tmp_path / "config_link.json",
            "saved": tmp_path / "saved", "tmp": tmp_path}


CASES = {
    # the repros
    "report replaces the model's config": (["--report", "{model}/config.json"], "--report .* is inside --model"),
    "masks replace the model's weights": (["--save_masks", "{model}/model.safetensors"],
                                          "--save_masks .* is inside --model"),
    "report replaces the calibration text": (["--calibration_dataset", "{calib}", "--report", "{calib}"],
                                             "--report .* is --calibration_dataset"),
    "report replaces the ratios": (["--report", "{tmp}/r.json", "--save_layer_ratio", "{tmp}/r.json"],
                                   "--report .* is --save_layer_ratio .*another output"),
    "report is the saved folder": (["--save_model", "{tmp}/out", "--report", "{tmp}/out"],
                                   "--report .* is --save_model .*another output"),
    # item 16: the report inside the folder --overwrite replaces
    "report inside the saved folder": (["--save_model", "{tmp}/out", "--report", "{tmp}/out/report.json"],
                                       "--report .* is inside --save_model"),
    "plot inside the default checkpoint": (["--save_model", "{tmp}/out", "--plot", "{tmp}/out.checkpoint/p.png"],
                                           "--plot .* is inside --checkpoint_dir"),
    # symlinks and hard links
    "report through a link to the model's config": (["--report", "{config_link}"], "--report .* is inside --model"),
    "report is a hard link of the calibration text": (["--calibration_dataset", "{calib}", "--report", "{hardlink}"],
                                                      "--report .* is --calibration_dataset"),
    # other inputs
    "report inside a text folder": (["--calibration_dataset", "{texts}", "--report", "{texts}/r.json"],
                                    "--report .* is inside --calibration_dataset"),
    "report replaces the evaluation text": (["--eval_ppl", "{calib}", "--no_dense_eval", "--report", "{calib}"],
                                            "--report .* is --eval_ppl"),
    "ratios replace the ratios read": (["--load_layer_ratio", "{ratios}", "--save_layer_ratio", "{ratios}"],
                                       "--save_layer_ratio .* is --load_layer_ratio"),
    "masks replace the masks read": (["--prune_method", "file", "--mask_checkpoint", "{masks}", "--save_masks",
                                      "{masks}"], "--save_masks .* is --mask_checkpoint"),
    "saved model inside the model folder": (["--save_model", "{model}/pruned"], "--save_model .* is inside --model"),
    "checkpoint inside the model folder": (["--checkpoint_dir", "{model}/ckpt"],
                                           "--checkpoint_dir .* is inside --model"),
    "saved model holds the calibration text": (["--calibration_dataset", "{saved}/notes.txt",
                                                "--save_model", "{saved}", "--overwrite"],
                                               "--save_model .* holds --calibration_dataset"),
    "two outputs, one file": (["--report", "{tmp}/x.json", "--save_masks", "{tmp}/x.json"],
                              "--report .* is --save_masks .*another output"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_outputs_overlapping_inputs_or_outputs_are_refused_before_the_load(case, paths, monkeypatch, capsys):
    argv, match = CASES[case]
    argv = [a.format(**paths) for a in argv]
    before = tree(paths["tmp"])
    err = refused_before_load(["--model", str(paths["model"])] + argv, monkeypatch, capsys)
    assert re.search(match, err), err
    assert tree(paths["tmp"]) == before


def test_outputs_beside_each_other_are_accepted(paths, monkeypatch):
    """The README's layouts: outputs side by side in one folder, the saved model in a subfolder of it."""
    out = paths["tmp"] / "out"
    accepted(["--model", str(paths["model"]), "--calibration_dataset", str(paths["calib"]),
              "--save_model", str(out / "llama-2of4"), "--report", str(out / "report.json"),
              "--save_layer_ratio", str(out / "owl.json"), "--save_masks", str(out / "masks.safetensors"),
              "--plot", str(out / "p.png")], monkeypatch)


def test_host_report_may_not_replace_its_text(tmp_path):
    from optima_plugin.host import HostOptions

    text = tmp_path / "data.txt"
    text.write_text("Some text. " * 100)
    with pytest.raises(ValueError, match="--optima_report .* is --host_data"):
        HostOptions(host_data=str(text), report=str(text)).validate()


# --- item 6: never rename over a device, a FIFO or an open file of a process -----------------------


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return path


def _is_fifo(path: Path) -> bool:
    import stat

    return stat.S_ISFIFO(os.lstat(path).st_mode)


@pytest.mark.parametrize("target", ["fifo", "link to /dev/null", "/dev/null", "/dev/stdout"])
def test_special_report_targets_are_refused_before_the_load(target, fifo, tiny_dir, tmp_path, monkeypatch, capsys):
    if target == "link to /dev/null":
        path = tmp_path / "null"
        path.symlink_to("/dev/null")
    else:
        path = fifo if target == "fifo" else Path(target)
    if target.startswith("/dev") and not os.access("/dev", os.W_OK):
        pytest.skip("only root can create files in /dev (else the writability probe refuses it first)")
    err = refused_before_load(["--model", str(tiny_dir), "--report", str(path)], monkeypatch, capsys)
    assert re.search(r"--report .* is (a FIFO|a character device|a file of /proc)", err), err
    assert _is_fifo(fifo)


def test_atomic_write_never_replaces_a_fifo(fifo):
    with pytest.raises(ValueError, match="FIFO"):
        atomic_write_text(fifo, "report")
    assert _is_fifo(fifo) and sorted(p.name for p in fifo.parent.iterdir()) == ["fifo"]


def test_atomic_write_never_replaces_a_fifo_made_while_writing(tmp_path):
    path = tmp_path / "r.json"
    with pytest.raises(ValueError, match="FIFO"):
        with atomic_path(path) as tmp:
            tmp.write_text("report")
            os.mkfifo(path)
    assert _is_fifo(path) and sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_stdout_redirected_to_a_log_is_not_replaced(tmp_path):
    """``--report /dev/stdout`` with stdout redirected to a log: a link to ``/proc/self/fd/N`` resolves to the
    log itself, which a rename would replace (the summary lost)."""
    log_file = tmp_path / "run.log"
    with open(log_file, "w") as log:
        log.write("summary\n")
        log.flush()
        link = tmp_path / "stdout"
        link.symlink_to(f"/proc/self/fd/{log.fileno()}")
        inode = os.stat(log_file).st_ino
        with pytest.raises(ValueError, match="--report .* is a file of /proc"):
            check_output_file(link, "--report")
        with pytest.raises(ValueError, match="file of /proc"):
            atomic_write_text(link, "{}")
    assert os.stat(log_file).st_ino == inode and log_file.read_text() == "summary\n"


# --- item 10: what a killed save left is put back or cleaned up ------------------------------------


def _kill_between_renames(out: Path, suffix: str = "abcd1234") -> Path:
    """The state a kill leaves after ``out`` was moved aside and before the new folder moved in."""
    aside = out.parent / f".{out.name}.optima-old.{suffix}"
    aside.mkdir()
    os.rename(out, aside / "old")
    (out.parent / f".{out.name}.optima-new.{suffix}").mkdir()
    (out.parent / f".{out.name}.optima-new.{suffix}" / "model.safetensors").write_bytes(b"complete or not")
    return aside


def test_a_save_killed_between_its_renames_is_put_back(lm, tiny_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "saves" / "out"
    save_model(*lm, str(out))
    before = tree(out)
    _kill_between_renames(out)
    err = refused_before_load(["--model", str(tiny_dir), "--save_model", str(out)], monkeypatch, capsys)
    assert "exists and is not empty; pass --overwrite" in err, err
    assert tree(out) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]


def test_leftovers_of_a_killed_save_are_removed_by_the_next_save(lm, tmp_path):
    out = tmp_path / "out"
    save_model(*lm, str(out))
    previous = tmp_path / "previous"
    save_model(*lm, str(previous))  # a saved model, as moved aside by the killed save
    aside = tmp_path / ".out.optima-old.zz_99xyz"
    aside.mkdir()
    os.rename(previous, aside / "old")
    (tmp_path / ".out.optima-new.q1w2e3r4").mkdir()
    (tmp_path / ".out.optima-new.q1w2e3r4" / "config.json").write_text("{}")
    (tmp_path / ".out.optima-old.emptyone").mkdir()  # killed right after mkdtemp
    save_model(*lm, str(out), overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_only_the_tools_leftovers_of_that_target_are_touched(lm, tmp_path, monkeypatch):
    monkeypatch.setattr(files, "LEFTOVER_WAIT_S", 0.2)
    out = tmp_path / "out"
    save_model(*lm, str(out))
    keep = {
        ".out.optima-new.short": "wrong random part",
        ".other.optima-new.abcd1234": "another target's",
        ".out.optima-new.abcd1234.bak": "longer name",
        "out.optima-new.abcd1234": "not hidden",
    }
    for name in keep:
        (tmp_path / name).mkdir()
        (tmp_path / name / "notes.txt").write_text(keep[name])
    extra = tmp_path / ".out.optima-old.extra123"  # the old folder and something else
    (extra / "old").mkdir(parents=True)
    (extra / "notes.txt").write_text("mine")
    unmarked = tmp_path / ".out.optima-old.nomark12"  # an old folder the tool did not save
    (unmarked / "old").mkdir(parents=True)
    (unmarked / "old" / "thesis.tex").write_text("mine")
    linked = tmp_path / ".out.optima-new.link1234"  # a new folder holding a link out
    linked.mkdir()
    (linked / "victim").symlink_to(tmp_path / "out.optima-new.abcd1234")
    (tmp_path / ".out.optima-new.sym12345").symlink_to(tmp_path / "out.optima-new.abcd1234")
    live = tmp_path / ".out.optima-new.live1234"  # a save in progress elsewhere holds its lock
    live.mkdir()
    (live / "model.safetensors").write_bytes(b"being written")
    before = {k: v for k, v in tree(tmp_path).items() if not k.startswith("out/") and k != "out"}
    with files.hold_folder(live) as held:
        assert held
        save_model(*lm, str(out), overwrite=True)
    assert {k: v for k, v in tree(tmp_path).items() if not k.startswith("out/") and k != "out"} == before


def test_a_leftover_another_process_is_recovering_is_waited_for(lm, tmp_path):
    """Under torchrun every rank checks the paths: one waits while another holds the leftover (briefly),
    so all of them see the previous model back in place."""
    import threading

    out = tmp_path / "out"
    save_model(*lm, str(out))
    before = tree(out)
    aside = _kill_between_renames(out)
    got, release = threading.Event(), threading.Event()

    def other_rank():
        with files.hold_folder(aside) as held:
            assert held
            got.set()
            release.wait(10)

    thread = threading.Thread(target=other_rank)
    thread.start()
    got.wait(10)
    threading.Timer(0.3, release.set).start()
    try:
        files.recover_interrupted_save(out)
    finally:
        release.set()
        thread.join()
    assert tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --- item 16: saved folders follow the umask -------------------------------------------------------


def test_saved_folders_follow_the_umask(lm, tmp_path):
    mask = os.umask(0o022)
    try:
        save_model(*lm, str(tmp_path / "new"))
        (tmp_path / "kept").mkdir()
        os.chmod(tmp_path / "kept", 0o750)
        save_model(*lm, str(tmp_path / "kept"), overwrite=True)
    finally:
        os.umask(mask)
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0o700
    assert (tmp_path / "kept").stat().st_mode & 0o777 == 0o750  # the replaced folder's
