"""The lean default's widths (8, 16, 48, 96, 192), and checkpoints written under the earlier ones."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from model import build_model, load_checkpoint, save_checkpoint
from model.transformer_unet import DEFAULT_CHANNELS

OLD_LEAN = [8, 16, 32, 64, 128]
CONFIG = dict(in_channels=1, out_channels=4, img_size=[32, 16, 16])


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _write_without_channels(path: Path, net: torch.nn.Module, **options: object) -> None:
    # As a checkpoint written when these widths were the default: the config names no channels.
    save_checkpoint(path, net, architecture="transformer_unet", config=dict(CONFIG, **options))
    payload = torch.load(path, weights_only=True)
    config = {k: v for k, v in dict(CONFIG, **options).items() if k != "channels"}
    payload["meta"] = json.dumps({"architecture": "transformer_unet", "config": config, "extra": {}})
    torch.save(payload, path)


def test_default_widths_are_the_wider_lean_ones() -> None:
    assert DEFAULT_CHANNELS["lean"] == (8, 16, 48, 96, 192)
    assert DEFAULT_CHANNELS["classic"] == (16, 32, 64, 128)
    assert build_model("transformer_unet", **CONFIG).channels == (8, 16, 48, 96, 192)  # type: ignore[union-attr]


def test_checkpoint_of_the_earlier_lean_default_loads_with_its_widths(tmp_path: Path) -> None:
    torch.manual_seed(0)
    old = build_model("transformer_unet", **CONFIG, channels=OLD_LEAN).eval()
    path = tmp_path / "lean-8-128.pt"
    _write_without_channels(path, old, channels=OLD_LEAN)
    x = torch.randn(1, 1, 32, 16, 16)

    loaded, meta = load_checkpoint(path)

    assert meta["config"]["channels"] == OLD_LEAN
    assert "design" not in meta["config"]
    assert torch.equal(loaded.eval()(x), old(x))


def test_checkpoint_of_the_current_default_keeps_its_config(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = build_model("transformer_unet", **CONFIG).eval()
    path = tmp_path / "lean.pt"
    _write_without_channels(path, net)
    x = torch.randn(1, 1, 32, 16, 16)

    loaded, meta = load_checkpoint(path)

    assert meta["config"] == CONFIG  # nothing added when the weights have the default widths
    assert torch.equal(loaded.eval()(x), net(x))


def test_cnn_unet_checkpoint_without_channels_loads_with_its_widths(tmp_path: Path) -> None:
    torch.manual_seed(0)
    old = build_model("cnn_unet", **CONFIG, channels=[8, 16, 32]).eval()
    path = tmp_path / "cnn.pt"
    save_checkpoint(path, old, architecture="cnn_unet", config=dict(CONFIG, channels=[8, 16, 32]))
    payload = torch.load(path, weights_only=True)
    payload["meta"] = json.dumps({"architecture": "cnn_unet", "config": CONFIG, "extra": {}})
    torch.save(payload, path)

    loaded, meta = load_checkpoint(path)

    assert meta["config"]["channels"] == [8, 16, 32]
    x = torch.randn(1, 1, 32, 16, 16)
    assert torch.equal(loaded.eval()(x), old(x))
