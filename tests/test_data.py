"""Calibration/evaluation text: pydoc split, local files, c4/wikitext2 through `datasets` on local files."""

from __future__ import annotations

import gzip
import json

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
    with pytest.raises(FileNotFoundError, match="neither one of pydoc, c4, wikitext2"):
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
