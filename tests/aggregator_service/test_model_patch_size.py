"""``[model] patch_size``: checked against img_size, carried in every round's ModelSpec, stored only when set."""

from __future__ import annotations

import json

import pytest

from aggregator_service.config import ConfigError, parse_federation_config
from aggregator_service.wire import training_config_to_proto


def test_the_round_config_carries_the_window() -> None:
    config = parse_federation_config({"model": {"img_size": [48, 48, 48], "patch_size": [32, 32, 16]}})
    assert config.model.patch_size == (32, 32, 16)
    assert list(training_config_to_proto(config, 2).model.patch_size) == [32, 32, 16]


def test_whole_volumes_stay_the_default_and_are_stored_as_before_the_key() -> None:
    config = parse_federation_config({})
    assert config.model.patch_size == ()
    assert list(training_config_to_proto(config, 1).model.patch_size) == []
    # A store created before the key existed compares its stored JSON with this one on restart.
    assert "patch_size" not in json.loads(config.to_json())["model"]
    windowed = parse_federation_config({"model": {"patch_size": [16, 16, 16]}})
    assert json.loads(windowed.to_json())["model"]["patch_size"] == [16, 16, 16]


@pytest.mark.parametrize("patch, message", [
    ([64, 32, 32], r"model.patch_size \[64, 32, 32\] must fit in model.img_size \[48, 48, 48\]"),
    ([32, 32], r"model.patch_size must be three positive sizes"),
    ([32, 0, 32], r"model.patch_size must be three positive sizes"),
    ([32.5, 32, 32], r"model.patch_size must be three positive sizes"),
    (32, r"model.patch_size must be a list of three sizes, e.g. \[32, 32, 32\]"),
])
def test_a_bad_window_is_refused_naming_the_key(patch: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_federation_config({"model": {"img_size": [48, 48, 48], "patch_size": patch}}, source="fed.toml")
