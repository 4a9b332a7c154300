"""One class per aggregation strategy behind one protocol, and the strict ``[aggregation]`` table."""

from __future__ import annotations

import math

import numpy as np
import pytest

from aggregator_service import strategies
from aggregator_service.aam import AAMConfig, SiteStats, aam_weights
from aggregator_service.config import ConfigError, load_federation_file
from aggregator_service.strategies import (
    AAM,
    STRATEGIES,
    FedAdam,
    FedAvg,
    Mean,
    Median,
    TrimmedMean,
    from_table,
)


def stats_for(counts: list[int], finite: list[bool] | None = None) -> list[SiteStats]:
    finite = finite or [True] * len(counts)
    return [
        SiteStats(site=f"s{i}", sample_count=n, dice=0.8, hd95=3.0, update_norm=1.0, finite=f)
        for i, (n, f) in enumerate(zip(counts, finite))
    ]


class Dense:
    """A site's delta of one tensor as the strategies read it (rounds.SiteTensor's interface)."""

    def __init__(self, values: list[float]) -> None:
        self.values = np.array(values, dtype=np.float32)

    def add_to(self, acc: np.ndarray, weight: float) -> None:
        acc += np.float32(weight) * self.values

    def dense(self) -> np.ndarray:
        return self.values.copy()

    def dense_into(self, out: np.ndarray) -> None:
        out[...] = self.values


def test_every_strategy_is_a_class_with_only_its_own_parameters() -> None:
    assert list(STRATEGIES) == ["fedavg", "mean", "median", "trimmed_mean", "fedadam", "aam"]
    # fedavg, mean and aam share server momentum (docs/compression.md)
    assert strategies.parameters("fedavg") == ["strategy", "server_lr", "server_momentum"]
    assert strategies.parameters("trimmed_mean") == ["strategy", "trim_fraction"]
    assert strategies.parameters("fedadam") == ["strategy", "beta1", "beta2", "server_lr", "tau"]
    assert strategies.parameters("aam") == ["strategy", "aam", "server_lr", "server_momentum"]
    for cls in STRATEGIES.values():
        assert isinstance(cls(), strategies.Strategy)


@pytest.mark.parametrize(("table", "expected"), [
    ({}, FedAvg()),
    ({"strategy": "mean"}, Mean()),
    ({"strategy": "median"}, Median()),
    ({"strategy": "trimmed_mean", "trim_fraction": 0.2}, TrimmedMean(trim_fraction=0.2)),
    ({"strategy": "fedadam", "server_lr": 0.1, "tau": 1e-4}, FedAdam(server_lr=0.1, tau=1e-4)),
    ({"strategy": "aam", "aam": {"max_weight": 0.5}}, AAM(aam=AAMConfig(max_weight=0.5))),
])
def test_from_table_builds_the_named_strategy(table: dict, expected: object) -> None:
    assert from_table(table) == expected


