"""Checks deploy-smoke.sh runs from the host against a played aggregator (the project's venv).

    python scripts/smoke_checks.py health  --target 127.0.0.1:P --tls DIR [--service NAME] [--timeout S]
    python scripts/smoke_checks.py health-only --target 127.0.0.1:H
    python scripts/smoke_checks.py metrics --url http://127.0.0.1:M/metrics
    python scripts/smoke_checks.py status  --target 127.0.0.1:P --tls DIR --rounds N

``--tls DIR`` holds a site's tls.crt, tls.key and ca.crt: the aggregator requires a client
certificate, and a site's is the one that exists. Exit status 0 when the check passes, 1 with a
message on stderr otherwise.
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.fedsegnet.v1 import aggregator_pb2 as pb
from protos.fedsegnet.v1 import aggregator_pb2_grpc as pb_grpc


def channel(target: str, tls: Path | None) -> grpc.Channel:
    """A mutual-TLS channel with a site's files from ``tls``, or plaintext when ``tls`` is None."""
    if tls is None:
        return grpc.insecure_channel(target)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(tls / "ca.crt").read_bytes(),
        private_key=(tls / "tls.key").read_bytes(),
        certificate_chain=(tls / "tls.crt").read_bytes(),
    )
    return grpc.secure_channel(target, credentials)


def wait_serving(target: str, tls: Path | None, service: str, timeout_s: float) -> str:
    """Poll the health service until ``service`` is SERVING; return the last status name."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    with channel(target, tls) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return last
            except grpc.RpcError as exc:
                last = f"{exc.code().name}: {exc.details()}"  # type: ignore[attr-defined]
            time.sleep(1)
    return last


def aggregator_call_refused(target: str) -> str:
    """An aggregator RPC in plaintext at ``target``: the status code name it got, "OK" if served."""
    with channel(target, None) as ch:
        try:
            pb_grpc.AggregatorServiceStub(ch).GetStatus(pb.GetStatusRequest(), timeout=10)
        except grpc.RpcError as exc:
            return exc.code().name  # type: ignore[attr-defined]
    return "OK"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="check", required=True)
    h = sub.add_parser("health")
    h.add_argument("--target", required=True)
    h.add_argument("--tls", type=Path, help="a site's TLS folder; plaintext without it")
    h.add_argument("--service", default="fedsegnet.v1.AggregatorService")
    h.add_argument("--timeout", type=float, default=120.0)
    o = sub.add_parser("health-only", help="the plaintext health port answers UNIMPLEMENTED to an aggregator RPC")
    o.add_argument("--target", required=True)
    m = sub.add_parser("metrics")
    m.add_argument("--url", required=True)
    s = sub.add_parser("status")
    s.add_argument("--target", required=True)
    s.add_argument("--tls", type=Path)
    s.add_argument("--rounds", type=int, required=True, help="rounds the federation must have completed")
    args = p.parse_args(argv)

    if args.check == "health":
        status = wait_serving(args.target, args.tls, args.service, args.timeout)
        print(f"health {args.service or '(server)'} at {args.target}: {status}")
        return 0 if status == "SERVING" else 1
    if args.check == "health-only":
        code = aggregator_call_refused(args.target)
        print(f"aggregator GetStatus in plaintext at {args.target}: {code}")
        return 0 if code == "UNIMPLEMENTED" else 1
    if args.check == "metrics":
        with urllib.request.urlopen(args.url, timeout=10) as reply:
            text = reply.read().decode()
        names = sorted({line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")})
        print(f"metrics at {args.url}: {len(names)} families ({', '.join(names[:4])}, ...)")
        return 0 if names else 1
    with channel(args.target, args.tls) as ch:
        reply = pb_grpc.AggregatorServiceStub(ch).GetStatus(pb.GetStatusRequest(), timeout=10)
    state = pb.RoundState.Name(reply.round.state)
    print(f"status at {args.target}: {reply.rounds_completed} round(s) completed, {state}, "
          f"sites seen {sorted(reply.sites_seen)}")
    return 0 if reply.rounds_completed >= args.rounds else 1


if __name__ == "__main__":
    sys.exit(main())
