"""Training on windows of a volume (``[model] patch_size``), as nnU-Net and MONAI train 3D networks.

A step on a 32³ window of a 48³ volume costs about a third of a step on the whole volume, and
in equal CPU time the windows teach more: on the quick generalization experiment's data, pooled
training reached grey/white-matter Dice 0.727 on the real scan after 150 CPU-s of 32³ windows
against 0.649 for whole volumes, and only the windows learned CSF (0.43 against 0.0;
``benchmarks/patch_training.py``, benchmarks/README.md). Prediction must then slide windows of
the same size over the volume (:func:`model.window_logits`): the network's InstanceNorm
statistics and its transformer's position encoding are those of a window, and a whole volume (three quarters
background at 48³) gives it other ones.

:class:`RandPatch` draws the windows. A third of them (nnU-Net's oversampling of foreground) are
centred, as far as the volume allows, on a random voxel of a random foreground class present in
the case, so that a small structure (a lesion, the ventricles) is seen in every few batches; the
rest lie anywhere in the volume, uniformly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["RandPatch", "check_patch_size"]


def check_patch_size(patch_size: Sequence[int], volume_size: Sequence[int]) -> tuple[int, int, int]:
    """``patch_size`` as three ints, each in ``[1, volume size]``; ValueError naming both otherwise."""
    patch = tuple(int(p) for p in patch_size)
    if len(patch) != 3 or any(p < 1 for p in patch):
        raise ValueError(f"patch_size must be three positive sizes (D, H, W), got {list(patch_size)}")
    volume = tuple(int(s) for s in volume_size)
    if len(volume) != 3 or any(p > s for p, s in zip(patch, volume)):
        raise ValueError(f"patch_size {list(patch)} does not fit in volumes of {list(volume)} voxels along every axis")
    return (patch[0], patch[1], patch[2])


class RandPatch:
    """Random ``size`` windows of ``(C, D, H, W)`` images with their ``(1, D, H, W)`` labels, seeded.

    ``foreground_fraction`` of the draws centre the window on a voxel of a foreground class (each
    class present in the label equally likely, then each of its voxels); the rest are uniform.
    A case without foreground always gets a uniform window.
    """

    def __init__(self, size: Sequence[int], *, foreground_fraction: float = 1.0 / 3.0, seed: int = 0) -> None:
        self.size = check_patch_size(size, size)
        if not 0.0 <= foreground_fraction <= 1.0:
            raise ValueError(f"foreground_fraction must be in [0, 1], got {foreground_fraction}")
        self.foreground_fraction = float(foreground_fraction)
        self.rng = np.random.default_rng(seed)

    def set_random_state(self, seed: int | None = None) -> "RandPatch":
        self.rng = np.random.default_rng(seed)
        return self

    def corner(self, label: np.ndarray) -> tuple[int, int, int]:
        """The window's first voxel for a ``(D, H, W)`` label map (the window lies inside it)."""
        shape = label.shape
        check_patch_size(self.size, shape)
        room = [s - p for s, p in zip(shape, self.size)]
        if self.rng.random() < self.foreground_fraction:
            classes = np.unique(label)
            classes = classes[classes > 0]
            if classes.size:
                voxels = np.argwhere(label == self.rng.choice(classes))
                centre = voxels[self.rng.integers(len(voxels))]
                return tuple(int(np.clip(c - p // 2, 0, r)) for c, p, r in zip(centre, self.size, room))  # type: ignore[return-value]
        return tuple(int(self.rng.integers(r + 1)) for r in room)  # type: ignore[return-value]

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if image.dim() != 4 or label.dim() != 4 or tuple(image.shape[1:]) != tuple(label.shape[1:]):
            raise ValueError(f"RandPatch takes a (C, D, H, W) image and its (1, D, H, W) label, got shapes "
                             f"{tuple(image.shape)} and {tuple(label.shape)}")
        start = self.corner(label[0].numpy())
        window = (slice(None),) + tuple(slice(s, s + p) for s, p in zip(start, self.size))
        return image[window], label[window]
