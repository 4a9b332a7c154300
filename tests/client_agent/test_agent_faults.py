"""The client agent as a long-running trainer: slow and broken links, kills and restarts.

Every test runs the real agent (real training on 32³ MNI152 volumes, real codec, real gRPC)
against a real aggregator on loopback; faults come from a TCP proxy between them
(``fault_proxy.py``), from killing the real ``client-agent`` process, or from a client that
"dies" right after its upload was committed.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import codec
from agent_federation import (
    LOSSY,
    FAST_RETRIES,
    Federation,
    agent_json,
    federation_config,
    frames_digest,
    run_agent,
    settings,
    spawn_agent_process,
)
from client_agent.agent import load_arrays, model_from_config
from client_agent.data import build_datasets
from client_agent.reporting import tensorboard_available
from client_agent.transport import AggregatorClient
from fault_proxy import FaultProxy
from protos.fedsegnet.v1 import aggregator_pb2 as pb
from support import wait_for

# Every test here starts processes (make test-fast leaves them out).
pytestmark = pytest.mark.slow

SITE = "site-a"


def pending_digest(state_dir: Path, round_id: int) -> str:
    return json.loads((state_dir / f"pending-{round_id:04d}.json").read_text())["digest"]


# ---------------------------------------------------------------------------------------------
# (a) a slow link that drops the download and the upload once each, mid-stream

CUT_AFTER_BYTES = 100_000  # the dense tiny model is ~530 kB: both cuts land mid-transfer


@pytest.fixture(scope="module")
def proxied(mni_site: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("proxied")
    # lambda_dice = 0 (cross-entropy only) also pins that an explicit 0 reaches the loss.
    config = federation_config(lambda_dice=0.0)
    with Federation(root, config) as fed, FaultProxy(
        fed.target, latency_s=0.001, cut_downstream_after=CUT_AFTER_BYTES, cut_upstream_after=CUT_AFTER_BYTES
    ) as proxy:
        # TensorBoard is optional for the agent (pip install tensorboard); tested where installed.
        tensorboard = root / "tensorboard" if tensorboard_available() else None
        run = run_agent(settings(mni_site, root / "state", proxy.address), tensorboard=tensorboard)
        wait_for(lambda: not fed.spooled(), "the cut upload's spool file to be removed")
        return {
            "root": root,
            "run": run,
            "proxy": proxy,
            "status": fed.status(),
            "metrics": fed.round_metrics(1),
            "stored": fed.store.read_submission(1, SITE),
            "round_config": fed.round_config(),
        }


def test_round_completes_through_dropped_connections_and_is_counted_once(proxied: dict[str, Any]) -> None:
    run, proxy, status, metrics = proxied["run"], proxied["proxy"], proxied["status"], proxied["metrics"]

    assert run.code == 0
    assert proxy.cuts == 2, "both the download and the upload must have been cut"
    assert proxy.connections >= 2
    summary = run.events("round")
    assert [(e["round"], e["submitted"], e["duplicate"]) for e in summary] == [(1, True, False)]
    assert status.submissions_total == 1
    assert status.rounds_completed == 1
    assert [s.site for s in metrics.sites] == [SITE]
    receipt = agent_json(proxied["root"] / "state")["submitted"]["1"]
    assert receipt["digest"] == proxied["stored"]["digest"]
    assert summary[0]["bytes_up"] == metrics.sites[0].bytes_uploaded == proxied["stored"]["bytes"]


def test_explicit_lambda_dice_zero_trains_on_cross_entropy_alone(proxied: dict[str, Any], mni_site: Path) -> None:
    # One epoch of one step over both training volumes: the reported training loss is the loss of
    # the initial model on them, which with lambda_dice = 0 is the plain cross-entropy.
    root, config = proxied["root"], proxied["round_config"]
    data = build_datasets(mni_site, spatial_size=(16, 16, 16), num_classes=4, val_fraction=0.34, seed=3,
                          augment=False, cache_dir=root / "check-cache")
    items = [data.train[i] for i in range(len(data.train))]
    model = model_from_config(config)
    load_arrays(model, codec.load_tensors(root / "state" / "global-0001.frames"))
    with torch.no_grad():
        logits = model(torch.stack([item["image"] for item in items]))
        labels = torch.stack([item["label"] for item in items])[:, 0].long()
        expected = torch.nn.functional.cross_entropy(logits, labels).item()

    assert len(items) == 2
    assert proxied["metrics"].sites[0].metrics.train_loss == pytest.approx(expected, rel=1e-4)


def test_tensorboard_has_the_rounds_local_metrics(proxied: dict[str, Any]) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(proxied["root"] / "tensorboard"))
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    site = proxied["metrics"].sites[0]

    assert scalars["local/dice"] == [(1, pytest.approx(site.metrics.dice, abs=1e-6))]
    assert scalars["local/train_loss"] == [(1, pytest.approx(site.metrics.train_loss, rel=1e-6))]
    assert scalars["upload/bytes"] == [(1, site.bytes_uploaded)]
    assert [step for step, _ in scalars["train/epoch_loss"]] == [1]
    assert scalars["train/volumes_per_s"][0][1] > 0


# ---------------------------------------------------------------------------------------------
# (b) killed between rounds, restarted: the residual survives and is the one used


def test_restart_between_rounds_uses_the_stored_residual_byte_for_byte(mni_site: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    with Federation(tmp_path, federation_config(rounds=2, codec_spec=LOSSY)) as fed:
        first = run_agent(settings(mni_site, state, fed.target, max_rounds=1))
        after_first = agent_json(state)
        residual_bytes = (state / "residual-0001.frames").read_bytes()
        residual = codec.load_tensors(state / "residual-0001.frames")

        second = run_agent(settings(mni_site, state, fed.target))  # a new agent on the same state dir
        status = fed.status()
        stored = fed.store.read_submission(2, SITE)
        spec = codec.CodecSpec.from_message(fed.round_config().codec)

    assert [e["round"] for e in first.events("round")] == [1]
    assert after_first["residual"] == "residual-0001.frames"
    assert any(np.any(a != 0) for a in residual.values()), "a lossy codec must leave a residual"
    # The restarted agent did round 2 only; round 1 was not sent again.
    assert [e["round"] for e in second.events("round")] == [2]
    assert status.submissions_total == 2
    after = agent_json(state)
    assert after["submitted"]["1"] == after_first["submitted"]["1"]
    assert after["residual"] == "residual-0002.frames"
    assert (state / "residual-0001.frames").read_bytes() == residual_bytes
    # Round 2's upload is exactly Δ₂ + residual₁ encoded: the residual from disk was used.
    global2, local2 = codec.load_tensors(state / "global-0002.frames"), codec.load_tensors(state / "local-0002.frames")
    deltas = [(name, local2[name] - global2[name]) for name in global2]
    with_residual = frames_digest(codec.encode_update(deltas, spec, residual).frames)
    without_residual = frames_digest(codec.encode_update(deltas, spec, None).frames)
    assert stored["digest"] == after["submitted"]["2"]["digest"] == with_residual
    assert with_residual != without_residual


# ---------------------------------------------------------------------------------------------
# (c) killed after encoding, before the upload went through: the restart resends the same bytes


def test_process_killed_mid_upload_resends_the_same_update_once(mni_site: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    with Federation(tmp_path, federation_config()) as fed, FaultProxy(
        fed.target, stall_upstream_when=lambda: (state / "pending-0001.json").exists()
    ) as proxy:
        log_path = tmp_path / "agent.log"
        with open(log_path, "wb") as log_file:
            agent = spawn_agent_process(mni_site, proxy.address, state, tmp_path / "cache", log_file, site=SITE)
            try:
                wait_for(lambda: proxy.stalled.is_set() or agent.poll() is not None, "the upload to start", 240)
                assert agent.poll() is None, log_path.read_text()
                encoded = pending_digest(state, 1)
            finally:
                agent.send_signal(signal.SIGKILL)
                agent.wait(timeout=30)
        assert fed.status().submissions_total == 0

        restarted = run_agent(settings(mni_site, state, fed.target))
        wait_for(lambda: not fed.spooled(), "the killed upload's spool file to be removed")
        status = fed.status()
        stored = fed.store.read_submission(1, SITE)

    killed_log = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    assert [e["round"] for e in killed_log if e["event"] == "epoch"] == [1], "the killed agent trained round 1"
    assert [e["round"] for e in restarted.events("resume")] == [1]
    assert restarted.events("epoch") == [], "the restarted agent must not train round 1 again"
    assert [(e["round"], e["submitted"], e["resumed"]) for e in restarted.events("round")] == [(1, True, True)]
    assert stored["digest"] == encoded == agent_json(state)["submitted"]["1"]["digest"]
    assert status.submissions_total == 1
    assert status.rounds_completed == 1
    assert not list(state.glob("pending-*"))


class AgentKilled(BaseException):
    """Stands for SIGKILL: raised where the process would have died."""


class KilledAfterUpload(AggregatorClient):
    """The real client; the agent "dies" after the aggregator committed its upload, before the
    receipt reached the state directory."""

    def submit(self, *args: Any, **kwargs: Any) -> pb.SubmitUpdateResponse:
        super().submit(*args, **kwargs)
        raise AgentKilled()


def test_killed_after_the_commit_resends_and_gets_a_duplicate_receipt(mni_site: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    # Two sites, only one of which runs: the round stays open for the resend.
    with Federation(tmp_path, federation_config(sites=("site-a", "site-b"))) as fed:
        with pytest.raises(AgentKilled):
            run_agent(settings(mni_site, state, fed.target),
                      client=KilledAfterUpload(fed.target, backoff=FAST_RETRIES))
        encoded = pending_digest(state, 1)
        assert fed.status().submissions_total == 1

        restarted = run_agent(settings(mni_site, state, fed.target, max_rounds=1))
        status = fed.status()

    assert restarted.events("epoch") == []
    assert [(e["round"], e["submitted"], e["duplicate"]) for e in restarted.events("round")] == [(1, True, True)]
    receipt = agent_json(state)["submitted"]["1"]
    assert (receipt["digest"], receipt["duplicate"]) == (encoded, True)
    assert status.submissions_total == 1
    assert list(status.round.submitted_sites) == [SITE]
    assert status.round.state == pb.ROUND_STATE_OPEN


def test_killed_after_the_commit_of_a_round_that_then_closed_settles_it(mni_site: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    with Federation(tmp_path, federation_config(codec_spec=LOSSY)) as fed:  # one site: its commit closes the round
        with pytest.raises(AgentKilled):
            run_agent(settings(mni_site, state, fed.target),
                      client=KilledAfterUpload(fed.target, backoff=FAST_RETRIES))
        encoded = pending_digest(state, 1)
        wait_for(lambda: fed.status().round.state == pb.ROUND_STATE_FINISHED, "the round to close")

        restarted = run_agent(settings(mni_site, state, fed.target))
        status = fed.status()

    assert restarted.code == 0
    assert [(e["round"], e["committed"]) for e in restarted.events("settled")] == [(1, True)]
    assert restarted.events("epoch") == [] and restarted.events("round") == []
    doc = agent_json(state)
    assert doc["submitted"]["1"]["digest"] == encoded
    assert doc["submitted"]["1"]["confirmed_by"] == "round_metrics"
    assert doc["residual"] == "residual-0001.frames", "the committed update's residual must come into force"
    assert status.submissions_total == 1
    assert not list(state.glob("pending-*"))


def test_differential_privacy_clips_the_uploaded_update_and_reports_it(mni_site: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    clip = 1e-3  # far below a real first-round update's norm, so clipping must act
    with Federation(tmp_path, federation_config(rounds=1)) as fed:
        run_agent(settings(mni_site, state, fed.target, dp_clip_norm=clip))
        stored = fed.store.read_submission(1, SITE)
        metrics = fed.round_metrics(1)
    # Dense lossless codec and no noise: the stored update's norm is exactly the clip norm.
    assert stored["update_norm"] == pytest.approx(clip, rel=1e-4)
    extra = dict(metrics.sites[0].metrics.extra)
    assert extra["dp/clip_norm"] == pytest.approx(clip)
    assert extra["dp/noise_multiplier"] == 0.0
    assert extra["dp/update_norm"] > clip and 0 < extra["dp/clip_scale"] < 1
