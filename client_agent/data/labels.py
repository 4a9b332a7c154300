"""Label values -> model classes: presets for public data sets, remapping, BraTS regions."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from client_agent.data.errors import DataError

# Each preset maps raw label values to the classes the model learns; its class count is the
# number of classes the model must output.
LABEL_PRESETS: dict[str, dict[int, int]] = {
    # BraTS 2018-2021: 1 necrotic/non-enhancing core, 2 oedema, 4 enhancing (BraTS 2023: 3).
    # Classes: 0 bg, 1 necrotic core, 2 oedema, 3 enhancing; regions via regions_from_labels.
    "brats_regions": {0: 0, 1: 1, 2: 2, 3: 3, 4: 3},
    # MSD Task01_BrainTumour stores 1 oedema, 2 non-enhancing tumour, 3 enhancing: the same classes.
    "msd_brain_tumour": {0: 0, 1: 2, 2: 1, 3: 3},
    # LiTS / MSD Task03_Liver: 0 bg, 1 liver, 2 tumour.
    "lits": {0: 0, 1: 1, 2: 2},
    # ACDC: 0 bg, 1 right ventricle, 2 myocardium, 3 left ventricle.
    "acdc": {0: 0, 1: 1, 2: 2, 3: 3},
}

PRESET_NUM_CLASSES = {name: max(m.values()) + 1 for name, m in LABEL_PRESETS.items()}


def resolve_label_map(spec: str | Mapping[Any, Any] | None) -> dict[int, int] | None:
    """Turn configuration into a ``{raw value: class}`` map.

    ``spec`` is a preset name from :data:`LABEL_PRESETS`, a mapping (keys may be strings, as TOML
    and JSON write them: ``{"4": 3}``), or None for no remapping. Raw values absent from the map
    keep their value.
    """
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec not in LABEL_PRESETS:
            raise DataError(f"unknown label_map preset {spec!r}; presets: {sorted(LABEL_PRESETS)}")
        return dict(LABEL_PRESETS[spec])
    if not isinstance(spec, Mapping):
        raise DataError(f"label_map must be a preset name or a mapping raw value -> class, got {type(spec).__name__}")
    out: dict[int, int] = {}
    for k, v in spec.items():
        try:
            raw, cls = int(k), int(v)
        except (TypeError, ValueError) as exc:
            raise DataError(f"label_map entries must be integers, got {k!r}: {v!r}") from exc
        if cls < 0:
            raise DataError(f"label_map maps {raw} to a negative class {cls}; classes are 0, 1, …")
        out[raw] = cls
    return out


def remap_labels(label: np.ndarray, label_map: Mapping[int, int] | None) -> np.ndarray:
    """Apply ``label_map`` to an integer label array; values absent from the map are kept.

    Returns an ``int64`` array of the same shape.
    """
    label = np.asarray(label)
    out = label.astype(np.int64, copy=True)
    if not label_map:
        return out
    # A vectorised lookup over the distinct values: one pass however many entries the map has.
    values, inverse = np.unique(out, return_inverse=True)
    mapped = np.array([label_map.get(int(v), int(v)) for v in values], dtype=np.int64)
    return mapped[inverse].reshape(label.shape)


def regions_from_labels(label: np.ndarray | torch.Tensor) -> dict[str, np.ndarray]:
    """BraTS evaluation regions from ``brats_regions`` classes (0 bg, 1 necrotic core, 2 oedema, 3 enhancing).

    ET (enhancing tumour) = {3}; TC (tumour core) = {1, 3}; WT (whole tumour) = {1, 2, 3}.
    Returns boolean masks of the input's shape, e.g. ``(D, H, W)``.
    """
    lab = label.detach().cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
    return {"ET": lab == 3, "TC": (lab == 1) | (lab == 3), "WT": (lab >= 1) & (lab <= 3)}
