"""The round lifecycle as plain functions over a store: no server, numpy models, hand-made updates."""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import codec
from aggregator_service import rounds
from aggregator_service.config import FederationConfig
from aggregator_service.errors import (
    ConflictingSubmission,
    InvalidUpdate,
    StoreError,
    UnknownSite,
    UpdateTooLarge,
    WrongRound,
)
from aggregator_service.rounds import UpdateCommit, UpdateHeader
from aggregator_service.store import Store

MODEL = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([0.5, -0.5], dtype=np.float32)}


def config(**overrides: object) -> FederationConfig:
    base = dict(federation_id="t", rounds=2, min_clients=2, max_clients=3, sites=("a", "b", "c"))
    base.update(overrides)
    return FederationConfig(**base)  # type: ignore[arg-type]


@pytest.fixture
def store(tmp_path: Path) -> Store:
    initial = tmp_path / "initial.frames"
    codec.save_tensors(initial, MODEL.items())
    s = Store(tmp_path / "store")
    rounds.initialize(s, config(), initial, now=1000.0)
    return s


def upload(tensors: dict[str, np.ndarray], spec: codec.CodecSpec = codec.LOSSLESS) -> list[bytes | UpdateCommit]:
    frames = list(codec.encode_tensors(tensors.items(), spec))
    digest = codec.frames_digest(frames)
    return [*frames, UpdateCommit(chunk_count=len(frames), digest=digest)]


def header(site: str, round_id: int = 1, n: int = 10) -> UpdateHeader:
    return UpdateHeader(site=site, round_id=round_id, sample_count=n, metrics={"dice": 0.5, "hd95": 3.0})


def submit(store: Store, site: str, delta: dict[str, np.ndarray], *, round_id: int = 1, n: int = 10,
           cfg: FederationConfig | None = None) -> rounds.Receipt:
    cfg = cfg or config()
    spool, record = rounds.spool_update(store, cfg, header(site, round_id, n), upload(delta))
    return rounds.commit_update(store, cfg, spool, record, now=1001.0)


def deltas(scale: float) -> dict[str, np.ndarray]:
    return {k: np.full_like(v, scale) for k, v in MODEL.items()}


def test_fedavg_close_weights_by_sample_count_and_opens_the_next_round(store: Store) -> None:
    submit(store, "a", deltas(1.0), n=30)
    submit(store, "b", deltas(-1.0), n=10)
    assert not rounds.due_to_close(store, config(), now=1002.0)  # 2 of max 3, deadline not reached
    assert rounds.due_to_close(store, config(), now=1000.0 + 601)  # deadline passed with min_clients
    result = rounds.close_round(store, config(), now=2000.0)
    # θ + (30·1 + 10·(−1)) / 40 = θ + 0.5
    new = codec.load_tensors(store.model_path(2))
    for name, value in MODEL.items():
        np.testing.assert_array_equal(new[name], value + 0.5)
    assert result["sites"]["a"]["weight"] == pytest.approx(0.75)
    view = rounds.current_round(store, config())
    assert (view.round_id, view.state, view.submitted_sites) == (2, "open", ())


def test_closing_again_writes_byte_identical_model(store: Store, tmp_path: Path) -> None:
    submit(store, "a", deltas(0.25), n=3)
    submit(store, "b", {"w": np.random.default_rng(0).normal(size=(2, 3)).astype(np.float32), "b": MODEL["b"]}, n=7)
    state_before = store.read_json("state.json")
    rounds.close_round(store, config(), now=2000.0)
    first = store.model_path(2).read_bytes()
    # A crash after the model was written but before state.json moved on: the round closes again.
    store.write_json("state.json", state_before)
    rounds.close_round(store, config(), now=2001.0)
    assert store.model_path(2).read_bytes() == first


def test_duplicate_submission_is_idempotent_and_conflicting_one_refused(store: Store) -> None:
    first = submit(store, "a", deltas(1.0))
    again = submit(store, "a", deltas(1.0))
    assert (again.duplicate, again.digest, again.submissions) == (True, first.digest, 1)
    with pytest.raises(ConflictingSubmission, match="already submitted a different update"):
        submit(store, "a", deltas(2.0))
    assert store.read_json("counters.json")["submissions_total"] == 1


