"""Data loader of the ``python_facts`` task: the JSONL file next to this module.

lm-eval calls ``custom_dataset`` with the task's metadata as keyword arguments.
Relative ``data_files`` in a task YAML are resolved by ``datasets`` against the
current directory, not the YAML's, so the path is built from ``__file__`` here and
the task runs from any working directory, fully offline.
"""

import json
from pathlib import Path

import datasets

DATA = Path(__file__).with_name("python_facts.jsonl")


def load(**metadata) -> datasets.DatasetDict:
    """The 20 questions as the ``test`` split."""
    with DATA.open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
