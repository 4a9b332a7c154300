"""``aggregator-service --health-listen``: the health service alone, in plaintext, beside mutual TLS.

The kubelet's native ``grpc:`` probes cannot present a client certificate, so they cannot pass
the main port's mutual TLS. The aggregator therefore serves ``grpc.health.v1.Health`` (the same
servicer object, so both ports always say the same) and nothing else on a second, plaintext
port. Real servers on port 0, real certificates (``fedseg certs``), real gRPC channels.
"""

from __future__ import annotations

import os
import re
import socket
import threading
from pathlib import Path
from typing import Callable, Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import codec
from aggregator_service.security import server_credentials
from aggregator_service.server import SERVICE_NAME, Aggregator, RunningServer, serve
from aggregator_service.store import Store
from client_agent.tls import channel_credentials
from aggregator_service import certs
from aggregator_service.launcher import AggregatorProcess
from numpy_federation import config, model
from protos.fedsegnet.v1 import aggregator_pb2 as pb
from protos.fedsegnet.v1 import aggregator_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[2]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _aggregator(root: Path) -> Aggregator:
    initial = root / "initial.frames"
    codec.save_tensors(initial, list(model().items()))
    return Aggregator(Store(root / "store"), config(), initial_model=initial)


def _tls(pki: Path) -> grpc.ServerCredentials:
    cert, key = certs.server_paths(pki, "aggregator")
    return server_credentials(cert, key, pki / certs.CA_CERT)


def _site_channel(pki: Path, port: int) -> grpc.Channel:
    cert, key = certs.site_paths(pki, "a")
    return grpc.secure_channel(f"localhost:{port}", channel_credentials(cert, key, pki / certs.CA_CERT))


def _check(channel: grpc.Channel, service: str = "") -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


@pytest.fixture
def running(tmp_path: Path, pki: Path) -> Iterator[RunningServer]:
    served = serve(_aggregator(tmp_path), "127.0.0.1:0", credentials=_tls(pki), health_listen="127.0.0.1:0")
    yield served
    served.stop(grace=None)


@pytest.mark.parametrize("service", ["", SERVICE_NAME])
def test_health_port_answers_serving_in_plaintext(running: RunningServer, pki: Path, service: str) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{running.health_port}") as plaintext, \
            _site_channel(pki, running.port) as mtls:
        on_health_port = _check(plaintext, service)
        on_main_port = _check(mtls, service)

    assert running.health_port not in (None, 0, running.port)
    assert on_health_port == SERVING
    assert on_main_port == SERVING


def _get_status(channel: grpc.Channel) -> object:
    return pb_grpc.AggregatorServiceStub(channel).GetStatus(pb.GetStatusRequest(), timeout=10)


def _reflect(channel: grpc.Channel) -> object:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    return list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))


@pytest.mark.parametrize("call", [_get_status, _reflect], ids=["aggregator", "reflection"])
def test_health_port_serves_nothing_but_health(
    running: RunningServer, pki: Path, call: Callable[[grpc.Channel], object]
) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{running.health_port}") as plaintext, \
            pytest.raises(grpc.RpcError) as refused:
        call(plaintext)
    with _site_channel(pki, running.port) as mtls:
        call(mtls)  # the same call is served on the main port (with a certificate)

    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_main_port_still_refuses_plaintext(running: RunningServer) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as plaintext, pytest.raises(grpc.RpcError) as refused:
        _check(plaintext)

    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_stop_says_not_serving_on_the_health_port_then_closes_it(tmp_path: Path, pki: Path) -> None:
    served = serve(_aggregator(tmp_path), "127.0.0.1:0", credentials=_tls(pki), health_listen="127.0.0.1:0")
    target = f"127.0.0.1:{served.health_port}"
    with grpc.insecure_channel(target) as plaintext:
        watch = health_pb2_grpc.HealthStub(plaintext).Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                                                            timeout=30)
        first = next(watch).status
        stopper = threading.Thread(target=served.stop, kwargs={"grace": 10.0})
        stopper.start()
        second = next(watch).status  # the shared servicer's graceful shutdown, seen on this port
        watch.cancel()
        stopper.join(timeout=30)
    with grpc.insecure_channel(target) as plaintext, pytest.raises(grpc.RpcError) as after:
        _check(plaintext)

    assert (first, second) == (SERVING, NOT_SERVING)
    assert not stopper.is_alive()
    assert after.value.code() == grpc.StatusCode.UNAVAILABLE


def test_no_health_port_unless_asked(tmp_path: Path) -> None:
    served = serve(_aggregator(tmp_path), "127.0.0.1:0")
    try:
        assert served.health_server is None and served.health_port is None
    finally:
        served.stop(grace=None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(params=["socket", "aggregator"])
def busy_port(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[int]:
    """A port in use: by a plain socket, or as another aggregator's gRPC port. gRPC binds with
    SO_REUSEPORT by default, so in the second case only the aggregator's opting out makes a bind
    fail instead of silently splitting that port's connections between two servers."""
    if request.param == "socket":
        with socket.socket() as held:
            held.bind(("127.0.0.1", 0))
            held.listen()
            yield held.getsockname()[1]
    else:
        other = serve(_aggregator(tmp_path / "other"), "127.0.0.1:0")
        yield other.port
        other.stop(grace=None)


def _is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_a_health_address_in_use_is_refused_and_holds_no_port(tmp_path: Path, busy_port: int) -> None:
    main_port = _free_port()

    with pytest.raises(OSError, match=f"could not bind 127.0.0.1:{busy_port}"):
        serve(_aggregator(tmp_path), f"127.0.0.1:{main_port}", health_listen=f"127.0.0.1:{busy_port}")

    assert _is_free(main_port)


def test_a_main_address_in_use_is_refused_and_frees_the_health_port(tmp_path: Path, busy_port: int) -> None:
    health_port = _free_port()

    with pytest.raises(OSError, match=f"could not bind 127.0.0.1:{busy_port}"):
        serve(_aggregator(tmp_path), f"127.0.0.1:{busy_port}", health_listen=f"127.0.0.1:{health_port}")

    assert _is_free(health_port)


@pytest.mark.slow  # starts a process
def test_the_command_serves_health_from_FEDSEG_HEALTH_LISTEN(tmp_path: Path, pki: Path) -> None:
    (tmp_path / "f.toml").write_text('[federation]\nid = "t"\nsites = ["a", "b"]\n')
    initial = tmp_path / "initial.frames"
    codec.save_tensors(initial, list(model().items()))
    cert, key = certs.server_paths(pki, "aggregator")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDSEG_")}
    env["FEDSEG_HEALTH_LISTEN"] = "127.0.0.1:0"
    aggregator = AggregatorProcess(
        config=tmp_path / "f.toml", store=tmp_path / "store", initial_model=initial, log_path=tmp_path / "agg.log",
        env=env, extra_args=["--tls-cert", str(cert), "--tls-key", str(key), "--tls-ca", str(pki / certs.CA_CERT)],
    )
    with aggregator:  # serving: the port file is written after both servers are up and logged
        found = re.search(r"health service \(plaintext, health only\) on port (\d+)", aggregator.log_path.read_text())
        assert found, aggregator.log_tail()
        with grpc.insecure_channel(f"127.0.0.1:{found.group(1)}") as plaintext:
            status = _check(plaintext, SERVICE_NAME)

    assert status == SERVING
    assert aggregator.proc is not None and aggregator.proc.returncode == 0, aggregator.log_tail()
