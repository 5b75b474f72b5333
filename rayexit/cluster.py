"""Joining a Ray cluster, or starting a local instance that listens on loopback only.

One place for `rayexit serve` and the Ray Train path of `rayexit train`, so that both bind the
same way and fail the same way: one line naming the address and what to set, never Ray's
20-second retry loop followed by a ConnectionError traceback.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import socket
from collections.abc import Iterator
from dataclasses import dataclass

from rayexit.errors import RayexitError

LOOPBACK = "127.0.0.1"
AUTH_MODE_VAR = "RAY_AUTH_MODE"
AUTH_HINT = (
    "if the cluster uses token authentication (Ray 2.60 turns it on for clusters it starts), set "
    f"{AUTH_MODE_VAR}=token and give the cluster's token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)"
)


@dataclass(frozen=True)
class RayCluster:
    """The Ray instance this process uses; `started` says whether it is this process's own to stop."""

    address: str
    node_ip: str
    started: bool
    metrics_export_port: int | None = None

    @property
    def metrics_url(self) -> str | None:
        """Where this node's Prometheus metrics (Ray's, Serve's and rayexit's) are served."""
        if not self.metrics_export_port:
            return None
        return f"http://{self.node_ip}:{self.metrics_export_port}/metrics"

    def shutdown(self) -> None:
        """Stop Ray if this process started it; a joined cluster is left as it was."""
        if self.started:
            import ray

            ray.shutdown()


def wants_local(address: str | None) -> bool:
    """`local` always starts a new instance; no address starts one unless RAY_ADDRESS names a cluster."""
    if address == "local":
        return True
    return not (address or os.environ.get("RAY_ADDRESS"))


def connect(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    include_dashboard: bool | None = False,
    log_to_driver: bool = False,
    metrics_export_port: int | None = None,
    keep_signal_handlers: bool = False,
) -> RayCluster:
    """Use this process's Ray, else join `address` (or RAY_ADDRESS), else start a loopback-only instance.

    `address` is `local` (start one), `auto` (the cluster started on this machine by `ray start`),
    `host:port` of a GCS, or None (RAY_ADDRESS if set, else start one). `metrics_export_port` and
    `include_dashboard` (None: Ray's default) only apply to an instance started here.
    `keep_signal_handlers`: put this process's SIGINT/SIGTERM handlers back the moment ray.init returns
    (the driver's core worker installs a C++ SIGTERM handler that aborts the process).
    """
    import ray

    if ray.is_initialized():
        return _describe(started=False)
    if wants_local(address):
        with loopback_node_ip(), _handlers_kept(keep_signal_handlers):
            ray.init(
                address="local",
                num_cpus=num_cpus,
                include_dashboard=include_dashboard,
                log_to_driver=log_to_driver,
                _node_ip_address=LOOPBACK,
                _metrics_export_port=metrics_export_port,
            )
        return _describe(started=True)
    target = address or os.environ["RAY_ADDRESS"]
    if target.startswith("ray://"):
        # Ray Client: its own protocol and errors; nothing here can check it better than Ray does.
        with _handlers_kept(keep_signal_handlers):
            ray.init(address=target, log_to_driver=log_to_driver)
        return _describe(started=False)
    if target != "auto":
        _preflight(target)
    loopback_only = target != "auto" and _is_loopback_only(target)
    try:
        with loopback_node_ip() if loopback_only else contextlib.nullcontext(), \
                _handlers_kept(keep_signal_handlers):
            ray.init(address=target, log_to_driver=log_to_driver)
    except ConnectionError as exc:
        raise RayexitError(f"could not connect to the Ray cluster at {target} ({exc}); {AUTH_HINT}") from None
    except _authentication_errors() as exc:  # token mode on, but no token found (or a wrong one)
        reason = _first_line(exc)
        raise RayexitError(f"could not connect to the Ray cluster at {target}: {reason}; {AUTH_HINT}") from None
    except RuntimeError as exc:  # "no cluster found" with `auto`, among others
        raise RayexitError(f"could not connect to the Ray cluster at {target}: {_first_line(exc)}") from None
    return _describe(started=False)


def _authentication_errors() -> tuple[type[BaseException], ...]:
    """Ray's AuthenticationError (a RayError, not a RuntimeError, whatever Ray's docstring says)."""
    from ray import exceptions

    error = getattr(exceptions, "AuthenticationError", None)  # Ray releases before token authentication lack it
    return (error,) if error is not None else ()


