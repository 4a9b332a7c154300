"""Aggregation strategies: one class per strategy, each owning only its own parameters.

The mathematics lives in ``aggregation.py`` and ``aam.py`` (plain numpy functions, each tested on
hand-computed arrays); a strategy class only sequences them behind one :class:`Strategy` protocol
(as Flower gives each strategy its own class): per-site weights from the submission records, then
for each tensor ``θ_new = f(θ, Δ_1..Δ_K)`` with the deltas streamed one site at a time. Server
state (FedAdam's moments) is kept in the store, never in the process.

The federation configuration names one::

    [aggregation]
    strategy = "trimmed_mean"     # fedavg | mean | median | trimmed_mean | fedadam | aam
    trim_fraction = 0.2           # that strategy's own parameters, nothing else
    # server_momentum = 0.9       # fedavg, mean, aam: server momentum over the aggregate (FedAvgM)
    # server_lr = 1.0
    # [aggregation.aam]           # for "aam": its constants (aam.AAMConfig)
    # max_weight = 0.5

:func:`from_table` refuses a key the chosen strategy does not have, naming it and the allowed ones.

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

import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

import codec
from aggregator_service import aggregation
from aggregator_service.aam import AAMConfig, SiteStats, aam_weights

__all__ = [
    "AAM",
    "STRATEGIES",
    "FedAdam",
    "FedAvg",
    "Mean",
    "Median",
    "SiteDelta",
    "Strategy",
    "TrimmedMean",
    "from_table",
]


class SiteDelta(Protocol):
    """One site's update of one tensor (``rounds.SiteTensor``)."""

    def add_to(self, acc: np.ndarray, weight: float) -> None: ...

    def dense(self) -> np.ndarray: ...

    def dense_into(self, out: np.ndarray) -> None: ...


Factors = list[dict[str, float]]


@runtime_checkable
class Strategy(Protocol):
    """What closing a round asks of a strategy, in this order.

    1. :meth:`weights` once, from the sites' statistics (in the aggregation order);
    2. :meth:`load_state` once (server state from the store; None when the strategy has none);
    3. :meth:`apply` per tensor, streaming the sites' deltas of that tensor;
    4. :meth:`save_state` once, for the next round.
    """

    name: ClassVar[str]

    def weights(self, stats: Sequence[SiteStats]) -> tuple[np.ndarray, Factors]:
        """Per-site weights (in ``stats``' order) and, per site, why it got its weight."""
        ...

    def load_state(self, store_model_path: Path) -> dict[str, np.ndarray] | None: ...

    def apply(
        self, name: str, theta: np.ndarray, deltas: Iterator[SiteDelta], weights: np.ndarray, state: Any
    ) -> np.ndarray:
        """The tensor's new value; ``theta`` may be updated in place and returned.

        ``deltas`` yields the sites' updates of this tensor in the weights' order; the caller
        skips whatever is not read (integer tensors, zero-weighted sites).
        """
        ...

    def save_state(self, store_model_path: Path, state: Any) -> None: ...


def _sample_factors(stats: Sequence[SiteStats]) -> Factors:
    return [{"sample_count": float(s.sample_count)} for s in stats]


def _refuse_non_finite(name: str, stats: Sequence[SiteStats]) -> None:
    """The baselines refuse non-finite updates (refused at submission anyway) rather than
    silently dropping them, so that they stay exactly the textbook rules."""
    broken = sorted(s.site for s in stats if not s.usable)
    if broken:
        raise ValueError(
            f"strategy {name!r} cannot aggregate non-finite updates of site(s) {broken}; "
            f"refuse them at submission or use 'aam'"
        )


def _accumulator(theta: np.ndarray) -> np.ndarray:
    """Where a weighted round adds the sites' updates of ``theta``: ``theta`` itself when it is a
    writeable, C-contiguous float32/float64 array, else a copy in at least float32."""
    dtype = np.result_type(theta.dtype, np.float32)
    if dtype == theta.dtype and theta.flags.writeable and theta.flags.c_contiguous:
        return theta
    return np.array(theta, dtype=dtype, order="C")


def _add_weighted(acc: np.ndarray, deltas: Iterator[SiteDelta], weights: np.ndarray) -> np.ndarray:
    for weight, delta in zip(weights, deltas, strict=True):
        if weight > 0:  # never multiply a zero-weighted site in: 0 * NaN is NaN
            delta.add_to(acc, float(weight))
    return acc


