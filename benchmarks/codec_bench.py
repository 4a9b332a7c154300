"""Codec size and speed against a named baseline: raw zstandard level 1 on the dense fp32 bytes.

For each codec configuration, on a model delta of N float32 parameters split into realistic
tensors (3D conv kernels, attention and MLP matrices, norms and biases, a few matrices of up to
4M elements; heavy-tailed values), it prints:

* bytes of the frames, and the ratio dense-fp32-bytes / frame-bytes;
* encode, decode (to dense arrays) and accumulate (``accumulate_frames`` into float32
  accumulators, the aggregator's hot path) throughput in MB/s of dense-equivalent data
  (N * 4 bytes / seconds);
* the same run's raw ``zstandard`` level-1 compress and decompress MB/s of the same dense bytes,
  tensor by tensor (the baseline), and our MB/s over it;
* encode and decode time over top-1% int8's in the same run (``enc/top1``, ``dec/top1``: above 1
  is slower), for the sign codings (Sparse Ternary Compression, error-feedback signSGD) and the
  byte budgets (``dense/300`` bytes: 300x below fp32 by construction, zstd may add to it).

Usage::

    python benchmarks/codec_bench.py --params 20_000_000 --json
    python benchmarks/codec_bench.py --delta real_delta.frames   # a real update (see below)

With ``--json`` the last line of output is one JSON object with, for top-1% int8:
``ratio_top1_int8``, ``encode_vs_zstd``, ``decode_vs_zstd`` (and more); each configuration's
``encode_vs_top1_int8`` / ``decode_vs_top1_int8`` are its times over top-1% int8's.

Real deltas: :func:`run_benchmark` takes any ``{name: np.ndarray}``; ``--delta PATH`` loads one
from a frame file (``codec.save_tensors``) or an ``.npz`` (``np.savez``, no pickle), e.g. the
Transformer U-Net's ``theta_local - theta_global`` after one local epoch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar

import numpy as np
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import codec  # noqa: E402
from codec import CodecSpec  # noqa: E402

MB = 1e6
T = TypeVar("T")


@dataclass(frozen=True)
class Config:
    """One benchmarked codec configuration."""

    key: str
    label: str
    spec: CodecSpec
    budget_ratio: int = 0
    """When > 0: a byte budget of (dense fp32 bytes) / budget_ratio for the delta at hand."""

    def spec_for(self, dense_bytes: int) -> CodecSpec:
        if not self.budget_ratio:
            return self.spec
        return replace(self.spec, byte_budget=max(1, dense_bytes // self.budget_ratio))


CONFIGS: tuple[Config, ...] = (
    Config("lossless", "lossless fp32 + zstd-3", CodecSpec()),
    Config("fp16", "dense fp16 + zstd-3", CodecSpec(quantization="fp16")),
    Config("top10_int8", "top-10% int8 + zstd-3", CodecSpec(top_k_fraction=0.1, quantization="int8")),
    Config("top1_int8", "top-1% int8 + zstd-3", CodecSpec(top_k_fraction=0.01, quantization="int8")),
    Config("top1_int4", "top-1% int4 + zstd-3", CodecSpec(top_k_fraction=0.01, quantization="int4")),
    Config("top2_int8", "top-2% int8 + zstd-3", CodecSpec(top_k_fraction=0.02, quantization="int8")),
    Config("top2_int4", "top-2% int4 + zstd-3", CodecSpec(top_k_fraction=0.02, quantization="int4")),
    Config("top5_int8", "top-5% int8 + zstd-3", CodecSpec(top_k_fraction=0.05, quantization="int8")),
    Config("top5_int4", "top-5% int4 + zstd-3", CodecSpec(top_k_fraction=0.05, quantization="int4")),
    Config(
        "top1_int8_global",
        "top-1% (global) int8 + zstd-3",
        CodecSpec(top_k_fraction=0.01, quantization="int8", top_k_scope="global"),
    ),
    # Published baselines (value coding "sign"): Sattler et al. 2019, Karimireddy et al. 2019.
    Config("stc1", "STC: top-1% sign + zstd-3", CodecSpec(top_k_fraction=0.01, quantization="sign")),
    Config("stc05", "STC: top-0.5% sign + zstd-3", CodecSpec(top_k_fraction=0.005, quantization="sign")),
    Config("ef_sign", "EF-signSGD: dense sign + zstd-3", CodecSpec(quantization="sign")),
    # Byte budgets: k per tensor by energy share so that the frames fit.
    Config("budget300_int8", "budget dense/300, int8 + zstd-3", CodecSpec(quantization="int8"), 300),
    Config("budget300_sign", "budget dense/300, sign + zstd-3", CodecSpec(quantization="sign"), 300),
    Config("budget500_int4", "budget dense/500, int4 + zstd-3", CodecSpec(quantization="int4"), 500),
    Config("budget500_sign", "budget dense/500, sign + zstd-3", CodecSpec(quantization="sign"), 500),
)


# --------------------------------------------------------------------------------------------
# Inputs.


def _layer_shapes() -> Iterable[tuple[int, ...]]:
    """Shapes of a 3D Transformer U-Net-like network, repeated: conv kernels (Cout, Cin, 3, 3, 3),
    norms/biases (C,), attention/MLP matrices up to 4M elements."""
    while True:
        for c in (32, 64, 128, 256):
            yield (c, c, 3, 3, 3)
            yield (c,)
            yield (c,)
            yield (c, c // 2, 3, 3, 3)
        for width in (384, 768):
            yield (3 * width, width)  # qkv
            yield (width, width)  # attention output
            yield (4 * width, width)  # MLP up
            yield (width, 4 * width)  # MLP down
            yield (width,)
        yield (2000, 2000)  # the largest: 4M elements


def synthetic_delta(n_params: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A float32 model delta of exactly ``n_params`` elements: Student-t (3 dof) values, per-tensor scales."""
    rng = np.random.default_rng(seed)
    delta: dict[str, np.ndarray] = {}
    left = n_params
    for i, shape in enumerate(_layer_shapes()):
        if left <= 0:
            break
        size = int(np.prod(shape))
        if size > left:
            shape, size = (left,), left
        scale = np.float32(1e-3 * rng.lognormal(0.0, 1.0))
        values = rng.standard_t(3.0, size).astype(np.float32)
        values *= scale
        delta[f"layer{i:04d}.{'weight' if len(shape) > 1 else 'bias'}"] = values.reshape(shape)
        left -= size
    return delta


