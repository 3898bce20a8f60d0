"""Writing files without losing data: atomic writes and output-path checks.

Every file the tool writes (report, plot, layer ratios) goes to a temporary
sibling first and is renamed into place, so a crash or Ctrl-C never leaves a
half-written file, and an existing file is replaced in one step; a device, FIFO,
socket or a link into ``/proc`` (``/dev/stdout``) is never replaced. Output paths
are checked before any expensive work (:func:`check_output_file`,
:func:`check_save_target`, :func:`check_distinct`).

A saved model directory holds :data:`SAVE_MARKER`, which lists what the tool
wrote there: ``--overwrite`` replaces only such a directory, and deletes only
the entries that marker lists, and of those only plain names of regular files
(or of real subfolders holding only such files) directly inside it: never what
the tool did not create. What a killed save left beside its target is cleaned
up, or put back, by the next save to that target (:func:`recover_interrupted_save`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import stat
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from .version import __version__

try:
    import fcntl
except ImportError:  # not POSIX: no locks, leftovers are still cleaned
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

TOOL = "optima-prune"
SAVE_MARKER = ".optima_saved.json"
"""File written into every model directory the tool saves (tool, version, time, entries written)."""


def _short(name: str) -> str:
    """``name`` cut so that a temporary name built from it stays under the 255-byte limit."""
    return name[:80]


def default_mode(base: int = 0o666) -> int:
    """Permission bits a new file (``base`` 0o666; a folder: 0o777) gets here, less the umask; mkstemp's
    are ``0o600``, mkdtemp's ``0o700``."""
    mask = os.umask(0o022)  # reading the umask means setting it: restore it at once
    os.umask(mask)
    return base & ~mask


_PROC = Path("/proc")
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"))


def special_target(path: str | os.PathLike) -> Optional[str]:
    """Why ``path`` must not be replaced by a renamed file, or None (a regular file, or nothing there yet).

    Refused: ``path`` is, or links to, a directory, device, FIFO or socket; or it is in, or links
    into, ``/proc`` (``/dev/stdout``, ``/dev/fd/N``: an open file of a process, which a rename would
    replace by a new file, e.g. the log that stdout is redirected to).
    """
    hop = Path(path).expanduser().absolute()
    for _ in range(40):  # the kernel's own limit on links followed
        if hop.name in ("", ".", ".."):
            break
        parent = Path(os.path.realpath(hop.parent))
        hop = parent / hop.name
        if parent == _PROC or _PROC in parent.parents:
            return "a file of /proc (such as /dev/stdout: an open file of a process)"
        if not hop.is_symlink():
            break
        hop = parent / os.readlink(hop)  # an absolute link replaces parent
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None  # nothing there yet (or a dangling link: its target is created)
    return next((kind for test, kind in _KINDS if test(mode)), None if stat.S_ISREG(mode) else "not a regular file")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``.

    The temporary name ends with ``path``'s suffix (``.report.json.x1y2.tmp.json``), so
    writers that look at the extension still see the right one. Parent folders are
    created; a symlink at ``path`` is written through (the link stays). The file gets
    the existing file's permissions, or the umask's. On an exception the temporary
    file is removed and ``path`` is left as it was. ``ValueError`` when ``path`` is not a
    regular file (:func:`special_target`): a device, FIFO or socket is never renamed over.
    """
    why = special_target(path)
    if why:
        raise ValueError(f"{path} is {why}: not replaced; write to a regular file")
    target = Path(path)
    if target.is_symlink():
        target = target.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{_short(target.name)}.", suffix=".tmp" + target.suffix,
                               dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        mode = target.stat().st_mode & 0o7777 if target.exists() else default_mode()
        os.chmod(tmp, mode)
        with open(tmp, "rb") as f:  # on disk before the rename: a crash leaves old or new, not empty
            os.fsync(f.fileno())
        if target.exists() and not stat.S_ISREG(os.lstat(target).st_mode):  # appeared while writing
            raise ValueError(f"{path} is {special_target(target) or 'not a regular file'}: not replaced")
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
    folders are created at write time); ``path`` itself must not be a directory, nor
    a device, FIFO, socket or link into ``/proc`` such as ``/dev/stdout`` (the tool
    writes a new file and renames it into place: see :func:`special_target`).
    """
    target = Path(path)
    if str(path) == "" or target.is_dir():
        raise ValueError(f"{flag} {str(path)!r}: expected a file name, got a directory")
    parent = _nearest_existing(target.parent)
    why = _probe_writable(parent)
    if why:
        raise ValueError(f"{flag} {path}: cannot create files in {parent} ({why}); choose another location")
    why = special_target(target)
    if why:
        raise ValueError(f"{flag} {path} is {why}, which the tool would replace by a new file; "
                         "give a regular file name")
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
    if not (isinstance(data, dict) and data.get("tool") == TOOL and isinstance(data.get("files"), list)
            and all(isinstance(name, str) for name in data["files"])):
        return None
    return data