class _Weighted:
    """Shared by the strategies whose round is ``θ + Σ w_k Δ_k`` (streamable site by site).

    Each site's sent values are added straight into ``theta`` when it is float32 or float64 (no
    dense copy; float16 goes through a float32 accumulator), touching only the sent positions, so
    a top-1% update costs 1% of a dense add.
    """

    name: ClassVar[str]

    def site_weights(self, stats: Sequence[SiteStats]) -> np.ndarray:
        raise NotImplementedError

    def weights(self, stats: Sequence[SiteStats]) -> tuple[np.ndarray, Factors]:
        if not stats:
            raise ValueError("a round needs at least one site's stats, got none")
        _refuse_non_finite(self.name, stats)
        return self.site_weights(stats), _sample_factors(stats)

    def load_state(self, store_model_path: Path) -> dict[str, np.ndarray] | None:
        return None

    def apply(
        self, name: str, theta: np.ndarray, deltas: Iterator[SiteDelta], weights: np.ndarray, state: Any
    ) -> np.ndarray:
        if theta.dtype.kind != "f":
            return theta  # integer buffers (e.g. step counters) keep the global value
        return aggregation.cast_to_dtype(_add_weighted(_accumulator(theta), deltas, weights), theta.dtype)

    def save_state(self, store_model_path: Path, state: Any) -> None:
        return None


@dataclass(frozen=True, kw_only=True)
class _ServerMomentum(_Weighted):
    """Server momentum over the aggregated (sparse) update, for the weighted strategies.

    ``server_momentum`` = β > 0 or ``server_lr`` = η ≠ 1 turns the round into
    ``m ← β m + Σ w_k Δ_k``, ``θ ← θ + η m`` (FedAvgM, Hsu et al. 2019; Reddi et al. 2021 call Σ w_k Δ_k
    the pseudo-gradient). β = 0, η = 1 (the defaults) is the plain weighted round, with no state.
    The momentum ``m`` lives in the store beside the model it produced (``round-NNNN.momentum``).

    Memory while a round closes: ``m`` for the whole model (1× the model, loaded once) plus one
    tensor-sized float32 buffer where the sites' sparse updates are added (only their sent entries
    are touched); θ is streamed tensor by tensor as for the plain round.
    """

    server_momentum: float = 0.0
    server_lr: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.server_momentum < 1.0:
            raise ValueError(f"server_momentum must be in [0, 1) (0: none), got {self.server_momentum}")
        if not (math.isfinite(self.server_lr) and self.server_lr > 0.0):
            raise ValueError(f"server_lr must be a finite number > 0, got {self.server_lr}")

    @property
    def _stateful(self) -> bool:
        return self.server_momentum > 0.0 or self.server_lr != 1.0

    def load_state(self, store_model_path: Path) -> dict[str, np.ndarray] | None:
        if not self._stateful:
            return None
        path = store_model_path.with_suffix(".momentum")
        return codec.load_tensors(path) if path.exists() else {}

    def apply(
        self, name: str, theta: np.ndarray, deltas: Iterator[SiteDelta], weights: np.ndarray, state: Any
    ) -> np.ndarray:
        if not self._stateful:
            return super().apply(name, theta, deltas, weights, state)
        if theta.dtype.kind != "f":
            return theta
        step = _add_weighted(np.zeros(theta.shape, dtype=np.float32), deltas, weights)
        m = state.get(name)
        if m is None or m.shape != step.shape:
            m = step
        else:
            m = np.asarray(m, dtype=np.float32)
            m *= np.float32(self.server_momentum)
            m += step
        state[name] = m
        new = _accumulator(theta)
        new += np.float32(self.server_lr) * m
        return aggregation.cast_to_dtype(new, theta.dtype)

    def save_state(self, store_model_path: Path, state: Any) -> None:
        if self._stateful and state is not None:
            codec.save_tensors(store_model_path.with_suffix(".momentum"), sorted(state.items()), codec.LOSSLESS)


