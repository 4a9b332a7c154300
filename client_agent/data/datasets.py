"""A site's cases as torch datasets: dataset, train/validation split, loaders."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from client_agent.data.augment import AugmentConfig, build_augmentation
from client_agent.data.cache import VolumeCache
from client_agent.data.discover import Case, discover_cases
from client_agent.data.errors import DataError
from client_agent.data.labels import resolve_label_map
from client_agent.data.nifti import _load_nifti, _squeeze_5d
from client_agent.data.patches import RandPatch, check_patch_size
from client_agent.data.preprocess import PreprocessConfig
from client_agent.data.validate import Problem, validate_cases

logger = logging.getLogger(__name__)


class NiftiSegDataset(Dataset):  # type: ignore[type-arg]
    """Cases of one site as fixed-grid tensors.

    Item ``i`` is ``{"image": float32 (C, D, H, W), "label": int64 (1, D, H, W),
    "spacing": float32 (3,) mm per voxel after resizing, "case_id": str}``.
    Preprocessing goes through ``cache``; ``augment`` (a seeded MONAI Compose) runs on every
    access, so each epoch sees new random transforms. ``patch`` (training only) then cuts a
    random window out of the augmented volume (:class:`client_agent.data.patches.RandPatch`), so
    that image and label are ``patch.size`` instead of the whole grid.
    """

    def __init__(self, cases: Sequence[Case], *, cache: VolumeCache, augment: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                 patch: RandPatch | None = None) -> None:
        self.cases = list(cases)
        self.cache = cache
        self.augment = augment
        self.patch = patch

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict[str, Any]:
        case = self.cases[index]
        volume = self.cache.get(case)
        image = torch.from_numpy(np.array(volume.image, dtype=np.float32))
        label = torch.from_numpy(np.asarray(volume.label).astype(np.int64))[None]
        if self.augment is not None:
            out = self.augment({"image": image, "label": label.float()})
            image = _plain_tensor(out["image"]).float()
            label = _plain_tensor(out["label"]).round().long().clamp_(min=0)
        if self.patch is not None:
            image, label = self.patch(image, label)
        return {
            "image": image.contiguous(),
            "label": label.contiguous(),
            "spacing": torch.tensor(volume.spacing, dtype=torch.float32),
            "case_id": case.case_id,
        }

    def reseed(self, seed: int) -> None:
        """Reseed the augmentation and the windows (each DataLoader worker calls this with its own seed)."""
        if self.augment is not None and hasattr(self.augment, "set_random_state"):
            self.augment.set_random_state(seed=seed % (2**32))
        if self.patch is not None:
            self.patch.set_random_state(seed % (2**32))


def _plain_tensor(x: Any) -> torch.Tensor:
    # MONAI returns MetaTensors; a plain tensor keeps collation and torch.compile simple.
    if hasattr(x, "as_tensor"):
        return x.as_tensor()
    return torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x


@dataclass
class SiteData:
    """A site's training and validation sets and what the model needs to know about them."""

    train: NiftiSegDataset
    val: NiftiSegDataset
    in_channels: int
    num_classes: int
    spatial_size: tuple[int, int, int]
    problems: list[Problem] = field(default_factory=list)

    @property
    def num_train(self) -> int:
        return len(self.train)


