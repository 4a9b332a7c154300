"""Centralized train / evaluate / segment: real training on generated NIfTI sites, real files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import codec
from client_agent.data import DataError, PreprocessConfig, preprocess_image
from client_agent.centralized import TrainSettings, train_centralized
from client_agent.inference import evaluate_model, load_model, segment_file
from fedseg.cli import main as fedseg_main
from experiments.sitedata import generate_federation
from model import load_checkpoint
from support import federation_toml

SIZE = 32
TINY = {"channels": [4, 8, 16], "num_transformer_layers": 1, "num_heads": 2}
METRICS = ("dice", "iou", "hd95", "precision", "recall")


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory):
    return generate_federation(tmp_path_factory.mktemp("fed") / "data", sites=1, cases_per_site=3, test_cases=1, size=SIZE)


def settings(fed, out: Path, **overrides) -> TrainSettings:
    values = dict(
        data_dirs=(fed.site_dirs[0],), val_dirs=(fed.test_dir,), out=out, img_size=SIZE, options=TINY,
        epochs=1, lr=2e-3, device="cpu", augment=False,
    )
    values.update(overrides)
    return TrainSettings(**values)


@pytest.fixture(scope="module")
def trained(fed, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("train") / "best.pt"
    return train_centralized(settings(fed, out))


@pytest.fixture(scope="module")
def loaded(trained):
    return load_model(trained.checkpoint, device="cpu")


def test_summary_pools(fed, trained) -> None:
    assert (trained.train_cases, trained.val_cases, trained.in_channels) == (3, 1, 1)
    # labels hold 0..3 (background, CSF, GM, WM): four classes inferred without --num-classes
    assert trained.num_classes == fed.num_classes == 4
    assert trained.best_epoch == 1 and len(trained.history) == 1
    record = trained.history[0]
    assert record.best and all(math.isfinite(record.val[k]) for k in METRICS)
    assert math.isfinite(record.train_loss) and math.isfinite(record.val_loss)


def test_checkpoint_rebuilds_with_its_preprocessing(trained) -> None:
    net, meta = load_checkpoint(trained.checkpoint)

    assert meta["architecture"] == "transformer_unet"
    assert meta["config"] == {"in_channels": 1, "out_channels": 4, "img_size": [SIZE] * 3, **TINY}
    extra = meta["extra"]
    assert extra["epoch"] == 1 and extra["val"]["dice"] == pytest.approx(trained.best_dice)
    assert extra["preprocess"]["normalize"] == "nonzero" and extra["preprocess"]["label_map"] is None
    # the generated cases are 32³ at 2 mm, the grid is 32³: the grid spacing stays 2 mm
    assert extra["preprocess"]["grid_spacing_mm"] == pytest.approx([2.0, 2.0, 2.0])
    assert net(torch.zeros(1, 1, SIZE, SIZE, SIZE)).shape == (1, 4, SIZE, SIZE, SIZE)


@pytest.mark.slow  # trains for several epochs
def test_best_checkpoint_is_the_best_epoch_of_pooled_folders(fed, tmp_path: Path) -> None:
    # A second folder holding the same case ids: pooled as distinct cases, not deduplicated.
    out = tmp_path / "pooled.pt"
    # 16³ grid: the logic under test does not need the full size, and it is 8x cheaper.
    summary = train_centralized(
        settings(fed, out, data_dirs=(fed.site_dirs[0], fed.site_dirs[0]), epochs=2, lr=5e-3, img_size=16)
    )

    dices = [r.val["dice"] for r in summary.history]
    assert summary.train_cases == 6
    assert summary.best_epoch == 1 + int(np.argmax(dices))
    assert [r.best for r in summary.history] == [True, dices[1] > dices[0]]
    _, meta = load_checkpoint(out)
    assert meta["extra"]["epoch"] == summary.best_epoch


@pytest.mark.slow  # trains for several epochs
def test_sgd_trains_the_centralized_baseline_as_the_sites_would(fed, tmp_path: Path) -> None:
    summary = train_centralized(settings(fed, tmp_path / "sgd.pt", optimizer="sgd", momentum=0.9, lr=0.1,
                                         epochs=2, img_size=16))

    assert summary.history[1].train_loss < summary.history[0].train_loss
    assert summary.checkpoint.exists()


@pytest.mark.parametrize(
    "overrides, message",
    [({"optimizer": "lamb"}, r"optimizer must be one of \['adam', 'sgd'\], got 'lamb'"),
     ({"optimizer": "sgd", "momentum": 1.0}, r"momentum must be in \[0, 1\)"),
     ({"momentum": 0.5}, "momentum applies to optimizer 'sgd' only")],
)
def test_bad_optimizer_settings_are_refused(fed, tmp_path: Path, overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        settings(fed, tmp_path / "x.pt", **overrides)


@pytest.mark.slow  # trains twice
def test_training_is_reproducible_from_the_seed(fed, tmp_path: Path) -> None:
    # Augmentation on: its random draws must come from the seed too.
    first = train_centralized(settings(fed, tmp_path / "a.pt", augment=True, seed=3, img_size=16))
    second = train_centralized(settings(fed, tmp_path / "b.pt", augment=True, seed=3, img_size=16))

    a, _ = load_checkpoint(first.checkpoint)
    b, _ = load_checkpoint(second.checkpoint)
    assert first.history[0].train_loss == second.history[0].train_loss
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_evaluate_reports_per_class_and_mean(loaded, fed) -> None:
    result = evaluate_model(loaded, fed.test_dir)

    assert result["cases"] == 1 and result["grid"] == "native"
    assert list(result["per_class"]) == ["1", "2", "3"]
    for metrics in [result["mean"], *result["per_class"].values()]:
        assert set(metrics) == set(METRICS)
        assert all(math.isfinite(v) for v in metrics.values())
        assert 0.0 <= metrics["dice"] <= 1.0 and metrics["hd95"] >= 0.0
    # one case: the mean is the mean of its classes
    for k in METRICS:
        assert result["mean"][k] == pytest.approx(np.mean([m[k] for m in result["per_class"].values()]))


def test_evaluate_on_model_grid_matches_training_validation(loaded, trained, fed) -> None:
    # The validation folder was the test folder: the same model on the same grid scores the same.
    result = evaluate_model(loaded, fed.test_dir, grid="model")

    for k in METRICS:
        assert result["mean"][k] == pytest.approx(trained.history[0].val[k], abs=1e-6)


def test_evaluate_cli_prints_table_and_writes_json(trained, fed, tmp_path: Path, capsys) -> None:
    out = tmp_path / "metrics.json"
    code = fedseg_main(["evaluate", "--model", str(trained.checkpoint), "--data", str(fed.test_dir),
                             "--json", str(out), "--device", "cpu"])

    assert code == 0
    printed = capsys.readouterr().out
    assert "| mean |" in printed and "| 3 |" in printed
    written = json.loads(out.read_text())
    assert set(written["per_class"]) == {"1", "2", "3"} and set(written["mean"]) == set(METRICS)
    assert written["per_case"][0]["case_id"] == "test_000"


def write_federation_toml(path: Path, *, channels: list[int]) -> Path:
    # A fedseg simulate TOML: its [simulation] section is ignored.
    path.write_text("[simulation]\nsites = 1\n\n" + federation_toml(img_size=SIZE, channels=channels))
    return path


def test_evaluate_federation_frames_model(loaded, fed, tmp_path: Path) -> None:
    frames = tmp_path / "global.frames"
    codec.save_tensors(frames, ((k, v.detach().numpy()) for k, v in loaded.net.state_dict().items()), codec.LOSSLESS)
    config = write_federation_toml(tmp_path / "federation.toml", channels=TINY["channels"])

    from_frames = evaluate_model(load_model(frames, config_path=config, device="cpu"), fed.test_dir)
    from_checkpoint = evaluate_model(loaded, fed.test_dir)

    assert from_frames["mean"] == pytest.approx(from_checkpoint["mean"])


def test_frames_model_needs_a_matching_config(loaded, tmp_path: Path) -> None:
    frames = tmp_path / "global.frames"
    codec.save_tensors(frames, ((k, v.detach().numpy()) for k, v in loaded.net.state_dict().items()), codec.LOSSLESS)

    with pytest.raises(ValueError, match="--config"):
        load_model(frames, device="cpu")
    other = write_federation_toml(tmp_path / "other.toml", channels=[8, 16, 32])
    with pytest.raises(ValueError, match="does not fit|has shape"):
        load_model(frames, config_path=other, device="cpu")


def write_like(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return path


@pytest.mark.parametrize("shape", [(40, 36, 44), (24, 28, 20)])
def test_segment_any_size_keeps_shape_and_affine(loaded, fed, tmp_path: Path, shape) -> None:
    src = nib.load(str(fed.test_dir / "imagesTr" / "test_000.nii.gz"))
    data = np.asarray(src.dataobj, dtype=np.float32)
    # Pad (a larger field of view) or crop, centred; the affine moves the origin accordingly.
    start = [(SIZE - n) // 2 for n in shape]
    out = np.zeros(shape, dtype=np.float32)
    dst = tuple(slice(max(0, -s), max(0, -s) + min(n, SIZE)) for s, n in zip(start, shape))
    srcs = tuple(slice(max(0, s), max(0, s) + min(n, SIZE)) for s, n in zip(start, shape))
    out[dst] = data[srcs]
    affine = src.affine.copy()
    affine[:3, 3] = src.affine[:3, :3] @ np.array(start, dtype=float) + src.affine[:3, 3]
    image = write_like(tmp_path / "scan.nii.gz", out, affine)

    result = segment_file(loaded, image, tmp_path / "mask.nii.gz")

    mask = nib.load(str(tmp_path / "mask.nii.gz"))
    assert mask.shape == shape and result.shape == shape
    assert np.allclose(mask.affine, affine)
    assert mask.get_data_dtype() == np.uint8
    values = np.unique(np.asarray(mask.dataobj))
    assert set(values.tolist()) <= {0, 1, 2, 3}
    assert sum(result.class_voxels.values()) == math.prod(shape)


def test_segment_on_the_training_grid_is_the_network_argmax(loaded, fed, tmp_path: Path) -> None:
    path = fed.test_dir / "imagesTr" / "test_000.nii.gz"
    raw = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)[None]
    x = torch.from_numpy(preprocess_image(raw, config=PreprocessConfig(spatial_size=(SIZE,) * 3)))[None]
    with torch.no_grad():
        expected = loaded.net(x).argmax(dim=1)[0].numpy()

    segment_file(loaded, path, tmp_path / "mask.nii.gz")

    assert np.array_equal(np.asarray(nib.load(str(tmp_path / "mask.nii.gz")).dataobj), expected)


@pytest.mark.parametrize("reorient", ["flip_x", "swap_xy"])
def test_segment_follows_the_files_voxel_order(loaded, fed, tmp_path: Path, reorient) -> None:
    # The same physical scan stored in another voxel order must give the same mask in that order.
    src = nib.load(str(fed.test_dir / "imagesTr" / "test_000.nii.gz"))
    data = np.asarray(src.dataobj, dtype=np.float32)
    if reorient == "flip_x":
        stored = data[::-1].copy()
        to_index = np.array([[-1, 0, 0, SIZE - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=float)
    else:
        stored = data.transpose(1, 0, 2).copy()
        to_index = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=float)
    other = write_like(tmp_path / "other.nii.gz", stored, src.affine @ to_index)

    segment_file(loaded, fed.test_dir / "imagesTr" / "test_000.nii.gz", tmp_path / "a.nii.gz")
    segment_file(loaded, other, tmp_path / "b.nii.gz")

    a = np.asarray(nib.load(str(tmp_path / "a.nii.gz")).dataobj)
    b = np.asarray(nib.load(str(tmp_path / "b.nii.gz")).dataobj)
    assert np.array_equal(b, a[::-1] if reorient == "flip_x" else a.transpose(1, 0, 2))


# -------------------------------------------------------------------------------- bad inputs


def test_segment_missing_input_names_the_file(loaded, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.nii.gz: file not found"):
        segment_file(loaded, tmp_path / "nope.nii.gz", tmp_path / "mask.nii.gz")
    assert not (tmp_path / "mask.nii.gz").exists()


def test_segment_wrong_channel_count(loaded, tmp_path: Path) -> None:
    image = write_like(tmp_path / "two.nii.gz", np.ones((SIZE, SIZE, SIZE, 2), np.float32), np.eye(4))

    with pytest.raises(ValueError, match=r"2 channel\(s\), the model .* expects 1"):
        segment_file(loaded, image, tmp_path / "mask.nii.gz")


def test_segment_refuses_a_non_nifti_output(loaded, fed, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\.nii\.gz or \.nii"):
        segment_file(loaded, fed.test_dir / "imagesTr" / "test_000.nii.gz", tmp_path / "mask.png")


def test_load_model_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.pt does not exist"):
        load_model(tmp_path / "missing.pt", device="cpu")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model at all")
    with pytest.raises(ValueError, match="neither a FedSegNet checkpoint"):
        load_model(junk, device="cpu")


def test_evaluate_refuses_labels_outside_the_models_classes(loaded, fed, tmp_path: Path) -> None:
    folder = tmp_path / "bad"
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    write_like(folder / "images" / "c.nii.gz", np.ones((16, 16, 16), np.float32), np.eye(4))
    write_like(folder / "labels" / "c.nii.gz", np.full((16, 16, 16), 7, np.uint8), np.eye(4))

    with pytest.raises(DataError, match=r"label values \[7\] outside \[0, 4\)"):
        evaluate_model(loaded, folder)


def test_train_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nowhere does not exist"):
        train_centralized(TrainSettings(data_dirs=(tmp_path / "nowhere",), out=tmp_path / "m.pt", device="cpu"))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("epochs", 0, "epochs must be a positive int, got 0"),
        ("lr", -1.0, "lr must be a finite number > 0, got -1.0"),
        ("img_size", (32, 32), r"img_size must be one positive int or three"),
        ("val_fraction", 1.0, r"val_fraction must be in \(0, 1\), got 1.0"),
        ("architecture", "resnet", "unknown architecture 'resnet'"),
        ("num_classes", 1, "num_classes must be an int >= 2"),
    ],
)
def test_train_settings_are_validated(tmp_path: Path, field: str, value, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainSettings(data_dirs=(tmp_path,), out=tmp_path / "m.pt", **{field: value})


def test_cli_reports_errors_with_exit_status_2(trained, tmp_path: Path, capsys) -> None:
    code = fedseg_main(["segment", "--model", str(trained.checkpoint), "--input", str(tmp_path / "x.nii.gz"),
                             "--output", str(tmp_path / "m.nii.gz"), "--device", "cpu"])

    assert code == 2
    assert "fedseg segment:" in capsys.readouterr().err