def load_delta(path: str) -> dict[str, np.ndarray]:
    """A real delta from a frame file (``codec.save_tensors``) or an ``.npz`` (no pickle)."""
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as data:
            return {k: np.asarray(data[k]) for k in data.files}
    return codec.load_tensors(path)


# --------------------------------------------------------------------------------------------
# Measurements.


def _best_seconds(run: Callable[[], T], repeat: int) -> tuple[float, T]:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - start)
    return best, result


def measure_zstd(delta: Mapping[str, np.ndarray], repeat: int) -> dict[str, float]:
    """Baseline: zstandard level 1 on each tensor's dense bytes (compress, then decompress)."""
    compressor = zstandard.ZstdCompressor(level=1)
    decompressor = zstandard.ZstdDecompressor()
    arrays = [np.ascontiguousarray(a) for a in delta.values()]
    dense = sum(a.nbytes for a in arrays)
    t_c, packed = _best_seconds(lambda: [compressor.compress(a.data) for a in arrays], repeat)
    t_d, _ = _best_seconds(lambda: [decompressor.decompress(p) for p in packed], repeat)
    size = sum(len(p) for p in packed)
    return {
        "bytes": size,
        "ratio": dense / size,
        "compress_MBps": dense / t_c / MB,
        "decompress_MBps": dense / t_d / MB,
    }


