"""The committed generated code is exactly what the .proto sources generate."""

from pathlib import Path

import pytest

from protos import generate


def test_committed_code_matches_a_fresh_generation(tmp_path: Path) -> None:
    written = generate.generate(tmp_path)
    assert written, "protoc generated nothing"
    for fresh in written:
        committed = generate.PROTO_ROOT / fresh.relative_to(tmp_path)
        assert committed.exists(), f"{committed} is missing: run `make protos` and commit"
        assert committed.read_text() == fresh.read_text(), f"{committed} is stale: run `make protos` and commit"


def test_every_rpc_and_field_is_commented() -> None:
    for proto in generate.PROTO_ROOT.rglob("*.proto"):
        lines = proto.read_text().splitlines()
        for i, line in enumerate(lines):
            stripped = line.strip()
            is_rpc = stripped.startswith("rpc ")
            is_field = stripped.endswith(";") and "=" in stripped and not stripped.startswith(("option", "syntax", "package", "import", "//"))
            if is_rpc or is_field:
                assert lines[i - 1].strip().startswith("//"), f"{proto.name}:{i + 1} has no comment: {stripped}"


@pytest.mark.parametrize("name", ["Join", "GetRound", "DownloadModel", "SubmitUpdate", "GetStatus", "GetRoundMetrics"])
def test_service_exposes_rpc(name: str) -> None:
    from protos.fedsegnet.v1 import aggregator_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["AggregatorService"]
    assert name in service.methods_by_name
