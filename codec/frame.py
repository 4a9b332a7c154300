"""Frame format (``FSN2``): one self-describing, checksummed piece of one tensor, at most 1 MiB.

docs/protocol.md specifies the format byte by byte for other implementations; this docstring is
the summary. All fixed-size integers are little-endian; "varint" = unsigned LEB128 in its
shortest form, at most 9 bytes, so < 2**63::

    offset  size  field
    0       4     magic b"FSN2" (the format version is part of the magic)
    4       2     header length H (u16), at most MAX_HEADER_BYTES
    6       4     crc32 of the H header bytes (u32)
    10      H     header (below)
    10+H    ...   payload: the raw payload, or its zstd frame when the byte stage is zstd

    header:
    u8      dtype           DTYPE_CODES: 1 bool, 2 int8, 3 uint8, 4 int16, 5 uint16, 6 int32,
                            7 uint32, 8 int64, 9 uint64, 10 float16, 11 float32, 12 float64,
                            13 complex64, 14 complex128 (the tensor's dtype, little-endian)
    u8      selection       0 dense, 1 topk
    u8      index coding    0 none (dense), 1 varint, 2 bitmap (topk)
    u8      values          0 raw, 1 fp16, 2 int8, 3 int4, 4 sign
    u8      byte stage      0 none, 1 zstd
    u32     crc32 of the raw payload (after zstd decompression)
    varint  name length N (1..1024), then N bytes: the tensor name, UTF-8
    varint  ndim (<= 64), then ndim varints: the whole tensor's shape (row-major, numpy order)
    varint  part, parts     0-based index of this frame among the tensor's frames; their number
    varint  start, stop     the flat (row-major) positions [start, stop) this part covers; the
                            parts of a tensor tile [0, count) in order
    varint  k, index_bytes          (topk only: values sent, bytes of the index section)
    varint  block                   (int8, int4 and sign only: values per float32 scale)

The element count (product of the shape) and the raw payload size (index section + values, see
``codec.stages``) follow from these fields, so they are not stored. The header must be consumed
exactly; an unknown code is refused with the field's name and value. On the demo model's top-1%
int8 update a frame header takes 32 bytes plus the tensor's name on average. No pickle, no code:
an unknown magic, code or dtype is refused.
"""

from __future__ import annotations

import math
import operator
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import CodecError
from .stages import Chain, parse_chain

__all__ = [
    "MAGIC",
    "FORMAT_VERSION",
    "DTYPE_CODES",
    "MAX_FRAME_BYTES",
    "MAX_HEADER_BYTES",
    "MAX_NAME_BYTES",
    "MAX_NDIM",
    "PAYLOAD_BUDGET",
    "SUPPORTED_DTYPES",
    "FrameHeader",
    "encode_header",
    "decode_header",
    "pack_frame",
    "unpack_frame",
    "read_header",
    "check_name",
    "wire_dtype",
]

MAGIC = b"FSN2"
FORMAT_VERSION = 2
MAX_FRAME_BYTES = 1 << 20
"""Largest frame, header included: one frame travels in one gRPC message."""
MAX_HEADER_BYTES = 8192
MAX_NAME_BYTES = 1024
MAX_NDIM = 64
_PREFIX = struct.Struct("<4sHI")
PAYLOAD_BUDGET = MAX_FRAME_BYTES - _PREFIX.size - MAX_HEADER_BYTES
"""Largest raw (uncompressed) payload of one frame; also the decompression limit per frame.

Whatever header a frame carries (at most MAX_HEADER_BYTES), a payload within this budget keeps
the frame within MAX_FRAME_BYTES, so an encoder sizes a tensor's parts before writing headers.
"""

# The wire codes never change meaning; new dtypes or stages get new codes.
DTYPE_CODES: dict[int, str] = {
    1: "|b1", 2: "|i1", 3: "|u1", 4: "<i2", 5: "<u2", 6: "<i4", 7: "<u4", 8: "<i8", 9: "<u8",
    10: "<f2", 11: "<f4", 12: "<f8", 13: "<c8", 14: "<c16",
}
SUPPORTED_DTYPES = frozenset(DTYPE_CODES.values())
_SELECTION_CODES = {0: "dense", 1: "topk"}
_INDEX_CODES = {0: "none", 1: "varint", 2: "bitmap"}
_VALUE_CODES = {0: "raw", 1: "fp16", 2: "int8", 3: "int4", 4: "sign"}
_BYTE_STAGE_CODES = {0: "none", 1: "zstd"}
_BLOCK_STAGES = frozenset({"int8", "int4", "sign"})
_CODES_OF = {
    table_name: {tag: code for code, tag in table.items()}
    for table_name, table in (
        ("dtype", DTYPE_CODES),
        ("selection", _SELECTION_CODES),
        ("index coding", _INDEX_CODES),
        ("values", _VALUE_CODES),
        ("byte stage", _BYTE_STAGE_CODES),
    )
}
_ENUMS = struct.Struct("<BBBBBI")  # dtype, selection, index coding, values, byte stage, payload crc
_VARINT_MAX_BYTES = 9
_KEYS = ("name", "shape", "dtype", "count", "part", "parts", "start", "stop", "chain", "size", "crc")  # to_json()


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
    """A frame's decoded header. ``shape``/``dtype``/``count`` describe the whole tensor.

    ``size`` is the raw payload's byte count and ``count`` the tensor's element count; both follow
    from the other fields (the binary header does not store them). ``frame_bytes`` is the length
    of the frame the header was read from (0 for a header built to be written).
    """

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
        """The header as plain JSON values (:func:`pack_frame` takes them back, e.g. after editing one)."""
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