@pytest.mark.parametrize(
    "site, round_id, error, message",
    [
        ("zz", 1, UnknownSite, "not in this federation"),
        ("../a", 1, UnknownSite, "not valid"),
        ("a", 2, WrongRound, "the current round is 1"),
    ],
)
def test_header_refusals_name_the_problem(store: Store, site: str, round_id: int, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        rounds.spool_update(store, config(), header(site, round_id), upload(deltas(1.0)))
    assert list((store.root / "spool").iterdir()) == []


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"w": np.zeros((3, 2), np.float32), "b": MODEL["b"]}, "the model's is 'w' \\[2, 3\\]"),
        ({"w": MODEL["w"].astype(np.float64), "b": MODEL["b"]}, "float64"),
        ({"x": MODEL["w"], "b": MODEL["b"]}, "'x'"),
        ({"w": MODEL["w"]}, "holds 1 tensors"),
        ({"w": np.full((2, 3), np.nan, np.float32), "b": MODEL["b"]}, "NaN or Inf"),
    ],
)
def test_updates_that_do_not_match_the_model_are_refused(store: Store, bad: dict, message: str) -> None:
    with pytest.raises(InvalidUpdate, match=message):
        rounds.spool_update(store, config(), header("a"), upload(bad))
    assert store.committed_sites(1) == []
    assert list((store.root / "spool").iterdir()) == []


def test_broken_stream_leaves_nothing_behind(store: Store) -> None:
    parts = upload(deltas(1.0))[:-1]  # no commit: the connection dropped

    with pytest.raises(InvalidUpdate, match="without its commit"):
        rounds.spool_update(store, config(), header("a"), parts)
    assert list((store.root / "spool").iterdir()) == []
    assert store.committed_sites(1) == []


def test_stream_that_raises_mid_way_leaves_nothing_behind(store: Store) -> None:
    def dropped() -> Iterator[bytes | UpdateCommit]:
        yield upload(deltas(1.0))[0]
        raise ConnectionError("peer went away")

    with pytest.raises(ConnectionError):
        rounds.spool_update(store, config(), header("a"), dropped())
    assert list((store.root / "spool").iterdir()) == []


def test_digest_mismatch_and_wrong_chunk_count_are_refused(store: Store) -> None:
    parts = upload(deltas(1.0))
    bad_digest = [*parts[:-1], UpdateCommit(chunk_count=len(parts) - 1, digest="0" * 64)]
    with pytest.raises(InvalidUpdate, match="does not match"):
        rounds.spool_update(store, config(), header("a"), bad_digest)
    bad_count = [*parts[:-1], UpdateCommit(chunk_count=99, digest="")]
    with pytest.raises(InvalidUpdate, match="99 chunks"):
        rounds.spool_update(store, config(), header("a"), bad_count)


def test_update_over_the_size_limit_is_refused(store: Store) -> None:
    cfg = config(max_update_bytes=16)
    with pytest.raises(UpdateTooLarge, match="16 bytes"):
        rounds.spool_update(store, cfg, header("a"), upload(deltas(1.0)))


def test_late_submission_for_a_closed_round_names_the_current_round(store: Store) -> None:
    submit(store, "a", deltas(1.0))
    submit(store, "b", deltas(1.0))
    rounds.close_round(store, config(), now=2000.0)
    with pytest.raises(WrongRound, match="current round is 2"):
        submit(store, "c", deltas(1.0), round_id=1)


def test_federation_finishes_after_the_last_round(store: Store) -> None:
    for r in (1, 2):
        submit(store, "a", deltas(1.0), round_id=r)
        submit(store, "b", deltas(1.0), round_id=r)
        rounds.close_round(store, config(), now=2000.0 + r)
    view = rounds.current_round(store, config())
    assert view.state == rounds.FINISHED
    assert rounds.model_for_download(store, 0)[0] == 3  # the final model
    with pytest.raises(WrongRound, match="finished"):
        submit(store, "c", deltas(1.0), round_id=2)


def test_restart_with_a_different_configuration_is_refused(store: Store) -> None:
    with pytest.raises(StoreError, match="different configuration"):
        rounds.initialize(store, config(rounds=5), None, now=0.0)


def test_empty_store_without_initial_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="--initial-model"):
        rounds.initialize(Store(tmp_path / "s"), config(), None, now=0.0)


