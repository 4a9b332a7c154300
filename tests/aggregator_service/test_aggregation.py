"""Tests of the aggregation strategies (aggregator_service/aggregation.py), with hand-computed arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from support import examples

from aggregator_service.aggregation import (
    cast_to_dtype,
    coordinate_median,
    fedadam_init_state,
    fedadam_step,
    fedavg_weights,
    mean_weights,
    scatter_add,
    trimmed_mean,
    weighted_accumulate,
    weighted_sum,
)


# ------------------------------------------------------------------------------------------ weights


@pytest.mark.parametrize(
    ("counts", "expected"),
    [
        ([1, 3], [0.25, 0.75]),
        ([0, 2, 2], [0.0, 0.5, 0.5]),  # a site without samples gets nothing
        ([7], [1.0]),
    ],
)
def test_fedavg_weights(counts: list[int], expected: list[float]) -> None:
    weights = fedavg_weights(counts)

    np.testing.assert_array_equal(weights, expected)
    assert weights.dtype == np.float64


@pytest.mark.parametrize(
    ("counts", "message"),
    [
        ([], "non-empty 1-D"),
        ([[1, 2]], "non-empty 1-D"),
        ([-1, 2], "finite and >= 0"),
        ([math.nan, 2], "finite and >= 0"),
        ([0, 0], "must not all be zero"),
    ],
)
def test_fedavg_weights_validation(counts: list[object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fedavg_weights(counts)  # type: ignore[arg-type]


def test_mean_weights() -> None:
    np.testing.assert_array_equal(mean_weights(4), [0.25, 0.25, 0.25, 0.25])


@pytest.mark.parametrize("k", [0, -2, 2.5, True])
def test_mean_weights_validation(k: object) -> None:
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        mean_weights(k)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------- weighted sum


def test_weighted_sum_by_hand() -> None:
    # 0.25 * [1, 2] + 0.75 * [3, 4] = [0.25 + 2.25, 0.5 + 3] = [2.5, 3.5]
    arrays = [np.array([1.0, 2.0], np.float32), np.array([3.0, 4.0], np.float32)]

    result = weighted_sum(arrays, [0.25, 0.75])

    np.testing.assert_array_equal(result, [2.5, 3.5])
    assert result.dtype == np.float32


def test_weighted_sum_accumulates_in_float64() -> None:
    # 1e8 + 1 + 1 - 1e8 = 2 in float64; a float32 accumulator would lose both ones (ulp at 1e8 is 8).
    arrays = [np.array([v], np.float32) for v in (1e8, 1.0, 1.0, -1e8)]

    result = weighted_sum(arrays, [1.0, 1.0, 1.0, 1.0])

    np.testing.assert_array_equal(result, np.array([2.0], np.float32))


def test_weighted_sum_of_integer_tensors_rounds() -> None:
    # 0.25 * [0, 4] + 0.75 * [4, 9] = [3, 7.75] -> rounded to [3, 8], not truncated to [3, 7].
    arrays = [np.array([0, 4], np.int64), np.array([4, 9], np.int64)]

    result = weighted_sum(arrays, [0.25, 0.75])

    np.testing.assert_array_equal(result, [3, 8])
    assert result.dtype == np.int64


def test_zero_weight_skips_non_finite_array() -> None:
    arrays = [np.array([1.0, 2.0]), np.array([math.nan, math.inf])]

    result = weighted_sum(arrays, [1.0, 0.0])

    np.testing.assert_array_equal(result, [1.0, 2.0])


@settings(max_examples=examples(50), deadline=None)
@given(
    arrays=st.lists(
        hnp.arrays(np.float32, (3, 2), elements=st.floats(-1e3, 1e3, width=32)), min_size=1, max_size=6
    ),
    data=st.data(),
)
def test_streaming_equals_batch_bit_for_bit(arrays: list[np.ndarray], data: st.DataObject) -> None:
    weights = data.draw(st.lists(st.floats(0.0, 1.0), min_size=len(arrays), max_size=len(arrays)))

    acc = None
    for array, weight in zip(arrays, weights):
        acc = weighted_accumulate(acc, array, weight)
    assert acc is not None
    streamed = cast_to_dtype(acc, np.float32)

    np.testing.assert_array_equal(streamed, weighted_sum(arrays, weights))


@pytest.mark.parametrize(
    ("arrays", "weights", "message"),
    [
        ([], [], "at least one array"),
        ([np.zeros(2), np.zeros(3)], [0.5, 0.5], r"array 1 has shape \(3,\), array 0 has \(2,\)"),
        ([np.zeros(2), np.zeros(2, np.float32)], [0.5, 0.5], "array 1 has dtype float32"),
        ([np.zeros(2), np.zeros(2)], [1.0], "one weight per array"),
        ([np.zeros(2), np.zeros(2)], [1.5, -0.5], "weight must be finite and >= 0, got -0.5"),
        ([np.zeros(2), np.zeros(2)], [math.nan, 1.0], "weight must be finite and >= 0"),
        ([np.zeros(2, np.complex64)], [1.0], "only integer or floating"),
    ],
)
def test_weighted_sum_validation(arrays: list[np.ndarray], weights: list[float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        weighted_sum(arrays, weights)


def test_weighted_accumulate_validation() -> None:
    with pytest.raises(ValueError, match="does not match the accumulator"):
        weighted_accumulate(np.zeros(3), np.zeros(2), 1.0)
    with pytest.raises(ValueError, match="float64 accumulator"):
        weighted_accumulate(np.zeros(2, np.float32), np.zeros(2), 1.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_scatter_add_sparse_by_hand(dtype: type) -> None:
    # acc[0] += 0.5 * 10, acc[3] += 0.5 * -4: [1, 2, 3, 4] -> [6, 2, 3, 2]; other positions untouched.
    acc = np.array([1.0, 2.0, 3.0, 4.0], dtype)

    scatter_add(acc, np.array([10.0, -4.0], np.float32), 0.5, np.array([0, 3], np.int64))

    np.testing.assert_array_equal(acc, [6.0, 2.0, 3.0, 2.0])
    assert acc.dtype == dtype


def test_scatter_add_dense_run_by_hand() -> None:
    # A dense part covering positions 1..2: [1, 2, 3, 4] + 2 * [0, 1, -1, 0] = [1, 4, 1, 4].
    acc = np.array([1.0, 2.0, 3.0, 4.0], np.float32)

    scatter_add(acc, np.array([1.0, -1.0], np.float32), 2.0, None, start=1)

    np.testing.assert_array_equal(acc, [1.0, 4.0, 1.0, 4.0])


def test_scatter_add_zero_weight_skips_non_finite_values() -> None:
    acc = np.array([1.0, 2.0], np.float32)

    scatter_add(acc, np.array([math.nan, math.inf], np.float32), 0.0, np.array([0, 1], np.int64))

    np.testing.assert_array_equal(acc, [1.0, 2.0])


def test_scatter_add_equals_dense_weighted_accumulate_bit_for_bit() -> None:
    # Sparse adds of a site's sent values give the same bits as adding its dense delta.
    rng = np.random.default_rng(3)
    theta = rng.normal(size=1000)
    positions = np.sort(rng.choice(1000, 37, replace=False)).astype(np.int64)
    values = rng.normal(size=37).astype(np.float32)
    dense = np.zeros(1000, np.float32)
    dense[positions] = values

    sparse = theta.copy()
    scatter_add(sparse, values, 0.3, positions)

    np.testing.assert_array_equal(sparse, weighted_accumulate(theta.copy(), dense, 0.3))


@pytest.mark.parametrize(
    ("acc", "weight", "message"),
    [
        (np.zeros(2, np.float32), -0.1, "weight must be finite and >= 0"),
        (np.zeros(2, np.float32), math.nan, "weight must be finite and >= 0"),
        (np.zeros(2, np.int64), 1.0, "1-D floating array"),
        (np.zeros((1, 2), np.float32), 1.0, "1-D floating array"),
    ],
)
def test_scatter_add_validation(acc: np.ndarray, weight: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        scatter_add(acc, np.ones(1, np.float32), weight, np.array([0], np.int64))


# -------------------------------------------------------------------------------- order statistics


def test_coordinate_median_odd() -> None:
    # Per coordinate: median(1, 5, 3) = 3, median(10, -20, 30) = 10.
    arrays = [np.array([1.0, 10.0]), np.array([5.0, -20.0]), np.array([3.0, 30.0])]

    np.testing.assert_array_equal(coordinate_median(arrays), [3.0, 10.0])


def test_coordinate_median_even_and_dtype() -> None:
    # median(1, 2, 3, 10) = (2 + 3) / 2 = 2.5; shape (2, 1) and float16 kept.
    arrays = [np.full((2, 1), v, np.float16) for v in (1.0, 10.0, 3.0, 2.0)]

    result = coordinate_median(arrays)

    np.testing.assert_array_equal(result, np.full((2, 1), 2.5))
    assert result.dtype == np.float16 and result.shape == (2, 1)


def test_trimmed_mean_by_hand() -> None:
    # K = 5, trim 0.2 -> drop floor(1.0) = 1 value from each side.
    # coordinate 0: 1, 2, 3, 4, 100 -> keep 2, 3, 4 -> 3
    # coordinate 1: -50, 10, 20, 30, 40 -> keep 10, 20, 30 -> 20
    arrays = [np.array([a, b]) for a, b in [(100, 10), (1, -50), (3, 40), (2, 20), (4, 30)]]
    arrays = [a.astype(np.float64) for a in arrays]

    np.testing.assert_array_equal(trimmed_mean(arrays, 0.2), [3.0, 20.0])


@pytest.mark.parametrize(
    ("values", "trim", "expected"),
    [
        ([1.0, 2.0, 3.0, 4.0, 100.0], 0.0, 22.0),  # no trimming: plain mean 110 / 5
        ([1.0, 2.0, 3.0, 4.0, 100.0], 0.19, 22.0),  # floor(0.95) = 0: still the plain mean
        ([1.0, 7.0], 0.4, 4.0),  # floor(0.8) = 0
        ([1.0, 7.0, 100.0], 0.49, 7.0),  # floor(1.47) = 1: the median
        ([1.0, 2.0, 3.0, 4.0], 0.25, 2.5),  # floor(1.0) = 1: mean of 2, 3
    ],
)
def test_trimmed_mean_trim_counts(values: list[float], trim: float, expected: float) -> None:
    arrays = [np.array([v]) for v in values]

    np.testing.assert_allclose(trimmed_mean(arrays, trim), [expected], rtol=1e-15)


def test_trimmed_mean_floor_is_robust_to_float_products() -> None:
    # 100 * 0.29 = 28.999999999999996 in binary floating point; the intended trim is 29 per side.
    # Values i^2 (asymmetric, so trimming 28 would give a different mean): keep i = 29..70.
    arrays = [np.array([float(i * i)]) for i in range(100)]

    result = trimmed_mean(arrays, 0.29)

    np.testing.assert_allclose(result, [np.mean(np.arange(29, 71) ** 2)], rtol=1e-15)


@pytest.mark.parametrize("trim", [0.5, -0.1, 0.75])
def test_trimmed_mean_validation(trim: float) -> None:
    with pytest.raises(ValueError, match=rf"trim_fraction must be in \[0, 0.5\), got {trim}"):
        trimmed_mean([np.zeros(1)], trim)


@pytest.mark.parametrize("function", [coordinate_median, lambda a: trimmed_mean(a, 0.1)])
def test_order_statistics_refuse_non_finite(function) -> None:  # type: ignore[no-untyped-def]
    arrays = [np.zeros(2), np.zeros(2), np.array([0.0, math.nan])]

    with pytest.raises(ValueError, match="array 2 contains NaN or Inf"):
        function(arrays)


# ------------------------------------------------------------------------------------------ FedAdam


def test_fedadam_first_step_by_hand() -> None:
    # θ = 1, Δ = 0.5, m = v = 0, lr 0.01, β1 0.9, β2 0.99, τ 0.001:
    # m' = 0.1 * 0.5 = 0.05; v' = 0.01 * 0.25 = 0.0025; sqrt(v') = 0.05
    # θ' = 1 + 0.01 * 0.05 / (0.05 + 0.001) = 1 + 0.0098039215686... = 1.0098039215686
    param = np.array([1.0])
    m, v = fedadam_init_state(param)

    new_param, new_m, new_v = fedadam_step(param, np.array([0.5]), m, v)

    np.testing.assert_allclose(new_m, [0.05], rtol=1e-15)
    np.testing.assert_allclose(new_v, [0.0025], rtol=1e-15)
    np.testing.assert_allclose(new_param, [1.0098039215686274], rtol=1e-15)


def test_fedadam_second_step_by_hand() -> None:
    # From m = 0.05, v = 0.0025, θ = 1.0098039215686274 and Δ = 0.5 again:
    # m' = 0.045 + 0.05 = 0.095; v' = 0.002475 + 0.0025 = 0.004975; sqrt(v') = 0.07053368
    # θ' = θ + 0.01 * 0.095 / 0.07153368 = θ + 0.01328045 = 1.02308437
    state = (np.array([1.0098039215686274]), np.array([0.05]), np.array([0.0025]))

    new_param, new_m, new_v = fedadam_step(state[0], np.array([0.5]), state[1], state[2])

    np.testing.assert_allclose(new_m, [0.095], rtol=1e-14)
    np.testing.assert_allclose(new_v, [0.004975], rtol=1e-14)
    np.testing.assert_allclose(new_param, [1.02308437], rtol=1e-8)


def test_fedadam_follows_the_update_direction_and_keeps_dtypes() -> None:
    # Δ points downhill, so θ moves with Δ: +Δ up, -Δ down, 0 stays.
    param = np.zeros(3, np.float32)
    m, v = fedadam_init_state(param)

    new_param, new_m, new_v = fedadam_step(param, np.array([2.0, -2.0, 0.0], np.float32), m, v)

    assert new_param[0] > 0 > new_param[1] and new_param[2] == 0
    assert new_param.dtype == new_m.dtype == new_v.dtype == np.float32


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": 0.0}, "lr must be a finite number > 0, got 0.0"),
        ({"beta1": 1.0}, r"beta1 must be in \[0, 1\), got 1.0"),
        ({"beta2": -0.1}, r"beta2 must be in \[0, 1\), got -0.1"),
        ({"tau": 0.0}, "tau must be a finite number > 0, got 0.0"),
        ({"pseudo_grad": np.zeros(3)}, r"pseudo_grad shape \(3,\) does not match param shape \(2,\)"),
        ({"v": np.zeros(1)}, r"v shape \(1,\) does not match"),
        ({"pseudo_grad": np.array([1.0, math.nan])}, "pseudo_grad contains NaN or Inf"),
        ({"param": np.zeros(2, np.int64)}, "floating tensors only"),
    ],
)
def test_fedadam_validation(kwargs: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = {
        "param": np.zeros(2), "pseudo_grad": np.zeros(2), "m": np.zeros(2), "v": np.zeros(2)
    }
    arguments.update(kwargs)

    with pytest.raises(ValueError, match=message):
        fedadam_step(**arguments)  # type: ignore[arg-type]
