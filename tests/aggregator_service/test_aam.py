"""Tests of the Adaptive Aggregation Mechanism (aggregator_service/aam.py).

Hand-computed cases of the quality formula use ``SYMMETRIC`` (quality in [0.25, 4], no
tolerances: every Dice/HD95 difference counts, both ways), so the arithmetic stays readable; the
defaults (penalty only, Dice tolerance 0.1, HD95 tolerance 0.5) have their own cases below.
Otherwise: T_dice = 0.1, T_hd95 = 1, h0 = 1 mm, c = 2, p = 2, L = 10, no cap.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from support import examples

from aggregator_service.aam import (
    AAMConfig,
    InfeasibleRoundError,
    SiteStats,
    aam_weights,
    apply_weight_cap,
)
from aggregator_service.aggregation import fedavg_weights

E = math.e
SYMMETRIC = AAMConfig(quality_ceiling=4.0, dice_tolerance=0.0, hd95_tolerance=0.0)


def site(
    name: str,
    n: int = 1,
    dice: float | None = 0.8,
    hd95: float | None = 5.0,
    norm: float = 1.0,
    finite: bool = True,
) -> SiteStats:
    return SiteStats(site=name, sample_count=n, dice=dice, hd95=hd95, update_norm=norm, finite=finite)


# ------------------------------------------------------------------------------- hand-computed cases


def test_alike_sites_get_exactly_fedavg() -> None:
    # Prepare: same Dice, HD95 and norm; n = 10, 30, 60 -> FedAvg shares 0.1, 0.3, 0.6.
    stats = [site("a", 10), site("b", 30), site("c", 60)]

    # Execute
    result = aam_weights(stats)

    # Assert: bit-identical to FedAvg, not just close.
    np.testing.assert_array_equal(result.weights, fedavg_weights([10, 30, 60]))
    np.testing.assert_allclose(result.weights, [0.1, 0.3, 0.6], rtol=0, atol=1e-15)
    assert result.weights.dtype == np.float64


def test_dice_above_and_below_median() -> None:
    # Dice 0.7, 0.8, 0.9 -> median 0.8, terms -1, 0, +1 -> q = e^-1, 1, e (inside [0.25, 4]).
    # Sum = 0.3678794 + 1 + 2.7182818 = 4.0861613 -> 0.0900306, 0.2447285, 0.6652410.
    stats = [site("a", dice=0.7), site("b", dice=0.8), site("c", dice=0.9)]

    weights = aam_weights(stats, SYMMETRIC).weights

    expected = np.array([1 / E, 1.0, E]) / (1 / E + 1.0 + E)
    np.testing.assert_allclose(weights, expected, rtol=1e-12)
    np.testing.assert_allclose(weights, [0.0900306, 0.2447285, 0.6652410], atol=1e-7)


def test_sample_counts_and_quality_multiply() -> None:
    # n = 10, 30, 60; dice 0.9, 0.8, 0.8 -> median 0.8, q = e, 1, 1.
    # raw = 10e = 27.18282, 30, 60; total 117.18282 -> 0.2319693, 0.2560102, 0.5120205.
    stats = [site("a", 10, dice=0.9), site("b", 30), site("c", 60)]

    weights = aam_weights(stats, SYMMETRIC).weights

    np.testing.assert_allclose(weights, np.array([10 * E, 30, 60]) / (10 * E + 90), rtol=1e-12)
    np.testing.assert_allclose(weights, [0.2319693, 0.2560102, 0.5120205], atol=1e-7)


@pytest.mark.parametrize(
    ("dices", "expected"),
    [
        # Dice 0.2 vs median 0.8: term -6 clipped to ln 0.25 -> q = 0.25 -> 0.25, 1, 1 over 2.25.
        ([0.2, 0.8, 0.8], [1 / 9, 4 / 9, 4 / 9]),
        # Dice 1.0 vs median 0.8: term +2, e^2 = 7.39 clipped to the ceiling 4 -> 1, 1, 4 over 6.
        ([0.8, 0.8, 1.0], [1 / 6, 1 / 6, 2 / 3]),
    ],
)
def test_quality_is_clipped_to_floor_and_ceiling(dices: list[float], expected: list[float]) -> None:
    stats = [site(name, dice=d) for name, d in zip("abc", dices)]

    weights = aam_weights(stats, SYMMETRIC).weights

    np.testing.assert_allclose(weights, expected, rtol=1e-12)


@pytest.mark.parametrize(
    ("hd95s", "expected"),
    [
        # Median HD95 1 mm; (3 + 1) / (1 + 1) = 2 -> q = 1/2 -> 1, 1, 0.5 over 2.5.
        ([1.0, 1.0, 3.0], [0.4, 0.4, 0.2]),
        # HD95 = inf (empty prediction) -> term -inf -> quality floor 0.25 -> 1, 1, 0.25 over 2.25.
        ([2.0, 2.0, math.inf], [4 / 9, 4 / 9, 1 / 9]),
        # HD95 = 0 vs median 1: (0 + 1) / (1 + 1) = 1/2 -> q = 2 -> 2, 1, 1 over 4.
        ([0.0, 1.0, 1.0], [0.5, 0.25, 0.25]),
    ],
)
def test_hd95_relative_to_median(hd95s: list[float], expected: list[float]) -> None:
    stats = [site(name, dice=None, hd95=h) for name, h in zip("abc", hd95s)]

    weights = aam_weights(stats, SYMMETRIC).weights

    np.testing.assert_allclose(weights, expected, rtol=1e-12)


@pytest.mark.parametrize(
    ("norms", "expected"),
    [
        # Ratios 1, 1, 1.5 <= c = 2: no penalty, plain FedAvg.
        ([1.0, 1.0, 1.5], [1 / 3, 1 / 3, 1 / 3]),
        # Ratio exactly c = 2 is still "normal".
        ([1.0, 1.0, 2.0], [1 / 3, 1 / 3, 1 / 3]),
        # Ratio 4: d = (2/4)^2 = 0.25 -> 1, 1, 0.25 over 2.25.
        ([1.0, 1.0, 4.0], [4 / 9, 4 / 9, 1 / 9]),
        # Ratio exactly L = 10: d = (2/10)^2 = 0.04 -> 1, 1, 0.04 over 2.04.
        ([1.0, 1.0, 10.0], [1 / 2.04, 1 / 2.04, 0.04 / 2.04]),
        # Ratio 10.5 > L: excluded.
        ([1.0, 1.0, 10.5], [0.5, 0.5, 0.0]),
        # 100x the median: excluded.
        ([1.0, 1.0, 100.0], [0.5, 0.5, 0.0]),
    ],
)
def test_divergence_factor(norms: list[float], expected: list[float]) -> None:
    stats = [site(name, norm=u) for name, u in zip("abc", norms)]

    weights = aam_weights(stats).weights

    np.testing.assert_allclose(weights, expected, rtol=1e-12, atol=0)


def test_divergent_update_cannot_buy_influence_by_being_larger() -> None:
    # With two honest sites of norm 1, site c at ratio ρ > 2 gets d = (2/ρ)^2 and weight d / (2 + d).
    # Its contribution w * ρ: ρ = 4 -> 0.25/2.25 * 4 = 0.444; ρ = 8 -> 0.0625/2.0625 * 8 = 0.242.
    def contribution(norm: float) -> float:
        result = aam_weights([site("a"), site("b"), site("c", norm=norm)])
        return float(result.weights[2]) * norm

    assert contribution(4.0) == pytest.approx(4 / 9, rel=1e-12)
    assert contribution(8.0) == pytest.approx(0.5 / 2.0625, rel=1e-12)


@pytest.mark.parametrize(
    "broken",
    [
        site("c", dice=1.0, norm=1.0, finite=False),  # NaN/Inf inside the update
        site("c", dice=1.0, norm=math.nan, finite=True),  # norm computation produced NaN
        site("c", dice=1.0, norm=math.inf, finite=True),  # norm overflowed
    ],
)
def test_non_finite_update_gets_zero_weight(broken: SiteStats) -> None:
    # Even with a perfect reported Dice and many samples the broken site gets nothing.
    stats = [site("a", 3), site("b", 1), broken]

    result = aam_weights(stats)

    np.testing.assert_array_equal(result.weights, [0.75, 0.25, 0.0])
    assert result.factors[2]["excluded"] is not None
    assert result.factors[2]["norm_ratio"] is None
    assert result.factors[0]["excluded"] is None


def test_all_updates_non_finite_is_infeasible() -> None:
    stats = [site("a", finite=False), site("b", norm=math.nan)]

    with pytest.raises(InfeasibleRoundError, match="no usable update"):
        aam_weights(stats)


def test_missing_metrics_are_neutral() -> None:
    # Site a reports nothing; b and c have Dice 0.7 and 0.9 -> median 0.8, q = 1 (a), e^-1, e.
    stats = [site("a", dice=None, hd95=None), site("b", dice=0.7), site("c", dice=0.9)]

    weights = aam_weights(stats, SYMMETRIC).weights

    np.testing.assert_allclose(weights, np.array([1.0, 1 / E, E]) / (1 + 1 / E + E), rtol=1e-12)


def test_all_metrics_missing_is_fedavg() -> None:
    stats = [site("a", 2, dice=None, hd95=None), site("b", 6, dice=None, hd95=None)]

    result = aam_weights(stats)

    np.testing.assert_array_equal(result.weights, [0.25, 0.75])
    assert result.references["dice"] is None and result.references["hd95"] is None


@pytest.mark.parametrize(
    "norms",
    [
        [0.0, 0.0, 0.0],  # nobody moved: no reference scale, everything ratio 0
        [0.0, 0.0, 5.0],  # median 0 -> reference is the positive median 5 -> ratios 0, 0, 1
    ],
)
def test_zero_norms_are_handled(norms: list[float]) -> None:
    stats = [site(name, n, norm=u) for name, n, u in zip("abc", [1, 1, 2], norms)]

    weights = aam_weights(stats).weights

    np.testing.assert_array_equal(weights, [0.25, 0.25, 0.5])


def test_single_client_gets_weight_one() -> None:
    result = aam_weights([site("only", 7, dice=0.1, hd95=90.0, norm=123.0)])

    np.testing.assert_array_equal(result.weights, [1.0])


@pytest.mark.parametrize(
    ("counts", "cap", "expected", "capped"),
    [
        # FedAvg 0.8, 0.1, 0.1; a capped at 0.5, excess 0.3 split 1:1 -> 0.25, 0.25.
        ([8, 1, 1], 0.5, [0.5, 0.25, 0.25], [True, False, False]),
        # FedAvg 0.6, 0.3, 0.1, cap 0.4: a -> 0.4, remaining 0.6 split 3:1 -> b 0.45 > 0.4;
        # second pass: b -> 0.4, c gets the remaining 0.2.
        ([6, 3, 1], 0.4, [0.4, 0.4, 0.2], [True, True, False]),
        # Cap not binding (c sits exactly at it, which is allowed): unchanged FedAvg.
        ([1, 1, 2], 0.5, [0.25, 0.25, 0.5], [False, False, False]),
        # Cap exactly 1/K: equal shares. Whether c is flagged depends on the last ulp of
        # 0.2 * (1/3) / 0.2, so its flag is not pinned (None).
        ([5, 3, 2], 1 / 3, [1 / 3, 1 / 3, 1 / 3], [True, True, None]),
    ],
)
def test_cap_redistributes_excess_iteratively(
    counts: list[int], cap: float, expected: list[float], capped: list[bool | None]
) -> None:
    stats = [site(name, n) for name, n in zip("abc", counts)]

    result = aam_weights(stats, AAMConfig(max_weight=cap))

    np.testing.assert_allclose(result.weights, expected, rtol=1e-12)
    assert result.weights.max() <= cap
    for factor, flag in zip(result.factors, capped):
        assert flag is None or factor["capped"] is flag


def test_cap_never_gives_mass_to_excluded_sites() -> None:
    # d is excluded; a, b, c share 1 with cap 0.4: FedAvg over a..c is 0.5, 0.25, 0.25 ->
    # a = 0.4, remaining 0.6 split 1:1 -> 0.3, 0.3.
    stats = [site("a", 2), site("b", 1), site("c", 1), site("d", 100, finite=False)]

    weights = aam_weights(stats, AAMConfig(max_weight=0.4)).weights

    np.testing.assert_allclose(weights, [0.4, 0.3, 0.3, 0.0], rtol=1e-12)


@pytest.mark.parametrize(
    ("stats", "cap"),
    [
        ([site("a"), site("b")], 0.4),  # 2 x 0.4 < 1
        ([site("a"), site("b"), site("c", finite=False)], 0.4),  # only 2 usable
        ([site("only")], 0.5),  # a single site needs max_weight = 1
    ],
)
def test_infeasible_cap_raises_naming_it(stats: list[SiteStats], cap: float) -> None:
    with pytest.raises(InfeasibleRoundError, match="max_weight"):
        aam_weights(stats, AAMConfig(max_weight=cap))


def test_apply_weight_cap_direct() -> None:
    weights, capped = apply_weight_cap(np.array([0.7, 0.2, 0.1, 0.0]), 0.5)

    # 0.7 -> 0.5; remaining 0.5 split 2:1 -> 1/3, 1/6; the zero stays zero.
    np.testing.assert_allclose(weights, [0.5, 1 / 3, 1 / 6, 0.0], rtol=1e-12)
    assert capped.tolist() == [True, False, False, False]


def test_factors_report_every_term() -> None:
    # n = 1, 1, 2; c has Dice 0.9 (term +1, q = e) and norm 4 (ratio 4, d = 0.25).
    stats = [site("a"), site("b"), site("c", 2, dice=0.9, norm=4.0)]

    result = aam_weights(stats, SYMMETRIC)

    assert [f["site"] for f in result.factors] == ["a", "b", "c"]
    c = result.factors[2]
    assert c["sample_count"] == 2
    assert c["fedavg_share"] == 0.5
    assert c["dice_term"] == pytest.approx(1.0)
    assert c["hd95_term"] == 0.0
    assert c["quality"] == pytest.approx(E)
    assert c["norm_ratio"] == 4.0
    assert c["divergence"] == 0.25
    # raw = 1, 1, 2 * e * 0.25 = 1.3591 -> c = 1.3591 / 3.3591 = 0.404609
    assert c["weight"] == pytest.approx(0.5 * E / (2 + 0.5 * E), rel=1e-12)
    assert c["weight"] == c["uncapped_weight"]
    assert c["capped"] is False and c["excluded"] is None
    assert result.references == {"dice": 0.8, "hd95": 5.0, "update_norm": 1.0}


@pytest.mark.parametrize(
    ("dices", "expected_quality"),
    [
        # Median 0.8. 0.75 is within the 0.1 tolerance -> 1; 1.0 is better -> no reward, 1.
        ([0.75, 0.8, 1.0], [1.0, 1.0, 1.0]),
        # 0.6 is 0.2 below: 0.1 beyond the tolerance -> term -1 -> q = e^-1.
        ([0.6, 0.8, 0.9], [1 / E, 1.0, 1.0]),
        # 0.2 is 0.6 below: term -5 -> clipped to the floor 0.25.
        ([0.2, 0.8, 0.8], [0.25, 1.0, 1.0]),
    ],
)
def test_default_quality_only_penalises_beyond_the_tolerance(
    dices: list[float], expected_quality: list[float]
) -> None:
    stats = [site(name, dice=d) for name, d in zip("abc", dices)]

    result = aam_weights(stats)

    np.testing.assert_allclose([f["quality"] for f in result.factors], expected_quality, rtol=1e-12)
    np.testing.assert_allclose(result.weights, np.array(expected_quality) / sum(expected_quality), rtol=1e-12)


def test_default_hd95_tolerance() -> None:
    # Median HD95 1 mm (offset 1). 2 mm: ln(3/2) = 0.405 < 0.5 -> 1. 9 mm: ln(10/2) = 1.609,
    # 1.109 beyond the tolerance -> q = e^-1.109 = 0.3298.
    stats = [site("a", dice=None, hd95=1.0), site("b", dice=None, hd95=2.0), site("c", dice=None, hd95=9.0),
             site("d", dice=None, hd95=0.0), site("e", dice=None, hd95=1.0)]

    qualities = [f["quality"] for f in aam_weights(stats).factors]

    np.testing.assert_allclose(qualities, [1.0, 1.0, math.exp(0.5 - math.log(5.0)), 1.0, 1.0], rtol=1e-12)


def test_the_best_site_gets_no_quality_reward() -> None:
    # The measured runaway (results/README.md): site-3 had the best local Dice by far because the
    # global model had drifted towards it. With the defaults its quality is 1 (no reward); the
    # worst site, 0.135 below the median, loses a little (term -0.35 -> q = 0.705), and only that
    # renormalisation moves site-3 above its FedAvg share of 8/18.
    stats = [site("site-1", 6, dice=0.341), site("site-2", 4, dice=0.206), site("site-3", 8, dice=0.757)]

    result = aam_weights(stats)

    np.testing.assert_allclose([f["quality"] for f in result.factors], [1.0, math.exp(-0.35), 1.0], rtol=1e-9)
    np.testing.assert_allclose(result.weights, np.array([6, 4 * math.exp(-0.35), 8]) / (14 + 4 * math.exp(-0.35)),
                               rtol=1e-9)
    # The symmetric variant hands the same round's best site most of the weight.
    assert aam_weights(stats, SYMMETRIC).weights[2] > 0.8


# ----------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"site": ""}, "site must be a non-empty string"),
        ({"sample_count": 0}, "sample_count of site 's' must be >= 1, got 0"),
        ({"sample_count": 2.5}, "sample_count of site 's' must be an integer"),
        ({"sample_count": True}, "must be an integer"),
        ({"dice": 1.5}, r"dice of site 's' must be in \[0, 1\] or None"),
        ({"dice": math.nan}, "dice of site 's' must be in"),
        ({"hd95": -1.0}, "hd95 of site 's' must be >= 0 mm"),
        ({"hd95": math.nan}, "hd95 of site 's' must be >= 0 mm"),
        ({"update_norm": -0.5}, "update_norm of site 's' must be >= 0, got -0.5"),
    ],
)
def test_site_stats_validation(kwargs: dict[str, object], message: str) -> None:
    values: dict[str, object] = {
        "site": "s", "sample_count": 1, "dice": 0.5, "hd95": 1.0, "update_norm": 1.0, "finite": True
    }
    values.update(kwargs)

    with pytest.raises(ValueError, match=message):
        SiteStats(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_weight": 0.0}, r"max_weight must be in \(0, 1\], got 0.0"),
        ({"max_weight": 1.5}, r"max_weight must be in \(0, 1\], got 1.5"),
        ({"dice_temperature": 0.0}, "dice_temperature must be a finite number > 0, got 0.0"),
        ({"hd95_temperature": math.inf}, "hd95_temperature must be a finite number > 0"),
        ({"hd95_offset_mm": -1.0}, "hd95_offset_mm must be a finite number > 0"),
        ({"divergence_power": 0.0}, "divergence_power must be a finite number > 0"),
        ({"quality_floor": 0.0}, r"quality_floor must be in \(0, 1\], got 0.0"),
        ({"quality_ceiling": 0.5}, "quality_ceiling must be a finite number >= 1, got 0.5"),
        ({"dice_tolerance": -0.1}, "dice_tolerance must be a finite number >= 0, got -0.1"),
        ({"hd95_tolerance": math.nan}, "hd95_tolerance must be a finite number >= 0"),
        ({"divergence_tolerance": 0.5}, "divergence_tolerance must be >= 1"),
        ({"divergence_hard_limit": 2.0}, "divergence_hard_limit must be > divergence_tolerance"),
    ],
)
def test_config_validation(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AAMConfig(**kwargs)


def test_config_is_keyword_only_and_from_mapping_refuses_unknown_keys() -> None:
    with pytest.raises(TypeError):
        AAMConfig(0.1)  # type: ignore[call-arg]
    assert AAMConfig.from_mapping({"max_weight": 0.5}) == AAMConfig(max_weight=0.5)
    with pytest.raises(ValueError, match=r"unknown AAM option\(s\) \['max_weigth'\]"):
        AAMConfig.from_mapping({"max_weigth": 0.5})


@pytest.mark.parametrize(
    ("stats", "message"),
    [
        ([], "at least one site"),
        ([site("a"), site("b"), site("a")], r"duplicated: \['a'\]"),
    ],
)
def test_aam_weights_input_validation(stats: list[SiteStats], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        aam_weights(stats)


def test_ablation_switches() -> None:
    # quality_floor = 1 turns quality off; infinite tolerance turns the divergence factor off.
    stats = [site("a", dice=0.1, hd95=50.0), site("b", dice=0.9, norm=1000.0), site("c")]
    config = AAMConfig(quality_floor=1.0, divergence_tolerance=math.inf, divergence_hard_limit=math.inf)

    weights = aam_weights(stats, config).weights

    np.testing.assert_array_equal(weights, fedavg_weights([1, 1, 1]))


# ----------------------------------------------------------------------------------------- properties

PROPERTY_SETTINGS = settings(max_examples=examples(100), deadline=None)

metric_dice = st.none() | st.floats(0.0, 1.0)
metric_hd95 = st.none() | st.floats(0.0, 200.0) | st.just(math.inf)
any_norm = st.floats(0.0, 1e6) | st.sampled_from([math.nan, math.inf])


@st.composite
def round_stats(draw: st.DrawFn, min_sites: int = 1, max_sites: int = 8, usable_only: bool = False
                ) -> list[SiteStats]:
    k = draw(st.integers(min_sites, max_sites))
    stats = []
    for i in range(k):
        finite = True if usable_only else draw(st.sampled_from([True, True, True, False]))
        norm = draw(st.floats(1e-3, 1e3) if usable_only else any_norm)
        stats.append(
            SiteStats(
                site=f"site-{i}",
                sample_count=draw(st.integers(1, 10_000)),
                dice=draw(metric_dice),
                hd95=draw(metric_hd95),
                update_norm=norm,
                finite=finite,
            )
        )
    assume(any(s.usable for s in stats))
    return stats


@PROPERTY_SETTINGS
@given(round_stats())
def test_property_weights_are_a_distribution(stats: list[SiteStats]) -> None:
    weights = aam_weights(stats).weights

    assert weights.shape == (len(stats),)
    assert np.all(np.isfinite(weights))
    assert np.all(weights >= 0.0)
    assert abs(math.fsum(weights.tolist()) - 1.0) <= 1e-12
    for s, w in zip(stats, weights.tolist()):
        if not s.usable:
            assert w == 0.0


@PROPERTY_SETTINGS
@given(stats=round_stats(), data=st.data())
def test_property_permutation_equivariant_bit_for_bit(stats: list[SiteStats], data: st.DataObject
                                                      ) -> None:
    order = data.draw(st.permutations(range(len(stats))))

    weights = aam_weights(stats).weights
    permuted = aam_weights([stats[i] for i in order]).weights

    np.testing.assert_array_equal(permuted, weights[list(order)])


@PROPERTY_SETTINGS
@given(round_stats())
def test_property_deterministic(stats: list[SiteStats]) -> None:
    first, second = aam_weights(stats), aam_weights(stats)

    np.testing.assert_array_equal(first.weights, second.weights)
    assert first.factors == second.factors


@PROPERTY_SETTINGS
@given(
    counts=st.lists(st.integers(1, 10_000), min_size=1, max_size=8),
    dice=metric_dice,
    hd95=metric_hd95,
    base_norm=st.floats(1e-6, 1e6),
    spreads=st.lists(st.floats(1.0, 2.0), min_size=8, max_size=8),
)
def test_property_alike_sites_reduce_to_fedavg(
    counts: list[int], dice: float | None, hd95: float | None, base_norm: float, spreads: list[float]
) -> None:
    # Same metrics everywhere, norms within a factor c = 2 of each other -> every ratio <= 2.
    stats = [
        SiteStats(site=f"s{i}", sample_count=n, dice=dice, hd95=hd95,
                  update_norm=base_norm * spreads[i], finite=True)
        for i, n in enumerate(counts)
    ]

    weights = aam_weights(stats).weights

    np.testing.assert_array_equal(weights, fedavg_weights(counts))


@PROPERTY_SETTINGS
@given(base=round_stats(min_sites=2, usable_only=True), n=st.integers(1, 10**6),
       dice=metric_dice, hd95=metric_hd95, finite=st.booleans())
def test_property_wildly_divergent_or_non_finite_site_gets_zero(
    base: list[SiteStats], n: int, dice: float | None, hd95: float | None, finite: bool
) -> None:
    # 100x the largest honest norm is >= 100x the median, whatever the attacker reports.
    norm = 100.0 * max(s.update_norm for s in base)
    attacker = SiteStats(site="attacker", sample_count=n, dice=dice, hd95=hd95,
                         update_norm=norm, finite=finite)

    weights = aam_weights([*base, attacker]).weights

    assert weights[-1] < 1e-6
    assert weights[-1] == 0.0


@PROPERTY_SETTINGS
@given(stats=round_stats(), data=st.data())
def test_property_cap_is_respected_and_preserves_order(stats: list[SiteStats], data: st.DataObject
                                                       ) -> None:
    positive = int(np.count_nonzero(aam_weights(stats).weights > 0))
    cap = data.draw(st.floats(1.0 / positive, 1.0))

    uncapped = aam_weights(stats).weights
    weights = aam_weights(stats, AAMConfig(max_weight=cap)).weights

    assert weights.max() <= cap
    assert abs(math.fsum(weights.tolist()) - 1.0) <= 1e-12
    np.testing.assert_array_equal(weights == 0.0, uncapped == 0.0)
    # Water-filling is monotone: a site that had at least another's weight still does (up to ulps).
    for i in range(len(stats)):
        for j in range(len(stats)):
            if uncapped[i] >= uncapped[j]:
                assert weights[i] >= weights[j] - 1e-15


@PROPERTY_SETTINGS
@given(stats=round_stats(min_sites=2, usable_only=True), data=st.data(),
       metric=st.sampled_from(["dice", "hd95"]))
def test_property_missing_metric_equals_reporting_the_median(
    stats: list[SiteStats], data: st.DataObject, metric: str
) -> None:
    # Site i reports nothing; the result must equal site i reporting exactly the round's reference.
    i = data.draw(st.integers(0, len(stats) - 1))
    missing = [SiteStats(**{**vars(s), metric: None}) if j == i else s for j, s in enumerate(stats)]
    result_missing = aam_weights(missing)
    reference = result_missing.references[metric]
    assume(reference is not None)
    at_reference = [SiteStats(**{**vars(s), metric: reference}) if j == i else s
                    for j, s in enumerate(stats)]

    result_at_reference = aam_weights(at_reference)

    np.testing.assert_array_equal(result_missing.weights, result_at_reference.weights)


@PROPERTY_SETTINGS
@given(round_stats(min_sites=1, max_sites=1, usable_only=True))
def test_property_single_usable_client_gets_one(stats: list[SiteStats]) -> None:
    np.testing.assert_array_equal(aam_weights(stats).weights, [1.0])
