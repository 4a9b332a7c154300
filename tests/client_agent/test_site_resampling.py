"""Sites resample every case to the federation's spacing; training and inference see a scan alike."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from client_agent.data import discover_cases
from client_agent.data.preprocess import PreprocessConfig, preprocess_case
from client_agent.spacing import image_on_grid

RADII_MM = (40.0, 28.0, 16.0)  # labels 1, 2, 3 from outside in
INTENSITY = {1: 40.0, 2: 80.0, 3: 120.0}


def _phantom(shape: tuple[int, ...], spacing: tuple[float, float, float],
             affine: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nested spheres (world mm, centred at the origin): a label map and a skull-stripped image."""
    if affine is None:
        affine = np.diag([*spacing, 1.0])
        affine[:3, 3] = -np.asarray(spacing) * (np.asarray(shape) - 1) / 2.0
    ijk = np.indices(shape[:3]).reshape(3, -1).astype(np.float64)
    r = np.linalg.norm(affine[:3, :3] @ ijk + affine[:3, 3:], axis=0).reshape(shape[:3])
    label = np.select([r < RADII_MM[2], r < RADII_MM[1], r < RADII_MM[0]], [3, 2, 1], 0).astype(np.uint8)
    image = np.zeros(label.shape, np.float32)
    for k, value in INTENSITY.items():
        image[label == k] = value
    return label, image, affine


def _write_case(root: Path, image: np.ndarray, label: np.ndarray, affine: np.ndarray) -> Path:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    nib.save(nib.Nifti1Image(image, affine), str(root / "imagesTr" / "case.nii.gz"))
    nib.save(nib.Nifti1Image(label, affine), str(root / "labelsTr" / "case.nii.gz"))
    (root / "dataset.json").write_text(json.dumps({
        "modality": {"0": "T1"}, "labels": {"0": "background", "1": "CSF", "2": "GM", "3": "WM"},
        "training": [{"image": "./imagesTr/case.nii.gz", "label": "./labelsTr/case.nii.gz"}]}))
    return root


def _preprocess(root: Path, spacing_mm: float = 4.0, size: int = 24):
    (case,) = discover_cases(root)
    return preprocess_case(case, config=PreprocessConfig(spatial_size=(size,) * 3, spacing_mm=spacing_mm),
                           num_classes=4)


