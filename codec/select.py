"""Top-k selection: which positions of a tensor are sent this round.

Both scopes keep the ``k`` largest magnitudes, break ties at the threshold by position (first
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

_TINY = np.float32(np.nextafter(np.float32(0), np.float32(1)))


def keep_count(fraction: float, n: int) -> int:
    """Entries kept out of ``n`` at ``fraction``: ``ceil(fraction * n)``, so any non-empty tensor sends one."""
    if fraction >= 1.0:
        return n
    return min(n, math.ceil(fraction * n))


@dataclass(frozen=True)
class Threshold:
    """Keep magnitudes ``> value`` and the first ``ties`` magnitudes ``== value`` (in tensor order)."""

    value: np.float32
    ties: int


def threshold_positions(magnitude: np.ndarray, threshold: Threshold) -> tuple[np.ndarray, int]:
    """Positions selected by ``threshold`` in one tensor, and how many ties they used up.

    ``magnitude`` is a 1-D float32 array of absolute values.
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
    """Sorted positions of the ``k`` largest entries of ``magnitude`` (1-D float32, >= 0), zeros dropped."""
    n = magnitude.size
    if k <= 0 or n == 0:
        return np.zeros(0, dtype=np.int64)
    if k >= n:
        return np.flatnonzero(magnitude > 0)
    value = np.partition(magnitude, n - k)[n - k]
    above = int(np.count_nonzero(magnitude > value)) if value > 0 else 0
    positions, _ = threshold_positions(magnitude, Threshold(np.float32(value), k - above))
    return positions


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
        self._floor = _TINY  # zeros are never sent
        self._chunks: list[np.ndarray] = []
        self._held = 0

    def add(self, magnitude: np.ndarray) -> None:
        """Take one tensor's magnitudes (1-D float32, >= 0)."""
        if self.k == 0 or magnitude.size == 0:
            return
        candidates = magnitude[magnitude >= self._floor]
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
            self._floor = max(self._floor, np.float32(pool.min()))
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
        value = np.float32(pool.min())
        return Threshold(value, self.k - int(np.count_nonzero(pool > value)))
