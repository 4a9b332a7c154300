"""Client-side differential privacy for model updates: L2 clipping and Gaussian noise.

The Gaussian mechanism on a site's update Δ (the floating tensors of one round, taken together
as one vector):

    Δ_clipped = Δ · min(1, C / ‖Δ‖₂)                  sensitivity of one site's update ≤ C
    Δ_private = Δ_clipped + N(0, (σ·C)² I)             noise multiplier σ, std σ·C per element

applied to Δ *before* encoding (top-k and quantization then only post-process it, which costs no
privacy). The guarantee is per site and per round, for the site's whole data set (what a
neighbour data set changes is at most one update of norm ≤ C); :func:`gaussian_epsilon` turns
σ and the number of rounds into an (ε, δ) bound. Without sampling of sites or examples there is
no amplification, so useful ε needs σ around 1 or more and many sites to average the noise out.

Non-floating tensors (counters such as ``num_batches_tracked``) are passed through unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np

__all__ = ["PrivacyReport", "clip_and_noise", "gaussian_epsilon"]


@dataclass(frozen=True)
class PrivacyReport:
    """What :func:`clip_and_noise` did to one update (for the round's log and metrics)."""

    norm: float
    """‖Δ‖₂ before clipping, over all floating tensors."""
    clip_norm: float
    scale: float
    """The clipping factor min(1, C / ‖Δ‖₂) (1.0: not clipped)."""
    noise_multiplier: float
    noise_std: float
    """σ·C: the standard deviation of the noise added to each element."""
    noised_norm: float
    """‖Δ_private‖₂ after clipping and noise."""

    @property
    def clipped(self) -> bool:
        return self.scale < 1.0

    def as_metrics(self) -> dict[str, float]:
        """Flat ``dp/...`` metrics, e.g. for ``LocalMetrics.extra``."""
        return {
            "dp/norm": self.norm,
            "dp/clip_norm": self.clip_norm,
            "dp/scale": self.scale,
            "dp/noise_std": self.noise_std,
            "dp/noised_norm": self.noised_norm,
        }


def clip_and_noise(
    deltas: Mapping[str, np.ndarray],
    clip_norm: float,
    noise_multiplier: float,
    rng: np.random.Generator,
) -> tuple[dict[str, np.ndarray], PrivacyReport]:
    """Clip an update to L2 norm ``clip_norm`` and add Gaussian noise of std ``noise_multiplier · clip_norm``.

    Args:
        deltas: name -> update tensor (any shape); floating tensors are clipped and noised together.
        clip_norm: C > 0, the bound on one site's contribution.
        noise_multiplier: σ >= 0 (0: clipping only, no privacy guarantee).
        rng: the noise source; use a fresh, unpredictable one per round in production
            (``np.random.default_rng()``), a seeded one in tests.

    Returns:
        New arrays (inputs untouched; same names, shapes and dtypes, noise drawn in float64 and
        cast back) and a :class:`PrivacyReport`.

    Raises:
        ValueError: a bad ``clip_norm``/``noise_multiplier``, or non-finite update values (they
            would make the clipping meaningless).
    """
    if not (isinstance(clip_norm, (int, float)) and math.isfinite(clip_norm) and clip_norm > 0):
        raise ValueError(f"clip_norm must be a finite number > 0, got {clip_norm!r}")
    if not (isinstance(noise_multiplier, (int, float)) and math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")
    arrays = {name: np.asarray(value) for name, value in deltas.items()}
    floating = [name for name, a in arrays.items() if a.dtype.kind == "f"]
    squares = 0.0
    for name in floating:
        as64 = arrays[name].astype(np.float64).reshape(-1)
        squares += float(np.dot(as64, as64))
    norm = math.sqrt(squares)
    if not math.isfinite(norm):
        bad = [n for n in floating if not np.all(np.isfinite(arrays[n]))]
        raise ValueError(f"update has NaN/Inf values in {bad[:5]}; cannot clip it")
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    std = noise_multiplier * clip_norm
    out: dict[str, np.ndarray] = {}
    noised_squares = 0.0
    for name, array in arrays.items():
        if array.dtype.kind != "f":
            out[name] = array.copy()
            continue
        private = array.astype(np.float64) * scale
        if std > 0:
            private += rng.normal(0.0, std, size=array.shape)
        out[name] = private.astype(array.dtype)
        flat = out[name].astype(np.float64).reshape(-1)
        noised_squares += float(np.dot(flat, flat))
    report = PrivacyReport(norm, float(clip_norm), scale, float(noise_multiplier), std, math.sqrt(noised_squares))
    return out, report


def gaussian_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """ε of ``rounds`` compositions of the Gaussian mechanism with multiplier σ, at ``delta``.

    Rényi DP of the Gaussian mechanism with sensitivity C and std σ·C: ε_α = α / (2σ²) per round,
    T·α / (2σ²) after T rounds; converted with ε = ε_α + log(1/δ) / (α − 1) (Mironov 2017,
    Prop. 3), minimised over α > 1 in closed form: α* = 1 + σ·sqrt(2·log(1/δ) / T), which gives
    ε = T / (2σ²) + sqrt(2·T·log(1/δ)) / σ. No subsampling amplification (every site, every round).
    """
    if not noise_multiplier > 0:
        raise ValueError(f"noise_multiplier must be > 0 for a finite epsilon, got {noise_multiplier}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    s2 = noise_multiplier**2
    return rounds / (2 * s2) + math.sqrt(2 * rounds * math.log(1 / delta)) / noise_multiplier
