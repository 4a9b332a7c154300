"""Hostile input over real gRPC: each attempt is refused with its status and reason, counted in
GetStatus.rejections, leaves no spool file behind, and the federation's final global model is
byte-identical to a run in which the bad client never appeared.

The model is numpy only (two small tensors and one tensor of two frames); the hostile client is
site "c" unless the attack needs an honest site's name. Honest sites "a" and "b" then run both
rounds (min_clients = max_clients = 2, so an accepted bad upload would change the model).
"""

from __future__ import annotations

import threading
import zlib
from pathlib import Path
from typing import Callable, Iterator

import grpc
import numpy as np
import pytest
import zstandard

import codec
from aggregator_service.security import RETRYABLE_METADATA, Gate, StreamLimits
from codec.frame import pack_frame
from numpy_federation import (
    Served,
    config,
    delta,
    digest,
    frames_of,
    header_proto,
    honest_rounds,
    model,
    reference_model,
    start,
    upload_requests,
)
from protos.fedsegnet.v1 import aggregator_pb2 as pb
from support import wait_for

INITIAL = model(big=True)
CFG = config()
SUBMIT = "/fedsegnet.v1.AggregatorService/SubmitUpdate"
JOIN = "/fedsegnet.v1.AggregatorService/Join"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return reference_model(tmp_path_factory.mktemp("reference"), CFG, INITIAL, honest=("a", "b"))


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    s = start(tmp_path, CFG, INITIAL)
    yield s
    s.stop()


def c_frames() -> list[bytes]:
    """Site c's honest round-1 frames: w, b, big part 1/2, big part 2/2."""
    # zstd level 3 (codec.LOSSLESS has none), so the zstd attacks below have a zstd stage to forge.
    frames = frames_of(delta("c", 1, INITIAL), codec.CodecSpec(zstd_level=3))
    assert [codec.read_header(f).name for f in frames] == ["w", "b", "big", "big"]
    return frames


def forge(fields: dict, payload: bytes) -> bytes:
    """A frame with a hand-made header: well-formed on the outside, lying inside."""
    return pack_frame(fields, payload)


def with_fields(frame: bytes, **changes: object) -> dict:
    fields = codec.read_header(frame).to_json()
    fields.update(changes)
    return fields


def zstd_bomb() -> bytes:
    """big part 1: a zstd frame whose header declares the part's 1 040 368 bytes but holds 1 MB more."""
    first = c_frames()[2]
    size = codec.read_header(first).size
    bomb = bytearray(zstandard.ZstdCompressor(level=3, write_content_size=True).compress(bytes(size + 1_000_000)))
    assert bomb[4] >> 6 == 2 and bomb[4] & 0b100000  # single segment, 4-byte content size at offset 5
    bomb[5:9] = size.to_bytes(4, "little")
    assert zstandard.frame_content_size(bytes(bomb)) == size
    return forge(with_fields(first, crc=zlib.crc32(bytes(size))), bytes(bomb))


def no_content_size() -> bytes:
    """big part 1 compressed without a declared content size (the decoder cannot bound it up front)."""
    first = c_frames()[2]
    raw = np.ascontiguousarray(delta("c", 1, INITIAL)["big"][:260_092]).tobytes()
    payload = zstandard.ZstdCompressor(write_content_size=False).compress(raw)
    return forge(with_fields(first, crc=zlib.crc32(raw)), payload)


def trillion_elements() -> bytes:
    """A valid-looking frame of tensor 'w' whose header declares 10^12 elements."""
    raw = np.zeros(6, np.float32).tobytes()
    fields = {"name": "w", "shape": [10**12], "dtype": "<f4", "count": 10**12, "part": 0, "parts": 1,
              "start": 0, "stop": 6, "chain": [{"stage": "dense"}, {"stage": "raw"}], "size": len(raw),
              "crc": zlib.crc32(raw)}
    return forge(fields, raw)


def tensors(**changes: np.ndarray) -> list[bytes]:
    values = delta("c", 1, INITIAL)
    values.update(changes)
    return frames_of({k: v for k, v in values.items() if v is not None})


