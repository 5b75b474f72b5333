"""Helpers for tests that run the real `rayexit serve` command (or a Ray head) as a subprocess."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def env(**extra: str | None) -> dict[str, str]:
    """The test environment for a child: this worktree's code first; a None value removes the variable."""
    result = dict(os.environ)
    result.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", RAY_USAGE_STATS_ENABLED="0")
    result["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), result.get("PYTHONPATH", "")) if p)
    for key, value in extra.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = value
    return result


class Proc:
    """A child process whose output goes to files (a pipe nobody reads would block it)."""

    def __init__(self, args: list[str], workdir: Path, name: str, **env_extra: str | None) -> None:
        self.out_path, self.err_path = workdir / f"{name}.out", workdir / f"{name}.err"
        self._out, self._err = self.out_path.open("w"), self.err_path.open("w")
        self.popen = subprocess.Popen(
            [sys.executable, *args], cwd=ROOT, env=env(**env_extra), stdout=self._out, stderr=self._err,
            start_new_session=True,
        )
        self.pid = self.popen.pid
        self.seen: set[int] = set()

    @property
    def out(self) -> str:
        return self.out_path.read_text()

    @property
    def err(self) -> str:
        return self.err_path.read_text()

    def wait_for(self, text: str, timeout_s: float, stream: str = "out") -> None:
        deadline = time.monotonic() + timeout_s
        while text not in (self.out if stream == "out" else self.err):
            self.seen |= descendants(self.pid)
            if self.popen.poll() is not None:
                raise AssertionError(f"exited {self.popen.returncode} before {text!r}:\n{self.out}\n{self.err}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} within {timeout_s}s:\n{self.out}\n{self.err}")
            time.sleep(0.1)
        self.seen |= descendants(self.pid)

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.seen |= descendants(self.pid)
        os.kill(self.pid, sig)

    def wait(self, timeout_s: float) -> int:
        try:
            return self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"still running after {timeout_s}s:\n{self.out}\n{self.err}") from None

    def kill(self) -> None:
        """Last resort for a test that failed half-way: the whole group, then anything it started."""
        self.seen |= descendants(self.pid)
        for pid in [self.pid, *self.seen]:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.popen.wait(30)
        self._out.close()
        self._err.close()

    def close(self) -> None:
        if self.popen.poll() is None:
            self.kill()
        else:
            self._out.close()
            self._err.close()


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def descendants(pid: int) -> set[int]:
    tree, found, todo = _children(), set(), [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pids: set[int]) -> set[int]:
    """Those still running (zombies waiting for their parent count as gone)."""
    result = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            result.add(pid)
    return result


def wait_gone(pids: set[int], timeout_s: float) -> set[int]:
    deadline = time.monotonic() + timeout_s
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive(pids)


def listening(pids: set[int]) -> list[tuple[int, str]]:
    """(pid, "addr:port") for every TCP socket in LISTEN state owned by one of `pids` (Linux /proc)."""
    inodes: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inodes[target[8:-1]] = pid
        except OSError:
            continue
    found = []
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            address, port = fields[1].split(":")
            found.append((inodes[fields[9]], f"{_ip(address, width)}:{int(port, 16)}"))
    return found


def _ip(hexaddr: str, width: int) -> str:
    raw = bytes.fromhex(hexaddr)
    if width == 8:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
    address = socket.inet_ntop(socket.AF_INET6, words)
    return address.removeprefix("::ffff:")


def serve_cli(model_dir: Path, *args: str) -> list[str]:
    return ["-m", "rayexit.cli", "serve", str(model_dir), *args]
