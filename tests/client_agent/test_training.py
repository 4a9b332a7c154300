"""Local training and evaluation: real Adam on a tiny Transformer U-Net, real metrics."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from client_agent.data import build_datasets, make_loader, regions_from_labels
from client_agent.training import (
    OPTIMIZERS,
    EpochProgress,
    LoopSettings,
    TrainingError,
    build_optimizer,
    evaluate,
    make_optimizer,
    pick_device,
    seed_everything,
    train_epoch,
    train_local,
)

model_pkg = pytest.importorskip("model")

SIZE = (16, 16, 16)  # the model accepts any multiple of 4; 16³ keeps a step well under a second
CPU = torch.device("cpu")


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return model_pkg.build_model(
        "transformer_unet",
        in_channels=1,
        out_channels=4,
        img_size=SIZE,
        channels=(8, 16, 32),
        num_transformer_layers=1,
        num_heads=2,
    )


def synthetic_volume(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (1, 16, 16, 16) image whose classes are intensity bands: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    label = torch.zeros(SIZE, dtype=torch.int64)
    offset = int(torch.randint(1, 5, (1,), generator=g))
    label[offset : offset + 6, 2:10, 2:10] = 1
    label[offset + 7 : offset + 11, 4:14, 5:13] = 2
    label[2:6, 11:15, 10:15] = 3
    image = label.float() * 1.5 + 0.3 * torch.randn(SIZE, generator=g)
    return image[None], label[None]


def synthetic_batches(n: int, batch_size: int = 2) -> list[dict]:
    vols = [synthetic_volume(i) for i in range(n)]
    batches = []
    for i in range(0, n, batch_size):
        chunk = vols[i : i + batch_size]
        batches.append(
            {
                "image": torch.stack([v[0] for v in chunk]),
                "label": torch.stack([v[1] for v in chunk]),
                "spacing": torch.ones(len(chunk), 3),
                "case_id": [f"s{i + j}" for j in range(len(chunk))],
            }
        )
    return batches


def distance(a: nn.Module, b: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((p.detach() - b[n]).pow(2).sum()) for n, p in a.named_parameters()))


# ---------------------------------------------------------------- devices and seeds


def test_pick_device_auto_and_cpu() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"

    assert pick_device("auto").type == expected
    assert pick_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("requested", ["cuda", "cuda:1"])
def test_pick_device_cuda_without_gpu_is_a_clear_error(requested: str) -> None:
    with pytest.raises(TrainingError, match="CUDA is not available"):
        pick_device(requested)


def test_pick_device_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="device must be"):
        pick_device("gpu0")


def test_seed_everything_makes_draws_repeat() -> None:
    seed_everything(123)
    first = (torch.rand(3), np.random.rand(3))
    seed_everything(123)
    second = (torch.rand(3), np.random.rand(3))

    torch.testing.assert_close(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])


# ---------------------------------------------------------------- training


@pytest.mark.slow  # trains for many steps
def test_train_local_reduces_the_loss() -> None:
    model = tiny_model()
    batches = synthetic_batches(4)

    result = train_local(model, batches, LoopSettings(epochs=6, lr=1e-2), device=CPU, loss_fn=model_pkg.DiceCELoss())

    assert len(result.epoch_losses) == 6
    assert all(math.isfinite(x) for x in result.epoch_losses)
    assert result.epoch_losses[-1] < 0.7 * result.epoch_losses[0]
    assert (result.steps, result.volumes) == (12, 24)
    assert result.seconds > 0 and result.volumes_per_s > 0


@pytest.mark.slow  # trains for many steps
def test_epochs_stepped_one_by_one_train_exactly_as_train_local() -> None:
    # Centralized training steps train_epoch itself between validations: the same loop, the same weights.
    batches = synthetic_batches(4)
    settings = LoopSettings(epochs=2, lr=0.05, optimizer="sgd", momentum=0.9)
    whole, stepped = tiny_model(), tiny_model()

    result = train_local(whole, batches, settings, device=CPU, loss_fn=model_pkg.DiceCELoss())
    opt = build_optimizer(stepped, settings)
    losses = [train_epoch(stepped, batches, opt, settings, epoch=e, device=CPU, loss_fn=model_pkg.DiceCELoss()).loss
              for e in (1, 2)]

    assert losses == result.epoch_losses
    for a, b in zip(whole.parameters(), stepped.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.slow  # trains for many steps
def test_fedprox_with_huge_mu_keeps_weights_near_the_global_model() -> None:
    batches = synthetic_batches(4)
    free, prox = tiny_model(), tiny_model()
    start = {n: p.detach().clone() for n, p in free.named_parameters()}

    train_local(free, batches, LoopSettings(epochs=3, lr=3e-3), device=CPU, loss_fn=model_pkg.DiceCELoss())
    train_local(prox, batches, LoopSettings(epochs=3, lr=3e-3, fedprox_mu=1e4),
                device=CPU, loss_fn=model_pkg.DiceCELoss(), global_params=start)

    assert distance(prox, start) < 0.3 * distance(free, start)


def test_fedprox_rejects_global_params_of_another_model() -> None:
    model = tiny_model()
    wrong = {n: torch.zeros(1) for n, _ in model.named_parameters()}

    with pytest.raises(TrainingError, match="has shape"):
        train_local(model, synthetic_batches(2), LoopSettings(epochs=1, fedprox_mu=0.1),
                    device=CPU, loss_fn=model_pkg.DiceCELoss(), global_params=wrong)


def test_non_finite_loss_names_epoch_and_step() -> None:
    batches = synthetic_batches(4)
    batches[1]["image"][0, 0, 0, 0, 0] = float("nan")  # the second batch of each epoch
    model = tiny_model()

    with pytest.raises(TrainingError, match=r"epoch 1, step 2"):
        train_local(model, batches, LoopSettings(epochs=2), device=CPU, loss_fn=model_pkg.DiceCELoss())


def test_progress_is_reported_per_step_and_per_epoch() -> None:
    seen: list[EpochProgress] = []

    train_local(tiny_model(), synthetic_batches(4), LoopSettings(epochs=2),
                device=CPU, loss_fn=model_pkg.DiceCELoss(), progress=seen.append)

    ends = [p for p in seen if p.epoch_done]
    assert [(p.epoch, p.step) for p in seen if not p.epoch_done] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert [(p.epoch, p.epochs, p.step, p.steps_in_epoch) for p in ends] == [(1, 2, 2, 2), (2, 2, 2, 2)]


def test_amp_on_cpu_trains_in_fp32_exactly_like_no_amp() -> None:
    with_amp, without = tiny_model(), tiny_model()
    batches = synthetic_batches(2)

    a = train_local(with_amp, batches, LoopSettings(epochs=1, amp=True), device=CPU, loss_fn=model_pkg.DiceCELoss())
    b = train_local(without, batches, LoopSettings(epochs=1), device=CPU, loss_fn=model_pkg.DiceCELoss())

    assert a.epoch_losses == b.epoch_losses
    for pa, pb in zip(with_amp.parameters(), without.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


def test_optimizer_state_carries_over_between_rounds() -> None:
    model = tiny_model()
    batches = synthetic_batches(2)
    first = train_local(model, batches, LoopSettings(epochs=1), device=CPU, loss_fn=model_pkg.DiceCELoss())

    second = train_local(model, batches, LoopSettings(epochs=2),
                         device=CPU, loss_fn=model_pkg.DiceCELoss(), optimizer_state=first.optimizer_state)

    steps = {int(s["step"]) for s in second.optimizer_state["state"].values()}
    assert steps == {first.steps + second.steps}


@pytest.mark.parametrize("kwargs, message", [({"epochs": 0}, "epochs"), ({"lr": 0.0}, "lr"), ({"fedprox_mu": -1.0}, "fedprox_mu")])
def test_bad_training_arguments_are_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LoopSettings(**({"epochs": 1, "lr": 1e-3} | kwargs))


def top_share(before: dict[str, torch.Tensor], model: nn.Module, fraction: float) -> float:
    """Share of the update's squared norm held by its largest ``fraction`` of entries."""
    delta = torch.cat([(p.detach() - before[n]).flatten() for n, p in model.named_parameters()])
    energy = torch.sort(delta.pow(2), descending=True).values
    return float(energy[: math.ceil(fraction * energy.numel())].sum() / energy.sum())


