"""Lossless model deltas: round r's global model as a difference from round h's.

A site that holds round h's global model byte-exact downloads round r's as a delta from it.
The delta is lossless, so the site then holds round r's model byte-exact too, and the next
delta applies to it in turn.

Per tensor (old and new share name, shape and dtype)::

    x = bytes(old) XOR bytes(new)          # element by element; 0 where the value did not change
    body = dense:  the byte planes of x    # plane j = byte j of every element
         | sparse: the changed positions (as gaps, in byte planes) and x at those positions
    payload = head + zstd(body)            # whichever body compresses smaller

XOR of the bit patterns makes unchanged values zero whatever they hold (NaN payloads, -0.0,
Inf are bit patterns like any other), and splitting bytes into planes puts the sign/exponent
bytes, which change rarely, into long runs of zeros. A sparse aggregation (top-k updates)
changes a few percent of the values per round, where the sparse body wins; a dense one changes
nearly all, where the dense body wins.

Payload head (little-endian, 20 bytes)::

    u8  version (1)
    u8  body: 0 dense, 1 sparse
    u8  1 when the body is zstd-compressed, 0 when stored as is
    u8  reserved, zero
    u32 crc32 of the base tensor's bytes: a delta applied to another base is refused
    u32 crc32 of the resulting tensor's bytes: checks the reconstruction
    u64 size of the (decompressed) body

Sparse body: ``u8 gap width (4 or 8), 7 zero bytes, u64 k``, then the byte planes of the k
gaps between changed positions (position = running sum of gaps - 1), then the byte planes of
x at those positions.

Each payload travels as a dense lossless ``uint8`` tensor of the codec's frame stream, named
like the model tensor it changes, in model order: the frames, their checksums, sizes and
bounds are the codec's own (``codec.frame``); nothing here depends on the frame header's
encoding. Memory: one tensor of each model and its payload at a time.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any, Iterable, Iterator

import numpy as np
import zstandard

from .errors import CodecError
from .frame import check_name
from .spec import CodecSpec
from .stages import zstd_decompress
from .stream import (
    DEFAULT_MAX_TENSOR_BYTES,
    NamedTensors,
    as_array,
    decode_frames,
    encode_tensors,
)

__all__ = ["DEFAULT_DELTA_ZSTD_LEVEL", "DELTA_VERSION", "apply_model_delta", "encode_model_delta"]

DELTA_VERSION = 1
DEFAULT_DELTA_ZSTD_LEVEL = 3
"""zstd level of the payloads. Higher levels gained under 1% on model deltas (1M float32 values,
0.1-100% of them changed) for up to 4x the time, so the default is zstd's own."""

_HEAD = struct.Struct("<BBBBIIQ")
_SPARSE_HEAD = struct.Struct("<B7sQ")
_DENSE, _SPARSE = 0, 1
_BODIES = {_DENSE: "dense", _SPARSE: "sparse"}
_U8 = np.dtype(np.uint8)
# The payloads are compressed here (where the dense and sparse bodies are compared), so the
# frames carry them as they are.
_FRAME_SPEC = CodecSpec(zstd_level=0)


def _items(tensors: NamedTensors) -> Iterable[tuple[str, Any]]:
    return tensors.items() if hasattr(tensors, "items") else tensors  # type: ignore[union-attr]


def _bytes_of(array: np.ndarray) -> np.ndarray:
    """The tensor's bytes as ``(count, itemsize)`` uint8 rows (a view, no copy)."""
    return array.reshape(-1).view(_U8).reshape(array.size, array.dtype.itemsize)


def _planes(rows: np.ndarray) -> bytes:
    """``(count, width)`` bytes -> plane 0 (byte 0 of every row), plane 1, …"""
    return np.ascontiguousarray(rows.T).tobytes()


def _unplanes(data: bytes | memoryview, count: int, width: int) -> np.ndarray:
    """Inverse of :func:`_planes`: ``(count, width)`` uint8 rows."""
    return np.frombuffer(data, dtype=_U8, count=count * width).reshape(width, count).T


def _crc(array: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(array).reshape(-1).view(_U8).data)


# --------------------------------------------------------------------------------------------
# Encoding.


def _dense_body(xor: np.ndarray) -> bytes:
    return _planes(xor)


def _sparse_body(xor: np.ndarray, changed: np.ndarray) -> bytes:
    count = xor.shape[0]
    width = 4 if count < (1 << 32) else 8
    gaps = np.diff(changed, prepend=-1).astype(f"<u{width}")
    head = _SPARSE_HEAD.pack(width, b"\0" * 7, changed.size)
    return b"".join((head, _planes(gaps.view(_U8).reshape(-1, width)), _planes(xor[changed])))


def _pack(body: bytes, compressor: zstandard.ZstdCompressor | None) -> tuple[bytes, bool]:
    if compressor is not None and body:
        packed = compressor.compress(body)
        if len(packed) < len(body):
            return packed, True
    return body, False


