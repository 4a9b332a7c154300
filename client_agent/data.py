"""A site's NIfTI data: discovery, validation, label remapping, preprocessing, caching, loaders.

Folder layouts accepted by :func:`discover_cases` (tried in this order; the first that matches wins):

1. **Medical Segmentation Decathlon** — ``ROOT/dataset.json`` with a ``"training"`` list of
   ``{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}`` (paths relative to ROOT).
   ``"image"`` may also be a list of files, one per modality. When the listed image file does not
   exist but ``imagesTr/x_0000.nii.gz, x_0001.nii.gz, …`` do (nnU-Net v1 writes its dataset.json
   that way), those files are the case's channels. A ``dataset.json`` without ``"training"``
   (nnU-Net v2) falls through to layout 2 on ``imagesTr/`` + ``labelsTr/``.
2. **Paired folders** — ``ROOT/images/`` + ``ROOT/labels/`` (or ``imagesTr/`` + ``labelsTr/``);
   the label ``labels/<case>.nii.gz`` belongs to, in this order of preference:
   ``images/<case>.nii.gz`` (3D, or 4D with channels last), ``images/<case>_0000.nii.gz,
   <case>_0001.nii.gz, …`` (one file per modality, nnU-Net style), or the folder
   ``images/<case>/`` holding one file per modality (channel order = sorted file names).
3. **Case folders** — ``ROOT/<case>/`` holding one label file whose name ends in ``seg`` or
   ``label`` (or ``mask``; e.g. ``BraTS2021_00000_seg.nii.gz``, ``label.nii.gz``) and one image file per modality
   (channel order = sorted file names) — BraTS as distributed.
4. **Flat** — ``ROOT/<case>_image.nii.gz`` beside ``ROOT/<case>_label.nii.gz``.

``.nii`` and ``.nii.gz`` are both read; names starting with ``.`` are ignored. Multi-channel
images are either one 4D file with channels last (MSD BraTS: ``(X, Y, Z, 4)``) or one 3D file per
modality; every case of a site must have the same channels.

Preprocessing (the paper's): every volume is reoriented to the closest canonical (RAS+) voxel
order so that sites storing LPS or RAS agree, z-scored per channel (over the nonzero voxels by
default — right for skull-stripped MR; ``normalize="volume"`` for CT), then resized to a fixed grid
(default 128³) with MONAI ``Resize``: trilinear for images, ``nearest-exact`` for labels (the
half-voxel-centred nearest, which lines labels up with the trilinear image; torch's legacy
``nearest`` shifts them by up to half a voxel). Z-scoring happens before resizing so the nonzero
mask is the exact one of the acquisition, as nnU-Net does. The spacing reported with each
volume is the physical extent divided by the grid, i.e. mm per voxel after resizing.

Arrays are channel-first ``(C, D, H, W)`` where (D, H, W) are the canonical voxel axes (i, j, k)
of the NIfTI after reorientation; labels are integer ``(1, D, H, W)`` class indices (one-hot
encoding is the loss's business).
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

logger = logging.getLogger(__name__)

__all__ = [
    "LABEL_PRESETS",
    "LAYOUTS_HELP",
    "PRESET_NUM_CLASSES",
    "AugmentConfig",
    "Case",
    "CacheStats",
    "DataError",
    "NiftiSegDataset",
    "PreprocessConfig",
    "Problem",
    "SiteData",
    "VolumeCache",
    "build_augmentation",
    "build_datasets",
    "discover_cases",
    "load_image",
    "load_label",
    "make_loader",
    "preprocess_case",
    "preprocess_image",
    "regions_from_labels",
    "remap_labels",
    "resize_labels",
    "resolve_label_map",
    "split_cases",
    "validate_cases",
]

NIFTI_SUFFIXES = (".nii.gz", ".nii")

LAYOUTS_HELP = (
    "accepted layouts: (1) Medical Segmentation Decathlon: dataset.json with a 'training' list of "
    "{'image': './imagesTr/x.nii.gz', 'label': './labelsTr/x.nii.gz'}; (2) images/ + labels/ "
    "(or imagesTr/ + labelsTr/) with labels/<case>.nii.gz matched by images/<case>.nii.gz, "
    "images/<case>_0000.nii.gz… (one per modality) or images/<case>/<modality>.nii.gz; "
    "(3) one folder per case holding <...>seg.nii.gz or <...>label.nii.gz and one image file per "
    "modality (BraTS); (4) flat <case>_image.nii.gz + <case>_label.nii.gz"
)


class DataError(ValueError):
    """A site's data cannot be used as given; the message names the file or folder and what was expected."""


