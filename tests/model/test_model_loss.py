"""DiceCELoss: its two terms against hand-written formulas, validation, and real training that lowers it."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from model import DiceCELoss, TransformerUNet3D


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def soft_dice_loss(logits: torch.Tensor, labels: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """1 - (2 Σ p t + s) / (Σ p + Σ t + s) per (case, class), averaged; p = softmax, t = one-hot."""
    p = logits.softmax(dim=1)
    t = F.one_hot(labels, logits.shape[1]).permute(0, 4, 1, 2, 3).float()
    dims = (2, 3, 4)
    dice = (2 * (p * t).sum(dims) + smooth) / (p.sum(dims) + t.sum(dims) + smooth)
    return (1 - dice).mean()


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, 4, generator=g)
    labels = torch.randint(0, 3, (2, 4, 4, 4), generator=g)
    return logits, labels


def test_lambda_zero_is_cross_entropy(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    logits, labels = batch
    assert DiceCELoss(lambda_dice=0.0)(logits, labels) == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-5)


def test_lambda_one_is_soft_dice(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    logits, labels = batch
    assert DiceCELoss(lambda_dice=1.0)(logits, labels) == pytest.approx(float(soft_dice_loss(logits, labels)), rel=1e-5)


def test_default_is_the_even_mix(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    logits, labels = batch
    expected = 0.5 * float(soft_dice_loss(logits, labels)) + 0.5 * float(F.cross_entropy(logits, labels))
    assert DiceCELoss()(logits, labels) == pytest.approx(expected, rel=1e-5)


def test_target_with_or_without_channel_axis_and_as_floats_agree(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    logits, labels = batch
    loss = DiceCELoss()
    assert torch.equal(loss(logits, labels), loss(logits, labels[:, None]))
    assert torch.equal(loss(logits, labels), loss(logits, labels[:, None].float()))


@pytest.mark.parametrize("lambda_dice", [-0.1, 1.5, float("nan"), True])
def test_lambda_outside_unit_interval_is_refused(lambda_dice: float) -> None:
    with pytest.raises(ValueError, match=r"lambda_dice must be in \[0, 1\]"):
        DiceCELoss(lambda_dice=lambda_dice)


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (torch.full((2, 4, 4, 4), 3), r"labels must be in \[0, 3\), got values in \[3, 3\]"),
        (torch.zeros(2, 4, 4, 5, dtype=torch.long), "must be .* matching logits"),
        (torch.full((2, 1, 4, 4, 4), 0.5), "integer class labels"),
    ],
)
def test_bad_target_is_refused(batch: tuple[torch.Tensor, torch.Tensor], target: torch.Tensor, message: str) -> None:
    logits, _ = batch
    with pytest.raises(ValueError, match=message):
        DiceCELoss()(logits, target)


@pytest.mark.slow  # trains for many steps
def test_adam_overfits_one_volume() -> None:
    # Real training: a tiny Transformer U-Net learns a 3-class volume (a box and a smaller box in it).
    torch.manual_seed(0)
    net = TransformerUNet3D(in_channels=1, out_channels=3, channels=(8, 16, 32), num_transformer_layers=1, num_heads=2)
    labels = torch.zeros(1, 1, 16, 16, 16, dtype=torch.long)
    labels[..., 3:13, 4:12, 2:14] = 1
    labels[..., 6:10, 6:10, 6:10] = 2
    image = labels.float() + 0.3 * torch.randn(labels.shape)
    loss_fn = DiceCELoss()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)

    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = loss_fn(net(image), labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())

    assert losses[-1] < 0.5 * losses[0], losses
