"""Aggregator round close and memory through the real service, against a dense numpy sum.

A model of P float32 parameters (default 100M; ``--quick`` = 10M) shaped like a 3D conv net, and
5, 20 and 50 sites that each submit a top-1% + int8 update (``CodecSpec(top_k_fraction=0.01,
quantization="int8")``, a different seeded random delta per site, encoded once into a frames file).
For each site count a fresh aggregator runs as a subprocess (``python -m aggregator_service.server``
on 127.0.0.1:0, its own store), all sites upload concurrently with ``AggregatorClient.submit``
(one channel per site), and the round closes when the last one commits. Measured:

* round close: ``close_seconds`` that the aggregator writes to ``rounds/0001/_result.json`` (from
  the start of ``close_round`` to the result), the server-side time from the last commit to the
  result (``closed_at - committed_at + close_seconds``), and the client's wall time from its last
  upload's response until ``GetStatus`` reports the round completed;
* the aggregator's memory, read from ``/proc/PID/status`` (psutil is not installed): ``VmRSS``
  right after it serves (idle: interpreter, gRPC, numpy, start-up leftovers; reported as the
  interpreter overhead), ``VmHWM`` after start-up, then ``VmHWM`` reset (``clear_refs``) and read
  again after the round closed; the peak is the larger of the two. A 20 ms ``VmRSS`` sampler says
  which phase (uploads or close) the peak came from.

Baseline, in the same run: numpy summing the same updates held dense. Each site's update is
decoded to one dense float32 vector of P values; only ``acc += w_k * Δ_k`` is timed, as
``np.multiply(Δ_k, w_k, out=tmp); np.add(acc, tmp, out=acc)`` in float32 (no allocation). 50 dense
copies of a 100M model are 20 GB, more than this machine can hold next to the aggregator, so the
copies are not all held at once: site k is decoded (not timed) into the same buffer right before
its add is timed. The timed work is exactly that of a sum over K resident dense arrays, the data
far larger than any cache either way. The weights are those the 50-site round gave (read from its
``_result.json``); the 5- and 20-site figures are the first 5 and 20 adds of the same loop.
The 50-site sum is then checked against the aggregator's new model: ``θ_2 == θ_1 + Σ w_k Δ_k``.

Usage::

    python benchmarks/aggregator_bench.py --quick --json          # 10M parameters, ~40 s on 2 cores
    python benchmarks/aggregator_bench.py --json                  # 100M (the target size), 5-8 min on 2 cores

With ``--json`` the last line is one JSON object holding ``peak_rss_over_model_50``,
``peak_rss_net_over_model_50`` (peak minus the idle RSS, over the model), ``rss_growth_5_to_50``,
``close_vs_numpy_50``, ``interpreter_overhead_mb`` and the per-site-count rows. It also holds
``close_cpu_vs_numpy_cpu_50``: the aggregator's CPU seconds (``/proc/PID/stat``, all threads) from
the last upload response until round 2 opened, over the CPU seconds of the numpy adds. It is not a
target; on a shared machine it moves far less with the load than the wall-time ratio does.
Targets: peak_rss_net_over_model_50 <= 3, rss_growth_5_to_50 <= 1.2, close_vs_numpy_50 <= 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    MB,
    AggregatorProcess,
    RssSampler,
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
from client_agent.transport import AggregatorClient, Backoff  # noqa: E402
from protos.fedsegnet.v1 import aggregator_pb2_grpc as pb_grpc  # noqa: E402

log = logging.getLogger("aggregator_bench")

QUICK_PARAMS = 10_000_000


@dataclass
class Inputs:
    """The model and the pre-encoded updates every site count draws from."""

    params: int
    shapes: list[tuple[str, tuple[int, ...]]]
    model: Path
    model_file_bytes: int
    updates: dict[str, UpdateFile]  # site -> its encoded update
    prepare_seconds: float

    @property
    def dense_bytes(self) -> int:
        return 4 * self.params


@dataclass
class SiteCountResult:
    """One aggregator run with K sites."""

    sites: int
    upload_seconds: float
    submit_p50_s: float
    submit_max_s: float
    update_bytes_mean: float
    close_seconds: float
    commit_to_result_s: float
    wall_to_next_round_s: float
    start_seconds: float
    idle_rss: int
    startup_hwm: int
    round_hwm: int
    peak_rss: int
    peak_reset: bool
    sampled_peaks: dict[str, int]
    load_average: float
    close_cpu_seconds: float
    weights: dict[str, float] = field(repr=False)
    numpy_sum_seconds: float = float("nan")
    numpy_cpu_seconds: float = float("nan")

    def ratios(self, dense_bytes: int) -> dict[str, float]:
        return {
            "peak_rss_over_model": self.peak_rss / dense_bytes,
            "peak_rss_net_over_model": (self.peak_rss - self.idle_rss) / dense_bytes,
            "close_vs_numpy": self.close_seconds / self.numpy_sum_seconds,
            "close_cpu_vs_numpy_cpu": self.close_cpu_seconds / self.numpy_cpu_seconds,
        }


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (``/proc/PID/stat`` fields 14 and 15), all of
    its threads together. Unlike wall time it hardly moves with the machine's load."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------------------- inputs


def prepare_inputs(workdir: Path, params: int, max_sites: int, spec: codec.CodecSpec, seed: int) -> Inputs:
    """Write the initial model and every site's encoded update (reused when ``workdir`` already
    holds the same ones, e.g. a rerun with ``--workdir``)."""
    started = time.monotonic()
    shapes = conv_net_shapes(params)
    key = {"params": params, "sites": max_sites, "spec": asdict(spec), "seed": seed, "version": 1}
    manifest_path = workdir / "inputs.json"
    model = workdir / "initial.frames"
    cached = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
    if cached is not None and cached["key"] == key and model.exists():
        updates = {s: UpdateFile(Path(u["path"]), u["digest"], u["chunks"], u["nbytes"])
                   for s, u in cached["updates"].items()}
        if all(u.path.exists() for u in updates.values()):
            log.info("reusing the inputs in %s", workdir)
            return Inputs(params, shapes, model, model.stat().st_size, updates, time.monotonic() - started)
    log.info("writing a %s-parameter initial model (%d tensors)", f"{params:,}", len(shapes))
    model_bytes = write_initial_model(model, shapes, seed=seed)
    updates = {}
    (workdir / "updates").mkdir(exist_ok=True)
    for i, site in enumerate(site_names(max_sites)):
        updates[site] = write_update_file(workdir / "updates" / f"{site}.frames", shapes, spec, seed=seed + 1000 + i)
        log.info("encoded %s's update: %s bytes", site, f"{updates[site].nbytes:,}")
    manifest_path.write_text(json.dumps(
        {"key": key, "updates": {s: {**asdict(u), "path": str(u.path)} for s, u in updates.items()}}
    ))
    return Inputs(params, shapes, model, model_bytes, updates, time.monotonic() - started)


# ------------------------------------------------------------------------- one aggregator run


def _upload_all(
    target: str, sites: Sequence[str], inputs: Inputs, spec: codec.CodecSpec, *, workers: int,
    timeout_s: float, seed: int,
) -> list[tuple[float, float]]:
    """Every site joins and submits its stored update concurrently, one channel per site.
    Returns each submit's (start, end) on ``time.monotonic``."""
    rng = np.random.default_rng(seed)
    headers = {site: update_header(site, 1, spec, rng) for site in sites}

    def one(site: str) -> tuple[float, float]:
        client = AggregatorClient(
            target, backoff=Backoff(initial_s=0.2, max_s=2.0, max_attempts=3), rpc_timeout_s=timeout_s
        )
        try:
            client.join(site)
            upd = inputs.updates[site]
            start = time.monotonic()
            client.submit(headers[site], upd.path, upd.digest, upd.chunks)
            return start, time.monotonic()
        finally:
            client.close()

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(sites)))) as pool:
        return list(pool.map(one, sites))


