"""``fedseg certs`` writes through the one atomic writer: keys owner-only, certificates world-readable."""

from __future__ import annotations

import stat
from pathlib import Path

from aggregator_service import certs


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_keys_are_owner_only_and_certificates_readable(tmp_path: Path) -> None:
    certs.init_ca(tmp_path)
    site = certs.issue_site(tmp_path, "site-1")
    server = certs.issue_server(tmp_path, ["aggregator"])

    for key in (tmp_path / certs.CA_KEY, site.key, server.key):
        assert mode(key) == 0o600, key
    for public in (tmp_path / certs.CA_CERT, tmp_path / certs.REVOKED, site.cert, server.cert):
        assert mode(public) == 0o644, public


def test_a_rotated_key_replaces_the_old_one_with_the_same_mode_and_no_leftovers(tmp_path: Path) -> None:
    certs.init_ca(tmp_path)
    first = certs.issue_site(tmp_path, "site-1")
    old_key = first.key.read_bytes()

    second = certs.issue_site(tmp_path, "site-1", rotate=True)

    assert second.key == first.key and second.key.read_bytes() != old_key
    assert mode(second.key) == 0o600
    assert sorted(p.name for p in (tmp_path / "sites").iterdir()) == ["site-1.crt", "site-1.key"]
    assert not list(tmp_path.rglob("*.tmp"))
