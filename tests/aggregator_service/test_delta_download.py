"""Model downloads as lossless deltas from the round a site holds (aggregator_service.downloads).

Plain-function tests on a hand-made store, then a real aggregator on port 0 with a real agent.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import grpc
import numpy as np
import pytest

import codec
from aggregator_service import downloads, rounds
from aggregator_service.records import ModelManifest, TensorSpec
from aggregator_service.store import Store
from client_agent.agent import SiteAgent
from client_agent.reporting import Reporter
from client_agent.state import SiteState
from client_agent.transport import AggregatorClient, HeldModel
from protos.fedsegnet.v1 import aggregator_pb2 as pb
from protos.fedsegnet.v1 import aggregator_pb2_grpc as pb_grpc
from tests.agent_federation import (
    FAST_RETRIES,
    Federation,
    federation_config,
    run_agent,
    settings,
)

SPARSE = codec.CodecSpec(top_k_fraction=0.01, quantization="int8")

# ------------------------------------------------------------------------ plain functions


def write_model(store: Store, round_id: int, tensors: dict, spec: codec.CodecSpec = codec.LOSSLESS) -> Path:
    """A global model file and its manifest, as rounds.close_round leaves them."""
    path = store.model_path(round_id)
    codec.save_tensors(path, tensors.items(), spec)
    store.write_record(f"models/round-{round_id:04d}.json", ModelManifest(
        codec.file_digest(path), path.stat().st_size,
        tuple(TensorSpec(name, tuple(a.shape), a.dtype.str) for name, a in tensors.items()),
    ))
    return path


def sparse_step(model: dict, rng: np.random.Generator, fraction: float = 0.01) -> dict:
    new = {k: v.copy() for k, v in model.items()}
    for v in new.values():
        flat = v.reshape(-1)
        picked = rng.choice(flat.size, max(1, int(fraction * flat.size)), replace=False)
        flat[picked] += np.float32(1e-3)
    return new


@pytest.fixture
def store(tmp_path: Path) -> Store:
    rng = np.random.default_rng(0)
    store = Store(tmp_path / "store")
    model1 = {"w": rng.standard_normal((64, 64)).astype(np.float32), "b": rng.standard_normal(64).astype(np.float32)}
    write_model(store, 1, model1)
    write_model(store, 2, sparse_step(model1, rng))
    return store


def choose(store: Store, round_id: int, **have) -> downloads.ModelDownload:
    digest = rounds.read_manifest(store, round_id).digest
    return downloads.choose_download(store, round_id, store.model_path(round_id), digest, **have)


def rebuild(store: Store, download: downloads.ModelDownload) -> bytes:
    """What a site holding the base rebuilds: the model's frames, concatenated."""
    base = codec.load_tensors(store.model_path(download.delta_from_round))
    tensors = codec.apply_model_delta(base, downloads.iter_frames(download.path))
    return b"".join(codec.encode_tensors(tensors, codec.LOSSLESS))


def full_frames(store: Store, round_id: int) -> bytes:
    return b"".join(downloads.iter_frames(store.model_path(round_id)))


def test_a_site_holding_the_previous_round_gets_a_smaller_delta_that_rebuilds_the_exact_model(store):
    download = choose(store, 2, have_round=1, have_digest=rounds.read_manifest(store, 1).digest)

    assert download.delta_from_round == 1
    assert download.nbytes < store.model_path(2).stat().st_size / 4
    assert rebuild(store, download) == full_frames(store, 2)


@pytest.mark.parametrize("have_round", [0, 2, 3, 9])
def test_a_site_holding_nothing_older_gets_the_full_model(store, have_round):
    download = choose(store, 2, have_round=have_round)

    assert (download.delta_from_round, download.path) == (0, store.model_path(2))


def test_a_site_whose_model_is_not_the_stores_gets_the_full_model(store):
    download = choose(store, 2, have_round=1, have_digest="0" * 64)

    assert download.delta_from_round == 0


def test_a_base_the_store_no_longer_has_gives_the_full_model(store):
    store.model_path(1).unlink()

    assert choose(store, 2, have_round=1).delta_from_round == 0


