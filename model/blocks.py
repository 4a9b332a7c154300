"""Building blocks of :class:`model.transformer_unet.TransformerUNet3D`.

Every block keeps its state in floating-point parameters only: normalisation is affine
``InstanceNorm3d`` without running statistics and ``LayerNorm``; there is no BatchNorm, so a
``state_dict`` holds no integer buffer such as ``num_batches_tracked``. Federated averaging can then
treat every entry of the state dict alike.

Layouts: volumes are ``(B, C, D, H, W)``; token sequences are ``(B, N, E)`` with ``N = D * H * W``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ConvNormAct",
    "ConvBlock",
    "DownBlock",
    "UpBlock",
    "TransformerBlock",
    "TransformerBottleneck",
    "sinusoidal_position_encoding_3d",
]

_NEGATIVE_SLOPE = 0.01


def _norm(channels: int) -> nn.Module:
    # affine=True gives learnable scale/shift; track_running_stats stays False so no buffers exist.
    return nn.InstanceNorm3d(channels, affine=True)


class ConvNormAct(nn.Module):
    """One ``conv3x3x3 → norm → LeakyReLU``: ``(B, in_channels, D, H, W) -> (B, out_channels, D, H, W)``.

    The lean design's block at full resolution, where every multiply-add is paid once per voxel of
    the whole volume: one thin convolution there costs as much as a residual block eight times
    wider one level down.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.norm = _norm(out_channels)
        self.act = nn.LeakyReLU(_NEGATIVE_SLOPE, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class ConvBlock(nn.Module):
    """Residual block: ``conv3x3x3 → norm → LeakyReLU → conv3x3x3 → norm``, plus a skip, then LeakyReLU.

    ``(B, in_channels, D, H, W) -> (B, out_channels, D, H, W)``. The skip is a 1x1x1 convolution when
    the channel count changes, the identity otherwise.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        # Convolutions feeding a norm do not need a bias: the norm's shift replaces it.
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.norm1 = _norm(out_channels)
        self.conv2 = nn.Conv3d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.norm2 = _norm(out_channels)
        self.act = nn.LeakyReLU(_NEGATIVE_SLOPE, inplace=True)
        self.skip: nn.Module
        if in_channels != out_channels:
            self.skip = nn.Sequential(
                nn.Conv3d(in_channels, out_channels, kernel_size=1, bias=False), _norm(out_channels)
            )
        else:
            self.skip = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.skip(x)
        y = self.act(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return self.act(y + residual)


class DownBlock(nn.Module):
    """Halve every spatial size with a strided convolution: ``(B, Ci, D, H, W) -> (B, Co, D/2, H/2, W/2)``.

    A learned strided conv rather than pooling, so the network chooses what to keep.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size=3, stride=2, padding=1, bias=False)
        self.norm = _norm(out_channels)
        self.act = nn.LeakyReLU(_NEGATIVE_SLOPE, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class UpBlock(nn.Module):
    """Upsample, concatenate the skip, fuse with a :class:`ConvBlock` (or, ``single=True``, one
    :class:`ConvNormAct`).

    ``x: (B, Ci, D, H, W)``, ``skip: (B, Co, 2D, 2H, 2W)`` -> ``(B, Co, 2D, 2H, 2W)``.
    """

    def __init__(self, in_channels: int, out_channels: int, *, single: bool = False) -> None:
        super().__init__()
        self.up = nn.ConvTranspose3d(in_channels, out_channels, kernel_size=2, stride=2)
        self.fuse: nn.Module = (ConvNormAct if single else ConvBlock)(2 * out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.fuse(torch.cat([self.up(x), skip], dim=1))


def sinusoidal_position_encoding_3d(
    size: tuple[int, int, int], dim: int, *, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Fixed 3D sine/cosine position encoding for a ``(D, H, W)`` grid, shape ``(D * H * W, dim)``.

    The channels are split in three equal groups of even size, one per axis (depth, height, width);
    each group holds ``sin`` and ``cos`` of the voxel index at geometrically spaced frequencies
    (Vaswani et al., 2017, applied per axis). Channels left over when ``dim`` is not a multiple of 6
    are zero. Computed on the fly, so the network accepts any grid, not only the training size, and
    the encoding adds nothing to the state dict.
    """
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    if len(size) != 3 or any(s < 1 for s in size):
        raise ValueError(f"size must be three positive ints (D, H, W), got {tuple(size)}")
    per_axis = (dim // 6) * 2  # even, so sin and cos pair up
    out = torch.zeros(*size, dim, device=device, dtype=torch.float32)
    if per_axis > 0:
        half = per_axis // 2
        freqs = torch.exp(
            -math.log(10000.0) * torch.arange(half, device=device, dtype=torch.float32) / max(half, 1)
        )
        grids = torch.meshgrid(
            *(torch.arange(s, device=device, dtype=torch.float32) for s in size), indexing="ij"
        )
        for axis, grid in enumerate(grids):
            angles = grid[..., None] * freqs  # (D, H, W, half)
            start = axis * per_axis
            out[..., start : start + half] = torch.sin(angles)
            out[..., start + half : start + per_axis] = torch.cos(angles)
    return out.reshape(-1, dim).to(dtype)


class _SelfAttention(nn.Module):
    """Multi-head self-attention on ``(B, N, E)`` through ``F.scaled_dot_product_attention``.

    SDPA dispatches to the flash / memory-efficient kernels on GPU, which never materialise the
    ``N x N`` attention matrix; this matters because a bottleneck of 12^3 voxels is 1728 tokens.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, e = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, e // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(b, n, e)
        return self.proj_drop(self.proj(y))


class TransformerBlock(nn.Module):
    """Pre-norm transformer encoder block on ``(B, N, E)``: ``x + MHSA(LN(x))``, then ``x + MLP(LN(x))``.

    Pre-norm (rather than post-norm) keeps training stable without learning-rate warm-up, which a
    federated client running a few local epochs per round cannot afford.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        hidden = max(1, int(round(dim * mlp_ratio)))
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _SelfAttention(dim, num_heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TransformerBottleneck(nn.Module):
    """Global context at the coarsest level: ``(B, C, d, h, w) -> (B, C, d, h, w)``.

    Each voxel becomes a token of width ``C`` (``N = d * h * w``), gets the sinusoidal 3D position
    encoding of its grid position, passes ``num_layers`` :class:`TransformerBlock`\\ s and a final
    LayerNorm, and is folded back into a volume. A residual around the whole stack lets the block
    start close to the identity, so the conv path trains from the first step.
    """

    def __init__(self, dim: int, *, num_layers: int, num_heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.dim = dim
        self.pos_drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(TransformerBlock(dim, num_heads, mlp_ratio, dropout) for _ in range(num_layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (B, N, C)
        pos = sinusoidal_position_encoding_3d((d, h, w), c, device=x.device, dtype=tokens.dtype)
        y = self.pos_drop(tokens + pos)
        for layer in self.layers:
            y = layer(y)
        y = self.norm(y)
        return x + y.transpose(1, 2).reshape(b, c, d, h, w)
