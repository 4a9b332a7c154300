"""The ``aggregator-service`` process: a gRPC server over a store directory.

:class:`Aggregator` sequences the plain functions of ``rounds.py`` under one lock and runs the
thread that closes rounds (on the last expected submission, or at the deadline). It holds no
federation state: everything it knows it reads from the store, so ``kill -9`` and a restart on
the same ``--store`` continue the same round.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

import codec
from aggregator_service import downloads, rounds
from aggregator_service.config import ConfigError, FederationConfig, load_federation_config
from aggregator_service.errors import AggregatorError, StoreError, StoreFull
from aggregator_service.metrics import Histogram, render, serve_metrics
from aggregator_service.security import Gate, RevocationList, StreamLimits, StreamSlots, env_flag, server_credentials
from aggregator_service.servicer import AggregatorServicer, add_to_server
from aggregator_service.store import Store
from protos.fedsegnet.v1 import aggregator_pb2 as pb

log = logging.getLogger("aggregator_service")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AggregatorService"].full_name
# Frames are at most 1 MiB; a message carries one frame plus a few fields.
MAX_MESSAGE_BYTES = 4 << 20
DEFAULT_LISTEN = "0.0.0.0:50051"
# Uploads verified at the same time (each holds one frame and one tensor's check in memory).
MAX_CONCURRENT_SPOOLS = 4
# Loopback unless the deployment says otherwise (the Kubernetes manifest binds 0.0.0.0:9090 for
# Prometheus and restricts it with a NetworkPolicy).
DEFAULT_METRICS_LISTEN = "127.0.0.1:9090"
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


def _store_failure(exc: OSError, what: str) -> StoreError:
    """A clear refusal for an I/O error of the store (the atomic writes left the old state)."""
    if exc.errno in _DISK_FULL:
        return StoreFull(f"{what} refused: the aggregator's store is out of disk space ({exc.strerror}); nothing "
                         "was stored, retry later")
    return StoreError(f"{what} failed: the aggregator's store cannot be written ({exc}); nothing was stored")


class Aggregator:
    """The round lifecycle over one store, safe to call from the server's threads."""

    def __init__(
        self,
        store: Store,
        config: FederationConfig,
        *,
        initial_model: Path | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.config = config
        self.clock = clock
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._stopping = False
        self.submission_latency = Histogram()
        self._spooling = threading.BoundedSemaphore(MAX_CONCURRENT_SPOOLS)
        # A site has one update per round: one spooling upload per site, so a few sites cannot
        # hold every spool slot with uploads they never finish.
        self._spooling_sites = StreamSlots(1, what="upload(s) spooling")
        with self._lock:
            rounds.initialize(store, config, initial_model, now=clock())

    # -- reads -------------------------------------------------------------------------------
    def current_round(self) -> rounds.RoundView:
        with self._lock:
            return rounds.current_round(self.store, self.config)

    def join(self, site: str) -> rounds.RoundView:
        with self._lock:
            try:
                return rounds.join(self.store, self.config, site)
            except OSError as exc:
                raise _store_failure(exc, f"join of {site!r}") from exc

    def status(self) -> dict:
        with self._lock:
            return rounds.status(self.store, self.config)

    def round_metrics(self, round_id: int) -> dict:
        with self._lock:
            return rounds.round_metrics(self.store, self.config, round_id)

    def download(
        self, round_id: int, site: str, *, have_round: int = 0, have_digest: str = ""
    ) -> tuple[downloads.ModelDownload, Iterator[bytes]]:
        """The model of ``round_id`` (0: the current one) as frames: a lossless delta from the
        round the site holds where that is smaller (see ``downloads.choose_download``), else the
        full model. Frames are counted in bytes out as they are sent."""
        with self._lock:
            resolved, path, digest = rounds.model_for_download(self.store, round_id)
        # Outside the lock: building a delta the first time reads two models.
        download = downloads.choose_download(
            self.store, resolved, path, digest, have_round=have_round, have_digest=have_digest
        )
        return download, self._counted(downloads.iter_frames(download.path))

    def _counted(self, frames: Iterator[bytes]) -> Iterator[bytes]:
        sent = 0
        try:
            for frame in frames:
                sent += len(frame)
                yield frame
        finally:
            try:
                with self._lock:
                    rounds.record_bytes_out(self.store, sent)
            except (OSError, StoreError):  # the model was sent: a lost count must not fail the download
                log.exception("could not count %d bytes sent", sent)

    # -- writes ------------------------------------------------------------------------------
    def submit(self, header: rounds.UpdateHeader, parts: Iterable[bytes | rounds.UpdateCommit]) -> rounds.Receipt:
        # Spooling and verifying run outside the lock: uploads from many sites proceed in parallel.
        started = time.monotonic()
        try:
            # A few uploads spool at once; the others wait here while HTTP/2 flow control holds
            # their bytes at the senders, so memory stays flat in the number of sites.
            with self._spooling_sites.hold(header.site), self._spooling:
                spool, record = rounds.spool_update(self.store, self.config, header, parts)
            with self._lock:
                receipt = rounds.commit_update(self.store, self.config, spool, record, now=self.clock())
                self._wake.notify_all()
        except OSError as exc:  # rounds removes the spool file; the commit marker is written last
            raise _store_failure(exc, f"update from {header.site!r} for round {header.round_id}") from exc
        self.submission_latency.observe(time.monotonic() - started)
        log.info(
            "round %d: %s update from %s (%d bytes, %d submission(s))",
            receipt.round_id, "duplicate" if receipt.duplicate else "committed", header.site,
            receipt.bytes_received, receipt.submissions,
        )
        return receipt

    def prometheus_text(self) -> str:
        try:
            last = self.round_metrics(0)
        except rounds.NotFound:  # no round has closed yet (rounds raises errors.NotFound)
            last = None
        return render(self.status(), self.submission_latency, last)

    def count_rejection(self, error: AggregatorError) -> None:
        try:
            with self._lock:
                rounds.record_rejection(self.store, error.reason)
        except OSError:  # a full disk must not turn a clear refusal into an internal error
            log.exception("could not count a rejection")

    def close_if_due(self) -> dict | None:
        with self._lock:
            if rounds.due_to_close(self.store, self.config, now=self.clock()):
                return rounds.close_round(self.store, self.config, now=self.clock())
        return None

    # -- the closer thread -------------------------------------------------------------------
    def run_closer(self, poll_s: float = 0.5) -> None:
        """Close rounds when due until :meth:`stop`; woken at once by each commit.

        The first check runs at once: a process restarted after a crash finishes a round that
        was already due (all submissions in, or the deadline passed) without waiting for a tick.
        """
        while True:
            try:
                self.close_if_due()
            except Exception:  # keep serving; the next tick retries the close
                log.exception("closing the round failed; retrying")
                time.sleep(poll_s)
            with self._lock:
                if self._stopping:
                    return
                self._wake.wait(timeout=poll_s)
                if self._stopping:
                    return

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._wake.notify_all()


class Load:
    """Aggregator calls in progress against the worker threads that serve them.

    When every worker is busy the server cannot take a request (it would queue), so the health
    status of the main port, and of the probe port that shares it, turns NOT_SERVING until one
    is free again: a probe then sees what a site would.
    """

    def __init__(self, capacity: int, health_servicer: health.HealthServicer) -> None:
        self.capacity = capacity
        self._health = health_servicer
        self._lock = threading.Lock()
        self.active = 0
        self.saturated = False

    def _set(self, saturated: bool) -> None:
        if saturated == self.saturated:
            return
        self.saturated = saturated
        status = health_pb2.HealthCheckResponse.NOT_SERVING if saturated else health_pb2.HealthCheckResponse.SERVING
        for name in ("", SERVICE_NAME):
            self._health.set(name, status)
        if saturated:
            log.warning("all %d worker threads are busy: health is NOT_SERVING until one is free", self.capacity)

    def __enter__(self) -> None:
        with self._lock:
            self.active += 1
            self._set(self.active >= self.capacity)

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self.active -= 1
            self._set(self.active >= self.capacity)

    def track(self, handler: Callable, *, streaming: bool = False) -> Callable:
        """``handler`` counted while it runs (a response stream: until it ends)."""
        if streaming:
            def stream(request: object, context: grpc.ServicerContext) -> Iterator[object]:
                with self:
                    yield from handler(request, context)
            return stream

        def unary(request: object, context: grpc.ServicerContext) -> object:
            with self:
                return handler(request, context)
        return unary


@dataclass
class RunningServer:
    """A started server: its port, the aggregator, and how to stop both.

    ``health_server``/``health_port`` are the plaintext health-only server of ``health_listen``
    (None when there is none); it shares ``health`` with the main server.
    """

    server: grpc.Server
    aggregator: Aggregator
    port: int
    closer: threading.Thread
    health: health.HealthServicer
    health_server: grpc.Server | None = None
    health_port: int | None = None

    def stop(self, grace: float | None = 1.0) -> None:
        # NOT_SERVING first, on both ports (one servicer): probes and watchers see the shutdown
        # while in-flight calls finish within ``grace``.
        self.health.enter_graceful_shutdown()
        self.aggregator.stop()
        stopping = [self.server.stop(grace)]
        if self.health_server is not None:
            stopping.append(self.health_server.stop(grace))
        for event in stopping:
            event.wait()
        self.closer.join(timeout=5)


REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def _enable_reflection(services: tuple[str, ...], server: grpc.Server) -> None:
    """Serve server reflection as ``grpc.reflection.v1`` (what current grpcurl and other tools ask
    first) and ``v1alpha``. grpcio-reflection implements only v1alpha; v1 is the same protocol with
    the same messages under another package name, so the v1alpha servicer answers both, and a v1
    copy of its file descriptor lets tools describe the v1 service too."""
    pool = descriptor_pool.Default()
    try:
        pool.FindServiceByName(REFLECTION_V1)
    except KeyError:
        v1 = descriptor_pb2.FileDescriptorProto.FromString(reflection_pb2.DESCRIPTOR.serialized_pb)
        v1.name, v1.package = "grpc/reflection/v1/reflection.proto", "grpc.reflection.v1"
        v1.options.Clear()
        old, new = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."
        for message in v1.message_type:
            for field in message.field:
                if field.HasField("type_name"):
                    field.type_name = field.type_name.replace(old, new)
        for method in v1.service[0].method:
            method.input_type, method.output_type = (method.input_type.replace(old, new),
                                                     method.output_type.replace(old, new))
        pool.AddSerializedFile(v1.SerializeToString())
    names = (*services, REFLECTION_V1, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    handler = grpc.stream_stream_rpc_method_handler(
        reflection.ReflectionServicer(names).ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": handler}),)
    )


def _bind(server: grpc.Server, address: str, credentials: grpc.ServerCredentials | None = None) -> int:
    """Bind ``address`` (plaintext without ``credentials``); the bound port, or OSError naming it."""
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError as exc:  # grpcio raises for an address in use or one that does not resolve
        raise OSError(f"could not bind {address}: {exc}") from exc
    if port == 0:  # older grpcio reports a failed bind this way
        raise OSError(f"could not bind {address}")
    return port


def _health_only_server(servicer: health.HealthServicer, address: str) -> tuple[grpc.Server, int]:
    """A plaintext server on ``address`` with ``grpc.health.v1.Health`` and nothing else.

    For the kubelet's native ``grpc:`` probes, which cannot present a client certificate and so
    cannot pass the main port's mutual TLS. Health says only SERVING or NOT_SERVING, so serving
    it in the clear gives away nothing a site could not learn; no reflection, no aggregator RPC.
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="grpc-health"),
        # As for the main server: a port in use (the main port included) fails to bind instead
        # of silently sharing its connections.
        options=[("grpc.so_reuseport", 0)],
    )
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    return server, _bind(server, address)


def serve(
    aggregator: Aggregator,
    listen: str = DEFAULT_LISTEN,
    *,
    max_workers: int = 16,
    credentials: grpc.ServerCredentials | None = None,
    gate: Gate | None = None,
    health_listen: str | None = None,
) -> RunningServer:
    """Start the gRPC server (aggregator, health, reflection) and the closer thread.

    ``credentials=None`` serves plaintext (tests, ``--insecure``); the command line refuses that
    unless asked explicitly. ``gate`` decides who may call (default: with ``credentials``, a
    client certificate is required and its CN is the caller's site; without, sites are trusted).
    ``health_listen`` (an address, port 0 picks one) also serves the same health service, and
    only it, in plaintext there (see :func:`_health_only_server`).

    Raises:
        OSError: an address cannot be bound; nothing is left running.
    """
    if gate is None:
        gate = Gate(require_identity=credentials is not None)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # BDP probing grows each stream's receive window towards the link's bandwidth-delay
            # product: on loopback that lets waiting uploads park megabytes in the server.
            ("grpc.http2.bdp_probe", 0),
            # gRPC binds with SO_REUSEPORT by default: a second aggregator started on the same
            # port would silently take half the connections. Refuse to bind instead.
            ("grpc.so_reuseport", 0),
        ],
    )
    health_servicer = health.HealthServicer()
    load = Load(max_workers, health_servicer)
    add_to_server(AggregatorServicer(aggregator, gate), server, track=load.track)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    _enable_reflection((SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name), server)
    # Both addresses are bound before either server starts, the health one first: grpcio frees
    # a bound port only by starting and stopping its server, which for the health-only server
    # exposes nothing if the main address then fails.
    health_server, health_port = None, None
    if health_listen is not None:
        health_server, health_port = _health_only_server(health_servicer, health_listen)
    try:
        port = _bind(server, listen, credentials)
    except OSError:
        if health_server is not None:
            health_servicer.enter_graceful_shutdown()  # NOT_SERVING for the instant it runs
            health_server.start()
            health_server.stop(None).wait()
        raise
    server.start()
    if health_server is not None:
        health_server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    closer = threading.Thread(target=aggregator.run_closer, name="round-closer", daemon=True)
    closer.start()
    return RunningServer(server, aggregator, port, closer, health_servicer, health_server, health_port)


def _parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(
        prog="aggregator-service",
        description="FedSegNet aggregator: runs the federation's rounds over gRPC; all state lives in --store.",
    )
    p.add_argument("--config", default=env("FEDSEG_CONFIG"), help="federation TOML file [env FEDSEG_CONFIG]")
    p.add_argument("--store", default=env("FEDSEG_STORE", "./aggregator-store"),
                   help="directory holding all state (a PersistentVolume on Kubernetes) [env FEDSEG_STORE]")
    p.add_argument("--listen", default=env("FEDSEG_LISTEN", DEFAULT_LISTEN),
                   help=f"gRPC address; port 0 picks a free port [env FEDSEG_LISTEN, default {DEFAULT_LISTEN}]")
    p.add_argument("--metrics-listen", default=env("FEDSEG_METRICS_LISTEN", DEFAULT_METRICS_LISTEN),
                   help="Prometheus /metrics address; 'off' disables it "
                   f"[env FEDSEG_METRICS_LISTEN, default {DEFAULT_METRICS_LISTEN}]")
    p.add_argument("--health-listen", default=env("FEDSEG_HEALTH_LISTEN", "off"),
                   help="also serve the gRPC health service (only it) in PLAINTEXT here, for probes that "
                   "cannot pass mutual TLS, such as the kubelet's; 'off' disables it "
                   "[env FEDSEG_HEALTH_LISTEN, default off]")
    p.add_argument("--initial-model", default=env("FEDSEG_INITIAL_MODEL"),
                   help="model file round 1 starts from, for a new store (fedseg init-model) [env FEDSEG_INITIAL_MODEL]")
    p.add_argument("--port-file", help="write the bound port to this file once serving (for port 0)")
    tls = p.add_argument_group("transport security (mutual TLS; see SECURITY.md and `fedseg certs`)")
    tls.add_argument("--tls-cert", default=env("FEDSEG_TLS_CERT"),
                     help="the aggregator's certificate (PEM) [env FEDSEG_TLS_CERT]")
    tls.add_argument("--tls-key", default=env("FEDSEG_TLS_KEY"), help="its private key (PEM) [env FEDSEG_TLS_KEY]")
    tls.add_argument("--tls-ca", default=env("FEDSEG_TLS_CA"),
                     help="the federation CA that signs site certificates (PEM) [env FEDSEG_TLS_CA]")
    tls.add_argument("--insecure", action="store_true", default=env_flag("FEDSEG_INSECURE"),
                     help="serve plaintext gRPC and trust the site names requests claim: development on one "
                     "machine only [env FEDSEG_INSECURE=1]")
    tls.add_argument("--revoked", default=env("FEDSEG_REVOKED"),
                     help="revocation file: one site name or serial:HEX per line, re-read when it changes "
                     "[env FEDSEG_REVOKED]")
    limits = p.add_argument_group("limits")
    limits.add_argument("--max-upload-seconds", type=float,
                        default=env("FEDSEG_MAX_UPLOAD_SECONDS", str(StreamLimits.max_upload_seconds)),
                        help="an upload must commit within this many seconds of its first message "
                        f"[env FEDSEG_MAX_UPLOAD_SECONDS, default {StreamLimits.max_upload_seconds:g}]")
    limits.add_argument("--header-timeout-seconds", type=float,
                        default=env("FEDSEG_HEADER_TIMEOUT_SECONDS", str(StreamLimits.header_timeout_seconds)),
                        help="an upload's header must arrive within this many seconds of the call "
                        f"[env FEDSEG_HEADER_TIMEOUT_SECONDS, default {StreamLimits.header_timeout_seconds:g}]")
    limits.add_argument("--idle-timeout-seconds", type=float,
                        default=env("FEDSEG_IDLE_TIMEOUT_SECONDS", str(StreamLimits.idle_timeout_seconds)),
                        help="an upload that sends nothing for this long is cut off and loses its slot "
                        f"[env FEDSEG_IDLE_TIMEOUT_SECONDS, default {StreamLimits.idle_timeout_seconds:g}]")
    limits.add_argument("--max-workers", type=int, default=env("FEDSEG_MAX_WORKERS", "16"),
                        help="gRPC worker threads; when all are busy, health reports NOT_SERVING "
                        "[env FEDSEG_MAX_WORKERS, default 16]")
    limits.add_argument("--max-streams-per-site", type=int,
                        default=env("FEDSEG_MAX_STREAMS_PER_SITE", str(StreamLimits.max_streams_per_site)),
                        help="concurrent uploads and downloads per site "
                        f"[env FEDSEG_MAX_STREAMS_PER_SITE, default {StreamLimits.max_streams_per_site}]")
    p.add_argument("--log-level", default=env("FEDSEG_LOG_LEVEL", "INFO"),
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="[env FEDSEG_LOG_LEVEL]")
    return p


def transport_security(args: argparse.Namespace) -> tuple[grpc.ServerCredentials | None, Gate]:
    """Credentials and gate from the command line; refuses plaintext unless ``--insecure`` says so.

    Raises:
        ValueError: a partial TLS configuration, TLS together with ``--insecure``, neither, or a
            file that cannot be used; the message says what to pass.
    """
    given = {name: getattr(args, name) for name in ("tls_cert", "tls_key", "tls_ca")}
    flags = ", ".join(f"--{name.replace('_', '-')}" for name, value in given.items() if not value)
    revocations = RevocationList(args.revoked) if args.revoked else None
    limits = StreamLimits(max_upload_seconds=args.max_upload_seconds, max_streams_per_site=args.max_streams_per_site,
                          header_timeout_seconds=args.header_timeout_seconds,
                          idle_timeout_seconds=args.idle_timeout_seconds,
                          max_pending_headers=max(1, args.max_workers // 4))
    if any(given.values()):
        if not all(given.values()):
            raise ValueError(f"mutual TLS needs --tls-cert, --tls-key and --tls-ca; missing {flags}")
        if args.insecure:
            raise ValueError("--insecure contradicts --tls-cert/--tls-key/--tls-ca; give one or the other")
        credentials = server_credentials(args.tls_cert, args.tls_key, args.tls_ca)
        return credentials, Gate(require_identity=True, revocations=revocations, limits=limits)
    if not args.insecure:
        raise ValueError(
            "refusing to serve without transport security: pass --tls-cert, --tls-key and --tls-ca "
            "(make them with `fedseg certs init|server|site`), or --insecure for a development "
            "federation on one trusted machine"
        )
    log.warning(
        "serving PLAINTEXT gRPC (--insecure): updates travel unencrypted and any peer can act as any "
        "site; use mutual TLS outside a single trusted machine"
    )
    return None, Gate(require_identity=False, revocations=revocations, limits=limits)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.config:
        _parser().error("--config is required (or set FEDSEG_CONFIG)")
    try:
        credentials, gate = transport_security(args)
    except ValueError as exc:
        print(f"aggregator-service: {exc}", file=sys.stderr)
        return 2
    try:
        config = load_federation_config(args.config)
        aggregator = Aggregator(
            Store(args.store), config, initial_model=Path(args.initial_model) if args.initial_model else None
        )
        running = serve(aggregator, args.listen, credentials=credentials, gate=gate, max_workers=args.max_workers,
                        health_listen=None if args.health_listen == "off" else args.health_listen)
        if running.health_port is not None:
            log.info("gRPC health service (plaintext, health only) on port %d", running.health_port)
        metrics_server = None
        if args.metrics_listen != "off":
            metrics_server = serve_metrics(args.metrics_listen, aggregator.prometheus_text)
            log.info("Prometheus metrics on port %d /metrics", metrics_server.server_address[1])
    except (ConfigError, StoreError, OSError) as exc:
        print(f"aggregator-service: {exc}", file=sys.stderr)
        return 2
    log.info("federation %r serving on port %d (%s), store %s", config.federation_id, running.port,
             "mutual TLS" if credentials else "PLAINTEXT", args.store)
    if args.port_file:
        codec.atomic_write_text(args.port_file, str(running.port))
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    log.info("shutting down")
    running.stop(grace=5.0)
    if metrics_server is not None:
        metrics_server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