@dataclass(frozen=True, kw_only=True)
class FedAvg(_ServerMomentum):
    """``w_k = n_k / Σ n`` (McMahan et al. 2017). No parameters."""

    name: ClassVar[str] = "fedavg"

    def site_weights(self, stats: Sequence[SiteStats]) -> np.ndarray:
        return aggregation.fedavg_weights([s.sample_count for s in stats])


@dataclass(frozen=True, kw_only=True)
class Mean(_ServerMomentum):
    """``w_k = 1 / K``. No parameters."""

    name: ClassVar[str] = "mean"

    def site_weights(self, stats: Sequence[SiteStats]) -> np.ndarray:
        return aggregation.mean_weights(len(stats))


@dataclass(frozen=True, kw_only=True)
class AAM(_ServerMomentum):
    """The Adaptive Aggregation Mechanism (``aam.py``); its constants come from ``[aggregation.aam]``."""

    name: ClassVar[str] = "aam"
    aam: AAMConfig = field(default_factory=AAMConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.aam, AAMConfig):
            raise ValueError(f"aam must be an AAMConfig, got {type(self.aam).__name__}")

    def weights(self, stats: Sequence[SiteStats]) -> tuple[np.ndarray, Factors]:
        result = aam_weights(stats, self.aam)
        factors = [
            {k: float(v) for k, v in f.items() if isinstance(v, (int, float)) and np.isfinite(v)}
            for f in result.factors
        ]
        return result.weights, factors


@dataclass(frozen=True, kw_only=True)
class FedAdam(_Weighted):
    """A server-side Adam step on the FedAvg-weighted mean update (``aggregation.fedadam_step``).

    The moments live in the store beside the model they produced (``round-NNNN.fedadam``).
    """

    name: ClassVar[str] = "fedadam"
    server_lr: float = 1e-2
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        if not (math.isfinite(self.server_lr) and self.server_lr > 0.0):
            raise ValueError(f"server_lr must be a finite number > 0, got {self.server_lr}")
        for key in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(f"{key} must be in [0, 1), got {getattr(self, key)}")
        if not (math.isfinite(self.tau) and self.tau > 0.0):
            raise ValueError(f"tau must be a finite number > 0, got {self.tau}")

    def site_weights(self, stats: Sequence[SiteStats]) -> np.ndarray:
        return aggregation.fedavg_weights([s.sample_count for s in stats])

    def load_state(self, store_model_path: Path) -> dict[str, np.ndarray]:
        path = store_model_path.with_suffix(".fedadam")
        return codec.load_tensors(path) if path.exists() else {}

    def apply(
        self, name: str, theta: np.ndarray, deltas: Iterator[SiteDelta], weights: np.ndarray, state: Any
    ) -> np.ndarray:
        if theta.dtype.kind != "f":
            return theta
        # Σ w_k Δ_k in float64: it feeds the moments, which carry it into every later round.
        pseudo_grad = _add_weighted(np.zeros(theta.shape, dtype=np.float64), deltas, weights)
        m, v = state.get(f"m/{name}"), state.get(f"v/{name}")
        if m is None or v is None:
            m, v = aggregation.fedadam_init_state(theta)
        new, state[f"m/{name}"], state[f"v/{name}"] = aggregation.fedadam_step(
            theta, pseudo_grad, m, v, lr=self.server_lr, beta1=self.beta1, beta2=self.beta2, tau=self.tau
        )
        return aggregation.cast_to_dtype(np.asarray(new, dtype=np.float64), theta.dtype)

    def save_state(self, store_model_path: Path, state: Any) -> None:
        if state is not None:
            codec.save_tensors(store_model_path.with_suffix(".fedadam"), sorted(state.items()), codec.LOSSLESS)


