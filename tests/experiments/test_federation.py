"""One real aggregator on port 0 with two real client agents, one round on 32³ MNI152 volumes."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest

import codec
from aggregator_service.config import FederationConfig, ModelConfig, TrainingSettings
from aggregator_service.server import Aggregator, serve
from aggregator_service.store import Store
from client_agent.agent import AgentSettings, SiteAgent
from client_agent.reporting import Reporter
from client_agent.transport import AggregatorClient
from experiments.simulate import write_initial_model
from experiments.sitedata import generate_federation
from protos.fedsegnet.v1 import aggregator_pb2 as pb
from protos.fedsegnet.v1 import aggregator_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow  # a whole federation round: two agents train

TINY_MODEL = ModelConfig(
    architecture="transformer_unet",
    in_channels=1,
    out_channels=4,
    img_size=(32, 32, 32),
    options={"channels": [8, 16, 32], "num_transformer_layers": 1, "num_heads": 2},
)


@pytest.fixture(scope="module")
def federation_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("federation")
    data = generate_federation(root / "data", sites=2, cases_per_site=(3, 2), test_cases=1, size=32, seed=1)
    config = FederationConfig(
        federation_id="test",
        rounds=1,
        min_clients=2,
        max_clients=2,
        sites=("site-a", "site-b"),
        training=TrainingSettings(local_epochs=1, learning_rate=1e-3, batch_size=2, seed=3),
        model=TINY_MODEL,
    )
    initial = write_initial_model(config, root / "initial.frames")
    store = Store(root / "store")
    running = serve(Aggregator(store, config, initial_model=initial), "127.0.0.1:0")
    target = f"127.0.0.1:{running.port}"
    logs: dict[str, io.StringIO] = {}
    errors: list[BaseException] = []

    def run_site(site: str, folder: Path) -> None:
        logs[site] = io.StringIO()
        settings = AgentSettings(
            data=folder, aggregator=target, site=site, state_dir=root / "states" / site,
            cache_dir=root / "cache" / site, augment=False, val_fraction=0.34,
        )
        client = AggregatorClient(target)
        try:
            SiteAgent(settings, client, Reporter(fmt="json", stream=logs[site])).run()
        except BaseException as exc:  # surfaced in the test, not lost in the thread
            errors.append(exc)
        finally:
            client.close()

    threads = [
        threading.Thread(target=run_site, args=(site, folder))
        for site, folder in zip(config.sites, data.site_dirs)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    yield {"root": root, "store": store, "config": config, "target": target, "logs": logs, "errors": errors}
    running.stop(grace=None)


def test_agents_finish_without_errors(federation_run: dict) -> None:
    assert federation_run["errors"] == []
    state = federation_run["store"].read_json("state.json")
    assert state["state"] == "finished"


def test_new_global_model_is_the_sample_weighted_mean_of_uploaded_models(federation_run: dict) -> None:
    root, store = federation_run["root"], federation_run["store"]
    sites = ["site-a", "site-b"]
    counts = [store.read_submission(1, s)["sample_count"] for s in sites]
    # Site a holds 3 cases (2 train / 1 validation), site b 2 (1 / 1): the FedAvg weights are 2/3 and 1/3.
    assert counts == [2, 1]
    locals_ = [codec.load_tensors(root / "states" / s / "local-0001.frames") for s in sites]
    new_global = codec.load_tensors(store.model_path(2))
    assert list(new_global) == list(locals_[0])
    for name, value in new_global.items():
        expected = (counts[0] * locals_[0][name].astype(np.float64) + counts[1] * locals_[1][name]) / sum(counts)
        np.testing.assert_allclose(value, expected, rtol=0, atol=1e-6, err_msg=name)
    initial = codec.load_tensors(store.model_path(1))
    assert any(not np.array_equal(initial[k], new_global[k]) for k in initial), "training changed nothing"


def test_site_metrics_are_readable_through_the_metrics_rpc(federation_run: dict) -> None:
    with grpc.insecure_channel(federation_run["target"]) as channel:
        stub = pb_grpc.AggregatorServiceStub(channel)
        metrics = stub.GetRoundMetrics(pb.GetRoundMetricsRequest(round_id=1))
        status = stub.GetStatus(pb.GetStatusRequest())
    assert metrics.state == pb.ROUND_STATE_CLOSED
    assert [s.site for s in metrics.sites] == ["site-a", "site-b"]
    for site in metrics.sites:
        summary = [json.loads(line) for line in federation_run["logs"][site.site].getvalue().splitlines()]
        reported = [e for e in summary if e["event"] == "round"][0]
        assert site.metrics.dice == pytest.approx(reported["dice"], abs=1e-4)
        assert 0.0 <= site.metrics.dice <= 1.0
        assert np.isfinite(site.metrics.hd95)
        assert site.bytes_uploaded > 0 and site.bytes_downloaded > 0
    assert [s.weight for s in metrics.sites] == pytest.approx([2 / 3, 1 / 3])
    assert status.rounds_completed == 1
    assert status.round.state == pb.ROUND_STATE_FINISHED
    assert sorted(status.sites_seen) == ["site-a", "site-b"]
    assert status.submissions_total == 2
    assert status.bytes_in == sum(s.bytes_uploaded for s in metrics.sites)
