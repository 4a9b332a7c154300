"""Faults: the aggregator SIGKILLed at random points, a client killed mid-upload, a site that
never comes back, and a full disk under the store. Each ends with the same global model bytes as
a run without the fault (or refuses cleanly and stores nothing half-written).

The aggregator of the kill test is the real ``aggregator-service`` process; the sites are threads
driving the real :class:`client_agent.transport.AggregatorClient` (its retries included) with
pre-made numpy updates, so a run of three rounds takes well under a second plus process starts.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import grpc
import pytest

import codec
from aggregator_service import rounds
from aggregator_service.launcher import AggregatorProcess
from aggregator_service.security import RETRYABLE_METADATA
from client_agent.transport import AggregatorClient, Backoff, Refused
from numpy_federation import (
    Served,
    config,
    delta,
    digest,
    frames_of,
    header_proto,
    honest_rounds,
    model,
    reference_model,
    start,
)
from protos.fedsegnet.v1 import aggregator_pb2 as pb
from protos.fedsegnet.v1 import aggregator_pb2_grpc as pb_grpc
from support import wait_for

# Every test here starts processes (make test-fast leaves them out).
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TESTS = Path(__file__).resolve().parents[1]
INITIAL = model()
SITES = ("a", "b", "c")
KILL_RUNS = 20
MAX_KILL_DELAY_S = 0.3


# ---------------------------------------------------------------------------------------------
# (a) kill -9 of the aggregator at random points, restart on the same store


FEDERATION_TOML = """
[federation]
id = "t"
rounds = 3
min_clients = 3
max_clients = 3
round_timeout_s = 3600.0
sites = ["a", "b", "c"]
"""


def aggregator_process(root: Path, initial: Path) -> AggregatorProcess:
    """The real ``aggregator-service`` command on one store; restartable on the same port."""
    (root / "federation.toml").write_text(FEDERATION_TOML)
    return AggregatorProcess(config=root / "federation.toml", store=root / "store", initial_model=initial,
                             log_path=root / "aggregator.log", port_file=root / "port", log_level="WARNING")


def fast_client(target: str, seed: int) -> AggregatorClient:
    client = AggregatorClient(target, backoff=Backoff(initial_s=0.01, max_s=0.05, max_attempts=2000),
                              rpc_timeout_s=10.0, seed=seed)
    # gRPC waits ~1 s before reconnecting a channel whose server went away; the restarted
    # aggregator is back in well under that, so reconnect sooner (the retry logic is the client's).
    client.channel.close()
    client.channel = grpc.insecure_channel(target, options=[
        ("grpc.initial_reconnect_backoff_ms", 20), ("grpc.min_reconnect_backoff_ms", 20),
        ("grpc.max_reconnect_backoff_ms", 100),
    ])
    client.stub = pb_grpc.AggregatorServiceStub(client.channel)
    return client


def run_site(target: str, site: str, updates: dict[int, tuple[Path, str, int]], workdir: Path, seed: int) -> None:
    """A site's whole federation: join, then per round download and submit its pre-made update.

    A submission refused with FAILED_PRECONDITION means the round closed while the answer was
    lost (the aggregator died after committing): the site reads the round again.
    """
    client = fast_client(target, seed)
    try:
        client.join(site)
        while True:
            current = client.get_round(site)
            if current.state == pb.ROUND_STATE_FINISHED:
                return
            if site in current.submitted_sites:
                time.sleep(0.005)
                continue
            got = client.download(current.round_id, site, workdir / f"{site}.frames")
            assert got.digest == current.global_model_digest
            path, sha, chunks = updates[current.round_id]
            try:
                client.submit(header_proto(site, current.round_id), path, sha, chunks)
            except Refused as exc:
                if exc.code != grpc.StatusCode.FAILED_PRECONDITION:
                    raise
    finally:
        client.close()


def write_updates(root: Path) -> dict[str, dict[int, tuple[Path, str, int]]]:
    out: dict[str, dict[int, tuple[Path, str, int]]] = {}
    for site in SITES:
        out[site] = {}
        for r in (1, 2, 3):
            frames = frames_of(delta(site, r, INITIAL))
            path = root / f"{site}-{r}.frames"
            with open(path, "wb") as fh:
                codec.write_frames(fh, frames)
            out[site][r] = (path, digest(frames), len(frames))
    return out


def test_aggregator_killed_at_random_points_ends_with_the_same_global_model(tmp_path: Path) -> None:
    cfg = config(SITES, rounds=3, min_clients=3, max_clients=3)
    expected = reference_model(tmp_path, cfg, INITIAL, honest=SITES)
    updates = write_updates(tmp_path)
    initial = tmp_path / "initial.frames"
    codec.save_tensors(initial, list(INITIAL.items()))
    rng = random.Random(20240611)
    phases: list[str] = []

    for run in range(KILL_RUNS):
        root = tmp_path / f"run-{run:02d}"
        root.mkdir()
        aggregator = aggregator_process(root, initial)
        errors: list[BaseException] = []
        try:
            aggregator.start()
            target = f"127.0.0.1:{aggregator.port}"

            def site_thread(site: str, index: int) -> None:
                try:
                    run_site(target, site, updates[site], root, seed=run * 10 + index)
                except BaseException as exc:  # reported below, not lost in the thread
                    errors.append(exc)

            threads = [threading.Thread(target=site_thread, args=(s, i)) for i, s in enumerate(SITES)]
            for t in threads:
                t.start()
            # Even runs: one kill after a random delay. Odd runs: first a kill at a random point of
            # progress (once k updates are committed, whatever the machine's speed), then a second
            # after a random delay from the restart.
            if run % 2:
                k = rng.randint(0, 3 * len(SITES) - 1)
                wait_for(lambda: committed(root / "store") >= k, f"{k} committed updates", poll_s=0.005)
                kill_and_restart(aggregator, rng.uniform(0, 0.02), phases)
            kill_and_restart(aggregator, rng.uniform(0, MAX_KILL_DELAY_S), phases)
            for t in threads:
                t.join(timeout=60)
            assert not any(t.is_alive() for t in threads), f"run {run}: a site is stuck"
            assert errors == [], f"run {run}: {errors}"
            final = (root / "store" / "models" / "round-0004.frames").read_bytes()
            assert final == expected, f"run {run}: the final model differs (killed at {phases[-2:]})"
        finally:
            aggregator.stop()
    assert len(phases) == KILL_RUNS * 3 // 2
    print("kill points:", sorted(phases))  # shown with -s: where the kills landed


def committed(store: Path) -> int:
    """Committed submissions over all rounds (their records are the commit markers)."""
    return sum(1 for p in store.glob("rounds/*/*.json") if not p.name.startswith("_"))


def kill_and_restart(aggregator: AggregatorProcess, delay: float, phases: list[str]) -> None:
    time.sleep(delay)
    aggregator.kill()
    store = aggregator.store
    state = json.loads((store / "state.json").read_text()) if (store / "state.json").exists() else {}
    if state.get("state") == rounds.FINISHED:
        phases.append("finished")
    elif state:
        r = int(state["round_id"])
        closed = (store / "rounds" / f"{r:04d}" / "_result.json").exists()
        phases.append(f"round {r}, {committed(store) - 3 * (r - 1)} committed" + (", closing" if closed else ""))
    else:
        phases.append("starting")
    aggregator.start()


# ---------------------------------------------------------------------------------------------
# (b) a client killed mid-upload

STALLED_CLIENT = """
import sys, time, grpc
from numpy_federation import delta, frames_of, header_proto, model
from protos.fedsegnet.v1 import aggregator_pb2 as pb, aggregator_pb2_grpc as pb_grpc

