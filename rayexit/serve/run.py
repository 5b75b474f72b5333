"""Starting and stopping Serve around one model: shared by `rayexit serve`, the demo and the benchmark."""

from __future__ import annotations

import json
import logging
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from rayexit.errors import RayexitError
from rayexit.serve.settings import ServeSettings

log = logging.getLogger(__name__)
APP_NAME = "rayexit"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass
class Running:
    """A Serve app this process started; `stop()` undoes exactly what `start_serving` did."""

    url: str
    started_ray: bool

    def stop(self) -> None:
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            if self.started_ray:
                ray.shutdown()


def start_serving(
    settings: ServeSettings,
    host: str = "127.0.0.1",
    port: int | None = None,
    address: str = "local",
    ray_actor_options: dict[str, Any] | None = None,
    num_cpus: int | None = None,
    include_dashboard: bool = False,
) -> Running:
    """Start Ray (unless this process already has it), Serve on host:port, and the app; wait until it answers."""
    import ray
    from ray import serve

    from rayexit.serve.app import bind_app

    app = bind_app(settings, ray_actor_options)  # checks the model directory before anything starts
    port = port or free_port(host)
    started_ray = False
    if not ray.is_initialized():
        # The dashboard is off unless asked for; Ray's state API (used to find a replica's process) needs it.
        ray.init(address=address, num_cpus=num_cpus, include_dashboard=include_dashboard, log_to_driver=False)
        started_ray = True
    running = Running(f"http://{host}:{port}", started_ray)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(app, name=APP_NAME, route_prefix="/")
        wait_until_healthy(running.url)
    except BaseException:
        running.stop()
        raise
    return running


def wait_until_healthy(url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise RayexitError(f"{url}: the server did not answer /healthz within {timeout_s:.0f}s")
        time.sleep(0.25)


def post_json(url: str, payload: dict, timeout_s: float = 30.0) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")
