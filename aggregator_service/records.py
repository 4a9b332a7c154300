"""The store's JSON documents as typed records, each with a ``to_json``/``from_json`` pair.

``to_json`` gives the plain dict that is written (the layout ``store.py`` documents);
``from_json`` checks every field's type and range and raises :class:`DamagedRecord` naming the
field, so a damaged or hand-edited file is reported by name instead of failing later with a
``KeyError`` deep in a round's close. Round-trip tests pin each pair (``tests/aggregator_service/test_records.py``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Counters",
    "DamagedRecord",
    "DeltaRecord",
    "FederationRecord",
    "ModelManifest",
    "RoundResult",
    "RoundState",
    "Submission",
    "TensorSpec",
]

OPEN = "open"
FINISHED = "finished"


class DamagedRecord(ValueError):
    """A stored JSON document that does not have the shape its record needs (the message names the field)."""


def _get(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], *, default: Any = ...) -> Any:
    if not isinstance(data, Mapping):
        raise DamagedRecord(f"expected a JSON object, got {type(data).__name__}")
    if key not in data:
        if default is ...:
            raise DamagedRecord(f"field {key!r} is missing")
        return default
    value = data[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # JSON has one number type: an int is a valid float; a bool is never a number here.
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) and bool not in kinds:
        raise DamagedRecord(f"field {key!r} must be {kinds[0].__name__}, got {value!r}")
    if not isinstance(value, kinds):
        raise DamagedRecord(f"field {key!r} must be {kinds[0].__name__}, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise DamagedRecord(f"field {key!r} must be finite, got {value}")
    return value


def _count(data: Mapping[str, Any], key: str, *, minimum: int = 0, default: Any = ...) -> int:
    value = _get(data, key, int, default=default)
    if value < minimum:
        raise DamagedRecord(f"field {key!r} must be >= {minimum}, got {value}")
    return int(value)


def _numbers(data: Mapping[str, Any], key: str) -> dict[str, float]:
    table = _get(data, key, dict, default={})
    out = {}
    for name, value in table.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise DamagedRecord(f"field {key}[{name!r}] must be a finite number, got {value!r}")
        out[str(name)] = float(value)
    return out


@dataclass(frozen=True)
class RoundState:
    """``state.json``: the round now open (or the last one, once ``finished``)."""

    round_id: int
    state: str
    opened_at: float
    deadline: float

    @property
    def finished(self) -> bool:
        return self.state == FINISHED

    def to_json(self) -> dict[str, Any]:
        return {"round_id": self.round_id, "state": self.state, "opened_at": self.opened_at, "deadline": self.deadline}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RoundState:
        state = _get(data, "state", str)
        if state not in (OPEN, FINISHED):
            raise DamagedRecord(f"field 'state' must be {OPEN!r} or {FINISHED!r}, got {state!r}")
        return cls(_count(data, "round_id", minimum=1), state, _get(data, "opened_at", float),
                   _get(data, "deadline", float))


@dataclass(frozen=True)
class Counters:
    """``counters.json``: bytes in/out, submissions and rejections by reason, over all rounds."""

    bytes_in: int = 0
    bytes_out: int = 0
    submissions_total: int = 0
    rejections: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
                "submissions_total": self.submissions_total, "rejections": dict(self.rejections)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Counters:
        rejections = _get(data, "rejections", dict, default={})
        for reason, count in rejections.items():
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise DamagedRecord(f"field rejections[{reason!r}] must be a count >= 0, got {count!r}")
        return cls(_count(data, "bytes_in"), _count(data, "bytes_out"), _count(data, "submissions_total"),
                   {str(k): int(v) for k, v in rejections.items()})


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TensorSpec:
        shape = _get(data, "shape", list)
        if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
            raise DamagedRecord(f"field 'shape' must be sizes >= 0, got {shape!r}")
        return cls(_get(data, "name", str), tuple(shape), _get(data, "dtype", str))


@dataclass(frozen=True)
class ModelManifest:
    """``models/round-NNNN.json``: a global model file's digest, size and tensors."""

    digest: str
    bytes: int
    tensors: tuple[TensorSpec, ...]

    def to_json(self) -> dict[str, Any]:
        return {"digest": self.digest, "bytes": self.bytes, "tensors": [t.to_json() for t in self.tensors]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ModelManifest:
        digest = _get(data, "digest", str)
        if len(digest) != 64:
            raise DamagedRecord(f"field 'digest' must be 64 hex digits, got {digest!r}")
        tensors = _get(data, "tensors", list)
        return cls(digest, _count(data, "bytes"), tuple(TensorSpec.from_json(t) for t in tensors))


@dataclass(frozen=True)
class Submission:
    """``rounds/NNNN/<site>.json``: a committed update's header, digest and checks (the commit marker)."""

    site: str
    round_id: int
    sample_count: int
    digest: str
    bytes: int
    chunks: int
    update_norm: float
    metrics: dict[str, float] = field(default_factory=dict)
    extra_metrics: dict[str, float] = field(default_factory=dict)
    codec: dict[str, Any] = field(default_factory=dict)
    bytes_downloaded: int = 0
    committed_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        out = {
            "site": self.site, "round_id": self.round_id, "sample_count": self.sample_count,
            "metrics": dict(self.metrics), "extra_metrics": dict(self.extra_metrics), "codec": dict(self.codec),
            "bytes_downloaded": self.bytes_downloaded, "digest": self.digest, "bytes": self.bytes,
            "chunks": self.chunks, "update_norm": self.update_norm,
        }
        if self.committed_at is not None:
            out["committed_at"] = self.committed_at
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Submission:
        norm = _get(data, "update_norm", float)
        if norm < 0:
            raise DamagedRecord(f"field 'update_norm' must be >= 0, got {norm}")
        return cls(
            site=_get(data, "site", str), round_id=_count(data, "round_id", minimum=1),
            sample_count=_count(data, "sample_count", minimum=1), digest=_get(data, "digest", str),
            bytes=_count(data, "bytes"), chunks=_count(data, "chunks"), update_norm=norm,
            metrics=_numbers(data, "metrics"), extra_metrics=_numbers(data, "extra_metrics"),
            codec=dict(_get(data, "codec", dict, default={})),
            bytes_downloaded=_count(data, "bytes_downloaded", default=0),
            committed_at=_get(data, "committed_at", float, default=None),
        )


@dataclass(frozen=True)
class RoundResult:
    """``rounds/NNNN/_result.json``, written when the round closes.

    ``sites`` maps each aggregated site to ``{"weight": w, "factors": {...}}``; ``excluded`` maps
    a site whose stored submission could not be aggregated to why. ``published`` is False when the
    aggregate was not finite: the round then keeps its model (``refused`` says why).
    """

    round_id: int
    strategy: str
    sites: dict[str, dict[str, Any]]
    global_model_digest: str
    closed_at: float
    close_seconds: float
    excluded: dict[str, str] = field(default_factory=dict)
    published: bool = True
    refused: str = ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "round_id": self.round_id, "strategy": self.strategy, "sites": self.sites,
            "global_model_digest": self.global_model_digest, "closed_at": self.closed_at,
            "close_seconds": self.close_seconds,
        }
        if self.excluded:
            out["excluded"] = dict(self.excluded)
        if not self.published:
            out["published"] = False
            out["refused"] = self.refused
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RoundResult:
        sites = _get(data, "sites", dict)
        for part in sites.values():
            _get(part, "weight", float)
        excluded = _get(data, "excluded", dict, default={})
        return cls(
            round_id=_count(data, "round_id", minimum=1), strategy=_get(data, "strategy", str), sites=sites,
            global_model_digest=_get(data, "global_model_digest", str), closed_at=_get(data, "closed_at", float),
            close_seconds=_get(data, "close_seconds", float), excluded={str(k): str(v) for k, v in excluded.items()},
            published=_get(data, "published", bool, default=True), refused=_get(data, "refused", str, default=""),
        )


