"""A byte budget per update: how many entries each floating tensor sends so that the frames fit.

The rule (``CodecSpec.byte_budget``): tensor ``i`` sends its ``k_i`` largest-magnitude entries
with ``k_i = min(cap_i, floor(lam * E_i))``, where ``E_i`` is its energy (the sum of squares of
what it would send: the update plus the residual) and ``lam`` is the largest number for which
all frames, headers included, fit the budget. So each tensor's share of the sent entries is its
share of the update's energy, until it has nothing more to send (``cap_i``: its non-zero entries,
at most ``top_k_fraction`` of them); what a full tensor cannot take goes to the others. A tensor
with more energy never gets fewer entries than one with less, unless it has fewer to give.

Why energy and not a global magnitude threshold: the threshold lets a few tensors with large
entries take the whole budget round after round while the others wait in the residual; energy
shares keep every tensor moving in proportion to how much it changed. What is not sent stays in
the error-feedback residual and raises that tensor's energy in the next round.

Sizes are exact, not estimated: each candidate allocation is sized by the same layout code that
writes the frames (headers, index sections, values), before zstd, which only ever shrinks a
payload; so the frames never exceed the budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from .errors import CodecError

__all__ = ["Candidates", "allocate", "plan_budget"]

_MAX_STEPS = 64


@dataclass
class Candidates:
    """One floating tensor's side of the plan.

    Attributes:
        name: the tensor's name (for messages).
        energy: sum of squares of the tensor's values (float64).
        order: flat positions, largest magnitude first (ties: lower position first); the tensor's
            top ``cap`` entries, so ``cap = order.size``.
        count: the tensor's element count; sending all of them is the dense encoding, when
            ``dense`` allows it (a value coder that cannot keep every residual exact, sign, stays
            sparse so that it can hold such entries back).
        size_of: exact frame bytes of the tensor when it sends the given sorted positions (None:
            dense).
    """

    name: str
    energy: float
    order: np.ndarray
    count: int
    size_of: Callable[[np.ndarray | None], int]
    dense: bool = True
    _sizes: dict[int, int] = field(default_factory=dict, repr=False)

    @property
    def cap(self) -> int:
        return int(self.order.size)

    def positions(self, k: int) -> np.ndarray | None:
        """The sorted positions of the top ``k`` entries (None: all of the tensor, dense)."""
        if k >= self.count and self.dense:
            return None
        return np.sort(self.order[:k])

    def size(self, k: int) -> int:
        size = self._sizes.get(k)
        if size is None:
            size = self._sizes[k] = self.size_of(self.positions(k))
        return size


def allocate(energies: Sequence[float], caps: Sequence[int], lam: float) -> list[int]:
    """``k_i = min(cap_i, floor(lam * E_i))``: entries per tensor for the multiplier ``lam``."""
    out = []
    for energy, cap in zip(energies, caps):
        want = lam * energy
        out.append(cap if want >= cap else max(0, math.floor(want)))
    return out


def plan_budget(tensors: Sequence[Candidates], fixed_bytes: int, budget: int) -> list[int]:
    """Entries each tensor sends so that ``fixed_bytes`` + the tensors' frames fit ``budget``.

    ``fixed_bytes``: frames that do not depend on the plan (non-floating tensors, sent dense).

    Raises:
        CodecError: the budget cannot hold even one frame header per tensor; names the budget and
            the smallest one that fits.
    """
    energies = [t.energy for t in tensors]
    caps = [t.cap for t in tensors]

    def total(ks: Sequence[int]) -> int:
        return fixed_bytes + sum(t.size(k) for t, k in zip(tensors, ks))

    nothing = [0] * len(tensors)
    minimum = total(nothing)
    if minimum > budget:
        raise CodecError(
            f"byte_budget of {budget} bytes cannot hold this update: its frames take {minimum} bytes even "
            f"sending no values ({len(tensors)} floating tensors' frame headers plus {fixed_bytes} bytes of "
            f"tensors sent dense); raise byte_budget to at least {minimum}"
        )
    if total(caps) <= budget:
        return caps
    # Bisection on lam: the frames' size never decreases as lam grows (more entries per tensor,
    # each adding values and never shrinking an index), so the largest fitting lam is a threshold.
    lo, hi = 0.0, max((cap / e for cap, e in zip(caps, energies) if e > 0), default=0.0)
    best = nothing
    for _ in range(_MAX_STEPS):
        mid = (lo + hi) / 2
        if not lo < mid < hi:
            break
        ks = allocate(energies, caps, mid)
        if total(ks) <= budget:
            lo, best = mid, ks
        else:
            hi = mid
        # Close enough: the entries still in doubt are at most 0.1% of those planned.
        if sum(allocate(energies, caps, hi)) - sum(best) <= max(1, sum(best) // 1000):
            break
    return best