def upload(frames: list[bytes]) -> Callable[[Served], object]:
    return lambda s: s.stub.SubmitUpdate(upload_requests("c", 1, frames), timeout=30)


def raw_unary(method: str, data: bytes) -> Callable[[Served], object]:
    return lambda s: s.channel.unary_unary(method)(data, timeout=30)


def raw_stream(method: str, messages: list[bytes]) -> Callable[[Served], object]:
    return lambda s: s.channel.stream_unary(method)(iter(messages), timeout=30)


def wrong_dtype() -> list[bytes]:
    values = delta("c", 1, INITIAL)
    values["w"] = values["w"].astype(np.float64)
    return frames_of(values)


def renamed() -> list[bytes]:
    values = delta("c", 1, INITIAL)
    return frames_of({("x" if k == "w" else k): v for k, v in values.items()})


F = c_frames()
HEADER = pb.SubmitUpdateRequest(header=header_proto("c", 1)).SerializeToString()
NAN = np.full((2, 3), np.nan, np.float32)
INF = np.array([np.inf, 0.0], np.float32)

CASES = [
    # (id, attack, status, reason, words in the message)
    ("malformed-unary", raw_unary(JOIN, b"\x0a\x05\xff\xfe\xfd\xfc\xfb"), grpc.StatusCode.INVALID_ARGUMENT,
     "malformed_message", "not a valid fedsegnet.v1.JoinRequest"),
    ("malformed-stream", raw_stream(SUBMIT, [HEADER, b"\xff\xff\xff"]), grpc.StatusCode.INVALID_ARGUMENT,
     "malformed_message", "not a valid fedsegnet.v1.SubmitUpdateRequest"),
    ("frame-first", raw_stream(SUBMIT, [pb.SubmitUpdateRequest(frame=F[0]).SerializeToString()]),
     grpc.StatusCode.INVALID_ARGUMENT, "bad_stream", "must start with its header"),
    ("not-a-frame", upload([b"definitely not a codec frame"]), grpc.StatusCode.INVALID_ARGUMENT, "bad_frame",
     "not a FedSegNet codec frame"),
    ("parts-swapped", upload([F[0], F[1], F[3], F[2]]), grpc.StatusCode.INVALID_ARGUMENT, "bad_frame", "out of order"),
    ("part-missing", upload([F[0], F[1], F[2]]), grpc.StatusCode.INVALID_ARGUMENT, "bad_frame", "truncated"),
    ("part-repeated", upload([F[0], F[1], F[2], F[2], F[3]]), grpc.StatusCode.INVALID_ARGUMENT, "bad_frame",
     "ended after part 1 of 2"),
    ("tensor-repeated", upload([F[0], F[0], F[1], F[2], F[3]]), grpc.StatusCode.INVALID_ARGUMENT, "duplicate_tensor",
     "tensor 'w' is sent twice"),
    ("tensor-missing", upload([F[0], F[2], F[3]]), grpc.StatusCode.INVALID_ARGUMENT, "tensor_mismatch",
     "the model's is 'b'"),
    ("trillion-elements", upload([trillion_elements(), *F[1:]]), grpc.StatusCode.INVALID_ARGUMENT,
     "tensor_mismatch", "[1000000000000]"),
    ("zstd-bomb", upload([F[0], F[1], zstd_bomb(), F[3]]), grpc.StatusCode.INVALID_ARGUMENT, "bad_frame",
     "corrupt zstd payload"),
    ("zstd-undeclared-size", upload([F[0], F[1], no_content_size(), F[3]]), grpc.StatusCode.INVALID_ARGUMENT,
     "bad_frame", "zstd frame declares -1 bytes"),
    ("nan", upload(tensors(w=NAN)), grpc.StatusCode.INVALID_ARGUMENT, "non_finite", "NaN or Inf"),
    ("inf", upload(tensors(b=INF)), grpc.StatusCode.INVALID_ARGUMENT, "non_finite", "NaN or Inf"),
    ("wrong-shape", upload(tensors(w=np.zeros((3, 2), np.float32))), grpc.StatusCode.INVALID_ARGUMENT,
     "tensor_mismatch", "'w' [3, 2]"),
    ("wrong-dtype", upload(wrong_dtype()), grpc.StatusCode.INVALID_ARGUMENT, "tensor_mismatch", "float64"),
    ("wrong-name", upload(renamed()), grpc.StatusCode.INVALID_ARGUMENT, "tensor_mismatch", "'x'"),
    ("commit-lies-about-count", lambda s: s.stub.SubmitUpdate(
        upload_requests("c", 1, F, commit=pb.UpdateCommit(chunk_count=3, digest=digest(F))), timeout=30),
     grpc.StatusCode.INVALID_ARGUMENT, "incomplete_stream", "commit says 3 chunks but 4 arrived"),
    ("commit-wrong-digest", lambda s: s.stub.SubmitUpdate(
        upload_requests("c", 1, F, commit=pb.UpdateCommit(chunk_count=4, digest="0" * 64)), timeout=30),
     grpc.StatusCode.INVALID_ARGUMENT, "digest_mismatch", "does not match the frames"),
    ("unknown-site", lambda s: s.stub.SubmitUpdate(upload_requests("mallory", 1, F), timeout=30),
     grpc.StatusCode.PERMISSION_DENIED, "unknown_site", "'mallory' is not in this federation"),
    ("future-round", lambda s: s.stub.SubmitUpdate(upload_requests("c", 7, F), timeout=30),
     grpc.StatusCode.FAILED_PRECONDITION, "wrong_round", "the current round is 1"),
]


