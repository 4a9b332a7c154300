"""FedSegNet tensor codec: sparsify -> quantize -> zstd frames, and the exact inverse.

Sparsify by a fixed fraction (top-k per tensor or over the update) or to fit a byte budget
(``CodecSpec(byte_budget=...)``); quantize to fp16, int8, int4 or sign (one bit per value:
Sparse Ternary Compression with top-k, error-feedback signSGD dense).

Pure numpy + zstandard (no torch, no protobuf): the aggregator decodes and accumulates updates
with it, the client agent encodes them. See ``codec/frame.py`` for the wire format.

Typical use::

    frames, residual = encode_update(deltas, spec, residual)      # client, error feedback
    for frame in frames: send(frame)                               # each frame <= MAX_FRAME_BYTES
    accumulate_frames(stored_frames, weight, into=accumulators)    # aggregator, no densifying
    model = dict(decode_frames(frames))                            # anyone
"""

from .container import (
    FILE_MAGIC,
    DigestingFrames,
    atomic_write_bytes,
    atomic_write_text,
    atomic_writer,
    file_digest,
    frames_digest,
    fsync_dir,
    load_tensors,
    read_frames,
    remove_temporaries,
    save_tensors,
    write_frames,
)
from .delta import apply_model_delta, encode_model_delta
from .errors import CodecError
from .frame import MAX_FRAME_BYTES, PAYLOAD_BUDGET, SUPPORTED_DTYPES, FrameHeader, read_header
from .spec import LOSSLESS, CodecSpec
from .stream import (
    DEFAULT_MAX_TENSOR_BYTES,
    DecodedPart,
    EncodedUpdate,
    TensorSummary,
    accumulate_frames,
    decode_frames,
    encode_tensors,
    encode_update,
    iter_parts,
    verify_frames,
)

__all__ = [
    "MAX_FRAME_BYTES",
    "PAYLOAD_BUDGET",
    "DEFAULT_MAX_TENSOR_BYTES",
    "SUPPORTED_DTYPES",
    "FILE_MAGIC",
    "CodecError",
    "CodecSpec",
    "LOSSLESS",
    "FrameHeader",
    "DecodedPart",
    "EncodedUpdate",
    "TensorSummary",
    "encode_tensors",
    "decode_frames",
    "encode_update",
    "read_header",
    "iter_parts",
    "accumulate_frames",
    "verify_frames",
    "write_frames",
    "read_frames",
    "save_tensors",
    "load_tensors",
    "atomic_writer",
    "atomic_write_bytes",
    "atomic_write_text",
    "fsync_dir",
    "remove_temporaries",
    "frames_digest",
    "file_digest",
    "DigestingFrames",
    "encode_model_delta",
    "apply_model_delta",
]