def _foreign_entries(directory: Path) -> list[str]:
    """Entries of ``directory`` that its marker does not list (all of them when it has no marker)."""
    marker = read_save_marker(directory)
    ours = set(marker["files"]) | {SAVE_MARKER} if marker else set()
    return sorted(e.name for e in directory.iterdir() if e.name not in ours)


def _plain_name(name: str) -> bool:
    """Whether ``name`` names an entry directly inside a folder (no separator, not ``.``/``..``, not empty)."""
    return (name not in ("", ".", "..") and "/" not in name and "\0" not in name
            and (os.altsep is None or os.altsep not in name))


def _tool_tree(folder: Path) -> bool:
    """Whether ``folder`` is a real folder (no link, no mount point) holding only regular files and such
    folders: what the tool writes, and what ``rmtree`` removes without leaving it."""
    try:
        if not stat.S_ISDIR(os.lstat(folder).st_mode) or folder.is_mount():
            return False
        for entry in os.scandir(folder):
            mode = entry.stat(follow_symlinks=False).st_mode
            if not (stat.S_ISREG(mode) or (stat.S_ISDIR(mode) and _tool_tree(Path(entry.path)))):
                return False
    except OSError:
        return False
    return True


def _removable(folder: Path, name: str) -> bool:
    """Whether the marker entry ``name`` may be deleted from ``folder``: a plain name of a regular file
    directly in it, or of a subfolder of regular files (:func:`_tool_tree`)."""
    if not _plain_name(name) or name == SAVE_MARKER:
        return False
    entry = folder / name
    try:
        mode = os.lstat(entry).st_mode
    except OSError:
        return False
    return stat.S_ISREG(mode) or _tool_tree(entry)


def unsafe_marker_entries(directory: str | os.PathLike) -> list[str]:
    """Names the :data:`SAVE_MARKER` of ``directory`` lists that ``--overwrite`` must not delete: not a
    plain name (``../x``, ``/abs/path``), or not a regular file or a subfolder of regular files inside
    it (a link, a device, a mount point). Listed names that do not exist are ignored (nothing to delete)."""
    folder = Path(directory)
    marker = read_save_marker(folder)
    bad = []
    for name in (marker["files"] if marker else []):
        if name == SAVE_MARKER:
            continue
        if not _plain_name(name) or (os.path.lexists(folder / name) and not _removable(folder, name)):
            bad.append(name)
    return bad


def write_save_marker(directory: str | os.PathLike) -> Path:
    """Write :data:`SAVE_MARKER` into ``directory``, listing the entries it holds now; return its path."""
    folder = Path(directory)
    files = sorted(e.name for e in folder.iterdir() if e.name != SAVE_MARKER)
    data = {"tool": TOOL, "version": __version__,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files}
    return write_json(folder / SAVE_MARKER, data)


