"""Calibration and evaluation text: pydoc, sherlock, c4, wikitext2, or local files.

* ``pydoc``: Python's own documentation (``pydoc_data.topics``, on every CPython);
  calibration windows come only from the first 80% of its tokens, evaluation
  only from the last 20%.
* ``sherlock``: *The Adventures of Sherlock Holmes* (Project Gutenberg eBook #1661,
  public domain in the USA), shipped in ``optima_plugin/texts/`` with its Project
  Gutenberg license: narrative English prose, a second domain unlike Python's docs,
  available offline. Only the book between the ``*** START OF`` and ``*** END OF``
  lines is used (no license text in the tokens); the same 80/20 split as ``pydoc``.
* ``c4`` / ``wikitext2``: the hosts' hub datasets through ``datasets`` (Wanda's
  files and protocol). Offline, point ``OPTIMA_DATA_DIR`` at local copies:
  ``c4-train.00000-of-01024.json(.gz)`` / ``c4-validation.00000-of-00008.json(.gz)``
  and ``wikitext-2-raw-v1/{train,test}.txt`` (or a ``wikitext`` dataset folder).
* a local path: a ``.txt`` file, a ``.json``/``.jsonl`` file with a ``text``
  field, or a directory of those (joined; 80/20 split like pydoc).

Calibration may mix sources: ``pydoc,sherlock,PATH`` (a comma separates sources, so a
path holding a comma cannot be named here), each optionally weighted ``name:w``
(``pydoc:3,sherlock:1``); see :func:`calibration_counts` and :func:`get_calibration`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger(__name__)

CALIBRATION_SHARE = 0.8
BUILTIN = ("pydoc", "sherlock", "c4", "wikitext2")
#: the shipped Project Gutenberg file behind ``sherlock`` (license header and footer included)
SHERLOCK_FILE = "sherlock-holmes-pg1661.txt"
#: consecutive C4 documents too short for a window before giving up (Wanda's loop never does); with 5% of
#: documents long enough, 1000 misses in a row has probability 0.95**1000 ≈ 5e-23
C4_MAX_MISSES = 1000


def pydoc_text() -> str:
    """Python's documentation topics joined in a fixed order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def sherlock_file():
    """The shipped ``sherlock`` file (an ``importlib.resources`` traversable), license text included."""
    from importlib.resources import files

    return files("optima_plugin") / "texts" / SHERLOCK_FILE


def gutenberg_body(text: str) -> str:
    """The book of a Project Gutenberg file: the lines strictly between its ``*** START OF`` and
    ``*** END OF`` markers, without the header and the license that follows (``ValueError`` if absent)."""
    lines = text.replace("\r\n", "\n").split("\n")
    start = next((i for i, line in enumerate(lines) if line.strip().startswith("*** START OF")), None)
    end = next((i for i, line in enumerate(lines) if line.strip().startswith("*** END OF")), None)
    if start is None or end is None or end <= start:
        raise ValueError("not a Project Gutenberg text: no '*** START OF' ... '*** END OF' markers")
    return "\n".join(lines[start + 1 : end]).strip() + "\n"


def sherlock_text() -> str:
    """*The Adventures of Sherlock Holmes*, without the Project Gutenberg header and license."""
    raw = sherlock_file().read_bytes().decode("utf-8-sig")  # the file starts with a BOM and has CRLF lines
    return gutenberg_body(raw)


BUILTIN_TEXTS = {"pydoc": pydoc_text, "sherlock": sherlock_text}

TEXT_SUFFIXES = (".txt", ".json", ".jsonl")


def text_files(path: Path) -> list[Path]:
    """The ``.txt`` / ``.json`` / ``.jsonl`` files a local dataset path stands for (sorted)."""
    if not path.is_dir():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)


def check_dataset(source: str, flag: str) -> None:
    """``ValueError`` naming ``flag`` unless ``source`` is a built-in name or an existing text path
    whose files are all readable UTF-8 text (JSON: ``text`` records) holding some text.

    No tokenizing, no download: run before the model loads. A local path's files are read
    and decoded here (once per file version, see :func:`_checked_file`).
    """
    if source in BUILTIN:
        return
    if not source.strip():
        raise ValueError(f"{flag} is empty; name one of {', '.join(BUILTIN)} or a local .txt/.jsonl file or folder")
    path = Path(source)
    if not path.exists():
        raise ValueError(f"{flag} {source!r} is neither one of {', '.join(BUILTIN)} nor an existing local path")
    if not text_files(path) or (path.is_file() and path.suffix not in TEXT_SUFFIXES):
        raise ValueError(f"{flag} {source}: no .txt, .json or .jsonl file there")
    if not any(_checked_file(f, flag) for f in text_files(path)):
        raise ValueError(f"no text found in {source} (given to {flag}: empty files, or .json/.jsonl without a "
                         "'text' field)")


