"""Client-side differential privacy: L2 clipping of the whole update, Gaussian noise, and ε."""

from __future__ import annotations


import numpy as np
import pytest

from client_agent.privacy import clip_and_noise, gaussian_epsilon


def update() -> dict[str, np.ndarray]:
    # ‖Δ‖₂ = sqrt(3² + 4²) = 5 over the floating tensors; the counter does not count.
    return {
        "a": np.array([3.0, 0.0], dtype=np.float32),
        "b": np.array([[4.0]], dtype=np.float64),
        "steps": np.array([7], dtype=np.int64),
    }


def test_an_update_over_the_clip_norm_is_scaled_down_as_a_whole() -> None:
    out, report = clip_and_noise(update(), clip_norm=1.0, noise_multiplier=0.0, rng=np.random.default_rng(0))

    np.testing.assert_allclose(out["a"], [0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(out["b"], [[0.8]])
    np.testing.assert_array_equal(out["steps"], [7])
    assert {k: v.dtype for k, v in out.items()} == {k: v.dtype for k, v in update().items()}
    assert (report.norm, report.scale, report.clipped) == (5.0, pytest.approx(0.2), True)
    assert report.noised_norm == pytest.approx(1.0, rel=1e-6)


def test_an_update_within_the_clip_norm_is_unchanged_and_the_input_untouched() -> None:
    original = update()

    out, report = clip_and_noise(original, clip_norm=10.0, noise_multiplier=0.0, rng=np.random.default_rng(0))

    assert (report.scale, report.clipped) == (1.0, False)
    for name, value in update().items():
        np.testing.assert_array_equal(out[name], value)
        np.testing.assert_array_equal(original[name], value)
        assert out[name] is not original[name]


def test_noise_has_std_sigma_times_clip_norm_and_is_reproducible_from_the_rng() -> None:
    zeros = {"w": np.zeros(200_000, dtype=np.float32)}

    out, report = clip_and_noise(zeros, clip_norm=2.0, noise_multiplier=0.5, rng=np.random.default_rng(7))
    again, _ = clip_and_noise(zeros, clip_norm=2.0, noise_multiplier=0.5, rng=np.random.default_rng(7))

    assert report.noise_std == 1.0
    # 200 000 draws: the sample std is within 1% of 1.0 (its standard error is 0.16%).
    assert float(np.std(out["w"])) == pytest.approx(1.0, rel=0.01)
    assert abs(float(np.mean(out["w"]))) < 0.01
    np.testing.assert_array_equal(out["w"], again["w"])
    assert report.as_metrics()["dp/noise_std"] == 1.0


@pytest.mark.parametrize(
    "deltas, clip, sigma, message",
    [
        (update(), 0.0, 1.0, "clip_norm must be a finite number > 0, got 0.0"),
        (update(), float("inf"), 1.0, "clip_norm must be a finite number > 0"),
        (update(), 1.0, -0.1, "noise_multiplier must be a finite number >= 0, got -0.1"),
        ({"a": np.array([np.nan], np.float32)}, 1.0, 1.0, "NaN/Inf values in \\['a'\\]"),
    ],
)
def test_bad_arguments_are_refused_with_the_value(deltas: dict, clip: float, sigma: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        clip_and_noise(deltas, clip_norm=clip, noise_multiplier=sigma, rng=np.random.default_rng(0))


def test_gaussian_epsilon_needs_noise() -> None:
    # The accountant's values: tests/client_agent/test_privacy_accounting.py.
    with pytest.raises(ValueError, match="noise_multiplier must be > 0"):
        gaussian_epsilon(0.0, 1, 1e-5)
