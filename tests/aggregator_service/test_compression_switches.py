"""The compression techniques' aggregator-side switches: config keys, the sparsity warm-up schedule,
what the round's TrainingConfig carries, and server momentum over sparse updates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import codec
from aggregator_service import strategies
from aggregator_service.config import ConfigError, SparsityWarmup, parse_federation_config
from aggregator_service.wire import training_config_to_proto

TABLES = {
    "federation": {"rounds": 10},
    "training": {"optimizer": "sgd", "momentum": 0.9, "learning_rate": 0.1, "momentum_correction": 0.5,
                 "clip_norm": 5.0, "keep_optimizer_state": True},
    "codec": {"top_k_fraction": 0.01, "top_k_scope": "global", "quantization": "int8",
              "warmup_rounds": 4, "warmup_start_fraction": 0.25},
    "aggregation": {"strategy": "aam", "server_momentum": 0.9},
}


def test_warmup_schedule_values() -> None:
    w = SparsityWarmup(rounds=4, start_fraction=0.25)
    # exponential from 0.25 to 0.01 over rounds 1..4, the target from round 5 on
    expected = [0.25, 0.25 * 0.04 ** 0.25, 0.25 * 0.04 ** 0.5, 0.25 * 0.04 ** 0.75, 0.01, 0.01]
    assert [w.fraction_at(r, 0.01) for r in range(1, 7)] == pytest.approx(expected)
    assert w.fraction_at(2, 0.01) == pytest.approx(0.1118, abs=1e-4)
    assert SparsityWarmup().fraction_at(1, 0.01) == 0.01  # off by default
    assert SparsityWarmup(rounds=3, start_fraction=0.005).fraction_at(1, 0.01) == 0.01  # never below the target


def test_round_config_carries_every_switch() -> None:
    config = parse_federation_config(TABLES)
    first, fifth = training_config_to_proto(config, 1), training_config_to_proto(config, 5)
    assert first.codec.top_k_fraction == pytest.approx(0.25)
    assert fifth.codec.top_k_fraction == pytest.approx(0.01)
    assert codec.CodecSpec.from_message(fifth.codec) == config.codec
    assert first.momentum_correction == pytest.approx(0.5)
    assert first.clip_norm == pytest.approx(5.0)
    assert first.keep_optimizer_state is True
    assert config.aggregation.server_momentum == pytest.approx(0.9)  # type: ignore[attr-defined]


@pytest.mark.parametrize(("section", "key", "value", "match"), [
    ("training", "momentum_correction", 1.0, "momentum_correction"),
    ("training", "clip_norm", -1.0, "clip_norm"),
    ("training", "keep_optimizer_state", 1, "keep_optimizer_state"),
    ("codec", "warmup_rounds", -2, "warmup_rounds"),
    ("codec", "warmup_start_fraction", 0.0, "warmup_start_fraction"),
    ("codec", "warmup_fraction", 0.5, "warmup_fraction"),
    ("aggregation", "server_momentum", 1.0, "server_momentum"),
    ("aggregation", "server_lr", 0.0, "server_lr"),
])
def test_bad_values_are_refused_by_name(section: str, key: str, value: object, match: str) -> None:
    tables = {k: dict(v) for k, v in TABLES.items()}
    tables[section][key] = value
    with pytest.raises(ConfigError, match=match):
        parse_federation_config(tables)


class _Sparse:
    """A site's update of one tensor as the aggregator holds it: a few sent entries."""

    def __init__(self, shape: tuple[int, ...], index: list[int], values: list[float]) -> None:
        self.shape, self.index, self.values = shape, np.array(index), np.array(values, np.float32)

    def dense(self) -> np.ndarray:
        out = np.zeros(self.shape, np.float32)
        out.reshape(-1)[self.index] = self.values
        return out

    def add_to(self, acc: np.ndarray, weight: float) -> None:
        acc.reshape(-1)[self.index] += np.float32(weight) * self.values

    def dense_into(self, out: np.ndarray) -> None:
        out[...] = self.dense()


def test_server_momentum_over_sparse_updates(tmp_path: Path) -> None:
    strategy = strategies.from_table({"strategy": "fedavg", "server_momentum": 0.5, "server_lr": 2.0})
    model = tmp_path / "round-0001.frames"
    theta = np.zeros(6, np.float32)
    state = strategy.load_state(model)
    assert state == {}
    w = np.array([0.5, 0.5])
    theta = strategy.apply("w", theta, iter([_Sparse((6,), [0], [2.0]), _Sparse((6,), [1], [4.0])]), w, state)
    # m = Σ w Δ = [1, 2, 0...]; θ = 2 m
    np.testing.assert_allclose(theta, [2, 4, 0, 0, 0, 0])
    strategy.save_state(tmp_path / "round-0002.frames", state)
    state2 = strategy.load_state(tmp_path / "round-0002.frames")
    np.testing.assert_allclose(state2["w"], [1, 2, 0, 0, 0, 0])
    theta = strategy.apply("w", theta, iter([_Sparse((6,), [2], [2.0]), _Sparse((6,), [2], [2.0])]), w, state2)
    # m = 0.5 [1, 2, 0] + [0, 0, 2] = [0.5, 1, 2]; θ += 2 m
    np.testing.assert_allclose(theta, [3, 6, 4, 0, 0, 0])
    # an integer buffer keeps its value, and no momentum is kept for it
    counter = np.array([7], np.int64)
    assert strategy.apply("n", counter, iter([]), w, state2) is counter and "n" not in state2


def test_no_server_momentum_is_the_plain_round(tmp_path: Path) -> None:
    plain = strategies.from_table({"strategy": "aam"})
    assert plain.load_state(tmp_path / "round-0001.frames") is None
    theta = np.ones(4, np.float32)
    out = plain.apply("w", theta, iter([_Sparse((4,), [3], [1.0])]), np.array([1.0]), None)
    np.testing.assert_allclose(out, [1, 1, 1, 2])
