"""Three hosts, no containers: the aggregator and two client agents in their own network namespaces.

Each process runs in a Linux network namespace of its own with one address (10.200.0.1 for the
aggregator, .2 and .3 for the sites), joined to the others only through a bridge in a fourth
namespace, so the agents reach the aggregator over a real (virtual) network with mutual TLS, as
separate machines would; nothing listens on or talks to the host's interfaces. The private
addresses exist only inside the namespaces this test creates and deletes. One round of a tiny
federation (tests/support.py), as real processes (the aggregator started by the one launcher, under
``ip netns exec``, and ``client-agent``). Needs root (``ip netns``); skipped otherwise.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from aggregator_service.launcher import AggregatorProcess
from support import federation_toml

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2's ip (apt-get install iproute2)"),
]

REPO = Path(__file__).resolve().parents[2]
SUBNET = "10.200.0"  # only inside the namespaces made here
HOSTS = {"aggregator": 1, "site-a": 2, "site-b": 3}
PORT = 50051

FEDERATION_TOML = federation_toml(
    federation_id="netns", sites=("site-a", "site-b"), img_size=32,
    training={"local_epochs": 1, "learning_rate": 1e-3, "batch_size": 2, "seed": 3},
)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@contextlib.contextmanager
def network(tag: str) -> Iterator[dict[str, str]]:
    """One namespace per host in ``HOSTS``, each with ``eth0`` on a bridge in a namespace of its own.

    Yields ``{host: namespace}``; every namespace (and so every veth and the bridge) is deleted
    on the way out, whatever happened.
    """
    created: list[str] = []
    try:
        bridge_ns = f"fsn{tag}-br"
        _ip("netns", "add", bridge_ns)
        created.append(bridge_ns)
        _ip("-n", bridge_ns, "link", "add", "br0", "type", "bridge")
        _ip("-n", bridge_ns, "link", "set", "br0", "up")
        namespaces = {}
        for host, octet in HOSTS.items():
            ns = f"fsn{tag}-{host}"
            _ip("netns", "add", ns)
            created.append(ns)
            _ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"port{octet}", "netns", bridge_ns)
            _ip("-n", bridge_ns, "link", "set", f"port{octet}", "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{SUBNET}.{octet}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            namespaces[host] = ns
        yield namespaces
    finally:
        for ns in reversed(created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def _in(ns: str, *command: str | Path) -> list[str]:
    return ["ip", "netns", "exec", ns, *(str(c) for c in command)]


def _certs(pki: Path, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "fedseg", "certs", *args, "--dir", str(pki)], check=True,
                   capture_output=True, text=True, timeout=120, cwd=REPO)


@pytest.fixture(scope="module")
def three_host_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    from aggregator_service.config import load_federation_config
    from experiments.simulate import write_initial_model
    from experiments.sitedata import generate_federation

    root = tmp_path_factory.mktemp("netns")
    data = generate_federation(root / "data", sites=2, cases_per_site=(3, 2), test_cases=1, size=32, seed=1)
    (root / "federation.toml").write_text(FEDERATION_TOML)
    initial = write_initial_model(load_federation_config(root / "federation.toml"), root / "initial.frames")
    pki = root / "pki"
    _certs(pki, "init")
    # The sites dial the aggregator's address, so its certificate names that address.
    _certs(pki, "server", "--ip", f"{SUBNET}.{HOSTS['aggregator']}")
    for site in ("site-a", "site-b"):
        _certs(pki, "site", site)
    tls = ["--tls-ca", str(pki / "ca.crt")]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    logs = {site: (root / f"{site}.log").open("w") for site in ("site-a", "site-b")}
    aggregator: AggregatorProcess | None = None
    sites: dict[str, subprocess.Popen] = {}
    try:
        with network(str(os.getpid())) as ns:
            aggregator = AggregatorProcess(
                config=root / "federation.toml", store=root / "store", initial_model=initial,
                log_path=root / "aggregator.log", host=f"{SUBNET}.{HOSTS['aggregator']}", port=PORT,
                port_file=root / "port", wrapper=["ip", "netns", "exec", ns["aggregator"]], cwd=root,
                extra_args=["--tls-cert", str(pki / "server" / "aggregator.crt"),
                            "--tls-key", str(pki / "server" / "aggregator.key"), *tls],
                start_timeout_s=60,
            ).start()
            for site, folder in zip(("site-a", "site-b"), data.site_dirs):
                sites[site] = subprocess.Popen(
                    _in(ns[site], sys.executable, "-m", "client_agent.cli",
                        "--data", folder, "--aggregator", aggregator.target, "--site", site,
                        "--state-dir", root / "states" / site, "--device", "cpu", "--augment", "no",
                        "--val-fraction", "0.34", "--log-format", "json",
                        "--tls-cert", pki / "sites" / f"{site}.crt", "--tls-key", pki / "sites" / f"{site}.key", *tls),
                    stdout=logs[site], stderr=subprocess.STDOUT, env=env, cwd=root,
                )
            codes = {site: process.wait(timeout=600) for site, process in sites.items()}
            yield {"root": root, "codes": codes, "namespaces": ns,
                   "logs": {name: (root / f"{name}.log") for name in HOSTS}}
    finally:
        for process in sites.values():
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
        if aggregator is not None:
            aggregator.stop()
        for log in logs.values():
            log.close()


def test_both_sites_finish_the_round_across_namespaces(three_host_run: dict) -> None:
    logs = {name: path.read_text() for name, path in three_host_run["logs"].items()}
    assert three_host_run["codes"] == {"site-a": 0, "site-b": 0}, logs
    for site in ("site-a", "site-b"):
        assert '"event": "finished"' in logs[site], logs[site]
        assert f"committed update from {site}" in logs["aggregator"]


def test_the_store_holds_the_closed_round_and_the_next_model(three_host_run: dict) -> None:
    from aggregator_service.store import Store

    store = Store(three_host_run["root"] / "store")
    assert store.read_json("state.json")["state"] == "finished"
    submissions = [store.read_submission(1, s) for s in ("site-a", "site-b")]
    # 3 and 2 cases, one of each held out for validation: 2 and 1 training samples.
    assert [s["sample_count"] if s else None for s in submissions] == [2, 1]
    assert store.model_path(2).is_file()


def test_network_namespaces_are_removed_even_when_the_body_fails() -> None:
    def listed() -> str:
        return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout

    made: dict[str, str] = {}
    with pytest.raises(RuntimeError, match="body failed"):
        with network(f"{os.getpid()}x") as ns:
            made.update(ns)
            assert all(name in listed() for name in ns.values())
            raise RuntimeError("body failed")
    assert sorted(made) == sorted(HOSTS)
    assert not any(name in listed() for name in made.values())
