"""A hostile or broken site against a real aggregator process (127.0.0.1, port 0, one per attack).

Each test reproduces one attack that once stalled, starved or poisoned the federation, and pins
the defence. The processes run with short limits (a header within 1 s, ...) so the suite stays fast.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import grpc
import numpy as np
import pytest

import aggregator_service
import codec
from aggregator_service.launcher import AggregatorProcess
from protos.fedsegnet.v1 import aggregator_pb2 as pb
from protos.fedsegnet.v1 import aggregator_pb2_grpc as pb_grpc
from support import wait_for

pytestmark = pytest.mark.slow

# The repository whose aggregator_service is imported: the process runs the same code.
REPO = Path(aggregator_service.__file__).resolve().parents[1]
# gRPC shares one connection between channels to the same target; a peer of its own needs this.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]
MODEL = {"w": np.linspace(-1.0, 1.0, 6, dtype=np.float32).reshape(2, 3), "b": np.zeros(4, np.float32)}


def federation_toml(sites: tuple[str, ...] = ("a", "b"), *, clients: int = 2, strategy: str = "fedavg",
                    rounds: int = 3, timeout_s: float = 3600.0) -> str:
    names = ", ".join(f'"{s}"' for s in sites)
    return (f'[federation]\nid = "attack"\nrounds = {rounds}\nmin_clients = {clients}\nmax_clients = {clients}\n'
            f"round_timeout_s = {timeout_s}\nsites = [{names}]\n[aggregation]\nstrategy = \"{strategy}\"\n")


class Aggregator:
    """``python -m aggregator_service.server`` on a store in ``root`` (loopback, port 0), started with
    the one launcher; plaintext unless ``args`` name a TLS certificate."""

    def __init__(self, root: Path, toml: str, model: Mapping[str, np.ndarray] = MODEL, *args: str,
                 env: Mapping[str, str] | None = None, metrics_listen: str = "off") -> None:
        self.credentials: grpc.ChannelCredentials | None = None
        root.mkdir(parents=True, exist_ok=True)
        (root / "federation.toml").write_text(toml)
        initial = root / "initial.frames"
        codec.save_tensors(initial, model.items())
        self.process = AggregatorProcess(
            config=root / "federation.toml", store=root / "store", initial_model=initial,
            log_path=root / "aggregator.log", port_file=root / "port", metrics_listen=metrics_listen,
            log_level="INFO", extra_args=[*([] if "--tls-cert" in args else ["--insecure"]), *args],
            # Limits go in as environment variables: a release without them starts (and shows the attack).
            env={**os.environ, **(env or {})}, cwd=REPO,
        )
        self.channel: grpc.Channel | None = None

    @property
    def store(self) -> Path:
        return self.process.store

    @property
    def port(self) -> int:
        return self.process.port

    def start(self) -> Aggregator:
        self.process.start()
        self.channel = self.connect()
        return self

    def connect(self, credentials: grpc.ChannelCredentials | None = None) -> grpc.Channel:
        credentials = credentials or self.credentials
        if credentials is None:
            return grpc.insecure_channel(f"127.0.0.1:{self.port}", options=OWN_CONNECTION)
        return grpc.secure_channel(f"127.0.0.1:{self.port}", credentials, options=OWN_CONNECTION)

    def start_fails(self) -> str:
        """Start, expecting the process to refuse (exit 2); its output."""
        done = self.process.run_to_exit(timeout_s=60)
        assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
        return done.stderr

    def log(self) -> str:
        """What the process wrote, over all its starts."""
        return self.process.log_path.read_text(errors="replace")

    def stub(self) -> pb_grpc.AggregatorServiceStub:
        assert self.channel is not None
        return pb_grpc.AggregatorServiceStub(self.channel)

    def stop(self) -> None:
        """Kill the process (as a crash would): the tests restart on what the store holds."""
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        self.process.kill()

    # -- what an honest (or not) site sends ------------------------------------------------------
    def submit(self, site: str, deltas: Mapping[str, np.ndarray], *, round_id: int = 1, sample_count: int = 10,
               metrics: pb.LocalMetrics | None = None, timeout: float = 10.0) -> pb.SubmitUpdateResponse:
        frames = list(codec.encode_tensors(deltas.items(), codec.LOSSLESS))
        header = pb.UpdateHeader(site=site, round_id=round_id, sample_count=sample_count,
                                 metrics=metrics or pb.LocalMetrics(dice=0.8, hd95=2.0))
        messages = [pb.SubmitUpdateRequest(header=header), *(pb.SubmitUpdateRequest(frame=f) for f in frames),
                    pb.SubmitUpdateRequest(commit=pb.UpdateCommit(chunk_count=len(frames),
                                                                  digest=codec.frames_digest(frames)))]
        return self.stub().SubmitUpdate(iter(messages), timeout=timeout)

    def model(self, round_id: int = 0) -> dict[str, np.ndarray]:
        chunks = self.stub().DownloadModel(pb.DownloadModelRequest(round_id=round_id, site="a"), timeout=10)
        return dict(codec.decode_frames(c.frame for c in chunks))

    def round(self) -> pb.Round:
        return self.stub().GetRound(pb.GetRoundRequest(site="a"), timeout=5).round


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Callable[..., Aggregator]]:
    started: list[Aggregator] = []

    def make(toml: str, *args: str, model: Mapping[str, np.ndarray] = MODEL, start: bool = True,
             env: Mapping[str, str] | None = None, metrics_listen: str = "off") -> Aggregator:
        aggregator = Aggregator(tmp_path / f"agg{len(started)}", toml, model, *args, env=env,
                                metrics_listen=metrics_listen)
        started.append(aggregator)
        return aggregator.start() if start else aggregator

    yield make
    for aggregator in started:
        aggregator.stop()


def small(scale: float) -> dict[str, np.ndarray]:
    return {name: np.full(array.shape, scale, array.dtype) for name, array in MODEL.items()}


# ---------------------------------------------------------------------------------------------
# 1. one header must not stall the federation


OUT_OF_RANGE = [
    (pb.LocalMetrics(dice=1.5), 10, "metrics.dice must be in [0, 1], got 1.5"),
    (pb.LocalMetrics(dice=-0.01), 10, "metrics.dice must be in [0, 1]"),
    (pb.LocalMetrics(hd95=-1.0), 10, "metrics.hd95 must be in [0, 1e+06]"),
    (pb.LocalMetrics(extra={"validation_cases": 1e30}), 10, "metrics.validation_cases must be a whole number"),
    (pb.LocalMetrics(extra={f"x/{i}": 1.0 for i in range(65)}), 10, "metrics.extra holds 65 entries, at most 64"),
    (pb.LocalMetrics(extra={"dice/1": 1e300}), 10, "metrics.extra['dice/1'] must be finite and in"),
    (pb.LocalMetrics(), 10**12, "sample_count must be in [1, 1000000000]"),
]


def test_out_of_range_header_values_are_refused_by_name(launch) -> None:
    aggregator = launch(federation_toml(clients=1))

    for metrics, sample_count, message in OUT_OF_RANGE:
        with pytest.raises(grpc.RpcError) as refused:
            aggregator.submit("a", small(0.1), metrics=metrics, sample_count=sample_count)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, message
        assert message in refused.value.details()

    aggregator.submit("a", small(0.1))  # an honest upload still closes the round
    wait_for(lambda: aggregator.round().round_id == 2, "round 1 to close")


def test_a_stored_record_that_cannot_be_aggregated_is_left_out_and_the_round_closes(launch) -> None:
    aggregator = launch(federation_toml(strategy="aam"))
    aggregator.submit("a", small(0.1))
    aggregator.stop()
    # As an older release stored it (it checked finiteness only).
    record_path = aggregator.store / "rounds" / "0001" / "a.json"
    record = json.loads(record_path.read_text())
    record["metrics"]["dice"] = 1.5
    record["extra_metrics"]["validation_cases"] = 1e30
    record_path.write_text(json.dumps(record))
    aggregator.start()

    aggregator.submit("b", small(0.2))

    wait_for(lambda: aggregator.round().round_id == 2, "round 1 to close")
    metrics = aggregator.stub().GetRoundMetrics(pb.GetRoundMetricsRequest(round_id=1), timeout=5)
    assert [s.site for s in metrics.sites] == ["b"]
    result = json.loads((aggregator.store / "rounds" / "0001" / "_result.json").read_text())
    assert "dice of site 'a' must be in [0, 1]" in result["excluded"]["a"]
    np.testing.assert_allclose(aggregator.model()["w"], MODEL["w"] + 0.2, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# 5. a non-finite global model is never written or served


def test_a_non_finite_aggregate_is_not_published(launch) -> None:
    model = {"w": np.full((2, 3), 3e38, np.float32), "b": np.zeros(4, np.float32)}
    aggregator = launch(federation_toml(clients=1), model=model)
    first = aggregator.round().global_model_digest

    aggregator.submit("a", {"w": np.full((2, 3), 3e38, np.float32), "b": np.zeros(4, np.float32)},
                      sample_count=10**9)

    wait_for(lambda: aggregator.round().round_id == 2, "round 1 to close")
    assert aggregator.round().global_model_digest == first
    assert all(np.isfinite(a).all() for a in aggregator.model().values())
    result = json.loads((aggregator.store / "rounds" / "0001" / "_result.json").read_text())
    assert result["published"] is False
    assert "the aggregate of tensor 'w' has 6 NaN or Inf value(s)" in result["refused"]


def test_aam_gives_the_boosted_site_of_two_no_weight(launch) -> None:
    aggregator = launch(federation_toml(strategy="aam"))

    aggregator.submit("a", small(0.01))
    aggregator.submit("b", {"w": np.full((2, 3), 3e38, np.float32), "b": np.zeros(4, np.float32)})

    wait_for(lambda: aggregator.round().round_id == 2, "round 1 to close")
    metrics = aggregator.stub().GetRoundMetrics(pb.GetRoundMetricsRequest(round_id=1), timeout=5)
    assert {s.site: s.weight for s in metrics.sites} == {"a": 1.0, "b": 0.0}
    np.testing.assert_allclose(aggregator.model()["w"], MODEL["w"] + 0.01, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# 8. a damaged store is refused at start-up, by name; 9. temporary files are cleaned


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-9])


def flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(("damage", "name", "hint"), [
    (lambda s: truncate(s / "models" / "round-0002.frames"), "models/round-0002.frames", "restore models/"),
    (lambda s: flip_a_bit(s / "models" / "round-0002.frames"), "models/round-0002.frames", "restore models/"),
    (lambda s: (s / "state.json").write_text(""), "state.json", "restore it from a backup"),
    (lambda s: (s / "counters.json").write_text('{"bytes_in": "x"}'), "counters.json", "delete it"),
    (lambda s: (s / "rounds" / "0001" / "_result.json").write_text("{"), "rounds/0001/_result.json", "backup"),
])
def test_a_damaged_store_is_refused_naming_the_file(launch, damage, name, hint) -> None:
    aggregator = launch(federation_toml(clients=1))
    aggregator.submit("a", small(0.1))
    wait_for(lambda: aggregator.round().round_id == 2, "round 1 to close")
    aggregator.stop()
    damage(aggregator.store)

    message = aggregator.start_fails()

    assert f"store file {aggregator.store / name} is damaged" in message
    assert hint in message


def test_temporary_files_of_a_killed_close_are_removed(launch) -> None:
    aggregator = launch(federation_toml(clients=1), start=False)
    aggregator.start()
    aggregator.stop()
    left = [aggregator.store / "models" / ".round-0002.frames.k1ll3d.tmp", aggregator.store / ".state.json.x.tmp"]
    for path in left:
        path.write_bytes(b"x" * 1000)

    aggregator.start()

    assert not any(path.exists() for path in left)
    assert "removed 2 temporary file(s)" in aggregator.log()


# ---------------------------------------------------------------------------------------------
# 2. slowloris; 3. starved upload slots; a server that cannot take requests says so


class Stalled:
    """Upload streams that send ``first`` messages (none: not even a header), then nothing, until released."""

    def __init__(self, aggregator: Aggregator, count: int, first: list[pb.SubmitUpdateRequest] = ()) -> None:
        self.release = threading.Event()

        def messages() -> Iterator[pb.SubmitUpdateRequest]:
            yield from first
            self.release.wait(60)

        # One channel per stream: one peer connection each, as an attacker would open them.
        self.channels = [grpc.insecure_channel(f"127.0.0.1:{aggregator.port}", options=OWN_CONNECTION)
                         for _ in range(count)]
        self.calls = [pb_grpc.AggregatorServiceStub(c).SubmitUpdate.future(messages(), timeout=60)
                      for c in self.channels]

    def codes(self) -> list[grpc.StatusCode]:
        return [call.code() for call in self.calls]

    def close(self) -> None:
        self.release.set()
        for channel in self.channels:
            channel.close()


def health(target: str, timeout: float = 3.0) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout).status


def test_streams_that_never_send_a_header_do_not_stall_honest_calls(launch) -> None:
    aggregator = launch(federation_toml(clients=1), env={"FEDSEG_HEADER_TIMEOUT_SECONDS": "1"})
    stalled = Stalled(aggregator, 20)
    try:
        time.sleep(0.5)  # all 20 are open and waiting on the server
        started = time.monotonic()
        assert aggregator.round().round_id == 1  # GetRound answers at once
        assert health(f"127.0.0.1:{aggregator.port}") == 1  # SERVING
        aggregator.submit("a", small(0.1), timeout=5)
        assert time.monotonic() - started < 4

        wait_for(lambda: all(call.done() for call in stalled.calls), "the stalled uploads to be cut off", 5)
        assert set(stalled.codes()) == {grpc.StatusCode.DEADLINE_EXCEEDED}
        # A few may wait the configured second; beyond them a header must come at once.
        assert "sent no header within 1 s" in aggregator.log()
        assert "sent no header within 0.25 s" in aggregator.log()
    finally:
        stalled.close()


def test_sites_that_stall_after_the_header_cannot_starve_the_upload_slots(launch) -> None:
    aggregator = launch(federation_toml(("a", "b", "c"), clients=3), env={"FEDSEG_IDLE_TIMEOUT_SECONDS": "1"})
    frames = list(codec.encode_tensors(small(0.1).items(), codec.LOSSLESS))
    stalled = [Stalled(aggregator, 2, [pb.SubmitUpdateRequest(header=pb.UpdateHeader(
        site=site, round_id=1, sample_count=10)), pb.SubmitUpdateRequest(frame=frames[0])]) for site in ("a", "b")]
    try:
        time.sleep(0.3)
        started = time.monotonic()
        aggregator.submit("c", small(0.1), timeout=5)
        assert time.monotonic() - started < 4
        for attacker in stalled:
            wait_for(lambda a=attacker: all(call.done() for call in a.calls), "the stalled uploads to end", 5)
            assert set(attacker.codes()) <= {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert "sent nothing for 1 s" in aggregator.log()
    finally:
        for attacker in stalled:
            attacker.close()


def test_health_is_not_serving_on_both_ports_while_no_worker_is_free(launch) -> None:
    aggregator = launch(federation_toml(("a", "b", "c", "d"), clients=4), "--health-listen", "127.0.0.1:0",
                        env={"FEDSEG_MAX_WORKERS": "4", "FEDSEG_IDLE_TIMEOUT_SECONDS": "30"})
    probe = int(aggregator.log().split("health only) on port ")[1].split()[0])
    assert health(f"127.0.0.1:{probe}") == 1
    frames = list(codec.encode_tensors(small(0.1).items(), codec.LOSSLESS))
    busy = [Stalled(aggregator, 1, [pb.SubmitUpdateRequest(header=pb.UpdateHeader(
        site=site, round_id=1, sample_count=10)), pb.SubmitUpdateRequest(frame=frames[0])]) for site in "abcd"]
    try:
        wait_for(lambda: health(f"127.0.0.1:{probe}") == 2, "the probe port to say NOT_SERVING", 5)
    finally:
        for upload in busy:
            upload.close()
    wait_for(lambda: health(f"127.0.0.1:{probe}") == 1, "SERVING again once workers are free", 10)
    assert health(f"127.0.0.1:{aggregator.port}") == 1


# ---------------------------------------------------------------------------------------------
# 10. site names: a full match, in the aggregator, `fedseg certs` and certificate CNs


def test_a_site_name_with_a_trailing_newline_is_refused(launch, tmp_path) -> None:
    from aggregator_service import certs

    aggregator = launch(federation_toml(("a",), clients=1).replace('sites = ["a"]', "sites = []"))

    for rpc in (lambda: aggregator.stub().Join(pb.JoinRequest(site="a\n"), timeout=5),
                lambda: aggregator.submit("a\n", small(0.1))):
        with pytest.raises(grpc.RpcError) as refused:
            rpc()
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "site name 'a\\n' is not valid" in refused.value.details()
    certs.init_ca(tmp_path / "ca")
    with pytest.raises(ValueError, match="site name 'a\\\\n' is not valid"):
        certs.issue_site(tmp_path / "ca", "a\n")
    with pytest.raises(ValueError, match="is not valid"):
        certs.revoke(tmp_path / "ca", "a\n")


def test_a_ca_signed_common_name_with_nul_does_not_act_as_the_site_before_it(launch, tmp_path) -> None:
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from aggregator_service import certs

    ca = tmp_path / "ca"
    certs.init_ca(ca)
    server = certs.issue_server(ca, [], ip_addresses=["127.0.0.1"])
    evil = certs._issue(ca, tmp_path / "evil.crt", tmp_path / "evil.key", "a\x00evil", [],
                        ExtendedKeyUsageOID.CLIENT_AUTH, 1)
    honest = certs.issue_site(ca, "a")
    aggregator = launch(federation_toml(("a",), clients=1), "--tls-cert", str(server.cert), "--tls-key",
                        str(server.key), "--tls-ca", str(ca / certs.CA_CERT), start=False)

    def credentials(issued) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials((ca / certs.CA_CERT).read_bytes(), issued.key.read_bytes(),
                                            issued.cert.read_bytes())

    aggregator.credentials = credentials(honest)
    aggregator.start()
    assert aggregator.stub().Join(pb.JoinRequest(site="a"), timeout=5).federation_id == "attack"
    with aggregator.connect(credentials(evil)) as channel, pytest.raises(grpc.RpcError) as refused:
        pb_grpc.AggregatorServiceStub(channel).Join(pb.JoinRequest(site="a"), timeout=5)

    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "common name" in refused.value.details()


# ---------------------------------------------------------------------------------------------
# 11. the commit path tells the truth when a write after the commit fails


def test_a_failing_write_after_the_commit_does_not_tell_the_site_nothing_was_stored(launch) -> None:
    aggregator = launch(federation_toml())
    counters = aggregator.store / "counters.json"
    counters.unlink()
    counters.mkdir()  # every later write of the counters fails (as on a disk full after the commit)

    receipt = aggregator.submit("a", small(0.1))

    assert (receipt.duplicate, receipt.submissions) == (False, 1)
    assert (aggregator.store / "rounds" / "0001" / "a.json").exists()
    assert "a's update is committed, but the counters could not be updated" in aggregator.log()
    assert aggregator.submit("a", small(0.1)).duplicate  # and a retry hears the same


# ---------------------------------------------------------------------------------------------
# 7. GetRoundMetrics stays bounded


def test_round_metrics_stay_under_the_message_limit_whatever_the_store_holds(launch) -> None:
    aggregator = launch(federation_toml(("a", "b", "c"), clients=3))
    with pytest.raises(grpc.RpcError) as refused:  # today's uploads: refused at the header
        aggregator.submit("a", small(0.1), metrics=pb.LocalMetrics(extra={f"m{i:05d}": 0.5 for i in range(60_000)}))
    assert "metrics.extra holds 60000 entries, at most 64" in refused.value.details()
    aggregator.submit("a", small(0.1))
    aggregator.submit("b", small(0.1))
    aggregator.stop()
    for site in ("a", "b"):  # records an older release accepted: 60k extra metrics each (~5 MB together)
        path = aggregator.store / "rounds" / "0001" / f"{site}.json"
        record = json.loads(path.read_text())
        record["extra_metrics"] = {f"a-rather-long-metric-name/{i:05d}": 0.5 for i in range(60_000)}
        path.write_text(json.dumps(record))
    aggregator.start()

    metrics = aggregator.stub().GetRoundMetrics(pb.GetRoundMetricsRequest(round_id=1), timeout=10)

    assert [len(s.metrics.extra) for s in metrics.sites] == [64, 64]


# ---------------------------------------------------------------------------------------------
# 6. deltas only from the previous round: the store does not grow with the square of the rounds


def test_deltas_are_made_only_from_the_previous_round_and_old_ones_evicted(launch) -> None:
    model = {"w": np.zeros(4096, np.float32)}
    aggregator = launch(federation_toml(("a",), clients=1, rounds=4), model=model)

    def sparse(r: int) -> dict[str, np.ndarray]:
        delta = np.zeros(4096, np.float32)
        delta[r] = 1.0
        return {"w": delta}

    def download(round_id: int, have_round: int) -> int:
        chunks = list(aggregator.stub().DownloadModel(
            pb.DownloadModelRequest(round_id=round_id, site="a", have_round=have_round), timeout=10))
        return chunks[0].delta_from_round

    def deltas() -> list[str]:
        return sorted(p.name for p in (aggregator.store / "models").glob("*.delta"))

    for r in (1, 2):
        aggregator.submit("a", sparse(r), round_id=r)
        wait_for(lambda r=r: aggregator.round().round_id == r + 1, f"round {r} to close")

    assert [download(3, have) for have in (1, 2)] == [0, 2]  # a site asking from round 1 gets the full model
    assert deltas() == ["round-0003.from-0002.delta"]
    aggregator.submit("a", sparse(3), round_id=3)
    wait_for(lambda: aggregator.round().round_id == 4, "round 3 to close")
    assert download(4, 3) == 3
    assert deltas() == ["round-0004.from-0003.delta"]


# ---------------------------------------------------------------------------------------------
# 4. /metrics: loopback by default, connections capped and timed out


def threads_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no thread count")


def test_idle_metrics_connections_cannot_take_the_servers_threads(launch) -> None:
    import socket
    import urllib.request

    from aggregator_service.server import _parser

    assert _parser().parse_args([]).metrics_listen.startswith("127.0.0.1:")
    aggregator = launch(federation_toml(clients=1), metrics_listen="127.0.0.1:0")
    port = int(aggregator.log().split("Prometheus metrics on port ")[1].split()[0])
    assert aggregator.process.running
    before = threads_of(aggregator.process.pid)
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(150)]
    try:
        time.sleep(1.0)
        assert threads_of(aggregator.process.pid) - before <= 8 + 2
        aggregator.submit("a", small(0.1), timeout=5)  # honest uploads still get threads
    finally:
        for connection in idle:
            connection.close()
    wait_for(lambda: threads_of(aggregator.process.pid) <= before + 2, "the metrics threads to end", 10)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert b"fedseg_submissions_total 1" in response.read()
