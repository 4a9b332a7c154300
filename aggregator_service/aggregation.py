"""Aggregation strategies of the aggregator: plain functions, numpy in, numpy out, no I/O.

Every array here is one tensor of the model (any shape); ``arrays`` is one such tensor from each of
K sites, all of the same shape and dtype. A round closes as ``θ_{r+1} = θ_r + combine(Δ_1..Δ_K)``.

How the strategies meet the aggregator's bounded-memory streaming:

- *Weight-based* strategies (``fedavg``, ``mean``, ``aam``, and ``fedadam``'s averaging) reduce to
  ``Σ_k w_k Δ_k``. The weights are computed once per round from per-site scalars
  (``round_weights``), then the aggregator streams site by site and tensor by tensor, adding each
  site's sent values with ``scatter_add`` (a sparse update stays sparse); only one accumulator per
  tensor is alive, never K dense updates. ``weighted_accumulate`` / ``weighted_sum`` are the dense
  float64 reference: ``weighted_sum`` is the same loop over a list, bit-identical to streaming it
  through ``weighted_accumulate`` in the same site order.
- *Order-statistic* strategies (``median``, ``trimmed_mean``) need every site's values of *one*
  tensor at the same time (K copies of one tensor, not of the model): decode that tensor from each
  site's spool, call ``coordinate_median`` / ``trimmed_mean``, move on to the next tensor.
- ``fedadam``: the FedAvg-weighted mean update is the pseudo-gradient of a server-side Adam step
  (``fedadam_step``), whose moments ``m``, ``v`` the caller persists in its store per tensor.

Determinism: sums run in the order the arrays are given (float addition is not associative), so the
caller must always pass sites in a canonical order (e.g. sorted by site id) to get the same bytes
after a restart. Weights themselves (``fedavg_weights``, AAM) are order-independent.

Which strategy a federation runs, with which parameters, is ``strategies.py``'s business: one
class per strategy sequences these functions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


__all__ = [
    "cast_to_dtype",
    "check_trim_fraction",
    "coordinate_median",
    "fedadam_init_state",
    "fedadam_step",
    "fedavg_weights",
    "mean_weights",
    "scatter_add",
    "trimmed_mean",
    "weighted_accumulate",
    "weighted_sum",
]

# k * trim_fraction is a float product: 0.29 * 100 = 28.999999999999996 must still trim 29.
_TRIM_EPS = 1e-9


# --------------------------------------------------------------------------------------- weights


def fedavg_weights(sample_counts: Sequence[int] | np.ndarray) -> np.ndarray:
    """FedAvg weights ``n_k / Σ_j n_j`` (McMahan et al. 2017).

    Args:
        sample_counts: (K,) non-negative sample counts, at least one positive.

    Returns:
        float64 (K,) summing to one; independent of the order of the sites (exact ``math.fsum``).
    """
    counts = np.asarray(sample_counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size == 0:
        raise ValueError(f"sample_counts must be a non-empty 1-D sequence, got shape {counts.shape}")
    if not np.all(np.isfinite(counts)) or np.any(counts < 0):
        raise ValueError(f"sample_counts must be finite and >= 0, got {counts.tolist()}")
    total = math.fsum(counts.tolist())
    if total <= 0.0:
        raise ValueError(f"sample_counts must not all be zero, got {counts.tolist()}")
    return counts / total


def mean_weights(k: int) -> np.ndarray:
    """Uniform weights ``1/k`` for k sites: float64 (k,)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    return np.full(int(k), 1.0 / int(k), dtype=np.float64)


# ------------------------------------------------------------------------------ weighted averaging


def weighted_accumulate(acc: np.ndarray | None, array: np.ndarray, weight: float) -> np.ndarray:
    """Add ``weight * array`` into a float64 accumulator; the streaming step of weighted strategies.

    A zero weight skips the array entirely, so a site that AAM gave zero weight because its update
    holds NaN/Inf cannot poison the sum (``0 * NaN`` is NaN).

    Args:
        acc: float64 accumulator of the tensor's shape, or None to start one (zeros).
        array: one site's values of the tensor, any real dtype.
        weight: finite, >= 0.

    Returns:
        The accumulator (updated in place when ``acc`` was given).
    """
    if not (math.isfinite(weight) and weight >= 0.0):
        raise ValueError(f"weight must be finite and >= 0, got {weight}")
    array = np.asarray(array)
    if acc is None:
        acc = np.zeros(array.shape, dtype=np.float64)
    elif acc.dtype != np.float64:
        raise ValueError(f"acc must be a float64 accumulator, got {acc.dtype}")
    if acc.shape != array.shape:
        raise ValueError(f"array shape {array.shape} does not match the accumulator's {acc.shape}")
    if weight == 0.0:
        return acc
    acc += np.multiply(array, weight, dtype=np.float64)
    return acc


