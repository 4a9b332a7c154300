"""A real aggregator on port 0 and real client agents, for the agent tests (tests/test_agent_*.py).

Tiny on purpose: one 32³ MNI152 site of 3 cases (2 train, 1 validation) resampled to the model's
16³ grid, a 3-level Transformer U-Net with one transformer layer, one local epoch of one step.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import IO, Any, Iterable

import grpc

import codec
from aggregator_service.config import FederationConfig, ModelConfig, TrainingSettings
from aggregator_service.server import Aggregator, RunningServer, serve
from aggregator_service.store import Store
from client_agent.agent import AgentSettings, SiteAgent, UpdateTransform
from client_agent.reporting import Reporter, TensorBoardLog
from client_agent.transport import AggregatorClient, Backoff
from experiments.simulate import write_initial_model
from protos.fedsegnet.v1 import aggregator_pb2 as pb
from protos.fedsegnet.v1 import aggregator_pb2_grpc as pb_grpc

TINY_MODEL = ModelConfig(
    architecture="transformer_unet",
    in_channels=1,
    out_channels=4,
    img_size=(16, 16, 16),
    options={"channels": [8, 16, 32], "num_transformer_layers": 1, "num_heads": 2},
)
LOSSY = codec.CodecSpec(top_k_fraction=0.05, quantization="int8")
FAST_RETRIES = Backoff(initial_s=0.05, max_s=0.2)


def federation_config(
    *, sites: tuple[str, ...] = ("site-a",), rounds: int = 1, max_clients: int | None = None,
    codec_spec: codec.CodecSpec = codec.CodecSpec(), lambda_dice: float = 0.5, model: ModelConfig = TINY_MODEL,
) -> FederationConfig:
    return FederationConfig(
        federation_id="agent-test",
        rounds=rounds,
        min_clients=1,
        max_clients=max_clients or len(sites),
        round_timeout_s=3600.0,
        sites=sites,
        training=TrainingSettings(local_epochs=1, learning_rate=1e-3, batch_size=2, seed=3, lambda_dice=lambda_dice),
        model=model,
        codec=codec_spec,
    )


class Federation:
    """An in-process aggregator with its store under ``root``; ``target`` is its HOST:PORT."""

    def __init__(self, root: Path, config: FederationConfig) -> None:
        self.root, self.config = root, config
        initial = write_initial_model(config, root / "initial.frames")
        self.store = Store(root / "store")
        self.running: RunningServer = serve(Aggregator(self.store, config, initial_model=initial), "127.0.0.1:0")
        self.target = f"127.0.0.1:{self.running.port}"

    def __enter__(self) -> "Federation":
        return self

    def __exit__(self, *exc: object) -> None:
        self.running.stop(grace=None)

    def status(self) -> pb.GetStatusResponse:
        with grpc.insecure_channel(self.target) as channel:
            return pb_grpc.AggregatorServiceStub(channel).GetStatus(pb.GetStatusRequest(), timeout=30)

    def round_metrics(self, round_id: int) -> pb.GetRoundMetricsResponse:
        with grpc.insecure_channel(self.target) as channel:
            stub = pb_grpc.AggregatorServiceStub(channel)
            return stub.GetRoundMetrics(pb.GetRoundMetricsRequest(round_id=round_id), timeout=30)

    def round_config(self) -> pb.TrainingConfig:
        return self.status().round.config

    def spooled(self) -> list[Path]:
        return sorted((self.store.root / "spool").glob("*"))


def settings(site_dir: Path, state_dir: Path, target: str, *, site: str = "site-a", **overrides: Any) -> AgentSettings:
    base = AgentSettings(
        data=site_dir, aggregator=target, site=site, state_dir=state_dir, cache_dir=state_dir.parent / "cache",
        device="cpu", augment=False, val_fraction=0.34, poll_initial_s=0.05, poll_max_s=0.2,
    )
    return dataclasses.replace(base, **overrides)


@dataclasses.dataclass
class AgentRun:
    """What one agent run returned and printed (``--log-format json`` records)."""

    code: int | None
    log: list[dict[str, Any]]

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.log if e["event"] == name]


def run_agent(
    agent_settings: AgentSettings, *, client: AggregatorClient | None = None, tensorboard: Path | None = None,
    transform_update: UpdateTransform | None = None,
) -> AgentRun:
    """Run a real SiteAgent to its end; its JSON log lines are returned parsed."""
    stream = io.StringIO()
    client = client or AggregatorClient(agent_settings.aggregator, backoff=FAST_RETRIES, seed=0)
    reporter = Reporter(fmt="json", stream=stream, tensorboard=TensorBoardLog(tensorboard) if tensorboard else None)
    code: int | None = None
    try:
        code = SiteAgent(agent_settings, client, reporter, transform_update=transform_update).run()
    finally:
        client.close()
        reporter.close()
        log = [json.loads(line) for line in stream.getvalue().splitlines()]
    return AgentRun(code, log)


def spawn_agent_process(
    site_dir: Path, target: str, state_dir: Path, cache_dir: Path, log_file: IO[bytes], *, site: str = "site-a",
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """A real ``client-agent`` process (4 classes, no augmentation, JSON log), for tests that kill it."""
    repo = Path(__file__).resolve().parents[1]
    return subprocess.Popen(
        [sys.executable, "-m", "client_agent.cli", "--data", str(site_dir), "--aggregator", target,
         "--site", site, "--state-dir", str(state_dir), "--cache-dir", str(cache_dir),
         "--device", "cpu", "--augment", "no", "--val-fraction", "0.34", "--num-classes", "4",
         "--log-format", "json"],
        cwd=repo, env={**os.environ, "PYTHONPATH": str(repo), **(env or {})},
        stdout=log_file, stderr=subprocess.STDOUT,
    )


def frames_digest(frames: Iterable[bytes]) -> str:
    return codec.frames_digest(frames)


def agent_json(state_dir: Path) -> dict[str, Any]:
    return json.loads((state_dir / "agent.json").read_text())
