"""Centralized training, evaluation and whole-scan segmentation (``fedseg train|evaluate|segment``).

Centralized training pools every site's data in one place: the upper bound a federation is
compared with. It uses the very pieces a client agent uses (``client_agent.data`` discovery,
validation, preprocessing and augmentation; ``client_agent.training.train_local`` and
``evaluate``; ``model.build_model`` and ``DiceCELoss``), so the only difference from federated
training is where the data sit.

    fedseg train    --data DIR [--data DIR2 …] [--val-data DIR] --out best.pt [...]
    fedseg evaluate --model best.pt|global.frames [--config federation.toml] --data DIR [--json OUT]
    fedseg segment  --model best.pt --input scan.nii.gz --output mask.nii.gz [--roi 64]

**Preprocessing is the training pipeline's**, everywhere: reorient to RAS+, z-score per channel
(over nonzero voxels unless the model was trained with ``normalize="volume"``), resize the *whole
volume* to the model's ``img_size``. The checkpoint records how (``extra["preprocess"]``), so
evaluation and segmentation repeat it exactly.

**Segmentation resolution (``mode="resize"``, the default).** Training resizes each whole scan,
whatever its size and spacing, to ``img_size``: the network learned anatomy at the scale "one
field of view per grid". A scan is therefore segmented the same way: z-score, resize the whole
scan to ``img_size``, predict (sliding windows of ``roi``; with the default ``roi = img_size`` one
window covers it), resample the class *probabilities* back to the scan's own grid (trilinear, then
argmax: smoother borders than resampling the label map by nearest neighbour), undo the
reorientation, and write a ``uint8`` class map with the scan's own shape and affine.
``mode="native"`` skips the resizing and slides ``roi`` windows over the scan at its own
resolution; it is right only when the scan's voxel spacing is that of the training grid (e.g. a
model trained on patches of scans at this spacing); a warning says when the spacing differs by
more than half from the one recorded in the checkpoint.

**Evaluation** scores, by default, exactly what ``segment`` would write, against the label as
stored (``grid="native"``, HD95 in mm from the scan's spacing). ``grid="model"`` scores on the
resized training grid instead, as sites' local validation and ``fedseg simulate``'s held-out
evaluation do, so its numbers are comparable with theirs.

Model files: a checkpoint from :func:`model.save_checkpoint` (``fedseg train``) rebuilds itself; a
``.frames`` model from a federation (``codec.save_tensors``: tensors only) needs the federation's
TOML (``--config``) for its architecture. Labels written and scored are model classes (after the
checkpoint's label map, if any), not raw label values.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from client_agent.training import OPTIMIZERS, check_optimizer

logger = logging.getLogger(__name__)

__all__ = [
    "EpochRecord",
    "LoadedModel",
    "SegmentResult",
    "TrainSettings",
    "TrainSummary",
    "add_cli",
    "evaluate_model",
    "format_metrics_table",
    "infer_num_classes",
    "load_model",
    "predict_labels",
    "segment_file",
    "train_centralized",
]

METRICS = ("dice", "iou", "hd95", "precision", "recall")
NORMALIZE_MODES = ("nonzero", "volume")
SEGMENT_MODES = ("resize", "native")
EVAL_GRIDS = ("native", "model")


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _size3(name: str, value: int | Sequence[int]) -> tuple[int, int, int]:
    """``64`` or ``(64, 64, 64)`` -> ``(64, 64, 64)``."""
    values = [value] * 3 if isinstance(value, int) and not isinstance(value, bool) else list(value)  # type: ignore[arg-type]
    if len(values) != 3 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"{name} must be one positive int or three (D, H, W), got {value!r}")
    return (values[0], values[1], values[2])


@dataclass(frozen=True)
class TrainSettings:
    """What ``fedseg train`` does; every field validated here, with the value and what is allowed.

    Attributes:
        data_dirs: one or more site folders (any layout :func:`client_agent.data.discover_cases`
            reads); their cases are pooled.
        out: the checkpoint to write (the best epoch by validation Dice).
        val_dirs: validation folders; empty: ``val_fraction`` of the pooled cases, split by ``seed``.
        architecture, options: :func:`model.build_model`'s name and options.
        img_size: the grid every volume is resized to, and the model's ``img_size``.
        epochs, batch_size, lr, lambda_dice: optimizer and :class:`model.DiceCELoss` settings.
        optimizer, momentum: ``"adam"`` or ``"sgd"`` (with heavy-ball ``momentum``), as the sites'
            ``[training] optimizer`` (:func:`client_agent.training.make_optimizer`).
        amp: bf16 autocast on CUDA (ignored on CPU).
        device: ``"auto"``, ``"cpu"``, ``"cuda[:N]"`` or ``"mps"``.
        seed: seeds weights, split, shuffling and augmentation.
        label_map: a preset of :data:`client_agent.data.LABEL_PRESETS` or ``{raw: class}``.
        num_classes: classes including background; None: the preset's, else the largest label
            value found (after ``label_map``) plus one.
        augment: on-the-fly augmentation of training volumes.
        normalize: z-score over ``"nonzero"`` voxels (MR) or the whole ``"volume"`` (CT).
        cache_dir: keep preprocessed volumes there (reused by later runs); None: in memory.
        num_workers: DataLoader worker processes.
    """

    data_dirs: tuple[Path, ...]
    out: Path
    val_dirs: tuple[Path, ...] = ()
    architecture: str = "transformer_unet"
    options: Mapping[str, Any] = field(default_factory=dict)
    img_size: tuple[int, int, int] = (64, 64, 64)
    epochs: int = 50
    batch_size: int = 2
    lr: float = 1e-4
    lambda_dice: float = 0.5
    optimizer: str = "adam"
    momentum: float = 0.0
    amp: bool = True
    device: str = "auto"
    seed: int = 0
    label_map: str | Mapping[Any, Any] | None = None
    num_classes: int | None = None
    val_fraction: float = 0.2
    augment: bool = True
    normalize: Literal["nonzero", "volume"] = "nonzero"
    cache_dir: Path | None = None
    num_workers: int = 0

    def __post_init__(self) -> None:
        from model import ARCHITECTURES

        if not self.data_dirs:
            raise ValueError("data_dirs must name at least one data folder")
        object.__setattr__(self, "data_dirs", tuple(Path(d) for d in self.data_dirs))
        object.__setattr__(self, "val_dirs", tuple(Path(d) for d in self.val_dirs))
        object.__setattr__(self, "out", Path(self.out))
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.architecture!r}; allowed: {list(ARCHITECTURES)}")
        if not isinstance(self.options, Mapping):
            raise ValueError(f"options must be a mapping of build_model options, got {type(self.options).__name__}")
        object.__setattr__(self, "img_size", _size3("img_size", self.img_size))
        _positive_int("epochs", self.epochs)
        _positive_int("batch_size", self.batch_size)
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        check_optimizer(self.optimizer, self.momentum)
        if isinstance(self.lambda_dice, bool) or not isinstance(self.lambda_dice, (int, float)) or not 0.0 <= self.lambda_dice <= 1.0:
            raise ValueError(f"lambda_dice must be in [0, 1], got {self.lambda_dice!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be an int in [0, 2**32), got {self.seed!r}")
        if self.num_classes is not None and (isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 2):
            raise ValueError(f"num_classes must be an int >= 2 (background and one class) or None, got {self.num_classes!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction!r}")
        if self.normalize not in NORMALIZE_MODES:
            raise ValueError(f"normalize must be one of {list(NORMALIZE_MODES)}, got {self.normalize!r}")
        if isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0, got {self.num_workers!r}")
        if self.out.suffix in (".frames",):
            raise ValueError(f"out {self.out} would be read as a codec model file; use a .pt name for a checkpoint")


@dataclass(frozen=True)
class EpochRecord:
    """One epoch of centralized training: its mean training loss and validation scores."""

    epoch: int
    epochs: int
    train_loss: float
    val_loss: float
    val: Mapping[str, float]  # dice, iou, hd95 (mm), precision, recall: means over validation cases
    seconds: float
    best: bool

    def line(self) -> str:
        """One printable line, e.g. ``epoch  3/10  loss 0.6123  val loss 0.5912  Dice 0.7012 …``."""
        width = len(str(self.epochs))
        return (
            f"epoch {self.epoch:>{width}}/{self.epochs}  loss {self.train_loss:.4f}  val loss {self.val_loss:.4f}  "
            f"Dice {self.val['dice']:.4f}  IoU {self.val['iou']:.4f}  HD95 {self.val['hd95']:.2f} mm  "
            f"P {self.val['precision']:.4f}  R {self.val['recall']:.4f}  {self.seconds:.1f}s"
            + ("  *best" if self.best else "")
        )


@dataclass(frozen=True)
class TrainSummary:
    """What :func:`train_centralized` did; the best checkpoint is at ``checkpoint``."""

    checkpoint: Path
    best_epoch: int
    best_dice: float
    history: list[EpochRecord]
    train_cases: int
    val_cases: int
    in_channels: int
    num_classes: int
    skipped: list[str]
    seconds: float


def infer_num_classes(cases: Sequence[Any], label_map: Mapping[int, int] | None) -> int:
    """Largest class value in the cases' labels (after ``label_map``) plus one, at least 2.

    Reads every label once; a label that cannot be read is left to validation to report.
    """
    from client_agent.data import DataError, load_label, remap_labels

    highest = 0
    for case in cases:
        try:
            label, _ = load_label(case.label_path, canonical=False)
        except DataError:
            continue
        if label.size:
            highest = max(highest, int(remap_labels(np.unique(label), label_map).max()))
    return max(2, highest + 1)


def _unique_case_ids(groups: Sequence[tuple[Path, list[Any]]]) -> list[Any]:
    """Pool the cases of several folders; prefix ids with the folder name where ids collide.

    Ids must be unique in one dataset: the disk cache names its entries by id, and the split and
    the logs refer to cases by it (``site-1/case_000`` and ``site-2/case_000`` are two cases).
    """
    counts = Counter(c.case_id for _, cases in groups for c in cases)
    names = Counter(folder.name for folder, _ in groups)
    pooled = []
    for index, (folder, cases) in enumerate(groups):
        prefix = folder.name if names[folder.name] == 1 else f"{index}-{folder.name}"
        for case in cases:
            if counts[case.case_id] > 1:
                case = dataclasses.replace(case, case_id=f"{prefix}/{case.case_id}")
            pooled.append(case)
    return pooled


def _discover(folders: Sequence[Path]) -> list[tuple[Path, list[Any]]]:
    from client_agent.data import discover_cases

    return [(folder, discover_cases(folder)) for folder in folders]


def _label_map_json(mapping: Mapping[int, int] | None) -> dict[str, int] | None:
    return {str(k): int(v) for k, v in sorted(mapping.items())} if mapping else None


def train_centralized(
    settings: TrainSettings, *, on_epoch: Callable[[EpochRecord], None] | None = None
) -> TrainSummary:
    """Train one model on the pooled data of ``settings.data_dirs``; keep the best epoch.

    Each epoch: one pass of Adam over the (augmented) training cases with
    :func:`client_agent.training.train_local` (Adam's moments carry over between epochs), then
    whole-volume validation with :func:`client_agent.training.evaluate`. Whenever the mean
    validation Dice beats every earlier epoch, the model is written to ``settings.out`` with
    :func:`model.save_checkpoint` (weights + build config, atomically); ``extra`` records the
    epoch, its scores, the preprocessing (normalisation, label map, grid spacing) and the history
    so far. ``on_epoch`` receives each :class:`EpochRecord` (the CLI prints it).

    Raises:
        client_agent.data.DataError: a folder is missing, holds no usable case, or the folders
            disagree on channels.
        client_agent.training.TrainingError: non-finite loss or weights.
    """
    from client_agent.data import (
        PRESET_NUM_CLASSES,
        DataError,
        NiftiSegDataset,
        PreprocessConfig,
        VolumeCache,
        build_augmentation,
        make_loader,
        resolve_label_map,
        split_cases,
        validate_cases,
        AugmentConfig,
    )
    from client_agent.training import evaluate, pick_device, seed_everything, train_local
    from model import DiceCELoss, build_model, save_checkpoint

    start = time.perf_counter()
    s = settings
    seed_everything(s.seed)
    device = pick_device(s.device)
    mapping = resolve_label_map(s.label_map)

    train_groups = _discover(s.data_dirs)
    val_groups = _discover(s.val_dirs)
    pooled = _unique_case_ids(train_groups + val_groups)
    n_train_found = sum(len(c) for _, c in train_groups)
    if s.num_classes is not None:
        num_classes = s.num_classes
    elif isinstance(s.label_map, str):
        num_classes = PRESET_NUM_CLASSES[s.label_map]
    else:
        num_classes = infer_num_classes(pooled, mapping)
        logger.info("num_classes %d, from the largest label value found", num_classes)

    # One validation over training and validation cases alike, so a validation folder whose
    # channels differ from the training folders' is caught here rather than at the first batch.
    good, problems = validate_cases(pooled, num_classes=num_classes, label_map=mapping, on_error="skip")
    good_ids = {c.case_id for c in good}
    train_pool = [c for c in pooled[:n_train_found] if c.case_id in good_ids]
    val_cases = [c for c in pooled[n_train_found:] if c.case_id in good_ids]
    if not train_pool:
        listing = "; ".join(str(p) for p in problems[:5])
        raise DataError(
            f"no usable training case in {[str(d) for d in s.data_dirs]} ({len(problems)} problem(s): {listing})"
        )
    if s.val_dirs:
        if not val_cases:
            raise DataError(f"no usable validation case in {[str(d) for d in s.val_dirs]}")
        train_cases = train_pool
    else:
        train_cases, val_cases = split_cases(train_pool, val_fraction=s.val_fraction, seed=s.seed)

    config = PreprocessConfig(spatial_size=s.img_size, normalize=s.normalize)
    cache = VolumeCache(config=config, label_map=mapping, num_classes=num_classes, cache_dir=s.cache_dir)
    augment = build_augmentation(AugmentConfig(), spatial_size=s.img_size, seed=s.seed) if s.augment else None
    train_set = NiftiSegDataset(train_cases, cache=cache, augment=augment)
    val_set = NiftiSegDataset(val_cases, cache=cache, augment=None)
    first = cache.get(train_cases[0])
    in_channels = int(first.image.shape[0])
    grid_spacing = [float(np.median([cache.get(c).spacing[i] for c in train_cases])) for i in range(3)]
    logger.info(
        "centralized training: %d training and %d validation cases, %d skipped, %d channel(s), %d classes, %s",
        len(train_cases), len(val_cases), len(problems), in_channels, num_classes, device,
    )

    model_config: dict[str, Any] = {
        "in_channels": in_channels,
        "out_channels": num_classes,
        "img_size": list(s.img_size),
        **dict(s.options),
    }
    net = build_model(s.architecture, **model_config)
    loss_fn = DiceCELoss(lambda_dice=s.lambda_dice)
    loader = make_loader(
        train_set, batch_size=s.batch_size, shuffle=True, seed=s.seed, num_workers=s.num_workers,
        pin_memory=device.type == "cuda",
    )
    preprocess = {
        "normalize": s.normalize,
        "canonical": True,
        "label_map": _label_map_json(mapping),
        "grid_spacing_mm": grid_spacing,
    }

    history: list[EpochRecord] = []
    optimizer_state: dict[str, Any] | None = None
    best_dice, best_epoch = -math.inf, 0
    for epoch in range(1, s.epochs + 1):
        t0 = time.perf_counter()
        result = train_local(
            net, loader, epochs=1, lr=s.lr, device=device, amp=s.amp, loss_fn=loss_fn, optimizer_state=optimizer_state,
            optimizer=s.optimizer, momentum=s.momentum,
        )
        optimizer_state = result.optimizer_state
        # fp32 validation, as sites validate and as `fedseg evaluate` scores: comparable numbers.
        scores = evaluate(net, val_set, device=device, num_classes=num_classes, loss_fn=loss_fn)
        val = {k: float(scores[k]) for k in METRICS}
        is_best = val["dice"] > best_dice
        record = EpochRecord(
            epoch=epoch, epochs=s.epochs, train_loss=result.final_loss, val_loss=float(scores["loss"]),
            val=val, seconds=time.perf_counter() - t0, best=is_best,
        )
        history.append(record)
        if is_best:
            best_dice, best_epoch = val["dice"], epoch
            extra = {
                "kind": "centralized",
                "epoch": epoch,
                "val": val,
                "val_per_class": scores["per_class"],
                "preprocess": preprocess,
                "data": [str(d) for d in s.data_dirs],
                "val_data": [str(d) for d in s.val_dirs],
                "train_cases": len(train_cases),
                "val_cases": len(val_cases),
                "training": {"lr": s.lr, "batch_size": s.batch_size, "lambda_dice": s.lambda_dice, "seed": s.seed,
                             "amp": s.amp, "augment": s.augment},
                "history": [dataclasses.asdict(r) for r in history],
            }
            save_checkpoint(s.out, net, architecture=s.architecture, config=model_config, extra=extra)
        if on_epoch is not None:
            on_epoch(record)
    return TrainSummary(
        checkpoint=s.out, best_epoch=best_epoch, best_dice=best_dice, history=history,
        train_cases=len(train_cases), val_cases=len(val_cases), in_channels=in_channels,
        num_classes=num_classes, skipped=[str(p) for p in problems], seconds=time.perf_counter() - start,
    )


# --------------------------------------------------------------------------------------------
# Loading a model (checkpoint or federation .frames)
# --------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A network ready for inference and what it needs to preprocess a scan as in training.

    ``preprocess`` holds ``normalize`` (``"nonzero"``/``"volume"``), ``label_map`` (``{raw: class}``
    or None) and ``grid_spacing_mm`` (median training spacing on the grid, or None if unknown).
    """

    net: nn.Module
    architecture: str
    config: dict[str, Any]
    preprocess: dict[str, Any]
    source: Path
    device: torch.device

    @property
    def in_channels(self) -> int:
        return int(self.config["in_channels"])

    @property
    def num_classes(self) -> int:
        return int(self.config["out_channels"])

    @property
    def img_size(self) -> tuple[int, int, int]:
        return _size3("img_size", [int(v) for v in self.config["img_size"]])


def _is_frames_file(path: Path) -> bool:
    import codec

    with open(path, "rb") as fh:
        return fh.read(len(codec.FILE_MAGIC)) == codec.FILE_MAGIC


def _federation_model_config(config_path: Path) -> Any:
    """The ``[model]`` section of a federation TOML, or of a ``fedseg simulate`` TOML (``[simulation]`` is ignored)."""
    from aggregator_service.config import load_federation_config

    if not Path(config_path).exists():
        raise FileNotFoundError(f"federation config {config_path} does not exist")
    return load_federation_config(config_path, extensions=("simulation",)).model


def _load_frames(path: Path, config_path: Path | None) -> tuple[nn.Module, str, dict[str, Any]]:
    import codec
    from model import build_model
    from model.checkpoint import check_state_dict

    if config_path is None:
        raise ValueError(
            f"{path} is a federation model (.frames: tensors only, no architecture); pass the federation's "
            "TOML with --config so the network can be rebuilt"
        )
    m = _federation_model_config(config_path)
    config = {"in_channels": m.in_channels, "out_channels": m.out_channels, "img_size": list(m.img_size), **dict(m.options)}
    arrays = codec.load_tensors(path)
    try:
        check_state_dict(m.architecture, config, arrays)
    except ValueError as exc:
        raise ValueError(
            f"{path} does not fit the [model] of {config_path}: {exc}; is it the same federation's model?"
        ) from None
    net = build_model(m.architecture, **config)
    state = net.state_dict()
    net.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(arrays[k])).to(state[k].dtype) for k in state})
    return net, m.architecture, config


