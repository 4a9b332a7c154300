"""Mutual TLS, identity, revocation and the aggregator's refusal to serve plaintext by accident.

Certificates are real (``fedseg certs`` on a temporary directory, ECDSA P-256); the aggregator is
the real server on a free port; every client is a real gRPC channel with its site's certificate.
"""

from __future__ import annotations

import argparse
import logging
import os
import stat
from pathlib import Path
from typing import Iterator

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import codec
from aggregator_service import server
from aggregator_service.security import (
    Gate,
    Peer,
    RevocationList,
    StreamLimits,
    Unauthenticated,
    parse_revocations,
    peer_from_auth_context,
    revocation_entry,
    server_credentials,
)
from client_agent.tls import channel_credentials
from aggregator_service import certs
from aggregator_service.launcher import AggregatorProcess
from fedseg.cli import main as fedseg_main
from numpy_federation import (
    Served,
    config,
    delta,
    frames_of,
    honest_rounds,
    model,
    reference_model,
    start,
    upload_requests,
)
from protos.fedsegnet.v1 import aggregator_pb2 as pb
from protos.fedsegnet.v1 import aggregator_pb2_grpc as pb_grpc

INITIAL = model()
CFG = config()


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return reference_model(tmp_path_factory.mktemp("reference"), CFG, INITIAL, honest=("a", "b"))


def site_credentials(pki: Path, site: str) -> grpc.ChannelCredentials:
    cert, key = certs.site_paths(pki, site)
    return channel_credentials(cert, key, pki / certs.CA_CERT)


def tls_server(pki: Path) -> grpc.ServerCredentials:
    cert, key = certs.server_paths(pki, "aggregator")
    return server_credentials(cert, key, pki / certs.CA_CERT)


class Sites:
    """One mutually authenticated channel per site to a served aggregator."""

    def __init__(self, served: Served, pki: Path) -> None:
        self.served, self.pki = served, pki
        self.channels: dict[str, grpc.Channel] = {}

    def stub(self, site: str, credentials: grpc.ChannelCredentials | None = None) -> pb_grpc.AggregatorServiceStub:
        if site not in self.channels:
            self.channels[site] = grpc.secure_channel(self.served.target, credentials or site_credentials(self.pki, site))
        return pb_grpc.AggregatorServiceStub(self.channels[site])

    def submit(self, site: str, round_id: int, *, as_site: str | None = None) -> pb.SubmitUpdateResponse:
        frames = frames_of(delta(as_site or site, round_id, INITIAL))
        return self.stub(site).SubmitUpdate(upload_requests(as_site or site, round_id, frames), timeout=30)

    def close(self) -> None:
        for channel in self.channels.values():
            channel.close()


@pytest.fixture
def mtls(tmp_path: Path, pki: Path) -> Iterator[tuple[Served, Sites, Path]]:
    revoked = tmp_path / "revoked.txt"
    revoked.write_text("")
    gate = Gate(require_identity=True, revocations=RevocationList(revoked))
    served = start(tmp_path, CFG, INITIAL, credentials=tls_server(pki),
                   channel_credentials=site_credentials(pki, "a"), gate=gate)
    sites = Sites(served, pki)
    yield served, sites, revoked
    sites.close()
    served.stop()


def rounds_over_mtls(sites: Sites) -> None:
    """Honest a and b, each over its own certificate, both rounds."""
    for r in (1, 2):
        honest_rounds(sites.served, (), (r,), INITIAL)  # wait for the round to open
        sites.submit("a", r)
        sites.submit("b", r)


def test_sites_with_their_own_certificates_run_the_federation(mtls: tuple, reference: bytes) -> None:
    served, sites, _ = mtls

    joined = sites.stub("a").Join(pb.JoinRequest(site="a"), timeout=30)
    rounds_over_mtls(sites)

    assert joined.round.round_id == 1
    assert served.final_model(CFG) == reference
    assert served.rejections() == {}


