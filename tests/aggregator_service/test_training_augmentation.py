"""``[training] augmentation``: checked by name, carried in every round's TrainingConfig."""

from __future__ import annotations

import pytest

from aggregator_service.config import ConfigError, parse_federation_config
from aggregator_service.wire import training_config_to_proto
from protos.fedsegnet.v1.training_options import AUGMENTATIONS, OPTIMIZERS, check_optimizer


def test_the_round_config_carries_the_recipe() -> None:
    assert training_config_to_proto(parse_federation_config({}), 1).augmentation == "standard"
    config = parse_federation_config({"training": {"augmentation": "synthseg"}})
    assert training_config_to_proto(config, 3).augmentation == "synthseg"


def test_an_unknown_recipe_is_refused_naming_the_allowed_ones() -> None:
    with pytest.raises(ConfigError, match=r"training.augmentation must be one of \['standard', 'synthseg', 'contrast', 'none'\]"):
        parse_federation_config({"training": {"augmentation": "SynthSeg"}})
    assert AUGMENTATIONS == ("standard", "synthseg", "contrast", "none")


@pytest.mark.parametrize("name, momentum, match", [("lion", 0.0, "optimizer must be one of"),
                                                   ("sgd", 1.0, r"momentum must be in \[0, 1\)"),
                                                   ("adam", 0.9, "momentum applies to optimizer 'sgd' only")])
def test_one_rule_set_for_the_optimizer_on_both_sides(name: str, momentum: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        check_optimizer(name, momentum)
    with pytest.raises(ConfigError, match="training." + match):
        parse_federation_config({"training": {"optimizer": name, "momentum": momentum}})
    assert OPTIMIZERS == ("adam", "sgd")