def requests():
    frames = frames_of(delta("a", 1, model()))
    yield pb.SubmitUpdateRequest(header=header_proto("a", 1))
    yield pb.SubmitUpdateRequest(frame=frames[0])
    time.sleep(3600)  # killed here, with the upload half sent

stub = pb_grpc.AggregatorServiceStub(grpc.insecure_channel(sys.argv[1]))
stub.SubmitUpdate(requests())
"""


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    s = start(tmp_path, config(), INITIAL)
    yield s
    s.stop()


def test_client_killed_mid_upload_leaves_nothing_and_its_retry_is_accepted(served: Served, tmp_path: Path) -> None:
    cfg = config()
    expected = reference_model(tmp_path, cfg, INITIAL, honest=("a", "b"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)])}
    client = subprocess.Popen([sys.executable, "-c", STALLED_CLIENT, served.target], cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        spool = served.store.root / "spool"
        wait_for(lambda: any(spool.iterdir()) or client.poll() is not None, "the upload to start spooling")
        assert client.poll() is None

        client.send_signal(signal.SIGKILL)
        client.wait()

        wait_for(lambda: not any(spool.iterdir()), "the broken upload's spool file to go")
        wait_for(lambda: served.rejections().get("broken_stream") == 1, "the broken stream to be counted")
        assert served.store.committed_sites(1) == []
        receipt = served.submit("a", 1, delta("a", 1, INITIAL))
        assert (receipt.duplicate, receipt.submissions) == (False, 1)
        served.submit("b", 1, delta("b", 1, INITIAL))
        honest_rounds(served, ("a", "b"), (2,), INITIAL)
        assert served.final_model(cfg) == expected
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()


# ---------------------------------------------------------------------------------------------
# (c) a site that never comes back


def test_round_closes_at_its_deadline_without_the_missing_site(tmp_path: Path) -> None:
    cfg = config(rounds=1, min_clients=2, max_clients=3, round_timeout_s=1.0)
    expected = reference_model(tmp_path, cfg, INITIAL, honest=("a", "b"))
    served = start(tmp_path, cfg, INITIAL)
    try:
        served.submit("a", 1, delta("a", 1, INITIAL))
        served.submit("b", 1, delta("b", 1, INITIAL))
        # c never submits: the round waits for max_clients until its deadline, then closes with two.

        final = served.final_model(cfg, timeout_s=30)

        assert final == expected
        metrics = served.stub.GetRoundMetrics(pb.GetRoundMetricsRequest(round_id=1), timeout=30)
        assert [s.site for s in metrics.sites] == ["a", "b"]
        with pytest.raises(grpc.RpcError) as late:
            served.submit("c", 1, delta("c", 1, INITIAL))
        assert late.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "finished after round 1" in late.value.details()
    finally:
        served.stop()


# ---------------------------------------------------------------------------------------------
# (d) the store's disk fills up


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (needs root and a kernel that lets this process mount)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory: Path) -> Path:
    """Write a file until the filesystem has no byte left; returns it."""
    path = directory / "filler"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        for chunk in (1 << 16, 1 << 12, 1):
            while True:
                try:
                    os.write(fd, bytes(chunk))
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
    finally:
        os.close(fd)
    return path


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_full_disk_refuses_the_upload_and_corrupts_nothing(small_disk: Path, tmp_path: Path) -> None:
    cfg = config(rounds=1)
    expected = reference_model(tmp_path, cfg, INITIAL, honest=("a", "b"))
    served = start(small_disk, cfg, INITIAL)
    try:
        served.submit("a", 1, delta("a", 1, INITIAL))
        filler = fill(small_disk)
        before = snapshot(served.store.root)

        with pytest.raises(grpc.RpcError) as refused:
            served.submit("b", 1, delta("b", 1, INITIAL))

        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "out of disk space" in refused.value.details()
        assert RETRYABLE_METADATA in refused.value.trailing_metadata()
        assert snapshot(served.store.root) == before  # nothing written, nothing half-written
        assert rounds.current_round(served.store, cfg).submitted_sites == ("a",)
        filler.unlink()
        served.submit("b", 1, delta("b", 1, INITIAL))
        assert served.final_model(cfg) == expected
    finally:
        served.stop()