@dataclass(frozen=True)
class FederationRecord:
    """``federation.json``: which federation the store holds, and its configuration (canonical JSON)."""

    federation_id: str
    config: str
    created_at: float

    def to_json(self) -> dict[str, Any]:
        return {"federation_id": self.federation_id, "config": self.config, "created_at": self.created_at}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FederationRecord:
        return cls(_get(data, "federation_id", str), _get(data, "config", str), _get(data, "created_at", float))


@dataclass(frozen=True)
class DeltaRecord:
    """``models/round-NNNN.from-MMMM.delta.json``: a cached download delta (written last)."""

    base_round: int
    round_id: int
    base_digest: str
    model_digest: str
    delta_digest: str
    bytes: int
    reproducible: bool

    def to_json(self) -> dict[str, Any]:
        return {"base_round": self.base_round, "round_id": self.round_id, "base_digest": self.base_digest,
                "model_digest": self.model_digest, "delta_digest": self.delta_digest, "bytes": self.bytes,
                "reproducible": self.reproducible}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DeltaRecord:
        return cls(_count(data, "base_round", minimum=1), _count(data, "round_id", minimum=1),
                   _get(data, "base_digest", str), _get(data, "model_digest", str), _get(data, "delta_digest", str),
                   _count(data, "bytes"), _get(data, "reproducible", bool))
