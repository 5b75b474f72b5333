"""The tuning run's hand-off: `best/`, a model directory with the chosen policy, and its Serve YAML."""

from __future__ import annotations

from pathlib import Path

import yaml

from rayexit.config import ExitPolicy
from rayexit.files import write_atomic
from rayexit.model_dir import ModelDir

SERVE_IMPORT_PATH = "rayexit.serve.app:build_app"


def export_model(source: str | Path, target: str | Path, policy: ExitPolicy, choice: dict) -> Path:
    """Copy a trial's model directory to `target` with `policy` as its saved policy.

    `choice` (the tuned settings and the figures behind them) is kept in rayexit.json under
    `extra.policy_choice`, so the directory says why it holds these thresholds.
    """
    return ModelDir(source).with_policy(policy, target, choice).path


def serve_config(model_dir: str | Path, name: str = "rayexit") -> dict:
    """A Serve config file (`serve run` / `serve deploy`) for one model directory."""
    args = {"model_dir": str(Path(model_dir).resolve())}
    _check_serve_args(args)
    # Same shape as serve_configs/demo.yaml: loopback only until the user opens it up.
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": 8000},
        "applications": [
            {"name": name, "route_prefix": "/", "import_path": SERVE_IMPORT_PATH, "args": args},
        ]
    }


def write_serve_config(model_dir: str | Path, path: str | Path, name: str = "rayexit") -> Path:
    header = (
        "# Serves the model `rayexit tune` chose, with the thresholds written into its rayexit.json.\n"
        f"# Run: serve run {Path(path).name}   (or: serve deploy {Path(path).name})\n"
    )
    text = header + yaml.safe_dump(serve_config(model_dir, name), sort_keys=False)
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def _check_serve_args(args: dict) -> None:
    """Refuse to write a config the Serve app would refuse, when that app is installed."""
    try:
        from rayexit.serve.settings import ServeSettings
    except ImportError:
        return
    ServeSettings.from_args(args)
