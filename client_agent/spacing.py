"""Spacing-aware geometry: a scan of any orientation and voxel size onto a model's grid and back.

A model trained at a voxel spacing ``s`` (mm) on ``size``-voxel boxes sees anatomy at that scale.
Resizing a whole scan to ``size`` voxels (the ``resize`` mode) changes the scale with the scan's
field of view; here every scan is instead *resampled in world space* onto an axis-aligned RAS grid
of spacing ``s``, which undoes any orientation (LPS, oblique affines) and any anisotropy (1x1x4 mm)
at once, then cropped or zero-padded to the box around the scan's foreground centre. The model's
class probabilities are mapped back to every voxel of the input (trilinear, then argmax), so the
mask lies on the input's own grid and affine.

Pairs: :func:`to_model_grid` / :func:`from_model_grid`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

__all__ = ["ModelGrid", "load_scan", "to_model_grid", "from_model_grid", "zscore_nonzero"]


@dataclass(frozen=True)
class ModelGrid:
    """Where a scan sits on the model's grid.

    Attributes:
        affine: ``(4, 4)`` voxel-to-world affine of the ``size``^3 box (RAS, spacing on the diagonal).
        shape: the box's shape.
    """

    affine: np.ndarray
    shape: tuple[int, int, int]


def load_scan(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a 3D scan (or a 4D one with a single volume) as float32 with its affine.

    Raises ``ValueError`` naming the file for what cannot be segmented: more than one volume,
    non-finite values or affine, an empty (all zero) or constant image.
    """
    import nibabel as nib

    path = Path(path)
    try:
        img: Any = nib.load(str(path))  # nibabel types it as the base class; a NIfTI image has dataobj/affine
    except Exception as exc:  # nibabel raises several types for unreadable files
        raise ValueError(f"{path}: not a readable NIfTI image ({exc})") from exc
    data = np.asanyarray(img.dataobj)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 4:
        raise ValueError(f"{path}: a 4D image with {data.shape[3]} volumes; give one volume (e.g. fslroi or "
                         f"nibabel.funcs.four_to_three) - this model takes one channel")
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3D image, got shape {data.shape}")
    if min(data.shape) < 2:
        raise ValueError(f"{path}: a {data.shape} image is not a volume")
    data = np.asarray(data, dtype=np.float32)
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise ValueError(f"{path}: its affine is singular or not finite:\n{affine}")
    if not np.all(np.isfinite(data)):
        raise ValueError(f"{path}: {int((~np.isfinite(data)).sum())} voxels are NaN or infinite")
    low, high = float(data.min()), float(data.max())
    if low == high:
        raise ValueError(f"{path}: the image is constant ({low:g} everywhere); there is nothing to segment")
    return data, affine


def zscore_nonzero(image: np.ndarray) -> np.ndarray:
    """Z-score over the nonzero voxels of a 3D image (zeros stay 0): the sites' ``normalize = "nonzero"``."""
    from client_agent.data.preprocess import normalize_image

    return normalize_image(np.asarray(image, dtype=np.float32)[None], "nonzero")[0]


def _world_bounds(shape: Sequence[int], affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    corners = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1)
                        for k in (0, shape[2] - 1)]).T
    world = (affine @ corners)[:3]
    return world.min(axis=1), world.max(axis=1)


def to_model_grid(image: np.ndarray, affine: np.ndarray, *, spacing_mm: float | Sequence[float],
                  size: int | Sequence[int], centre_mm: Sequence[float] | None = None) -> tuple[np.ndarray, ModelGrid]:
    """Resample ``image`` (trilinear, 0 outside) onto the RAS box of ``size`` voxels at ``spacing_mm``.

    The box is centred on ``centre_mm`` (world mm), by default on the intensity-weighted centre
    of the scan's nonzero voxels (the brain in a skull-stripped scan); parts of the scan outside
    the box are cropped, parts of the box outside the scan are 0.
    """
    spacing = np.broadcast_to(np.asarray(spacing_mm, dtype=np.float64), (3,)).copy()
    shape = tuple(int(s) for s in np.broadcast_to(np.asarray(size), (3,)))
    if np.any(spacing <= 0) or min(shape) < 1:
        raise ValueError(f"spacing_mm must be > 0 and size >= 1, got {spacing_mm!r}, {size!r}")
    if centre_mm is None:
        weights = np.abs(image)
        if float(weights.sum()) == 0:
            centre_vox = (np.asarray(image.shape) - 1) / 2.0
        else:
            centre_vox = np.asarray(ndimage.center_of_mass(weights))
        centre = affine[:3, :3] @ centre_vox + affine[:3, 3]
    else:
        centre = np.asarray(centre_mm, dtype=np.float64)
    grid_affine = np.diag([*spacing, 1.0])
    grid_affine[:3, 3] = centre - spacing * (np.asarray(shape) - 1) / 2.0
    # Model voxel -> input voxel: inv(input affine) @ grid affine.
    to_input = np.linalg.inv(affine) @ grid_affine
    resampled = ndimage.affine_transform(image.astype(np.float32), to_input[:3, :3], offset=to_input[:3, 3],
                                         output_shape=shape, order=1, mode="constant", cval=0.0)
    return resampled.astype(np.float32), ModelGrid(affine=grid_affine, shape=(shape[0], shape[1], shape[2]))


def from_model_grid(probs: np.ndarray, grid: ModelGrid, *, shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
    """Class probabilities ``(K, *grid.shape)`` -> a ``uint8`` class map on the input grid ``(shape, affine)``.

    Each class's probability is interpolated trilinearly at every input voxel's world position,
    then the argmax is taken; input voxels outside the model's box are background (class 0).
    """
    if probs.ndim != 4 or tuple(probs.shape[1:]) != tuple(grid.shape):
        raise ValueError(f"probs must be (K, {grid.shape}), got {probs.shape}")
    to_grid = np.linalg.inv(grid.affine) @ affine
    out_shape = tuple(int(s) for s in shape)
    resampled = np.stack([
        ndimage.affine_transform(p.astype(np.float32), to_grid[:3, :3], offset=to_grid[:3, 3], output_shape=out_shape,
                                 order=1, mode="constant", cval=1.0 if k == 0 else 0.0)
        for k, p in enumerate(probs)
    ])
    return np.argmax(resampled, axis=0).astype(np.uint8)
