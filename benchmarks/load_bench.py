"""Many sites at once against one aggregator, through the real service.

100 simulated sites (``site-001`` .. ``site-100``; ``--sites``) and one aggregator subprocess
(``python -m aggregator_service.server`` on 127.0.0.1:0, federation with
``min_clients = max_clients = sites``). A 1M-parameter model (``--params``) shaped like a 3D conv
net; each site's update is a different seeded random delta, top-1% + int8, encoded once into a
frames file before the clock starts. Then every site, in its own thread with its own channel
(``AggregatorClient``), waits on one barrier and at once: joins, downloads the global model
(streamed, digest checked) and submits its update. Measured:

* submissions sent vs accepted (a receipt that is not a duplicate), cross-checked with the
  aggregator's ``GetStatus`` (``submissions_total``, rejections by reason); they must be equal;
* p50/p99/max latency of the submission (``SubmitUpdate``: header, frames, commit, receipt), and
  of join and download; client retries (the transport logs each one);
* the aggregator's RSS from ``/proc/PID/status`` (psutil is not installed): idle after start and
  ``VmHWM`` (its peak over the whole run); and the time until the round closed.

Bounded: one request of each kind per site, each with a deadline (``--rpc-timeout-s``) and at
most 3 attempts; the whole run has a deadline (``--timeout-s``); only 127.0.0.1 is contacted.

Usage::

    python benchmarks/load_bench.py --json      # 100 sites, 1M parameters, well under a minute here

With ``--json`` the last line is one JSON object with ``sites``, ``sent``, ``accepted``,
``p50_ms``, ``p99_ms``, ``peak_rss_mb`` (and more). Target: accepted == sent.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    MB,
    AggregatorProcess,
    UpdateFile,
    conv_net_shapes,
    load_average,
    machine_line,
    percentile,
    site_names,
    update_header,
    wait_for_rounds_completed,
    write_federation_config,
    write_initial_model,
    write_update_file,
)

import codec  # noqa: E402
from client_agent.transport import AggregatorClient, Backoff, Refused  # noqa: E402
from protos.fedsegnet.v1 import aggregator_pb2 as pb  # noqa: E402
from protos.fedsegnet.v1 import aggregator_pb2_grpc as pb_grpc  # noqa: E402

log = logging.getLogger("load_bench")


@dataclass
class SiteOutcome:
    """What one simulated site saw."""

    site: str
    join_s: float = float("nan")
    download_s: float = float("nan")
    submit_s: float = float("nan")
    download_bytes: int = 0
    sent: bool = False
    accepted: bool = False
    duplicate: bool = False
    error: str = ""


class RetryCounter(logging.Handler):
    """Counts the transport's 'retrying' warnings (one per retried attempt)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0
        self._lock_count = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        if "retrying" in record.getMessage():
            with self._lock_count:
                self.count += 1


def run_site(
    site: str, target: str, update: UpdateFile, header: pb.UpdateHeader, download_dir: Path,
    barrier: threading.Barrier, *, rpc_timeout_s: float,
) -> SiteOutcome:
    """Join, download the round's model, submit: one bounded attempt sequence per request."""
    out = SiteOutcome(site)
    client = AggregatorClient(
        target, backoff=Backoff(initial_s=0.2, max_s=2.0, max_attempts=3), rpc_timeout_s=rpc_timeout_s
    )
    try:
        barrier.wait(timeout=rpc_timeout_s)
        started = time.monotonic()
        round_ = client.join(site).round
        out.join_s = time.monotonic() - started
        started = time.monotonic()
        downloaded = client.download(round_.round_id, site, download_dir / f"{site}.frames")
        out.download_s = time.monotonic() - started
        out.download_bytes = downloaded.nbytes
        header.bytes_downloaded = downloaded.nbytes
        out.sent = True
        started = time.monotonic()
        receipt = client.submit(header, update.path, update.digest, update.chunks)
        out.submit_s = time.monotonic() - started
        out.accepted = not receipt.duplicate and receipt.digest == update.digest
        out.duplicate = receipt.duplicate
    except (Refused, grpc.RpcError, threading.BrokenBarrierError, OSError, codec.CodecError) as exc:
        out.error = f"{type(exc).__name__}: {exc}"
    finally:
        client.close()
    return out


