"""Build any of FedSegNet's networks by name: ours, its CNN ablation, and MONAI baselines.

``build_model(architecture, in_channels=…, out_channels=…, img_size=…, **options)`` is the one
entry point the client agent, the simulator and checkpoints use, so a model is fully described by
``(architecture, in_channels, out_channels, img_size, options)`` — plain JSON values.

Every built model carries two plain attributes that inference relies on:

* ``size_divisor`` — each spatial input size must be a multiple of it;
* ``fixed_input_size`` — ``None``, or the only spatial size the model accepts (UNETR's position
  embedding is learned for ``img_size`` exactly).

Every ``state_dict`` entry is a floating-point tensor: integer buffers that MONAI baselines derive
from their configuration (SwinUNETR's ``relative_position_index``) are kept on the module but made
non-persistent, because federated averaging treats every entry as a weight to average.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from model.transformer_unet import TransformerUNet3D

__all__ = ["ARCHITECTURES", "DEFAULT_ARCHITECTURE", "build_model", "allowed_options"]

DEFAULT_ARCHITECTURE = "transformer_unet"

# Options fixed by build_model itself for the MONAI networks; a caller cannot override them.
_RESERVED = frozenset({"self", "in_channels", "out_channels", "img_size", "spatial_dims"})
# cnn_unet is TransformerUNet3D without its transformer: options that only shape the transformer
# make no sense there and are refused rather than silently ignored.
_CNN_OPTIONS = ("channels", "design")


def _transformer_unet_options() -> tuple[str, ...]:
    params = inspect.signature(TransformerUNet3D).parameters
    return tuple(p for p in params if p not in _RESERVED)


def _monai_options(cls: type) -> tuple[str, ...]:
    params = inspect.signature(cls).parameters
    return tuple(
        name for name, p in params.items()
        if name not in _RESERVED and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    )


def _check_options(architecture: str, options: Mapping[str, Any], allowed: Sequence[str]) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for architecture {architecture!r}; allowed: {sorted(allowed)}"
        )


def _json_lists_to_tuples(options: dict[str, Any]) -> dict[str, Any]:
    # Options arrive from TOML/JSON as lists; MONAI tells some tuple-typed arguments (norm=("instance",
    # {...})) apart by type, so top-level lists become tuples.
    return {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}


def _check_divisible(architecture: str, img_size: tuple[int, int, int], divisor: int) -> None:
    if any(s % divisor for s in img_size):
        raise ValueError(
            f"img_size {img_size} must be divisible by {divisor} for architecture {architecture!r}; "
            f"e.g. {tuple(-(-s // divisor) * divisor for s in img_size)}"
        )


def _check_trainable(architecture: str, img_size: tuple[int, int, int], divisor: int, remedy: str) -> None:
    # Instance norm needs more than one voxel per channel in training mode: a deepest feature map of
    # a single voxel would make every training step fail.
    if math.prod(s // divisor for s in img_size) < 2:
        raise ValueError(
            f"img_size {img_size} leaves a single voxel at the deepest level of {architecture!r} "
            f"(downsampling factor {divisor}); instance norm cannot train on that: make at least one side "
            f">= {2 * divisor}{remedy}"
        )


def _build_transformer_unet(in_channels: int, out_channels: int, img_size: tuple[int, int, int], options: dict[str, Any]) -> nn.Module:
    _check_options("transformer_unet", options, _transformer_unet_options())
    net = TransformerUNet3D(in_channels=in_channels, out_channels=out_channels, **_json_lists_to_tuples(options))
    _check_divisible("transformer_unet", img_size, net.size_divisor)
    _check_trainable("transformer_unet", img_size, net.size_divisor, " or use fewer channels (levels)")
    return net


def _build_cnn_unet(in_channels: int, out_channels: int, img_size: tuple[int, int, int], options: dict[str, Any]) -> nn.Module:
    _check_options("cnn_unet", options, _CNN_OPTIONS)
    net = TransformerUNet3D(
        in_channels=in_channels, out_channels=out_channels, num_transformer_layers=0, **_json_lists_to_tuples(options)
    )
    _check_divisible("cnn_unet", img_size, net.size_divisor)
    _check_trainable("cnn_unet", img_size, net.size_divisor, " or use fewer channels (levels)")
    return net


def _build_unet(in_channels: int, out_channels: int, img_size: tuple[int, int, int], options: dict[str, Any]) -> nn.Module:
    from monai.networks.nets import UNet

    _check_options("unet", options, _monai_options(UNet))
    # Small defaults comparable in size to ours; affine InstanceNorm so that, like ours, the baseline
    # has no running statistics and behaves the same at batch size 1.
    kwargs: dict[str, Any] = dict(
        channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2, norm=("instance", {"affine": True})
    )
    kwargs.update(_json_lists_to_tuples(options))
    net = _construct("unet", lambda: UNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels, **kwargs))
    divisor = math.prod(s if isinstance(s, int) else max(s) for s in kwargs["strides"])
    _check_divisible("unet", img_size, divisor)
    _check_trainable("unet", img_size, divisor, " or use fewer strides")
    return _tag(net, size_divisor=divisor, fixed_input_size=None)


def _build_unetr(in_channels: int, out_channels: int, img_size: tuple[int, int, int], options: dict[str, Any]) -> nn.Module:
    from monai.networks.nets import UNETR

    _check_options("unetr", options, _monai_options(UNETR))
    kwargs: dict[str, Any] = dict(feature_size=16, hidden_size=768, mlp_dim=3072, num_heads=12)
    kwargs.update(_json_lists_to_tuples(options))
    _check_divisible("unetr", img_size, 16)  # UNETR's patch size is 16 per axis
    net = _construct(
        "unetr", lambda: UNETR(in_channels=in_channels, out_channels=out_channels, img_size=img_size, spatial_dims=3, **kwargs)
    )
    # its position embedding has exactly (img_size / 16) ** 3 entries: no other size fits
    return _tag(net, size_divisor=16, fixed_input_size=img_size)


def _build_swin_unetr(in_channels: int, out_channels: int, img_size: tuple[int, int, int], options: dict[str, Any]) -> nn.Module:
    from monai.networks.nets import SwinUNETR

    _check_options("swin_unetr", options, _monai_options(SwinUNETR))
    kwargs: dict[str, Any] = dict(feature_size=48)
    kwargs.update(_json_lists_to_tuples(options))
    # MONAI >= 1.5 no longer takes img_size: any size divisible by patch_size ** 5 works.
    divisor = int(kwargs.get("patch_size", 2)) ** 5
    _check_divisible("swin_unetr", img_size, divisor)
    _check_trainable("swin_unetr", img_size, divisor, "")
    net = _construct(
        "swin_unetr", lambda: SwinUNETR(in_channels=in_channels, out_channels=out_channels, spatial_dims=3, **kwargs)
    )
    return _tag(net, size_divisor=divisor, fixed_input_size=None)


def _tag(net: nn.Module, *, size_divisor: int, fixed_input_size: tuple[int, int, int] | None) -> nn.Module:
    # The same two attributes TransformerUNet3D defines, so inference treats every network alike.
    setattr(net, "size_divisor", size_divisor)
    setattr(net, "fixed_input_size", fixed_input_size)
    return net


def _construct(architecture: str, make: Callable[[], nn.Module]) -> nn.Module:
    # MONAI reports bad option values with ValueError, AssertionError, TypeError or KeyError; callers
    # get one exception type that names the architecture.
    try:
        return make()
    except (ValueError, AssertionError, TypeError, KeyError) as exc:
        raise ValueError(f"invalid option(s) for architecture {architecture!r}: {exc}") from exc


_BUILDERS: dict[str, Callable[[int, int, tuple[int, int, int], dict[str, Any]], nn.Module]] = {
    "transformer_unet": _build_transformer_unet,
    "cnn_unet": _build_cnn_unet,
    "unet": _build_unet,
    "unetr": _build_unetr,
    "swin_unetr": _build_swin_unetr,
}

#: names accepted by :func:`build_model`, ours first
ARCHITECTURES: tuple[str, ...] = tuple(_BUILDERS)


def allowed_options(architecture: str) -> tuple[str, ...]:
    """The option names :func:`build_model` accepts for ``architecture`` (besides in/out channels and img_size)."""
    _check_architecture(architecture)
    if architecture == "transformer_unet":
        return _transformer_unet_options()
    if architecture == "cnn_unet":
        return _CNN_OPTIONS
    from monai.networks.nets import UNETR, SwinUNETR, UNet

    return _monai_options({"unet": UNet, "unetr": UNETR, "swin_unetr": SwinUNETR}[architecture])


def _check_architecture(architecture: str) -> None:
    if architecture not in _BUILDERS:
        raise ValueError(f"unknown architecture {architecture!r}; allowed: {list(ARCHITECTURES)}")


def _check_img_size(img_size: Sequence[int]) -> tuple[int, int, int]:
    if isinstance(img_size, (str, bytes)) or not isinstance(img_size, Sequence) or len(img_size) != 3:
        raise ValueError(f"img_size must be three positive ints (D, H, W), got {img_size!r}")
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in img_size):
        raise ValueError(f"img_size must be three positive ints (D, H, W), got {img_size!r}")
    return (int(img_size[0]), int(img_size[1]), int(img_size[2]))


def _persist_float_buffers_only(net: nn.Module) -> None:
    # Integer buffers (e.g. SwinUNETR's relative_position_index) are recomputed by the constructor
    # from the configuration; saving them would put non-floating entries in the state dict.
    for module in net.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf is not None and not buf.is_floating_point() and name not in module._non_persistent_buffers_set:
                del module._buffers[name]
                module.register_buffer(name, buf, persistent=False)


def build_model(
    architecture: str = DEFAULT_ARCHITECTURE,
    *,
    in_channels: int,
    out_channels: int,
    img_size: Sequence[int],
    **options: Any,
) -> nn.Module:
    """Build the network ``architecture`` for ``(B, in_channels, *img_size)`` inputs.

    Args:
        architecture: one of :data:`ARCHITECTURES`: ``"transformer_unet"`` (ours,
            :class:`TransformerUNet3D`), ``"cnn_unet"`` (ours without the transformer, for the
            ablation), ``"unet"``, ``"unetr"``, ``"swin_unetr"`` (MONAI baselines).
        in_channels: image channels.
        out_channels: classes including background.
        img_size: training patch size ``(D, H, W)``; checked against the network's downsampling
            factor, and the only size UNETR accepts.
        options: architecture-specific keyword arguments (see :func:`allowed_options`); for MONAI
            networks they override FedSegNet's small defaults (UNet ``channels=(16, 32, 64, 128,
            256), strides=(2, 2, 2, 2), num_res_units=2``, affine instance norm; UNETR
            ``feature_size=16, hidden_size=768``; SwinUNETR ``feature_size=48``). JSON lists are
            accepted where tuples are expected.

    Returns:
        The module, mapping ``(B, in_channels, D, H, W)`` to logits ``(B, out_channels, D, H, W)``,
        with ``size_divisor`` and ``fixed_input_size`` attributes (see module docstring).

    Raises:
        ValueError: unknown architecture, unknown option, or invalid value; the message names it
            and lists what is allowed.
    """
    _check_architecture(architecture)
    for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    size = _check_img_size(img_size)
    net = _BUILDERS[architecture](in_channels, out_channels, size, dict(options))
    _persist_float_buffers_only(net)
    return net