@pytest.mark.parametrize("rpc", ["join", "submit", "download"])
def test_a_site_cannot_act_as_another(mtls: tuple, reference: bytes, rpc: str) -> None:
    served, sites, _ = mtls
    attempts = {
        "join": lambda: sites.stub("c").Join(pb.JoinRequest(site="a"), timeout=30),
        "submit": lambda: sites.submit("c", 1, as_site="a"),
        "download": lambda: list(sites.stub("c").DownloadModel(pb.DownloadModelRequest(site="a"), timeout=30)),
    }

    with pytest.raises(grpc.RpcError) as refused:
        attempts[rpc]()

    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "identifies site 'c', but the request is for site 'a'" in refused.value.details()
    assert served.rejections() == {"identity_mismatch": 1}
    assert served.store.committed_sites(1) == []
    rounds_over_mtls(sites)
    assert served.final_model(CFG) == reference


def test_revoking_a_site_takes_effect_at_its_next_request(mtls: tuple) -> None:
    served, sites, revoked = mtls
    sites.stub("c").Join(pb.JoinRequest(site="c"), timeout=30)

    revoked.write_text(revocation_entry(site="c") + "\n")
    os.utime(revoked, ns=(0, 10**18))  # a new mtime even within the filesystem's timestamp granularity

    with pytest.raises(grpc.RpcError) as refused:
        sites.stub("c").GetRound(pb.GetRoundRequest(site="c"), timeout=30)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "site 'c' is revoked" in refused.value.details()
    sites.stub("a").GetRound(pb.GetRoundRequest(site="a"), timeout=30)  # others are unaffected
    assert served.rejections() == {"revoked": 1}


def test_a_rotated_certificate_is_refused_and_its_replacement_accepted(tmp_path: Path, pki: Path) -> None:
    # Rotation revokes the old serial in the PKI's revocation file; the aggregator reads that file.
    local = tmp_path / "pki"
    local.mkdir()
    for name in (certs.CA_CERT, certs.CA_KEY):
        (local / name).write_bytes((pki / name).read_bytes())
    certs.issue_site(local, "a")
    old = site_credentials(local, "a")
    (local / certs.REVOKED).write_text("")
    gate = Gate(require_identity=True, revocations=RevocationList(local / certs.REVOKED))
    served = start(tmp_path, CFG, INITIAL, credentials=tls_server(pki), channel_credentials=old, gate=gate)
    try:
        served.stub.Join(pb.JoinRequest(site="a"), timeout=30)

        issued = certs.issue_site(local, "a", rotate=True)

        with pytest.raises(grpc.RpcError) as refused:
            served.stub.Join(pb.JoinRequest(site="a"), timeout=30)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "is revoked" in refused.value.details()
        with grpc.secure_channel(served.target, site_credentials(local, "a")) as fresh:
            pb_grpc.AggregatorServiceStub(fresh).Join(pb.JoinRequest(site="a"), timeout=30)
        assert issued.serial not in parse_revocations((local / certs.REVOKED).read_text())[1]
    finally:
        served.stop()


@pytest.mark.parametrize("client", ["plaintext", "other-ca", "server-certificate"])
def test_peers_without_a_site_certificate_of_this_federation_fail_the_handshake(
    mtls: tuple, tmp_path: Path, pki: Path, client: str
) -> None:
    served, sites, _ = mtls
    if client == "plaintext":
        channel = grpc.insecure_channel(served.target)
    elif client == "other-ca":
        other = tmp_path / "other"
        certs.init_ca(other)
        certs.issue_site(other, "a")  # the right name, signed by the wrong CA
        cert, key = certs.site_paths(other, "a")
        channel = grpc.secure_channel(served.target, channel_credentials(cert, key, pki / certs.CA_CERT))
    else:  # the aggregator's own certificate (server auth only) presented as a client
        cert, key = certs.server_paths(pki, "aggregator")
        channel = grpc.secure_channel(served.target, channel_credentials(cert, key, pki / certs.CA_CERT))

    with channel, pytest.raises(grpc.RpcError) as refused:
        pb_grpc.AggregatorServiceStub(channel).Join(pb.JoinRequest(site="a"), timeout=10)

    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert served.store.read_json("sites.json") == []


# ---------------------------------------------------------------------------------------------
# identity from the auth context; the revocation file


