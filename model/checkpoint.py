"""Pickle-free model checkpoints that rebuild their own network.

File layout: ``torch.save`` of a plain dict, readable with ``torch.load(weights_only=True)``::

    {"format": "fedsegnet-checkpoint",
     "version": 1,
     "meta": JSON string {"architecture": str, "config": {...}, "extra": {...}},
     "state_dict": {name: tensor}}

``config`` holds exactly the keyword arguments of :func:`model.build_model` (``in_channels``,
``out_channels``, ``img_size`` and the architecture's options), so loading needs nothing but the
file. Only tensors, strings and ints are stored: ``weights_only=True`` refuses anything else,
so a checkpoint from an untrusted site cannot run code when loaded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from codec import atomic_writer
from model.registry import build_model
from model.transformer_unet import DEFAULT_CHANNELS

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "check_state_dict", "save_checkpoint", "load_checkpoint"]

CHECKPOINT_FORMAT = "fedsegnet-checkpoint"
CHECKPOINT_VERSION = 1
_REQUIRED_CONFIG = ("in_channels", "out_channels", "img_size")


def _to_json(name: str, value: Any) -> str:
    try:
        return json.dumps(value, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be JSON-serialisable (plain numbers, strings, lists, dicts): {exc}") from exc


def _check_config(config: Mapping[str, Any]) -> None:
    missing = [k for k in _REQUIRED_CONFIG if k not in config]
    if missing:
        raise ValueError(
            f"config is missing {missing}: it must hold build_model's keyword arguments "
            f"({', '.join(_REQUIRED_CONFIG)} and the architecture's options)"
        )


def check_state_dict(architecture: str, config: Mapping[str, Any], state: Mapping[str, Any]) -> None:
    """Raise ValueError naming the first difference if ``state`` (name -> tensor or array, anything
    with ``.shape``) is not the state dict of ``build_model(architecture, **config)``."""
    # Rebuild the network to compare against (at save time: catches a config that would rebuild a
    # different network than the weights belong to; experiments check loaded .frames models). The
    # meta device costs no memory or compute; a constructor that needs real values (SwinUNETR
    # calls .item()) is built on the CPU instead.
    try:
        with torch.device("meta"):
            expected = build_model(architecture, **dict(config)).state_dict()
    except (RuntimeError, NotImplementedError):
        expected = build_model(architecture, **dict(config)).state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"state_dict does not match architecture {architecture!r} with config {dict(config)}: "
            f"missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}"
        )
    for name, tensor in expected.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise ValueError(
                f"state_dict entry {name!r} has shape {tuple(state[name].shape)}, "
                f"architecture {architecture!r} with this config expects {tuple(tensor.shape)}"
            )


def save_checkpoint(
    path: str | os.PathLike[str],
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    *,
    architecture: str,
    config: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write ``model_or_state_dict`` to ``path`` atomically (temp file, fsync, rename).

    Args:
        path: destination file; its folder is created when missing.
        model_or_state_dict: the network, or its ``state_dict`` (name -> tensor).
        architecture: the name given to :func:`model.build_model`.
        config: ``build_model``'s keyword arguments: ``in_channels``, ``out_channels``,
            ``img_size`` and options. Checked against the weights before writing.
        extra: optional JSON-serialisable metadata (round, metrics, …).

    Raises:
        ValueError: config or extra not JSON-serialisable, config incomplete, or weights not
            matching the network the config describes.
    """
    state = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"state_dict entries must be tensors; not tensors: {bad[:5]}")
    _check_config(config)
    meta = _to_json("config/extra", {"architecture": architecture, "config": dict(config), "extra": dict(extra or {})})
    check_state_dict(architecture, config, state)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "meta": meta,
        # clone(): a view into a larger storage would otherwise save the whole storage
        "state_dict": {k: v.detach().cpu().clone().contiguous() for k, v in state.items()},
    }
    with atomic_writer(path) as f:
        torch.save(payload, f)


def _stored_channels(state: Mapping[str, Any]) -> list[int] | None:
    # The encoder widths as the weights hold them: the stem's output, then each down level's
    # strided convolution's output ("down.{i}.0.conv.weight", shape (c_out, c_in, 3, 3, 3)).
    stem = state.get("stem.conv.weight", state.get("stem.conv1.weight"))
    if stem is None:
        return None
    channels = [int(stem.shape[0])]
    while (w := state.get(f"down.{len(channels) - 1}.0.conv.weight")) is not None:
        channels.append(int(w.shape[0]))
    return channels


def _with_design_of_old_checkpoint(architecture: str, config: dict[str, Any], state: Mapping[str, Any]) -> dict[str, Any]:
    # Checkpoints written before TransformerUNet3D's lean default name no design: their weights
    # have the classic layout (a residual ConvBlock as stem, hence "stem.conv1.weight"; the lean
    # stem is "stem.conv.weight"). Rebuild that network rather than fail on the key mismatch.
    # Likewise a checkpoint that names no channels was written with the default widths of its
    # time (the lean default was (8, 16, 32, 64, 128) before it became (8, 16, 48, 96, 192)): the
    # widths are read back from the weights, so it rebuilds the network it was trained as.
    if architecture not in ("transformer_unet", "cnn_unet"):
        return config
    if "design" not in config and "stem.conv1.weight" in state:
        config = {**config, "design": "classic"}
    if "channels" not in config:
        channels = _stored_channels(state)
        design = config.get("design", "lean")
        if channels is not None and design in DEFAULT_CHANNELS and channels != list(DEFAULT_CHANNELS[design]):
            config = {**config, "channels": channels}
    return config


def load_checkpoint(
    path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint` and rebuild its network.

    Returns:
        ``(model, meta)``: the network built with :func:`model.build_model` from the stored
        architecture and config (a Transformer U-Net checkpoint from before the lean default,
        which names no ``design``, gets ``design="classic"`` added; one that names no ``channels``
        gets the widths its weights have, so a change of the default widths does not orphan it),
        with the stored weights, in the mode ``build_model`` gives
        (train); and ``meta = {"architecture", "config", "extra", "version"}``.

    Raises:
        ValueError: the file is not a FedSegNet checkpoint or has an unknown version.
    """
    payload = torch.load(Path(path), map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a FedSegNet checkpoint (no format tag {CHECKPOINT_FORMAT!r})")
    version = payload.get("version")
    if version != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint version {version!r} is not supported (this code reads {CHECKPOINT_VERSION})")
    meta = json.loads(payload["meta"])
    meta["config"] = _with_design_of_old_checkpoint(meta["architecture"], meta["config"], payload["state_dict"])
    net = build_model(meta["architecture"], **meta["config"])
    net.load_state_dict(payload["state_dict"], strict=True)
    net.to(map_location)
    return net, {**meta, "version": version}
