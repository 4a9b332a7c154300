"""(Re)write the codec's conformance vectors: ``python -m codec.testdata.generate``.

Each vector is a frame file ``vectors/NAME.frames`` (the container of docs/protocol.md §5) and
``vectors/NAME.json`` saying what a conforming decoder must make of it:

* valid vectors: every decoded tensor's name, shape, dtype and ``values_sha256`` (SHA-256 of the
  dense decoded values' little-endian bytes, row-major), the SHA-256 of the frames concatenated
  (``frames_sha256``, the digest the wire carries) and of the decoded model's canonical lossless
  re-encoding (``lossless_sha256``, docs/protocol.md §6); a delta vector names its ``base``;
* invalid vectors: the ``error`` class a decoder must refuse it with (docs/protocol.md §4.8) and
  a ``message`` fragment of this codec's refusal.

Everything is seeded, so running it again writes the same bytes (with the same zstd library:
zstd's output may change between its versions; tests/codec/test_conformance.py checks it).
The valid vectors are written by the codec itself; the invalid ones are valid frames with one
defect put in by hand (the header re-sealed with a correct checksum where the defect is behind it).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import struct
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

import codec
from codec.frame import unpack_frame
from codec.stages import SparseSelection

VECTORS = Path(__file__).resolve().parent / "vectors"


# ------------------------------------------------------------------------------------------------
# helpers


def values_sha256(array: np.ndarray) -> str:
    """SHA-256 of a tensor's values: row-major, each element's little-endian bytes (bool: 1 byte)."""
    little = array.astype(array.dtype.newbyteorder("<"), copy=False)
    return hashlib.sha256(np.ascontiguousarray(little).reshape(-1).view(np.uint8).tobytes()).hexdigest()


def frames_sha256(frames: Iterable[bytes]) -> str:
    sha = hashlib.sha256()
    for frame in frames:
        sha.update(frame)
    return sha.hexdigest()


def container(frames: Iterable[bytes]) -> bytes:
    buffer = io.BytesIO()
    codec.write_frames(buffer, frames)
    return buffer.getvalue()


def describe(tensors: Iterable[tuple[str, np.ndarray]]) -> list[dict[str, Any]]:
    return [
        {"name": name, "shape": list(a.shape), "dtype": a.dtype.name, "values_sha256": values_sha256(a)}
        for name, a in tensors
    ]


def reseal(frame: bytes, head: bytes, payload: bytes | None = None) -> bytes:
    """An FSN2 frame with header bytes ``head`` (and a correct header checksum)."""
    body = frame[10 + struct.unpack_from("<H", frame, 4)[0]:] if payload is None else payload
    return b"FSN2" + struct.pack("<HI", len(head), zlib.crc32(head)) + head + body


def head_of(frame: bytes) -> bytearray:
    return bytearray(frame[10:10 + struct.unpack_from("<H", frame, 4)[0]])


def with_payload(frame: bytes, raw: bytes) -> bytes:
    """``frame`` with its (uncompressed) payload replaced by ``raw`` and the payload crc fixed."""
    head = head_of(frame)
    struct.pack_into("<I", head, 5, zlib.crc32(raw))
    return reseal(frame, bytes(head), raw)


def raw_payload(frame: bytes) -> bytes:
    header, stored = unpack_frame(frame)
    assert not header.compressed
    return bytes(stored)


def frames_of(tensors: dict[str, Any], spec: codec.CodecSpec) -> list[bytes]:
    return list(codec.encode_tensors(list(tensors.items()), spec))


# ------------------------------------------------------------------------------------------------
# the vectors


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng([2026, 12, 4, seed])


def valid_vectors() -> dict[str, tuple[str, list[bytes], str | None]]:
    """name -> (description, frames, base vector or None)."""
    r = _rng(1)
    every_dtype = {
        "f32": r.standard_normal((2, 3, 4)).astype(np.float32),
        "f64": r.standard_normal(5),
        "f16": r.standard_normal((3, 3)).astype(np.float16),
        "c64": (r.standard_normal(3) + 1j * r.standard_normal(3)).astype(np.complex64),
        "c128": r.standard_normal(2) + 1j * r.standard_normal(2),
        "i8": np.array([-128, -1, 0, 1, 127], dtype=np.int8),
        "u8": np.array([0, 1, 255], dtype=np.uint8),
        "i16": np.array([-32768, 7, 32767], dtype=np.int16),
        "u16": np.array([65535, 0], dtype=np.uint16),
        "i32": np.array([[-(2**31), 2**31 - 1]], dtype=np.int32),
        "u32": np.array([2**32 - 1], dtype=np.uint32),
        "i64": np.arange(-3, 3, dtype=np.int64).reshape(2, 3),
        "u64": np.array([2**64 - 1, 0], dtype=np.uint64),
        "flag": np.array([True, False, True, True]),
        "scalar": np.array(1.5, dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.float32),
    }
    weights = {
        "conv.weight": r.standard_normal((4, 2, 3, 3, 3)).astype(np.float32) * 0.1,
        "conv.bias": r.standard_normal(4).astype(np.float32),
        "norm.weight_f64": r.standard_normal(37),
        "norm.weight_f16": r.standard_normal(19).astype(np.float16),
        "norm.num_batches_tracked": np.array(12, dtype=np.int64),
    }
    sparse = {
        # Large, spread-out values so that gaps exceed 127 and varints take 2 bytes.
        "embed.weight": (r.standard_normal((40, 50)) * np.where(r.random((40, 50)) < 0.01, 100, 1)).astype(np.float32),
        "embed.bias": r.standard_normal(300).astype(np.float32),
        "counter": np.array([3], dtype=np.int32),
    }
    dense_ish: dict[str, np.ndarray] = {"w": r.standard_normal((8, 17)).astype(np.float32), "w16": r.standard_normal(33).astype(np.float16)}
    pattern = (np.arange(600_000) % 7).astype(np.float32) - 3.0  # compresses: 3 parts, small frames
    stripes = np.tile(np.array([2.0, 0.5, -0.25, -3.0], dtype=np.float32), 150_000)
    new_weights: dict[str, Any] = {k: v.copy() for k, v in weights.items()}
    new_weights["conv.weight"].reshape(-1)[::9] += 0.01
    new_weights["conv.bias"][:] = r.standard_normal(4).astype(np.float32)
    new_weights["norm.num_batches_tracked"] = np.array(13, dtype=np.int64)
    return {
        "dense-raw": ("every dtype, dense and lossless (raw values), no zstd; scalar and empty tensors",
                      frames_of(every_dtype, codec.LOSSLESS), None),
        "dense-raw-zstd": ("dense raw values with zstd where it saves at least 1/32 of a payload",
                           frames_of({"zeros": np.zeros((16, 16), np.float32), **weights}, codec.CodecSpec()), None),
        "fp16": ("dense fp16 values of float32, float64 and float16 tensors; an integer tensor stays raw",
                 frames_of(weights, codec.CodecSpec(quantization="fp16", zstd_level=0)), None),
        "int8": ("dense int8 codes, blocks of 16 (a last short block), float32/64/16 tensors",
                 frames_of(weights, codec.CodecSpec(quantization="int8", block_size=16, zstd_level=0)), None),
        "int4": ("dense int4 codes (odd counts: a zero padding nibble), blocks of 8",
                 frames_of(weights, codec.CodecSpec(quantization="int4", block_size=8, zstd_level=0)), None),
        "int8-zstd": ("dense int8 codes compressed with zstd",
                      frames_of({"big": np.repeat(weights["conv.weight"], 8)}, codec.CodecSpec(quantization="int8")),
                      None),
        "topk-varint-int8": ("top-1% per tensor, int8 values, varint index (2-byte gaps)",
                             frames_of(sparse, codec.CodecSpec(top_k_fraction=0.01, quantization="int8",
                                                               block_size=4, zstd_level=0)), None),
        "topk-varint-fp32": ("top-5% over the whole update (global scope), raw float32 values, varint index",
                             frames_of(sparse, codec.CodecSpec(top_k_fraction=0.05, top_k_scope="global",
                                                               zstd_level=0)), None),
        "topk-bitmap-int4": ("top-90%: bitmap index, int4 values",
                             frames_of(dense_ish, codec.CodecSpec(top_k_fraction=0.9, quantization="int4",
                                                                  block_size=8, zstd_level=0)), None),
        "topk-bitmap-fp16": ("top-60%: bitmap index, fp16 values",
                             frames_of(dense_ish, codec.CodecSpec(top_k_fraction=0.6, quantization="fp16")), None),
        "dense-sign": ("dense sign values (error-feedback signSGD): one bit each, one scale per tensor; odd counts "
                       "(zero padding bits), float32/64/16 tensors; an integer tensor stays raw",
                       frames_of(weights, codec.CodecSpec(quantization="sign", zstd_level=0)), None),
        "topk-varint-sign": ("top-1% per tensor with sign values (Sparse Ternary Compression), varint index",
                             frames_of(sparse, codec.CodecSpec(top_k_fraction=0.01, quantization="sign",
                                                               zstd_level=0)), None),
        "topk-bitmap-sign-zstd": ("top-60% with sign values, bitmap index, zstd",
                                  frames_of({"big": np.repeat(dense_ish["w"], 64)},
                                            codec.CodecSpec(top_k_fraction=0.6, quantization="sign")), None),
        "sign-blocks": ("sign values in blocks of 4, each with its own scale (a decoder honours any block)",
                        _sign_blocks(), None),
        "multipart-dense": ("a 600 000-value float32 tensor in 3 dense raw parts, each zstd-compressed",
                            frames_of({"pattern": pattern, "tail": np.ones(3, np.float32)}, codec.CodecSpec()),
                            None),
        "multipart-topk": (("top-50% of 600 000 values: 2 sparse parts, bitmap index relative to each part's "
                            "start, int8 values, zstd"),
                           frames_of({"stripes": stripes}, codec.CodecSpec(top_k_fraction=0.5, quantization="int8",
                                                                           block_size=64)), None),
        "multipart-varint": ("one tensor in 3 hand-cut top-k parts (varint index relative to each part's start)",
                             _hand_cut_parts(), None),
        "model-base": ("a small model: the base of model-delta", frames_of(weights, codec.LOSSLESS), None),
        "model-delta": ("a lossless model delta from model-base (docs/protocol.md §7): sparse and dense bodies",
                        list(codec.encode_model_delta(weights, new_weights)), "model-base"),
    }


def _hand_cut_parts() -> list[bytes]:
    """Top-k parts cut where the encoder would not (it cuts only at the payload budget): a decoder
    must accept any tiling of [0, count) into consecutive parts."""
    from codec.frame import FrameHeader, pack_frame
    from codec.stages import Chain, IntCoder, SparseSelection, encode_indices

    values = np.linspace(-1, 1, 1000, dtype=np.float32).reshape(10, 100)
    flat = values.reshape(-1)
    cuts = [(0, 310, [3, 150, 309]), (310, 777, [310, 311, 600, 776]), (777, 1000, [999])]
    coder = IntCoder(8, 2)
    frames = []
    for part, (start, stop, positions) in enumerate(cuts):
        pos = np.array(positions, dtype=np.int64)
        coding, index = encode_indices(pos - start, stop - start)
        assert coding == "varint"
        raw = index + coder.encode(flat[pos], None)
        header = FrameHeader(
            name="hand.cut", shape=values.shape, dtype=values.dtype, count=values.size, part=part,
            parts=len(cuts), start=start, stop=stop, chain=Chain(SparseSelection(len(pos), coding, len(index)), coder,
                                                                 False),
            size=len(raw), crc=zlib.crc32(raw),
        )
        frames.append(pack_frame(header, raw))
    return frames


def _sign_blocks() -> list[bytes]:
    """A dense sign frame whose blocks of 4 values each carry their own scale (the mean magnitude
    of the block): FedSegNet's encoder writes one scale per tensor, but the format allows blocks."""
    from codec.frame import FrameHeader, pack_frame
    from codec.stages import Chain, DenseSelection, SignCoder

    values = np.array([0.5, -1.0, 1.5, -2.0, 0.25, 0.25, -0.25, 0.75, -8.0, 3.0, 1.0], dtype=np.float32)
    coder = SignCoder(4)
    raw = bytes(coder.encode(values, None))
    header = FrameHeader(
        name="blocks", shape=values.shape, dtype=values.dtype, count=values.size, part=0, parts=1, start=0,
        stop=values.size, chain=Chain(DenseSelection(), coder, False), size=len(raw), crc=zlib.crc32(raw),
    )
    return [pack_frame(header, raw)]