def auth(cn: str | None, *sans: str) -> dict[str, list[bytes]]:
    context = {"transport_security_type": [b"ssl"], "x509_subject_alternative_name": [s.encode() for s in sans]}
    if cn is not None:
        context["x509_common_name"] = [cn.encode()]
    return context


def test_peer_identity_is_the_common_name_and_must_agree_with_the_site_uri() -> None:
    assert peer_from_auth_context({}) is None  # plaintext
    assert peer_from_auth_context(auth("a", "spiffe://fedsegnet/site/a")) == Peer("a", None)
    assert peer_from_auth_context(auth("a", "DNS:unrelated.example")) == Peer("a", None)
    with pytest.raises(Unauthenticated, match="'a' in its CN but 'spiffe://fedsegnet/site/b'"):
        peer_from_auth_context(auth("a", "spiffe://fedsegnet/site/b"))
    with pytest.raises(Unauthenticated, match="no common name"):
        peer_from_auth_context(auth(None))


def test_revocation_file_lists_sites_and_serials() -> None:
    text = "# header\nsite-1\n\nserial:0A1b  # rotated\nserial:0x10\nsite-2 # left\n"

    sites, serials = parse_revocations(text)

    assert sites == {"site-1", "site-2"}
    assert serials == {0x0A1B, 0x10}
    assert revocation_entry(serial=255) == "serial:ff"
    with pytest.raises(ValueError, match="line 1: 'serial:xyz' is not serial:HEX"):
        parse_revocations("serial:xyz\n")


def test_revocation_list_keeps_the_last_good_list_when_the_file_breaks(tmp_path: Path) -> None:
    path = tmp_path / "revoked.txt"
    path.write_text("a\n")
    revocations = RevocationList(path)

    path.write_text("serial:not-hex\n")
    os.utime(path, ns=(0, 10**18))

    with pytest.raises(Exception, match="site 'a' is revoked"):
        revocations.check("a")
    revocations.check("b")


def test_a_missing_revocation_file_is_a_startup_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        RevocationList(tmp_path / "nope.txt")


# ---------------------------------------------------------------------------------------------
# the command lines


def parse(tmp_path: Path, *flags: str) -> argparse.Namespace:
    return server._parser().parse_args(["--config", str(tmp_path / "f.toml"), *flags])


