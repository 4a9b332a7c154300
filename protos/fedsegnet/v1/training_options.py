"""The names a ``TrainingConfig`` may carry in its string fields, for both sides of the wire.

The aggregator checks a federation's configuration against them and the site agent resolves
them to what it runs; both import this one list (no torch, no numpy), so the two cannot drift.
"""

from __future__ import annotations

__all__ = ["AUGMENTATIONS", "OPTIMIZERS", "check_optimizer"]

OPTIMIZERS: tuple[str, ...] = ("adam", "sgd")
"""``TrainingConfig.optimizer``: the local optimizer (empty means ``"adam"``, as aggregators
before the field sent)."""



def check_optimizer(name: str, momentum: float) -> None:
    """Raise ValueError unless ``name`` is one of :data:`OPTIMIZERS` and ``momentum`` fits it.

    The one rule set: the aggregator checks a federation's ``[training]`` with it (prefixing
    ``training.``), the site agent and ``fedseg train`` before they build an optimizer.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, got {name!r}")
    if not (isinstance(momentum, (int, float)) and 0.0 <= momentum < 1.0):
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    if momentum and name != "sgd":
        raise ValueError(f"momentum applies to optimizer 'sgd' only, got momentum={momentum} with {name!r}")


AUGMENTATIONS: tuple[str, ...] = ("standard", "synthseg", "contrast", "none")
"""``TrainingConfig.augmentation``: the site's on-the-fly augmentation recipe (empty means
``"standard"``). ``client_agent.data.augment`` defines what each name runs."""
