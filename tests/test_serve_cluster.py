"""Several `rayexit serve` commands on one token-authenticated Ray cluster, each its own application.

One head (started through rayexit.cluster, so loopback only, with RAY_AUTH_MODE=token) and two model
directories; every command runs as a subprocess. About a minute on a small shared CPU.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from serve_process import Proc, env, free_port, serve_cli, wait_gone
from test_serve_validation import confident_tiny_model

from rayexit.config import ExitPolicy

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes in /proc")

HEAD = """
import signal, sys, time
from rayexit.cluster import connect
cluster = connect("local", num_cpus=2)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
print("head", cluster.address, cluster.node_ip, flush=True)
try:
    while True:
        time.sleep(1)
finally:
    cluster.shutdown()
"""

SERVE_STATUS = """
import json, sys, ray
from ray import serve
from rayexit.cluster import connect
connect(sys.argv[1])
print(json.dumps(sorted(serve.status().applications)))
"""


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, minilm_tokenizer) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("two")
    dirs = []
    for name, seed in (("alpha", 3), ("beta", 4)):
        model = confident_tiny_model(seed=seed)
        model.exit_config.policy = ExitPolicy("entropy", 0.15)
        model.save_pretrained(root / name / "model", minilm_tokenizer)
        dirs.append(root / name / "model")
    return dirs[0], dirs[1]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("head")
    proc = Proc(["-c", HEAD], workdir, "head", RAY_AUTH_MODE="token")
    try:
        proc.wait_for("head ", timeout_s=120)
        address = proc.out.split("head ")[1].split()[0]
        yield address
    finally:
        proc.signal(signal.SIGTERM)
        proc.wait(timeout_s=60)
        wait_gone(proc.seen, timeout_s=30)
        proc.close()


def classify(url: str) -> dict:
    request = urllib.request.Request(
        url + "/v1/classify", data=json.dumps({"texts": ["hello there"]}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def apps_on(address: str) -> list[str]:
    result = subprocess.run([sys.executable, "-c", SERVE_STATUS, address], env=env(RAY_AUTH_MODE="token"),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_joining_a_token_cluster_without_the_token_mode_is_one_line(head, model_dirs):
    started = time.monotonic()
    result = subprocess.run([sys.executable, *serve_cli(model_dirs[0], "--address", head)],
                            env=env(RAY_AUTH_MODE=None), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert head in lines[0] and "RAY_AUTH_MODE=token" in lines[0]
    assert time.monotonic() - started < 30  # Ray alone retries for 20 s, then raises a ConnectionError traceback


def test_nothing_at_the_address_is_one_line_for_serve_and_train(model_dirs):
    nowhere = f"127.0.0.1:{free_port()}"
    commands = [
        serve_cli(model_dirs[0], "--address", nowhere),
        ["-m", "rayexit.cli", "train", "--model", "minilm", "--train", "atis", "--max-examples", "16",
         "--batch-size", "8", "--epochs", "1", "--num-workers", "1", "--address", nowhere,
         "--output", str(model_dirs[0].parent / "t")],
    ]
    for command in commands:
        result = subprocess.run([sys.executable, *command], env=env(RAY_AUTH_MODE=None), capture_output=True,
                                text=True, timeout=180)
        assert result.returncode == 2, result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and nowhere in errors[0] and "no Ray cluster answers" in errors[0], result.stderr
        assert "Traceback" not in result.stderr


def test_two_models_share_one_cluster_and_each_stops_only_itself(head, model_dirs, tmp_path):
    port = free_port()
    first = Proc(serve_cli(model_dirs[0], "--address", head, "--port", str(port)), tmp_path, "first",
                 RAY_AUTH_MODE="token")
    second = third = None
    try:
        first.wait_for("serving ", timeout_s=180)
        url_a = f"http://127.0.0.1:{port}/alpha-model"
        assert url_a in first.out
        assert classify(url_a)["layers"] == 4

        # Another port than the running proxy's is refused, in one line, and nothing of the first is touched.
        other = subprocess.run(
            [sys.executable, *serve_cli(model_dirs[1], "--address", head, "--port", str(free_port()))],
            env=env(RAY_AUTH_MODE="token"), capture_output=True, text=True, timeout=120,
        )
        assert other.returncode == 2
        errors = [line for line in other.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and f"HTTP proxy on port {port}" in errors[0], other.stderr
        # So is the first model's own application name.
        same = subprocess.run(
            [sys.executable, *serve_cli(model_dirs[1], "--address", head, "--app-name", "alpha-model")],
            env=env(RAY_AUTH_MODE="token"), capture_output=True, text=True, timeout=120,
        )
        assert same.returncode == 2 and "already runs on this cluster" in same.stderr, same.stderr
        assert classify(url_a)["layers"] == 4

        # Without --port the second joins the running proxy under its own name and route.
        second = Proc(serve_cli(model_dirs[1], "--address", head), tmp_path, "second", RAY_AUTH_MODE="token")
        second.wait_for("serving ", timeout_s=180)
        url_b = f"http://127.0.0.1:{port}/beta-model"
        assert url_b in second.out
        assert classify(url_a)["results"] and classify(url_b)["results"]
        assert apps_on(head) == ["alpha-model", "beta-model"]

        # The first started Serve, but the second still serves: it deletes only its own application.
        first.signal(signal.SIGTERM)
        assert first.wait(timeout_s=90) == 0, first.err
        assert classify(url_b)["results"]
        assert apps_on(head) == ["beta-model"]

        # The second did not start Serve: it deletes its application and leaves Serve and Ray running.
        second.signal(signal.SIGTERM)
        assert second.wait(timeout_s=90) == 0, second.err
        assert apps_on(head) == []
        # ... so a third command finds the proxy still on its port.
        third = Proc(serve_cli(model_dirs[0], "--address", head), tmp_path, "third", RAY_AUTH_MODE="token")
        third.wait_for("serving ", timeout_s=180)
        assert f"127.0.0.1:{port}/alpha-model" in third.out
        third.signal(signal.SIGTERM)
        assert third.wait(timeout_s=90) == 0, third.err
    finally:
        for proc in (first, second, third):
            if proc is not None:
                proc.close()