def measure_config(delta: Mapping[str, np.ndarray], spec: CodecSpec, repeat: int) -> dict[str, float]:
    """Bytes and throughput of one configuration on ``delta`` (dense-equivalent MB/s)."""
    dense = sum(a.size * 4 for a in delta.values())
    t_enc, frames = _best_seconds(lambda: list(codec.encode_tensors(delta, spec)), repeat)
    size = sum(len(f) for f in frames)
    assert max(len(f) for f in frames) <= codec.MAX_FRAME_BYTES

    def decode() -> None:
        for _name, _array in codec.decode_frames(frames):
            pass

    accumulators = {name: np.zeros(a.shape, np.float32) for name, a in delta.items()}
    t_dec, _ = _best_seconds(decode, repeat)
    t_acc, _ = _best_seconds(lambda: codec.accumulate_frames(frames, 0.5, accumulators), repeat)
    return {
        "bytes": size,
        "frames": len(frames),
        "ratio": dense / size,
        "encode_MBps": dense / t_enc / MB,
        "decode_MBps": dense / t_dec / MB,
        "accumulate_MBps": dense / t_acc / MB,
    }


def real_delta(workdir: Path, *, seed: int = 0) -> dict[str, np.ndarray]:
    """Case (a): the demo's Transformer U-Net delta after one local epoch on demo site data.

    Builds the built-in demo configuration's network from its seed, trains it one epoch on the
    demo's site-1 (generated from MNI152 into ``workdir``), and returns ``θ_local − θ_initial``.
    """
    import torch

    from client_agent.data import build_datasets, make_loader
    from client_agent.training import LoopSettings, train_local
    from experiments.simulate import load_simulation_config
    from experiments.simulate import generate_site_data
    from model import DiceCELoss, build_model

    sim, federation, _ = load_simulation_config(None)
    data = generate_site_data(sim, workdir / "data")
    m = federation.model
    torch.manual_seed(seed)
    net = build_model(m.architecture, in_channels=m.in_channels, out_channels=m.out_channels, img_size=m.img_size,
                      **dict(m.options))
    initial = {k: v.detach().clone().numpy() for k, v in net.state_dict().items()}
    site = build_datasets(data.site_dirs[0], spatial_size=m.img_size, num_classes=m.out_channels, seed=seed,
                          augment=False)
    loader = make_loader(site.train, batch_size=federation.training.batch_size, shuffle=True, seed=seed)
    train_local(net, loader, LoopSettings(epochs=1, lr=federation.training.learning_rate),
                device="cpu", loss_fn=DiceCELoss(lambda_dice=federation.training.lambda_dice))
    return {k: v.detach().numpy() - initial[k] for k, v in net.state_dict().items()}


def run_benchmark(
    delta: Mapping[str, np.ndarray], configs: Sequence[Config] = CONFIGS, *, repeat: int = 1
) -> dict[str, Any]:
    """Measure every configuration and the zstd baseline on one delta (the hook for real deltas).

    Args:
        delta: name -> array (float32 expected; other dtypes are encoded as the codec does).
        configs: configurations to run; ``top1_int8`` feeds the summary ratios when present.
        repeat: best-of-``repeat`` timing for each measurement.
    """
    delta = {name: np.ascontiguousarray(a) for name, a in delta.items()}
    params = sum(a.size for a in delta.values())
    baseline = measure_zstd(delta, repeat)
    dense = sum(a.size * 4 for a in delta.values())
    results: dict[str, dict[str, Any]] = {}
    for c in configs:
        try:
            results[c.key] = measure_config(delta, c.spec_for(dense), repeat)
        except codec.CodecError as exc:  # a budget below this delta's frame headers
            results[c.key] = {"error": str(exc)}
    if "top1_int8" in results:
        top1 = results["top1_int8"]
        for r in results.values():
            if "error" in r:
                continue
            # Throughputs are of the same dense bytes, so a time ratio is the inverse MB/s ratio.
            r["encode_vs_top1_int8"] = top1["encode_MBps"] / r["encode_MBps"]
            r["decode_vs_top1_int8"] = top1["decode_MBps"] / r["decode_MBps"]
    report: dict[str, Any] = {
        "params": params,
        "tensors": len(delta),
        "largest_tensor": max(a.size for a in delta.values()),
        "baseline": "zstandard level 1 on dense fp32 bytes, per tensor",
        "zstd1": baseline,
        "configs": results,
    }
    if "top1_int8" in results:
        top1 = results["top1_int8"]
        report["ratio_top1_int8"] = top1["ratio"]
        report["encode_vs_zstd"] = top1["encode_MBps"] / baseline["compress_MBps"]
        report["decode_vs_zstd"] = top1["decode_MBps"] / baseline["decompress_MBps"]
        report["accumulate_vs_zstd"] = top1["accumulate_MBps"] / baseline["decompress_MBps"]
    return report


