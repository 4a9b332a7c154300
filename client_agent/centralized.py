"""Centralized training: the upper bound a federation is compared with (``fedseg train``).

Centralized training pools every site's data in one place. It uses the very pieces a client
agent uses (``client_agent.data`` discovery, validation, preprocessing and augmentation; the
training loop of ``client_agent.training``: :func:`~client_agent.training.build_optimizer`,
:func:`~client_agent.training.train_epoch` and :func:`~client_agent.training.evaluate`;
``model.build_model`` and ``DiceCELoss``), so the only difference from federated training is
where the data sit. The best epoch is written as a checkpoint that records its preprocessing, so
``client_agent.inference`` (``fedseg evaluate``, ``fedseg segment``) repeats it exactly.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from torch import nn

from client_agent.data import NORMALIZE_MODES, Case, pool_cases
from client_agent.inference import size3
from client_agent.training import METRIC_NAMES, LoopSettings, check_optimizer

logger = logging.getLogger(__name__)

__all__ = [
    "EpochRecord",
    "TrainSettings",
    "TrainSummary",
    "infer_num_classes",
    "train_centralized",
]


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


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
        augmentation: its recipe (:data:`client_agent.data.AUGMENTATIONS`, as a federation's
            ``[training] augmentation``): ``"standard"``, ``"synthseg"`` (a new contrast every draw),
            ``"contrast"`` (only the new contrast, half of the draws) or ``"none"``.
        normalize: z-score over ``"nonzero"`` voxels (MR) or the whole ``"volume"`` (CT).
        spacing_mm: > 0: resample every case to this isotropic spacing and crop/pad it to
            ``img_size`` (a federation's ``[model] spacing_mm``); 0: resize whole volumes.
        patch_size: train on random windows of this size (at most ``img_size``; a federation's
            ``[model] patch_size``) and validate by sliding windows of it; empty: whole volumes.
            Recorded in the checkpoint, so that ``fedseg segment`` slides the same windows.
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
    augmentation: str = "standard"
    normalize: Literal["nonzero", "volume"] = "nonzero"
    cache_dir: Path | None = None
    num_workers: int = 0
    spacing_mm: float = 0.0
    patch_size: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        from client_agent.data import check_patch_size
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
        object.__setattr__(self, "img_size", size3("img_size", self.img_size))
        if self.patch_size:
            object.__setattr__(self, "patch_size", check_patch_size(self.patch_size, self.img_size))
        _positive_int("epochs", self.epochs)
        _positive_int("batch_size", self.batch_size)
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        check_optimizer(self.optimizer, self.momentum)
        from client_agent.data import augmentation_recipe

        augmentation_recipe(self.augmentation)  # ValueError naming the allowed recipes
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
        if isinstance(self.spacing_mm, bool) or not isinstance(self.spacing_mm, (int, float)) \
                or not 0.0 <= self.spacing_mm < 100.0:
            raise ValueError(f"spacing_mm must be a number of mm in [0, 100) (0: resize whole volumes), "
                             f"got {self.spacing_mm!r}")
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




# --------------------------------------------------------------------------------------------
# The steps of train_centralized
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pool:
    """The cases training uses, after discovery, validation and the split."""

    train: list[Case]
    val: list[Case]
    problems: list[Any]  # client_agent.data.Problem: the cases validation skipped
    num_classes: int
    label_map: dict[int, int] | None


@dataclass(frozen=True)
class _Data:
    """What the epochs run on: the training loader, the validation set and what the model must know."""

    loader: Any  # torch DataLoader over the augmented training set
    val_set: Any  # NiftiSegDataset of the validation cases, not augmented
    in_channels: int
    grid_spacing: list[float]  # median mm per voxel of the training cases on the grid


def _label_map_json(mapping: Mapping[int, int] | None) -> dict[str, int] | None:
    return {str(k): int(v) for k, v in sorted(mapping.items())} if mapping else None


def _num_classes(s: TrainSettings, pooled: Sequence[Case], mapping: Mapping[int, int] | None) -> int:
    from client_agent.data import PRESET_NUM_CLASSES

    if s.num_classes is not None:
        return s.num_classes
    if isinstance(s.label_map, str):
        return PRESET_NUM_CLASSES[s.label_map]
    num_classes = infer_num_classes(pooled, mapping)
    logger.info("num_classes %d, from the largest label value found", num_classes)
    return num_classes


def _select_cases(s: TrainSettings) -> _Pool:
    """Discover and pool the folders' cases, validate them, and split off validation cases if no folder gives them."""
    from client_agent.data import (
        DataError,
        discover_cases,
        resolve_label_map,
        split_cases,
        validate_cases,
    )

    mapping = resolve_label_map(s.label_map)
    train_groups = [(folder, discover_cases(folder)) for folder in s.data_dirs]
    val_groups = [(folder, discover_cases(folder)) for folder in s.val_dirs]
    pooled = pool_cases(train_groups + val_groups)
    n_train_found = sum(len(c) for _, c in train_groups)
    num_classes = _num_classes(s, pooled, mapping)

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
    return _Pool(train=train_cases, val=val_cases, problems=problems, num_classes=num_classes, label_map=mapping)


