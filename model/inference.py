"""Whole-volume inference by overlapping windows."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from monai.inferers import sliding_window_inference
from torch import nn

__all__ = ["check_window", "sliding_window_predict", "window_logits"]

log = logging.getLogger(__name__)


def _round_up(size: int, multiple: int) -> int:
    return -(-size // multiple) * multiple


def sliding_window_predict(
    model: nn.Module,
    image: torch.Tensor,
    *,
    roi_size: Sequence[int],
    overlap: float = 0.25,
    sw_batch_size: int = 1,
    mode: str = "gaussian",
) -> torch.Tensor:
    """Class probabilities for a whole volume: ``(B, C_in, D, H, W) -> (B, C_out, D, H, W)``.

    Wraps ``monai.inferers.sliding_window_inference``: windows of ``roi_size`` overlapping by
    ``overlap`` go through ``model`` (which returns logits), softmax turns each window's logits
    into probabilities, and overlapping windows are blended (Gaussian weights by default, which
    trust window centres more than borders). The result sums to 1 over the channel axis.

    Sizes: ``roi_size`` is rounded up to a multiple of the model's ``size_divisor`` (from
    :func:`model.build_model`; 1 when absent), and to at least twice it, and MONAI pads a volume smaller than the window and
    crops the result back, so any volume size works. A model with a ``fixed_input_size``
    (UNETR) needs ``roi_size`` equal to it.

    The model's mode is left as it is (call ``model.eval()`` first); no gradients are computed.
    """
    if image.ndim != 5:
        raise ValueError(f"image must be (B, C, D, H, W), got shape {tuple(image.shape)}")
    roi = tuple(int(s) for s in roi_size)
    if len(roi) != 3 or any(s < 1 for s in roi):
        raise ValueError(f"roi_size must be three positive ints (D, H, W), got {tuple(roi_size)}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if sw_batch_size < 1:
        raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size}")

    fixed = getattr(model, "fixed_input_size", None)
    if fixed is not None and tuple(fixed) != roi:
        raise ValueError(f"this model only accepts inputs of size {tuple(fixed)}; pass roi_size={tuple(fixed)}, got {roi}")
    divisor = int(getattr(model, "size_divisor", 1))
    # At least two voxels per axis at the coarsest level: instance normalization of one voxel is undefined.
    padded_roi = tuple(max(_round_up(s, divisor), 2 * divisor) for s in roi)
    if padded_roi != roi:
        log.info("roi_size %s rounded up to %s, a multiple of the model's size divisor %d (at least twice it)",
                 roi, padded_roi, divisor)

    def predict(window: torch.Tensor) -> torch.Tensor:
        return torch.softmax(model(window).float(), dim=1)

    with torch.no_grad():
        out = sliding_window_inference(
            image, padded_roi, sw_batch_size, predict, overlap=overlap, mode=mode
        )
    assert isinstance(out, torch.Tensor)  # one output head: MONAI returns a tensor, not a tuple/dict
    return out.as_tensor() if hasattr(out, "as_tensor") else out


def check_window(model: nn.Module, size: Sequence[int]) -> None:
    """Raise ValueError unless ``model`` takes ``(D, H, W)`` inputs of ``size`` as they are.

    A training window (``[model] patch_size``) cannot be rounded up the way a prediction window
    is: its labels would not follow. Uses the ``size_divisor`` and ``fixed_input_size`` that
    :func:`model.build_model` sets.
    """
    window = tuple(int(s) for s in size)
    fixed = getattr(model, "fixed_input_size", None)
    if fixed is not None and tuple(fixed) != window:
        raise ValueError(f"this network only takes inputs of {list(fixed)} voxels, so patch_size must be "
                         f"{list(fixed)} or empty, got {list(window)}")
    divisor = int(getattr(model, "size_divisor", 1))
    if any(s % divisor for s in window):
        raise ValueError(f"patch_size {list(window)} must be a multiple of {divisor} along every axis for this "
                         f"network (its downsamplings), e.g. {[-(-s // divisor) * divisor for s in window]}")
    if any(s < 2 * divisor for s in window):
        # One voxel per axis at the coarsest level: instance normalization there is undefined and
        # torch refuses it in the middle of the first training step.
        raise ValueError(f"patch_size {list(window)} leaves one voxel per axis at this network's coarsest level "
                         f"(it downsamples by {divisor}); use at least {2 * divisor} along every axis")


def window_logits(model: nn.Module, image: torch.Tensor, roi_size: Sequence[int] | None, *,
                  overlap: float = 0.25, sw_batch_size: int = 8) -> torch.Tensor:
    """Logits for a whole ``(B, C, D, H, W)`` volume from a network trained on ``roi_size`` windows.

    ``roi_size`` None, or not smaller than the volume: ``model(image)``, one pass. Otherwise the
    log of :func:`sliding_window_predict`'s blended probabilities, which softmax and argmax read
    as they read logits (``softmax(log p) = p``), so a caller that scores or takes a loss on
    logits needs no second path. The windows go through the network ``sw_batch_size`` at a time:
    on a CPU the eight 32³ windows of a 48³ volume cost 0.48 s as one batch and 1.6 s one by one
    (whole volume in one pass: 0.38 s; the quick generalization experiment's network, one thread).
    """
    if roi_size is None or all(int(r) >= s for r, s in zip(roi_size, image.shape[2:])):
        return model(image)
    probs = sliding_window_predict(model, image, roi_size=roi_size, overlap=overlap, sw_batch_size=sw_batch_size)
    return torch.log(probs.float().clamp_min(1e-12))
