"""On-the-fly training augmentation (seeded MONAI random transforms).

Three recipes, chosen by name (:data:`AUGMENTATIONS`, the federation's ``[training] augmentation``):

* ``"standard"``: rotation, translation, scaling, rare elastic deformation, flips along every axis,
  small intensity scale/shift and noise (the usual nnU-Net/MONAI set).
* ``"synthseg"``: for a model that must hold on scanners and contrasts no site has. Every draw
  gives the case a new contrast from its own labels (:class:`RandTissueContrastd`, after SynthSeg,
  Billot et al., Medical Image Analysis 2023), a smooth bias field, gamma and noise; geometry as in
  ``"standard"`` but flipped only left-right, because a head scan is never upside down or
  back to front once it is in RAS orientation, while a left-right mirror is still a brain.
* ``"contrast"``: only ``"synthseg"``'s contrast stage, on half of the draws, with no geometry:
  for sites whose cases already differ in shape and pose but share one contrast per site.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from protos.fedsegnet.v1.training_options import AUGMENTATIONS


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
    flip_axes: tuple[int, ...] = (0, 1, 2)  # spatial axes (RAS after preprocessing: 0 is left-right)
    contrast_prob: float = 0.0  # RandTissueContrastd: a new contrast drawn from the labels

    def __post_init__(self) -> None:
        if not set(self.flip_axes) <= {0, 1, 2}:
            raise ValueError(f"flip_axes must be spatial axes among 0, 1, 2, got {self.flip_axes}")
        for name in ("affine_prob", "elastic_prob", "flip_prob", "intensity_prob", "noise_prob", "contrast_prob"):
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
        *(RandFlipd(keys, prob=config.flip_prob, spatial_axis=axis) for axis in config.flip_axes),
    ]
    intensity: list[Any] = [
        RandScaleIntensityd("image", factors=config.intensity_scale, prob=config.intensity_prob),
        RandShiftIntensityd("image", offsets=config.intensity_shift, prob=config.intensity_prob),
        RandGaussianNoised("image", std=config.noise_std, prob=config.noise_prob),
    ]
    if config.contrast_prob == 0:
        compose = Compose(transforms + intensity)
        compose.set_random_state(seed=seed % (2**32))
        return compose
    staged = Stages([Compose(transforms), RandTissueContrastd(prob=config.contrast_prob), Compose(intensity)])
    return staged.set_random_state(seed=seed % (2**32))


class Stages:
    """Random stages applied in order, seeded together (``set_random_state`` gives each its own seed).

    MONAI's ``Compose`` seeds only MONAI ``Randomizable`` transforms; this keeps our own
    :class:`RandTissueContrastd` reproducible and reseedable per DataLoader worker as well.
    """

    def __init__(self, stages: Sequence[Any]) -> None:
        self.stages = list(stages)

    def set_random_state(self, seed: int | None = None) -> "Stages":
        rng = np.random.RandomState(seed)
        for stage in self.stages:
            stage.set_random_state(seed=int(rng.randint(2**31 - 1)))
        return self

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        for stage in self.stages:
            data = stage(data)
        return data


class RandTissueContrastd:
    """A new contrast for every draw, from the case's own labels (SynthSeg's idea on real data).

    SynthSeg draws each image from a label map with random per-label intensities, so a network
    cannot rely on any one contrast. A site has images *and* labels; this transform keeps the
    image's anatomy and partial volume and only remaps its intensities: the median intensity
    ``m_k`` of every labelled class ``k`` inside the (nonzero) foreground is sent to a new level
    ``u_k ~ U(0, 1)`` and every voxel is moved by the piecewise-linear map through those points
    (tissues within a tenth of the foreground's spread of each other share a point), so
    a voxel halfway between grey and white matter stays halfway between their new levels and any
    ordering of the tissues (T1-like, T2-like, flat) occurs. Then a smooth multiplicative bias
    field, a gamma and Gaussian noise; the foreground is z-scored again (the site pipeline z-scores
    before augmenting, and the model must see the same statistics as at inference) and the
    background stays exactly 0.

    Works on ``{"image": (C, D, H, W), "label": (1, D, H, W)}`` tensors, channel by channel.
    Seeded through :meth:`set_random_state`, like MONAI's random transforms.
    """

    def __init__(self, *, prob: float = 1.0, bias: float = 0.3, log_gamma: float = 0.3,
                 noise: float = 0.05, min_voxels: int = 8) -> None:
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {prob}")
        for name, value in (("bias", bias), ("log_gamma", log_gamma), ("noise", noise)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        self.prob, self.bias, self.log_gamma, self.noise, self.min_voxels = prob, bias, log_gamma, noise, min_voxels
        self.R = np.random.RandomState()

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> "RandTissueContrastd":
        self.R = state if state is not None else np.random.RandomState(seed)
        return self

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        if self.R.rand() >= self.prob:
            return data
        image = torch.as_tensor(data["image"])
        label = torch.as_tensor(data["label"])[0].round().long().cpu().numpy()
        out = image.clone()
        for channel in range(image.shape[0]):
            out[channel] = torch.from_numpy(self._remap(image[channel].detach().cpu().numpy().astype(np.float32), label))
        data = dict(data)
        data["image"] = out.to(image.dtype)
        return data

    def _remap(self, x: np.ndarray, label: np.ndarray) -> np.ndarray:
        inside = x != 0
        levels: list[float] = []
        for k in np.unique(label[inside]):
            voxels = x[inside & (label == k)]
            if k > 0 and voxels.size >= self.min_voxels:
                levels.append(float(np.median(voxels)))
        if len(levels) < 2:
            return x  # one tissue or none: no contrast to redraw
        # Tissues whose levels nearly coincide share one knot: a map through two close points
        # would be steep between them and blow their partial-volume voxels and noise up.
        min_gap = 0.1 * float(x[inside].std())
        knots_list: list[list[float]] = []
        for level in sorted(levels):
            if knots_list and level - knots_list[-1][-1] < min_gap:
                knots_list[-1].append(level)
            else:
                knots_list.append([level])
        if len(knots_list) < 2:
            return x
        knots = np.asarray([float(np.mean(group)) for group in knots_list])
        targets = self.R.uniform(0.0, 1.0, size=knots.size)
        y = np.interp(x[inside], knots, targets).astype(np.float32)
        field = _smooth_field(self.R, x.shape)[inside]
        y = y * np.exp(self.R.uniform(0.0, self.bias) * field)
        y = y + self.R.uniform(0.0, self.noise) * self.R.standard_normal(y.shape).astype(np.float32)
        low, high = float(y.min()), float(y.max())
        y = np.clip((y - low) / max(high - low, 1e-6), 0.0, 1.0) ** np.exp(self.R.uniform(-self.log_gamma, self.log_gamma))
        y = (y - y.mean()) / max(float(y.std()), 1e-6)
        out = np.zeros_like(x)
        out[inside] = y
        return out


def _smooth_field(rng: np.random.RandomState, shape: Sequence[int], knots: int = 4) -> np.ndarray:
    """A smooth field in [-1, 1]: random values on a ``knots``^3 grid, trilinearly upsampled."""
    coarse = torch.from_numpy(rng.uniform(-1.0, 1.0, size=(1, 1, knots, knots, knots)).astype(np.float32))
    field = torch.nn.functional.interpolate(coarse, size=tuple(int(s) for s in shape), mode="trilinear", align_corners=True)
    return field[0, 0].numpy()


def augmentation_recipe(name: str) -> AugmentConfig | None:
    """The :class:`AugmentConfig` a recipe name (one of :data:`AUGMENTATIONS`) stands for; ``None`` for ``"none"``."""
    if name not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {name!r}; choose one of {list(AUGMENTATIONS)}")
    return RECIPES[name]


# What each name of the wire's list (protos/fedsegnet/v1/training_options.py) runs.
RECIPES: dict[str, AugmentConfig | None] = {
    "standard": AugmentConfig(),
    # No elastic deformation: it costs more than the rest of a training step on a CPU; the contrast
    # stage draws its own noise, so MONAI's intensity and noise transforms are off.
    "synthseg": replace(AugmentConfig(), flip_axes=(0,), contrast_prob=0.9, rotate_degrees=20.0, elastic_prob=0.0,
                        intensity_prob=0.0, noise_prob=0.0),
    # Only the contrast stage, on half of the draws: for sites whose data already vary in geometry
    # (the randomized generator's) but each keep one contrast. Sites that each see one contrast
    # pull a shared model towards theirs and the global model swings between them round by round
    # (results/README.md, "Generalization, fifth pass"); a redrawn contrast on every other draw
    # gives each site's local objective the others' too, at the cost of one interpolation per draw.
    "contrast": replace(AugmentConfig(), affine_prob=0.0, elastic_prob=0.0, flip_prob=0.0, flip_axes=(),
                        intensity_prob=0.0, noise_prob=0.0, contrast_prob=0.5),
    "none": None,
}
