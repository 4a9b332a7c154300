"""Training in the channels-last layout on a CPU (client_agent.training.conv_layout): same numbers, faster."""

from __future__ import annotations


import pytest
import torch
from torch import nn

from client_agent.training import LoopSettings, conv_layout, train_local

model_pkg = pytest.importorskip("model")
CPU = torch.device("cpu")


def _net() -> nn.Module:
    torch.manual_seed(0)
    return model_pkg.build_model("transformer_unet", in_channels=1, out_channels=3, img_size=(16, 16, 16),
                                 channels=(8, 16, 32), num_transformer_layers=1, num_heads=2)


def _batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(3):
        label = torch.randint(0, 3, (2, 1, 16, 16, 16), generator=g)
        out.append({"image": label.float() + 0.3 * torch.randn(2, 1, 16, 16, 16, generator=g), "label": label})
    return out


def _loss(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits, label[:, 0])


def test_training_in_the_cpu_layout_gives_the_default_layouts_weights() -> None:
    settings = LoopSettings(epochs=1, lr=1e-2, optimizer="sgd", momentum=0.9)
    trained = _net()
    result = train_local(trained, _batches(), settings, device=CPU, loss_fn=_loss)

    # The same steps written out by hand in the default layout.
    plain = _net()
    opt = torch.optim.SGD(plain.parameters(), lr=1e-2, momentum=0.9)
    for batch in _batches():
        opt.zero_grad()
        _loss(plain(batch["image"]), batch["label"]).backward()
        opt.step()

    for (name, a), b in zip(trained.state_dict().items(), plain.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    # Handed back in the default layout: the codec and the checkpoints read these as C-ordered arrays.
    assert all(p.is_contiguous() for p in trained.parameters())
    buffers = [v for entry in result.optimizer_state["state"].values() for v in entry.values()
               if isinstance(v, torch.Tensor)]
    assert buffers and all(v.is_contiguous() for v in buffers)


def test_the_layout_holds_during_training_only_and_on_cpus_only() -> None:
    net = _net()
    conv = next(m for m in net.modules() if isinstance(m, nn.Conv3d) and m.weight.shape[1] > 1)
    with conv_layout(net, CPU) as layout:
        assert layout == torch.channels_last_3d
        assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
        assert not conv.weight.is_contiguous()
    assert conv.weight.is_contiguous()
    with conv_layout(net, torch.device("meta")) as layout:
        assert layout is None
        assert conv.weight.is_contiguous()


def test_the_parameters_stay_the_optimizers() -> None:
    # Changing the layout must not replace the Parameter objects an optimizer holds.
    net = _net()
    before = [id(p) for p in net.parameters()]
    with conv_layout(net, CPU):
        assert [id(p) for p in net.parameters()] == before
    assert [id(p) for p in net.parameters()] == before