def test_the_delta_is_computed_once_and_cached_in_the_store(store):
    first = choose(store, 2, have_round=1)
    frames, record = downloads.delta_paths(store, 1, 2)
    written = frames.stat().st_mtime_ns

    second = choose(store, 2, have_round=1)

    assert first == second and record.exists()
    assert frames.stat().st_mtime_ns == written, "a valid cached delta must not be written again"


@pytest.mark.parametrize("damage", ["garbage", "truncated", "missing", "record_missing", "record_garbage"])
def test_a_damaged_cache_is_computed_again(store, damage):
    good = choose(store, 2, have_round=1)
    frames, record = downloads.delta_paths(store, 1, 2)
    if damage == "garbage":
        frames.write_bytes(b"garbage" * 100)
    elif damage == "truncated":
        frames.write_bytes(frames.read_bytes()[:-10])
    elif damage == "missing":
        frames.unlink()
    elif damage == "record_missing":
        record.unlink()
    else:
        record.write_text("{not json")

    again = choose(store, 2, have_round=1)

    assert again == good
    assert rebuild(store, again) == full_frames(store, 2)


def test_a_delta_that_would_not_be_smaller_is_not_sent(tmp_path):
    rng = np.random.default_rng(1)
    store = Store(tmp_path / "store")
    # Unrelated values with random bit patterns (finite): their XOR is noise that no stage shrinks.
    def noise() -> np.ndarray:
        return rng.integers(0, 0x7F000000, 4096, dtype=np.uint32).view(np.float32)

    write_model(store, 1, {"w": noise()})
    write_model(store, 2, {"w": noise()})

    download = choose(store, 2, have_round=1)

    assert download.delta_from_round == 0
    assert downloads.ensure_delta(store, 1, 2).bytes >= store.model_path(2).stat().st_size


def test_a_model_that_does_not_reencode_to_its_digest_is_sent_in_full(tmp_path, caplog):
    # Written with another zstd level (as another codec version might): a site could rebuild the
    # values but never the stored bytes, so its digest check would fail. No delta then.
    rng = np.random.default_rng(2)
    store = Store(tmp_path / "store")
    model1 = {"w": rng.standard_normal(4096).astype(np.float32)}
    write_model(store, 1, model1)
    write_model(store, 2, sparse_step(model1, rng), codec.CodecSpec(zstd_level=19))

    with caplog.at_level(logging.WARNING, logger="aggregator_service.downloads"):
        download = choose(store, 2, have_round=1)

    assert download.delta_from_round == 0
    assert "does not re-encode to its stored digest" in caplog.text
    assert not downloads.delta_paths(store, 1, 2)[0].exists()


def test_models_with_other_tensors_give_the_full_model_and_a_warning(tmp_path, caplog):
    store = Store(tmp_path / "store")
    write_model(store, 1, {"w": np.zeros(16, np.float32)})
    write_model(store, 2, {"w": np.zeros(8, np.float32)})

    with caplog.at_level(logging.WARNING, logger="aggregator_service.downloads"):
        download = choose(store, 2, have_round=1)

    assert download.delta_from_round == 0
    assert "equal shapes and dtypes" in caplog.text


# ------------------------------------------------------------------ real aggregator and agent


@pytest.fixture(scope="module")
def sparse_federation(tmp_path_factory: pytest.TempPathFactory, mni_site: Path):
    """One site through a 2-round top-1% int8 federation; the server keeps running for the tests.

    The store then holds models 1, 2 and 3 (the final one, which closing round 2 wrote).
    """
    root = tmp_path_factory.mktemp("delta-federation")
    with Federation(root, federation_config(rounds=2, codec_spec=SPARSE)) as fed:
        run = run_agent(settings(mni_site, root / "state", fed.target))
        # Read now: the tests below download more.
        yield fed, run, root / "state", fed.status().bytes_out


def model_bytes(path: Path) -> int:
    return sum(len(f) for f in downloads.iter_frames(path))