# --------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One labelled volume of a site.

    ``image_paths`` holds one file (3D, or 4D with channels last) or one 3D file per modality in
    channel order. ``label_path`` is where the label is expected; :func:`validate_cases` reports
    it when missing. ``channel_names`` names the modalities where the layout says them (used to
    check that every case has the same channels), empty otherwise.
    """

    case_id: str
    image_paths: tuple[Path, ...]
    label_path: Path
    channel_names: tuple[str, ...] = ()


def _strip_nifti(name: str) -> str | None:
    """``"x.nii.gz" -> "x"``; None for files that are not NIfTI."""
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def _nifti_files(folder: Path) -> dict[str, Path]:
    """Stem -> path of the visible NIfTI files directly in ``folder``."""
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        stem = _strip_nifti(p.name)
        if stem is not None:
            out[stem] = p
    return out


_MODALITY_INDEX = re.compile(r"^(?P<case>.+)_(?P<index>\d{4})$")


def discover_cases(root: str | os.PathLike[str]) -> list[Case]:
    """Find the labelled cases under ``root`` (see the module docstring for the layouts).

    Returns cases sorted by ``case_id``. Raises :class:`DataError` naming the folder and the
    accepted layouts when the folder is missing or empty, holds no labels, or holds a label whose
    image cannot be found (which almost always means the layout was not understood). Images
    without a label become cases whose ``label_path`` does not exist, reported by
    :func:`validate_cases`.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a folder; {LAYOUTS_HELP}")
    dataset_json = root / "dataset.json"
    if dataset_json.is_file():
        cases = _discover_msd(root, dataset_json)
        if cases is not None:
            return _check_unique(cases, root)
    for images_name, labels_name in (("images", "labels"), ("imagesTr", "labelsTr")):
        images, labels = root / images_name, root / labels_name
        if images.is_dir() or labels.is_dir():
            return _check_unique(_discover_paired(root, images, labels), root)
    for discover in (_discover_case_folders, _discover_flat):
        cases = discover(root)
        if cases:
            return _check_unique(cases, root)
    raise DataError(f"no labelled NIfTI cases found in {root}; {LAYOUTS_HELP}")


def _check_unique(cases: list[Case], root: Path) -> list[Case]:
    if not cases:
        raise DataError(f"no labelled NIfTI cases found in {root}; {LAYOUTS_HELP}")
    counts = collections.Counter(c.case_id for c in cases)
    dupes = sorted(k for k, n in counts.items() if n > 1)
    if dupes:
        raise DataError(f"case ids appear more than once in {root}: {dupes[:5]}; case ids must be unique")
    return sorted(cases, key=lambda c: c.case_id)


