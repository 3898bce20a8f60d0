"""Local text in place of the hosts' hub datasets (``optima-host --host_data pydoc|sherlock|PATH``).

The hosts load their calibration and evaluation data with
``datasets.load_dataset('allenai/c4', ..., split='train'|'validation')`` and
``load_dataset('wikitext', 'wikitext-2-raw-v1', split='train'|'test')``.
:func:`route_hub_datasets` replaces ``datasets.load_dataset`` in the host process
so that these calls return :class:`datasets.Dataset` objects with a ``text``
column: the training splits hold the first 80% of the local text (by characters,
cut at whitespace) as documents of about :data:`DOCUMENT_CHARS` characters cut at
paragraph breaks (the hosts tokenize one random training document per calibration
window and need it longer than the window), the validation and test splits the
last 20% as one document. Every other dataset goes to the real ``load_dataset``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from ..data import BUILTIN_TEXTS, CALIBRATION_SHARE, _local_texts

log = logging.getLogger(__name__)

#: The hub dataset paths the hosts use, by the name they are routed under.
HUB_PATHS = {"allenai/c4": "c4", "c4": "c4", "wikitext": "wikitext2", "Salesforce/wikitext": "wikitext2"}
CALIBRATION_SPLITS = ("train",)
#: Length of a training document: about 25k tokens, longer than any host's window.
DOCUMENT_CHARS = 100_000
EVALUATION_SPLITS = ("validation", "test")


def split_text(source: str) -> tuple[str, str]:
    """``(calibration, evaluation)`` text of ``source`` (a built-in text, ``pydoc`` or ``sherlock``, or a local
    .txt/.jsonl file or folder)."""
    if source in BUILTIN_TEXTS:
        text = BUILTIN_TEXTS[source]()
    else:
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"--host_data {source}: neither {' nor '.join(BUILTIN_TEXTS)} nor an existing "
                                    "file or folder")
        text = "\n\n".join(_local_texts(path, "--host_data"))
    cut = int(CALIBRATION_SHARE * len(text))
    while cut < len(text) and not text[cut].isspace():
        cut += 1
    return text[:cut], text[cut:]


def documents(text: str, size: int = DOCUMENT_CHARS) -> list[str]:
    """``text`` cut at paragraph breaks (``\\n\\n``) into documents of at least ``size`` characters
    (the last may be longer, never shorter unless the text is); joined by ``\\n\\n`` they are ``text``."""
    docs, start = [], 0
    while len(text) - start >= 2 * size:
        cut = text.find("\n\n", start + size)
        if cut < 0 or len(text) - cut - 2 < size:
            break
        docs.append(text[start:cut])
        start = cut + 2
    docs.append(text[start:])
    return docs


def route_hub_datasets(source: str) -> Callable[[], None]:
    """Patch ``datasets.load_dataset`` to serve C4 / WikiText-2 from ``source``; return the undo function."""
    import datasets

    calibration, evaluation = split_text(source)
    original = datasets.load_dataset

    def load_dataset(path, name=None, *args, split=None, **kwargs):
        routed = HUB_PATHS.get(str(path))
        if routed is None:
            return original(path, name, *args, split=split, **kwargs)
        base = split.split("[", 1)[0] if isinstance(split, str) else split

        def one(split_name: str) -> "datasets.Dataset":
            if split_name in CALIBRATION_SPLITS:
                texts, part = documents(calibration), "first"
            elif split_name in EVALUATION_SPLITS:
                texts, part = [evaluation], "last"
            else:
                raise ValueError(f"--host_data routes {path} splits {CALIBRATION_SPLITS + EVALUATION_SPLITS}, "
                                 f"not {split_name!r}")
            share = CALIBRATION_SHARE if part == "first" else 1 - CALIBRATION_SHARE
            log.info("host data: %s split %s <- the %s %.0f%% of %s (%d characters, %d document(s))",
                     path, split_name, part, 100 * share, source, sum(map(len, texts)), len(texts))
            return datasets.Dataset.from_dict({"text": texts})

        if base is None:
            names = list(kwargs.get("data_files") or {}) or ["train", "validation" if routed == "c4" else "test"]
            return datasets.DatasetDict({n: one(n) for n in names})
        return one(base)

    datasets.load_dataset = load_dataset

    def undo() -> None:
        datasets.load_dataset = original

    return undo
