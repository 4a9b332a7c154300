"""Frame files: write/read, truncation, and the save/load conveniences."""

from __future__ import annotations

import io

import numpy as np
import pytest

import codec
from codec import FILE_MAGIC, CodecError, CodecSpec

TENSORS = {
    "z.last_alphabetically": np.arange(6, dtype=np.float32).reshape(2, 3),
    "a.first_alphabetically": np.array([True, False]),
    "m.scalar": np.array(3.5, dtype=np.float64),
    "big": np.random.default_rng(0).standard_normal(400_000).astype(np.float32),  # 2 frames
}


def container_bytes(frames) -> bytes:
    buffer = io.BytesIO()
    codec.write_frames(buffer, frames)
    return buffer.getvalue()


def test_write_then_read_gives_back_the_frames():
    frames = list(codec.encode_tensors(TENSORS))
    buffer = io.BytesIO()

    written = codec.write_frames(buffer, frames)
    buffer.seek(0)
    read = list(codec.read_frames(buffer))

    assert read == frames
    # magic (8) + per frame a 4-byte length + the end marker (4)
    assert written == len(buffer.getvalue()) == 8 + sum(4 + len(f) for f in frames) + 4


def test_an_empty_container_holds_no_frames():
    data = container_bytes([])

    assert data == FILE_MAGIC + b"\0\0\0\0"
    assert list(codec.read_frames(io.BytesIO(data))) == []


@pytest.mark.parametrize("cut", [0, 5, 8, 10, 12, 40, -5, -4, -1])  # the file has 67 bytes
def test_a_truncated_file_is_refused(cut):
    data = container_bytes(codec.encode_tensors({"w": np.ones(50, np.float32)}))

    with pytest.raises(CodecError, match="truncated|not a FedSegNet frame file"):
        list(codec.read_frames(io.BytesIO(data[:cut])))


def test_a_frame_length_over_the_limit_is_refused_before_reading_it():
    data = FILE_MAGIC + (2_000_000).to_bytes(4, "little")

    with pytest.raises(CodecError, match="frame 0 claims 2000000 bytes, over the limit of 1048576"):
        list(codec.read_frames(io.BytesIO(data)))
    with pytest.raises(CodecError, match="over the limit of 100"):
        list(codec.read_frames(io.BytesIO(FILE_MAGIC + (101).to_bytes(4, "little")), max_frame_bytes=100))


def test_a_file_that_is_not_a_frame_file_is_refused():
    with pytest.raises(CodecError, match="not a FedSegNet frame file"):
        list(codec.read_frames(io.BytesIO(b"PK\x03\x04 a zip file")))


def test_save_then_load_keeps_order_dtypes_and_values(tmp_path):
    path = tmp_path / "model.frames"

    size = codec.save_tensors(path, TENSORS)
    loaded = codec.load_tensors(path)

    assert size == path.stat().st_size
    assert list(loaded) == list(TENSORS)
    for name, value in TENSORS.items():
        assert loaded[name].dtype == value.dtype and loaded[name].tobytes() == value.tobytes()
    assert [p.name for p in tmp_path.iterdir()] == ["model.frames"]  # no temporary left behind


def test_save_with_a_lossy_spec(tmp_path):
    path = tmp_path / "residual.frames"

    codec.save_tensors(path, {"x": np.linspace(-1, 1, 100, dtype=np.float32)}, CodecSpec(quantization="fp16"))

    np.testing.assert_allclose(codec.load_tensors(path)["x"], np.linspace(-1, 1, 100), atol=1e-3)


def test_a_failed_save_leaves_the_previous_file_intact(tmp_path):
    path = tmp_path / "state.frames"
    codec.save_tensors(path, {"old": np.ones(3, np.float32)})

    def failing():
        yield "new", np.zeros(3, np.float32)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        codec.save_tensors(path, failing())

    assert list(codec.load_tensors(path)) == ["old"]
    assert [p.name for p in tmp_path.iterdir()] == ["state.frames"]


def test_load_refuses_a_corrupted_file(tmp_path):
    path = tmp_path / "m.frames"
    codec.save_tensors(path, {"w": np.arange(100, dtype=np.float32)}, CodecSpec(zstd_level=0))
    data = bytearray(path.read_bytes())
    data[-20] ^= 1
    path.write_bytes(bytes(data))

    with pytest.raises(CodecError, match="tensor 'w' part 1/1: payload checksum mismatch"):
        codec.load_tensors(path)
