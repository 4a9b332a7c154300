"""Reading NIfTI images and labels, and the reorientation to canonical (RAS+) voxel order and back."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from client_agent.data.errors import DataError

logger = logging.getLogger(__name__)


def _spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    # The affine's column norms, not header zooms: they stay right after reorientation.
    s = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    return (float(s[0]), float(s[1]), float(s[2]))


def _squeeze_5d(shape: tuple[int, ...]) -> tuple[int, ...]:
    # ITK writes vector images as (X, Y, Z, 1, C).
    if len(shape) == 5 and shape[3] == 1:
        return shape[:3] + shape[4:]
    return shape


def to_canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorient the first three axes of ``array`` to RAS+ voxel order; returns the array and its affine.

    :func:`from_canonical` is its inverse. Only axis permutations and flips are applied (the
    closest canonical order), never a resampling, so an oblique scan keeps its voxels.
    """
    current = nib.orientations.io_orientation(affine)
    target = nib.orientations.axcodes2ornt(("R", "A", "S"))
    transform = nib.orientations.ornt_transform(current, target)
    if np.array_equal(transform, [[0, 1], [1, 1], [2, 1]]):
        return array, affine
    out = nib.orientations.apply_orientation(array, transform)
    new_affine = affine @ nib.orientations.inv_ornt_aff(transform, array.shape[:3])
    return np.ascontiguousarray(out), new_affine


def from_canonical(array: np.ndarray, original_affine: np.ndarray) -> np.ndarray:
    """Undo :func:`to_canonical`: RAS+ voxel order -> the voxel order of the file whose affine is ``original_affine``."""
    current = nib.orientations.io_orientation(original_affine)
    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(("R", "A", "S")), current)
    return np.ascontiguousarray(nib.orientations.apply_orientation(array, back))


def _load_nifti(path: Path) -> Any:  # nibabel's image classes are untyped
    if not Path(path).is_file():
        raise DataError(f"{path}: file not found")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for a damaged file
        raise DataError(f"{path}: not a readable NIfTI file ({type(exc).__name__}: {exc})") from exc
    return img


def _read_data(img: Any, path: Path, dtype: type | None = None) -> np.ndarray:
    try:
        if dtype is None:
            return np.asanyarray(img.dataobj)
        return np.asarray(img.get_fdata(dtype=dtype))
    except Exception as exc:  # truncated gzip, short file, …
        raise DataError(f"{path}: voxel data unreadable ({type(exc).__name__}: {exc})") from exc


def load_image(
    paths: Path | str | Sequence[Path | str], *, canonical: bool = True
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Read one image as ``(C, D, H, W)`` float32 with its affine and spacing (mm per voxel).

    ``paths`` is one file (3D, or 4D with channels last) or one 3D file per modality in channel
    order. With ``canonical`` the voxel axes are reoriented to RAS+ and the returned affine is the
    returned array's, so writing a prediction with it puts it in the right place. Non-finite
    voxels become 0 (with a warning): one NaN would otherwise turn the z-score into NaN.
    """
    files = [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(p) for p in paths]
    if not files:
        raise DataError("load_image needs at least one image file")
    channels: list[np.ndarray] = []
    affine0: np.ndarray | None = None
    for path in files:
        img = _load_nifti(path)
        data = _read_data(img, path, np.float32)
        data = data.reshape(_squeeze_5d(data.shape))
        if data.ndim == 3:
            data = data[..., None]
        if data.ndim != 4 or (len(files) > 1 and data.shape[3] != 1):
            raise DataError(
                f"{path}: expected a 3D volume{'' if len(files) > 1 else ' or a 4D volume with channels last'}, "
                f"got shape {data.shape}"
            )
        if affine0 is None:
            affine0 = np.asarray(img.affine, dtype=np.float64)
        elif channels and data.shape[:3] != channels[0].shape[:3]:
            raise DataError(f"{path}: shape {data.shape[:3]} differs from {files[0]} {channels[0].shape[:3]}")
        channels.append(data)
    assert affine0 is not None
    stacked = np.concatenate(channels, axis=3)
    if not np.all(np.isfinite(stacked)):
        logger.warning("%s: %d non-finite voxels set to 0", files[0], int((~np.isfinite(stacked)).sum()))
        stacked = np.nan_to_num(stacked, nan=0.0, posinf=0.0, neginf=0.0)
    affine = affine0
    if canonical:
        stacked, affine = to_canonical(stacked, affine0)
    return np.ascontiguousarray(np.moveaxis(stacked, 3, 0), dtype=np.float32), affine, _spacing_of(affine)


def load_label(path: Path | str, *, canonical: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Read a label volume as ``(D, H, W)`` int64 raw values, with its affine.

    Raises :class:`DataError` for a non-3D label or non-integer values.
    """
    path = Path(path)
    img = _load_nifti(path)
    data = np.asarray(_read_data(img, path))
    data = _label_as_3d(data, path)
    data = _label_as_int(data, path)
    affine = np.asarray(img.affine, dtype=np.float64)
    if canonical:
        data, affine = to_canonical(data, affine)
    return data, affine


def _label_as_3d(data: np.ndarray, path: Path) -> np.ndarray:
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{path}: a label must be a 3D volume of class values, got shape {data.shape}")
    return data


def _label_as_int(data: np.ndarray, path: Path) -> np.ndarray:
    if np.issubdtype(data.dtype, np.integer) or data.dtype == bool:
        return data.astype(np.int64, copy=False)
    if not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
        raise DataError(f"{path}: label holds non-integer values; expected integer class values")
    return data.astype(np.int64)