@contextlib.contextmanager
def _handlers_kept(active: bool) -> Iterator[None]:
    if not active:
        yield
        return
    import ray._private.ray_constants as ray_constants

    kept = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    # The driver's core worker installs Abseil's failure handler, which takes SIGTERM too: a signal landing
    # while ray.init is still connecting aborts the process (status -6, no message, nothing cleaned up),
    # and putting our handlers back afterwards cannot close that window. Ray reads this flag when it
    # creates the core worker; workers and other processes are not affected. Crash reports of this
    # driver then come from Python's faulthandler (enabled by the caller) instead of the C++ stack.
    # Ray releases without the flag keep the window (and their handler).
    flag = "RAY_DISABLE_FAILURE_SIGNAL_HANDLER"
    failure_handler_off = getattr(ray_constants, flag, None)
    if failure_handler_off is not None:
        setattr(ray_constants, flag, True)
    try:
        yield
    finally:
        if failure_handler_off is not None:
            setattr(ray_constants, flag, failure_handler_off)
        _restore(kept)


def _restore(handlers: dict) -> None:
    for sig, handler in handlers.items():
        if handler is not None:
            signal.signal(sig, handler)


def _describe(started: bool) -> RayCluster:
    import ray

    context = ray.get_runtime_context()
    me = context.get_node_id()
    node = next((n for n in ray.nodes() if n.get("NodeID") == me), {})  # the driver's node
    return RayCluster(
        address=context.gcs_address,
        node_ip=node.get("NodeManagerAddress") or ray.util.get_node_ip_address(),
        started=started,
        metrics_export_port=node.get("MetricsExportPort") or None,
    )


@contextlib.contextmanager
def loopback_node_ip() -> Iterator[None]:
    """Keep `node_ip_address=127.0.0.1` as given.

    On Linux Ray rewrites a loopback node address to the machine's outward IP, and its GCS, raylet
    and agents then listen on every interface. Ray keeps loopback only where it treats the machine as
    a lone laptop (the switch behind RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read once at import), so
    that switch is held off for the start-up only. With this, every server of the instance binds
    127.0.0.1 (checked by tests/test_cluster.py).
    """
    from ray._private import ray_constants

    before = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if before is not None:
            ray_constants.ENABLE_RAY_CLUSTER = before


def _split(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise RayexitError(f"--address: got {address!r}, expected host:port of the cluster's head (or `auto`, `local`)")
    return host.strip("[]"), int(port)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_loopback_only(address: str) -> bool:
    """A head on this machine started with --node-ip-address 127.0.0.1 (as rayexit starts its own) answers
    on loopback only; Ray would rewrite 127.0.0.1 to the outward IP and never reach it."""
    host, port = _split(address)
    if not _is_loopback(host):
        return False
    from ray._private.services import node_ip_address_from_perspective

    outward = node_ip_address_from_perspective()
    if _is_loopback(outward):
        return True
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((outward, port)) != 0


def _preflight(address: str, timeout_s: float = 5.0) -> None:
    """Ask the GCS for its cluster id once, so that a wrong address or a missing token is one line in
    seconds instead of Ray's 20 s of retries and a traceback. Skipped in token mode: ray.init sends
    the token and reports a bad one itself."""
    host, port = _split(address)
    if os.environ.get(AUTH_MODE_VAR, "").lower() == "token" or os.environ.get("RAY_USE_TLS", "0") not in ("", "0"):
        return  # a TLS cluster does not answer a plain channel: ray.init speaks TLS and reports itself
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    channel = grpc.insecure_channel(f"{host}:{port}")
    try:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=timeout_s)
    except grpc.RpcError as exc:
        code = exc.code()
        if code == grpc.StatusCode.UNAUTHENTICATED:
            raise RayexitError(
                f"the Ray cluster at {address} requires token authentication and {AUTH_MODE_VAR} is "
                f"{os.environ.get(AUTH_MODE_VAR) or 'unset'}: set {AUTH_MODE_VAR}=token and give the cluster's "
                "token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)"
            ) from None
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            raise RayexitError(
                f"no Ray cluster answers at {address} ({code.name.lower()}); start one with `ray start --head` "
                "or give the head's GCS address (host:port, default port 6379)"
            ) from None
        # Anything else (an older GCS without this call, ...): let ray.init decide.
    finally:
        channel.close()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