def _checked_file(file: Path, flag: str) -> bool:
    """Whether ``file`` holds any text; ``ValueError`` naming ``flag`` and ``file`` when it cannot be read
    as UTF-8 (or its JSON does not parse). Cached by path, size and modification time."""
    st = file.stat()
    return _file_has_text(str(file.resolve()), st.st_size, st.st_mtime_ns, flag)


@lru_cache(maxsize=256)
def _file_has_text(file: str, size: int, mtime_ns: int, flag: str) -> bool:
    return any(t.strip() for t in _file_texts(Path(file), flag))


def _file_texts(f: Path, flag: str) -> list[str]:
    """The texts of one ``.txt`` / ``.json`` / ``.jsonl`` file; ``ValueError`` naming ``flag`` and ``f``."""
    try:
        raw = f.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{flag} {f}: not UTF-8 text ({err.reason} at byte {err.start}); convert it to "
                         "UTF-8 (e.g. iconv -t utf-8)") from None
    except OSError as err:
        raise ValueError(f"{flag} {f}: cannot be read ({err.strerror or err})") from None
    if f.suffix == ".txt":
        return [raw]
    lines = raw.splitlines()
    try:
        records = [json.loads(line) for line in lines if line.strip()]
    except json.JSONDecodeError:
        try:
            records = json.loads(raw)
        except json.JSONDecodeError as err:
            raise ValueError(f"{flag} {f}: neither JSON Lines nor a JSON document ({err.msg} at line "
                             f"{err.lineno}, column {err.colno})") from None
    if isinstance(records, dict):
        records = [records]
    if not isinstance(records, list):
        return []
    return [r["text"] for r in records if isinstance(r, dict) and isinstance(r.get("text"), str)]


def _local_texts(path: Path, flag: str = "dataset") -> list[str]:
    files = text_files(path)
    if path.is_dir():
        shown = ", ".join(str(f.relative_to(path)) for f in files[:3]) + (", ..." if len(files) > 3 else "")
        log.info("text from %d file(s) under %s: %s", len(files), path, shown)
    texts = [t for f in files for t in _file_texts(f, flag)]
    if not any(t.strip() for t in texts):
        raise ValueError(f"no text found in {path} (given to {flag}: empty files, or .json/.jsonl without a "
                         "'text' field)")
    return texts


def _data_dir() -> Path | None:
    d = os.environ.get("OPTIMA_DATA_DIR")
    return Path(d) if d else None


class DatasetUnavailableError(OSError):
    """A hub dataset could not be loaded (typically: offline)."""


def _hub_error(name: str, err: Exception) -> DatasetUnavailableError:
    return DatasetUnavailableError(
        f"could not load {name} ({type(err).__name__}: {err}); on an offline machine put local copies "
        f"in a folder and set OPTIMA_DATA_DIR to it (see optima_plugin.data), or pass a local text/JSONL path"
    )


def load_c4(split: str) -> list[str]:
    """C4 documents (Wanda's shard): ``split`` is ``train`` or ``validation``."""
    from datasets import load_dataset

    files = {"train": "c4-train.00000-of-01024.json.gz", "validation": "c4-validation.00000-of-00008.json.gz"}
    local = _data_dir()
    try:
        if local is not None:
            found = sorted(local.glob(files[split].replace(".json.gz", ".json*")))
            if not found:
                raise FileNotFoundError(f"{files[split]} not in OPTIMA_DATA_DIR={local}")
            ds = load_dataset("json", data_files={split: [str(f) for f in found]}, split=split)
        else:
            ds = load_dataset("allenai/c4", data_files={split: f"en/{files[split]}"}, split=split)
    except Exception as e:  # noqa: BLE001 - any hub/offline failure gets the same advice
        raise _hub_error("c4", e) from e
    return list(ds["text"])


def load_wikitext2(split: str) -> list[str]:
    """WikiText-2 raw lines: ``split`` is ``train`` or ``test``."""
    from datasets import load_dataset

    local = _data_dir()
    try:
        if local is not None:
            folder = local / "wikitext-2-raw-v1"
            if (folder / f"{split}.txt").exists():
                ds = load_dataset("text", data_files={split: str(folder / f"{split}.txt")}, split=split)
            else:
                ds = load_dataset(str(local / "wikitext"), "wikitext-2-raw-v1", split=split)
        else:
            ds = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
    except Exception as e:  # noqa: BLE001
        raise _hub_error("wikitext2", e) from e
    return list(ds["text"])