# --------------------------------------------------------------------------------------------
# Binary header (FSN2): encode_header / decode_header.


def _varint(value: Any, field: str, what: str) -> bytes:
    try:
        number = operator.index(value)
    except TypeError:
        raise CodecError(f"{what}: header field {field!r} must be an integer, got {value!r:.100}") from None
    if not 0 <= number < 1 << (7 * _VARINT_MAX_BYTES):
        raise CodecError(f"{what}: header field {field!r} must be in [0, 2**63) to be written, got {number}")
    out = bytearray()
    while number >= 0x80:
        out.append((number & 0x7F) | 0x80)
        number >>= 7
    out.append(number)
    return bytes(out)


def _code(table: str, tag: str, what: str) -> int:
    code = _CODES_OF[table].get(tag)
    if code is None:
        raise CodecError(f"{what}: {table} {tag!r} has no FSN2 code (known: {sorted(_CODES_OF[table])})")
    return code


def encode_header(header: FrameHeader) -> bytes:
    """The FSN2 prefix and header of a frame carrying ``header`` (the payload follows them).

    Writes what ``header`` holds without judging it (a decoder checks ranges and consistency),
    except what the format cannot say: negative or >= 2**63 integers, an unknown dtype or stage,
    or a ``count``/``size`` other than the one the other fields imply (they are not stored).

    Raises:
        CodecError: a header this format cannot represent, naming the field.
    """
    what = f"tensor {header.name!r:.200}"
    name = check_name(header.name).encode("utf-8")
    shape = tuple(header.shape)
    if len(shape) > MAX_NDIM:
        raise CodecError(f"{what}: {len(shape)} dimensions, at most {MAX_NDIM}")
    if header.count != math.prod(shape):
        raise CodecError(f"{what}: count {header.count} is not the product of shape {list(shape)}")
    steps = header.chain.describe()
    selection, values = steps[0], steps[1]
    span = header.stop - header.start
    implied = header.chain.selection.index_bytes + header.chain.values.encoded_size(header.chain.value_count(span))
    if header.size != implied:
        raise CodecError(f"{what}: size {header.size} is not what its chain implies ({implied} bytes)")
    try:
        codes = _ENUMS.pack(
            _code("dtype", np.dtype(header.dtype).str, what),
            _code("selection", selection["stage"], what),
            _code("index coding", selection.get("index", "none"), what),
            _code("values", values["stage"], what),
            _code("byte stage", "zstd" if header.chain.zstd else "none", what),
            header.crc,
        )
    except struct.error:
        raise CodecError(f"{what}: crc must be an unsigned 32-bit integer, got {header.crc!r:.50}") from None
    fields = [codes, _varint(len(name), "name", what), name, _varint(len(shape), "shape", what)]
    fields += [_varint(d, "shape", what) for d in shape]
    fields += [_varint(getattr(header, key), key, what) for key in ("part", "parts", "start", "stop")]
    if selection["stage"] == "topk":
        fields += [_varint(selection["k"], "k", what), _varint(selection["index_bytes"], "index_bytes", what)]
    if values["stage"] in _BLOCK_STAGES:
        fields.append(_varint(values["block"], "block", what))
    head = b"".join(fields)
    if len(head) > MAX_HEADER_BYTES:
        raise CodecError(f"{what}: frame header of {len(head)} bytes exceeds {MAX_HEADER_BYTES}")
    return _PREFIX.pack(MAGIC, len(head), zlib.crc32(head)) + head