def _tensor_payload(
    name: str, old: np.ndarray, new: np.ndarray, compressor: zstandard.ZstdCompressor | None
) -> np.ndarray:
    """The delta payload of one tensor (see the module docstring), as a 1-D uint8 array."""
    old_rows, new_rows = _bytes_of(old), _bytes_of(new)
    xor = np.bitwise_xor(old_rows, new_rows)
    changed = np.flatnonzero(xor.any(axis=1))
    itemsize = old.dtype.itemsize
    sparse_size = _SPARSE_HEAD.size + changed.size * (itemsize + (4 if old.size < (1 << 32) else 8))
    candidates = []
    if sparse_size < old.size * itemsize:
        candidates.append((_SPARSE, _sparse_body(xor, changed)))
    # Dense is only worth trying where many values changed: with a few percent changed the
    # sparse body is smaller before and after compression.
    if not candidates or changed.size * 4 > old.size:
        candidates.append((_DENSE, _dense_body(xor)))
    best: tuple[int, bytes, bool, int] | None = None
    for mode, body in candidates:
        packed, compressed = _pack(body, compressor)
        if best is None or len(packed) < len(best[1]):
            best = (mode, packed, compressed, len(body))
    assert best is not None
    mode, packed, compressed, raw_size = best
    head = _HEAD.pack(DELTA_VERSION, mode, int(compressed), 0, _crc(old), _crc(new), raw_size)
    return np.frombuffer(head + packed, dtype=_U8)


def _check_pair(index: int, old_name: str, old: np.ndarray, new_name: str, new: np.ndarray) -> None:
    if old_name != new_name:
        raise CodecError(
            f"tensor {index} is {old_name!r} in the base model but {new_name!r} in the new one; a delta "
            "needs both models to hold the same tensors in the same order"
        )
    if old.shape != new.shape or old.dtype != new.dtype:
        raise CodecError(
            f"tensor {new_name!r} is {old.shape} {old.dtype.name} in the base model but {new.shape} "
            f"{new.dtype.name} in the new one; a delta needs equal shapes and dtypes"
        )


def encode_model_delta(
    old_tensors: NamedTensors, new_tensors: NamedTensors, *, zstd_level: int = DEFAULT_DELTA_ZSTD_LEVEL
) -> Iterator[bytes]:
    """Encode ``new_tensors`` as a lossless delta from ``old_tensors``: a stream of codec frames.

    Args:
        old_tensors: the base model, ``(name, array)`` pairs or a mapping (numpy arrays or torch
            tensors of any dtype the codec carries).
        new_tensors: the model to send, with the same names, shapes and dtypes in the same order.
            Both are read once, in lockstep, so each may be a one-shot iterator (e.g.
            :func:`codec.decode_frames` of a model file).
        zstd_level: zstd level of the payloads, 1..22, or 0 to store them uncompressed.

    Yields:
        frames (each at most :data:`codec.MAX_FRAME_BYTES`), one tensor's frames after another.

    Raises:
        CodecError: the models differ in tensor names, order, count, shapes or dtypes, or a name
            appears twice.
    """
    if not 0 <= zstd_level <= 22:
        raise CodecError(f"zstd_level must be in [0, 22] (0 = no zstd), got {zstd_level}")
    compressor = (
        zstandard.ZstdCompressor(level=zstd_level, write_content_size=True, write_checksum=False)
        if zstd_level
        else None
    )
    old_iter = iter(_items(old_tensors))
    seen: set[str] = set()
    index = -1
    for index, (new_name, new_value) in enumerate(_items(new_tensors)):
        new_name = check_name(new_name)
        pair = next(old_iter, None)
        if pair is None:
            raise CodecError(f"the new model has tensor {new_name!r} beyond the base model's {index} tensors")
        old_name, old_value = pair
        old, new = as_array(old_value, old_name), as_array(new_value, new_name)
        _check_pair(index, old_name, old, new_name, new)
        if new_name in seen:
            raise CodecError(f"tensor {new_name!r} appears twice in the new model")
        seen.add(new_name)
        payload = _tensor_payload(new_name, old, new, compressor)
        yield from encode_tensors([(new_name, payload)], _FRAME_SPEC)
    extra = next(old_iter, None)
    if extra is not None:
        raise CodecError(f"the base model has tensor {extra[0]!r} beyond the new model's {index + 1} tensors")


# --------------------------------------------------------------------------------------------
# Decoding.


def _max_body(mode: int, count: int, itemsize: int) -> int:
    """The largest body a tensor of ``count`` elements can have (bounds decompression)."""
    if mode == _DENSE:
        return count * itemsize
    return _SPARSE_HEAD.size + count * (itemsize + 8)


