"""One list of metric names: the wire's LocalMetrics fields; tables keep their own column order."""

from __future__ import annotations

import numpy as np

import client_agent.training
import model
from client_agent.inference import format_metrics_table
from protos.fedsegnet.v1.local_metrics import SEGMENTATION_METRIC_NAMES


def test_the_model_and_the_training_loop_use_the_wires_list() -> None:
    assert model.METRIC_NAMES is SEGMENTATION_METRIC_NAMES
    assert client_agent.training.METRIC_NAMES is SEGMENTATION_METRIC_NAMES
    assert SEGMENTATION_METRIC_NAMES == ("dice", "hd95", "iou", "precision", "recall")


def test_segmentation_metrics_report_every_name_in_the_lists_order() -> None:
    target = np.zeros((6, 6, 6), np.int64)
    target[1:4, 1:4, 1:4] = 1

    result = model.segmentation_metrics(target, target, num_classes=2)

    assert tuple(result["mean"]) == SEGMENTATION_METRIC_NAMES
    assert set(result["per_class"]["1"]) == set(SEGMENTATION_METRIC_NAMES)


def test_the_evaluate_table_prints_dice_iou_hd95_precision_recall() -> None:
    m = {"dice": 0.5, "hd95": 3.0, "iou": 0.25, "precision": 0.75, "recall": 0.875}

    table = format_metrics_table({"per_class": {"1": m}, "mean": m}).splitlines()

    assert table[0] == "| class | Dice | IoU | HD95 mm | precision | recall |"
    assert table[1] == "| --- | ---: | ---: | ---: | ---: | ---: |"
    assert table[2] == "| 1 | 0.5000 | 0.2500 | 3.00 | 0.7500 | 0.8750 |"
    assert table[3] == "| mean | 0.5000 | 0.2500 | 3.00 | 0.7500 | 0.8750 |"