class _Reader:
    """Reads an FSN2 header's fields in order; every error names the field."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0
        self.what = "frame"

    def take(self, size: int, field: str) -> bytes:
        end = self.at + size
        if end > len(self.data):
            raise CodecError(f"{self.what}: frame header is truncated in field {field!r}")
        out = self.data[self.at:end]
        self.at = end
        return out

    def varint(self, field: str) -> int:
        data, at = self.data, self.at
        stop = min(at + _VARINT_MAX_BYTES, len(data))
        value = shift = 0
        while at < stop:
            byte = data[at]
            at += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                if byte == 0 and shift:
                    raise CodecError(f"{self.what}: header field {field!r} is an overlong varint")
                self.at = at
                return value
            shift += 7
        if stop == len(data) and at - self.at < _VARINT_MAX_BYTES:
            raise CodecError(f"{self.what}: frame header is truncated in field {field!r}")
        raise CodecError(f"{self.what}: header field {field!r} is a varint longer than {_VARINT_MAX_BYTES} bytes")

    def enum(self, code: int, table: dict[int, str], field: str) -> str:
        tag = table.get(code)
        if tag is None:
            raise CodecError(f"{self.what}: unknown {field} code {code} (known: {table})")
        return tag


def decode_header(data: bytes | bytearray | memoryview) -> tuple[FrameHeader, int]:
    """Read and check the FSN2 prefix and header at the start of ``data`` (a frame).

    Returns the header (``frame_bytes = len(data)``) and the offset of the payload.
    Inverse of :func:`encode_header`; see :func:`unpack_frame` for the payload checks.

    Raises:
        CodecError: a wrong magic, a truncated or corrupted header, an unknown code, or a field
            out of range, naming the tensor (once its name is read) and the field.
    """
    try:
        view = memoryview(data).cast("B")
    except TypeError as exc:  # a non-contiguous or multi-dimensional view
        raise CodecError(f"a frame must be a contiguous byte buffer ({exc})") from None
    if len(view) < _PREFIX.size:
        raise CodecError(f"frame of {len(view)} bytes is truncated (an FSN2 frame starts with {_PREFIX.size} bytes)")
    magic, head_len, head_crc = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise CodecError(f"not an FSN2 codec frame (magic {bytes(magic)!r}, expected {MAGIC!r})")
    if head_len > MAX_HEADER_BYTES:
        raise CodecError(f"frame header of {head_len} bytes exceeds {MAX_HEADER_BYTES}")
    end = _PREFIX.size + head_len
    if end > len(view):
        raise CodecError(f"frame is truncated: header of {head_len} bytes, frame of {len(view)}")
    head = view[_PREFIX.size:end]
    if zlib.crc32(head) != head_crc:
        raise CodecError("frame header checksum mismatch (corrupted frame)")
    read = _Reader(bytes(head))
    dtype_code, selection_code, index_code, value_code, byte_code, crc = _ENUMS.unpack(read.take(_ENUMS.size, "codes"))
    name_len = read.varint("name")
    if not 1 <= name_len <= MAX_NAME_BYTES:
        raise CodecError(f"frame header: tensor name of {name_len} bytes (must be 1..{MAX_NAME_BYTES})")
    try:
        name = read.take(name_len, "name").decode("utf-8")
    except UnicodeDecodeError:
        raise CodecError("frame header: tensor name is not valid UTF-8") from None
    read.what = f"tensor {name!r}"
    dtype = read.enum(dtype_code, DTYPE_CODES, "dtype")
    selection = read.enum(selection_code, _SELECTION_CODES, "selection")
    index = read.enum(index_code, _INDEX_CODES, "index coding")
    values = read.enum(value_code, _VALUE_CODES, "values")
    byte_stage = read.enum(byte_code, _BYTE_STAGE_CODES, "byte stage")
    ndim = read.varint("shape")
    if ndim > MAX_NDIM:
        raise CodecError(f"{read.what}: header shape has {ndim} dimensions, at most {MAX_NDIM}")
    shape = tuple(read.varint("shape") for _ in range(ndim))
    ints = {key: read.varint(key) for key in ("part", "parts", "start", "stop")}
    # The chain in the same words as FrameHeader.to_json(), so that one parser checks both.
    if selection == "dense":
        if index != "none":
            raise CodecError(f"{read.what}: dense selection takes index coding 'none', got {index!r}")
        steps: list[dict[str, Any]] = [{"stage": "dense"}]
    else:
        if index == "none":
            raise CodecError(f"{read.what}: topk selection needs an index coding ('varint' or 'bitmap'), got 'none'")
        steps = [{"stage": "topk", "k": read.varint("k"), "index": index, "index_bytes": read.varint("index_bytes")}]
    steps.append({"stage": values, "block": read.varint("block")} if values in _BLOCK_STAGES else {"stage": values})
    if byte_stage == "zstd":
        steps.append({"stage": "zstd"})
    if read.at != len(head):
        raise CodecError(f"{read.what}: frame header has {len(head) - read.at} bytes after its last field")
    header = _checked_header(name, shape, np.dtype(dtype), ints, steps, crc, len(view))
    return header, end


# --------------------------------------------------------------------------------------------
# Checks shared by binary headers and header fields given as a mapping.


def _in_range(value: Any, key: str, low: int, high: int, what: str) -> int:
    if type(value) is not int or not low <= value <= high:
        raise CodecError(f"{what}: header field {key!r} must be an integer in [{low}, {high}], got {value!r:.100}")
    return value


def _checked_header(
    name: str,
    shape: tuple[int, ...],
    dtype: np.dtype,
    ints: Mapping[str, Any],
    steps: Any,
    crc: Any,
    frame_bytes: int,
    *,
    declared_size: Any = None,
) -> FrameHeader:
    """Range and consistency checks; ``declared_size`` is a mapping's ``size`` (FSN2 implies it)."""
    what = f"tensor {name!r}"
    count = math.prod(shape)
    if count > 1 << 63:
        raise CodecError(f"{what}: header shape {list(shape)} has {count} elements, more than 2**63")
    parts = _in_range(ints["parts"], "parts", 1, 1 << 40, what)
    part = _in_range(ints["part"], "part", 0, parts - 1, what)
    what = f"tensor {name!r} part {part + 1}/{parts}"
    start = _in_range(ints["start"], "start", 0, count, what)
    stop = _in_range(ints["stop"], "stop", start, count, what)
    if declared_size is not None:
        declared_size = _in_range(declared_size, "size", 0, PAYLOAD_BUDGET, what)
    crc = _in_range(crc, "crc", 0, 0xFFFFFFFF, what)
    chain = parse_chain(steps, dtype, stop - start, what)
    size = chain.selection.index_bytes + chain.values.encoded_size(chain.value_count(stop - start))
    if declared_size is not None and declared_size != size:
        raise CodecError(f"{what}: payload size {declared_size} does not match its chain ({chain.encoding}: {size} bytes)")
    if size > PAYLOAD_BUDGET:
        raise CodecError(f"{what}: payload of {size} bytes ({chain.encoding}) exceeds the per-frame limit of {PAYLOAD_BUDGET}")
    return FrameHeader(
        name=name,
        shape=shape,
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


# --------------------------------------------------------------------------------------------
# Header fields given as a mapping (FrameHeader.to_json()'s keys).


def _header_from_fields(fields: Any, frame_bytes: int) -> FrameHeader:
    """A checked header from :meth:`FrameHeader.to_json`'s fields (what :func:`pack_frame` accepts as a mapping)."""
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
    count = math.prod(shape)
    if _in_range(fields["count"], "count", 0, 1 << 63, what) != count:
        raise CodecError(f"{what}: header count {fields['count']} does not match shape {shape} ({count} elements)")
    return _checked_header(
        name, tuple(shape), np.dtype(dtype_str), fields, fields["chain"], fields["crc"], frame_bytes,
        declared_size=fields["size"],
    )


# --------------------------------------------------------------------------------------------
# Frames.


def pack_frame(header: FrameHeader | Mapping[str, Any], payload: bytes | memoryview) -> bytes:
    """Serialise a header and its (possibly zstd-compressed) payload into one FSN2 frame.

    ``header`` may also be a mapping of :meth:`FrameHeader.to_json`'s keys; it is checked like a
    decoded header first (a convenience for tools and tests that edit header fields).
    """
    if not isinstance(header, FrameHeader):
        header = _header_from_fields(dict(header), 0)
    frame = b"".join((encode_header(header), payload))
    if len(frame) > MAX_FRAME_BYTES:
        raise CodecError(f"tensor {header.name!r}: frame of {len(frame)} bytes exceeds {MAX_FRAME_BYTES}")
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
    if len(view) < len(MAGIC):
        raise CodecError(f"frame of {len(view)} bytes is truncated (a frame starts with a 4-byte magic)")
    magic = bytes(view[:4])
    if magic != MAGIC:
        raise CodecError(f"not a FedSegNet codec frame (magic {magic!r}, expected {MAGIC!r})")
    header, end = decode_header(view)
    payload = view[end:]
    if not header.compressed and len(payload) != header.size:
        raise CodecError(f"{header.what}: payload of {len(payload)} bytes, header says {header.size}")
    if header.compressed and len(payload) == 0:
        raise CodecError(f"{header.what}: empty zstd payload")
    return header, payload


def read_header(frame: bytes | bytearray | memoryview) -> FrameHeader:
    """The validated header of a frame, without decoding its payload (cheap: for spooling checks)."""
    return unpack_frame(frame)[0]
