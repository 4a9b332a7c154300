"""FedSegNet networks, loss, metrics, checkpoints and inference (torch + MONAI).

Networks map ``(B, C_in, D, H, W)`` to logits ``(B, C_out, D, H, W)``; the loss and inference apply
the softmax. Every network's ``state_dict`` holds only floating-point tensors, so federated
averaging can treat each entry alike.
"""

from model.checkpoint import load_checkpoint, save_checkpoint
from model.inference import check_window, sliding_window_predict, window_logits
from model.losses import DiceCELoss
from model.metrics import METRIC_NAMES, segmentation_metrics
from model.registry import ARCHITECTURES, DEFAULT_ARCHITECTURE, allowed_options, build_model
from model.transformer_unet import TransformerUNet3D

__all__ = [
    "ARCHITECTURES",
    "DEFAULT_ARCHITECTURE",
    "METRIC_NAMES",
    "DiceCELoss",
    "TransformerUNet3D",
    "allowed_options",
    "build_model",
    "load_checkpoint",
    "save_checkpoint",
    "segmentation_metrics",
    "check_window",
    "sliding_window_predict",
    "window_logits",
]