def _datasets(s: TrainSettings, pool: _Pool, *, pin_memory: bool) -> _Data:
    """Preprocessing cache, augmentation, datasets and the training loader."""
    from client_agent.data import (
        NiftiSegDataset,
        PreprocessConfig,
        RandPatch,
        VolumeCache,
        augmentation_recipe,
        build_augmentation,
        make_loader,
    )

    config = PreprocessConfig(spatial_size=s.img_size, normalize=s.normalize, spacing_mm=s.spacing_mm)
    cache = VolumeCache(config=config, label_map=pool.label_map, num_classes=pool.num_classes, cache_dir=s.cache_dir)
    recipe = augmentation_recipe(s.augmentation) if s.augment else None
    augment = build_augmentation(recipe, spatial_size=s.img_size, seed=s.seed) if recipe else None
    patch = RandPatch(s.patch_size, seed=s.seed) if s.patch_size else None
    train_set = NiftiSegDataset(pool.train, cache=cache, augment=augment, patch=patch)
    val_set = NiftiSegDataset(pool.val, cache=cache, augment=None)
    in_channels = int(cache.get(pool.train[0]).image.shape[0])
    grid_spacing = [float(np.median([cache.get(c).spacing[i] for c in pool.train])) for i in range(3)]
    loader = make_loader(
        train_set, batch_size=s.batch_size, shuffle=True, seed=s.seed, num_workers=s.num_workers, pin_memory=pin_memory,
    )
    return _Data(loader=loader, val_set=val_set, in_channels=in_channels, grid_spacing=grid_spacing)


def _train_and_validate(
    net: nn.Module, opt: Any, loop: LoopSettings, data: _Data, *, epoch: int, device: Any,
    loss_fn: Callable[[Any, Any], Any], num_classes: int, best_dice: float, roi_size: Sequence[int] | None = None,
) -> tuple[EpochRecord, dict[str, Any]]:
    """One epoch of the shared training loop, then whole-volume validation (by ``roi_size``
    windows when training used them); the record and the scores."""
    from client_agent.training import check_finite_weights, evaluate, train_epoch

    t0 = time.perf_counter()
    net.train()
    stats = train_epoch(net, data.loader, opt, loop, epoch=epoch, device=device, loss_fn=loss_fn)
    check_finite_weights(net)
    # fp32 validation, as sites validate and as `fedseg evaluate` scores: comparable numbers.
    scores = evaluate(net, data.val_set, device=device, num_classes=num_classes, loss_fn=loss_fn, roi_size=roi_size)
    val = {k: float(scores[k]) for k in METRIC_NAMES}
    record = EpochRecord(
        epoch=epoch, epochs=loop.epochs, train_loss=stats.loss, val_loss=float(scores["loss"]),
        val=val, seconds=time.perf_counter() - t0, best=val["dice"] > best_dice,
    )
    return record, scores


def _checkpoint_extra(
    s: TrainSettings, pool: _Pool, preprocess: Mapping[str, Any], record: EpochRecord, scores: Mapping[str, Any],
    history: Sequence[EpochRecord],
) -> dict[str, Any]:
    """What a checkpoint records beside the weights: the epoch, its scores, the preprocessing, the history."""
    return {
        "kind": "centralized",
        "epoch": record.epoch,
        "val": dict(record.val),
        "val_per_class": scores["per_class"],
        "preprocess": dict(preprocess),
        "data": [str(d) for d in s.data_dirs],
        "val_data": [str(d) for d in s.val_dirs],
        "train_cases": len(pool.train),
        "val_cases": len(pool.val),
        "training": {"lr": s.lr, "batch_size": s.batch_size, "lambda_dice": s.lambda_dice, "seed": s.seed,
                     "amp": s.amp, "augment": s.augment,
                     "augmentation": s.augmentation},
        "history": [dataclasses.asdict(r) for r in history],
    }


