"""Reorientation to canonical (RAS+) voxel order and back: ``to_canonical`` / ``from_canonical``."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from client_agent.data import from_canonical, load_image, load_label, to_canonical


def _rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def _affine(linear: np.ndarray, origin: tuple[float, float, float] = (-40.0, 12.5, 7.0)) -> np.ndarray:
    a = np.eye(4)
    a[:3, :3] = linear
    a[:3, 3] = origin
    return a


AFFINES = {
    "RAS": _affine(np.diag([1.0, 1.5, 2.0])),
    "LPS": _affine(np.diag([-1.0, -1.5, 2.0])),  # DICOM's order, as ITK writes it
    "LAS": _affine(np.diag([-2.0, 1.0, 1.0])),  # FSL's radiological order
    "PIR (permuted)": _affine(np.array([[0.0, 0.0, 1.2], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])),
    "oblique": _affine(_rotation(0, 20.0) @ _rotation(2, -35.0) @ np.diag([-1.1, 0.9, 2.5])),
}


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_from_canonical_undoes_to_canonical(name: str) -> None:
    affine = AFFINES[name]
    volume = np.random.default_rng(0).integers(0, 255, size=(5, 6, 7)).astype(np.int16)

    canonical, canonical_affine = to_canonical(volume, affine)
    back = from_canonical(canonical, affine)

    np.testing.assert_array_equal(back, volume)
    assert back.flags["C_CONTIGUOUS"]
    assert nib.aff2axcodes(canonical_affine) == ("R", "A", "S")


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_every_voxel_keeps_its_place_in_the_world(name: str) -> None:
    affine = AFFINES[name]
    shape = (5, 6, 7)
    index = np.arange(np.prod(shape)).reshape(shape)  # each voxel carries its own original index

    canonical, canonical_affine = to_canonical(index, affine)

    last = tuple(n - 1 for n in canonical.shape)  # a permuted order permutes the shape too
    for ijk in [(0, 0, 0), last, (1, 2, 3)]:
        original = np.unravel_index(int(canonical[ijk]), shape)
        world_here = canonical_affine @ np.array([*ijk, 1.0])
        world_there = affine @ np.array([*original, 1.0])
        np.testing.assert_allclose(world_here, world_there, atol=1e-9)


def test_channels_after_the_three_spatial_axes_ride_along() -> None:
    affine = AFFINES["LPS"]
    image = np.random.default_rng(1).normal(size=(4, 5, 6, 3)).astype(np.float32)

    canonical, _ = to_canonical(image, affine)

    assert canonical.shape == (4, 5, 6, 3)
    np.testing.assert_array_equal(from_canonical(canonical, affine), image)


@pytest.mark.parametrize("name", ["LPS", "oblique"])
def test_a_file_read_canonically_goes_back_to_its_stored_order(tmp_path: Path, name: str) -> None:
    affine = AFFINES[name]
    label = np.random.default_rng(2).integers(0, 4, size=(6, 5, 4)).astype(np.uint8)
    path = tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image(label, affine), str(path))
    nib.save(nib.Nifti1Image(label.astype(np.float32), affine), str(tmp_path / "image.nii.gz"))

    read, read_affine = load_label(path, canonical=True)
    image, image_affine, _ = load_image(tmp_path / "image.nii.gz", canonical=True)

    np.testing.assert_array_equal(from_canonical(read, affine), label)
    np.testing.assert_array_equal(from_canonical(image[0], affine), label.astype(np.float32))
    np.testing.assert_allclose(read_affine, image_affine)
