"""The aggregator's domain errors. The servicer maps each to a gRPC status; ``reason`` is the
label rejections are counted under (``GetStatus.rejections``, the Prometheus endpoint)."""

from __future__ import annotations

import re

import grpc

_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


class AggregatorError(Exception):
    """Base class: ``code`` is the gRPC status, ``reason`` a short label for counting."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "internal"


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


def check_site_name(site: str) -> str:
    """Site names become file names in the store: letters, digits, '.', '_' and '-' only."""
    if not _SITE_NAME.match(site or ""):
        raise UnknownSite(
            f"site name {site!r} is not valid: use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return site
