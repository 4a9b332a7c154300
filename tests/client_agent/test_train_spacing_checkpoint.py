"""`fedseg train --spacing-mm` records what inference needs, and `fedseg segment` then resamples to it."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from client_agent.centralized import TrainSettings, dataset_names, train_centralized
from client_agent.inference import default_segment_mode, load_model, segment_file
from experiments.sitedata import generate_federation
from model import load_checkpoint

TINY = {"channels": [4, 8, 16], "num_transformer_layers": 1, "num_heads": 2}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    # 48³ at 2 mm: the 96 mm field of view of the 24³ grid at 4 mm, on the templates other tests load too.
    fed = generate_federation(tmp_path_factory.mktemp("fed") / "data", sites=1, cases_per_site=3, test_cases=1,
                              size=48, spacing_mm=2.0)
    out = tmp_path_factory.mktemp("train") / "best.pt"
    train_centralized(TrainSettings(data_dirs=(fed.site_dirs[0],), val_dirs=(fed.test_dir,), out=out, img_size=24,
                                    options=TINY, epochs=1, lr=2e-3, device="cpu", augment=False, spacing_mm=4.0))
    return out, fed.test_dir


def test_the_checkpoint_records_spacing_normalization_channel_and_class_names(checkpoint) -> None:
    path, _ = checkpoint
    _, meta = load_checkpoint(path, map_location="cpu")
    preprocess = meta["extra"]["preprocess"]
    assert preprocess["spacing_mm"] == 4.0
    assert preprocess["normalize"] == "nonzero"
    assert preprocess["grid_spacing_mm"] == [4.0, 4.0, 4.0]
    assert preprocess["channel_names"] == ["T1"]
    assert preprocess["class_names"] == ["background", "CSF", "grey matter", "white matter"]
    assert default_segment_mode(load_model(path, device="cpu")) == "spacing"


def test_segment_writes_the_mask_on_the_scan_grid_and_the_same_mask_for_an_lps_copy(checkpoint,
                                                                                     tmp_path: Path) -> None:
    path, test_dir = checkpoint
    scan = sorted((test_dir / "imagesTr").glob("*.nii.gz"))[0]
    img = nib.load(str(scan))
    data = np.asarray(img.dataobj, dtype=np.float32)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = np.asarray(data.shape[:2]) - 1
    lps = tmp_path / "lps.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data[::-1, ::-1]), img.affine @ flip), str(lps))
    model = load_model(path, device="cpu")

    ras_mask = segment_file(model, scan, tmp_path / "ras-mask.nii.gz")
    lps_mask = segment_file(model, lps, tmp_path / "lps-mask.nii.gz")

    written = nib.load(str(tmp_path / "lps-mask.nii.gz"))
    assert ras_mask.shape == lps_mask.shape == data.shape
    np.testing.assert_allclose(written.affine, img.affine @ flip)
    ras = np.asarray(nib.load(str(tmp_path / "ras-mask.nii.gz")).dataobj)
    assert np.array_equal(np.asarray(written.dataobj)[::-1, ::-1], ras)


def test_dataset_names_read_msd_and_nnunet_tables(tmp_path: Path) -> None:
    (tmp_path / "msd").mkdir()
    (tmp_path / "msd" / "dataset.json").write_text('{"modality": {"0": "T1", "1": "FLAIR"}, '
                                                   '"labels": {"0": "background", "1": "tumour"}}')
    (tmp_path / "nnunet").mkdir()
    (tmp_path / "nnunet" / "dataset.json").write_text('{"channel_names": {"0": "CT"}, '
                                                      '"labels": {"background": 0, "liver": 1}}')
    assert dataset_names(tmp_path / "msd") == (["T1", "FLAIR"], ["background", "tumour"])
    assert dataset_names(tmp_path / "nnunet") == (["CT"], ["background", "liver"])
    assert dataset_names(tmp_path / "nowhere") == (None, None)
