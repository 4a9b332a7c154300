"""Streams of named tensors <-> streams of frames; error feedback; accumulation without densifying.

Encoding, per tensor (one tensor in memory at a time):

1. selection: all positions (dense) or the top-k positions (:mod:`codec.select`);
2. the tensor is cut into parts whose raw payload fits :data:`PAYLOAD_BUDGET`, so that every
   frame, header included, is at most :data:`MAX_FRAME_BYTES` (dense: a contiguous range of
   elements per part; sparse: a run of sent positions per part);
3. per part: index coding + value coding (:mod:`codec.stages`), crc32, zstd where it pays,
   header, frame (:mod:`codec.frame`).

Decoding checks each frame (header checksum, payload checksum, sizes declared before any
decompression) and the stream's structure (parts of a tensor consecutive and in order, no
tensor missing parts, no tensor twice), and raises :class:`CodecError` naming the frame, the
tensor and the problem.
"""

from __future__ import annotations

import functools
import logging
import math
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple

import numpy as np
import zstandard

from .errors import CodecError
from .frame import (
    MAX_FRAME_BYTES,
    PAYLOAD_BUDGET,
    FrameHeader,
    check_name,
    encode_header,
    pack_frame,
    unpack_frame,
    wire_dtype,
)
from .budget import Candidates, allocate, plan_budget
from .select import GlobalThreshold, Threshold, keep_count, threshold_positions, top_k_positions
from .spec import LOSSLESS, CodecSpec
from .stages import (
    Chain,
    DenseSelection,
    IntCoder,
    RawCoder,
    SparseSelection,
    ValueCoder,
    decode_indices,
    encode_indices,
    index_budget,
    index_size,
    value_coder_for,
    zstd_compress,
    zstd_decompress,
)

