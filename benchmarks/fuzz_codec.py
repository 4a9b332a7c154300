"""Coverage-guided fuzzing (atheris + libFuzzer) of what the aggregator reads from the network.

Two targets, each fed a frame file (the container ``codec.write_frames`` writes, so the
container reader is fuzzed too):

* ``codec`` (default): ``codec.read_frames`` + ``codec.decode_frames``; only ``CodecError`` may
  escape.
* ``spool``: ``aggregator_service.rounds.spool_update`` on a fresh store whose model matches the
  seed corpus; only ``AggregatorError`` may escape, and no spool file may stay behind.

Any other exception is a finding: libFuzzer stops and writes the input as ``crash-*``.
``tests/codec/test_fuzz.py`` runs a fixed hypothesis budget of the same properties in CI; this is for
long local runs::

    .venv/bin/pip install atheris
    .venv/bin/python benchmarks/fuzz_codec.py --make-corpus fuzz-corpus
    .venv/bin/python benchmarks/fuzz_codec.py fuzz-corpus -max_total_time=600
    FUZZ_TARGET=spool .venv/bin/python benchmarks/fuzz_codec.py fuzz-corpus -max_total_time=600
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

try:
    import atheris
except ImportError:  # pragma: no cover - a local tool, not a dependency
    atheris = None

if atheris is not None and "--make-corpus" not in sys.argv:
    with atheris.instrument_imports():
        import codec
        from aggregator_service import rounds
        from aggregator_service.config import FederationConfig
        from aggregator_service.errors import AggregatorError
        from aggregator_service.store import Store
else:
    import codec
    from aggregator_service import rounds
    from aggregator_service.config import FederationConfig
    from aggregator_service.errors import AggregatorError
    from aggregator_service.store import Store

MODEL: dict[str, np.ndarray] = {
    "w": np.linspace(-1, 1, 96, dtype=np.float32).reshape(8, 12),
    "b": np.zeros(12, dtype=np.float32),
    "steps": np.arange(3, dtype=np.int64),
}
SPECS = [
    codec.LOSSLESS,
    codec.CodecSpec(top_k_fraction=0.1, quantization="int8", block_size=16),
    codec.CodecSpec(top_k_fraction=0.5, quantization="int4", block_size=8, zstd_level=0),
    codec.CodecSpec(quantization="fp16", zstd_level=0),
    codec.CodecSpec(top_k_fraction=0.9, zstd_level=0),
]
CONFIG = FederationConfig(federation_id="fuzz", rounds=1, min_clients=1, max_clients=2, sites=("a", "b"))


def make_corpus(directory: Path) -> None:
    """Valid frame files (one per codec spec, model and a delta): the fuzzer's starting points."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    delta = {k: (v + rng.normal(size=v.shape)).astype(v.dtype) if v.dtype.kind == "f" else v for k, v in MODEL.items()}
    for i, spec in enumerate(SPECS):
        for kind, tensors in (("model", MODEL), ("delta", delta)):
            buffer = io.BytesIO()
            codec.write_frames(buffer, codec.encode_tensors(list(tensors.items()), spec))
            (directory / f"{kind}-{i}.frames").write_bytes(buffer.getvalue())


def fuzz_codec(data: bytes) -> None:
    try:
        for _name, _array in codec.decode_frames(codec.read_frames(io.BytesIO(data)), max_tensor_bytes=1 << 22):
            pass
    except codec.CodecError:
        pass


_STORE: Store | None = None


def _store() -> Store:
    global _STORE
    if _STORE is None:
        root = Path(tempfile.mkdtemp(prefix="fedseg-fuzz-"))
        codec.save_tensors(root / "initial.frames", list(MODEL.items()))
        _STORE = Store(root / "store")
        rounds.initialize(_STORE, CONFIG, root / "initial.frames", now=0.0)
    return _STORE


def fuzz_spool(data: bytes) -> None:
    store = _store()
    try:
        frames = list(codec.read_frames(io.BytesIO(data)))
    except codec.CodecError:
        return
    digest = codec.frames_digest(frames)
    parts: list[bytes | rounds.UpdateCommit] = [*frames, rounds.UpdateCommit(len(frames), digest)]
    try:
        spool, _record = rounds.spool_update(store, CONFIG, rounds.UpdateHeader("a", 1, 10), parts)
    except AggregatorError:
        left = list((store.root / "spool").iterdir())
        if left:
            raise AssertionError(f"a refused upload left {left} behind") from None
        return
    spool.unlink()


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--make-corpus":
        make_corpus(Path(sys.argv[2]))
        print(f"wrote the seed corpus to {sys.argv[2]}")
        return
    if atheris is None:
        sys.exit("atheris is not installed: .venv/bin/pip install atheris (a libFuzzer build of it)")
    target = {"codec": fuzz_codec, "spool": fuzz_spool}[os.environ.get("FUZZ_TARGET", "codec")]
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
