"""fedseg convert: DICOM series written with pydicom from known volumes come back with their values and world coordinates."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("SimpleITK")

from pydicom.dataset import FileDataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid  # noqa: E402

from client_agent.data import discover_cases, load_image  # noqa: E402
from client_agent.dicom import DicomError, convert_dicom  # noqa: E402
from fedseg.cli import main as fedseg_main  # noqa: E402

LPS = np.diag([-1.0, -1.0, 1.0])


def rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def write_series(folder: Path, volume: np.ndarray, affine: np.ndarray, *, patient: str, number: int,
                 slope: float = 1.0, intercept: float = 0.0) -> str:
    """One slice file per k of ``volume[i, j, k]`` (RAS ``affine``): columns follow i, rows follow j."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid, study_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    col_step, row_step = LPS @ affine[:3, 0], LPS @ affine[:3, 1]
    spacing_i, spacing_j = np.linalg.norm(col_step), np.linalg.norm(row_step)
    stored = np.rint((volume - intercept) / slope).astype(np.int16)
    for k in range(volume.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"{patient}_{number}_{k:03d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID, ds.PatientName = "MR", patient, patient
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.SeriesNumber, ds.InstanceNumber = number, k + 1
        ds.ImagePositionPatient = [float(v) for v in LPS @ (affine @ [0, 0, k, 1])[:3]]
        ds.ImageOrientationPatient = [float(v) for v in (*(col_step / spacing_i), *(row_step / spacing_j))]
        ds.PixelSpacing = [float(spacing_j), float(spacing_i)]  # row spacing (between rows), column spacing
        ds.SliceThickness = float(np.linalg.norm(affine[:3, 2]))
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()  # pixel[row=j, column=i]
        ds.save_as(folder / f"{patient}_{number}_{k:03d}.dcm", enforce_file_format=True)
    return series_uid


def volume(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(-200, 1500, size=shape).astype(np.float32)


def assert_same_world(original: np.ndarray, affine: np.ndarray, converted: Path) -> None:
    """Every converted voxel holds the original's value at the same RAS world position."""
    img = nib.load(str(converted))
    data = np.asarray(img.get_fdata(dtype=np.float32))
    mapping = np.linalg.inv(affine) @ img.affine  # converted voxel index -> original voxel index
    np.testing.assert_allclose(mapping, np.rint(mapping), atol=1e-3)  # the same grid, axes possibly reordered
    assert data.size == original.size
    idx = np.indices(data.shape).reshape(3, -1)
    orig_idx = np.rint(mapping[:3, :3] @ idx + mapping[:3, 3:4]).astype(int)
    np.testing.assert_array_equal(data.reshape(-1), original[tuple(orig_idx)])


AXIAL = np.array([[1.2, 0, 0, -20.0], [0, 0.9, 0, 15.0], [0, 0, 2.5, -40.0], [0, 0, 0, 1]])


def oblique() -> np.ndarray:
    """An oblique acquisition: rotated about two axes, anisotropic, its first axis running right-to-left (LPS-like)."""
    r = rotation(2, 25) @ rotation(0, -15)
    a = np.eye(4)
    a[:3, :3] = r @ np.diag([-0.8, 1.1, 3.0])
    a[:3, 3] = [40.0, -12.0, 7.5]
    return a


@pytest.mark.parametrize("affine", [AXIAL, oblique()], ids=["axial", "oblique-lps"])
def test_round_trip_keeps_values_and_world_coordinates(affine: np.ndarray, tmp_path: Path) -> None:
    original = volume((20, 16, 12), seed=1)
    write_series(tmp_path / "dicom" / "s1", original, affine, patient="P1", number=3)

    converted = convert_dicom(tmp_path / "dicom", tmp_path / "out")

    assert [c.case_id for c in converted] == ["P1_3"]
    assert_same_world(original, affine, tmp_path / "out" / "imagesTr" / "P1_3.nii.gz")


def test_mixed_series_in_one_folder_and_one_folder_per_series(tmp_path: Path) -> None:
    a, b, c = volume((12, 10, 6), 2), volume((8, 8, 5), 3), volume((10, 12, 4), 4)
    write_series(tmp_path / "dicom" / "mixed", a, AXIAL, patient="P1", number=1)
    write_series(tmp_path / "dicom" / "mixed", b, oblique(), patient="P1", number=2, slope=0.5, intercept=-100)
    write_series(tmp_path / "dicom" / "other" / "deeper", c, AXIAL, patient="P2", number=1)

    converted = {s.case_id: s for s in convert_dicom(tmp_path / "dicom", tmp_path / "out")}

    assert sorted(converted) == ["P1_1", "P1_2", "P2_1"]
    for case_id, original, affine in (("P1_1", a, AXIAL), ("P1_2", b, oblique()), ("P2_1", c, AXIAL)):
        assert_same_world(original, affine, converted[case_id].image)
    dataset = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert sorted(dataset["test"]) == [f"./imagesTr/{c}.nii.gz" for c in ("P1_1", "P1_2", "P2_1")]


def test_labelled_series_form_the_msd_layout_a_site_agent_reads(tmp_path: Path) -> None:
    original = volume((16, 16, 8), 5)
    write_series(tmp_path / "dicom", original, oblique(), patient="P7", number=4)
    labels = tmp_path / "labels"
    labels.mkdir()
    label = (original > 600).astype(np.uint8)
    nib.save(nib.Nifti1Image(label, oblique()), str(labels / "P7_4.nii.gz"))  # on the original's grid

    convert_dicom(tmp_path / "dicom", tmp_path / "out", labels_dir=labels)

    cases = discover_cases(tmp_path / "out")
    assert [c.case_id for c in cases] == ["P7_4"]
    converted, _, _ = load_image(cases[0].image_paths)
    reference = tmp_path / "reference.nii.gz"
    nib.save(nib.Nifti1Image(original, oblique()), str(reference))
    expected, _, _ = load_image(reference)
    np.testing.assert_array_equal(converted, expected)  # the same voxels in the agent's RAS order
    assert_same_world(label.astype(np.float32), oblique(), cases[0].label_path)


def test_a_dicom_file_shipped_with_pydicom(tmp_path: Path) -> None:
    source = Path(pydicom.data.get_testdata_file("MR_small.dcm"))
    (tmp_path / "dicom").mkdir()
    shutil.copy(source, tmp_path / "dicom" / source.name)
    ds = pydicom.dcmread(source)

    [converted] = convert_dicom(tmp_path / "dicom", tmp_path / "out")

    img = nib.load(str(converted.image))
    data = np.asarray(img.get_fdata())
    expected = ds.pixel_array.astype(np.float64) * float(getattr(ds, "RescaleSlope", 1)) + float(getattr(ds, "RescaleIntercept", 0))
    np.testing.assert_array_equal(data[:, :, 0].T, expected)  # NIfTI i runs along the columns
    first_voxel_ras = img.affine @ [0, 0, 0, 1]
    np.testing.assert_allclose(LPS @ first_voxel_ras[:3], [float(v) for v in ds.ImagePositionPatient], atol=1e-4)


def test_a_folder_without_dicom_is_refused_and_nothing_written(tmp_path: Path, capsys) -> None:
    (tmp_path / "notdicom").mkdir()
    (tmp_path / "notdicom" / "readme.txt").write_text("not an image")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), str(tmp_path / "notdicom" / "scan.nii.gz"))

    code = fedseg_main(["convert", "--dicom", str(tmp_path / "notdicom"), "--out", str(tmp_path / "out")])

    assert code == 2
    err = capsys.readouterr().err
    assert "no DICOM image series" in err and "looked at 2 file(s)" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(DicomError, match="is not a folder"):
        convert_dicom(tmp_path / "missing", tmp_path / "out")
