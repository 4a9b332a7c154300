"""segmentation_metrics on hand-made volumes whose Dice, IoU, precision, recall and HD95 are worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from model import METRIC_NAMES, segmentation_metrics


def volume(*boxes: tuple[int, tuple[slice, slice, slice]], shape: tuple[int, int, int] = (16, 16, 16)) -> np.ndarray:
    """A label volume: zeros with each ``(label, (slice_d, slice_h, slice_w))`` box painted in order."""
    v = np.zeros(shape, dtype=np.int64)
    for label, box in boxes:
        v[box] = label
    return v


def test_two_cubes_with_known_overlap() -> None:
    # pred: 4x4x4 cube = 64 voxels; target: 4x4x6 box = 96 voxels containing it.
    # TP = 64, FP = 0, FN = 32 -> dice = 128/160, iou = 64/96, precision = 1, recall = 64/96.
    pred = volume((1, np.s_[2:6, 2:6, 2:6]))
    target = volume((1, np.s_[2:6, 2:6, 2:8]))

    m = segmentation_metrics(pred, target, num_classes=2)["per_class"]["1"]

    assert m["dice"] == pytest.approx(0.8)
    assert m["iou"] == pytest.approx(2 / 3)
    assert m["precision"] == pytest.approx(1.0)
    assert m["recall"] == pytest.approx(2 / 3)


def test_shifted_cubes_overlap() -> None:
    # Two 4x4x4 cubes, the second shifted by one voxel along D: TP = 3*4*4 = 48, FP = FN = 16.
    pred = volume((1, np.s_[2:6, 2:6, 2:6]))
    target = volume((1, np.s_[3:7, 2:6, 2:6]))

    m = segmentation_metrics(pred, target, num_classes=2)["per_class"]["1"]

    assert m["dice"] == pytest.approx(96 / 128)
    assert m["iou"] == pytest.approx(48 / 80)
    assert m["precision"] == pytest.approx(0.75)
    assert m["recall"] == pytest.approx(0.75)


@pytest.mark.parametrize(
    ("axis", "spacing", "expected_mm"),
    [
        (0, (2.0, 1.0, 1.0), 2.0),
        (0, (1.0, 2.0, 1.0), 1.0),
        (1, (1.0, 2.0, 1.0), 2.0),
        (2, (0.5, 0.5, 3.0), 3.0),
    ],
)
def test_hd95_of_a_one_voxel_shift_is_the_spacing_along_that_axis(
    axis: int, spacing: tuple[float, float, float], expected_mm: float
) -> None:
    # An 8³ cube and its copy shifted one voxel along `axis`. Each surface (296 voxels) has one face
    # (64 voxels, 22% > 5%) one step away from the other surface along `axis`; every other surface
    # voxel lies on the other surface too. So the 95th percentile is exactly one step: spacing[axis].
    box = [slice(4, 12)] * 3
    shifted = list(box)
    shifted[axis] = slice(5, 13)
    pred = volume((1, tuple(box)))  # type: ignore[arg-type]
    target = volume((1, tuple(shifted)))  # type: ignore[arg-type]

    m = segmentation_metrics(pred, target, num_classes=2, spacing=spacing)["per_class"]["1"]

    assert m["hd95"] == pytest.approx(expected_mm)


def test_identical_volumes_score_perfectly() -> None:
    labels = volume((1, np.s_[2:10, 2:10, 2:10]), (2, np.s_[4:6, 4:6, 4:6]))

    result = segmentation_metrics(labels, labels.copy(), num_classes=3)

    for cls in ("1", "2"):
        assert result["per_class"][cls] == {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "precision": 1.0, "recall": 1.0}


def test_class_absent_from_both_counts_as_perfect() -> None:
    labels = volume((1, np.s_[2:6, 2:6, 2:6]))

    m = segmentation_metrics(labels, labels, num_classes=3)["per_class"]["2"]

    assert m == {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "precision": 1.0, "recall": 1.0}


@pytest.mark.parametrize("missing_from", ["pred", "target"])
def test_class_absent_from_one_side_scores_zero_and_the_volume_diagonal(missing_from: str) -> None:
    present = volume((1, np.s_[2:6, 2:6, 2:6]), shape=(16, 8, 4))
    absent = np.zeros_like(present)
    pred, target = (absent, present) if missing_from == "pred" else (present, absent)
    spacing = (2.0, 1.0, 0.5)
    diagonal = math.sqrt(32.0**2 + 8.0**2 + 2.0**2)  # (16*2, 8*1, 4*0.5) mm

    m = segmentation_metrics(pred, target, num_classes=2, spacing=spacing)["per_class"]["1"]

    assert m == {"dice": 0.0, "iou": 0.0, "hd95": pytest.approx(diagonal), "precision": 0.0, "recall": 0.0}


def test_mean_averages_the_scored_classes_and_everything_is_a_plain_finite_float() -> None:
    # class 1: dice 0.8 (first test's boxes); class 2 absent from pred only: dice 0.
    pred = volume((1, np.s_[2:6, 2:6, 2:6]))
    target = volume((1, np.s_[2:6, 2:6, 2:8]), (2, np.s_[10:12, 10:12, 10:12]))

    result = segmentation_metrics(pred, target, num_classes=3)

    assert set(result["per_class"]) == {"1", "2"}
    assert set(result["mean"]) == set(METRIC_NAMES)
    assert result["mean"]["dice"] == pytest.approx((0.8 + 0.0) / 2)
    assert result["mean"]["precision"] == pytest.approx((1.0 + 0.0) / 2)
    values = list(result["mean"].values()) + [v for m in result["per_class"].values() for v in m.values()]
    assert all(type(v) is float and math.isfinite(v) for v in values)


def test_include_background_scores_class_zero() -> None:
    # 16³ = 4096 voxels; background: pred 4096-64, target 4096-96, overlap 4096-96.
    pred = volume((1, np.s_[2:6, 2:6, 2:6]))
    target = volume((1, np.s_[2:6, 2:6, 2:8]))

    result = segmentation_metrics(pred, target, num_classes=2, include_background=True)

    assert set(result["per_class"]) == {"0", "1"}
    assert result["per_class"]["0"]["precision"] == pytest.approx(4000 / 4032)
    assert result["per_class"]["0"]["recall"] == pytest.approx(1.0)


def test_accepts_torch_tensors_and_integral_floats() -> None:
    pred = volume((1, np.s_[2:6, 2:6, 2:6]))
    target = volume((1, np.s_[2:6, 2:6, 2:8]))

    from_numpy = segmentation_metrics(pred, target, num_classes=2)
    from_torch = segmentation_metrics(torch.from_numpy(pred), torch.from_numpy(target).float(), num_classes=2)

    assert from_torch == from_numpy


@pytest.mark.parametrize(
    ("pred", "target", "kwargs", "message"),
    [
        (np.zeros((4, 4, 4), int), np.zeros((4, 4, 5), int), {}, r"shapes differ: \(4, 4, 4\) vs \(4, 4, 5\)"),
        (np.zeros((1, 4, 4, 4), int), np.zeros((1, 4, 4, 4), int), {}, r"\(D, H, W\) label volume"),
        (np.full((4, 4, 4), 3), np.zeros((4, 4, 4), int), {}, r"labels must be in \[0, 2\), got values in \[3, 3\]"),
        (np.full((4, 4, 4), 0.5), np.zeros((4, 4, 4), int), {}, "integer class labels"),
        (np.zeros((4, 4, 4), int), np.zeros((4, 4, 4), int), {"spacing": (1.0, 0.0, 1.0)}, "spacing must be"),
        (np.zeros((4, 4, 4), int), np.zeros((4, 4, 4), int), {"num_classes": 1}, "leaves no class to score"),
    ],
)
def test_bad_input_is_refused(pred: np.ndarray, target: np.ndarray, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        segmentation_metrics(pred, target, **{"num_classes": 2, **kwargs})
