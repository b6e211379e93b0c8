"""Files on disk that are either the old version or the whole new one, and log appends that
never interleave: the only two ways fedrec writes a file it must not corrupt.

Owns: :func:`strict_json` (JSON every parser reads: no bare ``NaN``/``Infinity``),
:func:`out_dir_problem` (whether a command's ``--out`` folder can be written, checked first),
:func:`atomic_write_bytes` / :func:`atomic_write_text` (temporary file in the same folder,
fsync, ``os.replace``, fsync of the folder), :func:`atomic_dir` (a whole folder, renamed into
place) and :func:`locked_append` (an exclusive ``flock`` around "read the tail, append one line,
fsync", so that two writers of one hash-chained log cannot fork it), and :func:`held_lock` (an
exclusive ``flock`` held for a whole process's work, refused at once while another holds it).

Must not: import anything of fedrec's.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def finite(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float (in dicts, lists and tuples) replaced by None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj


def strict_json(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` that writes strict JSON: NaN and ±∞ become ``null`` (a reader of an ε
    takes null as "no guarantee", ∞), never the bare ``NaN``/``Infinity`` many parsers refuse."""
    return json.dumps(finite(obj), allow_nan=False, **kwargs)


def out_dir_problem(out: Path) -> str | None:
    """Why ``out`` cannot be, or be created as, a folder this process writes files in; None if
    it can. Checked by writing (and removing) a temporary file in it or in its nearest existing
    parent, which also catches a read-only file system (and root, whom permissions never stop).
    Commands call it before any work and raise their own error with the message."""
    if out.exists() and not out.is_dir():
        return f"--out {out} is a file, not a folder. Fix: give a folder."
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return f"--out {out}: cannot be created, {probe} is a file. Fix: give a folder whose parent is a folder."
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        where = "" if probe == out else f" (its nearest existing parent {probe} is not)"
        return (
            f"--out {out}: not writable{where}: {exc.strerror or exc}. Fix: give a folder you "
            "can write to, or fix its permissions."
        )
    return None


def _umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no other way to read it; restored at once
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a part.

    Writes a temporary file in the same folder, fsyncs it, renames it over ``path`` with
    ``os.replace`` and fsyncs the folder. Keeps the mode of an existing file (else 0666 & ~umask).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path | str, text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _fsync_tree(root: Path) -> None:
    for folder, _dirs, names in os.walk(root):
        for name in names:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


@contextlib.contextmanager
def atomic_dir(final_dir: Path | str) -> Iterator[Path]:
    """Build a folder under a temporary sibling name, then rename it to ``final_dir``.

    On success every file is fsynced and the folder renamed into place, replacing an existing
    ``final_dir`` (moved aside, then deleted). On an exception the temporary folder is removed and
    an existing ``final_dir`` is left untouched. Replacing takes two renames: for an instant in
    between, ``final_dir`` does not exist. A process killed mid-way leaves a hidden
    ``.<name>.tmp-*`` sibling behind, never a half-written ``final_dir``.

    Raises:
        NotADirectoryError: ``final_dir`` exists and is not a folder (it is not replaced).
    """
    final = Path(final_dir)
    if final.exists() and not final.is_dir():
        raise NotADirectoryError(f"{final} exists and is not a folder; refusing to replace it.")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        os.chmod(tmp, 0o777 & ~_umask())
        old = None
        if final.exists():
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:12]}"
            os.replace(final, old)
        try:
            os.replace(tmp, final)
        except BaseException:
            if old is not None:
                os.replace(old, final)
            raise
        _fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def locked(path: Path | str) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``<path>.lock`` (created if absent) for the block.

    Every writer of ``path`` that goes through this lock is serialised, across threads and
    processes on one machine.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


class LockHeld(BlockingIOError):
    """:func:`held_lock` found the lock taken; ``holder`` is what its holder wrote in the file
    (empty if it had not written yet)."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"{path} is locked by {holder or 'a process that is starting'}")
        self.path, self.holder = path, holder


@contextlib.contextmanager
def held_lock(path: Path | str, note: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if absent) for the block, without
    waiting, and write ``note`` (who holds it) into the file.

    The kernel releases a ``flock`` when its holder's last descriptor closes, so a process that
    died (SIGKILL, a crash) leaves a file with its note but no lock. The note is written in
    place, not by rename: a renamed-in file would be a new inode, and a second process could
    lock that one while the first still held the old. For the same reason the file is never
    removed.

    Raises:
        LockHeld: another open file description holds the lock (another process, or another
            ``held_lock`` in this one).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
            raise LockHeld(path, holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, (note.strip() + "\n").encode("utf-8"), 0)
        os.fsync(fd)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def locked_append(path: Path | str, make_line: Callable[[], str]) -> str:
    """Append ``make_line()`` + newline to ``path`` under :func:`locked`, flushed and fsynced.

    ``make_line`` runs inside the lock, so a line that depends on the file's current tail (a
    hash chain's ``prev``) sees the tail it is appended to. Returns the line written.
    """
    path = Path(path)
    with locked(path):
        line = make_line()
        if "\n" in line:
            raise ValueError("locked_append writes one line; the text contains a newline")
        with path.open("a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(path.parent)
    return line