@pytest.mark.slow  # a whole 2-round federation (the module-scoped fixture)
def test_rounds_after_the_first_download_a_delta_from_the_previous_round(sparse_federation):
    run = sparse_federation[1]

    got = [(e["round"], e["delta_from"]) for e in run.events("download")]

    assert run.code == 0
    assert got == [(1, 0), (2, 1)]


@pytest.mark.slow  # a whole 2-round federation (the module-scoped fixture)
def test_a_delta_download_costs_a_fraction_of_the_full_model(sparse_federation):
    fed, run, _, _ = sparse_federation
    sent = {e["round"]: e["bytes"] for e in run.events("download")}

    assert sent[2] < model_bytes(fed.store.model_path(2)) / 10
    assert sent[1] == model_bytes(fed.store.model_path(1))


@pytest.mark.slow  # a whole 2-round federation (the module-scoped fixture)
def test_the_rebuilt_models_are_byte_identical_to_the_stores(sparse_federation):
    fed, _, state, _ = sparse_federation

    assert (state / "global-0002.frames").read_bytes() == fed.store.model_path(2).read_bytes()


@pytest.mark.slow  # a whole 2-round federation (the module-scoped fixture)
def test_bytes_out_and_the_rounds_reported_bytes_count_what_was_sent(sparse_federation):
    fed, run, _, bytes_out = sparse_federation
    sent = {e["round"]: e["bytes"] for e in run.events("download")}
    summary = {e["round"]: e["bytes_down"] for e in run.events("round")}

    assert bytes_out == sum(sent.values())
    assert summary == sent
    assert [fed.round_metrics(r).sites[0].bytes_downloaded for r in (1, 2)] == [sent[1], sent[2]]


def download_holding(fed, held_round: int, round_id: int, dest: Path):
    """Download ``round_id`` as site-a holding the store's own (intact) model of ``held_round``."""
    base = HeldModel(held_round, fed.store.model_path(held_round),
                     rounds.read_manifest(fed.store, held_round).digest)
    client = AggregatorClient(fed.target, backoff=FAST_RETRIES, seed=0)
    try:
        return client.download(round_id, "site-a", dest, base=base)
    finally:
        client.close()


@pytest.mark.slow  # a whole 2-round federation (the module-scoped fixture)
def test_a_site_holding_an_older_round_than_the_previous_gets_the_full_model(sparse_federation, tmp_path):
    # Deltas come only from the previous round (a delta per pair of rounds grew the store as R²).
    fed = sparse_federation[0]
    got = download_holding(fed, 1, 3, tmp_path / "m.frames")

    assert got.delta_from_round == 0
    assert (tmp_path / "m.frames").read_bytes() == fed.store.model_path(3).read_bytes()


def raw_download(target: str, **request) -> list[pb.DownloadModelResponse]:
    with grpc.insecure_channel(target) as channel:
        return list(pb_grpc.AggregatorServiceStub(channel).DownloadModel(pb.DownloadModelRequest(**request), timeout=60))


@pytest.mark.slow  # a whole 2-round federation (the module-scoped fixture)
@pytest.mark.parametrize("have_round", [0, 3, 4, 1000])
def test_a_request_without_an_older_round_gets_the_full_model(sparse_federation, have_round):
    fed = sparse_federation[0]

    chunks = raw_download(fed.target, round_id=3, site="site-a", have_round=have_round)

    assert {c.delta_from_round for c in chunks} == {0}
    assert b"".join(c.frame for c in chunks) == b"".join(downloads.iter_frames(fed.store.model_path(3)))
    assert chunks[0].model_digest == rounds.read_manifest(fed.store, 3).digest


@pytest.mark.slow  # a whole 2-round federation (the module-scoped fixture)
def test_a_delta_response_says_its_base_and_the_full_models_digest(sparse_federation):
    fed = sparse_federation[0]

    chunks = raw_download(fed.target, round_id=3, site="site-a", have_round=2)

    assert {(c.round_id, c.delta_from_round, c.model_digest) for c in chunks} == {
        (3, 2, rounds.read_manifest(fed.store, 3).digest)
    }
    assert [c.index for c in chunks] == list(range(len(chunks)))