def run_site_count(
    k: int, inputs: Inputs, spec: codec.CodecSpec, workdir: Path, *, strategy: str, workers: int,
    timeout_s: float, seed: int, aggregation_options: Sequence[str] = (),
) -> tuple[SiteCountResult, Path]:
    """One fresh aggregator subprocess, K concurrent uploads, one round closed. Returns the
    measurements and the store (holding the new model)."""
    sites = site_names(k)
    store = workdir / f"store-{k}"
    shutil.rmtree(store, ignore_errors=True)
    config = write_federation_config(
        workdir / f"federation-{k}.toml", federation_id=f"bench-{k}", sites=sites, rounds=2, strategy=strategy,
        aggregation_options=aggregation_options,
    )
    server = AggregatorProcess(
        config=config, store=store, initial_model=inputs.model, log_path=workdir / f"aggregator-{k}.log",
        start_timeout_s=timeout_s,
    )
    with server:
        idle = server.memory()
        reset = server.reset_peak()
        with RssSampler(server.pid) as sampler:
            sampler.phase("upload")
            upload_start = time.monotonic()
            spans = _upload_all(server.target, sites, inputs, spec, workers=workers, timeout_s=timeout_s, seed=seed)
            last_response = max(end for _, end in spans)
            cpu_at_last_response = process_cpu_seconds(server.pid)
            sampler.phase("close")
            with grpc.insecure_channel(server.target) as channel:
                wait_for_rounds_completed(pb_grpc.AggregatorServiceStub(channel), 1, timeout_s=timeout_s)
            round_seen = time.monotonic()
            close_cpu = process_cpu_seconds(server.pid) - cpu_at_last_response
            load_at_close = load_average()
        after = server.memory()
        if server.stop() not in (0, None):
            log.warning("the %d-site aggregator exited with a non-zero status; see %s", k, server.log_path)
    result = json.loads((store / "rounds" / "0001" / "_result.json").read_text())
    last_commit = max(
        json.loads((store / "rounds" / "0001" / f"{s}.json").read_text())["committed_at"] for s in sites
    )
    latencies = [end - start for start, end in spans]
    round_hwm = after["VmHWM"]
    row = SiteCountResult(
        sites=k,
        upload_seconds=last_response - upload_start,
        submit_p50_s=percentile(latencies, 50),
        submit_max_s=max(latencies),
        update_bytes_mean=float(np.mean([inputs.updates[s].nbytes for s in sites])),
        close_seconds=float(result["close_seconds"]),
        commit_to_result_s=float(result["closed_at"]) - last_commit + float(result["close_seconds"]),
        wall_to_next_round_s=round_seen - last_response,
        start_seconds=server.start_seconds,
        idle_rss=idle["VmRSS"],
        startup_hwm=idle["VmHWM"],
        round_hwm=round_hwm,
        peak_rss=max(idle["VmHWM"], round_hwm) if reset else round_hwm,
        peak_reset=reset,
        sampled_peaks=dict(sampler.peaks),
        load_average=load_at_close,
        close_cpu_seconds=close_cpu,
        weights={s: float(v["weight"]) for s, v in result["sites"].items()},
    )
    return row, store