__all__ = [
    "DEFAULT_MAX_TENSOR_BYTES",
    "DecodedPart",
    "EncodedUpdate",
    "TensorSummary",
    "as_array",
    "encode_tensors",
    "encode_update",
    "decode_frames",
    "decode_part",
    "iter_parts",
    "accumulate_frames",
    "verify_frames",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_TENSOR_BYTES = 4 << 30
"""Largest dense tensor a decoder accepts by default (4 GiB), checked before allocating it."""

NamedTensors = Mapping[str, Any] | Iterable[tuple[str, Any]]
_F32 = np.dtype(np.float32)


# --------------------------------------------------------------------------------------------
# Inputs.


def as_array(value: Any, name: str) -> np.ndarray:
    """A C-contiguous little-endian numpy array of a tensor (numpy array, torch tensor, array-like).

    torch tensors are converted with ``.detach().cpu().numpy()`` without importing torch here;
    bfloat16 (which numpy lacks) travels as float32.
    """
    if not isinstance(value, np.ndarray) and hasattr(value, "detach") and hasattr(value, "cpu"):
        tensor = value.detach().cpu()
        if str(getattr(tensor, "dtype", "")) == "torch.bfloat16":
            tensor = tensor.float()
        value = tensor.numpy()
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise CodecError(f"tensor {name!r}: not an array ({exc})") from None
    return np.asarray(array, dtype=wire_dtype(array.dtype, name), order="C")


def _items(tensors: NamedTensors) -> Iterable[tuple[str, Any]]:
    return tensors.items() if isinstance(tensors, Mapping) else tensors


_F32_MAX = float(np.finfo(np.float32).max)


def _magnitude(flat: np.ndarray, name: str) -> np.ndarray:
    """|flat|, the ranking key of top-k: float64 for float64 tensors, else float32 (exact)."""
    magnitude = np.abs(flat)
    if magnitude.dtype != np.float64:
        magnitude = magnitude.astype(_F32, copy=False)
    _check_magnitude(magnitude, name)
    return magnitude


def _check_magnitude(magnitude: np.ndarray, name: str) -> None:
    # max() propagates NaN, so one reduction finds NaN and Inf without a boolean temporary;
    # the quantizers work in float32, so larger float64 values are refused too.
    if magnitude.size and not float(magnitude.max()) <= _F32_MAX:
        raise CodecError(
            f"tensor {name!r} has NaN/Inf values (or values beyond float32 range); lossy encoding needs "
            "finite values"
        )


# --------------------------------------------------------------------------------------------
# Decoded parts: what a frame carries, without densifying it.


@dataclass(frozen=True)
class DecodedPart:
    """The decoded content of one frame.

    Attributes:
        header: the frame's header (``shape``/``dtype`` are the whole tensor's).
        values: 1-D array of ``header.dtype``, possibly read-only.
        positions: sorted int64 flat (row-major) positions of ``values`` in the whole tensor, or
            None when the part is dense and ``values`` covers ``[header.start, header.stop)``.
    """

    header: FrameHeader
    values: np.ndarray
    positions: np.ndarray | None

    @property
    def name(self) -> str:
        return self.header.name

    def _flat(self, out: np.ndarray) -> np.ndarray:
        h = self.header
        if not isinstance(out, np.ndarray) or out.shape != h.shape:
            got = getattr(out, "shape", type(out).__name__)
            raise CodecError(f"{h.what}: target array has shape {got}, the tensor has shape {h.shape}")
        if not out.flags.c_contiguous or not out.flags.writeable:
            raise CodecError(f"{h.what}: target array must be writeable and C-contiguous")
        return out.reshape(-1)

    def write_to(self, out: np.ndarray) -> None:
        """Store this part's values in ``out`` (the whole tensor, shaped ``header.shape``)."""
        flat = self._flat(out)
        if self.positions is None:
            flat[self.header.start : self.header.stop] = self.values
        else:
            flat[self.positions] = self.values

    def add_to(self, out: np.ndarray, weight: float = 1.0) -> None:
        """``out += weight * part`` touching only the sent positions (no dense temporary).

        ``out`` is a floating accumulator shaped like the whole tensor.
        """
        flat = self._flat(out)
        if flat.dtype.kind not in "fc" or not np.can_cast(self.values.dtype, flat.dtype, "same_kind"):
            raise CodecError(f"{self.header.what}: cannot accumulate {self.values.dtype} into a {flat.dtype} array")
        scaled = self.values.astype(flat.dtype)
        if weight != 1.0:
            scaled *= flat.dtype.type(weight)
        if self.positions is None:
            flat[self.header.start : self.header.stop] += scaled
        else:
            # Positions are unique (strictly increasing), so fancy-index += is exact (no np.add.at).
            flat[self.positions] += scaled


def decode_part(header: FrameHeader, stored: memoryview, decompressor: zstandard.ZstdDecompressor) -> DecodedPart:
    """Decode one frame's payload (``header, stored = unpack_frame(frame)``)."""
    what = header.what
    try:
        raw: bytes | memoryview = (
            zstd_decompress(decompressor, stored, header.size, what) if header.compressed else stored
        )
        if zlib.crc32(raw) != header.crc:
            raise CodecError(f"{what}: payload checksum mismatch (corrupted frame)")
        chain = header.chain
        cut = chain.selection.index_bytes
        positions = None
        if isinstance(chain.selection, SparseSelection):
            relative = decode_indices(chain.selection.index, memoryview(raw)[:cut], header.span, chain.selection.k, what)
            positions = relative + header.start
        values = chain.values.decode(memoryview(raw)[cut:], header.sent, header.dtype, what)
    except CodecError:
        raise
    except (ValueError, TypeError, IndexError, OverflowError, zstandard.ZstdError) as exc:
        raise CodecError(f"{what}: malformed payload ({exc})") from None
    return DecodedPart(header, values, positions)


class _StreamChecker:
    """Enforces the stream structure: each tensor's parts 0..parts-1 consecutively, tiling [0, count)."""

    def __init__(self, max_tensor_bytes: int) -> None:
        self.max_tensor_bytes = max_tensor_bytes
        self.current: FrameHeader | None = None
        self.seen: set[str] = set()

    def accept(self, header: FrameHeader) -> None:
        current = self.current
        if header.part == 0:
            if current is not None:
                raise CodecError(
                    f"tensor {current.name!r} is missing parts {current.part + 2}..{current.parts} "
                    f"(next frame starts tensor {header.name!r})"
                )
            if header.name in self.seen:
                raise CodecError(f"tensor {header.name!r} appears twice in the stream")
            nbytes = header.count * header.dtype.itemsize
            if nbytes > self.max_tensor_bytes:
                raise CodecError(
                    f"tensor {header.name!r} claims {nbytes} bytes ({header.shape} {header.dtype}), "
                    f"over the limit of {self.max_tensor_bytes}"
                )
            if header.start != 0:
                raise CodecError(f"{header.what}: first part starts at position {header.start}, not 0")
            self.seen.add(header.name)
        else:
            if current is None or current.name != header.name:
                expected = "part 1 of a new tensor" if current is None else f"part {current.part + 2} of {current.name!r}"
                raise CodecError(f"{header.what} is out of order: expected {expected}")
            if header.part != current.part + 1:
                raise CodecError(f"{header.what} is out of order: expected part {current.part + 2}")
            if (header.shape, header.dtype, header.parts) != (current.shape, current.dtype, current.parts):
                raise CodecError(f"{header.what}: shape/dtype/parts differ from the tensor's first part")
            if header.start != current.stop:
                raise CodecError(f"{header.what}: starts at {header.start}, previous part stopped at {current.stop}")
        if header.part == header.parts - 1:
            if header.stop != header.count:
                raise CodecError(f"{header.what}: last part stops at {header.stop} of {header.count} positions")
            self.current = None
        else:
            self.current = header

    def finish(self) -> None:
        if self.current is not None:
            c = self.current
            raise CodecError(f"stream ended after part {c.part + 1} of {c.parts} of tensor {c.name!r} (truncated)")


def iter_parts(
    frames: Iterable[bytes], *, max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES
) -> Iterator[DecodedPart]:
    """Validate and decode a frame stream one frame at a time (memory: one frame's content).

    Raises:
        CodecError: a bad frame or a broken stream; the message starts with ``frame <i>:``.
    """
    decompressor = zstandard.ZstdDecompressor()
    checker = _StreamChecker(max_tensor_bytes)
    index = -1
    for index, frame in enumerate(frames):
        try:
            header, stored = unpack_frame(frame)
            checker.accept(header)
            part = decode_part(header, stored, decompressor)
        except CodecError as exc:
            raise CodecError(f"frame {index}: {exc}") from None
        yield part
    try:
        checker.finish()
    except CodecError as exc:
        raise CodecError(f"frame {index + 1}: {exc}") from None


def decode_frames(
    frames: Iterable[bytes], *, max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES
) -> Iterator[tuple[str, np.ndarray]]:
    """Decode a frame stream into ``(name, array)`` pairs, one tensor at a time, in stream order.

    Arrays come back dense, with the original shape and dtype from the header; positions a
    sparse encoding did not send are 0. Memory: the tensor being assembled plus one frame.
    """
    out: np.ndarray | None = None
    for part in iter_parts(frames, max_tensor_bytes=max_tensor_bytes):
        h = part.header
        if h.part == 0:
            out = np.zeros(h.shape, dtype=h.dtype)
        assert out is not None  # iter_parts guarantees part 0 comes first
        part.write_to(out)
        if h.part == h.parts - 1:
            yield h.name, out
            out = None


def accumulate_frames(
    frames: Iterable[bytes],
    weight: float,
    into: dict[str, np.ndarray],
    *,
    max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES,
    dtype: Any = np.float32,
) -> None:
    """``into[name] += weight * tensor`` for every tensor of a frame stream, part by part.

    Sparse parts add only their sent positions (no dense temporary), so closing a round costs
    O(sent values) per site plus the accumulators. A name missing from ``into`` gets a new zero
    accumulator of ``dtype`` and the header's shape.

    ``into`` is updated as frames arrive: when a stream may be bad, check it first with
    :func:`verify_frames` (the aggregator verifies submissions when it spools them).

    Raises:
        CodecError: a bad frame or stream, or an accumulator of the wrong shape or kind.
    """
    if not math.isfinite(weight):
        raise CodecError(f"weight must be finite, got {weight}")
    for part in iter_parts(frames, max_tensor_bytes=max_tensor_bytes):
        target = into.get(part.name)
        if target is None:
            target = into[part.name] = np.zeros(part.header.shape, dtype=dtype)
        part.add_to(target, weight)


@dataclass
class TensorSummary:
    """What a stream carries for one tensor, gathered without densifying it."""

    shape: tuple[int, ...]
    dtype: np.dtype
    parts: int = 0
    sent: int = 0
    """Values transmitted (all elements when dense)."""
    sq_norm: float = 0.0
    """Sum of squares of the decoded values (float64); the squared L2 norm of the tensor."""
    finite: bool = True
    frame_bytes: int = 0
    encodings: frozenset[str] = frozenset()


def verify_frames(
    frames: Iterable[bytes], *, max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES
) -> dict[str, TensorSummary]:
    """Fully check a frame stream (every checksum, index and code) and summarise it per tensor.

    Returns name -> :class:`TensorSummary`, in stream order; ``sq_norm`` gives ``||delta||``
    without densifying, ``finite`` flags NaN/Inf.
    """
    summary: dict[str, TensorSummary] = {}
    for part in iter_parts(frames, max_tensor_bytes=max_tensor_bytes):
        h = part.header
        info = summary.get(h.name)
        if info is None:
            info = summary[h.name] = TensorSummary(h.shape, h.dtype)
        values = part.values
        if values.dtype.kind == "c":
            squares = float(np.sum(np.abs(values.astype(np.complex128)) ** 2))
        else:
            as64 = values.astype(np.float64)
            squares = float(np.dot(as64, as64))
        info.parts += 1
        info.sent += values.size
        info.sq_norm += squares
        info.finite = info.finite and math.isfinite(squares)
        info.frame_bytes += h.frame_bytes
        info.encodings = info.encodings | {h.encoding}
    return summary


# --------------------------------------------------------------------------------------------
# Encoding.


def _max_fitting(cost: Callable[[int], int], budget: int) -> int:
    """Largest n >= 1 with cost(n) <= budget (cost is increasing)."""
    low, high = 1, 1
    while cost(high) <= budget:
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        if cost(mid) <= budget:
            low = mid
        else:
            high = mid
    return low


class _TensorEncoder:
    """Turns one tensor plus its selected positions into frames (and, on request, what they decode to)."""

    def __init__(self, spec: CodecSpec) -> None:
        self.spec = spec
        self.compressor = (
            zstandard.ZstdCompressor(level=spec.zstd_level, write_checksum=True, write_content_size=True)
            if spec.zstd_level
            else None
        )

    def coder(self, dtype: np.dtype) -> ValueCoder:
        return value_coder_for(
            self.spec.quantization, dtype, block=self.spec.block_size, stochastic=self.spec.stochastic_rounding
        )

    def fit(self, array: np.ndarray, positions: np.ndarray | None) -> tuple[ValueCoder, np.ndarray | None]:
        """The value coder fitted to the values this tensor sends, and the positions it sends.

        A coder that cannot keep every residual exact (sign) holds back the sparse entries whose
        ``x - decoded`` would be rounded: they stay whole in the residual, so that what is sent
        plus what is kept is the input exactly. Dense parts cannot leave an entry out; their
        residual is rounded once (docs/protocol.md, §4.6).
        """
        flat = array.reshape(-1)
        coder = self.coder(array.dtype).fit(flat if positions is None else flat[positions])
        if not coder.exact and positions is not None and positions.size:
            sent = flat[positions]
            decoded = coder.decode(coder.encode(sent, None), sent.size, array.dtype, "held back")
            with np.errstate(over="ignore", invalid="ignore"):
                keep = (sent - decoded) + decoded == sent
            if not keep.all():
                positions = positions[keep]
        return coder, positions

    def layout(
        self, count: int, positions: np.ndarray | None, coder: ValueCoder
    ) -> Iterator[tuple[int, int, int, int, np.ndarray | None]]:
        """``(part, parts, start, stop, chosen)`` of each frame; ``chosen`` = the part's positions, None = dense."""
        if positions is None:
            per_part = _max_fitting(coder.encoded_size, PAYLOAD_BUDGET)
            parts = max(1, -(-count // per_part))
            for part in range(parts):
                yield part, parts, part * per_part, min(count, (part + 1) * per_part), None
        else:
            index_cost = index_budget(count)
            per_part = _max_fitting(lambda k: coder.encoded_size(k) + k * index_cost, PAYLOAD_BUDGET)
            parts = max(1, -(-positions.size // per_part))
            for part in range(parts):
                chosen = positions[part * per_part : (part + 1) * per_part]
                start = 0 if part == 0 else int(chosen[0])
                stop = count if part == parts - 1 else int(positions[(part + 1) * per_part])
                yield part, parts, start, stop, chosen

    def frames_size(self, name: str, array: np.ndarray, positions: np.ndarray | None) -> int:
        """Bytes of this tensor's frames before zstd (which only ever shrinks them), headers included."""
        coder = self.coder(array.dtype)
        shape = tuple(int(d) for d in array.shape)
        total = 0
        for part, parts, start, stop, chosen in self.layout(array.size, positions, coder):
            if chosen is None:
                selection: DenseSelection | SparseSelection = DenseSelection()
            else:
                coding, index_bytes = index_size(chosen - start, stop - start)
                selection = SparseSelection(int(chosen.size), coding, index_bytes)
            chain = Chain(selection, coder, False)
            size = selection.index_bytes + coder.encoded_size(chain.value_count(stop - start))
            header = FrameHeader(
                name=name, shape=shape, dtype=array.dtype, count=int(array.size), part=part, parts=parts,
                start=start, stop=stop, chain=chain, size=size, crc=0,
            )
            total += len(encode_header(header)) + size
        return total

    def encode(
        self, name: str, array: np.ndarray, positions: np.ndarray | None, want_decoded: bool
    ) -> Iterator[tuple[bytes, DecodedPart | None]]:
        """Frames of one tensor; ``positions`` = sorted flat positions to send, None = all."""
        flat = array.reshape(-1)
        coder, positions = self.fit(array, positions)
        for part, parts, start, stop, chosen in self.layout(flat.size, positions, coder):
            values = flat[start:stop] if chosen is None else flat[chosen]
            yield self._part(name, array, part, parts, start, stop, coder, chosen, values, want_decoded)

    def _part(
        self,
        name: str,
        array: np.ndarray,
        part: int,
        parts: int,
        start: int,
        stop: int,
        coder: ValueCoder,
        positions: np.ndarray | None,
        values: np.ndarray,
        want_decoded: bool,
    ) -> tuple[bytes, DecodedPart | None]:
        rng = None
        if isinstance(coder, IntCoder) and coder.stochastic:
            # Independent noise per tensor and part, reproducible from the spec's seed.
            rng = np.random.default_rng([self.spec.seed, zlib.crc32(name.encode("utf-8")), part])
        value_bytes = coder.encode(values, rng)
        if positions is None:
            selection: DenseSelection | SparseSelection = DenseSelection()
            raw: bytes | memoryview = value_bytes
        else:
            coding, index_bytes = encode_indices(positions - start, stop - start)
            selection = SparseSelection(int(positions.size), coding, len(index_bytes))
            raw = b"".join((index_bytes, value_bytes))
        packed = zstd_compress(self.compressor, raw) if self.compressor is not None else None
        header = FrameHeader(
            name=name,
            shape=tuple(int(d) for d in array.shape),
            dtype=array.dtype,
            count=int(array.size),
            part=part,
            parts=parts,
            start=start,
            stop=stop,
            chain=Chain(selection, coder, packed is not None),
            size=len(raw),
            crc=zlib.crc32(raw),
        )
        frame = pack_frame(header, packed if packed is not None else raw)
        decoded = None
        if want_decoded:
            # What the receiver will decode: the same decoder on the same bytes (zstd is lossless).
            if not isinstance(coder, RawCoder):
                values = coder.decode(value_bytes, values.size, array.dtype, header.what)
            decoded = DecodedPart(header, values, positions)
        return frame, decoded


Effective = Callable[[str, np.ndarray], np.ndarray]


def _plain(name: str, array: np.ndarray) -> np.ndarray:
    return array


def _encode_stream(
    tensors: NamedTensors, spec: CodecSpec, effective: Effective, want_decoded: bool
) -> Iterator[tuple[str, np.ndarray, Iterator[tuple[bytes, DecodedPart | None]]]]:
    """Yield ``(name, array, frames-and-decoded-parts)`` per tensor, selection applied."""
    encoder = _TensorEncoder(spec)
    threshold: Threshold | None = None
    if (spec.sparse and spec.top_k_scope == "global") or spec.byte_budget:
        if isinstance(tensors, Iterator):
            what = "a byte budget" if spec.byte_budget else "global top-k"
            raise CodecError(
                f"{what} needs two passes over the tensors (first to plan the selection); pass a "
                "sequence or a mapping, not a one-shot iterator"
            )
    if spec.sparse and spec.top_k_scope == "global":
        threshold = _global_threshold(tensors, spec, effective)
    plan = _budget_plan(tensors, spec, effective, encoder) if spec.byte_budget else None
    ties_left = threshold.ties if threshold is not None else 0
    seen: set[str] = set()
    for name, value in _items(tensors):
        name = check_name(name)
        if name in seen:
            raise CodecError(f"tensor {name!r} appears twice in the input; names must be unique")
        seen.add(name)
        array = effective(name, as_array(value, name))
        positions = None
        lossy = array.dtype.kind == "f" and not spec.lossless
        if lossy:
            flat = array.reshape(-1)
            if plan is not None:
                positions = plan[name]  # the first pass checked the values
            elif spec.sparse:
                magnitude = _magnitude(flat, name)
                if threshold is None:
                    positions = top_k_positions(magnitude, keep_count(spec.top_k_fraction, flat.size))
                else:
                    positions, used = threshold_positions(magnitude, Threshold(threshold.value, ties_left))
                    ties_left -= used
                del magnitude
            else:
                _check_magnitude(np.abs(flat), name)
        yield name, array, encoder.encode(name, array, positions, want_decoded)


def _global_threshold(tensors: NamedTensors, spec: CodecSpec, effective: Effective) -> Threshold:
    """First pass of global top-k: the k-th largest magnitude over all floating tensors."""
    total = 0
    for name, value in _items(tensors):
        array = as_array(value, check_name(name))
        if array.dtype.kind == "f":
            total += array.size
    pool = GlobalThreshold(keep_count(spec.top_k_fraction, total))
    for name, value in _items(tensors):
        array = effective(name, as_array(value, name))
        if array.dtype.kind == "f":
            pool.add(_magnitude(array.reshape(-1), name))
    return pool.threshold()


def _sized(encoder: _TensorEncoder, name: str, array: np.ndarray, positions: np.ndarray | None) -> int:
    return encoder.frames_size(name, array, positions)


def _budget_plan(
    tensors: NamedTensors, spec: CodecSpec, effective: Effective, encoder: _TensorEncoder
) -> dict[str, np.ndarray | None]:
    """The positions each floating tensor sends under ``spec.byte_budget`` (None: dense).

    Two passes before the encoding pass: the first measures each tensor (energy, non-zero
    entries, what its values cost) and bounds how many entries any tensor could get (all of
    them together never more than the budget could carry values of); the second keeps each
    tensor's candidates, so memory is O(min(model, budget entries)), not a copy of the model.
    """
    budget = spec.byte_budget
    fixed = 0
    energies: list[float] = []
    limits: list[int] = []
    affordable = 0
    for name, value in _items(tensors):
        name = check_name(name)
        array = effective(name, as_array(value, name))
        if array.dtype.kind != "f":
            fixed += encoder.frames_size(name, array, None)
            continue
        magnitude = _magnitude(array.reshape(-1), name)
        as64 = magnitude.astype(np.float64)
        energies.append(float(np.dot(as64, as64)))
        limits.append(min(int(np.count_nonzero(magnitude)), keep_count(spec.top_k_fraction, array.size)))
        affordable = max(affordable, _max_fitting(encoder.coder(array.dtype).encoded_size, budget))
        del magnitude, as64
    caps = _candidate_caps(energies, limits, affordable)

    candidates: list[Candidates] = []
    float_index = 0
    for name, value in _items(tensors):
        array = effective(name, as_array(value, name))
        if array.dtype.kind != "f":
            continue
        magnitude = _magnitude(array.reshape(-1), name)
        top = top_k_positions(magnitude, caps[float_index])
        order = top[np.argsort(-magnitude[top], kind="stable")]  # largest first, ties by position
        del magnitude
        # Sizing needs only the shape and dtype: a zero-stride stand-in, not the values.
        stand_in = np.broadcast_to(np.zeros((), array.dtype), array.shape)
        exact = encoder.coder(array.dtype).exact
        sized = functools.partial(_sized, encoder, name, stand_in)
        candidates.append(Candidates(name, energies[float_index], order, int(array.size), sized, exact))
        float_index += 1
    ks = plan_budget(candidates, fixed, budget)
    return {c.name: c.positions(k) for c, k in zip(candidates, ks)}


def _candidate_caps(energies: list[float], limits: list[int], affordable: int) -> list[int]:
    """Per tensor, the most entries the plan can give it: its limit, and no more than the
    allocation rule gives it at the smallest multiplier whose entries' values alone overflow."""
    if sum(limits) <= affordable:
        return limits
    lo, hi = 0.0, max((cap / e for cap, e in zip(limits, energies) if e > 0), default=0.0)
    for _ in range(200):
        mid = (lo + hi) / 2
        if not lo < mid < hi:
            break
        if sum(allocate(energies, limits, mid)) <= affordable:
            lo = mid
        else:
            hi = mid
    return allocate(energies, limits, hi)


def encode_tensors(tensors: NamedTensors, spec: CodecSpec = LOSSLESS) -> Iterator[bytes]:
    """Encode named tensors into a stream of frames, each at most :data:`MAX_FRAME_BYTES`.

    Args:
        tensors: ``(name, array)`` pairs or a mapping; arrays may be numpy arrays of any numeric
            dtype (bool, ints, floats, complex) or torch tensors. Names must be unique and
            non-empty. With ``spec.top_k_scope == "global"`` the input is read twice (threshold
            pass, then encoding), so it must be a sequence or mapping, not a one-shot iterator.
        spec: how to encode; floating tensors follow it, other dtypes go dense and lossless.

    Yields:
        frames in tensor order, the parts of each tensor consecutive. Memory: one tensor's
        working set (selection, codes) at a time.

    Raises:
        CodecError: an unsupported dtype, a bad name, NaN/Inf under a lossy spec.
    """
    for _name, _array, frames in _encode_stream(tensors, spec, _plain, want_decoded=False):
        for frame, _ in frames:
            yield frame


class EncodedUpdate(NamedTuple):
    """Result of :func:`encode_update`.

    ``frames`` is a one-shot iterator; ``residual`` starts empty and receives each tensor's new
    residual when that tensor's last frame has been produced, so it is complete exactly when
    ``frames`` is exhausted: ``frames, residual = encode_update(...)``; send all frames; then
    persist ``residual``.
    """

    frames: Iterator[bytes]
    residual: dict[str, np.ndarray]


def encode_update(
    deltas: NamedTensors, spec: CodecSpec, residual: Mapping[str, np.ndarray] | None = None
) -> EncodedUpdate:
    """Encode a model update with error feedback.

    For each tensor, ``x = delta + residual[name]`` (residual missing = 0) is encoded under
    ``spec``; the new residual is ``x - decoded``, where ``decoded`` is exactly what a receiver
    decodes from the frames (dense, zeros at unsent positions), computed in the tensor's dtype.
    So ``decoded + new_residual == x``: nothing is lost, it is only delayed. Lossless tensors
    get an all-zero residual. Old residual entries whose name is not in ``deltas`` are dropped
    (with a warning), e.g. after a model change.

    Raises:
        CodecError: as :func:`encode_tensors`, or a residual whose shape/dtype differs from
            its delta.
    """
    previous = dict(residual or {})
    out: dict[str, np.ndarray] = {}

    def effective(name: str, array: np.ndarray) -> np.ndarray:
        old = previous.get(name)
        if old is None:
            return array
        old = np.asarray(old)
        if old.shape != array.shape:
            raise CodecError(f"tensor {name!r}: residual has shape {old.shape}, delta has shape {array.shape}")
        if array.dtype.kind != "f":
            return array
        return np.add(array, old, dtype=array.dtype)

    def frames() -> Iterator[bytes]:
        for name, array, parts in _encode_stream(deltas, spec, effective, want_decoded=True):
            new = array.copy()
            flat = new.reshape(-1)
            for frame, decoded in parts:
                assert decoded is not None
                index = (
                    slice(decoded.header.start, decoded.header.stop) if decoded.positions is None else decoded.positions
                )
                if isinstance(decoded.header.chain.values, RawCoder):
                    flat[index] = 0  # sent exactly (also keeps NaN - NaN out of the residual)
                else:
                    flat[index] -= decoded.values
                yield frame
            out[name] = new
        stale = sorted(set(previous) - set(out))
        if stale:
            log.warning("dropping residual of %d tensors not in this update: %s", len(stale), stale[:10])

    return EncodedUpdate(frames(), out)


assert PAYLOAD_BUDGET < MAX_FRAME_BYTES