def invalid_vectors(valid: dict[str, tuple[str, list[bytes], str | None]]) -> dict[str, tuple[str, bytes, str, str]]:
    """name -> (description, file bytes, error class, message fragment)."""
    raw = valid["dense-raw"][1]
    f32 = raw[0]  # "f32", dense raw float32
    i64 = next(f for f in raw if unpack_frame(f)[0].name == "i64")
    flag = next(f for f in raw if unpack_frame(f)[0].name == "flag")
    int8 = valid["int8"][1][0]
    int4 = valid["int4"][1][1]  # conv.bias: 4 values, blocks of 8
    int4_odd = next(f for f in valid["int4"][1] if unpack_frame(f)[0].count % 2)
    varint = valid["topk-varint-int8"][1][0]
    multi = valid["multipart-dense"][1]
    zstd_frame = next(f for f in valid["dense-raw-zstd"][1] if unpack_frame(f)[0].compressed)
    sign_odd = next(f for f in valid["dense-sign"][1] if unpack_frame(f)[0].count % 8)

    def edit_head(frame: bytes, fn: Callable[[bytearray], None]) -> bytes:
        head = head_of(frame)
        fn(head)
        return reseal(frame, bytes(head))

    name_at = 9  # 5 code bytes + u32 crc, then the name's varint length
    def after_name(frame: bytes) -> int:
        return name_at + 1 + head_of(frame)[name_at]

    def set_byte(at: int, value: int) -> Callable[[bytearray], None]:
        def fn(head: bytearray) -> None:
            head[at] = value
        return fn

    # zstd frame whose header leaves out the content size.
    _, stored = unpack_frame(zstd_frame)
    unsized = zstandard.ZstdCompressor(level=3, write_content_size=False).compress(
        zstandard.ZstdDecompressor().decompress(bytes(stored))
    )

    int8_raw = bytearray(raw_payload(int8))
    int8_raw[0] = 0x80  # code -128
    int4_raw = bytearray(raw_payload(int4))
    int4_raw[0] &= 0xF0  # low nibble 0: code -8
    odd_raw = bytearray(raw_payload(int4_odd))
    count = unpack_frame(int4_odd)[0].count
    odd_raw[count // 2] |= 0x80  # the padding nibble (high nibble of the last code byte)
    scale_raw = bytearray(raw_payload(int8))
    scale_raw[-4:] = struct.pack("<f", -1.0)
    nan_raw = bytearray(raw_payload(int8))
    nan_raw[-4:] = struct.pack("<f", float("nan"))
    sign_count = unpack_frame(sign_odd)[0].count
    sign_pad_raw = bytearray(raw_payload(sign_odd))
    sign_pad_raw[sign_count // 8] |= 0x80  # the last bit of the last bits byte: padding
    sign_scale_raw = bytearray(raw_payload(sign_odd))
    sign_scale_raw[-4:] = struct.pack("<f", -0.5)
    flag_raw = bytearray(raw_payload(flag))
    flag_raw[1] = 2
    # A varint index whose last position is the span itself, one past the part's end: its largest
    # gap (a 2-byte varint) grows by what it takes, and stays 2 bytes long.
    vh = unpack_frame(varint)[0]
    assert isinstance(vh.chain.selection, SparseSelection)
    cut = vh.chain.selection.index_bytes
    gaps = codec.stages.varint_decode(raw_payload(varint)[:cut], vh.chain.selection.k, "vector")
    last = int(np.sum(gaps.astype(np.int64) + 1) - 1)
    widest = int(np.argmax(gaps))
    gaps[widest] += np.uint64(vh.span - last)
    assert 128 <= int(gaps[widest]) < 1 << 14
    big_gap = codec.stages.varint_encode(gaps) + raw_payload(varint)[cut:]
    # A bitmap with the bit of position 39 set in a 33-position part (the last byte's bit 7).
    bitmap16 = next(f for f in valid["topk-bitmap-int4"][1] if unpack_frame(f)[0].name == "w16")
    b16 = unpack_frame(bitmap16)[0]
    bitmap_raw = bytearray(raw_payload(bitmap16))
    bitmap_raw[(b16.span + 7) // 8 - 1] |= 0x80

    delta_frames = valid["model-delta"][1]
    delta_payload = bytearray(raw_payload(delta_frames[0]))
    struct.pack_into("<I", delta_payload, 4, zlib.crc32(b"another base"))
    delta_bad_new = bytearray(raw_payload(delta_frames[1]))
    struct.pack_into("<I", delta_bad_new, 8, zlib.crc32(b"another result"))

    file = container
    cases: dict[str, tuple[str, bytes, str, str]] = {
        "bad-file-magic": ("not a frame file", b"FSNX\x01\x00\x00\x00" + container([f32])[8:], "container",
                           "not a FedSegNet frame file"),
        "no-end-marker": ("a frame file cut after its last frame (no u32 0 end marker)", container([f32])[:-4],
                          "container", "no end marker"),
        "bad-magic": ("a frame that starts with FSN3", file([b"FSN3" + f32[4:]]), "magic",
                      "not a FedSegNet codec frame"),
        "truncated-header": ("a frame shorter than its header length", file([f32[:20]]), "length",
                             "frame is truncated"),
        "header-checksum": ("one header byte changed, header crc not updated",
                            file([f32[:12] + bytes([f32[12] ^ 1]) + f32[13:]]), "header_checksum",
                            "header checksum mismatch"),
        "unknown-dtype": ("dtype code 15", file([edit_head(f32, set_byte(0, 15))]), "header",
                          "unknown dtype code 15"),
        "unknown-values": ("value coding code 5", file([edit_head(f32, set_byte(3, 5))]), "header",
                           "unknown values code 5"),
        "unknown-byte-stage": ("byte stage code 2", file([edit_head(f32, set_byte(4, 2))]), "header",
                               "unknown byte stage code 2"),
        "dense-with-index": ("dense selection with index coding 1 (varint)", file([edit_head(f32, set_byte(2, 1))]),
                             "header", "dense selection takes index coding 'none'"),
        "topk-without-index": ("top-k selection with index coding 0",
                               file([edit_head(varint, set_byte(2, 0))]), "header",
                               "topk selection needs an index coding"),
        "lossy-integer": ("an int64 tensor whose header says int8 values",
                          file([edit_head(i64, _int8_values_block_16)]), "header",
                          "tensors are sent dense and raw"),
        "overlong-varint": ("the ndim varint written as 0x82 0x00 (overlong)",
                            file([edit_head(f32, lambda h: h.__setitem__(slice(after_name(f32), after_name(f32) + 1),
                                                                         bytes([h[after_name(f32)] | 0x80, 0])))]),
                            "header", "overlong varint"),
        "trailing-header-bytes": ("a header with one byte after its last field",
                                  file([edit_head(f32, lambda h: h.append(0))]), "header",
                                  "bytes after its last field"),
        "k-over-span": ("top-k k larger than the part's span", file([_set_k(varint, vh.span + 1)]), "header",
                        "needs integer 'k' in [0,"),
        "payload-too-short": ("an uncompressed payload one byte shorter than its header implies",
                              file([f32[:-1]]), "length", "header says"),
        "payload-checksum": ("one payload byte changed, payload crc not updated",
                             file([f32[:-1] + bytes([f32[-1] ^ 1])]), "payload_checksum",
                             "payload checksum mismatch"),
        "zstd-no-content-size": ("a zstd payload whose frame header does not declare its content size",
                                 file([reseal(zstd_frame, bytes(head_of(zstd_frame)), unsized)]), "zstd",
                                 "zstd frame declares -1 bytes"),
        "zstd-corrupt": ("a zstd payload that is not a zstd frame",
                         file([reseal(zstd_frame, bytes(head_of(zstd_frame)), b"\x00" * 16)]), "zstd",
                         "not a zstd frame"),
        "int8-code-128": ("an int8 code of -128 (codes are in [-127, 127])", file([with_payload(int8, bytes(int8_raw))]),
                          "payload", "int8 code -128"),
        "int4-code-minus-8": ("an int4 nibble of 0 (code -8; codes are in [-7, 7])",
                              file([with_payload(int4, bytes(int4_raw))]), "payload", "int4 code 0"),
        "int4-padding": ("an odd int4 count whose padding nibble is not zero",
                         file([with_payload(int4_odd, bytes(odd_raw))]), "payload", "padding nibble"),
        "negative-scale": ("an int8 block scale of -1.0", file([with_payload(int8, bytes(scale_raw))]), "payload",
                           "negative or non-finite quantization scale"),
        "nan-scale": ("an int8 block scale that is NaN", file([with_payload(int8, bytes(nan_raw))]), "payload",
                      "negative or non-finite quantization scale"),
        "sign-padding": ("a sign value section whose padding bits are not zero",
                         file([with_payload(sign_odd, bytes(sign_pad_raw))]), "payload", "sign padding bits"),
        "sign-negative-scale": ("a sign scale of -0.5", file([with_payload(sign_odd, bytes(sign_scale_raw))]),
                                "payload", "negative or non-finite sign scale"),
        "bool-2": ("a bool tensor holding the byte 2", file([with_payload(flag, bytes(flag_raw))]), "payload",
                   "bool values other than 0 and 1"),
        "index-out-of-range": ("a varint index whose last position is the span itself (one past the end)",
                               file([with_payload(varint, big_gap)]), "payload", "out of range"),
        "bitmap-past-span": ("a bitmap with a bit set past the part's span",
                             file([with_payload(bitmap16, bytes(bitmap_raw))]), "payload", "bits set past position"),
        "missing-part": ("a stream that ends after part 2 of 3", file(multi[:2]), "stream", "truncated"),
        "parts-out-of-order": ("part 3 before part 2", file([multi[0], multi[2], multi[1], *multi[3:]]), "stream",
                               "out of order"),
        "tensor-twice": ("the same tensor twice in one stream", file([f32, f32]), "stream", "appears twice"),
        "delta-wrong-base": ("a delta whose base checksum is not model-base's", file([with_payload(
            delta_frames[0], bytes(delta_payload)), *delta_frames[1:]]), "delta", "another base model"),
        "delta-bad-result": ("a delta whose result checksum does not match what it rebuilds", file([
            delta_frames[0], with_payload(delta_frames[1], bytes(delta_bad_new)), *delta_frames[2:]]), "delta",
            "fails its checksum"),
    }
    return cases


def _int8_values_block_16(head: bytearray) -> None:
    head[3] = 2  # values: int8
    head.extend(b"\x10")  # its block field


def _set_k(frame: bytes, k: int) -> bytes:
    """A top-k frame with its header's k replaced (varint re-written)."""
    header, stored = unpack_frame(frame)
    assert isinstance(header.chain.selection, SparseSelection)
    head = head_of(frame)
    tail = codec.stages.varint_encode(np.array([header.chain.selection.k, header.chain.selection.index_bytes]))
    at = bytes(head).rindex(tail)
    new_tail = codec.stages.varint_encode(np.array([k, header.chain.selection.index_bytes]))
    return reseal(frame, bytes(head[:at]) + new_tail + bytes(head[at + len(tail):]), bytes(stored))


# ------------------------------------------------------------------------------------------------
# writing


def lossless_sha256(tensors: Iterable[tuple[str, np.ndarray]]) -> str:
    return frames_sha256(codec.encode_tensors(list(tensors), codec.LOSSLESS))


def build() -> dict[str, bytes]:
    """Every vector file, name -> bytes."""
    out: dict[str, bytes] = {}
    valid = valid_vectors()
    decoded: dict[str, list[tuple[str, np.ndarray]]] = {}
    for name, (description, frames, base) in valid.items():
        if base is None:
            tensors = list(codec.decode_frames(frames))
        else:
            tensors = list(codec.apply_model_delta(decoded[base], frames))
        decoded[name] = tensors
        meta = {
            "description": description,
            "valid": True,
            "base": base,
            "frames": len(frames),
            "frames_sha256": frames_sha256(frames),
            "lossless_sha256": lossless_sha256(tensors),
            "encodings": sorted({unpack_frame(f)[0].encoding for f in frames}),
            "tensors": describe(tensors),
        }
        out[f"{name}.frames"] = container(frames)
        out[f"{name}.json"] = (json.dumps(meta, indent=2) + "\n").encode()
    for name, (description, data, error, message) in invalid_vectors(valid).items():
        base = "model-base" if name.startswith("delta-") else None
        meta = {"description": description, "valid": False, "base": base, "error": error, "message": message}
        out[f"invalid-{name}.frames"] = data
        out[f"invalid-{name}.json"] = (json.dumps(meta, indent=2) + "\n").encode()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=VECTORS, help="directory to write (default: %(default)s)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    files = build()
    for stale in args.out.glob("*"):
        if stale.name not in files and stale.suffix in (".frames", ".json"):
            stale.unlink()
    for name, data in files.items():
        (args.out / name).write_bytes(data)
    print(f"wrote {len(files) // 2} vectors to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
