"""Top-k selection: which positions of a tensor are sent this round.

Magnitudes are float32 (exact for float16/float32 tensors) or float64 for float64 tensors, so
values below float32's range still rank. Both scopes keep the ``k`` largest magnitudes, break ties at the threshold by position (first
come, first kept, in tensor order) and never send an exact zero (it carries nothing). They
return sorted flat int64 positions, which the index coders need anyway.

Per tensor, the threshold comes from ``np.partition`` (O(n), no argsort). Globally, a first pass
over all tensors (:class:`GlobalThreshold`) keeps a pool of the largest magnitudes seen so far,
bounded to about ``2 k`` values, so the memory is O(k + largest tensor), never O(model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["keep_count", "top_k_positions", "threshold_positions", "GlobalThreshold", "Threshold"]

def keep_count(fraction: float, n: int) -> int:
    """Entries kept out of ``n`` at ``fraction``: ``ceil(fraction * n)``, so any non-empty tensor sends one."""
    if fraction >= 1.0:
        return n
    return min(n, math.ceil(fraction * n))


@dataclass(frozen=True)
class Threshold:
    """Keep magnitudes ``> value`` and the first ``ties`` magnitudes ``== value`` (in tensor order)."""

    value: np.floating
    ties: int


def threshold_positions(magnitude: np.ndarray, threshold: Threshold) -> tuple[np.ndarray, int]:
    """Positions selected by ``threshold`` in one tensor, and how many ties they used up.

    ``magnitude`` is a 1-D float array of absolute values.
    """
    value = threshold.value
    if value <= 0:  # fewer non-zeros than k: send every non-zero
        return np.flatnonzero(magnitude > 0), 0
    above = np.flatnonzero(magnitude > value)
    if threshold.ties <= 0:
        return above, 0
    ties = np.flatnonzero(magnitude == value)[: threshold.ties]
    if ties.size == 0:
        return above, 0
    return np.sort(np.concatenate((above, ties))), int(ties.size)


def top_k_positions(magnitude: np.ndarray, k: int) -> np.ndarray:
    """Sorted positions of the ``k`` largest entries of ``magnitude`` (1-D float, >= 0), zeros dropped."""
    n = magnitude.size
    if k <= 0 or n == 0:
        return np.zeros(0, dtype=np.int64)
    if k >= n:
        return np.flatnonzero(magnitude > 0)
    candidates = _candidates(magnitude, k) if n >= _SAMPLE_MIN and 4 * k < n else None
    pool = magnitude if candidates is None else magnitude[candidates]
    value = np.partition(pool, pool.size - k)[pool.size - k]
    if value <= 0:  # fewer non-zeros than k: send every non-zero
        chosen = np.flatnonzero(pool > 0)
    else:
        chosen = np.flatnonzero(pool > value)
        if chosen.size < k:  # ties at the threshold: the first ones in tensor order
            ties = np.flatnonzero(pool == value)[: k - chosen.size]
            chosen = np.sort(np.concatenate((chosen, ties)))
    return chosen if candidates is None else candidates[chosen]


_SAMPLE_STRIDE = 64
_SAMPLE_MIN = 1 << 15


def _candidates(magnitude: np.ndarray, k: int) -> np.ndarray | None:
    """Sorted positions of a superset of the top ``k`` (about ``2 k`` of them), or None.

    A strided sample estimates a threshold a little below the k-th largest; one comparison pass
    then keeps every entry at or above it. If fewer than ``k`` pass (an unlucky sample), the
    caller partitions the whole array instead, so the result never depends on the sample:
    all entries >= the true k-th largest (ties included) are among the candidates, in order.
    This replaces an O(n) copy + partition of the whole tensor by a compare + a small partition.
    """
    sample = magnitude[::_SAMPLE_STRIDE]
    wanted = min(sample.size, 2 * (k // _SAMPLE_STRIDE) + 16)
    estimate = np.partition(sample, sample.size - wanted)[sample.size - wanted]
    if estimate <= 0:
        return None
    candidates = np.flatnonzero(magnitude >= estimate)
    return candidates if candidates.size >= k else None


class GlobalThreshold:
    """First pass of global top-k: feed every tensor's magnitudes, then read :meth:`threshold`.

    Keeps a pool holding every magnitude that can still be among the ``k`` largest: values below
    the k-th largest seen so far are filtered out as they arrive, and the pool is cut back to the
    ``k`` largest whenever it grows past ``2 k``.
    """

    def __init__(self, k: int) -> None:
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        self.k = k
        self._floor: np.floating | None = None  # None: only zeros are filtered out
        self._chunks: list[np.ndarray] = []
        self._held = 0

    def add(self, magnitude: np.ndarray) -> None:
        """Take one tensor's magnitudes (1-D float32 or float64, >= 0)."""
        if self.k == 0 or magnitude.size == 0:
            return
        if self._floor is None:
            candidates = magnitude[magnitude > 0]  # zeros are never sent
        else:
            candidates = magnitude[magnitude >= _round_down(self._floor, magnitude.dtype)]
        if candidates.size == 0:
            return
        self._chunks.append(candidates)
        self._held += candidates.size
        if self._held > 2 * self.k:
            self._shrink()

    def _shrink(self) -> None:
        pool = np.concatenate(self._chunks) if len(self._chunks) > 1 else self._chunks[0]
        if pool.size > self.k:
            pool = np.partition(pool, pool.size - self.k)[pool.size - self.k :]
            # Every later value below the current k-th largest can never make the cut.
            self._floor = pool.min()
        self._chunks = [pool]
        self._held = pool.size

    def threshold(self) -> Threshold:
        """The k-th largest magnitude over everything added, and the ties to take at it."""
        if self.k == 0:
            return Threshold(np.float32(np.inf), 0)
        if not self._chunks:
            return Threshold(np.float32(0), 0)
        self._shrink()
        pool = self._chunks[0]
        if pool.size < self.k:
            return Threshold(np.float32(0), 0)
        value = pool.min()
        return Threshold(value, self.k - int(np.count_nonzero(pool > value)))


def _round_down(value: np.floating, dtype: np.dtype) -> np.floating:
    """``value`` in ``dtype`` (so comparisons stay in the array's dtype), never above ``value``."""
    cast = dtype.type(value)
    if cast > value:
        cast = np.nextafter(cast, dtype.type(-np.inf))
    return cast
