"""One case -> one fixed-grid volume: reorient, remap labels, z-score, resize.

Preprocessing (the paper's): every volume is reoriented to the closest canonical (RAS+) voxel
order so that sites storing LPS or RAS agree, z-scored per channel (over the nonzero voxels by
default — right for skull-stripped MR; ``normalize="volume"`` for CT), then resized to a fixed grid
(default 128³) with MONAI ``Resize``: trilinear for images, ``nearest-exact`` for labels (the
half-voxel-centred nearest, which lines labels up with the trilinear image; torch's legacy
``nearest`` shifts them by up to half a voxel). Z-scoring happens before resizing so the nonzero
mask is the exact one of the acquisition, as nnU-Net does. The spacing reported with each
volume is the physical extent divided by the grid, i.e. mm per voxel after resizing.

**Spacing-aware** (``PreprocessConfig.spacing_mm > 0``, what a federation's ``[model]
spacing_mm`` asks of its sites): every case is instead resampled *in world space* to that
isotropic spacing (trilinear images, nearest labels), any orientation and voxel size, and
cropped/zero-padded to ``spatial_size`` around its foreground, by
:func:`client_agent.spacing.image_on_grid` / :func:`~client_agent.spacing.labels_on_grid`: the
same function ``fedseg segment`` uses on a scan, so a model sees its training cases and the
scans it is used on at the same scale, whatever the scanner wrote.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from client_agent.data.discover import Case
from client_agent.data.errors import DataError
from client_agent.data.labels import remap_labels
from client_agent.data.nifti import load_image, load_label

NORMALIZE_MODES = ("nonzero", "volume")  # z-score over the nonzero voxels (MR) or the whole volume (CT)


@dataclass(frozen=True)
class PreprocessConfig:
    """How a case becomes a fixed-grid volume; part of the cache key.

    ``spatial_size``: the grid (D, H, W) every volume is resized to. ``normalize``: z-score per
    channel over the ``"nonzero"`` voxels (MR; zeros stay 0) or the whole ``"volume"`` (CT).
    ``canonical``: reorient to RAS+ before anything else.
    """

    spatial_size: tuple[int, int, int] = (128, 128, 128)
    normalize: Literal["nonzero", "volume"] = "nonzero"
    canonical: bool = True
    spacing_mm: float = 0.0  # > 0: resample to this isotropic spacing, then crop/pad; 0: resize whole volumes

    def __post_init__(self) -> None:
        if isinstance(self.spacing_mm, bool) or not isinstance(self.spacing_mm, (int, float)) \
                or not 0.0 <= float(self.spacing_mm) < 100.0:
            raise ValueError(f"spacing_mm must be a number of mm in [0, 100) (0: resize whole volumes), "
                             f"got {self.spacing_mm!r}")
        object.__setattr__(self, "spacing_mm", float(self.spacing_mm))
        size = tuple(int(s) for s in self.spatial_size)
        if len(size) != 3 or min(size) < 1:
            raise ValueError(f"spatial_size must be three positive ints (D, H, W), got {self.spatial_size}")
        object.__setattr__(self, "spatial_size", size)
        if self.normalize not in NORMALIZE_MODES:
            raise ValueError(f"normalize must be 'nonzero' or 'volume', got {self.normalize!r}")


def normalize_image(image: np.ndarray, normalize: str) -> np.ndarray:
    """Z-score per channel of ``(C, ...)``: over the nonzero voxels (``"nonzero"``) or the whole volume.

    The one normalization of the project: the sites' pipeline and inference on a scan of any
    spacing both call it, so a model sees the same intensities in training and in use."""
    from monai.transforms import NormalizeIntensity

    # A copy: MONAI normalizes a tensor in place, and torch.from_numpy shares the caller's array.
    source = torch.from_numpy(np.array(image, dtype=np.float32))
    normalized = NormalizeIntensity(nonzero=normalize == "nonzero", channel_wise=True)(source)
    return _to_numpy(normalized).astype(np.float32, copy=False)


def preprocess_image(image: np.ndarray, *, config: PreprocessConfig) -> np.ndarray:
    """Z-score per channel, then resize trilinearly: ``(C, D0, H0, W0)`` -> ``(C, *spatial_size)`` float32."""
    from monai.transforms import Resize

    normalized = normalize_image(image, config.normalize)
    resized = Resize(config.spatial_size, mode="trilinear")(torch.from_numpy(normalized))
    return _to_numpy(resized).astype(np.float32, copy=False)


def resize_labels(label: np.ndarray, spatial_size: Sequence[int]) -> np.ndarray:
    """Resize a ``(D0, H0, W0)`` integer label to ``spatial_size`` by nearest neighbour; keeps the dtype.

    Used both ways: to the training grid, and back to a scan's own grid for ``fedseg segment``.
    """
    from monai.transforms import Resize

    resized = Resize(tuple(int(s) for s in spatial_size), mode="nearest-exact")(torch.from_numpy(label[None].astype(np.float32)))
    return np.rint(_to_numpy(resized)[0]).astype(label.dtype, copy=False)


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy() if not hasattr(x, "as_tensor") else x.as_tensor().detach().cpu().numpy()
    return np.asarray(x)


@dataclass(frozen=True)
class Volume:
    """A preprocessed case: ``image`` (C, D, H, W) float32, ``label`` (D, H, W) uint8/int16, ``spacing`` mm/voxel."""

    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]


def preprocess_case(
    case: Case, *, config: PreprocessConfig, label_map: Mapping[int, int] | None = None, num_classes: int | None = None
) -> Volume:
    """Load, reorient, remap, z-score and resize one case onto the fixed grid."""
    image, affine, spacing = load_image(case.image_paths, canonical=config.canonical)
    label, label_affine = load_label(case.label_path, canonical=config.canonical)
    if label.shape != image.shape[1:]:
        raise DataError(f"{case.label_path}: label shape {label.shape} differs from image shape {image.shape[1:]}")
    label = remap_labels(label, label_map)
    if num_classes is not None and (label.min() < 0 or label.max() >= num_classes):
        raise DataError(f"{case.label_path}: label values outside [0, {num_classes}) after remapping")
    if config.spacing_mm > 0:
        return _resample_case(image, affine, label, label_affine, config, case)
    original_shape = image.shape[1:]
    image = preprocess_image(image, config=config)
    label_dtype = np.uint8 if label.max() < 256 and label.min() >= 0 else np.int16
    label = resize_labels(label.astype(label_dtype), config.spatial_size)
    # Resize keeps the physical extent (align_corners=False), so spacing scales by the shape ratio.
    new_spacing = tuple(float(s * n / m) for s, n, m in zip(spacing, original_shape, config.spatial_size))
    return Volume(image=image, label=label, spacing=(new_spacing[0], new_spacing[1], new_spacing[2]))


def _resample_case(image: np.ndarray, affine: np.ndarray, label: np.ndarray, label_affine: np.ndarray,
                   config: PreprocessConfig, case: Case) -> Volume:
    """The spacing-aware path: world-space resampling of image and label onto one box (module docstring)."""
    from client_agent.spacing import image_on_grid, labels_on_grid

    if not np.allclose(affine, label_affine, atol=1e-3):
        raise DataError(f"{case.label_path}: its affine differs from the image's ({case.image_paths[0]}); "
                        f"label and image must lie on the same voxel grid")
    grid_image, grid = image_on_grid(image, affine, spacing_mm=config.spacing_mm, size=config.spatial_size,
                                     normalize=config.normalize)
    label_dtype = np.uint8 if label.max() < 256 and label.min() >= 0 else np.int16
    grid_label = labels_on_grid(label.astype(label_dtype), label_affine, grid)
    s = config.spacing_mm
    return Volume(image=grid_image, label=grid_label, spacing=(s, s, s))