def load_model(
    path: str | os.PathLike[str],
    *,
    config_path: str | os.PathLike[str] | None = None,
    device: str | torch.device = "auto",
    label_map: str | Mapping[Any, Any] | None = None,
) -> LoadedModel:
    """Load a ``fedseg train`` checkpoint or a federation's ``.frames`` model, in eval mode on ``device``.

    ``config_path`` (a federation or ``fedseg simulate`` TOML) is required for ``.frames`` and
    ignored, with a warning, for checkpoints (they carry their own config). ``label_map``
    overrides the checkpoint's (a ``.frames`` model has none).

    Raises:
        FileNotFoundError: no such file.
        ValueError: neither a checkpoint nor a frames file, a frames file without config, or
            weights that do not fit the configured network.
    """
    from client_agent.data import resolve_label_map
    from client_agent.training import pick_device
    from model import load_checkpoint

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    dev = pick_device(str(device)) if not isinstance(device, torch.device) else device
    preprocess: dict[str, Any] = {"normalize": "nonzero", "label_map": None, "grid_spacing_mm": None}
    if _is_frames_file(path):
        net, architecture, config = _load_frames(path, Path(config_path) if config_path is not None else None)
    else:
        if config_path is not None:
            logger.warning("%s is a checkpoint with its own model config; --config %s is ignored", path, config_path)
        try:
            net, meta = load_checkpoint(path, map_location="cpu")
        except ValueError:
            raise
        except Exception as exc:  # torch.load raises pickle, zip and runtime errors for foreign files
            raise ValueError(
                f"{path} is neither a FedSegNet checkpoint (fedseg train) nor a federation model "
                f"(.frames): {type(exc).__name__}: {exc}"
            ) from exc
        architecture, config = meta["architecture"], dict(meta["config"])
        preprocess.update(meta.get("extra", {}).get("preprocess", {}))
    if label_map is not None:
        preprocess["label_map"] = label_map
    resolved = resolve_label_map(preprocess.get("label_map"))
    preprocess["label_map"] = resolved
    if preprocess.get("normalize") not in NORMALIZE_MODES:
        raise ValueError(f"{path}: unknown normalisation {preprocess.get('normalize')!r}; allowed: {list(NORMALIZE_MODES)}")
    net.to(dev)
    net.eval()
    return LoadedModel(net=net, architecture=architecture, config=config, preprocess=preprocess, source=path, device=dev)


