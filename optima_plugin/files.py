"""Writing files without losing data: atomic writes and output-path checks.

Every file the tool writes (report, plot, layer ratios) goes to a temporary
sibling first and is renamed into place, so a crash or Ctrl-C never leaves a
half-written file, and an existing file is replaced in one step. Output paths
are checked before any expensive work (:func:`check_output_file`,
:func:`check_save_target`).

A saved model directory holds :data:`SAVE_MARKER`, which lists what the tool
wrote there: ``--overwrite`` replaces only such a directory, and deletes only
the entries that marker lists (never what the tool did not create).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

TOOL = "optima-prune"
SAVE_MARKER = ".optima_saved.json"
"""File written into every model directory the tool saves (tool, version, time, entries written)."""


def _short(name: str) -> str:
    """``name`` cut so that a temporary name built from it stays under the 255-byte limit."""
    return name[:80]


def _default_mode() -> int:
    """Permission bits a new file gets here (``0o666`` less the umask); mkstemp's are ``0o600``."""
    mask = os.umask(0o022)  # reading the umask means setting it: restore it at once
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``.

    The temporary name ends with ``path``'s suffix (``.report.json.x1y2.tmp.json``), so
    writers that look at the extension still see the right one. Parent folders are
    created; a symlink at ``path`` is written through (the link stays). The file gets
    the existing file's permissions, or the umask's. On an exception the temporary
    file is removed and ``path`` is left as it was.
    """
    target = Path(path)
    if target.is_symlink():
        target = target.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{_short(target.name)}.", suffix=".tmp" + target.suffix,
                               dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        mode = target.stat().st_mode & 0o7777 if target.exists() else _default_mode()
        os.chmod(tmp, mode)
        with open(tmp, "rb") as f:  # on disk before the rename: a crash leaves old or new, not empty
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def json_ready(value: Any) -> Any:
    """``value`` with non-finite floats replaced by None (standard JSON has no NaN/Infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as standard JSON (NaN/Inf become null) to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(json_ready(data), indent=1, allow_nan=False))


def _nearest_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _probe_writable(folder: Path) -> str | None:
    """None if a file can be created in ``folder``, else why not.

    ``os.access`` is not enough: as root it says yes everywhere, and some file
    systems (/proc, /sys) pass it but refuse new files. So create one and remove it.
    """
    if not folder.is_dir():
        return "not a folder"
    if not os.access(folder, os.W_OK | os.X_OK):
        return "not writable"
    try:
        fd, probe = tempfile.mkstemp(prefix=".optima-probe.", dir=folder)
    except OSError as e:
        return e.strerror or str(e)
    os.close(fd)
    os.unlink(probe)
    return None


def check_output_file(path: str | os.PathLike, flag: str) -> None:
    """``ValueError`` naming ``flag`` unless a file can be written at ``path``.

    The nearest existing ancestor must be a writable directory (missing parent
    folders are created at write time); ``path`` itself must not be a directory.
    """
    target = Path(path)
    if str(path) == "" or target.is_dir():
        raise ValueError(f"{flag} {str(path)!r}: expected a file name, got a directory")
    parent = _nearest_existing(target.parent)
    why = _probe_writable(parent)
    if why:
        raise ValueError(f"{flag} {path}: cannot create files in {parent} ({why}); choose another location")
    if target.exists() and not os.access(target, os.W_OK):
        raise ValueError(f"{flag} {path}: the file exists and is not writable")


# --- model directories -------------------------------------------------------------------------


def resolve_dir(directory: str | os.PathLike) -> Path:
    """``directory`` as an absolute path with ``~``, ``.``, ``..`` and symlinks resolved."""
    return Path(directory).expanduser().resolve()


def _is_within(path: Path, other: Path) -> bool:
    """True if resolved ``path`` is ``other`` or one of its parents (deleting it would delete ``other``)."""
    return path == other or path in other.parents


def read_save_marker(directory: str | os.PathLike) -> dict | None:
    """The :data:`SAVE_MARKER` of ``directory`` if it is a valid one written by this tool, else None."""
    marker = Path(directory) / SAVE_MARKER
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not (isinstance(data, dict) and data.get("tool") == TOOL and isinstance(data.get("files"), list)):
        return None
    return data


