"""The agent's side of the wire: a gRPC client for the aggregator with retries.

Transient failures are retried with exponential backoff and full jitter: UNAVAILABLE (no server,
a dropped connection, a store that cannot be written right now) and DEADLINE_EXCEEDED for as long
as the backoff allows (forever by default: an agent outlives network outages), and
RESOURCE_EXHAUSTED ``busy_attempts`` times when the aggregator marks it retryable with the
``fedseg-retryable`` trailer (a busy server: too many streams, a full store). Without the trailer
RESOURCE_EXHAUSTED means "update too large", which no retry cures: it is raised at once, like
anything else the aggregator answers, as :class:`Refused` with its status and message.

Retrying an upload is safe: it resends the same stored bytes, and the aggregator treats a second
commit of the same (site, round, digest) as a duplicate of the first.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import grpc

import codec
from protos.fedsegnet.v1 import aggregator_pb2 as pb
from protos.fedsegnet.v1 import aggregator_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
BUSY = grpc.StatusCode.RESOURCE_EXHAUSTED
MAX_MESSAGE_BYTES = 4 << 20
MAX_DIGEST_FAILURES = 3
DEFAULT_BUSY_ATTEMPTS = 8
RETRYABLE_TRAILER = ("fedseg-retryable", "1")
"""Trailing metadata with which the aggregator marks a RESOURCE_EXHAUSTED refusal worth retrying."""


class Refused(Exception):
    """The aggregator answered with a non-retryable status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter (AWS architecture blog's 'full jitter')."""

    initial_s: float = 0.5
    max_s: float = 30.0
    multiplier: float = 2.0
    max_attempts: int = 0  # 0: retry forever (an agent runs for days)

    def delays(self, rng: random.Random) -> Iterator[float]:
        attempt = 0
        while self.max_attempts == 0 or attempt < self.max_attempts:
            yield rng.uniform(0, min(self.max_s, self.initial_s * self.multiplier**attempt))
            attempt += 1


@dataclass(frozen=True)
class Downloaded:
    """A global model on disk, verified against the digest the aggregator sent.

    ``nbytes`` counts the frame bytes received for it (a failed delta included);
    ``delta_from_round`` is the round the model was rebuilt from (0: downloaded in full).
    """

    round_id: int
    path: Path
    digest: str
    nbytes: int
    delta_from_round: int = 0


@dataclass(frozen=True)
class HeldModel:
    """A global model the site holds byte-exact: the base a download may be a delta from."""

    round_id: int
    path: Path
    digest: str


class DeltaFailed(Exception):
    """A delta download arrived but could not be turned into the verified model."""

    def __init__(self, message: str, nbytes: int) -> None:
        super().__init__(message)
        self.nbytes = nbytes


class AggregatorClient:
    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        backoff: Backoff = Backoff(),
        rpc_timeout_s: float = 600.0,
        sleep: Callable[[float], None] = time.sleep,
        seed: int | None = None,
        busy_attempts: int = DEFAULT_BUSY_ATTEMPTS,
    ) -> None:
        """A client of the aggregator at ``target`` (HOST:PORT).

        Args (keyword-only):
            credentials: TLS channel credentials (``client_agent.tls``); None for plaintext.
            backoff: retry schedule for transient failures.
            rpc_timeout_s: deadline of each call (a whole upload or download is one call).
            sleep: how to wait between attempts; a caller that must stop promptly passes one that
                raises (e.g. when a stop event is set) instead of sleeping.
            seed: seed of the jitter (tests).
            busy_attempts: attempts at a call answered RESOURCE_EXHAUSTED before giving up.
        """
        if rpc_timeout_s <= 0:
            raise ValueError(f"rpc_timeout_s must be > 0, got {rpc_timeout_s}")
        if busy_attempts < 1:
            raise ValueError(f"busy_attempts must be >= 1, got {busy_attempts}")
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
        self.target = target
        self.channel = (
            grpc.secure_channel(target, credentials, options)
            if credentials
            else grpc.insecure_channel(target, options)
        )
        self.stub = pb_grpc.AggregatorServiceStub(self.channel)
        self.backoff = backoff
        self.rpc_timeout_s = rpc_timeout_s
        self._sleep = sleep
        self._rng = random.Random(seed)
        self.busy_attempts = busy_attempts

    def close(self) -> None:
        self.channel.close()

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        delays = self.backoff.delays(self._rng)
        busy = 0
        while True:
            try:
                return fn()
            except grpc.RpcError as exc:
                code = exc.code()  # type: ignore[attr-defined]
                details = exc.details()  # type: ignore[attr-defined]
                if code == BUSY:
                    if RETRYABLE_TRAILER not in (exc.trailing_metadata() or ()):  # type: ignore[attr-defined]
                        raise Refused(code, details) from None
                    busy += 1
                    if busy >= self.busy_attempts:
                        raise Refused(code, f"{details} (gave up after {busy} attempts)") from None
                elif code not in RETRYABLE:
                    raise Refused(code, details) from None
                delay = next(delays, None)
                if delay is None:
                    raise Refused(code, f"{details} (gave up after {self.backoff.max_attempts} attempts)") from None
                log.warning("%s: %s (%s); retrying in %.1fs", what, code.name, details, delay)
                self._sleep(delay)

    def join(self, site: str) -> pb.JoinResponse:
        return self._call("join", lambda: self.stub.Join(pb.JoinRequest(site=site), timeout=self.rpc_timeout_s))

    def get_round(self, site: str) -> pb.Round:
        response = self._call(
            "get round", lambda: self.stub.GetRound(pb.GetRoundRequest(site=site), timeout=self.rpc_timeout_s)
        )
        return response.round

    def round_metrics(self, round_id: int) -> pb.GetRoundMetricsResponse:
        """A round's per-site metrics (which sites' updates it committed)."""
        return self._call(
            "round metrics",
            lambda: self.stub.GetRoundMetrics(pb.GetRoundMetricsRequest(round_id=round_id), timeout=self.rpc_timeout_s),
        )

    def download(self, round_id: int, site: str, dest: Path, *, base: HeldModel | None = None) -> Downloaded:
        """Stream a round's global model to ``dest`` (atomically) and check its digest.

        With ``base`` (a model the site holds), the aggregator may answer with a lossless delta
        from it: the model is rebuilt from ``base`` and the delta, re-encoded losslessly and
        checked against the full model's digest. A delta that fails (wrong base, corrupt, digest
        mismatch) is logged and the model downloaded in full: nothing unverified is kept.

        A digest mismatch of a full download is retried like a dropped connection, but only
        ``MAX_DIGEST_FAILURES`` times: a mismatch that persists is a broken aggregator, not a
        flaky link.
        """
        spent = 0
        mismatches = [0]  # full downloads that arrived corrupted, over all attempts
        if base is not None:
            if base.round_id < 1 or (round_id and base.round_id >= round_id):
                raise ValueError(f"a base model must be of an earlier round than {round_id}, got round {base.round_id}")
            try:
                return self._call("download", lambda: self._attempt(round_id, site, dest, base, mismatches))
            except DeltaFailed as exc:
                log.warning("round %d: delta from round %d unusable (%s); downloading the full model",
                            round_id, base.round_id, exc)
                spent = exc.nbytes
        full = self._call("download", lambda: self._attempt(round_id, site, dest, None, mismatches))
        return replace(full, nbytes=full.nbytes + spent)

    def _attempt(
        self, round_id: int, site: str, dest: Path, base: HeldModel | None, mismatches: list[int]
    ) -> Downloaded:
        request = pb.DownloadModelRequest(round_id=round_id, site=site)
        if base is not None:
            request.have_round, request.have_digest = base.round_id, base.digest
        call = self.stub.DownloadModel(request, timeout=self.rpc_timeout_s)
        try:
            chunks = iter(call)
            first = next(chunks, None)
            if first is not None and first.delta_from_round:
                if base is None:
                    raise Refused(grpc.StatusCode.INTERNAL, f"the aggregator sent a delta from round "
                                  f"{first.delta_from_round} to a download that named no base model")
                if first.delta_from_round != base.round_id:
                    raise DeltaFailed(f"the aggregator sent a delta from round {first.delta_from_round}, "
                                      f"the site holds round {base.round_id}'s model", len(first.frame))
                return _receive_delta(first, chunks, base, dest)
            return _receive_full(round_id, first, chunks, dest, mismatches)
        finally:
            call.cancel()  # a stream left unread (a failed delta) ends now; no-op once it has completed

    def submit(self, header: pb.UpdateHeader, frames_path: Path, digest: str, chunk_count: int) -> pb.SubmitUpdateResponse:
        """Upload a stored update; a retried upload sends the same bytes (idempotent at the aggregator)."""

        def requests() -> Iterator[pb.SubmitUpdateRequest]:
            yield pb.SubmitUpdateRequest(header=header)
            with open(frames_path, "rb") as fh:
                for frame in codec.read_frames(fh):
                    yield pb.SubmitUpdateRequest(frame=frame)
            yield pb.SubmitUpdateRequest(commit=pb.UpdateCommit(chunk_count=chunk_count, digest=digest))

        return self._call("upload", lambda: self.stub.SubmitUpdate(requests(), timeout=self.rpc_timeout_s))


