"""The wire contract's rules of docs/protocol.md that the other test files do not already pin, over
real gRPC: idempotent retries after a close, duplicate tensors, the advisory CodecSpec, the final
model's download, the round metrics' aggregate, reflection v1, and the one list of rejection
reasons (code, proto comment and spec agree)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha import reflection_pb2
from numpy_federation import (
    Served,
    config,
    delta,
    digest,
    frames_of,
    header_proto,
    start,
    upload_requests,
)

import codec
from aggregator_service.errors import REJECTION_REASONS
from protos.fedsegnet.v1 import aggregator_pb2 as pb

REPO = Path(__file__).resolve().parents[2]
INITIAL = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([0.5, -0.5], dtype=np.float32)}
pytestmark = pytest.mark.slow  # starts gRPC servers


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    s = start(tmp_path, config(rounds=1), INITIAL)
    yield s
    s.stop()


def wait_finished(served: Served) -> pb.Round:
    return served.final_model(config(rounds=1)) and served.stub.GetRound(pb.GetRoundRequest(), timeout=10).round


def test_a_retry_of_the_commit_that_closed_the_round_gets_its_receipt(served: Served) -> None:
    served.submit("a", 1, delta("a", 1, INITIAL))
    closing = served.submit("b", 1, delta("b", 1, INITIAL))
    assert wait_finished(served).state == pb.ROUND_STATE_FINISHED

    retry = served.submit("b", 1, delta("b", 1, INITIAL))

    assert (retry.duplicate, retry.round_id, retry.digest, retry.submissions) == (True, 1, closing.digest, 2)
    assert served.rejections() == {}
    with pytest.raises(grpc.RpcError) as refused:  # another update for the closed round is still refused
        served.submit("b", 1, delta("c", 1, INITIAL))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "it is not the update 'b' committed" in refused.value.details()
    assert served.rejections() == {"wrong_round": 1}


def test_the_same_tensor_twice_is_refused_as_a_duplicate(served: Served) -> None:
    frames = frames_of(delta("a", 1, INITIAL))
    twice = [frames[0], frames[0], *frames[1:]]

    with pytest.raises(grpc.RpcError) as refused:
        served.stub.SubmitUpdate(upload_requests("a", 1, twice), timeout=30)

    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tensor 'w' is sent twice (frame 1); each model tensor is sent once" in refused.value.details()
    assert served.rejections() == {"duplicate_tensor": 1}


def test_the_rounds_codec_spec_is_advisory(served: Served) -> None:
    asked = served.stub.GetRound(pb.GetRoundRequest(), timeout=10).round.config.codec
    other = codec.CodecSpec(top_k_fraction=0.5, quantization="int4", block_size=2)
    assert codec.CodecSpec.from_message(asked) != other
    frames = frames_of(delta("a", 1, INITIAL), other)
    header = header_proto("a", 1)
    header.codec.CopyFrom(pb.CodecSpec(**other.to_fields()))

    def requests() -> Iterator[pb.SubmitUpdateRequest]:
        yield pb.SubmitUpdateRequest(header=header)
        yield from (pb.SubmitUpdateRequest(frame=f) for f in frames)
        yield pb.SubmitUpdateRequest(commit=pb.UpdateCommit(chunk_count=len(frames), digest=digest(frames)))

    receipt = served.stub.SubmitUpdate(requests(), timeout=30)

    assert (receipt.duplicate, receipt.submissions) == (False, 1)
    assert served.store.read_submission(1, "a")["codec"]["quantization"] == "int4"  # recorded as sent


def _download(served: Served, round_id: int) -> list[pb.DownloadModelResponse]:
    return list(served.stub.DownloadModel(pb.DownloadModelRequest(round_id=round_id, site="a"), timeout=30))


def test_the_final_model_is_model_total_rounds_plus_one(served: Served) -> None:
    served.submit("a", 1, delta("a", 1, INITIAL))
    served.submit("b", 1, delta("b", 1, INITIAL))
    finished = wait_finished(served)

    current, numbered, first = _download(served, 0), _download(served, 2), _download(served, 1)

    assert (finished.round_id, finished.total_rounds) == (1, 1)
    assert {(c.round_id, c.final_model, c.delta_from_round) for c in current} == {(2, True, 0)}
    assert [c.frame for c in current] == [c.frame for c in numbered]
    assert current[0].model_digest == finished.global_model_digest == digest([c.frame for c in current])
    metrics = served.stub.GetRoundMetrics(pb.GetRoundMetricsRequest(round_id=1), timeout=10)
    assert metrics.global_model_digest == finished.global_model_digest
    assert {(c.round_id, c.final_model) for c in first} == {(1, False)}
    with pytest.raises(grpc.RpcError) as refused:
        _download(served, 3)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND


def test_the_round_metrics_aggregate_sums_cases_and_averages_extra(served: Served) -> None:
    for site, n, cases, extra in (("a", 1, 4, {"dice/1": 0.2, "only_a": 5.0}), ("b", 3, 6, {"dice/1": 0.6})):
        header = header_proto(site, 1, n)
        header.metrics.validation_cases = cases
        header.metrics.extra.update(extra)
        frames = frames_of(delta(site, 1, INITIAL))

        def requests() -> Iterator[pb.SubmitUpdateRequest]:
            yield pb.SubmitUpdateRequest(header=header)  # noqa: B023 - consumed before the next turn
            yield from (pb.SubmitUpdateRequest(frame=f) for f in frames)  # noqa: B023
            yield pb.SubmitUpdateRequest(commit=pb.UpdateCommit(chunk_count=len(frames), digest=digest(frames)))  # noqa: B023

        served.stub.SubmitUpdate(requests(), timeout=30)
    wait_finished(served)

    aggregate = served.stub.GetRoundMetrics(pb.GetRoundMetricsRequest(round_id=1), timeout=10).aggregate

    assert aggregate.validation_cases == 10
    assert dict(aggregate.extra) == pytest.approx({"dice/1": (1 * 0.2 + 3 * 0.6) / 4, "only_a": 5.0})
    assert aggregate.dice == pytest.approx(0.5) and aggregate.hd95 == pytest.approx(3.0)


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_server_reflection_is_served_as_v1_and_v1alpha(served: Served, version: str) -> None:
    call = served.channel.stream_stream(
        f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    asks = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="fedsegnet.v1.AggregatorService"),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="grpc.reflection.v1.ServerReflection"),
    ]

    listed, described, v1 = list(call(iter(asks), timeout=10))

    names = {s.name for s in listed.list_services_response.service}
    assert {"fedsegnet.v1.AggregatorService", "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection", "grpc.health.v1.Health"} <= names
    assert described.file_descriptor_response.file_descriptor_proto  # the proto, for grpcurl describe
    assert b"grpc.reflection.v1" in v1.file_descriptor_response.file_descriptor_proto[0]


def test_the_rejection_reasons_are_one_list_in_code_proto_and_spec() -> None:
    used = set()
    for path in (REPO / "aggregator_service").glob("*.py"):
        used |= set(re.findall(r'reason\s*(?:=|:\s*str\s*=)\s*"([a-z_]+)"', path.read_text()))
    used -= {"internal", "invalid_update"}  # the base classes' defaults, never raised as such
    proto = (REPO / "protos" / "fedsegnet" / "v1" / "aggregator.proto").read_text()
    comment = proto[proto.index("// Refused requests by reason"):proto.index("map<string, uint64> rejections")]
    spec = (REPO / "docs" / "protocol.md").read_text()
    table = spec[spec.index("### Rejection reasons"):]
    table = table[:table.index("\n#")]

    assert used == set(REJECTION_REASONS)
    listed = comment.replace("//", " ").split(":", 1)[1].split("(docs")[0]
    assert {name.strip() for name in listed.split(",")} == used
    assert set(re.findall(r"^\| `([a-z_]+)` \|", table, re.MULTILINE)) == used


def test_the_agent_does_not_retry_an_update_over_the_byte_limit(tmp_path: Path) -> None:
    from aggregator_service.security import RETRYABLE_METADATA
    from client_agent.transport import RETRYABLE_TRAILER, AggregatorClient, Refused

    served = start(tmp_path, config(max_update_bytes=40), INITIAL)
    frames = frames_of(delta("a", 1, INITIAL))
    path = tmp_path / "update.frames"
    with open(path, "wb") as fh:
        codec.write_frames(fh, frames)
    waits: list[float] = []
    client = AggregatorClient(served.target, sleep=waits.append)
    try:
        with pytest.raises(Refused, match="RESOURCE_EXHAUSTED: update exceeds the limit of 40 bytes$"):
            client.submit(header_proto("a", 1), path, digest(frames), len(frames))
        assert (served.rejections(), waits) == ({"too_large": 1}, [])  # one attempt, no retry
    finally:
        client.close()
        served.stop()
    assert RETRYABLE_TRAILER == RETRYABLE_METADATA
