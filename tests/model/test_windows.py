"""Predicting by the training window: model.window_logits and model.check_window."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model import build_model, check_window, window_logits


class _Pointwise(nn.Module):
    """A 1x1x1 convolution: each voxel's logits depend on that voxel only, so any windowing agrees."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv3d(1, 3, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_windows_reproduce_a_pointwise_network_everywhere() -> None:
    net = _Pointwise().eval()
    image = torch.randn(2, 1, 12, 10, 14)
    with torch.no_grad():
        whole = torch.softmax(net(image), dim=1)
        windowed = window_logits(net, image, (4, 6, 8))
    assert windowed.shape == whole.shape
    torch.testing.assert_close(torch.softmax(windowed, dim=1), whole, atol=1e-5, rtol=1e-4)


def test_no_window_or_one_as_large_as_the_volume_is_one_pass() -> None:
    net = _Pointwise().eval()
    image = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(window_logits(net, image, None), net(image))
        torch.testing.assert_close(window_logits(net, image, (8, 8, 8)), net(image))


def test_windows_differ_from_one_pass_for_a_network_with_context() -> None:
    # Instance norm and the transformer see the whole input: a window is another input.
    net = build_model("transformer_unet", in_channels=1, out_channels=3, img_size=(16, 16, 16),
                      channels=[4, 8, 16], num_transformer_layers=1, num_heads=2).eval()
    image = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        whole, windowed = net(image), window_logits(net, image, (8, 8, 8))
    assert windowed.shape == whole.shape and torch.isfinite(windowed).all()
    assert not torch.allclose(torch.softmax(windowed, 1), torch.softmax(whole, 1), atol=1e-3)


def test_a_training_window_must_suit_the_network() -> None:
    net = build_model("transformer_unet", in_channels=1, out_channels=3, img_size=(16, 16, 16),
                      channels=[4, 8, 16], num_transformer_layers=1, num_heads=2)
    check_window(net, (8, 12, 16))  # multiples of 4 (two downsamplings)
    with pytest.raises(ValueError, match=r"patch_size \[8, 10, 8\] must be a multiple of 4 .* e.g. \[8, 12, 8\]"):
        check_window(net, (8, 10, 8))
    # 4 / 4 = one voxel at the coarsest level, where instance norm cannot normalize: refused up front.
    with pytest.raises(ValueError, match=r"patch_size \[4, 8, 8\] leaves one voxel .* downsamples by 4.*at least 8"):
        check_window(net, (4, 8, 8))
    fixed = build_model("unetr", in_channels=1, out_channels=3, img_size=(32, 32, 32))
    with pytest.raises(ValueError, match=r"only takes inputs of \[32, 32, 32\] voxels"):
        check_window(fixed, (16, 16, 16))


def test_a_prediction_window_too_small_for_the_network_is_enlarged_instead_of_crashing() -> None:
    net = build_model("transformer_unet", in_channels=1, out_channels=3, img_size=(16, 16, 16),
                      channels=[4, 8, 16], num_transformer_layers=1, num_heads=2).eval()
    image = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        small, smallest_valid = window_logits(net, image, (4, 4, 4)), window_logits(net, image, (8, 8, 8))
    torch.testing.assert_close(small, smallest_valid)  # (4, 4, 4) ran as (8, 8, 8)
