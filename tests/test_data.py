"""Calibration/evaluation text: pydoc and sherlock splits, local files, c4/wikitext2 through `datasets` on local files."""

from __future__ import annotations

import gzip
import json
import shutil
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from optima_plugin.data import DatasetUnavailableError, get_calibration, get_eval_tokens
from optima_plugin.evaluation import perplexity_of_tokens
from optima_plugin.testing import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _positions(windows, ids):
    """Start offsets of each window inside ids (brute force on the token sequence)."""
    seq = ids.tolist()
    out = []
    for w in windows.tolist():
        n = len(w)
        out.append(next(i for i in range(len(seq) - n + 1) if seq[i : i + n] == w))
    return out


def test_pydoc_calibration_and_eval_are_disjoint(tok):
    calib = get_calibration("pydoc", tok, nsamples=8, seqlen=64, seed=0)
    assert calib.shape == (8, 64) and calib.dtype == torch.int64
    ev = get_eval_tokens("pydoc", tok)
    from optima_plugin.data import pydoc_text

    ids = tok(pydoc_text(), return_tensors="pt").input_ids[0]
    cut = int(0.8 * ids.numel())
    assert torch.equal(ev[0], ids[cut:])
    for start in _positions(calib, ids):
        assert start + 64 <= cut


def test_calibration_is_deterministic_by_seed(tok):
    a = get_calibration("pydoc", tok, 4, 32, seed=1)
    b = get_calibration("pydoc", tok, 4, 32, seed=1)
    c = get_calibration("pydoc", tok, 4, 32, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_local_txt_jsonl_and_directory(tmp_path, tok):
    text = " ".join(f"word{i} and more words" for i in range(400))
    (tmp_path / "a.txt").write_text(text)
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": text}) for _ in range(2)))
    for src in (tmp_path / "a.txt", tmp_path / "b.jsonl", tmp_path):
        calib = get_calibration(str(src), tok, 3, 32, seed=0)
        assert calib.shape == (3, 32)
        assert get_eval_tokens(str(src), tok).shape[1] > 32


def test_missing_path_and_short_text(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="neither one of pydoc, sherlock, c4, wikitext2"):
        get_calibration(str(tmp_path / "nope.txt"), tok, 2, 32)
    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(ValueError, match="too few for --seqlen"):
        get_calibration(str(tmp_path / "short.txt"), tok, 2, 512)


def test_c4_and_wikitext2_through_datasets_on_local_files(tmp_path, tok, monkeypatch):
    docs = [{"text": " ".join(f"doc{d} token{i}" for i in range(300))} for d in range(5)]
    for name in ("c4-train.00000-of-01024.json.gz", "c4-validation.00000-of-00008.json.gz"):
        with gzip.open(tmp_path / name, "wt") as f:
            f.write("\n".join(json.dumps(d) for d in docs))
    wt = tmp_path / "wikitext-2-raw-v1"
    wt.mkdir()
    for split in ("train", "test"):
        (wt / f"{split}.txt").write_text("\n".join(f" = Heading {i} = \n some wiki text line {i} ." for i in range(300)))
    monkeypatch.setenv("OPTIMA_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    c4 = get_calibration("c4", tok, 3, 32, seed=0)
    assert c4.shape == (3, 32)
    assert get_eval_tokens("c4", tok, 32).shape[1] <= 256 * 32
    assert get_calibration("wikitext2", tok, 2, 32).shape == (2, 32)
    assert get_eval_tokens("wikitext2", tok).shape[1] > 100


def test_offline_hub_dataset_explains_what_to_do(tmp_path, tok, monkeypatch):
    monkeypatch.setenv("OPTIMA_DATA_DIR", str(tmp_path))  # empty folder
    with pytest.raises(DatasetUnavailableError, match="OPTIMA_DATA_DIR"):
        get_calibration("c4", tok, 2, 32)


def test_perplexity_protocol_matches_manual_loss(tok):
    model = tiny_model("llama")
    tokens = get_eval_tokens("pydoc", tok)[:, : 3 * 32 + 5]
    ppl = perplexity_of_tokens(model, tokens, 32, progress=False)
    with torch.no_grad():
        losses = [model(input_ids=tokens[:, i * 32 : (i + 1) * 32], labels=tokens[:, i * 32 : (i + 1) * 32]).loss
                  for i in range(3)]
    assert ppl == pytest.approx(float(torch.exp(torch.stack(losses).mean())), rel=1e-4)


REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "optima_plugin" / "texts" / "sherlock-holmes-pg1661.txt"


def _raw_book() -> str:
    """The shipped file as text (BOM and CRLF removed), read without optima_plugin.data."""
    return SHIPPED.read_bytes().decode("utf-8-sig").replace("\r\n", "\n")


def _locate(text: str, raw: str) -> tuple:
    """(first, last) character offsets in raw of the middle of a decoded token window (its ends may be
    partial characters); asserts it is found."""
    core = text[3:-3]
    assert len(core) > 40, text
    first, last = raw.find(core), raw.rfind(core)
    assert first >= 0, core[:80]
    return first, last + len(core)


def test_sherlock_loads_offline_and_ships_its_license(tok, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("sherlock must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    from optima_plugin.data import BUILTIN, check_dataset, sherlock_file, sherlock_text

    assert "sherlock" in BUILTIN
    check_dataset("sherlock", "--eval_ppl")  # a built-in name, no path needed
    shipped = sherlock_file().read_bytes()
    assert shipped == SHIPPED.read_bytes()  # the package resource is the file in the repository, unchanged
    assert b"Project Gutenberg License" in shipped and b"*** START OF THE PROJECT GUTENBERG EBOOK" in shipped
    assert b"*** END OF THE PROJECT GUTENBERG EBOOK" in shipped
    text = sherlock_text()
    assert text.startswith("The Adventures of Sherlock Holmes")
    assert text.rstrip().endswith("where I believe that she has met with considerable success.")
    for license_words in ("Gutenberg", "License", "*** START", "*** END", "\r", "\ufeff"):
        assert license_words not in text
    raw = _raw_book()
    assert text.strip() in raw  # the book, verbatim
    assert len(text) > 0.95 * (raw.index("*** END OF") - raw.index("*** START OF"))  # all of it
    calib = get_calibration("sherlock", tok, nsamples=4, seqlen=64, seed=0)
    ev = get_eval_tokens("sherlock", tok)
    assert calib.shape == (4, 64) and ev.shape[0] == 1 and ev.shape[1] > 10000
    used = tok.decode(ev[0]) + "".join(tok.decode(w) for w in calib)
    assert "Gutenberg" not in used and "gutenberg" not in used.lower()


def test_sherlock_calibration_from_first_80_percent_eval_from_last_20(tok):
    """Located in the raw shipped file by text, independently of the split code."""
    raw = _raw_book()
    body_start = raw.index("*** START OF THE PROJECT GUTENBERG EBOOK")
    body_end = raw.index("*** END OF THE PROJECT GUTENBERG EBOOK")
    ev = get_eval_tokens("sherlock", tok)[0]
    eval_text = tok.decode(ev)
    # the held-out part: a contiguous tail of the book, ending at its last sentence
    eval_start, _ = _locate(eval_text[:300], raw)
    assert raw.find(eval_text[3:300]) == raw.rfind(eval_text[3:300])  # unique
    assert eval_text.rstrip().endswith("considerable success.")
    assert eval_text[3:-3] in raw[eval_start:body_end]
    book = raw[body_start:body_end]
    share = (body_end - eval_start) / (body_end - body_start)
    assert 0.15 < share < 0.25, share  # the last ~20% (of tokens; characters roughly follow)
    calib = get_calibration("sherlock", tok, nsamples=16, seqlen=64, seed=0)
    for window in calib:
        first, last_end = _locate(tok.decode(window), raw)
        assert body_start < first and last_end <= eval_start + 3, (first, last_end, eval_start)
    assert len(book) > 500000


def test_sherlock_ships_in_the_wheel(tmp_path):
    """Build a wheel from a copy of the package (no network: the installed setuptools) and find the file."""
    pytest.importorskip("setuptools")  # the build backend, used as installed (--no-build-isolation: offline)
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "optima_plugin", src / "optima_plugin",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                           "--no-index", "-q", "-w", str(tmp_path / "dist")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("optima_plugin-*.whl")
    with zipfile.ZipFile(wheel) as z:
        assert z.read("optima_plugin/texts/sherlock-holmes-pg1661.txt") == SHIPPED.read_bytes()
        assert "optima_plugin/texts/README.md" in z.namelist()