def _joined_source_tokens(source: str, tokenizer, flag: str) -> torch.Tensor:
    if source in BUILTIN_TEXTS:
        text = BUILTIN_TEXTS[source]()
    else:
        path = Path(source)
        if not source.strip() or not path.exists():
            raise FileNotFoundError(
                f"{flag} {source!r} is neither one of {', '.join(BUILTIN)} nor an existing local path"
            )
        text = "\n\n".join(_local_texts(path, flag))
    return tokenizer(text, return_tensors="pt").input_ids[0]


def _random_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int, what: str) -> torch.Tensor:
    if ids.numel() <= seqlen:
        raise ValueError(f"--calibration_dataset: {what} has {ids.numel()} tokens, too few for --seqlen {seqlen}; "
                         "give more text or a smaller --seqlen")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=g)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def _single_calibration(source: str, tokenizer, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``(nsamples, seqlen)`` int64 calibration windows from one ``source``."""
    if source == "c4":
        docs = load_c4("train")
        rng = random.Random(seed)
        out, misses = [], 0
        while len(out) < nsamples:  # Wanda: a random document longer than seqlen, a random window
            ids = tokenizer(docs[rng.randint(0, len(docs) - 1)], return_tensors="pt").input_ids[0]
            if ids.numel() > seqlen:
                s = rng.randint(0, ids.numel() - seqlen - 1)
                out.append(ids[s : s + seqlen])
                misses = 0
            else:
                misses += 1
                if misses >= C4_MAX_MISSES:
                    raise ValueError(f"c4: {misses} random documents in a row were not longer than --seqlen {seqlen} "
                                     f"tokens ({len(out)} of {nsamples} windows found); use a smaller --seqlen")
        return torch.stack(out)
    if source == "wikitext2":
        ids = tokenizer("\n\n".join(load_wikitext2("train")), return_tensors="pt").input_ids[0]
        return _random_windows(ids, nsamples, seqlen, seed, "wikitext2 train")
    ids = _joined_source_tokens(source, tokenizer, "--calibration_dataset")
    head = ids[: int(CALIBRATION_SHARE * ids.numel())]
    return _random_windows(head, nsamples, seqlen, seed, f"the first 80% of {source}")


def parse_calibration(spec: str, flag: str = "--calibration_dataset") -> list[tuple[str, Optional[float]]]:
    """``[(source, weight or None), ...]`` of a comma-separated calibration spec (``pydoc:3,sherlock``).

    A trailing ``:w`` is a weight when ``w`` reads as a number, or when what precedes it is a
    built-in name or an existing path (then ``w`` must be a positive number). Cheap; ``ValueError``
    naming ``flag`` for an empty entry, a bad weight or a source listed twice.
    """
    if not spec.strip():
        check_dataset(spec, flag)  # the empty-name message
    out: list[tuple[str, Optional[float]]] = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            raise ValueError(f"{flag} {spec!r} has an empty entry; separate sources by single commas "
                             f"(e.g. pydoc,sherlock)")
        source, weight = item, None
        if ":" in item:
            head, tail = item.rsplit(":", 1)
            try:
                value = float(tail)
            except ValueError:
                value = None
            if value is not None or head in BUILTIN or (head.strip() and Path(head).exists()):
                if value is None or not math.isfinite(value) or value <= 0:
                    raise ValueError(f"{flag} {item!r}: the weight after ':' must be a positive number "
                                     f"(e.g. {head}:2), got {tail!r}")
                source, weight = head, value
        if any(source == s for s, _ in out):
            raise ValueError(f"{flag} lists {source!r} twice; give it once with a weight (e.g. {source}:2)")
        out.append((source, weight))
    return out


def calibration_counts(spec: str, nsamples: int, flag: str = "--calibration_dataset") -> list[tuple[str, int]]:
    """``[(source, windows), ...]`` summing to ``nsamples``: shares proportional to the weights (default 1).

    Largest remainders, ties to the earlier source: equal weights split ``nsamples`` as evenly as
    possible with the remainder to the first sources. ``ValueError`` naming ``flag`` when a source
    would get no window (more sources than ``nsamples``, or a weight too small for ``nsamples``).
    """
    parsed = parse_calibration(spec, flag)
    if len(parsed) > nsamples:
        raise ValueError(f"{flag} names {len(parsed)} sources but --nsamples is {nsamples}: every source needs "
                         f"at least one window; raise --nsamples to {len(parsed)} or more, or name fewer sources")
    weights = [Fraction(w if w is not None else 1.0) for _, w in parsed]
    total = sum(weights)
    exact = [nsamples * w / total for w in weights]
    counts = [math.floor(e) for e in exact]
    order = sorted(range(len(parsed)), key=lambda j: (-(exact[j] - counts[j]), j))
    for j in order[: nsamples - sum(counts)]:
        counts[j] += 1
    for (source, weight), count in zip(parsed, counts):
        if count == 0:
            shown = weight if weight is not None else 1
            raise ValueError(f"{flag}: {source} (weight {shown:g}) gets no window of --nsamples {nsamples}; "
                             "raise its weight or --nsamples")
    return [(source, count) for (source, _), count in zip(parsed, counts)]


def check_calibration(spec: str, nsamples: int, flag: str = "--calibration_dataset") -> None:
    """``ValueError`` naming ``flag`` unless every source of ``spec`` exists and gets a window (cheap)."""
    for source, _ in calibration_counts(spec, nsamples, flag):
        check_dataset(source, flag)


def interleave_order(counts: list[int]) -> list[tuple[int, int]]:
    """``[(source index, window index), ...]``: each source's windows spread evenly over the sequence.

    Window ``j`` of a source with ``c`` windows sits at ``(j + 1/2) / c`` of the way; ties go to the
    earlier source. Any contiguous run (a torchrun rank's share, a held-out tail) mixes the sources
    in about their proportions.
    """
    keys = [(Fraction(2 * j + 1, 2 * c), s, j) for s, c in enumerate(counts) for j in range(c)]
    return [(s, j) for _, s, j in sorted(keys)]


def get_calibration(source: str, tokenizer, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``(nsamples, seqlen)`` int64 calibration windows from ``source``.

    ``source``: one name or path, or comma-separated sources with optional weights
    (``pydoc:3,sherlock:1``, see :func:`calibration_counts`). Each source draws its windows from
    its own calibration split with ``seed``; the sources' windows are interleaved
    (:func:`interleave_order`). A single source gives the same windows as it always did.
    """
    shares = calibration_counts(source, nsamples)
    if len(shares) == 1:
        return _single_calibration(shares[0][0], tokenizer, nsamples, seqlen, seed)
    parts = []
    for name, count in shares:
        parts.append(_single_calibration(name, tokenizer, count, seqlen, seed))
        log.info("calibration: %d of %d windows from %s", count, nsamples, name)
    return torch.stack([parts[s][j] for s, j in interleave_order([c for _, c in shares])])


def get_eval_tokens(source: str, tokenizer, seqlen: int = 2048, flag: Optional[str] = None) -> torch.Tensor:
    """``(1, N)`` int64 evaluation tokens of ``source`` (held-out last 20% for pydoc/sherlock/local text).

    With ``flag`` (``--eval_ppl``): ``ValueError`` naming it and ``source`` when the tokens do not
    fill one window of ``seqlen``.
    """
    if source == "c4":
        # Wanda: the first 1100 validation documents joined by spaces, first 256 windows.
        ids = tokenizer(" ".join(load_c4("validation")[:1100]), return_tensors="pt").input_ids
        ids, what = ids[:, : 256 * seqlen], "c4 validation"
    elif source == "wikitext2":
        ids, what = tokenizer("\n\n".join(load_wikitext2("test")), return_tensors="pt").input_ids, "wikitext2 test"
    else:
        ids = _joined_source_tokens(source, tokenizer, flag or "--eval_ppl")
        ids, what = ids[int(CALIBRATION_SHARE * ids.numel()) :].unsqueeze(0), f"the last 20% of {source}"
    if flag is not None and ids.shape[1] < seqlen:
        raise ValueError(f"{flag} {source}: {what} has {ids.shape[1]} tokens, fewer than one window of --seqlen "
                         f"{seqlen}; give more text or a smaller --seqlen")
    return ids


def validate_config(config) -> None:
    """The calibration texts and ``--eval_ppl`` datasets exist (cheap: nothing is tokenized)."""
    check_calibration(config.calibration_dataset, config.nsamples, "--calibration_dataset")
    for ds in config.eval_ppl:
        check_dataset(ds, "--eval_ppl")
