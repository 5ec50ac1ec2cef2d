"""Atomic file writes: every file stylelora writes goes to a temporary name first, then is renamed.

A crash, a kill or a full disk therefore never leaves a half-written file under its final name.
The final file or folder gets the mode a plain ``open()`` or ``mkdir()`` would give it under the
process's umask (``mkstemp``/``mkdtemp`` make them private, 0600/0700, which other users, such as an
AUTOMATIC1111 in Docker, could not read).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from .errors import ConfigError, DiskFullError

NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
# pickled checkpoints can run code when loaded: stylelora never opens a user's file with these suffixes
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}
_umask_lock = threading.Lock()


def umask() -> int:
    """The process's umask, read without changing it where Linux tells it (/proc), else set and put back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def foreign_path(path: str) -> str | None:
    """What makes ``path`` a path written on Windows (a drive letter, backslashes, a network share), which this
    system would take for a relative name and create in the current folder (a folder called ``E:``); None for
    a path of this system. On Windows every such path is its own, so there it is always None."""
    if os.name == "nt":
        return None
    text = str(path).strip()
    if text.startswith("\\\\"):
        return "a Windows network share (UNC path)"
    if re.match(r"^[A-Za-z]:", text):
        return f"a Windows path (drive {text[:2]})"
    if "\\" in text:
        return "a Windows path (backslashes)"
    return None


def foreign_path_problem(path: str) -> str | None:
    """Why ``path`` cannot be used here when it was written on another system and names nothing on this one
    (``'E:\\x' is a Windows path (drive E:) from another machine, ...``); None for a path of this system."""
    why = foreign_path(path)
    if why is None or Path(path).exists():
        return None
    return f"'{path}' is {why} from another machine, which this system would take for a name in the current folder"


def file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0o666 less the umask."""
    return 0o666 & ~umask()


def folder_mode() -> int:
    """The mode ``mkdir`` gives a new folder: 0o777 less the umask."""
    return 0o777 & ~umask()


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
        # what open() would have made, not mkstemp's 0600 (set after writing: some writers recreate the file)
        os.chmod(tmp, file_mode())
        os.replace(tmp, final)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno in NO_SPACE:
            raise DiskFullError(_disk_full_message(final)) from e
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_user_text(path: str | os.PathLike[str], what: str) -> str:
    """The text of a file the user gave (a config, a prompt list), without the byte-order mark Windows editors
    add. A missing or unreadable file is a ConfigError naming it and saying what it is."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: {what} not found")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read the {what} ({e})") from None
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):  # Notepad's "Unicode" is UTF-16 with a byte-order mark
        try:
            return raw.decode("utf-16")
        except UnicodeDecodeError:
            raise ConfigError(f"{p}: the {what} starts with a UTF-16 mark but is not UTF-16; "
                              "save it as UTF-8") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{p}: the {what} is not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); save it as UTF-8"
        ) from None


def write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _plain_modes(folder: Path) -> None:
    """Give everything under ``folder`` the modes open()/mkdir() would: some writers (safetensors) make
    their files private."""
    files, folders = file_mode(), folder_mode()
    os.chmod(folder, folders)
    for path in folder.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, folders if path.is_dir() else files)


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
        _plain_modes(tmp)
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
