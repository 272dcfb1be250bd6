"""Atomic writes: the one helper every file and folder the project writes goes through.

A write goes to a hidden temp name beside its destination (same file system, so the final ``os.replace`` is one
atomic rename): a crash, a kill or a full disk leaves either the old file or the new one, never half of one.
Temp names carry the writer's pid, so :func:`sweep_stale_temps` can remove what a killed process left behind
without touching a write that is still in progress.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

TEMP_MARK = ".tmp-"


def temp_sibling(final: str | Path) -> Path:
    """A hidden temp name beside ``final`` that carries this process's pid, so :func:`sweep_stale_temps` can tell
    a killed writer's leftovers from a write in progress. For staging folders that are not a plain replace."""
    final = Path(final)
    return final.with_name(f".{final.name}{TEMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


_temp_name = temp_sibling


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; when the block ends without an exception it replaces ``path``.

    On any exception (``OSError(ENOSPC)`` included) the temp file is removed and ``path`` is untouched.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(final)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def claim_new_path(path: str | Path) -> Path:
    """``path``, or else ``<stem>-2<suffix>``, ``-3``...: the first name nobody holds, claimed by creating it empty
    (``O_EXCL``), so two writers naming outputs alike at the same moment never overwrite each other. The caller
    fills it with an atomic write, and removes it if that write fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 1
    while True:
        candidate = path if n == 1 else path.with_name(f"{path.stem}-{n}{path.suffix}")
        try:
            os.close(os.open(candidate, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            return candidate
        except FileExistsError:
            n += 1


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield an empty temp folder beside ``final``; on success it replaces ``final`` (two renames).

    On any exception the temp folder is removed and the previous ``final`` (if any) is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(final)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    try:
        if final.exists():
            old = _temp_name(final.with_name(f"old-{final.name}"))
            final.rename(old)
        tmp.rename(final)
    except BaseException:
        # A rename can fail too (ENOSPC on a full directory block, EIO): put the previous folder back.
        if old is not None and not final.exists():
            old.rename(final)
            old = None
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None and old.exists() and final.exists():
            shutil.rmtree(old, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def sweep_stale_temps(directory: str | Path) -> list[Path]:
    """Remove temp files and folders in ``directory`` (not below) left by writers that are no longer running."""
    removed = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    for entry in directory.iterdir():
        name = entry.name
        if not name.startswith(".") or TEMP_MARK not in name:
            continue
        pid_text = name.rsplit(TEMP_MARK, 1)[1].split("-", 1)[0]
        if not pid_text.isdigit() or _pid_alive(int(pid_text)):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed
