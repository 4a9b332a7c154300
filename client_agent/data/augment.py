"""On-the-fly training augmentation (seeded MONAI random transforms)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class AugmentConfig:
    """On-the-fly training augmentation (MONAI random transforms).

    Rotation, translation and scaling are one ``RandAffined`` so a volume is interpolated once,
    not three times. Elastic deformation is rare by default: it costs seconds per 128³ volume on
    a CPU. Images use trilinear interpolation, labels nearest; voxels moved in from outside are 0
    (background).
    """

    rotate_degrees: float = 30.0
    translate_fraction: float = 0.1  # of the grid size, per axis
    scale_fraction: float = 0.1  # zoom in [1 - s, 1 + s]
    affine_prob: float = 0.5
    elastic_prob: float = 0.1
    elastic_sigma: tuple[float, float] = (5.0, 8.0)
    elastic_magnitude: tuple[float, float] = (50.0, 150.0)
    flip_prob: float = 0.5  # per spatial axis
    intensity_prob: float = 0.3
    intensity_scale: float = 0.1
    intensity_shift: float = 0.1
    noise_prob: float = 0.1
    noise_std: float = 0.05

    def __post_init__(self) -> None:
        for name in ("affine_prob", "elastic_prob", "flip_prob", "intensity_prob", "noise_prob"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if not 0.0 <= self.rotate_degrees <= 180.0:
            raise ValueError(f"rotate_degrees must be in [0, 180], got {self.rotate_degrees}")


def build_augmentation(config: AugmentConfig, *, spatial_size: Sequence[int], seed: int) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """The MONAI ``Compose`` of random transforms on ``{"image": (C,D,H,W), "label": (1,D,H,W)}``, seeded."""
    from monai.transforms import (
        Compose,
        Rand3DElasticd,
        RandAffined,
        RandFlipd,
        RandGaussianNoised,
        RandScaleIntensityd,
        RandShiftIntensityd,
    )

    keys = ("image", "label")
    modes = ("bilinear", "nearest")
    angle = math.radians(config.rotate_degrees)
    transforms: list[Any] = [
        RandAffined(
            keys,
            prob=config.affine_prob,
            rotate_range=(angle, angle, angle),
            translate_range=tuple(config.translate_fraction * s for s in spatial_size),
            scale_range=(config.scale_fraction,) * 3,
            mode=modes,
            padding_mode="zeros",
        ),
        Rand3DElasticd(
            keys,
            sigma_range=config.elastic_sigma,
            magnitude_range=config.elastic_magnitude,
            prob=config.elastic_prob,
            mode=modes,
            padding_mode="zeros",
        ),
        *(RandFlipd(keys, prob=config.flip_prob, spatial_axis=axis) for axis in range(3)),
        RandScaleIntensityd("image", factors=config.intensity_scale, prob=config.intensity_prob),
        RandShiftIntensityd("image", offsets=config.intensity_shift, prob=config.intensity_prob),
        RandGaussianNoised("image", std=config.noise_std, prob=config.noise_prob),
    ]
    compose = Compose(transforms)
    compose.set_random_state(seed=seed % (2**32))
    return compose
