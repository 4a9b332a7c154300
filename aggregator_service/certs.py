"""``fedseg certs``: the federation's certificate authority, site and aggregator certificates.

A small, file-based PKI for mutual TLS between client agents and the aggregator::

    fedseg certs init --dir pki                          # pki/ca.crt, pki/ca.key, pki/revoked.txt
    fedseg certs server --dir pki --dns aggregator --dns localhost --ip 127.0.0.1
                                                         # pki/server/aggregator.crt + .key
    fedseg certs site site-1 --dir pki                   # pki/sites/site-1.crt + .key
    fedseg certs site site-1 --dir pki --rotate          # a new key and certificate; the old serial is revoked
    fedseg certs revoke site-1 --dir pki                 # every certificate of site-1 refused

Site certificates carry the site name as their common name and as the SAN URI
``spiffe://fedsegnet/site/NAME``, and are usable only as TLS clients (extended key usage
clientAuth); the aggregator's only as a TLS server. Keys are ECDSA P-256, written with mode
0600. The revocation file is what the aggregator's ``--revoked`` reads (re-read on change).

The CA key signs every identity of the federation: keep it offline (``--dir`` on an encrypted
volume), and give each site only its own ``.crt``/``.key`` and ``ca.crt``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from aggregator_service.errors import AggregatorError, check_site_name
from aggregator_service.security import (
    SITE_URI_PREFIX,
    parse_revocations,
    revocation_entry,
)
from codec import atomic_write_bytes

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
REVOKED = "revoked.txt"
DEFAULT_CA_DAYS = 3650
DEFAULT_DAYS = 365


@dataclass(frozen=True)
class Issued:
    """A certificate written to disk."""

    cert: Path
    key: Path
    serial: int


def site_paths(directory: Path, site: str) -> tuple[Path, Path]:
    return directory / "sites" / f"{site}.crt", directory / "sites" / f"{site}.key"


def server_paths(directory: Path, name: str) -> tuple[Path, Path]:
    return directory / "server" / f"{name}.crt", directory / "server" / f"{name}.key"


def _write(path: Path, data: bytes, mode: int) -> None:
    # mode is set before the bytes are written: a key is never readable by others, even briefly.
    atomic_write_bytes(path, data, mode=mode)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _check_days(days: int) -> None:
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days}")


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    if not cert_path.exists() or not key_path.exists():
        raise ValueError(f"no federation CA in {directory}: run `fedseg certs init --dir {directory}` first")
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key_path} is not an EC private key")
    return cert, key


def _builder(subject: x509.Name, issuer: x509.Name, public_key: Any, days: int) -> x509.CertificateBuilder:
    # Backdated a few minutes: a site whose clock is slightly behind must not see "not yet valid".
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def init_ca(directory: str | Path, *, name: str = "FedSegNet federation CA", days: int = DEFAULT_CA_DAYS,
            force: bool = False) -> Issued:
    """Create the federation CA (``ca.crt``, ``ca.key``) and an empty revocation file."""
    _check_days(days)
    directory = Path(directory)
    if (directory / CA_KEY).exists() and not force:
        raise ValueError(f"{directory / CA_KEY} exists; a new CA invalidates every certificate it signed "
                         "(pass --force if that is what you want)")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        _builder(subject, subject, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    _write(directory / CA_KEY, _key_pem(key), 0o600)
    _write(directory / CA_CERT, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    if not (directory / REVOKED).exists():
        _write(directory / REVOKED, b"# revoked site names, or serial:HEX of single certificates; one a line\n", 0o644)
    return Issued(directory / CA_CERT, directory / CA_KEY, cert.serial_number)


def _issue(directory: Path, cert_path: Path, key_path: Path, common_name: str, sans: Sequence[x509.GeneralName],
           usage: x509.ObjectIdentifier, days: int) -> Issued:
    _check_days(days)
    ca_cert, ca_key = _load_ca(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]), ca_cert.subject,
                 key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        # A site certificate cannot serve TLS and the aggregator's cannot act as a site.
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write(key_path, _key_pem(key), 0o600)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return Issued(cert_path, key_path, cert.serial_number)


def certificate_serial(path: str | Path) -> int:
    return x509.load_pem_x509_certificate(Path(path).read_bytes()).serial_number


def issue_site(directory: str | Path, site: str, *, days: int = DEFAULT_DAYS, rotate: bool = False) -> Issued:
    """A client certificate and key for ``site`` (CN and SAN URI name it), signed by the CA.

    With ``rotate=True`` an existing certificate is replaced and its serial revoked, so the old
    key stops working at the aggregator's next request while the site keeps its name.
    """
    try:
        check_site_name(site)
    except AggregatorError as exc:
        raise ValueError(str(exc)) from None
    directory = Path(directory)
    cert_path, key_path = site_paths(directory, site)
    old_serial = certificate_serial(cert_path) if cert_path.exists() else None
    if old_serial is not None and not rotate:
        raise ValueError(f"{cert_path} exists; pass --rotate to replace it (the old certificate is revoked)")
    issued = _issue(directory, cert_path, key_path, site, [x509.UniformResourceIdentifier(SITE_URI_PREFIX + site)],
                    ExtendedKeyUsageOID.CLIENT_AUTH, days)
    if old_serial is not None:
        _append_revocation(directory, revocation_entry(serial=old_serial), f"rotated {site}")
    return issued


def issue_server(directory: str | Path, dns_names: Sequence[str], *, ip_addresses: Sequence[str] = (),
                 name: str = "aggregator", days: int = DEFAULT_DAYS) -> Issued:
    """The aggregator's server certificate for the names clients dial (``--aggregator HOST:PORT``)."""
    if not dns_names and not ip_addresses:
        raise ValueError("a server certificate needs at least one --dns name or --ip address clients connect to")
    try:
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
        sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    except ValueError as exc:
        raise ValueError(f"bad server name or address: {exc}") from None
    directory = Path(directory)
    cert_path, key_path = server_paths(directory, name)
    return _issue(directory, cert_path, key_path, name, sans, ExtendedKeyUsageOID.SERVER_AUTH, days)