def _foreign_entries(directory: Path) -> list[str]:
    """Entries of ``directory`` that its marker does not list (all of them when it has no marker)."""
    marker = read_save_marker(directory)
    ours = set(marker["files"]) | {SAVE_MARKER} if marker else set()
    return sorted(e.name for e in directory.iterdir() if e.name not in ours)


def write_save_marker(directory: str | os.PathLike) -> Path:
    """Write :data:`SAVE_MARKER` into ``directory``, listing the entries it holds now; return its path."""
    from . import __version__  # at call time: the package imports this module while it initialises

    folder = Path(directory)
    files = sorted(e.name for e in folder.iterdir() if e.name != SAVE_MARKER)
    data = {"tool": TOOL, "version": __version__,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files}
    return write_json(folder / SAVE_MARKER, data)


def remove_saved_directory(directory: str | os.PathLike) -> list[str]:
    """Delete what the tool wrote in ``directory`` (per its marker), then the folder if now empty.

    Nothing the marker does not list is touched. Returns the names left behind
    (empty when the folder itself was removed).
    """
    folder = Path(directory)
    marker = read_save_marker(folder)
    for name in (marker["files"] if marker else []):
        entry = folder / name
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        elif entry.exists() or entry.is_symlink():
            entry.unlink()
    if marker:
        (folder / SAVE_MARKER).unlink()
    left = sorted(e.name for e in folder.iterdir())
    if not left:
        folder.rmdir()
    return left


def check_save_target(directory: str, *, overwrite: bool, protected: Sequence[str] = ()) -> None:
    """``ValueError`` (``FileExistsError`` for a non-empty folder without ``overwrite``), naming ``--save_model``,
    unless a model can be saved into ``directory``.

    Call it before any work. Refused: the current directory, home, the filesystem
    root, a path in ``protected`` (the ``--model`` directory) or a parent of any of
    them; a path that is not a directory or is a mount point; a non-empty directory
    without ``overwrite``; with ``overwrite``, a non-empty directory this tool did not
    save (no :data:`SAVE_MARKER`) or that holds entries the marker does not list;
    a location where nothing can be created. An empty existing directory is fine.
    """
    flag = f"--save_model {directory}"
    target = resolve_dir(directory)
    other = "choose a new folder, e.g. a subfolder of it"
    if target == target.parent:
        raise ValueError(f"{flag} is the filesystem root; {other}")
    if _is_within(target, Path.cwd().resolve()):
        raise ValueError(f"{flag} is the current directory or one of its parents; {other}")
    try:
        home = Path.home().resolve()
    except (RuntimeError, KeyError):  # no HOME and no passwd entry
        home = None
    if home is not None and _is_within(target, home):
        raise ValueError(f"{flag} is the home directory or one of its parents; {other}")
    for path in protected:
        kept = resolve_dir(path)
        if kept.exists() and _is_within(target, kept):
            raise ValueError(f"{flag} would replace the model directory {path} (or a folder holding it); "
                             f"{other}")
    if target.exists():
        if not target.is_dir():
            raise ValueError(f"{flag} exists and is not a directory; choose a folder name")
        if target.is_mount():
            raise ValueError(f"{flag} is a mount point and cannot be replaced; {other}")
        if any(target.iterdir()):
            if not overwrite:
                raise FileExistsError(f"{flag} exists and is not empty; pass --overwrite to replace it")
            if read_save_marker(target) is None:
                raise ValueError(f"{flag}: --overwrite only replaces a folder optima-prune saved (it holds "
                                 f"{SAVE_MARKER}); remove it yourself or choose another")
            foreign = _foreign_entries(target)
            if foreign:
                raise ValueError(f"{flag} holds files optima-prune did not write ({', '.join(foreign[:3])}); "
                                 "move them out or choose another folder")
    parent = _nearest_existing(target.parent)
    why = _probe_writable(parent)
    if why:
        raise ValueError(f"{flag}: cannot create folders in {parent} ({why}); choose another location")
