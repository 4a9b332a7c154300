"""The gRPC servicer: requests in, one call to the aggregator, responses or a status out.

Nothing here decides anything: every method turns its request into domain values, calls one
method of :class:`aggregator_service.server.Aggregator`, and maps an ``AggregatorError`` to its
gRPC status with the error's message (the reason is counted by the aggregator).
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Iterator, TypeVar

import grpc

from aggregator_service import wire
from aggregator_service.errors import AggregatorError, InvalidUpdate
from protos.fedsegnet.v1 import aggregator_pb2 as pb
from protos.fedsegnet.v1 import aggregator_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])


def _statuses(method: F) -> F:
    """Map domain errors to gRPC statuses (for unary responses and response streams alike)."""

    @functools.wraps(method)
    def wrapper(self: "AggregatorServicer", request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except AggregatorError as exc:
            self.aggregator.count_rejection(exc)
            log.warning("%s refused (%s): %s", method.__name__, exc.reason, exc)
            context.abort(exc.code, str(exc))

    return wrapper  # type: ignore[return-value]


class AggregatorServicer(pb_grpc.AggregatorServiceServicer):
    def __init__(self, aggregator: Any) -> None:
        self.aggregator = aggregator

    @_statuses
    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinResponse:
        view = self.aggregator.join(request.site)
        return pb.JoinResponse(
            federation_id=self.aggregator.config.federation_id,
            round=wire.round_to_proto(view, self.aggregator.config),
        )

    @_statuses
    def GetRound(self, request: pb.GetRoundRequest, context: grpc.ServicerContext) -> pb.GetRoundResponse:
        view = self.aggregator.current_round()
        return pb.GetRoundResponse(round=wire.round_to_proto(view, self.aggregator.config))

    def DownloadModel(
        self, request: pb.DownloadModelRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.DownloadModelResponse]:
        try:
            round_id, frames, digest = self.aggregator.download(request.round_id, request.site)
        except AggregatorError as exc:
            self.aggregator.count_rejection(exc)
            context.abort(exc.code, str(exc))
        for index, frame in enumerate(frames):
            yield pb.DownloadModelResponse(round_id=round_id, index=index, frame=frame, model_digest=digest)

    @_statuses
    def SubmitUpdate(
        self, request_iterator: Iterator[pb.SubmitUpdateRequest], context: grpc.ServicerContext
    ) -> pb.SubmitUpdateResponse:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("part") != "header":
            raise InvalidUpdate("an upload must start with its header message", reason="bad_stream")
        receipt = self.aggregator.submit(wire.header_from_proto(first.header), wire.upload_parts(request_iterator))
        return pb.SubmitUpdateResponse(
            round_id=receipt.round_id,
            digest=receipt.digest,
            bytes_received=receipt.bytes_received,
            duplicate=receipt.duplicate,
            submissions=receipt.submissions,
        )

    @_statuses
    def GetStatus(self, request: pb.GetStatusRequest, context: grpc.ServicerContext) -> pb.GetStatusResponse:
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
        m = self.aggregator.round_metrics(request.round_id)
        result = m["result"] or {}
        response = pb.GetRoundMetricsResponse(
            round_id=m["round_id"],
            state=pb.ROUND_STATE_CLOSED if m["closed"] else pb.ROUND_STATE_OPEN,
            sites=[wire.site_metrics_to_proto(site) for site in m["sites"]],
            aggregate=wire.metrics_to_proto(m["aggregate"], {}),
            global_model_digest=result.get("global_model_digest", ""),
            close_seconds=result.get("close_seconds", 0.0),
        )
        if "closed_at" in result:
            response.closed_at.CopyFrom(wire.timestamp(result["closed_at"]))
        return response
