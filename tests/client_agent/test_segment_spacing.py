"""``fedseg segment`` on a federation model that records its spacing: any orientation, spacing, field of view."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from experiments.simulate import load_simulation_config, write_initial_model
from fedseg.cli import main

CONFIG = """
[simulation]
generator = "synth"
size = 16
spacing_mm = 4.0

[federation]
sites = ["site-1", "site-2", "site-3"]

[model]
architecture = "cnn_unet"
img_size = [16, 16, 16]

[model.options]
channels = [4, 8, 16]
"""


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("model")
    (folder / "sim.toml").write_text(CONFIG)
    _, federation, federation_toml = load_simulation_config(folder / "sim.toml")
    assert federation.model.spacing_mm == 4.0  # the randomized sites' spacing is recorded with the model
    (folder / "federation.toml").write_text(federation_toml)
    return write_initial_model(federation, folder / "global.frames"), folder / "federation.toml"


def _brain(shape: tuple[int, ...]) -> np.ndarray:
    r = np.sqrt(((np.indices(shape[:3]) - (np.asarray(shape[:3])[:, None, None, None] - 1) / 2.0) ** 2).sum(axis=0))
    return np.where(r < min(shape[:3]) / 3, 100.0 - 2 * r, 0.0).astype(np.float32)


def _oblique() -> np.ndarray:
    a = np.deg2rad(30.0)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]) * 2.0
    return affine


SCANS = {
    "lps": (np.diag([-2.0, -2.0, 2.0, 1.0]), (30, 30, 30)),
    "oblique": (_oblique(), (30, 30, 30)),
    "anisotropic_1x1x4": (np.diag([1.0, 1.0, 4.0, 1.0]), (60, 60, 15)),
    "large_field_of_view": (np.diag([1.0, 1.0, 1.0, 1.0]), (120, 100, 90)),
    "4d_one_volume": (np.diag([2.0, 2.0, 2.0, 1.0]), (30, 30, 30, 1)),
}


@pytest.mark.parametrize("case", sorted(SCANS))
def test_the_mask_lies_on_the_input_grid(case: str, model: tuple[Path, Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    affine, shape = SCANS[case]
    data = _brain(shape)[..., None] if len(shape) == 4 else _brain(shape)
    scan = tmp_path / f"{case}.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(scan))
    out = tmp_path / "mask.nii.gz"

    code = main(["segment", "--model", str(model[0]), "--config", str(model[1]), "--input", str(scan),
                 "--output", str(out)])

    assert code == 0, capsys.readouterr().err
    mask = nib.load(str(out))
    assert mask.shape == tuple(shape[:3]) and np.allclose(mask.affine, affine)
    assert np.asarray(mask.dataobj).dtype == np.uint8


@pytest.mark.parametrize("data, message", [
    (np.zeros((20, 20, 20), np.float32), "constant"),
    (np.full((20, 20, 20), 3.0, np.float32), "constant"),
    (np.ones((20, 20, 20, 3), np.float32), "3 volumes"),
])
def test_scans_it_cannot_segment_get_a_clear_error_naming_the_file(data: np.ndarray, message: str,
                                                                  model: tuple[Path, Path], tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    scan = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(scan))
    code = main(["segment", "--model", str(model[0]), "--config", str(model[1]), "--input", str(scan),
                 "--output", str(tmp_path / "mask.nii.gz")])
    err = capsys.readouterr().err
    assert code == 2 and str(scan) in err and message in err
    assert not (tmp_path / "mask.nii.gz").exists()


def test_resize_mode_stays_available(model: tuple[Path, Path], tmp_path: Path) -> None:
    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(_brain((24, 24, 24)), np.diag([2.0, 2.0, 2.0, 1.0])), str(scan))
    assert main(["segment", "--model", str(model[0]), "--config", str(model[1]), "--input", str(scan),
                 "--output", str(tmp_path / "m.nii.gz"), "--mode", "resize"]) == 0
    assert nib.load(str(tmp_path / "m.nii.gz")).shape == (24, 24, 24)
