"""Zero-shot accuracy with lm-eval on the in-memory model (the OPTIMA paper's headline metric).

Tasks are lm-eval task, group or tag names (``mmlu``, ``piqa``, ...), resolved by
``lm_eval.tasks.TaskManager``; ``tasks_dir`` adds local task YAMLs (with local
data) so evaluation runs without Hugging Face Hub access. Every error a user can
fix is a one-line ``ValueError`` (unknown task) or ``OSError`` (data not loadable).
"""

from __future__ import annotations

import copy
import difflib
import logging
import math
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence, Union

log = logging.getLogger(__name__)

DEFAULT_TASKS = ("mmlu", "piqa", "arc_easy", "arc_challenge", "winogrande", "openbookqa")
METRICS = ("acc", "acc_norm")

_DATA_ERROR_MODULES = ("datasets", "huggingface_hub", "requests", "urllib3", "httpx", "fsspec", "aiohttp")
_TASK_ERRORS = (ValueError, KeyError, TypeError, ImportError, AttributeError)


def parse_tasks(tasks: Union[str, Sequence[str], None]) -> list:
    """``"a,b"`` or ``["a", "b"]`` → ``["a", "b"]`` (blanks dropped, order kept, duplicates removed)."""
    if tasks is None:
        return []
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    return list(dict.fromkeys(t.strip() for t in items if t and t.strip()))


@lru_cache(maxsize=8)
def _manager(tasks_dir: Optional[str], include_defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=tasks_dir, include_defaults=include_defaults)


def task_manager(tasks: Sequence[str], tasks_dir: Optional[str] = None):
    """The ``TaskManager`` that knows every name in ``tasks``; ``ValueError`` naming close matches if not.

    With ``tasks_dir`` and only local names, lm-eval's own ~15k task YAMLs are not
    indexed (that takes ~10 s); otherwise they are, with ``tasks_dir`` taking precedence.
    """
    names = parse_tasks(tasks)
    if not names:
        raise ValueError("--eval_zero_shot needs at least one task name, e.g. piqa,arc_easy")
    if tasks_dir is not None:
        path = Path(tasks_dir).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"--tasks_dir {tasks_dir}: no such directory")
        tasks_dir = str(path.resolve())
        local = _manager(tasks_dir, False)
        if all(_known(local, n) for n in names):
            return local
    manager = _manager(tasks_dir, True)
    for name in names:
        if not _known(manager, name):
            raise ValueError(_unknown_message(name, manager, tasks_dir))
    return manager


def _known(manager, name: str) -> bool:
    return name in manager.task_index or (name.endswith((".yaml", ".yml")) and Path(name).is_file())


def _unknown_message(name: str, manager, tasks_dir: Optional[str]) -> str:
    close = difflib.get_close_matches(name, manager.all_tasks, n=6, cutoff=0.6)
    msg = f"unknown zero-shot task {name!r}; " + (f"close matches: {', '.join(close)}" if close else "no close match")
    msg += f" ({len(manager.all_tasks)} tasks, groups and tags known; list them with `lm-eval ls tasks`"
    if tasks_dir is not None:
        local = sorted(_manager(tasks_dir, False).all_tasks)
        msg += f"; in --tasks_dir {tasks_dir}: {', '.join(local[:20]) if local else 'no task YAML'}"
    else:
        msg += "; a task of your own needs --tasks_dir DIR with its YAML"
    return msg + ")"


def load_tasks(tasks: Sequence[str], tasks_dir: Optional[str] = None) -> tuple:
    """Build ``tasks`` (loading their data): ``(manager, [Task | Group, ...])`` in the order asked.

    Raises ``ValueError`` for unknown or invalid tasks and ``OSError`` (one line, pointing
    to ``--tasks_dir``) when a task's data cannot be loaded, e.g. offline.
    """
    manager = task_manager(tasks, tasks_dir)
    built = []
    for name in parse_tasks(tasks):
        try:
            with _lm_eval_logging(progress=True):
                loaded = manager.load([name])
        except Exception as e:  # noqa: BLE001 - mapped to one actionable line or re-raised
            raise _task_error(name, e) from e
        if name in loaded["groups"]:
            built.append(loaded["groups"][name])
        elif name in loaded["tasks"]:
            built.append(loaded["tasks"][name])
        else:  # a tag or a YAML path: its tasks
            built.extend(loaded["tasks"].values())
    return manager, built


def _task_error(name: str, error: Exception) -> Exception:
    detail = " ".join(f"{type(error).__name__}: {error}".split())
    if len(detail) > 300:
        detail = detail[:297] + "..."
    module = type(error).__module__ or ""
    if isinstance(error, OSError) or module.split(".")[0] in _DATA_ERROR_MODULES:
        return OSError(
            f"zero-shot task {name!r}: its data could not be loaded ({detail}); without Hugging Face Hub "
            "access, write an lm-eval task YAML with local data files and pass its directory as "
            "--tasks_dir DIR (see examples/tasks)"
        )
    if isinstance(error, _TASK_ERRORS):
        return ValueError(f"zero-shot task {name!r} could not be built ({detail}); check its YAML")
    return error


