"""Client-side differential privacy for model updates: L2 clipping and Gaussian noise.

The Gaussian mechanism on a site's update Δ (the floating tensors of one round, taken together
as one vector):

    Δ_clipped = Δ · min(1, C / ‖Δ‖₂)                  sensitivity of one site's update ≤ C
    Δ_private = Δ_clipped + N(0, (σ·C)² I)             noise multiplier σ, std σ·C per element

applied to Δ *before* encoding (top-k and quantization then only post-process it, which costs no
privacy).

**What the guarantee covers.** Update-level, per site: the unit of privacy is the site's whole
data set (a neighbouring data set may change the site's update arbitrarily, which clipping bounds
by C). After T rounds with multipliers σ_1..σ_T, the site's released updates are (ε, δ)-DP with ε
from Opacus' Rényi-DP accountant (:class:`opacus.accountants.RDPAccountant`, which minimises over
Rényi orders and converts with the tighter bound of Balle et al. 2020). The sampling rate is 1:
every round's update depends on the site's whole data set and a site's participation in a round
is visible to the aggregator, so no amplification by sampling is claimed. :class:`PrivacyLedger`
keeps the released rounds on the site's disk, reports ε(δ) with every update and refuses a round
that would take ε past the site's budget.

**What it does not cover.** Individual patients inside a site get no separate, smaller ε (no
per-example clipping); the validation metrics, sample counts and timing sent with each update are
not noised; the global model the federation publishes is protected only through the sites'
updates (post-processing); and the guarantee assumes the noise source is unpredictable and the
site's state directory (the ledger) is not rolled back.

Non-floating tensors (counters such as ``num_batches_tracked``) are passed through unchanged.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

__all__ = [
    "DEFAULT_DELTA",
    "PrivacyBudgetExceeded",
    "PrivacyLedger",
    "PrivacyReport",
    "clip_and_noise",
    "gaussian_epsilon",
    "rdp_epsilon",
]

#: δ of the reported (ε, δ) when none is configured: well below 1 / (cases at any site)
DEFAULT_DELTA = 1e-5
#: a site's update depends on its whole data set every round (see the module docstring)
SAMPLE_RATE = 1.0


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


def _check_delta(delta: float) -> None:
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")


def rdp_epsilon(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """ε at ``delta`` of the composed subsampled Gaussian mechanisms ``[(σ, sample_rate, steps), …]``.

    Computed by Opacus' RDP accountant. An empty history is 0; a step with σ = 0 is infinite.
    """
    _check_delta(delta)
    steps = [(float(sigma), float(q), int(n)) for sigma, q, n in history if int(n) > 0]
    if not steps:
        return 0.0
    for sigma, q, n in steps:
        if not (math.isfinite(sigma) and sigma >= 0) or not 0 < q <= 1:
            raise ValueError(f"each step needs noise_multiplier >= 0 and sample_rate in (0, 1], got ({sigma}, {q}, {n})")
    if any(sigma == 0 for sigma, _, _ in steps):
        return math.inf
    from opacus.accountants import RDPAccountant  # type: ignore[import-untyped, unused-ignore]

    accountant = RDPAccountant()
    accountant.history = steps
    return float(accountant.get_epsilon(delta=delta))


def gaussian_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """ε of ``rounds`` releases of a clipped update with multiplier σ (sampling rate 1), at ``delta``."""
    if not noise_multiplier > 0:
        raise ValueError(f"noise_multiplier must be > 0 for a finite epsilon, got {noise_multiplier}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    return rdp_epsilon([(noise_multiplier, SAMPLE_RATE, rounds)], delta)


class PrivacyBudgetExceeded(RuntimeError):
    """One more round would take the site's ε past its budget: the site stops contributing."""


class PrivacyLedger:
    """The noised updates a site has released, on its disk (``privacy.json`` in the state directory).

    One entry per round (``{round: noise_multiplier}``): preparing a round again after a crash
    replaces an update that never left the site, so it is counted once. A round is recorded
    *before* its update can be sent, so a crash can only over-count.

    Args:
        path: the ledger file.
        delta: δ of the reported (ε, δ).
        budget: the largest ε the site accepts (``0``: no budget, ε is only reported).
    """

    def __init__(self, path: str | Path, *, delta: float = DEFAULT_DELTA, budget: float = 0.0) -> None:
        _check_delta(delta)
        if not (isinstance(budget, (int, float)) and math.isfinite(budget) and budget >= 0):
            raise ValueError(f"the epsilon budget must be a finite number >= 0 (0: none), got {budget!r}")
        self.path = Path(path)
        self.delta = float(delta)
        self.budget = float(budget)

    def rounds(self) -> dict[int, float]:
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            # Losing the ledger would silently reset ε to 0: refuse instead.
            raise PrivacyBudgetExceeded(f"privacy ledger {self.path} is unreadable ({exc}); "
                                        "restore it: without it the privacy already spent is unknown") from exc
        return {int(r): float(sigma) for r, sigma in doc.get("rounds", {}).items()}

    def epsilon(self, rounds: Mapping[int, float] | None = None) -> float:
        """ε(δ) spent over ``rounds`` (default: the recorded ones)."""
        spent = self.rounds() if rounds is None else rounds
        by_sigma: dict[float, int] = {}
        for sigma in spent.values():
            by_sigma[sigma] = by_sigma.get(sigma, 0) + 1
        return rdp_epsilon([(sigma, SAMPLE_RATE, n) for sigma, n in sorted(by_sigma.items())], self.delta)

    def check(self, round_id: int, noise_multiplier: float) -> float:
        """ε after releasing round ``round_id`` with ``noise_multiplier``; raise if over the budget."""
        rounds = self.rounds()
        after = self.epsilon({**rounds, round_id: float(noise_multiplier)})
        if self.budget > 0 and after > self.budget:
            spent = self.epsilon(rounds)
            raise PrivacyBudgetExceeded(
                f"round {round_id} would take this site's privacy spending to epsilon={after:.3g} (delta={self.delta:g}), "
                f"over its budget of {self.budget:g}; {len(rounds)} round(s) already spent epsilon={spent:.3g}. "
                "The site stops contributing: a larger --dp-epsilon-budget, or a larger --dp-noise-multiplier "
                "for the rounds still to come, is a decision for the site's data protection officer"
            )
        return after

    def record(self, round_id: int, noise_multiplier: float) -> float:
        """Record round ``round_id`` (atomically) and return ε(δ) including it."""
        from codec import atomic_write_bytes

        rounds = {**self.rounds(), int(round_id): float(noise_multiplier)}
        doc = {"delta": self.delta, "sample_rate": SAMPLE_RATE,
               "rounds": {str(r): sigma for r, sigma in sorted(rounds.items())}}
        atomic_write_bytes(self.path, (json.dumps(doc, indent=1) + "\n").encode())
        return self.epsilon(rounds)