def scatter_add(
    acc: np.ndarray, values: np.ndarray, weight: float, positions: np.ndarray | None = None, start: int = 0
) -> None:
    """``acc[positions] += weight * values`` in place: one site's sent values of a tensor, added
    without densifying them (a top-1% update costs 1% of a dense add).

    Each position gets exactly one ``acc[p] + weight * v`` in ``acc``'s dtype, the same bits as a
    dense ``acc += weight * Δ`` would give there. A zero weight adds nothing (``0 * NaN`` is NaN).

    Args:
        acc: 1-D floating accumulator (the flat tensor), updated in place.
        values: (k,) the sent values, any real dtype that casts to ``acc``'s.
        weight: finite, >= 0.
        positions: (k,) unique int64 flat positions in ``acc``, or None for the contiguous run
            ``acc[start : start + k]`` (a dense part).
        start: first position of a dense part.
    """
    if not (math.isfinite(weight) and weight >= 0.0):
        raise ValueError(f"weight must be finite and >= 0, got {weight}")
    if acc.ndim != 1 or acc.dtype.kind != "f":
        raise ValueError(f"acc must be a 1-D floating array, got {acc.ndim}-D {acc.dtype}")
    if weight == 0.0:
        return
    scaled = np.multiply(values, weight, dtype=acc.dtype)
    if positions is None:
        acc[start : start + scaled.size] += scaled
    else:
        # Positions are unique, so a gather-add-scatter is exact; add.at does it in one pass.
        np.add.at(acc, positions, scaled)


def cast_to_dtype(values: np.ndarray, dtype: np.dtype | type) -> np.ndarray:
    """Cast a float64 result back to a tensor's dtype; integer tensors are rounded to nearest
    (e.g. a weighted mean of step counters), not truncated."""
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        rounded: np.ndarray = np.rint(values).astype(dtype)
        return rounded
    if dtype.kind not in "f":
        raise ValueError(f"can aggregate only integer or floating tensors, got dtype {dtype}")
    return values.astype(dtype, copy=False)


def weighted_sum(arrays: Sequence[np.ndarray], weights: Sequence[float] | np.ndarray) -> np.ndarray:
    """``Σ_k weights[k] * arrays[k]``, accumulated in float64 in the given order.

    Weight-based strategy (fedavg / mean / aam / fedadam's averaging): equivalent to streaming the
    same arrays through ``weighted_accumulate`` in the same order. Zero-weighted arrays are skipped.

    Args:
        arrays: K arrays of one tensor, same shape and dtype (real).
        weights: (K,) finite, >= 0 (normally summing to one; not enforced, so partial sums work).

    Returns:
        Array of the common shape, in the arrays' dtype.
    """
    dtype = _check_stack(arrays, "weighted_sum")
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (len(arrays),):
        raise ValueError(f"weighted_sum needs one weight per array: {len(arrays)} arrays, "
                         f"weights of shape {weights.shape}")
    acc: np.ndarray | None = None
    for array, weight in zip(arrays, weights.tolist()):
        acc = weighted_accumulate(acc, array, weight)
    assert acc is not None  # _check_stack guarantees at least one array
    return cast_to_dtype(acc, dtype)


# -------------------------------------------------------------------------------- order statistics