def _receive_full(
    round_id: int, first: pb.DownloadModelResponse | None, chunks: Iterator[pb.DownloadModelResponse], dest: Path,
    mismatches: list[int],
) -> Downloaded:
    """Write a full model's frames to ``dest`` as they arrive; check the digest before renaming."""
    sha = codec.DigestingFrames()
    digest = ""
    got_round = round_id

    def payloads() -> Iterator[bytes]:
        nonlocal digest, got_round
        for chunk in itertools.chain([first] if first is not None else [], chunks):
            sha.update(chunk.frame)
            digest, got_round = chunk.model_digest, chunk.round_id
            yield chunk.frame

    class _Mismatch(Exception):
        pass

    try:
        # Raised inside the writer on a wrong digest: the temporary file goes, ``dest`` is untouched.
        with codec.atomic_writer(dest) as fh:
            codec.write_frames(fh, payloads())
            if digest and sha.hexdigest() != digest:
                raise _Mismatch
    except _Mismatch:
        mismatches[0] += 1
        if mismatches[0] >= MAX_DIGEST_FAILURES:
            raise Refused(grpc.StatusCode.DATA_LOSS, f"model of round {got_round} arrived corrupted "
                          f"{mismatches[0]} times (digest {sha.hexdigest()[:16]}… != {digest[:16]}…)")
        # A corrupted transfer is worth another try, like a dropped connection.
        raise _TransientError(f"model digest mismatch for round {got_round}")
    return Downloaded(got_round, dest, sha.hexdigest(), sha.nbytes)