# --------------------------------------------------------------------------------------------
# Prediction
# --------------------------------------------------------------------------------------------


def _zscore_resize(image: np.ndarray, size: Sequence[int], normalize: str) -> np.ndarray:
    from client_agent.data import PreprocessConfig, preprocess_image

    return preprocess_image(image, config=PreprocessConfig(spatial_size=tuple(size), normalize=normalize))  # type: ignore[arg-type]


def _autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager[Any]:
    # The trainer's policy: bf16 on CUDA only; on CPU autocast would be slower and less exact.
    if amp and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _probabilities(loaded: LoadedModel, image: np.ndarray, roi: Sequence[int], overlap: float, amp: bool) -> torch.Tensor:
    """``(C, D, H, W)`` preprocessed image -> ``(K, D, H, W)`` class probabilities (float32, CPU)."""
    from model import sliding_window_predict

    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None].to(loaded.device)
    with _autocast(loaded.device, amp):
        probs = sliding_window_predict(loaded.net, x, roi_size=roi, overlap=overlap)
    return probs[0].float().cpu()


def _check_channels(loaded: LoadedModel, image: np.ndarray, source: str) -> None:
    if image.shape[0] != loaded.in_channels:
        raise ValueError(
            f"{source} has {image.shape[0]} channel(s), the model {loaded.source} expects {loaded.in_channels}: "
            "pass one --input per modality in training order, or one 4D file with channels last"
        )