@pytest.mark.slow  # trains for many steps
def test_sgd_with_momentum_reduces_the_loss() -> None:
    model = tiny_model()
    batches = synthetic_batches(4)

    result = train_local(model, batches, LoopSettings(epochs=6, lr=0.05, optimizer="sgd", momentum=0.9),
                         device=CPU, loss_fn=model_pkg.DiceCELoss())

    assert result.epoch_losses[-1] < 0.7 * result.epoch_losses[0]
    assert isinstance(make_optimizer("sgd", model.parameters(), lr=0.1, momentum=0.9), torch.optim.SGD)


def test_sgd_updates_concentrate_where_a_top_k_codec_sends_them() -> None:
    # Why "sgd" exists: Adam moves every entry by about lr whatever its gradient, so a round's update
    # is spread over all entries and top-1% holds a few percent of it; SGD's is a sum of gradients.
    batches = synthetic_batches(4)
    shares = {}
    for name, lr, momentum in (("adam", 2e-3, 0.0), ("sgd", 0.05, 0.9)):
        model = tiny_model()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        train_local(model, batches, LoopSettings(epochs=1, lr=lr, optimizer=name, momentum=momentum),
                    device=CPU, loss_fn=model_pkg.DiceCELoss())
        shares[name] = top_share(before, model, 0.01)

    assert shares["adam"] < 0.1
    assert shares["sgd"] > 0.5