class _OrderStatistic:
    """Shared by the strategies that need every site's values of one tensor at once."""

    name: ClassVar[str]

    def weights(self, stats: Sequence[SiteStats]) -> tuple[np.ndarray, Factors]:
        if not stats:
            raise ValueError("a round needs at least one site's stats, got none")
        return aggregation.mean_weights(len(stats)), _sample_factors(stats)  # every site counts alike

    def load_state(self, store_model_path: Path) -> dict[str, np.ndarray] | None:
        return None

    def combine(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def apply(
        self, name: str, theta: np.ndarray, deltas: Iterator[SiteDelta], weights: np.ndarray, state: Any
    ) -> np.ndarray:
        if theta.dtype.kind != "f":
            return theta
        combined = self.combine([d.dense() for d in deltas])
        return aggregation.cast_to_dtype(theta + combined, theta.dtype)

    def save_state(self, store_model_path: Path, state: Any) -> None:
        return None


@dataclass(frozen=True, kw_only=True)
class Median(_OrderStatistic):
    """Coordinate-wise median (the values of ``aggregation.coordinate_median``). No parameters.

    Memory: one copy of the tensor per site (the sites' deltas are decoded straight into the rows
    of one (K, n) array in the tensor's dtype and partitioned in place), plus chunk-sized float64
    temporaries for the mean of the two middle values; not the K float64 copies, their stack and
    the partition's copy that ``coordinate_median`` makes.
    """

    name: ClassVar[str] = "median"
    chunk: ClassVar[int] = 1 << 16

    def combine(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        return aggregation.coordinate_median(arrays)

    def apply(
        self, name: str, theta: np.ndarray, deltas: Iterator[SiteDelta], weights: np.ndarray, state: Any
    ) -> np.ndarray:
        if theta.dtype.kind != "f":
            return theta
        sites = list(deltas)
        rows = np.empty((len(sites), theta.size), dtype=theta.dtype)
        for k, delta in enumerate(sites):
            delta.dense_into(rows[k].reshape(theta.shape))
            if not np.isfinite(rows[k]).all():
                raise ValueError(f"median: site {k}'s update of {name!r} contains NaN or Inf")
        del sites
        k = rows.shape[0]
        mid = k // 2
        writable = theta.flags.writeable and theta.flags.c_contiguous
        out = (theta if writable else np.array(theta, order="C")).reshape(-1)
        if k % 2:
            rows.partition(mid, axis=0)
            out += rows[mid]
        else:
            rows.partition((mid - 1, mid), axis=0)
            for start in range(0, rows.shape[1], self.chunk):
                part = slice(start, start + self.chunk)
                middle = rows[mid - 1, part].astype(np.float64)
                middle += rows[mid, part]
                middle *= 0.5  # as np.median: the mean of the two middle values, in float64
                out[part] += middle.astype(theta.dtype)
        return out.reshape(theta.shape)


@dataclass(frozen=True, kw_only=True)
class TrimmedMean(_OrderStatistic):
    """Coordinate-wise trimmed mean (``aggregation.trimmed_mean``)."""

    name: ClassVar[str] = "trimmed_mean"
    trim_fraction: float = 0.1

    def __post_init__(self) -> None:
        aggregation.check_trim_fraction(self.trim_fraction)

    def combine(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        return aggregation.trimmed_mean(arrays, self.trim_fraction)


STRATEGIES: dict[str, type[Any]] = {cls.name: cls for cls in (FedAvg, Mean, Median, TrimmedMean, FedAdam, AAM)}
"""Every strategy by the name ``[aggregation] strategy`` gives it."""


def parameters(name: str) -> list[str]:
    """The keys ``[aggregation]`` accepts with ``strategy = name``: ``strategy`` and its parameters."""
    return ["strategy", *sorted(f.name for f in dataclasses.fields(STRATEGIES[name]))]


def from_table(table: Mapping[str, Any]) -> Strategy:
    """The strategy an ``[aggregation]`` table configures (``strategy`` defaults to ``fedavg``).

    Raises:
        ValueError: an unknown strategy, a key the strategy does not have (named, with the
            allowed ones), or a parameter out of its range.
    """
    options = dict(table)
    name = options.pop("strategy", "fedavg")
    if not isinstance(name, str) or name not in STRATEGIES:
        raise ValueError(f"unknown aggregation strategy {name!r}; allowed: {list(STRATEGIES)}")
    allowed = parameters(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown key(s) {unknown} for strategy {name!r}; allowed: {allowed}"
        )
    values: dict[str, Any] = {}
    for key, value in options.items():
        if key == "aam":
            if not isinstance(value, Mapping):
                raise ValueError(f"aam must be a table of AAM options ([aggregation.aam]), got {value!r}")
            values[key] = AAMConfig.from_mapping(dict(value))
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key} must be a number, got {value!r}")
        else:
            values[key] = float(value)
    strategy: Strategy = STRATEGIES[name](**values)
    return strategy
