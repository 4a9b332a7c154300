"""The networks: TransformerUNet3D shapes and validation, blocks, and the build_model registry."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from model import ARCHITECTURES, TransformerUNet3D, allowed_options, build_model
from model.blocks import ConvBlock, ConvNormAct, sinusoidal_position_encoding_3d

TINY: dict[str, Any] = dict(channels=(8, 16, 32), num_transformer_layers=1, num_heads=2)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def tiny(in_channels: int = 1, out_channels: int = 4, **overrides: object) -> TransformerUNet3D:
    torch.manual_seed(0)
    return TransformerUNet3D(in_channels=in_channels, out_channels=out_channels, **{**TINY, **overrides})


def n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# --- TransformerUNet3D ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("in_channels", "out_channels", "shape"),
    [
        (1, 4, (1, 1, 32, 32, 32)),
        (2, 3, (2, 2, 32, 16, 32)),  # non-cubic, batch of 2, two modalities
        (1, 2, (1, 1, 8, 12, 16)),  # any multiple of 4, not only the training size
    ],
)
def test_forward_gives_logits_of_input_size(in_channels: int, out_channels: int, shape: tuple[int, ...]) -> None:
    net = tiny(in_channels, out_channels)
    x = torch.randn(shape)

    y = net(x)

    assert y.shape == (shape[0], out_channels, *shape[2:])
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("shape", [(1, 1, 30, 32, 32), (1, 1, 32, 18, 32), (1, 1, 32, 32, 2)])
def test_size_not_divisible_is_refused_with_the_size(shape: tuple[int, ...]) -> None:
    net = tiny()
    with pytest.raises(ValueError, match=r"\(" + ", ".join(str(s) for s in shape[2:]) + r"\).*divisible by 4"):
        net(torch.zeros(shape))


def test_wrong_channel_count_is_refused() -> None:
    with pytest.raises(ValueError, match="expected 1 input channel"):
        tiny()(torch.zeros(1, 2, 16, 16, 16))


@pytest.mark.parametrize(
    "config", [TINY, {}, dict(TINY, num_transformer_layers=0), dict(design="classic")], ids=["tiny", "default", "cnn", "classic"]
)
def test_state_dict_holds_only_floating_tensors(config: dict) -> None:
    net = TransformerUNet3D(in_channels=1, out_channels=4, **config)

    state = net.state_dict()

    assert state  # a non-empty state dict
    assert all(v.is_floating_point() for v in state.values())
    assert list(net.buffers()) == []
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


def test_transformer_adds_exactly_its_blocks_parameters() -> None:
    # Bottleneck width E = 32, MLP width 4E = 128, one block + the final LayerNorm:
    #   LN 2E + qkv (E*3E + 3E) + proj (E*E + E) + LN 2E + fc1 (E*4E + 4E) + fc2 (4E*E + E) + LN 2E
    e = 32
    expected = 2 * e + (3 * e * e + 3 * e) + (e * e + e) + 2 * e + (4 * e * e + 4 * e) + (4 * e * e + e) + 2 * e
    assert expected == 12768

    with_transformer = n_params(tiny())
    without = n_params(tiny(num_transformer_layers=0))

    assert with_transformer - without == expected


def test_parameter_counts_of_documented_configs() -> None:
    # Pinned so that a silent architecture change shows up (and the report's numbers stay true).
    assert n_params(TransformerUNet3D(in_channels=1, out_channels=4)) == 5_338_820  # (8, 16, 48, 96, 192); the lean default before it, (8, 16, 32, 64, 128): 2_404_820
    assert n_params(tiny()) == 129_684
    # the network before the lean default, still built by design="classic"
    assert n_params(TransformerUNet3D(in_channels=1, out_channels=4, design="classic")) == 2_390_196
    assert n_params(tiny(design="classic")) == 133_340


def test_lean_default_layout() -> None:
    net = TransformerUNet3D(in_channels=4, out_channels=4)

    assert net.design == "lean"
    assert net.channels == (8, 16, 48, 96, 192)
    assert net.size_divisor == 16
    # one thin convolution on each side of full resolution, residual blocks below
    assert isinstance(net.stem, ConvNormAct)
    assert isinstance(net.up[-1].fuse, ConvNormAct)
    assert all(isinstance(up.fuse, ConvBlock) for up in net.up[:-1])
    assert isinstance(TransformerUNet3D(in_channels=4, out_channels=4, design="classic").stem, ConvBlock)


@pytest.mark.slow  # traces two full-size networks
def test_lean_default_training_step_fits_the_flop_budget() -> None:
    # 128³, 4 channels, 4 classes, batch 2: forward + backward <= 500 GFLOP (counted on the meta
    # device, no memory or compute); the classic design costs 1,667.
    from torch.utils.flop_counter import FlopCounterMode

    def gflop(**options: object) -> float:
        net = TransformerUNet3D(in_channels=4, out_channels=4, **options).to("meta")
        with FlopCounterMode(display=False) as counter:
            net(torch.empty(2, 4, 128, 128, 128, device="meta")).sum().backward()
        return counter.get_total_flops() / 1e9

    lean = gflop()
    assert 300 < lean <= 500
    assert gflop(design="classic") > 3 * lean


def test_lean_and_classic_give_the_same_interface() -> None:
    x = torch.randn(2, 1, 32, 16, 32)
    for design in ("lean", "classic"):
        assert tiny(design=design)(x).shape == (2, 4, 32, 16, 32)


def test_gradients_reach_every_parameter() -> None:
    net = tiny()
    net(torch.randn(1, 1, 16, 16, 16)).square().mean().backward()

    missing = [name for name, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]

    assert missing == []


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(in_channels=0), "in_channels must be a positive int, got 0"),
        (dict(out_channels=1.5), "out_channels must be a positive int"),
        (dict(channels=()), "channels must be a non-empty sequence"),
        (dict(channels=(8, -16)), r"channels\[1\] must be a positive int, got -16"),
        (dict(num_transformer_layers=-1), "num_transformer_layers must be an int >= 0, got -1"),
        (dict(num_heads=3), r"num_heads \(3\) must divide the bottleneck width channels\[-1\] \(32\)"),
        (dict(mlp_ratio=0), "mlp_ratio must be a number > 0, got 0"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\), got 1.0"),
        (dict(design="fat"), r"design must be one of \['lean', 'classic'\], got 'fat'"),
    ],
)
def test_invalid_config_is_refused_with_an_actionable_message(overrides: dict, message: str) -> None:
    kwargs = dict(in_channels=1, out_channels=4, **TINY)
    kwargs.update(overrides)
    with pytest.raises(ValueError, match=message):
        TransformerUNet3D(**kwargs)


def test_eval_mode_is_deterministic_with_dropout() -> None:
    net = tiny(dropout=0.5).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    assert torch.equal(net(x), net(x))


# --- positional encoding -------------------------------------------------------------------------


def test_position_encoding_values_at_known_positions() -> None:
    # dim 12 -> 4 channels per axis: [sin f0, sin f1, cos f0, cos f1] with f0 = 1, f1 = 10000^(-1/2) = 0.01.
    pe = sinusoidal_position_encoding_3d((2, 3, 4), 12).reshape(2, 3, 4, 12)

    assert torch.allclose(pe[0, 0, 0], torch.tensor([0.0, 0, 1, 1] * 3))
    d, h, w = 1, 2, 3
    expected = []
    for pos in (d, h, w):
        expected += [torch.sin(torch.tensor(pos * 1.0)), torch.sin(torch.tensor(pos * 0.01)),
                     torch.cos(torch.tensor(pos * 1.0)), torch.cos(torch.tensor(pos * 0.01))]
    assert torch.allclose(pe[d, h, w], torch.stack(expected), atol=1e-6)


def test_position_encoding_pads_leftover_channels_with_zeros_and_separates_voxels() -> None:
    pe = sinusoidal_position_encoding_3d((4, 4, 4), 16)  # 16 = 3 * 4 + 4 leftover

    assert pe.shape == (64, 16)
    assert torch.equal(pe[:, 12:], torch.zeros(64, 4))
    assert torch.unique(pe[:, :12], dim=0).shape[0] == 64  # every voxel gets its own code


# --- registry ------------------------------------------------------------------------------------

# Small enough to build and run in about a second each on one CPU thread.
TINY_OPTIONS: dict[str, tuple[dict[str, Any], tuple[int, int, int]]] = {
    "transformer_unet": (TINY, (32, 32, 32)),
    "cnn_unet": (dict(channels=(8, 16, 32)), (32, 32, 32)),
    "unet": (dict(channels=(4, 8, 16), strides=(2, 2)), (32, 32, 32)),
    "unetr": (dict(feature_size=8, hidden_size=48, mlp_dim=96, num_heads=4), (32, 32, 32)),
    # SwinUNETR downsamples by 32: a 32³ patch would leave one voxel for instance norm, so 32x32x64.
    "swin_unetr": (dict(feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)), (32, 32, 64)),
}


def test_registry_lists_every_architecture_ours_first() -> None:
    assert ARCHITECTURES == ("transformer_unet", "cnn_unet", "unet", "unetr", "swin_unetr")


@pytest.mark.parametrize("architecture", sorted(TINY_OPTIONS))
def test_build_model_builds_a_trainable_network(architecture: str) -> None:
    options, img_size = TINY_OPTIONS[architecture]
    torch.manual_seed(0)
    net = build_model(architecture, in_channels=1, out_channels=3, img_size=img_size, **options)

    y = net.train()(torch.randn(1, 1, *img_size))

    assert y.shape == (1, 3, *img_size)
    assert all(v.is_floating_point() for v in net.state_dict().values())
    assert all(s % getattr(net, "size_divisor") == 0 for s in img_size)


def test_cnn_unet_is_transformer_unet_without_transformer() -> None:
    cnn = build_model("cnn_unet", in_channels=1, out_channels=4, img_size=(32, 32, 32), channels=(8, 16, 32))

    assert isinstance(cnn, TransformerUNet3D)
    assert isinstance(cnn.bottleneck, nn.Identity)
    assert n_params(cnn) == n_params(tiny(num_transformer_layers=0))


def test_build_model_accepts_json_lists() -> None:
    net = build_model("transformer_unet", in_channels=1, out_channels=2, img_size=[16, 16, 16],
                      channels=[8, 16, 32], num_transformer_layers=1, num_heads=2)
    assert isinstance(net, TransformerUNet3D)
    assert net.channels == (8, 16, 32)


def test_monai_options_from_json_lists_reach_the_network() -> None:
    # norm arrives from TOML/JSON as a list; MONAI only reads a (name, args) tuple.
    net = build_model("unet", in_channels=1, out_channels=2, img_size=[16, 16, 16],
                      channels=[4, 8, 16], strides=[2, 2], norm=["instance", {"affine": False}])

    norms = [m for m in net.modules() if isinstance(m, nn.InstanceNorm3d)]
    assert norms and not any(m.affine for m in norms)
    assert getattr(net, "size_divisor") == 4


def test_unknown_architecture_lists_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown architecture 'vnet'.*transformer_unet.*swin_unetr"):
        build_model("vnet", in_channels=1, out_channels=2, img_size=(32, 32, 32))


@pytest.mark.parametrize(
    ("architecture", "options", "message"),
    [
        ("transformer_unet", dict(depth=3), r"unknown option\(s\) \['depth'\].*'channels'"),
        ("cnn_unet", dict(num_heads=2), r"unknown option\(s\) \['num_heads'\] for architecture 'cnn_unet'"),
        ("unet", dict(spatial_dims=2), r"unknown option\(s\) \['spatial_dims'\]"),
        ("unet", dict(channels=(4, 8, 16), strides=(2,)), r"invalid option\(s\) for architecture 'unet'"),
        ("unetr", dict(hidden_size=50, num_heads=4), r"invalid option\(s\) for architecture 'unetr'"),
        ("swin_unetr", dict(feature_size=10), r"invalid option\(s\) for architecture 'swin_unetr'.*12"),
    ],
)
def test_bad_options_are_refused_naming_them(architecture: str, options: dict, message: str) -> None:
    img_size = TINY_OPTIONS[architecture][1]
    with pytest.raises(ValueError, match=message):
        build_model(architecture, in_channels=1, out_channels=2, img_size=img_size, **options)


@pytest.mark.parametrize(
    ("architecture", "img_size", "message"),
    [
        ("transformer_unet", (32, 30, 32), r"img_size \(32, 30, 32\) must be divisible by 16.*\(32, 32, 32\)"),
        ("unetr", (32, 32, 40), r"must be divisible by 16"),
        ("swin_unetr", (32, 32, 32), r"single voxel at the deepest level.*>= 64"),
        ("transformer_unet", (32, 32), r"img_size must be three positive ints"),
    ],
)
def test_bad_img_size_is_refused(architecture: str, img_size: tuple[int, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_model(architecture, in_channels=1, out_channels=2, img_size=img_size)


def test_allowed_options_name_what_build_model_accepts() -> None:
    assert allowed_options("transformer_unet") == (
        "channels", "num_transformer_layers", "num_heads", "mlp_ratio", "dropout", "design"
    )
    assert allowed_options("cnn_unet") == ("channels", "design")
    assert "feature_size" in allowed_options("swin_unetr")
    assert "img_size" not in allowed_options("unetr")