def _receive_delta(
    first: pb.DownloadModelResponse, chunks: Iterator[pb.DownloadModelResponse], base: HeldModel, dest: Path
) -> Downloaded:
    """Rebuild the model from ``base`` and a delta stream, tensor by tensor, and verify it.

    The rebuilt model is re-encoded losslessly (as the aggregator stores it) and written to
    ``dest`` atomically only when its digest is the full model's. Memory: one tensor at a time.

    Raises:
        DeltaFailed: a delta that does not apply to ``base`` or does not give the model.
        grpc.RpcError: the stream broke (retried by the caller, as for a full download).
    """
    nbytes = 0
    rebuilt = codec.DigestingFrames()

    def payloads() -> Iterator[bytes]:
        nonlocal nbytes
        for chunk in itertools.chain([first], chunks):
            if (chunk.round_id, chunk.delta_from_round, chunk.model_digest) != (
                first.round_id, first.delta_from_round, first.model_digest
            ):
                raise codec.CodecError(f"chunk {chunk.index} describes another download than the first chunk")
            nbytes += len(chunk.frame)
            yield chunk.frame

    try:
        with open(base.path, "rb") as base_fh, codec.atomic_writer(dest) as out:
            old = codec.decode_frames(codec.read_frames(base_fh))
            new = codec.apply_model_delta(old, payloads())
            rebuilt = codec.DigestingFrames(codec.encode_tensors(new, codec.LOSSLESS))
            codec.write_frames(out, rebuilt)
            if rebuilt.hexdigest() != first.model_digest:
                # Raised inside the writer: the temporary file is removed, ``dest`` never appears.
                raise codec.CodecError(
                    f"the model rebuilt from round {base.round_id}'s has digest {rebuilt.hexdigest()[:16]}…, "
                    f"the aggregator's is {first.model_digest[:16]}…"
                )
    except (codec.CodecError, OSError) as exc:
        raise DeltaFailed(str(exc), nbytes) from exc
    return Downloaded(first.round_id, dest, rebuilt.hexdigest(), nbytes, delta_from_round=base.round_id)


class _TransientError(grpc.RpcError):
    """A local failure that should be retried like UNAVAILABLE."""

    def __init__(self, details: str) -> None:
        super().__init__(details)
        self._details = details

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return self._details