# ---------------------------------------------------------------------------------- baseline


def _decode_dense(path: Path, out: np.ndarray) -> None:
    """A site's update decoded into one flat float32 vector (zeros where nothing was sent)."""
    offset = 0
    with open(path, "rb") as fh:
        for _name, array in codec.decode_frames(codec.read_frames(fh)):
            out[offset : offset + array.size] = array.reshape(-1)
            offset += array.size
    if offset != out.size:
        raise ValueError(f"{path} decodes to {offset} values, expected {out.size}")


def numpy_weighted_sum(
    inputs: Inputs, weights: Mapping[str, float]
) -> tuple[list[float], list[float], float, np.ndarray]:
    """Time ``acc += w_k Δ_k`` over dense float32 vectors, site by site in name order.

    Returns per-site add seconds (wall and CPU), the (untimed) decode seconds in total, and ``acc``.
    """
    acc = np.zeros(inputs.params, dtype=np.float32)
    dense = np.empty(inputs.params, dtype=np.float32)
    tmp = np.empty(inputs.params, dtype=np.float32)
    # Touch every page once so that first-touch page faults are not billed to the first add.
    dense.fill(0.0)
    tmp.fill(0.0)
    seconds: list[float] = []
    cpu_seconds: list[float] = []
    decode_seconds = 0.0
    for site in sorted(weights):
        started = time.perf_counter()
        _decode_dense(inputs.updates[site].path, dense)
        decode_seconds += time.perf_counter() - started
        w = np.float32(weights[site])
        cpu_started = time.process_time()
        started = time.perf_counter()
        np.multiply(dense, w, out=tmp)
        np.add(acc, tmp, out=acc)
        seconds.append(time.perf_counter() - started)
        cpu_seconds.append(time.process_time() - cpu_started)
    return seconds, cpu_seconds, decode_seconds, acc