def format_report(report: Mapping[str, Any], configs: Sequence[Config] = CONFIGS) -> str:
    """The human-readable table of a :func:`run_benchmark` report."""
    base = report["zstd1"]
    results = report["configs"]
    lines = [
        f"delta: {report['params']:,} float32 parameters in {report['tensors']} tensors "
        f"(largest {report['largest_tensor']:,}); dense = {report['params'] * 4 / MB:,.1f} MB",
        f"baseline {report['baseline']}: ratio {base['ratio']:.3f}x, "
        f"compress {base['compress_MBps']:,.0f} MB/s, decompress {base['decompress_MBps']:,.0f} MB/s",
        f"{'configuration':32} {'bytes':>14} {'ratio':>9} {'enc MB/s':>9} {'dec MB/s':>9} "
        f"{'acc MB/s':>9} {'enc/zstd':>8} {'dec/zstd':>8} {'enc/top1':>8} {'dec/top1':>8}",
    ]
    for c in configs:
        r = results.get(c.key)
        if r is None:
            continue
        if "error" in r:
            lines.append(f"{c.label:32} refused: {r['error'][:120]}")
            continue
        lines.append(
            f"{c.label:32} {r['bytes']:>14,} {r['ratio']:>8.1f}x {r['encode_MBps']:>9,.0f} "
            f"{r['decode_MBps']:>9,.0f} {r['accumulate_MBps']:>9,.0f} "
            f"{r['encode_MBps'] / base['compress_MBps']:>8.2f} {r['decode_MBps'] / base['decompress_MBps']:>8.2f}"
            + (f" {r['encode_vs_top1_int8']:>8.2f} {r['decode_vs_top1_int8']:>8.2f}" if "encode_vs_top1_int8" in r else "")
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=lambda s: int(s.replace("_", "")), default=100_000_000,
                        help="parameters of the synthetic delta (default 100_000_000)")
    parser.add_argument("--delta", help="benchmark this real delta as case (a): a frame file or an .npz")
    parser.add_argument("--case", choices=["a", "b", "both"], default="both",
                        help="a: the demo Transformer U-Net's delta after one local epoch; b: the synthetic "
                        "--params delta (default: both; the JSON summary keys are case (b)'s)")
    parser.add_argument("--workdir", default="runs/codec-bench", help="where case (a) generates its demo data")
    parser.add_argument("--configs", nargs="+", choices=[c.key for c in CONFIGS], help="subset of configurations")
    parser.add_argument("--repeat", type=int, default=1, help="best-of-N timings (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object on the last line")
    args = parser.parse_args(argv)

    configs = [c for c in CONFIGS if not args.configs or c.key in args.configs]
    summary: dict[str, Any] = {}
    if args.case in ("a", "both"):
        delta = load_delta(args.delta) if args.delta else real_delta(Path(args.workdir), seed=args.seed)
        real = run_benchmark(delta, configs, repeat=max(1, args.repeat))
        print("case (a): a real update (demo Transformer U-Net, one local epoch)")
        print(format_report(real, configs) + "\n")
        summary["real"] = real
    if args.case in ("b", "both"):
        report = run_benchmark(synthetic_delta(args.params, args.seed), configs, repeat=max(1, args.repeat))
        print(f"case (b): a synthetic {args.params:,}-parameter delta")
        print(format_report(report, configs))
        summary.update(report)
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