def test_sgd_momentum_buffers_carry_over_between_rounds() -> None:
    model = tiny_model()
    batches = synthetic_batches(2)
    first = train_local(model, batches, LoopSettings(epochs=1, lr=0.01, optimizer="sgd", momentum=0.9),
                        device=CPU, loss_fn=model_pkg.DiceCELoss())
    buffers = {k: v["momentum_buffer"].clone() for k, v in first.optimizer_state["state"].items()}

    second = train_local(model, batches, LoopSettings(epochs=1, lr=0.01, optimizer="sgd", momentum=0.9),
                         device=CPU, loss_fn=model_pkg.DiceCELoss(), optimizer_state=first.optimizer_state)

    assert buffers and set(second.optimizer_state["state"]) == set(buffers)
    assert any(not torch.equal(second.optimizer_state["state"][k]["momentum_buffer"], b) for k, b in buffers.items())


def test_an_unknown_optimizer_is_a_training_error_naming_what_this_site_runs() -> None:
    # TrainingError: the agent then skips the round with this reason instead of stopping.
    with pytest.raises(TrainingError, match=r"unknown optimizer 'lamb'.*\['adam', 'sgd'\]"):
        train_local(tiny_model(), synthetic_batches(2), LoopSettings(epochs=1, lr=1e-3, optimizer="lamb"),
                    device=CPU, loss_fn=model_pkg.DiceCELoss())