def check_tasks(tasks: Sequence[str], tasks_dir: Optional[str] = None) -> None:
    """Fail now (``ValueError``/``OSError``) rather than after a long prune if ``tasks`` cannot run."""
    load_tasks(tasks, tasks_dir)


def eval_zero_shot(
    model,
    tokenizer,
    tasks: Union[str, Sequence[str]] = DEFAULT_TASKS,
    *,
    tasks_dir: Optional[str] = None,
    batch_size: int = 1,
    limit: Optional[float] = None,
    num_fewshot: int = 0,
    progress: bool = True,
) -> dict:
    """Accuracy of the in-memory ``model`` on lm-eval ``tasks`` (``simple_evaluate``, no reload).

    Runs where the model's weights are (CPU after an offloaded prune, or GPU). ``limit``
    caps the examples per task (a fraction if < 1; for quick runs only). Returns
    ``{"tasks": {name: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "samples"}},
    "average": mean acc, "num_fewshot", "limit"}``; ``acc_norm`` only where lm-eval gives it,
    groups (``mmlu``) as lm-eval aggregates them.
    """
    if batch_size < 1:
        raise ValueError(f"--eval_batch_size must be a positive integer, got {batch_size}")
    if num_fewshot < 0:
        raise ValueError(f"--num_fewshot must be >= 0, got {num_fewshot}")
    if limit is not None and limit <= 0:
        raise ValueError(f"--eval_limit must be positive, got {limit}")
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    manager, built = load_tasks(tasks, tasks_dir)
    was_training = model.training
    try:
        with _lm_eval_logging(progress):
            # HFLM may set a pad token on the tokenizer it gets: give it a copy, not the caller's.
            lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
            log.info("zero-shot evaluation of %s on %s (%d-shot%s)", ", ".join(parse_tasks(tasks)), lm.device,
                     num_fewshot, f", limit {limit}" if limit is not None else "")
            out = simple_evaluate(lm, tasks=built, task_manager=manager, num_fewshot=num_fewshot, limit=limit,
                                  bootstrap_iters=1000, log_samples=False)
    finally:
        model.train(was_training)
    return summarize(out, num_fewshot=num_fewshot, limit=limit)


def summarize(out: dict, *, num_fewshot: int = 0, limit: Optional[float] = None) -> dict:
    """The report's view of ``simple_evaluate``'s output: top-level tasks/groups, acc, acc_norm, average."""
    results = out["results"]
    subtasks = out.get("group_subtasks", {})
    children = {c for kids in subtasks.values() for c in kids}
    rows = {}
    for name, entry in results.items():
        if name in children:
            continue
        row = {}
        for metric in METRICS:
            value = entry.get(f"{metric},none")
            if isinstance(value, (int, float)):
                row[metric] = float(value)
                se = entry.get(f"{metric}_stderr,none")
                row[f"{metric}_stderr"] = float(se) if isinstance(se, (int, float)) else None
        if "acc" not in row:
            log.warning("zero-shot task %s reports no acc (%s); left out of the average", name,
                        ", ".join(k for k in entry if "," in k and "stderr" not in k))
        row["samples"] = _samples(name, subtasks, out.get("n-samples", {}))
        rows[name] = row
    accs = [r["acc"] for r in rows.values() if "acc" in r]
    return {"tasks": rows, "average": sum(accs) / len(accs) if accs else math.nan,
            "num_fewshot": num_fewshot, "limit": limit}


def _samples(name: str, subtasks: dict, counts: dict) -> int:
    if name in subtasks:
        return sum(_samples(child, subtasks, counts) for child in subtasks[name])
    return int(counts.get(name, {}).get("effective", 0))


class _lm_eval_logging:
    """Drop lm-eval's warnings that do not apply here; everything but errors when not ``progress``."""

    _NOISE = ("`pretrained` model kwarg is not of type", "Passed an already-initialized model",
              "Custom kwargs can be passed to `--metadata`")
    _SOURCES = ("lm_eval.models.huggingface", "lm_eval.api.task", "lm_eval.evaluator")

    def __init__(self, progress: bool) -> None:
        self.logger = logging.getLogger("lm_eval")
        self.progress = progress

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("Overwriting default num_fewshot") and message.endswith(" from None to 0"):
            return False  # the zero-shot we asked for, not an override
        return not any(s in message for s in self._NOISE)

    def __enter__(self):
        self.level = self.logger.level
        if not self.progress:
            self.logger.setLevel(logging.ERROR)
        for name in self._SOURCES:
            logging.getLogger(name).addFilter(self)
        return self

    def __exit__(self, *exc) -> None:
        self.logger.setLevel(self.level)
        for name in self._SOURCES:
            logging.getLogger(name).removeFilter(self)
