"""A model trained on windows predicts by windows: `fedseg train --patch-size`, federation models, export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aggregator_service.config import parse_federation_config
from client_agent.centralized import TrainSettings, train_centralized
from client_agent.export import bundle_inference_config, bundle_metadata
from client_agent.inference import load_model, predict_labels
from client_agent.spacing import load_scan
from experiments.simulate import write_initial_model
from experiments.sitedata import generate_federation
from model import load_checkpoint

TINY = {"channels": [4, 8, 16], "num_transformer_layers": 1, "num_heads": 2}


@pytest.fixture(scope="module")
def federation_data(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return generate_federation(tmp_path_factory.mktemp("fed") / "data", sites=1, cases_per_site=3, test_cases=1,
                               size=48, spacing_mm=2.0)


@pytest.fixture(scope="module")
def checkpoint(federation_data, tmp_path_factory: pytest.TempPathFactory) -> Path:  # type: ignore[no-untyped-def]
    out = tmp_path_factory.mktemp("train") / "best.pt"
    train_centralized(TrainSettings(data_dirs=(federation_data.site_dirs[0],), val_dirs=(federation_data.test_dir,),
                                    out=out, img_size=24, options=TINY, epochs=1, lr=2e-3, device="cpu",
                                    augment=False, spacing_mm=4.0, patch_size=(16, 16, 16)))
    return out


def test_the_checkpoint_records_the_window_and_prediction_slides_it(checkpoint: Path, federation_data) -> None:  # type: ignore[no-untyped-def]
    _, meta = load_checkpoint(checkpoint, map_location="cpu")
    assert meta["extra"]["preprocess"]["patch_size"] == [16, 16, 16]
    model = load_model(checkpoint, device="cpu")
    assert model.patch_size == (16, 16, 16)
    assert model.window() == (16, 16, 16) and model.window([24, 24, 24]) == (24, 24, 24)
    scan = sorted((federation_data.test_dir / "imagesTr").glob("*.nii.gz"))[0]
    image, _ = load_scan(scan)
    default = predict_labels(model, image[None], (2.0, 2.0, 2.0))
    assert np.array_equal(default, predict_labels(model, image[None], (2.0, 2.0, 2.0), roi=(16, 16, 16)))
    # The exported bundle slides the same windows.
    assert bundle_inference_config(model)["inferer"]["roi_size"] == [16, 16, 16]
    assert bundle_metadata(model)["network_data_format"]["inputs"]["image"]["is_patch_data"] is True


def test_a_federation_model_takes_its_window_from_the_config(tmp_path: Path) -> None:
    toml = tmp_path / "federation.toml"
    toml.write_text('[model]\narchitecture = "transformer_unet"\nimg_size = [24, 24, 24]\npatch_size = [16, 16, 8]\n'
                    '[model.options]\nchannels = [4, 8, 16]\nnum_transformer_layers = 1\nnum_heads = 2\n')
    frames = write_initial_model(parse_federation_config(
        {"model": {"img_size": [24, 24, 24], "patch_size": [16, 16, 8], "options": TINY}}), tmp_path / "m.frames")
    model = load_model(frames, config_path=toml, device="cpu")
    assert model.patch_size == (16, 16, 8) and model.window() == (16, 16, 8)


@pytest.mark.parametrize("patch, message", [
    ((32, 32, 32), r"patch_size \[32, 32, 32\] does not fit in volumes of \[24, 24, 24\]"),
    ((12, 12, 10), r"patch_size \[12, 12, 10\] must be a multiple of 4"),
])
def test_fedseg_train_refuses_a_window_its_network_cannot_take(patch: tuple, message: str, federation_data,  # type: ignore[no-untyped-def]
                                                                tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=message):
        train_centralized(TrainSettings(data_dirs=(federation_data.site_dirs[0],), out=tmp_path / "x.pt", img_size=24,
                                        options=TINY, epochs=1, device="cpu", augment=False, spacing_mm=4.0,
                                        patch_size=patch))
