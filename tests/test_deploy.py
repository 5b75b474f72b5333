"""deploy/ (KubeRay) kept in step with jobs/ and serve_configs/: what a cluster would run must exist here.

No Kubernetes here: these check what a test can see (entry points, flags, import paths, the
embedded Serve config, shared names); the manifests themselves were not applied to a cluster.
"""

from __future__ import annotations

import importlib
import importlib.util
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rayexit.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
APP_ROOT = "/app/"  # where deploy/Dockerfile puts the project in the image
SHARED = "/mnt/rayexit"
# The only fields the RayService's Serve config may differ in from serve_configs/demo.yaml
# (why: deploy/rayservice.yaml's header).
KUBE_FIELDS = {("http_options", "host"): "0.0.0.0", ("applications", 0, "args", "model_dir"): None}


def manifest(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


def entrypoint(name: str) -> tuple[Path, list[str]]:
    words = shlex.split(manifest(name)["spec"]["entrypoint"])
    assert words[0] == "python" and words[1].startswith(APP_ROOT), words[:2]
    return ROOT / words[1][len(APP_ROOT) :], words[2:]


def load_job(path: Path):
    spec = importlib.util.spec_from_file_location(f"deploy_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


@pytest.mark.parametrize("name", ["rayjob-train.yaml", "rayjob-tune.yaml"])
def test_rayjob_entrypoint_exists_and_its_flags_parse(name, monkeypatch):
    script, argv = entrypoint(name)
    assert script.parent == ROOT / "jobs" and script.is_file()
    help_run = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert help_run.returncode == 0 and "--output" in help_run.stdout, help_run.stderr
    job = load_job(script)
    command = job.job_args(argv) if hasattr(job, "job_args") else ["tune", *argv]
    args = build_parser().parse_args(command)  # SystemExit on a flag rayexit does not know
    assert args.output.startswith(SHARED + "/")
    # Paths a job may use: as `ray job submit` runs it, nothing is refused.
    from rayexit.storage import JOB_ENV, check_job_args

    monkeypatch.setenv(JOB_ENV, "{}")
    check_job_args(argv, job.PATH_FLAGS)


def test_rayservice_serves_the_demo_config_with_only_the_kubernetes_fields_changed():
    from ray.serve.schema import ServeDeploySchema

    embedded = yaml.safe_load(manifest("rayservice.yaml")["spec"]["serveConfigV2"])
    ServeDeploySchema(**embedded)
    local = yaml.safe_load((ROOT / "serve_configs" / "demo.yaml").read_text())
    _, tune_argv = entrypoint("rayjob-tune.yaml")
    expected = {**KUBE_FIELDS, ("applications", 0, "args", "model_dir"): flag(tune_argv, "--output") + "/best"}
    for path, value in expected.items():
        holder = local
        for key in path[:-1]:
            holder = holder[key]
        assert holder[path[-1]] != value  # a field listed here really differs
        holder[path[-1]] = value
    assert embedded == local

    for app in embedded["applications"]:
        module, attribute = app["import_path"].split(":")
        assert callable(getattr(importlib.import_module(module), attribute))


def test_manifests_share_image_volume_and_ray_version():
    import ray

    claim = manifest("shared-pvc.yaml")["metadata"]["name"]
    base = (DEPLOY / "Dockerfile").read_text()
    assert f"rayproject/ray:{ray.__version__}-" in base
    images = set()
    for name in ("rayjob-train.yaml", "rayjob-tune.yaml", "rayservice.yaml"):
        data = manifest(name)
        assert data["apiVersion"] == "ray.io/v1"
        cluster = data["spec"].get("rayClusterSpec") or data["spec"]["rayClusterConfig"]
        assert cluster["rayVersion"] == ray.__version__
        for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
            pod = group["template"]["spec"]
            images.update(c["image"] for c in pod["containers"])
            assert [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]] == [claim]
            assert all(m["mountPath"] == SHARED for c in pod["containers"] for m in c["volumeMounts"])
    assert len(images) == 1
