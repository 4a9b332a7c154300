"""What the agent shows: the per-epoch progress (loss, volumes/s), the per-round summary line, in
text (a live bar on a real terminal) and as JSON lines; and the client's patience with a busy
aggregator."""

from __future__ import annotations

import io
import json
import math
import os
import threading
from concurrent import futures
from typing import Any

import grpc
import pytest
import torch

import model as model_pkg
from client_agent.agent import RoundOutcome
from client_agent.reporting import Reporter
from client_agent.training import EpochProgress, LoopSettings, train_local
from client_agent.transport import AggregatorClient, Backoff, Refused
from protos.fedsegnet.v1 import aggregator_pb2 as pb
from protos.fedsegnet.v1 import aggregator_pb2_grpc as pb_grpc


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    def no_nan(name: str) -> None:
        raise AssertionError(f"{name} is not JSON")

    return [json.loads(line, parse_constant=no_nan) for line in stream.getvalue().splitlines()]


OUTCOME = RoundOutcome(
    round_id=3, submitted=True, metrics={"dice": 0.81234, "hd95": 4.567}, bytes_up=10_000, bytes_down=50_000,
    dense_bytes=400_000, seconds=12.345,
)


def test_round_summary_json_line() -> None:
    stream = io.StringIO()

    Reporter(fmt="json", stream=stream).round_summary(OUTCOME)

    [record] = json_lines(stream)
    assert set(record) == {"time", "event", "round", "submitted", "dice", "hd95_mm", "bytes_up", "bytes_down",
                           "dense_fp32_bytes", "ratio_vs_dense_fp32", "seconds", "resumed", "duplicate"}
    assert {k: v for k, v in record.items() if k != "time"} == {
        "event": "round", "round": 3, "submitted": True, "dice": 0.8123, "hd95_mm": 4.57, "bytes_up": 10_000,
        "bytes_down": 50_000, "dense_fp32_bytes": 400_000, "ratio_vs_dense_fp32": 40.0, "seconds": 12.35,
        "resumed": False, "duplicate": False,
    }


def test_round_summary_of_a_refused_update_with_undefined_metrics_is_still_json() -> None:
    stream = io.StringIO()
    refused = RoundOutcome(round_id=4, submitted=False, reason="FAILED_PRECONDITION: round closed",
                           metrics={"dice": math.nan, "hd95": math.inf}, dense_bytes=400_000, seconds=1.0)

    Reporter(fmt="json", stream=stream).round_summary(refused)

    [record] = json_lines(stream)
    assert (record["dice"], record["hd95_mm"], record["ratio_vs_dense_fp32"]) == (None, None, 0.0)
    assert record["refused"] == "FAILED_PRECONDITION: round closed"


def test_round_summary_text_line() -> None:
    stream = io.StringIO()

    Reporter(fmt="text", stream=stream).round_summary(OUTCOME)

    assert stream.getvalue() == (
        "round 3: local Dice 0.8123  HD95 4.57 mm  uploaded 0.010 MB (40.0x smaller than dense fp32)  12.3s\n"
    )


def progress(step: int, *, done: bool = False, volumes: int = 6, seconds: float = 2.0) -> EpochProgress:
    return EpochProgress(epoch=2, epochs=3, step=step, steps_in_epoch=4, loss=0.5, seconds=30.0, epoch_done=done,
                         epoch_volumes=volumes, epoch_seconds=seconds)


def test_volumes_per_second_counts_this_epochs_volumes_over_this_epochs_time() -> None:
    # 30 s since training started (epoch 1 included) must not dilute epoch 2's rate: 6 / 2 s = 3.
    assert progress(3).volumes_per_s == 3.0
    assert progress(0, volumes=0, seconds=0.0).volumes_per_s == 0.0


