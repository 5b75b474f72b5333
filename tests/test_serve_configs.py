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


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_applications_have_their_own_names_and_routes(path):
    from rayexit.serve.run import check_app_name, check_route_prefix

    apps = yaml.safe_load(path.read_text())["applications"]
    names = [check_app_name(app["name"]) for app in apps]
    routes = [check_route_prefix(app["route_prefix"]) for app in apps]
    assert len(set(names)) == len(names) and len(set(routes)) == len(routes)


def test_names_and_routes_from_the_model_directory(tmp_path):
    from rayexit.errors import RayexitError
    from rayexit.serve.run import check_route_prefix, default_app_name

    assert default_app_name(tmp_path / "ATIS RomeBERT v2") == "atis-romebert-v2"
    assert default_app_name(tmp_path / "runs" / "demo" / "model") == "demo-model"
    assert default_app_name(tmp_path / "tune" / "best") == "tune-best"
    assert default_app_name(tmp_path / "runs" / "sst2.final") == "sst2-final"
    for bad in ("atis", "/atis/", "/a b", "/{x}"):
        with pytest.raises(RayexitError, match="--route-prefix"):
            check_route_prefix(bad)
