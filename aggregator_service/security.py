"""Who may talk to the aggregator, and for how long: mTLS identity, revocation, stream limits.

The servicer asks a :class:`Gate` before it calls the aggregator:

* **identity**: with mutual TLS, a site *is* the common name of the client certificate it
  presented (signed by the federation CA, ``fedseg certs``); a request that names another site
  is refused with ``PERMISSION_DENIED`` naming both. Without TLS (``--insecure``, development
  only) the request's own ``site`` field is taken at its word.
* **revocation**: a plain-text file (``--revoked``), one entry a line: a site name (every
  certificate of that site) or ``serial:HEX`` (one certificate, e.g. after a rotation). It is
  re-read whenever its modification time changes, so revoking needs no restart.
* **limits**: at most ``max_streams_per_site`` concurrent streams (uploads and downloads) per
  site (``RESOURCE_EXHAUSTED`` beyond), and an upload must finish within
  ``max_upload_seconds`` of its first message (``DEADLINE_EXCEEDED``), so a stream that never
  ends cannot hold a worker thread or a spool file forever.

Every refusal is an :class:`~aggregator_service.errors.AggregatorError`, so the servicer counts
it under its ``reason`` in ``GetStatus.rejections`` like any other.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generator, Iterable, Iterator, Mapping, Sequence

import grpc

from aggregator_service.errors import (
    BrokenStream,
    IdentityMismatch,
    Revoked,
    TooManyStreams,
    Unauthenticated,
    UploadTimeout,
)

log = logging.getLogger(__name__)

SITE_URI_PREFIX = "spiffe://fedsegnet/site/"
"""Site certificates also carry ``spiffe://fedsegnet/site/NAME`` as a SAN URI."""
SERIAL_PREFIX = "serial:"
RETRYABLE_METADATA = ("fedseg-retryable", "1")
"""Trailing metadata on a refusal that a client should retry with backoff (the status alone,
e.g. RESOURCE_EXHAUSTED, is also used for refusals that no retry can fix, like an oversized update)."""
_HEX = re.compile(r"^(0x)?[0-9a-fA-F]+$")


# ---------------------------------------------------------------------------------------------
# refusals (counted like every AggregatorError under their reason)


# (defined in errors.py, with every other refusal of the aggregator)


# ---------------------------------------------------------------------------------------------
# TLS


