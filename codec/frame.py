"""Frame format: one self-describing, checksummed piece of one tensor, at most 1 MiB.

Layout (all integers little-endian)::

    offset  size  field
    0       4     magic b"FSNF"
    4       1     format version (1)
    5       3     reserved, zero
    8       4     header length H (u32), at most MAX_HEADER_BYTES
    12      4     crc32 of the header bytes (u32)
    16      H     header: UTF-8 JSON object (below)
    16+H    ...   payload: the raw payload, or its zstd frame when the chain ends in "zstd"

Header keys (all required, no others)::

    name   tensor name (1..1024 UTF-8 bytes)
    shape  list of dimensions of the whole tensor (row-major, numpy order)
    dtype  numpy dtype string of the whole tensor, little-endian ("<f4", "|b1", "<i8", ...)
    count  elements of the whole tensor (= product of shape)
    part   0-based index of this frame among the tensor's frames
    parts  number of frames of the tensor
    start  first flat (row-major) position covered by this part
    stop   one past the last position covered; parts tile [0, count) in order
    chain  stages applied, e.g. [{"stage": "topk", "k": 9, "index": "varint", "index_bytes": 9},
           {"stage": "int8", "block": 256}, {"stage": "zstd"}] (see codec.stages)
    size   bytes of the raw payload (after zstd decompression); at most PAYLOAD_BUDGET
    crc    crc32 of the raw payload

No pickle, no code: an unknown key, stage or dtype is refused.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import CodecError
from .stages import Chain, parse_chain

__all__ = [
    "MAGIC",
    "FORMAT_VERSION",
    "MAX_FRAME_BYTES",
    "MAX_HEADER_BYTES",
    "MAX_NAME_BYTES",
    "MAX_NDIM",
    "PAYLOAD_BUDGET",
    "SUPPORTED_DTYPES",
    "FrameHeader",
    "pack_frame",
    "unpack_frame",
    "read_header",
    "check_name",
    "wire_dtype",
]

MAGIC = b"FSNF"
FORMAT_VERSION = 1
MAX_FRAME_BYTES = 1 << 20
"""Largest frame, header included: one frame travels in one gRPC message."""
MAX_HEADER_BYTES = 8192
MAX_NAME_BYTES = 1024
MAX_NDIM = 64
_PREFIX = struct.Struct("<4sB3sII")
PAYLOAD_BUDGET = MAX_FRAME_BYTES - _PREFIX.size - MAX_HEADER_BYTES
"""Largest raw (uncompressed) payload of one frame; also the decompression limit per frame."""

SUPPORTED_DTYPES = frozenset(
    np.dtype(t).newbyteorder("<").str
    for t in (
        np.bool_, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64,
        np.float16, np.float32, np.float64, np.complex64, np.complex128,
    )
)
_KEYS = ("name", "shape", "dtype", "count", "part", "parts", "start", "stop", "chain", "size", "crc")


def wire_dtype(dtype: np.dtype, name: str) -> np.dtype:
    """The little-endian dtype a tensor travels as, or :class:`CodecError` if it cannot travel."""
    wire = dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype
    if wire.str not in SUPPORTED_DTYPES:
        raise CodecError(
            f"tensor {name!r}: dtype {dtype} cannot be encoded (supported: bool, (u)int8-64, "
            "float16/32/64, complex64/128)"
        )
    return wire


def check_name(name: Any) -> str:
    """A tensor name that fits a header, or :class:`CodecError`."""
    if not isinstance(name, str) or not name:
        raise CodecError(f"tensor name must be a non-empty str, got {name!r:.100}")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise CodecError(f"tensor name {name!r:.100} is not valid UTF-8 text") from None
    if size > MAX_NAME_BYTES:
        raise CodecError(f"tensor name {name[:60]!r}... is {size} UTF-8 bytes, at most {MAX_NAME_BYTES}")
    return name


@dataclass(frozen=True)
class FrameHeader:
    """A frame's decoded header. ``shape``/``dtype``/``count`` describe the whole tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    count: int
    part: int
    parts: int
    start: int
    stop: int
    chain: Chain
    size: int
    crc: int
    frame_bytes: int = 0

    @property
    def encoding(self) -> str:
        """Stage names joined by "+", e.g. ``"dense+raw+zstd"`` or ``"topk+int8"``."""
        return self.chain.encoding

    @property
    def compressed(self) -> bool:
        """Whether the payload is a zstd frame."""
        return self.chain.zstd

    @property
    def span(self) -> int:
        """Positions of the tensor this part covers."""
        return self.stop - self.start

    @property
    def sent(self) -> int:
        """Values this part carries (all of its span when dense)."""
        return self.chain.value_count(self.span)

    @property
    def what(self) -> str:
        """``"tensor 'x' part 1/3"``: the prefix of every error about this frame."""
        return f"tensor {self.name!r} part {self.part + 1}/{self.parts}"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype.str,
            "count": self.count,
            "part": self.part,
            "parts": self.parts,
            "start": self.start,
            "stop": self.stop,
            "chain": self.chain.describe(),
            "size": self.size,
            "crc": self.crc,
        }


def pack_frame(header: FrameHeader | dict[str, Any], payload: bytes | memoryview) -> bytes:
    """Serialise a header and its (possibly zstd-compressed) payload into one frame."""
    fields = header.to_json() if isinstance(header, FrameHeader) else header
    head = json.dumps(fields, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(head) > MAX_HEADER_BYTES:
        raise CodecError(f"tensor {fields.get('name')!r}: frame header of {len(head)} bytes exceeds {MAX_HEADER_BYTES}")
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, b"\0\0\0", len(head), zlib.crc32(head))
    frame = b"".join((prefix, head, payload))
    if len(frame) > MAX_FRAME_BYTES:
        raise CodecError(f"tensor {fields.get('name')!r}: frame of {len(frame)} bytes exceeds {MAX_FRAME_BYTES}")
    return frame


