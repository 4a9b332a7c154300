"""The one atomic writer: a failed write keeps the old file; ``mode`` is set before any byte lands."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from codec import atomic_write_bytes, atomic_write_text, atomic_writer


class Interrupted(RuntimeError):
    pass


def test_a_write_that_fails_halfway_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    atomic_write_text(path, '{"round": 1}\n')

    with pytest.raises(Interrupted):
        with atomic_writer(path) as fh:
            fh.write(b'{"round": 2, "resid')
            fh.flush()
            raise Interrupted("killed mid-write")

    assert path.read_text() == '{"round": 1}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_a_failed_first_write_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "new.bin"

    with pytest.raises(Interrupted):
        with atomic_writer(path) as fh:
            fh.write(b"partial")
            raise Interrupted

    assert not path.exists()
    assert list((tmp_path / "sub").iterdir()) == []


def test_a_finished_write_replaces_the_file(tmp_path: Path) -> None:
    path = tmp_path / "m.frames"
    atomic_write_bytes(path, b"old")

    atomic_write_bytes(path, b"new bytes")

    assert path.read_bytes() == b"new bytes"
    assert [p.name for p in tmp_path.iterdir()] == ["m.frames"]


@pytest.mark.parametrize("mode", [0o600, 0o644, 0o640])
def test_mode_is_the_new_files_permissions(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "f"

    atomic_write_bytes(path, b"x", mode=mode)

    assert stat.S_IMODE(path.stat().st_mode) == mode


def test_mode_is_set_before_the_first_byte_is_written(tmp_path: Path) -> None:
    # A private key must never sit readable by others, not even while it is being written.
    with atomic_writer(tmp_path / "site.key", mode=0o600) as fh:
        during = stat.S_IMODE(os.fstat(fh.fileno()).st_mode)
        fh.write(b"-----BEGIN PRIVATE KEY-----\n")

    assert during == 0o600


def test_mode_replaces_an_existing_files_permissions(tmp_path: Path) -> None:
    path = tmp_path / "ca.key"
    path.write_bytes(b"old")
    path.chmod(0o644)

    atomic_write_bytes(path, b"new", mode=0o600)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_without_mode_the_file_is_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "f"

    atomic_write_text(path, "x")

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
