"""The gRPC servicer: requests in, one call to the aggregator, responses or a status out.

Nothing here decides anything: every method asks the :class:`~aggregator_service.security.Gate`
which site the call acts for (the certificate's, under mutual TLS), turns its request into
domain values, calls one method of :class:`aggregator_service.server.Aggregator`, and maps an
``AggregatorError`` to its gRPC status with the error's message. Every refusal is counted under
its reason (``GetStatus.rejections``) and logged.

Requests are parsed by :func:`add_to_server`'s tolerant deserializers: bytes that are not a valid
message reach the servicer as :class:`Malformed` and are refused like any other bad input
(gRPC's own handling would answer ``INTERNAL`` and count nothing).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from aggregator_service import wire
from aggregator_service.errors import AggregatorError, BrokenStream, InvalidUpdate, MalformedMessage
from aggregator_service.security import RETRYABLE_METADATA, Gate
from protos.fedsegnet.v1 import aggregator_pb2 as pb
from protos.fedsegnet.v1 import aggregator_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AggregatorService"].full_name


@dataclass(frozen=True)
class Malformed:
    """A request whose bytes did not parse as its message type."""

    message_type: str
    error: str


def _tolerant(message_type: type[Message]) -> Callable[[bytes], Message | Malformed]:
    def parse(data: bytes) -> Message | Malformed:
        try:
            return message_type.FromString(data)
        except (DecodeError, ValueError, RuntimeError) as exc:
            return Malformed(message_type.DESCRIPTOR.full_name, str(exc) or exc.__class__.__name__)

    return parse


def _parsed(request: Any) -> Any:
    if isinstance(request, Malformed):
        raise MalformedMessage(f"request is not a valid {request.message_type} ({request.error})")
    return request


def _parsed_stream(requests: Iterator[Any]) -> Iterator[Any]:
    for request in requests:
        yield _parsed(request)


def _statuses(method: F) -> F:
    """Map domain errors to gRPC statuses (for unary responses and response streams alike)."""

    @functools.wraps(method)
    def wrapper(self: "AggregatorServicer", request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except AggregatorError as exc:
            self._refuse(method.__name__, exc, context)

    return wrapper  # type: ignore[return-value]


def _peer_gone(context: grpc.ServicerContext, wait_s: float = 1.0) -> bool:
    """Whether the call was cancelled (the client died or the connection dropped).

    A killed client's stream can look like a normal end to the request iterator: gRPC reports the
    end of the messages and the cancellation separately, in either order. So an upload that ends
    without its commit waits a moment for the cancellation before it is counted as a client's
    mistake (``incomplete_stream``) rather than a broken stream.
    """
    deadline = time.monotonic() + wait_s
    while context.is_active():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


class AggregatorServicer(pb_grpc.AggregatorServiceServicer):
    def __init__(self, aggregator: Any, gate: Gate | None = None) -> None:
        self.aggregator = aggregator
        self.gate = gate or Gate()

    def _refuse(self, rpc: str, exc: AggregatorError, context: grpc.ServicerContext) -> None:
        self.aggregator.count_rejection(exc)
        log.warning("%s from %s refused (%s): %s", rpc, context.peer(), exc.reason, exc)
        if getattr(exc, "retryable", False):
            context.set_trailing_metadata((RETRYABLE_METADATA,))
        context.abort(exc.code, str(exc))

    @_statuses
    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinResponse:
        site = self.gate.authorize(context, _parsed(request).site)
        view = self.aggregator.join(site)
        return pb.JoinResponse(
            federation_id=self.aggregator.config.federation_id,
            round=wire.round_to_proto(view, self.aggregator.config),
        )

    @_statuses
    def GetRound(self, request: pb.GetRoundRequest, context: grpc.ServicerContext) -> pb.GetRoundResponse:
        self.gate.authorize(context, _parsed(request).site)
        view = self.aggregator.current_round()
        return pb.GetRoundResponse(round=wire.round_to_proto(view, self.aggregator.config))

    def DownloadModel(
        self, request: pb.DownloadModelRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.DownloadModelResponse]:
        try:
            site = self.gate.authorize(context, _parsed(request).site)
            # Anonymous operator downloads (insecure mode) share one slot pool.
            with self.gate.stream(site or "_anonymous"):
                download, frames = self.aggregator.download(
                    request.round_id, site, have_round=request.have_round, have_digest=request.have_digest
                )
                for index, frame in enumerate(frames):
                    yield pb.DownloadModelResponse(
                        round_id=download.round_id, index=index, frame=frame,
                        model_digest=download.model_digest, delta_from_round=download.delta_from_round,
                        final_model=download.round_id > self.aggregator.config.rounds,
                    )
        except AggregatorError as exc:
            self._refuse("DownloadModel", exc, context)

    @_statuses
    def SubmitUpdate(
        self, request_iterator: Iterator[pb.SubmitUpdateRequest], context: grpc.ServicerContext
    ) -> pb.SubmitUpdateResponse:
        # Who calls, and the per-peer limits, are settled before anything is read from the
        # client: under mutual TLS the certificate names the site (its stream slot is held while
        # the header arrives); in insecure mode only the peer's address is known until then. A
        # header must come within header_timeout_seconds, every later message within
        # idle_timeout_seconds, and the whole upload within max_upload_seconds.
        identity = self.gate.authorize(context, "")
        bounded: Any = None
        try:
            with self.gate.stream(identity) if identity else contextlib.nullcontext():
                with self.gate.awaiting_header(identity or context.peer()) as header_s:
                    bounded = self.gate.bounded_upload(request_iterator, header_s)
                    requests = _parsed_stream(bounded)
                    first = next(requests, None)
                if first is None or first.WhichOneof("part") != "header":
                    raise InvalidUpdate("an upload must start with its header message", reason="bad_stream")
                site = self.gate.authorize(context, first.header.site)
                with self.gate.stream(site) if not identity else contextlib.nullcontext():
                    receipt = self.aggregator.submit(wire.header_from_proto(first.header), wire.upload_parts(requests))
        except InvalidUpdate as exc:
            if exc.reason == "incomplete_stream" and _peer_gone(context):
                raise BrokenStream(f"the upload stream broke before its commit message ({exc})") from exc
            raise
        finally:
            if bounded is not None:
                bounded.close()  # stops the reader thread now, not whenever the generator is collected
        return pb.SubmitUpdateResponse(
            round_id=receipt.round_id,
            digest=receipt.digest,
            bytes_received=receipt.bytes_received,
            duplicate=receipt.duplicate,
            submissions=receipt.submissions,
        )

    @_statuses
    def GetStatus(self, request: pb.GetStatusRequest, context: grpc.ServicerContext) -> pb.GetStatusResponse:
        _parsed(request)
        self.gate.authorize(context, "")
        s = self.aggregator.status()
        return pb.GetStatusResponse(
            federation_id=s["federation_id"],
            round=wire.round_to_proto(s["round"], self.aggregator.config),
            rounds_completed=s["rounds_completed"],
            sites_seen=s["sites_seen"],
            submissions_total=s["submissions_total"],
            bytes_in=s["bytes_in"],
            bytes_out=s["bytes_out"],
            rejections=s["rejections"],
            strategy=s["strategy"],
        )

    @_statuses
    def GetRoundMetrics(
        self, request: pb.GetRoundMetricsRequest, context: grpc.ServicerContext
    ) -> pb.GetRoundMetricsResponse:
        self.gate.authorize(context, "")
        m = self.aggregator.round_metrics(_parsed(request).round_id)
        result = m["result"] or {}
        response = pb.GetRoundMetricsResponse(
            round_id=m["round_id"],
            state=pb.ROUND_STATE_CLOSED if m["closed"] else pb.ROUND_STATE_OPEN,
            sites=[wire.site_metrics_to_proto(site) for site in m["sites"]],
            aggregate=wire.metrics_to_proto(m["aggregate"], m["aggregate_extra"], m["aggregate_cases"]),
            global_model_digest=result.get("global_model_digest", ""),
            close_seconds=result.get("close_seconds", 0.0),
        )
        if "closed_at" in result:
            response.closed_at.CopyFrom(wire.timestamp(result["closed_at"]))
        return response


def add_to_server(
    servicer: AggregatorServicer, server: grpc.Server, *, track: Callable[..., Any] | None = None
) -> None:
    """Register the service like the generated ``add_AggregatorServiceServicer_to_server``, but
    with deserializers that hand malformed requests to the servicer instead of failing in gRPC.

    ``track(handler, streaming=...)`` wraps each handler (the server counts calls in progress).
    """
    def tracked(handler: Callable[..., Any], streaming: bool = False) -> Callable[..., Any]:
        return track(handler, streaming=streaming) if track is not None else handler

    handlers = {
        "Join": grpc.unary_unary_rpc_method_handler(
            tracked(servicer.Join), _tolerant(pb.JoinRequest), pb.JoinResponse.SerializeToString
        ),
        "GetRound": grpc.unary_unary_rpc_method_handler(
            tracked(servicer.GetRound), _tolerant(pb.GetRoundRequest), pb.GetRoundResponse.SerializeToString
        ),
        "DownloadModel": grpc.unary_stream_rpc_method_handler(
            tracked(servicer.DownloadModel, True), _tolerant(pb.DownloadModelRequest), pb.DownloadModelResponse.SerializeToString
        ),
        "SubmitUpdate": grpc.stream_unary_rpc_method_handler(
            tracked(servicer.SubmitUpdate), _tolerant(pb.SubmitUpdateRequest), pb.SubmitUpdateResponse.SerializeToString
        ),
        "GetStatus": grpc.unary_unary_rpc_method_handler(
            tracked(servicer.GetStatus), _tolerant(pb.GetStatusRequest), pb.GetStatusResponse.SerializeToString
        ),
        "GetRoundMetrics": grpc.unary_unary_rpc_method_handler(
            tracked(servicer.GetRoundMetrics), _tolerant(pb.GetRoundMetricsRequest), pb.GetRoundMetricsResponse.SerializeToString
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