def train_centralized(
    settings: TrainSettings, *, on_epoch: Callable[[EpochRecord], None] | None = None
) -> TrainSummary:
    """Train one model on the pooled data of ``settings.data_dirs``; keep the best epoch.

    Each epoch: one pass of the optimizer over the (augmented) training cases with
    :func:`client_agent.training.train_epoch` (one optimizer for all epochs, so Adam's moments and
    SGD's momentum carry over), then whole-volume validation with
    :func:`client_agent.training.evaluate`. Whenever the mean validation Dice beats every earlier
    epoch, the model is written to ``settings.out`` with :func:`model.save_checkpoint` (weights +
    build config, atomically); ``extra`` records the epoch, its scores, the preprocessing
    (normalisation, label map, grid spacing) and the history so far. ``on_epoch`` receives each
    :class:`EpochRecord` (the CLI prints it).

    Raises:
        client_agent.data.DataError: a folder is missing, holds no usable case, or the folders
            disagree on channels.
        client_agent.training.TrainingError: non-finite loss or weights.
    """
    from client_agent.training import build_optimizer, pick_device, seed_everything
    from model import DiceCELoss, build_model, check_window, save_checkpoint

    start = time.perf_counter()
    s = settings
    seed_everything(s.seed)
    device = pick_device(s.device)
    pool = _select_cases(s)
    data = _datasets(s, pool, pin_memory=device.type == "cuda")
    logger.info(
        "centralized training: %d training and %d validation cases, %d skipped, %d channel(s), %d classes, %s",
        len(pool.train), len(pool.val), len(pool.problems), data.in_channels, pool.num_classes, device,
    )
    model_config: dict[str, Any] = {
        "in_channels": data.in_channels, "out_channels": pool.num_classes, "img_size": list(s.img_size), **dict(s.options),
    }
    net = build_model(s.architecture, **model_config)
    if s.patch_size:
        check_window(net, s.patch_size)  # ValueError: e.g. not a multiple of the network's downsampling
    loss_fn = DiceCELoss(lambda_dice=s.lambda_dice)
    loop = LoopSettings(epochs=s.epochs, lr=s.lr, amp=s.amp, optimizer=s.optimizer, momentum=s.momentum)
    net.to(device)
    opt = build_optimizer(net, loop)
    # What inference needs to see a scan as training did, as a federation's model file and its
    # [model] section record it (client_agent.inference.load_model reads both alike).
    channel_names, class_names = dataset_names(s.data_dirs[0])
    preprocess = {
        "normalize": s.normalize, "canonical": True, "label_map": _label_map_json(pool.label_map),
        "grid_spacing_mm": data.grid_spacing, "spacing_mm": s.spacing_mm or None,
        "channel_names": channel_names, "class_names": class_names,
        "patch_size": list(s.patch_size) or None,
    }

    history: list[EpochRecord] = []
    best_dice, best_epoch = -math.inf, 0
    for epoch in range(1, s.epochs + 1):
        record, scores = _train_and_validate(net, opt, loop, data, epoch=epoch, device=device, loss_fn=loss_fn,
                                             num_classes=pool.num_classes, best_dice=best_dice,
                                             roi_size=s.patch_size or None)
        history.append(record)
        if record.best:
            best_dice, best_epoch = record.val["dice"], epoch
            extra = _checkpoint_extra(s, pool, preprocess, record, scores, history)
            save_checkpoint(s.out, net, architecture=s.architecture, config=model_config, extra=extra)
        if on_epoch is not None:
            on_epoch(record)
    return TrainSummary(
        checkpoint=s.out, best_epoch=best_epoch, best_dice=best_dice, history=history,
        train_cases=len(pool.train), val_cases=len(pool.val), in_channels=data.in_channels,
        num_classes=pool.num_classes, skipped=[str(p) for p in pool.problems], seconds=time.perf_counter() - start,
    )


def dataset_names(folder: Path) -> tuple[list[str] | None, list[str] | None]:
    """Channel and class names from ``folder/dataset.json`` (MSD ``modality``/``labels``, nnU-Net
    ``channel_names``), in channel and class order; None where the folder does not say."""
    import json

    path = Path(folder) / "dataset.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None, None

    def ordered(table: Any, by_value: bool = False) -> list[str] | None:
        if not isinstance(table, dict) or not table:
            return None
        try:
            if by_value:  # nnU-Net v2: {"background": 0, "CSF": 1}
                pairs = sorted((int(v), str(k)) for k, v in table.items())
            else:  # MSD: {"0": "background", "1": "CSF"}
                pairs = sorted((int(k), str(v)) for k, v in table.items())
        except (TypeError, ValueError):
            return None
        return [name for _, name in pairs] if [i for i, _ in pairs] == list(range(len(pairs))) else None

    labels = meta.get("labels") if isinstance(meta, dict) else None
    by_value = isinstance(labels, dict) and all(isinstance(v, int) for v in labels.values())
    channels = (meta.get("modality") or meta.get("channel_names")) if isinstance(meta, dict) else None
    return ordered(channels), ordered(labels, by_value)
