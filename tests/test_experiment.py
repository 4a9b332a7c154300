"""Experiment plumbing: method configurations, the TOML writer, pooled and faulty site folders."""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from client_agent.data import discover_cases
from experiments.experiment import EXPERIMENTS, METHODS, merge, method_config
from experiments.simulate import (
    SimulationSettings,
    dump_toml,
    load_simulation_config,
    prepare_site_dirs,
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
    base = tomllib.loads((Path(__file__).parents[1] / "experiments/configs/demo.toml").read_text())
    path = tmp_path / "sim.toml"
    path.write_text(dump_toml(method_config(base, method, "demo")))
    sim, federation, federation_toml = load_simulation_config(path)
    assert tomllib.loads(federation_toml)["federation"]["sites"] == list(federation.sites)
    assert write_initial_model(federation, tmp_path / "initial.frames").stat().st_size > 0  # the network builds
    if method == "centralized":
        assert federation.sites == ("pooled",) and sim.pool_sites
    if method.startswith("faulty"):
        assert sim.faulty_site == 3


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
