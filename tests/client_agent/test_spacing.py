"""Spacing-aware geometry: scans of any orientation, spacing and field of view onto a model grid and back."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from client_agent.spacing import from_model_grid, load_scan, to_model_grid, zscore_nonzero


def _phantom(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Nested ellipsoids in world mm (radii 40/28/16 mm): labels 1, 2, 3 from outside in; affine RAS."""
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -np.asarray(spacing) * (np.asarray(shape) - 1) / 2.0
    ijk = np.indices(shape).reshape(3, -1).astype(np.float64)
    xyz = (affine[:3, :3] @ ijk + affine[:3, 3:]).reshape(3, *shape)
    r = np.sqrt((xyz[0] / 1.0) ** 2 + (xyz[1] / 1.2) ** 2 + (xyz[2] / 0.9) ** 2)
    label = np.select([r < 16, r < 28, r < 40], [3, 2, 1], 0).astype(np.uint8)
    return label, affine


def _round_trip(label: np.ndarray, affine: np.ndarray, spacing_mm: float, size: int) -> np.ndarray:
    onehot = np.stack([(label == k).astype(np.float32) for k in range(4)])
    on_grid = []
    grid = None
    for k in range(4):
        resampled, grid = to_model_grid(onehot[k], affine, spacing_mm=spacing_mm, size=size,
                                        centre_mm=(0.0, 0.0, 0.0))
        on_grid.append(resampled)
    probs = np.stack(on_grid)
    probs[0] = np.maximum(probs[0], 1.0 - probs[1:].sum(axis=0))
    assert grid is not None
    return from_model_grid(probs, grid, shape=label.shape, affine=affine)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float(np.logical_and(a, b).sum()) / float(a.sum() + b.sum())


def _flip_to_lps(label: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same object stored left-to-right and posterior-to-anterior (LPS), world unchanged."""
    flipped = label[::-1, ::-1, :].copy()
    n = np.asarray(label.shape)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = n[:2] - 1
    return flipped, affine @ flip


def _oblique(affine: np.ndarray, degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    return rot @ affine


@pytest.mark.parametrize("case", ["ras", "lps", "oblique", "anisotropic_1x1x4"])
def test_a_mask_comes_back_on_the_input_grid_whatever_its_orientation_and_spacing(case: str) -> None:
    spacing = (1.0, 1.0, 4.0) if case == "anisotropic_1x1x4" else (2.0, 2.0, 2.0)
    shape = (96, 96, 24) if case == "anisotropic_1x1x4" else (48, 48, 48)
    label, affine = _phantom(shape, spacing)
    if case == "lps":
        label, affine = _flip_to_lps(label, affine)
    if case == "oblique":
        affine = _oblique(affine, 25.0)  # same voxels, rotated in the world: the object rotates with them

    back = _round_trip(label, affine, spacing_mm=3.0, size=32)

    assert back.shape == label.shape and back.dtype == np.uint8
    for k in (1, 2, 3):
        assert _dice(back == k, label == k) > 0.85, k


def test_a_field_of_view_larger_than_the_box_is_cropped_and_a_smaller_one_padded() -> None:
    label, affine = _phantom((40, 40, 40), (3.0, 3.0, 3.0))  # 120 mm: larger than 16 voxels x 4 mm = 64 mm
    back = _round_trip(label, affine, spacing_mm=4.0, size=16)
    # The box keeps the centre (labels 2, 3 fit in 64 mm), what lies outside it is background.
    assert _dice(back == 3, label == 3) > 0.8
    assert back[0, 0, 0] == 0 and back[0, 20, 20] == 0
    small, small_affine = _phantom((12, 12, 12), (8.0, 8.0, 8.0))
    image, grid = to_model_grid(small.astype(np.float32), small_affine, spacing_mm=2.0, size=64)
    assert image.shape == (64, 64, 64) and grid.shape == (64, 64, 64)
    assert image[0, 0, 0] == 0.0 and image[32, 32, 32] == 3.0


def test_zscore_over_nonzero_keeps_zeros() -> None:
    image = np.array([0.0, 1.0, 3.0, 0.0], dtype=np.float32)
    out = zscore_nonzero(image)
    assert out.tolist() == [0.0, -1.0, 1.0, 0.0]


def _save(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


@pytest.mark.parametrize("data, message", [
    (np.zeros((8, 8, 8), np.float32), "constant"),
    (np.full((8, 8, 8), 7.0, np.float32), "constant"),
    (np.random.default_rng(0).random((8, 8, 8, 2)).astype(np.float32), "4D image with 2 volumes"),
    (np.random.default_rng(0).random((8, 8, 1)).astype(np.float32), "not a volume"),
])
def test_scans_that_cannot_be_segmented_are_refused_naming_the_file(tmp_path: Path, data: np.ndarray,
                                                                   message: str) -> None:
    path = _save(tmp_path / "bad.nii.gz", data)
    with pytest.raises(ValueError, match=message) as info:
        load_scan(path)
    assert str(path) in str(info.value)


def test_nan_voxels_are_refused_naming_the_file(tmp_path: Path) -> None:
    data = np.random.default_rng(0).random((8, 8, 8)).astype(np.float32)
    data[1, 2, 3] = np.nan
    path = _save(tmp_path / "nan.nii.gz", data)
    with pytest.raises(ValueError, match=f"{path}: 1 voxels are NaN"):
        load_scan(path)


def test_a_4d_file_with_one_volume_is_a_3d_scan(tmp_path: Path) -> None:
    data = np.random.default_rng(1).random((8, 9, 10, 1)).astype(np.float32)
    image, affine = load_scan(_save(tmp_path / "one.nii.gz", data))
    assert image.shape == (8, 9, 10) and affine.shape == (4, 4)
