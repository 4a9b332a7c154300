"""Codec stages, each an encode/decode pair with an exact inverse.

A frame's payload goes through three kinds of stage, named in its header's ``chain``:

1. selection: ``dense`` (every element of the part's range) or ``topk`` (the sent positions, as
   an index section coded by ``varint`` or ``bitmap``, whichever is smaller for that part);
2. values: ``raw`` (lossless, the tensor's own little-endian dtype), ``fp16``, ``int8`` or
   ``int4`` (signed codes plus one float32 scale per block), ``sign`` (one bit per value plus one
   float32 scale per block: Sparse Ternary Compression after ``topk``, scaled signSGD when dense);
3. bytes: ``zstd`` when it shrank the payload, absent otherwise.

Raw payload layout (before zstd): ``[index section (topk only)] [value section]``; each
section's length follows from the chain's parameters, so nothing else needs to be stored.

Decoders look stages up in registries keyed by the header's tag: an unknown tag is a
:class:`CodecError`, never a guess. Every decoder validates what it reads (lengths, code ranges,
index bounds) because frames come from the network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol

import numpy as np
import zstandard

from .errors import CodecError

__all__ = [
    "Chain",
    "DenseSelection",
    "SparseSelection",
    "ValueCoder",
    "RawCoder",
    "Fp16Coder",
    "IntCoder",
    "SignCoder",
    "SIGN_BLOCK",
    "value_coder_for",
    "index_size",
    "varint_encode",
    "varint_decode",
    "varint_size",
    "encode_indices",
    "decode_indices",
    "zstd_compress",
    "zstd_decompress",
    "parse_chain",
]

_F32 = np.dtype("<f4")
_FP16_MAX = np.float32(65504.0)
# zstd must save at least this fraction of a payload to be worth its decode time.
_ZSTD_MIN_GAIN = 1.0 / 32.0
_ZSTD_MIN_INPUT = 64
# Varint deltas are < 2**63 (tensor sizes are far below), so at most 9 bytes of 7 bits each.
_VARINT_MAX_BYTES = 9


# --------------------------------------------------------------------------------------------
# Index coding: sorted, unique positions in [0, n) <-> bytes.


def varint_size(values: np.ndarray) -> np.ndarray:
    """Bytes each non-negative integer of ``values`` takes as an LEB128 varint (int64 array)."""
    v = values.astype(np.uint64, copy=False)
    lens = np.ones(v.shape, dtype=np.int64)
    if v.size == 0:
        return lens
    top = int(v.max())
    shift = 7
    while top >> shift:
        lens += v >= np.uint64(1 << shift)
        shift += 7
    return lens


def varint_encode(values: np.ndarray, lens: np.ndarray | None = None) -> bytes:
    """LEB128-encode non-negative integers (little-endian groups of 7 bits, high bit = "more").

    Vectorised over byte positions (at most 9 loop turns), never over elements.
    """
    v = values.astype(np.uint64, copy=False)
    if v.size == 0:
        return b""
    if lens is None:
        lens = varint_size(v)
    ends = np.cumsum(lens)
    starts = ends - lens
    out = np.empty(int(ends[-1]), dtype=np.uint8)
    maxlen = int(lens.max())
    if maxlen == 1:
        return v.astype(np.uint8).tobytes()
    for j in range(maxlen):
        if j == 0:
            sel_v, sel_len, sel_start = v, lens, starts
        else:
            sel = np.flatnonzero(lens > j)
            sel_v, sel_len, sel_start = v[sel], lens[sel], starts[sel]
        byte = ((sel_v >> np.uint64(7 * j)) & np.uint64(0x7F)).astype(np.uint8)
        byte |= (sel_len > j + 1).astype(np.uint8) << np.uint8(7)
        out[sel_start + j] = byte
    return out.tobytes()


def varint_decode(data: bytes | memoryview, count: int, what: str) -> np.ndarray:
    """Inverse of :func:`varint_encode`: exactly ``count`` values (uint64) or :class:`CodecError`."""
    b = np.frombuffer(data, dtype=np.uint8)
    if count == 0:
        if b.size:
            raise CodecError(f"{what}: {b.size} index bytes for 0 indices")
        return np.zeros(0, dtype=np.uint64)
    if b.size == 0 or b[-1] >= 0x80:
        raise CodecError(f"{what}: varint index section is truncated")
    ends = np.flatnonzero(b < 0x80)
    if ends.size != count:
        raise CodecError(f"{what}: varint index section holds {ends.size} indices, header says {count}")
    if ends.size == b.size:  # every value fits one byte: the common case for dense-ish top-k
        return b.astype(np.uint64)
    lens = np.diff(ends, prepend=-1)
    maxlen = int(lens.max())
    if maxlen > _VARINT_MAX_BYTES:
        raise CodecError(f"{what}: varint index longer than {_VARINT_MAX_BYTES} bytes")
    starts = ends - lens + 1
    out = (b[starts] & 0x7F).astype(np.uint64)
    for j in range(1, maxlen):
        sel = np.flatnonzero(lens > j)
        out[sel] |= (b[starts[sel] + j] & 0x7F).astype(np.uint64) << np.uint64(7 * j)
    return out


def _gaps(indices: np.ndarray) -> np.ndarray:
    """Sorted unique positions -> first position, then (gap - 1) between neighbours (all >= 0)."""
    gaps = np.empty(indices.size, dtype=np.int64)
    if indices.size:
        gaps[0] = indices[0]
        np.subtract(indices[1:], indices[:-1], out=gaps[1:])
        gaps[1:] -= 1
    return gaps


def encode_indices(indices: np.ndarray, n: int) -> tuple[str, bytes]:
    """Code sorted unique positions in [0, n) as ``varint`` gaps or a ``bitmap``, whichever is smaller."""
    gaps = _gaps(indices)
    lens = varint_size(gaps)
    varint_bytes = int(lens.sum())
    bitmap_bytes = (n + 7) // 8
    if bitmap_bytes < varint_bytes:
        mask = np.zeros(n, dtype=bool)
        mask[indices] = True
        return "bitmap", np.packbits(mask, bitorder="little").tobytes()
    return "varint", varint_encode(gaps, lens)


def index_size(indices: np.ndarray, n: int) -> tuple[str, int]:
    """The coding :func:`encode_indices` picks for these positions and its byte size, without encoding."""
    varint_bytes = int(varint_size(_gaps(indices)).sum())
    bitmap_bytes = (n + 7) // 8
    return ("bitmap", bitmap_bytes) if bitmap_bytes < varint_bytes else ("varint", varint_bytes)


def decode_indices(coding: str, data: bytes | memoryview, n: int, k: int, what: str) -> np.ndarray:
    """Inverse of :func:`encode_indices`: ``k`` sorted unique int64 positions in [0, n)."""
    if coding == "varint":
        gaps = varint_decode(data, k, what)
        if k == 0:
            return np.zeros(0, dtype=np.int64)
        # Bound each gap first so that the running sum cannot overflow (k * n << 2**63).
        if int(gaps.max()) >= n:
            raise CodecError(f"{what}: index gap out of range for {n} positions")
        positions = np.cumsum(gaps.astype(np.int64) + 1) - 1
        if int(positions[-1]) >= n:
            raise CodecError(f"{what}: index {int(positions[-1])} out of range for {n} positions")
        return positions
    if coding == "bitmap":
        b = np.frombuffer(data, dtype=np.uint8)
        if b.size != (n + 7) // 8:
            raise CodecError(f"{what}: bitmap of {b.size} bytes for {n} positions")
        bits = np.unpackbits(b, bitorder="little")
        if bits[n:].any():
            raise CodecError(f"{what}: bitmap has bits set past position {n}")
        positions = np.flatnonzero(bits[:n])
        if positions.size != k:
            raise CodecError(f"{what}: bitmap marks {positions.size} positions, header says {k}")
        return positions.astype(np.int64, copy=False)
    raise CodecError(f"{what}: unknown index coding {coding!r} (known: 'varint', 'bitmap')")


# --------------------------------------------------------------------------------------------
# Value coding: 1-D values <-> bytes.


class ValueCoder(Protocol):
    """Codes a 1-D run of values; ``decode(encode(x))`` is what the receiver sees."""

    @property
    def tag(self) -> str:
        """The stage name in headers."""
        ...

    def params(self) -> dict[str, Any]:
        """Header parameters needed to decode (besides the tag)."""
        ...

    def encoded_size(self, count: int) -> int:
        """Exact byte size of ``count`` encoded values."""
        ...

    @property
    def exact(self) -> bool:
        """True when ``(values - decoded) + decoded == values`` holds for every value it encodes,
        so that the error-feedback residual adds back to the input exactly."""
        ...

    def fit(self, values: np.ndarray) -> "ValueCoder":
        """This coder with what it derives from all of one tensor's sent values fixed (sign: the
        scale), so every part of the tensor is coded alike; coders without such state return self."""
        ...

    def encode(self, values: np.ndarray, rng: np.random.Generator | None) -> bytes | memoryview:
        """Encode a 1-D array of the tensor's dtype."""
        ...

    def decode(self, data: bytes | memoryview, count: int, dtype: np.dtype, what: str) -> np.ndarray:
        """Decode ``count`` values into a 1-D array of ``dtype`` (the tensor's dtype)."""
        ...