@pytest.mark.parametrize(
    "flags, message",
    [
        ((), "refusing to serve without transport security"),
        (("--tls-cert", "x.crt"), "missing --tls-key, --tls-ca"),
        (("--tls-cert", "x", "--tls-key", "y", "--tls-ca", "z", "--insecure"), "--insecure contradicts"),
        (("--tls-cert", "x", "--tls-key", "y", "--tls-ca", "z"), "does not exist"),
        (("--insecure", "--max-upload-seconds", "0"), "max_upload_seconds must be > 0"),
    ],
)
def test_aggregator_refuses_to_start_without_a_clear_transport_choice(
    tmp_path: Path, flags: tuple[str, ...], message: str, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("FEDSEG_TLS_CERT", "FEDSEG_TLS_KEY", "FEDSEG_TLS_CA", "FEDSEG_INSECURE", "FEDSEG_REVOKED"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)

    code = server.main(["--config", str(tmp_path / "f.toml"), "--store", str(tmp_path / "s"), *flags])

    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_insecure_mode_warns_and_tls_mode_requires_client_identity(
    tmp_path: Path, pki: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDSEG_INSECURE", "1")
    with caplog.at_level(logging.WARNING, logger="aggregator_service"):
        credentials, gate = server.transport_security(parse(tmp_path))
    assert credentials is None and not gate.require_identity
    assert "PLAINTEXT" in caplog.text

    monkeypatch.delenv("FEDSEG_INSECURE")
    cert, key = certs.server_paths(pki, "aggregator")
    credentials, gate = server.transport_security(parse(
        tmp_path, "--tls-cert", str(cert), "--tls-key", str(key), "--tls-ca", str(pki / certs.CA_CERT),
        "--revoked", str(pki / certs.REVOKED), "--max-streams-per-site", "3",
    ))
    assert isinstance(credentials, grpc.ServerCredentials)
    assert gate.require_identity and gate.revocations is not None
    assert gate.limits == StreamLimits(max_upload_seconds=900.0, max_streams_per_site=3)


def test_certs_command_line_makes_a_usable_pki(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tmp_path / "pki")

    assert fedseg_main(["certs", "init", "--dir", d]) == 0
    assert fedseg_main(["certs", "server", "--dir", d, "--dns", "aggregator.svc", "--ip", "10.0.0.1"]) == 0
    assert fedseg_main(["certs", "site", "site-1", "--dir", d]) == 0
    assert fedseg_main(["certs", "site", "site-1", "--dir", d]) == 2  # exists: needs --rotate
    assert fedseg_main(["certs", "site", "../x", "--dir", d]) == 2
    assert fedseg_main(["certs", "revoke", "site-1", "--dir", d, "--serial-only"]) == 0
    assert fedseg_main(["certs", "revoke", "site-2", "--dir", d]) == 0
    assert fedseg_main(["certs", "revoke", "site-2", "--dir", d]) == 0  # idempotent

    err = capsys.readouterr().err
    assert "pass --rotate" in err and "'../x' is not valid" in err
    site_cert = x509.load_pem_x509_certificate((tmp_path / "pki/sites/site-1.crt").read_bytes())
    assert site_cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "site-1"
    san = site_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://fedsegnet/site/site-1"]
    eku = site_cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    server_cert = x509.load_pem_x509_certificate((tmp_path / "pki/server/aggregator.crt").read_bytes())
    names = server_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["aggregator.svc"]
    for key in ("ca.key", "sites/site-1.key", "server/aggregator.key"):
        assert stat.S_IMODE((tmp_path / "pki" / key).stat().st_mode) == 0o600, key
    sites, serials = parse_revocations((tmp_path / "pki/revoked.txt").read_text())
    assert sites == {"site-2"} and serials == {site_cert.serial_number}


def test_missing_or_bad_certificate_files_are_named(tmp_path: Path, pki: Path) -> None:
    cert, _ = certs.site_paths(pki, "a")
    ca = pki / certs.CA_CERT
    with pytest.raises(ValueError, match="site key .*nope.key does not exist"):
        channel_credentials(cert, tmp_path / "nope.key", ca)
    (tmp_path / "x.key").write_text("not pem")
    with pytest.raises(ValueError, match="x.key is not a PEM file"):
        channel_credentials(cert, tmp_path / "x.key", ca)
    with pytest.raises(ValueError, match="TLS CA certificate .*nope.crt does not exist"):
        server_credentials(cert, cert, tmp_path / "nope.crt")


@pytest.mark.slow  # starts a process
def test_the_aggregator_command_serves_mutual_tls(tmp_path: Path, pki: Path) -> None:
    (tmp_path / "f.toml").write_text('[federation]\nid = "t"\nsites = ["a", "b"]\n')
    initial = tmp_path / "initial.frames"
    codec.save_tensors(initial, list(INITIAL.items()))
    cert, key = certs.server_paths(pki, "aggregator")
    aggregator = AggregatorProcess(
        config=tmp_path / "f.toml", store=tmp_path / "store", initial_model=initial, log_path=tmp_path / "agg.log",
        extra_args=["--tls-cert", str(cert), "--tls-key", str(key), "--tls-ca", str(pki / certs.CA_CERT),
                    "--revoked", str(pki / certs.REVOKED)],
    )
    with aggregator:
        target = f"localhost:{aggregator.port}"  # the name in the server certificate
        with grpc.secure_channel(target, site_credentials(pki, "b")) as channel:
            joined = pb_grpc.AggregatorServiceStub(channel).Join(pb.JoinRequest(site="b"), timeout=30)
        with grpc.insecure_channel(target) as channel, pytest.raises(grpc.RpcError) as plaintext:
            pb_grpc.AggregatorServiceStub(channel).Join(pb.JoinRequest(site="b"), timeout=10)

        assert joined.round.round_id == 1
        assert plaintext.value.code() == grpc.StatusCode.UNAVAILABLE
    assert aggregator.proc is not None and aggregator.proc.returncode == 0, aggregator.log_tail()
    assert "(mutual TLS)" in aggregator.log_path.read_text()