def split_cases(cases: Sequence[Case], *, val_fraction: float, seed: int) -> tuple[list[Case], list[Case]]:
    """Deterministic train/validation split by ``seed``, independent of the order of ``cases``.

    ``round(n * val_fraction)`` validation cases, at least 1 and at most n - 1 when n >= 2. With
    one case it is both the training and the validation case (a warning says so).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    ordered = sorted(cases, key=lambda c: c.case_id)
    n = len(ordered)
    if n == 0:
        raise DataError("no usable cases to split")
    if n == 1:
        logger.warning("only one usable case (%s): training and validating on it", ordered[0].case_id)
        return list(ordered), list(ordered)
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    val_idx = set(int(i) for i in perm[:n_val])
    train = [c for i, c in enumerate(ordered) if i not in val_idx]
    val = [c for i, c in enumerate(ordered) if i in val_idx]
    return train, val


def _channel_count(case: Case) -> int:
    if len(case.image_paths) > 1:
        return len(case.image_paths)
    shape = _squeeze_5d(tuple(int(s) for s in _load_nifti(case.image_paths[0]).shape))
    return shape[3] if len(shape) == 4 else 1


def build_datasets(
    root: str | os.PathLike[str],
    *,
    spatial_size: Sequence[int] = (128, 128, 128),
    num_classes: int,
    label_map: str | Mapping[Any, Any] | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    augment: bool | AugmentConfig = True,
    cache_dir: str | os.PathLike[str] | None = None,
    on_error: Literal["skip", "fail"] = "skip",
    normalize: Literal["nonzero", "volume"] = "nonzero",
    spacing_mm: float = 0.0,
    patch_size: Sequence[int] | None = None,
) -> SiteData:
    """Discover, validate, split and wrap a site's data.

    ``label_map`` is a preset name (:data:`LABEL_PRESETS`) or ``{raw: class}``. ``augment`` is
    True (default :class:`AugmentConfig`), False (none) or an :class:`AugmentConfig`; it applies
    to the training set only. ``cache_dir`` keeps preprocessed volumes on disk (recommended);
    without it they are cached in memory. ``spacing_mm`` > 0 resamples every case to that spacing
    before cropping/padding it to ``spatial_size`` (:class:`PreprocessConfig`). ``patch_size``
    (at most ``spatial_size``; None or empty: whole volumes) makes every training item a random
    window of that size (:class:`RandPatch`); validation volumes stay whole. Raises
    :class:`DataError` when no case is usable, ValueError for a window that does not fit.
    """
    config = PreprocessConfig(spatial_size=tuple(spatial_size), normalize=normalize,  # type: ignore[arg-type]
                              spacing_mm=spacing_mm)
    patch = RandPatch(check_patch_size(patch_size, config.spatial_size), seed=seed) if patch_size else None
    mapping = resolve_label_map(label_map)
    cases = discover_cases(root)
    good, problems = validate_cases(cases, num_classes=num_classes, label_map=mapping, on_error=on_error)
    if not good:
        listing = "; ".join(str(p) for p in problems[:5])
        raise DataError(f"no usable case in {root} ({len(problems)} problem(s): {listing})")
    train_cases, val_cases = split_cases(good, val_fraction=val_fraction, seed=seed)
    cache = VolumeCache(config=config, label_map=mapping, num_classes=num_classes, cache_dir=cache_dir)
    aug = None
    if augment:
        aug_config = augment if isinstance(augment, AugmentConfig) else AugmentConfig()
        aug = build_augmentation(aug_config, spatial_size=config.spatial_size, seed=seed)
    logger.info(
        "site data %s: %d train, %d validation, %d skipped", root, len(train_cases), len(val_cases), len(problems)
    )
    return SiteData(
        train=NiftiSegDataset(train_cases, cache=cache, augment=aug, patch=patch),
        val=NiftiSegDataset(val_cases, cache=cache, augment=None),
        in_channels=_channel_count(good[0]),
        num_classes=num_classes,
        spatial_size=config.spatial_size,
        problems=problems,
    )


def _worker_init(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    if info is not None and isinstance(info.dataset, NiftiSegDataset):
        # torch gives each worker a seed drawn from the loader's generator: distinct per worker and
        # per epoch, yet reproducible. Without this every worker would replay the same augmentations.
        info.dataset.reseed(info.seed)


def make_loader(
    dataset: Dataset,  # type: ignore[type-arg]
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:  # type: ignore[type-arg]
    """A DataLoader whose order (and, with workers, augmentation) is reproducible from ``seed``.

    Batches are ``{"image": (B, C, D, H, W), "label": (B, 1, D, H, W), "spacing": (B, 3),
    "case_id": list[str]}``. Workers persist across epochs so an in-memory cache survives.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        generator=generator,
        worker_init_fn=_worker_init if num_workers > 0 else None,
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
        drop_last=False,
    )