def run_load(
    workdir: Path, *, sites: int, params: int, spec: codec.CodecSpec, strategy: str, rpc_timeout_s: float,
    timeout_s: float, seed: int,
) -> dict[str, Any]:
    names = site_names(sites)
    shapes = conv_net_shapes(params)
    model = workdir / "initial.frames"
    model_bytes = write_initial_model(model, shapes, seed=seed)
    (workdir / "updates").mkdir()
    (workdir / "downloads").mkdir()
    updates = {
        s: write_update_file(workdir / "updates" / f"{s}.frames", shapes, spec, seed=seed + 1000 + i)
        for i, s in enumerate(names)
    }
    rng = np.random.default_rng(seed)
    headers = {s: update_header(s, 1, spec, rng) for s in names}
    config = write_federation_config(
        workdir / "federation.toml", federation_id="load", sites=names, rounds=1, strategy=strategy
    )
    retries = RetryCounter()
    logging.getLogger("client_agent.transport").addHandler(retries)
    server = AggregatorProcess(
        config=config, store=workdir / "store", initial_model=model, log_path=workdir / "aggregator.log",
        start_timeout_s=timeout_s, log_level="WARNING",
    )
    with server:
        idle = server.memory()
        barrier = threading.Barrier(sites)
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=sites, thread_name_prefix="site") as pool:
            futures = [
                pool.submit(run_site, s, server.target, updates[s], headers[s], workdir / "downloads", barrier,
                            rpc_timeout_s=rpc_timeout_s)
                for s in names
            ]
            done, not_done = wait(futures, timeout=timeout_s)
            if not_done:
                barrier.abort()
                raise TimeoutError(f"{len(not_done)} of {sites} sites had not finished after {timeout_s:.0f} s")
        outcomes = [f.result() for f in futures]
        all_submitted = time.monotonic()
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.AggregatorServiceStub(channel)
            closed_status = None
            if all(o.accepted for o in outcomes):
                closed_status = wait_for_rounds_completed(stub, 1, timeout_s=timeout_s)
            status = closed_status or stub.GetStatus(pb.GetStatusRequest(), timeout=rpc_timeout_s)
        round_closed = time.monotonic()
        memory = server.memory()
    logging.getLogger("client_agent.transport").removeHandler(retries)

    submit_ms = [1000 * o.submit_s for o in outcomes if o.accepted]
    join_ms = [1000 * o.join_s for o in outcomes if np.isfinite(o.join_s)]
    download_ms = [1000 * o.download_s for o in outcomes if np.isfinite(o.download_s)]
    errors = sorted({o.error for o in outcomes if o.error})
    return {
        "machine": machine_line(),
        "sites": sites,
        "params": params,
        "model_file_mb": model_bytes / MB,
        "update_bytes_mean": float(np.mean([u.nbytes for u in updates.values()])),
        "codec": {"top_k_fraction": spec.top_k_fraction, "quantization": spec.quantization},
        "strategy": strategy,
        "sent": sum(o.sent for o in outcomes),  # sites that started a SubmitUpdate
        "accepted": sum(o.accepted for o in outcomes),
        "duplicates": sum(o.duplicate for o in outcomes),
        "server_submissions_total": int(status.submissions_total),
        "server_rejections": dict(status.rejections),
        "round_closed": closed_status is not None,
        "retries": retries.count,
        "errors": errors[:10],
        "p50_ms": percentile(submit_ms, 50),
        "p99_ms": percentile(submit_ms, 99),
        "max_ms": max(submit_ms, default=float("nan")),
        "join_p50_ms": percentile(join_ms, 50),
        "join_p99_ms": percentile(join_ms, 99),
        "download_p50_ms": percentile(download_ms, 50),
        "download_p99_ms": percentile(download_ms, 99),
        "all_submitted_s": all_submitted - started,
        "close_after_last_submit_s": round_closed - all_submitted,
        "idle_rss_mb": idle["VmRSS"] / MB,
        "peak_rss_mb": memory["VmHWM"] / MB,
        "bytes_in": int(status.bytes_in),
        "bytes_out": int(status.bytes_out),
        "load_average": load_average(),
    }


def format_report(r: dict[str, Any]) -> str:
    return "\n".join([
        f"machine: {r['machine']}; 1-minute load average at the end {r['load_average']:.1f}",
        f"{r['sites']} sites, model {r['params']:,} parameters ({r['model_file_mb']:.1f} MB file), updates "
        f"top-{r['codec']['top_k_fraction']:g} {r['codec']['quantization']} ({r['update_bytes_mean'] / 1024:.1f} KiB "
        f"mean), strategy {r['strategy']}",
        f"submissions: sent {r['sent']}, accepted {r['accepted']} (aggregator counted "
        f"{r['server_submissions_total']}, rejections {r['server_rejections'] or 'none'}), duplicates "
        f"{r['duplicates']}, client retries {r['retries']}",
        f"{'latency ms':>12} {'p50':>8} {'p99':>8}",
        f"{'submit':>12} {r['p50_ms']:>8.0f} {r['p99_ms']:>8.0f}   (max {r['max_ms']:.0f})",
        f"{'join':>12} {r['join_p50_ms']:>8.0f} {r['join_p99_ms']:>8.0f}",
        f"{'download':>12} {r['download_p50_ms']:>8.0f} {r['download_p99_ms']:>8.0f}",
        f"all {r['sites']} sites done in {r['all_submitted_s']:.1f} s; round "
        f"{'closed' if r['round_closed'] else 'NOT closed'} {r['close_after_last_submit_s']:.2f} s later",
        f"aggregator RSS: idle {r['idle_rss_mb']:.0f} MB, peak (VmHWM) {r['peak_rss_mb']:.0f} MB; "
        f"bytes in {r['bytes_in']:,}, out {r['bytes_out']:,}",
        *(f"error: {e}" for e in r["errors"]),
    ])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=100, help="simulated sites (default 100)")
    parser.add_argument("--params", type=lambda s: int(s.replace("_", "")), default=1_000_000,
                        help="model parameters (default 1_000_000)")
    parser.add_argument("--top-k", type=float, default=0.01, help="top-k fraction of the updates (default 0.01)")
    parser.add_argument("--quantization", default="int8", help="value quantization of the updates (default int8)")
    parser.add_argument("--strategy", default="aam", help="aggregation strategy (default aam)")
    parser.add_argument("--rpc-timeout-s", type=float, default=120.0, help="deadline of each request")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="deadline of the whole run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args(argv)
    if args.sites < 1 or args.sites > 999:
        parser.error(f"--sites must be in [1, 999] (site-001..site-999), got {args.sites}")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    spec = codec.CodecSpec(top_k_fraction=args.top_k, quantization=args.quantization)
    with tempfile.TemporaryDirectory(prefix="load-bench-") as tmp:
        report = run_load(
            Path(tmp), sites=args.sites, params=args.params, spec=spec, strategy=args.strategy,
            rpc_timeout_s=args.rpc_timeout_s, timeout_s=args.timeout_s, seed=args.seed,
        )
    print(format_report(report))
    if args.json:
        print(json.dumps(report))
    return 0 if report["accepted"] == report["sent"] == report["sites"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
