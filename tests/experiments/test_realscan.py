"""Real-scan evaluation: the classical reference, scores, a real network's mask on the scan's own grid."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from experiments import realscan
from experiments.realscan import RealScan, reference_segmentation, score_segmentation, segment_scan


def _phantom_scan(shape: tuple[int, int, int] = (40, 40, 40)) -> tuple[np.ndarray, np.ndarray]:
    """Skull-stripped 'T1': nested shells WM (bright) / GM / CSF (dark), zero outside, a little noise."""
    ijk = np.indices(shape).astype(np.float64)
    centre = (np.asarray(shape) - 1)[:, None, None, None] / 2.0
    r = np.sqrt(((ijk - centre) ** 2).sum(axis=0))
    truth = np.select([r < 7, r < 11, r < 14], [3, 2, 1], 0).astype(np.uint8)
    means = np.array([0.0, 30.0, 70.0, 110.0])
    noise = np.random.default_rng(0).normal(0.0, 4.0, shape)
    image = np.where(truth > 0, means[truth] + noise, 0.0).astype(np.float32)
    return image, truth


def test_the_reference_recovers_three_intensity_classes_inside_the_mask() -> None:
    image, truth = _phantom_scan()
    reference = reference_segmentation(image)
    scores = score_segmentation(reference, truth)
    assert scores["brain"] == 1.0
    assert min(scores["CSF"], scores["GM"], scores["WM"]) > 0.97


def test_the_reference_refuses_a_scan_that_is_not_skull_stripped() -> None:
    image = np.random.default_rng(1).uniform(10, 100, (20, 20, 20)).astype(np.float32)
    with pytest.raises(ValueError, match="skull-stripped"):
        reference_segmentation(image, name="head.nii.gz")


def test_scores_are_dice_per_class_and_of_the_brain_mask() -> None:
    prediction = np.array([0, 1, 2, 3, 3, 0])
    reference = np.array([0, 1, 2, 2, 3, 3])
    scores = score_segmentation(prediction, reference)
    # brain: pred {1,2,3,4}, ref {1,2,3,4,5} -> 2*4/9; GM: pred {2}, ref {2,3} -> 2/3; WM: {3,4} vs {4,5} -> 1/2.
    assert scores["brain"] == pytest.approx(8 / 9)
    assert (scores["CSF"], scores["GM"], scores["WM"]) == (pytest.approx(1.0), pytest.approx(2 / 3), pytest.approx(0.5))
    assert scores["GM_WM_mean"] == pytest.approx((2 / 3 + 0.5) / 2)


def test_the_grid_ceiling_is_exact_at_the_scans_own_spacing_and_falls_on_coarser_grids() -> None:
    image, truth = _phantom_scan()
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    own = realscan.grid_ceiling(image, affine, spacing_mm=1.0, size=[40] * 3, reference=truth)
    assert min(own["brain"], own["CSF"], own["GM"], own["WM"]) > 0.999
    ceilings = [realscan.grid_ceiling(image, affine, spacing_mm=s, size=[int(np.ceil(40 / s))] * 3, reference=truth)
                for s in (2.0, 4.0)]
    # The 3-voxel CSF shell cannot be held by 4 mm voxels; the ceiling falls as the grid coarsens.
    assert own["CSF"] > ceilings[0]["CSF"] > ceilings[1]["CSF"]
    assert ceilings[1]["brain"] > 0.9


def test_a_real_network_segments_a_scan_in_lps_at_1x1x4_mm_onto_its_own_grid() -> None:
    from model import build_model

    torch.manual_seed(0)
    net = build_model("cnn_unet", in_channels=1, out_channels=4, img_size=(16, 16, 16), channels=[4, 8, 16, 32])
    image, _ = _phantom_scan((40, 40, 10))
    affine = np.diag([-1.0, -1.0, 4.0, 1.0])  # LPS storage, 4 mm slices
    mask = segment_scan(net, image, affine, spacing_mm=4.0, size=(16, 16, 16))
    assert mask.shape == image.shape and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 1, 2, 3}


def test_the_colin27_scan_is_found_when_installed_and_extra_scans_come_from_the_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    extra = tmp_path / "subject.nii.gz"
    nib.save(nib.Nifti1Image(_phantom_scan((20, 20, 20))[0], np.eye(4)), str(extra))
    monkeypatch.setenv("FEDSEG_REAL_SCANS", str(extra))
    scans = realscan.available_real_scans()
    assert scans[-1] == RealScan(name="subject", path=extra, origin="FEDSEG_REAL_SCANS", licence="user's")
    assert (realscan.DEFAULT_SCANS[0] in scans) == realscan.DEFAULT_SCANS[0].path.is_file()
    monkeypatch.setenv("FEDSEG_REAL_SCANS", str(tmp_path / "missing.nii.gz"))
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        realscan.available_real_scans()


@pytest.mark.slow  # matplotlib renders a figure (seconds of CPU the first time)
def test_the_figure_has_three_planes_of_image_prediction_and_reference(tmp_path: Path) -> None:
    image, truth = _phantom_scan((24, 24, 24))
    path = realscan.save_figure(image, truth, truth, tmp_path / "f.png", "phantom")
    from PIL import Image

    with Image.open(path) as png:
        assert png.size[0] > 300 and png.size[1] > 300