def coordinate_median(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Coordinate-wise median (Yin et al. 2018) of K arrays of one tensor.

    Needs all K sites' values of this tensor at once (not streamable site by site). For even K the
    median is the mean of the two middle values. Non-finite input is refused: such updates must be
    dropped before aggregation.

    Args:
        arrays: K arrays, same shape and dtype.

    Returns:
        Array of the common shape, in the arrays' dtype.
    """
    dtype = _check_stack(arrays, "coordinate_median")
    stacked = _stack_finite(arrays, "coordinate_median")
    return cast_to_dtype(np.median(stacked, axis=0), dtype)


def trimmed_mean(arrays: Sequence[np.ndarray], trim_fraction: float) -> np.ndarray:
    """Coordinate-wise trimmed mean: drop the ``floor(K * trim_fraction)`` smallest and as many
    largest values of each coordinate, average the rest (Yin et al. 2018).

    Needs all K sites' values of this tensor at once (not streamable site by site).

    Args:
        arrays: K arrays, same shape and dtype, all finite.
        trim_fraction: in [0, 0.5); 0 is the plain mean.

    Returns:
        Array of the common shape, in the arrays' dtype.
    """
    check_trim_fraction(trim_fraction)
    dtype = _check_stack(arrays, "trimmed_mean")
    stacked = _stack_finite(arrays, "trimmed_mean")
    k = stacked.shape[0]
    cut = min(math.floor(k * trim_fraction + _TRIM_EPS), (k - 1) // 2)
    kept = np.sort(stacked, axis=0)[cut : k - cut]
    return cast_to_dtype(kept.mean(axis=0), dtype)


# ------------------------------------------------------------------------------------------ FedAdam


def fedadam_init_state(param: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Zero moments ``(m, v)`` for one tensor: float32 at least (float64 for float64 params)."""
    dtype = np.result_type(np.asarray(param).dtype, np.float32)
    return np.zeros(np.shape(param), dtype=dtype), np.zeros(np.shape(param), dtype=dtype)


def fedadam_step(
    param: np.ndarray,
    pseudo_grad: np.ndarray,
    m: np.ndarray,
    v: np.ndarray,
    *,
    lr: float = 1e-2,
    beta1: float = 0.9,
    beta2: float = 0.99,
    tau: float = 1e-3,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One FedAdam server step for one tensor (Reddi et al. 2021, "Adaptive Federated
    Optimization", Algorithm 2)::

        m' = beta1 * m + (1 - beta1) * Δ
        v' = beta2 * v + (1 - beta2) * Δ²
        θ' = θ + lr * m' / (sqrt(v') + tau)

    Sign convention: ``Δ`` (``pseudo_grad``) is the averaged client update ``θ_local − θ``, which
    already points downhill, so it is *added* (the paper's pseudo-gradient is ``−Δ`` with a minus
    in the step; the two are the same). As in the paper there is no bias correction, so the first
    step is about ``lr * sign(Δ)`` per coordinate (for ``|Δ| >> tau``); ``tau`` sets the adaptivity.

    The function is pure: the aggregator is stateless, so it persists the returned ``m``, ``v`` per
    tensor in its store and passes them back next round (start from ``fedadam_init_state``).

    Args:
        param: θ, the current global tensor (float dtype).
        pseudo_grad: Δ, the FedAvg-weighted mean update of this tensor, same shape, finite.
        m, v: first and second moments, same shape (v >= 0).
        lr: server learning rate η > 0.
        beta1, beta2: moment decays in [0, 1).
        tau: adaptivity τ > 0.

    Returns:
        ``(new_param, new_m, new_v)``: computed in float64, returned in the dtypes of
        ``param``, ``m`` and ``v`` respectively.
    """
    if not (math.isfinite(lr) and lr > 0.0):
        raise ValueError(f"lr must be a finite number > 0, got {lr}")
    for name, beta in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {beta}")
    if not (math.isfinite(tau) and tau > 0.0):
        raise ValueError(f"tau must be a finite number > 0, got {tau}")
    param, pseudo_grad, m, v = (np.asarray(x) for x in (param, pseudo_grad, m, v))
    for name, array in (("pseudo_grad", pseudo_grad), ("m", m), ("v", v)):
        if array.shape != param.shape:
            raise ValueError(f"{name} shape {array.shape} does not match param shape {param.shape}")
    if param.dtype.kind != "f":
        raise ValueError(f"fedadam_step updates floating tensors only, got dtype {param.dtype}")
    if not np.all(np.isfinite(pseudo_grad)):
        # A NaN here would live on in m and v for every later round.
        raise ValueError("pseudo_grad contains NaN or Inf; drop non-finite updates before FedAdam")
    delta = pseudo_grad.astype(np.float64)
    new_m = beta1 * m.astype(np.float64) + (1.0 - beta1) * delta
    new_v = beta2 * v.astype(np.float64) + (1.0 - beta2) * np.square(delta)
    new_param = param.astype(np.float64) + lr * new_m / (np.sqrt(new_v) + tau)
    return new_param.astype(param.dtype), new_m.astype(m.dtype), new_v.astype(v.dtype)


# ---------------------------------------------------------------------------------------- helpers


def check_trim_fraction(trim_fraction: float) -> None:
    """Refuse a ``trim_fraction`` outside [0, 0.5) (nothing would be left to average)."""
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")


def _check_stack(arrays: Sequence[np.ndarray], what: str) -> np.dtype:
    """Validate K >= 1 arrays of one shape and dtype; return that dtype."""
    if len(arrays) == 0:
        raise ValueError(f"{what} needs at least one array, got none")
    first = np.asarray(arrays[0])
    for i, array in enumerate(arrays):
        array = np.asarray(array)
        if array.shape != first.shape:
            raise ValueError(f"{what}: array {i} has shape {array.shape}, array 0 has {first.shape}")
        if array.dtype != first.dtype:
            raise ValueError(f"{what}: array {i} has dtype {array.dtype}, array 0 has {first.dtype}")
    if first.dtype.kind not in "iuf":
        raise ValueError(f"{what}: can aggregate only integer or floating tensors, got {first.dtype}")
    return first.dtype


def _stack_finite(arrays: Sequence[np.ndarray], what: str) -> np.ndarray:
    """Stack to float64 (K, ...) and refuse NaN/Inf, naming the first offending array."""
    stacked = np.stack([np.asarray(a, dtype=np.float64) for a in arrays])
    finite = np.isfinite(stacked.reshape(len(arrays), -1)).all(axis=1)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        raise ValueError(
            f"{what}: array {bad} contains NaN or Inf; drop non-finite updates before aggregating"
        )
    return stacked