def _discover_msd(root: Path, dataset_json: Path) -> list[Case] | None:
    try:
        meta = json.loads(dataset_json.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{dataset_json} is not readable JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise DataError(f"{dataset_json} must hold a JSON object, got {type(meta).__name__}")
    training = meta.get("training")
    if training is None:
        return None  # nnU-Net v2: no list; the folders say it all.
    if not isinstance(training, list) or not training:
        raise DataError(f"{dataset_json}: 'training' must be a non-empty list of {{'image', 'label'}}; {LAYOUTS_HELP}")
    modalities = meta.get("modality") or meta.get("channel_names") or {}
    names: tuple[str, ...] = ()
    if isinstance(modalities, dict):
        try:
            names = tuple(str(modalities[k]) for k in sorted(modalities, key=int))
        except (TypeError, ValueError):
            names = ()
    cases = []
    for i, entry in enumerate(training):
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise DataError(f"{dataset_json}: training[{i}] must be {{'image': ..., 'label': ...}}, got {entry!r}")
        label_path = (root / str(entry["label"])).resolve()
        raw = entry["image"]
        image_paths = tuple((root / str(p)).resolve() for p in (raw if isinstance(raw, list) else [raw]))
        if len(image_paths) == 1 and not image_paths[0].exists():
            per_modality = _per_modality_files(image_paths[0])
            if per_modality:
                image_paths = per_modality
        case_id = _strip_nifti(label_path.name) or label_path.name
        # Channel names from dataset.json describe a 4D file or the per-modality files alike.
        cases.append(Case(case_id, image_paths, label_path, names))
    return cases


def _per_modality_files(listed: Path) -> tuple[Path, ...]:
    """``imagesTr/x.nii.gz`` listed but absent -> ``imagesTr/x_0000.nii.gz, …`` when present."""
    stem = _strip_nifti(listed.name)
    if stem is None or not listed.parent.is_dir():
        return ()
    found = []
    for other_stem, path in _nifti_files(listed.parent).items():
        m = _MODALITY_INDEX.match(other_stem)
        if m and m["case"] == stem:
            found.append((int(m["index"]), path))
    return tuple(p for _, p in sorted(found))


def _discover_paired(root: Path, images: Path, labels: Path) -> list[Case]:
    if not labels.is_dir():
        raise DataError(f"{images} exists but its label folder {labels} does not; {LAYOUTS_HELP}")
    if not images.is_dir():
        raise DataError(f"{labels} exists but its image folder {images} does not; {LAYOUTS_HELP}")
    label_files = _nifti_files(labels)
    if not label_files:
        raise DataError(f"no label files (*.nii, *.nii.gz) in {labels}; {LAYOUTS_HELP}")
    image_files = _nifti_files(images)
    image_dirs = {p.name: p for p in sorted(images.iterdir()) if p.is_dir() and not p.name.startswith(".")}
    per_modality: dict[str, list[tuple[int, Path]]] = collections.defaultdict(list)
    for stem, path in image_files.items():
        m = _MODALITY_INDEX.match(stem)
        if m:
            per_modality[m["case"]].append((int(m["index"]), path))

    cases: list[Case] = []
    claimed: set[Path] = set()
    for case_id, label_path in label_files.items():
        if case_id in image_files:
            paths: tuple[Path, ...] = (image_files[case_id],)
            names: tuple[str, ...] = ()
        elif case_id in per_modality:
            ordered = sorted(per_modality[case_id])
            paths = tuple(p for _, p in ordered)
            names = tuple(f"{i:04d}" for i, _ in ordered)
        elif case_id in image_dirs:
            modality_files = _nifti_files(image_dirs[case_id])
            if not modality_files:
                raise DataError(f"image folder {image_dirs[case_id]} for label {label_path} holds no NIfTI files")
            names = tuple(modality_files)
            paths = tuple(modality_files.values())
            claimed.add(image_dirs[case_id])
        else:
            raise DataError(
                f"label {label_path} has no image in {images}: expected {images / (case_id + '.nii.gz')}, "
                f"{images / (case_id + '_0000.nii.gz')}… or the folder {images / case_id}; {LAYOUTS_HELP}"
            )
        claimed.update(paths)
        cases.append(Case(case_id, paths, label_path, names))

    # Images nobody's label claimed: kept as cases so validation reports the missing label by name.
    unclaimed_ids: set[str] = set()
    for stem, path in image_files.items():
        if path not in claimed:
            m = _MODALITY_INDEX.match(stem)
            unclaimed_ids.add(m["case"] if m else stem)
    unclaimed_ids.update(name for name, p in image_dirs.items() if p not in claimed)
    for case_id in sorted(unclaimed_ids - set(label_files)):
        if case_id in image_files:
            paths = (image_files[case_id],)
        elif case_id in per_modality:
            paths = tuple(p for _, p in sorted(per_modality[case_id]))
        else:
            paths = tuple(_nifti_files(image_dirs[case_id]).values())
        cases.append(Case(case_id, paths, labels / f"{case_id}.nii.gz"))
    return cases


_LABEL_NAME = re.compile(r"(^|[_\-.])(seg|label|labels|mask)$", re.IGNORECASE)


def _discover_case_folders(root: Path) -> list[Case]:
    cases = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = _nifti_files(folder)
        label_stems = [s for s in files if _LABEL_NAME.search(s)]
        if not files:
            continue
        if len(label_stems) != 1:
            raise DataError(
                f"case folder {folder} must hold exactly one label file whose name ends in 'seg' or "
                f"'label' (e.g. {folder.name}_seg.nii.gz), found {len(label_stems)}: {label_stems}; {LAYOUTS_HELP}"
            )
        image_stems = [s for s in files if s != label_stems[0]]
        if not image_stems:
            raise DataError(f"case folder {folder} holds the label {files[label_stems[0]].name} but no image file")
        # "BraTS_001_flair" -> "flair": the modality name without the case prefix, to compare across cases.
        names = tuple(s[len(folder.name) :].lstrip("_-.") or s if s.startswith(folder.name) else s for s in image_stems)
        cases.append(Case(folder.name, tuple(files[s] for s in image_stems), files[label_stems[0]], names))
    return cases


def _discover_flat(root: Path) -> list[Case]:
    files = _nifti_files(root)
    images = {s[: -len("_image")]: p for s, p in files.items() if s.endswith("_image")}
    labels = {s[: -len("_label")]: p for s, p in files.items() if s.endswith("_label")}
    orphans = sorted(set(labels) - set(images))
    if orphans:
        raise DataError(
            f"label {labels[orphans[0]]} has no image: expected {root / (orphans[0] + '_image.nii.gz')}; {LAYOUTS_HELP}"
        )
    return [Case(cid, (p,), labels.get(cid, root / f"{cid}_label.nii.gz")) for cid, p in images.items()]


# --------------------------------------------------------------------------------------------
# Label remapping
# --------------------------------------------------------------------------------------------

# Each preset maps raw label values to the classes the model learns; its class count is the
# number of classes the model must output.
LABEL_PRESETS: dict[str, dict[int, int]] = {
    # BraTS 2018-2021: 1 necrotic/non-enhancing core, 2 oedema, 4 enhancing (BraTS 2023: 3).
    # Classes: 0 bg, 1 necrotic core, 2 oedema, 3 enhancing; regions via regions_from_labels.
    "brats_regions": {0: 0, 1: 1, 2: 2, 3: 3, 4: 3},
    # MSD Task01_BrainTumour stores 1 oedema, 2 non-enhancing tumour, 3 enhancing: the same classes.
    "msd_brain_tumour": {0: 0, 1: 2, 2: 1, 3: 3},
    # LiTS / MSD Task03_Liver: 0 bg, 1 liver, 2 tumour.
    "lits": {0: 0, 1: 1, 2: 2},
    # ACDC: 0 bg, 1 right ventricle, 2 myocardium, 3 left ventricle.
    "acdc": {0: 0, 1: 1, 2: 2, 3: 3},
}

PRESET_NUM_CLASSES = {name: max(m.values()) + 1 for name, m in LABEL_PRESETS.items()}


def resolve_label_map(spec: str | Mapping[Any, Any] | None) -> dict[int, int] | None:
    """Turn configuration into a ``{raw value: class}`` map.

    ``spec`` is a preset name from :data:`LABEL_PRESETS`, a mapping (keys may be strings, as TOML
    and JSON write them: ``{"4": 3}``), or None for no remapping. Raw values absent from the map
    keep their value.
    """
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec not in LABEL_PRESETS:
            raise DataError(f"unknown label_map preset {spec!r}; presets: {sorted(LABEL_PRESETS)}")
        return dict(LABEL_PRESETS[spec])
    if not isinstance(spec, Mapping):
        raise DataError(f"label_map must be a preset name or a mapping raw value -> class, got {type(spec).__name__}")
    out: dict[int, int] = {}
    for k, v in spec.items():
        try:
            raw, cls = int(k), int(v)
        except (TypeError, ValueError) as exc:
            raise DataError(f"label_map entries must be integers, got {k!r}: {v!r}") from exc
        if cls < 0:
            raise DataError(f"label_map maps {raw} to a negative class {cls}; classes are 0, 1, …")
        out[raw] = cls
    return out


def remap_labels(label: np.ndarray, label_map: Mapping[int, int] | None) -> np.ndarray:
    """Apply ``label_map`` to an integer label array; values absent from the map are kept.

    Returns an ``int64`` array of the same shape.
    """
    label = np.asarray(label)
    out = label.astype(np.int64, copy=True)
    if not label_map:
        return out
    # A vectorised lookup over the distinct values: one pass however many entries the map has.
    values, inverse = np.unique(out, return_inverse=True)
    mapped = np.array([label_map.get(int(v), int(v)) for v in values], dtype=np.int64)
    return mapped[inverse].reshape(label.shape)


def regions_from_labels(label: np.ndarray | torch.Tensor) -> dict[str, np.ndarray]:
    """BraTS evaluation regions from ``brats_regions`` classes (0 bg, 1 necrotic core, 2 oedema, 3 enhancing).

    ET (enhancing tumour) = {3}; TC (tumour core) = {1, 3}; WT (whole tumour) = {1, 2, 3}.
    Returns boolean masks of the input's shape, e.g. ``(D, H, W)``.
    """
    lab = label.detach().cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
    return {"ET": lab == 3, "TC": (lab == 1) | (lab == 3), "WT": (lab >= 1) & (lab <= 3)}


# --------------------------------------------------------------------------------------------
# Reading NIfTI
# --------------------------------------------------------------------------------------------


def _spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    # The affine's column norms, not header zooms: they stay right after reorientation.
    s = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    return (float(s[0]), float(s[1]), float(s[2]))


def _squeeze_5d(shape: tuple[int, ...]) -> tuple[int, ...]:
    # ITK writes vector images as (X, Y, Z, 1, C).
    if len(shape) == 5 and shape[3] == 1:
        return shape[:3] + shape[4:]
    return shape


def _canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorient the first three axes of ``array`` to RAS+ voxel order; returns the array and its affine."""
    current = nib.orientations.io_orientation(affine)
    target = nib.orientations.axcodes2ornt(("R", "A", "S"))
    transform = nib.orientations.ornt_transform(current, target)
    if np.array_equal(transform, [[0, 1], [1, 1], [2, 1]]):
        return array, affine
    out = nib.orientations.apply_orientation(array, transform)
    new_affine = affine @ nib.orientations.inv_ornt_aff(transform, array.shape[:3])
    return np.ascontiguousarray(out), new_affine


def _load_nifti(path: Path) -> Any:  # nibabel's image classes are untyped
    if not Path(path).is_file():
        raise DataError(f"{path}: file not found")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for a damaged file
        raise DataError(f"{path}: not a readable NIfTI file ({type(exc).__name__}: {exc})") from exc
    return img


def _read_data(img: Any, path: Path, dtype: type | None = None) -> np.ndarray:
    try:
        if dtype is None:
            return np.asanyarray(img.dataobj)
        return np.asarray(img.get_fdata(dtype=dtype))
    except Exception as exc:  # truncated gzip, short file, …
        raise DataError(f"{path}: voxel data unreadable ({type(exc).__name__}: {exc})") from exc


def load_image(
    paths: Path | str | Sequence[Path | str], *, canonical: bool = True
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Read one image as ``(C, D, H, W)`` float32 with its affine and spacing (mm per voxel).

    ``paths`` is one file (3D, or 4D with channels last) or one 3D file per modality in channel
    order. With ``canonical`` the voxel axes are reoriented to RAS+ and the returned affine is the
    returned array's, so writing a prediction with it puts it in the right place. Non-finite
    voxels become 0 (with a warning): one NaN would otherwise turn the z-score into NaN.
    """
    files = [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(p) for p in paths]
    if not files:
        raise DataError("load_image needs at least one image file")
    channels: list[np.ndarray] = []
    affine0: np.ndarray | None = None
    for path in files:
        img = _load_nifti(path)
        data = _read_data(img, path, np.float32)
        data = data.reshape(_squeeze_5d(data.shape))
        if data.ndim == 3:
            data = data[..., None]
        if data.ndim != 4 or (len(files) > 1 and data.shape[3] != 1):
            raise DataError(
                f"{path}: expected a 3D volume{'' if len(files) > 1 else ' or a 4D volume with channels last'}, "
                f"got shape {data.shape}"
            )
        if affine0 is None:
            affine0 = np.asarray(img.affine, dtype=np.float64)
        elif channels and data.shape[:3] != channels[0].shape[:3]:
            raise DataError(f"{path}: shape {data.shape[:3]} differs from {files[0]} {channels[0].shape[:3]}")
        channels.append(data)
    assert affine0 is not None
    stacked = np.concatenate(channels, axis=3)
    if not np.all(np.isfinite(stacked)):
        logger.warning("%s: %d non-finite voxels set to 0", files[0], int((~np.isfinite(stacked)).sum()))
        stacked = np.nan_to_num(stacked, nan=0.0, posinf=0.0, neginf=0.0)
    affine = affine0
    if canonical:
        stacked, affine = _canonical(stacked, affine0)
    return np.ascontiguousarray(np.moveaxis(stacked, 3, 0), dtype=np.float32), affine, _spacing_of(affine)


def load_label(path: Path | str, *, canonical: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Read a label volume as ``(D, H, W)`` int64 raw values, with its affine.

    Raises :class:`DataError` for a non-3D label or non-integer values.
    """
    path = Path(path)
    img = _load_nifti(path)
    data = np.asarray(_read_data(img, path))
    data = _label_as_3d(data, path)
    data = _label_as_int(data, path)
    affine = np.asarray(img.affine, dtype=np.float64)
    if canonical:
        data, affine = _canonical(data, affine)
    return data, affine


def _label_as_3d(data: np.ndarray, path: Path) -> np.ndarray:
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{path}: a label must be a 3D volume of class values, got shape {data.shape}")
    return data


def _label_as_int(data: np.ndarray, path: Path) -> np.ndarray:
    if np.issubdtype(data.dtype, np.integer) or data.dtype == bool:
        return data.astype(np.int64, copy=False)
    if not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
        raise DataError(f"{path}: label holds non-integer values; expected integer class values")
    return data.astype(np.int64)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """Why one case cannot be used: the file at fault and the reason."""

    case_id: str
    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def validate_cases(
    cases: Iterable[Case],
    *,
    num_classes: int,
    label_map: Mapping[int, int] | None = None,
    on_error: Literal["skip", "fail"] = "skip",
    affine_atol: float = 1e-3,
) -> tuple[list[Case], list[Problem]]:
    """Check every case cheaply: image headers, and label headers + data.

    Reported per case (one :class:`Problem` naming the file): an unreadable or missing image or
    label, per-modality files of different shapes or affines, an image/label shape or affine
    mismatch (``np.allclose(atol=affine_atol)`` mm), a non-3D or non-integer label, label values
    outside ``[0, num_classes)`` after ``label_map``, and a channel count (or channel names)
    different from the site's majority. Image voxel data is not read (that is the expensive part);
    a damaged image body surfaces as a :class:`DataError` naming the file when first loaded.

    ``on_error="skip"`` logs a warning per problem and returns the good cases; ``"fail"`` raises
    :class:`DataError` listing every problem.
    """
    if on_error not in ("skip", "fail"):
        raise ValueError(f"on_error must be 'skip' or 'fail', got {on_error!r}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background and one class), got {num_classes}")
    checked: list[tuple[Case, tuple[int, tuple[str, ...]]]] = []
    problems: list[Problem] = []
    for case in cases:
        try:
            channels = _validate_case(case, num_classes=num_classes, label_map=label_map, affine_atol=affine_atol)
        except _CaseProblem as exc:
            problems.append(exc.problem)
            continue
        checked.append((case, channels))

    good: list[Case] = []
    if checked:
        majority, _ = collections.Counter(ch for _, ch in checked).most_common(1)[0]
        for case, channels in checked:
            if channels == majority:
                good.append(case)
            else:
                reason = f"has {_describe_channels(channels)}, but most cases of this site have {_describe_channels(majority)}"
                problems.append(Problem(case.case_id, case.image_paths[0], reason))
    if problems:
        if on_error == "fail":
            listing = "\n  ".join(str(p) for p in problems)
            raise DataError(f"{len(problems)} case(s) failed validation:\n  {listing}")
        for p in problems:
            logger.warning("skipping case %s: %s", p.case_id, p)
    return good, problems


def _distinct_values(label: np.ndarray) -> np.ndarray:
    """Sorted distinct values of an integer array; a bincount when small, it is ~10x faster than np.unique."""
    flat = label.ravel()
    lo, hi = int(flat.min()), int(flat.max())
    if lo >= 0 and hi < 65536:
        return np.flatnonzero(np.bincount(flat, minlength=hi + 1)).astype(np.int64)
    return np.unique(flat)


def _describe_channels(channels: tuple[int, tuple[str, ...]]) -> str:
    count, names = channels
    return f"{count} channel(s)" + (f" {list(names)}" if names else "")


class _CaseProblem(Exception):
    def __init__(self, problem: Problem) -> None:
        super().__init__(str(problem))
        self.problem = problem


def _validate_case(
    case: Case, *, num_classes: int, label_map: Mapping[int, int] | None, affine_atol: float
) -> tuple[int, tuple[str, ...]]:
    """Returns the case's (channel count, channel names); raises _CaseProblem."""

    def fail(path: Path, reason: str) -> _CaseProblem:
        return _CaseProblem(Problem(case.case_id, path, reason))

    if not case.image_paths:
        raise fail(case.label_path, "no image file for this label")
    headers = []
    for path in case.image_paths:
        try:
            img = _load_nifti(path)
        except DataError as exc:
            raise fail(path, str(exc).removeprefix(f"{path}: ")) from None
        shape = _squeeze_5d(tuple(int(s) for s in img.shape))
        affine = np.asarray(img.affine, dtype=np.float64)
        allowed = (3,) if len(case.image_paths) > 1 else (3, 4)
        if len(shape) not in allowed:
            want = "a 3D volume (one file per modality)" if len(case.image_paths) > 1 else "a 3D or 4D (channels last) volume"
            raise fail(path, f"expected {want}, got shape {shape}")
        if not np.all(np.isfinite(affine)) or min(_spacing_of(affine)) <= 0:
            raise fail(path, f"affine is not usable (non-finite or zero voxel size): {affine.tolist()}")
        headers.append((path, shape, affine))
    path0, shape0, affine0 = headers[0]
    for path, shape, affine in headers[1:]:
        if shape[:3] != shape0[:3]:
            raise fail(path, f"modality shape {shape} differs from {path0.name} {shape0}")
        if not np.allclose(affine, affine0, atol=affine_atol):
            raise fail(path, f"modality affine differs from {path0.name} by more than {affine_atol} mm")
    n_channels = shape0[3] if len(shape0) == 4 else len(headers)

    if not case.label_path.is_file():
        raise fail(case.label_path, f"label file not found (image {path0})")
    try:
        label_img = _load_nifti(case.label_path)
        label = _label_as_int(_label_as_3d(np.asarray(_read_data(label_img, case.label_path)), case.label_path), case.label_path)
    except DataError as exc:
        raise fail(case.label_path, str(exc).removeprefix(f"{case.label_path}: ")) from None
    if label.shape != shape0[:3]:
        raise fail(case.label_path, f"label shape {label.shape} differs from image shape {shape0[:3]} ({path0.name})")
    if not np.allclose(np.asarray(label_img.affine, dtype=np.float64), affine0, atol=affine_atol):
        raise fail(
            case.label_path,
            f"label affine differs from image affine ({path0.name}) by more than {affine_atol} mm: "
            f"label {np.round(label_img.affine, 4).tolist()} vs image {np.round(affine0, 4).tolist()}",
        )
    raw_values = _distinct_values(label)
    classes = np.unique(remap_labels(raw_values, label_map))
    bad = classes[(classes < 0) | (classes >= num_classes)]
    if bad.size:
        hint = " after label_map" if label_map else ""
        raise fail(
            case.label_path,
            f"label values {bad.tolist()}{hint} outside [0, {num_classes}) (raw values {raw_values.tolist()}); "
            "set label_map or num_classes",
        )
    names = case.channel_names if len(case.channel_names) == n_channels else ()
    return n_channels, names


# --------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreprocessConfig:
    """How a case becomes a fixed-grid volume; part of the cache key.

    ``spatial_size``: the grid (D, H, W) every volume is resized to. ``normalize``: z-score per
    channel over the ``"nonzero"`` voxels (MR; zeros stay 0) or the whole ``"volume"`` (CT).
    ``canonical``: reorient to RAS+ before anything else.
    """

    spatial_size: tuple[int, int, int] = (128, 128, 128)
    normalize: Literal["nonzero", "volume"] = "nonzero"
    canonical: bool = True

    def __post_init__(self) -> None:
        size = tuple(int(s) for s in self.spatial_size)
        if len(size) != 3 or min(size) < 1:
            raise ValueError(f"spatial_size must be three positive ints (D, H, W), got {self.spatial_size}")
        object.__setattr__(self, "spatial_size", size)
        if self.normalize not in ("nonzero", "volume"):
            raise ValueError(f"normalize must be 'nonzero' or 'volume', got {self.normalize!r}")


def preprocess_image(image: np.ndarray, *, config: PreprocessConfig) -> np.ndarray:
    """Z-score per channel, then resize trilinearly: ``(C, D0, H0, W0)`` -> ``(C, *spatial_size)`` float32."""
    from monai.transforms import NormalizeIntensity, Resize

    normalized = NormalizeIntensity(nonzero=config.normalize == "nonzero", channel_wise=True)(torch.from_numpy(image))
    resized = Resize(config.spatial_size, mode="trilinear")(torch.as_tensor(normalized))
    return _to_numpy(resized).astype(np.float32, copy=False)


def resize_labels(label: np.ndarray, spatial_size: Sequence[int]) -> np.ndarray:
    """Resize a ``(D0, H0, W0)`` integer label to ``spatial_size`` by nearest neighbour; keeps the dtype.

    Used both ways: to the training grid, and back to a scan's own grid for ``fedseg segment``.
    """
    from monai.transforms import Resize

    resized = Resize(tuple(int(s) for s in spatial_size), mode="nearest-exact")(torch.from_numpy(label[None].astype(np.float32)))
    return np.rint(_to_numpy(resized)[0]).astype(label.dtype, copy=False)


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy() if not hasattr(x, "as_tensor") else x.as_tensor().detach().cpu().numpy()
    return np.asarray(x)


@dataclass(frozen=True)
class Volume:
    """A preprocessed case: ``image`` (C, D, H, W) float32, ``label`` (D, H, W) uint8/int16, ``spacing`` mm/voxel."""

    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]


def preprocess_case(
    case: Case, *, config: PreprocessConfig, label_map: Mapping[int, int] | None = None, num_classes: int | None = None
) -> Volume:
    """Load, reorient, remap, z-score and resize one case onto the fixed grid."""
    image, affine, spacing = load_image(case.image_paths, canonical=config.canonical)
    label, label_affine = load_label(case.label_path, canonical=config.canonical)
    if label.shape != image.shape[1:]:
        raise DataError(f"{case.label_path}: label shape {label.shape} differs from image shape {image.shape[1:]}")
    label = remap_labels(label, label_map)
    if num_classes is not None and (label.min() < 0 or label.max() >= num_classes):
        raise DataError(f"{case.label_path}: label values outside [0, {num_classes}) after remapping")
    original_shape = image.shape[1:]
    image = preprocess_image(image, config=config)
    label_dtype = np.uint8 if label.max() < 256 and label.min() >= 0 else np.int16
    label = resize_labels(label.astype(label_dtype), config.spatial_size)
    # Resize keeps the physical extent (align_corners=False), so spacing scales by the shape ratio.
    new_spacing = tuple(float(s * n / m) for s, n, m in zip(spacing, original_shape, config.spatial_size))
    return Volume(image=image, label=label, spacing=(new_spacing[0], new_spacing[1], new_spacing[2]))


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------

_CACHE_VERSION = 1


@dataclass
class CacheStats:
    """What the cache did: volumes preprocessed from NIfTI, served from disk, served from memory."""

    computed: int = 0
    disk_hits: int = 0
    memory_hits: int = 0


class VolumeCache:
    """Preprocessed volumes keyed by the files (path, mtime, size) and the preprocessing.

    With ``cache_dir`` each volume is an ``.npz`` there (written atomically, read with
    ``allow_pickle=False``), reused across epochs, rounds and restarts; a stale entry of the same
    case is deleted when a new one is written. Without it the volumes stay in this process's
    memory — fine for small sites with ``num_workers=0`` or persistent workers.
    """

    def __init__(
        self,
        *,
        config: PreprocessConfig,
        label_map: Mapping[int, int] | None,
        num_classes: int,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.config = config
        self.label_map = dict(label_map) if label_map else None
        self.num_classes = num_classes
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._memory: dict[str, Volume] = {}
        self.stats = CacheStats()

    def key(self, case: Case) -> str:
        files = []
        for p in (*case.image_paths, case.label_path):
            st = Path(p).stat()
            files.append([str(Path(p).resolve()), st.st_mtime_ns, st.st_size])
        payload = {
            "version": _CACHE_VERSION,
            "files": files,
            "spatial_size": list(self.config.spatial_size),
            "normalize": self.config.normalize,
            "canonical": self.config.canonical,
            "label_map": sorted(self.label_map.items()) if self.label_map else None,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def path_for(self, case: Case, key: str) -> Path:
        assert self.cache_dir is not None
        return self.cache_dir / f"{_safe_name(case.case_id)}-{key}.npz"

    def get(self, case: Case) -> Volume:
        try:
            key = self.key(case)
        except OSError as exc:
            raise DataError(f"case {case.case_id}: cannot stat its files ({exc})") from exc
        if key in self._memory:
            self.stats.memory_hits += 1
            return self._memory[key]
        if self.cache_dir is not None:
            path = self.path_for(case, key)
            volume = _read_npz(path)
            if volume is not None:
                self.stats.disk_hits += 1
                return volume
        volume = preprocess_case(case, config=self.config, label_map=self.label_map, num_classes=self.num_classes)
        self.stats.computed += 1
        if self.cache_dir is not None:
            _write_npz(self.path_for(case, key), volume)
            self._prune(case, keep=key)
        else:
            self._memory[key] = volume
        return volume

    def _prune(self, case: Case, *, keep: str) -> None:
        assert self.cache_dir is not None
        pattern = re.compile(rf"^{re.escape(_safe_name(case.case_id))}-[0-9a-f]{{16}}\.npz$")
        for p in self.cache_dir.iterdir():
            if pattern.match(p.name) and p.name != self.path_for(case, keep).name:
                p.unlink(missing_ok=True)


def _safe_name(case_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", case_id)


def _write_npz(path: Path, volume: Volume) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, image=volume.image, label=volume.label, spacing=np.asarray(volume.spacing, dtype=np.float64))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_npz(path: Path) -> Volume | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            spacing = z["spacing"]
            return Volume(image=z["image"], label=z["label"], spacing=(float(spacing[0]), float(spacing[1]), float(spacing[2])))
    except Exception as exc:  # a damaged cache entry is recomputed, never fatal
        logger.warning("cache entry %s unreadable (%s); recomputing", path, exc)
        return None


# --------------------------------------------------------------------------------------------
# Augmentation, datasets, loaders
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AugmentConfig:
    """On-the-fly training augmentation (MONAI random transforms).

    Rotation, translation and scaling are one ``RandAffined`` so a volume is interpolated once,
    not three times. Elastic deformation is rare by default: it costs seconds per 128³ volume on
    a CPU. Images use trilinear interpolation, labels nearest; voxels moved in from outside are 0
    (background).
    """

    rotate_degrees: float = 30.0
    translate_fraction: float = 0.1  # of the grid size, per axis
    scale_fraction: float = 0.1  # zoom in [1 - s, 1 + s]
    affine_prob: float = 0.5
    elastic_prob: float = 0.1
    elastic_sigma: tuple[float, float] = (5.0, 8.0)
    elastic_magnitude: tuple[float, float] = (50.0, 150.0)
    flip_prob: float = 0.5  # per spatial axis
    intensity_prob: float = 0.3
    intensity_scale: float = 0.1
    intensity_shift: float = 0.1
    noise_prob: float = 0.1
    noise_std: float = 0.05

    def __post_init__(self) -> None:
        for name in ("affine_prob", "elastic_prob", "flip_prob", "intensity_prob", "noise_prob"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if not 0.0 <= self.rotate_degrees <= 180.0:
            raise ValueError(f"rotate_degrees must be in [0, 180], got {self.rotate_degrees}")


def build_augmentation(config: AugmentConfig, *, spatial_size: Sequence[int], seed: int) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """The MONAI ``Compose`` of random transforms on ``{"image": (C,D,H,W), "label": (1,D,H,W)}``, seeded."""
    from monai.transforms import (
        Compose,
        Rand3DElasticd,
        RandAffined,
        RandFlipd,
        RandGaussianNoised,
        RandScaleIntensityd,
        RandShiftIntensityd,
    )

    keys = ("image", "label")
    modes = ("bilinear", "nearest")
    angle = math.radians(config.rotate_degrees)
    transforms: list[Any] = [
        RandAffined(
            keys,
            prob=config.affine_prob,
            rotate_range=(angle, angle, angle),
            translate_range=tuple(config.translate_fraction * s for s in spatial_size),
            scale_range=(config.scale_fraction,) * 3,
            mode=modes,
            padding_mode="zeros",
        ),
        Rand3DElasticd(
            keys,
            sigma_range=config.elastic_sigma,
            magnitude_range=config.elastic_magnitude,
            prob=config.elastic_prob,
            mode=modes,
            padding_mode="zeros",
        ),
        *(RandFlipd(keys, prob=config.flip_prob, spatial_axis=axis) for axis in range(3)),
        RandScaleIntensityd("image", factors=config.intensity_scale, prob=config.intensity_prob),
        RandShiftIntensityd("image", offsets=config.intensity_shift, prob=config.intensity_prob),
        RandGaussianNoised("image", std=config.noise_std, prob=config.noise_prob),
    ]
    compose = Compose(transforms)
    compose.set_random_state(seed=seed % (2**32))
    return compose


class NiftiSegDataset(Dataset):  # type: ignore[type-arg]
    """Cases of one site as fixed-grid tensors.

    Item ``i`` is ``{"image": float32 (C, D, H, W), "label": int64 (1, D, H, W),
    "spacing": float32 (3,) mm per voxel after resizing, "case_id": str}``.
    Preprocessing goes through ``cache``; ``augment`` (a seeded MONAI Compose) runs on every
    access, so each epoch sees new random transforms.
    """

    def __init__(self, cases: Sequence[Case], *, cache: VolumeCache, augment: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
        self.cases = list(cases)
        self.cache = cache
        self.augment = augment

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
        return {
            "image": image.contiguous(),
            "label": label.contiguous(),
            "spacing": torch.tensor(volume.spacing, dtype=torch.float32),
            "case_id": case.case_id,
        }

    def reseed(self, seed: int) -> None:
        """Reseed the augmentation (each DataLoader worker calls this with its own seed)."""
        if self.augment is not None and hasattr(self.augment, "set_random_state"):
            self.augment.set_random_state(seed=seed % (2**32))


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
) -> SiteData:
    """Discover, validate, split and wrap a site's data.

    ``label_map`` is a preset name (:data:`LABEL_PRESETS`) or ``{raw: class}``. ``augment`` is
    True (default :class:`AugmentConfig`), False (none) or an :class:`AugmentConfig`; it applies
    to the training set only. ``cache_dir`` keeps preprocessed volumes on disk (recommended);
    without it they are cached in memory. Raises :class:`DataError` when no case is usable.
    """
    config = PreprocessConfig(spatial_size=tuple(spatial_size), normalize=normalize)  # type: ignore[arg-type]
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
        train=NiftiSegDataset(train_cases, cache=cache, augment=aug),
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