def test_epoch_json_line_has_loss_and_volumes_per_second() -> None:
    stream = io.StringIO()
    report = Reporter(fmt="json", stream=stream).progress(round_id=7)

    report(progress(3))  # a step: no line in JSON
    report(progress(4, done=True, volumes=8))

    [record] = json_lines(stream)
    assert {k: v for k, v in record.items() if k != "time"} == {
        "event": "epoch", "round": 7, "epoch": 2, "epochs": 3, "loss": 0.5, "volumes": 8, "volumes_per_s": 4.0,
        "seconds": 2.0,
    }


def test_progress_bar_on_a_terminal_and_plain_lines_elsewhere() -> None:
    controller, terminal = os.openpty()
    with os.fdopen(terminal, "w") as tty:
        report = Reporter(fmt="text", stream=tty).progress(round_id=7)
        report(progress(2, volumes=4, seconds=0.5))
        report(progress(4, done=True, volumes=8, seconds=2.0))
        shown = os.read(controller, 4096).decode()
    os.close(controller)
    plain = io.StringIO()
    Reporter(fmt="text", stream=plain).progress(round_id=7)(progress(2, volumes=4, seconds=0.5))

    bar = "\rround 7 epoch 2/3 [" + "#" * 15 + " " * 15 + "] 2/4 loss 0.5000 8.00 vol/s"
    assert shown.replace("\r\n", "\n") == bar + "\r\033[K" + "round 7 epoch 2/3  loss 0.5000  4.00 vol/s  2.0s\n"
    assert plain.getvalue() == ""


def test_training_reports_volumes_per_epoch() -> None:
    torch.manual_seed(0)
    net = model_pkg.build_model("cnn_unet", in_channels=1, out_channels=2, img_size=(8, 8, 8), channels=[2, 4])
    # Batches of 2 and 1 volumes: 3 volumes per epoch.
    batches = [{"image": torch.randn(n, 1, 8, 8, 8), "label": torch.randint(0, 2, (n, 1, 8, 8, 8))} for n in (2, 1)]
    seen: list[EpochProgress] = []

    train_local(net, batches, LoopSettings(epochs=2),
                device="cpu", loss_fn=model_pkg.DiceCELoss(), progress=seen.append)

    assert [(p.epoch, p.step, p.epoch_volumes, p.epoch_done) for p in seen] == [
        (1, 1, 2, False), (1, 2, 3, False), (1, 2, 3, True), (2, 1, 2, False), (2, 2, 3, False), (2, 2, 3, True),
    ]
    assert all(0 < p.epoch_seconds <= p.seconds for p in seen)


# ---------------------------------------------------------------------------------------------
# a busy aggregator: RESOURCE_EXHAUSTED is retried, a bounded number of times


class BusyAggregator(pb_grpc.AggregatorServiceServicer):
    """Answers Join with RESOURCE_EXHAUSTED ``busy`` times, then normally (a real gRPC server)."""

    def __init__(self, busy: int) -> None:
        self.busy, self.calls = busy, 0
        self._lock = threading.Lock()

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinResponse:
        with self._lock:
            self.calls += 1
            calls = self.calls
        if calls <= self.busy:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many concurrent streams for this site")
        return pb.JoinResponse(federation_id="busy")


@pytest.mark.parametrize(("busy", "attempts", "joined"), [(2, 3, True), (3, 3, False)])
def test_busy_aggregator_is_retried_a_bounded_number_of_times(busy: int, attempts: int, joined: bool) -> None:
    servicer = BusyAggregator(busy)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_AggregatorServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    waits: list[float] = []
    client = AggregatorClient(f"127.0.0.1:{port}", backoff=Backoff(initial_s=0.01, max_s=0.01), sleep=waits.append,
                              busy_attempts=attempts)
    try:
        if joined:
            assert client.join("site-a").federation_id == "busy"
        else:
            with pytest.raises(Refused, match="RESOURCE_EXHAUSTED: too many concurrent streams.*gave up after 3 attempts"):
                client.join("site-a")
    finally:
        client.close()
        server.stop(None)

    assert servicer.calls == min(busy + 1, attempts)
    assert len(waits) == servicer.calls - 1
