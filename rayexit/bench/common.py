"""What every benchmark records about where it ran."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

DEFAULT_DATASETS = Path("..") / "shared" / "datasets"


def machine_info() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "processor": platform.processor() or platform.machine(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def datasets_dir(given: str | None) -> Path:
    from rayexit.errors import RayexitError

    path = Path(given) if given else DEFAULT_DATASETS
    if not path.is_dir():
        raise RayexitError(f"{path}: datasets folder not found; pass --datasets DIR (the shared/datasets folder)")
    return path