def predict_labels(
    loaded: LoadedModel,
    image: np.ndarray,
    spacing: Sequence[float],
    *,
    mode: Literal["resize", "native"] = "resize",
    roi: Sequence[int] | None = None,
    overlap: float = 0.25,
    amp: bool = False,
) -> np.ndarray:
    """Class map of a raw (not normalised) canonical image: ``(C, D, H, W)`` -> ``(D, H, W)`` uint8.

    ``mode="resize"``: z-score, resize to the model's ``img_size``, predict, resample the
    probabilities back to ``(D, H, W)`` trilinearly, argmax. ``mode="native"``: z-score and slide
    ``roi`` windows at the image's own resolution. ``roi`` defaults to the model's ``img_size``.
    See the module docstring for when each is right.
    """
    from monai.transforms import Resize

    if mode not in SEGMENT_MODES:
        raise ValueError(f"mode must be one of {list(SEGMENT_MODES)}, got {mode!r}")
    if image.ndim != 4:
        raise ValueError(f"image must be (C, D, H, W), got shape {image.shape}")
    _check_channels(loaded, image, "the image")
    if loaded.num_classes > 256:
        raise ValueError(f"a uint8 class map holds at most 256 classes; the model has {loaded.num_classes}")
    window = _size3("roi", list(roi)) if roi is not None else loaded.img_size
    shape = tuple(int(s) for s in image.shape[1:])
    normalize = str(loaded.preprocess.get("normalize", "nonzero"))
    if mode == "resize":
        probs = _probabilities(loaded, _zscore_resize(image, loaded.img_size, normalize), window, overlap, amp)
        if tuple(probs.shape[1:]) != shape:
            resized = Resize(shape, mode="trilinear")(probs)
            probs = resized.as_tensor() if hasattr(resized, "as_tensor") else torch.as_tensor(resized)
    else:
        _warn_if_spacing_differs(loaded, spacing)
        probs = _probabilities(loaded, _zscore_resize(image, shape, normalize), window, overlap, amp)
    return probs.argmax(dim=0).numpy().astype(np.uint8)


