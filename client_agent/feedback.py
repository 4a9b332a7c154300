"""The site's error feedback around the codec: DGC momentum correction, staleness, diagnostics.

Plain numpy over name -> array maps, no torch, no I/O (the agent stores what these return with
the residual, ``client_agent.state``). The codec (:func:`codec.encode_update`) keeps the residual:
what it does not send of ``x = update + residual`` it keeps, so ``sent + kept == x`` exactly.
This module decides what ``update`` is and measures what happened:

* **Momentum correction** (Deep Gradient Compression, Lin et al. 2018, section 3.2, applied at
  round granularity): the site keeps a velocity of its round updates, ``u = m u + Δ``, and feeds
  ``u`` (not the raw Δ) to the codec's residual. **Momentum-factor masking** (section 3.3): where
  an entry was sent its velocity is cleared, so a sent entry does not keep pushing through stale
  momentum. :func:`accumulate_velocity`, :func:`sent_masks`, :func:`mask_velocity`.
* **Staleness**: per entry, the rounds since it was last sent (:func:`advance_age`); the mean over
  the entries sent this round says how old the information is when it reaches the aggregator.
* **Diagnostics** (:func:`diagnostics`): the norms and energy shares the plateau analysis in
  ``results/README.md`` plots per round and site, reported in ``LocalMetrics.extra`` as ``ef/*``.

Only floating tensors take part; integer tensors (counters) are sent dense and have no residual.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

__all__ = [
    "DIAGNOSTIC_NAMES",
    "accumulate_velocity",
    "advance_age",
    "diagnostics",
    "mask_velocity",
    "sent_masks",
]

Arrays = Mapping[str, np.ndarray]

DIAGNOSTIC_NAMES = (
    "ef/lr", "ef/update_norm", "ef/velocity_norm", "ef/residual_norm", "ef/kept_norm", "ef/sent_energy",
    "ef/update_energy_sent", "ef/sent_fraction", "ef/stale_mean", "ef/stale_max",
)
"""The ``LocalMetrics.extra`` names :func:`diagnostics` fills (10 of the 64 allowed)."""


def _floating(array: np.ndarray) -> bool:
    return np.asarray(array).dtype.kind == "f"


def accumulate_velocity(deltas: Arrays, velocity: Arrays | None, momentum: float) -> dict[str, np.ndarray]:
    """``u = momentum * velocity + delta`` per floating tensor (a missing velocity counts as zero).

    Non-floating tensors pass through unchanged. Raises ValueError for a momentum outside
    [0, 1) or a velocity whose shape differs from its delta's.
    """
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum_correction must be in [0, 1), got {momentum}")
    previous = velocity or {}
    out: dict[str, np.ndarray] = {}
    for name, delta in deltas.items():
        old = previous.get(name)
        if not _floating(delta) or old is None:
            out[name] = delta
            continue
        if old.shape != delta.shape:
            raise ValueError(f"velocity of {name!r} has shape {old.shape}, the update's is {delta.shape}")
        out[name] = np.asarray(momentum * old + delta, dtype=delta.dtype)
    return out


def sent_masks(update: Arrays, residual: Arrays | None, kept: Arrays) -> dict[str, np.ndarray]:
    """Where the codec sent a non-zero value: ``(update + residual) - kept != 0`` per floating tensor.

    ``kept`` is the codec's new residual, so the difference is exactly what the receiver decodes;
    an entry whose sent value quantized to zero counts as not sent.
    """
    previous = residual or {}
    masks: dict[str, np.ndarray] = {}
    for name, u in update.items():
        if not _floating(u):
            continue
        x = u + previous[name] if name in previous else u
        masks[name] = (x - kept[name]) != 0
    return masks


def mask_velocity(velocity: Arrays, sent: Arrays) -> dict[str, np.ndarray]:
    """The velocity with every sent entry cleared (momentum-factor masking); a new dict of copies."""
    out: dict[str, np.ndarray] = {}
    for name, u in velocity.items():
        if name in sent:
            masked = np.array(u, copy=True)
            masked[sent[name]] = 0
            out[name] = masked
        elif _floating(u):
            out[name] = np.array(u, copy=True)
    return out


def advance_age(age: Arrays | None, sent: Arrays) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One round of staleness: every entry ages by one, sent entries restart at zero.

    Returns (the new ages as int32, the ages the sent entries had when sent: 1 = sent in the
    previous round too, n = waited n - 1 rounds in the residual). A missing age starts at zero,
    i.e. as if everything had been sent just before the first round.
    """
    previous = age or {}
    new: dict[str, np.ndarray] = {}
    at_send: list[np.ndarray] = []
    for name, mask in sent.items():
        old = previous.get(name)
        grown = np.ones(mask.shape, dtype=np.int32) if old is None or old.shape != mask.shape else old.astype(np.int32) + 1
        at_send.append(grown[mask])
        grown[mask] = 0
        new[name] = grown
    ages = np.concatenate(at_send) if at_send else np.zeros(0, dtype=np.int32)
    return new, ages


def _sq(arrays: Arrays, names: list[str]) -> float:
    return float(sum(np.vdot(arrays[n], arrays[n]).real for n in names if n in arrays))


def diagnostics(
    deltas: Arrays, update: Arrays, residual: Arrays | None, kept: Arrays, sent: Arrays, ages_at_send: np.ndarray,
    lr: float,
) -> dict[str, float]:
    """The round's error-feedback figures (names in :data:`DIAGNOSTIC_NAMES`), all finite.

    ``deltas``: the raw round update θ_local − θ_global; ``update``: what went into the codec
    (the velocity under momentum correction, else ``deltas``); ``residual``: the residual before
    this round; ``kept``: after. ``ef/sent_energy`` is the share of ``update + residual``'s energy
    that was sent; ``ef/update_energy_sent`` the share of the raw update's own energy at the sent
    entries (low: the round's new information mostly waits in the residual).
    """
    names = [n for n, a in update.items() if _floating(a)]
    previous = residual or {}
    x_sq = 0.0
    sent_sq = 0.0
    delta_at_sent = 0.0
    count = 0
    total = 0
    for n in names:
        x = update[n] + previous[n] if n in previous else update[n]
        x_sq += float(np.vdot(x, x).real)
        s = x - kept[n]
        sent_sq += float(np.vdot(s, s).real)
        mask = sent[n]
        d = np.asarray(deltas[n])[mask]
        delta_at_sent += float(np.vdot(d, d).real)
        count += int(mask.sum())
        total += mask.size
    delta_sq = _sq(deltas, names)
    return {
        "ef/lr": float(lr),
        "ef/update_norm": delta_sq ** 0.5,
        "ef/velocity_norm": _sq(update, names) ** 0.5,
        "ef/residual_norm": _sq(previous, names) ** 0.5,
        "ef/kept_norm": _sq(kept, names) ** 0.5,
        "ef/sent_energy": sent_sq / x_sq if x_sq > 0 else 0.0,
        "ef/update_energy_sent": delta_at_sent / delta_sq if delta_sq > 0 else 0.0,
        "ef/sent_fraction": count / total if total else 0.0,
        "ef/stale_mean": float(ages_at_send.mean()) if ages_at_send.size else 0.0,
        "ef/stale_max": float(ages_at_send.max()) if ages_at_send.size else 0.0,
    }