def one_case_per_reason_fast() -> list:
    """Every case; those after the first of their reason marked slow (each runs a whole two-round federation)."""
    seen: set[str] = set()
    params = []
    for case_id, attack, status, reason, words in CASES:
        params.append(pytest.param(attack, status, reason, words, id=case_id,
                                   marks=pytest.mark.slow if reason in seen else ()))
        seen.add(reason)
    return params


@pytest.mark.parametrize("attack, status, reason, words", one_case_per_reason_fast())
def test_hostile_upload_is_refused_counted_and_changes_nothing(
    served: Served, reference: bytes, attack: Callable[[Served], object], status: grpc.StatusCode, reason: str,
    words: str,
) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        attack(served)

    assert refused.value.code() == status
    assert words in refused.value.details()
    assert served.rejections() == {reason: 1}
    assert list((served.store.root / "spool").iterdir()) == []
    assert served.store.committed_sites(1) == []
    honest_rounds(served, ("a", "b"), (1, 2), INITIAL)
    assert served.final_model(CFG) == reference


def test_message_over_the_size_limit_is_refused_by_grpc(served: Served, reference: bytes) -> None:
    # gRPC refuses a message over 4 MiB before any handler runs, so it is not counted as a rejection.
    oversized = pb.SubmitUpdateRequest(frame=bytes(5 << 20)).SerializeToString()

    with pytest.raises(grpc.RpcError) as refused:
        raw_stream(SUBMIT, [HEADER, oversized])(served)

    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert list((served.store.root / "spool").iterdir()) == []
    honest_rounds(served, ("a", "b"), (1, 2), INITIAL)
    assert served.final_model(CFG) == reference


def test_replayed_update_of_a_closed_round_is_refused(served: Served, reference: bytes) -> None:
    honest_rounds(served, ("a", "b"), (1,), INITIAL)
    honest_rounds(served, (), (2,), INITIAL)  # wait for round 2 to open

    # c's update for round 1 (a's own, committed one would get its receipt back: a retry).
    with pytest.raises(grpc.RpcError) as refused:
        served.submit("c", 1, delta("c", 1, INITIAL))

    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "update for round 1 refused: the current round is 2" in refused.value.details()
    assert served.rejections() == {"wrong_round": 1}
    honest_rounds(served, ("a", "b"), (2,), INITIAL)
    assert served.final_model(CFG) == reference


def test_duplicate_submission_is_idempotent_not_an_error(served: Served, reference: bytes) -> None:
    first = served.submit("a", 1, delta("a", 1, INITIAL))

    again = served.submit("a", 1, delta("a", 1, INITIAL))

    assert (first.duplicate, again.duplicate) == (False, True)
    assert (again.digest, again.submissions) == (first.digest, 1)
    assert served.rejections() == {}
    honest_rounds(served, ("a", "b"), (1, 2), INITIAL)
    assert served.final_model(CFG) == reference


