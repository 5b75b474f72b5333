"""Writes that never leave a half-written file: a temporary sibling, then an atomic rename.

`tempfile.mkstemp` / `mkdtemp` create 0600 files and 0700 folders; renamed into place as they
are, a model directory on shared storage would be unreadable to everyone but its writer. What
lands in place gets the modes a plain `open` / `mkdir` would give (0644 / 0755 under the usual
umask 022).
"""

from __future__ import annotations

import json
import os
import shutil
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
    """Put the finished `staging` folder at `target`, replacing what was there in two renames."""
    share_tree(staging)  # readable by other users on shared storage (mkdtemp and safetensors make 0700/0600)
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(target)
