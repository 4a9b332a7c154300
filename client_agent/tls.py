"""The client agent's side of mutual TLS: channel credentials from the site's PEM files.

A site holds three files made by ``fedseg certs``: its certificate (CN = the site name), its
private key, and the federation CA's certificate. The CA certificate authenticates the
aggregator; the site certificate is what the aggregator takes the site's identity from, so a
site cannot act as another.
"""

from __future__ import annotations

from pathlib import Path

import grpc

__all__ = ["channel_credentials"]


def _pem(path: str | Path, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{what} {path} does not exist (the federation operator issues it with `fedseg certs`)") from None
    if b"-----BEGIN" not in data:
        raise ValueError(f"{what} {path} is not a PEM file")
    return data


def channel_credentials(cert: str | Path, key: str | Path, ca: str | Path) -> grpc.ChannelCredentials:
    """Credentials for ``grpc.secure_channel``: present ``cert``/``key``, trust only ``ca``.

    Raises:
        ValueError: a file is missing or not PEM (the message names it).
    """
    return grpc.ssl_channel_credentials(
        root_certificates=_pem(ca, "CA certificate"),
        private_key=_pem(key, "site key"),
        certificate_chain=_pem(cert, "site certificate"),
    )