def _warn_if_spacing_differs(loaded: LoadedModel, spacing: Sequence[float]) -> None:
    trained = loaded.preprocess.get("grid_spacing_mm")
    if not trained:
        return
    ratios = [float(s) / float(t) for s, t in zip(spacing, trained) if float(t) > 0]
    if any(r > 1.5 or r < 1 / 1.5 for r in ratios):
        logger.warning(
            "native-resolution segmentation of a scan with spacing %s mm, but the model was trained on a grid "
            "of %s mm: expect poor predictions; use mode 'resize'",
            [round(float(s), 3) for s in spacing], [round(float(t), 3) for t in trained],
        )


# --------------------------------------------------------------------------------------------
# Segmentation of one scan
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SegmentResult:
    """What :func:`segment_file` wrote: the mask's shape, the voxel count per class, the time taken."""

    output: Path
    shape: tuple[int, int, int]
    class_voxels: dict[int, int]
    seconds: float


def _from_canonical(array: np.ndarray, original_affine: np.ndarray) -> np.ndarray:
    """Undo :func:`client_agent.data.load_image`'s reorientation: RAS+ voxel order -> the file's own."""
    import nibabel as nib

    current = nib.orientations.io_orientation(original_affine)
    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(("R", "A", "S")), current)
    return np.ascontiguousarray(nib.orientations.apply_orientation(array, back))


