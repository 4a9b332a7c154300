"""The site's optimizer state and DGC velocity survive a SIGKILL: a real agent process is killed
mid-federation and restarted against a real aggregator; the restarted agent trains from the
momentum buffers stored with the residual in force (client_agent.state, SITE_STATE_GROUPS)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import signal
import time
from pathlib import Path

import numpy as np
import pytest

import codec
from agent_federation import (
    LOSSY,
    Federation,
    agent_json,
    federation_config,
    run_agent,
    settings,
    spawn_agent_process,
)
from aggregator_service.config import TrainingSettings
from client_agent.state import split_site_state

pytestmark = pytest.mark.slow

SITE = "site-a"
ROUNDS = 4


def _optimizer_digest(residual_file: Path) -> str:
    """The same digest the agent logs for the optimizer state it restores (agent._arrays_digest)."""
    arrays = split_site_state(codec.load_tensors(residual_file))[1]["optimizer"]
    h = hashlib.sha256()
    for name in sorted(arrays):
        h.update(name.encode())
        h.update(np.ascontiguousarray(arrays[name]).tobytes())
    return h.hexdigest()[:16]


def test_optimizer_state_and_velocity_survive_sigkill(mni_site: Path, tmp_path: Path) -> None:
    training = TrainingSettings(local_epochs=1, learning_rate=0.05, batch_size=2, seed=3, optimizer="sgd", momentum=0.9,
                                momentum_correction=0.5, keep_optimizer_state=True, clip_norm=5.0)
    config = dataclasses.replace(federation_config(rounds=ROUNDS, codec_spec=LOSSY), training=training)
    state = tmp_path / "state"
    with Federation(tmp_path, config) as fed:
        log_path = tmp_path / "agent.log"
        with open(log_path, "wb") as log_file:
            agent = spawn_agent_process(mni_site, fed.target, state, tmp_path / "cache", log_file, site=SITE,
                                        env={"OMP_NUM_THREADS": "1"})
            try:
                end = time.monotonic() + 240
                while not ((state / "agent.json").exists() and "1" in agent_json(state)["submitted"]):
                    assert agent.poll() is None, log_path.read_text()[-2000:]
                    assert time.monotonic() < end, "round 1 was not submitted in time"
                    time.sleep(0.02)
            finally:
                agent.send_signal(signal.SIGKILL)
                agent.wait(timeout=30)
        doc = agent_json(state)
        assert len(doc["submitted"]) < ROUNDS, "the agent finished before it was killed"
        in_force = state / doc["residual"]
        kept = split_site_state(codec.load_tensors(in_force))
        assert kept[1]["optimizer"], "the SGD momentum buffers are stored with the residual"
        assert kept[1]["velocity"] and kept[1]["age"]
        # Velocity is cleared where the round's update was sent (momentum-factor masking).
        assert all(np.count_nonzero(v) < v.size for v in kept[1]["velocity"].values() if v.size > 100)
        expected = {int(doc["residual"][len("residual-"):-len(".frames")]): _optimizer_digest(in_force)}
        for path in state.glob("pending-*.json"):  # killed after encoding: its residual comes into force on resume
            r = int(path.stem.split("-")[1])
            expected[r] = _optimizer_digest(state / f"residual-{r:04d}.frames")

        restarted = run_agent(settings(mni_site, state, fed.target))
        status = fed.status()

    restored = restarted.events("optimizer_state")
    assert restored, "the restarted agent must restore the optimizer state"
    first = restored[0]
    assert first["digest"] == expected[first["round"] - 1], (first, expected)
    assert status.rounds_completed == ROUNDS
    assert sorted(int(r) for r in agent_json(state)["submitted"]) == list(range(1, ROUNDS + 1))
    killed_log = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    assert [e["round"] for e in killed_log if e["event"] == "optimizer_state"] == list(
        range(2, 2 + len([e for e in killed_log if e["event"] == "optimizer_state"])))
