"""The local optimizer and learning-rate schedule a federation configures reach every site.

A real aggregator hands ``optimizer = "sgd"`` with momentum to a real agent, which trains one step
on the site's two training volumes (32³ MNI152, resampled to 16³) and uploads the dense update.
One step of SGD from a fresh momentum buffer is ``-lr * gradient`` exactly, where Adam's first
step is about ``-lr * sign(gradient)``: the stored update tells the two apart.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import codec
from agent_federation import Federation, federation_config, run_agent, settings
from aggregator_service import wire
from aggregator_service.config import ConfigError, TrainingSettings, parse_federation_config
from client_agent.agent import load_arrays, model_from_config
from client_agent.data import build_datasets
from model import DiceCELoss

LR = 0.05


@pytest.mark.slow  # a whole federation round
def test_a_site_trains_with_the_optimizer_the_federation_configures(mni_site: Path, tmp_path: Path) -> None:
    base = federation_config()
    config = dataclasses.replace(
        base, training=dataclasses.replace(base.training, optimizer="sgd", momentum=0.9, learning_rate=LR)
    )
    with Federation(tmp_path, config) as fed:
        run = run_agent(settings(mni_site, tmp_path / "state", fed.target))
        round_config = fed.round_config()
    assert run.code == 0
    assert (round_config.optimizer, round_config.momentum) == ("sgd", pytest.approx(0.9))

    data = build_datasets(mni_site, spatial_size=(16, 16, 16), num_classes=4, val_fraction=0.34, seed=3,
                          augment=False, cache_dir=tmp_path / "check-cache")
    items = [data.train[i] for i in range(len(data.train))]
    model = model_from_config(round_config)
    initial = codec.load_tensors(tmp_path / "state" / "global-0001.frames")
    load_arrays(model, initial)
    model.train()
    loss = DiceCELoss(lambda_dice=float(round_config.lambda_dice))(
        model(torch.stack([item["image"] for item in items])), torch.stack([item["label"] for item in items])
    )
    loss.backward()
    local = codec.load_tensors(tmp_path / "state" / "local-0001.frames")

    assert len(items) == 2  # one step over both volumes
    for name, p in model.named_parameters():
        step = torch.from_numpy(local[name] - initial[name])
        torch.testing.assert_close(step, -LR * p.grad, rtol=1e-3, atol=1e-7, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize(
    "training, message",
    [
        ({"optimizer": "lamb"}, r"training.optimizer must be one of \['adam', 'sgd'\], got 'lamb'"),
        ({"optimizer": "sgd", "momentum": 1.0}, r"training.momentum must be in \[0, 1\), got 1.0"),
        ({"momentum": 0.9}, "training.momentum applies to optimizer 'sgd' only"),
    ],
)
def test_bad_optimizer_settings_are_refused_naming_the_key(training: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_federation_config({"training": training}, source="fed.toml")


def test_adam_stays_the_default_optimizer() -> None:
    assert (TrainingSettings().optimizer, TrainingSettings().momentum) == ("adam", 0.0)


def test_cosine_schedule_sends_each_round_its_rate() -> None:
    # lr 0.1 -> 0.01 over 4 rounds: 0.01 + 0.09 * (1 + cos(pi * (r - 1) / 4)) / 2
    config = parse_federation_config(
        {"federation": {"rounds": 4},
         "training": {"optimizer": "sgd", "learning_rate": 0.1, "lr_schedule": "cosine", "final_learning_rate": 0.01}}
    )
    expected = [0.1, 0.01 + 0.09 * 0.8535534, 0.055, 0.01 + 0.09 * 0.1464466]

    sent = [wire.training_config_to_proto(config, r).learning_rate for r in range(1, 5)]

    assert sent == pytest.approx(expected, rel=1e-6)
    assert wire.training_config_to_proto(config, 9).learning_rate == pytest.approx(expected[-1], rel=1e-6)


def test_constant_schedule_sends_the_configured_rate_every_round() -> None:
    config = parse_federation_config({"federation": {"rounds": 3}, "training": {"learning_rate": 2e-3}})

    assert [wire.training_config_to_proto(config, r).learning_rate for r in (1, 2, 3)] == pytest.approx([2e-3] * 3)


@pytest.mark.parametrize(
    "training, message",
    [
        ({"lr_schedule": "step"}, r"training.lr_schedule must be one of \['constant', 'cosine'\], got 'step'"),
        ({"learning_rate": 0.01, "final_learning_rate": 0.1}, r"final_learning_rate must be in \[0, learning_rate"),
    ],
)
def test_bad_schedules_are_refused_naming_the_key(training: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_federation_config({"training": training})


@pytest.mark.parametrize(
    "training, message",
    [({"batch_size": 0}, "batch_size"), ({"fedprox_mu": -1.0}, "fedprox_mu"), ({"lambda_dice": 2.0}, "lambda_dice")],
)
def test_the_other_training_keys_are_still_checked(training: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=f"training.{message}"):
        TrainingSettings(**training)