@dataclass(frozen=True)
class RawCoder:
    """Lossless: the values' own bytes, little-endian. Works for every numeric dtype."""

    tag = "raw"
    exact = True
    itemsize: int

    def params(self) -> dict[str, Any]:
        return {}

    def fit(self, values: np.ndarray) -> ValueCoder:
        return self

    def encoded_size(self, count: int) -> int:
        return count * self.itemsize

    def encode(self, values: np.ndarray, rng: np.random.Generator | None) -> bytes | memoryview:
        little = values.astype(values.dtype.newbyteorder("<"), copy=False)
        return np.ascontiguousarray(little).reshape(-1).view(np.uint8).data

    def decode(self, data: bytes | memoryview, count: int, dtype: np.dtype, what: str) -> np.ndarray:
        values = np.frombuffer(data, dtype=dtype, count=count)
        if dtype.kind == "b" and values.view(np.uint8).max(initial=0) > 1:
            raise CodecError(f"{what}: bool values other than 0 and 1")
        return values


@dataclass(frozen=True)
class Fp16Coder:
    """IEEE half precision, rounded to nearest.

    Magnitudes beyond fp16's 65504 cannot be sent (fp16 would make them inf): they are clipped to
    +-65504, or sent as 0 where the clipped value would make ``values - decoded`` inexact.
    """

    tag = "fp16"
    exact = True

    def params(self) -> dict[str, Any]:
        return {}

    def fit(self, values: np.ndarray) -> ValueCoder:
        return self

    def encoded_size(self, count: int) -> int:
        return 2 * count

    def encode(self, values: np.ndarray, rng: np.random.Generator | None) -> bytes | memoryview:
        as32 = values.astype(_F32, copy=False)
        half = np.clip(as32, -_FP16_MAX, _FP16_MAX).astype("<f2")
        # Nearest rounding keeps decoded within a factor 2 of the value, so values - decoded is
        # exact (Sterbenz); only clipped values may break that: send 0 there instead, so the
        # whole value stays in the error-feedback residual, exactly.
        clipped = np.flatnonzero(np.abs(as32) > _FP16_MAX)
        if clipped.size:
            original = values[clipped]
            decoded = half[clipped].astype(values.dtype)
            bad = (original - decoded) + decoded != original
            half[clipped[bad]] = 0
        return half.tobytes()

    def decode(self, data: bytes | memoryview, count: int, dtype: np.dtype, what: str) -> np.ndarray:
        return np.frombuffer(data, dtype="<f2", count=count).astype(dtype)


