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