def check_new_model(store: Path, acc: np.ndarray) -> tuple[float, float]:
    """``max |θ_2 − (θ_1 + acc)|`` over the whole model, and ``max |acc|`` for scale."""
    worst = 0.0
    offset = 0
    with open(store / "models" / "round-0001.frames", "rb") as f1, open(store / "models" / "round-0002.frames", "rb") as f2:
        pairs = zip(codec.decode_frames(codec.read_frames(f1)), codec.decode_frames(codec.read_frames(f2)), strict=True)
        for (name1, theta1), (name2, theta2) in pairs:
            if name1 != name2:
                raise ValueError(f"models disagree on tensor order: {name1!r} vs {name2!r}")
            part = acc[offset : offset + theta1.size].astype(np.float64)
            expected = theta1.reshape(-1).astype(np.float64) + part
            worst = max(worst, float(np.max(np.abs(theta2.reshape(-1).astype(np.float64) - expected))))
            offset += theta1.size
    return worst, float(np.max(np.abs(acc)))


def model_io_seconds(model: Path, out: Path) -> float:
    """What a close must do besides the sum, timed alone: decode θ from its frames file, encode it
    losslessly into a new file (fsync), and hash that file's frames (the manifest digest)."""
    started = time.perf_counter()
    with open(model, "rb") as src, open(out, "wb") as dst:
        codec.write_frames(dst, codec.encode_tensors(codec.decode_frames(codec.read_frames(src)), codec.LOSSLESS))
        dst.flush()
        os.fsync(dst.fileno())
    codec.file_digest(out)
    seconds = time.perf_counter() - started
    out.unlink()
    return seconds


# ---------------------------------------------------------------------------------- reporting


