"""The shipped Serve YAMLs: valid for Serve's own schema, loopback only, and args our settings accept."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rayexit.serve.settings import ServeSettings

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "serve_configs").glob("*.yaml"))


def test_there_are_serve_configs():
    assert any(p.name == "demo.yaml" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_serve_config_is_valid_and_binds_loopback(path):
    from ray.serve.schema import ServeDeploySchema

    data = yaml.safe_load(path.read_text())
    ServeDeploySchema(**data)  # raises when a field has the wrong shape
    assert data["http_options"]["host"] == "127.0.0.1"
    for app in data["applications"]:
        assert app["import_path"] == "rayexit.serve.app:build_app"
        settings = ServeSettings.from_args(app["args"])
        assert not Path(settings.model_dir).is_absolute()  # no machine paths in shipped configs
        assert [d["name"] for d in app.get("deployments", [])] in ([], ["ExitClassifier"])
