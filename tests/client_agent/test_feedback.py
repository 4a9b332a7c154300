"""Invariants of the site's error feedback around the codec (client_agent/feedback.py), with the real codec."""

from __future__ import annotations

import numpy as np
import pytest

import codec
from client_agent import feedback


def _update(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"conv.weight": rng.normal(size=(8, 4, 3)).astype(np.float32),
            "conv.bias": rng.normal(size=8).astype(np.float32),
            "bn.num_batches_tracked": np.array(3, dtype=np.int64)}


SPEC = codec.CodecSpec(top_k_fraction=0.1, top_k_scope="global", quantization="int8")


def test_momentum_correction_sent_plus_kept_is_the_accumulated_velocity() -> None:
    velocity: dict[str, np.ndarray] | None = None
    residual: dict[str, np.ndarray] | None = None
    for r in range(4):
        deltas = _update(r)
        u = feedback.accumulate_velocity(deltas, velocity, 0.9)
        if velocity is not None:
            np.testing.assert_allclose(u["conv.weight"], 0.9 * velocity["conv.weight"] + deltas["conv.weight"], rtol=1e-6)
        encoded = codec.encode_update(list(u.items()), SPEC, residual)
        sent_values = dict(codec.decode_frames(list(encoded.frames)))
        kept = encoded.residual
        for name in ("conv.weight", "conv.bias"):
            accumulated = u[name] + (residual[name] if residual else 0)
            # what is sent plus what is kept equals the accumulated velocity (to float32 rounding)
            np.testing.assert_allclose(sent_values[name] + kept[name], accumulated, rtol=0, atol=1e-6)
        sent = feedback.sent_masks(u, residual, kept)
        assert set(sent) == {"conv.weight", "conv.bias"}
        assert 0 < sum(int(m.sum()) for m in sent.values()) <= int(np.ceil(0.1 * (96 + 8)))
        for name, mask in sent.items():
            assert np.array_equal(mask, sent_values[name] != 0)
        masked = feedback.mask_velocity(u, sent)
        for name, mask in sent.items():
            assert np.all(masked[name][mask] == 0), "masked velocity must be zero where entries were sent"
            np.testing.assert_array_equal(masked[name][~mask], u[name][~mask])
        assert "bn.num_batches_tracked" not in masked
        velocity, residual = masked, kept


def test_accumulate_velocity_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="momentum_correction"):
        feedback.accumulate_velocity(_update(0), None, 1.0)
    with pytest.raises(ValueError, match="conv.bias"):
        feedback.accumulate_velocity(_update(0), {"conv.bias": np.zeros(3, np.float32)}, 0.5)


def test_ages_count_rounds_since_sent() -> None:
    m1 = {"w": np.array([True, False, False])}
    ages, at_send = feedback.advance_age(None, m1)
    assert ages["w"].tolist() == [0, 1, 1] and at_send.tolist() == [1]
    ages, at_send = feedback.advance_age(ages, {"w": np.array([False, True, False])})
    assert ages["w"].tolist() == [1, 0, 2] and at_send.tolist() == [2]
    ages, at_send = feedback.advance_age(ages, {"w": np.array([True, False, True])})
    assert ages["w"].tolist() == [0, 1, 0] and sorted(at_send.tolist()) == [2, 3]


def test_diagnostics_energy_shares() -> None:
    deltas = {"w": np.array([3.0, 4.0, 0.0], np.float32)}
    residual = {"w": np.array([0.0, 0.0, 1.0], np.float32)}
    kept = {"w": np.array([0.0, 4.0, 1.0], np.float32)}  # only entry 0 sent
    sent = feedback.sent_masks(deltas, residual, kept)
    assert sent["w"].tolist() == [True, False, False]
    d = feedback.diagnostics(deltas, deltas, residual, kept, sent, np.array([1]), 0.05)
    assert set(d) == set(feedback.DIAGNOSTIC_NAMES)
    assert d["ef/sent_energy"] == pytest.approx(9 / 26)
    assert d["ef/update_energy_sent"] == pytest.approx(9 / 25)
    assert d["ef/residual_norm"] == pytest.approx(1.0)
    assert d["ef/kept_norm"] == pytest.approx(17 ** 0.5)
    assert d["ef/sent_fraction"] == pytest.approx(1 / 3)
    assert d["ef/lr"] == pytest.approx(0.05)
