"""Experiment plumbing: method configurations, the TOML writer, pooled and faulty site folders."""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from client_agent.data import discover_cases
from experiments.experiment import (
    EXPERIMENTS,
    METHODS,
    merge,
    method_config,
    render_table,
    results_tag,
    run_experiment,
    summarize,
)
from experiments.faulty_agent import scale_deltas, scaled_update
from experiments.simulate import (
    GlobalEvaluator,
    SimulationSettings,
    agent_argv,
    dump_toml,
    load_simulation_config,
    prepare_site_dirs,
    task_agent_args,
    write_initial_model,
)
from experiments.sitedata import generate_federation

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def test_merge_overrides_nested_tables_and_drops_keys() -> None:
    base = {"model": {"architecture": "a", "options": {"channels": [1, 2], "num_heads": 4}}, "codec": {"x": 1}}
    merged = merge(base, {"model": {"options": {"drop": ["num_heads"]}}, "codec": {"x": 2}})
    assert merged == {"model": {"architecture": "a", "options": {"channels": [1, 2]}}, "codec": {"x": 2}}
    assert base["model"]["options"]["num_heads"] == 4  # the base is not modified


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_gives_a_valid_simulation_config(method: str, tmp_path: Path) -> None:
    base = tomllib.loads((Path(__file__).parents[2] / "experiments/configs/demo.toml").read_text())
    path = tmp_path / "sim.toml"
    path.write_text(dump_toml(method_config(base, method, "demo")))
    sim, federation, federation_toml = load_simulation_config(path)
    assert tomllib.loads(federation_toml)["federation"]["sites"] == list(federation.sites)
    assert write_initial_model(federation, tmp_path / "initial.frames").stat().st_size > 0  # the network builds
    if method == "centralized":
        assert federation.sites == ("pooled",) and sim.pool_sites
    if method.startswith("faulty"):
        assert sim.faulty_site == 3
    if method.startswith("faulty_scaled"):
        assert (sim.fault, sim.update_scale) == ("scaled_update", 10.0)
    if method.startswith("faulty_flipped"):
        assert (sim.fault, sim.update_scale) == ("scaled_update", -5.0)


def test_experiments_name_known_methods() -> None:
    assert all(m in METHODS for methods in EXPERIMENTS.values() for m in methods)


def test_dump_toml_round_trips() -> None:
    sections = {"a": {"x": 1, "y": 2.5, "s": "t\"q", "b": True, "l": [1, 2], "sub": {"z": [0.5]}}}
    assert tomllib.loads(dump_toml(sections)) == sections


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return generate_federation(tmp_path_factory.mktemp("fed") / "data", sites=2, cases_per_site=(2, 3),
                               test_cases=1, size=32, seed=5)