@pytest.mark.parametrize(
    "name, kwargs, message",
    [("adam", {"momentum": 0.9}, "momentum applies to optimizer 'sgd' only"), ("sgd", {"momentum": 1.0}, "momentum"),
     ("sgd", {"lr": float("nan")}, "lr")],
)
def test_bad_optimizer_settings_are_rejected(name: str, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_optimizer(name, tiny_model().parameters(), **({"lr": 0.1} | kwargs))


def test_the_aggregator_offers_the_optimizers_sites_run() -> None:
    from aggregator_service.config import ConfigError, parse_federation_config
    from protos.fedsegnet.v1.training_options import OPTIMIZERS as ON_THE_WIRE

    assert OPTIMIZERS is ON_THE_WIRE  # one list for both sides
    for name in OPTIMIZERS:
        assert parse_federation_config({"training": {"optimizer": name}}).training.optimizer == name
    with pytest.raises(ConfigError, match="training.optimizer must be one of"):
        parse_federation_config({"training": {"optimizer": "lion"}})


# ---------------------------------------------------------------- evaluation


class OneHotOracle(nn.Module):
    """Returns its input as logits: fed the one-hot truth, its argmax is the truth."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def oracle_dataset(n: int) -> list[dict]:
    items = []
    for i in range(n):
        _, label = synthetic_volume(i)
        one_hot = torch.nn.functional.one_hot(label[0], 4).permute(3, 0, 1, 2).float()
        items.append({"image": one_hot[None], "label": label[None], "spacing": torch.tensor([[1.0, 1.0, 2.0]]), "case_id": [f"o{i}"]})
    return items


def test_perfect_prediction_scores_dice_one_and_hd95_zero() -> None:
    result = evaluate(OneHotOracle(), oracle_dataset(2), device=CPU, num_classes=4, region_fn=regions_from_labels)

    assert result["cases"] == 2
    for key in ("dice", "iou", "precision", "recall"):
        assert result[key] == pytest.approx(1.0)
    assert result["hd95"] == pytest.approx(0.0)
    assert set(result["per_class"]) == {"1", "2", "3"}
    assert all(v["dice"] == pytest.approx(1.0) for v in result["per_class"].values())
    assert {k: v["dice"] for k, v in result["regions"].items()} == pytest.approx({"ET": 1.0, "TC": 1.0, "WT": 1.0})


def test_evaluate_after_training_on_nifti_site(tmp_path: Path) -> None:
    root = tmp_path / "site"
    for i in range(3):
        image, label = synthetic_volume(i)
        affine = np.diag([1.5, 1.5, 2.0, 1.0])
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "labels").mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(image[0].numpy(), affine), str(root / "images" / f"c{i}.nii.gz"))
        nib.save(nib.Nifti1Image(label[0].numpy().astype(np.uint8), affine), str(root / "labels" / f"c{i}.nii.gz"))
    site = build_datasets(root, spatial_size=SIZE, num_classes=4, augment=False, val_fraction=0.34, seed=0, normalize="volume")
    model = tiny_model()
    train_local(model, make_loader(site.train, batch_size=2, shuffle=True, seed=0), LoopSettings(epochs=2, lr=3e-3),
                device=CPU, loss_fn=model_pkg.DiceCELoss())

    result = evaluate(model, site.val, device=CPU, num_classes=4, loss_fn=model_pkg.DiceCELoss())

    assert result["cases"] == 1
    assert 0.0 <= result["dice"] <= 1.0 and 0.0 <= result["iou"] <= 1.0
    assert math.isfinite(result["loss"])
    for cls in ("1", "2", "3"):
        assert 0.0 <= result["per_class"][cls]["dice"] <= 1.0
    assert model.training  # evaluate restores the mode it found


def test_evaluate_on_a_loader_averages_over_cases() -> None:
    items = oracle_dataset(3)
    batch = {
        "image": torch.cat([it["image"] for it in items]),
        "label": torch.cat([it["label"] for it in items]),
        "spacing": torch.cat([it["spacing"] for it in items]),
        "case_id": [c for it in items for c in it["case_id"]],
    }
    # Spoil the third case: predict background everywhere.
    batch["image"][2] = 0.0
    batch["image"][2, 0] = 1.0

    result = evaluate(OneHotOracle(), [batch], device=CPU, num_classes=4)

    assert result["cases"] == 3
    assert result["dice"] == pytest.approx(2.0 / 3.0)


def test_evaluate_with_nothing_to_evaluate_fails() -> None:
    with pytest.raises(ValueError, match="no volume"):
        evaluate(OneHotOracle(), [], device=CPU, num_classes=4)


def test_evaluate_leaves_the_model_unchanged() -> None:
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())

    evaluate(model, [synthetic_batches(2)[0]], device=CPU, num_classes=4)

    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])
