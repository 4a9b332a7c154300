"""The names and documented ranges of ``LocalMetrics``, for both sides of the wire.

The names are read from the message descriptor, so they follow ``aggregator.proto`` (field
order) and cannot drift from it. No torch, no numpy: the site agent, the aggregator and the
experiments import this one list.
"""

from __future__ import annotations

import math

from protos.fedsegnet.v1 import aggregator_pb2 as pb

__all__ = [
    "EXTRA_METRIC_RANGE",
    "LOCAL_METRIC_NAMES",
    "MAX_EXTRA_METRICS",
    "MAX_EXTRA_NAME_CHARS",
    "MAX_SAMPLE_COUNT",
    "MAX_VALIDATION_CASES",
    "METRIC_RANGES",
    "SEGMENTATION_METRIC_NAMES",
    "TRAINING_METRIC_NAMES",
    "check_metric",
]

_FIELDS = pb.LocalMetrics.DESCRIPTOR.fields
LOCAL_METRIC_NAMES: tuple[str, ...] = tuple(
    f.name for f in _FIELDS if f.type == f.TYPE_DOUBLE
)
"""Every scalar metric of ``LocalMetrics`` in field order: dice, hd95, iou, precision, recall,
train_loss, train_seconds."""
TRAINING_METRIC_NAMES: tuple[str, ...] = ("train_loss", "train_seconds")
SEGMENTATION_METRIC_NAMES: tuple[str, ...] = tuple(n for n in LOCAL_METRIC_NAMES if n not in TRAINING_METRIC_NAMES)
"""The validation metrics a site computes on its own cases: dice, hd95, iou, precision, recall."""

METRIC_RANGES: dict[str, tuple[float, float]] = {
    "dice": (0.0, 1.0),
    "iou": (0.0, 1.0),
    "precision": (0.0, 1.0),
    "recall": (0.0, 1.0),
    # HD95 in millimetres: at most the diagonal of any scanner's field of view, with room to spare.
    "hd95": (0.0, 1e6),
    "train_loss": (0.0, 1e6),
    # A week: a round's local training never takes longer.
    "train_seconds": (0.0, 7 * 86400.0),
}
"""Closed ranges the aggregator accepts for each metric (values outside are refused at upload)."""
assert set(METRIC_RANGES) == set(LOCAL_METRIC_NAMES), "a LocalMetrics field without a documented range"


MAX_EXTRA_METRICS = 64
"""``LocalMetrics.extra`` holds at most this many entries (per-class Dice of up to ~60 classes, DP
figures): it bounds what every ``GetRoundMetrics`` response carries per site."""
MAX_EXTRA_NAME_CHARS = 64
EXTRA_METRIC_RANGE = (-1e12, 1e12)
"""Closed range of every ``extra`` value (finite, and far from float overflow when averaged)."""
MAX_SAMPLE_COUNT = 10**9
"""``UpdateHeader.sample_count`` is in [1, MAX_SAMPLE_COUNT]: no site trains on more volumes."""
MAX_VALIDATION_CASES = 10**6


def check_metric(name: str, value: float) -> str | None:
    """Why ``value`` is not acceptable for metric ``name`` (None when it is)."""
    if not math.isfinite(value):
        return f"{name} is not finite ({value})"
    low, high = METRIC_RANGES[name]
    if not low <= value <= high:
        return f"{name} must be in [{low:g}, {high:g}], got {value!r}"
    return None
