"""The tuning run's hand-off: `best/`, a model directory with the chosen policy, and its Serve YAML."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from rayexit.config import ExitPolicy
from rayexit.errors import RayexitError
from rayexit.files import make_staging_dir, share_tree, write_atomic
from rayexit.models.encoder import EXIT_CONFIG_FILE

SERVE_IMPORT_PATH = "rayexit.serve.app:build_app"
LEFT_BEHIND = ("trial_points.json", ".is_checkpoint", ".metadata.pkl")  # trial bookkeeping, not model files


def export_model(source: str | Path, target: str | Path, policy: ExitPolicy, choice: dict) -> Path:
    """Copy a trial's model directory to `target` with `policy` written into its rayexit.json.

    `choice` (the tuned settings and the figures behind them) is kept under `extra.tune`, so the
    directory says why it holds these thresholds. Written beside the target, then renamed in.
    """
    source, target = Path(source), Path(target)
    config_path = source / EXIT_CONFIG_FILE
    if not config_path.is_file():
        raise RayexitError(f"{source}: not a rayexit model directory (no {EXIT_CONFIG_FILE})")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = make_staging_dir(target)
    try:
        shutil.copytree(source, staging, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*LEFT_BEHIND))
        config = json.loads(config_path.read_text())
        config["policy"] = policy.to_dict()
        config.setdefault("extra", {})["tune"] = choice
        (staging / EXIT_CONFIG_FILE).write_text(json.dumps(config, indent=2))
        share_tree(staging)  # the trial's files keep the modes they were written with
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
            staging.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


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