def _read(path: str | Path, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{what} {path} does not exist (make one with `fedseg certs`)") from None
    if b"-----BEGIN" not in data:
        raise ValueError(f"{what} {path} is not a PEM file")
    return data


def server_credentials(cert: str | Path, key: str | Path, ca: str | Path) -> grpc.ServerCredentials:
    """Mutual TLS: the aggregator's certificate and key, and the federation CA that signs sites.

    Clients must present a certificate signed by ``ca`` (``require_client_auth``); the TLS
    handshake refuses any other peer before a request reaches the servicer.
    """
    return grpc.ssl_server_credentials(
        [(_read(key, "TLS key"), _read(cert, "TLS certificate"))],
        root_certificates=_read(ca, "TLS CA certificate"),
        require_client_auth=True,
    )


@dataclass(frozen=True)
class Peer:
    """The authenticated caller: its site name (certificate CN) and certificate serial."""

    site: str
    serial: int | None


def _first(auth: Mapping[str, Sequence[bytes]], key: str) -> str | None:
    values = auth.get(key) or ()
    return values[0].decode("utf-8", "replace") if values else None


def certificate_serial(pem: bytes) -> int | None:
    """The serial number of a PEM certificate (None when ``cryptography`` is not installed)."""
    try:
        from cryptography import x509
    except ImportError:  # name revocation still works; serial revocation needs the package
        return None
    return x509.load_pem_x509_certificate(pem).serial_number


def _can_read_serials() -> bool:
    try:
        import cryptography  # noqa: F401
    except ImportError:
        return False
    return True


def peer_from_auth_context(auth: Mapping[str, Sequence[bytes]]) -> Peer | None:
    """The site a TLS peer authenticated as, or None for a plaintext connection.

    The site is the certificate's common name; when the certificate also carries a
    ``spiffe://fedsegnet/site/NAME`` URI, the two must agree (a certificate cannot name two sites).
    """
    if _first(auth, "transport_security_type") != "ssl":
        return None
    cn = _first(auth, "x509_common_name")
    if not cn:
        raise Unauthenticated("the client certificate has no common name; issue site certificates with `fedseg certs site`")
    for san in auth.get("x509_subject_alternative_name") or ():
        text = san.decode("utf-8", "replace")
        if text.startswith(SITE_URI_PREFIX) and text[len(SITE_URI_PREFIX):] != cn:
            raise Unauthenticated(f"the client certificate names site {cn!r} in its CN but {text!r} in its SAN")
    pem = (auth.get("x509_pem_cert") or [b""])[0]
    return Peer(site=cn, serial=certificate_serial(pem) if pem else None)


# ---------------------------------------------------------------------------------------------
# revocation


def revocation_entry(*, site: str | None = None, serial: int | None = None) -> str:
    """One line of a revocation file: a site name, or ``serial:HEX`` for one certificate."""
    if (site is None) == (serial is None):
        raise ValueError("give exactly one of site= or serial=")
    return site if site is not None else f"{SERIAL_PREFIX}{serial:x}"


def parse_revocations(text: str) -> tuple[frozenset[str], frozenset[int]]:
    """(revoked site names, revoked certificate serials) of a revocation file's text.

    Blank lines and ``#`` comments are ignored; ``serial:HEX`` (``0x`` optional) names one
    certificate; any other line is a site name.
    """
    sites: set[str] = set()
    serials: set[int] = set()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.lower().startswith(SERIAL_PREFIX):
            value = line[len(SERIAL_PREFIX):].strip().replace(":", "")
            if not _HEX.match(value):
                raise ValueError(f"line {number}: {line!r} is not serial:HEX")
            serials.add(int(value, 16))
        else:
            sites.add(line)
    return frozenset(sites), frozenset(serials)


class RevocationList:
    """A revocation file, re-read when its modification time, size or inode changes.

    If the file becomes unreadable or invalid after start-up, the last good list stays in force
    (an error is logged): what was revoked stays revoked. Serial entries need the
    ``cryptography`` package to read peers' serials; without it such a file is refused rather
    than half-enforced.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self.sites: frozenset[str] = frozenset()
        self.serials: frozenset[int] = frozenset()
        try:
            self._reload(strict=True)
        except FileNotFoundError:
            raise ValueError(
                f"revocation file {self.path} does not exist (create it empty, or with `fedseg certs init`)"
            ) from None

    def _reload(self, *, strict: bool = False) -> None:
        try:
            stat = self.path.stat()
            # The inode too: an atomic replace within one timestamp tick keeps mtime and maybe size.
            stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
            if stamp == self._stamp:
                return
            sites, serials = parse_revocations(self.path.read_text())
            if serials and not _can_read_serials():
                raise ValueError("it revokes certificate serials, which needs the 'cryptography' package "
                                 "to read peers' serials (pip install cryptography)")
        except (OSError, ValueError) as exc:
            if strict:
                raise
            if self._stamp != (-1, -1, -1):
                log.error("revocation file %s unusable (%s); keeping the last list", self.path, exc)
                self._stamp = (-1, -1, -1)
            return
        self.sites, self.serials, self._stamp = sites, serials, stamp
        log.info("revocation list %s: %d site(s), %d serial(s)", self.path, len(sites), len(serials))

    def check(self, site: str, serial: int | None = None) -> None:
        """Raise :class:`Revoked` when the site or this certificate is on the list."""
        with self._lock:
            self._reload()
            sites, serials = self.sites, self.serials
        if site in sites:
            raise Revoked(f"site {site!r} is revoked ({self.path})")
        if serial is not None and serial in serials:
            raise Revoked(f"the certificate of site {site!r} (serial {serial:x}) is revoked ({self.path})")


# ---------------------------------------------------------------------------------------------
# stream limits


@dataclass(frozen=True)
class StreamLimits:
    """Per-stream limits the servicer enforces (beyond gRPC's per-message size limit)."""

    max_upload_seconds: float = 900.0
    """An upload must end (commit) within this many seconds of its first message."""
    max_streams_per_site: int = 2
    """Concurrent uploads + downloads one site may hold open."""

    def __post_init__(self) -> None:
        if not self.max_upload_seconds > 0:
            raise ValueError(f"max_upload_seconds must be > 0, got {self.max_upload_seconds}")
        if self.max_streams_per_site < 1:
            raise ValueError(f"max_streams_per_site must be >= 1, got {self.max_streams_per_site}")


class StreamSlots:
    """A counting semaphore per site that refuses instead of waiting."""

    def __init__(self, per_site: int) -> None:
        self.per_site = per_site
        self._lock = threading.Lock()
        self._held: dict[str, int] = {}

    @contextlib.contextmanager
    def hold(self, site: str) -> Iterator[None]:
        with self._lock:
            held = self._held.get(site, 0)
            if held >= self.per_site:
                raise TooManyStreams(
                    f"site {site!r} already has {held} stream(s) open, the limit is {self.per_site}; "
                    "retry when one has finished"
                )
            self._held[site] = held + 1
        try:
            yield
        finally:
            with self._lock:
                left = self._held[site] - 1
                if left:
                    self._held[site] = left
                else:
                    del self._held[site]

    def held(self, site: str) -> int:
        with self._lock:
            return self._held.get(site, 0)


_END = object()


def within_deadline(
    items: Iterable[Any], seconds: float, *, what: str = "upload", clock: Callable[[], float] = time.monotonic
) -> Generator[Any, None, None]:
    """Yield ``items`` until they end, or raise :class:`UploadTimeout` ``seconds`` after the start.

    gRPC's request iterator blocks in ``next()`` with no timeout, so a reader thread pulls from it
    into a small queue and the caller waits on the queue with the time left. When the caller
    gives up, the server ends the call, which wakes the reader (it then exits). A
    ``grpc.RpcError`` from the stream (the peer went away) becomes :class:`BrokenStream`.
    """
    deadline = clock() + seconds
    box: queue.Queue[Any] = queue.Queue(maxsize=2)  # bounded: the reader never runs far ahead
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                box.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def reader() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_END)
        except BaseException as exc:  # handed to the consumer, which raises it
            put(exc)

    thread = threading.Thread(target=reader, name=f"{what}-reader", daemon=True)
    thread.start()
    try:
        while True:
            left = deadline - clock()
            if left <= 0:
                raise UploadTimeout(f"the {what} did not finish within {seconds:g} s; it was discarded")
            try:
                item = box.get(timeout=left)
            except queue.Empty:
                continue
            if item is _END:
                return
            if isinstance(item, grpc.RpcError):
                raise BrokenStream(f"the {what} stream broke before its end ({item.__class__.__name__})")
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


# ---------------------------------------------------------------------------------------------
# the gate the servicer asks


class Gate:
    """Authorises each call: who the peer is, whether it is revoked, whether it may open a stream.

    ``require_identity=True`` (mutual TLS) refuses plaintext peers and makes the certificate's CN
    the only site a peer may act as. With ``False`` (``--insecure``) the claimed site is trusted.
    """

    def __init__(
        self,
        *,
        require_identity: bool = False,
        revocations: RevocationList | None = None,
        limits: StreamLimits = StreamLimits(),
    ) -> None:
        self.require_identity = require_identity
        self.revocations = revocations
        self.limits = limits
        self.slots = StreamSlots(limits.max_streams_per_site)

    def authorize(self, context: grpc.ServicerContext, claimed: str) -> str:
        """The site this call acts for (``claimed``, or the certificate's when ``claimed`` is empty).

        An empty result means an anonymous operator read (insecure mode, no site given).
        """
        peer = peer_from_auth_context(context.auth_context())
        if peer is None:
            if self.require_identity:
                raise Unauthenticated("this aggregator requires a client certificate (mutual TLS)")
            if claimed and self.revocations is not None:
                self.revocations.check(claimed)
            return claimed
        if self.revocations is not None:
            self.revocations.check(peer.site, peer.serial)
        if claimed and claimed != peer.site:
            raise IdentityMismatch(
                f"the client certificate identifies site {peer.site!r}, but the request is for site {claimed!r}; "
                "a site may only act as itself"
            )
        return peer.site

    def stream(self, site: str) -> contextlib.AbstractContextManager[None]:
        """Hold one of ``site``'s stream slots for the duration of a ``with`` block."""
        return self.slots.hold(site)

    def bounded_upload(self, requests: Iterable[Any]) -> Generator[Any, None, None]:
        return within_deadline(requests, self.limits.max_upload_seconds, what="upload")


def env_flag(name: str) -> bool:
    """A boolean environment variable: 1/true/yes/on (any case) is true."""
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}