def test_aam_gives_a_wildly_divergent_site_no_weight(tmp_path: Path) -> None:
    cfg = config(strategy="aam", sites=("a", "b", "c", "d"), max_clients=4)
    initial = tmp_path / "i.frames"
    codec.save_tensors(initial, MODEL.items())
    store = Store(tmp_path / "aam")
    rounds.initialize(store, cfg, initial, now=0.0)
    for site in ("a", "b", "c"):
        submit(store, site, deltas(0.1), cfg=cfg)
    submit(store, "d", deltas(100.0), cfg=cfg)  # 1000x the others' norm: a poisoned update
    result = rounds.close_round(store, cfg, now=1.0)
    assert result["sites"]["d"]["weight"] == 0.0
    assert result["sites"]["a"]["weight"] == pytest.approx(1 / 3)
    new = codec.load_tensors(store.model_path(2))
    np.testing.assert_allclose(new["w"], MODEL["w"] + 0.1, rtol=1e-6)


@pytest.mark.parametrize("strategy, options, expected", [
    ("median", {}, 1.0),                            # median of (1, 1, 100)
    ("trimmed_mean", {"trim_fraction": 0.34}, 1.0),  # drops 1 from each side of 3: the middle value
    ("mean", {}, 34.0),                             # (1 + 1 + 100) / 3
])
def test_robust_baselines_close_rounds(tmp_path: Path, strategy: str, options: dict, expected: float) -> None:
    cfg = config(strategy=strategy, strategy_options=options)
    initial = tmp_path / "i.frames"
    codec.save_tensors(initial, MODEL.items())
    store = Store(tmp_path / strategy)
    rounds.initialize(store, cfg, initial, now=0.0)
    for site, scale in (("a", 1.0), ("b", 1.0), ("c", 100.0)):
        submit(store, site, deltas(scale), cfg=cfg)
    rounds.close_round(store, cfg, now=1.0)
    new = codec.load_tensors(store.model_path(2))
    np.testing.assert_allclose(new["b"], MODEL["b"] + expected, rtol=1e-6)


def test_fedadam_keeps_its_moments_in_the_store(tmp_path: Path) -> None:
    cfg = config(strategy="fedadam", strategy_options={"server_lr": 0.5}, rounds=2)
    initial = tmp_path / "i.frames"
    codec.save_tensors(initial, MODEL.items())
    store = Store(tmp_path / "adam")
    rounds.initialize(store, cfg, initial, now=0.0)
    for r in (1, 2):
        submit(store, "a", deltas(1.0), round_id=r, cfg=cfg)
        submit(store, "b", deltas(1.0), round_id=r, cfg=cfg)
        rounds.close_round(store, cfg, now=float(r))
    # Round 1: m = 0.1, v = 0.01, step = 0.5 * 0.1 / (0.1 + 1e-3) ≈ 0.495
    first = codec.load_tensors(store.model_path(2))
    np.testing.assert_allclose(first["b"], MODEL["b"] + 0.5 * 0.1 / (0.1 + 1e-3), rtol=1e-5)
    moments = codec.load_tensors(store.model_path(2).with_suffix(".fedadam"))
    np.testing.assert_allclose(moments["m/b"], 0.1, rtol=1e-6)
    # Round 2 starts from the stored moments: m = 0.19, v = 0.0199.
    second = codec.load_tensors(store.model_path(3))
    step2 = 0.5 * 0.19 / (np.sqrt(0.0199) + 1e-3)
    np.testing.assert_allclose(second["b"], first["b"] + step2, rtol=1e-5)


def fedavg_store(tmp_path: Path, model: dict[str, np.ndarray], sites: tuple[str, ...], strategy: str = "fedavg",
                 ) -> tuple[Store, FederationConfig]:
    cfg = config(strategy=strategy, sites=sites, min_clients=1, max_clients=len(sites))
    initial = tmp_path / "initial.frames"
    codec.save_tensors(initial, model.items())
    store = Store(tmp_path / "store")
    rounds.initialize(store, cfg, initial, now=0.0)
    return store, cfg