def test_pooled_folder_holds_every_sites_cases(federation, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (pooled,) = prepare_site_dirs(federation, SimulationSettings(sites=2, pool_sites=True), tmp_path)
    assert len(discover_cases(pooled)) == 5


def test_faulty_site_gets_the_requested_label_noise(federation, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sim = SimulationSettings(sites=2, faulty_site=2, label_noise=0.5)
    dirs = prepare_site_dirs(federation, sim, tmp_path)
    assert dirs[0] == federation.site_dirs[0]
    changed, foreground = 0, 0
    for case in discover_cases(dirs[1]):
        noisy = np.asarray(nib.load(str(case.label_path)).dataobj)
        clean = np.asarray(nib.load(str(federation.site_dirs[1] / "labelsTr" / case.label_path.name)).dataobj)
        assert set(np.unique(noisy)) <= {0, 1, 2, 3}
        foreground += int(np.count_nonzero(clean))
        changed += int(np.count_nonzero(noisy != clean))
    # Half the foreground is redrawn from 3 classes, so about a third of those keep their label.
    assert 0.25 < changed / foreground < 0.45


# -- the BraTS-like experiment: its configuration, its held-out regions, its table --------------


def _demo_base() -> dict:  # type: ignore[type-arg]
    return tomllib.loads((Path(__file__).parents[2] / "experiments/configs/demo.toml").read_text())


@pytest.mark.parametrize("method", EXPERIMENTS["brats"])
def test_brats_experiment_runs_every_method_on_the_four_channel_task(method: str, tmp_path: Path) -> None:
    path = tmp_path / "sim.toml"
    path.write_text(dump_toml(method_config(_demo_base(), method, "demo", "brats")))
    sim, federation, _ = load_simulation_config(path)
    assert sim.task == "brats"
    assert (federation.model.in_channels, federation.model.out_channels) == (4, 4)
    assert task_agent_args(sim.task) == ["--label-map", "brats_regions"]


def test_make_demo_runs_what_table3_measures_as_fedsegnet() -> None:
    # `make demo` shows FedSegNet: its configuration is table3's FedSegNet row at demo scale.
    demo = tomllib.loads((Path(__file__).parents[2] / "experiments/configs/demo-fedsegnet.toml").read_text())
    row = method_config(_demo_base(), "fedsegnet", "demo", "table3")

    assert demo["federation"].pop("id") == "demo-fedsegnet"
    row["federation"].pop("id")
    assert demo == row
    assert (demo["training"]["optimizer"], demo["training"]["keep_optimizer_state"], demo["codec"]["byte_budget"],
            demo["aggregation"]["strategy"]) == ("sgd", True, 7200, "aam")


def test_other_experiments_keep_the_tissue_task(tmp_path: Path) -> None:
    path = tmp_path / "sim.toml"
    path.write_text(dump_toml(method_config(_demo_base(), "fedsegnet", "demo", "table3")))
    sim, federation, _ = load_simulation_config(path)
    assert sim.task == "tissue" and federation.model.in_channels == 1
    assert task_agent_args(sim.task) == []


def test_global_evaluator_scores_the_brats_regions(tmp_path: Path) -> None:
    data = generate_federation(tmp_path / "data", sites=1, cases_per_site=1, test_cases=1, size=16, seed=1,
                               task="brats")
    config = merge(method_config(_demo_base(), "fedavg_dense", "demo", "brats"), {
        "simulation": {"sites": 1, "cases_per_site": [1]},
        "federation": {"sites": ["site-1"], "min_clients": 1, "max_clients": 1},
        "model": {"architecture": "cnn_unet", "img_size": [16, 16, 16],
                  "options": {"channels": [4, 8], "drop": ["num_transformer_layers", "num_heads"]}},
    })
    path = tmp_path / "sim.toml"
    path.write_text(dump_toml(config))
    sim, federation, _ = load_simulation_config(path)
    model = write_initial_model(federation, tmp_path / "initial.frames")
    scores = GlobalEvaluator(federation, data.test_dir, tmp_path / "cache", task=sim.task)(model)
    for region in ("ET", "TC", "WT"):
        assert 0.0 <= scores[f"{region}/dice"] <= 1.0
        assert f"{region}/hd95" in scores
    assert 0.0 <= scores["dice"] <= 1.0


def _record(label: str, rounds: list[dict]) -> dict:  # type: ignore[type-arg]
    return {"label": label, "wall_seconds": 12.0, "rounds": rounds}


def _row(round_id: int, metrics: dict[str, float], bytes_up: int, dense: int) -> dict:  # type: ignore[type-arg]
    return {"round_id": round_id, "site_dice": {}, "global_metrics": metrics, "bytes_up": bytes_up, "bytes_down": 0,
            "weights": {"site-1": 0.25, "site-2": 0.75}, "seconds": 1.0, "dense_bytes_up": dense,
            "update_norms": {"site-1": 1.0, "site-2": 30.0}}


BASE_METRICS = {"dice": 0.5, "iou": 0.4, "hd95": 3.0, "precision": 0.6, "recall": 0.7}


def test_region_metrics_reach_the_summary_and_the_table() -> None:
    regions = {"ET/dice": 0.25, "ET/hd95": 7.5, "TC/dice": 0.5, "TC/hd95": 5.0, "WT/dice": 0.75, "WT/hd95": 2.5}
    record = _record("A", [_row(1, BASE_METRICS, 2_000_000, 2_000_000),
                           _row(2, {**BASE_METRICS, **regions}, 1_000_000, 4_000_000)])
    summary = summarize(record)
    assert summary["regions"]["ET"] == {"dice": 0.25, "hd95": 7.5}
    assert summary["regions"]["WT"] == {"dice": 0.75, "hd95": 2.5}
    # 6 MB of dense fp32 sent as 3 MB over two rounds.
    assert summary["mb_up_total"] == 3.0 and summary["mb_up_per_round"] == 1.5
    assert summary["ratio_vs_dense_fp32"] == 2.0
    header, _, row = render_table("brats", {"centralized": record}).splitlines()[2:5]
    assert "| ET Dice | TC Dice | WT Dice | ET HD95 mm | TC HD95 mm | WT HD95 mm |" in header
    assert "| 0.2500 | 0.5000 | 0.7500 | 7.50 | 5.00 | 2.50 |" in row


def test_tissue_table_has_no_region_columns() -> None:
    table = render_table("table3", {"fedavg_dense": _record("B", [_row(1, BASE_METRICS, 10, 10)])})
    assert "ET Dice" not in table and "| B | 0.5000 | 0.4000 | 3.00 |" in table


def test_faulty_site_table_lists_weights_and_update_norms() -> None:
    table = render_table("faulty-site", {"faulty_scaled_aam": _record("C", [_row(1, BASE_METRICS, 10, 10)])})
    assert "site-1 0.250 (‖Δ‖ 1)" in table and "site-2 0.750 (‖Δ‖ 30)" in table


# -- the scaled-update fault ----------------------------------------------------------------------


def test_scale_deltas_scales_floats_and_passes_counters_through() -> None:
    deltas = [("w", np.array([1.0, -2.0], dtype=np.float32)), ("n", np.array(3, dtype=np.int64))]
    scaled = dict(scale_deltas(deltas, -5.0))
    np.testing.assert_array_equal(scaled["w"], np.array([-5.0, 10.0], dtype=np.float32))
    assert scaled["w"].dtype == np.float32
    assert scaled["n"] == 3


def test_a_scaled_update_is_encoded_with_the_residual_unscaled() -> None:
    import codec

    delta = np.array([0.5, -1.0, 2.0, 0.25], dtype=np.float32)
    residual = {"w": np.array([0.0, 0.0, 0.0, 1.0], dtype=np.float32)}
    spec = codec.CodecSpec(top_k_fraction=0.5)  # sends the 2 largest of (0.5·10, -10, 20, 2.5 + 1)
    scaled = scaled_update(10.0)({"w": delta})
    frames, new_residual = codec.encode_update(list(scaled.items()), spec, residual)  # as the agent encodes
    decoded = dict(codec.decode_frames(list(frames)))
    np.testing.assert_allclose(decoded["w"], [0.0, -10.0, 20.0, 0.0])
    np.testing.assert_allclose(new_residual["w"], [5.0, 0.0, 0.0, 3.5])


@pytest.mark.parametrize("factor", [0.0, float("inf"), float("nan")])
def test_scaled_update_refuses_a_meaningless_factor(factor: float) -> None:
    with pytest.raises(ValueError, match="update scale"):
        scaled_update(factor)


@pytest.mark.slow
def test_the_agent_uploads_what_its_update_hook_returns(mni_site: Path, tmp_path: Path) -> None:
    # The seam the faulty site uses: no monkeypatching, the hook sees θ_local − θ_global and the
    # aggregator receives the hook's result (one site, lossless codec: θ_2 = θ_1 + what was sent).
    import codec
    from agent_federation import Federation, federation_config, run_agent, settings
    from client_agent.state import SiteState

    seen: list[dict[str, np.ndarray]] = []

    def hook(deltas: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        seen.append(deltas)
        return dict(scale_deltas(deltas, -5.0))

    with Federation(tmp_path / "fed", federation_config()) as fed:
        run = run_agent(settings(mni_site, tmp_path / "state", fed.target), transform_update=hook)
        first, second = codec.load_tensors(fed.store.model_path(1)), codec.load_tensors(fed.store.model_path(2))

    assert run.code == 0 and len(seen) == 1
    state = SiteState(tmp_path / "state")
    local, global_ = state.read_tensors("local", 1), state.read_tensors("global", 1)
    for name, delta in seen[0].items():
        np.testing.assert_array_equal(delta, local[name] - global_[name])
        if delta.dtype.kind == "f":
            np.testing.assert_allclose(second[name], first[name] - 5.0 * delta, rtol=1e-5, atol=1e-6)


def test_the_faulty_site_of_a_scaled_update_scenario_runs_the_wrapper() -> None:
    sim = SimulationSettings(sites=3, faulty_site=2, fault="scaled_update", update_scale=-5.0)
    assert agent_argv(sim, 0)[1:] == ["-m", "client_agent.cli"]
    assert agent_argv(sim, 1)[1:] == ["-m", "experiments.faulty_agent", "--update-scale", "-5.0"]


def test_a_scaled_update_scenario_leaves_the_labels_alone(federation, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sim = SimulationSettings(sites=2, faulty_site=2, fault="scaled_update")
    assert prepare_site_dirs(federation, sim, tmp_path) == federation.site_dirs


@pytest.mark.parametrize("settings, message", [
    ({"fault": "bit_flips"}, "simulation.fault"),
    ({"update_scale": 0.0}, "simulation.update_scale"),
    ({"task": "lits"}, "simulation.task"),
])
def test_simulation_settings_refuse_unknown_faults_and_tasks(settings: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError, match=message):
        SimulationSettings(**settings)


def test_faulty_site_experiment_has_both_faults_under_both_rules() -> None:
    sims = [METHODS[m].overrides["simulation"] for m in EXPERIMENTS["faulty-site"]]
    assert {(s.get("fault", "label_noise"), s.get("update_scale"), s["faulty_site"]) for s in sims} == {
        ("label_noise", None, 3), ("scaled_update", 10.0, 3), ("scaled_update", -5.0, 3)}
    rules = [METHODS[m].overrides["aggregation"]["strategy"] for m in EXPERIMENTS["faulty-site"]]
    assert sorted(rules) == ["aam"] * 3 + ["fedavg"] * 3


# -- running in parts --------------------------------------------------------------------------------


def test_run_experiment_refuses_a_method_the_experiment_lacks(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="has no method"):
        run_experiment("brats", results_dir=tmp_path, work_dir=tmp_path, methods=["fedsegnet_no_aam"])


@pytest.mark.parametrize("name, scale, config, tag", [
    ("table3", "demo", None, "table3"),
    ("table3", "paper", None, "table3-paper"),
    ("targets", "demo", "experiments/configs/long-30.toml", "targets-long-30"),
])
def test_results_of_other_scales_and_configs_are_kept_apart(name: str, scale: str, config: str | None, tag: str) -> None:
    assert results_tag(name, scale, config) == tag


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_paper_scale_configs_are_valid_for_every_experiment(name: str, tmp_path: Path) -> None:
    for method in EXPERIMENTS[name]:
        path = tmp_path / f"{method}.toml"
        path.write_text(dump_toml(method_config(_demo_base(), method, "paper", name)))
        sim, federation, _ = load_simulation_config(path)
        assert federation.rounds == 50 and federation.training.local_epochs == 3
        assert len(federation.sites) == (1 if sim.pool_sites else 5)


# -- re-encoding a finished run's last update ------------------------------------------------------


def test_reencode_takes_the_last_rounds_models_and_the_residual_before_it(tmp_path: Path) -> None:
    import json

    import codec
    from experiments.reencode import last_round_inputs, reencode_last_round

    def w(*v: float) -> list[tuple[str, np.ndarray]]:
        return [("w", np.array(v, dtype=np.float32))]

    codec.save_tensors(tmp_path / "global-0002.frames", w(1.0, 1.0, 1.0, 1.0), codec.LOSSLESS)
    codec.save_tensors(tmp_path / "local-0002.frames", w(1.5, 0.0, 3.0, 1.25), codec.LOSSLESS)
    codec.save_tensors(tmp_path / "residual-0001.frames", w(0.0, 0.0, 0.0, 9.0), codec.LOSSLESS)
    codec.save_tensors(tmp_path / "residual-0002.frames", w(7.0, 7.0, 7.0, 7.0), codec.LOSSLESS)  # after: unused
    (tmp_path / "agent.json").write_text(json.dumps({"site": "site-9", "submitted": {"1": {"bytes": 5}, "2": {"bytes": 77}}}))

    site, round_id, recorded, deltas, residual = last_round_inputs(tmp_path)
    assert (site, round_id, recorded) == ("site-9", 2, 77)
    np.testing.assert_array_equal(dict(deltas)["w"], [0.5, -1.0, 2.0, 0.25])
    assert residual is not None
    np.testing.assert_array_equal(residual["w"], [0.0, 0.0, 0.0, 9.0])

    spec = codec.CodecSpec(top_k_fraction=0.5)
    result = reencode_last_round(tmp_path, spec)
    expected = codec.encode_update(w(0.5, -1.0, 2.0, 9.25), spec, None)
    assert result.reencoded_bytes == sum(len(f) for f in expected.frames)
    assert (result.recorded_bytes, result.dense_fp32_bytes) == (77, 16)


def test_an_empty_method_list_only_tabulates(tmp_path: Path) -> None:
    import io

    out = io.StringIO()
    assert run_experiment("brats", results_dir=tmp_path / "results", work_dir=tmp_path / "work", methods=[],
                          stream=out) == {}
    assert "no finished method yet" in out.getvalue()
    assert not (tmp_path / "work").exists()  # nothing was run
