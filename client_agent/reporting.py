"""What a person (or a log collector) sees of an agent.

* a live progress bar per local epoch (loss, volumes/s) when the stream is a terminal, and one
  line per finished epoch;
* one summary line per round: round, local Dice, bytes uploaded and the ratio against the dense
  fp32 model, time;
* events (joined, data checked, finished, …).

``--log-format text`` writes lines for people; ``json`` writes one JSON object per line with an
``"event"`` key (``"epoch"``, ``"round"``, …) and a ``"time"`` (Unix seconds) for log collectors.
``--tensorboard DIR`` adds TensorBoard event files of the same numbers (:class:`TensorBoardLog`).
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Protocol, TextIO

from client_agent.training import EpochProgress
from protos.fedsegnet.v1.local_metrics import SEGMENTATION_METRIC_NAMES

__all__ = ["Reporter", "RoundReport", "TensorBoardLog", "tensorboard_available"]

BAR_WIDTH = 30


class RoundReport(Protocol):
    """What :meth:`Reporter.round_summary` reads (``client_agent.agent.RoundOutcome`` has it)."""

    round_id: int
    submitted: bool
    reason: str
    metrics: dict[str, float]
    bytes_up: int
    bytes_down: int
    dense_bytes: int
    seconds: float
    resumed: bool
    duplicate: bool


def _finite_or_none(value: float) -> float | None:
    # JSON has no NaN; a metric that is undefined (no validation case had the class) is null.
    return value if math.isfinite(value) else None


def tensorboard_available() -> bool:
    """Whether ``--tensorboard`` can work here (the ``tensorboard`` package is installed)."""
    return importlib.util.find_spec("tensorboard") is not None


class TensorBoardLog:
    """TensorBoard event files of the local numbers, one run directory per site.

    Scalars: ``train/epoch_loss`` and ``train/volumes_per_s`` at step ``(round - 1) * epochs +
    epoch``; ``local/<metric>`` (dice, hd95, iou, precision, recall, train_loss),
    ``upload/bytes``, ``upload/ratio_vs_dense_fp32``, ``download/bytes`` and ``round/seconds`` at
    step ``round``. Non-finite metrics are skipped rather than plotted as spikes.
    """

    def __init__(self, log_dir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # tensorboard is an optional dependency of the agent
            raise RuntimeError(f"--tensorboard needs the 'tensorboard' package ({exc}); pip install tensorboard") from exc
        self.log_dir = Path(log_dir)
        self._writer = SummaryWriter(log_dir=str(self.log_dir))

    def epoch(self, round_id: int, progress: EpochProgress) -> None:
        step = (round_id - 1) * progress.epochs + progress.epoch
        self._writer.add_scalar("train/epoch_loss", progress.loss, step)
        self._writer.add_scalar("train/volumes_per_s", progress.volumes_per_s, step)

    def round(self, outcome: RoundReport, ratio: float) -> None:
        r = outcome.round_id
        for name in (*SEGMENTATION_METRIC_NAMES, "train_loss"):
            value = outcome.metrics.get(name)
            if value is not None and math.isfinite(value):
                self._writer.add_scalar(f"local/{name}", value, r)
        self._writer.add_scalar("upload/bytes", outcome.bytes_up, r)
        self._writer.add_scalar("upload/ratio_vs_dense_fp32", ratio, r)
        self._writer.add_scalar("download/bytes", outcome.bytes_down, r)
        self._writer.add_scalar("round/seconds", outcome.seconds, r)
        # A killed agent must not lose the rounds it finished: flush at every round's end.
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class Reporter:
    """Writes progress, round summaries and events to ``stream`` (and to TensorBoard when given).

    Args (keyword-only):
        fmt: ``"text"`` or ``"json"``.
        stream: where lines go (default: ``sys.stderr`` at construction).
        progress: show the live progress bar when ``stream`` is a terminal (text format only).
        tensorboard: an optional :class:`TensorBoardLog` that receives the same numbers.
    """

    def __init__(
        self,
        *,
        fmt: str = "text",
        stream: TextIO | None = None,
        progress: bool = True,
        tensorboard: TensorBoardLog | None = None,
    ) -> None:
        if fmt not in ("text", "json"):
            raise ValueError(f"log format must be 'text' or 'json', got {fmt!r}")
        self.fmt = fmt
        self.stream = sys.stderr if stream is None else stream
        self.show_progress = progress and fmt == "text" and self.stream.isatty()
        self.tensorboard = tensorboard

    def _emit(self, record: dict[str, Any], text: str) -> None:
        if self.fmt == "json":
            self.stream.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def event(self, name: str, **fields: Any) -> None:
        self._emit({"event": name, **fields}, f"[{name}] " + " ".join(f"{k}={v}" for k, v in fields.items()))

    def progress(self, round_id: int) -> Callable[[EpochProgress], None]:
        """A callback for ``train_local``: a live bar on a terminal, one line per finished epoch."""

        def report(p: EpochProgress) -> None:
            if p.epoch_done:
                if self.show_progress:
                    self.stream.write("\r\033[K")  # replace the bar by the epoch's line
                self._emit(
                    {"event": "epoch", "round": round_id, "epoch": p.epoch, "epochs": p.epochs,
                     "loss": round(p.loss, 5), "volumes": p.epoch_volumes,
                     "volumes_per_s": round(p.volumes_per_s, 3), "seconds": round(p.epoch_seconds, 2)},
                    f"round {round_id} epoch {p.epoch}/{p.epochs}  loss {p.loss:.4f}  "
                    f"{p.volumes_per_s:.2f} vol/s  {p.epoch_seconds:.1f}s",
                )
                if self.tensorboard is not None:
                    self.tensorboard.epoch(round_id, p)
            elif self.show_progress:
                total = p.steps_in_epoch or 0
                filled = int(BAR_WIDTH * p.step / total) if total else 0
                steps = f"{p.step}/{total}" if total else f"{p.step}"
                self.stream.write(
                    f"\rround {round_id} epoch {p.epoch}/{p.epochs} [{'#' * filled:<{BAR_WIDTH}}] {steps} "
                    f"loss {p.loss:.4f} {p.volumes_per_s:.2f} vol/s"
                )
                self.stream.flush()

        return report

    def round_summary(self, outcome: RoundReport) -> None:
        ratio = outcome.dense_bytes / outcome.bytes_up if outcome.bytes_up else 0.0
        dice = outcome.metrics.get("dice", math.nan)
        hd95 = outcome.metrics.get("hd95", math.nan)
        record: dict[str, Any] = {
            "event": "round",
            "round": outcome.round_id,
            "submitted": outcome.submitted,
            "dice": _finite_or_none(round(dice, 4)),
            "hd95_mm": _finite_or_none(round(hd95, 2)),
            "bytes_up": outcome.bytes_up,
            "bytes_down": outcome.bytes_down,
            "dense_fp32_bytes": outcome.dense_bytes,
            "ratio_vs_dense_fp32": round(ratio, 2),
            "seconds": round(outcome.seconds, 2),
            "resumed": outcome.resumed,
            "duplicate": outcome.duplicate,
        }
        if outcome.reason:
            record["refused"] = outcome.reason
        text = (
            f"round {outcome.round_id}: local Dice {dice:.4f}  HD95 {hd95:.2f} mm  "
            f"uploaded {outcome.bytes_up / 1e6:.3f} MB ({ratio:.1f}x smaller than dense fp32)  "
            f"{outcome.seconds:.1f}s" + (f"  NOT SUBMITTED: {outcome.reason}" if outcome.reason else "")
        )
        self._emit(record, text)
        if self.tensorboard is not None:
            self.tensorboard.round(outcome, ratio)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
