"""fedseg export: TorchScript, ONNX under onnxruntime, and a MONAI bundle run by MONAI's own runner."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

import codec
from client_agent.export import ONNX_ATOL, ExportError, export_model
from client_agent.inference import load_model, segment_file
from fedseg.cli import main as fedseg_main
from model import build_model, save_checkpoint
from support import federation_toml

CONFIG = {"in_channels": 1, "out_channels": 3, "img_size": [32, 32, 32], "channels": [4, 8, 16],
          "num_transformer_layers": 1, "num_heads": 2}
PREPROCESS = {"normalize": "nonzero", "label_map": None, "grid_spacing_mm": [1.5, 1.5, 1.5]}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    net = build_model("transformer_unet", **CONFIG)
    path = tmp_path_factory.mktemp("model") / "best.pt"
    save_checkpoint(path, net, architecture="transformer_unet", config=CONFIG, extra={"preprocess": PREPROCESS})
    return path


@pytest.fixture(scope="module")
def loaded(checkpoint: Path):
    return load_model(checkpoint, device="cpu")


def scan(path: Path) -> Path:
    """A 40x36x30 scan, not on the model grid, stored in a non-RAS voxel order (axes swapped and flipped)."""
    rng = np.random.default_rng(0)
    image = np.zeros((40, 36, 30), np.float32)
    image[8:30, 6:28, 5:25] = rng.normal(100, 20, (22, 22, 20))
    image[15:22, 12:20, 10:18] += 80
    affine = np.array([[-1.2, 0, 0, 30], [0, 0, 1.5, -20], [0, -1.1, 0, 10], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(image, affine), str(path))
    return path


@pytest.mark.slow
def test_bundle_runs_under_monai_to_the_mask_fedseg_segment_writes(loaded, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    export_model(loaded, "bundle", bundle, channel_names=["T1"], class_names=["background", "grey", "white"])
    image = scan(tmp_path / "scan.nii.gz")
    segment_file(loaded, image, tmp_path / "fedseg.nii.gz")

    run = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"),
         "--bundle_root", str(bundle), "--image", str(image), "--output_dir", str(tmp_path / "monai")],
        capture_output=True, text=True, timeout=600,
    )

    assert run.returncode == 0, run.stderr[-3000:]
    ours, theirs = nib.load(str(tmp_path / "fedseg.nii.gz")), nib.load(str(tmp_path / "monai" / "scan_seg.nii.gz"))
    mask = np.asarray(ours.dataobj)
    assert len(np.unique(mask)) > 1  # a mask worth comparing
    np.testing.assert_array_equal(np.asarray(theirs.dataobj), mask)
    np.testing.assert_allclose(theirs.affine, ours.affine, atol=1e-5)


@pytest.mark.slow  # traces the network
def test_bundle_layout_and_metadata(loaded, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    export_model(loaded, "bundle", bundle, channel_names=["T1"], class_names=["background", "grey", "white"])

    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["preprocessing"]["spacing_mm"] == [1.5, 1.5, 1.5]
    assert meta["preprocessing"]["normalization"] == "nonzero"
    assert meta["network_data_format"]["inputs"]["image"]["channel_def"] == {"0": "T1"}
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "background", "1": "grey", "2": "white"}
    assert json.loads((bundle / "configs" / "inference.json").read_text())["run"]
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert set(state) == set(loaded.net.state_dict())
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(bundle / "models" / "model.ts"))(x), loaded.net(x), atol=1e-4, rtol=0)


@pytest.mark.slow  # traces the network
def test_torchscript_matches_the_eager_network(loaded, tmp_path: Path) -> None:
    result = export_model(loaded, "torchscript", tmp_path / "ts")

    assert [p.name for p in result.files] == ["model.ts"]
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(result.files[0]))(x), loaded.net(x), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_onnx_agrees_with_torch_under_onnxruntime(loaded, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    result = export_model(loaded, "onnx", tmp_path / "onnx")

    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = loaded.net(x).numpy()
    got = session.run(None, {"image": x.numpy()})[0]
    assert np.abs(got - expected).max() <= ONNX_ATOL
    assert result.max_abs_diff <= ONNX_ATOL


class _DataDependent(nn.Module):
    """Its output depends on a Python branch on the data: tracing would freeze one branch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x[0, 0, 0, 0, 0]) > -1.3:
            return self.conv(x)
        return -self.conv(x)


@pytest.mark.parametrize("fmt", ["torchscript", pytest.param("onnx", marks=pytest.mark.slow)])  # ONNX: ~20 s
def test_an_unexportable_network_is_refused_and_nothing_written(fmt: str, tmp_path: Path) -> None:
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    # The check inputs (seeds 0 and 1) start with -1.13 and -1.53: they take different branches.
    model = SimpleNamespace(net=_DataDependent(), architecture="data_dependent", preprocess={},
                            config={"in_channels": 1, "out_channels": 2, "img_size": [4, 4, 4]})

    with pytest.raises(ExportError, match="data_dependent"):
        export_model(model, fmt, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_refuses_a_non_empty_out_dir_and_bad_names(loaded, tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("earlier export")

    with pytest.raises(ExportError, match="not an empty folder"):
        export_model(loaded, "torchscript", tmp_path / "taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "earlier export"
    with pytest.raises(ExportError, match="class names must be 3"):
        export_model(loaded, "bundle", tmp_path / "b", class_names=["background", "tumour"])
    with pytest.raises(ExportError, match="format must be one of"):
        export_model(loaded, "tflite", tmp_path / "c")


def test_cli_wrong_config_for_a_frames_model(loaded, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    frames = tmp_path / "global.frames"
    codec.save_tensors(frames, ((k, v.detach().numpy()) for k, v in loaded.net.state_dict().items()), codec.LOSSLESS)
    other = tmp_path / "federation.toml"
    other.write_text(federation_toml(out_channels=3, img_size=32, channels=(8, 16, 32)))

    rc = fedseg_main(["export", "--model", str(frames), "--config", str(other), "--format", "torchscript",
                      "--out", str(tmp_path / "ts")])

    assert rc == 2
    assert "does not fit the [model]" in capsys.readouterr().err
    assert not (tmp_path / "ts").exists()
