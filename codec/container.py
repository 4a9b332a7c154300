"""A file of frames: what the store and a client's state directory keep on disk.

Layout: ``b"FSNC" + u8 version (1) + 3 zero bytes``, then per frame ``u32 length (LE) + frame``,
then a ``u32 0`` end marker. The end marker makes a file cut at a frame boundary detectable.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

import numpy as np

from .errors import CodecError
from .frame import MAX_FRAME_BYTES
from .spec import LOSSLESS, CodecSpec
from .stream import DEFAULT_MAX_TENSOR_BYTES, NamedTensors, decode_frames, encode_tensors

__all__ = [
    "FILE_MAGIC", "write_frames", "read_frames", "save_tensors", "load_tensors", "atomic_writer", "atomic_write_bytes",
    "fsync_dir", "frames_digest", "remove_temporaries", "atomic_write_text", "file_digest", "DigestingFrames",
]

FILE_MAGIC = b"FSNC\x01\x00\x00\x00"
_LENGTH = struct.Struct("<I")


def write_frames(fileobj: BinaryIO, frames: Iterable[bytes]) -> int:
    """Write a frame container to an open binary file; return the bytes written.

    Frames are written as they come, so a streaming source is never held whole. An exception
    raised by ``frames`` propagates and leaves the file without its end marker (unreadable).
    """
    written = fileobj.write(FILE_MAGIC) or 0
    for frame in frames:
        size = len(frame)
        if not 0 < size <= MAX_FRAME_BYTES:
            raise CodecError(f"cannot store a frame of {size} bytes (1..{MAX_FRAME_BYTES})")
        written += fileobj.write(_LENGTH.pack(size)) or 0
        written += fileobj.write(frame) or 0
    written += fileobj.write(_LENGTH.pack(0)) or 0
    return written


def _read_exact(fileobj: BinaryIO, size: int, what: str) -> bytes:
    data = fileobj.read(size)
    if data is None or len(data) != size:
        got = 0 if data is None else len(data)
        raise CodecError(f"frame file is truncated: {what} needs {size} bytes, got {got}")
    return data


def read_frames(fileobj: BinaryIO, *, max_frame_bytes: int = MAX_FRAME_BYTES) -> Iterator[bytes]:
    """Yield the frames of a container written by :func:`write_frames`, one at a time.

    Raises:
        CodecError: not a frame file, a length over ``max_frame_bytes`` (checked before reading
            the frame), or a truncated file (a partial frame or a missing end marker).
    """
    magic = fileobj.read(len(FILE_MAGIC))
    if magic != FILE_MAGIC:
        raise CodecError(f"not a FedSegNet frame file (starts with {magic[:8]!r}, expected {FILE_MAGIC!r})")
    index = 0
    while True:
        head = fileobj.read(_LENGTH.size)
        if len(head) != _LENGTH.size:
            raise CodecError(f"frame file is truncated after {index} frames (no end marker)")
        (size,) = _LENGTH.unpack(head)
        if size == 0:
            return
        if size > max_frame_bytes:
            raise CodecError(f"frame {index} claims {size} bytes, over the limit of {max_frame_bytes}")
        yield _read_exact(fileobj, size, f"frame {index}")
        index += 1


def frames_digest(frames: Iterable[bytes]) -> str:
    """SHA-256 (hex) of frames concatenated in order: the digest an upload, a model and a
    download are identified by (the container's magic and length prefixes are not part of it)."""
    sha = hashlib.sha256()
    for frame in frames:
        sha.update(frame)
    return sha.hexdigest()


def file_digest(path: str | os.PathLike[str]) -> str:
    """:func:`frames_digest` of a frame file's frames (read one at a time)."""
    with open(path, "rb") as fh:
        return frames_digest(read_frames(fh))


class DigestingFrames:
    """Pass frames through while hashing and counting them, for writers that stream them on.

    ``hexdigest()`` is :func:`frames_digest` of the frames seen so far; ``count`` and ``nbytes``
    are how many frames and frame bytes went through.
    """

    def __init__(self, frames: Iterable[bytes] = ()) -> None:
        self._frames = frames
        self._sha = hashlib.sha256()
        self.count = 0
        self.nbytes = 0

    def update(self, frame: bytes) -> None:
        self._sha.update(frame)
        self.count += 1
        self.nbytes += len(frame)

    def __iter__(self) -> Iterator[bytes]:
        for frame in self._frames:
            self.update(frame)
            yield frame

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename inside directory ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        dir_fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str], *, mode: int | None = None) -> Iterator[BinaryIO]:
    """Yield a binary file that replaces ``path`` atomically when the block exits without error.

    The one atomic write of the project: a temporary file in the same directory
    (``.NAME.*.tmp``) is fsynced, renamed over ``path`` and the directory fsynced, so readers
    (and a crash) see either the old file or the new one, never a mix; an error removes the
    temporary file. A crash can still leave one behind: see :func:`remove_temporaries`.

    ``mode`` sets the new file's permission bits (umask not applied) before anything is written;
    without it the file keeps the temporary file's 0o600 (owner only). A private key is
    therefore never readable by others, not even while it is being written.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            if mode is not None:
                os.fchmod(fh.fileno(), mode)
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(target.parent)


TEMP_SUFFIX = ".tmp"


def remove_temporaries(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files :func:`atomic_writer` left in ``directory`` when a process died
    mid-write (``.NAME.*.tmp``); returns what was removed. Call it only when no writer runs there."""
    removed = []
    for tmp in Path(directory).glob(f".*{TEMP_SUFFIX}"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def atomic_write_text(path: str | os.PathLike[str], text: str, *, mode: int | None = None) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically (see :func:`atomic_writer`)."""
    atomic_write_bytes(path, text.encode(), mode=mode)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, mode: int | None = None) -> None:
    """Replace ``path`` with ``data`` atomically (see :func:`atomic_writer`)."""
    with atomic_writer(path, mode=mode) as fh:
        fh.write(data)


def save_tensors(path: str | os.PathLike[str], tensors: NamedTensors, spec: CodecSpec = LOSSLESS) -> int:
    """Atomically write named tensors to ``path`` as a frame file; return its size in bytes."""
    with atomic_writer(path) as fh:
        return write_frames(fh, encode_tensors(tensors, spec))


def load_tensors(
    path: str | os.PathLike[str], *, max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES
) -> dict[str, np.ndarray]:
    """Read a frame file written by :func:`save_tensors`: name -> array, in the order written."""
    with open(path, "rb") as fh:
        return dict(decode_frames(read_frames(fh), max_tensor_bytes=max_tensor_bytes))