def _lps(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same voxels stored right-to-left and anterior-to-posterior; the world does not change."""
    n = np.asarray(array.shape[:3])
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = n[:2] - 1
    return np.ascontiguousarray(array[::-1, ::-1]), affine @ flip


def _oblique(affine: np.ndarray, degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    return rot @ affine


def test_the_partial_volume_rim_of_a_skull_stripped_scan_is_not_foreground_on_the_model_grid() -> None:
    """The cause of `fedseg segment --mode spacing` labelling ~5-20% too much brain on a real scan.

    Trilinear resampling of a 1 mm skull-stripped scan to 4 mm leaves faint nonzero values just
    outside the brain; z-scored over the nonzero voxels they became as dark as CSF, which a model
    trained on images that are exactly 0 outside the brain calls brain. The model's input must
    hold as many nonzero voxels as the brain covers, and none darker than its darkest tissue.
    """
    label, image, affine = _phantom((112, 112, 112), (1.0, 1.0, 1.0))
    grid_image, _ = image_on_grid(image, affine, spacing_mm=4.0, size=32)

    nonzero_mm3 = float((grid_image[0] != 0).sum()) * 4.0 ** 3
    sphere_mm3 = 4.0 / 3.0 * np.pi * RADII_MM[0] ** 3
    assert abs(nonzero_mm3 / sphere_mm3 - 1.0) < 0.04
    inside = grid_image[0][grid_image[0] != 0]
    darkest_tissue = inside.min()
    # Half-covered edge voxels are at least half as bright as the outer tissue: z-scored, nothing
    # far below the outer tissue's own value (which is the darkest class).
    outer_z = (INTENSITY[1] - image[label > 0].mean()) / image[label > 0].std()
    assert darkest_tissue > outer_z - 1.5


@pytest.mark.parametrize("storage", ["ras_2mm", "lps_2mm", "oblique_25deg", "anisotropic_1x1x4"])
def test_sites_resample_any_orientation_and_spacing_to_the_federation_grid(tmp_path: Path, storage: str) -> None:
    if storage == "anisotropic_1x1x4":
        label, image, affine = _phantom((96, 96, 24), (1.0, 1.0, 4.0))
    else:
        label, image, affine = _phantom((48, 48, 48), (2.0, 2.0, 2.0))
    if storage == "lps_2mm":
        label, affine_lps = _lps(label, affine)
        image, _ = _lps(image, affine)
        affine = affine_lps
    if storage == "oblique_25deg":
        label, image, affine = _phantom((48, 48, 48), (2.0, 2.0, 2.0), affine=_oblique(affine, 25.0))

    volume = _preprocess(_write_case(tmp_path / storage, image, label, affine))

    assert volume.image.shape == (1, 24, 24, 24) and volume.label.shape == (24, 24, 24)
    assert volume.spacing == (4.0, 4.0, 4.0)
    # The same spheres whatever the storage: each class's volume is the analytic one.
    shells = [RADII_MM[0] ** 3 - RADII_MM[1] ** 3, RADII_MM[1] ** 3 - RADII_MM[2] ** 3, RADII_MM[2] ** 3]
    for k, r3 in zip((1, 2, 3), shells):
        measured = float((volume.label == k).sum()) * 64.0
        assert abs(measured / (4.0 / 3.0 * np.pi * r3) - 1.0) < 0.2, (k, measured)
    # Image and label are resampled onto the same box: brighter class, brighter mean intensity.
    means = [float(volume.image[0][volume.label == k].mean()) for k in (1, 2, 3)]
    assert means[0] < means[1] < means[2]
    # Outside the spheres the image stays exactly 0 (up to the half-covered edge voxels).
    assert float(np.mean(volume.image[0][volume.label == 0] == 0)) > 0.97


def test_a_scan_stored_lps_gives_the_same_volume_as_stored_ras(tmp_path: Path) -> None:
    label, image, affine = _phantom((48, 48, 48), (2.0, 2.0, 2.0))
    ras = _preprocess(_write_case(tmp_path / "ras", image, label, affine))
    label_lps, affine_lps = _lps(label, affine)
    image_lps, _ = _lps(image, affine)
    lps = _preprocess(_write_case(tmp_path / "lps", image_lps, label_lps, affine_lps))

    assert np.array_equal(ras.label, lps.label)
    np.testing.assert_allclose(ras.image, lps.image, atol=1e-4)


def test_a_case_already_on_the_federation_grid_is_cropped_not_interpolated(tmp_path: Path) -> None:
    label, image, affine = _phantom((24, 24, 24), (4.0, 4.0, 4.0))
    volume = _preprocess(_write_case(tmp_path / "same", image, label, affine))
    assert np.array_equal(volume.label, label)  # centred phantom: the box is the scan itself


def test_a_two_channel_4d_case_keeps_its_channels(tmp_path: Path) -> None:
    label, image, affine = _phantom((48, 48, 48), (2.0, 2.0, 2.0))
    volume = _preprocess(_write_case(tmp_path / "4d", np.stack([image, 200.0 - image], axis=-1), label, affine))
    assert volume.image.shape == (2, 24, 24, 24)
    assert np.all(np.isfinite(volume.image))


@pytest.mark.parametrize("value", [0.0, 7.0])
def test_an_empty_or_constant_case_becomes_a_finite_volume_not_a_crash(tmp_path: Path, value: float) -> None:
    label, _, affine = _phantom((32, 32, 32), (3.0, 3.0, 3.0))
    volume = _preprocess(_write_case(tmp_path / f"c{value}", np.full(label.shape, value, np.float32), label, affine))
    assert volume.image.shape == (1, 24, 24, 24) and np.all(np.isfinite(volume.image))


def test_preprocess_config_refuses_a_bad_spacing() -> None:
    with pytest.raises(ValueError, match="spacing_mm must be a number of mm in \\[0, 100\\).*-1"):
        PreprocessConfig(spacing_mm=-1.0)


def test_the_federation_spacing_travels_to_sites_in_the_model_spec() -> None:
    from aggregator_service.config import parse_federation_config
    from aggregator_service.wire import training_config_to_proto

    config = parse_federation_config({"federation": {"id": "f", "rounds": 1, "min_clients": 1, "sites": ["a"]},
                                      "model": {"img_size": [24, 24, 24], "spacing_mm": 4.0}}, source="test")
    assert training_config_to_proto(config).model.spacing_mm == pytest.approx(4.0)
    unset = parse_federation_config({"federation": {"id": "f", "rounds": 1, "min_clients": 1, "sites": ["a"]}}, source="test")
    assert training_config_to_proto(unset).model.spacing_mm == 0.0
