"""rayexit.cluster without starting Ray: which address means what, and the one-line connection errors.

The token case is answered by a stand-in GCS (a gRPC server that refuses like a token cluster does);
the same refusal from a real Ray head is tested in test_serve_cluster.py.
"""

from __future__ import annotations

import time
from concurrent import futures

import pytest
from serve_process import free_port

from rayexit.cluster import _preflight, connect, wants_local
from rayexit.errors import RayexitError


def test_which_address_starts_a_local_instance(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert wants_local(None) and wants_local("local") and not wants_local("auto")
    assert not wants_local("10.0.0.5:6379")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert not wants_local(None) and wants_local("local")


def test_nothing_listening_is_one_line_in_seconds(monkeypatch):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(RayexitError, match=f"no Ray cluster answers at {address}"):
        _preflight(address, timeout_s=3)
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("address", ["nohostport", "10.0.0.5:", ":6379", "10.0.0.5:port"])
def test_a_malformed_address_names_the_option(address):
    with pytest.raises(RayexitError, match="--address"):
        _preflight(address)


@pytest.fixture
def token_gcs():
    """A gRPC server with the GCS's GetClusterId that refuses as a token cluster does without a token."""
    import grpc
    from ray.core.generated import gcs_service_pb2_grpc

    class Refusing(gcs_service_pb2_grpc.NodeInfoGcsServiceServicer):
        def GetClusterId(self, request, context):  # noqa: N802 (the RPC's name)
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "InvalidAuthToken: Authentication token is missing")

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    gcs_service_pb2_grpc.add_NodeInfoGcsServiceServicer_to_server(Refusing(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)


def test_a_token_cluster_without_the_token_mode_says_what_to_set(monkeypatch, token_gcs):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    with pytest.raises(RayexitError) as caught:
        _preflight(token_gcs)
    message = str(caught.value)
    assert token_gcs in message and "RAY_AUTH_MODE=token" in message and "RAY_AUTH_MODE is unset" in message
    assert "\n" not in message
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    _preflight(token_gcs)  # in token mode ray.init sends the token and reports a wrong one itself


def test_token_mode_without_a_token_is_one_line_with_the_hint(monkeypatch, token_gcs):
    import ray
    from ray.exceptions import AuthenticationError

    def refuse(**kwargs):  # what ray.init raises in token mode when no token can be found
        raise AuthenticationError("Token authentication is enabled but no authentication token was found.\nmore")

    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    with pytest.raises(RayexitError) as caught:
        connect(token_gcs)
    message = str(caught.value)
    assert message.startswith(f"could not connect to the Ray cluster at {token_gcs}: Token authentication")
    assert "RAY_AUTH_TOKEN" in message and "\n" not in message


def test_tunes_own_ray_starts_on_loopback_with_its_dashboard(monkeypatch):
    """`rayexit tune` without an address starts Ray bound to loopback, as `rayexit.cluster` does."""
    import ray
    from ray._private import ray_constants

    from rayexit.tune.experiment import connect as tune_connect

    seen = {}

    def record(**kwargs):
        seen.update(kwargs, cluster_switch=ray_constants.ENABLE_RAY_CLUSTER)
        return None

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", record)
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)  # Linux's default: the rewrite would happen
    tune_connect()
    # held off during start-up (Ray then keeps 127.0.0.1 rather than the outward IP), put back after
    assert seen["cluster_switch"] is False and ray_constants.ENABLE_RAY_CLUSTER is True
    assert seen["_node_ip_address"] == "127.0.0.1" and seen["dashboard_host"] == "127.0.0.1"