def _apply_sparse(rows: np.ndarray, body: memoryview, what: str) -> None:
    """XOR a sparse body into ``(count, itemsize)`` rows, in place."""
    count, itemsize = rows.shape
    if len(body) < _SPARSE_HEAD.size:
        raise CodecError(f"{what}: sparse delta body of {len(body)} bytes is truncated")
    width, reserved, k = _SPARSE_HEAD.unpack_from(body)
    if width not in (4, 8) or reserved != b"\0" * 7:
        raise CodecError(f"{what}: sparse delta body has gap width {width} (4 or 8) or non-zero reserved bytes")
    if k > count or len(body) != _SPARSE_HEAD.size + k * (width + itemsize):
        raise CodecError(
            f"{what}: sparse delta body of {len(body)} bytes does not hold {k} changes of a {count}-element tensor"
        )
    if k == 0:
        return
    cut = _SPARSE_HEAD.size + k * width
    gaps = _unplanes(body[_SPARSE_HEAD.size:cut], k, width).copy().view(f"<u{width}").reshape(-1)
    # A wrapped sum is smaller than its predecessor, so "strictly increasing" also rules out overflow.
    positions = np.cumsum(gaps, dtype=np.uint64) - np.uint64(1)
    if int(gaps.min()) < 1 or int(positions[-1]) >= count or (k > 1 and not bool(np.all(positions[1:] > positions[:-1]))):
        raise CodecError(f"{what}: sparse delta positions are not increasing within [0, {count})")
    rows[positions.astype(np.int64)] ^= _unplanes(body[cut:], k, itemsize)


def _apply_tensor(name: str, old: np.ndarray, payload: np.ndarray) -> np.ndarray:
    """Reconstruct the new tensor from the base tensor and its delta payload."""
    what = f"tensor {name!r}"
    if payload.dtype != _U8 or payload.ndim != 1:
        raise CodecError(f"{what}: a delta payload is a 1-D uint8 tensor, got {payload.shape} {payload.dtype}")
    data = np.ascontiguousarray(payload).data
    if len(data) < _HEAD.size:
        raise CodecError(f"{what}: delta payload of {len(data)} bytes is truncated (its head is {_HEAD.size})")
    version, mode, compressed, reserved, crc_old, crc_new, size = _HEAD.unpack_from(data)
    if version != DELTA_VERSION:
        raise CodecError(f"{what}: delta format version {version} is not supported (this codec reads {DELTA_VERSION})")
    if mode not in _BODIES or compressed not in (0, 1) or reserved != 0:
        raise CodecError(f"{what}: unknown delta body kind {mode} / compression flag {compressed}")
    if _crc(old) != crc_old:
        raise CodecError(
            f"{what}: the delta was made from another base model (checksum of the base tensor differs); "
            "the model held locally is not the round's the delta starts from: download the full model"
        )
    limit = _max_body(mode, old.size, old.dtype.itemsize)
    if size > limit:
        raise CodecError(f"{what}: delta body claims {size} bytes, at most {limit} for this tensor")
    stored = data[_HEAD.size:]
    body: bytes | memoryview = zstd_decompress(zstandard.ZstdDecompressor(), stored, size, f"{what}: delta body") if compressed else stored
    if len(body) != size:
        raise CodecError(f"{what}: delta body of {len(body)} bytes, its head says {size}")
    new = np.array(old, copy=True, order="C")
    rows = _bytes_of(new)
    if mode == _DENSE:
        if size != old.size * old.dtype.itemsize:
            raise CodecError(f"{what}: dense delta body of {size} bytes, the tensor has {old.nbytes}")
        rows ^= _unplanes(body, old.size, old.dtype.itemsize)
    else:
        _apply_sparse(rows, memoryview(body), what)
    if _crc(new) != crc_new:
        raise CodecError(f"{what}: the tensor rebuilt from the delta fails its checksum (corrupt delta)")
    return new


def apply_model_delta(
    old_tensors: NamedTensors, frames: Iterable[bytes], *, max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES
) -> Iterator[tuple[str, np.ndarray]]:
    """Rebuild the new model from the base model and the frames of :func:`encode_model_delta`.

    Args:
        old_tensors: the base model the delta was made from, in the same order (pairs or a
            mapping; a one-shot iterator such as :func:`codec.decode_frames` of a file is fine).
        frames: the delta's frames, as received.
        max_tensor_bytes: largest payload accepted per tensor (checked before allocating it).

    Yields:
        ``(name, array)`` of the new model, one tensor at a time, bit-exact (same dtype and shape
        as the base tensor; NaN payloads and signed zeros included).

    Raises:
        CodecError: a corrupt or truncated frame stream, a payload that is not a delta, a base
            model that is not the one the delta was made from (names, order, or contents), or a
            reconstruction that fails its checksum. Tensors yielded before the error are not
            to be trusted on their own: use the model only when the whole stream was applied.
    """
    old_iter = iter(_items(old_tensors))
    index = -1
    for index, (name, payload) in enumerate(decode_frames(frames, max_tensor_bytes=max_tensor_bytes)):
        pair = next(old_iter, None)
        if pair is None:
            raise CodecError(f"the delta changes tensor {name!r}, beyond the base model's {index} tensors")
        old_name, old_value = pair
        if old_name != name:
            raise CodecError(
                f"delta tensor {index} is {name!r} but the base model's is {old_name!r}: the delta was made "
                "from another model"
            )
        yield name, _apply_tensor(name, as_array(old_value, old_name), payload)
    extra = next(old_iter, None)
    if extra is not None:
        raise CodecError(
            f"the delta ends after {index + 1} tensors, before the base model's {extra[0]!r} (truncated stream?)"
        )
