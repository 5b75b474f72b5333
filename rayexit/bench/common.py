"""What every benchmark records about where it ran."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch

DEFAULT_DATASETS = Path("..") / "shared" / "datasets"
# Below this share of its threads' time a timed span was competing for the cores: its seconds
# say more about the machine than about the method. A quiet 2-core run reads 0.9 or more.
SHARED_CPU_BELOW = 0.75


def machine_info() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "processor": platform.processor() or platform.machine(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def add_threads_option(parser, default: int | None = None, why: str = "") -> None:
    """`--threads`: torch's thread count for this benchmark."""
    parser.add_argument(
        "--threads", type=int, default=default,
        help=why or "torch threads (default: torch's own, one per core); two benchmarks sharing the machine "
                    "should split the cores between them, or each slows the other several-fold",
    )


def use_threads(threads: int | None) -> None:
    """Give torch `threads` threads (None: leave torch's default), refusing a count below one."""
    from rayexit.errors import RayexitError

    if threads is None:
        return
    if threads < 1:
        raise RayexitError(f"--threads: got {threads}, expected a whole number >= 1")
    torch.set_num_threads(threads)


def datasets_dir(given: str | None) -> Path:
    from rayexit.errors import RayexitError

    path = Path(given) if given else DEFAULT_DATASETS
    if not path.is_dir():
        raise RayexitError(f"{path}: datasets folder not found; pass --datasets DIR (the shared/datasets folder)")
    return path


class CpuMeter:
    """Whether a timed span had the cores to itself: the process's CPU seconds per wall-clock
    second, as a share of the threads torch was given, and the load average at the end.

    Training seconds from a span that shared the machine (a test suite beside it, another
    benchmark) are not comparable with a quiet one's; this is recorded beside them so a reader
    can tell which is which.
    """

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def figures(self) -> dict:
        wall = max(time.perf_counter() - self.wall, 1e-9)
        threads = torch.get_num_threads()
        share = (time.process_time() - self.cpu) / wall / threads
        load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        return {"cpu_share": round(share, 3), "torch_threads": threads, "load_average": load,
                "shared_cpu": share < SHARED_CPU_BELOW}
