"""Training loss: a convex mix of soft Dice and cross-entropy on logits."""

from __future__ import annotations

import torch
from monai.losses import DiceCELoss as _MonaiDiceCELoss
from torch import nn

__all__ = ["DiceCELoss"]


class DiceCELoss(nn.Module):
    """``lambda_dice * soft Dice loss + (1 - lambda_dice) * cross-entropy``.

    Dice counters class imbalance (a small tumour among many background voxels); cross-entropy gives
    smooth, well-scaled gradients early in training. The mix is convex so that the loss stays
    comparable across sites and rounds whatever ``lambda_dice`` a federation chooses.

    ``forward(logits, target)``:
        logits: ``(B, C, D, H, W)``, raw network output; softmax is applied here.
        target: integer labels in ``[0, C)``, ``(B, 1, D, H, W)`` or ``(B, D, H, W)``.
        returns a scalar tensor (mean over batch and classes).

    Args (keyword-only):
        lambda_dice: weight of the Dice term, in [0, 1]; default 0.5.
        include_background: whether channel 0 counts in the Dice term (cross-entropy always uses
            every class).
        smooth: added to numerator and denominator of the soft Dice, so empty classes give a
            finite loss.
    """

    def __init__(self, *, lambda_dice: float = 0.5, include_background: bool = True, smooth: float = 1e-5) -> None:
        super().__init__()
        if isinstance(lambda_dice, bool) or not isinstance(lambda_dice, (int, float)) or not 0.0 <= lambda_dice <= 1.0:
            raise ValueError(f"lambda_dice must be in [0, 1], got {lambda_dice!r}")
        if not smooth > 0:
            raise ValueError(f"smooth must be > 0, got {smooth!r}")
        self.lambda_dice = float(lambda_dice)
        self._loss = _MonaiDiceCELoss(
            include_background=include_background,
            to_onehot_y=True,
            softmax=True,
            smooth_nr=smooth,
            smooth_dr=smooth,
            lambda_dice=self.lambda_dice,
            lambda_ce=1.0 - self.lambda_dice,
        )

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.ndim != 5:
            raise ValueError(f"logits must be (B, C, D, H, W), got shape {tuple(logits.shape)}")
        if target.ndim == 4:
            target = target.unsqueeze(1)
        if target.ndim != 5 or target.shape[1] != 1 or target.shape[0] != logits.shape[0] or target.shape[2:] != logits.shape[2:]:
            raise ValueError(
                f"target must be (B, 1, D, H, W) or (B, D, H, W) matching logits {tuple(logits.shape)}, "
                f"got {tuple(target.shape)}"
            )
        if target.is_floating_point():
            # Labels read from NIfTI often arrive as floats; they must still be whole class indices.
            if not torch.equal(target, target.round()):
                raise ValueError("target must hold integer class labels, got non-integer values")
        target = target.long()
        num_classes = logits.shape[1]
        lo, hi = int(target.min()), int(target.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"target labels must be in [0, {num_classes}), got values in [{lo}, {hi}]")
        return self._loss(logits.float(), target)
