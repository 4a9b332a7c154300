"""DICOM series in, NIfTI out, in the Medical Segmentation Decathlon layout a site agent reads (``fedseg convert``).

    fedseg convert --dicom DIR --out DIR [--labels DIR]

Every folder under ``--dicom`` is searched for DICOM series: one folder per series, several
series mixed in one folder, or both. Each series is read with SimpleITK (GDCM groups the files
by SeriesInstanceUID and sorts the slices by their position along the slice normal) and written
as ``OUT/imagesTr/<case>.nii.gz``. The affine comes from the slices' ImagePositionPatient,
ImageOrientationPatient, PixelSpacing and slice positions; DICOM's patient coordinates (LPS) are
turned into NIfTI's (RAS) by ITK's NIfTI writer, so oblique acquisitions keep their world
coordinates. Voxel values are the stored values after RescaleSlope/RescaleIntercept.

``<case>`` is ``<PatientID>_<SeriesNumber>`` made file-name safe (with the SeriesInstanceUID's
tail when that is not unique). ``--labels DIR`` takes NIfTI masks named ``<case>.nii.gz`` on the
converted image's grid (any voxel order of the same grid is reoriented to the image's); they go
to ``labelsTr/`` and into ``dataset.json``'s ``training`` list. Series without a label are listed
under ``test``: ``fedseg segment`` reads them, a site agent needs labels to train.

DICOM SEG and RTSTRUCT label objects are not read; give labels as NIfTI.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DicomError", "ConvertedSeries", "find_series", "convert_dicom"]

_TAGS = {"patient": "0010|0020", "series_number": "0020|0011", "description": "0008|103e", "modality": "0008|0060",
         "series_uid": "0020|000e"}


class DicomError(ValueError):
    """The input holds no readable DICOM series, or a series or label cannot be converted."""


@dataclass(frozen=True)
class DicomSeries:
    """One series found on disk: its folder, UID and slice files in GDCM's order."""

    folder: Path
    uid: str
    files: tuple[str, ...]


@dataclass(frozen=True)
class ConvertedSeries:
    """What :func:`convert_dicom` wrote for one series."""

    case_id: str
    image: Path
    label: Path | None
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    slices: int
    modality: str
    description: str


def _sitk() -> Any:
    try:
        import SimpleITK as sitk
    except ImportError as exc:
        raise DicomError(f"DICOM conversion needs SimpleITK: pip install 'fedsegnet[dicom]' ({exc})") from exc
    return sitk


def find_series(root: str | os.PathLike[str]) -> list[DicomSeries]:
    """Every DICOM series under ``root`` (recursively), in folder and UID order.

    Raises:
        DicomError: ``root`` is not a folder, or no file under it belongs to a DICOM image series.
    """
    sitk = _sitk()
    root = Path(root)
    if not root.is_dir():
        raise DicomError(f"--dicom {root} is not a folder")
    found: list[DicomSeries] = []
    looked_at: list[Path] = []
    for folder in sorted([root, *(p for p in root.rglob("*") if p.is_dir())]):
        files = [p for p in folder.iterdir() if p.is_file()]
        if not files:
            continue
        looked_at.extend(files)
        for uid in sorted(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) or ()):
            names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
            if names:
                found.append(DicomSeries(folder, uid, tuple(names)))
    if not found:
        examples = ", ".join(p.name for p in looked_at[:3]) or "no files at all"
        raise DicomError(
            f"no DICOM image series under {root}: looked at {len(looked_at)} file(s) ({examples}); "
            "point --dicom at the folder holding the .dcm slices (one folder per series or mixed)"
        )
    return found


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._") or "series"


def _read(series: DicomSeries) -> tuple[Any, dict[str, str]]:
    sitk = _sitk()
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(series.files))
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise DicomError(f"series {series.uid} in {series.folder} cannot be read: {str(exc).strip().splitlines()[-1]}") from exc
    meta = {}
    for key, tag in _TAGS.items():
        meta[key] = reader.GetMetaData(0, tag).strip() if reader.HasMetaDataKey(0, tag) else ""
    return image, meta


def _case_ids(metas: Sequence[dict[str, str]]) -> list[str]:
    ids = [_safe(f"{m['patient'] or 'patient'}_{m['series_number'] or '0'}") for m in metas]
    counts = {i: ids.count(i) for i in ids}
    return [i if counts[i] == 1 else _safe(f"{i}_{m['series_uid'][-12:]}") for i, m in zip(ids, metas)]


