"""One run at a time per checkpoint folder and per ``--save_model`` folder.

A run holds an exclusive ``flock`` on a lock file beside each folder it writes,
``.<name>.optima-lock`` in the folder's parent, from before the model loads to its end
(the default checkpoint's removal included). A second run on the same folder refuses at
once, naming the holder's PID (the lock file records it). The lock file is the tool's own:
its holder removes it on release; one left by a killed run holds no lock (the kernel
drops a dead process's ``flock``) and is simply taken over. Under torchrun each rank
takes its own lock file (rank ``r`` > 0: ``.<name>.optima-lock.rank00r``), since the
ranks of one job share the folders; a second job's ranks collide with the first's.
Within one process the locks are re-entrant (the CLI takes them before loading the
model, :func:`optima_plugin.api.prune` again).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator, Optional

try:
    import fcntl
except ImportError:  # not POSIX: no locking
    fcntl = None  # type: ignore[assignment]

LOCK_SUFFIX = ".optima-lock"

#: lock files held by this process: path -> [file descriptor, nesting count]
_held: dict[str, list[int]] = {}


class RunLocked(BlockingIOError):
    """Another run holds a folder this run would write; the message names its PID and what to do."""


def lock_path(folder: str | os.PathLike, rank: Optional[int] = None) -> Path:
    """The lock file of ``folder``: ``.<name>.optima-lock`` beside it (rank ``r`` > 0: ``...rank00r``)."""
    target = Path(folder).expanduser().resolve()
    name = target.name
    if len(name) > 80:  # keep the name under the 255-byte limit, distinct for distinct folders
        name = f"{name[:80]}.{hashlib.sha1(target.name.encode()).hexdigest()[:8]}"
    return target.parent / f".{name}{LOCK_SUFFIX}{f'.rank{rank:03d}' if rank else ''}"


def _holder(fd: int) -> str:
    """Who holds the lock, as its file records it."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode())
        return f"PID {int(info['pid'])} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "PID unknown"


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _acquire(path: Path, flag: str, folder: str) -> None:
    key = str(path)
    if key in _held:
        _held[key][1] += 1
        return
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as e:
            raise ValueError(f"{flag} {folder}: cannot create its lock file {path} ({e.strerror or e}); "
                             "choose a folder in a writable location") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise RunLocked(f"{flag} {folder} is in use by another optima-prune run ({holder}; lock file {path}): "
                            "wait until it ends, or choose another folder") from None
        if _same_file(fd, path):
            break
        os.close(fd)  # the holder before us removed the file after we opened it: lock the one there now
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode(), 0)
    _held[key] = [fd, 1]


def _release(path: Path) -> None:
    key = str(path)
    entry = _held[key]
    entry[1] -= 1
    if entry[1]:
        return
    del _held[key]
    try:
        if _same_file(entry[0], path):
            os.unlink(path)  # ours: removed while still locked, so no one else is holding it now
    except OSError:
        pass
    finally:
        os.close(entry[0])


@contextmanager
def locked(folder: str, flag: str, rank: Optional[int] = None) -> Iterator[None]:
    """Hold ``folder``'s lock (``flag`` names it in the error) while active; :class:`RunLocked` when another
    run holds it."""
    if fcntl is None:
        yield
        return
    path = lock_path(folder, rank)
    _acquire(path, flag, folder)
    try:
        yield
    finally:
        _release(path)


@contextmanager
def exclusive_run(config, rank: Optional[int] = None) -> Iterator[None]:
    """Hold the folders ``config`` writes (checkpoint, ``--save_model``) while active, then check that the
    checkpoint's files are complete (with the lock held, so no other run is writing them).

    ``rank``: this process's torchrun rank (None for a single process).
    """
    from .checkpoint import check_checkpoint_files

    with ExitStack() as stack:
        for flag, folder in (("--checkpoint_dir", config.checkpoint_dir), ("--save_model", config.save_model)):
            if folder:
                stack.enter_context(locked(str(folder), flag, rank))
        if config.checkpoint_dir:
            check_checkpoint_files(config.checkpoint_dir)
        yield
