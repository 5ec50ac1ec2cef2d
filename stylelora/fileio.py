"""Atomic file writes: every file stylelora writes goes to a temporary name first, then is renamed.

A crash, a kill or a full disk therefore never leaves a half-written file under its final name.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import DiskFullError

NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


def _disk_full_message(path: Path) -> str:
    return (
        f"{path}: the disk is full; nothing was written under this name and the previous file "
        "(if any) is intact. Free some space and save again."
    )


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is fsynced and renamed onto ``path``."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno in NO_SPACE:
            raise DiskFullError(_disk_full_message(final)) from e
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``path`` as a whole (used for checkpoints)."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    old = final.with_name(f".{final.name}.old")
    moved_old = False
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            moved_old = True
        os.replace(tmp, final)
        if moved_old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if moved_old and not final.exists():
            os.replace(old, final)  # put the previous folder back
        if isinstance(e, OSError) and e.errno in NO_SPACE:
            raise DiskFullError(_disk_full_message(final)) from e
        raise
