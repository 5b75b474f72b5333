"""Starting and stopping one served model: shared by `rayexit serve`, the demo and the benchmark.

Several models can share one Serve cluster: each is its own application (name and route prefix),
all behind the cluster's one HTTP proxy. What a call here did not start it never stops: it deletes
only the application it deployed, shuts Serve down only when it started Serve and no other
application is left, and stops Ray only when it started Ray.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rayexit.cluster import RayCluster, connect
from rayexit.errors import RayexitError
from rayexit.serve.settings import ServeSettings

log = logging.getLogger(__name__)
APP_NAME = "rayexit"  # the demo's and the benchmark's application, at route "/"
DEFAULT_PORT = 8000
# Folder names that say nothing about the model (`rayexit tune` exports best/, the demo trains into model/).
GENERIC_FOLDERS = {"model", "best", "final", "output", "export"}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def default_app_name(model_dir: str | Path) -> str:
    """`runs/atis-romebert` -> `atis-romebert`; `runs/demo/model` -> `demo-model` (a bare `model` says too little)."""
    path = Path(model_dir).expanduser().resolve()
    name = path.name
    if name.lower() in GENERIC_FOLDERS and path.parent.name:
        name = f"{path.parent.name}-{name}"
    name = re.sub(r"[^a-z0-9_-]+", "-", name.lower()).strip("-_")
    return name[:63] or APP_NAME


def check_app_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", name or ""):
        raise RayexitError(
            f"--app-name: got {name!r}, expected 1-63 letters, digits, '-', '_' or '.', starting with a letter or digit"
        )
    return name


def check_route_prefix(prefix: str) -> str:
    """Serve's own rules, checked here so a bad prefix is one line before anything starts."""
    ok = prefix.startswith("/") and (prefix == "/" or not prefix.endswith("/")) and not set(prefix) & set("{}? #")
    if not ok:
        raise RayexitError(
            f"--route-prefix: got {prefix!r}, expected a path starting with '/', without a trailing '/', "
            "spaces, '?', '#' or wildcards (e.g. /atis)"
        )
    return prefix


def check_port(host: str, port: int) -> None:
    """Refuse a port Serve's proxy could not bind, before Serve starts (it would retry and never answer)."""
    check_port_number(port)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise RayexitError(f"--host {host}: not an address this machine can listen on ({exc})") from None
    family, _, _, _, sockaddr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is not "busy"
        try:
            sock.bind(sockaddr)
        except PermissionError:
            raise RayexitError(f"--port {port}: binding {host}:{port} is not permitted (ports below 1024 need root)") \
                from None
        except OSError as exc:
            if exc.errno in (98, 48, 10048):  # EADDRINUSE on Linux, macOS, Windows
                raise RayexitError(f"--port {port}: {host}:{port} is already in use; choose another port") from None
            raise RayexitError(f"--host {host}: cannot listen on {host}:{port} ({exc.strerror or exc})") from None


@dataclass
class Running:
    """One application this process deployed; `stop()` undoes exactly what `start_serving` did."""

    url: str  # the application's base URL: the proxy's root plus the route prefix
    app_name: str
    cluster: RayCluster
    started_serve: bool
    route_prefix: str = "/"
    proxy: str = ""  # host:port of the cluster's HTTP proxy
    deployed: bool = True
    notes: list[str] = field(default_factory=list)

    @property
    def started_ray(self) -> bool:
        return self.cluster.started

    def stop(self) -> None:
        """Delete this application (its replicas finish the requests they hold first), then Serve and Ray
        only where this process started them."""
        from ray import serve

        try:
            if self.deployed:
                serve.delete(self.app_name)  # blocking: returns once the replicas have drained and stopped
                self.deployed = False
            if self.started_serve:
                others = sorted(_serve_details().get("applications", {}) or {})
                if not others:
                    serve.shutdown()
                elif self.cluster.started:
                    log.warning("the Ray instance this process started stops, and with it application(s) %s",
                                ", ".join(others))
                else:
                    log.info("Serve left running for application(s) %s", ", ".join(others))
        finally:
            if self.cluster.started:
                self.cluster.shutdown()


def start_serving(
    settings: ServeSettings,
    host: str = "127.0.0.1",
    port: int | None = None,
    address: str = "local",
    ray_actor_options: dict[str, Any] | None = None,
    num_cpus: int | None = None,
    include_dashboard: bool = False,
    *,
    app_name: str = APP_NAME,
    route_prefix: str = "/",
    default_port: int | None = None,
    metrics_export_port: int | None = None,
    timeout_s: float = 300.0,
    cluster: RayCluster | None = None,
) -> Running:
    """Deploy `settings` as application `app_name` at `route_prefix`; return once it answers /healthz.

    Uses this process's Ray when there is one, else joins or starts it (`rayexit.cluster.connect`).
    Serve is started on host:port unless the cluster already runs it; then its proxy is shared, and a
    `port` (or `host`) other than the proxy's is refused. Without `port`, a new proxy takes
    `default_port`, else a free port. A replica that fails to start ends the wait at once with its
    own error (RayexitError), and everything this call started is stopped again.
    """
    from rayexit.serve.app import bind_app

    check_app_name(app_name)
    check_route_prefix(route_prefix)
    if port is not None:
        check_port_number(port)
    app = bind_app(settings, ray_actor_options)  # checks the model directory before anything starts
    if cluster is None:
        cluster = connect(address, num_cpus=num_cpus, include_dashboard=include_dashboard,
                          metrics_export_port=metrics_export_port)
    running = Running("", app_name, cluster, started_serve=False, route_prefix=route_prefix, deployed=False)
    try:
        proxy_host, proxy_port = _ensure_serve(running, host, port, default_port)
        running.proxy = f"{proxy_host}:{proxy_port}"
        base = f"http://{_url_host(proxy_host)}:{proxy_port}"
        running.url = base if route_prefix == "/" else base + route_prefix
        _check_free_slot(app_name, route_prefix)
        running.deployed = True  # first: a signal inside the deploy call must still end in its deletion
        _deploy(app, app_name, route_prefix)
        wait_until_running(app_name, timeout_s)
        wait_until_healthy(running.url)
    except BaseException:
        running.stop()
        raise
    return running


