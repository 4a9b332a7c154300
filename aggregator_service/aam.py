"""Adaptive Aggregation Mechanism (AAM): the per-round client weights of FedSegNet.

This module is the one place where the AAM formula, its constants and the reasons for them are
written down. Everything here is a pure function of one round's per-site statistics: numpy and the
standard library only, no I/O, no torch.

Formula
-------
For client ``k`` of a round (``K`` clients) the aggregator knows ``SiteStats``: its training
sample count ``n_k``, its local validation Dice ``D_k`` in [0, 1] and HD95 ``H_k`` in mm (either
may be missing), the L2 norm ``u_k = ||Δ_k||`` of its decoded update and whether that update is
finite. Let ``U`` be the *usable* clients: finite update and finite norm. References are medians
over ``U``::

    D_ref = median{D_j : j in U, D_j known}          H_ref = median{H_j : j in U, H_j known}
    u_ref = lower median{u_j : j in U}   (if that is 0: of the positive u_j; if none: 0)

(the lower median is the middle value, or the smaller of the two middle ones for an even count:
always one site's own norm, so with two sites a boosted update is measured against the honest
one instead of against half of itself)

Quality (a bounded exponential score, one temperature and one tolerance per metric), with the
soft threshold ``shrink(x, t) = sign(x) max(|x| - t, 0)``::

    s_k = shrink(D_k - D_ref, t_D) / T_dice  -  shrink(ln((H_k + h0) / (H_ref + h0)), t_H) / T_hd95
          (a missing D_k or H_k contributes 0 to s_k)
    q_k = exp(clip(s_k, ln f, ln g))                        so  q_k in [f, g]   (default g = 1)

Divergence, with the ratio ``ρ_k = u_k / u_ref`` (``ρ_k = 0`` when ``u_k = 0``)::

    d_k = 1                      if ρ_k <= c
        = (c / ρ_k) ** p         if c < ρ_k <= L
        = 0                      if ρ_k > L, or k not in U (non-finite update or norm)

Weights::

    w_k = n_k q_k d_k / Σ_j n_j q_j d_j,   then capped at ``max_weight`` (water-filling below).

Constants (``AAMConfig`` defaults) and why
------------------------------------------
- ``quality_ceiling g = 1.0`` (no reward) and the tolerances ``dice_tolerance t_D = 0.1``,
  ``hd95_tolerance t_H = 0.5``: quality *penalises* a site clearly worse than the round's median and
  never *rewards* one for being better. Measured (results/README.md, "AAM's quality term"): with a
  reward (g = 4, no tolerance) the site with the easiest local data got about 0.8 of the weight,
  the global model drifted towards it, its local Dice rose further and it gained still more weight:
  a rich-get-richer loop that left the compressed federation at 0.17 held-out Dice where FedAvg
  reached 0.60. Local Dice also differs by 0.1-0.2 between honest non-IID sites in early rounds,
  hence the tolerance: differences within it count as none (the analogue of
  ``divergence_tolerance`` for norms). A self-reported metric can then only cost a site weight, so
  over-reporting buys nothing. ``quality_ceiling = 1 / quality_floor`` with zero tolerances gives
  the symmetric variant back.
- ``dice_temperature T_dice = 0.1``: Dice lives on a fixed [0, 1] scale, so a fixed temperature in
  Dice units is meaningful: a site 0.2 Dice below the round's median (0.1 beyond the tolerance)
  gets e^-1 ≈ 0.37x its FedAvg share relative to a median site. We deliberately do *not* divide by the
  round's spread (a z-score): when sites agree closely (0.801 vs 0.799) a z-score would blow
  validation noise on small local validation sets up into full standard deviations.
- ``hd95_temperature T_hd95 = 1.0`` and ``hd95_offset_mm h0 = 1.0``: HD95 is compared as a
  log-ratio to the median, so it is unit-free and symmetric (twice the median HD95 → weight x1/2,
  half → x2 at T=1). The 1 mm offset is about one voxel: sub-voxel HD95 differences are
  quantisation noise, and the offset keeps HD95 = 0 (perfect, or empty structures) finite.
  HD95 = inf (e.g. an empty prediction) is allowed and lands on the quality floor.
- ``quality_floor f = 0.25``: Dice and HD95 are self-reported and measured on small, site-specific
  validation sets. The floor keeps a mediocre-but-honest site (harder cases, different scanner) at
  >= 1/4 of a median site's share instead of erasing it, which would bias the global model towards
  the easy sites. ``quality_floor = 1.0`` (with the default ceiling 1) switches quality weighting
  off (the AAM-without-quality ablation).
- ``divergence_tolerance c = 2.0``: honest updates differ in norm (more data → more local steps,
  non-IID data, error-feedback residuals of sparsified updates), so up to twice the median norm is
  treated as normal and costs nothing.
- ``divergence_power p = 2.0``: beyond ``c`` the factor decays quadratically, so the *contribution*
  ``d_k Δ_k`` of a too-large update has norm ``c² u_ref² / u_k``, which shrinks as the update grows:
  a scaled-up (boosted or exploding) update cannot buy influence by being larger.
- ``divergence_hard_limit L = 10.0``: beyond ten times the median the update is treated as broken or
  adversarial and gets exactly zero weight (at ρ = L the decay still leaves (2/10)² = 0.04).
  ``math.inf`` for ``c`` or ``L`` switches that part off for ablations; non-finite updates are
  always excluded.
- ``max_weight = 1.0`` (no cap by default): a cap below the largest FedAvg share would contradict
  "AAM equals FedAvg when all sites look alike", so it is an opt-in for federations that want no
  site above a share. Water-filling: sites above the cap are set to it and the excess goes to the
  others in proportion to their weights, repeated until none exceeds it; zero-weight (excluded)
  sites never receive mass. If fewer than ``1 / max_weight`` sites have positive weight the cap
  cannot be met and ``InfeasibleRoundError`` is raised (so a single-site round needs
  ``max_weight = 1``).

Properties (each pinned by ``tests/aggregator_service/test_aam.py``): weights are finite, non-negative and sum to one;
permutation-equivariant *bit for bit* (medians and ``math.fsum`` are order-independent, everything
else is element-wise), hence deterministic; exactly ``n_k / Σ n`` when all sites have the same Dice,
HD95 and (within ``c``) norm; exactly 0 for a non-finite update or one above ``L`` times the median;
a missing metric counts as the reference value; a single usable site gets weight 1.

Note for callers: a zero weight must mean *skip the site*, never ``0 * Δ_k`` (``0 * NaN = NaN``);
``aggregation.weighted_accumulate`` does exactly that.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "AAMConfig",
    "AAMResult",
    "InfeasibleRoundError",
    "SiteStats",
    "aam_weights",
    "apply_weight_cap",
]

logger = logging.getLogger(__name__)

# Tolerance for "max_weight * K >= 1": 1/3 * 3 is exactly 1.0 in binary floating point, but not every
# 1/K * K is, and a cap of exactly 1/K must stay feasible.
_CAP_FEASIBILITY_TOL = 1e-12


class InfeasibleRoundError(ValueError):
    """The round's submissions cannot be turned into weights (no usable update, or a cap that too few
    usable sites cannot meet). Data-dependent, unlike a bad configuration: the round state machine may
    wait for more submissions or skip the round."""


@dataclass(frozen=True)
class SiteStats:
    """What the aggregator knows about one client's submission in one round.

    Attributes:
        site: the site's identifier; unique within a round.
        sample_count: number of local training samples n_k (>= 1).
        dice: local validation Dice in [0, 1], or None when the site did not report it.
        hd95: local validation 95th-percentile Hausdorff distance in mm (>= 0, may be ``math.inf``
            for an empty prediction), or None when not reported.
        update_norm: L2 norm ||Δ_k|| of the decoded update over all tensors (>= 0; may be NaN/inf,
            which makes the update unusable).
        finite: False when the decoded update contains NaN or Inf.
    """

    site: str
    sample_count: int
    dice: float | None
    hd95: float | None
    update_norm: float
    finite: bool

    def __post_init__(self) -> None:
        if not isinstance(self.site, str) or not self.site:
            raise ValueError(f"site must be a non-empty string, got {self.site!r}")
        if isinstance(self.sample_count, bool) or not isinstance(self.sample_count, (int, np.integer)):
            raise ValueError(
                f"sample_count of site {self.site!r} must be an integer, got {self.sample_count!r}"
            )
        if self.sample_count < 1:
            raise ValueError(
                f"sample_count of site {self.site!r} must be >= 1, got {self.sample_count}"
            )
        if self.dice is not None and not 0.0 <= self.dice <= 1.0:  # NaN fails this too
            raise ValueError(
                f"dice of site {self.site!r} must be in [0, 1] or None (missing), got {self.dice}"
            )
        if self.hd95 is not None and not self.hd95 >= 0.0:  # NaN fails; +inf is allowed
            raise ValueError(
                f"hd95 of site {self.site!r} must be >= 0 mm (inf allowed) or None (missing), "
                f"got {self.hd95}"
            )
        if self.update_norm < 0.0:  # NaN is allowed: it marks the update as unusable
            raise ValueError(
                f"update_norm of site {self.site!r} must be >= 0, got {self.update_norm}"
            )

    @property
    def usable(self) -> bool:
        """True when the update is finite and so is its norm (only these can get weight)."""
        return bool(self.finite) and math.isfinite(self.update_norm)


@dataclass(frozen=True, kw_only=True)
class AAMConfig:
    """AAM constants; see the module docstring for the formula and the reasons for each default.

    Attributes:
        dice_temperature: T_dice > 0, in Dice units.
        hd95_temperature: T_hd95 > 0, on the natural-log ratio to the median HD95.
        hd95_offset_mm: h0 > 0, added to HD95 before taking ratios (about one voxel).
        quality_floor: f in (0, 1]; quality is clipped to [f, g]; f = g = 1 disables quality weighting.
        quality_ceiling: g >= 1; 1.0 (the default): a better-than-median site gains nothing.
        dice_tolerance: t_D >= 0, Dice units; |D_k - D_ref| within it counts as 0.
        hd95_tolerance: t_H >= 0, on the log ratio to the median HD95; within it counts as 0.
        divergence_tolerance: c >= 1; norms up to c x median are not penalised (inf: never).
        divergence_power: p > 0; decay exponent (c/ρ)^p beyond c.
        divergence_hard_limit: L > c; norms above L x median get weight 0 (inf: never).
        max_weight: cap in (0, 1] on any site's final weight; 1.0 means no cap.
    """

    dice_temperature: float = 0.1
    hd95_temperature: float = 1.0
    hd95_offset_mm: float = 1.0
    quality_floor: float = 0.25
    quality_ceiling: float = 1.0
    dice_tolerance: float = 0.1
    hd95_tolerance: float = 0.5
    divergence_tolerance: float = 2.0
    divergence_power: float = 2.0
    divergence_hard_limit: float = 10.0
    max_weight: float = 1.0

    def __post_init__(self) -> None:
        for name in ("dice_temperature", "hd95_temperature", "hd95_offset_mm", "divergence_power"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0.0):
                raise ValueError(f"{name} must be a finite number > 0, got {value}")
        if not 0.0 < self.quality_floor <= 1.0:
            raise ValueError(f"quality_floor must be in (0, 1], got {self.quality_floor}")
        if not (math.isfinite(self.quality_ceiling) and self.quality_ceiling >= 1.0):
            raise ValueError(f"quality_ceiling must be a finite number >= 1, got {self.quality_ceiling}")
        for name in ("dice_tolerance", "hd95_tolerance"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0.0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if not self.divergence_tolerance >= 1.0:
            raise ValueError(
                f"divergence_tolerance must be >= 1 (a multiple of the median norm; inf disables "
                f"the decay), got {self.divergence_tolerance}"
            )
        if not self.divergence_hard_limit > self.divergence_tolerance and not (
            math.isinf(self.divergence_hard_limit) and math.isinf(self.divergence_tolerance)
        ):
            raise ValueError(
                f"divergence_hard_limit must be > divergence_tolerance "
                f"({self.divergence_tolerance}), got {self.divergence_hard_limit}"
            )
        if not 0.0 < self.max_weight <= 1.0:
            raise ValueError(f"max_weight must be in (0, 1], got {self.max_weight}")

    @classmethod
    def from_mapping(cls, mapping: dict[str, Any]) -> AAMConfig:
        """Build from a TOML table (e.g. ``[aggregation.aam]``), refusing unknown keys by name."""
        allowed = sorted(cls.__dataclass_fields__)
        unknown = sorted(set(mapping) - set(allowed))
        if unknown:
            raise ValueError(f"unknown AAM option(s) {unknown}; allowed: {allowed}")
        return cls(**{key: float(value) for key, value in mapping.items()})


@dataclass(frozen=True)
class AAMResult:
    """The outcome of ``aam_weights``.

    Attributes:
        weights: float64 array of shape (K,), in the order of the input stats; sums to one.
        factors: one dict per site, same order, for logging and the metrics RPC, with keys
            ``site, sample_count, fedavg_share, dice_term, hd95_term, quality, norm_ratio,
            divergence, uncapped_weight, weight, capped, excluded`` (``norm_ratio`` is None and
            ``excluded`` a reason string for a site that got zero divergence factor; ``hd95_term``
            may be ±inf when an HD95 is inf).
        references: the round's medians ``dice``, ``hd95``, ``update_norm`` (None when undefined).
    """

    weights: np.ndarray
    factors: list[dict[str, Any]]
    references: dict[str, float | None] = field(default_factory=dict)


def aam_weights(stats: Sequence[SiteStats], config: AAMConfig | None = None) -> AAMResult:
    """AAM weights for one round's submissions (formula in the module docstring).

    Args:
        stats: one ``SiteStats`` per submitting site, any order, site names unique.
        config: the constants; ``AAMConfig()`` when None.

    Returns:
        ``AAMResult`` with float64 weights of shape (K,) in the order of ``stats``.

    Raises:
        ValueError: empty ``stats`` or duplicate site names.
        InfeasibleRoundError: no usable update, or ``max_weight`` x (sites with positive weight) < 1.
    """
    config = AAMConfig() if config is None else config
    if len(stats) == 0:
        raise ValueError("aam_weights needs at least one site's stats, got none")
    names = [s.site for s in stats]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"each site may appear once per round; duplicated: {duplicates}")

    usable = [s for s in stats if s.usable]
    if not usable:
        raise InfeasibleRoundError(
            f"no usable update in this round: all {len(stats)} site(s) sent non-finite updates"
        )
    dice_ref = _median_or_none([s.dice for s in usable if s.dice is not None])
    hd95_ref = _median_or_none([s.hd95 for s in usable if s.hd95 is not None])
    norm_ref = _reference_norm([s.update_norm for s in usable])

    dice_terms = [_dice_term(s.dice, dice_ref, config) for s in stats]
    hd95_terms = [_hd95_term(s.hd95, hd95_ref, config) for s in stats]
    qualities = [_quality(d + h, config) for d, h in zip(dice_terms, hd95_terms)]
    ratios = [_norm_ratio(s, norm_ref) for s in stats]
    divergences = [_divergence(r, config) for r in ratios]

    raw = [s.sample_count * q * d for s, q, d in zip(stats, qualities, divergences)]
    total = math.fsum(raw)
    if total <= 0.0:  # only reachable if every usable site is above the hard limit: cannot happen
        raise InfeasibleRoundError("every site got zero weight; nothing can be aggregated")
    uncapped = np.array([r / total for r in raw], dtype=np.float64)
    weights, capped = apply_weight_cap(uncapped, config.max_weight)

    n_total = math.fsum(float(s.sample_count) for s in stats)
    factors = [
        {
            "site": s.site,
            "sample_count": int(s.sample_count),
            "fedavg_share": s.sample_count / n_total,
            "dice_term": dice_terms[i],
            "hd95_term": hd95_terms[i],
            "quality": qualities[i],
            "norm_ratio": ratios[i],
            "divergence": divergences[i],
            "uncapped_weight": float(uncapped[i]),
            "weight": float(weights[i]),
            "capped": bool(capped[i]),
            "excluded": _exclusion_reason(s, ratios[i], config),
        }
        for i, s in enumerate(stats)
    ]
    for factor in factors:
        if factor["excluded"] is not None:
            logger.info("AAM gives site %s zero weight: %s", factor["site"], factor["excluded"])
    references = {"dice": dice_ref, "hd95": hd95_ref, "update_norm": norm_ref}
    return AAMResult(weights=weights, factors=factors, references=references)


def apply_weight_cap(weights: np.ndarray, max_weight: float) -> tuple[np.ndarray, np.ndarray]:
    """Cap normalised weights at ``max_weight`` by iterative water-filling.

    Sites above the cap are set to it; the excess is shared by the uncapped sites in proportion to
    their weights; repeated until no site exceeds the cap. Zero weights stay zero.

    Args:
        weights: float64 array (K,), non-negative, summing to one.
        max_weight: the cap in (0, 1].

    Returns:
        ``(capped_weights, was_capped)``: float64 (K,) and bool (K,).

    Raises:
        ValueError: ``max_weight`` outside (0, 1].
        InfeasibleRoundError: fewer than ``1 / max_weight`` positive weights.
    """
    if not 0.0 < max_weight <= 1.0:
        raise ValueError(f"max_weight must be in (0, 1], got {max_weight}")
    original = np.asarray(weights, dtype=np.float64)
    positive = int(np.count_nonzero(original > 0.0))
    if max_weight * positive < 1.0 - _CAP_FEASIBILITY_TOL:
        raise InfeasibleRoundError(
            f"max_weight={max_weight} is infeasible with {positive} site(s) of positive weight: "
            f"it needs max_weight >= 1/{positive} = {1.0 / max(positive, 1):.6g}, or more usable sites"
        )
    result = original.copy()
    capped = np.zeros(original.shape, dtype=bool)
    while True:
        over = ~capped & (result > max_weight)
        if not over.any():
            break
        capped |= over
        free = ~capped
        free_mass = math.fsum(original[free].tolist())
        result[capped] = max_weight
        if free_mass <= 0.0:
            break
        remaining = 1.0 - max_weight * int(np.count_nonzero(capped))
        result[free] = original[free] * (remaining / free_mass)
    return result, capped


def _median_or_none(values: list[float]) -> float | None:
    return float(np.median(np.asarray(values, dtype=np.float64))) if values else None


def _lower_median(values: list[float]) -> float:
    """The middle value, or the lower of the two middle values for an even count.

    Unlike the mean of the two middle values, it is always one site's own value: with two sites,
    the mean of a honest norm and a boosted one is half the boosted one, so the boosted site's
    ratio stays near 2 and it keeps half the weight; the lower median keeps the honest scale.
    """
    ordered = sorted(values)
    return float(ordered[(len(ordered) - 1) // 2])


def _reference_norm(norms: list[float]) -> float:
    """Lower median of the usable norms; if that is zero (sites that did not move), the lower
    median of the positive ones, because a zero update says nothing about the scale of a real one."""
    reference = _lower_median(norms)
    if reference > 0.0:
        return reference
    positive = [n for n in norms if n > 0.0]
    return _lower_median(positive) if positive else 0.0


def _dice_term(dice: float | None, reference: float | None, config: AAMConfig) -> float:
    if dice is None or reference is None:
        return 0.0  # missing: neutral, as if the site were at the round's median
    return _shrink(float(dice) - reference, config.dice_tolerance) / config.dice_temperature


def _shrink(x: float, tolerance: float) -> float:
    """Soft threshold: differences within ``tolerance`` count as none; beyond it, only the excess."""
    if math.isinf(x):
        return x
    return math.copysign(max(abs(x) - tolerance, 0.0), x)


def _hd95_term(hd95: float | None, reference: float | None, config: AAMConfig) -> float:
    if hd95 is None or reference is None:
        return 0.0
    h = float(hd95) + config.hd95_offset_mm
    r = reference + config.hd95_offset_mm
    if math.isinf(h) and math.isinf(r):
        return 0.0  # both infinite: the site is exactly as bad as the median
    if math.isinf(h):
        return -math.inf
    if math.isinf(r):
        return math.inf
    # Lower HD95 is better, hence the minus sign.
    return -_shrink(math.log(h / r), config.hd95_tolerance) / config.hd95_temperature


def _quality(score: float, config: AAMConfig) -> float:
    low, high = math.log(config.quality_floor), math.log(config.quality_ceiling)  # <= 0 <= high
    return math.exp(min(max(score, low), high))


def _norm_ratio(stats: SiteStats, reference: float) -> float | None:
    if not stats.usable:
        return None
    if stats.update_norm == 0.0:
        return 0.0
    if reference == 0.0:  # unreachable: a positive norm makes the positive-median reference positive
        return math.inf
    return float(stats.update_norm) / reference


def _divergence(ratio: float | None, config: AAMConfig) -> float:
    if ratio is None or ratio > config.divergence_hard_limit:
        return 0.0
    if ratio <= config.divergence_tolerance:
        return 1.0
    return float((config.divergence_tolerance / ratio) ** config.divergence_power)


def _exclusion_reason(stats: SiteStats, ratio: float | None, config: AAMConfig) -> str | None:
    if not stats.finite:
        return "update contains NaN or Inf"
    if ratio is None:
        return f"update norm is not finite ({stats.update_norm})"
    if ratio > config.divergence_hard_limit:
        return (
            f"update norm is {ratio:.3g}x the round's median, above divergence_hard_limit="
            f"{config.divergence_hard_limit}"
        )
    return None