def _append_revocation(directory: Path, entry: str, comment: str) -> None:
    path = directory / REVOKED
    text = path.read_text() if path.exists() else ""
    sites, serials = parse_revocations(text)
    new_sites, new_serials = parse_revocations(entry)
    if new_sites <= sites and new_serials <= serials:
        return  # already revoked
    if text and not text.endswith("\n"):
        text += "\n"
    _write(path, f"{text}{entry}  # {comment}, {dt.date.today().isoformat()}\n".encode(), 0o644)


def revoke(directory: str | Path, site: str, *, serial_only: bool = False) -> str:
    """Add a site (every certificate it has or will have) or only its current certificate's
    serial to the revocation file; returns the entry. The aggregator applies it at the next request."""
    try:
        check_site_name(site)  # a name the aggregator refuses can never be a certificate to revoke
    except AggregatorError as exc:
        raise ValueError(str(exc)) from None
    directory = Path(directory)
    if serial_only:
        cert_path = site_paths(directory, site)[0]
        if not cert_path.exists():
            raise ValueError(f"no certificate for site {site!r} at {cert_path}")
        entry = revocation_entry(serial=certificate_serial(cert_path))
    else:
        entry = revocation_entry(site=site)
    _append_revocation(directory, entry, f"revoked {site}")
    return entry


# ---------------------------------------------------------------------------------------------
# command line


def run(args: argparse.Namespace) -> int:
    """``fedseg certs init|server|site|revoke``: one command, one line of what was written."""
    directory = Path(args.dir)
    if args.certs_command == "init":
        issued = init_ca(directory, name=args.name, days=args.days, force=args.force)
        print(f"CA: {issued.cert} (key {issued.key}: keep it offline); revocation file: {directory / REVOKED}")
    elif args.certs_command == "server":
        issued = issue_server(directory, args.dns, ip_addresses=args.ip, name=args.name, days=args.days)
        print(f"server certificate: {issued.cert}, key {issued.key} (serial {issued.serial:x})")
        print(f"aggregator-service --tls-cert {issued.cert} --tls-key {issued.key} --tls-ca {directory / CA_CERT} "
              f"--revoked {directory / REVOKED} ...")
    elif args.certs_command == "site":
        issued = issue_site(directory, args.name, days=args.days, rotate=args.rotate)
        print(f"site {args.name}: {issued.cert}, key {issued.key} (serial {issued.serial:x}); give the site these "
              f"two files and {directory / CA_CERT}")
    else:
        entry = revoke(directory, args.name, serial_only=args.serial_only)
        print(f"added {entry!r} to {directory / REVOKED}; the aggregator refuses it from its next request")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``fedseg certs``' sub-commands ``init``, ``server``, ``site`` and ``revoke``."""
    sub = parser.add_subparsers(dest="certs_command", required=True)

    def common(p: argparse.ArgumentParser, days: int) -> None:
        p.add_argument("--dir", default="pki", help="the PKI directory (default: pki)")
        p.add_argument("--days", type=int, default=days, help=f"validity in days (default {days})")

    init = sub.add_parser("init", help="create the federation CA and an empty revocation file")
    common(init, DEFAULT_CA_DAYS)
    init.add_argument("--name", default="FedSegNet federation CA", help="the CA's common name")
    init.add_argument("--force", action="store_true", help="replace an existing CA (invalidates all certificates)")

    server = sub.add_parser("server", help="the aggregator's server certificate")
    common(server, DEFAULT_DAYS)
    server.add_argument("--dns", action="append", default=[], help="a DNS name clients dial (repeatable)")
    server.add_argument("--ip", action="append", default=[], help="an IP address clients dial (repeatable)")
    server.add_argument("--name", default="aggregator", help="file name and CN (default: aggregator)")

    site = sub.add_parser("site", help="a site's client certificate (CN = the site name)")
    site.add_argument("name", help="the site name, as listed in the federation configuration")
    common(site, DEFAULT_DAYS)
    site.add_argument("--rotate", action="store_true", help="replace an existing certificate and revoke the old one")

    rev = sub.add_parser("revoke", help="refuse a site (or only its current certificate)")
    rev.add_argument("name", help="the site name")
    rev.add_argument("--dir", default="pki", help="the PKI directory (default: pki)")
    rev.add_argument("--serial-only", action="store_true",
                     help="revoke only the site's current certificate (by serial), not the site")