def read_block_scales(data: bytes | memoryview, offset: int, count: int, block: int, kind: str, what: str) -> np.ndarray:
    """The float32 scales after a value section's codes: one per ``block`` values, finite and >= 0."""
    scale = np.frombuffer(data, dtype="<f4", offset=offset)
    if scale.size != -(-count // block):
        raise CodecError(f"{what}: {scale.size} scales for {count} values in blocks of {block}")
    if scale.size and not (np.all(np.isfinite(scale)) and scale.min() >= 0):
        raise CodecError(f"{what}: negative or non-finite {kind} scale")
    return scale


@dataclass(frozen=True)
class IntCoder:
    """Signed integer codes in [-levels, levels] with one float32 scale per block.

    ``value ~= code * scale`` with ``scale = max|block| / levels``; deterministic rounding is to
    nearest (error <= scale / 2), stochastic rounding is unbiased (error < scale).
    int8: levels 127, one byte per code. int4: levels 7, two codes per byte (low nibble first),
    stored as ``code + 8``. Value section layout: ``[codes][scales: float32 LE, one per block]``.
    """

    bits: int
    block: int
    stochastic: bool = False
    exact = True  # _make_residual_exact

    @property
    def tag(self) -> str:
        return f"int{self.bits}"

    def fit(self, values: np.ndarray) -> ValueCoder:
        return self

    @property
    def levels(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def params(self) -> dict[str, Any]:
        return {"block": self.block}

    def _code_bytes(self, count: int) -> int:
        return count if self.bits == 8 else (count + 1) // 2

    def encoded_size(self, count: int) -> int:
        return self._code_bytes(count) + 4 * (-(-count // self.block))

    def encode(self, values: np.ndarray, rng: np.random.Generator | None) -> bytes | memoryview:
        count = values.size
        if count == 0:
            return b""
        nblocks = -(-count // self.block)
        padded = np.zeros(nblocks * self.block, dtype=_F32)
        padded[:count] = values
        blocks = padded.reshape(nblocks, self.block)
        scale = (np.abs(blocks).max(axis=1) / np.float32(self.levels)).astype(_F32)
        # Divide (not multiply by 1/scale): a subnormal scale has no finite inverse.
        y = np.zeros_like(blocks)
        np.divide(blocks, scale[:, None], out=y, where=scale[:, None] > 0)
        y = y.reshape(-1)[:count]
        if self.stochastic and rng is not None:
            codes = np.floor(y + rng.random(count, dtype=np.float32))
        else:
            codes = np.rint(y)
        np.clip(codes, -self.levels, self.levels, out=codes)
        codes = codes.astype(np.int8)
        codes = self._make_residual_exact(values, y, codes, scale)
        return self._pack(codes) + scale.astype("<f4").tobytes()

    def _make_residual_exact(
        self, values: np.ndarray, y: np.ndarray, codes: np.ndarray, scale: np.ndarray
    ) -> np.ndarray:
        """Round to nearest where ``decoded + (values - decoded) != values`` in the tensor's dtype.

        Error feedback keeps ``values - decoded`` as the residual; it must add back to exactly
        ``values``. Nearest rounding keeps ``decoded`` within a factor 2 of ``values`` (or 0), where
        float subtraction is exact (Sterbenz); a stochastic round-up of a tiny value may not be.
        """
        decoded = self._dequantize(codes, scale).astype(values.dtype, copy=False)
        bad = (values - decoded) + decoded != values
        if bad.any():
            codes = codes.copy()
            codes[bad] = np.clip(np.rint(y[bad]), -self.levels, self.levels).astype(np.int8)
        return codes

    def _pack(self, codes: np.ndarray) -> bytes:
        if self.bits == 8:
            return codes.tobytes()
        nibbles = (codes + 8).astype(np.uint8)
        if nibbles.size % 2:
            nibbles = np.append(nibbles, np.uint8(0))
        return (nibbles[0::2] | (nibbles[1::2] << 4)).tobytes()

    def _dequantize(self, codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
        count = codes.size
        nblocks = scale.size
        padded = np.zeros(nblocks * self.block, dtype=_F32)
        padded[:count] = codes
        out = padded.reshape(nblocks, self.block) * scale[:, None]
        return out.reshape(-1)[:count]

    def decode(self, data: bytes | memoryview, count: int, dtype: np.dtype, what: str) -> np.ndarray:
        nbytes = self._code_bytes(count)
        raw = np.frombuffer(data, dtype=np.uint8, count=nbytes)
        scale = read_block_scales(data, nbytes, count, self.block, "quantization", what)
        if self.bits == 8:
            codes = raw.view(np.int8)
            if codes.size and codes.min() < -self.levels:
                raise CodecError(f"{what}: int8 code -128 is not used by this codec")
        else:
            nibbles = np.empty(2 * raw.size, dtype=np.uint8)
            nibbles[0::2] = raw & 0x0F
            nibbles[1::2] = raw >> 4
            if count % 2 and nibbles[-1] != 0:
                raise CodecError(f"{what}: int4 padding nibble is not zero")
            nibbles = nibbles[:count]
            if nibbles.size and nibbles.min() < 1:
                raise CodecError(f"{what}: int4 code 0 (= -8) is not used by this codec")
            codes = nibbles.astype(np.int8) - np.int8(8)
        return self._dequantize(codes, scale.astype(_F32)).astype(dtype, copy=False)


SIGN_BLOCK = 1 << 20
"""The largest block FedSegNet's encoder writes for ``sign``: :meth:`SignCoder.fit` uses the
tensor's count of sent values up to this, so a part carries one scale (its tensor's) unless it
holds more than 2**20 values, and the header's block varint stays short."""


@dataclass(frozen=True)
class SignCoder:
    """One bit per value, its sign, and one float32 scale per block: a value decodes to ``±scale``.

    This is the value coding of two published baselines, which both send ``sign(x)`` times the
    mean magnitude of the sent values of each tensor: after ``topk`` selection it is Sparse
    Ternary Compression (Sattler et al. 2019, "Robust and communication-efficient federated
    learning from non-IID data": the kept entries become ``±mean|kept|``, the others 0), sent
    dense it is the scaled sign compressor of error-feedback signSGD (Karimireddy et al. 2019,
    "Error feedback fixes SignSGD": ``||x||_1 / d * sign(x)``). Error feedback (the residual)
    is what makes both converge.

    Value section: ``ceil(n / 8)`` bytes of bits (value ``i`` is bit ``i % 8`` of byte ``i // 8``,
    least significant first; 1 = ``+scale``, 0 = ``-scale``; padding bits are 0), then
    ``ceil(n / block)`` float32 scales. The decoded value is ``±scale`` in float32, converted to
    the tensor's dtype.

    ``scale`` is the encoder's: :meth:`fit` sets the block to the tensor's count of sent values
    (at most ``block``) and the scale to the mean magnitude of those values, rounded to a multiple of the spacing of floats at the largest magnitude (so that
    ``x - scale`` is exact for every ``|x| >= scale / 2``: Sterbenz below ``2 scale``, a common
    grid above). With ``scale`` None each block's scale is its own mean magnitude.
    """

    block: int
    scale: float | None = None
    tag = "sign"
    # ``x - (±scale)`` needs more bits than a float has when |x| is far below the scale, so the
    # residual of such an entry is rounded once; the encoder holds sparse entries of that kind
    # back (they stay whole in the residual), see codec.stream.
    exact = False

    def params(self) -> dict[str, Any]:
        return {"block": self.block}

    def encoded_size(self, count: int) -> int:
        return (count + 7) // 8 + 4 * (-(-count // self.block))

    def fit(self, values: np.ndarray) -> ValueCoder:
        block = max(1, min(self.block, values.size))
        magnitude = np.abs(values.astype(np.float64))
        if values.size == 0 or not magnitude.max() > 0:
            return SignCoder(block, 0.0)
        scale = float(np.float32(magnitude.mean()))
        # The spacing of floats of the tensor's dtype at its largest sent magnitude: a scale that
        # is a multiple of it keeps |x| - scale exact for every |x| >= scale (same grid, smaller).
        grid = float(np.spacing(values.dtype.type(magnitude.max())))
        if grid > float(np.spacing(np.float32(scale))):
            scale = max(round(scale / grid), 1) * grid
        return SignCoder(block, float(np.float32(scale)))

    def _scales(self, values: np.ndarray) -> np.ndarray:
        nblocks = -(-values.size // self.block)
        if self.scale is not None:
            return np.full(nblocks, self.scale, dtype=_F32)
        padded = np.zeros(nblocks * self.block, dtype=np.float64)
        padded[: values.size] = np.abs(values.astype(np.float64))
        sums = padded.reshape(nblocks, self.block).sum(axis=1)
        sizes = np.full(nblocks, self.block)
        if nblocks:
            sizes[-1] = values.size - (nblocks - 1) * self.block
        return (sums / sizes).astype(_F32)

    def encode(self, values: np.ndarray, rng: np.random.Generator | None) -> bytes | memoryview:
        if values.size == 0:
            return b""
        bits = np.packbits(values >= 0, bitorder="little")  # -0.0 and 0 count as positive
        return bits.tobytes() + self._scales(values).astype("<f4").tobytes()

    def decode(self, data: bytes | memoryview, count: int, dtype: np.dtype, what: str) -> np.ndarray:
        nbytes = (count + 7) // 8
        raw = np.frombuffer(data, dtype=np.uint8, count=nbytes)
        scale = read_block_scales(data, nbytes, count, self.block, "sign", what)
        bits = np.unpackbits(raw, bitorder="little")
        if bits[count:].any():
            raise CodecError(f"{what}: sign padding bits are not zero")
        scale = scale.astype(_F32)
        # One scale (FedSegNet's encoder writes one per tensor) needs no per-value copy of it.
        magnitude = scale[0] if scale.size == 1 else scale[np.arange(count) // self.block]
        return np.where(bits[:count].astype(bool), magnitude, -magnitude).astype(dtype, copy=False)


def value_coder_for(quantization: str, dtype: np.dtype, *, block: int, stochastic: bool) -> ValueCoder:
    """The value stage a sender uses for a tensor of ``dtype`` under ``quantization``."""
    if dtype.kind != "f" or quantization == "fp32":
        return RawCoder(dtype.itemsize)
    if quantization == "fp16":
        return Fp16Coder()
    if quantization == "int8":
        return IntCoder(8, block, stochastic)
    if quantization == "int4":
        return IntCoder(4, block, stochastic)
    if quantization == "sign":
        return SignCoder(SIGN_BLOCK)
    raise CodecError(f"unknown quantization {quantization!r}")


# --------------------------------------------------------------------------------------------
# Byte stage: zstd, only where it pays.


def zstd_compress(compressor: zstandard.ZstdCompressor, raw: bytes | memoryview) -> bytes | None:
    """Compressed payload, or None when zstd would not save at least 1/32 of it."""
    size = len(raw)
    if size < _ZSTD_MIN_INPUT:
        return None
    packed = compressor.compress(raw)
    if len(packed) > size * (1.0 - _ZSTD_MIN_GAIN):
        return None
    return packed


_ZSTD_UNUSED_BIT = 0x10  # bit 4 of the zstd frame header descriptor (RFC 8878 section 3.1.1.1.1)


def zstd_decompress(
    decompressor: zstandard.ZstdDecompressor, data: bytes | memoryview, size: int, what: str
) -> bytes:
    """Decompress a payload that the header says holds exactly ``size`` bytes.

    The zstd frame's own declared content size is checked against ``size`` (which the header
    parser already bounded) before any output is allocated: a decompression bomb is refused
    without decompressing it.
    """
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError as exc:
        raise CodecError(f"{what}: payload is not a zstd frame ({exc})") from None
    if declared != size:
        raise CodecError(f"{what}: zstd frame declares {declared} bytes, header says {size}")
    # RFC 8878 tells decoders to ignore the frame header descriptor's unused bit, so a frame with it
    # flipped decodes to the same bytes and no checksum sees the change. FedSegNet's encoder never
    # sets it; refusing it keeps "any changed bit of a frame is refused" true on our wire.
    if data[4] & _ZSTD_UNUSED_BIT:
        raise CodecError(f"{what}: zstd frame header sets its unused bit (0x10 of byte 4); this codec never does")
    try:
        out = decompressor.decompress(data, max_output_size=size, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise CodecError(f"{what}: corrupt zstd payload ({exc})") from None
    if len(out) != size:
        raise CodecError(f"{what}: zstd payload decompressed to {len(out)} bytes, header says {size}")
    return out


# --------------------------------------------------------------------------------------------
# The chain a header describes.


@dataclass(frozen=True)
class DenseSelection:
    """Every position of the part's range is sent, in order."""

    tag = "dense"

    def describe(self) -> dict[str, Any]:
        return {"stage": self.tag}

    @property
    def index_bytes(self) -> int:
        return 0


@dataclass(frozen=True)
class SparseSelection:
    """``k`` positions of the part's range are sent; the rest decode to zero."""

    tag = "topk"
    k: int
    index: str
    index_bytes: int

    def describe(self) -> dict[str, Any]:
        return {"stage": self.tag, "k": self.k, "index": self.index, "index_bytes": self.index_bytes}


Selection = DenseSelection | SparseSelection


@dataclass(frozen=True)
class Chain:
    """The stages one frame went through: selection -> values -> (zstd)."""

    selection: Selection
    values: ValueCoder
    zstd: bool

    def describe(self) -> list[dict[str, Any]]:
        chain = [self.selection.describe(), {"stage": self.values.tag, **self.values.params()}]
        if self.zstd:
            chain.append({"stage": "zstd"})
        return chain

    @property
    def encoding(self) -> str:
        """Short name such as ``"topk+int8+zstd"``."""
        return "+".join(step["stage"] for step in self.describe())

    def value_count(self, span: int) -> int:
        """Values in the payload of a part covering ``span`` positions."""
        return self.selection.k if isinstance(self.selection, SparseSelection) else span


def _int_param(step: Mapping[str, Any], key: str, low: int, high: int, what: str) -> int:
    value = step.get(key)
    if type(value) is not int or not low <= value <= high:
        raise CodecError(f"{what}: stage {step.get('stage')!r} needs integer {key!r} in [{low}, {high}], got {value!r}")
    return value


def _expect_keys(step: Mapping[str, Any], keys: set[str], what: str) -> None:
    extra = set(step) - keys - {"stage"}
    if extra:
        raise CodecError(f"{what}: stage {step.get('stage')!r} has unknown parameters {sorted(extra)}")


def _parse_selection(step: Mapping[str, Any], span: int, what: str) -> Selection:
    tag = step.get("stage")
    if tag == "dense":
        _expect_keys(step, set(), what)
        return DenseSelection()
    if tag == "topk":
        _expect_keys(step, {"k", "index", "index_bytes"}, what)
        k = _int_param(step, "k", 0, span, what)
        index = step.get("index")
        if index not in ("varint", "bitmap"):
            raise CodecError(f"{what}: unknown index coding {index!r} (known: 'varint', 'bitmap')")
        index_bytes = _int_param(step, "index_bytes", 0, 1 << 40, what)
        return SparseSelection(k, index, index_bytes)
    raise CodecError(f"{what}: unknown selection stage {tag!r} (known: 'dense', 'topk')")


def _parse_raw(step: Mapping[str, Any], dtype: np.dtype, what: str) -> ValueCoder:
    _expect_keys(step, set(), what)
    return RawCoder(dtype.itemsize)


def _parse_fp16(step: Mapping[str, Any], dtype: np.dtype, what: str) -> ValueCoder:
    _expect_keys(step, set(), what)
    return Fp16Coder()


def _parse_int(bits: int) -> Callable[[Mapping[str, Any], np.dtype, str], ValueCoder]:
    def parse(step: Mapping[str, Any], dtype: np.dtype, what: str) -> ValueCoder:
        _expect_keys(step, {"block"}, what)
        return IntCoder(bits, _int_param(step, "block", 1, 1 << 20, what))

    return parse


def _parse_sign(step: Mapping[str, Any], dtype: np.dtype, what: str) -> ValueCoder:
    _expect_keys(step, {"block"}, what)
    return SignCoder(_int_param(step, "block", 1, 1 << 20, what))


_VALUE_STAGES: dict[str, Callable[[Mapping[str, Any], np.dtype, str], ValueCoder]] = {
    "raw": _parse_raw,
    "fp16": _parse_fp16,
    "int8": _parse_int(8),
    "int4": _parse_int(4),
    "sign": _parse_sign,
}


def parse_chain(chain: Any, dtype: np.dtype, span: int, what: str) -> Chain:
    """Validate a header's ``chain`` list and build the stages it names.

    Args:
        chain: the header's list of stage objects, ``[selection, values]`` or
            ``[selection, values, {"stage": "zstd"}]``.
        dtype: the tensor's dtype; lossy stages are accepted only for floating dtypes.
        span: positions covered by the part (``stop - start``), bounding ``topk``'s ``k``.
        what: prefix for error messages (names tensor and part).
    """
    if not isinstance(chain, list) or not 2 <= len(chain) <= 3 or not all(isinstance(s, dict) for s in chain):
        raise CodecError(f"{what}: chain must be a list of 2 or 3 stage objects, got {chain!r:.200}")
    selection = _parse_selection(chain[0], span, what)
    value_tag = chain[1].get("stage")
    parser = _VALUE_STAGES.get(value_tag) if isinstance(value_tag, str) else None
    if parser is None:
        raise CodecError(f"{what}: unknown value stage {value_tag!r} (known: {sorted(_VALUE_STAGES)})")
    values = parser(chain[1], dtype, what)
    if dtype.kind != "f" and (values.tag != "raw" or isinstance(selection, SparseSelection)):
        raise CodecError(f"{what}: {dtype} tensors are sent dense and raw, got {selection.tag}+{values.tag}")
    zstd = False
    if len(chain) == 3:
        if chain[2].get("stage") != "zstd":
            raise CodecError(f"{what}: unknown byte stage {chain[2].get('stage')!r} (known: 'zstd')")
        _expect_keys(chain[2], set(), what)
        zstd = True
    return Chain(selection, values, zstd)


def index_budget(count: int) -> int:
    """Upper bound on one varint index gap's bytes in a tensor of ``count`` positions."""
    return max(1, math.ceil(max(count, 1).bit_length() / 7))
