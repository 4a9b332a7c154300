"""Helpers shared by ``aggregator_bench.py`` and ``load_bench.py``.

Both benchmarks drive the *real* aggregator: ``python -m aggregator_service.server`` started as a
subprocess on ``127.0.0.1:0`` (so its memory can be read on its own from ``/proc/PID/status``),
fed with real codec frames through the real gRPC client (``client_agent.transport``). Nothing
here needs torch: models and updates are synthetic numpy tensors shaped like a 3D conv net.

What is here:

* :func:`conv_net_shapes` / :func:`random_tensors`: a synthetic model of exactly N float32
  parameters, generated one tensor at a time (never the whole model in memory);
* :func:`write_update_file`: one site's update encoded once into a frames file, with the digest
  and chunk count that ``AggregatorClient.submit`` sends in its commit;
* :func:`write_federation_config`: the federation TOML the subprocess reads;
* :class:`AggregatorProcess`: start, wait for the port, read ``VmRSS``/``VmHWM``, reset the peak,
  stop; :class:`RssSampler`: the subprocess's RSS over time, split by phase;
* small things: site names, upload headers, percentiles, a line describing the machine.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import codec  # noqa: E402
from aggregator_service import launcher  # noqa: E402
from protos.fedsegnet.v1 import aggregator_pb2 as pb  # noqa: E402
from protos.fedsegnet.v1 import aggregator_pb2_grpc as pb_grpc  # noqa: E402

MB = 1 << 20
Shape = tuple[int, ...]

# ------------------------------------------------------------------------------------- the model


# One stage of a 3D U-Net-like encoder/decoder: conv kernels (C_out, C_in, 3, 3, 3) plus norm
# weights and biases (C,). The widest kernel, 384 x 384 x 27 = 3,981,312 elements, is the ~4M
# "largest tensor" that bounds the aggregator's per-tensor working set.
_WIDTHS = (32, 64, 128, 256, 384)


def conv_net_shapes(n_params: int) -> list[tuple[str, Shape]]:
    """Names and shapes of a synthetic 3D conv net with exactly ``n_params`` float32 parameters.

    Stages of two 3x3x3 convolutions with their norms, widths 32..384, repeated until the budget
    is spent; the last tensor is cut to a 1-D remainder so the total is exact. About 24 tensors
    per 12.7M parameters (a few large kernels, many small vectors).
    """
    if n_params < 1:
        raise ValueError(f"n_params must be >= 1, got {n_params}")
    shapes: list[tuple[str, Shape]] = []
    left = n_params
    block = 0
    while left > 0:
        for c in _WIDTHS:
            for name, shape in (
                (f"enc{block}.w{c}.conv1.weight", (c, c, 3, 3, 3)),
                (f"enc{block}.w{c}.norm1.weight", (c,)),
                (f"enc{block}.w{c}.norm1.bias", (c,)),
                (f"enc{block}.w{c}.conv2.weight", (c, c, 3, 3, 3)),
                (f"enc{block}.w{c}.norm2.weight", (c,)),
                (f"enc{block}.w{c}.norm2.bias", (c,)),
            ):
                if left <= 0:
                    return shapes
                size = int(np.prod(shape))
                if size > left:
                    name, shape, size = f"enc{block}.w{c}.tail", (left,), left
                shapes.append((name, shape))
                left -= size
        block += 1
    return shapes


def random_tensors(
    shapes: Sequence[tuple[str, Shape]], seed: int, scale: float
) -> Iterator[tuple[str, np.ndarray]]:
    """``(name, float32 array)`` per shape, standard normal times ``scale`` times a per-tensor
    log-normal factor (so tensors differ in magnitude, as real layers do); one tensor at a time."""
    rng = np.random.default_rng(seed)
    for name, shape in shapes:
        values = rng.standard_normal(int(np.prod(shape)), dtype=np.float32)
        values *= np.float32(scale * rng.lognormal(0.0, 0.5))
        yield name, values.reshape(shape)


def write_initial_model(path: Path, shapes: Sequence[tuple[str, Shape]], seed: int = 0) -> int:
    """The global model of round 1 as a lossless frames file (``codec.save_tensors``); its bytes."""
    return codec.save_tensors(path, random_tensors(shapes, seed, scale=0.02))


@dataclass(frozen=True)
class UpdateFile:
    """One site's encoded update on disk, with what the upload's commit message carries."""

    path: Path
    digest: str
    chunks: int
    nbytes: int


def write_update_file(
    path: Path, shapes: Sequence[tuple[str, Shape]], spec: codec.CodecSpec, seed: int, scale: float = 1e-3
) -> UpdateFile:
    """Encode a random delta under ``spec`` into a frames file, as a client agent stores it."""
    frames = codec.DigestingFrames(codec.encode_tensors(random_tensors(shapes, seed, scale), spec))
    with open(path, "wb") as fh:
        codec.write_frames(fh, frames)
    return UpdateFile(path, frames.hexdigest(), frames.count, frames.nbytes)


def site_names(count: int) -> list[str]:
    """``site-001`` .. ``site-NNN`` (name order = the aggregator's aggregation order)."""
    return [f"site-{i:03d}" for i in range(1, count + 1)]


def update_header(
    site: str, round_id: int, spec: codec.CodecSpec, rng: np.random.Generator
) -> pb.UpdateHeader:
    """An upload header with plausible, seeded sample count and validation metrics."""
    return pb.UpdateHeader(
        site=site,
        round_id=round_id,
        sample_count=int(rng.integers(20, 200)),
        metrics=pb.LocalMetrics(
            dice=float(rng.uniform(0.6, 0.9)), hd95=float(rng.uniform(2.0, 10.0)), validation_cases=5
        ),
        codec=pb.CodecSpec(**spec.to_fields()),
    )


# ------------------------------------------------------------------------- the federation config


def write_federation_config(
    path: Path,
    *,
    federation_id: str,
    sites: Sequence[str],
    rounds: int = 2,
    strategy: str = "fedavg",
    round_timeout_s: float = 3600.0,
    aggregation_options: Sequence[str] = (),
) -> Path:
    """A federation TOML with ``min_clients = max_clients = len(sites)``: the round closes the
    moment the last site commits. The model section is irrelevant to the aggregator and left out.
    ``aggregation_options``: more ``[aggregation]`` lines as TOML, e.g. ``"server_momentum = 0.9"``."""
    quoted = ", ".join(f'"{s}"' for s in sites)
    path.write_text(
        "[federation]\n"
        f'id = "{federation_id}"\n'
        f"rounds = {rounds}\n"
        f"min_clients = {len(sites)}\n"
        f"max_clients = {len(sites)}\n"
        f"round_timeout_s = {round_timeout_s}\n"
        f"sites = [{quoted}]\n"
        "\n[aggregation]\n"
        f'strategy = "{strategy}"\n'
        + "".join(f"{line}\n" for line in aggregation_options)
    )
    return path


# ----------------------------------------------------------------------- the aggregator process


def proc_status_bytes(pid: int) -> dict[str, int]:
    """The ``Vm*``/``Rss*`` lines of ``/proc/PID/status`` in bytes (``VmRSS``, ``VmHWM``, ...)."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key.startswith(("Vm", "Rss")) and value.strip().endswith("kB"):
                out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak_rss(pid: int) -> bool:
    """Reset ``VmHWM`` to the current RSS (``echo 5 > /proc/PID/clear_refs``, Linux >= 4.0).

    Returns False where the kernel or permissions refuse; the peak then covers the process's
    whole life, start-up included.
    """
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class AggregatorProcess(launcher.AggregatorProcess):
    """:class:`aggregator_service.launcher.AggregatorProcess` on ``127.0.0.1:0`` with its memory readings.

    Use as a context manager; :meth:`stop` sends SIGTERM and, after ``stop_timeout_s``, SIGKILL.
    Logs go to ``log_path``.
    """

    def __init__(
        self,
        *,
        config: Path,
        store: Path,
        initial_model: Path,
        log_path: Path,
        start_timeout_s: float = 300.0,
        stop_timeout_s: float = 30.0,
        log_level: str = "INFO",
    ) -> None:
        super().__init__(config=config, store=store, initial_model=initial_model, log_path=log_path,
                         log_level=log_level, start_timeout_s=start_timeout_s, stop_timeout_s=stop_timeout_s)

    def memory(self) -> dict[str, int]:
        """``/proc/PID/status`` memory lines in bytes."""
        return proc_status_bytes(self.pid)

    def reset_peak(self) -> bool:
        return reset_peak_rss(self.pid)

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.port_file.unlink(missing_ok=True)


class RssSampler:
    """Samples a process's ``VmRSS`` every ``interval_s`` in a daemon thread, keeping the maximum
    per phase label (set with :meth:`phase`). Sampling can miss spikes shorter than the interval;
    ``VmHWM`` cannot, so use this only to tell which phase the peak came from."""

    def __init__(self, pid: int, interval_s: float = 0.02, max_seconds: float = 3600.0) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.max_seconds = max_seconds
        self.peaks: dict[str, int] = {}
        self._phase = "start"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def phase(self, label: str) -> None:
        self._phase = label

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                rss = proc_status_bytes(self.pid)["VmRSS"]
            except (OSError, KeyError):
                return  # the process is gone
            label = self._phase
            self.peaks[label] = max(self.peaks.get(label, 0), rss)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def wait_for_rounds_completed(stub: pb_grpc.AggregatorServiceStub, count: int, *, timeout_s: float,
                              poll_s: float = 0.01) -> pb.GetStatusResponse:
    """Poll ``GetStatus`` until ``rounds_completed >= count`` (round ``count + 1`` is open, or the
    federation finished); bounded by ``timeout_s``. ``GetStatus`` waits on the aggregator's lock,
    which a closing round holds, so this returns soon after the close ends."""
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"round {count} did not close within {timeout_s:.0f} s")
        status = stub.GetStatus(pb.GetStatusRequest(), timeout=remaining)
        if status.rounds_completed >= count:
            return status
        time.sleep(poll_s)


# ----------------------------------------------------------------------------------- reporting


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation (numpy's default)."""
    if not values:
        return float("nan")
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def load_average() -> float:
    """The 1-minute load average (other work on a shared machine skews timings; report it)."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_line() -> str:
    """Cores, CPU model, GPU (none expected here), Python and today's date, for the report."""
    cpu = cpu_model()
    mem = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        total_kb = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        mem = f", {total_kb / (1 << 20):.0f} GiB RAM"
    gpu = "GPU: " + ("yes" if Path("/dev/nvidia0").exists() else "none")
    return (
        f"{os.cpu_count()} cores ({cpu}){mem}, {gpu}, Python {platform.python_version()}, "
        f"{_dt.date.today().isoformat()}"
    )
