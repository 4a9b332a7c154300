"""A numpy-only federation for the security, hostile-input and fault tests (no torch: fast).

The model is a few numpy arrays; a "site" is a deterministic delta per (site, round), encoded
with the real codec and uploaded over real gRPC. ``reference_model`` runs the same federation
through the plain round functions, so a test can compare the final model's bytes with a run
that met no attacker and no fault.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import grpc
import numpy as np

import codec
from aggregator_service import rounds
from aggregator_service.config import FederationConfig
from aggregator_service.rounds import UpdateCommit, UpdateHeader
from aggregator_service.security import Gate
from aggregator_service.server import Aggregator, RunningServer, serve
from aggregator_service.store import Store
from protos.fedsegnet.v1 import aggregator_pb2 as pb
from protos.fedsegnet.v1 import aggregator_pb2_grpc as pb_grpc

SMALL_MODEL: dict[str, np.ndarray] = {
    "w": np.arange(6, dtype=np.float32).reshape(2, 3),
    "b": np.array([0.5, -0.5], dtype=np.float32),
}
BIG = 300_000
"""Elements of the tensor that needs two frames (a dense fp32 part holds 260 093 elements)."""


def model(big: bool = False) -> dict[str, np.ndarray]:
    out = dict(SMALL_MODEL)
    if big:
        out["big"] = np.linspace(-1, 1, BIG, dtype=np.float32)
    return out


def sample_count(site: str) -> int:
    return 3 + zlib.crc32(site.encode()) % 5


def delta(site: str, round_id: int, like: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A deterministic update of ``site`` for ``round_id`` (mostly zeros in big tensors: compresses)."""
    rng = np.random.default_rng([zlib.crc32(site.encode()), round_id])
    out = {}
    for name, value in like.items():
        d = np.zeros_like(value)
        flat = d.reshape(-1)
        picks = rng.choice(flat.size, size=min(flat.size, 64), replace=False)
        flat[picks] = rng.normal(scale=0.1, size=picks.size).astype(value.dtype)
        out[name] = d
    return out


def frames_of(tensors: Mapping[str, np.ndarray], spec: codec.CodecSpec = codec.LOSSLESS) -> list[bytes]:
    return list(codec.encode_tensors(list(tensors.items()), spec))


def digest(frames: Sequence[bytes]) -> str:
    return codec.frames_digest(frames)


def header_proto(site: str, round_id: int, n: int | None = None) -> pb.UpdateHeader:
    return pb.UpdateHeader(
        site=site, round_id=round_id, sample_count=sample_count(site) if n is None else n,
        metrics=pb.LocalMetrics(dice=0.5, hd95=3.0),
    )


def upload_requests(
    site: str, round_id: int, frames: Sequence[bytes], *, commit: pb.UpdateCommit | None = None
) -> Iterator[pb.SubmitUpdateRequest]:
    yield pb.SubmitUpdateRequest(header=header_proto(site, round_id))
    for frame in frames:
        yield pb.SubmitUpdateRequest(frame=frame)
    yield pb.SubmitUpdateRequest(
        commit=commit or pb.UpdateCommit(chunk_count=len(frames), digest=digest(frames))
    )


def config(sites: Sequence[str] = ("a", "b", "c"), **overrides: object) -> FederationConfig:
    base: dict[str, object] = dict(
        federation_id="t", rounds=2, min_clients=2, max_clients=2, sites=tuple(sites), round_timeout_s=3600.0
    )
    base.update(overrides)
    return FederationConfig(**base)  # type: ignore[arg-type]


def reference_model(
    root: Path, cfg: FederationConfig, initial: Mapping[str, np.ndarray], honest: Sequence[str]
) -> bytes:
    """The final global model's bytes when only ``honest`` sites take part, every round."""
    init = root / "reference-initial.frames"
    codec.save_tensors(init, list(initial.items()))
    store = Store(root / "reference-store")
    rounds.initialize(store, cfg, init, now=0.0)
    for r in range(1, cfg.rounds + 1):
        for site in honest:
            frames = frames_of(delta(site, r, initial))
            parts: list[bytes | UpdateCommit] = [*frames, UpdateCommit(len(frames), digest(frames))]
            spool, record = rounds.spool_update(store, cfg, UpdateHeader(site, r, sample_count(site)), parts)
            rounds.commit_update(store, cfg, spool, record, now=1.0)
        rounds.close_round(store, cfg, now=2.0)
    return store.model_path(cfg.rounds + 1).read_bytes()


@dataclass
class Served:
    """An in-process aggregator on a free port, with a stub to it."""

    running: RunningServer
    store: Store
    target: str
    channel: grpc.Channel
    stub: pb_grpc.AggregatorServiceStub

    def submit(self, site: str, round_id: int, tensors: Mapping[str, np.ndarray]) -> pb.SubmitUpdateResponse:
        """An honest upload of ``tensors`` as ``site``'s update for ``round_id``."""
        return self.stub.SubmitUpdate(upload_requests(site, round_id, frames_of(tensors)), timeout=30)

    def rejections(self) -> dict[str, int]:
        return dict(self.stub.GetStatus(pb.GetStatusRequest(), timeout=30).rejections)

    def final_model(self, cfg: FederationConfig, timeout_s: float = 20.0) -> bytes:
        """Wait (polling the store) for the federation to finish; the final model's bytes."""
        end = time.monotonic() + timeout_s
        while (self.store.read_json("state.json") or {}).get("state") != rounds.FINISHED:
            if time.monotonic() > end:
                raise AssertionError(f"federation did not finish: {self.store.read_json('state.json')}")
            time.sleep(0.01)
        return self.store.model_path(cfg.rounds + 1).read_bytes()

    def stop(self) -> None:
        self.channel.close()
        self.running.stop(grace=None)


def start(
    root: Path,
    cfg: FederationConfig,
    initial: Mapping[str, np.ndarray],
    *,
    credentials: grpc.ServerCredentials | None = None,
    channel_credentials: grpc.ChannelCredentials | None = None,
    gate: Gate | None = None,
) -> Served:
    init = root / "initial.frames"
    codec.save_tensors(init, list(initial.items()))
    store = Store(root / "store")
    running = serve(Aggregator(store, cfg, initial_model=init), "127.0.0.1:0", max_workers=8,
                    credentials=credentials, gate=gate)
    # "localhost": the name the test server certificate carries.
    target = f"localhost:{running.port}" if credentials else f"127.0.0.1:{running.port}"
    channel = grpc.secure_channel(target, channel_credentials) if channel_credentials else grpc.insecure_channel(target)
    return Served(running, store, target, channel, pb_grpc.AggregatorServiceStub(channel))


def honest_rounds(served: Served, sites: Iterable[str], rounds_: Iterable[int], initial: Mapping[str, np.ndarray]) -> None:
    """Each site submits its update for each round, waiting for the round to open."""
    for r in rounds_:
        end = time.monotonic() + 20
        while int((served.store.read_json("state.json") or {})["round_id"]) < r:
            if time.monotonic() > end:
                raise AssertionError(f"round {r} never opened")
            time.sleep(0.005)
        for site in sites:
            served.submit(site, r, delta(site, r, initial))
