"""The store's typed records: each ``from_json(to_json(x)) == x``, and damage is named."""

from __future__ import annotations

import json

import pytest

from aggregator_service.errors import StoreError
from aggregator_service.records import (
    Counters,
    DamagedRecord,
    DeltaRecord,
    FederationRecord,
    ModelManifest,
    RoundResult,
    RoundState,
    Submission,
    TensorSpec,
)
from aggregator_service.store import Store

DIGEST = "ab" * 32

RECORDS = [
    RoundState(3, "open", 10.0, 610.0),
    RoundState(5, "finished", 10.0, 610.0),
    Counters(12, 34, 2, {"wrong_round": 1}),
    Counters(),
    ModelManifest(DIGEST, 1234, (TensorSpec("w", (2, 3), "<f4"), TensorSpec("steps", (), "<i8"))),
    Submission(site="a", round_id=1, sample_count=10, digest=DIGEST, bytes=100, chunks=2, update_norm=0.5,
               metrics={"dice": 0.8, "hd95": 3.0}, extra_metrics={"dice/1": 0.7}, codec={"quantization": "int8"},
               bytes_downloaded=99, committed_at=1001.0),
    Submission(site="b", round_id=2, sample_count=1, digest=DIGEST, bytes=1, chunks=1, update_norm=0.0),
    RoundResult(round_id=1, strategy="aam", sites={"a": {"weight": 1.0, "factors": {"quality": 1.0}}},
                global_model_digest=DIGEST, closed_at=5.0, close_seconds=0.25),
    RoundResult(round_id=2, strategy="fedavg", sites={}, global_model_digest=DIGEST, closed_at=5.0,
                close_seconds=0.1, excluded={"b": "damaged"}, published=False, refused="not finite"),
    FederationRecord("demo", '{"rounds": 3}', 1.5),
    DeltaRecord(1, 3, DIGEST, DIGEST, DIGEST, 77, True),
]


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: type(r).__name__)
def test_round_trip_through_json_text(record) -> None:
    assert type(record).from_json(json.loads(json.dumps(record.to_json()))) == record


@pytest.mark.parametrize(("cls", "data", "message"), [
    (RoundState, {"round_id": 1, "state": "paused", "opened_at": 0, "deadline": 1}, "field 'state' must be"),
    (RoundState, {"round_id": "1", "state": "open", "opened_at": 0, "deadline": 1}, "field 'round_id' must be int"),
    (Counters, {"bytes_in": -1, "bytes_out": 0, "submissions_total": 0}, "field 'bytes_in' must be >= 0"),
    (Counters, [], "expected a JSON object"),
    (Submission, {**RECORDS[5].to_json(), "metrics": {"dice": "high"}}, r"field metrics\['dice'\] must be a finite"),
    (Submission, {k: v for k, v in RECORDS[5].to_json().items() if k != "digest"}, "field 'digest' is missing"),
    (ModelManifest, {"digest": "x", "bytes": 1, "tensors": []}, "field 'digest' must be 64 hex digits"),
])
def test_damaged_records_are_named(cls, data, message: str) -> None:
    with pytest.raises(DamagedRecord, match=message):
        cls.from_json(data)


def test_the_store_names_a_damaged_file_and_how_to_recover(tmp_path) -> None:
    store = Store(tmp_path)
    (tmp_path / "counters.json").write_text("")
    with pytest.raises(StoreError, match=r"store file .*counters.json is damaged .*delete it: the counters"):
        store.read_record("counters.json", Counters.from_json)
    assert store.read_record("state.json", RoundState.from_json) is None