def format_table(rows: Sequence[SiteCountResult], dense_bytes: int) -> str:
    header = (
        f"{'sites':>5} {'upload s':>9} {'close s':>8} {'commit→res s':>12} {'wall→r2 s':>10} "
        f"{'numpy Σ s':>9} {'close/np':>8} {'cpu/np cpu':>10} {'idle MB':>8} {'peak MB':>8} {'peak/model':>10} "
        f"{'net/model':>9} {'upl MB*':>8} {'close MB*':>9} {'load':>5}"
    )
    lines = [header]
    for r in rows:
        ratio = r.ratios(dense_bytes)
        lines.append(
            f"{r.sites:>5} {r.upload_seconds:>9.2f} {r.close_seconds:>8.2f} {r.commit_to_result_s:>12.2f} "
            f"{r.wall_to_next_round_s:>10.2f} {r.numpy_sum_seconds:>9.2f} {ratio['close_vs_numpy']:>8.2f} "
            f"{ratio['close_cpu_vs_numpy_cpu']:>10.2f} "
            f"{r.idle_rss / MB:>8.0f} {r.peak_rss / MB:>8.0f} {ratio['peak_rss_over_model']:>10.2f} "
            f"{ratio['peak_rss_net_over_model']:>9.2f} {r.sampled_peaks.get('upload', 0) / MB:>8.0f} "
            f"{r.sampled_peaks.get('close', 0) / MB:>9.0f} {r.load_average:>5.1f}"
        )
    lines.append("* sampled VmRSS maxima (20 ms) during the uploads / from the last response to round 2; "
                 "load: 1-minute load average when the round had closed; cpu/np cpu: the aggregator's CPU "
                 "seconds (all threads) from the last upload response to round 2 over numpy's CPU seconds")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=lambda s: int(s.replace("_", "")), default=100_000_000,
                        help="model parameters (default 100_000_000)")
    parser.add_argument("--quick", action="store_true", help=f"--params {QUICK_PARAMS:_} (about 40 s on 2 cores)")
    parser.add_argument("--sites", type=int, nargs="+", default=[5, 20, 50], help="site counts (default 5 20 50)")
    parser.add_argument("--strategy", default="aam", help="aggregation strategy of the federation (default aam)")
    parser.add_argument("--aggregation-option", action="append", default=[], metavar="KEY=VALUE",
                        help="another [aggregation] line, e.g. server_momentum=0.9 (repeatable)")
    parser.add_argument("--top-k", type=float, default=0.01, help="top-k fraction of the updates (default 0.01)")
    parser.add_argument("--quantization", default="int8", help="value quantization of the updates (default int8)")
    parser.add_argument("--upload-workers", type=int, default=0,
                        help="concurrent uploads; 0 = all sites at once (default)")
    parser.add_argument("--workdir", help="keep the model, updates and stores here (reused on a rerun); "
                        "default: a temporary directory, removed at the end")
    parser.add_argument("--timeout-s", type=float, default=900.0, help="bound on each start, upload and close")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)

    params = QUICK_PARAMS if args.quick else args.params
    counts = sorted(set(args.sites))
    if counts[0] < 1:
        parser.error(f"--sites must be >= 1, got {counts}")
    spec = codec.CodecSpec(top_k_fraction=args.top_k, quantization=args.quantization)
    temp = None if args.workdir else tempfile.TemporaryDirectory(prefix="aggregator-bench-")
    workdir = Path(args.workdir or temp.name)  # type: ignore[union-attr]
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        inputs = prepare_inputs(workdir, params, counts[-1], spec, args.seed)
        rows: list[SiteCountResult] = []
        stores: dict[int, Path] = {}
        for k in counts:
            log.info("%d sites: starting the aggregator", k)
            row, stores[k] = run_site_count(
                k, inputs, spec, workdir, strategy=args.strategy, workers=args.upload_workers or k,
                aggregation_options=[o.replace("=", " = ", 1) for o in args.aggregation_option],
                timeout_s=args.timeout_s, seed=args.seed + k,
            )
            log.info("%d sites: close %.2f s, peak RSS %.0f MB", k, row.close_seconds, row.peak_rss / MB)
            rows.append(row)
            if k != counts[-1] and not args.workdir:
                shutil.rmtree(stores[k], ignore_errors=True)  # disk: each store holds two models

        log.info("numpy baseline over %d dense updates", counts[-1])
        top = rows[-1]
        add_seconds, add_cpu_seconds, decode_seconds, acc = numpy_weighted_sum(inputs, top.weights)
        load_at_numpy = load_average()
        for row in rows:
            row.numpy_sum_seconds = float(sum(add_seconds[: row.sites]))
            row.numpy_cpu_seconds = float(sum(add_cpu_seconds[: row.sites]))
        max_error, acc_scale = check_new_model(stores[counts[-1]], acc)
        del acc
        io_seconds = model_io_seconds(inputs.model, workdir / "model-io.frames")
    finally:
        if temp is not None:
            temp.cleanup()

    first, last = rows[0], rows[-1]
    ratios = last.ratios(inputs.dense_bytes)
    suffix = f"_{last.sites}"
    marginal_ms = (
        1000 * (last.close_seconds - first.close_seconds) / (last.sites - first.sites)
        if last.sites > first.sites else float("nan")
    )
    report: dict[str, Any] = {
        "machine": machine_line(),
        "params": params,
        "tensors": len(inputs.shapes),
        "largest_tensor": max(int(np.prod(s)) for _, s in inputs.shapes),
        "dense_model_mb": inputs.dense_bytes / MB,
        "model_file_mb": inputs.model_file_bytes / MB,
        "codec": asdict(spec),
        "strategy": args.strategy,
        "aggregation_options": args.aggregation_option,
        "prepare_seconds": inputs.prepare_seconds,
        "baseline": "numpy float32 acc += w_k * delta_k (np.multiply/np.add with out=) over dense "
                    "decoded updates, one resident at a time; decode not timed",
        "numpy_decode_seconds_total": decode_seconds,
        "load_average_at_numpy": load_at_numpy,
        "rss_source": "/proc/PID/status VmRSS and VmHWM (VmHWM reset after start-up via clear_refs)",
        "interpreter_overhead_mb": last.idle_rss / MB,
        f"peak_rss_over_model_{last.sites}": ratios["peak_rss_over_model"],
        f"peak_rss_net_over_model_{last.sites}": ratios["peak_rss_net_over_model"],
        f"rss_growth_{first.sites}_to_{last.sites}": last.peak_rss / first.peak_rss,
        f"close_vs_numpy_{last.sites}": ratios["close_vs_numpy"],
        f"close_cpu_vs_numpy_cpu_{last.sites}": ratios["close_cpu_vs_numpy_cpu"],
        "model_io_seconds": io_seconds,
        "close_minus_model_io_vs_numpy" + suffix: (last.close_seconds - io_seconds) / last.numpy_sum_seconds,
        "close_marginal_ms_per_site": marginal_ms,
        "numpy_ms_per_site": 1000 * last.numpy_sum_seconds / last.sites,
        "result_max_abs_error": max_error,
        "result_correct": max_error <= 1e-6 + 1e-4 * acc_scale,
        "result_max_abs_update": acc_scale,
        "rows": [
            {**{k: v for k, v in asdict(r).items() if k != "weights"}, **r.ratios(inputs.dense_bytes)} for r in rows
        ],
    }
    print(f"machine: {report['machine']}")
    print(
        f"model: {params:,} float32 parameters in {report['tensors']} tensors (largest {report['largest_tensor']:,}), "
        f"dense {report['dense_model_mb']:,.0f} MB, model file {report['model_file_mb']:,.0f} MB; "
        f"updates: top-{args.top_k:g} {args.quantization}, mean {last.update_bytes_mean / MB:.2f} MB per site; "
        f"strategy {args.strategy}"
    )
    print(format_table(rows, inputs.dense_bytes))
    print(
        f"baseline: {report['baseline']} (decoding them took {decode_seconds:.1f} s more; load average "
        f"{load_at_numpy:.1f} after it). "
        f"Interpreter overhead (idle RSS after start, {last.sites} sites): {report['interpreter_overhead_mb']:.0f} MB."
    )
    print(
        f"model I/O alone (decode θ, encode θ' losslessly + fsync, hash it): {io_seconds:.2f} s; close minus that "
        f"over the numpy sum at {last.sites} sites: {report['close_minus_model_io_vs_numpy' + suffix]:.2f}; "
        f"close per extra site {marginal_ms:.0f} ms vs numpy {report['numpy_ms_per_site']:.0f} ms per site"
    )
    print(
        f"check: max |θ_2 − (θ_1 + Σ w Δ)| = {max_error:.3g} (max |Σ w Δ| = {acc_scale:.3g}); "
        f"peak RSS from VmHWM {'(reset after start-up; peak = max of start-up and round)' if last.peak_reset else '(whole life)'}"
    )
    # The aggregated model must be what numpy computes from the same decoded updates and weights
    # (float32 sums vs the aggregator's float64: ~1e-8 here); anything larger is a wrong result.
    correct = max_error <= 1e-6 + 1e-4 * acc_scale
    if not correct:
        print(f"ERROR: the aggregator's new model differs from θ_1 + Σ w Δ by {max_error:.3g}")
    if args.json:
        print(json.dumps(report))
    return 0 if correct else 1


if __name__ == "__main__":
    raise SystemExit(main())
