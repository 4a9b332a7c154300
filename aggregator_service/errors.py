"""Every error the aggregator raises for a request or its store, in one place.

The servicer maps each to a gRPC status; ``reason`` is the label rejections are counted under
(``GetStatus.rejections``, the Prometheus endpoint); ``retryable`` ones carry the
``fedseg-retryable`` trailer (a client retries them with backoff). Configuration errors
(``config.ConfigError``) are not here: they stop the process before it serves.
"""

from __future__ import annotations

import re

import grpc

# Matched with fullmatch: "$" would also match before a trailing newline ("a\n").
_SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


class AggregatorError(Exception):
    """Base class: ``code`` is the gRPC status, ``reason`` a short label for counting."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "internal"
    retryable: bool = False


class UnknownSite(AggregatorError):
    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "unknown_site"


class WrongRound(AggregatorError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "wrong_round"


class InvalidUpdate(AggregatorError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "invalid_update"

    def __init__(self, message: str, *, reason: str = "invalid_update") -> None:
        super().__init__(message)
        self.reason = reason


class UpdateTooLarge(AggregatorError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "too_large"


class ConflictingSubmission(AggregatorError):
    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "conflicting_submission"


class NotFound(AggregatorError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "not_found"


class StoreError(AggregatorError):
    """The store cannot be used (another federation's store, a full disk, a corrupt file)."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "store"


# -- who may call, and for how long (security.Gate) ---------------------------------------------


class Unauthenticated(AggregatorError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "unauthenticated"


class Revoked(AggregatorError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "revoked"


class IdentityMismatch(AggregatorError):
    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "identity_mismatch"


class TooManyStreams(AggregatorError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "too_many_streams"
    retryable = True  # the site's other stream will end (or time out)


class UploadTimeout(AggregatorError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "upload_timeout"


class BrokenStream(AggregatorError):
    """The peer went away mid-stream (cancelled, connection lost): nothing of it is kept."""

    code = grpc.StatusCode.CANCELLED
    reason = "broken_stream"


class MalformedMessage(AggregatorError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "malformed_message"


# -- the store ----------------------------------------------------------------------------------


class StoreFull(StoreError):
    """The store's disk (or quota) is full: nothing was committed; retry once space is freed."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "store_full"
    retryable = True  # once the operator frees space


def check_site_name(site: str) -> str:
    """Site names become file names in the store: letters, digits, '.', '_' and '-' only."""
    if not isinstance(site, str) or not _SITE_NAME.fullmatch(site):
        raise UnknownSite(
            f"site name {site!r} is not valid: use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return site


REJECTION_REASONS: dict[str, str] = {
    # The names GetStatus.rejections (and the Prometheus endpoint) count refusals under: every
    # AggregatorError's ``reason``. docs/protocol.md and the proto's comment list the same names
    # (tests/aggregator_service/test_wire_contract.py checks all three).
    "unknown_site": "PERMISSION_DENIED: a site name that is not valid or not in the federation",
    "identity_mismatch": "PERMISSION_DENIED: the request names another site than the client certificate",
    "unauthenticated": "UNAUTHENTICATED: under mutual TLS, no client certificate or one without a usable site name",
    "revoked": "UNAUTHENTICATED: the site or the certificate is revoked",
    "malformed_message": "INVALID_ARGUMENT: request bytes that do not parse as the RPC's message",
    "wrong_round": "FAILED_PRECONDITION: an update for a round that is not open (and not a retry of a committed one)",
    "bad_stream": "INVALID_ARGUMENT: an upload that does not start with one header, or with a second header",
    "bad_header": "INVALID_ARGUMENT: sample_count < 1 or a non-finite metric in the update header",
    "bad_frame": "INVALID_ARGUMENT: a frame the codec refuses, or a tensor's parts out of order",
    "tensor_mismatch": "INVALID_ARGUMENT: a tensor that is not the model's next one (name, shape, dtype), or missing",
    "duplicate_tensor": "INVALID_ARGUMENT: a tensor sent twice in one update",
    "non_finite": "INVALID_ARGUMENT: an update with NaN or Inf values",
    "incomplete_stream": "INVALID_ARGUMENT: an upload without its commit, or whose chunk_count is not the frames sent",
    "digest_mismatch": "INVALID_ARGUMENT: a commit digest that is not the SHA-256 of the frames received",
    "too_large": "RESOURCE_EXHAUSTED (not retryable): an update over the byte limit",
    "too_many_streams": "RESOURCE_EXHAUSTED (retryable): more concurrent streams than the site may hold",
    "store_full": "RESOURCE_EXHAUSTED (retryable): the aggregator's disk is full; nothing was stored",
    "conflicting_submission": "ALREADY_EXISTS: a second, different update from a site for the same round",
    "not_found": "NOT_FOUND: a model or round the store does not have",
    "upload_timeout": "DEADLINE_EXCEEDED: an upload that did not finish within the stream time limit",
    "broken_stream": "CANCELLED: the client went away mid-upload",
    "store": "UNAVAILABLE: the store cannot be read or written",
}
