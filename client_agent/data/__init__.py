"""A site's NIfTI data pipeline, one module per job.

=====================  ========================================================================
``discover``           the folder layouts sites store cases in (MSD ``dataset.json``, paired
                       ``images/`` + ``labels/``, one folder per case, flat) -> :class:`Case`
``labels``             label presets (BraTS, MSD, LiTS, ACDC), remapping, BraTS regions
``nifti``              reading images and labels; reorientation to RAS+ and its inverse
``validate``           cheap per-case checks that name the bad file
``preprocess``         one case -> one fixed-grid volume (z-score, resize)
``cache``              preprocessed volumes in memory or on disk
``augment``            seeded MONAI random transforms for training
``patches``            random training windows (``[model] patch_size``)
``datasets``           torch dataset, train/validation split, a site's datasets, loaders
=====================  ========================================================================

Arrays are channel-first ``(C, D, H, W)`` where (D, H, W) are the canonical voxel axes (i, j, k)
of the NIfTI after reorientation; labels are integer ``(1, D, H, W)`` class indices (one-hot
encoding is the loss's business).

Every name below is importable from ``client_agent.data`` itself.
"""

from __future__ import annotations

from client_agent.data.augment import AUGMENTATIONS, AugmentConfig, augmentation_recipe, build_augmentation
from client_agent.data.cache import CacheStats, VolumeCache
from client_agent.data.datasets import (
    NiftiSegDataset,
    SiteData,
    build_datasets,
    make_loader,
    split_cases,
)
from client_agent.data.discover import (
    LAYOUTS_HELP,
    NIFTI_SUFFIXES,
    Case,
    discover_cases,
    pool_cases,
)
from client_agent.data.errors import DataError
from client_agent.data.labels import (
    LABEL_PRESETS,
    PRESET_NUM_CLASSES,
    regions_from_labels,
    remap_labels,
    resolve_label_map,
)
from client_agent.data.nifti import from_canonical, load_image, load_label, to_canonical
from client_agent.data.patches import RandPatch, check_patch_size
from client_agent.data.preprocess import (
    NORMALIZE_MODES,
    PreprocessConfig,
    Volume,
    preprocess_case,
    preprocess_image,
    resize_labels,
)
from client_agent.data.validate import Problem, validate_cases

__all__ = [
    "LABEL_PRESETS",
    "LAYOUTS_HELP",
    "NIFTI_SUFFIXES",
    "NORMALIZE_MODES",
    "PRESET_NUM_CLASSES",
    "AUGMENTATIONS",
    "AugmentConfig",
    "augmentation_recipe",
    "Case",
    "CacheStats",
    "DataError",
    "NiftiSegDataset",
    "PreprocessConfig",
    "Problem",
    "RandPatch",
    "SiteData",
    "Volume",
    "VolumeCache",
    "build_augmentation",
    "build_datasets",
    "check_patch_size",
    "discover_cases",
    "from_canonical",
    "load_image",
    "load_label",
    "make_loader",
    "pool_cases",
    "preprocess_case",
    "preprocess_image",
    "regions_from_labels",
    "remap_labels",
    "resize_labels",
    "resolve_label_map",
    "split_cases",
    "to_canonical",
    "validate_cases",
]