def unpack_frame(frame: Any) -> tuple[FrameHeader, memoryview]:
    """Validate a frame's prefix and header; return the header and a view of the stored payload.

    The payload itself is not checked here (see :func:`codec.stream.decode_part`).
    """
    if not isinstance(frame, (bytes, bytearray, memoryview)):
        raise CodecError(f"a frame must be bytes, got {type(frame).__name__}")
    try:
        view = memoryview(frame).cast("B")
    except TypeError as exc:  # a non-contiguous or multi-dimensional view
        raise CodecError(f"a frame must be a contiguous byte buffer ({exc})") from None
    if len(view) > MAX_FRAME_BYTES:
        raise CodecError(f"frame of {len(view)} bytes exceeds the limit of {MAX_FRAME_BYTES}")
    if len(view) < _PREFIX.size:
        raise CodecError(f"frame of {len(view)} bytes is truncated (a frame starts with {_PREFIX.size} bytes)")
    magic, version, reserved, head_len, head_crc = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise CodecError(f"not a FedSegNet codec frame (magic {bytes(magic)!r}, expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise CodecError(f"unsupported frame format version {version} (this codec reads {FORMAT_VERSION})")
    if reserved != b"\0\0\0":
        raise CodecError("frame prefix has non-zero reserved bytes")
    if head_len > MAX_HEADER_BYTES:
        raise CodecError(f"frame header of {head_len} bytes exceeds {MAX_HEADER_BYTES}")
    end = _PREFIX.size + head_len
    if end > len(view):
        raise CodecError(f"frame is truncated: header of {head_len} bytes, frame of {len(view)}")
    head = view[_PREFIX.size:end]
    if zlib.crc32(head) != head_crc:
        raise CodecError("frame header checksum mismatch (corrupted frame)")
    try:
        fields = json.loads(bytes(head).decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise CodecError(f"frame header is not valid JSON ({exc})") from None
    header = _header_from_fields(fields, len(view))
    payload = view[end:]
    if not header.compressed and len(payload) != header.size:
        raise CodecError(f"{header.what}: payload of {len(payload)} bytes, header says {header.size}")
    if header.compressed and len(payload) == 0:
        raise CodecError(f"{header.what}: empty zstd payload")
    return header, payload


def read_header(frame: bytes | bytearray | memoryview) -> FrameHeader:
    """The validated header of a frame, without decoding its payload (cheap: for spooling checks)."""
    return unpack_frame(frame)[0]


def _int_field(fields: dict[str, Any], key: str, low: int, high: int, what: str) -> int:
    value = fields[key]
    if type(value) is not int or not low <= value <= high:
        raise CodecError(f"{what}: header field {key!r} must be an integer in [{low}, {high}], got {value!r:.100}")
    return value


def _header_from_fields(fields: Any, frame_bytes: int) -> FrameHeader:
    if not isinstance(fields, dict):
        raise CodecError(f"frame header must be a JSON object, got {type(fields).__name__}")
    missing = [k for k in _KEYS if k not in fields]
    extra = sorted(set(fields) - set(_KEYS))
    name = fields.get("name")
    what = f"tensor {name!r:.200}" if isinstance(name, str) else "frame"
    if missing or extra:
        raise CodecError(f"{what}: frame header is missing {missing} / has unknown keys {extra}")
    try:
        name = check_name(name)
    except CodecError as exc:
        raise CodecError(f"frame header: {exc}") from None
    what = f"tensor {name!r}"
    shape = fields["shape"]
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_NDIM
        or not all(type(d) is int and 0 <= d < (1 << 63) for d in shape)
    ):
        raise CodecError(f"{what}: header shape must be a list of at most {MAX_NDIM} non-negative ints, got {shape!r:.200}")
    dtype_str = fields["dtype"]
    if not isinstance(dtype_str, str) or dtype_str not in SUPPORTED_DTYPES:
        raise CodecError(f"{what}: unsupported dtype {dtype_str!r:.50} (supported: {sorted(SUPPORTED_DTYPES)})")
    dtype = np.dtype(dtype_str)
    count = math.prod(shape)
    if _int_field(fields, "count", 0, 1 << 63, what) != count:
        raise CodecError(f"{what}: header count {fields['count']} does not match shape {shape} ({count} elements)")
    parts = _int_field(fields, "parts", 1, 1 << 40, what)
    part = _int_field(fields, "part", 0, parts - 1, what)
    what = f"tensor {name!r} part {part + 1}/{parts}"
    start = _int_field(fields, "start", 0, count, what)
    stop = _int_field(fields, "stop", start, count, what)
    size = _int_field(fields, "size", 0, PAYLOAD_BUDGET, what)
    crc = _int_field(fields, "crc", 0, 0xFFFFFFFF, what)
    chain = parse_chain(fields["chain"], dtype, stop - start, what)
    expected = chain.selection.index_bytes + chain.values.encoded_size(chain.value_count(stop - start))
    if size != expected:
        raise CodecError(f"{what}: payload size {size} does not match its chain ({chain.encoding}: {expected} bytes)")
    return FrameHeader(
        name=name,
        shape=tuple(shape),
        dtype=dtype,
        count=count,
        part=part,
        parts=parts,
        start=start,
        stop=stop,
        chain=chain,
        size=size,
        crc=crc,
        frame_bytes=frame_bytes,
    )
