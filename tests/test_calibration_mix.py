"""Multi-source calibration: ``--calibration_dataset a:w,b,...`` shares, splits, order and errors."""

from __future__ import annotations

import pytest
import torch

from optima_plugin.config import PruneConfig
from optima_plugin.validate import resolve
from optima_plugin.data import calibration_counts, get_calibration, interleave_order
from optima_plugin.testing import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture
def two_files(tmp_path):
    """Two local texts with disjoint words (every window belongs to exactly one of them)."""
    a = tmp_path / "fruit.txt"
    b = tmp_path / "animals.txt"
    a.write_text(" ".join(f"apple banana cherry {i} pear" for i in range(600)))
    b.write_text(" ".join(f"zebra yak walrus {i} otter" for i in range(600)))
    return str(a), str(b)


def _ids(tok, path: str) -> list:
    with open(path, encoding="utf-8") as f:
        return tok(f.read(), return_tensors="pt").input_ids[0].tolist()


def _starts(window: list, ids: list) -> list:
    n = len(window)
    return [i for i in range(len(ids) - n + 1) if ids[i : i + n] == window]


def _source_of(window: list, sources: dict) -> tuple:
    """``(name, start)`` of the only source holding ``window``; asserts exactly one does."""
    found = [(name, s) for name, ids in sources.items() for s in _starts(window, ids)]
    assert len({name for name, _ in found}) == 1, found
    return found[0]


def test_counts_split_evenly_with_the_remainder_first_and_follow_weights():
    assert calibration_counts("pydoc", 5) == [("pydoc", 5)]
    assert calibration_counts("pydoc,sherlock,c4", 7) == [("pydoc", 3), ("sherlock", 2), ("c4", 2)]
    assert calibration_counts("pydoc,sherlock,c4", 8) == [("pydoc", 3), ("sherlock", 3), ("c4", 2)]
    assert calibration_counts("pydoc:3,sherlock:1", 8) == [("pydoc", 6), ("sherlock", 2)]
    assert calibration_counts("pydoc:3, sherlock:1", 10) == [("pydoc", 8), ("sherlock", 2)]  # 7.5/2.5: tie → first
    assert calibration_counts("pydoc:1,sherlock:3", 10) == [("pydoc", 3), ("sherlock", 7)]  # 2.5/7.5: tie → first
    assert calibration_counts("pydoc:0.5,sherlock", 9) == [("pydoc", 3), ("sherlock", 6)]


def test_interleave_spreads_every_source_over_the_sequence():
    order = interleave_order([6, 2])
    assert sorted(order) == [(0, j) for j in range(6)] + [(1, 0), (1, 1)]
    labels = [s for s, _ in order]
    assert labels == [0, 0, 1, 0, 0, 0, 1, 0]
    for s in (0, 1):  # each source's windows in their own order
        assert [j for t, j in order if t == s] == sorted(j for t, j in order if t == s)
    labels = [s for s, _ in interleave_order([4, 4, 4])]
    for half in (labels[:6], labels[6:]):
        assert sorted(set(half)) == [0, 1, 2]


def test_windows_come_from_each_sources_calibration_split_in_the_asked_shares(tok, two_files):
    a, b = two_files
    ids = {a: _ids(tok, a), b: _ids(tok, b)}
    cuts = {name: int(0.8 * len(v)) for name, v in ids.items()}
    seqlen = 24
    calib = get_calibration(f"{a}:3,{b}:1", tok, nsamples=16, seqlen=seqlen, seed=0)
    assert calib.shape == (16, seqlen) and calib.dtype == torch.int64
    owners = []
    for w in calib.tolist():
        name, start = _source_of(w, ids)
        assert start + seqlen <= cuts[name], (name, start)  # the first 80% only, never the held-out part
        owners.append(name)
    assert owners.count(a) == 12 and owners.count(b) == 4
    assert set(owners[:8]) == {a, b} and set(owners[8:]) == {a, b}  # any half mixes the sources
    # each source's windows are the ones that source alone gives with the run's seed, in order
    assert torch.equal(calib[[i for i, o in enumerate(owners) if o == a]], get_calibration(a, tok, 12, seqlen, 0))
    assert torch.equal(calib[[i for i, o in enumerate(owners) if o == b]], get_calibration(b, tok, 4, seqlen, 0))


def test_mixed_builtins_are_deterministic_by_seed(tok):
    first = get_calibration("pydoc,sherlock", tok, 5, 32, seed=1)
    assert torch.equal(first, get_calibration("pydoc,sherlock", tok, 5, 32, seed=1))
    assert not torch.equal(first, get_calibration("pydoc,sherlock", tok, 5, 32, seed=2))
    assert torch.equal(first[[0, 2, 4]], get_calibration("pydoc", tok, 3, 32, seed=1))  # 3 + 2, interleaved
    assert torch.equal(first[[1, 3]], get_calibration("sherlock", tok, 2, 32, seed=1))


def test_one_source_is_unchanged_and_weights_are_relative(tok, two_files):
    a, b = two_files
    assert torch.equal(get_calibration("pydoc:2", tok, 3, 32, seed=0), get_calibration("pydoc", tok, 3, 32, seed=0))
    assert torch.equal(get_calibration(f"{a}:2,{b}:2", tok, 5, 16, seed=3),
                       get_calibration(f"{a},{b}", tok, 5, 16, seed=3))


@pytest.mark.parametrize("spec,nsamples,match", [
    ("pydoc,nosuchname", 4, "'nosuchname' is neither one of pydoc"),
    ("pydoc:abc", 4, r"weight after ':' must be a positive number"),
    ("pydoc:0,sherlock", 4, r"weight after ':' must be a positive number"),
    ("pydoc:-1,sherlock", 4, r"weight after ':' must be a positive number"),
    ("pydoc:nan", 4, r"weight after ':' must be a positive number"),
    ("pydoc,sherlock,c4", 2, "names 3 sources but --nsamples is 2"),
    ("pydoc:100,sherlock", 4, "sherlock .weight 1. gets no window of --nsamples 4"),
    ("pydoc,,sherlock", 4, "empty entry"),
    ("pydoc,pydoc:2", 4, "lists 'pydoc' twice"),
])
def test_bad_specs_fail_validation_naming_the_flag(spec, nsamples, match):
    with pytest.raises(ValueError, match=match) as err:
        resolve(PruneConfig(calibration_dataset=spec, nsamples=nsamples, batch_size=1))
    assert "--calibration_dataset" in str(err.value)


def test_a_local_path_with_a_weight_validates(two_files):
    a, b = two_files
    cfg = resolve(PruneConfig(calibration_dataset=f"{a}:2,{b},sherlock", nsamples=4))
    assert cfg.to_dict()["calibration_dataset"] == f"{a}:2,{b},sherlock"  # the report records the string
