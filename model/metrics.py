"""Segmentation metrics on label volumes: Dice, IoU, HD95 (mm), precision, recall.

Voxel counts come from MONAI's ``get_confusion_matrix`` and the 95th-percentile Hausdorff
distance from MONAI's ``compute_hausdorff_distance`` (surface voxels, Euclidean distance scaled by
the voxel spacing). What MONAI leaves undefined (``nan``/``inf`` for empty masks) is fixed by the
conventions below, so every returned number is a finite Python float that can be averaged across
cases, sites and rounds.

Conventions, per class ``c`` with ``P = {pred == c}``, ``T = {target == c}``:

* ``dice = 2|P∩T| / (|P| + |T|)``, ``iou = |P∩T| / |P∪T|``, ``precision = |P∩T| / |P|``,
  ``recall = |P∩T| / |T|``.
* Class absent from both ``P`` and ``T``: a perfect answer, so dice = iou = precision = recall =
  1.0 and hd95 = 0.0.
* Class absent from exactly one of them: dice = iou = precision = recall = 0.0 (nothing right was
  found; ``0/0`` ratios count as failures) and hd95 = the volume's diagonal in mm,
  ``sqrt(Σ (n_i * spacing_i)^2)``, the largest distance possible inside the volume: finite,
  and worse than any real HD95 in that volume.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance, get_confusion_matrix

from protos.fedsegnet.v1.local_metrics import SEGMENTATION_METRIC_NAMES

__all__ = ["METRIC_NAMES", "segmentation_metrics", "volume_diagonal_mm"]

# The one list of the segmentation metrics' names: the validation fields of the wire's
# LocalMetrics, so what a site computes is by construction what it may report.
METRIC_NAMES: tuple[str, ...] = SEGMENTATION_METRIC_NAMES


def volume_diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Length in mm of the diagonal of a volume of ``shape`` voxels with ``spacing`` mm per voxel."""
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing))))


def _as_label_volume(name: str, x: np.ndarray | torch.Tensor, num_classes: int) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).detach().cpu()
    if t.ndim != 3:
        raise ValueError(
            f"{name} must be a (D, H, W) label volume, got shape {tuple(t.shape)}; "
            "take argmax over the class axis and drop batch/channel axes first"
        )
    if t.dtype == torch.bool:
        t = t.long()
    if t.is_floating_point():
        if not torch.equal(t, t.round()):
            raise ValueError(f"{name} must hold integer class labels, got non-integer values")
        t = t.long()
    if t.numel():
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"{name} labels must be in [0, {num_classes}), got values in [{lo}, {hi}]")
    return t


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else 0.0


def _class_metrics(p: torch.Tensor, t: torch.Tensor, spacing: Sequence[float], diagonal: float) -> dict[str, float]:
    """Metrics of one binary pair ``p``, ``t`` of shape ``(D, H, W)`` (bool)."""
    p_any, t_any = bool(p.any()), bool(t.any())
    if not p_any and not t_any:
        return {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "precision": 1.0, "recall": 1.0}
    # MONAI wants one-hot (B, C, spatial); one channel per call keeps memory at two masks.
    y_pred = p[None, None].to(torch.float32)
    y = t[None, None].to(torch.float32)
    tp, fp, _tn, fn = (float(v) for v in get_confusion_matrix(y_pred, y, include_background=True)[0, 0])
    if p_any and t_any:
        with warnings.catch_warnings():
            # MONAI's own internal call passes a deprecated argument; the warning is not ours to fix.
            warnings.simplefilter("ignore", FutureWarning)
            hd95 = float(
                compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95, spacing=list(spacing))[0, 0]
            )
    else:
        hd95 = diagonal
    return {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn),
        "iou": _ratio(tp, tp + fp + fn),
        "hd95": hd95,
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
    }


def segmentation_metrics(
    pred: np.ndarray | torch.Tensor,
    target: np.ndarray | torch.Tensor,
    *,
    num_classes: int,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    include_background: bool = False,
) -> dict[str, Any]:
    """Per-class and mean Dice, IoU, HD95 (mm), precision and recall of one case.

    Args:
        pred: predicted labels ``(D, H, W)``, integers in ``[0, num_classes)`` (e.g. argmax of logits).
        target: ground-truth labels, same shape and range.
        num_classes: number of classes including background (label 0).
        spacing: voxel size in mm along ``(D, H, W)``, for HD95.
        include_background: also score class 0.

    Returns:
        ``{"per_class": {"1": {"dice", "iou", "hd95", "precision", "recall"}, …},
        "mean": {same keys: unweighted mean over the scored classes}}``, all plain finite floats.
        Empty-class conventions are in the module docstring.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    first = 0 if include_background else 1
    if first >= num_classes:
        raise ValueError(
            f"num_classes={num_classes} with include_background=False leaves no class to score; "
            "use num_classes >= 2 or include_background=True"
        )
    sp = tuple(float(s) for s in spacing)
    if len(sp) != 3 or not all(math.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing must be three finite positive numbers (mm along D, H, W), got {tuple(spacing)}")
    p = _as_label_volume("pred", pred, num_classes)
    t = _as_label_volume("target", target, num_classes)
    if p.shape != t.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(p.shape)} vs {tuple(t.shape)}")
    diagonal = volume_diagonal_mm(tuple(p.shape), sp)

    per_class = {str(c): _class_metrics(p == c, t == c, sp, diagonal) for c in range(first, num_classes)}
    mean = {k: float(np.mean([m[k] for m in per_class.values()])) for k in METRIC_NAMES}
    return {"per_class": per_class, "mean": mean}
