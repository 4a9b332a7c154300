"""A Prometheus text endpoint (``GET /metrics``) for the aggregator.

Counters that describe the federation (rounds, submissions, bytes, rejections) are read from the
store at scrape time, so they survive restarts like everything else. Submission latency is a
property of this process, so its histogram lives in memory and starts empty after a restart — as
Prometheus expects of a process-level histogram.
"""

from __future__ import annotations

import bisect
import logging
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

log = logging.getLogger(__name__)

LATENCY_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


@dataclass
class Histogram:
    """A cumulative Prometheus histogram over fixed buckets (thread-safe)."""

    buckets: tuple[float, ...] = LATENCY_BUCKETS_S
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        with self._lock:
            self.counts[bisect.bisect_left(self.buckets, value)] += 1
            self.total += value
            self.n += 1

    def lines(self, name: str) -> list[str]:
        with self._lock:
            out, running = [], 0
            for bound, count in zip((*self.buckets, float("inf")), self.counts):
                running += count
                le = "+Inf" if bound == float("inf") else repr(bound)
                out.append(f'{name}_bucket{{le="{le}"}} {running}')
            out += [f"{name}_sum {self.total}", f"{name}_count {self.n}"]
            return out


def _label(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _last_round_lines(last: dict[str, Any]) -> list[str]:
    """The last closed round (``rounds.round_metrics(…, 0)``): its close time, and per site its
    aggregation weight, sample count and local Dice (where the site reported one)."""
    result = last.get("result") or {}
    lines = [
        "# HELP fedseg_last_closed_round The last round that closed (the per-site series below are its).",
        "# TYPE fedseg_last_closed_round gauge",
        f"fedseg_last_closed_round {int(last['round_id'])}",
        "# HELP fedseg_round_close_seconds Time the last closed round took to aggregate.",
        "# TYPE fedseg_round_close_seconds gauge",
        f"fedseg_round_close_seconds {float(result.get('close_seconds', 0.0))}",
        "# HELP fedseg_site_weight Aggregation weight of each site in the last closed round.",
        "# TYPE fedseg_site_weight gauge",
    ]
    sites = last.get("sites", [])
    lines += [f'fedseg_site_weight{{site="{_label(s["site"])}"}} {float(s.get("weight", 0.0))}' for s in sites]
    lines += ["# HELP fedseg_site_samples Training samples each site reported in the last closed round.",
              "# TYPE fedseg_site_samples gauge"]
    lines += [f'fedseg_site_samples{{site="{_label(s["site"])}"}} {int(s.get("sample_count", 0))}' for s in sites]
    lines += ["# HELP fedseg_site_dice Local validation Dice each site reported in the last closed round.",
              "# TYPE fedseg_site_dice gauge"]
    lines += [f'fedseg_site_dice{{site="{_label(s["site"])}"}} {float(s["metrics"]["dice"])}'
              for s in sites if "dice" in s.get("metrics", {})]
    lines += ["# HELP fedseg_site_dp_epsilon Differential-privacy epsilon each site reported it has spent so far.",
              "# TYPE fedseg_site_dp_epsilon gauge"]
    lines += [f'fedseg_site_dp_epsilon{{site="{_label(s["site"])}"}} {float(s["extra_metrics"]["dp/epsilon"])}'
              for s in sites if "dp/epsilon" in s.get("extra_metrics", {})]
    return lines


def render(status: dict[str, Any], latency: Histogram, last_round: dict[str, Any] | None = None) -> str:
    """The exposition text for one scrape, from ``rounds.status``, the latency histogram and, once
    a round has closed, ``rounds.round_metrics`` of the last closed round."""
    view = status["round"]
    lines = [
        "# HELP fedseg_round_current The round now open (or the last one, once finished).",
        "# TYPE fedseg_round_current gauge",
        f"fedseg_round_current {view.round_id}",
        "# HELP fedseg_rounds_completed_total Rounds closed.",
        "# TYPE fedseg_rounds_completed_total counter",
        f"fedseg_rounds_completed_total {status['rounds_completed']}",
        "# HELP fedseg_federation_finished 1 once the federation has run all its rounds.",
        "# TYPE fedseg_federation_finished gauge",
        f"fedseg_federation_finished {int(view.state == 'finished')}",
        "# HELP fedseg_round_submissions Submissions committed to the current round.",
        "# TYPE fedseg_round_submissions gauge",
        f"fedseg_round_submissions {len(view.submitted_sites)}",
        "# HELP fedseg_sites_joined Sites that have joined.",
        "# TYPE fedseg_sites_joined gauge",
        f"fedseg_sites_joined {len(status['sites_seen'])}",
        "# HELP fedseg_submissions_total Submissions committed over all rounds.",
        "# TYPE fedseg_submissions_total counter",
        f"fedseg_submissions_total {status['submissions_total']}",
        "# HELP fedseg_bytes_received_total Update bytes received.",
        "# TYPE fedseg_bytes_received_total counter",
        f"fedseg_bytes_received_total {status['bytes_in']}",
        "# HELP fedseg_bytes_sent_total Model bytes sent.",
        "# TYPE fedseg_bytes_sent_total counter",
        f"fedseg_bytes_sent_total {status['bytes_out']}",
        "# HELP fedseg_rejections_total Refused requests by reason.",
        "# TYPE fedseg_rejections_total counter",
    ]
    for reason, count in sorted(status["rejections"].items()):
        lines.append(f'fedseg_rejections_total{{reason="{reason}"}} {count}')
    lines += [
        "# HELP fedseg_submission_seconds Time from an upload's first message to its receipt.",
        "# TYPE fedseg_submission_seconds histogram",
        *latency.lines("fedseg_submission_seconds"),
    ]
    if last_round is not None and last_round.get("closed"):
        lines += _last_round_lines(last_round)
    return "\n".join(lines) + "\n"


MAX_CONNECTIONS = 8
"""Scrapes served at once; a connection beyond is closed at once (it costs no thread)."""
CONNECTION_TIMEOUT_S = 5.0
"""A connection that sends no complete request (or does not read the answer) within this is closed."""


class _BoundedHTTPServer(ThreadingHTTPServer):
    """One thread per connection, but at most ``max_connections`` of them."""

    daemon_threads = True
    request_queue_size = 128  # the listen backlog: connections over the cap are accepted and closed

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], max_connections: int) -> None:
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            log.warning("metrics: refusing a connection from %s (%d open, the limit)",
                        client_address, MAX_CONNECTIONS)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def serve_metrics(
    listen: str, scrape: Callable[[], str], *, max_connections: int = MAX_CONNECTIONS,
    timeout_s: float = CONNECTION_TIMEOUT_S,
) -> ThreadingHTTPServer:
    """Serve ``scrape()`` at ``/metrics`` on ``HOST:PORT`` (port 0 picks one) in a daemon thread.

    At most ``max_connections`` connections are served at once, each for at most ``timeout_s``
    per read or write, so idle or slow connections cannot take threads from the gRPC server.
    """
    host, _, port = listen.rpartition(":")

    class Handler(BaseHTTPRequestHandler):
        timeout = timeout_s  # socket timeout: a silent connection is dropped, not waited on
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404, "only /metrics is served here")
                return
            try:
                body = scrape().encode()
            except Exception as exc:  # a scrape must not take the server down
                log.exception("metrics scrape failed")
                self.send_error(500, f"scrape failed: {exc}")
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("metrics: " + format, *args)

    server = _BoundedHTTPServer((host.strip("[]") or "127.0.0.1", int(port)), Handler, max_connections)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