def remove_saved_directory(directory: str | os.PathLike) -> list[str]:
    """Delete what the tool wrote in ``directory`` (per its marker), then the folder if now empty.

    Nothing the marker does not list is touched, nor what it lists but may not be deleted
    (:func:`unsafe_marker_entries`: only plain names of regular files, or subfolders of them,
    directly in ``directory``). Returns the names left behind (empty when the folder itself was removed).
    """
    folder = Path(directory)
    marker = read_save_marker(folder)
    for name in (marker["files"] if marker else []):
        if not _removable(folder, name):
            continue
        entry = folder / name
        if stat.S_ISDIR(os.lstat(entry).st_mode):
            shutil.rmtree(entry)
        else:
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
    save (no :data:`SAVE_MARKER`), that holds entries the marker does not list, or whose
    marker lists a name it may not delete (:func:`unsafe_marker_entries`); a location where
    nothing can be created. An empty existing directory is fine.
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
            unsafe = unsafe_marker_entries(target)
            if unsafe:
                raise ValueError(f"{flag}: its {SAVE_MARKER} lists {unsafe[0]!r}, which is not a file optima-prune "
                                 "wrote directly inside it; --overwrite deletes nothing on its word: remove the "
                                 "folder yourself or choose another")
    parent = _nearest_existing(target.parent)
    why = _probe_writable(parent)
    if why:
        raise ValueError(f"{flag}: cannot create folders in {parent} ({why}); choose another location")


# --- outputs distinct from inputs and from each other ----------------------------------------------


