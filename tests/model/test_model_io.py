"""Checkpoints (pickle-free round trip, validation, atomic write) and sliding-window inference."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from model import build_model, load_checkpoint, save_checkpoint, sliding_window_predict

CONFIG: dict[str, Any] = dict(in_channels=1, out_channels=3, img_size=[16, 16, 16], channels=[8, 16, 32], num_transformer_layers=1, num_heads=2)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture
def net() -> nn.Module:
    torch.manual_seed(0)
    model = build_model("transformer_unet", **CONFIG)
    # Move every weight off its initial value so a round trip that loses one would show.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model.eval()


# --- checkpoints ---------------------------------------------------------------------------------


def test_round_trip_gives_identical_outputs_and_metadata(net: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "ckpt" / "round_3.pt"  # the folder does not exist yet
    x = torch.randn(1, 1, 16, 16, 16)
    save_checkpoint(path, net, architecture="transformer_unet", config=CONFIG, extra={"round": 3, "dice": 0.71})

    loaded, meta = load_checkpoint(path)

    assert torch.equal(loaded.eval()(x), net(x))
    assert meta["architecture"] == "transformer_unet"
    assert meta["config"] == CONFIG
    assert meta["extra"] == {"round": 3, "dice": 0.71}
    assert meta["version"] == 1


def test_file_loads_with_weights_only_and_holds_plain_values(net: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    save_checkpoint(path, net.state_dict(), architecture="transformer_unet", config=CONFIG)

    payload = torch.load(path, weights_only=True)

    assert payload["format"] == "fedsegnet-checkpoint"
    assert isinstance(payload["meta"], str)
    assert set(payload["state_dict"]) == set(net.state_dict())
    assert all(isinstance(v, torch.Tensor) for v in payload["state_dict"].values())


def test_atomic_write_leaves_only_the_checkpoint(net: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    save_checkpoint(path, net, architecture="transformer_unet", config=CONFIG)
    save_checkpoint(path, net, architecture="transformer_unet", config=CONFIG)  # overwrite in place

    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


def test_failed_save_keeps_the_previous_file(net: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    save_checkpoint(path, net, architecture="transformer_unet", config=CONFIG, extra={"round": 1})
    before = path.read_bytes()

    with pytest.raises(ValueError, match="JSON-serialisable"):
        save_checkpoint(path, net, architecture="transformer_unet", config=CONFIG, extra={"when": object()})

    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


@pytest.mark.parametrize(
    ("architecture", "config", "message"),
    [
        ("transformer_unet", {k: v for k, v in CONFIG.items() if k != "img_size"}, r"config is missing \['img_size'\]"),
        ("transformer_unet", dict(CONFIG, channels=[8, 16, 64]), r"has shape .* expects"),
        ("cnn_unet", {k: v for k, v in CONFIG.items() if k not in ("num_transformer_layers", "num_heads")}, "unexpected"),
        ("vnet", CONFIG, "unknown architecture 'vnet'"),
    ],
)
def test_config_that_does_not_rebuild_these_weights_is_refused_at_save(
    net: nn.Module, tmp_path: Path, architecture: str, config: dict, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        save_checkpoint(tmp_path / "m.pt", net, architecture=architecture, config=config)
    assert not (tmp_path / "m.pt").exists()


def test_checkpoint_from_before_the_lean_default_loads_as_classic(tmp_path: Path) -> None:
    # A checkpoint written before the "design" option existed: classic weights, config without it.
    torch.manual_seed(0)
    classic = build_model("transformer_unet", **CONFIG, design="classic").eval()
    path = tmp_path / "old.pt"
    save_checkpoint(path, classic, architecture="transformer_unet", config=dict(CONFIG, design="classic"))
    payload = torch.load(path, weights_only=True)
    payload["meta"] = json.dumps({"architecture": "transformer_unet", "config": CONFIG, "extra": {}})
    torch.save(payload, path)
    x = torch.randn(1, 1, 16, 16, 16)

    loaded, meta = load_checkpoint(path)

    assert meta["config"] == dict(CONFIG, design="classic")
    assert torch.equal(loaded.eval()(x), classic(x))


def test_lean_weights_under_a_classic_config_are_refused(net: nn.Module, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not match architecture 'transformer_unet'"):
        save_checkpoint(tmp_path / "x.pt", net, architecture="transformer_unet", config=dict(CONFIG, design="classic"))


def test_a_foreign_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="not a FedSegNet checkpoint"):
        load_checkpoint(path)


def test_a_pickled_object_is_refused_by_weights_only(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"format": "fedsegnet-checkpoint", "payload": Path("/etc/passwd")}, path)
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        load_checkpoint(path)


# --- sliding-window inference --------------------------------------------------------------------


def test_sliding_window_covers_a_volume_of_any_size(net: nn.Module) -> None:
    image = torch.randn(1, 1, 20, 18, 22)  # two overlapping 16³ windows along each axis, none divisible

    probs = sliding_window_predict(net, image, roi_size=(16, 16, 16), overlap=0.25)

    assert probs.shape == (1, 3, 20, 18, 22)
    assert type(probs) is torch.Tensor  # not a MONAI MetaTensor
    assert torch.allclose(probs.sum(dim=1), torch.ones(1, 20, 18, 22), atol=1e-5)
    assert (probs >= 0).all()


def test_one_window_equals_the_plain_forward_pass(net: nn.Module) -> None:
    image = torch.randn(1, 1, 16, 16, 16)

    probs = sliding_window_predict(net, image, roi_size=(16, 16, 16))

    with torch.no_grad():
        expected = net(image).softmax(dim=1)
    assert torch.allclose(probs, expected, atol=1e-5)


def test_roi_not_divisible_is_rounded_up_and_small_volumes_padded(net: nn.Module) -> None:
    image = torch.randn(2, 1, 10, 20, 13)  # smaller than the window along D and W, divisible by nothing

    probs = sliding_window_predict(net, image, roi_size=(12, 18, 12), sw_batch_size=2)

    assert probs.shape == (2, 3, 10, 20, 13)


def test_fixed_size_model_needs_its_size() -> None:
    unetr = build_model("unetr", in_channels=1, out_channels=2, img_size=(32, 32, 32),
                        feature_size=8, hidden_size=48, mlp_dim=96, num_heads=4).eval()
    with pytest.raises(ValueError, match=r"only accepts inputs of size \(32, 32, 32\)"):
        sliding_window_predict(unetr, torch.zeros(1, 1, 40, 40, 40), roi_size=(16, 16, 16))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(roi_size=(16, 16)), "roi_size must be three positive ints"),
        (dict(roi_size=(16, 16, 16), overlap=1.0), r"overlap must be in \[0, 1\)"),
        (dict(roi_size=(16, 16, 16), sw_batch_size=0), "sw_batch_size must be >= 1"),
    ],
)
def test_bad_window_arguments_are_refused(net: nn.Module, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sliding_window_predict(net, torch.zeros(1, 1, 16, 16, 16), **kwargs)


@pytest.mark.parametrize(
    ("architecture", "options", "img_size"),
    [
        ("cnn_unet", dict(channels=[8, 16, 32]), [16, 16, 16]),
        ("unet", dict(channels=[4, 8, 16], strides=[2, 2]), [16, 16, 16]),
        pytest.param("unetr", dict(feature_size=8, hidden_size=48, mlp_dim=96, num_heads=4), [32, 32, 32],
                     marks=pytest.mark.slow),  # builds UNETR three times (a second of CPU)
        # SwinUNETR cannot be built on the meta device: this also covers the CPU fallback of the save-time check
        pytest.param("swin_unetr", dict(feature_size=12, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1]), [32, 32, 64],
                     marks=pytest.mark.slow),  # builds SwinUNETR three times (seconds of CPU)
    ],
)
def test_every_architecture_round_trips(tmp_path: Path, architecture: str, options: dict, img_size: list[int]) -> None:
    config = dict(in_channels=1, out_channels=2, img_size=img_size, **options)
    torch.manual_seed(0)
    model = build_model(architecture, **config).eval()
    x = torch.randn(1, 1, *img_size)
    save_checkpoint(tmp_path / "m.pt", model, architecture=architecture, config=config)

    loaded, meta = load_checkpoint(tmp_path / "m.pt")

    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model(x))
    assert meta["architecture"] == architecture
