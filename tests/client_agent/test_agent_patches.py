"""A federation's ``[model] patch_size`` reaches the site: it trains on windows, not whole volumes.

A real aggregator sends ModelSpec.patch_size = 8³ to a real agent whose site (32³ MNI152 cases
resampled to 16³) trains one SGD step without momentum: the stored update is exactly
``-lr * gradient`` on the two windows the site's seeded sampler draws, and not the step whole
volumes would give.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import codec
from agent_federation import TINY_MODEL, Federation, federation_config, run_agent, settings
from client_agent.agent import load_arrays, model_from_config
from client_agent.data import build_datasets, make_loader
from model import DiceCELoss

LR = 0.05


def _step(round_config, initial, image: torch.Tensor, label: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    model = model_from_config(round_config)
    load_arrays(model, initial)
    model.train()
    DiceCELoss(lambda_dice=float(round_config.lambda_dice))(model(image), label).backward()
    return {name: -LR * p.grad for name, p in model.named_parameters()}


@pytest.mark.slow  # a whole federation round
def test_a_site_trains_on_the_windows_the_federation_configures(mni_site: Path, tmp_path: Path) -> None:
    base = federation_config(model=dataclasses.replace(TINY_MODEL, patch_size=(8, 8, 8)))
    config = dataclasses.replace(base, training=dataclasses.replace(base.training, optimizer="sgd",
                                                                    learning_rate=LR))
    with Federation(tmp_path, config) as fed:
        run = run_agent(settings(mni_site, tmp_path / "state", fed.target))
        round_config = fed.round_config()
    assert run.code == 0
    assert list(round_config.model.patch_size) == [8, 8, 8]

    # The agent's round 1: seed = the federation's seed (3) + 1, for the shuffle and the windows.
    data = build_datasets(mni_site, spatial_size=(16, 16, 16), num_classes=4, val_fraction=0.34, seed=3,
                          augment=False, cache_dir=tmp_path / "check-cache", patch_size=(8, 8, 8))
    data.train.reseed(4)
    batch = next(iter(make_loader(data.train, batch_size=2, shuffle=True, seed=4)))
    assert tuple(batch["image"].shape) == (2, 1, 8, 8, 8)
    initial = codec.load_tensors(tmp_path / "state" / "global-0001.frames")
    local = codec.load_tensors(tmp_path / "state" / "local-0001.frames")
    expected = _step(round_config, initial, batch["image"], batch["label"])
    for name, step in expected.items():
        torch.testing.assert_close(torch.from_numpy(local[name] - initial[name]), step, rtol=1e-3, atol=1e-7,
                                   msg=lambda m: f"{name}: {m}")

    whole = build_datasets(mni_site, spatial_size=(16, 16, 16), num_classes=4, val_fraction=0.34, seed=3,
                           augment=False, cache_dir=tmp_path / "check-cache")
    volumes = [whole.train[i] for i in range(len(whole.train))]
    on_volumes = _step(round_config, initial, torch.stack([v["image"] for v in volumes]),
                       torch.stack([v["label"] for v in volumes]))
    name = "stem.conv.weight" if "stem.conv.weight" in on_volumes else next(iter(on_volumes))
    assert not torch.allclose(torch.from_numpy(local[name] - initial[name]), on_volumes[name], rtol=1e-2, atol=1e-6)
