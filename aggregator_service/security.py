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
    AggregatorError,
    BrokenStream,
    IdentityMismatch,
    Revoked,
    TooManyStreams,
    Unauthenticated,
    UploadTimeout,
    check_site_name,
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


def certificate_common_name(pem: bytes) -> str | None:
    """The (first) common name of a PEM certificate, exactly as stored (None without ``cryptography``)."""
    try:
        from cryptography import x509
        from cryptography.x509.oid import NameOID
    except ImportError:
        return None
    names = x509.load_pem_x509_certificate(pem).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


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
    pem = (auth.get("x509_pem_cert") or [b""])[0]
    # TLS reports the CN as a C string: a CA-signed "site-a\0evil" would read as "site-a". The
    # certificate itself is the truth, and its CN must be a site name (what `fedseg certs` issues).
    actual = certificate_common_name(pem) if pem else None
    if actual is not None and actual != cn:
        raise Unauthenticated(f"the client certificate's common name is {actual!r}, not the {cn!r} TLS reported")
    try:
        check_site_name(cn)
    except AggregatorError:
        raise Unauthenticated(f"the client certificate's common name {cn!r} is not a valid site name") from None
    for san in auth.get("x509_subject_alternative_name") or ():
        text = san.decode("utf-8", "replace")
        if text.startswith(SITE_URI_PREFIX) and text[len(SITE_URI_PREFIX):] != cn:
            raise Unauthenticated(f"the client certificate names site {cn!r} in its CN but {text!r} in its SAN")
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
    header_timeout_seconds: float = 10.0
    """An upload's header must arrive within this many seconds of the call."""
    idle_timeout_seconds: float = 60.0
    """An upload that sends nothing for this long is cut off (and loses its spool slot)."""
    max_pending_headers: int = 4
    """Uploads that may wait the full ``header_timeout_seconds`` at once, over all peers; beyond
    it a header must arrive within ``CROWDED_HEADER_SECONDS`` (an honest client sends it with the
    call), so streams that never send one cannot pin the server's worker threads."""

    def __post_init__(self) -> None:
        for name in ("max_upload_seconds", "header_timeout_seconds", "idle_timeout_seconds"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_streams_per_site < 1:
            raise ValueError(f"max_streams_per_site must be >= 1, got {self.max_streams_per_site}")
        if self.max_pending_headers < 1:
            raise ValueError(f"max_pending_headers must be >= 1, got {self.max_pending_headers}")


CROWDED_HEADER_SECONDS = 0.25


class HeaderWaits:
    """Uploads waiting for their header: at most ``per_peer`` per peer (refused beyond), and the
    full wait for at most ``total`` at once (the others get ``CROWDED_HEADER_SECONDS``)."""

    def __init__(self, per_peer: int, total: int, wait_s: float) -> None:
        self.per_peer, self.total, self.wait_s = per_peer, total, wait_s
        self._lock = threading.Lock()
        self._held: dict[str, int] = {}

    @contextlib.contextmanager
    def hold(self, peer: str) -> Iterator[float]:
        """Count one upload of ``peer`` as waiting; yields how long its header may take."""
        with self._lock:
            held = self._held.get(peer, 0)
            if held >= self.per_peer:
                raise TooManyStreams(
                    f"{peer} already has {held} upload(s) waiting for a header, the limit is {self.per_peer}; "
                    "send the header first"
                )
            crowded = sum(self._held.values()) >= self.total
            self._held[peer] = held + 1
        try:
            yield min(self.wait_s, CROWDED_HEADER_SECONDS) if crowded else self.wait_s
        finally:
            with self._lock:
                left = self._held[peer] - 1
                if left:
                    self._held[peer] = left
                else:
                    del self._held[peer]


class StreamSlots:
    """A counting semaphore per site (and optionally in total) that refuses instead of waiting."""

    def __init__(self, per_site: int, total: int | None = None, *, what: str = "stream(s) open") -> None:
        self.per_site = per_site
        self.total = total
        self.what = what
        self._lock = threading.Lock()
        self._held: dict[str, int] = {}

    @contextlib.contextmanager
    def hold(self, site: str) -> Iterator[None]:
        with self._lock:
            held = self._held.get(site, 0)
            if held >= self.per_site:
                raise TooManyStreams(
                    f"site {site!r} already has {held} {self.what}, the limit is {self.per_site}; "
                    "retry when one has finished"
                )
            if self.total is not None and sum(self._held.values()) >= self.total:
                raise TooManyStreams(
                    f"the aggregator already has {self.total} {self.what}, its limit; retry in a moment"
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
    items: Iterable[Any], seconds: float, *, what: str = "upload", clock: Callable[[], float] = time.monotonic,
    first_item_s: float | None = None, idle_s: float | None = None,
) -> Generator[Any, None, None]:
    """Yield ``items`` until they end, or raise :class:`UploadTimeout` ``seconds`` after the start,
    when the first item takes longer than ``first_item_s``, or any later one longer than ``idle_s``.

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
    first = True
    try:
        while True:
            now = clock()
            left = deadline - now
            if left <= 0:
                raise UploadTimeout(f"the {what} did not finish within {seconds:g} s; it was discarded")
            wait_s, why = left, None
            if first and first_item_s is not None and first_item_s < wait_s:
                wait_s, why = first_item_s, f"sent no header within {first_item_s:g} s"
            elif not first and idle_s is not None and idle_s < wait_s:
                wait_s, why = idle_s, f"sent nothing for {idle_s:g} s"
            try:
                item = box.get(timeout=wait_s)
            except queue.Empty:
                if why is not None:
                    raise UploadTimeout(f"the {what} {why}; it was discarded") from None
                continue
            first = False
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
        # Keyed by the peer's identity (its certificate's site, or its address in insecure mode).
        self.headers = HeaderWaits(limits.max_streams_per_site, limits.max_pending_headers,
                                   limits.header_timeout_seconds)

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

    def awaiting_header(self, peer: str) -> contextlib.AbstractContextManager[float]:
        """Count an upload of ``peer`` whose header has not arrived; yields how long it may take."""
        return self.headers.hold(peer)

    def bounded_upload(self, requests: Iterable[Any], header_s: float | None = None) -> Generator[Any, None, None]:
        limits = self.limits
        return within_deadline(requests, limits.max_upload_seconds, what="upload",
                               first_item_s=header_s or limits.header_timeout_seconds,
                               idle_s=limits.idle_timeout_seconds)


def env_flag(name: str) -> bool:
    """A boolean environment variable: 1/true/yes/on (any case) is true."""
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}