def _same(a: str, b: str) -> bool:
    """Whether existing ``a`` and ``b`` are one file (symlinks followed; hard links: same device and inode)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _relation(a: str, b: str) -> Optional[str]:
    """How path ``a`` overlaps path ``b`` ("is", "is inside", "holds"), or None when they are apart."""
    ra, rb = resolve_dir(a), resolve_dir(b)
    if ra == rb or _same(a, b):
        return "is"
    if rb in ra.parents:
        return "is inside"
    if ra in rb.parents:
        return "holds"
    return None


def check_distinct(outputs: Sequence[tuple[str, str]], inputs: Sequence[tuple[str, str]]) -> None:
    """``ValueError`` naming both flags when an output overlaps an input or another output.

    ``outputs`` and ``inputs`` are ``(flag, path)`` pairs (``inputs``: existing files and folders
    the run reads). An output may not be, be inside or hold an input (a report in the model folder
    replaces its files; one in a text folder is read as text by the next run), nor another output
    (a report inside ``--save_model`` is deleted when that folder is replaced). Symlinks are resolved
    and hard links compared by device and inode.
    """
    for i, (flag, path) in enumerate(outputs):
        for other, other_path in inputs:
            how = _relation(path, other_path)
            if how:
                raise ValueError(f"{flag} {path} {how} {other} {other_path}, which the run reads; "
                                 f"write {flag} elsewhere")
        for other, other_path in outputs[i + 1:]:
            how = _relation(path, other_path)
            if how:
                raise ValueError(f"{flag} {path} {how} {other} {other_path}, another output of the run; "
                                 "give each output its own path")


# --- what a killed save left beside its target -----------------------------------------------------


def staging_prefix(target: Path) -> str:
    """The name prefix of the hidden folders a save to ``target`` makes beside it (``.NAME.optima-``)."""
    return f".{target.name[:80]}.optima-"


LEFTOVER_WAIT_S = 5.0
"""How long :func:`recover_interrupted_save` waits for a locked leftover (another rank recovering it
takes milliseconds; a live save of another run holds it for minutes and is then left alone)."""


@contextmanager
def hold_folder(folder: Path, *, timeout: Optional[float] = None) -> Iterator[bool]:
    """Hold an exclusive lock on ``folder`` (``flock`` on the folder itself); yield whether it was got.

    A save holds the lock on its staging folders while it lives, so :func:`recover_interrupted_save`
    of another process leaves them alone; the lock goes with the process when it is killed.
    ``timeout``: seconds to wait for a folder locked elsewhere (None: as long as it takes), then
    yield False. A folder that is gone yields False.
    """
    if fcntl is None:
        yield True
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        yield False
        return
    try:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if deadline is None else fcntl.LOCK_NB))
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    yield False
                    return
                time.sleep(0.05)
        yield True
    finally:
        os.close(fd)  # releases the lock


def recover_interrupted_save(directory: str | os.PathLike) -> None:
    """Clean up, or put back, what a killed save to ``directory`` left beside it.

    A save (:func:`~optima_plugin.loading.install_directory`) writes ``.NAME.optima-new.XXXXXXXX`` and,
    when replacing, moves the old folder to ``.NAME.optima-old.XXXXXXXX/old``. Only folders of exactly
    that name for this target, not locked by a live save (:data:`LEFTOVER_WAIT_S`), and whose content
    is the tool's are touched: a ``new`` folder of regular files is removed; an ``old`` one is put back
    at ``directory`` when that is missing (killed between the two renames), else its saved model is
    removed per its marker.
    Anything else is left, with a warning. Targets of over 80 characters share their prefix with
    others and are skipped.
    """
    target = resolve_dir(directory)
    if len(target.name) > 80 or not target.parent.is_dir():
        return
    pattern = re.compile(re.escape(staging_prefix(target)) + r"(new|old)\.[a-z0-9_]{8}")
    try:
        names = sorted(e.name for e in target.parent.iterdir())
    except OSError:
        return
    for name in names:
        match = pattern.fullmatch(name)
        folder = target.parent / name
        if match is None or folder.is_symlink() or not folder.is_dir():
            continue
        with hold_folder(folder, timeout=LEFTOVER_WAIT_S) as held:
            if not held or not folder.is_dir():  # a live save's, or gone meanwhile
                continue
            try:
                if match.group(1) == "new":
                    _remove_new(folder)
                else:
                    _recover_old(folder, target)
            except OSError as e:
                log.warning("could not clean up %s, left by an interrupted save: %s", folder, e)


def _remove_new(folder: Path) -> None:
    """Remove an interrupted save's half-written ``new`` folder (only if it holds regular files alone)."""
    if not _tool_tree(folder):
        log.warning("kept %s: it looks like an interrupted save's but holds more than files", folder)
        return
    shutil.rmtree(folder)
    log.info("removed %s, left by an interrupted save", folder)


def _recover_old(aside: Path, target: Path) -> None:
    """Put an interrupted save's moved-aside ``aside/old`` back at a missing ``target``, or remove it."""
    entries = [e.name for e in aside.iterdir()]
    old = aside / "old"
    if entries not in ([], ["old"]) or (entries and (old.is_symlink() or not old.is_dir())):
        log.warning("kept %s: it looks like an interrupted save's but holds more than the old folder", aside)
        return
    if entries and not os.path.lexists(target):
        os.rename(old, target)
        log.warning("put the previous %s back: a save to it was interrupted", target)
    elif entries:
        if not any(old.iterdir()):
            old.rmdir()
        elif read_save_marker(old) is None:
            log.warning("kept %s: it holds files optima-prune did not write", old)
            return
        else:
            left = remove_saved_directory(old)
            if left:
                log.warning("kept %s: it holds files optima-prune did not write (%s)", old, ", ".join(left[:3]))
                return
        log.info("removed the model a save to %s replaced before it was interrupted", target)
    aside.rmdir()


def safetensors_header(path: str | os.PathLike) -> tuple[int, dict]:
    """``(offset of the data, {name: {"dtype", "shape", "data_offsets"}})`` of a safetensors file, read with
    plain file reads (no memory map: nothing of the file stays resident in the process)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return 8 + size, header
