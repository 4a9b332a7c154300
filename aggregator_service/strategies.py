"""Aggregation strategies as the round-closing code runs them over streamed updates.

The mathematics lives in ``aggregation.py`` and ``aam.py`` (plain numpy functions, each tested on
hand-computed arrays); this module only sequences them: per-site weights from the submission
records, then for each tensor ``θ_new = f(θ, Δ_1..Δ_K)`` with the deltas streamed one site at a
time. Server state (FedAdam's moments) is kept in the store, never in the process.

Memory per tensor: weighted strategies (fedavg, mean, aam) add into the tensor itself, fedadam into
one float64 accumulator; median and trimmed_mean hold all K sites' values of that tensor; fedadam
additionally keeps its moments for the whole model (2 × the model) while the round closes.

Precision: a weighted round computes ``θ ← θ + w_k Δ_k`` site after site in θ's own dtype
(float32 for float32 models), in site-name order, so it is deterministic; each sent position is
rounded once per site that sent it (a relative error of about 6e-8 of |θ| per site), far below
what an int8- or top-k-coded update carries. ``aggregation.weighted_sum`` (float64) is the
reference it is tested against.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

import codec
from aggregator_service import aggregation
from aggregator_service.aam import SiteStats, aam_weights
from aggregator_service.aggregation import StrategyConfig


class SiteDelta(Protocol):
    """One site's update of one tensor (``rounds.SiteTensor``)."""

    def add_to(self, acc: np.ndarray, weight: float) -> None: ...

    def dense(self) -> np.ndarray: ...


def site_stats(record: Mapping[str, Any]) -> SiteStats:
    """AAM's view of one committed submission (its record in the store)."""
    metrics = record.get("metrics", {})
    return SiteStats(
        site=record["site"],
        sample_count=int(record["sample_count"]),
        dice=metrics.get("dice"),
        hd95=metrics.get("hd95"),
        update_norm=float(record["update_norm"]),
        finite=True,  # non-finite updates are refused at submission
    )


@dataclass(frozen=True)
class RoundAggregator:
    """One round's aggregation under a :class:`StrategyConfig`."""

    config: StrategyConfig

    def weights(self, records: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, list[dict[str, float]]]:
        """Per-site weights (in the records' order) and, per site, why it got its weight."""
        stats = [site_stats(r) for r in records]
        if self.config.name == "aam":
            result = aam_weights(stats, self.config.aam)
            factors = [
                {k: float(v) for k, v in f.items() if isinstance(v, (int, float)) and np.isfinite(v)}
                for f in result.factors
            ]
            return result.weights, factors
        weights = aggregation.round_weights(self.config, stats)
        if weights is None:  # median / trimmed mean: every site counts alike
            weights = aggregation.mean_weights(len(stats))
        return weights, [{"sample_count": float(s.sample_count)} for s in stats]

    def load_state(self, store: Any, round_id: int) -> dict[str, np.ndarray] | None:
        if self.config.name != "fedadam":
            return None
        path = _fedadam_path(store, round_id)
        return codec.load_tensors(path) if path.exists() else {}

    def apply(
        self, name: str, theta: np.ndarray, deltas: Iterator[SiteDelta], weights: np.ndarray, state: Any
    ) -> np.ndarray:
        """The tensor's new value; ``theta`` may be updated in place and returned.

        ``deltas`` yields the sites' updates of this tensor in the weights' order; the caller skips
        whatever is not read (integer tensors, zero-weighted sites).

        Weighted strategies add each site's sent values, one site after the other, straight into
        ``theta`` when it is float32 or float64 (so no dense copy of the tensor is made; float16
        goes through a float32 accumulator): ``θ ← θ + w_k Δ_k`` touches only the sent positions,
        so a top-1% update costs 1% of a dense add. FedAdam sums ``Σ w_k Δ_k`` in float64 for its
        moments. Median and trimmed mean densify every site's delta of this tensor.
        """
        if theta.dtype.kind != "f":
            # Integer buffers (e.g. step counters) are not averaged: keep the global value.
            return theta
        if not self.config.is_weighted:
            combined = aggregation.combine_tensor(self.config, [d.dense() for d in deltas])
            return aggregation.cast_to_dtype(theta + combined, theta.dtype)
        if self.config.name == "fedadam":
            acc = np.zeros(theta.shape, dtype=np.float64)
        else:
            acc = _accumulator(theta)
        for weight, delta in zip(weights, deltas, strict=True):
            if weight > 0:  # never multiply a zero-weighted site in: 0 * NaN is NaN
                delta.add_to(acc, float(weight))
        if self.config.name == "fedadam":
            m, v = state.get(f"m/{name}"), state.get(f"v/{name}")
            if m is None or v is None:
                m, v = aggregation.fedadam_init_state(theta)
            new, state[f"m/{name}"], state[f"v/{name}"] = aggregation.fedadam_step(
                theta, acc, m, v, lr=self.config.server_lr, beta1=self.config.beta1,
                beta2=self.config.beta2, tau=self.config.tau,
            )
            return aggregation.cast_to_dtype(np.asarray(new, dtype=np.float64), theta.dtype)
        return aggregation.cast_to_dtype(acc, theta.dtype)

    def save_state(self, store: Any, round_id: int, state: Any) -> None:
        if self.config.name == "fedadam" and state is not None:
            codec.save_tensors(_fedadam_path(store, round_id), sorted(state.items()), codec.LOSSLESS)


def _accumulator(theta: np.ndarray) -> np.ndarray:
    """Where a weighted round adds the sites' updates of ``theta``: ``theta`` itself when it is a
    writeable, C-contiguous float32/float64 array, else a copy in at least float32."""
    dtype = np.result_type(theta.dtype, np.float32)
    if dtype == theta.dtype and theta.flags.writeable and theta.flags.c_contiguous:
        return theta
    return np.array(theta, dtype=dtype, order="C")


def _fedadam_path(store: Any, round_id: int) -> Any:
    return store.model_path(round_id).with_suffix(".fedadam")


def build(name: str, options: Mapping[str, Any]) -> RoundAggregator:
    """The aggregation configured by ``[aggregation] strategy = NAME`` and its other keys."""
    return RoundAggregator(StrategyConfig.from_mapping({"name": name, **options}))