def test_integer_tensors_keep_their_value_and_the_next_tensor_still_lines_up(tmp_path: Path) -> None:
    # The sites' frames of "steps" are skipped unread; "w" after it must still get its own frames.
    model = {"steps": np.array([5, 7], np.int64), "w": np.array([1.0, 2.0], np.float32)}
    store, cfg = fedavg_store(tmp_path, model, ("a", "b"))
    submit(store, "a", {"steps": np.array([100, 100], np.int64), "w": np.array([1.0, 0.0], np.float32)}, n=1, cfg=cfg)
    submit(store, "b", {"steps": np.array([100, 100], np.int64), "w": np.array([3.0, 2.0], np.float32)}, n=3, cfg=cfg)

    rounds.close_round(store, cfg, now=1.0)

    new = codec.load_tensors(store.model_path(2))
    np.testing.assert_array_equal(new["steps"], [5, 7])
    # w + 0.25 * [1, 0] + 0.75 * [3, 2] = [1 + 2.5, 2 + 1.5]
    np.testing.assert_array_equal(new["w"], np.array([3.5, 3.5], np.float32))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_weighted_close_keeps_each_dtype_and_matches_the_float64_sum(tmp_path: Path, dtype: type) -> None:
    rng = np.random.default_rng(7)
    model = {"w": rng.normal(size=(4, 5)).astype(dtype)}
    updates = [{"w": rng.normal(scale=0.1, size=(4, 5)).astype(dtype)} for _ in range(3)]
    store, cfg = fedavg_store(tmp_path, model, ("a", "b", "c"))
    for site, update, n in zip(("a", "b", "c"), updates, (1, 2, 5)):
        submit(store, site, update, n=n, cfg=cfg)

    rounds.close_round(store, cfg, now=1.0)

    new = codec.load_tensors(store.model_path(2))["w"]
    expected = model["w"].astype(np.float64) + sum(
        n / 8 * u["w"].astype(np.float64) for u, n in zip(updates, (1, 2, 5))
    )
    assert new.dtype == dtype
    # One rounding to the tensor's dtype per site: a few ulps of |θ| at most.
    np.testing.assert_allclose(new, expected, rtol=4 * np.finfo(dtype).eps, atol=4 * np.finfo(dtype).eps)


def close_peak_bytes(tmp_path: Path, sites: tuple[str, ...], strategy: str = "fedavg") -> int:
    """tracemalloc's peak while closing a round of dense 0.8 MB updates from ``sites``."""
    rng = np.random.default_rng(0)
    model = {"w": rng.normal(size=200_000).astype(np.float32), "b": np.zeros(3, np.float32)}
    store, cfg = fedavg_store(tmp_path, model, sites, strategy)
    for site in sites:
        submit(store, site, {k: rng.normal(size=v.shape).astype(np.float32) for k, v in model.items()}, cfg=cfg)
    tracemalloc.start()
    try:
        rounds.close_round(store, cfg, now=1.0)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_close_memory_does_not_grow_with_the_number_of_sites(tmp_path: Path) -> None:
    # Holding each site's last decoded frame between tensors would cost 8 x 0.8 MB more here.
    few = close_peak_bytes(tmp_path / "two", ("a", "b"))
    many = close_peak_bytes(tmp_path / "ten", tuple("abcdefghij"))

    assert many - few < 400_000, f"peak {few} B with 2 sites, {many} B with 10"


def test_median_close_holds_at_most_two_copies_of_the_tensor_per_site(tmp_path: Path) -> None:
    # Once ~7 per site: each delta densified, converted to float64, stacked, and copied by np.median.
    # What does not grow with the sites (θ, the new tensor's encoding) is the same for every strategy.
    tensor_bytes = 200_000 * 4

    two = close_peak_bytes(tmp_path / "two", ("a", "b"), "median")
    eight = close_peak_bytes(tmp_path / "eight", tuple("abcdefgh"), "median")

    per_site = (eight - two) / 6 / tensor_bytes
    assert per_site <= 2.0, f"{per_site:.2f} copies per site ({two} B with 2 sites, {eight} B with 8)"
    assert two <= (2 * 2 + 4) * tensor_bytes, f"{two / tensor_bytes:.1f} copies with 2 sites"


def test_damaged_stored_update_is_left_out_and_the_round_closes(store: Store) -> None:
    submit(store, "a", deltas(1.0))
    submit(store, "b", deltas(1.0))
    # b's stored frames now hold other tensor names (a damaged or tampered store).
    frames_path = store.submission_paths(1, "b")[0]
    with open(frames_path, "wb") as fh:
        codec.write_frames(fh, codec.encode_tensors({"x": MODEL["w"], "y": MODEL["b"]}.items()))

    result = rounds.close_round(store, config(), now=2000.0)

    assert list(result["sites"]) == ["a"] and result["sites"]["a"]["weight"] == 1.0
    assert "round 1: b's stored update is damaged: 'x'" in result["excluded"]["b"]
    assert store.read_json("state.json")["round_id"] == 2
    assert not list(store.model_path(1).parent.glob(".*.tmp"))
