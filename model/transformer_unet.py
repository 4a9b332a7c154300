"""FedSegNet's network: a 3D U-Net whose bottleneck is a transformer encoder.

Tensor layouts: volumes are ``(B, C, D, H, W)`` — batch, channels, then the three spatial axes in
the order the data pipeline stores them (the network treats the three alike, so any axis order
works as long as it is the same in training and inference); token sequences at the bottleneck
are ``(B, N, E)`` with ``N = d * h * w`` tokens of width ``E = channels[-1]``.

Layout of the default ``design="lean"`` (``channels = (c0, c1, …, cL)``, ``L = len(channels) - 1``
strided-convolution downsamplings; default ``(8, 16, 48, 96, 192)``, so ``L = 4``)::

    x (B, C_in, D, H, W)
      stem   ConvNormAct(C_in → c0)                       → s0 (B, c0, D, H, W)      one thin conv
      down1  DownBlock(c0 → c1) + ConvBlock(c1)          → s1 (B, c1, D/2, H/2, W/2)
      …
      downL  DownBlock(c(L-1) → cL) + ConvBlock(cL)      → b  (B, cL, D/2^L, H/2^L, W/2^L)
      bottleneck  TransformerBottleneck(cL)               (identity when num_transformer_layers == 0)
                  tokens (B, N = D H W / 8^L, cL), SDPA self-attention, folded back
      upL    ConvTranspose(cL → c(L-1)), concat s(L-1), ConvBlock
      …
      up1    ConvTranspose(c1 → c0), concat s0, ConvNormAct → (B, c0, D, H, W)   one thin conv
      head   Conv1x1x1(c0 → C_out)                        → logits (B, C_out, D, H, W)

Why this shape: a training step's cost is dominated by the full-resolution level, where every
multiply-add is paid D·H·W times; the lean design keeps only one thin convolution on each side of
it and puts the width (and the residual blocks) where the grid is small. The attention runs at
1/16 of each side (8³ = 512 tokens at 128³), where it is cheap, through
``F.scaled_dot_product_attention``. At 128³, 4 channels, 4 classes, batch 2 a training step
(forward + backward) costs about 455 GFLOP against 1,667 for the ``classic`` design
(``benchmarks/train_speed.py --flops-only``).

Why these widths: the first lean default, ``(8, 16, 32, 64, 128)`` (331 GFLOP), learned too
slowly at the Adam learning rate the baselines train with (1e-3): after 60 steps its training
loss was still about twice MONAI UNet's, and three times the learning rate closed the gap. The
full-resolution levels dominate the cost, so the width went where it is cheap: 48–96–192 at
1/4–1/16 of each side adds 124 GFLOP and learns as fast as UNet at 1e-3
(``benchmarks/README.md``, "Why the first lean default learned slowly"). Checkpoints written under the
earlier widths name no ``channels``; :func:`model.load_checkpoint` reads their widths back from
the weights.

``design="classic"`` is the network before the lean default: residual :class:`ConvBlock` blocks at
every level, full resolution included (default channels then ``(16, 32, 64, 128)``). It stays
available so checkpoints and configurations written for it still load.

The forward pass returns **logits**: softmax over the channel axis is applied by the loss
(:class:`model.losses.DiceCELoss`) and by inference (:func:`model.inference.sliding_window_predict`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from model.blocks import ConvBlock, ConvNormAct, DownBlock, TransformerBottleneck, UpBlock

__all__ = ["DESIGNS", "DEFAULT_CHANNELS", "TransformerUNet3D"]

#: block layouts: ``lean`` (the default) and ``classic`` (the network before it)
DESIGNS: tuple[str, ...] = ("lean", "classic")
#: default encoder widths per design, coarsest last
DEFAULT_CHANNELS: dict[str, tuple[int, ...]] = {"lean": (8, 16, 48, 96, 192), "classic": (16, 32, 64, 128)}


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class TransformerUNet3D(nn.Module):
    """3D U-Net with a transformer bottleneck: ``(B, in_channels, D, H, W) -> logits (B, out_channels, D, H, W)``.

    Args (keyword-only):
        in_channels: image channels (modalities), >= 1.
        out_channels: classes including background, >= 1.
        channels: feature width of each encoder level, coarsest last; ``len(channels) - 1``
            strided-conv downsamplings, so ``D, H, W`` must be divisible by :attr:`size_divisor`
            ``= 2 ** (len(channels) - 1)``. ``None`` (default): :data:`DEFAULT_CHANNELS` of the
            design, ``(8, 16, 48, 96, 192)`` for ``lean``.
        num_transformer_layers: transformer blocks at the bottleneck; ``0`` gives a plain residual
            CNN U-Net (the ``cnn_unet`` ablation).
        num_heads: attention heads; must divide ``channels[-1]``.
        mlp_ratio: width of each transformer MLP relative to ``channels[-1]``, > 0.
        dropout: dropout probability inside the transformer (attention, MLP, position encoding), in [0, 1).
        design: ``"lean"`` (default: one thin convolution at full resolution on each side) or
            ``"classic"`` (residual blocks at every level; the network before the lean default).

    Normalisation is affine InstanceNorm (conv path) and LayerNorm (tokens): there is no BatchNorm,
    so every ``state_dict`` entry is a floating-point tensor and federated averaging treats all
    entries alike; InstanceNorm also behaves the same at batch size 1, the usual 3D batch size.
    """

    #: the only spatial input size accepted, or None for any multiple of :attr:`size_divisor`
    fixed_input_size: tuple[int, int, int] | None = None

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int] | None = None,
        num_transformer_layers: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        design: str = "lean",
    ) -> None:
        super().__init__()
        _positive_int("in_channels", in_channels)
        _positive_int("out_channels", out_channels)
        if design not in DESIGNS:
            raise ValueError(f"design must be one of {list(DESIGNS)}, got {design!r}")
        if channels is None:
            channels = DEFAULT_CHANNELS[design]
        if isinstance(channels, (str, bytes)) or not isinstance(channels, Sequence) or len(channels) < 1:
            raise ValueError(f"channels must be a non-empty sequence of positive ints (one per level), got {channels!r}")
        chans = tuple(_positive_int(f"channels[{i}]", c) for i, c in enumerate(channels))
        if isinstance(num_transformer_layers, bool) or not isinstance(num_transformer_layers, int) or num_transformer_layers < 0:
            raise ValueError(f"num_transformer_layers must be an int >= 0, got {num_transformer_layers!r}")
        _positive_int("num_heads", num_heads)
        if num_transformer_layers > 0 and chans[-1] % num_heads != 0:
            raise ValueError(
                f"num_heads ({num_heads}) must divide the bottleneck width channels[-1] ({chans[-1]}); "
                f"choose num_heads among {[h for h in range(1, chans[-1] + 1) if chans[-1] % h == 0]}"
            )
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or not mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be a number > 0, got {mlp_ratio!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")

        self.in_channels = in_channels
        self.out_channels = out_channels
        self.channels = chans
        self.num_transformer_layers = num_transformer_layers
        self.design = design
        #: every spatial size of the input must be a multiple of this
        self.size_divisor: int = 2 ** (len(chans) - 1)

        lean = design == "lean"
        self.stem: nn.Module = ConvNormAct(in_channels, chans[0]) if lean else ConvBlock(in_channels, chans[0])
        self.down = nn.ModuleList(
            nn.Sequential(DownBlock(c_in, c_out), ConvBlock(c_out, c_out)) for c_in, c_out in zip(chans[:-1], chans[1:])
        )
        self.bottleneck: nn.Module
        if num_transformer_layers > 0:
            self.bottleneck = TransformerBottleneck(
                chans[-1], num_layers=num_transformer_layers, num_heads=num_heads, mlp_ratio=float(mlp_ratio),
                dropout=float(dropout),
            )
        else:
            self.bottleneck = nn.Identity()
        # Decoder from coarse to fine: up[0] goes from level L to L-1; the last one ends at full
        # resolution, where the lean design fuses with a single convolution.
        pairs = list(zip(chans[:0:-1], chans[-2::-1]))
        self.up = nn.ModuleList(
            UpBlock(c_in, c_out, single=lean and i == len(pairs) - 1) for i, (c_in, c_out) in enumerate(pairs)
        )
        self.head = nn.Conv3d(chans[0], out_channels, kernel_size=1)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` naming the problem when ``x`` is not ``(B, in_channels, D, H, W)`` with divisible sizes."""
        if x.ndim != 5:
            raise ValueError(f"expected input of shape (B, C, D, H, W), got {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channel(s), got {x.shape[1]} (shape {tuple(x.shape)})")
        spatial = tuple(int(s) for s in x.shape[2:])
        if any(s % self.size_divisor for s in spatial):
            raise ValueError(
                f"input spatial size {spatial} must be divisible by {self.size_divisor} "
                f"(2 ** {len(self.channels) - 1} downsamplings); pad or crop it, e.g. to "
                f"{tuple(-(-s // self.size_divisor) * self.size_divisor for s in spatial)}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, D, H, W)`` -> logits ``(B, out_channels, D, H, W)`` (no softmax)."""
        self.check_input(x)
        skips = []
        y = self.stem(x)
        for level in self.down:
            skips.append(y)
            y = level(y)
        y = self.bottleneck(y)
        for up, skip in zip(self.up, reversed(skips)):
            y = up(y, skip)
        return self.head(y)