def _copy_label(label: Path, image_path: Path, dest: Path) -> None:
    """Write ``label`` to ``dest`` on the image's grid; refuse a label on another grid."""
    import nibabel as nib

    img: Any = nib.load(str(image_path))  # nibabel's image classes are untyped
    lab: Any = nib.load(str(label))
    data = np.asanyarray(lab.dataobj)
    if data.ndim != 3:
        raise DicomError(f"label {label} must be a 3D volume, got shape {data.shape}")
    to_image = nib.orientations.ornt_transform(nib.orientations.io_orientation(lab.affine),
                                               nib.orientations.io_orientation(img.affine))
    data = nib.orientations.apply_orientation(data, to_image)
    affine = lab.affine @ nib.orientations.inv_ornt_aff(to_image, lab.shape)
    if data.shape != img.shape[:3] or not np.allclose(affine, img.affine, atol=1e-3):
        raise DicomError(
            f"label {label} (shape {lab.shape}) is not on the grid of its converted image {image_path.name} "
            f"(shape {img.shape}); the label must cover the same voxels, in any axis order"
        )
    out = nib.Nifti1Image(np.ascontiguousarray(data), img.affine)
    out.set_qform(img.affine, code=1)
    out.set_sform(img.affine, code=1)
    nib.save(out, str(dest))


def convert_dicom(
    dicom_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, labels_dir: str | os.PathLike[str] | None = None
) -> list[ConvertedSeries]:
    """Convert every DICOM series under ``dicom_dir`` into the MSD layout in the new folder ``out_dir``.

    Written to a temporary folder beside ``out_dir`` and renamed into place: a failed conversion
    leaves nothing behind, and an existing non-empty ``out_dir`` is refused.

    Raises:
        DicomError: no DICOM series, an unreadable series, a label on another grid, a label file
            matching no series, or a non-empty ``out_dir``.
    """
    sitk = _sitk()
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DicomError(f"--out {out} exists and is not an empty folder; choose a new folder (nothing was overwritten)")
    labels = Path(labels_dir) if labels_dir is not None else None
    if labels is not None and not labels.is_dir():
        raise DicomError(f"--labels {labels} is not a folder")
    series = find_series(dicom_dir)
    read = [_read(s) for s in series]
    case_ids = _case_ids([m for _, m in read])
    label_files: dict[str, Path] = {}
    if labels is not None:
        for path in sorted(labels.iterdir()):
            stem = path.name[:-7] if path.name.endswith(".nii.gz") else path.name[:-4] if path.name.endswith(".nii") else None
            if stem is not None:
                label_files[stem] = path
        unknown = sorted(set(label_files) - set(case_ids))
        if unknown:
            raise DicomError(f"labels {unknown[:5]} in {labels} match no converted series; the series are {case_ids}")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / "imagesTr").mkdir()
        done: list[ConvertedSeries] = []
        for (image, meta), case_id in zip(read, case_ids):
            image_path = tmp / "imagesTr" / f"{case_id}.nii.gz"
            sitk.WriteImage(image, str(image_path))
            label_path = None
            if case_id in label_files:
                (tmp / "labelsTr").mkdir(exist_ok=True)
                label_path = tmp / "labelsTr" / f"{case_id}.nii.gz"
                _copy_label(label_files[case_id], image_path, label_path)
            done.append(ConvertedSeries(case_id, out / "imagesTr" / image_path.name,
                                        out / "labelsTr" / label_path.name if label_path else None,
                                        tuple(image.GetSize()), tuple(image.GetSpacing()), image.GetDepth() or 1,
                                        meta["modality"], meta["description"]))
        modality = sorted({c.modality for c in done if c.modality}) or ["unknown"]
        dataset = {
            "name": "converted from DICOM by fedseg convert",
            "tensorImageSize": "3D",
            "modality": {"0": "/".join(modality)},
            "training": [{"image": f"./imagesTr/{c.case_id}.nii.gz", "label": f"./labelsTr/{c.case_id}.nii.gz"}
                         for c in done if c.label is not None],
            "test": [f"./imagesTr/{c.case_id}.nii.gz" for c in done if c.label is None],
        }
        if not dataset["training"]:
            # The MSD reader wants a non-empty training list; without labels the folder is for
            # fedseg segment until masks are added under labelsTr/ (then run with --labels again).
            del dataset["training"]
        (tmp / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return done