@pytest.mark.parametrize(("table", "message"), [
    ({"strategy": "krum"}, r"unknown aggregation strategy 'krum'; allowed: \['fedavg', 'mean'"),
    ({"name": "aam"}, r"unknown key\(s\) \['name'\] for strategy 'fedavg'; allowed: \['strategy', 'server_lr'"),
    ({"trim_fraction": 0.2}, r"unknown key\(s\) \['trim_fraction'\] for strategy 'fedavg'; allowed: \['strategy', 'server_lr'"),
    ({"strategy": "median", "aam": {}}, r"\['aam'\] for strategy 'median'"),
    ({"strategy": "aam", "aam": {"temperature": 1.0}}, r"unknown AAM option\(s\) \['temperature'\]"),
    ({"strategy": "aam", "aam": 0.5}, "aam must be a table of AAM options"),
    ({"strategy": "trimmed_mean", "trim_fraction": 0.5}, r"trim_fraction must be in \[0, 0.5\), got 0.5"),
    ({"strategy": "fedadam", "server_lr": -1.0}, "server_lr must be a finite number > 0, got -1.0"),
    ({"strategy": "fedadam", "beta1": 1.0}, r"beta1 must be in \[0, 1\)"),
    ({"strategy": "fedadam", "tau": math.inf}, "tau must be a finite number > 0"),
    ({"strategy": "fedadam", "tau": "small"}, "tau must be a number, got 'small'"),
])
def test_from_table_refuses_by_name(table: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        from_table(table)


@pytest.mark.parametrize(("toml", "message"), [
    # Once ran AAM while GetStatus and _result.json reported "fedavg".
    ('[aggregation]\nname = "aam"\n', r"\[aggregation\]: unknown key\(s\) \['name'\] for strategy 'fedavg'"),
    ('[aggregation]\nstrategy = "fedavg"\ntrim_fraction = 0.2\n', r"unknown key\(s\) \['trim_fraction'\]"),
    ('[federation]\nrouns = 3\n', r"unknown key\(s\) \['rouns'\] in \[federation\]; allowed: \["),
    ('[simulation]\nsites = 3\n', r"unknown section\(s\) \['simulation'\]"),
    ("[federation\n", "is not valid TOML"),
])
def test_the_federation_file_is_strict_in_every_table(toml: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_federation_file(text=toml)


def test_a_program_reads_its_own_tables_from_the_same_parse() -> None:
    read = load_federation_file(
        text='[simulation]\nsites = 3\n[aggregation]\nstrategy = "median"\n', extensions=("simulation",)
    )
    assert read.extensions == {"simulation": {"sites": 3}}
    assert read.config.aggregation == Median() and read.config.strategy == "median"


@pytest.mark.parametrize(("strategy", "expected"), [
    (FedAvg(), [0.25, 0.75]),
    (FedAdam(), [0.25, 0.75]),  # FedAdam's pseudo-gradient is the FedAvg-weighted mean
    (Mean(), [0.5, 0.5]),
    (AAM(), [0.25, 0.75]),  # alike sites: AAM is FedAvg
    (Median(), [0.5, 0.5]),  # order statistics: every site alike
    (TrimmedMean(), [0.5, 0.5]),
])
def test_weights_per_strategy(strategy: strategies.Strategy, expected: list[float]) -> None:
    weights, factors = strategy.weights(stats_for([1, 3]))
    np.testing.assert_array_equal(weights, expected)
    assert len(factors) == 2


def test_aam_uses_its_config() -> None:
    stats = stats_for([8, 1, 1])
    weights, _ = AAM(aam=AAMConfig(max_weight=0.5)).weights(stats)
    np.testing.assert_array_equal(weights, aam_weights(stats, AAMConfig(max_weight=0.5)).weights)
    np.testing.assert_allclose(weights, [0.5, 0.25, 0.25], rtol=1e-12)


@pytest.mark.parametrize("strategy", [FedAvg(), Mean(), FedAdam()])
def test_baselines_refuse_non_finite_updates(strategy: strategies.Strategy) -> None:
    with pytest.raises(ValueError, match=r"cannot aggregate non-finite updates of site\(s\) \['s1'\]"):
        strategy.weights(stats_for([1, 1], finite=[True, False]))


@pytest.mark.parametrize(("strategy", "expected"), [
    (Median(), 3.0),  # median(1, 3, 20)
    (TrimmedMean(trim_fraction=0.4), 3.0),  # K = 3, trim 0.4 -> drop 1 each side -> 3
    (FedAvg(), 10.0 + 2.0 * 0.5 + 3.0 * 0.25 + 20.0 * 0.25),
])
def test_apply_combines_one_tensor(strategy: strategies.Strategy, expected: float) -> None:
    weighted = isinstance(strategy, FedAvg)
    theta = np.array([10.0 if weighted else 0.0], dtype=np.float32)
    deltas = [Dense([2.0 if weighted else 1.0]), Dense([3.0]), Dense([20.0])]
    new = strategy.apply("w", theta, iter(deltas), np.array([0.5, 0.25, 0.25]), None)
    np.testing.assert_allclose(new, [expected], rtol=1e-6)


def test_median_of_an_even_count_is_the_mean_of_the_two_middle_values() -> None:
    theta = np.array([0.0, 1.0], dtype=np.float32)
    deltas = [Dense([1.0, 4.0]), Dense([2.0, -1.0]), Dense([10.0, 0.5]), Dense([3.0, 0.0])]
    new = Median().apply("w", theta, iter(deltas), np.full(4, 0.25), None)
    np.testing.assert_array_equal(new, [2.5, 1.25])  # (2 + 3) / 2, 1 + (0 + 0.5) / 2


def test_integer_tensors_keep_the_global_value() -> None:
    theta = np.array([7], dtype=np.int64)
    for strategy in (FedAvg(), Median()):
        assert strategy.apply("steps", theta, iter([Dense([1.0])]), np.array([1.0]), None) is theta
