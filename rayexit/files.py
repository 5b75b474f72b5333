"""Writes that never leave a half-written file: a temporary sibling, then an atomic rename.

`tempfile.mkstemp` / `mkdtemp` create 0600 files and 0700 folders; renamed into place as they
are, a model directory on shared storage would be unreadable to everyone but its writer. What
lands in place gets the modes a plain `open` / `mkdir` would give (0644 / 0755 under the usual
umask 022).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rayexit.errors import RayexitError


def _umask() -> int:
    try:  # Linux says it without changing it; os.umask can only read it by setting it (process-wide)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def shareable(path: str | Path) -> Path:
    """Give a temp-made file or folder the mode an ordinary one would have (0644 / 0755 under umask 022)."""
    path = Path(path)
    mode = 0o777 if path.is_dir() else 0o666
    os.chmod(path, mode & ~_umask())
    return path


def share_tree(path: str | Path) -> Path:
    """`shareable` for a folder and everything in it (some writers, safetensors among them, create 0600 files)."""
    path = Path(path)
    for root, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            shareable(Path(root) / name)
    return shareable(path)


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)` and move the result to `path` only if it succeeded."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(handle)
    try:
        write(Path(tmp))
        if Path(tmp).exists():  # a writer may replace the file; whatever is there gets the plain mode
            shareable(tmp)
        os.replace(tmp, path)
    except IsADirectoryError:
        Path(tmp).unlink(missing_ok=True)
        raise RayexitError(f"{path}: is a folder; expected a file name to write") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, data: Any) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


@contextmanager
def staging_dir(target: str | Path) -> Iterator[Path]:
    """A fresh sibling folder to build `target` in; removed if the block fails or never renames it."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def replace_dir(staging: Path, target: Path) -> None:
    """Put the finished `staging` folder at `target`, replacing what was there.

    On Linux the two folders swap in one step, so a reader (a server reloading, a second job)
    sees the old folder or the new one, never none; elsewhere, or on a filesystem that cannot
    swap, the old folder is renamed aside first, which leaves a moment with nothing at `target`.
    """
    share_tree(staging)  # readable by other users on shared storage (mkdtemp and safetensors make 0700/0600)
    if target.is_dir() and exchange_paths(staging, target):
        shutil.rmtree(staging, ignore_errors=True)  # now holds the old folder
    elif target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(target)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def exchange_paths(first: Path, second: Path) -> bool:
    """Swap two existing paths atomically (Linux `renameat2` with RENAME_EXCHANGE); False where
    the platform, the C library or the filesystem cannot, and nothing has moved."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library older than glibc 2.28, or not glibc
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    return renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0
