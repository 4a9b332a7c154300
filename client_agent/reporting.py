"""What a person (or a log collector) sees of an agent: a progress line per local epoch and one
summary line per round, as text or as JSON lines (``--log-format json``)."""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Callable, TextIO

from client_agent.training import EpochProgress


class Reporter:
    def __init__(self, *, fmt: str = "text", stream: TextIO = sys.stderr, progress: bool = True) -> None:
        if fmt not in ("text", "json"):
            raise ValueError(f"log format must be 'text' or 'json', got {fmt!r}")
        self.fmt = fmt
        self.stream = stream
        self.show_progress = progress and fmt == "text" and stream.isatty()

    def _emit(self, record: dict[str, Any], text: str) -> None:
        if self.fmt == "json":
            self.stream.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def event(self, name: str, **fields: Any) -> None:
        self._emit({"event": name, **fields}, f"[{name}] " + " ".join(f"{k}={v}" for k, v in fields.items()))

    def progress(self, round_id: int, volumes: int) -> Callable[[EpochProgress], None]:
        """A callback for ``train_local``: a live bar on a terminal, one line per epoch otherwise."""

        def report(p: EpochProgress) -> None:
            rate = (p.step * max(1, volumes // max(1, p.steps_in_epoch or 1))) / p.seconds if p.seconds else 0.0
            if p.epoch_done:
                if self.show_progress:
                    self.stream.write("\r\033[K")
                self._emit(
                    {"event": "epoch", "round": round_id, "epoch": p.epoch, "epochs": p.epochs,
                     "loss": round(p.loss, 5), "seconds": round(p.seconds, 2)},
                    f"round {round_id} epoch {p.epoch}/{p.epochs}  loss {p.loss:.4f}  {p.seconds:.1f}s",
                )
            elif self.show_progress and p.steps_in_epoch:
                done = p.step / p.steps_in_epoch
                bar = "#" * int(30 * done)
                self.stream.write(
                    f"\rround {round_id} epoch {p.epoch}/{p.epochs} [{bar:<30}] {p.step}/{p.steps_in_epoch} "
                    f"loss {p.loss:.4f} {rate:.2f} vol/s"
                )
                self.stream.flush()

        return report

    def round_summary(self, outcome: Any) -> None:
        ratio = outcome.dense_bytes / outcome.bytes_up if outcome.bytes_up else 0.0
        record = {
            "event": "round",
            "round": outcome.round_id,
            "submitted": outcome.submitted,
            "dice": round(outcome.metrics.get("dice", float("nan")), 4),
            "hd95_mm": round(outcome.metrics.get("hd95", float("nan")), 2),
            "bytes_up": outcome.bytes_up,
            "bytes_down": outcome.bytes_down,
            "ratio_vs_dense_fp32": round(ratio, 2),
            "seconds": round(outcome.seconds, 2),
        }
        if outcome.reason:
            record["refused"] = outcome.reason
        text = (
            f"round {outcome.round_id}: local Dice {record['dice']:.4f}  HD95 {record['hd95_mm']:.2f} mm  "
            f"uploaded {outcome.bytes_up / 1e6:.3f} MB ({ratio:.1f}x smaller than dense fp32)  "
            f"{outcome.seconds:.1f}s" + (f"  REFUSED: {outcome.reason}" if outcome.reason else "")
        )
        self._emit(record, text)
