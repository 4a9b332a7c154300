"""Find a site's labelled cases in any of the folder layouts sites store them in.

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
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from client_agent.data.errors import DataError

NIFTI_SUFFIXES = (".nii.gz", ".nii")

LAYOUTS_HELP = (
    "accepted layouts: (1) Medical Segmentation Decathlon: dataset.json with a 'training' list of "
    "{'image': './imagesTr/x.nii.gz', 'label': './labelsTr/x.nii.gz'}; (2) images/ + labels/ "
    "(or imagesTr/ + labelsTr/) with labels/<case>.nii.gz matched by images/<case>.nii.gz, "
    "images/<case>_0000.nii.gz… (one per modality) or images/<case>/<modality>.nii.gz; "
    "(3) one folder per case holding <...>seg.nii.gz or <...>label.nii.gz and one image file per "
    "modality (BraTS); (4) flat <case>_image.nii.gz + <case>_label.nii.gz"
)


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


def pool_cases(groups: Sequence[tuple[Path, list[Case]]]) -> list[Case]:
    """Pool the cases of several folders; prefix ids with the folder name where ids collide.

    ``groups``: ``(folder, discover_cases(folder))`` pairs. Ids must be unique in one dataset: the
    disk cache names its entries by id, and the split and the logs refer to cases by it
    (``site-1/case_000`` and ``site-2/case_000`` are two cases).
    """
    counts = collections.Counter(c.case_id for _, cases in groups for c in cases)
    names = collections.Counter(folder.name for folder, _ in groups)
    pooled = []
    for index, (folder, cases) in enumerate(groups):
        prefix = folder.name if names[folder.name] == 1 else f"{index}-{folder.name}"
        for case in cases:
            if counts[case.case_id] > 1:
                case = dataclasses.replace(case, case_id=f"{prefix}/{case.case_id}")
            pooled.append(case)
    return pooled