def _check_nifti_name(path: Path) -> None:
    if not (path.name.endswith(".nii.gz") or path.name.endswith(".nii")) or path.name in (".nii", ".nii.gz"):
        raise ValueError(f"output {path} must be a NIfTI file name ending in .nii.gz or .nii")


def _write_mask(path: Path, mask: np.ndarray, reference: Any) -> None:
    """Write ``mask`` (uint8, the reference's voxel order) with the reference image's affine, atomically."""
    import nibabel as nib

    affine = np.asarray(reference.affine, dtype=np.float64)
    out = nib.Nifti1Image(mask.astype(np.uint8, copy=False), affine)
    out.set_data_dtype(np.uint8)
    header = reference.header
    out.set_qform(affine, code=int(header["qform_code"]) or 1)
    out.set_sform(affine, code=int(header["sform_code"]) or 1)
    out.header.set_xyzt_units(xyz=header.get_xyzt_units()[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else ".nii"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        nib.save(out, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def segment_file(
    model: LoadedModel,
    inputs: Path | str | Sequence[Path | str],
    output: Path | str,
    *,
    mode: Literal["resize", "native"] = "resize",
    roi: Sequence[int] | None = None,
    overlap: float = 0.25,
    amp: bool = False,
) -> SegmentResult:
    """Segment one scan and write its class map on the scan's own grid.

    ``inputs``: one NIfTI (3D, or 4D with channels last) or one 3D file per modality, in the
    channel order the model was trained with. The output is ``uint8`` model classes with the
    first input's spatial shape, voxel order and affine. See :func:`predict_labels` for ``mode``.

    Raises:
        client_agent.data.DataError: an input is missing or unreadable, or the modalities differ
            in shape.
        ValueError: wrong channel count, or an output name that is not ``.nii``/``.nii.gz``.
    """
    import nibabel as nib

    from client_agent.data import load_image

    start = time.perf_counter()
    files = [Path(inputs)] if isinstance(inputs, (str, os.PathLike)) else [Path(p) for p in inputs]
    output = Path(output)
    _check_nifti_name(output)
    image, _, spacing = load_image(files, canonical=True)
    _check_channels(model, image, ", ".join(str(f) for f in files))
    reference: Any = nib.load(str(files[0]))  # already read by load_image; nibabel's types are loose
    labels = predict_labels(model, image, spacing, mode=mode, roi=roi, overlap=overlap, amp=amp)
    mask = _from_canonical(labels, np.asarray(reference.affine, dtype=np.float64))
    if mask.shape != tuple(reference.shape[:3]):  # an orientation bug must never write a misplaced mask
        raise RuntimeError(f"internal error: mask shape {mask.shape} differs from the input grid {reference.shape[:3]}")
    _write_mask(output, mask, reference)
    counts = np.bincount(mask.ravel(), minlength=model.num_classes)
    return SegmentResult(
        output=output,
        shape=(int(mask.shape[0]), int(mask.shape[1]), int(mask.shape[2])),
        class_voxels={int(c): int(n) for c, n in enumerate(counts)},
        seconds=time.perf_counter() - start,
    )


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def _mean_of(dicts: Sequence[Mapping[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([d[k] for d in dicts])) for k in METRICS}


def evaluate_model(
    model: LoadedModel,
    data_dirs: Path | str | Sequence[Path | str],
    *,
    grid: Literal["native", "model"] = "native",
    roi: Sequence[int] | None = None,
    overlap: float = 0.25,
    amp: bool = False,
    progress: Callable[[str, Mapping[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Dice, IoU, HD95 (mm), precision and recall of ``model`` on every labelled case of ``data_dirs``.

    ``grid="native"``: predict as :func:`segment_file` does and score against the label as stored,
    with the scan's spacing. ``grid="model"``: score on the resized training grid, with the grid's
    spacing (what sites' validation reports). Labels go through the model's label map. Every case
    must pass :func:`client_agent.data.validate_cases`: an evaluation that silently skipped cases
    would not be comparable, so a bad case is an error naming its file.

    Returns ``{"model", "architecture", "data", "grid", "cases", "mean": {metric: mean over cases
    of the case's class mean}, "per_class": {"1": {metric: mean over cases}, …}, "per_case":
    [{"case_id", "mean", "per_class"}, …]}``; every number a finite float (see
    :func:`model.segmentation_metrics` for empty classes).
    """
    from client_agent.data import (
        DataError,
        PreprocessConfig,
        load_image,
        load_label,
        preprocess_case,
        remap_labels,
        validate_cases,
    )
    from model import segmentation_metrics

    if grid not in EVAL_GRIDS:
        raise ValueError(f"grid must be one of {list(EVAL_GRIDS)}, got {grid!r}")
    folders = [Path(data_dirs)] if isinstance(data_dirs, (str, os.PathLike)) else [Path(d) for d in data_dirs]
    if not folders:
        raise ValueError("evaluate_model needs at least one data folder")
    mapping = model.preprocess.get("label_map")
    num_classes = model.num_classes
    cases = _unique_case_ids(_discover(folders))
    good, _ = validate_cases(cases, num_classes=num_classes, label_map=mapping, on_error="fail")
    config = PreprocessConfig(spatial_size=model.img_size, normalize=model.preprocess.get("normalize", "nonzero"))

    per_case: list[dict[str, Any]] = []
    for case in good:
        if grid == "model":
            volume = preprocess_case(case, config=config, label_map=mapping, num_classes=num_classes)
            window = _size3("roi", list(roi)) if roi is not None else model.img_size
            pred = _probabilities(model, volume.image, window, overlap, amp).argmax(dim=0).numpy()
            target, spacing = volume.label, volume.spacing
        else:
            image, _, spacing = load_image(case.image_paths, canonical=True)
            _check_channels(model, image, str(case.image_paths[0]))
            label, _ = load_label(case.label_path, canonical=True)
            if label.shape != image.shape[1:]:
                raise DataError(f"{case.label_path}: label shape {label.shape} differs from image shape {image.shape[1:]}")
            target = remap_labels(label, mapping)
            pred = predict_labels(model, image, spacing, mode="resize", roi=roi, overlap=overlap, amp=amp)
        scores = segmentation_metrics(pred, target, num_classes=num_classes, spacing=spacing)
        per_case.append({"case_id": case.case_id, "mean": scores["mean"], "per_class": scores["per_class"]})
        if progress is not None:
            progress(case.case_id, scores["mean"])

    classes = list(per_case[0]["per_class"])
    return {
        "model": str(model.source),
        "architecture": model.architecture,
        "data": [str(f) for f in folders],
        "grid": grid,
        "cases": len(per_case),
        "mean": _mean_of([c["mean"] for c in per_case]),
        "per_class": {cls: _mean_of([c["per_class"][cls] for c in per_case]) for cls in classes},
        "per_case": per_case,
    }


def format_metrics_table(result: Mapping[str, Any]) -> str:
    """A Markdown table: one row per class and one for the mean; HD95 in mm."""
    header = "| class | Dice | IoU | HD95 mm | precision | recall |\n| --- | ---: | ---: | ---: | ---: | ---: |"
    rows = [
        f"| {name} | " + " | ".join(f"{m[k]:.2f}" if k == "hd95" else f"{m[k]:.4f}" for k in METRICS) + " |"
        for name, m in [*result["per_class"].items(), ("mean", result["mean"])]
    ]
    return "\n".join([header, *rows])


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _yes_no(value: str) -> bool:
    v = value.strip().lower()
    if v in ("yes", "y", "true", "1", "on"):
        return True
    if v in ("no", "n", "false", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected yes or no, got {value!r}")


def _json_object(value: str) -> dict[str, Any]:
    try:
        data = json.loads(value)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): {value!r}") from None
    if not isinstance(data, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"channels\": [8, 16, 32]}}', got {value!r}")
    return data


def _size_arg(name: str, values: Sequence[int]) -> tuple[int, int, int]:
    if len(values) not in (1, 3):
        raise ValueError(f"{name} takes one int or three (D H W), got {list(values)}")
    return _size3(name, values[0] if len(values) == 1 else list(values))


def _label_map_arg(value: str) -> str | dict[str, Any]:
    """A preset name, or a JSON object ``{"4": 3}``."""
    return _json_object(value) if value.strip().startswith("{") else value


def _run_train(args: argparse.Namespace) -> int:
    settings = TrainSettings(
        data_dirs=tuple(args.data), val_dirs=tuple(args.val_data or ()), out=args.out, architecture=args.architecture,
        options=args.options_json or {}, img_size=_size_arg("--img-size", args.img_size),
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, lambda_dice=args.lambda_dice, amp=args.amp,
        optimizer=args.optimizer, momentum=args.momentum,
        device=args.device, seed=args.seed, label_map=args.label_map, num_classes=args.num_classes,
        val_fraction=args.val_fraction, augment=args.augment, normalize=args.normalize, cache_dir=args.cache_dir,
        num_workers=args.num_workers,
    )
    summary = train_centralized(settings, on_epoch=lambda r: print(r.line(), flush=True))
    print(
        f"best epoch {summary.best_epoch}: validation Dice {summary.best_dice:.4f}; checkpoint {summary.checkpoint} "
        f"({summary.train_cases} training, {summary.val_cases} validation cases, {len(summary.skipped)} skipped; "
        f"{summary.seconds:.0f}s)"
    )
    return 0


def _run_evaluate(args: argparse.Namespace) -> int:
    loaded = load_model(args.model, config_path=args.config, device=args.device, label_map=args.label_map)
    roi = _size_arg("--roi", args.roi) if args.roi else None
    result = evaluate_model(loaded, args.data, grid=args.grid, roi=roi, amp=args.amp)
    print(f"{result['cases']} case(s) of {', '.join(result['data'])} on the {result['grid']} grid, model {result['model']}")
    print(format_metrics_table(result))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, out)
        print(f"wrote {out}")
    return 0


def _run_segment(args: argparse.Namespace) -> int:
    loaded = load_model(args.model, config_path=args.config, device=args.device)
    roi = _size_arg("--roi", args.roi) if args.roi else None
    result = segment_file(loaded, args.input, args.output, mode=args.mode, roi=roi, overlap=args.overlap, amp=args.amp)
    counts = ", ".join(f"{c}: {n}" for c, n in result.class_voxels.items())
    print(f"wrote {result.output}: {result.shape[0]}x{result.shape[1]}x{result.shape[2]} uint8, voxels per class {{{counts}}} "
          f"({result.seconds:.1f}s)")
    return 0


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="checkpoint from fedseg train, or a federation's .frames model")
    parser.add_argument("--config", type=Path, help="federation (or fedseg simulate) TOML: required for a .frames model")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    parser.add_argument("--roi", type=int, nargs="+", metavar="N",
                        help="sliding-window size: one int or three (default: the model's img_size)")
    parser.add_argument("--amp", type=_yes_no, default=False, metavar="yes/no", help="bf16 autocast on CUDA (default no)")


def add_cli(subparsers: Any) -> None:
    """Register ``train``, ``evaluate`` and ``segment`` on an ``argparse`` subparsers object.

    Each sub-command's ``func`` default takes the parsed namespace and returns an exit code;
    errors are raised (ValueError, RuntimeError, FileNotFoundError) for the caller to report.
    """
    from model import ARCHITECTURES, DEFAULT_ARCHITECTURE

    train = subparsers.add_parser("train", help="centralized training on pooled site data (the upper-bound baseline)")
    train.add_argument("--data", type=Path, action="append", required=True, metavar="DIR",
                       help="training data folder; repeat to pool several (--data a --data b)")
    train.add_argument("--val-data", type=Path, action="append", metavar="DIR",
                       help="validation folder(s); default: --val-fraction of the pooled cases")
    train.add_argument("--out", type=Path, required=True, help="checkpoint to write (best validation Dice)")
    train.add_argument("--architecture", choices=ARCHITECTURES, default=DEFAULT_ARCHITECTURE)
    train.add_argument("--options-json", type=_json_object, metavar="JSON",
                       help="build_model options, e.g. '{\"channels\": [8, 16, 32, 64]}'")
    train.add_argument("--img-size", type=int, nargs="+", default=[64], metavar="N",
                       help="training grid: one int or three (default 64)")
    train.add_argument("--epochs", type=int, default=50)
    train.add_argument("--batch-size", type=int, default=2)
    train.add_argument("--lr", type=float, default=1e-4, help="learning rate (default 1e-4)")
    train.add_argument("--optimizer", choices=OPTIMIZERS, default="adam", help="adam (default) or sgd")
    train.add_argument("--momentum", type=float, default=0.0, help="SGD momentum in [0, 1) (default 0)")
    train.add_argument("--lambda-dice", type=float, default=0.5, help="Dice weight in the Dice+CE loss (default 0.5)")
    train.add_argument("--amp", type=_yes_no, default=True, metavar="yes/no", help="bf16 autocast on CUDA (default yes)")
    train.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--label-map", type=_label_map_arg, metavar="PRESET|JSON",
                       help="label preset (brats_regions, msd_brain_tumour, lits, acdc) or JSON {raw: class}")
    train.add_argument("--num-classes", type=int, help="classes incl. background (default: preset's, else from the labels)")
    train.add_argument("--val-fraction", type=float, default=0.2)
    train.add_argument("--augment", type=_yes_no, default=True, metavar="yes/no", help="default yes")
    train.add_argument("--normalize", choices=NORMALIZE_MODES, default="nonzero",
                       help="z-score over nonzero voxels (MR) or the whole volume (CT)")
    train.add_argument("--cache-dir", type=Path, help="keep preprocessed volumes here (default: in memory)")
    train.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (default 0)")
    train.set_defaults(func=_run_train)

    evaluate = subparsers.add_parser("evaluate", help="Dice, IoU, HD95, precision, recall of a model on labelled data")
    _add_model_arguments(evaluate)
    evaluate.add_argument("--data", type=Path, action="append", required=True, metavar="DIR", help="labelled folder (repeatable)")
    evaluate.add_argument("--json", type=Path, metavar="OUT", help="also write the metrics (per class, mean, per case) here")
    evaluate.add_argument("--grid", choices=EVAL_GRIDS, default="native",
                          help="native: score the scan-resolution prediction against the stored label (default); "
                               "model: score on the resized training grid, as sites' validation does")
    evaluate.add_argument("--label-map", type=_label_map_arg, metavar="PRESET|JSON",
                          help="map raw label values to classes (default: the checkpoint's)")
    evaluate.set_defaults(func=_run_evaluate)

    segment = subparsers.add_parser("segment", help="segment one scan; the mask keeps the scan's grid and affine")
    _add_model_arguments(segment)
    segment.add_argument("--input", type=Path, action="append", required=True, metavar="IMG",
                         help="the scan (.nii/.nii.gz); repeat once per modality, in training order")
    segment.add_argument("--output", type=Path, required=True, metavar="MASK", help="uint8 class map to write (.nii.gz)")
    segment.add_argument("--mode", choices=SEGMENT_MODES, default="resize",
                         help="resize: whole scan to the training grid and back (default, as trained); "
                              "native: windows at the scan's resolution")
    segment.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap in [0, 1) (default 0.25)")
    segment.set_defaults(func=_run_segment)