def corrupt(path: Path) -> None:
    """Flip one byte of the second half of a frame file (inside a frame's payload)."""
    data = bytearray(path.read_bytes())
    data[len(data) * 3 // 4] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.slow  # a whole 2-round federation (the module-scoped fixture)
def test_a_base_that_lies_about_its_digest_falls_back_to_the_full_model(sparse_federation, tmp_path, caplog):
    # The site claims the true digest for a damaged file: the aggregator sends the delta, the
    # rebuild fails its checks, and the agent downloads the full model instead.
    fed = sparse_federation[0]
    damaged = tmp_path / "global-0002.frames"
    damaged.write_bytes(fed.store.model_path(2).read_bytes())
    corrupt(damaged)
    base = HeldModel(2, damaged, rounds.read_manifest(fed.store, 2).digest)
    client = AggregatorClient(fed.target, backoff=FAST_RETRIES, seed=0)
    try:
        with caplog.at_level(logging.WARNING, logger="client_agent.transport"):
            got = client.download(3, "site-a", tmp_path / "m.frames", base=base)
    finally:
        client.close()

    assert got.delta_from_round == 0
    assert (tmp_path / "m.frames").read_bytes() == fed.store.model_path(3).read_bytes()
    assert got.nbytes > model_bytes(fed.store.model_path(3)), "the failed delta's bytes count too"
    assert "delta from round 2 unusable" in caplog.text


@pytest.mark.slow  # a whole 2-round federation (the module-scoped fixture)
def test_a_damaged_delta_cache_is_recomputed_and_still_rebuilds_the_model(sparse_federation, tmp_path):
    fed = sparse_federation[0]
    frames, _ = downloads.delta_paths(fed.store, 2, 3)
    good = frames.read_bytes()
    frames.write_bytes(good[: len(good) // 2])
    got = download_holding(fed, 2, 3, tmp_path / "m.frames")

    assert got.delta_from_round == 2
    assert (tmp_path / "m.frames").read_bytes() == fed.store.model_path(3).read_bytes()
    assert frames.read_bytes() == good


@pytest.mark.slow  # a whole 2-round federation (the module-scoped fixture)
def test_an_agent_whose_model_was_damaged_on_disk_gets_the_full_model(sparse_federation, tmp_path):
    # The agent hashes the model it holds: a damaged file has another digest than the store's
    # round 2 model, so the aggregator sends round 3 in full (no delta is wasted on it).
    fed, _, state, _ = sparse_federation
    (tmp_path / "state").mkdir()
    damaged = tmp_path / "state" / "global-0002.frames"
    damaged.write_bytes((state / "global-0002.frames").read_bytes())
    corrupt(damaged)
    client = AggregatorClient(fed.target, backoff=FAST_RETRIES, seed=0)
    try:
        agent = SiteAgent(settings(Path("unused"), tmp_path / "state", fed.target), client, Reporter(fmt="json", stream=io.StringIO()))
        held = agent.held_model(3)
        got = client.download(3, "site-a", tmp_path / "state" / "global-0003.frames", base=held)
    finally:
        client.close()

    assert held is not None and (held.round_id, held.path) == (2, damaged)
    assert held.digest != rounds.read_manifest(fed.store, 2).digest
    assert got.delta_from_round == 0
    assert got.nbytes == model_bytes(fed.store.model_path(3))
    assert (tmp_path / "state" / "global-0003.frames").read_bytes() == fed.store.model_path(3).read_bytes()


@pytest.mark.parametrize("files, before, expected", [((), 3, None), ((1, 2, 5), 3, 2), ((1, 2, 5), 2, 1), ((4,), 4, None)])
def test_the_base_is_the_newest_global_model_before_the_round(tmp_path, files, before, expected):
    state = SiteState(tmp_path)
    for r in files:
        state.write_tensors("global", r, [("w", np.zeros(2, np.float32))])
    (tmp_path / "global-0001.download").write_bytes(b"half a download")

    latest = state.latest_global(before)

    assert (latest[0] if latest else None) == expected
    assert latest is None or latest[1] == tmp_path / f"global-{expected:04d}.frames"
