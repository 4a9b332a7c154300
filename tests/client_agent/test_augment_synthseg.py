"""The "synthseg" augmentation recipe: a new contrast from the case's own labels, seeded stages."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from client_agent.agent import SiteAgent
from client_agent.data import AUGMENTATIONS, AugmentConfig, augmentation_recipe, build_augmentation
from client_agent.data.augment import RECIPES, RandTissueContrastd, Stages
from client_agent.reporting import Reporter
from client_agent.training import TrainingError
from client_agent.transport import AggregatorClient
from protos.fedsegnet.v1 import aggregator_pb2 as pb
from tests.agent_federation import settings


def _two_tissues(size: int = 12) -> dict[str, torch.Tensor]:
    """Background 0, tissue 1 at intensity -1, tissue 2 at +1, and one slab of voxels halfway (0.0 + 1e-3)."""
    label = torch.zeros((1, size, size, size))
    image = torch.zeros((1, size, size, size))
    label[0, 2:10, 2:10, 2:6], image[0, 2:10, 2:10, 2:6] = 1, -1.0
    label[0, 2:10, 2:10, 6:10], image[0, 2:10, 2:10, 6:10] = 2, 1.0
    image[0, 2:10, 2:10, 6] = 1e-3  # partial volume: labelled tissue 2, intensity halfway
    return {"image": image, "label": label}


def test_every_wire_name_has_a_recipe_and_unknown_names_are_refused() -> None:
    assert set(RECIPES) == set(AUGMENTATIONS)
    assert augmentation_recipe("none") is None
    assert augmentation_recipe("standard") == AugmentConfig()
    synthseg = augmentation_recipe("synthseg")
    assert synthseg is not None and synthseg.flip_axes == (0,) and synthseg.contrast_prob > 0
    with pytest.raises(ValueError, match="unknown augmentation 'rand'.*synthseg"):
        augmentation_recipe("rand")


def test_contrast_is_redrawn_keeping_background_and_partial_volume() -> None:
    data = _two_tissues()
    t = RandTissueContrastd(prob=1.0, bias=0.0, log_gamma=0.0, noise=0.0).set_random_state(seed=0)
    orders = set()
    for _ in range(30):
        out = t(dict(data))["image"][0]
        label = data["label"][0]
        assert torch.all(out[label == 0] == 0)  # skull-stripped background stays exactly 0
        inside = out[label > 0]
        assert abs(float(inside.mean())) < 1e-4 and abs(float(inside.std(unbiased=False)) - 1) < 1e-3  # z-scored
        a, b = float(out[3, 3, 3]), float(out[3, 3, 8])  # tissue 1, tissue 2
        halfway = float(out[3, 3, 6])
        # no noise, bias or gamma: the map is linear between the tissues' levels
        assert halfway == pytest.approx((a + b) / 2, abs=1e-2 * (1 + abs(a - b)))
        orders.add(a < b)
    assert orders == {True, False}  # both orderings of the two tissues occur: T1-like and inverted


def test_tissues_of_nearly_one_level_share_it_instead_of_a_steep_map_between_them() -> None:
    data = _two_tissues()
    data["label"][0, 2:10, 2:10, 8:10] = 3  # a third tissue at +1.0001: the same level as tissue 2
    data["image"][0, 2:10, 2:10, 8:10] = 1.0001
    t = RandTissueContrastd(prob=1.0, bias=0.0, log_gamma=0.0, noise=0.0).set_random_state(seed=1)
    for _ in range(10):
        out = t(dict(data))["image"][0]
        assert float(out[3, 3, 7]) == pytest.approx(float(out[3, 3, 9]), abs=1e-3)
        assert torch.isfinite(out).all() and float(out.abs().max()) < 10


def test_contrast_is_seeded_and_leaves_single_tissue_cases_alone() -> None:
    data = _two_tissues()
    one = RandTissueContrastd().set_random_state(seed=4)(dict(data))["image"]
    two = RandTissueContrastd().set_random_state(seed=4)(dict(data))["image"]
    other = RandTissueContrastd().set_random_state(seed=5)(dict(data))["image"]
    assert torch.equal(one, two) and not torch.equal(one, other)
    single = {"image": data["image"].clone(), "label": (data["label"] > 0).float()}
    assert torch.equal(RandTissueContrastd().set_random_state(seed=0)(dict(single))["image"], single["image"])
    assert torch.equal(RandTissueContrastd(prob=0.0)(dict(data))["image"], data["image"])


@pytest.mark.parametrize("kwargs, match", [({"prob": 1.5}, "prob"), ({"bias": -1.0}, "bias"),
                                           ({"noise": float("nan")}, "noise")])
def test_bad_contrast_parameters_are_refused_by_name(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RandTissueContrastd(**kwargs)


def test_the_synthseg_recipe_is_reproducible_and_flips_left_right_only() -> None:
    config = augmentation_recipe("synthseg")
    assert config is not None
    data = _two_tissues(16)
    first = build_augmentation(config, spatial_size=(16, 16, 16), seed=7)
    second = build_augmentation(config, spatial_size=(16, 16, 16), seed=7)
    assert isinstance(first, Stages)
    for _ in range(3):
        a, b = first(dict(data)), second(dict(data))
        assert torch.equal(torch.as_tensor(a["image"]), torch.as_tensor(b["image"]))
        assert set(torch.as_tensor(a["label"]).round().unique().tolist()) <= {0.0, 1.0, 2.0}
    first.set_random_state(seed=8)  # a DataLoader worker's reseed reaches every stage
    assert not torch.equal(torch.as_tensor(first(dict(data))["image"]), torch.as_tensor(second(dict(data))["image"]))
    with pytest.raises(ValueError, match="flip_axes"):
        AugmentConfig(flip_axes=(3,))


def test_the_contrast_recipe_redraws_the_contrast_of_about_half_the_draws_and_never_moves_a_voxel() -> None:
    config = augmentation_recipe("contrast")
    assert config is not None and config.contrast_prob == 0.5
    data = _two_tissues(16)
    augment = build_augmentation(config, spatial_size=(16, 16, 16), seed=3)
    redrawn = 0
    for _ in range(40):
        out = augment(dict(data))
        assert torch.equal(torch.as_tensor(out["label"]), data["label"])  # no geometry: labels untouched
        image = torch.as_tensor(out["image"])
        assert torch.all(image[data["label"] == 0] == 0)
        redrawn += not torch.equal(image, data["image"])
    assert 10 <= redrawn <= 30  # Binomial(40, 0.5): outside [10, 30] with probability < 1e-3


def _round_config(augmentation: str) -> pb.TrainingConfig:
    return pb.TrainingConfig(model=pb.ModelSpec(architecture="transformer_unet", in_channels=1, out_channels=4,
                                                img_size=[16, 16, 16]), seed=1, augmentation=augmentation)


def test_the_site_runs_the_recipe_the_federation_names_unless_it_turned_augmentation_off(
        mni_site: Path, tmp_path: Path) -> None:
    client = AggregatorClient("127.0.0.1:9")  # never called: site_data only reads the local data
    try:
        agent = SiteAgent(settings(mni_site, tmp_path / "state", "127.0.0.1:9", augment=True), client,
                          Reporter(fmt="json"))
        assert isinstance(agent.site_data(_round_config("synthseg")).train.augment, Stages)
        assert agent.site_data(_round_config("none")).train.augment is None
        assert agent.site_data(_round_config("")).train.augment is not None  # empty: "standard"
        with pytest.raises(TrainingError, match="unknown augmentation 'mixup'.*upgrade the client agent"):
            agent.site_data(_round_config("mixup"))
        off = SiteAgent(settings(mni_site, tmp_path / "state2", "127.0.0.1:9", augment=False), client,
                        Reporter(fmt="json"))
        assert off.site_data(_round_config("synthseg")).train.augment is None
    finally:
        client.close()


def test_fedseg_train_takes_the_recipe_by_name(mni_site: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from client_agent.centralized import TrainSettings
    from fedseg.cli import main

    assert TrainSettings(data_dirs=(mni_site,), out=tmp_path / "m.pt", augmentation="synthseg").augmentation == "synthseg"
    with pytest.raises(ValueError, match="unknown augmentation 'synth'"):
        TrainSettings(data_dirs=(mni_site,), out=tmp_path / "m.pt", augmentation="synth")
    with pytest.raises(SystemExit):
        main(["train", "--data", str(mni_site), "--out", str(tmp_path / "m.pt"), "--augmentation", "synth"])
    # argparse names the bad value and the recipes it takes (not "unrecognized arguments")
    assert "--augmentation: invalid choice: 'synth'" in capsys.readouterr().err
