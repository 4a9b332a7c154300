"""``[codec] warmup_start_budget``: the byte-budget warm-up. Its schedule, the values it refuses by
name, that a real aggregator sends each round's budget in the round's CodecSpec (and the sites'
uploads fit it), and that the stored federation config notices a changed value on restart."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from numpy_federation import config, start, upload_requests

import codec
from aggregator_service.config import ConfigError, SparsityWarmup, parse_federation_config
from aggregator_service.errors import StoreError
from aggregator_service.server import Aggregator
from aggregator_service.store import Store
from aggregator_service.wire import training_config_to_proto
from protos.fedsegnet.v1 import aggregator_pb2 as pb

TABLES = {
    "federation": {"rounds": 10},
    "codec": {"quantization": "int8", "byte_budget": 7200, "warmup_rounds": 4, "warmup_start_budget": 72000},
}


def test_budget_schedule_values() -> None:
    w = SparsityWarmup(rounds=4, start_budget=72000)
    # exponential from 72 000 to 7 200 bytes over rounds 1..4 (ratio 10^(-1/4) a round), 7 200 from round 5 on
    expected = [72000, round(72000 * 0.1 ** 0.25), round(72000 * 0.1 ** 0.5), round(72000 * 0.1 ** 0.75), 7200, 7200]
    assert [w.budget_at(r, 7200) for r in range(1, 7)] == expected == [72000, 40489, 22768, 12804, 7200, 7200]
    assert all(isinstance(w.budget_at(r, 7200), int) for r in range(1, 7))
    assert SparsityWarmup(rounds=4).budget_at(1, 7200) == 7200  # off by default
    assert w.budget_at(1, 0) == 0  # no budget configured: the warm-up never adds one
    assert w.fraction_at(1, 1.0) == 1.0  # and the fraction warm-up is untouched


def test_the_round_config_carries_the_round_budget() -> None:
    config_ = parse_federation_config(TABLES)
    budgets = [training_config_to_proto(config_, r).codec.byte_budget for r in (1, 4, 5, 10)]
    assert budgets == [72000, 12804, 7200, 7200]
    assert codec.CodecSpec.from_message(training_config_to_proto(config_, 5).codec) == config_.codec
    # only the budget moves: the rest of the codec is the configured one in every round
    first = codec.CodecSpec.from_message(training_config_to_proto(config_, 1).codec)
    assert (first.quantization, first.top_k_fraction, first.byte_budget) == ("int8", 1.0, 72000)


def test_with_both_warmups_each_follows_its_own_schedule() -> None:
    tables = {"codec": {**TABLES["codec"], "top_k_fraction": 0.01, "warmup_start_fraction": 0.25}}
    first = parse_federation_config(tables).codec_at(1)
    assert (first.top_k_fraction, first.byte_budget) == (0.25, 72000)


@pytest.mark.parametrize(("codec_table", "match"), [
    ({"warmup_start_budget": -1}, r"codec.warmup_start_budget must be an integer .* got -1"),
    ({"warmup_start_budget": 72000.0}, r"codec.warmup_start_budget must be an integer .* got 72000.0"),
    ({"warmup_start_budget": "72000"}, r"codec.warmup_start_budget must be an integer .* got '72000'"),
    ({"warmup_start_budget": True}, r"codec.warmup_start_budget must be an integer .* got True"),
    ({"byte_budget": 0}, r"codec.warmup_start_budget = 72000 .* codec.byte_budget is 0 .*set codec.byte_budget"),
    ({"warmup_start_budget": 7200}, r"codec.warmup_start_budget = 7200 must be larger than codec.byte_budget = 7200"),
    ({"warmup_start_budget": 5000}, r"codec.warmup_start_budget = 5000 must be larger than codec.byte_budget = 7200"),
    ({"warmup_rounds": 0}, r"codec.warmup_start_budget = 72000 needs codec.warmup_rounds > 0"),
    ({"warmup_start_budgets": 72000}, r"unknown key\(s\) \['warmup_start_budgets'\] in \[codec\]"),
])
def test_bad_values_are_refused_by_name(codec_table: dict[str, object], match: str) -> None:
    tables = {"federation": dict(TABLES["federation"]), "codec": {**TABLES["codec"], **codec_table}}
    with pytest.raises(ConfigError, match=match):
        parse_federation_config(tables, source="f.toml")


def test_a_start_budget_the_upload_limit_would_refuse_is_refused() -> None:
    tables = {"federation": {"max_update_bytes": 50000}, "codec": dict(TABLES["codec"])}
    with pytest.raises(ConfigError, match=r"warmup_start_budget = 72000 is above federation.max_update_bytes = 50000"):
        parse_federation_config(tables)


def test_off_is_stored_as_before_and_a_changed_value_is_a_changed_config(tmp_path: Path) -> None:
    # A store created before the key existed holds the warm-up without it: that form must not change.
    assert json.loads(parse_federation_config({}).to_json())["warmup"] == {"rounds": 0, "start_fraction": 0.25}
    initial = tmp_path / "initial.frames"
    codec.save_tensors(initial, {"w": np.zeros(8, np.float32)})
    tables = {"federation": {"sites": ["a", "b"]}, "codec": dict(TABLES["codec"])}
    Aggregator(Store(tmp_path / "store"), parse_federation_config(tables), initial_model=initial)
    Aggregator(Store(tmp_path / "store"), parse_federation_config(tables))  # same config: restarts
    for start_budget in (36000, 0):  # another start, or the warm-up switched off
        changed = {**tables, "codec": {**TABLES["codec"], "warmup_start_budget": start_budget}}
        with pytest.raises(StoreError, match="different configuration"):
            Aggregator(Store(tmp_path / "store"), parse_federation_config(changed))


def test_a_real_aggregator_sends_each_round_its_budget_and_the_uploads_fit(tmp_path: Path) -> None:
    start_budget, budget = 16000, 2000
    cfg = config(sites=("a", "b"), rounds=3, codec=codec.CodecSpec(quantization="int8", byte_budget=budget),
                 warmup=SparsityWarmup(rounds=2, start_budget=start_budget))
    rng = np.random.default_rng(5)
    initial = {"w": rng.standard_normal(20000).astype(np.float32), "b": np.zeros(16, np.float32)}
    served = start(tmp_path, cfg, initial)
    asked, sizes = [], []
    try:
        for r in (1, 2, 3):
            deadline = time.monotonic() + 20
            while (round_ := served.stub.GetRound(pb.GetRoundRequest(site="a"), timeout=10).round).round_id < r:
                assert time.monotonic() < deadline, f"round {r} never opened"
                time.sleep(0.01)
            spec = codec.CodecSpec.from_message(round_.config.codec)
            asked.append(spec.byte_budget)
            for site in ("a", "b"):
                # a dense update (every entry non-zero): what a budget can carry is what limits it
                update = {name: (rng.standard_normal(x.shape) * 0.01).astype(np.float32) for name, x in initial.items()}
                frames = list(codec.encode_update(list(update.items()), spec).frames)
                sizes.append(sum(len(f) for f in frames))
                assert sizes[-1] <= spec.byte_budget
                served.stub.SubmitUpdate(upload_requests(site, r, frames), timeout=30)
        served.final_model(cfg)
    finally:
        served.stop()
    assert asked == [start_budget, round(start_budget * (budget / start_budget) ** 0.5), budget] == [16000, 5657, 2000]
    # the warm-up rounds really sent more: round 1's uploads are several times round 3's
    assert min(sizes[:2]) > 4 * max(sizes[4:])