def check_port_number(port: int) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise RayexitError(f"--port: got {port!r}, expected a whole number from 1 to 65535")


def _url_host(host: str) -> str:
    # A proxy bound to every interface is reached on loopback from here.
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _serve_details() -> dict[str, Any]:
    """The running Serve instance as the controller sees it ({} when Serve is not running)."""
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    return client.get_serve_details() if client is not None else {}


def _running_proxy() -> tuple[str, int] | None:
    """Host and port of the cluster's HTTP proxy when Serve already runs there (the port is cluster-wide)."""
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return None
    config = client.http_config
    return config.host, config.port


def _ensure_serve(running: Running, host: str, port: int | None, default_port: int | None) -> tuple[str, int]:
    """Share the cluster's Serve (same host and port only) or start it; returns the proxy's host and port."""
    from ray import serve

    existing = _running_proxy()
    if existing is not None:
        proxy_host, proxy_port = existing
        if port is not None and port != proxy_port:
            raise RayexitError(
                f"--port {port}: Serve already runs on this cluster with its HTTP proxy on port {proxy_port} "
                f"(one proxy port per cluster); use --port {proxy_port} or leave --port out"
            )
        if host != proxy_host and proxy_host not in ("0.0.0.0", "::"):
            raise RayexitError(
                f"--host {host}: Serve already runs on this cluster with its HTTP proxy on {proxy_host}; "
                f"use --host {proxy_host}"
            )
        return proxy_host, proxy_port
    chosen = port or default_port or free_port(host)
    check_port(host, chosen)
    running.started_serve = True  # first: a signal inside serve.start must still end in serve.shutdown
    serve.start(http_options={"host": host, "port": chosen})
    return host, chosen


def _check_free_slot(app_name: str, route_prefix: str) -> None:
    """Never replace another model: an application name or route prefix in use is refused, not taken over."""
    apps = _serve_details().get("applications", {}) or {}
    if app_name in apps:
        raise RayexitError(
            f"--app-name {app_name}: an application of that name already runs on this cluster "
            f"(route {apps[app_name].get('route_prefix')}); give another --app-name (and --route-prefix), "
            f"or stop it first (`serve delete {app_name}`)"
        )
    for other, details in apps.items():
        if details.get("route_prefix") == route_prefix:
            raise RayexitError(
                f"--route-prefix {route_prefix}: application {other} already serves that route on this cluster; "
                "give another --route-prefix"
            )


def _deploy(app, app_name: str, route_prefix: str) -> None:
    from ray import serve
    from ray.serve.api import RunTarget

    # Not waiting inside Serve: `wait_until_running` watches the replicas and stops at the first failure.
    serve.run_many(
        [RunTarget(target=app, name=app_name, route_prefix=route_prefix)],
        wait_for_ingress_deployment_creation=False,
        wait_for_applications_running=False,
    )


def replica_error(message: str) -> str:
    """The last line of a replica's start-up traceback, which names the real cause.

    Serve's message is "A replica failed to start ... Error:\\n<traceback>"; the traceback's last line
    reads like `rayexit.errors.RayexitError: <message>` or `ray.exceptions.RayActorError: ...`.
    """
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if not lines:
        return "the replica failed to start (no message)"
    last = lines[-1]
    kind, sep, text = last.partition(": ")
    if sep and re.fullmatch(r"[\w.]+", kind):
        short = kind.rsplit(".", 1)[-1]
        return text if short == "RayexitError" else f"{short}: {text}"
    return last


def wait_until_running(app_name: str, timeout_s: float = 300.0) -> None:
    """Until the application is RUNNING; a replica that failed to start ends the wait with its own error."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while True:
        app = serve.status().applications.get(app_name)
        if app is not None:
            status = str(getattr(app.status, "value", app.status))
            if status == "RUNNING":
                return
            for deployment in app.deployments.values():
                message = deployment.message or ""
                if "failed to start" in message:
                    raise RayexitError(f"application {app_name}: the model replica failed to start: "
                                       f"{replica_error(message)}")
            if status in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise RayexitError(f"application {app_name}: {status.lower()}: {replica_error(app.message or '')}")
        if time.monotonic() > deadline:
            raise RayexitError(f"application {app_name}: not running after {timeout_s:.0f}s (serve status shows why)")
        time.sleep(0.25)


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