def test_a_different_second_update_from_the_same_site_is_refused(served: Served, reference: bytes) -> None:
    served.submit("a", 1, delta("a", 1, INITIAL))

    with pytest.raises(grpc.RpcError) as refused:
        served.submit("a", 1, delta("c", 1, INITIAL))

    assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert served.rejections() == {"conflicting_submission": 1}
    served.submit("b", 1, delta("b", 1, INITIAL))
    honest_rounds(served, ("a", "b"), (2,), INITIAL)
    assert served.final_model(CFG) == reference


def stalled_upload(site: str, release: threading.Event, sent: threading.Event) -> Iterator[pb.SubmitUpdateRequest]:
    """Header and one frame, then nothing until ``release`` (a client that hangs mid-upload)."""
    frames = frames_of(delta(site, 1, INITIAL))
    yield pb.SubmitUpdateRequest(header=header_proto(site, 1))
    yield pb.SubmitUpdateRequest(frame=frames[0])
    sent.set()
    release.wait(30)
    for frame in frames[1:]:
        yield pb.SubmitUpdateRequest(frame=frame)
    yield pb.SubmitUpdateRequest(commit=pb.UpdateCommit(chunk_count=len(frames), digest=digest(frames)))


def test_upload_that_never_ends_is_cut_off_at_the_stream_time_limit(tmp_path: Path, reference: bytes) -> None:
    served = start(tmp_path, CFG, INITIAL, gate=Gate(limits=StreamLimits(max_upload_seconds=0.5)))
    release, sent = threading.Event(), threading.Event()
    try:
        with pytest.raises(grpc.RpcError) as refused:
            served.stub.SubmitUpdate(stalled_upload("c", release, sent), timeout=30)

        assert refused.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "did not finish within 0.5 s" in refused.value.details()
        assert served.rejections() == {"upload_timeout": 1}
        assert list((served.store.root / "spool").iterdir()) == []
        honest_rounds(served, ("a", "b"), (1, 2), INITIAL)
        assert served.final_model(CFG) == reference
    finally:
        release.set()
        served.stop()


def test_a_site_over_its_stream_limit_is_told_to_retry_later(tmp_path: Path, reference: bytes) -> None:
    gate = Gate(limits=StreamLimits(max_streams_per_site=1))
    served = start(tmp_path, CFG, INITIAL, gate=gate)
    release, sent = threading.Event(), threading.Event()
    try:
        first = served.stub.SubmitUpdate.future(stalled_upload("a", release, sent), timeout=30)
        wait_for(lambda: gate.slots.held("a") == 1, "the first upload to hold a's slot")

        with pytest.raises(grpc.RpcError) as refused:
            served.submit("a", 1, delta("a", 1, INITIAL))

        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "already has 1 stream(s) open, the limit is 1" in refused.value.details()
        assert RETRYABLE_METADATA in refused.value.trailing_metadata()  # unlike too_large: retry later
        release.set()
        assert first.result().submissions == 1  # the held stream completes normally
        assert served.rejections() == {"too_many_streams": 1}
        assert gate.slots.held("a") == 0
        honest_rounds(served, ("b",), (1,), INITIAL)
        honest_rounds(served, ("a", "b"), (2,), INITIAL)
        assert served.final_model(CFG) == reference
    finally:
        release.set()
        served.stop()


def test_update_over_the_byte_limit_is_refused_for_good(tmp_path: Path) -> None:
    cfg = config(max_update_bytes=300)
    served = start(tmp_path, cfg, INITIAL)
    try:
        with pytest.raises(grpc.RpcError) as refused:
            served.submit("c", 1, delta("c", 1, INITIAL))

        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "exceeds the limit of 300 bytes" in refused.value.details()
        # Same status as a busy site's refusal, but no retry can fix it: no retryable marker.
        assert RETRYABLE_METADATA not in (refused.value.trailing_metadata() or ())
        assert served.rejections() == {"too_large": 1}
        assert list((served.store.root / "spool").iterdir()) == []
    finally:
        served.stop()
